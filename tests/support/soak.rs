//! The fault-injection harness: a cluster of node processes on a private PostgreSQL,
//! a continuous per-account workload, seeded random faults, and a checker over the
//! whole history at the end. Every fault is logged with its time; the seed reproduces
//! the fault sequence.
//!
//! Faults (each node reaches PostgreSQL through its own [`CutProxy`] and its peers
//! through its own gossip relay, see [`GossipNet`]): SIGKILL + restart, SIGSTOP
//! longer than the lease TTL + SIGCONT, SIGTERM + restart, a node cut off from
//! PostgreSQL, PostgreSQL restart, every node's database connections terminated,
//! scale out and scale in, and gossip partitions between node processes.
//!
//! Runs are described by [`Step`]s: a [`Schedule::Random`] run draws them from the
//! seed ([`random_step`]); a [`Schedule::Script`] is a fixed scenario, with check
//! steps ([`Step::ExpectOwned`], a checked [`Step::ScaleOut`]) between faults.

use crate::gossip_net::GossipNet;
use crate::{CutProxy, NodeProc, PrivatePg};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use warden_runtime::history::HistoryReport;

#[derive(Debug, Clone)]
pub struct SoakConfig {
    /// Seeds the random faults (and the workload).
    pub seed: u64,
    pub schedule: Schedule,
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
    /// Scenario checks that failed (ownership not settling, a bad scale-out, a node
    /// not exiting cleanly on SIGTERM).
    pub check_failures: Vec<String>,
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
        s += &format!(
            "| completed jobs that ran again | {} |\n",
            self.history.reruns_after_completion + self.history.double_completions + self.audit.duplicate_jobs
        );
        s += &format!(
            "| overlapping attempts (attempts table / audit log) | {} / {} |\n",
            self.history.overlaps, self.audit.overlaps
        );
        s += &format!(
            "| order violations (attempts table / audit log) | {} / {} |\n",
            self.history.order_violations, self.audit.order_violations
        );
        s += &format!("| attempts rescued from older epochs | {} |\n", self.history.rescued_attempts);
        s += &format!("| fenced writes rejected by the database | {} |\n", self.fenced_writes_rejected);
        s += &format!("| attempts dropped by self-fencing | {} |\n", self.attempts_self_fenced);
        s += &format!(
            "| external effects duplicated (at-least-once, not a failure) | {} |\n",
            self.audit.duplicate_effects
        );
        s += &format!("| recovery after a fault p50 / p99 / max | {} / {} / {} ms |\n", p(0.5), p(0.99), p(1.0));
        s += &format!("| scenario checks failed | {} |\n", self.check_failures.len());
        for (k, v) in &self.faults {
            s += &format!("| step: {k} | {v} |\n");
        }
        for f in &self.check_failures {
            s += &format!("\n{f}");
        }
        s
    }

    pub fn is_clean(&self) -> bool {
        self.lost == 0
            && self.check_failures.is_empty()
            && self.history.is_clean()
            && self.audit.duplicate_jobs == 0
            && self.audit.overlaps == 0
            && self.audit.order_violations == 0
    }
}

/// One step of a scenario: a fault (which ends before the next step starts), a
/// quiet period, or a check. Random runs draw faults from the seed; fixed scenarios
/// are lists of steps (see `tests/faults.rs`).
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// SIGKILL, stay down `down_ms`, start again with the same id (a new generation).
    SigKillRestart { node: String, down_ms: u64 },
    /// SIGKILL and stay down (until a later [`Step::Restart`]).
    SigKill { node: String },
    /// Start a node stopped by [`Step::SigKill`] again.
    Restart { node: String },
    /// SIGSTOP for `ms` (longer than the lease TTL to test fencing), then SIGCONT.
    SigStop { node: String, ms: u64 },
    /// SIGTERM: the node must drain, release and exit 0 within 10 s; then restart it.
    SigTermRestart { node: String },
    /// Cut the node's database connections (its proxy holds bytes back) for `ms`.
    DbCut { node: String, ms: u64 },
    /// Stop PostgreSQL for `down_ms`, then start it again.
    PgRestart { down_ms: u64 },
    /// `pg_terminate_backend` every node connection.
    TerminateConnections,
    /// Start a new node. With `check`, first wait for stable ownership, then verify
    /// that partitions move only to the new node and that unmoved ones keep their
    /// lease epoch (they were never released, so they never paused).
    ScaleOut { check: bool },
    /// SIGTERM a node for good (it must exit 0 within 10 s).
    ScaleIn { node: String },
    /// Cut gossip between `side` and every other node for `ms`, then heal.
    GossipPartition { side: Vec<String>, ms: u64 },
    /// Let the workload run undisturbed.
    Quiet { ms: u64 },
    /// Every partition must come to be held by a running node, and every running node
    /// to hold some, within 30 s.
    ExpectOwned,
}

