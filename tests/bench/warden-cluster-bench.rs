//! Cluster benchmark (not a test): runs `warden-test-node` processes on 127.0.0.1 against
//! one PostgreSQL (DATABASE_URL) with default node settings, and prints:
//!
//! - crash failover: time from SIGKILL of one of 3 nodes until every account it owned
//!   has started an attempt on another node (database clock), p50/p99 over runs;
//! - scale-out: under a steady load below capacity, the largest wait of a job beyond
//!   its in-flight predecessor (handler start − max(enqueue, previous handler end),
//!   from the audit log) per moved partition during a graceful join of a 4th node,
//!   against unmoved partitions and the 2 s before the join;
//! - partitions moved on that join vs the ideal 1/(N+1), and max/mean balance;
//! - drain throughput of 1, 2 and 3 nodes on the same database.
//!
//! Each scenario uses a fresh database. Usage:
//!   deploy/pg.sh run cargo run --release -p warden-tests --bin warden-cluster-bench -- [--runs 5] [--partitions 4096]

use anyhow::{bail, Context};
use clap::Parser;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use warden_runtime::{Client, NewJob};
use warden_tests::rollout::pct;
use warden_tests::workload::AuditArgs;
use warden_tests::{free_udp_port as free_udp, NodeProc, TestDb};

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    /// Repetitions of the crash-failover scenario.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Accounts with continuous work during failover/scale-out.
    #[arg(long, default_value_t = 300)]
    accounts: usize,
    /// Jobs for the throughput scenario.
    #[arg(long, default_value_t = 20_000)]
    throughput_jobs: usize,
    /// Jobs per second enqueued during the scale-out scenario (steady); one set of
    /// runs per rate. On the 2-core reference machine 300/s keeps it ~40% busy and
    /// 600/s ~80% busy.
    #[arg(long, value_delimiter = ',', default_value = "300,600")]
    scaleout_rates: Vec<u32>,
    /// Repetitions of the scale-out scenario (its pauses are pooled).
    #[arg(long, default_value_t = 3)]
    scaleout_runs: usize,
    /// Run only these scenarios (comma-separated: failover, scale-out, throughput).
    #[arg(long, value_delimiter = ',', default_value = "failover,scale-out,throughput")]
    only: Vec<String>,
    /// Partition count P of the benchmark's clusters (passed to every node).
    #[arg(long, env = "WARDEN_PARTITIONS", default_value_t = 1024)]
    partitions: u32,
}

/// P, set once from `--partitions` at start.
static PARTITIONS: std::sync::OnceLock<u32> = std::sync::OnceLock::new();

fn partitions() -> u32 {
    *PARTITIONS.get().unwrap_or(&1024)
}

/// The node binary: `warden-test-node` (the production host with the audit workload),
/// next to this benchmark.
fn node_bin() -> anyhow::Result<String> {
    let exe = std::env::current_exe()?;
    let bin = exe.parent().context("exe dir")?.join("warden-test-node");
    if !bin.exists() {
        bail!("{} not found: build it first (cargo build --release -p warden-tests --bins)", bin.display());
    }
    Ok(bin.to_string_lossy().into())
}

/// Start a cluster member (node logs: `NODE_LOG`, `NODE_LOG_DIR`; see the kit).
async fn start_node(url: &str, id: &str, gossip: u16, seed: u16) -> anyhow::Result<NodeProc> {
    let p = partitions().to_string();
    let (listen, seeds) = (format!("127.0.0.1:{gossip}"), format!("127.0.0.1:{seed}"));
    NodeProc::spawn(&node_bin()?, url, id, &["--partitions", &p, "--gossip-listen", &listen, "--seeds", &seeds]).await
}

async fn fresh_db(admin: &str, name: &str) -> anyhow::Result<(String, sqlx::PgPool)> {
    let db = TestDb::create(admin, &format!("wbench_{name}")).await?;
    Ok((db.url, db.pool))
}

