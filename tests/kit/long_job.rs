//! The long-job workload (issue 15): a `long` job works through fixed-length steps for
//! tens of seconds to minutes, heartbeating with its progress every step and
//! checkpointing every `checkpoint_every` steps, and resumes from its last committed
//! checkpoint wherever and whenever its next attempt runs. The process tests
//! (`tests/long_jobs_process.rs`) and the fault soak ([`crate::soak`]) run it on
//! `warden-test-node` processes; [`check`] judges what it left behind.
//!
//! Two records, both written outside any job transaction, so they survive a crash,
//! a fence and a drop:
//!
//! - `long_steps`: the handler's own log, one autocommit statement per row — like an
//!   external side effect, it is *not* fenced: a `resume` row when an attempt starts
//!   (with the step it resumes from), a `step` row as each step begins, a `stop` row
//!   when a handoff or shutdown told it to stop (after its last checkpoint). Every row
//!   carries the job, attempt, node, lease epoch, the handler's clock when it sent
//!   the statement (`sent_local`) and the database clock when it ran (`at`).
//! - `long_progress_writes`: every write that landed in `warden.job_progress` (a
//!   trigger on it: the outside observer of the fenced heartbeats and checkpoints),
//!   with the attempt that wrote it and the checkpoint the row then held.
//!
//! Overlap is judged by when the handler *sent* each step row (all processes of a
//! test share one machine and its clock): a statement held back by a network cut
//! and delivered after the lease moved on was decided while the attempt was valid
//! — the external-effect window DESIGN §4 leaves to the fence token — and is
//! counted apart ([`JobTrace::delayed_rows`]). Writes to `warden.job_progress` are
//! fenced in the database, so none may land late, however delayed.
//!
//! The handler checks [`JobContext::stop_reason`] right before each side effect, so
//! nothing is logged once the lease is lost or a stop was asked for; the runtime
//! polls a handler only inside its lease validity window, so a process resumed
//! after a pause past the TTL logs nothing more either. (A pause that lands between
//! the check and the statement's bytes leaving the process is the window DESIGN §4
//! describes; it is microseconds wide here.)

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;
use warden_runtime::{
    async_trait, Backoff, Handler, HandlerResult, Heartbeat, JobContext, JobOptions, Outcome, Progress, StopReason,
};

/// The job kind.
pub const KIND: &str = "long";
/// The kind's `max_attempts`: crashes and lease losses count, handoffs give theirs back.
pub const MAX_ATTEMPTS: i32 = 50;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LongArgs {
    /// Steps in the whole job.
    pub steps: u32,
    /// How long each step works.
    pub step_ms: u64,
    /// Checkpoint after every this many steps (so `checkpoint_every × step_ms` is the
    /// checkpoint interval).
    pub checkpoint_every: u32,
}

impl LongArgs {
    /// A job of `total` checkpointing every `interval`, in steps of `step`.
    pub fn new(total: Duration, interval: Duration, step: Duration) -> LongArgs {
        let step_ms = step.as_millis().max(1) as u64;
        LongArgs {
            steps: (total.as_millis() as u64 / step_ms).max(1) as u32,
            step_ms,
            checkpoint_every: (interval.as_millis() as u64 / step_ms).max(1) as u32,
        }
    }
}

