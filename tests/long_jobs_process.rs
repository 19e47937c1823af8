//! Long-running jobs on node processes (issue 15, item 5): one job of about two
//! minutes, checkpointing every second, on a cluster of `warden-test-node`
//! processes sharing one PostgreSQL, survives in turn the SIGKILL of the node running
//! it, a graceful handoff on scale-out (a new node takes its partition), a SIGTERM
//! scale-in of its node, and a SIGSTOP of its node past the lease TTL (then SIGCONT).
//!
//! After each event: the next attempt resumed from the last committed checkpoint,
//! redoing at most one checkpoint interval of steps (none after a handoff, which
//! checkpoints on its way out); no two attempts' records overlap in time (the step
//! log and the observed `warden.job_progress` writes, `long_job::trace`) nor do
//! their attempt rows (`history::check`); nothing of an earlier attempt landed after
//! a later one started; handoffs are recorded `interrupted` and give their attempt
//! back. The time from the event to the first step of the next attempt is printed;
//! the target after a crash or pause is lease TTL + 1 s, the assertion TTL + 4 s.
//! The in-process versions of these features are in `tests/long_jobs.rs`.

use std::collections::BTreeMap;
use std::time::Duration;
use warden_cluster::{PartitionCount, RingConfig};
use warden_runtime::{Client, NewJob};
use warden_tests::long_job::{self, Execution, JobTrace, LongArgs};
use warden_tests::{eventually, free_udp_port, NodeProc, TestDb};

const BIN: &str = env!("CARGO_BIN_EXE_warden-test-node");
const P: usize = 16;
/// `cluster_node_args`' lease TTL.
const TTL: Duration = Duration::from_secs(2);
/// The target from a crash or pause to the job running again elsewhere.
const TARGET: Duration = Duration::from_secs(3);
/// What is asserted (TTL + 4 s): loose enough for a loaded CI machine.
const BOUND: Duration = Duration::from_secs(6);
/// The job: 2 minutes of 250 ms steps, a checkpoint every second (4 steps).
const TOTAL: Duration = Duration::from_secs(120);
const INTERVAL: Duration = Duration::from_secs(1);
const STEP: Duration = Duration::from_millis(250);

/// Node processes gossiping on 127.0.0.1; `n1` is everyone's seed.
struct Cluster {
    url: String,
    seed: u16,
    nodes: BTreeMap<String, NodeProc>,
}

impl Cluster {
    async fn add(&mut self, id: &str) {
        let gossip = if self.nodes.is_empty() { self.seed } else { free_udp_port() };
        // The plain ring, so that the plan below can predict every move from the member
        // sets alone (the test is about the job surviving them, not about placement).
        let mut a = warden_tests::cluster_node_args(P, gossip, self.seed);
        a.extend(["--placement".to_string(), "ring".to_string()]);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        self.nodes.insert(id.to_string(), NodeProc::start(BIN, &self.url, id, &a).await);
    }
}

fn ring_owner(members: &[&str], partition: u32) -> String {
    let members: Vec<String> = members.iter().map(|m| m.to_string()).collect();
    let config = RingConfig { algorithm: 1, ..RingConfig::default() };
    let ring = warden_cluster::place(&members, PartitionCount::new(P as u32).unwrap(), &config).unwrap();
    ring.owner(partition).to_string()
}

/// The plan: an account whose partition is first on `n2` or `n3` (to SIGKILL; `n1`
/// seeds the new node's gossip), then, among the two survivors plus `n4`, on `n4`
/// (the scale-out moves it). Found by trying accounts against the ring.
struct Plan {
    account: String,
    partition: u32,
    first: String,
    survivors: Vec<String>,
    /// Owner among the survivors (after the kill, and again after the scale-in).
    second: String,
}

