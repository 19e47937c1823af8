//! Periodic schedules at scale (issue 14, item 8): N schedules firing every minute
//! across a cluster of `warden-test-node` processes (3 by default) on a private
//! PostgreSQL with pg_stat_statements. The schedules are spread over the minute by
//! jitter (a deterministic offset in [0, 60 s), so N schedules are N/60 fires a
//! second), each fire enqueues a `tick` job (it records its run in its
//! transaction).
//!
//! Figures, per measured minute and over the run:
//! - **fire lag**: from the instant a fire is due (nominal time + its jitter, what
//!   `Spec::fire_at` says) to its job's first attempt start (`warden.attempts`),
//!   p50 / p99 / max; flat means minute after minute the same;
//! - fires per second and fires missing (due in the window, not fired);
//! - **cost per fire**: server CPU (the postmaster and its children, from /proc) and
//!   the node processes' CPU per fire whose job ran in the window (a tick recorded:
//!   at steady state, the window's fires; past saturation, what got done),
//!   pg_stat_statements' execution time of the scheduler's own statements per fire,
//!   and the top statements; from these, the fires a second this machine's cores
//!   could sustain and the cores N schedules would need;
//! - the same for a baseline of N/100 schedules measured first in the same run
//!   (ratios: at scale / baseline).
//!
//! Run: `cargo build --release -p warden-tests --bins && ./target/release/warden-schedule-bench`
//! (`--smoke` for a small quick run).

use anyhow::{bail, Context};
use chrono::{DateTime, TimeDelta, Utc};
use clap::Parser;
use std::time::Duration;
use warden_runtime::scheduler::ScheduleDef;
use warden_runtime::store::{self, StoreConfig};
use warden_tests::{free_udp_port, NodeProc, TestDb};

#[derive(Parser, Debug)]
#[command(name = "warden-schedule-bench", about = "Fire lag and database cost of many periodic schedules")]
struct Args {
    /// Schedules at scale.
    #[arg(long, default_value_t = 100_000)]
    schedules: usize,
    /// Node processes.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Minutes measured (after one minute of warm-up).
    #[arg(long, default_value_t = 3)]
    minutes: u32,
    /// A small quick run (5,000 schedules, 1 measured minute).
    #[arg(long)]
    smoke: bool,
    /// Skip the baseline of N/100 schedules.
    #[arg(long)]
    no_baseline: bool,
}

const P: usize = 64;

struct PrivatePg {
    dir: std::path::PathBuf,
    url: String,
}

fn pg_script() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/pg.sh")
}

