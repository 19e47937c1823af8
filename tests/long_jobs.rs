//! Long-running jobs in-process (issue 15): heartbeats, progress, checkpoints that the
//! next attempt resumes from, the heartbeat timeout, a stolen lease rejecting a
//! stale attempt's writes, a drain giving the attempt back, a cancel reaching a
//! heartbeating handler. One node against a real PostgreSQL, one database per test;
//! the process-level versions (SIGKILL, SIGSTOP, scale-out, scale-in) are in
//! `tests/long_jobs_process.rs`.

use serde::{Deserialize, Serialize};
use std::time::Duration;
use warden_runtime::account_actor::ExecConfig;
use warden_runtime::{
    async_trait, Backoff, CancelResult, Handler, HandlerResult, Heartbeat, JobContext, JobOptions, NewJob, Node,
    NodeConfig, Progress,
};
use warden_tests::{eventually, TestDb};

const WAIT: Duration = Duration::from_secs(30);
const P: u32 = 8;

/// The long job: `steps` steps of `step_ms`, each logged (committed on its own, like
/// an external side effect) to `long_log`; a checkpoint after every
/// `checkpoint_every` steps, a heartbeat with progress after the others.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LongArgs {
    steps: u32,
    step_ms: u64,
    checkpoint_every: u32,
    /// On the first attempt, fail right after this step (0-based).
    #[serde(default)]
    fail_after: Option<u32>,
    /// On the first attempt, hang (no more heartbeats) after this step.
    #[serde(default)]
    hang_after: Option<u32>,
}

struct Long {
    pool: sqlx::PgPool,
    node: String,
}

#[async_trait]
impl Handler for Long {
    type Args = LongArgs;
    const KIND: &'static str = "long";

    fn options(&self) -> JobOptions {
        JobOptions {
            max_attempts: 5,
            timeout: Duration::from_secs(600),
            backoff: Backoff { base: Duration::from_millis(50), max: Duration::from_millis(200), jitter: 0.0 },
            heartbeat_timeout: Some(Duration::from_millis(800)),
            ..Default::default()
        }
    }

    async fn run(&self, ctx: &mut JobContext, a: LongArgs) -> HandlerResult {
        let from: u32 = ctx.checkpointed().await?.unwrap_or(0);
        self.log(ctx, "resume", from as i64).await;
        for step in from..a.steps {
            tokio::time::sleep(Duration::from_millis(a.step_ms)).await;
            self.log(ctx, "step", step as i64).await;
            let done = step + 1;
            let beat = if done % a.checkpoint_every == 0 {
                match ctx.checkpoint(&done).await {
                    Ok(b) => b,
                    Err(e) => {
                        self.log(ctx, "checkpoint-refused", step as i64).await;
                        return Err(e.into());
                    }
                }
            } else {
                ctx.heartbeat(Progress::of(done as u64, a.steps as u64).with_message(format!("step {done}"))).await?
            };
            if let Heartbeat::Stop(reason) = beat {
                self.log(ctx, &format!("stop:{reason:?}"), step as i64).await;
                // Save what is done so the next attempt does not redo it.
                if !matches!(reason, warden_runtime::StopReason::LeaseLost) {
                    let _ = ctx.checkpoint(&done).await;
                }
                return Err(reason.into());
            }
            if ctx.attempt() == 1 && a.fail_after == Some(step) {
                return Err("scripted failure".into());
            }
            if ctx.attempt() == 1 && a.hang_after == Some(step) {
                std::future::pending::<()>().await;
            }
        }
        Ok(warden_runtime::Outcome::Done)
    }
}

impl Long {
    async fn log(&self, ctx: &JobContext, what: &str, step: i64) {
        sqlx::query("INSERT INTO long_log (job_id, attempt, node, what, step) VALUES ($1, $2, $3, $4, $5)")
            .bind(ctx.job_id())
            .bind(ctx.attempt())
            .bind(&self.node)
            .bind(what)
            .bind(step)
            .execute(&self.pool)
            .await
            .expect("log a step");
    }
}