fn plan() -> Plan {
    let all = ["n1", "n2", "n3"];
    for i in 0.. {
        let account = format!("long-{i}");
        let partition = warden_runtime::partition_of(&account, PartitionCount::new(P as u32).unwrap());
        let first = ring_owner(&all, partition);
        if first == "n1" {
            continue;
        }
        let survivors: Vec<&str> = all.iter().copied().filter(|n| *n != first).collect();
        let mut grown = survivors.clone();
        grown.push("n4");
        if ring_owner(&grown, partition) != "n4" {
            continue;
        }
        let second = ring_owner(&survivors, partition);
        return Plan {
            account,
            partition,
            first,
            survivors: survivors.iter().map(|s| s.to_string()).collect(),
            second,
        };
    }
    unreachable!()
}

async fn db_now(pool: &sqlx::PgPool) -> chrono::DateTime<chrono::Utc> {
    sqlx::query_scalar("SELECT clock_timestamp()").fetch_one(pool).await.unwrap()
}

async fn trace(pool: &sqlx::PgPool, id: i64) -> JobTrace {
    long_job::trace_job(pool, id).await.unwrap().0
}

/// Wait until the job has begun `steps` more steps in its current attempt.
async fn wait_steps(pool: &sqlx::PgPool, id: i64, steps: i64) -> Execution {
    let attempt = trace(pool, id).await.executions.last().map(|e| (e.attempt, e.steps));
    eventually(Duration::from_secs(60), &format!("job {id}: {steps} more steps"), || async {
        let t = trace(pool, id).await;
        let e = t.executions.last()?.clone();
        let before = match attempt {
            Some((a, n)) if a == e.attempt => n,
            _ => 0,
        };
        (e.steps >= before + steps).then_some(e)
    })
    .await
}

/// Wait for an attempt after `after` to begin its first step.
async fn wait_next_attempt(pool: &sqlx::PgPool, id: i64, after: i32) -> Execution {
    eventually(Duration::from_secs(60), &format!("job {id}: an attempt after {after} running"), || async {
        let t = trace(pool, id).await;
        t.executions.into_iter().find(|e| e.attempt > after && e.first_step_at.is_some())
    })
    .await
}

async fn outcome_of(pool: &sqlx::PgPool, id: i64, attempt: i32) -> String {
    eventually(Duration::from_secs(30), &format!("job {id} attempt {attempt} recorded"), || async {
        sqlx::query_scalar("SELECT outcome FROM warden.attempts WHERE job_id = $1 AND attempt = $2")
            .bind(id)
            .bind(attempt)
            .fetch_optional(pool)
            .await
            .unwrap()
    })
    .await
}

/// One event and what followed it.
struct Figure {
    event: &'static str,
    /// From the event to the next attempt's first step.
    resumed_after: Duration,
    /// From the old attempt's last record to the next attempt's first step.
    paused: Duration,
    from: String,
    to: String,
    redone: i64,
    old_outcome: String,
}

