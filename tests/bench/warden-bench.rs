//! Single-node benchmark (not a test). One run measures, on the PostgreSQL server named
//! by DATABASE_URL, each phase in a fresh database it creates and drops itself:
//!
//! - **(a)** a queue-style serial claim in plain SQL: W workers, each on its own
//!   connection, run one statement (= one transaction) per job that picks any idle
//!   account with `FOR UPDATE SKIP LOCKED`, claims its oldest job, completes it and
//!   inserts the attempt row. Two ways of finding "an idle account" are measured:
//!   `lock-table` (a small accounts table whose row lock is the per-account mutex) and
//!   `head-scan` (the oldest due job that is its account's serial head, straight from
//!   `warden.jobs`, with an index a queue would have).
//! - **(b)** the hand-written limit of our design: Warden's own one-statement fenced
//!   finish-and-claim-next (`Store::finish`), driven by W plain loops that each own a
//!   disjoint set of accounts, round-robin, on a dedicated connection.
//! - **Warden**: a `Node` with a no-op handler started on the pre-enqueued jobs, timed
//!   from start until the last job is completed.
//! - **Latency**: a running node, steady single-job enqueues; enqueue→start from the
//!   database clock (attempt `started_at` − job `created_at`).
//!
//! Workload for the drains: accounts × jobs-per-account serial jobs (default 200 × 50),
//! enqueued account by account before draining starts. Every drain is checked with the
//! history checker (overlaps and order violations must be 0).
//!
//! Run: `DATABASE_URL=postgres://… ./target/release/warden-bench [--json]`
//! (or `deploy/pg.sh run ./target/release/warden-bench` for a throwaway server).

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use sqlx::Connection;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use warden_runtime::history::HistoryReport;
use warden_runtime::store::{self, Fence, Finish, PgStore, Store, StoreConfig};
use warden_runtime::{
    async_trait, partition_of, Client, Handler, HandlerResult, JobContext, NewJob, Node, NodeConfig, Outcome,
    PartitionCount,
};