pub async fn migrate(pool: &sqlx::PgPool) -> anyhow::Result<()> {
    // The observer is a trigger on a Warden table, and a host's set-up steps run
    // before its node migrates: apply Warden's migrations first (idempotent, and
    // safe when nodes start together).
    warden_runtime::store::migrate(pool).await?;
    // Nodes start together: serialise the CREATEs (see `workload::migrate`).
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('warden-tests-long-job'))").execute(&mut *tx).await?;
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS long_steps (
             id bigserial PRIMARY KEY, job_id bigint NOT NULL, attempt int NOT NULL, node text NOT NULL,
             epoch bigint NOT NULL, what text NOT NULL, step bigint NOT NULL,
             sent_local timestamptz NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp());
         CREATE INDEX IF NOT EXISTS long_steps_job ON long_steps (job_id, id);
         CREATE TABLE IF NOT EXISTS long_progress_writes (
             id bigserial PRIMARY KEY, job_id bigint NOT NULL, attempt int NOT NULL, node text NOT NULL,
             epoch bigint NOT NULL, checkpoint jsonb, checkpoint_attempt int,
             at timestamptz NOT NULL DEFAULT clock_timestamp());
         CREATE INDEX IF NOT EXISTS long_progress_writes_job ON long_progress_writes (job_id, id);
         CREATE OR REPLACE FUNCTION long_progress_observed() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             INSERT INTO long_progress_writes (job_id, attempt, node, epoch, checkpoint, checkpoint_attempt)
             VALUES (NEW.job_id, NEW.attempt, NEW.node, NEW.epoch, NEW.checkpoint, NEW.checkpoint_attempt);
             RETURN NULL;
         END $$;
         DROP TRIGGER IF EXISTS long_progress_observed ON warden.job_progress;
         CREATE TRIGGER long_progress_observed AFTER INSERT OR UPDATE ON warden.job_progress
             FOR EACH ROW EXECUTE FUNCTION long_progress_observed();",
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// The handler. `pool` is its own (an external system's), not the executor's.
pub struct LongJob {
    pub node: String,
    pub pool: sqlx::PgPool,
}

#[async_trait]
impl Handler for LongJob {
    type Args = LongArgs;
    const KIND: &'static str = KIND;

    fn options(&self) -> JobOptions {
        JobOptions {
            max_attempts: MAX_ATTEMPTS,
            timeout: Duration::from_secs(1800),
            backoff: Backoff { base: Duration::from_millis(50), max: Duration::from_millis(500), jitter: 0.0 },
            // Generous: a database cut in the soak stalls a step for seconds.
            heartbeat_timeout: Some(Duration::from_secs(15)),
            ..Default::default()
        }
    }

    async fn run(&self, ctx: &mut JobContext, a: LongArgs) -> HandlerResult {
        let every = a.checkpoint_every.max(1);
        let mut done: u32 = ctx.checkpointed().await?.unwrap_or(0);
        if let Some(reason) = ctx.stop_reason() {
            return Err(reason.into());
        }
        self.log(ctx, "resume", done).await?;
        while done < a.steps {
            // The step's side effect, only while the lease holds and no stop is asked.
            if let Some(reason) = ctx.stop_reason() {
                return self.stop(ctx, reason, done).await;
            }
            self.log(ctx, "step", done).await?;
            tokio::time::sleep(Duration::from_millis(a.step_ms)).await;
            done += 1;
            let mut beat = ctx.heartbeat(Progress::of(done as u64, a.steps as u64)).await?;
            if beat == Heartbeat::Continue && (done.is_multiple_of(every) || done == a.steps) {
                beat = ctx.checkpoint(&done).await?;
            }
            if let Heartbeat::Stop(reason) = beat {
                return self.stop(ctx, reason, done).await;
            }
        }
        Ok(Outcome::Done)
    }
}

impl LongJob {
    /// Told to stop: save what is done (unless the lease is gone: nothing this
    /// attempt writes counts any more), then return the reason.
    async fn stop(&self, ctx: &mut JobContext, reason: StopReason, done: u32) -> HandlerResult {
        if reason != StopReason::LeaseLost {
            // Stopping already, whatever this beat says.
            let _ = ctx.checkpoint(&done).await?;
            if ctx.stop_reason() != Some(StopReason::LeaseLost) {
                self.log(ctx, "stop", done).await?;
            }
        }
        Err(reason.into())
    }

    async fn log(&self, ctx: &JobContext, what: &str, step: u32) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO long_steps (job_id, attempt, node, epoch, what, step, sent_local)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(ctx.job_id())
        .bind(ctx.attempt())
        .bind(&self.node)
        .bind(ctx.fence().epoch)
        .bind(what)
        .bind(step as i64)
        .bind(chrono::Utc::now())
        .execute(&self.pool)
        .await
        .map(|_| ())
    }
}

/// One row of `long_steps`.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct StepRow {
    pub id: i64,
    pub attempt: i32,
    pub node: String,
    pub what: String,
    pub step: i64,
    /// When the handler sent it (its process's clock).
    pub sent_local: chrono::DateTime<chrono::Utc>,
    /// When it ran (the database clock).
    pub at: chrono::DateTime<chrono::Utc>,
}

