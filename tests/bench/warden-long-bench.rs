//! Long-running jobs benchmark (issue 15; not a test, not in CI). What heartbeats and
//! checkpoints cost the database, and what a thousand heartbeating jobs cost everyone
//! else. Every phase runs in a fresh database it creates and drops itself, on a
//! private PostgreSQL server this binary starts with `deploy/pg.sh` and
//! `shared_preload_libraries=pg_stat_statements` (or on `--database-url`, which must
//! have it preloaded). Server-side figures are pg_stat_statements' execution (and
//! planning) time of the statement, reset at the start of each measurement window and
//! filtered to the phase's database; client-side figures are timed in the handler
//! around `JobContext::heartbeat` / `checkpoint` (the span `warden_heartbeat_write_seconds`
//! records, plus a progress validation).
//!
//! 1. **Heartbeats**: N long jobs (one per account, `--long-jobs 10,100,1000`) run on
//!    one real `Node`; each handler calls `ctx.heartbeat(Progress::of(..))` and sleeps
//!    1 s, so every call writes (the node's default `heartbeat_write_interval` is 1 s).
//!    Once all N run, a `--seconds` window: `job_beat.sql`'s calls, mean / max
//!    execution and planning time, WAL per call; client latency p50 / p99; the
//!    server's CPU over the window; a `SELECT 1` probe every 10 ms on its own
//!    connection through the same window. At the largest N, `EXPLAIN (ANALYZE,
//!    BUFFERS, WAL)` of one heartbeat (custom and generic plan).
//! 2. **Checkpoints**: one job per size writes `--checkpoints` checkpoints of a JSON
//!    string of exactly 1 KiB, 16 KiB, 256 KiB (random alphanumerics, so TOAST cannot
//!    compress them), and a 1-byte one as the in-run baseline; server and client time,
//!    WAL per call, the table's size after.
//! 3. **Effect on others**: a backlog of short no-op jobs (many accounts) drained by
//!    the node with and without `--effect-long` heartbeating long jobs running on the
//!    same node and database, alternating, `--repeat` times; throughput by the
//!    database clock (first attempt start → last finish, and the middle 80% of
//!    completions), the finish statement's server time, the server's CPU per job.
//! 4. **Table bloat**: after each heartbeat run (node stopped, so its backends have
//!    flushed their statistics), `warden.job_progress`'s size, rows, updates and the
//!    share of HOT updates (`pg_stat_user_tables`).
//!
//! Baselines measured in the same run: `SELECT 1` on a quiet server and under the
//! window's load, and the executor's finish statement (`finish.sql`) from phase 3's
//! runs without long jobs.
//!
//! Run: `cargo build --release -p warden-tests --bin warden-long-bench && ./target/release/warden-long-bench`
//! (`--smoke` for a quick small run; `--help` for the options).

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use sqlx::{Connection, Row};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use warden_runtime::store::{self, StoreConfig};
use warden_runtime::{
    async_trait, Client, Handler, HandlerResult, Heartbeat, JobContext, JobOptions, NewJob, Node, NodeConfig, Outcome,
    PartitionCount, Progress,
};

#[derive(Parser, Debug)]
#[command(name = "warden-long-bench", about = "Cost of heartbeats and checkpoints of long-running jobs")]
struct Args {
    /// Use this server instead of starting a private one; it must have
    /// `shared_preload_libraries=pg_stat_statements`. Every phase creates (and
    /// drops) its own database there.
    #[arg(long, env = "WARDEN_BENCH_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// A small, quick run (N = 10, 50; short windows; one repeat).
    #[arg(long)]
    smoke: bool,
    /// Numbers of concurrently heartbeating long jobs to measure.
    #[arg(long, value_delimiter = ',', default_value = "10,100,1000")]
    long_jobs: Vec<usize>,
    /// Measurement window per N, seconds.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Seconds after the last long job started before a window opens.
    #[arg(long, default_value_t = 3)]
    warmup: u64,
    /// Checkpoint sizes in bytes of JSON (at most 262144).
    #[arg(long, value_delimiter = ',', default_value = "1024,16384,262144")]
    checkpoint_sizes: Vec<usize>,
    /// Checkpoints written per size.
    #[arg(long, default_value_t = 50)]
    checkpoints: usize,
    /// Pause between two checkpoints, ms.
    #[arg(long, default_value_t = 100)]
    checkpoint_interval_ms: u64,
    /// Long jobs running during phase 3's "with" runs.
    #[arg(long, default_value_t = 1000)]
    effect_long: usize,
    /// Phase 3's short jobs: accounts × jobs per account.
    #[arg(long, default_value_t = 200)]
    short_accounts: usize,
    #[arg(long, default_value_t = 50)]
    short_per_account: usize,
    /// Phase 3 runs each configuration this many times (alternating); medians reported.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// The node's executor pool size.
    #[arg(long, default_value_t = 8)]
    connections: u32,
    /// Phases to run.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "beat,checkpoint,effect")]
    phases: Vec<PhaseName>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PhaseName {
    Beat,
    Checkpoint,
    Effect,
}

impl Args {
    fn apply_smoke(&mut self) {
        if self.smoke {
            self.long_jobs = vec![10, 50];
            self.seconds = 3;
            self.warmup = 1;
            self.checkpoints = 5;
            self.effect_long = 50;
            self.short_accounts = 50;
            self.short_per_account = 20;
            self.repeat = 1;
        }
    }
}

// ---------------------------------------------------------------------------
// Handlers
// ---------------------------------------------------------------------------

/// What the handlers record and read, shared with the harness.
#[derive(Default)]
struct Probe {
    /// Long handlers return when set.
    stop: AtomicBool,
    /// (when, seconds) of every `ctx.heartbeat` call.
    beats: Mutex<Vec<(Instant, f64)>>,
    /// Seconds of every `ctx.checkpoint` call.
    checkpoints: Mutex<Vec<f64>>,
    /// Short jobs run.
    short_done: AtomicU64,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct LongArgs {
    total: u64,
}

/// A long job: heartbeat with progress, sleep a second, until told to stop.
struct Long(Arc<Probe>);

#[async_trait]
impl Handler for Long {
    type Args = LongArgs;
    const KIND: &'static str = "long";

