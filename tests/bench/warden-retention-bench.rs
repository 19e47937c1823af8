//! Retention pruner benchmark (not a test, not in CI). In a fresh database it creates
//! and drops itself on the server named by DATABASE_URL:
//!
//! 1. generates `--rows` finished jobs (default 10 million; completed, discarded and
//!    cancelled, finished 8–38 days ago) with `--attempts` attempts rows each, by one
//!    `INSERT … SELECT generate_series` per table, then `VACUUM ANALYZE`s them, plus
//!    unfinished jobs the pruner must leave alone;
//! 2. measures single-job `Client::enqueue` latency for `--probe-secs` with nothing
//!    else running (baseline);
//! 3. prunes everything older than 7 days with `AdminStore::prune_finished` batches of
//!    `--batch` jobs back to back (the pruner's worst case: no pause between batches)
//!    while the same enqueue probe runs, and prints rows/s, per-batch latency and the
//!    probe's latency against the baseline;
//! 4. checks that every finished row is gone and no unfinished one is.
//!
//! Run: `deploy/pg.sh run cargo run --release -p warden-tests --bin warden-retention-bench -- --rows 10000000`

use clap::Parser;
use std::sync::Arc;
use std::time::{Duration, Instant};
use warden_runtime::store::AdminStore;
use warden_runtime::{store, Client, NewJob, PartitionCount};