#[derive(Parser, Debug)]
#[command(name = "warden-bench", about = "Single-node throughput and latency benchmark")]
struct Args {
    /// Server to benchmark on; every phase creates (and drops) its own database there.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
    #[arg(long, default_value_t = 200)]
    accounts: usize,
    #[arg(long, default_value_t = 50)]
    jobs_per_account: usize,
    /// Seconds of steady enqueueing in the latency phase (0 skips the phase).
    #[arg(long, default_value_t = 10)]
    latency_seconds: u64,
    /// Leading seconds of the latency phase left out of the percentiles.
    #[arg(long, default_value_t = 1)]
    warmup_seconds: u64,
    /// Enqueue rate of the latency phase, jobs/s.
    #[arg(long, default_value_t = 200)]
    rate: u64,
    /// Worker counts tried for baselines (a) and (b); the fastest is reported.
    #[arg(long, value_delimiter = ',', default_value = "4,8,16")]
    workers: Vec<usize>,
    /// Which way(s) baseline (a) finds an idle account.
    #[arg(long, value_enum, default_value_t = QueueVariant::Both)]
    baseline_a: QueueVariant,
    /// Executor pool sizes tried for the Warden drain (the fastest is reported, and
    /// used for the latency phase).
    #[arg(long, value_delimiter = ',', default_value = "4,8,16")]
    node_connections: Vec<u32>,
    /// Period of the completion poll that times the Warden drain, ms. The poll probes
    /// the open-jobs index (cheap); the database-clock figure shows its granularity.
    #[arg(long, default_value_t = 20)]
    poll_ms: u64,
    /// Phases to run (ratios need both sides).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "a,b,warden,latency")]
    phases: Vec<Phase>,
    /// Run every drain configuration this many times; each phase is then represented
    /// by its best configuration's median run (on 2 cores shared with PostgreSQL,
    /// single runs vary by up to ±15%).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Tokio worker threads for everything in this process (baselines and node alike);
    /// 0 runs on a current-thread runtime. Default: one per core.
    #[arg(long)]
    threads: Option<usize>,
    /// Also print one JSON line with every figure.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Phase {
    A,
    B,
    Warden,
    Latency,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum QueueVariant {
    LockTable,
    HeadScan,
    Both,
}

/// The benchmark's job kind: returns at once and never opens the job transaction, so
/// each job costs Warden exactly its one-statement hot path.
struct Noop;

#[async_trait]
impl Handler for Noop {
    type Args = serde::de::IgnoredAny;
    const KIND: &'static str = "noop";
    async fn run(&self, _ctx: &mut JobContext, _args: Self::Args) -> HandlerResult {
        Ok(Outcome::Done)
    }
}

// ---------------------------------------------------------------------------
// Databases
// ---------------------------------------------------------------------------

/// The URL for display, without its password.
fn redact(url: &str) -> String {
    let Some(start) = url.find("://").map(|i| i + 3) else {
        return url.to_string();
    };
    let Some(at) = url[start..].find('@').map(|i| start + i) else {
        return url.to_string();
    };
    match url[start..at].find(':') {
        Some(colon) => format!("{}:***{}", &url[..start + colon], &url[at..]),
        None => url.to_string(),
    }
}

/// A small pool for setup and polling, separate from whatever is being measured.
async fn harness_pool(url: &str) -> anyhow::Result<sqlx::PgPool> {
    Ok(store::connect(url, &StoreConfig { max_connections: 4, ..Default::default() }).await?)
}

/// Schema, partitions, and the drain workload enqueued account by account.
async fn prepare_drain(url: &str, args: &Args) -> anyhow::Result<sqlx::PgPool> {
    let pool = harness_pool(url).await?;
    store::migrate(&pool).await?;
    store::init_partitions(&pool, PartitionCount::default()).await?;
    let client = Client::connect(pool.clone()).await?;
    for a in 0..args.accounts {
        let jobs = (0..args.jobs_per_account)
            .map(|seq| NewJob::new(account_name(a), Noop::KIND, serde_json::json!({ "seq": seq })))
            .collect::<Result<Vec<_>, _>>()?;
        client.enqueue_many(&jobs).await?;
    }
    // Fresh statistics, so every phase plans its statements on the same table shape.
    sqlx::raw_sql("ANALYZE warden.jobs").execute(&pool).await?;
    Ok(pool)
}

fn account_name(i: usize) -> String {
    format!("account-{i}")
}

/// PostgreSQL's next MultiXact id as of a fresh checkpoint (`None` if this role may
/// not CHECKPOINT).
async fn next_multixact(pool: &sqlx::PgPool) -> Option<i64> {
    sqlx::query("CHECKPOINT").execute(pool).await.ok()?;
    let v: String =
        sqlx::query_scalar("SELECT next_multixact_id::text FROM pg_control_checkpoint()").fetch_one(pool).await.ok()?;
    v.parse().ok()
}

async fn completed(pool: &sqlx::PgPool) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM warden.jobs WHERE state = 'completed'").fetch_one(pool).await?)
}

// ---------------------------------------------------------------------------
// CPU accounting (best effort: Linux, PostgreSQL on this machine)
// ---------------------------------------------------------------------------

/// CPU seconds used so far by this process and by the PostgreSQL server (postmaster,
/// its children, and — through cutime/cstime — children that already exited).
#[derive(Debug, Clone, Copy, Default)]
struct CpuSample {
    bench: Option<f64>,
    pg: Option<f64>,
}

/// /proc times are in USER_HZ, which Linux fixes at 100 for user space.
const USER_HZ: f64 = 100.0;

/// (ppid, utime + stime, cutime + cstime) of a /proc/<pid>/stat.
fn proc_stat(pid: &str) -> Option<(u32, u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces; fields resume after its closing paren.
    let f: Vec<&str> = s[s.rfind(')')? + 2..].split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    Some((n(1)? as u32, n(11)? + n(12)?, n(13)? + n(14)?))
}

/// The local postmaster behind `pool`, if the server runs on this machine.
async fn find_postmaster(pool: &sqlx::PgPool) -> Option<u32> {
    let backend: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(pool).await.ok()?;
    let comm = |pid: u32| std::fs::read_to_string(format!("/proc/{pid}/comm")).ok();
    if comm(backend as u32)?.trim() != "postgres" {
        return None;
    }
    let (ppid, _, _) = proc_stat(&backend.to_string())?;
    (comm(ppid)?.trim() == "postgres").then_some(ppid)
}

fn cpu_sample(postmaster: Option<u32>) -> CpuSample {
    let bench = proc_stat("self").map(|(_, t, _)| t as f64 / USER_HZ);
    let pg = postmaster.and_then(|pm| {
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
    });
    CpuSample { bench, pg }
}