    fn options(&self) -> JobOptions {
        JobOptions {
            max_attempts: 1,
            timeout: Duration::from_secs(4 * 3600),
            heartbeat_timeout: Some(Duration::from_secs(60)),
            ..Default::default()
        }
    }

    async fn run(&self, ctx: &mut JobContext, a: LongArgs) -> HandlerResult {
        // Spread the jobs' beats over the second, as jobs started at different times would be.
        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..1000))).await;
        let mut done = 0;
        while !self.0.stop.load(Ordering::Relaxed) {
            let t = Instant::now();
            let beat = ctx.heartbeat(Progress::of(done, a.total)).await?;
            self.0.beats.lock().unwrap().push((t, t.elapsed().as_secs_f64()));
            if let Heartbeat::Stop(reason) = beat {
                return Err(reason.into());
            }
            done += 1;
            // Sleep after the call: the next call comes ≥ 1 s after this one, so it
            // always writes (a fixed-rate tick could come early and be skipped).
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        Ok(Outcome::Done)
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct CkptArgs {
    bytes: usize,
    count: usize,
    interval_ms: u64,
}

/// Checkpoint `count` states of exactly `bytes` bytes of JSON.
struct Ckpt(Arc<Probe>);

/// A JSON value of exactly `bytes` bytes: a digit below 3, else a string of random
/// alphanumerics (which pglz does not compress).
fn checkpoint_state(bytes: usize) -> serde_json::Value {
    if bytes < 3 {
        return serde_json::json!(fastrand::u8(0..10));
    }
    serde_json::Value::String(std::iter::repeat_with(fastrand::alphanumeric).take(bytes - 2).collect())
}

#[async_trait]
impl Handler for Ckpt {
    type Args = CkptArgs;
    const KIND: &'static str = "ckpt";

    fn options(&self) -> JobOptions {
        JobOptions { max_attempts: 1, timeout: Duration::from_secs(3600), ..Default::default() }
    }

    async fn run(&self, ctx: &mut JobContext, a: CkptArgs) -> HandlerResult {
        for _ in 0..a.count {
            let state = checkpoint_state(a.bytes);
            let t = Instant::now();
            let beat = ctx.checkpoint(&state).await?;
            self.0.checkpoints.lock().unwrap().push(t.elapsed().as_secs_f64());
            if let Heartbeat::Stop(reason) = beat {
                return Err(reason.into());
            }
            tokio::time::sleep(Duration::from_millis(a.interval_ms)).await;
        }
        Ok(Outcome::Done)
    }
}

/// The short jobs of phase 3: return at once (each costs Warden its finish statement).
struct Noop(Arc<Probe>);

#[async_trait]
impl Handler for Noop {
    type Args = serde::de::IgnoredAny;
    const KIND: &'static str = "noop";
    async fn run(&self, _ctx: &mut JobContext, _args: Self::Args) -> HandlerResult {
        self.0.short_done.fetch_add(1, Ordering::Relaxed);
        Ok(Outcome::Done)
    }
}

// ---------------------------------------------------------------------------
// The server
// ---------------------------------------------------------------------------

/// A private server from `deploy/pg.sh start`, stopped and deleted on drop.
struct PrivatePg {
    dir: std::path::PathBuf,
    url: String,
}

fn pg_script() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/pg.sh")
}

/// pg.sh's defaults (fsync off, synchronous_commit off, 256 MB shared buffers) plus
/// these.
const PG_OPTS: &str = "-c shared_preload_libraries=pg_stat_statements -c pg_stat_statements.track_planning=on";

impl PrivatePg {
    fn start() -> anyhow::Result<PrivatePg> {
        let dir = std::env::temp_dir().join(format!("warden-pg-long-bench-{}", std::process::id()));
        let out = std::process::Command::new(pg_script())
            .arg("start")
            .arg(&dir)
            .env("PG_OPTS", PG_OPTS)
            .output()
            .context("run deploy/pg.sh")?;
        if !out.status.success() {
            let _ = std::process::Command::new(pg_script()).arg("stop").arg(&dir).output();
            let _ = std::fs::remove_dir_all(&dir);
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

/// A small pool for setup and reading figures, apart from the node's.
async fn harness_pool(url: &str) -> anyhow::Result<sqlx::PgPool> {
    Ok(store::connect(url, &StoreConfig { max_connections: 4, ..Default::default() }).await?)
}

/// Schema, partitions and pg_stat_statements in a fresh database.
async fn prepare(url: &str) -> anyhow::Result<sqlx::PgPool> {
    let pool = harness_pool(url).await?;
    store::migrate(&pool).await?;
    store::init_partitions(&pool, PartitionCount::default()).await?;
    sqlx::raw_sql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements").execute(&pool).await?;
    Ok(pool)
}

async fn start_node(url: &str, probe: &Arc<Probe>, connections: u32) -> anyhow::Result<(Node, sqlx::PgPool)> {
    let pool = store::connect(url, &StoreConfig { max_connections: connections, ..Default::default() }).await?;
    let node = Node::builder(NodeConfig { node_id: "bench".into(), ..Default::default() })
        .register(Long(probe.clone()))?
        .register(Ckpt(probe.clone()))?
        .register(Noop(probe.clone()))?
        .start(pool.clone())
        .await?;
    Ok((node, pool))
}

/// Stop the node and close its pool: its backends exit and flush their statistics.
async fn stop_node(node: Node, pool: sqlx::PgPool) -> anyhow::Result<()> {
    node.shutdown().await?;
    pool.close().await;
    Ok(())
}

async fn enqueue_long(client: &Client, n: usize) -> anyhow::Result<()> {
    let jobs = (0..n)
        .map(|i| NewJob::new(format!("long-{i}"), Long::KIND, LongArgs { total: 100_000 }))
        .collect::<Result<Vec<_>, _>>()?;
    for chunk in jobs.chunks(100) {
        client.enqueue_many(chunk).await?;
    }
    Ok(())
}

async fn count(pool: &sqlx::PgPool, kind: &str, state: &str) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM warden.jobs WHERE kind = $1 AND state = $2")
        .bind(kind)
        .bind(state)
        .fetch_one(pool)
        .await?)
}

async fn wait_count(pool: &sqlx::PgPool, kind: &str, state: &str, n: usize, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let c = count(pool, kind, state).await?;
        if c >= n as i64 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{c} of {n} {kind} jobs {state} after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Tell the long jobs to stop and wait until they completed.
async fn stop_long(probe: &Probe, pool: &sqlx::PgPool, n: usize) -> anyhow::Result<()> {
    probe.stop.store(true, Ordering::Relaxed);
    wait_count(pool, Long::KIND, "completed", n, Duration::from_secs(60)).await
}

// ---------------------------------------------------------------------------
// Figures
// ---------------------------------------------------------------------------

/// One statement's pg_stat_statements figures since the last reset, in this database.
#[derive(Debug, Clone, Copy, Default)]
struct Stmt {
    calls: i64,
    total_ms: f64,
    max_ms: f64,
    plans: i64,
    plan_ms: f64,
    wal_bytes: f64,
    blocks: i64,
}

impl Stmt {
    fn mean_ms(&self) -> f64 {
        if self.calls == 0 {
            f64::NAN
        } else {
            self.total_ms / self.calls as f64
        }
    }
    fn mean_plan_ms(&self) -> f64 {
        if self.calls == 0 {
            f64::NAN
        } else {
            self.plan_ms / self.calls as f64
        }
    }
    /// Execution plus planning, per call.
    fn db_ms(&self) -> f64 {
        self.mean_ms() + self.mean_plan_ms()
    }
    fn per_call(&self, v: f64) -> f64 {
        if self.calls == 0 {
            f64::NAN
        } else {
            v / self.calls as f64
        }
    }
    fn line(&self) -> String {
        format!(
            "calls {:>6}  exec mean {:>6.3} ms  max {:>7.3} ms  plan mean {:.3} ms ({} plans)  WAL {:>7.0} B/call  {:.1} blocks/call",
            self.calls,
            self.mean_ms(),
            self.max_ms,
            self.mean_plan_ms(),
            self.plans,
            self.per_call(self.wal_bytes),
            self.per_call(self.blocks as f64)
        )
    }
}

const THIS_DB: &str = "(SELECT oid FROM pg_database WHERE datname = current_database())";

async fn pss_reset(pool: &sqlx::PgPool) -> anyhow::Result<()> {
    sqlx::query(sqlx::AssertSqlSafe(format!("SELECT pg_stat_statements_reset(0, {THIS_DB}, 0)"))).execute(pool).await?;
    Ok(())
}

/// The statements whose text matches both LIKE patterns, summed.
async fn pss(pool: &sqlx::PgPool, like: &str, and_like: &str) -> anyhow::Result<Stmt> {
    let r = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT COALESCE(sum(calls), 0)::int8, COALESCE(sum(total_exec_time), 0)::float8,
                COALESCE(max(max_exec_time), 0)::float8, COALESCE(sum(plans), 0)::int8,
                COALESCE(sum(total_plan_time), 0)::float8, COALESCE(sum(wal_bytes), 0)::float8,
                COALESCE(sum(shared_blks_hit + shared_blks_read), 0)::int8
         FROM pg_stat_statements WHERE dbid = {THIS_DB} AND query LIKE $1 AND query LIKE $2"
    )))
    .bind(like)
    .bind(and_like)
    .fetch_one(pool)
    .await?;
    Ok(Stmt {
        calls: r.get(0),
        total_ms: r.get(1),
        max_ms: r.get(2),
        plans: r.get(3),
        plan_ms: r.get(4),
        wal_bytes: r.get(5),
        blocks: r.get(6),
    })
}

