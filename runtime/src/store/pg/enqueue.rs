//! [`ProducerStore`] on PostgreSQL: enqueue and its locks, and the client's
//! operations on one job.

use super::PgStore;
use crate::error::{Error, Result};
use crate::job::{AttemptRow, CancelResult, Enqueued, JobRow, NewJob, Schedule};
use crate::store::{ms, KindDefaults, ProducerStore, CHANNEL_CANCEL, CHANNEL_WAKE};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::Row;
use warden_cluster::{partition_of, PartitionCount};

/// The per-account enqueue lock (transaction-scoped advisory locks). Two levels, so
/// that one statement never takes more than 256 locks (PostgreSQL's lock table is
/// shared and small: 64 × `max_connections` entries by default) and yet enqueues of
/// different accounts rarely wait for each other:
/// - an account `a` is `(ENQUEUE_LOCK_CLASS, hashtext(a))`, in group
///   `(ENQUEUE_LOCK_CLASS + 1, hashtext(a) >> 24)`, one of 256;
/// - a statement with at most [`ENQUEUE_LOCK_BATCH`] accounts takes each account's
///   group *shared*, then the account *exclusive* (`warden.enqueue`, migration 0002,
///   does this for its one account);
/// - a larger batch takes each of its groups *exclusive*, which covers every account
///   in them.
///
/// Two enqueues of one account therefore always conflict on something and run one
/// after the other. The class is "WARD"; two-key advisory locks never collide with
/// one-key (`bigint`) ones such as the migration lock.
///
/// Locks last until the transaction ends, so the bound is per *transaction* too: the
/// transaction-local setting `warden.enqueue_accounts` counts the accounts locked
/// one by one, and once that would pass [`ENQUEUE_LOCK_BATCH`] every further enqueue
/// in the transaction (a long loop, a row trigger over a bulk update) takes group
/// locks. A transaction thus holds at most 64 account locks and 256 + 256 group locks.
pub const ENQUEUE_LOCK_CLASS: i32 = 0x5741_5244;

/// Distinct accounts above which a statement locks whole groups (see [`ENQUEUE_LOCK_CLASS`]).
pub const ENQUEUE_LOCK_BATCH: usize = 64;

/// Enqueue for one account: its locks, then the insert. The two parts are kept as
/// two files joined here (the only `concat!` of SQL in the store) because the insert
/// must be the same text in both enqueue statements: a copy could drift.
const ENQUEUE_ONE_ACCOUNT_SQL: &str =
    concat!(include_str!("../sql/enqueue_lock_one_account.sql"), include_str!("../sql/enqueue_insert.sql"));

/// Enqueue for several accounts: their locks in one global order, then the same
/// insert as [`ENQUEUE_ONE_ACCOUNT_SQL`].
const ENQUEUE_MANY_ACCOUNTS_SQL: &str =
    concat!(include_str!("../sql/enqueue_lock_many_accounts.sql"), include_str!("../sql/enqueue_insert.sql"));

/// The two enqueues when a job has an idempotency key (migration 0007's table): kept
/// apart so that enqueues without keys never name a table an older schema lacks.
const ENQUEUE_ONE_ACCOUNT_KEYED_SQL: &str =
    concat!(include_str!("../sql/enqueue_lock_one_account.sql"), include_str!("../sql/enqueue_insert_keyed.sql"));
const ENQUEUE_MANY_ACCOUNTS_KEYED_SQL: &str =
    concat!(include_str!("../sql/enqueue_lock_many_accounts.sql"), include_str!("../sql/enqueue_insert_keyed.sql"));

/// The unfinished job holding unique key $2 of account $1.
const UNIQUE_KEY_HOLDER_SQL: &str = "
    SELECT id FROM warden.jobs WHERE account = $1 AND unique_key = $2
      AND state IN ('scheduled', 'available', 'retryable', 'running')";

/// The job an idempotency key $2 of account $1 stands for (the statement just inserted
/// it, or it was kept from an earlier enqueue).
const IDEMPOTENCY_KEY_HOLDER_SQL: &str = "SELECT job_id FROM warden.idempotency_keys WHERE account = $1 AND key = $2";