// ---------------------------------------------------------------------------
// Phase results
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, serde::Serialize)]
struct DrainResult {
    phase: String,
    config: String,
    jobs: i64,
    seconds: f64,
    jobs_per_s: f64,
    /// PostgreSQL CPU per job, µs (None when the server is not local).
    pg_cpu_us_per_job: Option<f64>,
    /// This process's CPU per job, µs.
    bench_cpu_us_per_job: Option<f64>,
    overlaps: i64,
    order_violations: i64,
    reruns: i64,
    /// Warden only: how long `Node::start` took (migrations check, leases, first scan).
    #[serde(skip_serializing_if = "Option::is_none")]
    node_start_ms: Option<f64>,
    /// Warden only: from just before `Node::start` to the last attempt's end, by the
    /// database clock (free of the completion poll's granularity).
    #[serde(skip_serializing_if = "Option::is_none")]
    db_clock_seconds: Option<f64>,
    /// Warden only: executor pool size (the latency phase reuses the fastest).
    #[serde(skip)]
    connections: u32,
    /// Warden only: MultiXact ids PostgreSQL allocated per 1,000 jobs (from
    /// `pg_control_checkpoint()` around the drain; needs a role that may CHECKPOINT).
    #[serde(skip_serializing_if = "Option::is_none")]
    multixacts_per_1000_jobs: Option<f64>,
}

impl DrainResult {
    fn new(phase: &str, config: String, jobs: i64, secs: f64, cpu: (CpuSample, CpuSample), h: &HistoryReport) -> Self {
        let per_job = |a: Option<f64>, b: Option<f64>| Some((b? - a?) * 1e6 / jobs as f64);
        Self {
            phase: phase.to_string(),
            config,
            jobs,
            seconds: secs,
            jobs_per_s: jobs as f64 / secs,
            pg_cpu_us_per_job: per_job(cpu.0.pg, cpu.1.pg),
            bench_cpu_us_per_job: per_job(cpu.0.bench, cpu.1.bench),
            overlaps: h.overlaps,
            order_violations: h.order_violations,
            reruns: h.reruns_after_completion + h.double_completions,
            node_start_ms: None,
            db_clock_seconds: None,
            connections: 0,
            multixacts_per_1000_jobs: None,
        }
    }

    fn line(&self) -> String {
        let us = |v: Option<f64>| v.map(|v| format!("{v:.0}")).unwrap_or_else(|| "n/a".into());
        let mut line = format!(
            "{:<36} {:<20} {:>6} {:>8.3} {:>9.0} {:>9} {:>10} {:>5} {:>5}",
            self.phase,
            self.config,
            self.jobs,
            self.seconds,
            self.jobs_per_s,
            us(self.pg_cpu_us_per_job),
            us(self.bench_cpu_us_per_job),
            self.overlaps,
            self.order_violations
        );
        if let (Some(start), Some(db)) = (self.node_start_ms, self.db_clock_seconds) {
            line += &format!(
                "\n{:<36} node start {start:.0} ms; last completion at {db:.3} s by the database clock ({:.0} jobs/s)",
                "",
                self.jobs as f64 / db
            );
        }
        if let Some(m) = self.multixacts_per_1000_jobs {
            line += &format!("\n{:<36} MultiXact ids allocated: {m:.2} per 1,000 jobs", "");
        }
        line
    }
}

/// Wall clock and CPU from the start of a timed section.
struct Timed {
    t0: Instant,
    cpu0: CpuSample,
    postmaster: Option<u32>,
}

impl Timed {
    fn start(postmaster: Option<u32>) -> Self {
        let cpu0 = cpu_sample(postmaster);
        Timed { t0: Instant::now(), cpu0, postmaster }
    }

    /// Seconds since the start, and the CPU samples at start and now.
    fn stop(&self) -> (f64, (CpuSample, CpuSample)) {
        (self.t0.elapsed().as_secs_f64(), (self.cpu0, cpu_sample(self.postmaster)))
    }
}

/// The end of a baseline drain: wait for its workers, stop the clock, check the history.
async fn join_workers(
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
    timed: Timed,
    pool: sqlx::PgPool,
    phase: &str,
    workers: usize,
    total: i64,
) -> anyhow::Result<DrainResult> {
    for t in tasks {
        t.await??;
    }
    let (secs, cpu) = timed.stop();
    let h = verify(&pool, total, phase).await?;
    pool.close().await;
    Ok(DrainResult::new(phase, format!("{workers} workers"), total, secs, cpu, &h))
}