const BEAT: (&str, &str) = ("%INSERT INTO warden.job_progress%", "%");
const FINISH: (&str, &str) = ("%INSERT INTO warden.attempts%", "%next AS (%");
const CANCEL_POLL: (&str, &str) = ("SELECT cancel_requested FROM warden.jobs WHERE id = $1", "%");
/// pg_stat_statements shows `SELECT 1` as `SELECT $1`; the alias makes it ours.
const SELECT1_SQL: &str = "SELECT 1 AS warden_bench_probe";
const SELECT1: (&str, &str) = ("%warden_bench_probe%", "%");

/// The statements of this database with the most execution time since the reset.
async fn top_statements(pool: &sqlx::PgPool, n: i64) -> anyhow::Result<Vec<String>> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT calls, total_exec_time::float8, (total_exec_time / greatest(calls, 1))::float8,
                left(regexp_replace(regexp_replace(query, '--[^\\n]*', '', 'g'), '\\s+', ' ', 'g'), 90)
         FROM pg_stat_statements WHERE dbid = {THIS_DB} AND query NOT LIKE '%pg_stat_statements%'
         ORDER BY total_exec_time DESC LIMIT $1"
    )))
    .bind(n)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let (calls, total, mean, q): (i64, f64, f64, String) = (r.get(0), r.get(1), r.get(2), r.get(3));
            format!("{calls:>7} calls {total:>9.1} ms total {mean:>7.3} ms mean  {}", q.trim())
        })
        .collect())
}