/// Cancel, step 1: the job's state, partition and account, locked ($1 job id).
const CANCEL_LOCK_SQL: &str = "SELECT state, partition, account FROM warden.jobs WHERE id = $1 FOR UPDATE";
/// Cancel a queued job ($1 job id).
const CANCEL_QUEUED_SQL: &str = "
    UPDATE warden.jobs SET state = 'cancelled', finished_at = statement_timestamp(),
           last_error = 'cancelled before it ran'
    WHERE id = $1";
/// Ask a running job to stop ($1 job id); its owner is notified.
const REQUEST_CANCEL_SQL: &str = "UPDATE warden.jobs SET cancel_requested = true WHERE id = $1";
/// NOTIFY channel $1 with payload $2, delivered at commit.
const NOTIFY_SQL: &str = "SELECT pg_notify($1, $2)";
/// Re-queue a discarded or cancelled job ($1 job id) with one more attempt allowed, and
/// wake its account.
const RETRY_SQL: &str = "
    WITH r AS (
        UPDATE warden.jobs SET state = 'available', due_at = statement_timestamp(), finished_at = NULL,
               cancel_requested = false, max_attempts = GREATEST(max_attempts, attempt + 1)
        WHERE id = $1 AND state IN ('discarded', 'cancelled')
        RETURNING *),
    n AS (SELECT pg_notify('warden_wake', partition::text || ':' || account) FROM r)
    SELECT r.* FROM r LEFT JOIN (SELECT count(*) FROM n) c ON true";
const GET_JOB_SQL: &str = "SELECT * FROM warden.jobs WHERE id = $1";
const GET_JOBS_SQL: &str = "SELECT * FROM warden.jobs WHERE id = ANY($1) ORDER BY id";
const ATTEMPTS_OF_SQL: &str = "SELECT * FROM warden.attempts WHERE job_id = $1 ORDER BY id";

#[async_trait]
impl ProducerStore for PgStore {
    type Conn = sqlx::PgConnection;

    async fn enqueue(&self, jobs: &[NewJob], defaults: KindDefaults<'_>) -> Result<Vec<Enqueued>> {
        let mut tx = self.pool.begin().await?;
        let out = insert_resolved(&mut tx, self.partitions, jobs, defaults).await?;
        tx.commit().await?;
        Ok(out)
    }

    async fn enqueue_in(
        &self,
        conn: &mut sqlx::PgConnection,
        jobs: &[NewJob],
        defaults: KindDefaults<'_>,
    ) -> Result<Vec<Enqueued>> {
        insert_resolved(conn, self.partitions, jobs, defaults).await
    }

    /// Cancel a job: queued → cancelled now; running → flag it and notify its owner.
    async fn cancel_job(&self, job_id: i64) -> Result<CancelResult> {
        let mut tx = self.pool.begin().await?;
        let row: Option<(String, i32, String)> =
            sqlx::query_as(CANCEL_LOCK_SQL).bind(job_id).fetch_optional(&mut *tx).await?;
        let Some((state, partition, account)) = row else {
            return Err(Error::JobNotFound(job_id));
        };
        let result = match state.as_str() {
            "scheduled" | "available" | "retryable" => {
                sqlx::query(CANCEL_QUEUED_SQL).bind(job_id).execute(&mut *tx).await?;
                // The account's next job may now be its head.
                sqlx::query(NOTIFY_SQL)
                    .bind(CHANNEL_WAKE)
                    .bind(format!("{partition}:{account}"))
                    .execute(&mut *tx)
                    .await?;
                CancelResult::Cancelled
            }
            "running" => {
                sqlx::query(REQUEST_CANCEL_SQL).bind(job_id).execute(&mut *tx).await?;
                sqlx::query(NOTIFY_SQL)
                    .bind(CHANNEL_CANCEL)
                    .bind(format!("{partition}:{job_id}:{account}"))
                    .execute(&mut *tx)
                    .await?;
                CancelResult::CancelRequested
            }
            other => CancelResult::AlreadyFinished { state: other.to_string() },
        };
        tx.commit().await?;
        Ok(result)
    }

