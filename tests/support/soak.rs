//! The fault-injection harness: a cluster of node processes on a private PostgreSQL,
//! a continuous per-account workload, seeded random faults, and a checker over the
//! whole history at the end. Every fault is logged with its time; the seed reproduces
//! the fault sequence.
//!
//! Faults (each node reaches PostgreSQL through its own [`CutProxy`]):
//! SIGKILL + restart, SIGSTOP longer than the lease TTL + SIGCONT, SIGTERM + restart,
//! a node cut off from PostgreSQL, PostgreSQL restart, every node's database
//! connections terminated, scale out and scale in.

use crate::{CutProxy, NodeProc, PrivatePg};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use warden_runtime::history::HistoryReport;

#[derive(Debug, Clone)]
pub struct SoakConfig {
    pub seed: u64,
    pub duration: Duration,
    pub accounts: usize,
    /// Jobs enqueued per second across all accounts.
    pub rate: u32,
    pub node_bin: String,
}

#[derive(Debug, Clone, Default)]
pub struct SoakReport {
    pub seed: u64,
    pub faults: BTreeMap<&'static str, u32>,
    pub fault_log: Vec<String>,
    pub recovery_ms: Vec<u64>,
    pub enqueued: i64,
    pub history: HistoryReport,
    pub audit: warden_examples::workload::AuditReport,
    /// Jobs accepted but neither completed nor discarded nor cancelled at the end.
    pub lost: i64,
    /// Executor writes the database rejected because the lease epoch had moved on.
    pub fenced_writes_rejected: u64,
    /// Attempts a node dropped itself because its lease window closed (self-fencing).
    pub attempts_self_fenced: u64,
}

impl SoakReport {
    pub fn table(&self) -> String {
        let mut rec = self.recovery_ms.clone();
        rec.sort_unstable();
        let p = |q: f64| if rec.is_empty() { 0 } else { rec[((rec.len() - 1) as f64 * q).round() as usize] };
        let mut s = format!("seed {}\n", self.seed);
        s += "| check | value |\n|---|---|\n";
        s += &format!("| jobs enqueued | {} |\n", self.enqueued);
        s += &format!("| completed / discarded | {} / {} |\n", self.history.completed, self.history.discarded);
        s += &format!("| lost (accepted, never finished) | {} |\n", self.lost);
        s += &format!("| completed jobs that ran again | {} |\n", self.history.reruns_after_completion + self.history.double_completions + self.audit.duplicate_jobs);
        s += &format!("| overlapping attempts (attempts table / audit log) | {} / {} |\n", self.history.overlaps, self.audit.overlaps);
        s += &format!("| order violations (attempts table / audit log) | {} / {} |\n", self.history.order_violations, self.audit.order_violations);
        s += &format!("| attempts rescued from older epochs | {} |\n", self.history.rescued_attempts);
        s += &format!("| fenced writes rejected by the database | {} |\n", self.fenced_writes_rejected);
        s += &format!("| attempts dropped by self-fencing | {} |\n", self.attempts_self_fenced);
        s += &format!("| external effects duplicated (at-least-once, not a failure) | {} |\n", self.audit.duplicate_effects);
        s += &format!("| recovery after a fault p50 / p99 / max | {} / {} / {} ms |\n", p(0.5), p(0.99), p(1.0));
        for (k, v) in &self.faults {
            s += &format!("| fault: {k} | {v} |\n");
        }
        s
    }

    pub fn is_clean(&self) -> bool {
        self.lost == 0
            && self.history.is_clean()
            && self.audit.duplicate_jobs == 0
            && self.audit.overlaps == 0
            && self.audit.order_violations == 0
    }
}

struct Member {
    proc_: Option<NodeProc>,
    proxy: CutProxy,
    gossip: u16,
}

const NODE_ARGS: &[&str] = &[
    "--partitions", "64", "--lease-ttl-ms", "2000", "--enforcer-interval-ms", "500",
    "--drain-timeout-ms", "2000", "--settle-delay-ms", "300", "--gossip-interval-ms", "50",
];

