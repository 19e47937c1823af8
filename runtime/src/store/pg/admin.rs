//! [`AdminStore`] on PostgreSQL: observation queries, retention, the history
//! checker's figures, publishing kind options.

use super::{PgAdminStore, ENQUEUE_LOCK_CLASS};
use crate::error::{Error, Result};
use crate::handler::Registry;
use crate::job::{AttemptRow, JobRow};
use crate::progress::{JobProgress, Progress};
use crate::store::admin::{
    AccountQueue, AdminStore, HistoryReport, JobFilter, JobPage, PartitionDepth, ProgressRead, PruneCursor, Pruned,
    QueueDepth, SlotDemand, ACCOUNT_COUNT_CAP, FINISHED_COUNT_CAP, LIST_SCAN_WINDOW, MAX_PROGRESS_READ,
    UNFINISHED_STATES,
};
use crate::store::{ms, LeaseRow};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::Row;
use std::time::Duration;

/// Advisory lock class of the retention pruner ("WARD" + 10): one node prunes at a
/// time; the others skip the round.
pub const RETENTION_LOCK_CLASS: i32 = ENQUEUE_LOCK_CLASS + 10;

/// See [`AdminStore::runnable_accounts`]: $1 partitions (NULL: all), $2 cap.
pub const RUNNABLE_ACCOUNTS_SQL: &str = include_str!("../sql/runnable_accounts.sql");

const LEASES_SQL: &str = "SELECT partition, owner_node, epoch, lease_expires_at FROM warden.leases ORDER BY partition";

/// Publish kinds' options: $1 kinds, $2 max attempts, $3 timeouts in ms, $4 the node.
const PUBLISH_KINDS_SQL: &str = "
    INSERT INTO warden.kinds (kind, max_attempts, timeout_ms, updated_by)
    SELECT k, m, t, $4 FROM unnest($1::text[], $2::int[], $3::int[]) AS u(k, m, t)
    ON CONFLICT (kind) DO UPDATE SET max_attempts = EXCLUDED.max_attempts, timeout_ms = EXCLUDED.timeout_ms,
        updated_by = EXCLUDED.updated_by, updated_at = statement_timestamp()
    WHERE (warden.kinds.max_attempts, warden.kinds.timeout_ms) IS DISTINCT FROM (EXCLUDED.max_attempts, EXCLUDED.timeout_ms)";

/// Per partition: its unexpired lease holder and its unfinished jobs by state, at most $1 counted.
const QUEUE_DEPTH_SQL: &str = "
    SELECT l.partition,
           CASE WHEN l.owner_node IS NOT NULL AND l.lease_expires_at > now()
                THEN split_part(l.owner_node, '/', 1) END,
           c.state, c.n
    FROM warden.leases l
    LEFT JOIN LATERAL (
        SELECT s.state, count(*) AS n
        FROM (SELECT j.state FROM warden.jobs j
              WHERE j.partition = l.partition
                AND j.state IN ('scheduled', 'available', 'retryable', 'running')
              LIMIT $1) s
        GROUP BY s.state) c ON true
    ORDER BY l.partition";

/// Finished jobs by state, at most $1 counted (index-only on `jobs_finished_at`).
const FINISHED_COUNTS_SQL: &str = "
    SELECT s.state, count(*) FROM (
        SELECT state FROM warden.jobs WHERE state IN ('completed', 'discarded', 'cancelled')
        ORDER BY finished_at, id LIMIT $1) s
    GROUP BY s.state ORDER BY 1";

/// Finished jobs by state, the planner's estimates (`pg_stats` × `reltuples`).
const FINISHED_ESTIMATES_SQL: &str = "
    SELECT v.state, (v.freq * c.reltuples)::bigint
    FROM pg_class c
    JOIN pg_namespace ns ON ns.oid = c.relnamespace AND ns.nspname = 'warden'
    CROSS JOIN LATERAL (
        SELECT unnest(s.most_common_vals::text::text[]) AS state, unnest(s.most_common_freqs) AS freq
        FROM pg_stats s WHERE s.schemaname = 'warden' AND s.tablename = 'jobs' AND s.attname = 'state') v
    WHERE c.relname = 'jobs' AND c.reltuples >= 0
      AND v.state IN ('completed', 'discarded', 'cancelled')
    ORDER BY 1";

