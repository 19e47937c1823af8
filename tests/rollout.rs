//! The autoscaling and rollout harness's smoke runs (the full figures come from
//! `warden-deploy-bench`, BENCHMARKS.md): real node processes, real PostgreSQL.

use std::time::Duration;
use warden_tests::rollout::{self, pct, AutoscaleOpts, Hpa, RolloutOpts};
use warden_tests::TestDb;

const BIN: &str = env!("CARGO_BIN_EXE_warden-test-node");

fn opts(versioned: bool) -> RolloutOpts {
    RolloutOpts {
        nodes: 3,
        partitions: 256,
        accounts: 100,
        rate: 50.0,
        sleep_ms: 5,
        versioned,
        grace: Duration::from_secs(30),
        extra_args: Vec::new(),
    }
}

/// A rolling restart of 3 nodes under load (one surge node, each replaced by a new
/// generation): nothing lost, re-run, overlapping or out of order; no in-flight job
/// killed; every old node drains and exits 0 within the grace period; every
/// partition ends on the new generation.
#[tokio::test]
async fn a_rolling_restart_keeps_the_guarantee_and_kills_no_work() {
    let db = TestDb::new().await;
    let r = rollout::rollout(&db.url, &db.pool, BIN, &opts(false)).await.unwrap();
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
    assert!(!r.pauses_ms.is_empty());
}

/// The load ramp with the HPA-like controller on `warden_saturation`: 2 → 4 → 2
/// nodes, one change of direction (no flapping), scale-in kills no in-flight job.
#[tokio::test]
async fn the_autoscaler_follows_saturation_up_and_back_down_without_killing_work() {
    let db = TestDb::new().await;
    let s = |secs: u64| Duration::from_secs(secs);
    let o = AutoscaleOpts {
        partitions: 256,
        accounts: 100,
        sleep_ms: 200,
        slots: 2,
        phases: vec![(s(6), 4.0, 4.0), (s(6), 4.0, 40.0), (s(16), 40.0, 40.0), (s(6), 40.0, 4.0), (s(30), 4.0, 4.0)],
        hpa: Hpa {
            min: 2,
            max: 4,
            target: 0.6,
            tolerance: 0.1,
            period: s(2),
            up_window: s(2),
            down_window: s(10),
            max_up_step: 2,
            max_down_step: 1,
        },
        grace: s(30),
    };
    let r = rollout::autoscale(&db.url, &db.pool, BIN, &o, |st| eprintln!("{st:?}")).await.unwrap();
    assert!(r.guarantee.clean(), "{:?}", r.guarantee);
    assert_eq!(r.guarantee.killed_in_flight, 0, "{:?}", r.guarantee);
    assert_eq!((r.max_replicas, r.final_replicas), (4, 2), "{:?}", r.steps);
    assert_eq!(r.reversals, 1, "up, then down, no flapping: {:?}", r.steps);
    assert!(r.exit_codes.iter().all(|c| *c == Some(0)), "{:?}", r.exit_codes);
    assert!(r.max_db_sessions > 0);
}
