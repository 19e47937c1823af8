//! A short fixed-seed run of the fault-injection harness (`support/soak.rs`): random
//! kills, pauses, graceful restarts, database cuts and restarts, terminated
//! connections and scaling, then the full-history checker. A violation prints the seed.

use std::time::Duration;
use warden_tests::soak::{run_soak, SoakConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixed_seed_fault_run_keeps_the_serial_guarantee() {
    let seed = std::env::var("WARDEN_SOAK_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(20261124);
    let secs = std::env::var("WARDEN_SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    let report = run_soak(SoakConfig {
        seed,
        duration: Duration::from_secs(secs),
        accounts: 30,
        rate: 100,
        node_bin: env!("CARGO_BIN_EXE_warden-test-node").into(),
    })
    .await;
    let table = report.table();
    eprintln!("{table}");
    assert!(report.is_clean(), "guarantee violated — reproduce with WARDEN_SOAK_SEED={seed}\n{table}");
    assert!(report.faults.values().sum::<u32>() >= 5, "too few faults injected:\n{table}");
    assert!(report.history.completed > 500, "too little work done:\n{table}");
}