/// Nearest-rank percentile of sorted values.
fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1]
}

fn sorted_ms(secs: impl IntoIterator<Item = f64>) -> Vec<f64> {
    let mut v: Vec<f64> = secs.into_iter().map(|s| s * 1e3).collect();
    v.sort_by(f64::total_cmp);
    v
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[(v.len() - 1) / 2]
}

// CPU of the local PostgreSQL server (best effort: Linux, server on this machine).

/// /proc times are in USER_HZ, which Linux fixes at 100 for user space.
const USER_HZ: f64 = 100.0;

/// (ppid, utime + stime, cutime + cstime) of a /proc/<pid>/stat.
fn proc_stat(pid: &str) -> Option<(u32, u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let f: Vec<&str> = s[s.rfind(')')? + 2..].split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    Some((n(1)? as u32, n(11)? + n(12)?, n(13)? + n(14)?))
}

async fn find_postmaster(pool: &sqlx::PgPool) -> Option<u32> {
    let backend: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(pool).await.ok()?;
    let comm = |pid: u32| std::fs::read_to_string(format!("/proc/{pid}/comm")).ok();
    if comm(backend as u32)?.trim() != "postgres" {
        return None;
    }
    let (ppid, _, _) = proc_stat(&backend.to_string())?;
    (comm(ppid)?.trim() == "postgres").then_some(ppid)
}

/// CPU seconds used so far by the server: the postmaster, its live children, and
/// (through cutime/cstime) its exited children.
fn pg_cpu(postmaster: Option<u32>) -> Option<f64> {
    let pm = postmaster?;
    let mut ticks = 0u64;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().filter(|s| s.bytes().all(|b| b.is_ascii_digit())) else {
            continue;
        };
        match proc_stat(pid) {
            Some((_, own, children)) if pid == pm.to_string() => ticks += own + children,
            Some((ppid, own, _)) if ppid == pm => ticks += own,
            _ => {}
        }
    }
    Some(ticks as f64 / USER_HZ)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "n/a".into())
}

/// `SELECT 1` every `every` on its own connection until `stop`; latencies in seconds.
async fn select1_probe(url: String, every: Duration, stop: Arc<tokio::sync::Notify>) -> anyhow::Result<Vec<f64>> {
    let mut conn = sqlx::PgConnection::connect(&url).await?;
    let mut lat = Vec::new();
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = stop.notified() => break,
            _ = tick.tick() => {}
        }
        let t = Instant::now();
        sqlx::query(SELECT1_SQL).fetch_one(&mut conn).await?;
        lat.push(t.elapsed().as_secs_f64());
    }
    conn.close().await?;
    Ok(lat)
}

// ---------------------------------------------------------------------------
// Baseline: SELECT 1 on a quiet server
// ---------------------------------------------------------------------------

struct Select1Quiet {
    server: Stmt,
    client_ms: Vec<f64>,
}

async fn select1_quiet(admin: &str) -> anyhow::Result<Select1Quiet> {
    warden_tests::in_fresh_db(admin, "long_select1", |url| async move {
        let pool = prepare(&url).await?;
        let mut conn = sqlx::PgConnection::connect(&url).await?;
        for _ in 0..100 {
            sqlx::query(SELECT1_SQL).fetch_one(&mut conn).await?;
        }
        pss_reset(&pool).await?;
        let mut lat = Vec::with_capacity(5000);
        for _ in 0..5000 {
            let t = Instant::now();
            sqlx::query(SELECT1_SQL).fetch_one(&mut conn).await?;
            lat.push(t.elapsed().as_secs_f64());
        }
        let server = pss(&pool, SELECT1.0, SELECT1.1).await?;
        conn.close().await?;
        pool.close().await;
        Ok(Select1Quiet { server, client_ms: sorted_ms(lat) })
    })
    .await
}

// ---------------------------------------------------------------------------
// Phase 1 + 4: heartbeats, and the table afterwards
// ---------------------------------------------------------------------------

struct BeatRun {
    n: usize,
    seconds: f64,
    beat: Stmt,
    cancel_poll: Stmt,
    select1: Stmt,
    select1_client_ms: Vec<f64>,
    client_ms: Vec<f64>,
    pg_cpu_s: Option<f64>,
    top: Vec<String>,
    explain: Option<(String, String)>,
    table: TableStats,
}

#[derive(Debug, Default)]
struct TableStats {
    rows: i64,
    inserts: i64,
    updates: i64,
    hot_updates: i64,
    dead: i64,
    heap_bytes: i64,
    total_bytes: i64,
    pages: i64,
    autovacuums: i64,
    avg_row_bytes: f64,
}

impl TableStats {
    fn hot_share(&self) -> f64 {
        if self.updates == 0 {
            f64::NAN
        } else {
            self.hot_updates as f64 / self.updates as f64
        }
    }
}

