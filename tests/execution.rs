//! Execution tests: a node in-process against a real PostgreSQL, one database per
//! test. Every test that runs jobs ends by checking the serial guarantee from the
//! attempts table (`history::check`).

use serde::{Deserialize, Serialize};
use std::time::Duration;
use warden_runtime::account_actor::ExecConfig;
use warden_runtime::lease::LeaseConfig;
use warden_runtime::{
    async_trait, history, Backoff, CancelResult, Handler, HandlerResult, JobContext, JobOptions, NewJob, Node,
    NodeConfig, Outcome, PartitionCount,
};
use warden_tests::{count_state, eventually, TestDb};

const WAIT: Duration = Duration::from_secs(30);

fn config() -> NodeConfig {
    NodeConfig {
        node_id: "test-node".into(),
        partitions: PartitionCount::new(16).unwrap(),
        lease: LeaseConfig {
            ttl: Duration::from_secs(2),
            renew_interval: Duration::from_millis(400),
            safety_margin: Duration::from_millis(500),
        },
        exec: ExecConfig {
            idle_timeout: Duration::from_secs(1),
            cancel_grace: Duration::from_millis(300),
            cancel_poll_interval: Duration::from_millis(200),
            drain_timeout: Duration::from_secs(2),
            max_actors: 1000,
            ..Default::default()
        },
        enforcer_interval: Duration::from_millis(200),
        due_scan_limit: 10_000,
        ..Default::default()
    }
}

/// What the scripted handler does on each attempt.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Script {
    #[serde(default)]
    seq: i64,
    #[serde(default)]
    sleep_ms: u64,
    /// Return an error on the first N attempts.
    #[serde(default)]
    fail_times: i32,
    /// Panic on the first N attempts.
    #[serde(default)]
    panic_times: i32,
    /// "done" (default), "retry", "snooze_once", "discard", "wait_cancel", "ignore_cancel".
    #[serde(default)]
    mode: String,
    /// Enqueue this follow-up (kind "script") in the job transaction before finishing.
    #[serde(default)]
    follow_up: Option<Box<Script>>,
}

struct Scripted;

#[async_trait]
impl Handler for Scripted {
    type Args = Script;
    const KIND: &'static str = "script";

    fn options(&self) -> JobOptions {
        JobOptions {
            max_attempts: 3,
            timeout: Duration::from_secs(10),
            backoff: Backoff { base: Duration::from_millis(100), max: Duration::from_secs(1), jitter: 0.0 },
            ..Default::default()
        }
    }

    async fn run(&self, ctx: &mut JobContext, s: Script) -> HandlerResult {
        let account = ctx.account().to_string();
        sqlx::query("INSERT INTO script_log (job_id, account, seq, attempt) VALUES ($1, $2, $3, $4)")
            .bind(ctx.job_id())
            .bind(&account)
            .bind(s.seq)
            .bind(ctx.attempt())
            .execute(ctx.tx().await?)
            .await?;
        if let Some(next) = &s.follow_up {
            ctx.enqueue(NewJob::new(account.clone(), "script", next)?).await?;
        }
        if s.sleep_ms > 0 {
            tokio::time::sleep(Duration::from_millis(s.sleep_ms)).await;
        }
        if ctx.attempt() <= s.panic_times {
            panic!("scripted panic on attempt {}", ctx.attempt());
        }
        if ctx.attempt() <= s.fail_times {
            return Err(format!("scripted failure on attempt {}", ctx.attempt()).into());
        }
        match s.mode.as_str() {
            "retry" => Ok(Outcome::Retry { after: Some(Duration::from_millis(50)) }),
            "snooze_once" if ctx.attempt() == 1 => Ok(Outcome::Snooze(Duration::from_millis(100))),
            "discard" => Ok(Outcome::Discard("scripted discard".into())),
            "wait_cancel" => {
                ctx.cancellation().cancelled().await;
                Err("stopped on cancellation".into())
            }
            "ignore_cancel" => {
                tokio::time::sleep(Duration::from_secs(60)).await;
                Ok(Outcome::Done)
            }
            _ => Ok(Outcome::Done),
        }
    }
}

/// A node builder with the test handlers registered and their tables created.
async fn builder(db: &TestDb, config: NodeConfig) -> warden_runtime::NodeBuilder {
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS script_log (job_id bigint, account text, seq bigint, attempt int,
                                                at timestamptz DEFAULT clock_timestamp())",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    warden_tests::workload::migrate(&db.pool).await.unwrap();
    Node::builder(config)
        .register(Scripted)
        .unwrap()
        .register(warden_tests::workload::Audit { node: "test-node".into(), pool: db.pool.clone() })
        .unwrap()
}

async fn start(db: &TestDb, config: NodeConfig) -> Node {
    builder(db, config).await.start(db.node_pool().await).await.unwrap()
}

/// Wait until job `id` is running; its row.
async fn wait_running(client: &warden_runtime::Client, id: i64) -> warden_runtime::JobRow {
    eventually(WAIT, &format!("job {id} running"), || async {
        client.get(id).await.unwrap().filter(|j| j.state == "running")
    })
    .await
}

