//! The producer seam: everything [`crate::Client`] (and a handler's follow-up
//! enqueues) needs — enqueue, also inside the caller's own transaction, and the
//! operations on one job (get, its attempts, cancel, retry).

use crate::error::Result;
use crate::job::{AttemptRow, CancelResult, Enqueued, JobRow, NewJob};
use async_trait::async_trait;
use std::time::Duration;

/// A kind's options where the enqueuer knows them (it runs beside the handlers).
/// `None` leaves a value to the store: the options nodes publish (`warden.kinds`),
/// then 25 attempts / 60 s.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KindDefault {
    pub max_attempts: Option<i32>,
    pub timeout: Option<Duration>,
}

/// Per-kind defaults, looked up by kind.
pub type KindDefaults<'a> = &'a (dyn Fn(&str) -> KindDefault + Send + Sync);

/// The producer's storage seam.
///
/// Serial order follows commit order: an enqueue holds a lock on its accounts until
/// its transaction ends and reads the order key (`run_at` for "now") only once it
/// holds them (see `pg/sql/enqueue_insert.sql`). Unique keys make an enqueue
/// idempotent per account: a duplicate returns the unfinished job holding the key
/// (`Enqueued::duplicate`). Each enqueue wakes its (partition, account)s, delivered at
/// commit.
#[async_trait]
pub trait ProducerStore: Send + Sync + 'static {
    /// The connection a caller's own transaction runs on (`sqlx::PgConnection`).
    type Conn: Send;

    /// Enqueue up to [`crate::job::MAX_ENQUEUE_BATCH`] validated jobs in one statement
    /// and a transaction of its own.
    async fn enqueue(&self, jobs: &[NewJob], defaults: KindDefaults<'_>) -> Result<Vec<Enqueued>>;
    /// [`ProducerStore::enqueue`] inside the caller's transaction (or on any
    /// connection): if it rolls back, nothing was enqueued and nobody was woken.
    async fn enqueue_in(
        &self,
        conn: &mut Self::Conn,
        jobs: &[NewJob],
        defaults: KindDefaults<'_>,
    ) -> Result<Vec<Enqueued>>;
    async fn get_job(&self, job_id: i64) -> Result<Option<JobRow>>;
    /// The jobs of `job_ids` that exist, in id order (at most
    /// [`crate::job::MAX_ENQUEUE_BATCH`] ids).
    async fn get_jobs(&self, job_ids: &[i64]) -> Result<Vec<JobRow>>;
    /// Every attempt of the job, in order.
    async fn attempts_of(&self, job_id: i64) -> Result<Vec<AttemptRow>>;
    /// Cancel a job: queued → cancelled now (and its account woken: its next job may
    /// now be the head); running → flag it and notify its owner; finished → say so.
    async fn cancel_job(&self, job_id: i64) -> Result<CancelResult>;
    /// Put a discarded or cancelled job back in the queue with one more attempt
    /// allowed. Its serial position is unchanged, so it blocks its account's later jobs
    /// again. [`crate::Error::JobNotFound`], or invalid input for a job in another state.
    async fn retry_job(&self, job_id: i64) -> Result<JobRow>;
}