async fn owners(pool: &sqlx::PgPool) -> anyhow::Result<BTreeMap<i32, String>> {
    let rows: Vec<(i32, String)> = sqlx::query_as(
        "SELECT partition, split_part(owner_node, '/', 1) FROM warden.leases
         WHERE owner_node IS NOT NULL AND lease_expires_at > now()",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().collect())
}

/// Wait until every partition is owned by exactly `n` nodes and nothing changed for 1s.
async fn wait_stable(pool: &sqlx::PgPool, n: usize) -> anyhow::Result<BTreeMap<i32, String>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = BTreeMap::new();
    let mut since = Instant::now();
    loop {
        let o = owners(pool).await?;
        let distinct: std::collections::BTreeSet<&String> = o.values().collect();
        let complete = o.len() == partitions() as usize && distinct.len() == n;
        if o != last || !complete {
            last = o;
            since = Instant::now();
        } else if since.elapsed() > Duration::from_secs(1) {
            return Ok(last);
        }
        if Instant::now() > deadline {
            bail!("ownership did not settle on {n} nodes");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Continuous per-account work: `per_account` jobs of `sleep_ms` each.
async fn load(client: &Client, accounts: usize, per_account: i64, sleep_ms: u64) -> anyhow::Result<()> {
    let mut batch = Vec::new();
    for seq in 0..per_account {
        for a in 0..accounts {
            batch.push(NewJob::new(
                format!("acct-{a}"),
                "audit",
                AuditArgs { seq, sleep_ms, fail_times: 0, ..Default::default() },
            )?);
            if batch.len() == 5000 {
                client.enqueue_many(&batch).await?;
                batch.clear();
            }
        }
    }
    client.enqueue_many(&batch).await?;
    Ok(())
}

async fn cluster(url: &str, n: usize) -> anyhow::Result<Vec<NodeProc>> {
    let seed = free_udp();
    let mut nodes = Vec::new();
    for i in 0..n {
        let gossip = if i == 0 { seed } else { free_udp() };
        nodes.push(start_node(url, &format!("n{}", i + 1), gossip, seed).await?);
    }
    Ok(nodes)
}

async fn failover_run(args: &Args, run: usize) -> anyhow::Result<f64> {
    let (url, pool) = fresh_db(&args.database_url, &format!("failover{run}")).await?;
    let nodes = cluster(&url, 3).await?;
    let before = wait_stable(&pool, 3).await?;
    let client = Client::connect(pool.clone()).await?;
    load(&client, args.accounts, 200, 5).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let victim = &nodes[2];
    let victim_parts: Vec<i32> = before.iter().filter(|(_, o)| **o == victim.node_id).map(|(p, _)| *p).collect();
    // Accounts owned by the victim that still have work.
    let accounts: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT account FROM warden.jobs WHERE partition = ANY($1) AND state <> 'completed'",
    )
    .bind(&victim_parts)
    .fetch_all(&pool)
    .await?;
    let mut nodes = nodes;
    let victim = nodes.pop().unwrap();
    let killed_at: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT clock_timestamp()").fetch_one(&pool).await?;
    victim.signal(libc::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let resumed: i64 = sqlx::query_scalar(
            "SELECT count(DISTINCT account) FROM warden.jobs
             WHERE account = ANY($1) AND attempted_at > $2 AND node NOT LIKE $3",
        )
        .bind(&accounts)
        .bind(killed_at)
        .bind(format!("{}/%", victim.node_id))
        .fetch_one(&pool)
        .await?;
        if resumed as usize == accounts.len() {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {resumed}/{} accounts resumed after 60s", accounts.len());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Attempt rows are written at finish; fall back to the claim time on the job row.
    let first_claims: Option<chrono::DateTime<chrono::Utc>> = sqlx::query_scalar(
        "SELECT max(first) FROM (
            SELECT account, min(t) AS first FROM (
                SELECT account, started_at AS t FROM warden.attempts WHERE account = ANY($1) AND started_at > $2 AND node NOT LIKE $3
                UNION ALL
                SELECT account, attempted_at FROM warden.jobs WHERE account = ANY($1) AND attempted_at > $2 AND node NOT LIKE $3) x
            GROUP BY account) f",
    )
    .bind(&accounts)
    .bind(killed_at)
    .bind(format!("{}/%", victim.node_id))
    .fetch_one(&pool)
    .await?;
    let resumed_at = first_claims.context("no attempt after the kill")?;
    drop(nodes);
    Ok((resumed_at - killed_at).num_milliseconds() as f64 / 1000.0)
}

struct ScaleOut {
    moved: usize,
    ideal: f64,
    balance_before: f64,
    balance_after: f64,
    moved_pause_ms: Vec<f64>,
    unmoved_gap_ms: Vec<f64>,
    /// The same per-partition wait in the 2 s before the join.
    baseline_ms: Vec<f64>,
}

async fn scale_out(args: &Args, rate: u32, run: usize) -> anyhow::Result<ScaleOut> {
    let (url, pool) = fresh_db(&args.database_url, &format!("scaleout{rate}_{run}")).await?;
    let seed = free_udp();
    let mut nodes = Vec::new();
    for i in 0..3 {
        let gossip = if i == 0 { seed } else { free_udp() };
        nodes.push(start_node(&url, &format!("n{}", i + 1), gossip, seed).await?);
    }
    let before = wait_stable(&pool, 3).await?;
    let client = Client::connect(pool.clone()).await?;
    // Steady load below capacity: every account gets a 5 ms job at a fixed rate, so a
    // job's wait measures scheduling and handoff, not a saturated machine's queue.
    let stop = tokio_util::sync::CancellationToken::new();
    let producer = tokio::spawn(steady_load(client.clone(), args.accounts, rate, stop.clone()));
    // Past the start-up burst (every account's first actor) before measuring.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let join_at: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT clock_timestamp()").fetch_one(&pool).await?;
    nodes.push(start_node(&url, "n4", free_udp(), seed).await?);
    let after = wait_stable(&pool, 4).await?;
    let settled_at: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT clock_timestamp()").fetch_one(&pool).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    producer.await??;
    // Let every enqueued job finish before reading the history.
    let deadline = Instant::now() + Duration::from_secs(60);
    while sqlx::query_scalar::<_, i64>("SELECT count(*) FROM warden.jobs WHERE state <> 'completed'")
        .fetch_one(&pool)
        .await?
        > 0
    {
        if Instant::now() > deadline {
            bail!("scale-out: jobs still unfinished 60 s after the load stopped");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let moved_parts: Vec<i32> = before.keys().filter(|p| before[p] != after[p]).copied().collect();
    let balance = |o: &BTreeMap<i32, String>| {
        let mut per: BTreeMap<&str, usize> = BTreeMap::new();
        for v in o.values() {
            *per.entry(v).or_default() += 1;
        }
        *per.values().max().unwrap() as f64 / (partitions() as f64 / per.len() as f64)
    };
    // A job's wait beyond its in-flight predecessor: handler start (audit row,
    // database clock) minus the later of its enqueue and the previous job's handler
    // end. Per partition, the largest wait of a job enqueued in the join window.
    let waits = |from: chrono::DateTime<chrono::Utc>, to: chrono::DateTime<chrono::Utc>| {
        let pool = pool.clone();
        async move {
            sqlx::query_as::<_, (i32, f64)>(
                "WITH a AS (
                    SELECT j.partition, j.created_at, w.started_at,
                           lag(w.ended_at) OVER (PARTITION BY w.account ORDER BY w.seq) AS prev_end
                    FROM workload_audit w JOIN warden.jobs j ON j.id = w.job_id WHERE w.attempt = 1)
                 SELECT partition, max(EXTRACT(EPOCH FROM started_at - greatest(created_at, coalesce(prev_end, created_at))) * 1000)::float8
                 FROM a WHERE created_at BETWEEN $1 AND $2 GROUP BY partition",
            )
            .bind(from)
            .bind(to)
            .fetch_all(&pool)
            .await
        }
    };
    let (mut moved_pause_ms, mut unmoved_gap_ms) = (Vec::new(), Vec::new());
    for (p, g) in waits(join_at, settled_at).await? {
        if moved_parts.contains(&p) {
            moved_pause_ms.push(g);
        } else {
            unmoved_gap_ms.push(g);
        }
    }
    let baseline_ms: Vec<f64> =
        waits(join_at - chrono::Duration::seconds(2), join_at).await?.into_iter().map(|(_, g)| g).collect();
    drop(nodes);
    Ok(ScaleOut {
        moved: moved_parts.len(),
        ideal: partitions() as f64 / 4.0,
        balance_before: balance(&before),
        balance_after: balance(&after),
        moved_pause_ms,
        unmoved_gap_ms,
        baseline_ms,
    })
}

/// Enqueue `rate` jobs/s round-robin over `accounts` (5 ms each, per-account
/// sequence numbers) until `stop`.
async fn steady_load(
    client: Client,
    accounts: usize,
    rate: u32,
    stop: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let mut seqs = vec![0i64; accounts];
    let mut next = 0usize;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let per_tick = (rate as usize / 50).max(1);
    while !stop.is_cancelled() {
        tick.tick().await;
        let mut batch = Vec::with_capacity(per_tick);
        for _ in 0..per_tick {
            let a = next % accounts;
            next += 1;
            batch.push(NewJob::new(
                format!("acct-{a}"),
                "audit",
                AuditArgs { seq: seqs[a], sleep_ms: 5, fail_times: 0, ..Default::default() },
            )?);
            seqs[a] += 1;
        }
        client.enqueue_many(&batch).await?;
    }
    Ok(())
}

async fn throughput(args: &Args, n: usize) -> anyhow::Result<f64> {
    let (url, pool) = fresh_db(&args.database_url, &format!("tput{n}")).await?;
    // Start the nodes first (this creates the schema), then enqueue and time the drain.
    let nodes = cluster(&url, n).await?;
    wait_stable(&pool, n).await?;
    let client = Client::connect(pool.clone()).await?;
    let accounts = 200;
    let per = (args.throughput_jobs / accounts) as i64;
    // Enqueue while holding back the nodes is not possible across processes; instead
    // measure from the first to the last completion of a pre-enqueued burst.
    load(&client, accounts, per, 0).await?;
    let total = (accounts as i64) * per;
    let t0 = Instant::now();
    loop {
        // Probe the open-jobs partial index: a count over 20,000 rows every 20 ms would
        // take PostgreSQL CPU from the nodes being measured.
        let open: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM warden.jobs WHERE state IN ('scheduled', 'available', 'retryable', 'running'))",
        )
        .fetch_one(&pool)
        .await?;
        if !open {
            let done: i64 = sqlx::query_scalar("SELECT count(*) FROM warden.jobs WHERE state = 'completed'")
                .fetch_one(&pool)
                .await?;
            if done != total {
                bail!("throughput run: {done} of {total} jobs completed, the rest were not");
            }
            break;
        }
        if t0.elapsed() > Duration::from_secs(300) {
            bail!("throughput run did not finish");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (first, last): (chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>) =
        sqlx::query_as("SELECT min(started_at), max(finished_at) FROM warden.attempts").fetch_one(&pool).await?;
    drop(nodes);
    Ok(total as f64 / ((last - first).num_milliseconds() as f64 / 1000.0))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    node_bin()?;
    if warden_runtime::PartitionCount::new(args.partitions).is_err() {
        bail!("--partitions must be 1..={}, got {}", warden_runtime::PartitionCount::MAX, args.partitions);
    }
    let _ = PARTITIONS.set(args.partitions);
    println!(
        "warden cluster benchmark — default node settings (lease TTL 4s, gossip 100ms, settle 500ms), P={}",
        args.partitions
    );
    println!("command: {}", std::env::args().collect::<Vec<_>>().join(" "));

    let wants = |s: &str| args.only.iter().any(|o| o == s);
    for o in &args.only {
        if !["failover", "scale-out", "throughput"].contains(&o.as_str()) {
            bail!("--only: unknown scenario {o:?} (expected failover, scale-out, throughput)");
        }
    }

    let mut failovers = Vec::new();
    if wants("failover") {
        for run in 0..args.runs {
            let s = failover_run(&args, run).await?;
            println!("  failover run {}: {:.2}s", run + 1, s);
            failovers.push(s);
        }
    }

    let mut scale_outs: Vec<(u32, Vec<ScaleOut>)> = Vec::new();
    if wants("scale-out") {
        for &rate in &args.scaleout_rates {
            let mut runs = Vec::new();
            for run in 0..args.scaleout_runs {
                let so = scale_out(&args, rate, run).await?;
                let mp = so.moved_pause_ms.clone();
                println!(
                    "  scale-out at {rate} jobs/s, run {}: {} moved, moved-partition wait p50 {:.0} ms, max {:.0} ms",
                    run + 1,
                    so.moved,
                    pct(&mp, 0.5),
                    pct(&mp, 1.0)
                );
                runs.push(so);
            }
            scale_outs.push((rate, runs));
        }
    }

    let mut tput = Vec::new();
    if wants("throughput") {
        for n in 1..=3 {
            tput.push((n, throughput(&args, n).await?));
        }
    }

    println!();
    println!("| figure | value | target |");
    println!("|---|---|---|");
    if !failovers.is_empty() {
        let (p50, p99, max) = (pct(&failovers, 0.5), pct(&failovers, 0.99), pct(&failovers, 1.0));
        println!("| crash failover (SIGKILL 1 of 3), p50 / p99 / max over {} runs | {p50:.2}s / {p99:.2}s / {max:.2}s | p99 ≤ 5s |", args.runs);
    }
    for (rate, runs) in &scale_outs {
        let pooled =
            |f: fn(&ScaleOut) -> &Vec<f64>| -> Vec<f64> { runs.iter().flat_map(|s| f(s).iter().copied()).collect() };
        let fmt = |v: Vec<f64>| format!("{:.0} / {:.0} / {:.0} ms", pct(&v, 0.5), pct(&v, 0.99), pct(&v, 1.0));
        let mp = pooled(|s| &s.moved_pause_ms);
        println!(
            "| scale-out 3→4 at {rate} jobs/s: moved partitions, largest wait of a job beyond its in-flight predecessor, p50 / p99 / max | {} ({} partitions with jobs in the window, {} runs) | ≤ 250 ms |",
            fmt(mp.clone()), mp.len(), runs.len()
        );
        println!("| same, unmoved partitions | {} | no pause |", fmt(pooled(|s| &s.unmoved_gap_ms)));
        println!(
            "| same, every partition in the 2 s before the join (baseline) | {} | |",
            fmt(pooled(|s| &s.baseline_ms))
        );
        // Node ids are the same in every run, so placement is too: print it once.
        if let Some(so) = runs.first() {
            println!(
                "| partitions moved on join vs ideal P/(N+1) | {} vs {:.0} ({:.2}×) | ≤ 1.3× |",
                so.moved,
                so.ideal,
                so.moved as f64 / so.ideal
            );
            println!(
                "| max/mean partitions per node, 3 → 4 nodes | {:.3} → {:.3} | ≤ 1.05 |",
                so.balance_before, so.balance_after
            );
        }
    }
    for (n, t) in &tput {
        println!(
            "| drain throughput, {n} node(s), {} jobs over 200 accounts | {t:.0} jobs/s ({:.2}× 1 node) | |",
            args.throughput_jobs,
            t / tput[0].1
        );
    }
    Ok(())
}
