//! The verification workload. Each `audit` job carries its account's sequence
//! number; the handler records its own start and end time (database clock) in
//! `workload_audit` inside the job transaction (so a row exists iff the attempt
//! completed, exactly once), and appends to `workload_effects` outside it (an
//! external, at-least-once side effect).
//!
//! Every handler run is also recorded as an outside observer sees it, in
//! `workload_runs`, through the handler's own pool (not the job transaction, so the
//! row survives a fenced, aborted or failed attempt): a row at the very start of
//! `run`, and its end time just before `run` returns (any return). A run whose
//! future was dropped mid-way (self-fencing, abort, timeout) has no end: its last
//! observable action was its start. [`check`] counts overlapping runs of one
//! account — execution overlap, not only overlap of committed rows.

use serde::{Deserialize, Serialize};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use warden_runtime::{async_trait, Backoff, Handler, HandlerResult, JobContext, JobOptions, Outcome};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AuditArgs {
    pub seq: i64,
    /// How long the handler works.
    #[serde(default)]
    pub sleep_ms: u64,
    /// Fail the first `fail_times` attempts.
    #[serde(default)]
    pub fail_times: i32,
    /// Finish the work even when asked to stop (a handoff's drain): a short job
    /// that completes within the drain instead of being interrupted and run again.
    #[serde(default)]
    pub finish_on_stop: bool,
    // Unknown fields (padding, say) are ignored: no `deny_unknown_fields`.
}

pub async fn migrate(pool: &sqlx::PgPool) -> anyhow::Result<()> {
    // Nodes start together: CREATE ... IF NOT EXISTS races in PostgreSQL ("type already
    // exists"), so serialise on an advisory lock held for the transaction.
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('warden-examples-workload'))").execute(&mut *tx).await?;
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS workload_audit (
             job_id bigint NOT NULL, account text NOT NULL, seq bigint NOT NULL, attempt int NOT NULL,
             node text NOT NULL, epoch bigint NOT NULL,
             started_at timestamptz NOT NULL, ended_at timestamptz NOT NULL);
         CREATE INDEX IF NOT EXISTS workload_audit_account ON workload_audit (account, started_at);
         CREATE TABLE IF NOT EXISTS workload_effects (
             job_id bigint NOT NULL, account text NOT NULL, seq bigint NOT NULL, attempt int NOT NULL,
             at timestamptz NOT NULL DEFAULT clock_timestamp());
         -- One row per handler run, written outside the job transaction. started_at /
         -- ended_at: the database clock when the statement ran (what an outside
         -- observer sees); started_local / ended_local: the handler process's clock
         -- when it sent it (all processes of a test share one machine and clock).
         CREATE TABLE IF NOT EXISTS workload_runs (
             id bigserial PRIMARY KEY, job_id bigint NOT NULL, account text NOT NULL, attempt int NOT NULL,
             node text NOT NULL, started_at timestamptz NOT NULL, ended_at timestamptz,
             started_local timestamptz NOT NULL, ended_local timestamptz);
         CREATE INDEX IF NOT EXISTS workload_runs_account ON workload_runs (account, started_at);",
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

pub struct Audit {
    pub node: String,
    pub pool: sqlx::PgPool,
}

#[async_trait]
impl Handler for Audit {
    type Args = AuditArgs;
    const KIND: &'static str = "audit";

    fn options(&self) -> JobOptions {
        JobOptions {
            max_attempts: 20,
            timeout: Duration::from_secs(30),
            backoff: Backoff { base: Duration::from_millis(20), max: Duration::from_millis(500), jitter: 0.2 },
            ..Default::default()
        }
    }

    async fn run(&self, ctx: &mut JobContext, a: AuditArgs) -> HandlerResult {
        // The outside observer's record: a start row before anything else, its end
        // just before returning — whatever `work` returns. A dropped future (the
        // runtime stopped the attempt) leaves the row without an end.
        let run_id: i64 = sqlx::query_scalar(
            "INSERT INTO workload_runs (job_id, account, attempt, node, started_at, started_local)
             VALUES ($1, $2, $3, $4, clock_timestamp(), $5) RETURNING id",
        )
        .bind(ctx.job_id())
        .bind(ctx.account())
        .bind(ctx.attempt())
        .bind(&self.node)
        .bind(chrono::Utc::now())
        .fetch_one(&self.pool)
        .await?;
        let result = self.work(ctx, a).await;
        let ended_local = chrono::Utc::now();
        // Twice at most: a first try whose reply was lost may have run (COALESCE keeps its time).
        for _ in 0..2 {
            let r = sqlx::query(
                "UPDATE workload_runs SET ended_at = COALESCE(ended_at, clock_timestamp()),
                                          ended_local = COALESCE(ended_local, $2)
                 WHERE id = $1",
            )
            .bind(run_id)
            .bind(ended_local)
            .execute(&self.pool)
            .await;
            if r.is_ok() {
                break;
            }
        }
        result
    }
}