/// Age in ms of the oldest due, not started job: one index probe per partition
/// (`jobs_partition_due`).
const OLDEST_DUE_AGE_SQL: &str = "
    SELECT (EXTRACT(EPOCH FROM (now() - min(d.due_at))) * 1000)::float8
    FROM warden.leases l
    CROSS JOIN LATERAL (
        SELECT j.due_at FROM warden.jobs j
        WHERE j.partition = l.partition AND j.state IN ('scheduled', 'available', 'retryable')
        ORDER BY j.due_at LIMIT 1) d
    WHERE d.due_at <= now()";

/// The jobs with ids $1, newest first.
const JOBS_BY_IDS_SQL: &str = "SELECT * FROM warden.jobs WHERE id = ANY($1) ORDER BY id DESC";

/// Job $1's attempts with ids above $2, at most $3, in order (`attempts_job_id`).
const ATTEMPTS_PAGE_SQL: &str = "SELECT * FROM warden.attempts WHERE job_id = $1 AND id > $2 ORDER BY id LIMIT $3";

/// Account $1's first unfinished job of lane $2 in serial order (`jobs_account_open`).
const LANE_HEAD_SQL: &str = "
    SELECT * FROM warden.jobs WHERE account = $1 AND lane = $2
      AND state IN ('scheduled', 'available', 'retryable', 'running')
    ORDER BY run_at, id LIMIT 1";

/// Account $1's unfinished jobs, counted up to $2 (index-only on `jobs_account_open`).
const ACCOUNT_UNFINISHED_SQL: &str = "
    SELECT count(*) FROM (SELECT 1 FROM warden.jobs WHERE account = $1
    AND state IN ('scheduled', 'available', 'retryable', 'running') LIMIT $2) s";

/// The pruner's lock, $1 its class: taken with a try, so other nodes skip the round.
const PRUNE_LOCK_SQL: &str = "SELECT pg_try_advisory_xact_lock($1, 0)";

/// Delete up to $2 finished jobs older than $1 s, after position ($3, $4), with their
/// attempts; report what went and the last position.
const PRUNE_SQL: &str = "
    WITH doomed AS (
       SELECT id FROM warden.jobs
       WHERE state IN ('completed', 'discarded', 'cancelled')
         AND finished_at < now() - make_interval(secs => $1)
         AND ($3::timestamptz IS NULL OR (finished_at, id) > ($3, $4))
       ORDER BY finished_at, id
       LIMIT $2
       FOR UPDATE SKIP LOCKED),
    gone AS (
       -- = ANY(ARRAY(...)): primary-key probes whatever the planner thinks of the
       -- CTE (a join chose a sequential scan of the table at 100k rows).
       DELETE FROM warden.jobs j
       WHERE j.id = ANY(ARRAY(SELECT id FROM doomed)) AND j.state IN ('completed', 'discarded', 'cancelled')
       RETURNING j.id, j.finished_at),
    gone_attempts AS (
       DELETE FROM warden.attempts a WHERE a.job_id IN (SELECT id FROM gone) RETURNING 1),
    last AS (SELECT finished_at, id FROM gone ORDER BY finished_at DESC, id DESC LIMIT 1)
    SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM gone_attempts),
           (SELECT finished_at FROM last), (SELECT id FROM last)";

/// Delete up to $1 expired idempotency keys, oldest expiry first; the re-check after
/// the row lock keeps a key an enqueue has just taken over (its new expiry).
const PRUNE_KEYS_SQL: &str = "
    WITH doomed AS (
       SELECT account, key FROM warden.idempotency_keys WHERE expires_at <= now()
       ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED)
    DELETE FROM warden.idempotency_keys k USING doomed d
    WHERE k.account = d.account AND k.key = d.key AND k.expires_at <= now()";

/// Jobs: all, by finished state, unfinished.
const HISTORY_JOBS_SQL: &str = "
    SELECT count(*),
           count(*) FILTER (WHERE state = 'completed'),
           count(*) FILTER (WHERE state = 'discarded'),
           count(*) FILTER (WHERE state = 'cancelled'),
           count(*) FILTER (WHERE state IN ('scheduled', 'available', 'retryable', 'running'))
    FROM warden.jobs";

