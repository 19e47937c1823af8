//! The enqueue client, and the operations on jobs (get, cancel, retry).
//!
//! Transactional enqueue: [`Client::enqueue_in`] runs inside the caller's own
//! transaction — if it rolls back, nothing was enqueued and nobody was woken
//! (PostgreSQL delivers NOTIFY only on commit).

use crate::error::{Error, Result};
use crate::handler::Registry;
use crate::job::{AttemptRow, CancelResult, Enqueued, JobRow, JobState, NewJob};
use crate::store::{self, AdminStore, KindDefault, PgStore, ProducerStore, StateCounts};
use sqlx::postgres::PgPool;
use std::sync::Arc;
use std::time::Duration;
use warden_cluster::PartitionCount;

/// First poll interval of [`Client::wait_finished`].
pub const WAIT_POLL_MIN: Duration = Duration::from_millis(10);
/// Longest poll interval of [`Client::wait_finished`].
pub const WAIT_POLL_MAX: Duration = Duration::from_millis(500);

#[derive(Clone, Debug)]
pub struct Client {
    /// The producer seam on the client's pool.
    store: PgStore,
    /// Per-kind defaults (max attempts, timeout) when the client runs beside handlers.
    registry: Option<Arc<Registry>>,
}

impl Client {
    /// A client on a database where a node has initialised the schema.
    pub async fn connect(pool: PgPool) -> Result<Self> {
        let partitions = store::load_partitions(&pool).await?;
        Ok(Self { store: PgStore::new(pool, partitions), registry: None })
    }

    pub(crate) fn with_registry(pool: PgPool, partitions: PartitionCount, registry: Arc<Registry>) -> Self {
        Self { store: PgStore::new(pool, partitions), registry: Some(registry) }
    }

    pub fn pool(&self) -> &PgPool {
        self.store.pool()
    }

    /// The same client (partition count, per-kind defaults) on another pool: the gRPC
    /// API's own, so its calls never take an executor connection.
    pub fn on_pool(&self, pool: PgPool) -> Self {
        Self { store: PgStore::new(pool, self.partitions()), registry: self.registry.clone() }
    }

    pub fn partitions(&self) -> PartitionCount {
        self.store.partitions()
    }

    /// Periodic schedules: create, change, pause, trigger, backfill, … (see
    /// [`crate::scheduler`]).
    pub fn schedules(&self) -> crate::scheduler::Schedules {
        crate::scheduler::Schedules { store: self.store.clone() }
    }

    /// The options of `kind` where this client's registry knows them. Kinds it does not
    /// know resolve in the database, from the options nodes publish (`warden.kinds`),
    /// then 25 attempts / 60 s.
    fn kind_default(&self, kind: &str) -> KindDefault {
        match self.registry.as_ref().and_then(|r| r.options(kind)) {
            Some(o) => KindDefault { max_attempts: Some(o.max_attempts), timeout: Some(o.timeout) },
            None => KindDefault::default(),
        }
    }

    /// Enqueue one job in its own transaction.
    pub async fn enqueue(&self, job: NewJob) -> Result<Enqueued> {
        Ok(self.enqueue_many(std::slice::from_ref(&job)).await?.remove(0))
    }

    /// Enqueue up to [`crate::job::MAX_ENQUEUE_BATCH`] jobs in one statement and transaction.
    pub async fn enqueue_many(&self, jobs: &[NewJob]) -> Result<Vec<Enqueued>> {
        for j in jobs {
            j.validate()?;
        }
        self.store.enqueue(jobs, &|k| self.kind_default(k)).await
    }