/// The checks after each event, on the attempt that followed `old`.
async fn after_event(
    pool: &sqlx::PgPool,
    id: i64,
    event: &'static str,
    at: chrono::DateTime<chrono::Utc>,
    old: &Execution,
    args: &LongArgs,
) -> Figure {
    let next = wait_next_attempt(pool, id, old.attempt).await;
    // Let it run a little, so an overlap or a late write would show.
    wait_steps(pool, id, 4).await;
    let t = trace(pool, id).await;
    assert!(t.problems.is_empty(), "after {event}: {:#?}", t.problems);
    assert_eq!(t.delayed_rows, 0, "after {event}: step rows of an old attempt ran after the next one started");
    let old_now = t.executions.iter().find(|e| e.attempt == old.attempt).unwrap();
    let next = t.executions.iter().find(|e| e.attempt == next.attempt).unwrap();
    assert_eq!(next.resumed_from, next.last_checkpoint, "after {event}: resumed from the last committed checkpoint");
    assert!(next.redone <= args.checkpoint_every as i64, "after {event}: redid {} steps", next.redone);
    assert!(old_now.last_at < next.first_at, "after {event}: the attempts overlap");
    let first_step = next.first_step_at.unwrap();
    let figure = Figure {
        event,
        resumed_after: (first_step - at).to_std().unwrap_or_default(),
        paused: (first_step - old_now.last_at).to_std().unwrap_or_default(),
        from: old_now.node.clone(),
        to: next.node.clone(),
        redone: next.redone,
        old_outcome: outcome_of(pool, id, old.attempt).await,
    };
    eprintln!(
        "{event}: attempt {} on {} → attempt {} on {}: first step {:.2}s after the event (target TTL + 1 s = {:.1}s), \
         {:.2}s after the old attempt's last record; resumed from step {} (last checkpoint {}), {} steps redone; \
         old attempt recorded {}",
        old.attempt,
        figure.from,
        next.attempt,
        figure.to,
        figure.resumed_after.as_secs_f64(),
        TARGET.as_secs_f64(),
        figure.paused.as_secs_f64(),
        next.resumed_from,
        next.last_checkpoint,
        figure.redone,
        figure.old_outcome,
    );
    let h = warden_runtime::history::check(pool).await.unwrap();
    assert!(h.is_clean(), "after {event}: attempts overlap in warden.attempts: {h:?}");
    figure
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_minute_job_survives_sigkill_scale_out_scale_in_and_sigstop_resuming_from_its_checkpoints() {
    let db = TestDb::new().await;
    let plan = plan();
    eprintln!(
        "account {} (partition {}): on {}, after its SIGKILL on {} of {:?}, then n4, then {} again",
        plan.account, plan.partition, plan.first, plan.second, plan.survivors, plan.second
    );
    let mut c = Cluster { url: db.url.clone(), seed: free_udp_port(), nodes: BTreeMap::new() };
    for id in ["n1", "n2", "n3"] {
        c.add(id).await;
    }
    let owners = warden_tests::wait_owned_by(&db.pool, P, &["n1", "n2", "n3"], Duration::from_secs(30)).await;
    assert_eq!(owners[&(plan.partition as i32)], plan.first, "ownership follows the ring");

    let args = LongArgs::new(TOTAL, INTERVAL, STEP);
    let client = Client::connect(db.pool.clone()).await.unwrap();
    let id = client.enqueue(NewJob::new(&plan.account, long_job::KIND, &args).unwrap()).await.unwrap().id;
    let mut figures = Vec::new();

    // 1. SIGKILL of the node running it: the lease expires, a survivor rescues the
    // attempt (it counts) and runs the job from its last checkpoint.
    let running = wait_steps(&db.pool, id, 20).await;
    assert_eq!(running.node, plan.first);
    let at = db_now(&db.pool).await;
    c.nodes.remove(&plan.first).unwrap().signal(libc::SIGKILL); // dropped: reaped
    let f = after_event(&db.pool, id, "sigkill", at, &running, &args).await;
    assert_eq!(f.to, plan.second);
    assert_eq!(f.old_outcome, "rescued");
    figures.push(f);

    // 2. Scale-out: n4 joins and the ring gives it the job's partition; the running
    // attempt is told to stop, checkpoints and returns; n4 resumes right there.
    let running = wait_steps(&db.pool, id, 12).await;
    let at = db_now(&db.pool).await;
    c.add("n4").await;
    let f = after_event(&db.pool, id, "scale-out handoff", at, &running, &args).await;
    assert_eq!(f.to, "n4");
    assert_eq!(f.old_outcome, "interrupted", "a handoff does not count as an attempt");
    assert_eq!(f.redone, 0, "a handoff checkpoints on its way out: nothing redone");
    figures.push(f);

    // 3. Scale-in: SIGTERM n4; it drains (the attempt stops and checkpoints), exits 0,
    // and the partition goes back to the survivor the ring names.
    let running = wait_steps(&db.pool, id, 12).await;
    let at = db_now(&db.pool).await;
    let mut n4 = c.nodes.remove("n4").unwrap();
    n4.signal(libc::SIGTERM);
    let status = n4.wait_exit(Duration::from_secs(15)).await.expect("n4 exits after SIGTERM");
    assert!(status.success(), "graceful exit: {status}");
    let f = after_event(&db.pool, id, "sigterm scale-in", at, &running, &args).await;
    assert_eq!(f.to, plan.second);
    assert_eq!(f.old_outcome, "interrupted", "a drain does not count as an attempt");
    assert_eq!(f.redone, 0, "a drain checkpoints on its way out: nothing redone");
    figures.push(f);

    // 4. SIGSTOP its node past the lease TTL: the other survivor takes the partition
    // and resumes from the last checkpoint; after SIGCONT the paused node writes
    // nothing more for the job (its handler is never polled again, its writes are
    // fenced) and says it lost the lease.
    let running = wait_steps(&db.pool, id, 12).await;
    assert_eq!(running.node, plan.second);
    let at = db_now(&db.pool).await;
    let stopped = tokio::time::Instant::now();
    c.nodes[&plan.second].signal(libc::SIGSTOP);
    // Stopped until the job runs elsewhere, and at least TTL + 2 s.
    wait_next_attempt(&db.pool, id, running.attempt).await;
    tokio::time::sleep_until(stopped + TTL + Duration::from_secs(2)).await;
    let seen = c.nodes[&plan.second].log.lock().unwrap().len();
    c.nodes[&plan.second].signal(libc::SIGCONT);
    // Give the woken node time to do (and fail at) whatever it was about to.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let f = after_event(&db.pool, id, "sigstop past the TTL", at, &running, &args).await;
    assert_ne!(f.to, plan.second);
    assert_eq!(f.old_outcome, "rescued");
    figures.push(f);
    let woke: Vec<String> = c.nodes[&plan.second].log.lock().unwrap()[seen..].to_vec();
    assert!(
        woke.iter().any(|l| l.contains("lease lost: attempt dropped") || l.contains("self-fencing")),
        "the paused node noticed it lost the lease: {woke:#?}"
    );

    // The rest of the job runs to completion wherever the ring puts it (the woken
    // node rejoins and may take the partition back: one more handoff).
    eventually(Duration::from_secs(180), &format!("job {id} completed"), || async {
        let (_, state) = long_job::trace_job(&db.pool, id).await.unwrap();
        (state == "completed").then_some(())
    })
    .await;
    let (t, _) = long_job::trace_job(&db.pool, id).await.unwrap();
    assert!(t.problems.is_empty(), "{:#?}", t.problems);
    assert_eq!(t.delayed_rows, 0, "no step row of an old attempt ran after a later one started");
    let h = warden_runtime::history::check(&db.pool).await.unwrap();
    assert!(h.is_clean(), "{h:?}");
    assert_eq!((h.completed, h.unfinished), (1, 0), "{h:?}");
    // Handoffs gave their attempts back.
    let (max_attempts, interrupted): (i32, i64) = sqlx::query_as(
        "SELECT j.max_attempts, (SELECT count(*) FROM warden.attempts a WHERE a.job_id = j.id AND a.outcome = 'interrupted')
         FROM warden.jobs j WHERE j.id = $1",
    )
    .bind(id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        max_attempts as i64,
        long_job::MAX_ATTEMPTS as i64 + interrupted,
        "every interrupted attempt was given back"
    );

    eprintln!("| event | from → to | event → first step of the next attempt | old attempt's last record → that step | steps redone | old attempt |");
    eprintln!("|---|---|---|---|---|---|");
    for f in &figures {
        eprintln!(
            "| {} | {} → {} | {:.2} s | {:.2} s | {} | {} |",
            f.event,
            f.from,
            f.to,
            f.resumed_after.as_secs_f64(),
            f.paused.as_secs_f64(),
            f.redone,
            f.old_outcome
        );
    }
    eprintln!(
        "job {id}: {} attempts, {} steps of {} ms, checkpoint every {} steps; at most {} steps redone by a resume",
        t.executions.len(),
        args.steps,
        args.step_ms,
        args.checkpoint_every,
        t.max_redone()
    );
    // A crash, a pause, a scale-in: from the signal. A scale-out: from the old
    // attempt's stop (the event includes starting a process).
    for f in &figures {
        let took = if f.event.starts_with("scale-out") { f.paused } else { f.resumed_after };
        assert!(
            took < BOUND,
            "{}: the job ran again {took:?} after the event (target {TARGET:?}, bound {BOUND:?})",
            f.event
        );
    }
}