/// Attempts: all, retried, rescued.
const HISTORY_ATTEMPTS_SQL: &str = "
    SELECT count(*),
           count(*) FILTER (WHERE outcome IN ('failed', 'timeout', 'retry')),
           count(*) FILTER (WHERE outcome = 'rescued')
    FROM warden.attempts";

/// Pairs of overlapping attempts of serial jobs of one account.
///
/// Each intersecting pair once, from the one that started first: a range scan
/// on attempts_account per attempt, not a self-join of the account's history
/// (that was quadratic: minutes after a 30-minute soak).
const HISTORY_OVERLAPS_SQL: &str = "
    SELECT count(*) FROM warden.attempts a
    JOIN warden.jobs ja ON ja.id = a.job_id AND ja.lane = 'serial'
    JOIN warden.attempts b ON b.account = a.account
         AND b.started_at >= a.started_at AND b.started_at < a.finished_at
         AND (b.started_at, b.id) > (a.started_at, a.id)
    JOIN warden.jobs jb ON jb.id = b.job_id AND jb.lane = 'serial'";

/// Attempts of serial jobs started while an earlier-ordered serial job of the account
/// was unfinished.
///
/// Driven from the earlier job's unfinished window (created → finished), a
/// range scan on attempts_account: a self-join over (run_at, id) took over ten
/// minutes on a 240k-job soak; this takes seconds.
const HISTORY_ORDER_VIOLATIONS_SQL: &str = "
    SELECT count(*) FROM warden.jobs ja
    JOIN warden.attempts b ON b.account = ja.account
         AND b.started_at > ja.created_at AND b.started_at < COALESCE(ja.finished_at, 'infinity')
    JOIN warden.jobs jb ON jb.id = b.job_id AND jb.lane = 'serial' AND (ja.run_at, ja.id) < (jb.run_at, jb.id)
    WHERE ja.lane = 'serial'";

/// Attempts started after their job completed.
const HISTORY_RERUNS_SQL: &str = "
    SELECT count(*) FROM warden.attempts a
    JOIN warden.attempts c ON c.job_id = a.job_id AND c.outcome = 'completed'
    WHERE a.started_at >= c.finished_at AND a.id <> c.id";

/// Jobs completed more than once.
const HISTORY_DOUBLE_COMPLETIONS_SQL: &str = "
    SELECT count(*) FROM (SELECT job_id FROM warden.attempts WHERE outcome = 'completed'
    GROUP BY job_id HAVING count(*) > 1) d";

/// A page of jobs of account $1 (see [`AdminStore::list_jobs`]): at most $6 newest
/// below id $4 are examined, and of those, the ids matching kind $2 and state $3, at most
/// $5 + 1; with how many were examined and the lowest examined id.
const LIST_JOBS_OF_ACCOUNT_SQL: &str = "
    WITH w AS (
        SELECT id, kind, state FROM warden.jobs WHERE account = $1 AND id < COALESCE($4, 9223372036854775807)
        ORDER BY id DESC LIMIT $6)
    SELECT (SELECT count(*) FROM w), (SELECT min(id) FROM w),
           ARRAY(SELECT id FROM w WHERE ($2::text IS NULL OR kind = $2) AND ($3::text IS NULL OR state = $3)
                 ORDER BY id DESC LIMIT $5 + 1)";

/// [`LIST_JOBS_OF_ACCOUNT_SQL`] over every account ($1 is NULL), on the primary key.
const LIST_JOBS_SQL: &str = "
    WITH w AS (
        SELECT id, kind, state FROM warden.jobs WHERE $1::text IS NULL AND id < COALESCE($4, 9223372036854775807)
        ORDER BY id DESC LIMIT $6)
    SELECT (SELECT count(*) FROM w), (SELECT min(id) FROM w),
           ARRAY(SELECT id FROM w WHERE ($2::text IS NULL OR kind = $2) AND ($3::text IS NULL OR state = $3)
                 ORDER BY id DESC LIMIT $5 + 1)";