fn script(account: &str, s: Script) -> NewJob {
    NewJob::new(account, "script", s).unwrap()
}

async fn wait_finished(db: &TestDb, id: i64) -> warden_runtime::JobRow {
    eventually(WAIT, &format!("job {id} finished"), || async {
        let j: warden_runtime::JobRow =
            sqlx::query_as("SELECT * FROM warden.jobs WHERE id = $1").bind(id).fetch_one(&db.pool).await.unwrap();
        j.state().filter(|s| s.is_terminal()).map(|_| j)
    })
    .await
}

async fn assert_clean(db: &TestDb) -> history::HistoryReport {
    let h = history::check(&db.pool).await.unwrap();
    assert!(h.is_clean(), "serial guarantee violated: {h:?}");
    h
}

#[tokio::test]
async fn many_accounts_run_in_order_without_overlap_under_load() {
    let db = TestDb::new().await;
    let node = start(&db, config()).await;
    let (accounts, per_account) = (40, 25);
    let mut jobs = Vec::new();
    for seq in 0..per_account {
        for a in 0..accounts {
            let args = warden_tests::workload::AuditArgs {
                seq,
                sleep_ms: fastrand::u64(0..3),
                fail_times: if fastrand::u8(..) < 20 { 1 } else { 0 },
                ..Default::default()
            };
            jobs.push(NewJob::new(format!("acct-{a}"), "audit", args).unwrap());
        }
    }
    node.client().enqueue_many(&jobs).await.unwrap();
    let total = accounts * per_account;
    eventually(Duration::from_secs(120), "all audit jobs completed", || async {
        (count_state(&db.pool, "completed").await == total).then_some(())
    })
    .await;
    let h = assert_clean(&db).await;
    assert_eq!(h.completed, total);
    assert!(h.retried_attempts > 0, "some injected failures were retried");
    assert_eq!(h.rescued_attempts, 0, "a busy node must never self-fence (renewals starved)");
    let audit = warden_tests::workload::check(&db.pool).await.unwrap();
    assert_eq!(audit.rows, total, "exactly one committed audit row per job");
    assert_eq!((audit.duplicate_jobs, audit.overlaps, audit.order_violations), (0, 0, 0), "{audit:?}");
    node.shutdown().await.unwrap();
}

#[tokio::test]
async fn failing_head_retries_with_backoff_blocks_its_account_then_is_discarded() {
    let db = TestDb::new().await;
    let node = start(&db, config()).await;
    let c = node.client();
    let head = c.enqueue(script("a", Script { fail_times: 99, ..Default::default() })).await.unwrap();
    let behind = c.enqueue(script("a", Script { seq: 1, ..Default::default() })).await.unwrap();
    let other = c.enqueue(script("b", Script::default())).await.unwrap();
    // Another account is not blocked.
    assert_eq!(wait_finished(&db, other.id).await.state, "completed");
    let h = wait_finished(&db, head.id).await;
    assert_eq!((h.state.as_str(), h.attempt), ("discarded", 3));
    assert!(h.last_error.as_deref().unwrap().contains("scripted failure"), "{:?}", h.last_error);
    let b = wait_finished(&db, behind.id).await;
    assert_eq!(b.state, "completed");
    let attempts = c.attempts(head.id).await.unwrap();
    assert_eq!(attempts.iter().map(|a| a.outcome.as_str()).collect::<Vec<_>>(), ["failed", "failed", "failed"]);
    // Exponential backoff: ≥100ms then ≥200ms between attempts (jitter 0).
    let gap1 = attempts[1].started_at - attempts[0].finished_at;
    let gap2 = attempts[2].started_at - attempts[1].finished_at;
    assert!(gap1 >= chrono::Duration::milliseconds(95), "{gap1}");
    assert!(gap2 >= chrono::Duration::milliseconds(195), "{gap2}");
    // The job behind the head started only after the head was discarded.
    let behind_attempts = c.attempts(behind.id).await.unwrap();
    assert!(behind_attempts[0].started_at >= h.finished_at.unwrap());
    assert_clean(&db).await;
    // An operator can retry the discarded job (this re-opens it, so the history
    // checker — which judges by each job's final state — is not run after it).
    c.retry(head.id).await.unwrap();
    let h = wait_finished(&db, head.id).await;
    assert_eq!((h.state.as_str(), h.attempt), ("discarded", 4));
    node.shutdown().await.unwrap();
}