impl Audit {
    async fn work(&self, ctx: &mut JobContext, a: AuditArgs) -> HandlerResult {
        let started: chrono::DateTime<chrono::Utc> =
            sqlx::query_scalar("SELECT clock_timestamp()").fetch_one(ctx.tx().await?).await?;
        // External effect: outside the job transaction, so it survives a fenced or failed attempt.
        sqlx::query("INSERT INTO workload_effects (job_id, account, seq, attempt) VALUES ($1, $2, $3, $4)")
            .bind(ctx.job_id())
            .bind(ctx.account())
            .bind(a.seq)
            .bind(ctx.attempt())
            .execute(&self.pool)
            .await?;
        if a.sleep_ms > 0 {
            // A well-behaved handler: it stops early when asked to (a cancel request,
            // or its partition being handed off). So a cancel the runtime wrongly
            // believes (a spoofed NOTIFY) shows as a cancelled job.
            let stop = if a.finish_on_stop { CancellationToken::new() } else { ctx.cancellation().clone() };
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(a.sleep_ms)) => {}
                _ = stop.cancelled() => return Err("stopped early: asked to stop (cancel or handoff)".into()),
            }
        }
        if ctx.attempt() <= a.fail_times {
            return Err(format!("injected failure {} of {}", ctx.attempt(), a.fail_times).into());
        }
        let (job_id, account, attempt, fence) = (ctx.job_id(), ctx.account().to_string(), ctx.attempt(), ctx.fence());
        sqlx::query(
            "INSERT INTO workload_audit (job_id, account, seq, attempt, node, epoch, started_at, ended_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, clock_timestamp())",
        )
        .bind(job_id)
        .bind(&account)
        .bind(a.seq)
        .bind(attempt)
        .bind(&self.node)
        .bind(fence.epoch)
        .bind(started)
        .execute(ctx.tx().await?)
        .await?;
        Ok(Outcome::Done)
    }
}

/// Invariants over the audit table (the handler's own view, exactly-once via the job tx).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct AuditReport {
    pub rows: i64,
    /// Jobs with more than one committed audit row (a completed job that ran again).
    pub duplicate_jobs: i64,
    /// Pairs of committed audit rows of one account overlapping in time.
    pub overlaps: i64,
    /// Consecutive audit rows of one account (by start) whose seq goes down.
    pub order_violations: i64,
    /// External effects beyond one per job (at-least-once; reported, not a failure).
    pub duplicate_effects: i64,
    /// Handler runs recorded by the outside observer (`workload_runs`).
    pub runs: i64,
    /// Runs recorded without an end (the runtime dropped the handler mid-way).
    pub runs_without_end: i64,
    /// Pairs of handler runs of one account (serial lane) whose intervals overlap by
    /// the database clock (what an outside observer sees: a run is [started_at,
    /// COALESCE(ended_at, started_at)]) **and** by the handler processes' own clock.
    /// The check. On one machine (every harness here) the processes share the
    /// kernel's clock, so a pair that overlaps by it truly ran at once — a zombie
    /// resumed from a pause does; a pair that overlaps by the database clock alone is
    /// a run whose end row was held back by a network cut and delivered at the heal,
    /// after the account had (rightly) moved on, and is counted in
    /// `run_overlaps_db_clock` only.
    pub run_overlaps: i64,
    /// Pairs overlapping by the database clock alone (includes `run_overlaps`).
    pub run_overlaps_db_clock: i64,
    /// The same pairs by the handler processes' own clock (when each stamp was taken,
    /// not when its statement ran). A diagnostic: a pair only the database clock sees
    /// is a statement that ran late — sent by a process resumed from a pause after
    /// its lease had moved on (a zombie: the runtime should not have let it run), or
    /// held back by a network cut and delivered at the heal.
    pub run_overlaps_local_clock: i64,
}

