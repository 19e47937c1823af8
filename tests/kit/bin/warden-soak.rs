//! `warden-soak`: run the fault-injection harness for a long time with a random (or
//! given) seed. Needs `warden-test-node` next to it and root (for the private
//! PostgreSQL, run as the postgres user).
//!
//!   cargo build --release -p warden-tests --bins
//!   ./target/release/warden-soak --minutes 30 [--seed N]

use clap::Parser;
use std::time::Duration;
use warden_tests::soak::{run_soak, Schedule, SoakConfig};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 30)]
    minutes: u64,
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long, default_value_t = 40)]
    accounts: usize,
    #[arg(long, default_value_t = 100)]
    rate: u32,
    /// Long jobs (15–30 s each) mixed in over the first half of the run.
    #[arg(long, default_value_t = 6)]
    long_jobs: usize,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(|| fastrand::u64(..));
    let node_bin = std::env::current_exe().unwrap().parent().unwrap().join("warden-test-node");
    eprintln!("warden-soak: seed {seed}, {} minutes", args.minutes);
    let report = run_soak(SoakConfig {
        seed,
        schedule: Schedule::Random { duration: Duration::from_secs(args.minutes * 60) },
        accounts: args.accounts,
        rate: args.rate,
        long_jobs: args.long_jobs,
        node_bin: node_bin.to_string_lossy().into(),
    })
    .await;
    println!("{}", report.table());
    if report.is_clean() {
        std::process::ExitCode::SUCCESS
    } else {
        eprintln!("VIOLATION — reproduce with --seed {seed}");
        std::process::ExitCode::FAILURE
    }
}