// Multi-threaded like a real node: the scripted panic prints a backtrace
// (RUST_BACKTRACE=1), and symbolizing it blocked the test's only thread for ~1.6 s on
// a loaded machine — long enough for the node's leases to self-fence mid-test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcomes_retry_snooze_discard_and_panics() {
    let db = TestDb::new().await;
    let node = start(&db, config()).await;
    let c = node.client();
    let snooze = c.enqueue(script("s", Script { mode: "snooze_once".into(), ..Default::default() })).await.unwrap();
    let retry = c.enqueue(script("r", Script { mode: "retry".into(), ..Default::default() })).await.unwrap();
    let discard = c.enqueue(script("d", Script { mode: "discard".into(), ..Default::default() })).await.unwrap();
    let panics = c.enqueue(script("p", Script { panic_times: 1, ..Default::default() })).await.unwrap();

    let s = wait_finished(&db, snooze.id).await;
    assert_eq!((s.state.as_str(), s.attempt, s.max_attempts), ("completed", 2, 4), "snooze does not use up an attempt");
    let r = wait_finished(&db, retry.id).await;
    assert_eq!((r.state.as_str(), r.attempt), ("discarded", 3));
    let d = wait_finished(&db, discard.id).await;
    assert_eq!((d.state.as_str(), d.attempt, d.last_error.as_deref()), ("discarded", 1, Some("scripted discard")));
    let p = wait_finished(&db, panics.id).await;
    assert_eq!((p.state.as_str(), p.attempt), ("completed", 2));
    let pa = c.attempts(panics.id).await.unwrap();
    assert_eq!(pa[0].outcome, "failed");
    assert!(pa[0].error.as_deref().unwrap().contains("panicked: scripted panic"), "{:?}", pa[0].error);
    let sa = c.attempts(snooze.id).await.unwrap();
    assert_eq!(sa.iter().map(|a| a.outcome.as_str()).collect::<Vec<_>>(), ["snoozed", "completed"]);
    // Handler writes of non-completed attempts were rolled back: one log row per completion.
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM script_log WHERE job_id = $1")
        .bind(panics.id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(rows, 1);
    assert_clean(&db).await;
    node.shutdown().await.unwrap();
}

#[tokio::test]
async fn timeouts_abort_the_attempt_and_record_it() {
    let db = TestDb::new().await;
    let node = start(&db, config()).await;
    let j = node
        .client()
        .enqueue(
            script("t", Script { sleep_ms: 5_000, ..Default::default() })
                .timeout(Duration::from_millis(200))
                .max_attempts(2),
        )
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let row = wait_finished(&db, j.id).await;
    assert_eq!((row.state.as_str(), row.attempt), ("discarded", 2));
    assert!(started.elapsed() < Duration::from_secs(4), "timeouts must abort the 5s handler");
    let a = node.client().attempts(j.id).await.unwrap();
    assert_eq!(a.iter().map(|a| a.outcome.as_str()).collect::<Vec<_>>(), ["timeout", "timeout"]);
    assert!(a[0].error.as_deref().unwrap().contains("timed out after 200ms"));
    let dur = a[0].finished_at - a[0].started_at;
    assert!(dur >= chrono::Duration::milliseconds(190) && dur < chrono::Duration::seconds(2), "{dur}");
    assert_clean(&db).await;
    node.shutdown().await.unwrap();
}

#[tokio::test]
async fn cancel_queued_and_running_jobs() {
    let db = TestDb::new().await;
    let node = start(&db, config()).await;
    let c = node.client();
    // A cooperative handler stops on the token; one that ignores it is aborted after the grace.
    let coop = c.enqueue(script("c1", Script { mode: "wait_cancel".into(), ..Default::default() })).await.unwrap();
    let stubborn =
        c.enqueue(script("c2", Script { mode: "ignore_cancel".into(), ..Default::default() })).await.unwrap();
    let queued = c.enqueue(script("c1", Script { seq: 1, ..Default::default() })).await.unwrap();
    let after = c.enqueue(script("c1", Script { seq: 2, ..Default::default() })).await.unwrap();
    assert_eq!(c.cancel(queued.id).await.unwrap(), CancelResult::Cancelled);
    for id in [coop.id, stubborn.id] {
        wait_running(c, id).await;
    }
    let t = std::time::Instant::now();
    assert_eq!(c.cancel(coop.id).await.unwrap(), CancelResult::CancelRequested);
    assert_eq!(c.cancel(stubborn.id).await.unwrap(), CancelResult::CancelRequested);
    let a = wait_finished(&db, coop.id).await;
    assert_eq!(a.state, "cancelled");
    let b = wait_finished(&db, stubborn.id).await;
    assert_eq!(b.state, "cancelled");
    assert!(b.last_error.as_deref().unwrap().contains("aborted"), "{:?}", b.last_error);
    assert!(t.elapsed() < Duration::from_secs(5), "cancel took {:?}", t.elapsed());
    assert_eq!(wait_finished(&db, queued.id).await.state, "cancelled");
    assert_eq!(wait_finished(&db, after.id).await.state, "completed", "the account continues after a cancel");
    assert_clean(&db).await;
    node.shutdown().await.unwrap();
}