    /// Put a discarded or cancelled job back in the queue with one more attempt allowed.
    /// Its serial position is unchanged, so it blocks its account's later jobs again.
    async fn retry_job(&self, job_id: i64) -> Result<JobRow> {
        let job = sqlx::query_as::<_, JobRow>(RETRY_SQL).bind(job_id).fetch_optional(&self.pool).await?;
        match job {
            Some(j) => Ok(j),
            None => match self.get_job(job_id).await? {
                None => Err(Error::JobNotFound(job_id)),
                Some(j) => Err(Error::invalid(format!(
                    "job {job_id} is {}; only discarded or cancelled jobs can be retried",
                    j.state
                ))),
            },
        }
    }

    async fn get_job(&self, job_id: i64) -> Result<Option<JobRow>> {
        Ok(sqlx::query_as::<_, JobRow>(GET_JOB_SQL).bind(job_id).fetch_optional(&self.pool).await?)
    }

    async fn get_jobs(&self, job_ids: &[i64]) -> Result<Vec<JobRow>> {
        Ok(sqlx::query_as::<_, JobRow>(GET_JOBS_SQL).bind(job_ids).fetch_all(&self.pool).await?)
    }

    async fn attempts_of(&self, job_id: i64) -> Result<Vec<AttemptRow>> {
        Ok(sqlx::query_as(ATTEMPTS_OF_SQL).bind(job_id).fetch_all(&self.pool).await?)
    }
}