fn config(id: &str) -> NodeConfig {
    let mut c = warden_tests::fast_node_config(id, P);
    c.exec = ExecConfig {
        idle_timeout: Duration::from_secs(1),
        cancel_grace: Duration::from_millis(500),
        // Heartbeats poll the cancel request; this bounds the others.
        cancel_poll_interval: Duration::from_secs(30),
        drain_timeout: Duration::from_secs(3),
        heartbeat_write_interval: Duration::from_millis(200),
        ..Default::default()
    };
    c
}

async fn start(db: &TestDb, id: &str) -> Node {
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS long_log (id bigserial, job_id bigint, attempt int, node text, what text,
                                              step bigint, at timestamptz DEFAULT clock_timestamp())",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    Node::builder(config(id))
        .register(Long { pool: db.pool.clone(), node: id.into() })
        .unwrap()
        .start(db.node_pool().await)
        .await
        .unwrap()
}

async fn enqueue(node: &Node, account: &str, a: &LongArgs) -> i64 {
    node.client().enqueue(NewJob::new(account, "long", a).unwrap()).await.unwrap().id
}

async fn wait_state(db: &TestDb, id: i64, state: &str) {
    eventually(WAIT, &format!("job {id} {state}"), || async {
        let s: String = sqlx::query_scalar("SELECT state FROM warden.jobs WHERE id = $1")
            .bind(id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
        (s == state).then_some(())
    })
    .await
}

async fn wait_step(db: &TestDb, id: i64, step: i64) {
    eventually(WAIT, &format!("job {id} at step {step}"), || async {
        let s: Option<i64> = sqlx::query_scalar("SELECT max(step) FROM long_log WHERE job_id = $1 AND what = 'step'")
            .bind(id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
        (s >= Some(step)).then_some(())
    })
    .await
}

/// No two attempts of the job overlapped, nothing ran after completing, nothing lost.
async fn assert_clean(db: &TestDb) {
    let h = warden_runtime::history::check(&db.pool).await.unwrap();
    assert!(h.is_clean(), "serial guarantee violated: {h:?}");
    assert_eq!(h.unfinished, 0, "{h:?}");
}

/// (attempt, what, step) in log order.
async fn log_of(db: &TestDb, id: i64) -> Vec<(i32, String, i64)> {
    sqlx::query_as("SELECT attempt, what, step FROM long_log WHERE job_id = $1 ORDER BY id")
        .bind(id)
        .fetch_all(&db.pool)
        .await
        .unwrap()
}

/// (attempt, outcome, error) of the job's attempts in order.
async fn attempts_of(db: &TestDb, id: i64) -> Vec<(i32, String, Option<String>)> {
    sqlx::query_as("SELECT attempt, outcome, error FROM warden.attempts WHERE job_id = $1 ORDER BY id")
        .bind(id)
        .fetch_all(&db.pool)
        .await
        .unwrap()
}

/// Every step ran, none more often than twice, and only steps after the last
/// checkpoint of an attempt were redone by the next one (≤ one checkpoint interval).
fn assert_resumed(log: &[(i32, String, i64)], steps: i64, every: i64) {
    let ran: Vec<i64> = log.iter().filter(|(_, w, _)| w == "step").map(|(_, _, s)| *s).collect();
    for s in 0..steps {
        assert!(ran.contains(&s), "step {s} never ran: {log:?}");
    }
    let mut seen = std::collections::BTreeMap::new();
    for s in &ran {
        *seen.entry(*s).or_insert(0) += 1;
    }
    let redone: Vec<i64> = seen.iter().filter(|(_, n)| **n > 1).map(|(s, _)| *s).collect();
    assert!(redone.len() as i64 <= every, "redone {redone:?}, more than one checkpoint interval ({every}): {log:?}");
    assert!(seen.values().all(|n| *n <= 2), "a step ran three times: {log:?}");
}

#[tokio::test]
async fn a_retry_resumes_from_the_last_checkpoint_and_redoes_at_most_one_interval() {
    let db = TestDb::new().await;
    let node = start(&db, "n1").await;
    let a = LongArgs { steps: 12, step_ms: 20, checkpoint_every: 3, fail_after: Some(7), hang_after: None };
    let id = enqueue(&node, "acct-retry", &a).await;
    wait_state(&db, id, "completed").await;
    let log = log_of(&db, id).await;
    // Checkpoints after steps 2, 5 (done = 3, 6); failed after step 7: resumes at 6.
    assert!(log.contains(&(2, "resume".into(), 6)), "{log:?}");
    assert_resumed(&log, 12, 3);
    let attempts = attempts_of(&db, id).await;
    assert_eq!(attempts.iter().map(|a| a.1.as_str()).collect::<Vec<_>>(), ["failed", "completed"]);
    let (pct, msg): (Option<f32>, Option<String>) =
        sqlx::query_as("SELECT progress_percent, progress_message FROM warden.job_progress WHERE job_id = $1")
            .bind(id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(pct.is_some_and(|p| p > 50.0), "progress recorded: {pct:?}");
    assert!(msg.is_some_and(|m| m.starts_with("step ")));
    node.shutdown().await.unwrap();
    assert_clean(&db).await;
}

#[tokio::test]
async fn a_hung_handler_is_aborted_within_its_heartbeat_timeout_and_retried() {
    let db = TestDb::new().await;
    let node = start(&db, "n1").await;
    let a = LongArgs { steps: 8, step_ms: 20, checkpoint_every: 2, fail_after: None, hang_after: Some(4) };
    let id = enqueue(&node, "acct-hung", &a).await;
    wait_state(&db, id, "completed").await;
    let attempts = attempts_of(&db, id).await;
    assert_eq!(attempts[0].1, "timeout", "{attempts:?}");
    assert!(attempts[0].2.as_deref().unwrap().contains("no heartbeat for 800ms"), "{attempts:?}");
    assert_eq!(attempts[1].1, "completed");
    // Aborted within the timeout (+ scheduling slack) of the last beat.
    let hung_for: f64 = sqlx::query_scalar(
        "SELECT EXTRACT(EPOCH FROM (a.finished_at - p.at))::float8
         FROM warden.attempts a, (SELECT max(at) AS at FROM long_log WHERE job_id = $1 AND attempt = 1) p
         WHERE a.job_id = $1 AND a.attempt = 1",
    )
    .bind(id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    // Not before the timeout; after it within scheduling slack (loose for a loaded CI
    // machine: what matters is that it is caught, not the exact figure).
    assert!((0.7..4.0).contains(&hung_for), "aborted {hung_for:.2}s after the last beat (timeout 0.8s)");
    assert_resumed(&log_of(&db, id).await, 8, 2);
    node.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_stale_attempts_heartbeat_and_checkpoint_are_rejected_and_stop_it() {
    let db = TestDb::new().await;
    let node = start(&db, "n1").await;
    let a = LongArgs { steps: 60, step_ms: 50, checkpoint_every: 4, fail_after: None, hang_after: None };
    let id = enqueue(&node, "acct-stolen", &a).await;
    wait_step(&db, id, 10).await;
    // Another owner takes the lease over (as after an expiry this node did not see):
    // a new epoch, held for 3 s, then free again for this node to re-acquire.
    let part: i32 = sqlx::query_scalar("SELECT partition FROM warden.jobs WHERE id = $1")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    sqlx::query(
        "UPDATE warden.leases SET owner_node = 'thief', epoch = epoch + 1,
                lease_expires_at = now() + interval '3 seconds' WHERE partition = $1",
    )
    .bind(part)
    .execute(&db.pool)
    .await
    .unwrap();
    let stolen_at: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT clock_timestamp()").fetch_one(&db.pool).await.unwrap();
    wait_state(&db, id, "completed").await;
    let log = log_of(&db, id).await;
    let first: Vec<_> = log.iter().filter(|(at, ..)| *at == 1).collect();
    let last = first.last().unwrap();
    assert!(
        last.1 == "stop:LeaseLost" || last.1 == "checkpoint-refused" || last.1 == "step",
        "the first attempt ended on its rejected write or was dropped: {first:?}"
    );
    // Nothing of attempt 1 reached job_progress after the steal.
    let wrote_after: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM warden.job_progress WHERE job_id = $1 AND attempt = 1 AND heartbeat_at > $2",
    )
    .bind(id)
    .bind(stolen_at)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(wrote_after, 0);
    // The first attempt stopped within one step of the steal (its next write).
    let steps_after: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM long_log WHERE job_id = $1 AND attempt = 1 AND what = 'step' AND at > $2",
    )
    .bind(id)
    .bind(stolen_at)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(steps_after <= 1, "attempt 1 ran {steps_after} steps after its lease was taken: {log:?}");
    let resumed = log.iter().find(|(at, w, _)| *at > 1 && w == "resume").expect("a later attempt");
    assert!(resumed.2 >= 8, "resumed from the last checkpoint: {log:?}");
    assert_resumed(&log, 60, 4);
    node.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_drained_long_job_checkpoints_and_resumes_on_the_next_node_without_using_an_attempt() {
    let db = TestDb::new().await;
    let n1 = start(&db, "n1").await;
    let a = LongArgs { steps: 40, step_ms: 50, checkpoint_every: 10, fail_after: None, hang_after: None };
    let id = enqueue(&n1, "acct-drain", &a).await;
    wait_step(&db, id, 13).await;
    n1.shutdown().await.unwrap();
    let attempts = attempts_of(&db, id).await;
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].1, "interrupted", "{attempts:?}");
    let (state, max_attempts): (String, i32) =
        sqlx::query_as("SELECT state, max_attempts FROM warden.jobs WHERE id = $1")
            .bind(id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!((state.as_str(), max_attempts), ("retryable", 6), "the interrupted attempt was given back");
    let n2 = start(&db, "n2").await;
    wait_state(&db, id, "completed").await;
    let log = log_of(&db, id).await;
    let stop = log.iter().find(|(_, w, _)| w == "stop:Handoff").expect("told to stop for the handoff");
    let resumed = log.iter().find(|(at, w, _)| *at == 2 && w == "resume").expect("resumed");
    assert_eq!(resumed.2, stop.2 + 1, "resumed right after the step it stopped at: {log:?}");
    let steps: Vec<i64> = log.iter().filter(|(_, w, _)| w == "step").map(|x| x.2).collect();
    assert_eq!(steps, (0..40).collect::<Vec<_>>(), "no step redone");
    n2.shutdown().await.unwrap();
    assert_clean(&db).await;
}

#[tokio::test]
async fn a_cancel_reaches_a_heartbeating_handler_through_its_heartbeat() {
    let db = TestDb::new().await;
    let node = start(&db, "n1").await;
    let a = LongArgs { steps: 400, step_ms: 50, checkpoint_every: 50, fail_after: None, hang_after: None };
    let id = enqueue(&node, "acct-cancel", &a).await;
    wait_step(&db, id, 5).await;
    assert_eq!(node.client().cancel(id).await.unwrap(), CancelResult::CancelRequested);
    let asked = tokio::time::Instant::now();
    wait_state(&db, id, "cancelled").await;
    // The cancel poll is 30 s here: only the heartbeat can have told it.
    assert!(asked.elapsed() < Duration::from_secs(10), "stopped {:?} after the cancel", asked.elapsed());
    let log = log_of(&db, id).await;
    assert!(log.iter().any(|(_, w, _)| w == "stop:Cancelled"), "{log:?}");
    node.shutdown().await.unwrap();
}

// ---- Adversarial review (attack15) -------------------------------------------------

/// JSON nested `depth` levels deep: a few hundred bytes, far under every size limit.
fn deeply_nested(depth: usize) -> serde_json::Value {
    let mut v = serde_json::json!(1);
    for _ in 0..depth {
        v = serde_json::json!([v]);
    }
    v
}

/// Attempt 1 heartbeats progress details and checkpoints a state nested 200 levels
/// deep (each write either refused or committed), then fails; attempt 2 reads the
/// checkpoint back and completes.
struct Deep;

#[async_trait]
impl Handler for Deep {
    type Args = ();
    const KIND: &'static str = "deep";

    fn options(&self) -> JobOptions {
        JobOptions {
            max_attempts: 3,
            backoff: Backoff { base: Duration::from_millis(50), max: Duration::from_millis(50), jitter: 0.0 },
            ..Default::default()
        }
    }

    async fn run(&self, ctx: &mut JobContext, _: ()) -> HandlerResult {
        if ctx.attempt() == 1 {
            let deep = deeply_nested(200);
            // Refused (Err) or recorded: either is fine, as long as what is recorded
            // can be read back.
            let _ = ctx.heartbeat(Progress::percent(10.0).with_details(deep.clone())).await;
            let _ = ctx.checkpoint(&deep).await;
            return Err("fail the first attempt".into());
        }
        let _: Option<serde_json::Value> = ctx.checkpointed().await?;
        Ok(warden_runtime::Outcome::Done)
    }
}

/// Regression (attack15): progress details and checkpoints were only checked for
/// size and NUL, not nesting. JSON nested deeper than serde_json's recursion limit
/// (128) is small, PostgreSQL's jsonb stores it, but it cannot be decoded again: the
/// next attempt's `checkpointed()` failed for good (the job could never resume and
/// was discarded), and `job_progress` — GetJob, and ListJobs for the whole page of
/// every account's jobs — failed while the row existed.
#[tokio::test]
async fn deeply_nested_progress_or_checkpoint_is_refused_not_stored_unreadable() {
    let db = TestDb::new().await;
    let node = Node::builder(config("n1")).register(Deep).unwrap().start(db.node_pool().await).await.unwrap();
    let id = node.client().enqueue(NewJob::new("acct-deep", "deep", ()).unwrap()).await.unwrap().id;
    eventually(WAIT, "the deep job finished", || async {
        let s: String = sqlx::query_scalar("SELECT state FROM warden.jobs WHERE id = $1")
            .bind(id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
        matches!(s.as_str(), "completed" | "discarded").then_some(s)
    })
    .await;
    let attempts = attempts_of(&db, id).await;
    assert_eq!(
        attempts.iter().map(|a| a.1.as_str()).collect::<Vec<_>>(),
        ["failed", "completed"],
        "the second attempt resumed: {attempts:?}"
    );
    use warden_runtime::store::{AdminStore, PgAdminStore};
    let read = PgAdminStore::from(&db.pool).job_progress(&[id]).await;
    assert!(read.is_ok(), "GetJob/ListJobs can read the job's progress: {read:?}");
    node.shutdown().await.unwrap();
    assert_clean(&db).await;
}

/// Regression (attack15): the heartbeat-timeout watchdog counted the time a handler
/// spent blocked inside Warden's own heartbeat write (bounded at 2 s) as silence. A
/// healthy handler beating every 50 ms with an 800 ms heartbeat timeout was aborted
/// as "hung" by a one-second database stall on its own heartbeat row.
#[tokio::test]
async fn a_slow_heartbeat_write_does_not_make_a_healthy_handler_look_hung() {
    let db = TestDb::new().await;
    let node = start(&db, "n1").await;
    let a = LongArgs { steps: 60, step_ms: 50, checkpoint_every: 1000, fail_after: None, hang_after: None };
    let id = enqueue(&node, "acct-stall", &a).await;
    wait_step(&db, id, 5).await;
    // The database stalls the job's heartbeat row for 1.5 s (a lock here; an I/O
    // stall or a slow replica commit in production): every write waits.
    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM warden.job_progress WHERE job_id = $1 FOR UPDATE")
        .bind(id)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    tx.commit().await.unwrap();
    wait_state(&db, id, "completed").await;
    let attempts = attempts_of(&db, id).await;
    assert_eq!(attempts.iter().map(|a| a.1.as_str()).collect::<Vec<_>>(), ["completed"], "{attempts:?}");
    node.shutdown().await.unwrap();
    assert_clean(&db).await;
}