/// Running jobs of account $1 (any when NULL) and kind $2 (any when NULL), newest first
/// below id $3, at most $4 + 1 ids. Through the partial index `jobs_partition_running`
/// (or `jobs_account_open` for one account): only running rows are examined — as many
/// as the cluster has claimed attempts, bounded by its execution slots — however old
/// they are. A job running for hours is on the first page, where the newest-rows
/// window of [`LIST_JOBS_SQL`] would have to walk every job enqueued since.
const LIST_RUNNING_SQL: &str = "
    SELECT ARRAY(SELECT id FROM warden.jobs
                 WHERE state = 'running' AND ($1::text IS NULL OR account = $1) AND ($2::text IS NULL OR kind = $2)
                   AND id < COALESCE($3, 9223372036854775807)
                 ORDER BY id DESC LIMIT $4 + 1)";

/// The progress rows of jobs $1 (primary-key probes), and the database clock: the
/// left join gives one row (with a NULL job) when none of them has one, so the clock
/// is always read.
const JOB_PROGRESS_SQL: &str = "
    SELECT statement_timestamp() AS read_at, p.job_id, p.attempt, p.node, p.heartbeat_at,
           p.progress_percent, p.progress_message, p.progress_details,
           p.checkpoint_at, p.checkpoint_attempt, p.checkpoint_bytes
    FROM (SELECT) AS clock LEFT JOIN warden.job_progress p ON p.job_id = ANY($1)";

