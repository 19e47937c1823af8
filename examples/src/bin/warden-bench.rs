//! Single-node benchmark (not a test). In one run, on the database server named by
//! DATABASE_URL (a fresh database per phase), it measures:
//!
//! - (a) baseline: a queue-style serial claim in plain SQL — pick any idle account
//!   with `FOR UPDATE SKIP LOCKED`, claim its oldest job, complete it, insert one
//!   attempt row (one plpgsql call per job, W workers on dedicated connections);
//! - (b) baseline: the hand-written limit of our design — one fenced statement per job
//!   that completes the current job, records its attempt and claims the same
//!   account's next job (Warden's own `Store::finish`), W workers each driving a
//!   disjoint set of accounts on dedicated connections;
//! - Warden: a node draining the same 10,000 pre-enqueued serial jobs over 200 accounts
//!   with a no-op handler;
//! - enqueue→start latency at a steady rate (database clock: attempt start − job created).
//!
//! Usage: deploy/pg.sh run cargo run --release -p warden-examples --bin warden-bench

use anyhow::{bail, Context};
use clap::Parser;
use std::sync::Arc;
use std::time::{Duration, Instant};
use warden_runtime::store::{self, Fence, Finish, PgStore, Store, StoreConfig};
use warden_runtime::{async_trait, Client, Handler, HandlerResult, JobContext, NewJob, Node, NodeConfig, Outcome, PartitionCount};

#[derive(Parser, Debug)]
#[command(name = "warden-bench")]
struct Args {
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    #[arg(long, default_value_t = 200)]
    accounts: usize,
    #[arg(long, default_value_t = 50)]
    jobs_per_account: usize,
    /// Seconds of steady enqueueing for the latency phase.
    #[arg(long, default_value_t = 10)]
    latency_seconds: u64,
    /// Enqueue rate for the latency phase (jobs/s).
    #[arg(long, default_value_t = 200)]
    rate: u64,
    /// Worker counts tried for the baselines (the best is reported).
    #[arg(long, value_delimiter = ',', default_value = "4,8,16")]
    workers: Vec<usize>,
    /// Executor connections of the Warden node (8 is best on this 2-core box with
    /// PostgreSQL on the same cores; the node's own default is 16).
    #[arg(long, default_value_t = 8)]
    node_connections: u32,
    /// Also print one JSON line with every figure.
    #[arg(long)]
    json: bool,
}

struct Noop;

#[async_trait]
impl Handler for Noop {
    type Args = serde_json::Value;
    const KIND: &'static str = "noop";
    async fn run(&self, _ctx: &mut JobContext, _args: serde_json::Value) -> HandlerResult {
        Ok(Outcome::Done)
    }
}

const P: u32 = 1024;

async fn fresh_db(admin: &str, name: &str) -> anyhow::Result<String> {
    let admin_pool = sqlx::postgres::PgPoolOptions::new().max_connections(1).connect(admin).await?;
    let db = format!("wbench_{name}_{}", std::process::id());
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {db}"))).execute(&admin_pool).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}"))).execute(&admin_pool).await?;
    let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(admin);
    Ok(format!("{base}/{db}"))
}

async fn drop_db(admin: &str, url: &str) {
    if let Ok(pool) = sqlx::postgres::PgPoolOptions::new().max_connections(1).connect(admin).await {
        let db = url.rsplit('/').next().unwrap_or_default();
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))).execute(&pool).await;
    }
}

/// Schema + the 10,000 jobs, enqueued account by account.
async fn prepare(url: &str, args: &Args) -> anyhow::Result<sqlx::PgPool> {
    let pool = store::connect(url, &StoreConfig { max_connections: 32, ..Default::default() }).await?;
    store::migrate(&pool).await?;
    store::init_partitions(&pool, PartitionCount::new(P).unwrap()).await?;
    let client = Client::connect(pool.clone()).await?;
    for a in 0..args.accounts {
        let jobs: Vec<NewJob> = (0..args.jobs_per_account)
            .map(|i| NewJob::new(format!("account-{a}"), "noop", serde_json::json!({ "i": i })).unwrap())
            .collect();
        client.enqueue_many(&jobs).await?;
    }
    Ok(pool)
}