#[derive(Parser, Debug)]
#[command(name = "warden-retention-bench", about = "Cost of the retention pruner at millions of finished rows")]
struct Args {
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    /// Finished jobs to generate.
    #[arg(long, default_value_t = 10_000_000)]
    rows: i64,
    /// Attempts rows per finished job.
    #[arg(long, default_value_t = 1)]
    attempts: i32,
    /// Jobs per pruning batch.
    #[arg(long, default_value_t = 1000)]
    batch: i64,
    /// Length of each enqueue-latency probe.
    #[arg(long, default_value_t = 10)]
    probe_secs: u64,
    /// Start every batch from the beginning of the index (how the pruner worked before
    /// its batches passed a cursor on), for comparison.
    #[arg(long)]
    no_cursor: bool,
    /// Keep the database afterwards (prints its name).
    #[arg(long)]
    keep: bool,
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Enqueue one job at a time, 100 per second, until `stop`; returns latencies in ms.
async fn probe(client: Client, stop: Arc<tokio::sync::Notify>, max: Duration) -> Vec<f64> {
    let mut lat = Vec::new();
    let started = Instant::now();
    let mut i = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    loop {
        tokio::select! {
            _ = stop.notified() => break,
            _ = tick.tick() => {}
        }
        if started.elapsed() > max {
            break;
        }
        i += 1;
        // Far in the future: nothing runs them, they only exercise the insert path.
        let job = NewJob::new(format!("probe-{}", i % 200), "probe", serde_json::json!({ "i": i }))
            .expect("valid job")
            .delay(Duration::from_secs(3600));
        let t = Instant::now();
        client.enqueue(job).await.expect("probe enqueue");
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    lat
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let db = warden_tests::TestDb::create(&args.database_url, "bench_retention").await?;
    let result = run(&args, &db.url).await;
    if args.keep {
        eprintln!("kept database {}", db.name);
    } else {
        db.drop_database().await?;
    }
    result
}

async fn run(args: &Args, url: &str) -> anyhow::Result<()> {
    // Generation and VACUUM run past the node pool's 30 s statement timeout.
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(4).connect(url).await?;
    store::migrate(&pool).await?;
    let partitions = store::init_partitions(&pool, PartitionCount::default()).await?;

    let t = Instant::now();
    sqlx::query(
        "INSERT INTO warden.jobs (account, partition, kind, args, state, run_at, due_at, max_attempts, timeout_ms,
                                  attempt, epoch, node, created_at, attempted_at, finished_at)
         SELECT 'acct-' || (g % 10000), warden.partition_of('acct-' || (g % 10000), $2), 'bench', '{}',
                (ARRAY['completed', 'completed', 'completed', 'discarded', 'cancelled'])[1 + g % 5],
                f - interval '1 minute', f - interval '1 minute', 25, 60000, 1, 1, 'bench/1',
                f - interval '1 minute', f - interval '1 second', f
         FROM generate_series(1, $1) g,
              LATERAL (SELECT now() - interval '38 days' + (g::float8 / $1) * interval '30 days' AS f) t",
    )
    .bind(args.rows)
    .bind(partitions.get() as i32)
    .execute(&pool)
    .await?;
    let gen_jobs = t.elapsed();
    let t = Instant::now();
    sqlx::query(
        "INSERT INTO warden.attempts (job_id, account, partition, attempt, node, epoch, started_at, finished_at, outcome)
         SELECT j.id, j.account, j.partition, a, 'bench/1', 1, j.attempted_at, j.finished_at, 'completed'
         FROM warden.jobs j CROSS JOIN generate_series(1, $1) a",
    )
    .bind(args.attempts)
    .execute(&pool)
    .await?;
    let gen_attempts = t.elapsed();
    // Unfinished jobs, however old: the pruner must not touch them.
    sqlx::query(
        "INSERT INTO warden.jobs (account, partition, kind, args, state, run_at, due_at, max_attempts, timeout_ms)
         SELECT 'open-' || g, warden.partition_of('open-' || g, $1), 'bench', '{}', 'scheduled',
                now() + interval '1 day', now() + interval '1 day', 25, 60000
         FROM generate_series(1, 10000) g",
    )
    .bind(partitions.get() as i32)
    .execute(&pool)
    .await?;
    let t = Instant::now();
    sqlx::raw_sql("VACUUM ANALYZE warden.jobs").execute(&pool).await?;
    sqlx::raw_sql("VACUUM ANALYZE warden.attempts").execute(&pool).await?;
    let vacuum = t.elapsed();
    let size: (String, String) = sqlx::query_as(
        "SELECT pg_size_pretty(pg_total_relation_size('warden.jobs')), pg_size_pretty(pg_total_relation_size('warden.attempts'))",
    )
    .fetch_one(&pool)
    .await?;
    println!(
        "generated {} finished jobs in {:.1} s and {} attempts rows in {:.1} s; vacuum analyze {:.1} s; jobs {} attempts {} on disk",
        args.rows,
        gen_jobs.as_secs_f64(),
        args.rows * args.attempts as i64,
        gen_attempts.as_secs_f64(),
        vacuum.as_secs_f64(),
        size.0,
        size.1
    );

    let client = Client::connect(store::connect(url, &Default::default()).await?).await?;
    let never = Arc::new(tokio::sync::Notify::new());
    let mut baseline = probe(client.clone(), never, Duration::from_secs(args.probe_secs)).await;

    let stop = Arc::new(tokio::sync::Notify::new());
    let during = tokio::spawn(probe(client.clone(), stop.clone(), Duration::from_secs(24 * 3600)));
    let prune_pool = sqlx::postgres::PgPoolOptions::new().max_connections(1).connect(url).await?;
    let period = Duration::from_secs(7 * 24 * 3600);
    let started = Instant::now();
    let (mut jobs, mut attempts) = (0u64, 0u64);
    let mut batch_ms = Vec::new();
    let mut last_report = Instant::now();
    let mut cursor = None;
    loop {
        let t = Instant::now();
        let r = store::PgAdminStore::from(&prune_pool)
            .prune_finished(period, args.batch, if args.no_cursor { None } else { cursor })
            .await?;
        cursor = r.last.or(cursor);
        batch_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        jobs += r.jobs;
        attempts += r.attempts;
        if last_report.elapsed() > Duration::from_secs(15) {
            eprintln!("… {jobs} jobs pruned in {:.0} s", started.elapsed().as_secs_f64());
            last_report = Instant::now();
        }
        if (r.jobs as i64) < args.batch {
            break;
        }
    }
    let elapsed = started.elapsed();
    stop.notify_one();
    let mut during = during.await?;
    let left_finished: i64 =
        sqlx::query_scalar("SELECT count(*) FROM warden.jobs WHERE state IN ('completed', 'discarded', 'cancelled')")
            .fetch_one(&pool)
            .await?;
    let left_unfinished: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM warden.jobs WHERE state NOT IN ('completed', 'discarded', 'cancelled')",
    )
    .fetch_one(&pool)
    .await?;
    let left_attempts: i64 = sqlx::query_scalar("SELECT count(*) FROM warden.attempts").fetch_one(&pool).await?;
    println!(
        "pruned {jobs} jobs + {attempts} attempts rows in {:.1} s: {:.0} jobs/s ({:.0} rows/s), {} batches of {}",
        elapsed.as_secs_f64(),
        jobs as f64 / elapsed.as_secs_f64(),
        (jobs + attempts) as f64 / elapsed.as_secs_f64(),
        batch_ms.len(),
        args.batch
    );
    let n = batch_ms.len();
    println!(
        "batch latency ms: p50 {:.1}  p90 {:.1}  p99 {:.1}  max {:.1}",
        pct(&mut batch_ms, 0.5),
        pct(&mut batch_ms, 0.9),
        pct(&mut batch_ms, 0.99),
        batch_ms.get(n.saturating_sub(1)).copied().unwrap_or(0.0)
    );
    println!(
        "concurrent enqueue latency ms (100/s): baseline p50 {:.2} p99 {:.2} max {:.2} ({} enqueues) | while pruning p50 {:.2} p99 {:.2} max {:.2} ({} enqueues)",
        pct(&mut baseline, 0.5),
        pct(&mut baseline, 0.99),
        pct(&mut baseline, 1.0),
        baseline.len(),
        pct(&mut during, 0.5),
        pct(&mut during, 0.99),
        pct(&mut during, 1.0),
        during.len()
    );
    println!(
        "left: {left_finished} finished jobs, {left_unfinished} unfinished (expected {}), {left_attempts} attempts rows",
        10_000 + baseline.len() + during.len()
    );
    anyhow::ensure!(left_finished == 0 && left_attempts == 0, "finished rows left behind");
    anyhow::ensure!(left_unfinished as usize == 10_000 + baseline.len() + during.len(), "unfinished jobs were pruned");
    Ok(())
}