#[async_trait]
impl AdminStore for PgAdminStore {
    async fn publish_kinds(&self, registry: &Registry, node: &str) -> Result<()> {
        let kinds: Vec<String> = registry.kinds().into_iter().map(String::from).collect();
        if kinds.is_empty() {
            return Ok(());
        }
        let opts: Vec<&crate::handler::JobOptions> = kinds.iter().filter_map(|k| registry.options(k)).collect();
        let max_attempts: Vec<i32> = opts.iter().map(|o| o.max_attempts).collect();
        let timeout_ms: Vec<i32> = opts.iter().map(|o| ms(o.timeout).min(i32::MAX as i64) as i32).collect();
        sqlx::query(PUBLISH_KINDS_SQL)
            .bind(&kinds)
            .bind(&max_attempts)
            .bind(&timeout_ms)
            .bind(node)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn leases(&self) -> Result<Vec<LeaseRow>> {
        Ok(sqlx::query_as(LEASES_SQL).fetch_all(&self.pool).await?)
    }

    async fn queue_depth(&self, cap: i64) -> Result<QueueDepth> {
        /// partition, lease holder, state, count (state and count NULL for an empty partition)
        type DepthRow = (i32, Option<String>, Option<String>, Option<i64>);
        let rows: Vec<DepthRow> = sqlx::query_as(QUEUE_DEPTH_SQL).bind(cap).fetch_all(&self.pool).await?;
        let mut partitions: Vec<PartitionDepth> = Vec::new();
        for (partition, holder, state, n) in rows {
            let partition = partition as u32;
            if partitions.last().map(|p| p.partition) != Some(partition) {
                partitions.push(PartitionDepth { partition, holder, ..Default::default() });
            }
            let p = partitions.last_mut().expect("pushed above");
            if let (Some(state), Some(n)) = (state, n) {
                if let Some(i) = UNFINISHED_STATES.iter().position(|s| *s == state) {
                    p.by_state[i] = n;
                }
            }
        }
        for p in &mut partitions {
            p.capped = p.unfinished() >= cap;
        }
        let counted: Vec<(String, i64)> =
            sqlx::query_as(FINISHED_COUNTS_SQL).bind(FINISHED_COUNT_CAP + 1).fetch_all(&self.pool).await?;
        if counted.iter().map(|(_, n)| n).sum::<i64>() <= FINISHED_COUNT_CAP {
            return Ok(QueueDepth { cap, partitions, finished: counted, finished_estimated: false });
        }
        let estimates: Vec<(String, i64)> = sqlx::query_as(FINISHED_ESTIMATES_SQL).fetch_all(&self.pool).await?;
        Ok(QueueDepth { cap, partitions, finished: estimates, finished_estimated: true })
    }

    async fn runnable_accounts(&self, partitions: Option<&[u32]>, cap: i64) -> Result<SlotDemand> {
        let partitions: Option<Vec<i32>> = partitions.map(|ps| ps.iter().map(|p| *p as i32).collect());
        let (runnable, running): (i64, i64) =
            sqlx::query_as(RUNNABLE_ACCOUNTS_SQL).bind(partitions).bind(cap).fetch_one(&self.pool).await?;
        Ok(SlotDemand { runnable, running })
    }

    async fn oldest_due_age(&self) -> Result<Option<Duration>> {
        let ms: Option<f64> = sqlx::query_scalar(OLDEST_DUE_AGE_SQL).fetch_one(&self.pool).await?;
        Ok(ms.map(|ms| Duration::from_millis(ms.max(0.0) as u64)))
    }

    async fn list_jobs(&self, f: &JobFilter) -> Result<JobPage> {
        if f.state.as_deref() == Some("running") {
            return self.list_running(f).await;
        }
        let filtered = f.kind.is_some() || f.state.is_some();
        let window = if filtered { LIST_SCAN_WINDOW.max(f.limit + 1) } else { f.limit + 1 };
        // Two statements, not `($1 IS NULL OR account = $1)`: a cached generic plan of that
        // cannot use the account index and would walk the primary key past every other account.
        let sql = if f.account.is_some() { LIST_JOBS_OF_ACCOUNT_SQL } else { LIST_JOBS_SQL };
        let (scanned, lowest, ids): (i64, Option<i64>, Vec<i64>) = sqlx::query_as(sql)
            .bind(&f.account)
            .bind(&f.kind)
            .bind(&f.state)
            .bind(f.before_id)
            .bind(f.limit)
            .bind(window)
            .fetch_one(&self.pool)
            .await?;
        let more_matches = ids.len() as i64 > f.limit;
        let page_ids = &ids[..ids.len().min(f.limit.max(0) as usize)];
        let mut jobs: Vec<JobRow> = sqlx::query_as(JOBS_BY_IDS_SQL).bind(page_ids).fetch_all(&self.pool).await?;
        // A job of the page pruned between the two reads is simply left out.
        jobs.truncate(f.limit.max(0) as usize);
        let next_before_id = if more_matches {
            page_ids.last().copied()
        } else if scanned == window {
            // The window ended before the page filled: older rows may still match.
            lowest
        } else {
            None
        };
        Ok(JobPage { jobs, next_before_id })
    }

    async fn job_progress(&self, job_ids: &[i64]) -> Result<ProgressRead> {
        if job_ids.len() > MAX_PROGRESS_READ {
            return Err(Error::invalid(format!(
                "progress of {} jobs asked at once; the limit is {MAX_PROGRESS_READ}",
                job_ids.len()
            )));
        }
        let rows = sqlx::query(JOB_PROGRESS_SQL).bind(job_ids).fetch_all(&self.pool).await?;
        let mut read_at = None;
        let mut jobs = std::collections::HashMap::new();
        for r in rows {
            read_at = Some(r.try_get("read_at")?);
            let Some(job_id) = r.try_get::<Option<i64>, _>("job_id")? else { continue };
            let progress = Progress {
                percent: r.try_get("progress_percent")?,
                message: r.try_get("progress_message")?,
                details: r.try_get("progress_details")?,
            };
            jobs.insert(
                job_id,
                JobProgress {
                    attempt: r.try_get("attempt")?,
                    node: r.try_get("node")?,
                    heartbeat_at: r.try_get("heartbeat_at")?,
                    progress,
                    checkpoint_at: r.try_get("checkpoint_at")?,
                    checkpoint_attempt: r.try_get("checkpoint_attempt")?,
                    checkpoint_bytes: r.try_get("checkpoint_bytes")?,
                },
            );
        }
        let read_at = read_at.expect("the clock row is always there");
        Ok(ProgressRead { read_at, jobs })
    }

    async fn attempts_page(&self, job_id: i64, after_id: i64, limit: i64) -> Result<Vec<AttemptRow>> {
        Ok(sqlx::query_as(ATTEMPTS_PAGE_SQL).bind(job_id).bind(after_id).bind(limit).fetch_all(&self.pool).await?)
    }

    async fn account_queue(&self, account: &str) -> Result<AccountQueue> {
        // One probe per lane in index order (jobs_account_open): a single ORDER BY over
        // both lanes cannot follow the index and sorted the account's whole backlog.
        let lane_head = |lane: &'static str| {
            sqlx::query_as::<_, JobRow>(LANE_HEAD_SQL).bind(account).bind(lane).fetch_optional(&self.pool)
        };
        let next = match lane_head("serial").await? {
            Some(j) => Some(j),
            None => lane_head("unordered").await?,
        };
        // Capped: an account with millions of queued jobs costs at most the cap to count
        // (index-only on jobs_account_open).
        let n: i64 = sqlx::query_scalar(ACCOUNT_UNFINISHED_SQL)
            .bind(account)
            .bind(ACCOUNT_COUNT_CAP)
            .fetch_one(&self.pool)
            .await?;
        Ok(AccountQueue { next, unfinished: n })
    }