fn table_header() -> String {
    format!(
        "{:<36} {:<20} {:>6} {:>8} {:>9} {:>9} {:>10} {:>5} {:>5}\n{}",
        "phase",
        "config",
        "jobs",
        "seconds",
        "jobs/s",
        "pg µs/job",
        "app µs/job",
        "ovlp",
        "order",
        "-".repeat(117)
    )
}

/// Check the drain: everything completed, and the serial guarantee held.
async fn verify(pool: &sqlx::PgPool, total: i64, what: &str) -> anyhow::Result<HistoryReport> {
    let h = warden_runtime::history::check(pool).await?;
    if h.completed != total || h.attempts != total {
        bail!("{what}: {} of {total} jobs completed with {} attempts", h.completed, h.attempts);
    }
    Ok(h)
}

/// The representative run of a phase: among its configurations, the one with the
/// highest median throughput over the repeats, and of that configuration the median
/// run (the lower one for an even count, so no phase is flattered by a lucky run).
fn representative(results: &[DrainResult]) -> Option<&DrainResult> {
    let mut groups: Vec<Vec<&DrainResult>> = Vec::new();
    for r in results {
        match groups.iter_mut().find(|g| g[0].phase == r.phase && g[0].config == r.config) {
            Some(g) => g.push(r),
            None => groups.push(vec![r]),
        }
    }
    groups
        .into_iter()
        .map(|mut g| {
            g.sort_by(|a, b| a.jobs_per_s.total_cmp(&b.jobs_per_s));
            g[(g.len() - 1) / 2]
        })
        .max_by(|a, b| a.jobs_per_s.total_cmp(&b.jobs_per_s))
}

// ---------------------------------------------------------------------------
// Baseline (a): queue-style serial claim
// ---------------------------------------------------------------------------

// Both variants do claim + complete + attempt row in one statement, i.e. one round
// trip and one transaction per job, the cheapest a queue-style claim can be. Claim and
// completion collapse into one UPDATE: inside one transaction nobody can observe the
// intermediate `running` state anyway.
//
// Timestamps: `attempted_at` is read from clock_timestamp() after the account/job lock
// is held, i.e. after the previous holder committed, so the history checker sees real,
// non-overlapping intervals.

/// An idle account is one whose row in `bench_accounts` nobody holds. The job lookup
/// locks too (`FOR UPDATE OF j`): the statement's snapshot may predate the previous
/// holder's commit, and a locking read re-checks `state` on the latest row version,
/// so an already completed head is skipped instead of re-run.
const QUEUE_LOCK_TABLE_SQL: &str = "
WITH acct AS (
    SELECT a.account FROM bench_accounts a
    WHERE EXISTS (SELECT 1 FROM warden.jobs j WHERE j.account = a.account AND j.state = 'available')
    LIMIT 1 FOR UPDATE OF a SKIP LOCKED),
head AS (
    SELECT j.id FROM warden.jobs j
    WHERE j.account = (SELECT account FROM acct) AND j.state = 'available'
      AND j.due_at <= statement_timestamp()
    ORDER BY j.run_at, j.id LIMIT 1 FOR UPDATE OF j),
done AS (
    UPDATE warden.jobs j SET state = 'completed', attempt = j.attempt + 1, epoch = 0, node = 'baseline-a',
           attempted_at = clock_timestamp(), finished_at = clock_timestamp()
    FROM head WHERE j.id = head.id
    RETURNING j.id, j.account, j.partition, j.attempt, j.attempted_at)
INSERT INTO warden.attempts (job_id, account, partition, attempt, node, epoch, started_at, finished_at, outcome)
SELECT id, account, partition, attempt, 'baseline-a', 0, attempted_at, clock_timestamp(), 'completed' FROM done";

/// The oldest due job that is its account's serial head (no earlier unfinished job),
/// skipping locked ones. While a head is being worked on it stays `available` in every
/// other snapshot, so its successors are not heads: one job per account at a time.
const QUEUE_HEAD_SCAN_SQL: &str = "
WITH head AS (
    SELECT j.id FROM warden.jobs j
    WHERE j.state = 'available' AND j.due_at <= statement_timestamp()
      AND NOT EXISTS (SELECT 1 FROM warden.jobs e
                      WHERE e.account = j.account
                        AND e.state IN ('scheduled', 'available', 'retryable', 'running')
                        AND (e.run_at, e.id) < (j.run_at, j.id))
    ORDER BY j.due_at, j.id LIMIT 1 FOR UPDATE OF j SKIP LOCKED),