#[tokio::test]
async fn undecodable_args_and_unknown_kinds_are_discarded_with_a_clear_error() {
    let db = TestDb::new().await;
    let node = start(&db, config()).await;
    let c = node.client();
    let bad = c.enqueue(NewJob::new("x", "script", serde_json::json!({"seq": "not a number"})).unwrap()).await.unwrap();
    let unknown = c.enqueue(NewJob::new("x", "no_such_kind", ()).unwrap()).await.unwrap();
    let fine = c.enqueue(script("x", Script::default())).await.unwrap();
    let b = wait_finished(&db, bad.id).await;
    assert_eq!((b.state.as_str(), b.attempt), ("discarded", 1));
    assert!(b.last_error.as_deref().unwrap().contains("args do not match kind \"script\""), "{:?}", b.last_error);
    let u = wait_finished(&db, unknown.id).await;
    assert_eq!((u.state.as_str(), u.attempt), ("discarded", 1));
    assert!(u.last_error.as_deref().unwrap().contains("no handler for kind \"no_such_kind\""), "{:?}", u.last_error);
    assert_eq!(wait_finished(&db, fine.id).await.state, "completed");
    assert_clean(&db).await;
    node.shutdown().await.unwrap();
}

#[tokio::test]
async fn job_chains_exist_only_if_the_step_completes() {
    let db = TestDb::new().await;
    let node = start(&db, config()).await;
    let c = node.client();
    let chain =
        Script { follow_up: Some(Box::new(Script { seq: 2, ..Default::default() })), seq: 1, ..Default::default() };
    let ok = c.enqueue(script("chain", chain.clone())).await.unwrap();
    let failing = c.enqueue(script("chain2", Script { mode: "discard".into(), ..chain })).await.unwrap();
    wait_finished(&db, ok.id).await;
    wait_finished(&db, failing.id).await;
    eventually(WAIT, "follow-up completed", || async { (count_state(&db.pool, "completed").await == 2).then_some(()) })
        .await;
    let follow_ups: Vec<String> = sqlx::query_scalar("SELECT account FROM warden.jobs WHERE args->>'seq' = '2'")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(follow_ups, ["chain"], "a discarded step's follow-up was rolled back");
    assert_clean(&db).await;
    node.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_lost_notification_only_delays_work() {
    let db = TestDb::new().await;
    let node = start(&db, config()).await;
    // Insert behind Warden's back: no NOTIFY is ever sent for this job.
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO warden.jobs (account, partition, kind, args, state, run_at, due_at, max_attempts, timeout_ms)
         VALUES ('silent', warden.partition_of('silent', 16), 'script', '{}', 'available', now(), now(), 3, 10000)
         RETURNING id",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(wait_finished(&db, id).await.state, "completed", "the enforcer's poll picks it up");
    node.shutdown().await.unwrap();
}

/// A wake-up that arrives while the account's attempt is finishing — after its
/// finish statement looked for a next job, before the actor learned the attempt was
/// done — must not be dropped, or the new job waits for the next due-work scan (here
/// an hour away). Jobs enqueued back to back on one account aim at that window again
/// and again. (The window is narrow: this run did not hit it before the actor kept
/// such wake-ups, found by reading the code, so it guards the wake path in general.)
#[tokio::test]
async fn a_wake_up_during_the_finish_of_the_previous_job_is_not_lost() {
    let db = TestDb::new().await;
    let node = start(&db, NodeConfig { enforcer_interval: Duration::from_secs(3600), ..config() }).await;
    let client = node.client();
    let mut rng = fastrand::Rng::with_seed(7);
    let mut last = 0;
    for seq in 0..300 {
        last = client
            .enqueue(script("racy", Script { seq, sleep_ms: rng.u64(0..3), ..Default::default() }))
            .await
            .unwrap()
            .id;
        tokio::time::sleep(Duration::from_micros(rng.u64(0..4000))).await;
    }
    let t = std::time::Instant::now();
    let j: warden_runtime::JobRow =
        eventually(Duration::from_secs(10), "every job ran without waiting for the poll", || async {
            // Count first, then read the last job: read the other way round, the last
            // job could complete between the two reads (seen as a flake: "running").
            let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM warden.jobs WHERE state <> 'completed'")
                .fetch_one(&db.pool)
                .await
                .unwrap();
            let j: warden_runtime::JobRow =
                sqlx::query_as("SELECT * FROM warden.jobs WHERE id = $1").bind(last).fetch_one(&db.pool).await.unwrap();
            (pending == 0).then_some(j)
        })
        .await;
    assert_eq!(j.state, "completed");
    assert!(t.elapsed() < Duration::from_secs(10));
    assert_clean(&db).await;
    node.shutdown().await.unwrap();
}

#[tokio::test]
async fn wake_ups_start_work_without_waiting_for_the_poll() {
    let db = TestDb::new().await;
    let node = start(&db, NodeConfig { enforcer_interval: Duration::from_secs(3600), ..config() }).await;
    for i in 0..20 {
        let e = node.client().enqueue(script(&format!("w{i}"), Script::default())).await.unwrap();
        let t = std::time::Instant::now();
        assert_eq!(wait_finished(&db, e.id).await.state, "completed");
        assert!(t.elapsed() < Duration::from_secs(2), "job {i} waited {:?}: NOTIFY path broken", t.elapsed());
    }
    node.shutdown().await.unwrap();
}

#[tokio::test]
async fn idle_actors_passivate_and_shutdown_releases_every_lease() {
    let db = TestDb::new().await;
    let node = start(&db, config()).await;
    assert_eq!(node.stats().partitions_held, 16);
    let jobs: Vec<NewJob> = (0..30).map(|i| script(&format!("p{i}"), Script::default())).collect();
    node.client().enqueue_many(&jobs).await.unwrap();
    eventually(WAIT, "jobs done", || async { (count_state(&db.pool, "completed").await == 30).then_some(()) }).await;
    assert!(node.stats().actors_spawned >= 30);
    eventually(WAIT, "actors passivated", || async { (node.stats().active_actors == 0).then_some(()) }).await;
    node.shutdown().await.unwrap();
    node.shutdown().await.unwrap(); // idempotent
    let held: i64 = sqlx::query_scalar("SELECT count(*) FROM warden.leases WHERE owner_node IS NOT NULL")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(held, 0, "graceful shutdown releases every lease");
}

#[tokio::test]
async fn shutdown_waits_for_running_attempts_within_the_drain_timeout() {
    let db = TestDb::new().await;
    let node = start(&db, config()).await;
    let j = node.client().enqueue(script("drain", Script { sleep_ms: 500, ..Default::default() })).await.unwrap();
    let k = node.client().enqueue(script("drain", Script { seq: 1, ..Default::default() })).await.unwrap();
    wait_running(node.client(), j.id).await;
    node.shutdown().await.unwrap();
    let row = node.client().get(j.id).await.unwrap().unwrap();
    assert_eq!(row.state, "completed", "the in-flight attempt finished during the drain");
    let next = node.client().get(k.id).await.unwrap().unwrap();
    assert_eq!((next.state.as_str(), next.attempt), ("available", 0), "nothing new started while draining");
    // A new node takes over at once (the lease was released, not left to expire).
    let t = std::time::Instant::now();
    let node2 = start(&db, config()).await;
    assert_eq!(wait_finished(&db, k.id).await.state, "completed");
    assert!(t.elapsed() < Duration::from_secs(2), "takeover after release took {:?}", t.elapsed());
    assert_clean(&db).await;
    node2.shutdown().await.unwrap();
}

/// All partitions but one (switchable): a ring that takes a partition away and
/// gives it back, as when a joining node leaves again within the drain.
#[derive(Default)]
struct AllBut(std::sync::Mutex<Option<u32>>);

impl warden_cluster::placement::Placement for AllBut {
    fn desired(&self, p: PartitionCount) -> Option<warden_cluster::placement::Assignment> {
        let mut a = warden_cluster::placement::Assignment::all(p);
        if let Some(off) = *self.0.lock().unwrap() {
            a.partitions.remove(&off);
        }
        Some(a)
    }
}

/// Regression: a partition whose handoff began was never released if the ring gave
/// it back before its drain finished. It stayed held and renewed but unusable (no
/// other node could take it, this one ran nothing in it), and the attempt the drain
/// timeout aborted stayed `running` at the same epoch, blocking its account.
#[tokio::test]
async fn a_handoff_undone_during_the_drain_does_not_stall_the_partition() {
    let db = TestDb::new().await;
    let placement = std::sync::Arc::new(AllBut::default());
    let node = builder(&db, config()).await.placement(placement.clone()).start(db.node_pool().await).await.unwrap();
    // Outlives the 2 s drain timeout, so the drain aborts it.
    let a = node.client().enqueue(script("flip", Script { sleep_ms: 3_000, ..Default::default() })).await.unwrap();
    let b = node.client().enqueue(script("flip", Script { seq: 1, ..Default::default() })).await.unwrap();
    let p = wait_running(node.client(), a.id).await.partition as u32;
    // A partition is not handed off within a renewal interval of its grant, nor
    // before placement has wanted it elsewhere for half of one (see
    // `LeaseView::settling`): let the ones granted at start settle, then wait out the
    // debounce.
    tokio::time::sleep(config().lease.renew_interval).await;
    *placement.0.lock().unwrap() = Some(p);
    let mut report = node.run_enforcer_once().await.unwrap();
    let began = std::time::Instant::now();
    while report.draining != vec![p] && began.elapsed() < Duration::from_secs(3) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        report = node.run_enforcer_once().await.unwrap();
    }
    assert_eq!(report.draining, vec![p], "the handoff began");
    tokio::time::sleep(Duration::from_millis(300)).await;
    *placement.0.lock().unwrap() = None;

    assert_eq!(wait_finished(&db, b.id).await.state, "completed", "the account's next job ran");
    let a_row = wait_finished(&db, a.id).await;
    assert_eq!((a_row.state.as_str(), a_row.attempt), ("completed", 2), "the aborted attempt was rescued and rerun");
    assert!(node.held_partitions().iter().any(|l| l.partition == p), "the partition is held again");
    assert_clean(&db).await;
    node.shutdown().await.unwrap();
}