    async fn prune_finished(&self, older_than: Duration, batch: i64, after: Option<PruneCursor>) -> Result<Pruned> {
        let mut tx = self.pool.begin().await?;
        let locked: bool = sqlx::query_scalar(PRUNE_LOCK_SQL).bind(RETENTION_LOCK_CLASS).fetch_one(&mut *tx).await?;
        if !locked {
            tx.rollback().await?;
            return Ok(Pruned { skipped: true, ..Default::default() });
        }
        let (jobs, attempts, last_at, last_id): (i64, i64, Option<DateTime<Utc>>, Option<i64>) =
            sqlx::query_as(PRUNE_SQL)
                .bind(older_than.as_secs_f64())
                .bind(batch)
                .bind(after.map(|a| a.finished_at))
                .bind(after.map(|a| a.id))
                .fetch_one(&mut *tx)
                .await?;
        tx.commit().await?;
        Ok(Pruned {
            jobs: jobs as u64,
            attempts: attempts as u64,
            skipped: false,
            last: last_at.zip(last_id).map(|(finished_at, id)| PruneCursor { finished_at, id }),
        })
    }

    async fn prune_idempotency_keys(&self, batch: i64) -> Result<u64> {
        Ok(sqlx::query(PRUNE_KEYS_SQL).bind(batch).execute(&self.pool).await?.rows_affected())
    }

    async fn history_report(&self) -> Result<HistoryReport> {
        let (jobs, completed, discarded, cancelled, unfinished): (i64, i64, i64, i64, i64) =
            sqlx::query_as(HISTORY_JOBS_SQL).fetch_one(&self.pool).await?;
        let (attempts, retried, rescued): (i64, i64, i64) =
            sqlx::query_as(HISTORY_ATTEMPTS_SQL).fetch_one(&self.pool).await?;
        let overlaps: i64 = sqlx::query_scalar(HISTORY_OVERLAPS_SQL).fetch_one(&self.pool).await?;
        let order_violations: i64 = sqlx::query_scalar(HISTORY_ORDER_VIOLATIONS_SQL).fetch_one(&self.pool).await?;
        let reruns: i64 = sqlx::query_scalar(HISTORY_RERUNS_SQL).fetch_one(&self.pool).await?;
        let double: i64 = sqlx::query_scalar(HISTORY_DOUBLE_COMPLETIONS_SQL).fetch_one(&self.pool).await?;
        Ok(HistoryReport {
            jobs,
            completed,
            discarded,
            cancelled,
            unfinished,
            attempts,
            retried_attempts: retried,
            rescued_attempts: rescued,
            overlaps,
            order_violations,
            reruns_after_completion: reruns,
            double_completions: double,
        })
    }
}

impl PgAdminStore {
    /// [`AdminStore::list_jobs`] of running jobs: see [`LIST_RUNNING_SQL`].
    async fn list_running(&self, f: &JobFilter) -> Result<JobPage> {
        let ids: Vec<i64> = sqlx::query_scalar(LIST_RUNNING_SQL)
            .bind(&f.account)
            .bind(&f.kind)
            .bind(f.before_id)
            .bind(f.limit)
            .fetch_one(&self.pool)
            .await?;
        let limit = f.limit.max(0) as usize;
        let more = ids.len() > limit;
        let page_ids = &ids[..ids.len().min(limit)];
        let mut jobs: Vec<JobRow> = sqlx::query_as(JOBS_BY_IDS_SQL).bind(page_ids).fetch_all(&self.pool).await?;
        jobs.truncate(limit);
        Ok(JobPage { jobs, next_before_id: if more { page_ids.last().copied() } else { None } })
    }
}