async fn table_stats(pool: &sqlx::PgPool) -> anyhow::Result<TableStats> {
    let r = sqlx::query(
        "SELECT n_tup_ins, n_tup_upd, n_tup_hot_upd, n_dead_tup, autovacuum_count,
                pg_relation_size('warden.job_progress'), pg_total_relation_size('warden.job_progress'),
                (SELECT count(*) FROM warden.job_progress),
                (SELECT COALESCE(avg(pg_column_size(p.*)), 0)::float8 FROM warden.job_progress p)
         FROM pg_stat_user_tables WHERE relid = 'warden.job_progress'::regclass",
    )
    .fetch_one(pool)
    .await?;
    let heap: i64 = r.get(5);
    Ok(TableStats {
        inserts: r.get(0),
        updates: r.get(1),
        hot_updates: r.get(2),
        dead: r.get(3),
        autovacuums: r.get(4),
        heap_bytes: heap,
        total_bytes: r.get(6),
        pages: heap / 8192,
        rows: r.get(7),
        avg_row_bytes: r.get(8),
    })
}

/// `EXPLAIN (ANALYZE, BUFFERS, WAL)` of one real heartbeat of a running long job,
/// with a custom and with a generic plan. It writes that job's progress row, as the
/// job itself would.
async fn explain_beat(url: &str) -> anyhow::Result<(String, String)> {
    let mut conn = sqlx::PgConnection::connect(url).await?;
    let (id, partition, epoch, node, attempt): (i64, i32, i64, String, i32) = sqlx::query_as(
        "SELECT id, partition, epoch, node, attempt FROM warden.jobs WHERE kind = 'long' AND state = 'running' LIMIT 1",
    )
    .fetch_one(&mut conn)
    .await?;
    let sql = include_str!("../../runtime/src/store/sql/job_beat.sql");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "PREPARE bench_beat (bigint, int, bigint, text, int, bool, real, text, jsonb, bool, jsonb, int) AS {sql}"
    )))
    .execute(&mut conn)
    .await?;
    let mut plans = Vec::new();
    // The first run in a session compiles warden.fence (PL/pgSQL) and is several
    // times slower: run it once unreported, as a node's long-lived connection has.
    for mode in ["force_custom_plan", "force_custom_plan", "force_generic_plan"] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("SET plan_cache_mode = {mode}"))).execute(&mut conn).await?;
        let node_lit = node.replace('\'', "''");
        let rows = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "EXPLAIN (ANALYZE, BUFFERS, WAL, COSTS OFF) EXECUTE bench_beat \
             ({id}, {partition}, {epoch}, '{node_lit}', {attempt}, true, 42.5, '4250/10000', NULL, false, NULL, NULL)"
        )))
        .fetch_all(&mut conn)
        .await?;
        plans.push(rows.iter().map(|r| r.get::<String, _>(0)).collect::<Vec<_>>().join("\n"));
    }
    conn.close().await?;
    Ok((plans.remove(1), plans.remove(1)))
}

async fn beat_run(admin: &str, args: &Args, n: usize, explain: bool) -> anyhow::Result<BeatRun> {
    warden_tests::in_fresh_db(admin, "long_beat", |url| async move {
        let pool = prepare(&url).await?;
        let client = Client::connect(pool.clone()).await?;
        enqueue_long(&client, n).await?;
        let probe = Arc::new(Probe::default());
        let (node, node_pool) = start_node(&url, &probe, args.connections).await?;
        wait_count(&pool, Long::KIND, "running", n, Duration::from_secs(120)).await?;
        tokio::time::sleep(Duration::from_secs(args.warmup.max(1))).await;
        // And until every executor connection has likely run the statement more than
        // five times, so that it settled on its cached plan (as in a node that has run
        // for a while) and the window does not count first-use planning.
        let warm = 10 * args.connections as usize;
        let deadline = Instant::now() + Duration::from_secs(60);
        while probe.beats.lock().unwrap().len() < warm && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        let postmaster = find_postmaster(&pool).await;
        pss_reset(&pool).await?;
        let stop_probe = Arc::new(tokio::sync::Notify::new());
        let select1 = tokio::spawn(select1_probe(url.clone(), Duration::from_millis(10), stop_probe.clone()));
        let (t0, cpu0) = (Instant::now(), pg_cpu(postmaster));
        tokio::time::sleep(Duration::from_secs(args.seconds)).await;
        let (t1, cpu1) = (Instant::now(), pg_cpu(postmaster));
        stop_probe.notify_one();
        let select1_client_ms = sorted_ms(select1.await??);
        let beat = pss(&pool, BEAT.0, BEAT.1).await?;
        let cancel_poll = pss(&pool, CANCEL_POLL.0, CANCEL_POLL.1).await?;
        let select1 = pss(&pool, SELECT1.0, SELECT1.1).await?;
        let top = top_statements(&pool, 6).await?;
        let client_ms =
            sorted_ms(probe.beats.lock().unwrap().iter().filter(|(t, _)| *t >= t0 && *t < t1).map(|(_, s)| *s));
        let explain = if explain { Some(explain_beat(&url).await?) } else { None };

        stop_long(&probe, &pool, n).await?;
        stop_node(node, node_pool).await?;
        // Statistics reach pg_stat_user_tables when a backend flushes them (at exit
        // for the node's, within a second for the others).
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let table = table_stats(&pool).await?;
        pool.close().await;
        Ok(BeatRun {
            n,
            seconds: (t1 - t0).as_secs_f64(),
            beat,
            cancel_poll,
            select1,
            select1_client_ms,
            client_ms,
            pg_cpu_s: cpu1.zip(cpu0).map(|(b, a)| b - a),
            top,
            explain,
            table,
        })
    })
    .await
}

// ---------------------------------------------------------------------------
// Phase 2: checkpoints
// ---------------------------------------------------------------------------

struct CkptRun {
    bytes: usize,
    server: Stmt,
    client_ms: Vec<f64>,
    table_total_bytes: i64,
}