    /// Enqueue inside the caller's transaction (or on any connection).
    ///
    /// Order: the enqueue holds a lock on the job's account until the transaction
    /// ends, so another transaction's enqueue for the same account waits for this one
    /// to commit or roll back and then sorts after it (serial order follows commit
    /// order). Keep transactions that enqueue short.
    ///
    /// Deadlocks: one [`Client::enqueue_many_in`] call (or `warden.enqueue` call) takes
    /// its locks in a fixed order and cannot deadlock with another *call*. Transactions
    /// that enqueue in several statements can, like any transactions taking row locks
    /// in different orders: two that enqueue for several accounts in opposite orders;
    /// two row triggers calling `warden.enqueue` over bulk updates of the same
    /// accounts; two that each enqueued one job and then a large batch over a shared
    /// hash group (the batch must upgrade a shared group lock). PostgreSQL detects it
    /// and aborts one transaction with SQLSTATE 40P01, which the caller should retry
    /// (in a handler, the attempt fails and is retried like any error). See
    /// [`store::ENQUEUE_LOCK_CLASS`] for the locks and their bounds.
    pub async fn enqueue_in(&self, conn: &mut sqlx::PgConnection, job: NewJob) -> Result<Enqueued> {
        Ok(self.enqueue_many_in(conn, std::slice::from_ref(&job)).await?.remove(0))
    }

    /// [`Client::enqueue_in`] for up to [`crate::job::MAX_ENQUEUE_BATCH`] jobs in one statement.
    /// Above [`store::ENQUEUE_LOCK_BATCH`] distinct accounts the statement locks the
    /// accounts' hash groups (1/256 of all accounts each) instead of each account, so
    /// until it commits, enqueues for other accounts in those groups wait too.
    pub async fn enqueue_many_in(&self, conn: &mut sqlx::PgConnection, jobs: &[NewJob]) -> Result<Vec<Enqueued>> {
        self.store.enqueue_in(conn, jobs, &|k| self.kind_default(k)).await
    }

    pub async fn get(&self, job_id: i64) -> Result<Option<JobRow>> {
        self.store.get_job(job_id).await
    }

    /// Wait until every job of `job_ids` is finished (completed, discarded or
    /// cancelled) and return their rows in id order; `Error::Timeout` if some are not
    /// finished within `timeout`. Polls by primary key, every 10 ms at first and
    /// backing off to every [`WAIT_POLL_MAX`]. An id with no job (never enqueued, or
    /// pruned by retention) is `Error::JobNotFound`. At most
    /// [`crate::job::MAX_ENQUEUE_BATCH`] ids per call.
    pub async fn wait_finished(&self, job_ids: &[i64], timeout: Duration) -> Result<Vec<JobRow>> {
        if job_ids.len() > crate::job::MAX_ENQUEUE_BATCH {
            return Err(Error::InvalidInput(format!(
                "wait for at most {} jobs per call, not {}",
                crate::job::MAX_ENQUEUE_BATCH,
                job_ids.len()
            )));
        }
        // `Duration::MAX` (no limit) would overflow the deadline: cap it at a century.
        let now = tokio::time::Instant::now();
        let deadline = now.checked_add(timeout).unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400));
        let mut poll = WAIT_POLL_MIN;
        loop {
            let rows = self.store.get_jobs(job_ids).await?;
            if let Some(missing) = job_ids.iter().find(|id| rows.binary_search_by_key(*id, |r| r.id).is_err()) {
                return Err(Error::JobNotFound(*missing));
            }
            if rows.iter().all(|r| r.state().is_some_and(JobState::is_terminal)) {
                return Ok(rows);
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(Error::Timeout(timeout));
            }
            tokio::time::sleep(poll.min(deadline - now)).await;
            poll = (poll * 2).min(WAIT_POLL_MAX);
        }
    }

    pub async fn attempts(&self, job_id: i64) -> Result<Vec<AttemptRow>> {
        self.store.attempts_of(job_id).await
    }

    /// Cancel a queued job at once, or ask a running one to stop (it is aborted
    /// after the node's cancel grace if its handler ignores the request).
    pub async fn cancel(&self, job_id: i64) -> Result<CancelResult> {
        self.store.cancel_job(job_id).await
    }

    /// Re-queue a discarded or cancelled job.
    pub async fn retry(&self, job_id: i64) -> Result<JobRow> {
        self.store.retry_job(job_id).await
    }

    pub async fn state_counts(&self) -> Result<StateCounts> {
        self.store.admin().state_counts().await
    }
}