async fn completed(pool: &sqlx::PgPool) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM warden.jobs WHERE state = 'completed'").fetch_one(pool).await?)
}

/// Baseline (a): queue-style serial claim, one plpgsql call per job.
async fn baseline_a(args: &Args, workers: usize) -> anyhow::Result<f64> {
    let url = fresh_db(&args.database_url, "a").await?;
    let pool = prepare(&url, args).await?;
    sqlx::raw_sql(
        "CREATE TABLE bench_accounts (account text PRIMARY KEY);
         INSERT INTO bench_accounts SELECT DISTINCT account FROM warden.jobs;
         CREATE FUNCTION bench_queue_step() RETURNS integer LANGUAGE plpgsql AS $$
         DECLARE v_account text; v_job bigint; v_started timestamptz := clock_timestamp();
         BEGIN
             -- Any idle account (its row lock is the per-account mutex) that has work.
             SELECT a.account INTO v_account FROM bench_accounts a
             WHERE EXISTS (SELECT 1 FROM warden.jobs j WHERE j.account = a.account AND j.state = 'available')
             LIMIT 1 FOR UPDATE SKIP LOCKED;
             IF v_account IS NULL THEN RETURN 0; END IF;
             SELECT id INTO v_job FROM warden.jobs WHERE account = v_account AND state = 'available'
             ORDER BY run_at, id LIMIT 1;
             UPDATE warden.jobs SET state = 'completed', attempt = attempt + 1, attempted_at = v_started,
                    finished_at = clock_timestamp() WHERE id = v_job;
             INSERT INTO warden.attempts (job_id, account, partition, attempt, node, epoch, started_at, finished_at, outcome)
             SELECT id, account, partition, attempt, 'baseline-a', 0, v_started, clock_timestamp(), 'completed'
             FROM warden.jobs WHERE id = v_job;
             RETURN 1;
         END $$;",
    )
    .execute(&pool)
    .await?;
    let total = (args.accounts * args.jobs_per_account) as i64;
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let mut conn = pool.acquire().await?.detach();
        tasks.push(tokio::spawn(async move {
            let mut idle_rounds = 0;
            loop {
                let n: i32 = sqlx::query_scalar("SELECT bench_queue_step()").fetch_one(&mut conn).await?;
                if n == 0 {
                    // Nothing claimable right now (all remaining accounts busy) or done.
                    idle_rounds += 1;
                    if idle_rounds > 50 {
                        return anyhow::Ok(());
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                } else {
                    idle_rounds = 0;
                }
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    let secs = t0.elapsed().as_secs_f64();
    let done = completed(&pool).await?;
    if done != total {
        bail!("baseline (a) completed {done}/{total}");
    }
    pool.close().await;
    drop_db(&args.database_url, &url).await;
    Ok(total as f64 / secs)
}

/// Baseline (b): Warden's one-statement fenced finish-and-claim-next, hand-driven.
async fn baseline_b(args: &Args, workers: usize) -> anyhow::Result<f64> {
    let url = fresh_db(&args.database_url, "b").await?;
    let pool = prepare(&url, args).await?;
    let parts = PartitionCount::new(P).unwrap();
    let owner: Arc<str> = "bench/1".into();
    let granted = PgStore::new(pool.clone(), parts).acquire(&owner, &(0..P).collect::<Vec<_>>(), Duration::from_secs(600)).await?;
    let epochs: std::collections::HashMap<u32, i64> = granted.iter().map(|g| (g.partition, g.epoch)).collect();
    let total = (args.accounts * args.jobs_per_account) as i64;
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..workers {
        // One dedicated connection per worker: a pool of one.
        let wpool = store::connect(&url, &StoreConfig { max_connections: 1, ..Default::default() }).await?;
        let s = PgStore::new(wpool, parts);
        let accounts: Vec<String> = (0..args.accounts).filter(|a| a % workers == w).map(|a| format!("account-{a}")).collect();
        let (owner, epochs) = (owner.clone(), epochs.clone());
        tasks.push(tokio::spawn(async move {
            let fence = |account: &str| {
                let p = warden_runtime::partition_of(account, parts);
                Fence { partition: p, epoch: epochs[&p], owner: owner.clone() }
            };
            let mut current = Vec::new();
            for a in &accounts {
                if let Some(j) = s.claim(a, &fence(a)).await? {
                    current.push(j);
                }
            }
            // Round-robin: finish one account's job, claiming its next, in one statement.
            while !current.is_empty() {
                let mut next_round = Vec::with_capacity(current.len());
                for job in current {
                    if let Some(next) = s.finish(None, &job, &fence(&job.account), &Finish::Completed, true).await? {
                        next_round.push(next);
                    }
                }
                current = next_round;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let secs = t0.elapsed().as_secs_f64();
    let done = completed(&pool).await?;
    if done != total {
        bail!("baseline (b) completed {done}/{total}");
    }
    pool.close().await;
    drop_db(&args.database_url, &url).await;
    Ok(total as f64 / secs)
}

fn node_config() -> NodeConfig {
    NodeConfig { node_id: "bench-node".into(), partitions: PartitionCount::new(P).unwrap(), ..Default::default() }
}

/// Warden: a node drains the pre-enqueued jobs.
async fn warden_drain(args: &Args) -> anyhow::Result<(f64, warden_runtime::history::HistoryReport)> {
    let url = fresh_db(&args.database_url, "warden").await?;
    let pool = prepare(&url, args).await?;
    let total = (args.accounts * args.jobs_per_account) as i64;
    let node_pool = store::connect(&url, &StoreConfig { max_connections: args.node_connections, ..Default::default() }).await?;
    let t0 = Instant::now();
    let node = Node::builder(node_config()).register(Noop)?.start(node_pool).await?;
    loop {
        if completed(&pool).await? == total {
            break;
        }
        if t0.elapsed() > Duration::from_secs(300) {
            bail!("warden drain did not finish");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    node.shutdown().await?;
    let h = warden_runtime::history::check(&pool).await?;
    pool.close().await;
    drop_db(&args.database_url, &url).await;
    Ok((total as f64 / secs, h))
}

struct Latency {
    samples: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

/// Enqueue→start latency at a steady rate, from the database clock.
async fn latency(args: &Args) -> anyhow::Result<Latency> {
    let url = fresh_db(&args.database_url, "latency").await?;
    let pool = store::connect(&url, &StoreConfig { max_connections: 8, ..Default::default() }).await?;
    let node_pool = store::connect(&url, &StoreConfig { max_connections: args.node_connections, ..Default::default() }).await?;
    let node = Node::builder(node_config()).register(Noop)?.start(node_pool).await?;
    let client = Client::connect(pool.clone()).await?;
    let period = Duration::from_nanos(1_000_000_000 / args.rate.max(1));
    let n = (args.rate * args.latency_seconds) as usize;
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = chrono::Utc::now();
    for i in 0..n {
        tick.tick().await;
        let c = client.clone();
        let account = format!("account-{}", i % args.accounts);
        // Each enqueue is its own call and transaction, as a product would send them.
        tokio::spawn(async move { c.enqueue(NewJob::new(account, "noop", serde_json::json!({ "i": i })).unwrap()).await });
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while completed(&pool).await? < n as i64 {
        if Instant::now() > deadline {
            bail!("latency phase did not complete");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    node.shutdown().await?;
    let mut lat: Vec<f64> = sqlx::query_scalar(
        "SELECT (EXTRACT(EPOCH FROM (a.started_at - j.created_at)) * 1000)::float8
         FROM warden.attempts a JOIN warden.jobs j ON j.id = a.job_id
         WHERE j.created_at > $1 + interval '1 second'",
    )
    .bind(started)
    .fetch_all(&pool)
    .await?;
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let q = |f: f64| lat[((lat.len() - 1) as f64 * f).round() as usize];
    let out = Latency { samples: lat.len(), p50_ms: q(0.5), p99_ms: q(0.99), max_ms: q(1.0) };
    pool.close().await;
    drop_db(&args.database_url, &url).await;
    Ok(out)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let total = args.accounts * args.jobs_per_account;
    println!("warden-bench: {total} serial jobs over {} accounts (enqueued account by account), P={P}", args.accounts);
    println!("command: {}", std::env::args().collect::<Vec<_>>().join(" "));

    let mut best_a = (0, 0.0);
    for &w in &args.workers {
        let r = baseline_a(&args, w).await.context("baseline (a)")?;
        println!("  (a) queue-style claim, {w:>2} workers: {r:>8.0} jobs/s");
        if r > best_a.1 {
            best_a = (w, r);
        }
    }
    let mut best_b = (0, 0.0);
    for &w in &args.workers {
        let r = baseline_b(&args, w).await.context("baseline (b)")?;
        println!("  (b) one-statement limit, {w:>2} workers: {r:>8.0} jobs/s");
        if r > best_b.1 {
            best_b = (w, r);
        }
    }
    let (warden, h) = warden_drain(&args).await?;
    println!("  warden node ({} executor connections): {warden:>8.0} jobs/s", args.node_connections);
    let lat = latency(&args).await?;

    let mark = |ok: bool| if ok { "PASS" } else { "MISS" };
    println!();
    println!("| figure | value | target |");
    println!("|---|---|---|");
    println!("| (a) queue-style serial claim, best of {:?} workers | {:.0} jobs/s ({} workers) | |", args.workers, best_a.1, best_a.0);
    println!("| (b) one fenced statement per job, best of {:?} workers | {:.0} jobs/s ({} workers) | |", args.workers, best_b.1, best_b.0);
    println!("| Warden drain | {warden:.0} jobs/s | |");
    println!("| Warden / (a) | {:.2}× | |", warden / best_a.1);
    println!("| Warden / (b) | {:.2}× | ≥ 0.8× {} |", warden / best_b.1, mark(warden / best_b.1 >= 0.8));
    println!("| enqueue→start p50 at {} jobs/s ({} samples) | {:.2} ms | ≤ 2 ms {} |", args.rate, lat.samples, lat.p50_ms, mark(lat.p50_ms <= 2.0));
    println!("| enqueue→start p99 | {:.2} ms | ≤ 5 ms {} |", lat.p99_ms, mark(lat.p99_ms <= 5.0));
    println!("| enqueue→start max | {:.2} ms | |", lat.max_ms);
    println!("| overlaps / order violations / re-runs in the Warden drain | {} / {} / {} | 0 |", h.overlaps, h.order_violations, h.reruns_after_completion + h.double_completions);
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "baseline_a_jobs_per_s": best_a.1, "baseline_a_workers": best_a.0,
                "baseline_b_jobs_per_s": best_b.1, "baseline_b_workers": best_b.0,
                "warden_jobs_per_s": warden, "ratio_a": warden / best_a.1, "ratio_b": warden / best_b.1,
                "latency_p50_ms": lat.p50_ms, "latency_p99_ms": lat.p99_ms, "latency_max_ms": lat.max_ms,
                "overlaps": h.overlaps, "order_violations": h.order_violations,
            })
        );
    }
    if !h.is_clean() {
        bail!("the serial guarantee was violated during the benchmark: {h:?}");
    }
    Ok(())
}