async fn checkpoint_runs(admin: &str, args: &Args) -> anyhow::Result<Vec<CkptRun>> {
    warden_tests::in_fresh_db(admin, "long_ckpt", |url| async move {
        let pool = prepare(&url).await?;
        let client = Client::connect(pool.clone()).await?;
        let probe = Arc::new(Probe::default());
        let (node, node_pool) = start_node(&url, &probe, args.connections).await?;
        // Warm-up: every executor connection runs the statement more than five times
        // (first-use planning is not what a checkpoint costs a running node).
        let warm = NewJob::new(
            "ckpt-warmup",
            Ckpt::KIND,
            CkptArgs { bytes: 1, count: 10 * args.connections as usize, interval_ms: 5 },
        )?;
        let id = client.enqueue(warm).await?.id;
        client.wait_finished(&[id], Duration::from_secs(120)).await?;
        let mut sizes = vec![1];
        sizes.extend(&args.checkpoint_sizes);
        let mut out = Vec::new();
        for bytes in sizes {
            probe.checkpoints.lock().unwrap().clear();
            pss_reset(&pool).await?;
            let job = NewJob::new(
                format!("ckpt-{bytes}"),
                Ckpt::KIND,
                CkptArgs { bytes, count: args.checkpoints, interval_ms: args.checkpoint_interval_ms },
            )?;
            let id = client.enqueue(job).await?.id;
            let rows = client.wait_finished(&[id], Duration::from_secs(600)).await?;
            if rows[0].state != "completed" {
                bail!("checkpoint job of {bytes} bytes ended {:?}: {:?}", rows[0].state, rows[0].last_error);
            }
            let server = pss(&pool, BEAT.0, BEAT.1).await?;
            let client_ms = sorted_ms(probe.checkpoints.lock().unwrap().iter().copied());
            let table_total_bytes: i64 =
                sqlx::query_scalar("SELECT pg_total_relation_size('warden.job_progress')").fetch_one(&pool).await?;
            out.push(CkptRun { bytes, server, client_ms, table_total_bytes });
        }
        stop_node(node, node_pool).await?;
        pool.close().await;
        Ok(out)
    })
    .await
}

// ---------------------------------------------------------------------------
// Phase 3: the effect on short jobs
// ---------------------------------------------------------------------------

struct EffectRun {
    long: usize,
    jobs: usize,
    /// First short attempt's start → last one's end, database clock.
    span_s: f64,
    /// The middle 80% of completions.
    mid_rate: f64,
    finish: Stmt,
    beat: Stmt,
    pg_cpu_us_per_job: Option<f64>,
    overlaps: i64,
    order_violations: i64,
}

impl EffectRun {
    fn rate(&self) -> f64 {
        self.jobs as f64 / self.span_s
    }
}

async fn effect_run(admin: &str, args: &Args, long: usize) -> anyhow::Result<EffectRun> {
    warden_tests::in_fresh_db(admin, "long_effect", |url| async move {
        let pool = prepare(&url).await?;
        let client = Client::connect(pool.clone()).await?;
        enqueue_long(&client, long).await?;
        let probe = Arc::new(Probe::default());
        let (node, node_pool) = start_node(&url, &probe, args.connections).await?;
        if long > 0 {
            wait_count(&pool, Long::KIND, "running", long, Duration::from_secs(120)).await?;
        }
        tokio::time::sleep(Duration::from_secs(args.warmup.max(1))).await;
        let total = args.short_accounts * args.short_per_account;
        let postmaster = find_postmaster(&pool).await;
        pss_reset(&pool).await?;
        let cpu0 = pg_cpu(postmaster);
        // The backlog arrives account by account; the node starts on it at once (the
        // same way in both configurations).
        for a in 0..args.short_accounts {
            let jobs = (0..args.short_per_account)
                .map(|seq| NewJob::new(format!("short-{a}"), Noop::KIND, serde_json::json!({ "seq": seq })))
                .collect::<Result<Vec<_>, _>>()?;
            client.enqueue_many(&jobs).await?;
        }
        let deadline = Instant::now() + Duration::from_secs(600);
        while probe.short_done.load(Ordering::Relaxed) < total as u64 {
            if Instant::now() > deadline {
                bail!("{} of {total} short jobs ran in 600 s", probe.short_done.load(Ordering::Relaxed));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        wait_count(&pool, Noop::KIND, "completed", total, Duration::from_secs(60)).await?;
        let cpu1 = pg_cpu(postmaster);
        let finish = pss(&pool, FINISH.0, FINISH.1).await?;
        let beat = pss(&pool, BEAT.0, BEAT.1).await?;
        let times: Vec<(f64, f64)> = sqlx::query_as(
            "SELECT EXTRACT(EPOCH FROM a.started_at)::float8, EXTRACT(EPOCH FROM a.finished_at)::float8
             FROM warden.attempts a JOIN warden.jobs j ON j.id = a.job_id WHERE j.kind = 'noop'",
        )
        .fetch_all(&pool)
        .await?;
        if times.len() != total {
            bail!("{} attempts of {total} short jobs", times.len());
        }
        let first_start = times.iter().map(|t| t.0).fold(f64::INFINITY, f64::min);
        let mut ends: Vec<f64> = times.iter().map(|t| t.1).collect();
        ends.sort_by(f64::total_cmp);
        let (lo, hi) = (ends.len() / 10, ends.len() * 9 / 10);
        let mid_rate = (hi - lo) as f64 / (ends[hi.min(ends.len() - 1)] - ends[lo]).max(1e-9);
        stop_long(&probe, &pool, long).await?;
        stop_node(node, node_pool).await?;
        let h = warden_runtime::history::check(&pool).await?;
        pool.close().await;
        Ok(EffectRun {
            long,
            jobs: total,
            span_s: ends[ends.len() - 1] - first_start,
            mid_rate,
            finish,
            beat,
            pg_cpu_us_per_job: cpu1.zip(cpu0).map(|(b, a)| (b - a) * 1e6 / total as f64),
            overlaps: h.overlaps,
            order_violations: h.order_violations,
        })
    })
    .await
}

// ---------------------------------------------------------------------------
// Main
// ---------------------------------------------------------------------------

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut args = Args::parse();
    args.apply_smoke();
    if args.long_jobs.is_empty() || args.long_jobs.contains(&0) || args.repeat == 0 || args.connections == 0 {
        bail!("--long-jobs, --repeat and --connections must be positive");
    }
    if let Some(&b) = args.checkpoint_sizes.iter().find(|&&b| b > warden_runtime::progress::MAX_CHECKPOINT_BYTES) {
        bail!("checkpoint size {b} is over the limit of {}", warden_runtime::progress::MAX_CHECKPOINT_BYTES);
    }
    let private = match &args.database_url {
        Some(_) => None,
        None => Some(PrivatePg::start()?),
    };
    let admin = args.database_url.clone().unwrap_or_else(|| private.as_ref().expect("started").url.clone());
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let result = runtime.block_on(run(&args, &admin));
    drop(runtime);
    drop(private);
    result
}

fn mark(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "MISS"
    }
}