/// One row of `long_progress_writes`.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct ProgressWrite {
    pub id: i64,
    pub attempt: i32,
    pub node: String,
    pub checkpoint: Option<serde_json::Value>,
    pub at: chrono::DateTime<chrono::Utc>,
}

/// One attempt of a long job as its records show it.
#[derive(Debug, Clone, PartialEq)]
pub struct Execution {
    pub attempt: i32,
    pub node: String,
    /// The step it resumed from (its `resume` row).
    pub resumed_from: i64,
    /// The checkpoint last committed before it started (what it should resume from).
    pub last_checkpoint: i64,
    /// Steps an earlier attempt had already begun, begun again by this one.
    pub redone: i64,
    /// Its first and last record: step rows as sent, progress writes as committed.
    pub first_at: chrono::DateTime<chrono::Utc>,
    pub last_at: chrono::DateTime<chrono::Utc>,
    /// Its first `step` row.
    pub first_step_at: Option<chrono::DateTime<chrono::Utc>>,
    pub steps: i64,
    /// It logged a `stop` (told to stop for a handoff or shutdown, checkpointed).
    pub stopped: bool,
}

/// What one long job's records say, and what is wrong with them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobTrace {
    pub job_id: i64,
    pub executions: Vec<Execution>,
    /// Violations, described: records of two attempts overlapping in time, writes
    /// of an attempt after a later one started, resumes from anything but the last
    /// committed checkpoint, more than `checkpoint_every` steps redone by a resume,
    /// steps never run.
    pub problems: Vec<String>,
    /// Step rows sent while their attempt was the latest but run by the database
    /// after a later attempt started (held back by the network): not a problem of
    /// the runtime's, see the module doc.
    pub delayed_rows: usize,
}

impl JobTrace {
    /// The most steps one resume redid.
    pub fn max_redone(&self) -> i64 {
        self.executions.iter().map(|e| e.redone).max().unwrap_or(0)
    }
}

/// Judge one job from its records (pure): `steps` rows and `writes` in id order;
/// `completed` if the job completed (then every step must have run).
pub fn trace(job_id: i64, args: &LongArgs, steps: &[StepRow], writes: &[ProgressWrite], completed: bool) -> JobTrace {
    let mut t = JobTrace { job_id, ..Default::default() };
    let mut attempts: BTreeMap<i32, Vec<&StepRow>> = BTreeMap::new();
    for r in steps {
        attempts.entry(r.attempt).or_default().push(r);
    }
    let mut begun: BTreeMap<i64, i32> = BTreeMap::new(); // step → first attempt that began it
    for (&attempt, rows) in &attempts {
        let resumes: Vec<&&StepRow> = rows.iter().filter(|r| r.what == "resume").collect();
        if resumes.len() != 1 {
            t.problems.push(format!("job {job_id}: attempt {attempt} has {} resume rows", resumes.len()));
        }
        let Some(resume) = resumes.first() else { continue };
        // The checkpoint the store held when this attempt started: the one in the
        // last progress write of an earlier attempt before then (a late write of one
        // is a problem of its own, below).
        let last_checkpoint = writes
            .iter()
            .rfind(|w| w.attempt < attempt && w.at < resume.at)
            .and_then(|w| w.checkpoint.as_ref())
            .and_then(|c| c.as_i64())
            .unwrap_or(0);
        if resume.step != last_checkpoint {
            t.problems.push(format!(
                "job {job_id}: attempt {attempt} resumed from step {}, the last committed checkpoint was {last_checkpoint}",
                resume.step
            ));
        }
        let own_writes: Vec<&ProgressWrite> = writes.iter().filter(|w| w.attempt == attempt).collect();
        let first_at = rows.iter().map(|r| r.sent_local).chain(own_writes.iter().map(|w| w.at)).min().expect("a row");
        let last_at = rows.iter().map(|r| r.sent_local).chain(own_writes.iter().map(|w| w.at)).max().expect("a row");
        let step_rows: Vec<&&StepRow> = rows.iter().filter(|r| r.what == "step").collect();
        let mut redone = 0;
        for r in &step_rows {
            match begun.get(&r.step) {
                Some(&a) if a < attempt => redone += 1,
                Some(_) => t.problems.push(format!("job {job_id}: attempt {attempt} began step {} twice", r.step)),
                None => {
                    begun.insert(r.step, attempt);
                }
            }
        }
        if redone > args.checkpoint_every as i64 {
            t.problems.push(format!(
                "job {job_id}: attempt {attempt} redid {redone} steps, more than one checkpoint interval ({})",
                args.checkpoint_every
            ));
        }
        t.executions.push(Execution {
            attempt,
            node: resume.node.clone(),
            resumed_from: resume.step,
            last_checkpoint,
            redone,
            first_at,
            last_at,
            first_step_at: step_rows.first().map(|r| r.at),
            steps: step_rows.len() as i64,
            stopped: rows.iter().any(|r| r.what == "stop"),
        });
    }
    // No two attempts' records interleave: each ends before the next one starts.
    for pair in t.executions.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        if a.last_at >= b.first_at {
            t.problems.push(format!(
                "job {job_id}: attempt {} on {} ({} .. {}) overlaps attempt {} on {} (from {})",
                a.attempt, a.node, a.first_at, a.last_at, b.attempt, b.node, b.first_at
            ));
        }
    }
    // Nothing an attempt wrote landed after a later attempt started (the fence and
    // the validity window at work): step log and progress writes, separately named.
    for e in &t.executions {
        let later =
            |at: chrono::DateTime<chrono::Utc>| t.executions.iter().any(|l| l.attempt > e.attempt && at >= l.first_at);
        let late_steps = steps.iter().filter(|r| r.attempt == e.attempt && later(r.sent_local)).count();
        t.delayed_rows +=
            steps.iter().filter(|r| r.attempt == e.attempt && later(r.at) && !later(r.sent_local)).count();
        let late_writes = writes.iter().filter(|w| w.attempt == e.attempt && later(w.at)).count();
        if late_steps + late_writes > 0 {
            t.problems.push(format!(
                "job {job_id}: attempt {} on {} wrote after a later attempt started: {late_steps} step-log rows, {late_writes} job_progress writes",
                e.attempt, e.node
            ));
        }
    }
    if completed {
        let missing: Vec<i64> = (0..args.steps as i64).filter(|s| !begun.contains_key(s)).collect();
        if !missing.is_empty() {
            t.problems.push(format!("job {job_id}: completed, but steps {missing:?} never ran"));
        }
    }
    t
}

