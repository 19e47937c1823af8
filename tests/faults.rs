//! The fault-injection harness (`support/soak.rs`) in CI: a short fixed-seed run of
//! random faults (kills, pauses, graceful restarts, database cuts and restarts,
//! lost and delayed database replies, terminated connections, scaling, gossip
//! partitions between node processes, spoofed NOTIFYs from an unprivileged role,
//! hostile and extreme enqueue values), and the cluster's fixed scenarios expressed
//! as a script of the same steps, each with three long jobs (15–30 s, checkpointing
//! every second) mixed into the workload. Both end with the full-history checker
//! (attempts, the handler's audit log and its outside-observer record of handler
//! runs, the long jobs' step logs and progress writes) and are
//! watched by the continuous liveness check; a violation prints the seed.

use std::time::Duration;
use warden_tests::soak::{run_soak, Schedule, SoakConfig, SoakReport, Step};

/// Run the harness on CI's small cluster workload; returns the report and its table
/// (already printed).
async fn run(seed: u64, schedule: Schedule) -> (SoakReport, String) {
    let report = run_soak(SoakConfig {
        seed,
        schedule,
        accounts: 30,
        rate: 100,
        long_jobs: 3,
        node_bin: env!("CARGO_BIN_EXE_warden-test-node").into(),
    })
    .await;
    let table = report.table();
    eprintln!("{table}");
    (report, table)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixed_seed_fault_run_keeps_the_serial_guarantee() {
    let seed = std::env::var("WARDEN_SOAK_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(20261124);
    let secs = std::env::var("WARDEN_SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    let (report, table) = run(seed, Schedule::Random { duration: Duration::from_secs(secs) }).await;
    assert!(report.is_clean(), "guarantee violated — reproduce with WARDEN_SOAK_SEED={seed}\n{table}");
    assert!(report.faults.values().sum::<u32>() >= 5, "too few faults injected:\n{table}");
    assert!(report.history.completed > 500, "too little work done:\n{table}");
    assert_eq!(report.long_enqueued.len(), 3, "every long job enqueued:\n{table}");
}

/// The fixed multi-process scenarios of the cluster issue, as one script over one
/// loaded cluster: three nodes own every partition; a fourth joins and only what the
/// ring moves is re-leased; SIGTERM drains and exits 0 in bounded time; a SIGKILLed
/// node's partitions are taken over while it is down; a node paused past its lease
/// TTL is fenced and rejoins; PostgreSQL restarts; a node cut off from the database
/// (not from its peers) self-fences; a node cut off from its peers (not from the
/// database) keeps the guarantee while the rest re-form the ring; a node whose
/// replies are lost (statements, commits included, ran; the connection is reset) or
/// late; a flood of spoofed NOTIFYs (wrong partitions, garbage, cancels of running
/// jobs) from a role with no grants; hostile values through the SQL function and the
/// Rust client (all rejected) and extreme valid ones (all accepted and finished);
/// a pause past the lease TTL while handlers of up to 200 ms run; each followed by
/// ownership settling on the running nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixed_cluster_scenarios_keep_the_serial_guarantee() {
    let n = |s: &str| s.to_string();
    let script = vec![
        Step::ExpectOwned,
        Step::Quiet { ms: 1000 },
        // Early, so that whatever it leaves behind is watched through every later step.
        Step::HostileEnqueue,
        Step::ScaleOut { check: true },
        Step::SigTermRestart { node: n("n2") },
        Step::ExpectOwned,
        Step::SigKill { node: n("n3") },
        Step::ExpectOwned,
        Step::Restart { node: n("n3") },
        Step::ExpectOwned,
        Step::SigStop { node: n("n1"), ms: 3500 },
        Step::ExpectOwned,
        Step::PgRestart { down_ms: 1500 },
        Step::ExpectOwned,
        Step::DbCut { node: n("n2"), ms: 4000 },
        Step::ExpectOwned,
        Step::GossipPartition { side: vec![n("n4")], ms: 5000 },
        Step::ExpectOwned,
        Step::GossipPartition { side: vec![n("n1"), n("n2")], ms: 4000 },
        Step::ExpectOwned,
        Step::ReplyLoss { node: n("n3"), ms: 3000, per_mille: 80 },
        Step::ExpectOwned,
        Step::ReplyDelay { node: n("n2"), ms: 3000, delay_ms: 800 },
        Step::ExpectOwned,
        Step::NotifyFlood { ms: 3000 },
        Step::SigStop { node: n("n4"), ms: 3000 },
        Step::ExpectOwned,
        Step::ScaleIn { node: n("n4") },
        Step::ExpectOwned,
    ];
    let (report, table) = run(1, Schedule::Script(script)).await;
    assert!(report.is_clean(), "a fixed scenario failed\n{table}");
    assert!(report.history.completed > 500, "too little work done:\n{table}");
}