async fn run(args: &Args, admin: &str) -> anyhow::Result<()> {
    {
        let pool = harness_pool(admin).await?;
        let libs: String =
            sqlx::query_scalar("SELECT current_setting('shared_preload_libraries')").fetch_one(&pool).await?;
        if !libs.contains("pg_stat_statements") {
            bail!("the server does not preload pg_stat_statements (shared_preload_libraries = {libs:?}); run without --database-url to start a private one");
        }
        pool.close().await;
    }
    let runs = |p: PhaseName| args.phases.contains(&p);
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    println!("command:  {}", std::env::args().collect::<Vec<_>>().join(" "));
    println!(
        "server:   {} (deploy/pg.sh defaults + {PG_OPTS})",
        if args.database_url.is_some() { "--database-url" } else { "private, started by this run" }
    );
    println!(
        "machine:  {cores} cores, load average {} at start; node executor pool: {} connections",
        loadavg(),
        args.connections
    );
    println!();

    let quiet = select1_quiet(admin).await.context("SELECT 1 baseline")?;
    println!(
        "baseline SELECT 1, quiet server, 5,000 sequential calls: server exec mean {:.4} ms max {:.3} ms; client p50 {:.3} ms p99 {:.3} ms",
        quiet.server.mean_ms(),
        quiet.server.max_ms,
        pct(&quiet.client_ms, 0.5),
        pct(&quiet.client_ms, 0.99)
    );
    println!();

    let mut beats = Vec::new();
    if runs(PhaseName::Beat) {
        println!("== 1. heartbeats: N long jobs, each ctx.heartbeat(Progress::of(..)) then sleep 1 s ==");
        let max_n = *args.long_jobs.iter().max().expect("non-empty");
        for &n in &args.long_jobs {
            let r = beat_run(admin, args, n, n == max_n).await.with_context(|| format!("heartbeat phase, N = {n}"))?;
            println!(
                "N = {:>5}: {:.1} s window, {:.0} heartbeats/s ({:.2} per job per s)",
                r.n,
                r.seconds,
                r.beat.calls as f64 / r.seconds,
                r.beat.calls as f64 / r.seconds / r.n as f64
            );
            println!("  job_beat   {}", r.beat.line());
            println!(
                "  client     ctx.heartbeat p50 {:.3} ms  p99 {:.3} ms  max {:.3} ms ({} calls)",
                pct(&r.client_ms, 0.5),
                pct(&r.client_ms, 0.99),
                pct(&r.client_ms, 1.0),
                r.client_ms.len()
            );
            println!(
                "  SELECT 1 under this load (every 10 ms): server mean {:.4} ms; client p50 {:.3} ms p99 {:.3} ms",
                r.select1.mean_ms(),
                pct(&r.select1_client_ms, 0.5),
                pct(&r.select1_client_ms, 0.99)
            );
            println!("  cancel poll {}", r.cancel_poll.line());
            if let Some(cpu) = r.pg_cpu_s {
                println!(
                    "  PostgreSQL CPU over the window: {:.1}% of one core; {:.0} µs per heartbeat (all statements)",
                    cpu * 100.0 / r.seconds,
                    cpu * 1e6 / r.beat.calls.max(1) as f64
                );
            }
            println!("  top statements by execution time in the window:");
            for t in &r.top {
                println!("    {t}");
            }
            let t = &r.table;
            println!(
                "  warden.job_progress after the run: {} rows, {} inserts, {} updates, {} HOT ({:.1}%), {} dead, \
                 heap {} pages ({:.0} B per row, avg row {:.0} B), total {} kB, {} autovacuums",
                t.rows,
                t.inserts,
                t.updates,
                t.hot_updates,
                t.hot_share() * 100.0,
                t.dead,
                t.pages,
                t.heap_bytes as f64 / t.rows.max(1) as f64,
                t.avg_row_bytes,
                t.total_bytes / 1024,
                t.autovacuums
            );
            if let Some((custom, generic)) = &r.explain {
                println!("  EXPLAIN (ANALYZE, BUFFERS, WAL) of one heartbeat at N = {n}, custom plan:");
                for l in custom.lines() {
                    println!("    {l}");
                }
                println!("  same, generic plan:");
                for l in generic.lines() {
                    println!("    {l}");
                }
            }
            println!();
            beats.push(r);
        }
    }

    let mut ckpts = Vec::new();
    if runs(PhaseName::Checkpoint) {
        println!(
            "== 2. checkpoints: one job per size, {} checkpoints {} ms apart ==",
            args.checkpoints, args.checkpoint_interval_ms
        );
        ckpts = checkpoint_runs(admin, args).await.context("checkpoint phase")?;
        for c in &ckpts {
            println!(
                "{:>7} B: {}\n           client p50 {:.3} ms p99 {:.3} ms max {:.3} ms; job_progress total {} kB after",
                c.bytes,
                c.server.line(),
                pct(&c.client_ms, 0.5),
                pct(&c.client_ms, 0.99),
                pct(&c.client_ms, 1.0),
                c.table_total_bytes / 1024
            );
        }
        println!();
    }

    let mut effect = Vec::new();
    if runs(PhaseName::Effect) {
        println!(
            "== 3. effect on short jobs: {} no-op jobs over {} accounts, without / with {} heartbeating long jobs ({} repeat(s)) ==",
            args.short_accounts * args.short_per_account,
            args.short_accounts,
            args.effect_long,
            args.repeat
        );
        for _ in 0..args.repeat {
            for long in [0, args.effect_long] {
                let r =
                    effect_run(admin, args, long).await.with_context(|| format!("effect phase, {long} long jobs"))?;
                println!(
                    "long {:>5}: {:>6} jobs in {:.3} s = {:>6.0} jobs/s (middle 80%: {:>6.0}/s); PG CPU {} µs/job; \
                     overlaps {} order {}\n            finish   {}\n            job_beat {}",
                    r.long,
                    r.jobs,
                    r.span_s,
                    r.rate(),
                    r.mid_rate,
                    r.pg_cpu_us_per_job.map(|v| format!("{v:.0}")).unwrap_or_else(|| "n/a".into()),
                    r.overlaps,
                    r.order_violations,
                    r.finish.line(),
                    r.beat.line()
                );
                effect.push(r);
            }
        }
        println!();
    }

    // Summary.
    println!("== summary (ratios against baselines measured in this run) ==");
    let finish_base: Vec<&EffectRun> = effect.iter().filter(|r| r.long == 0).collect();
    let finish_mean = median(finish_base.iter().map(|r| r.finish.mean_ms()).collect());
    for r in &beats {
        let db = r.beat.db_ms();
        let mut line = format!(
            "heartbeat at N = {:>5}: db time {:.3} ms (exec {:.3} + plan {:.3}), max exec {:.3} ms; {:.1}× quiet SELECT 1, {:.1}× SELECT 1 under load",
            r.n,
            db,
            r.beat.mean_ms(),
            r.beat.mean_plan_ms(),
            r.beat.max_ms,
            r.beat.mean_ms() / quiet.server.mean_ms(),
            r.beat.mean_ms() / r.select1.mean_ms()
        );
        if finish_mean.is_finite() {
            line += &format!(", {:.2}× finish", r.beat.mean_ms() / finish_mean);
        }
        line += &format!(
            "; client p50/p99 {:.2}/{:.2} ms; target ≤ 1 ms {}",
            pct(&r.client_ms, 0.5),
            pct(&r.client_ms, 0.99),
            mark(db <= 1.0)
        );
        println!("{line}");
    }
    if let (Some(lo), Some(hi)) = (beats.iter().min_by_key(|r| r.n), beats.iter().max_by_key(|r| r.n)) {
        if let (Some(c0), Some(c1)) = (lo.pg_cpu_s, hi.pg_cpu_s) {
            let rate = |r: &BeatRun| r.beat.calls as f64 / r.seconds;
            if hi.n > lo.n {
                println!(
                    "marginal PostgreSQL CPU per heartbeat, N = {} → {} (everything the extra jobs cost the server: \
                     beats, cancel polls, protocol): {:.0} µs",
                    lo.n,
                    hi.n,
                    (c1 / hi.seconds - c0 / lo.seconds) * 1e6 / (rate(hi) - rate(lo))
                );
            }
        }
    }
    if finish_mean.is_finite() {
        println!("finish statement (short jobs, no long jobs; median of runs): exec mean {finish_mean:.3} ms");
    }
    if let Some(base) = ckpts.first() {
        for c in &ckpts[1..] {
            println!(
                "checkpoint {:>7} B: db time {:.3} ms, {:.1}× a 1-byte checkpoint; client p50 {:.2} ms ({:.1}×)",
                c.bytes,
                c.server.db_ms(),
                c.server.db_ms() / base.server.db_ms(),
                pct(&c.client_ms, 0.5),
                pct(&c.client_ms, 0.5) / pct(&base.client_ms, 0.5)
            );
        }
    }
    if !effect.is_empty() {
        let med =
            |long: usize, f: fn(&EffectRun) -> f64| median(effect.iter().filter(|r| r.long == long).map(f).collect());
        let (without, with) = (med(0, EffectRun::rate), med(args.effect_long, EffectRun::rate));
        let (mid0, mid1) = (med(0, |r| r.mid_rate), med(args.effect_long, |r| r.mid_rate));
        println!(
            "short-job throughput with {} heartbeating long jobs / without: {:.0} / {:.0} jobs/s = {:.2}× (middle 80%: {:.0} / {:.0} = {:.2}×)",
            args.effect_long,
            with,
            without,
            with / without,
            mid1,
            mid0,
            mid1 / mid0
        );
    }
    println!("load average at end: {}", loadavg());
    if effect.iter().any(|r| r.overlaps + r.order_violations > 0) {
        bail!("the serial guarantee was violated in phase 3");
    }
    Ok(())
}