done AS (
    UPDATE warden.jobs j SET state = 'completed', attempt = j.attempt + 1, epoch = 0, node = 'baseline-a',
           attempted_at = clock_timestamp(), finished_at = clock_timestamp()
    FROM head WHERE j.id = head.id
    RETURNING j.id, j.account, j.partition, j.attempt, j.attempted_at)
INSERT INTO warden.attempts (job_id, account, partition, attempt, node, epoch, started_at, finished_at, outcome)
SELECT id, account, partition, attempt, 'baseline-a', 0, attempted_at, clock_timestamp(), 'completed' FROM done";

async fn baseline_a(args: &Args, variant: QueueVariant, workers: usize) -> anyhow::Result<DrainResult> {
    let (phase, tag, sql, setup) = match variant {
        QueueVariant::LockTable => (
            "(a) queue claim, account lock table",
            "a_lock",
            QUEUE_LOCK_TABLE_SQL,
            // Without its own index the "has work" probe walks the account's finished
            // jobs through `jobs_account_id` (the planner's pick on fresh statistics),
            // which makes each claim cost grow with the drained accounts ahead of it
            // (several times slower overall): a queue would have this index.
            "CREATE TABLE bench_accounts (account text PRIMARY KEY);
             INSERT INTO bench_accounts SELECT DISTINCT account FROM warden.jobs ORDER BY 1;
             CREATE INDEX bench_account_available ON warden.jobs (account, run_at, id) WHERE state = 'available';
             ANALYZE bench_accounts; ANALYZE warden.jobs;",
        ),
        QueueVariant::HeadScan => (
            "(a) queue claim, head scan",
            "a_scan",
            QUEUE_HEAD_SCAN_SQL,
            // The index a job queue would have for "oldest due available job".
            "CREATE INDEX bench_available_due ON warden.jobs (due_at, id) WHERE state = 'available';
             ANALYZE warden.jobs;",
        ),
        QueueVariant::Both => unreachable!("expanded by the caller"),
    };
    warden_tests::in_fresh_db(&args.database_url, tag, |url| async move {
        let pool = prepare_drain(&url, args).await?;
        sqlx::raw_sql(setup).execute(&pool).await?;
        let total = (args.accounts * args.jobs_per_account) as i64;
        let mut conns = Vec::with_capacity(workers);
        for _ in 0..workers {
            conns.push(sqlx::PgConnection::connect(&url).await?);
        }
        let done = Arc::new(AtomicU64::new(0));
        let timed = Timed::start(find_postmaster(&pool).await);
        let tasks: Vec<_> = conns
            .into_iter()
            .map(|mut conn| {
                let done = done.clone();
                tokio::spawn(async move {
                    while done.load(Ordering::Relaxed) < total as u64 {
                        let n = sqlx::query(sql).execute(&mut conn).await?.rows_affected();
                        if n == 0 {
                            // Every account with work is held by another worker (the tail of
                            // the drain): back off instead of spinning on the database.
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        } else {
                            done.fetch_add(n, Ordering::Relaxed);
                        }
                    }
                    conn.close().await?;
                    anyhow::Ok(())
                })
            })
            .collect();
        join_workers(tasks, timed, pool, phase, workers, total).await
    })
    .await
}

// ---------------------------------------------------------------------------
// Baseline (b): the one-statement limit of our design
// ---------------------------------------------------------------------------

