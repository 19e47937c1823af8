//! The periodic workload for the process tests: a `tick` handler a schedule fires
//! (it records its run in the job's transaction, so a row exists iff the job
//! completed), and the checker of exactly one fire per nominal time.
//!
//! The checker, per schedule: the nominal times fired (`warden.schedule_fires`, via
//! the schedule) from its first nominal time up to its stored next one must be
//! exactly the schedule's nominal times in that range, each once, minus those it
//! counted missed or skipped; each fired job completed, and its tick ran once.

use chrono::{DateTime, Utc};
use std::collections::BTreeMap;
use warden_runtime::scheduler::ScheduleDef;
use warden_runtime::{async_trait, Handler, HandlerResult, JobContext, Outcome};

pub const KIND: &str = "tick";

/// Records the run in the job's transaction.
pub struct Tick {
    pub node: String,
}

#[async_trait]
impl Handler for Tick {
    type Args = serde_json::Value;
    const KIND: &'static str = KIND;
    async fn run(&self, ctx: &mut JobContext, _: serde_json::Value) -> HandlerResult {
        let job = ctx.job_id();
        let node = self.node.clone();
        sqlx::query("INSERT INTO periodic_ticks (job_id, node, at) VALUES ($1, $2, clock_timestamp())")
            .bind(job)
            .bind(node)
            .execute(ctx.tx().await?)
            .await?;
        Ok(Outcome::Done)
    }
}

pub async fn migrate(pool: &sqlx::PgPool) -> anyhow::Result<()> {
    sqlx::raw_sql("CREATE TABLE IF NOT EXISTS periodic_ticks (job_id bigint, node text, at timestamptz)")
        .execute(pool)
        .await?;
    Ok(())
}

/// What the checker found over all schedules.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct FireReport {
    pub schedules: usize,
    /// Nominal times fired.
    pub fired: usize,
    /// Fired more than once.
    pub duplicated: usize,
    /// Neither fired nor counted missed/skipped by the schedule.
    pub lost: usize,
    /// Counted missed or skipped by the schedules (outside the catch-up window, or a
    /// policy).
    pub missed_or_skipped: i64,
    /// Fired jobs not completed.
    pub unfinished: usize,
    /// Ticks that ran more than once for one job.
    pub reran: usize,
    /// Fire lag (nominal → first attempt start), seconds, sorted.
    pub lags: Vec<f64>,
}

impl FireReport {
    pub fn is_clean(&self) -> bool {
        self.duplicated == 0 && self.lost == 0 && self.unfinished == 0 && self.reran == 0
    }
    pub fn lag_pct(&self, p: f64) -> f64 {
        if self.lags.is_empty() {
            return 0.0;
        }
        self.lags[((self.lags.len() - 1) as f64 * p).round() as usize]
    }
}

/// Check every schedule of the database; `first`: each schedule's first nominal time
/// (what `put` returned), by id.
pub async fn check(pool: &sqlx::PgPool, first: &BTreeMap<i64, DateTime<Utc>>) -> anyhow::Result<FireReport> {
    let mut r = FireReport::default();
    let rows: Vec<warden_runtime::scheduler::ScheduleRow> =
        sqlx::query_as("SELECT * FROM warden.schedules ORDER BY id").fetch_all(pool).await?;
    for row in rows {
        r.schedules += 1;
        let spec = row.def()?.spec()?;
        let fired: Vec<(DateTime<Utc>, i64)> = sqlx::query_as(
            "SELECT nominal_at, count(*) FROM warden.schedule_fires WHERE schedule_id = $1 AND via = 'schedule'
             GROUP BY 1 ORDER BY 1",
        )
        .bind(row.id)
        .fetch_all(pool)
        .await?;
        let fired: BTreeMap<DateTime<Utc>, i64> = fired.into_iter().collect();
        r.fired += fired.len();
        r.duplicated += fired.values().filter(|n| **n > 1).count();
        let start = first.get(&row.id).copied().or_else(|| fired.keys().next().copied());
        if let (Some(start), Some(end)) = (start, row.next_nominal) {
            let expected: Vec<DateTime<Utc>> = std::iter::once(start)
                .chain(spec.nominal_times(start, end - chrono::TimeDelta::nanoseconds(1), 1_000_000))
                .filter(|t| *t < end)
                .collect();
            let absent = expected.iter().filter(|t| !fired.contains_key(t)).count() as i64;
            let accounted = row.missed_total + row.skipped_total;
            r.missed_or_skipped += accounted;
            r.lost += (absent - accounted).max(0) as usize;
        }
        r.lost += fired.keys().filter(|t| !spec.is_nominal(**t)).count();
    }
    let (unfinished,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM warden.schedule_fires f JOIN warden.jobs j ON j.id = f.job_id
         WHERE j.state <> 'completed'",
    )
    .fetch_one(pool)
    .await?;
    r.unfinished = unfinished as usize;
    let (reran,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM (SELECT job_id FROM periodic_ticks GROUP BY job_id HAVING count(*) > 1) x",
    )
    .fetch_one(pool)
    .await?;
    r.reran = reran as usize;
    let lags: Vec<f64> = sqlx::query_scalar(
        "SELECT EXTRACT(EPOCH FROM (min(a.started_at) - f.nominal_at))::float8
         FROM warden.schedule_fires f JOIN warden.attempts a ON a.job_id = f.job_id
         WHERE f.via = 'schedule' GROUP BY f.job_id, f.nominal_at",
    )
    .fetch_all(pool)
    .await?;
    r.lags = lags;
    r.lags.sort_by(|a, b| a.total_cmp(b));
    Ok(r)
}

/// Every-second schedules of `tick` for accounts `periodic-0..n`, catch-up window 1 h
/// and overlap buffer_all (so nothing is skipped by policy: every nominal time must
/// fire). Returns each schedule's id and first nominal time.
pub async fn create_every_second(
    client: &warden_runtime::Client,
    n: usize,
) -> anyhow::Result<BTreeMap<i64, DateTime<Utc>>> {
    let mut first = BTreeMap::new();
    for i in 0..n {
        let def = ScheduleDef::every(format!("periodic-{i}"), "tick", std::time::Duration::from_secs(1), KIND, ())?
            .overlap(warden_runtime::scheduler::Overlap::BufferAll);
        let row = client.schedules().put(&def).await?;
        first.insert(row.id, row.next_nominal.expect("an endless schedule has a next nominal time"));
    }
    Ok(first)
}