/// Insert validated jobs in one statement; unique-key duplicates return the existing id.
pub(super) fn insert_resolved<'a>(
    conn: &'a mut sqlx::PgConnection,
    partitions: PartitionCount,
    jobs: &'a [NewJob],
    defaults: KindDefaults<'a>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<Enqueued>>> + Send + 'a>> {
    Box::pin(async move {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        if jobs.len() > crate::job::MAX_ENQUEUE_BATCH {
            return Err(Error::invalid(format!(
                "batch of {} jobs; the limit is {}",
                jobs.len(),
                crate::job::MAX_ENQUEUE_BATCH
            )));
        }
        let n = jobs.len();
        let mut account = Vec::with_capacity(n);
        let mut partition = Vec::with_capacity(n);
        let mut kind = Vec::with_capacity(n);
        let mut args = Vec::with_capacity(n);
        let mut lane = Vec::with_capacity(n);
        let mut priority = Vec::with_capacity(n);
        let mut delay_ms: Vec<Option<i64>> = Vec::with_capacity(n);
        let mut run_at: Vec<Option<DateTime<Utc>>> = Vec::with_capacity(n);
        let mut max_attempts: Vec<Option<i32>> = Vec::with_capacity(n);
        let mut timeout_ms: Vec<Option<i32>> = Vec::with_capacity(n);
        let mut unique_key: Vec<Option<String>> = Vec::with_capacity(n);
        let mut idem_key: Vec<Option<String>> = Vec::with_capacity(n);
        let mut keep_ms: Vec<Option<i64>> = Vec::with_capacity(n);
        for j in jobs {
            j.validate()?;
            account.push(j.account.clone());
            partition.push(partition_of(&j.account, partitions) as i32);
            kind.push(j.kind.clone());
            args.push(j.args.clone());
            lane.push(j.lane.as_str().to_string());
            priority.push(j.priority);
            match j.schedule {
                Schedule::Now => {
                    delay_ms.push(None);
                    run_at.push(None)
                }
                Schedule::After(d) => {
                    delay_ms.push(Some(ms(d)));
                    run_at.push(None)
                }
                Schedule::At(t) => {
                    delay_ms.push(None);
                    run_at.push(Some(t))
                }
            }
            // Unknown here: NULL, resolved in the statement from `warden.kinds`.
            let kind_default = defaults(&j.kind);
            max_attempts.push(j.max_attempts.or(kind_default.max_attempts));
            timeout_ms.push(j.timeout.or(kind_default.timeout).map(|t| ms(t).min(i32::MAX as i64) as i32));
            unique_key.push(j.unique_key.clone());
            idem_key.push(j.idempotency_key.clone());
            keep_ms.push(j.idempotency_key.as_ref().map(|_| j.idempotency_keep_ms()));
        }
        // One account (a single enqueue, a job's follow-up) takes a shorter statement:
        // the general one's lock planning costs ~17% of a single enqueue's throughput.
        let one_account = jobs.iter().all(|j| j.account == jobs[0].account);
        let keyed = jobs.iter().any(|j| j.idempotency_key.is_some());
        let sql = match (one_account, keyed) {
            (true, false) => ENQUEUE_ONE_ACCOUNT_SQL,
            (false, false) => ENQUEUE_MANY_ACCOUNTS_SQL,
            (true, true) => ENQUEUE_ONE_ACCOUNT_KEYED_SQL,
            (false, true) => ENQUEUE_MANY_ACCOUNTS_KEYED_SQL,
        };
        let rows = sqlx::query(sql)
            .bind(&account)
            .bind(&partition)
            .bind(&kind)
            .bind(&args)
            .bind(&lane)
            .bind(&priority)
            .bind(&delay_ms)
            .bind(&run_at)
            .bind(&max_attempts)
            .bind(&timeout_ms)
            .bind(&unique_key)
            .bind(ENQUEUE_LOCK_CLASS)
            .bind(ENQUEUE_LOCK_BATCH as i64)
            .bind(&idem_key)
            .bind(&keep_ms)
            .fetch_all(&mut *conn)
            .await?;

        // Each inserted job comes back with its input position (`ord`, 1-based). Inputs
        // not inserted were duplicates: of an unfinished job with their unique key, or
        // of their idempotency key's job; map them to that job.
        let mut inserted = std::collections::HashMap::with_capacity(rows.len());
        for r in &rows {
            inserted.insert(r.try_get::<i64, _>(0)?, r.try_get::<i64, _>(1)?);
        }
        let mut out = Vec::with_capacity(n);
        let mut seen_keys: std::collections::HashMap<(String, String), i64> = Default::default();
        for (i, j) in jobs.iter().enumerate() {
            let key = j.unique_key.as_ref().map(|k| (j.account.clone(), k.clone()));
            if let Some(id) = inserted.get(&(i as i64 + 1)) {
                out.push(Enqueued { id: *id, duplicate: false });
                if let Some(k) = key {
                    seen_keys.insert(k, *id);
                }
                continue;
            }
            if let Some(ik) = &j.idempotency_key {
                let id: Option<i64> = sqlx::query_scalar(IDEMPOTENCY_KEY_HOLDER_SQL)
                    .bind(&j.account)
                    .bind(ik)
                    .fetch_optional(&mut *conn)
                    .await?;
                let Some(id) = id else {
                    // Kept when the statement ran, gone now: the pruner deleted it as
                    // expired meanwhile. Enqueueing now could reorder the batch.
                    return Err(Error::Conflict(format!(
                        "idempotency key {ik:?} of account {:?} expired while the batch was enqueued; retry",
                        j.account
                    )));
                };
                out.push(Enqueued { id, duplicate: true });
                continue;
            }
            let Some((acc, uk)) = key else {
                return Err(Error::Database(sqlx::Error::Protocol(
                    "enqueue skipped a job with neither a unique key nor an idempotency key".into(),
                )));
            };
            if let Some(id) = seen_keys.get(&(acc.clone(), uk.clone())) {
                out.push(Enqueued { id: *id, duplicate: true });
                continue;
            }
            let found: Option<i64> =
                sqlx::query_scalar(UNIQUE_KEY_HOLDER_SQL).bind(&acc).bind(&uk).fetch_optional(&mut *conn).await?;
            let id = match found {
                Some(id) => id,
                None => {
                    // The job that held the key finished between the insert and this
                    // read (it was RowNotFound): the key is free. One job is inserted
                    // again; in a batch that would put it after the jobs enqueued with
                    // it, so the caller is asked to retry instead.
                    if jobs.len() > 1 {
                        return Err(Error::Conflict(format!(
                            "unique_key {uk:?} of account {acc:?} was freed while the batch was enqueued; retry the batch"
                        )));
                    }
                    let e = insert_resolved(&mut *conn, partitions, std::slice::from_ref(j), defaults).await?.remove(0);
                    out.push(e);
                    seen_keys.insert((acc, uk), e.id);
                    continue;
                }
            };
            seen_keys.insert((acc, uk), id);
            out.push(Enqueued { id, duplicate: true });
        }
        Ok(out)
    })
}