async fn start_member(cfg: &SoakConfig, id: &str, m: &Member, seed_port: u16) -> NodeProc {
    let url = format!("postgres://postgres@127.0.0.1:{}/postgres", m.proxy.port);
    let mut args: Vec<String> = NODE_ARGS.iter().map(|s| s.to_string()).collect();
    args.extend(["--gossip-listen".into(), format!("127.0.0.1:{}", m.gossip), "--seeds".into(), format!("127.0.0.1:{seed_port}")]);
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    NodeProc::start(&cfg.node_bin, &url, id, &a).await
}

/// Run the soak; panics only on harness failures, not on guarantee violations
/// (those are in the report).
pub async fn run_soak(cfg: SoakConfig) -> SoakReport {
    let mut rng = fastrand::Rng::with_seed(cfg.seed);
    let started = Instant::now();
    let mut report = SoakReport { seed: cfg.seed, ..Default::default() };
    let pg = PrivatePg::start();
    let pg_addr: std::net::SocketAddr = format!("127.0.0.1:{}", pg.port).parse().unwrap();
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(4).connect(&pg.url()).await.unwrap();
    let log = |report: &mut SoakReport, kind: &'static str, what: String| {
        let line = format!("[{:>7.2}s] {kind}: {what}", started.elapsed().as_secs_f64());
        eprintln!("{line}");
        report.fault_log.push(line);
        *report.faults.entry(kind).or_default() += 1;
    };

    let seed_port = crate::free_udp_port();
    let mut members: BTreeMap<String, Member> = BTreeMap::new();
    let mut next_id = 1;
    for _ in 0..3 {
        let id = format!("n{next_id}");
        next_id += 1;
        let gossip = if members.is_empty() { seed_port } else { crate::free_udp_port() };
        let mut m = Member { proc_: None, proxy: CutProxy::start(pg_addr).await, gossip };
        m.proc_ = Some(start_member(&cfg, &id, &m, seed_port).await);
        members.insert(id, m);
    }
    let client = warden_runtime::Client::connect(pool.clone()).await.unwrap();

    // Workload: per-account sequence numbers, in order, some failing their first attempt.
    let stop = tokio_util::sync::CancellationToken::new();
    let (c2, stop2, accounts, rate, seed) = (client.clone(), stop.clone(), cfg.accounts, cfg.rate.max(1), cfg.seed);
    let producer = tokio::spawn(async move {
        let mut wrng = fastrand::Rng::with_seed(seed ^ 0x5eed);
        let mut seqs = vec![0i64; accounts];
        let mut enqueued = 0i64;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        while !stop2.is_cancelled() {
            tick.tick().await;
            let mut batch = Vec::new();
            for _ in 0..(rate / 10).max(1) {
                let a = wrng.usize(..accounts);
                let args = warden_examples::workload::AuditArgs {
                    seq: seqs[a],
                    sleep_ms: wrng.u64(0..20),
                    fail_times: if wrng.u8(..) < 15 { 1 } else { 0 },
                };
                batch.push((a, warden_runtime::NewJob::new(format!("acct-{a}"), "audit", args).unwrap()));
            }
            let jobs: Vec<_> = batch.iter().map(|(_, j)| j.clone()).collect();
            // An enqueue that fails (database restarting) was not accepted: it is not
            // counted and its sequence numbers are reused.
            if c2.enqueue_many(&jobs).await.is_ok() {
                for (a, _) in &batch {
                    seqs[*a] += 1;
                }
                enqueued += jobs.len() as i64;
            }
        }
        enqueued
    });

    // Faults.
    while started.elapsed() < cfg.duration {
        tokio::time::sleep(Duration::from_millis(rng.u64(1500..4000))).await;
        let running: Vec<String> = members.iter().filter(|(_, m)| m.proc_.is_some()).map(|(k, _)| k.clone()).collect();
        let victim = running[rng.usize(..running.len())].clone();
        let before: i64 = completed(&pool).await;
        match rng.u8(0..8) {
            0 => {
                log(&mut report, "sigkill+restart", victim.clone());
                let m = members.get_mut(&victim).unwrap();
                m.proc_.as_ref().unwrap().signal(libc::SIGKILL);
                if let Some(old) = m.proc_.take() {
                    tally(&mut report, &old);
                }
                tokio::time::sleep(Duration::from_millis(rng.u64(200..1500))).await;
                let p = start_member(&cfg, &victim, &members[&victim], seed_port).await;
                members.get_mut(&victim).unwrap().proc_ = Some(p);
            }
            1 => {
                let d = rng.u64(2500..4500);
                log(&mut report, "sigstop>ttl", format!("{victim} for {d}ms"));
                let m = &members[&victim];
                m.proc_.as_ref().unwrap().signal(libc::SIGSTOP);
                tokio::time::sleep(Duration::from_millis(d)).await;
                m.proc_.as_ref().unwrap().signal(libc::SIGCONT);
            }
            2 => {
                log(&mut report, "sigterm+restart", victim.clone());
                let m = members.get_mut(&victim).unwrap();
                let mut p = m.proc_.take().unwrap();
                p.signal(libc::SIGTERM);
                let st = p.wait_exit(Duration::from_secs(10)).await;
                assert!(st.is_some_and(|s| s.success()), "{victim} did not exit cleanly on SIGTERM (seed {})", cfg.seed);
                tally(&mut report, &p);
                let p = start_member(&cfg, &victim, &members[&victim], seed_port).await;
                members.get_mut(&victim).unwrap().proc_ = Some(p);
            }
            3 => {
                let d = rng.u64(1000..4000);
                log(&mut report, "db-cut", format!("{victim} for {d}ms"));
                members[&victim].proxy.cut();
                tokio::time::sleep(Duration::from_millis(d)).await;
                members[&victim].proxy.heal();
            }
            4 => {
                let d = rng.u64(500..2500);
                log(&mut report, "postgres-restart", format!("down {d}ms"));
                pg.stop();
                tokio::time::sleep(Duration::from_millis(d)).await;
                pg.restart();
            }
            5 => {
                log(&mut report, "terminate-connections", "all node backends".into());
                let _ = sqlx::query(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'warden' AND pid <> pg_backend_pid()",
                )
                .execute(&pool)
                .await;
            }
            6 if running.len() < 4 => {
                let id = format!("n{next_id}");
                next_id += 1;
                log(&mut report, "scale-out", id.clone());
                let mut m = Member { proc_: None, proxy: CutProxy::start(pg_addr).await, gossip: crate::free_udp_port() };
                m.proc_ = Some(start_member(&cfg, &id, &m, seed_port).await);
                members.insert(id, m);
            }
            _ if running.len() > 2 && victim != "n1" => {
                // n1 carries the gossip seed address; keep it.
                log(&mut report, "scale-in", victim.clone());
                let mut p = members.get_mut(&victim).unwrap().proc_.take().unwrap();
                p.signal(libc::SIGTERM);
                let st = p.wait_exit(Duration::from_secs(10)).await;
                assert!(st.is_some_and(|s| s.success()), "{victim} did not exit cleanly on scale-in (seed {})", cfg.seed);
                tally(&mut report, &p);
                members.remove(&victim);
            }
            _ => continue,
        }
        // Recovery: time until completions move again after the fault ended.
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(30) {
            if completed(&pool).await > before {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        report.recovery_ms.push(t.elapsed().as_millis() as u64);
    }
    stop.cancel();
    report.enqueued = producer.await.unwrap();
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(4).connect(&pg.url()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let unfinished: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM warden.jobs WHERE state IN ('scheduled', 'available', 'retryable', 'running')",
        )
        .fetch_one(&pool)
        .await
        .unwrap_or(i64::MAX);
        if unfinished == 0 || Instant::now() > deadline {
            report.lost = unfinished;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM warden.jobs").fetch_one(&pool).await.unwrap();
    // Accepted jobs missing from the table would be lost too.
    report.lost += (report.enqueued - total).max(0);
    report.history = warden_runtime::history::check(&pool).await.unwrap();
    report.audit = warden_examples::workload::check(&pool).await.unwrap();
    for m in members.values() {
        if let Some(p) = &m.proc_ {
            tally(&mut report, p);
        }
    }
    drop(members);
    report
}

/// Count, from a node's log, fenced writes it saw rejected and attempts it self-fenced.
fn tally(report: &mut SoakReport, p: &NodeProc) {
    let log = p.log.lock().unwrap();
    report.fenced_writes_rejected += log.iter().filter(|l| l.contains("rejected by the lease fence")).count() as u64;
    report.attempts_self_fenced += log.iter().filter(|l| l.contains("lease lost: attempt dropped")).count() as u64;
}

async fn completed(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM warden.jobs WHERE state = 'completed'").fetch_one(pool).await.unwrap_or(0)
}
