//! The autoscaling and rollout harness's smoke runs (the full figures come from
//! `warden-deploy-bench`, BENCHMARKS.md): real node processes, real PostgreSQL.

use warden_tests::rollout::{self, pct, AutoscaleOpts, RolloutOpts};
use warden_tests::TestDb;

const BIN: &str = env!("CARGO_BIN_EXE_warden-test-node");

/// A rolling restart of 3 nodes under load (one surge node, each replaced by a new
/// generation): nothing lost, re-run, overlapping or out of order; no in-flight job
/// killed; every old node drains and exits 0 within the grace period; every
/// partition ends on the new generation.
#[tokio::test]
async fn a_rolling_restart_keeps_the_guarantee_and_kills_no_work() {
    let db = TestDb::new().await;
    let r = rollout::rollout(&db.url, &db.pool, BIN, &RolloutOpts::new(true, 256, false)).await.unwrap();
    eprintln!(
        "rollout: {:.1} s, pause p50/p99/max {:.0}/{:.0}/{:.0} ms, moves max {:?}, stops {:?}",
        r.took.as_secs_f64(),
        pct(&r.pauses_ms, 0.5),
        pct(&r.pauses_ms, 0.99),
        pct(&r.pauses_ms, 1.0),
        r.moves.iter().max(),
        r.stop_times
    );
    assert!(r.guarantee.clean(), "{:?}", r.guarantee);
    assert!(r.guarantee.enqueued > 0 && r.guarantee.completed == r.guarantee.enqueued as i64, "{:?}", r.guarantee);
    assert_eq!(r.guarantee.killed_in_flight, 0, "{:?}", r.guarantee);
    assert_eq!(r.exit_codes, vec![Some(0); 3]);
    assert!(r.moves.iter().all(|m| *m >= 1), "every partition left the old generation: {:?}", r.moves);
    // Sticky placement: at most twice per partition over the whole rolling restart.
    let over: Vec<_> = r.grants.iter().filter(|(_, g)| g.len() > 3).collect();
    assert!(r.moves.iter().all(|m| *m <= 2), "a partition moved more than twice: {:?}; grants {over:?}", r.moves);
    assert!(!r.pauses_ms.is_empty());
}

/// The load ramp with the HPA-like controller on `warden_saturation`: 2 → 4 → 2
/// nodes, one change of direction (no flapping), scale-in kills no in-flight job.
#[tokio::test]
async fn the_autoscaler_follows_saturation_up_and_back_down_without_killing_work() {
    let db = TestDb::new().await;
    let o = AutoscaleOpts::new(true, 256);
    let r = rollout::autoscale(&db.url, &db.pool, BIN, &o, |st| eprintln!("{st:?}")).await.unwrap();
    assert!(r.guarantee.clean(), "{:?}", r.guarantee);
    assert_eq!(r.guarantee.killed_in_flight, 0, "{:?}", r.guarantee);
    assert_eq!((r.max_replicas, r.final_replicas), (4, 2), "{:?}", r.steps);
    assert_eq!(r.reversals, 1, "up, then down, no flapping: {:?}", r.steps);
    assert!(r.exit_codes.iter().all(|c| *c == Some(0)), "{:?}", r.exit_codes);
    assert!(r.max_db_sessions > 0);
}
