//! The verification workload. Each `audit` job carries its account's sequence
//! number; the handler records its own start and end time (database clock) in
//! `workload_audit` inside the job transaction (so a row exists iff the attempt
//! completed, exactly once), and appends to `workload_effects` outside it (an
//! external, at-least-once side effect).

use serde::{Deserialize, Serialize};
use std::time::Duration;
use warden_runtime::{async_trait, Backoff, Handler, HandlerResult, JobContext, JobOptions, Outcome};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditArgs {
    pub seq: i64,
    /// How long the handler works.
    #[serde(default)]
    pub sleep_ms: u64,
    /// Fail the first `fail_times` attempts.
    #[serde(default)]
    pub fail_times: i32,
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
             at timestamptz NOT NULL DEFAULT clock_timestamp());",
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
            tokio::time::sleep(Duration::from_millis(a.sleep_ms)).await;
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
}

pub async fn check(pool: &sqlx::PgPool) -> anyhow::Result<AuditReport> {
    let (rows, duplicate_jobs): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM workload_audit),
                (SELECT count(*) FROM (SELECT job_id FROM workload_audit GROUP BY job_id HAVING count(*) > 1) d)",
    )
    .fetch_one(pool)
    .await?;
    let overlaps: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM workload_audit a JOIN workload_audit b
           ON a.account = b.account AND (a.started_at, a.job_id) < (b.started_at, b.job_id)
         WHERE a.started_at < b.ended_at AND b.started_at < a.ended_at",
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
    Ok(AuditReport { rows, duplicate_jobs, overlaps, order_violations, duplicate_effects })
}