/// Regression: an attempt's finish claims the account's next job in the same
/// statement. If the partition began draining after that claim but before the actor
/// heard of the drain, the actor stopped and left the claimed job `running`; the
/// next owner's rescue then counted an attempt that never ran, which discards a job
/// allowed one attempt. `begin_drain` without the actors' drain message holds that
/// window open.
#[tokio::test]
async fn a_job_claimed_as_its_partition_starts_draining_is_given_back_unrun() {
    let db = TestDb::new().await;
    let node = start(&db, config()).await;
    let a = node.client().enqueue(script("race", Script { sleep_ms: 500, ..Default::default() })).await.unwrap();
    let b =
        node.client().enqueue(script("race", Script { seq: 1, ..Default::default() }).max_attempts(1)).await.unwrap();
    let p = wait_running(node.client(), a.id).await.partition as u32;
    node.lease_table().begin_drain(p);

    assert_eq!(wait_finished(&db, a.id).await.state, "completed");
    let b_row = wait_finished(&db, b.id).await;
    assert_eq!((b_row.state.as_str(), b_row.attempt), ("completed", 1), "{b_row:?}");
    let rescued: i64 =
        sqlx::query_scalar("SELECT count(*) FROM warden.attempts WHERE job_id = $1 AND outcome = 'rescued'")
            .bind(b.id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(rescued, 0, "the claim was given back, not left for a rescue");
    assert_clean(&db).await;
    node.shutdown().await.unwrap();
}

#[tokio::test]
async fn node_refuses_bad_configuration() {
    let db = TestDb::new().await;
    let bad = NodeConfig { node_id: "bad\nid".into(), ..config() };
    let err = Node::builder(bad).start(db.node_pool().await).await.err().unwrap();
    assert!(err.to_string().contains("node_id contains a control character"), "{err}");
    let node = start(&db, config()).await;
    node.shutdown().await.unwrap();
    let other_p = NodeConfig { partitions: PartitionCount::new(32).unwrap(), ..config() };
    let err = Node::builder(other_p).start(db.node_pool().await).await.err().unwrap();
    assert!(err.to_string().contains("P=16"), "{err}");
    let dup = Node::builder(config()).register(Scripted).unwrap().register(Scripted);
    assert!(dup.err().unwrap().to_string().contains("already registered"));
}

#[tokio::test]
async fn a_listener_reconnect_rescans_for_work_whose_notification_was_lost() {
    let db = TestDb::new().await;
    // Polling is effectively off: only wake-ups and the post-reconnect rescan can start work.
    let node = start(&db, NodeConfig { enforcer_interval: Duration::from_secs(3600), ..config() }).await;
    tokio::time::sleep(Duration::from_millis(300)).await; // let the first scan pass
                                                          // A job whose NOTIFY is lost (inserted behind Warden's back) ...
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO warden.jobs (account, partition, kind, args, state, run_at, due_at, max_attempts, timeout_ms)
         VALUES ('lost', warden.partition_of('lost', 16), 'script', '{}', 'available', now(), now(), 3, 10000)
         RETURNING id",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(count_state(&db.pool, "available").await, 1, "nothing polls for it");
    // ... is found as soon as the listener's connection drops and comes back.
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
         WHERE datname = current_database() AND query ILIKE 'LISTEN%' AND pid <> pg_backend_pid()",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(killed >= 1, "the listener connection was found");
    assert_eq!(wait_finished(&db, id).await.state, "completed");
    // Wake-ups work again after the reconnect.
    let e = node.client().enqueue(script("after", Script::default())).await.unwrap();
    assert_eq!(wait_finished(&db, e.id).await.state, "completed");
    node.shutdown().await.unwrap();
}

/// `Client::wait_finished`: returns the finished rows in id order once every job is
/// done, times out while one is not, and names an id with no job.
#[tokio::test]
async fn a_client_waits_until_its_jobs_are_finished() {
    let db = TestDb::new().await;
    let node = start(&db, warden_tests::fast_node_config("test-node", 16)).await;
    let client = node.client().clone();
    let jobs: Vec<NewJob> = (0..6)
        .map(|i| {
            let account = format!("wait-{}", i % 3);
            if i == 5 {
                script(&account, Script { sleep_ms: 600, ..Default::default() })
            } else {
                script(&account, Script::default())
            }
        })
        .collect();
    let ids: Vec<i64> = client.enqueue_many(&jobs).await.unwrap().into_iter().map(|e| e.id).collect();
    let rows = client.wait_finished(&ids, WAIT).await.unwrap();
    assert_eq!(rows.iter().map(|r| r.id).collect::<Vec<_>>(), ids, "every job, in id order");
    assert!(rows.iter().all(|r| r.state == "completed"), "{rows:?}");
    // A job that cannot finish in time: Timeout, promptly.
    let slow = client.enqueue(script("wait-slow", Script { sleep_ms: 5_000, ..Default::default() })).await.unwrap().id;
    let t = std::time::Instant::now();
    let err = client.wait_finished(&[ids[0], slow], Duration::from_millis(300)).await.unwrap_err();
    assert!(matches!(err, warden_runtime::Error::Timeout(_)), "{err:?}");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    let err = client.wait_finished(&[ids[0], 987_654_321], WAIT).await.unwrap_err();
    assert!(matches!(err, warden_runtime::Error::JobNotFound(987_654_321)), "{err:?}");
    assert!(client.wait_finished(&[], WAIT).await.unwrap().is_empty());
    node.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------
// Embedder features: attempt hooks and the node-wide cap on running handlers.

/// Every handler that ran is seen by the hooks: one start, then one finish with the
/// outcome the attempts table records. A hook that panics breaks nothing.
#[tokio::test]
async fn hooks_see_every_attempt_start_and_finish_with_its_outcome() {
    use std::sync::{Arc, Mutex};
    use warden_runtime::{AttemptInfo, AttemptOutcome};
    let db = TestDb::new().await;
    let starts: Arc<Mutex<Vec<(i64, i32)>>> = Default::default();
    let finishes: Arc<Mutex<Vec<(i64, i32, String)>>> = Default::default();
    let (s, f) = (starts.clone(), finishes.clone());
    let node = builder(&db, config())
        .await
        .on_attempt_start(move |a: &AttemptInfo| s.lock().unwrap().push((a.job_id, a.attempt)))
        .on_attempt_start(|_| panic!("a hook's own bug"))
        .on_attempt_finish(move |a: &AttemptInfo, o: &AttemptOutcome, _took: Duration| {
            f.lock().unwrap().push((a.job_id, a.attempt, o.label().to_string()))
        })
        .on_attempt_finish(|_, _, _| panic!("another hook bug"))
        .start(db.node_pool().await)
        .await
        .unwrap();
    let c = node.client();
    let jobs = [
        c.enqueue(script("h-done", Script::default())).await.unwrap(),
        c.enqueue(script("h-retry", Script { fail_times: 1, ..Default::default() })).await.unwrap(),
        c.enqueue(script("h-exhaust", Script { fail_times: 99, ..Default::default() })).await.unwrap(),
        c.enqueue(script("h-snooze", Script { mode: "snooze_once".into(), ..Default::default() })).await.unwrap(),
        c.enqueue(script("h-discard", Script { mode: "discard".into(), ..Default::default() })).await.unwrap(),
    ];
    let mut recorded = Vec::new();
    for j in &jobs {
        wait_finished(&db, j.id).await;
        for a in c.attempts(j.id).await.unwrap() {
            recorded.push((a.job_id, a.attempt, a.outcome));
        }
    }
    recorded.sort();
    // The finish hook runs right after the outcome is committed.
    let seen = eventually(WAIT, "every finish seen by the hook", || async {
        let mut seen = finishes.lock().unwrap().clone();
        seen.sort();
        (seen.len() >= recorded.len()).then_some(seen)
    })
    .await;
    assert_eq!(seen, recorded, "the hooks saw exactly the recorded attempts and outcomes");
    let outcomes: Vec<&str> = recorded.iter().map(|r| r.2.as_str()).collect();
    for o in ["completed", "failed", "snoozed", "discarded"] {
        assert!(outcomes.contains(&o), "{o} missing from {outcomes:?}");
    }
    let mut started = starts.lock().unwrap().clone();
    started.sort();
    let finished: Vec<(i64, i32)> = seen.iter().map(|(j, a, _)| (*j, *a)).collect();
    assert_eq!(started, finished, "one start per finish");
    assert_clean(&db).await;
    node.shutdown().await.unwrap();
}

/// Counts the handlers running at once and keeps the high-water mark.
#[derive(Clone, Default)]
struct Gauge {
    now: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    max: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

struct Capped(Gauge);

#[async_trait]
impl Handler for Capped {
    type Args = u64;
    const KIND: &'static str = "capped";

    async fn run(&self, _ctx: &mut JobContext, sleep_ms: u64) -> HandlerResult {
        use std::sync::atomic::Ordering::SeqCst;
        let n = self.0.now.fetch_add(1, SeqCst) + 1;
        self.0.max.fetch_max(n, SeqCst);
        tokio::time::sleep(Duration::from_millis(sleep_ms)).await;
        self.0.now.fetch_sub(1, SeqCst);
        Ok(Outcome::Done)
    }
}

#[tokio::test]
async fn a_node_wide_cap_bounds_running_handlers_and_every_job_completes() {
    const CAP: usize = 3;
    let db = TestDb::new().await;
    let mut cfg = config();
    cfg.exec.max_concurrent_attempts = Some(CAP);
    let gauge = Gauge::default();
    let node =
        builder(&db, cfg).await.register(Capped(gauge.clone())).unwrap().start(db.node_pool().await).await.unwrap();
    let (accounts, per_account) = (24, 4);
    let jobs: Vec<NewJob> = (0..per_account)
        .flat_map(|_| (0..accounts).map(|a| NewJob::new(format!("cap-{a}"), "capped", 20u64).unwrap()))
        .collect();
    node.client().enqueue_many(&jobs).await.unwrap();
    let total = (accounts * per_account) as i64;
    eventually(Duration::from_secs(60), "all capped jobs completed", || async {
        (count_state(&db.pool, "completed").await == total).then_some(())
    })
    .await;
    let max = gauge.max.load(std::sync::atomic::Ordering::SeqCst);
    assert!(max <= CAP, "{max} handlers ran at once with a cap of {CAP}");
    assert_eq!(max, CAP, "with {accounts} busy accounts the cap is reached");
    assert_clean(&db).await;
    node.shutdown().await.unwrap();
}

/// Jobs claimed but waiting for an execution slot stop on a drain: their handlers
/// never start, the claims are given back (no attempt used), and the drain does not
/// wait for slots that will not come free.
#[tokio::test]
async fn jobs_waiting_for_an_execution_slot_are_given_back_unrun_on_drain() {
    let db = TestDb::new().await;
    let mut cfg = config();
    cfg.exec.max_concurrent_attempts = Some(1);
    let node = start(&db, cfg).await;
    let c = node.client();
    let busy =
        c.enqueue(script("slot-busy", Script { mode: "wait_cancel".into(), ..Default::default() })).await.unwrap();
    wait_running(c, busy.id).await;
    let mut waiting = Vec::new();
    for a in 0..3 {
        waiting.push(c.enqueue(script(&format!("slot-wait-{a}"), Script::default())).await.unwrap());
    }
    // Claimed (running in the database), but with no slot.
    eventually(WAIT, "the other jobs claimed", || async {
        (count_state(&db.pool, "running").await == 4).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(count_state(&db.pool, "running").await, 4, "nothing finished: the one slot is taken");
    let t = std::time::Instant::now();
    node.shutdown().await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(2), "the drain did not wait for slots: {:?}", t.elapsed());
    for j in &waiting {
        let row = c.get(j.id).await.unwrap().unwrap();
        assert_eq!((row.state.as_str(), row.attempt), ("available", 0), "given back unrun: {row:?}");
        assert!(c.attempts(j.id).await.unwrap().is_empty(), "no attempt recorded for a handler that never ran");
    }
    let row = c.get(busy.id).await.unwrap().unwrap();
    assert_eq!(row.state, "retryable", "the running handler stopped on the drain and was interrupted: {row:?}");
    let outcomes: Vec<String> = c.attempts(busy.id).await.unwrap().into_iter().map(|a| a.outcome).collect();
    assert_eq!(outcomes, ["interrupted"]);
}

/// The scaling signal: with every slot busy, `saturation()` climbs to 1 and the
/// readiness of a single node is Ready once it holds every partition; accounts
/// waiting behind the full slots show as claimed-and-waiting, the rest as runnable.
#[tokio::test]
async fn saturation_follows_busy_slots_and_readiness_follows_the_lifecycle() {
    use warden_runtime::node::NodeReadiness;
    const CAP: usize = 2;
    let db = TestDb::new().await;
    let mut cfg = config();
    cfg.exec.max_concurrent_attempts = Some(CAP);
    let gauge = Gauge::default();
    let node =
        builder(&db, cfg).await.register(Capped(gauge.clone())).unwrap().start(db.node_pool().await).await.unwrap();
    assert_eq!(node.readiness(), NodeReadiness::Ready, "a single node holds every partition once started");
    assert_eq!(node.saturation().slots, CAP);
    // Idle: nothing busy.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let idle = node.saturation();
    assert_eq!((idle.busy, idle.saturation), (0, 0.0), "{idle:?}");
    assert_eq!(idle.runnable_accounts, Some(0), "{idle:?}");
    // 8 accounts with 5 s jobs: both slots busy for seconds, 6 accounts behind them.
    let jobs: Vec<NewJob> = (0..8).map(|a| NewJob::new(format!("sat-{a}"), "capped", 5000u64).unwrap()).collect();
    node.client().enqueue_many(&jobs).await.unwrap();
    eventually(Duration::from_secs(10), "both slots busy for a while", || async {
        let s = node.saturation();
        (s.busy == CAP && s.saturation > 0.15).then_some(())
    })
    .await;
    let busy = node.saturation();
    assert!(busy.saturation <= 1.0, "{busy:?}");
    assert!(busy.cpu.is_some(), "{busy:?}");
    // The six accounts behind the two slots are claimed and waiting: they count as
    // runnable accounts waiting for a slot (at the next count, every 5 s).
    eventually(Duration::from_secs(10), "six accounts waiting for a slot", || async {
        (node.saturation().runnable_accounts == Some(6)).then_some(())
    })
    .await;
    node.shutdown().await.unwrap();
    assert_eq!(node.readiness(), NodeReadiness::Stopping);
}