async fn baseline_b(args: &Args, workers: usize) -> anyhow::Result<DrainResult> {
    const PHASE: &str = "(b) one fenced statement per job";
    warden_tests::in_fresh_db(&args.database_url, "b", |url| async move {
        let pool = prepare_drain(&url, args).await?;
        let parts = PartitionCount::default();
        let owner: Arc<str> = "bench-b/1".into();
        // Hold every lease for longer than the run: no keeper is needed.
        let all: Vec<u32> = (0..parts.get()).collect();
        let granted = PgStore::new(pool.clone(), parts).acquire(&owner, &all, Duration::from_secs(600)).await?;
        if granted.len() != all.len() {
            bail!("{PHASE}: acquired {} of {} partitions", granted.len(), all.len());
        }
        let epochs: Arc<HashMap<u32, i64>> = Arc::new(granted.iter().map(|g| (g.partition, g.epoch)).collect());
        let total = (args.accounts * args.jobs_per_account) as i64;

        // A pool of one is a dedicated connection that `PgStore` can drive.
        let mut stores = Vec::with_capacity(workers);
        for _ in 0..workers {
            let one = store::connect(&url, &StoreConfig { max_connections: 1, ..Default::default() }).await?;
            one.acquire().await?; // open it now, not inside the timed section
            stores.push(PgStore::new(one, parts));
        }
        let timed = Timed::start(find_postmaster(&pool).await);
        let tasks: Vec<_> = stores
            .into_iter()
            .enumerate()
            .map(|(w, s)| {
                let accounts: Vec<String> = (0..args.accounts).filter(|a| a % workers == w).map(account_name).collect();
                let (owner, epochs) = (owner.clone(), epochs.clone());
                tokio::spawn(async move {
                    let fence = |account: &str| {
                        let partition = partition_of(account, parts);
                        Fence { partition, epoch: epochs[&partition], owner: owner.clone() }
                    };
                    let mut current = Vec::with_capacity(accounts.len());
                    for a in &accounts {
                        current.extend(s.claim(a, &fence(a)).await?);
                    }
                    // Round-robin over the worker's accounts: each step completes the
                    // account's job, records it and claims its next, in one statement.
                    while !current.is_empty() {
                        let mut next_round = Vec::with_capacity(current.len());
                        for job in current {
                            next_round.extend(
                                s.finish(None, &job, &fence(&job.account), &Finish::Completed, true).await?.into_next(),
                            );
                        }
                        current = next_round;
                    }
                    anyhow::Ok(())
                })
            })
            .collect();
        join_workers(tasks, timed, pool, PHASE, workers, total).await
    })
    .await
}

// ---------------------------------------------------------------------------
// Warden
// ---------------------------------------------------------------------------

fn node_config() -> NodeConfig {
    NodeConfig { node_id: "bench".into(), ..Default::default() }
}

async fn start_node(url: &str, connections: u32) -> anyhow::Result<Node> {
    let pool = store::connect(url, &StoreConfig { max_connections: connections, ..Default::default() }).await?;
    Ok(Node::builder(node_config()).register(Noop)?.start(pool).await?)
}

/// Poll every `every` until `n` jobs are completed; the period bounds the timing error.
async fn wait_completed(pool: &sqlx::PgPool, n: i64, every: Duration, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    // Poll with a probe of the open-jobs partial index, not a count over the table: on
    // a slow day the count cost ~5 ms of PostgreSQL CPU per call, a quarter of a core
    // at a 20 ms period, taken from the node being measured. Count once at the end.
    loop {
        let open: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM warden.jobs WHERE state IN ('scheduled', 'available', 'retryable', 'running'))",
        )
        .fetch_one(pool)
        .await?;
        if !open && completed(pool).await? >= n {
            break;
        }
        if Instant::now() > deadline {
            bail!("{} of {n} jobs completed after {limit:?}", completed(pool).await?);
        }
        tokio::time::sleep(every).await;
    }
    Ok(())
}

async fn warden_drain(args: &Args, connections: u32) -> anyhow::Result<DrainResult> {
    const PHASE: &str = "Warden node";
    warden_tests::in_fresh_db(&args.database_url, "warden", |url| async move {
        let pool = prepare_drain(&url, args).await?;
        let total = (args.accounts * args.jobs_per_account) as i64;
        let postmaster = find_postmaster(&pool).await;
        let db_t0: chrono::DateTime<chrono::Utc> =
            sqlx::query_scalar("SELECT clock_timestamp()").fetch_one(&pool).await?;
        let mxid0 = next_multixact(&pool).await;
        let timed = Timed::start(postmaster);
        let node = start_node(&url, connections).await?;
        let started = timed.t0.elapsed();
        wait_completed(&pool, total, Duration::from_millis(args.poll_ms.max(1)), Duration::from_secs(300)).await?;
        let (secs, cpu) = timed.stop();
        let mxid1 = next_multixact(&pool).await;
        node.shutdown().await?;
        let h = verify(&pool, total, PHASE).await?;
        let db_end: chrono::DateTime<chrono::Utc> =
            sqlx::query_scalar("SELECT max(finished_at) FROM warden.attempts").fetch_one(&pool).await?;
        pool.close().await;
        let mut r = DrainResult::new(PHASE, format!("{connections} executor conns"), total, secs, cpu, &h);
        r.node_start_ms = Some(started.as_secs_f64() * 1e3);
        r.db_clock_seconds = Some((db_end - db_t0).as_seconds_f64());
        r.connections = connections;
        r.multixacts_per_1000_jobs = match (mxid0, mxid1) {
            (Some(a), Some(b)) => Some((b - a) as f64 * 1000.0 / total as f64),
            _ => None,
        };
        Ok(r)
    })
    .await
}