pub async fn check(pool: &sqlx::PgPool) -> anyhow::Result<AuditReport> {
    let (rows, duplicate_jobs): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM workload_audit),
                (SELECT count(*) FROM (SELECT job_id FROM workload_audit GROUP BY job_id HAVING count(*) > 1) d)",
    )
    .fetch_one(pool)
    .await?;
    let overlaps: i64 = sqlx::query_scalar(
        // Each intersecting pair once, from the one that started first (a range scan
        // on workload_audit_account, not a quadratic self-join per account).
        "SELECT count(*) FROM workload_audit a JOIN workload_audit b
           ON a.account = b.account AND b.started_at >= a.started_at AND b.started_at < a.ended_at
              AND (a.started_at, a.job_id) < (b.started_at, b.job_id)",
    )
    .fetch_one(pool)
    .await?;
    let order_violations: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (
            SELECT seq, lag(seq) OVER (PARTITION BY account ORDER BY started_at, job_id) AS prev
            FROM workload_audit) s
         WHERE prev IS NOT NULL AND seq < prev",
    )
    .fetch_one(pool)
    .await?;
    let duplicate_effects: i64 = sqlx::query_scalar(
        "SELECT COALESCE(sum(n - 1), 0)::bigint FROM (SELECT count(*) AS n FROM workload_effects GROUP BY job_id) e",
    )
    .fetch_one(pool)
    .await?;
    let (runs, runs_without_end): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(*) FILTER (WHERE ended_at IS NULL) FROM workload_runs")
            .fetch_one(pool)
            .await?;
    let run_overlaps_db_clock: i64 = sqlx::query_scalar(run_overlap_sql(false, "count(*)", "")).fetch_one(pool).await?;
    let run_overlaps: i64 = sqlx::query_scalar(run_overlap_sql(
        false,
        "count(*)",
        "AND b.started_local < COALESCE(a.ended_local, a.started_local) AND b.started_local >= a.started_local",
    ))
    .fetch_one(pool)
    .await?;
    let run_overlaps_local_clock: i64 =
        sqlx::query_scalar(run_overlap_sql(true, "count(*)", "")).fetch_one(pool).await?;
    Ok(AuditReport {
        rows,
        duplicate_jobs,
        overlaps,
        order_violations,
        duplicate_effects,
        runs,
        runs_without_end,
        run_overlaps,
        run_overlaps_db_clock,
        run_overlaps_local_clock,
    })
}

/// Pairs (a, b) of runs of one serial account where b starts inside a: counted once,
/// from the run that started first (`b` starts at or after `a`, before `a` ends).
fn run_overlap_sql(local: bool, select: &str, tail: &str) -> sqlx::AssertSqlSafe<String> {
    let (s, e) = if local { ("started_local", "ended_local") } else { ("started_at", "ended_at") };
    sqlx::AssertSqlSafe(format!(
        "SELECT {select} FROM workload_runs a
         JOIN warden.jobs ja ON ja.id = a.job_id AND ja.lane = 'serial'
         JOIN workload_runs b ON b.account = a.account AND b.id <> a.id
              AND b.{s} >= a.{s} AND b.{s} <= COALESCE(a.{e}, a.{s})
              AND (b.{s}, b.id) > (a.{s}, a.id)
         JOIN warden.jobs jb ON jb.id = b.job_id AND jb.lane = 'serial'
         WHERE (b.{s} < COALESCE(a.{e}, a.{s}) OR b.{s} = a.{s}) {tail}"
    ))
}

/// Up to `limit` overlapping run pairs (database clock; the examples say which also
/// overlap by the processes' clock), described for a report.
pub async fn run_overlap_examples(pool: &sqlx::PgPool, limit: i64) -> anyhow::Result<Vec<String>> {
    let rows: Vec<(String,)> = sqlx::query_as(run_overlap_sql(
        false,
        "format('account %s: job %s attempt %s on %s ran %s .. %s (local %s .. %s); job %s attempt %s on %s ran %s .. %s (local %s .. %s)',
                a.account, a.job_id, a.attempt, a.node, a.started_at, COALESCE(a.ended_at::text, 'no end'),
                a.started_local, COALESCE(a.ended_local::text, 'no end'),
                b.job_id, b.attempt, b.node, b.started_at, COALESCE(b.ended_at::text, 'no end'),
                b.started_local, COALESCE(b.ended_local::text, 'no end'))",
        &format!("ORDER BY a.started_at LIMIT {limit}"),
    ))
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|r| r.0).collect())
}
