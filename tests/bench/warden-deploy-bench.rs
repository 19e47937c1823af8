//! Autoscaling and rollout benchmark (not a test): `warden-test-node` processes on
//! 127.0.0.1 against one PostgreSQL (DATABASE_URL), see `warden_tests::rollout`.
//!
//! - `rollout`: 5 nodes under a steady load, replaced one at a time with one surge
//!   node by a new generation (same version);
//! - `rollout-versioned`: the same, the new generation publishing a new version;
//! - `autoscale`: a load ramp with an HPA-like controller on `warden_saturation`,
//!   3 → 10 → 3 nodes with 4 execution slots each and 200 ms jobs.
//!
//! Prints per scenario: lost / re-run / overlapping / order violations, in-flight
//! jobs killed, per-partition pause beyond the in-flight job (p50/p99/max), moves per
//! partition, SIGTERM → exit, the controller's timeline. Exits non-zero when a
//! guarantee figure is not 0. `--smoke` runs a short version (the CI test).
//!
//!   deploy/pg.sh run sh -c 'cargo build --release -p warden-tests --bins && ./target/release/warden-deploy-bench'

use anyhow::{bail, Context};
use clap::Parser;
use warden_tests::rollout::{self, pct, AutoscaleOpts, RolloutOpts};

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    /// Scenarios (comma-separated): rollout, rollout-versioned, autoscale.
    #[arg(long, value_delimiter = ',', default_value = "rollout,autoscale")]
    only: Vec<String>,
    /// Repetitions of each rollout scenario (figures pooled).
    #[arg(long, default_value_t = 2)]
    runs: usize,
    /// A short version of every scenario (3 nodes, smaller load): the CI smoke run.
    #[arg(long)]
    smoke: bool,
    #[arg(long, env = "WARDEN_PARTITIONS", default_value_t = 1024)]
    partitions: u32,
}

fn node_bin() -> anyhow::Result<String> {
    let exe = std::env::current_exe()?;
    let bin = exe.parent().context("exe dir")?.join("warden-test-node");
    if !bin.exists() {
        bail!("{} not found: build it first (cargo build --release -p warden-tests --bins)", bin.display());
    }
    Ok(bin.to_string_lossy().into())
}

fn ms3(v: &[f64]) -> String {
    format!("{:.0} / {:.0} / {:.0} ms", pct(v, 0.5), pct(v, 0.99), pct(v, 1.0))
}