impl PrivatePg {
    fn start() -> anyhow::Result<PrivatePg> {
        let dir = std::env::temp_dir().join(format!("warden-pg-schedule-bench-{}", std::process::id()));
        let out = std::process::Command::new(pg_script())
            .arg("start")
            .arg(&dir)
            .env("PG_OPTS", "-c shared_preload_libraries=pg_stat_statements -c max_connections=300")
            .output()
            .context("run deploy/pg.sh")?;
        if !out.status.success() {
            let _ = std::process::Command::new(pg_script()).arg("stop").arg(&dir).output();
            bail!("deploy/pg.sh start failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let url = std::fs::read_to_string(dir.join("url"))?.trim().to_string();
        Ok(PrivatePg { dir, url })
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        let _ = std::process::Command::new(pg_script()).arg("stop").arg(&self.dir).output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn node_bin() -> String {
    let exe = std::env::current_exe().expect("own path");
    exe.parent().expect("dir").join("warden-test-node").to_string_lossy().into_owned()
}

/// CPU seconds of the server: the postmaster (with its exited children) and its live
/// children.
fn pg_cpu(postmaster: u32) -> f64 {
    let stat = |pid: &str| -> Option<(u32, u64, u64)> {
        let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let f: Vec<&str> = s[s.rfind(')')? + 2..].split_whitespace().collect();
        let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
        Some((n(1)? as u32, n(11)? + n(12)?, n(13)? + n(14)?))
    };
    let mut ticks = 0;
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().filter(|s| s.bytes().all(|b| b.is_ascii_digit())) else { continue };
        match stat(pid) {
            Some((_, own, children)) if pid == postmaster.to_string() => ticks += own + children,
            Some((ppid, own, _)) if ppid == postmaster => ticks += own,
            _ => {}
        }
    }
    ticks as f64 / 100.0
}

async fn postmaster(pool: &sqlx::PgPool) -> anyhow::Result<u32> {
    let backend: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(pool).await?;
    let s = std::fs::read_to_string(format!("/proc/{backend}/stat"))?;
    let f: Vec<&str> = s[s.rfind(')').context("stat")? + 2..].split_whitespace().collect();
    Ok(f[1].parse()?)
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Insert `n` every-minute schedules with 60 s of jitter, first nominal time `first`.
async fn create(pool: &sqlx::PgPool, n: usize, first: DateTime<Utc>, prefix: &str) -> anyhow::Result<()> {
    let parts = warden_cluster::PartitionCount::new(P as u32).unwrap();
    for chunk in (0..n).collect::<Vec<_>>().chunks(10_000) {
        let (mut account, mut partition, mut fire_at) = (Vec::new(), Vec::new(), Vec::new());
        for i in chunk {
            let a = format!("{prefix}-{i}");
            let def = ScheduleDef::every(&a, "tick", Duration::from_secs(60), "tick", serde_json::json!({}))?
                .jitter(Duration::from_secs(60));
            let spec = def.spec()?;
            fire_at.push(spec.fire_at(&ScheduleDef::jitter_key(&a, "tick"), first));
            partition.push(warden_runtime::partition_of(&a, parts) as i32);
            account.push(a);
        }
        sqlx::query(
            "INSERT INTO warden.schedules (account, partition, name, kind, every_ms, anchor_at, jitter_ms,
                                           next_nominal, next_fire_at)
             SELECT a, p, 'tick', 'tick', 60000, 'epoch', 60000, $3, f
             FROM unnest($1::text[], $2::int[], $4::timestamptz[]) AS x(a, p, f)",
        )
        .bind(&account)
        .bind(&partition)
        .bind(first)
        .bind(&fire_at)
        .execute(pool)
        .await?;
    }
    Ok(())
}

struct Minute {
    fires: usize,
    missing: usize,
    lags: Vec<f64>,
}

/// Fires due in [from, to): how many, how many missing, lags (due → start).
async fn measure(
    pool: &sqlx::PgPool,
    prefix: &str,
    n: usize,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> anyhow::Result<Minute> {
    let rows: Vec<(String, DateTime<Utc>, Option<DateTime<Utc>>)> = sqlx::query_as(
        "SELECT s.account, f.nominal_at, (SELECT min(a.started_at) FROM warden.attempts a WHERE a.job_id = f.job_id)
         FROM warden.schedule_fires f JOIN warden.schedules s ON s.id = f.schedule_id
         WHERE s.account LIKE $1 AND f.via = 'schedule' AND f.nominal_at >= $2 - interval '60 seconds' AND f.nominal_at < $3",
    )
    .bind(format!("{prefix}-%"))
    .bind(from)
    .bind(to)
    .fetch_all(pool)
    .await?;
    let mut lags = Vec::new();
    let mut due_fired = 0;
    let spec =
        ScheduleDef::every("x", "tick", Duration::from_secs(60), "tick", ())?.jitter(Duration::from_secs(60)).spec()?;
    for (account, nominal, started) in rows {
        let due = spec.fire_at(&ScheduleDef::jitter_key(&account, "tick"), nominal);
        if due < from || due >= to {
            continue;
        }
        due_fired += 1;
        if let Some(s) = started {
            lags.push((s - due).num_microseconds().unwrap_or(0) as f64 / 1e6);
        }
    }
    lags.sort_by(|a, b| a.total_cmp(b));
    let minutes = ((to - from).num_seconds() as f64 / 60.0).round() as usize;
    Ok(Minute { fires: due_fired, missing: (n * minutes).saturating_sub(due_fired), lags })
}

/// CPU seconds (user + system) of one process.
fn proc_cpu(pid: i32) -> f64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    let Some(i) = s.rfind(')') else { return 0.0 };
    let f: Vec<&str> = s[i + 2..].split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (n(11) + n(12)) as f64 / 100.0
}

/// The statements that took the most execution time, with calls and ms per call.
async fn top_statements(pool: &sqlx::PgPool) -> anyhow::Result<Vec<(String, i64, f64)>> {
    Ok(sqlx::query_as(
        "SELECT regexp_replace(left(query, 90), '\\s+', ' ', 'g'), calls, total_exec_time FROM pg_stat_statements
         ORDER BY total_exec_time DESC LIMIT 12",
    )
    .fetch_all(pool)
    .await?)
}

fn format_top(rows: &[(String, i64, f64)], fires: usize) -> Vec<String> {
    rows.iter()
        .map(|(q, calls, ms)| {
            format!(
                "{:>9.3} ms/fire {:>8} calls {:>7.3} ms/call  {q}",
                ms / fires.max(1) as f64,
                calls,
                ms / (*calls).max(1) as f64
            )
        })
        .collect()
}

async fn scheduler_exec_ms(pool: &sqlx::PgPool) -> anyhow::Result<f64> {
    Ok(sqlx::query_scalar(
        "SELECT COALESCE(sum(total_exec_time), 0)::float8 FROM pg_stat_statements
         WHERE query LIKE '%warden.schedules%' OR query LIKE '%warden.schedule_fires%'",
    )
    .fetch_one(pool)
    .await?)
}

struct Run {
    n: usize,
    minutes: Vec<Minute>,
    /// Fires whose job ran, per second, over the measured window.
    done_per_s: f64,
    cpu_per_fire_ms: f64,
    node_cpu_per_fire_ms: f64,
    sched_exec_per_fire_ms: f64,
    top: Vec<String>,
}

async fn run(admin: &str, n: usize, nodes: usize, measured: u32, tag: &str) -> anyhow::Result<Run> {
    let db = TestDb::create(admin, tag).await?;
    let pool = store::connect(&db.url, &StoreConfig { max_connections: 4, ..Default::default() }).await?;
    store::migrate(&pool).await?;
    store::init_partitions(&pool, warden_cluster::PartitionCount::new(P as u32).unwrap()).await?;
    warden_tests::periodic::migrate(&pool).await?;
    sqlx::raw_sql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements").execute(&pool).await?;
    let seed = free_udp_port();
    let bin = node_bin();
    let mut procs = Vec::new();
    for i in 0..nodes {
        let gossip = if i == 0 { seed } else { free_udp_port() };
        let a = warden_tests::cluster_node_args(P, gossip, seed);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        procs.push(NodeProc::spawn(&bin, &db.url, &format!("s{i}"), &a).await?);
    }
    let ids: Vec<String> = (0..nodes).map(|i| format!("s{i}")).collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    warden_tests::wait_owned_by(&pool, P, &ids, Duration::from_secs(60)).await;
    // First nominal time: the next whole minute at least 20 s away.
    let now = Utc::now();
    let first = DateTime::<Utc>::from_timestamp((now.timestamp() + 20 + 59) / 60 * 60, 0).unwrap();
    let created = std::time::Instant::now();
    create(&pool, n, first, tag).await?;
    eprintln!("[{tag}] {n} schedules created in {:.1?}; first nominal {first}", created.elapsed());
    // One minute of warm-up, then `measured` minutes.
    let start = first + TimeDelta::seconds(60);
    let end = start + TimeDelta::seconds(60 * measured as i64);
    tokio::time::sleep((start - Utc::now()).to_std().unwrap_or_default()).await;
    let pm = postmaster(&pool).await?;
    sqlx::query("SELECT pg_stat_statements_reset()").execute(&pool).await?;
    let db_now = || sqlx::query_scalar::<_, DateTime<Utc>>("SELECT clock_timestamp()").fetch_one(&pool);
    let t0 = db_now().await?;
    let cpu0 = pg_cpu(pm);
    let nodes0: f64 = procs.iter().map(|p| proc_cpu(p.pid())).sum();
    tokio::time::sleep((end - Utc::now()).to_std().unwrap_or_default()).await;
    let cpu1 = pg_cpu(pm);
    let nodes1: f64 = procs.iter().map(|p| proc_cpu(p.pid())).sum();
    let t1 = db_now().await?;
    // The costs are per fire whose job ran in the window (its tick): at steady state
    // the fires of the window; past saturation, what the cluster actually got done.
    let done: i64 = sqlx::query_scalar("SELECT count(*) FROM periodic_ticks WHERE at >= $1 AND at < $2")
        .bind(t0)
        .bind(t1)
        .fetch_one(&pool)
        .await?;
    let exec_ms = scheduler_exec_ms(&pool).await?;
    let top_rows = top_statements(&pool).await?;
    // Let the last fires' jobs start before measuring.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let mut minutes = Vec::new();
    for m in 0..measured {
        let from = start + TimeDelta::seconds(60 * m as i64);
        minutes.push(measure(&pool, tag, n, from, from + TimeDelta::seconds(60)).await?);
    }
    let top = format_top(&top_rows, done as usize);
    drop(procs);
    pool.close().await;
    db.drop_database().await.ok();
    Ok(Run {
        n,
        minutes,
        done_per_s: done as f64 / (t1 - t0).num_milliseconds().max(1) as f64 * 1000.0,
        cpu_per_fire_ms: (cpu1 - cpu0) * 1000.0 / done.max(1) as f64,
        node_cpu_per_fire_ms: (nodes1 - nodes0) * 1000.0 / done.max(1) as f64,
        top,
        sched_exec_per_fire_ms: exec_ms / done.max(1) as f64,
    })
}

fn print(r: &Run) {
    println!("{} schedules (every minute, 60 s jitter = {:.0} fires/s):", r.n, r.n as f64 / 60.0);
    for (i, m) in r.minutes.iter().enumerate() {
        println!(
            "  minute {}: fires {} ({:.0}/s), missing {}, lag due→start p50 {:.3} s, p99 {:.3} s, max {:.3} s",
            i + 1,
            m.fires,
            m.fires as f64 / 60.0,
            m.missing,
            pct(&m.lags, 0.5),
            pct(&m.lags, 0.99),
            pct(&m.lags, 1.0)
        );
    }
    println!("  fires whose job ran in the measured window: {:.0}/s", r.done_per_s);
    println!(
        "  database cost per fire (and its job): server CPU {:.3} ms; the scheduler's statements {:.3} ms of execution",
        r.cpu_per_fire_ms, r.sched_exec_per_fire_ms
    );
    println!("  node processes' CPU per fire (and its job): {:.3} ms", r.node_cpu_per_fire_ms);
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as f64;
    let per_fire = r.cpu_per_fire_ms + r.node_cpu_per_fire_ms;
    println!(
        "  CPU per fire, server + nodes: {per_fire:.3} ms → this machine's {cores} cores fire at most {:.0}/s \
         ({:.0} every-minute schedules) at 100% busy; {:.0} every-minute schedules need {:.1} cores",
        cores * 1000.0 / per_fire,
        cores * 1000.0 / per_fire * 60.0,
        r.n,
        r.n as f64 / 60.0 * per_fire / 1000.0
    );
    println!("  top statements by execution time:");
    for t in &r.top {
        println!("    {t}");
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if args.smoke {
        args.schedules = args.schedules.min(5_000);
        args.minutes = 1;
    }
    let pg = PrivatePg::start()?;
    println!(
        "warden-schedule-bench: {} nodes, P = {P}, load {}",
        args.nodes,
        std::fs::read_to_string("/proc/loadavg")?.trim()
    );
    let baseline = if args.no_baseline {
        None
    } else {
        let r = run(&pg.url, (args.schedules / 100).max(100), args.nodes, args.minutes.min(2), "sbbase").await?;
        print(&r);
        Some(r)
    };
    let r = run(&pg.url, args.schedules, args.nodes, args.minutes, "sbscale").await?;
    print(&r);
    if let Some(b) = baseline {
        let lag = |r: &Run, p| {
            let mut all: Vec<f64> = r.minutes.iter().flat_map(|m| m.lags.iter().copied()).collect();
            all.sort_by(|a, b| a.total_cmp(b));
            pct(&all, p)
        };
        println!(
            "at scale / baseline: lag p50 {:.2}×, p99 {:.2}×; server CPU per fire {:.2}×",
            lag(&r, 0.5) / lag(&b, 0.5),
            lag(&r, 0.99) / lag(&b, 0.99),
            r.cpu_per_fire_ms / b.cpu_per_fire_ms
        );
    }
    drop(pg);
    Ok(())
}