/// The long jobs of a database, judged.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LongReport {
    pub jobs: i64,
    pub completed: i64,
    /// Attempts after the first (each resumed from a checkpoint).
    pub resumes: i64,
    /// The most steps one resume redid, and the largest checkpoint interval (steps).
    pub max_redone: i64,
    pub max_interval: i64,
    /// Every violation found, described (see [`JobTrace::problems`]).
    pub problems: Vec<String>,
    /// Step rows delivered late by the network (see [`JobTrace::delayed_rows`]).
    pub delayed_rows: usize,
    pub traces: Vec<JobTrace>,
}

impl LongReport {
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Load and judge one `long` job (a job not completed is judged as far as it got).
pub async fn trace_job(pool: &sqlx::PgPool, id: i64) -> anyhow::Result<(JobTrace, String)> {
    let (args, state): (serde_json::Value, String) =
        sqlx::query_as("SELECT args, state FROM warden.jobs WHERE id = $1").bind(id).fetch_one(pool).await?;
    let args: LongArgs = serde_json::from_value(args)?;
    let steps: Vec<StepRow> = sqlx::query_as(
        "SELECT id, attempt, node, what, step, sent_local, at FROM long_steps WHERE job_id = $1 ORDER BY id",
    )
    .bind(id)
    .fetch_all(pool)
    .await?;
    let writes: Vec<ProgressWrite> = sqlx::query_as(
        "SELECT id, attempt, node, checkpoint, at FROM long_progress_writes WHERE job_id = $1 ORDER BY id",
    )
    .bind(id)
    .fetch_all(pool)
    .await?;
    Ok((trace(id, &args, &steps, &writes, state == "completed"), state))
}

/// Judge every `long` job in the database (a job not completed is a problem only if
/// `require_completed`).
pub async fn check(pool: &sqlx::PgPool, require_completed: bool) -> anyhow::Result<LongReport> {
    let jobs: Vec<(i64, serde_json::Value)> =
        sqlx::query_as("SELECT id, args FROM warden.jobs WHERE kind = $1 ORDER BY id")
            .bind(KIND)
            .fetch_all(pool)
            .await?;
    let mut report = LongReport { jobs: jobs.len() as i64, ..Default::default() };
    for (id, args) in jobs {
        let args: LongArgs = serde_json::from_value(args)?;
        let (t, state) = trace_job(pool, id).await?;
        if state == "completed" {
            report.completed += 1;
        } else if require_completed {
            report.problems.push(format!("job {id}: {state}, not completed"));
        }
        report.resumes += t.executions.len().saturating_sub(1) as i64;
        report.max_redone = report.max_redone.max(t.max_redone());
        report.max_interval = report.max_interval.max(args.checkpoint_every as i64);
        report.problems.extend(t.problems.iter().cloned());
        report.delayed_rows += t.delayed_rows;
        report.traces.push(t);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: i64) -> chrono::DateTime<chrono::Utc> {
        chrono::DateTime::from_timestamp_millis(1_700_000_000_000 + ms).unwrap()
    }

    fn row(id: i64, attempt: i32, what: &str, step: i64, ms: i64) -> StepRow {
        StepRow { id, attempt, node: format!("n{attempt}"), what: what.into(), step, sent_local: at(ms), at: at(ms) }
    }

    fn cp(id: i64, attempt: i32, checkpoint: i64, ms: i64) -> ProgressWrite {
        ProgressWrite { id, attempt, node: format!("n{attempt}"), checkpoint: Some(checkpoint.into()), at: at(ms) }
    }

    const ARGS: LongArgs = LongArgs { steps: 6, step_ms: 10, checkpoint_every: 2 };

    #[test]
    fn a_crash_resumed_from_the_last_checkpoint_is_clean() {
        // Attempt 1: steps 0..=2, checkpoint 2, crash mid step 2; attempt 2 redoes step 2.
        let steps = vec![
            row(1, 1, "resume", 0, 0),
            row(2, 1, "step", 0, 1),
            row(3, 1, "step", 1, 2),
            row(4, 1, "step", 2, 3),
            row(5, 2, "resume", 2, 10),
            row(6, 2, "step", 2, 11),
            row(7, 2, "step", 3, 12),
            row(8, 2, "step", 4, 13),
            row(9, 2, "step", 5, 14),
        ];
        let writes = vec![cp(1, 1, 2, 2), cp(2, 2, 4, 12), cp(3, 2, 6, 14)];
        let t = trace(1, &ARGS, &steps, &writes, true);
        assert!(t.problems.is_empty(), "{:?}", t.problems);
        assert_eq!(t.max_redone(), 1);
        assert_eq!(t.executions[1].first_step_at, Some(at(11)));
    }

    #[test]
    fn overlap_late_writes_wrong_resume_and_lost_steps_are_each_named() {
        let steps = vec![
            row(1, 1, "resume", 0, 0),
            row(2, 1, "step", 0, 1),
            row(3, 1, "step", 1, 2),
            row(4, 1, "step", 2, 3),
            row(5, 1, "step", 3, 4),
            // Resumes from 0 though checkpoint 2 was committed: redoes 4 steps.
            row(6, 2, "resume", 0, 10),
            row(7, 2, "step", 0, 11),
            row(8, 1, "step", 4, 12), // the old attempt, late
            row(9, 2, "step", 1, 13),
            row(10, 2, "step", 2, 14),
            row(11, 2, "step", 3, 15),
        ];
        let writes = vec![cp(1, 1, 2, 2), cp(2, 1, 4, 16)];
        let t = trace(1, &ARGS, &steps, &writes, true);
        let all = t.problems.join("\n");
        assert!(all.contains("resumed from step 0, the last committed checkpoint was 2"), "{all}");
        assert!(all.contains("redid 4 steps"), "{all}");
        assert!(all.contains("overlaps attempt 2"), "{all}");
        assert!(all.contains("1 step-log rows, 1 job_progress writes"), "{all}");
        assert!(all.contains("steps [5] never ran"), "{all}");
    }

    #[test]
    fn args_from_durations_round_to_whole_steps() {
        let a = LongArgs::new(Duration::from_secs(120), Duration::from_secs(1), Duration::from_millis(250));
        assert_eq!((a.steps, a.step_ms, a.checkpoint_every), (480, 250, 4));
    }
}
