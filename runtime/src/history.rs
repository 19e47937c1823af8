//! The history checker: verifies the serial guarantee (DESIGN §1) from the
//! attempts table, the audit trail every attempt writes. Used by the demo, the
//! tests and the benchmarks; every figure is computed by PostgreSQL.
//!
//! It sees only the history that is still there: [`crate::retention`] deletes finished
//! jobs and their attempts after the retention period, and the checks are then sound
//! over what remains but blind to what was pruned (and `completed` counts only the
//! unpruned). Run checks with retention off or longer than the history they cover,
//! as the tests and the soak do (the default keeps 7 days).

use crate::error::Result;
use serde::Serialize;
use sqlx::postgres::PgPool;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct HistoryReport {
    pub jobs: i64,
    pub completed: i64,
    pub discarded: i64,
    pub cancelled: i64,
    /// Jobs not finished yet (scheduled, available, retryable, running).
    pub unfinished: i64,
    pub attempts: i64,
    /// Attempts that ended in a retry (failed, timeout, retry).
    pub retried_attempts: i64,
    pub rescued_attempts: i64,
    /// Pairs of attempts of serial jobs of one account that overlap in time.
    pub overlaps: i64,
    /// Attempts of a serial job that started while an earlier-ordered serial job of
    /// the same account (already enqueued then) was not yet finished.
    pub order_violations: i64,
    /// Attempts that started after their job had already completed.
    pub reruns_after_completion: i64,
    /// Jobs with more than one completed attempt.
    pub double_completions: i64,
}

impl HistoryReport {
    /// True when no serial-guarantee invariant is violated.
    pub fn is_clean(&self) -> bool {
        self.overlaps == 0
            && self.order_violations == 0
            && self.reruns_after_completion == 0
            && self.double_completions == 0
    }
}

/// Check the whole history in `warden.jobs` / `warden.attempts`.
pub async fn check(pool: &PgPool) -> Result<HistoryReport> {
    let (jobs, completed, discarded, cancelled, unfinished): (i64, i64, i64, i64, i64) = sqlx::query_as(
        "SELECT count(*),
                count(*) FILTER (WHERE state = 'completed'),
                count(*) FILTER (WHERE state = 'discarded'),
                count(*) FILTER (WHERE state = 'cancelled'),
                count(*) FILTER (WHERE state IN ('scheduled', 'available', 'retryable', 'running'))
         FROM warden.jobs",
    )
    .fetch_one(pool)
    .await?;
    let (attempts, retried, rescued): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*),
                count(*) FILTER (WHERE outcome IN ('failed', 'timeout', 'retry')),
                count(*) FILTER (WHERE outcome = 'rescued')
         FROM warden.attempts",
    )
    .fetch_one(pool)
    .await?;
    let overlaps: i64 = sqlx::query_scalar(
        // Each intersecting pair once, from the one that started first: a range scan
        // on attempts_account per attempt, not a self-join of the account's history
        // (that was quadratic: minutes after a 30-minute soak).
        "SELECT count(*) FROM warden.attempts a
         JOIN warden.jobs ja ON ja.id = a.job_id AND ja.lane = 'serial'
         JOIN warden.attempts b ON b.account = a.account
              AND b.started_at >= a.started_at AND b.started_at < a.finished_at
              AND (b.started_at, b.id) > (a.started_at, a.id)
         JOIN warden.jobs jb ON jb.id = b.job_id AND jb.lane = 'serial'",
    )
    .fetch_one(pool)
    .await?;
    let order_violations: i64 = sqlx::query_scalar(
        // Driven from the earlier job's unfinished window (created → finished), a
        // range scan on attempts_account: a self-join over (run_at, id) took over ten
        // minutes on a 240k-job soak; this takes seconds.
        "SELECT count(*) FROM warden.jobs ja
         JOIN warden.attempts b ON b.account = ja.account
              AND b.started_at > ja.created_at AND b.started_at < COALESCE(ja.finished_at, 'infinity')
         JOIN warden.jobs jb ON jb.id = b.job_id AND jb.lane = 'serial' AND (ja.run_at, ja.id) < (jb.run_at, jb.id)
         WHERE ja.lane = 'serial'",
    )
    .fetch_one(pool)
    .await?;
    let reruns: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM warden.attempts a
         JOIN warden.attempts c ON c.job_id = a.job_id AND c.outcome = 'completed'
         WHERE a.started_at >= c.finished_at AND a.id <> c.id",
    )
    .fetch_one(pool)
    .await?;
    let double: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT job_id FROM warden.attempts WHERE outcome = 'completed'
                               GROUP BY job_id HAVING count(*) > 1) d",
    )
    .fetch_one(pool)
    .await?;
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