impl Step {
    fn kind(&self) -> &'static str {
        match self {
            Step::SigKillRestart { .. } => "sigkill+restart",
            Step::SigKill { .. } => "sigkill",
            Step::Restart { .. } => "restart",
            Step::SigStop { .. } => "sigstop>ttl",
            Step::SigTermRestart { .. } => "sigterm+restart",
            Step::DbCut { .. } => "db-cut",
            Step::PgRestart { .. } => "postgres-restart",
            Step::TerminateConnections => "terminate-connections",
            Step::ScaleOut { .. } => "scale-out",
            Step::ScaleIn { .. } => "scale-in",
            Step::GossipPartition { .. } => "gossip-partition",
            Step::Quiet { .. } => "quiet",
            Step::ExpectOwned => "expect-owned",
        }
    }

    fn is_fault(&self) -> bool {
        !matches!(self, Step::Quiet { .. } | Step::ExpectOwned | Step::Restart { .. })
    }
}

/// Draw the next fault from the seed, given the running nodes (sorted). `None`: skip
/// this round (the drawn fault does not fit the cluster's size).
pub fn random_step(rng: &mut fastrand::Rng, running: &[String]) -> Option<Step> {
    let victim = running[rng.usize(..running.len())].clone();
    Some(match rng.u8(0..9) {
        0 => Step::SigKillRestart { node: victim, down_ms: rng.u64(200..1500) },
        1 => Step::SigStop { node: victim, ms: rng.u64(2500..4500) },
        2 => Step::SigTermRestart { node: victim },
        3 => Step::DbCut { node: victim, ms: rng.u64(1000..4000) },
        4 => Step::PgRestart { down_ms: rng.u64(500..2500) },
        5 => Step::TerminateConnections,
        6 if running.len() < 4 => Step::ScaleOut { check: false },
        7 if running.len() >= 2 => {
            // One node alone, or (with 4) two against two.
            let mut side = vec![victim];
            if running.len() >= 4 && rng.bool() {
                let others: Vec<&String> = running.iter().filter(|n| **n != side[0]).collect();
                side.push(others[rng.usize(..others.len())].clone());
            }
            side.sort();
            Step::GossipPartition { side, ms: rng.u64(1000..5000) }
        }
        // n1 carries the gossip seed address; keep it.
        8 if running.len() > 2 && victim != "n1" => Step::ScaleIn { node: victim },
        _ => return None,
    })
}

/// What to run: random faults from the seed for a while, or a fixed list of steps.
#[derive(Debug, Clone)]
pub enum Schedule {
    Random { duration: Duration },
    Script(Vec<Step>),
}

struct Member {
    proc_: Option<NodeProc>,
    proxy: CutProxy,
    /// Gossip listen port, and the port of its relay (what it advertises).
    gossip: u16,
    relay: u16,
}

const NODE_ARGS: &[&str] = &[
    "--partitions",
    "64",
    "--lease-ttl-ms",
    "2000",
    "--enforcer-interval-ms",
    "500",
    "--drain-timeout-ms",
    "2000",
    "--settle-delay-ms",
    "300",
    "--gossip-interval-ms",
    "50",
];
const PARTITIONS: usize = 64;

/// The cluster under test and everything the steps act on.
struct Harness {
    cfg: SoakConfig,
    started: Instant,
    pg: PrivatePg,
    pg_addr: std::net::SocketAddr,
    pool: sqlx::PgPool,
    net: GossipNet,
    members: BTreeMap<String, Member>,
    next_id: u32,
    report: SoakReport,
}

impl Harness {
    fn seed_relay(&self) -> u16 {
        self.members["n1"].relay
    }

    fn running(&self) -> Vec<String> {
        self.members.iter().filter(|(_, m)| m.proc_.is_some()).map(|(k, _)| k.clone()).collect()
    }

    fn log(&mut self, kind: &'static str, what: String) {
        let line = format!("[{:>7.2}s] {kind}: {what}", self.started.elapsed().as_secs_f64());
        eprintln!("{line}");
        self.report.fault_log.push(line);
        *self.report.faults.entry(kind).or_default() += 1;
    }

    fn fail(&mut self, what: String) {
        let line = format!("[{:>7.2}s] CHECK FAILED: {what}", self.started.elapsed().as_secs_f64());
        eprintln!("{line}");
        self.report.fault_log.push(line.clone());
        self.report.check_failures.push(line);
    }