fn print_guarantee(g: &rollout::Guarantee) -> bool {
    println!(
        "| guarantee: lost / re-run / overlapping / order violations | {} / {} / {} / {} ({} jobs enqueued, {} completed) | 0 / 0 / 0 / 0 {} |",
        g.lost,
        g.reran,
        g.overlaps,
        g.order_violations,
        g.enqueued,
        g.completed,
        if g.clean() { "✔" } else { "✘" }
    );
    println!(
        "| in-flight jobs killed (attempts not completed + handler runs never ended) | {} | 0 {} |",
        g.killed_in_flight,
        if g.killed_in_flight == 0 { "✔" } else { "✘" }
    );
    g.clean() && g.killed_in_flight == 0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bin = node_bin()?;
    for o in &args.only {
        if !["rollout", "rollout-versioned", "autoscale"].contains(&o.as_str()) {
            bail!("--only: unknown scenario {o:?} (expected rollout, rollout-versioned, autoscale)");
        }
    }
    let wants = |s: &str| args.only.iter().any(|o| o == s);
    println!("warden deploy benchmark, P={}{}", args.partitions, if args.smoke { " (smoke)" } else { "" });
    println!("command: {}", std::env::args().collect::<Vec<_>>().join(" "));
    let mut ok = true;

    for (name, versioned) in [("rollout", false), ("rollout-versioned", true)] {
        if !wants(name) {
            continue;
        }
        let o = RolloutOpts::new(args.smoke, args.partitions, versioned);
        let runs = if args.smoke { 1 } else { args.runs };
        let mut all = rollout::RolloutReport::default();
        for run in 0..runs {
            let db =
                warden_tests::TestDb::create(&args.database_url, &format!("wdeploy_{}_{run}", name.replace('-', "_")))
                    .await?;
            let r = rollout::rollout(&db.url, &db.pool, &bin, &o).await?;
            let max_moves = r.moves.iter().max().copied().unwrap_or(0);
            println!(
                "  {name} run {}: {:.1} s, pause p99 {:.0} ms max {:.0} ms, moves max {max_moves}, exits {:?}, clean {}",
                run + 1,
                r.took.as_secs_f64(),
                pct(&r.pauses_ms, 0.99),
                pct(&r.pauses_ms, 1.0),
                r.exit_codes,
                r.guarantee.clean()
            );
            // A partition granted more than three times (the first grant of the
            // rollout is its first move): its grants, to see what moved it.
            if r.grants.values().any(|g| g.len() > 3) {
                let ev: Vec<String> = r.events.iter().map(|(e, t)| format!("{e}@{t}ms")).collect();
                println!("    steps: {}", ev.join(", "));
            }
            for (p, g) in r.grants.iter().filter(|(_, g)| g.len() > 3) {
                let seq: Vec<String> = g.iter().map(|(e, o, t)| format!("{e}:{o}@{t}ms")).collect();
                println!("    partition {p}: {}", seq.join(" → "));
            }
            all.pauses_ms.extend(r.pauses_ms);
            all.baseline_ms.extend(r.baseline_ms);
            all.moves.extend(r.moves);
            all.stop_times.extend(r.stop_times);
            all.exit_codes.extend(r.exit_codes);
            all.ready_times.extend(r.ready_times);
            let g = &mut all.guarantee;
            g.enqueued += r.guarantee.enqueued;
            g.completed += r.guarantee.completed;
            g.lost += r.guarantee.lost;
            g.reran += r.guarantee.reran;
            g.overlaps += r.guarantee.overlaps;
            g.order_violations += r.guarantee.order_violations;
            g.killed_in_flight += r.guarantee.killed_in_flight;
        }
        println!();
        println!(
            "### {name}: {} nodes replaced one at a time (+1 surge){}, {} jobs/s over {} accounts, {} ms jobs, {runs} run(s)",
            o.nodes,
            if versioned { ", new nodes publish a new version" } else { "" },
            o.rate,
            o.accounts,
            o.sleep_ms
        );
        println!("| figure | value | target |");
        println!("|---|---|---|");
        ok &= print_guarantee(&all.guarantee);
        let (p99, max) = (pct(&all.pauses_ms, 0.99), pct(&all.pauses_ms, 1.0));
        let pause_ok = p99 <= 1000.0 && max <= 2000.0;
        println!(
            "| per-partition pause beyond its in-flight job, p50 / p99 / max ({} partition-runs) | {} | p99 ≤ 1 s, max ≤ 2 s {} |",
            all.pauses_ms.len(),
            ms3(&all.pauses_ms),
            if pause_ok { "✔" } else { "✘" }
        );
        println!("| same, the 3 s before the rollout (baseline) | {} | |", ms3(&all.baseline_ms));
        let max_moves = all.moves.iter().max().copied().unwrap_or(0);
        let mean_moves = all.moves.iter().sum::<i64>() as f64 / all.moves.len().max(1) as f64;
        let mut hist = std::collections::BTreeMap::new();
        for m in &all.moves {
            *hist.entry(*m).or_insert(0usize) += 1;
        }
        println!(
            "| moves per partition per rollout: max / mean (histogram moves→partitions) | {max_moves} / {mean_moves:.2} ({hist:?}) | ≤ 2 {} |",
            if max_moves <= 2 { "✔" } else { "✘" }
        );
        let stops: Vec<f64> = all.stop_times.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
        let readies: Vec<f64> = all.ready_times.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
        println!(
            "| SIGTERM → exit, p50 / p99 / max | {} (exit codes {:?}) | < grace {:?}, code 0 |",
            ms3(&stops),
            all.exit_codes.iter().collect::<std::collections::BTreeSet<_>>(),
            o.grace
        );
        println!("| new node start → ready (/readyz), p50 / p99 / max | {} | |", ms3(&readies));
        ok &= all.exit_codes.iter().all(|c| *c == Some(0));
        println!();
    }

    if wants("autoscale") {
        let o = AutoscaleOpts::new(args.smoke, args.partitions);
        let db = warden_tests::TestDb::create(&args.database_url, "wdeploy_autoscale").await?;
        println!("### autoscale: {} slots per node, {} ms jobs over {} accounts; HPA target {} (tolerance {}), every {:?}, up window {:?}, down window {:?}, ≤ +{} / −{} per step, {}..{} nodes",
            o.slots, o.sleep_ms, o.accounts, o.hpa.target, o.hpa.tolerance, o.hpa.period, o.hpa.up_window, o.hpa.down_window, o.hpa.max_up_step, o.hpa.max_down_step, o.hpa.min, o.hpa.max);
        println!("  t(s)  jobs/s  saturation  runnable  nodes → desired");
        let r = rollout::autoscale(&db.url, &db.pool, &bin, &o, |st| {
            println!(
                "  {:5.1} {:7.1} {:11.2} {:9.0} {:6} → {}",
                st.at.as_secs_f64(),
                st.rate,
                st.saturation,
                st.runnable,
                st.replicas,
                st.desired
            )
        })
        .await?;
        println!("| figure | value | target |");
        println!("|---|---|---|");
        ok &= print_guarantee(&r.guarantee);
        println!(
            "| nodes: start → max → end | {} → {} → {} | {} → {} → {} {} |",
            o.hpa.min,
            r.max_replicas,
            r.final_replicas,
            o.hpa.min,
            o.hpa.max,
            o.hpa.min,
            if r.max_replicas == o.hpa.max && r.final_replicas == o.hpa.min { "✔" } else { "✘" }
        );
        println!(
            "| scale-up steps / scale-down steps / direction reversals (flapping) | {} / {} / {} | 1 reversal (up, then down) {} |",
            r.scale_ups,
            r.scale_downs,
            r.reversals,
            if r.reversals <= 1 { "✔" } else { "✘" }
        );
        let stops: Vec<f64> = r.stop_times.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
        println!(
            "| scale-in SIGTERM → exit, p50 / p99 / max | {} (exit codes {:?}) | code 0 |",
            ms3(&stops),
            r.exit_codes.iter().collect::<std::collections::BTreeSet<_>>()
        );
        println!(
            "| per-partition pause beyond its in-flight job through the run, p50 / p99 / max | {} | |",
            ms3(&r.pauses_ms)
        );
        let max_moves = r.moves.iter().max().copied().unwrap_or(0);
        println!(
            "| moves per partition, max / mean | {max_moves} / {:.2} | |",
            r.moves.iter().sum::<i64>() as f64 / r.moves.len().max(1) as f64
        );
        println!(
            "| most PostgreSQL sessions of the database at once | {} | ≤ budget (max nodes × per-node pools) |",
            r.max_db_sessions
        );
        ok &= r.exit_codes.iter().all(|c| *c == Some(0)) && r.reversals <= 1;
    }
    if !ok {
        bail!("a guarantee or exit figure is off (see ✘ above)");
    }
    Ok(())
}