// ---------------------------------------------------------------------------
// Latency
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, serde::Serialize)]
struct LatencyResult {
    enqueued: usize,
    samples: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    overlaps: i64,
    order_violations: i64,
}

async fn latency(args: &Args, connections: u32) -> anyhow::Result<LatencyResult> {
    warden_tests::in_fresh_db(&args.database_url, "latency", |url| async move {
        let node = start_node(&url, connections).await?;
        // The producer has its own pool, as an application would.
        let client =
            Client::connect(store::connect(&url, &StoreConfig { max_connections: 8, ..Default::default() }).await?)
                .await?;
        let pool = harness_pool(&url).await?;
        let n = (args.rate * args.latency_seconds) as usize;
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate.max(1) as f64));
        // A late tick (scheduler hiccup) is caught up at once, so the average rate holds.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut sent = Vec::with_capacity(n);
        for i in 0..n {
            tick.tick().await;
            let (c, account) = (client.clone(), account_name(i % args.accounts));
            // Each enqueue is its own call and transaction, and does not wait for the
            // previous one: a slow commit must not slow the producer down.
            sent.push(tokio::spawn(async move {
                c.enqueue(NewJob::new(account, Noop::KIND, serde_json::json!({ "i": i }))?).await
            }));
        }
        for s in sent {
            s.await??;
        }
        wait_completed(&pool, n as i64, Duration::from_millis(20), Duration::from_secs(60)).await?;
        node.shutdown().await?;
        let h = verify(&pool, n as i64, "latency phase").await?;
        let mut ms: Vec<f64> = sqlx::query_scalar(
            "SELECT (EXTRACT(EPOCH FROM (a.started_at - j.created_at)) * 1000)::float8
         FROM warden.attempts a JOIN warden.jobs j ON j.id = a.job_id
         WHERE j.created_at >= (SELECT min(created_at) FROM warden.jobs) + $1 * interval '1 second'",
        )
        .bind(args.warmup_seconds as f64)
        .fetch_all(&pool)
        .await?;
        pool.close().await;
        client.pool().close().await;
        if ms.is_empty() {
            bail!("latency phase: no samples after the {} s warm-up", args.warmup_seconds);
        }
        ms.sort_by(f64::total_cmp);
        // Nearest-rank percentile.
        let pct = |p: f64| ms[((p * ms.len() as f64).ceil() as usize).clamp(1, ms.len()) - 1];
        Ok(LatencyResult {
            enqueued: n,
            samples: ms.len(),
            p50_ms: pct(0.50),
            p99_ms: pct(0.99),
            max_ms: ms[ms.len() - 1],
            overlaps: h.overlaps,
            order_violations: h.order_violations,
        })
    })
    .await
}

// ---------------------------------------------------------------------------
// Main
// ---------------------------------------------------------------------------

fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./=:,@".contains(&b)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "n/a".into())
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let runtime = match args.threads {
        Some(0) => tokio::runtime::Builder::new_current_thread().enable_all().build()?,
        Some(n) => tokio::runtime::Builder::new_multi_thread().worker_threads(n).enable_all().build()?,
        None => tokio::runtime::Builder::new_multi_thread().enable_all().build()?,
    };
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    if args.accounts == 0
        || args.jobs_per_account == 0
        || args.repeat == 0
        || args.workers.is_empty()
        || args.workers.contains(&0)
        || args.node_connections.is_empty()
        || args.node_connections.contains(&0)
    {
        bail!("--accounts, --jobs-per-account, --repeat, --workers and --node-connections must be positive");
    }
    let runs = |p: Phase| args.phases.contains(&p);
    let command = std::env::args().map(|a| shell_quote(&a)).collect::<Vec<_>>().join(" ");
    let total = args.accounts * args.jobs_per_account;
    println!("command:  DATABASE_URL={} {command}", redact(&args.database_url));
    println!(
        "workload: {total} serial no-op jobs over {} accounts ({} each), enqueued account by account before draining",
        args.accounts, args.jobs_per_account
    );
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let runtime = match args.threads {
        Some(0) => "current-thread".to_string(),
        Some(n) => format!("{n} worker threads"),
        None => format!("{cores} worker threads"),
    };
    println!("machine:  {cores} cores, load average {} at start; tokio runtime: {runtime}", loadavg());
    println!();
    println!("{}", table_header());

    let variants: &[QueueVariant] = match args.baseline_a {
        QueueVariant::Both => &[QueueVariant::LockTable, QueueVariant::HeadScan],
        ref v => std::slice::from_ref(v),
    };
    let (mut runs_a, mut runs_b, mut runs_w) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..args.repeat {
        if runs(Phase::A) {
            for &v in variants {
                for &w in &args.workers {
                    let r =
                        baseline_a(&args, v, w).await.with_context(|| format!("baseline (a) {v:?}, {w} workers"))?;
                    println!("{}", r.line());
                    runs_a.push(r);
                }
            }
        }
        if runs(Phase::B) {
            for &w in &args.workers {
                let r = baseline_b(&args, w).await.with_context(|| format!("baseline (b), {w} workers"))?;
                println!("{}", r.line());
                runs_b.push(r);
            }
        }
        if runs(Phase::Warden) {
            for &c in &args.node_connections {
                let r = warden_drain(&args, c).await.with_context(|| format!("Warden drain, {c} connections"))?;
                println!("{}", r.line());
                runs_w.push(r);
            }
        }
    }
    let (a, b, w) = (representative(&runs_a), representative(&runs_b), representative(&runs_w));
    // The latency phase uses the pool size that drained fastest.
    let latency_connections = w.map(|w| w.connections).unwrap_or(args.node_connections[0]);
    let lat = if runs(Phase::Latency) && args.latency_seconds > 0 {
        Some(latency(&args, latency_connections).await.context("latency phase")?)
    } else {
        None
    };

    let mark = |ok: bool| if ok { "PASS" } else { "MISS" };
    let ratio = |x: Option<&DrainResult>| Some(w?.jobs_per_s / x?.jobs_per_s);
    let (ratio_a, ratio_b) = (ratio(a), ratio(b));
    if a.is_some() || b.is_some() || w.is_some() {
        println!();
        println!(
            "best configuration of each, median of {} run(s) (Warden timed from Node start to the completion poll, every {} ms):",
            args.repeat, args.poll_ms
        );
        println!("{}", table_header());
        for r in [a, b, w].into_iter().flatten() {
            println!("{}", r.line());
        }
        println!();
    }
    if let Some(r) = ratio_a {
        println!("Warden / (a)  {r:>6.2}×");
    }
    if let Some(r) = ratio_b {
        println!("Warden / (b)  {r:>6.2}×   target ≥ 0.80×   {}", mark(r >= 0.8));
    }
    if let Some(l) = &lat {
        println!(
            "enqueue→start, {} single enqueues at {} jobs/s over {} accounts, {} executor conns, database clock \
             ({} samples after a {} s warm-up):",
            l.enqueued, args.rate, args.accounts, latency_connections, l.samples, args.warmup_seconds
        );
        println!("  p50 {:>7.2} ms   target ≤ 2 ms   {}", l.p50_ms, mark(l.p50_ms <= 2.0));
        println!("  p99 {:>7.2} ms   target ≤ 5 ms   {}", l.p99_ms, mark(l.p99_ms <= 5.0));
        println!("  max {:>7.2} ms", l.max_ms);
        println!("  overlaps / order violations: {} / {}", l.overlaps, l.order_violations);
    }
    println!("load average at end: {}", loadavg());

    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "command": command,
                "jobs": total,
                "accounts": args.accounts,
                "repeat": args.repeat,
                "runs": { "a": runs_a, "b": runs_b, "warden": runs_w },
                "representative": { "a": a, "b": b, "warden": w },
                "ratio_warden_a": ratio_a,
                "ratio_warden_b": ratio_b,
                "drain_target_met": ratio_b.map(|r| r >= 0.8),
                "latency": lat.as_ref().map(|l| serde_json::json!({
                    "rate": args.rate, "seconds": args.latency_seconds, "warmup_seconds": args.warmup_seconds,
                    "executor_connections": latency_connections, "result": l,
                    "p50_target_met": l.p50_ms <= 2.0, "p99_target_met": l.p99_ms <= 5.0,
                })),
            })
        );
    }

    // Correctness is not a figure: any violation fails the run.
    let dirty = runs_a.iter().chain(&runs_b).chain(&runs_w).any(|r| r.overlaps + r.order_violations + r.reruns > 0)
        || lat.as_ref().is_some_and(|l| l.overlaps + l.order_violations > 0);
    if dirty {
        bail!("the serial guarantee was violated in at least one phase (see the ovlp/order columns)");
    }
    Ok(())
}