    async fn start_process(&self, id: &str) -> NodeProc {
        let m = &self.members[id];
        // n1 (never scaled in) is the seed; it is inserted before it first starts.
        let seed = self.seed_relay();
        let url = format!("postgres://postgres@127.0.0.1:{}/postgres", m.proxy.port);
        let mut args: Vec<String> = NODE_ARGS.iter().map(|s| s.to_string()).collect();
        args.extend([
            "--gossip-listen".into(),
            format!("127.0.0.1:{}", m.gossip),
            "--gossip-advertise".into(),
            format!("127.0.0.1:{}", m.relay),
            "--seeds".into(),
            format!("127.0.0.1:{seed}"),
        ]);
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        NodeProc::start(&self.cfg.node_bin, &url, id, &a).await
    }

    /// A new member `n{next_id}`, started.
    async fn add_member(&mut self) -> String {
        let id = format!("n{}", self.next_id);
        self.next_id += 1;
        let gossip = crate::free_udp_port();
        let relay = self.net.relay(gossip).await;
        let m = Member { proc_: None, proxy: CutProxy::start(self.pg_addr).await, gossip, relay };
        self.members.insert(id.clone(), m);
        let p = self.start_process(&id).await;
        self.members.get_mut(&id).unwrap().proc_ = Some(p);
        id
    }

    async fn restart(&mut self, id: &str) {
        let p = self.start_process(id).await;
        self.members.get_mut(id).unwrap().proc_ = Some(p);
    }

    /// SIGTERM and require a clean exit within the bound; returns the process.
    async fn sigterm(&mut self, id: &str) -> Option<NodeProc> {
        let mut p = self.members.get_mut(id)?.proc_.take()?;
        p.signal(libc::SIGTERM);
        let st = p.wait_exit(Duration::from_secs(10)).await;
        if !st.is_some_and(|s| s.success()) {
            self.fail(format!("{id} did not exit 0 within 10 s of SIGTERM ({st:?})"));
        }
        tally(&mut self.report, &p);
        Some(p)
    }

    /// Run one step; faults end before this returns.
    async fn apply(&mut self, step: Step) {
        let kind = step.kind();
        match step {
            Step::SigKillRestart { node, down_ms } => {
                self.log(kind, format!("{node}, down {down_ms}ms"));
                self.kill(&node);
                tokio::time::sleep(Duration::from_millis(down_ms)).await;
                self.restart(&node).await;
            }
            Step::SigKill { node } => {
                self.log(kind, node.clone());
                self.kill(&node);
            }
            Step::Restart { node } => {
                self.log(kind, node.clone());
                self.restart(&node).await;
            }
            Step::SigStop { node, ms } => {
                self.log(kind, format!("{node} for {ms}ms"));
                let p = self.members[&node].proc_.as_ref().unwrap();
                p.signal(libc::SIGSTOP);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                self.members[&node].proc_.as_ref().unwrap().signal(libc::SIGCONT);
            }
            Step::SigTermRestart { node } => {
                self.log(kind, node.clone());
                self.sigterm(&node).await;
                self.restart(&node).await;
            }
            Step::DbCut { node, ms } => {
                self.log(kind, format!("{node} for {ms}ms"));
                self.members[&node].proxy.cut();
                tokio::time::sleep(Duration::from_millis(ms)).await;
                self.members[&node].proxy.heal();
            }
            Step::PgRestart { down_ms } => {
                self.log(kind, format!("down {down_ms}ms"));
                self.pg.stop();
                tokio::time::sleep(Duration::from_millis(down_ms)).await;
                self.pg.restart();
            }
            Step::TerminateConnections => {
                self.log(kind, "all node backends".into());
                let _ = sqlx::query(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'warden' AND pid <> pg_backend_pid()",
                )
                .execute(&self.pool)
                .await;
            }
            Step::ScaleOut { check } => {
                let before = if check { Some(self.stable_owners().await) } else { None };
                let id = format!("n{}", self.next_id);
                self.log(kind, id.clone());
                self.add_member().await;
                if let Some(before) = before {
                    let after = self.stable_owners().await;
                    self.check_scale_out(&id, &before, &after);
                }
            }
            Step::ScaleIn { node } => {
                self.log(kind, node.clone());
                self.sigterm(&node).await;
                self.members.remove(&node);
            }
            Step::GossipPartition { side, ms } => {
                self.log(kind, format!("{side:?} | rest, for {ms}ms"));
                let (a, b): (Vec<u16>, Vec<u16>) = (
                    self.members.iter().filter(|(k, _)| side.contains(k)).map(|(_, m)| m.gossip).collect(),
                    self.members.iter().filter(|(k, _)| !side.contains(k)).map(|(_, m)| m.gossip).collect(),
                );
                self.net.cut(&a, &b);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                self.net.heal();
            }
            Step::Quiet { ms } => tokio::time::sleep(Duration::from_millis(ms)).await,
            Step::ExpectOwned => {
                if let Err(e) = self.wait_owned().await {
                    self.fail(e);
                }
            }
        }
    }

    fn kill(&mut self, node: &str) {
        let m = self.members.get_mut(node).unwrap();
        if let Some(old) = m.proc_.take() {
            old.signal(libc::SIGKILL);
            tally(&mut self.report, &old);
        }
    }

    /// `(owner, epoch)` per partition among unexpired leases.
    async fn owners(&self) -> BTreeMap<i32, (String, i64)> {
        sqlx::query_as::<_, (i32, String, i64)>(
            "SELECT partition, split_part(owner_node, '/', 1), epoch FROM warden.leases
             WHERE owner_node IS NOT NULL AND lease_expires_at > now()",
        )
        .fetch_all(&self.pool)
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|(p, o, e)| (p, (o, e)))
        .collect()
    }

    /// Every partition held by a running node, and every running node holding some.
    async fn wait_owned(&self) -> Result<BTreeMap<i32, (String, i64)>, String> {
        let running = self.running();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let o = self.owners().await;
            let holders: std::collections::BTreeSet<&str> = o.values().map(|(n, _)| n.as_str()).collect();
            let ok = o.len() == PARTITIONS
                && holders.iter().all(|h| running.iter().any(|r| r == h))
                && running.iter().all(|r| holders.contains(r.as_str()));
            if ok {
                return Ok(o);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "ownership did not settle on {running:?} in 30 s: {} of {PARTITIONS} partitions held, by {holders:?}",
                    o.len()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Owned as in [`Self::wait_owned`] and unchanged for 1 s.
    async fn stable_owners(&mut self) -> BTreeMap<i32, (String, i64)> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = BTreeMap::new();
        let mut since = Instant::now();
        loop {
            match self.wait_owned().await {
                Ok(o) if o == last && since.elapsed() >= Duration::from_secs(1) => return o,
                Ok(o) if o != last => {
                    last = o;
                    since = Instant::now();
                }
                Ok(_) => {}
                Err(e) => {
                    self.fail(e);
                    return last;
                }
            }
            if Instant::now() > deadline {
                self.fail("ownership never stayed unchanged for 1 s".into());
                return last;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// After a join, ownership must be exactly the ring's for the new member set
    /// (moves go to the new node, plus the few the load cap forces between old
    /// ones), and every partition whose owner did not change must keep its lease
    /// epoch: it was never released, so it never paused.
    fn check_scale_out(
        &mut self,
        new: &str,
        before: &BTreeMap<i32, (String, i64)>,
        after: &BTreeMap<i32, (String, i64)>,
    ) {
        let members: Vec<String> = self.running();
        let ring = warden_cluster::ring::place(
            &members,
            warden_cluster::PartitionCount::new(PARTITIONS as u32).unwrap(),
            &warden_cluster::ring::RingConfig::default(),
        )
        .expect("members");
        let mut to_new = 0;
        for (p, (owner, epoch)) in after {
            if ring.owner(*p as u32) != owner {
                self.fail(format!(
                    "scale-out: partition {p} is held by {owner}, the ring says {}",
                    ring.owner(*p as u32)
                ));
            }
            let Some((old_owner, old_epoch)) = before.get(p) else { continue };
            if owner == new {
                to_new += 1;
            }
            if owner == old_owner && epoch != old_epoch {
                self.fail(format!(
                    "scale-out: unmoved partition {p} was re-leased (epoch {old_epoch} → {epoch}): it paused"
                ));
            }
        }
        let moved = after.iter().filter(|(p, (o, _))| before.get(p).is_some_and(|(b, _)| b != o)).count();
        let line = format!("scale-out check: {moved} partitions moved ({to_new} to {new}), the rest kept their leases");
        eprintln!("{line}");
        self.report.fault_log.push(line);
    }
}

/// Run the soak; panics only on harness failures, not on guarantee violations
/// (those are in the report).
pub async fn run_soak(cfg: SoakConfig) -> SoakReport {
    let mut rng = fastrand::Rng::with_seed(cfg.seed);
    let pg = PrivatePg::start();
    let pg_addr: std::net::SocketAddr = format!("127.0.0.1:{}", pg.port).parse().unwrap();
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(4).connect(&pg.url()).await.unwrap();
    let mut h = Harness {
        report: SoakReport { seed: cfg.seed, ..Default::default() },
        cfg: cfg.clone(),
        started: Instant::now(),
        pg,
        pg_addr,
        pool: pool.clone(),
        net: GossipNet::new(),
        members: BTreeMap::new(),
        next_id: 1,
    };
    for _ in 0..3 {
        h.add_member().await;
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

    // Racing producers: transactions that enqueue for a few shared accounts and stay
    // open a little, so two of them often insert in one order and commit in the
    // other. The history check then verifies that serial order follows commit order
    // (their seq is 0: the audit's order check has nothing to compare for them).
    let race_pool = sqlx::postgres::PgPoolOptions::new().max_connections(2).connect(&h.pg.url()).await.unwrap();
    let racers: Vec<_> = (0..2u64)
        .map(|r| {
            let (pool, c, stop, seed) = (race_pool.clone(), client.clone(), stop.clone(), cfg.seed);
            tokio::spawn(async move {
                let mut rng = fastrand::Rng::with_seed(seed ^ (0xace + r));
                let mut committed = 0i64;
                while !stop.is_cancelled() {
                    tokio::time::sleep(Duration::from_millis(rng.u64(10..60))).await;
                    let Ok(mut tx) = pool.begin().await else { continue };
                    let args = warden_examples::workload::AuditArgs { seq: 0, sleep_ms: rng.u64(0..10), fail_times: 0 };
                    let job = warden_runtime::NewJob::new(format!("race-{}", rng.usize(..4)), "audit", args).unwrap();
                    if c.enqueue_in(&mut tx, job).await.is_err() {
                        continue;
                    }
                    tokio::time::sleep(Duration::from_millis(rng.u64(0..30))).await;
                    if tx.commit().await.is_ok() {
                        committed += 1;
                    }
                }
                committed
            })
        })
        .collect();

    // Faults.
    let mut script = match &cfg.schedule {
        Schedule::Script(steps) => Some(steps.clone().into_iter()),
        Schedule::Random { .. } => None,
    };
    loop {
        let step = match (&mut script, &cfg.schedule) {
            (Some(steps), _) => match steps.next() {
                Some(s) => s,
                None => break,
            },
            (None, Schedule::Random { duration }) => {
                if h.started.elapsed() >= *duration {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(rng.u64(1500..4000))).await;
                match random_step(&mut rng, &h.running()) {
                    Some(s) => s,
                    None => continue,
                }
            }
            (None, Schedule::Script(_)) => unreachable!(),
        };
        let fault = step.is_fault();
        let before: i64 = completed(&pool).await;
        h.apply(step).await;
        if fault {
            // Recovery: time until completions move again after the fault ended.
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(30) {
                if completed(&pool).await > before {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            h.report.recovery_ms.push(t.elapsed().as_millis() as u64);
        }
    }
    stop.cancel();
    let mut report = std::mem::take(&mut h.report);
    report.enqueued = producer.await.unwrap();
    for r in racers {
        report.enqueued += r.await.unwrap();
    }
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(4).connect(&h.pg.url()).await.unwrap();
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
    if report.history.order_violations > 0 {
        let rows: Vec<(String, i64, i64, String)> = sqlx::query_as(
            "SELECT jb.account, ja.id, jb.id,
                    format('a: run_at %s created %s finished %s | b: run_at %s created %s attempt %s started %s outcome %s',
                           ja.run_at, ja.created_at, ja.finished_at, jb.run_at, jb.created_at, b.attempt, b.started_at, b.outcome)
             FROM warden.attempts b
             JOIN warden.jobs jb ON jb.id = b.job_id AND jb.lane = 'serial'
             JOIN warden.jobs ja ON ja.account = jb.account AND ja.lane = 'serial' AND ja.id <> jb.id
                  AND (ja.run_at, ja.id) < (jb.run_at, jb.id)
             WHERE ja.created_at < b.started_at AND (ja.finished_at IS NULL OR ja.finished_at > b.started_at)
             LIMIT 10",
        )
        .fetch_all(&pool)
        .await
        .unwrap_or_default();
        for r in rows {
            eprintln!("order violation: account {} job {} before job {}: {}", r.0, r.1, r.2, r.3);
        }
    }
    report.audit = warden_examples::workload::check(&pool).await.unwrap();
    for m in h.members.values() {
        if let Some(p) = &m.proc_ {
            tally(&mut report, p);
        }
    }
    drop(h);
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
