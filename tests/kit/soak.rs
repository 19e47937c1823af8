//! The fault-injection harness: a cluster of node processes on a private PostgreSQL,
//! a continuous per-account workload, seeded random faults, and a checker over the
//! whole history at the end. Every fault is logged with its time; the seed reproduces
//! the fault sequence.
//!
//! Faults (each node reaches PostgreSQL through its own [`CutProxy`] and its peers
//! through its own gossip relay, see [`GossipNet`]): SIGKILL + restart, SIGSTOP
//! longer than the lease TTL + SIGCONT (a fifth of the handlers work 0–200 ms, so
//! pauses catch them mid-run), SIGTERM + restart, a node cut off from PostgreSQL,
//! lost replies (a statement — maybe a `COMMIT` — runs, its reply is dropped and
//! the connection reset) and delayed replies on one node's connections, PostgreSQL
//! restart, every node's database connections terminated, scale out and scale in,
//! gossip partitions between node processes, a flood of spoofed NOTIFYs on every
//! Warden channel from an unprivileged role (`mallory`: wrong partitions, garbage,
//! over-long payloads, thousands of made-up accounts, cancels of jobs running right
//! now), and hostile and extreme values through the enqueue entries — the SQL
//! function `warden.enqueue` and the Rust client. (The third entry, gRPC, is covered
//! by the API tests, `tests/api.rs`, not here.)
//!
//! Long jobs ([`crate::long_job`], issue 15) are mixed into the workload: a few jobs
//! of 15–30 s of steps, checkpointing every second, enqueued over the first half of
//! a random run (every 15 s in a scripted one), so faults land on them mid-run.
//!
//! Checks: at the end, over the whole history (`warden_runtime::history::check` on
//! the attempts table, `workload::check` on the handler's audit log and on its
//! outside-observer record of every handler run, which catches overlapping
//! *execution*, not only overlapping committed rows; `long_job::check` on the long
//! jobs' step logs and observed progress writes: every long job completed, each
//! resume from the last committed checkpoint redoing at most one checkpoint
//! interval, no two of its attempts overlapping, nothing of an attempt landing
//! after a later one started), nothing lost, no hostile
//! value accepted, every extreme valid value accepted and finished, no job cancelled
//! without a cancel request; and continuously, every 500 ms until the final drain
//! is over, liveness: no account's due head job stays unstarted (or claimed with no
//! handler running it) longer than the bound while its partition is held by one
//! owner and epoch (see [`LIVENESS_BOUND`], [`LIVENESS_SQL`]).
//!
//! Runs are described by [`Step`]s: a [`Schedule::Random`] run draws them from the
//! seed ([`random_step`]); a [`Schedule::Script`] is a fixed scenario, with check
//! steps ([`Step::ExpectOwned`], a checked [`Step::ScaleOut`]) between faults.

use crate::gossip_net::GossipNet;
use crate::{CutProxy, NodeProc, PrivatePg};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
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
    /// Long jobs ([`crate::long_job`]) mixed in, one after another.
    pub long_jobs: usize,
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
    pub audit: crate::workload::AuditReport,
    /// Jobs accepted but neither completed nor discarded nor cancelled at the end
    /// (hostile values that were wrongly accepted are counted apart, in
    /// [`Self::hostile_accepted`]; jobs stuck behind them count here).
    pub lost: i64,
    /// Executor writes the database rejected because the lease epoch had moved on.
    pub fenced_writes_rejected: u64,
    /// Attempts a node dropped itself because its lease window closed (self-fencing).
    pub attempts_self_fenced: u64,
    /// Scenario checks that failed (ownership not settling, a bad scale-out, a node
    /// not exiting cleanly on SIGTERM).
    pub check_failures: Vec<String>,
    /// Hostile values tried through the SQL function and through the Rust client.
    pub hostile_tried: (u32, u32),
    /// Hostile values an entry accepted (each must be rejected): "entry: case → job id".
    pub hostile_accepted: Vec<String>,
    /// Extreme but valid values enqueued (each must be accepted and finish).
    pub extreme_tried: u32,
    /// Extreme valid values an entry rejected.
    pub extreme_rejected: Vec<String>,
    /// Extreme valid jobs that did not end as they must (completed; an unknown kind
    /// discarded). Unfinished ones are also counted in [`Self::lost`].
    pub extreme_wrong_end: Vec<String>,
    /// Spoofed NOTIFYs sent by the unprivileged role.
    pub notifies_sent: u64,
    /// Running jobs (with no cancel requested) whose cancel was spoofed.
    pub spoofed_running_jobs: usize,
    /// Of those, jobs that ended cancelled.
    pub spoofed_cancelled: i64,
    /// Every job that ended cancelled with no cancel requested (the harness never
    /// requests one, so any is spurious).
    pub cancelled_without_request: i64,
    /// Proxied connections reset by reply loss.
    pub reply_resets: u64,
    /// Due work left unstarted longer than [`LIVENESS_BOUND`] while its partition
    /// was held, one per (account, job).
    pub liveness_violations: Vec<LivenessViolation>,
    /// Liveness checks run (ticks that reached PostgreSQL).
    pub liveness_ticks: u64,
    /// The longest stretch, in seconds, any partition was seen held by nobody (no
    /// unexpired lease) outside PostgreSQL restarts. Stretches over
    /// [`LIVENESS_BOUND`] are liveness violations too (`held by nobody`): a holder
    /// that cannot act must be replaced, even when gossip still says it is alive (a
    /// node cut off from the database only, [`Step::DbCut`]).
    pub max_ownerless_s: f64,
    /// A few overlapping handler runs, described (when there are any).
    pub run_overlap_examples: Vec<String>,
    /// Long jobs enqueued (accepted).
    pub long_enqueued: Vec<i64>,
    /// The long jobs judged ([`crate::long_job::check`]; every one must complete).
    pub long: crate::long_job::LongReport,
}

/// An account whose next runnable job stayed unstarted too long.
#[derive(Debug, Clone)]
pub struct LivenessViolation {
    /// `unstarted` (the due head is not running), or, for a head left `running`
    /// with nothing executing it: `claimed, handler never started`, `handler
    /// ended, still running` or `handler open past its timeout`.
    pub what: &'static str,
    pub account: String,
    pub job_id: i64,
    pub partition: i32,
    /// The lease holder (`node/generation`) and epoch all along.
    pub owner: String,
    pub epoch: i64,
    /// Harness time when first seen.
    pub seen_at_s: f64,
    /// How long the job had been ready and unstarted (or, for a stalled running
    /// head, without a live handler), at the last tick it was seen (infinite for a
    /// due time of `-infinity`).
    pub ready_for_s: f64,
    /// How long the monitor had seen the partition held by that (owner, epoch).
    pub held_for_s: f64,
}

impl std::fmt::Display for LivenessViolation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let acct: String = self.account.chars().take(40).collect();
        write!(
            f,
            "[{:>7.2}s] account {:?} job {} (partition {}, held by {} epoch {} for {:.1}s): {} for {:.1}s",
            self.seen_at_s,
            acct,
            self.job_id,
            self.partition,
            self.owner,
            self.epoch,
            self.held_for_s,
            if self.what == "unstarted" { "ready and unstarted" } else { self.what },
            self.ready_for_s
        )
    }
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
            "| overlapping handler runs (by the database and the handlers' clock; by the database clock alone: end rows delivered late) | {} ({}) |\n",
            self.audit.run_overlaps, self.audit.run_overlaps_db_clock
        );
        s += &format!(
            "| handler runs recorded / without an end (dropped mid-run) | {} / {} |\n",
            self.audit.runs, self.audit.runs_without_end
        );
        s += &format!(
            "| order violations (attempts table / audit log) | {} / {} |\n",
            self.history.order_violations, self.audit.order_violations
        );
        s += &format!(
            "| liveness violations (due work unstarted, or claimed and not running, > {:.1}s while its partition was held; {} checks) | {} |\n",
            LIVENESS_BOUND.as_secs_f64(),
            self.liveness_ticks,
            self.liveness_violations.len()
        );
        s += &format!("| longest stretch a partition was held by nobody (s) | {:.1} |\n", self.max_ownerless_s);
        s += &format!("| long jobs completed / enqueued | {} / {} |\n", self.long.completed, self.long_enqueued.len());
        s += &format!(
            "| long-job resumes / most steps one resume redid (checkpoint interval) | {} / {} ({}) |\n",
            self.long.resumes, self.long.max_redone, self.long.max_interval
        );
        s += &format!(
            "| long-job violations (lost, overlap, late write, wrong resume, redone > interval) | {} |\n",
            self.long.problems.len() + self.long_missing().len()
        );
        s += &format!(
            "| long-job step rows delivered late by the network (sent in time; not a failure) | {} |\n",
            self.long.delayed_rows
        );
        let via_sql = self.hostile_accepted.iter().filter(|h| h.starts_with("warden.enqueue")).count();
        s += &format!(
            "| hostile values accepted (SQL function / Rust client) | {} of {} / {} of {} |\n",
            via_sql,
            self.hostile_tried.0,
            self.hostile_accepted.len() - via_sql,
            self.hostile_tried.1
        );
        s += &format!(
            "| extreme valid values rejected / not ended as they must | {} / {} of {} |\n",
            self.extreme_rejected.len(),
            self.extreme_wrong_end.len(),
            self.extreme_tried
        );
        s += &format!(
            "| jobs cancelled without a cancel request (spoofed running jobs / all) | {} of {} / {} |\n",
            self.spoofed_cancelled, self.spoofed_running_jobs, self.cancelled_without_request
        );
        s += &format!("| spoofed NOTIFYs sent (unprivileged role) | {} |\n", self.notifies_sent);
        s += &format!("| connections reset by reply loss | {} |\n", self.reply_resets);
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
        for h in &self.hostile_accepted {
            s += &format!("\nhostile value accepted: {h}");
        }
        for e in &self.extreme_rejected {
            s += &format!("\nextreme valid value rejected: {e}");
        }
        for e in &self.extreme_wrong_end {
            s += &format!("\nextreme valid job ended wrong: {e}");
        }
        const SHOWN: usize = 20;
        for v in self.liveness_violations.iter().take(SHOWN) {
            s += &format!("\nliveness violation: {v}");
        }
        if self.liveness_violations.len() > SHOWN {
            s += &format!("\n… and {} more liveness violations", self.liveness_violations.len() - SHOWN);
        }
        for o in &self.run_overlap_examples {
            s += &format!("\noverlapping handler runs: {o}");
        }
        for id in self.long_missing() {
            s += &format!("\nlong job {id} was accepted and is missing");
        }
        for p in self.long.problems.iter().take(SHOWN) {
            s += &format!("\nlong job: {p}");
        }
        s
    }

    /// Long jobs accepted that are not in the table.
    fn long_missing(&self) -> Vec<i64> {
        let judged: BTreeSet<i64> = self.long.traces.iter().map(|t| t.job_id).collect();
        self.long_enqueued.iter().copied().filter(|id| !judged.contains(id)).collect()
    }

    pub fn is_clean(&self) -> bool {
        self.lost == 0
            && self.check_failures.is_empty()
            && self.history.is_clean()
            && self.audit.duplicate_jobs == 0
            && self.audit.overlaps == 0
            && self.audit.order_violations == 0
            && self.audit.run_overlaps == 0
            && self.liveness_violations.is_empty()
            && self.hostile_accepted.is_empty()
            && self.extreme_rejected.is_empty()
            && self.extreme_wrong_end.is_empty()
            && self.spoofed_cancelled == 0
            && self.cancelled_without_request == 0
            && self.long.is_clean()
            && self.long_missing().is_empty()
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
    /// For `ms`, each reply chunk PostgreSQL sends the node is lost with probability
    /// `per_mille`/1000 and its connection reset: the statement (maybe a `COMMIT`)
    /// ran, the node sees an error.
    ReplyLoss { node: String, ms: u64, per_mille: u32 },
    /// For `ms`, every reply to the node is held back `delay_ms` (statements still
    /// run on time, at PostgreSQL).
    ReplyDelay { node: String, ms: u64, delay_ms: u64 },
    /// For `ms`, the unprivileged role `mallory` sends NOTIFYs on `warden_wake`,
    /// `warden_cancel` and `warden_lease`: real accounts with the wrong and the right
    /// partition, garbage, payloads of ~7,900 bytes, thousands of made-up accounts,
    /// and cancels of jobs running right now with no cancel requested (none of them
    /// may end cancelled).
    NotifyFlood { ms: u64 },
    /// Enqueue hostile values that must be rejected (infinite and far-future run_at,
    /// control characters in account, kind and unique key, out-of-range timeouts and
    /// attempts, oversized args, empty account, ...) through the SQL function and the
    /// Rust client, and extreme valid values that must be accepted and finish.
    HostileEnqueue,
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
            Step::ReplyLoss { .. } => "reply-loss",
            Step::ReplyDelay { .. } => "reply-delay",
            Step::NotifyFlood { .. } => "notify-flood",
            Step::HostileEnqueue => "hostile-enqueue",
            Step::Quiet { .. } => "quiet",
            Step::ExpectOwned => "expect-owned",
        }
    }

    fn is_fault(&self) -> bool {
        !matches!(self, Step::Quiet { .. } | Step::ExpectOwned | Step::Restart { .. })
    }
}

/// Fault kinds [`random_step`] draws from.
const STEP_KINDS: u8 = 13;

/// Draw the next fault from the seed, given the running nodes (sorted). `None`: skip
/// this round (the drawn fault does not fit the cluster's size).
///
/// Kinds come from a shuffled bag (`bag`, refilled with every kind when empty), so
/// each kind occurs once in every [`STEP_KINDS`] draws, whatever their number: new
/// kinds cannot crowd out old ones. The bag is drawn from `rng` too, so a seed
/// still reproduces the run.
pub fn random_step(rng: &mut fastrand::Rng, bag: &mut Vec<u8>, running: &[String]) -> Option<Step> {
    if bag.is_empty() {
        bag.extend(0..STEP_KINDS);
        rng.shuffle(bag);
    }
    let kind = bag.pop().expect("refilled above");
    let victim = running[rng.usize(..running.len())].clone();
    Some(match kind {
        0 => Step::SigKillRestart { node: victim, down_ms: rng.u64(200..1500) },
        1 => Step::SigStop { node: victim, ms: rng.u64(2500..4500) },
        2 => Step::SigTermRestart { node: victim },
        // Up to 8 s: longer than a lease TTL plus the liveness bound, so a cut-off
        // holder that kept its ring share would leave its partitions held by nobody
        // past the bound (it used to, for the whole cut).
        3 => Step::DbCut { node: victim, ms: rng.u64(1000..8000) },
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
        8 if running.len() > 2 => {
            // n1 carries the gossip seed address; keep it.
            let others: Vec<&String> = running.iter().filter(|n| *n != "n1").collect();
            Step::ScaleIn { node: others[rng.usize(..others.len())].clone() }
        }
        9 => Step::ReplyLoss { node: victim, ms: rng.u64(1000..4000), per_mille: rng.u32(30..=100) },
        10 => Step::ReplyDelay { node: victim, ms: rng.u64(1000..4000), delay_ms: rng.u64(100..2500) },
        11 => Step::NotifyFlood { ms: rng.u64(1000..3000) },
        12 => Step::HostileEnqueue,
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
    /// Set once the first nodes have created the schema.
    client: Option<warden_runtime::Client>,
    /// A pool of the unprivileged role `mallory` (spoofed NOTIFYs).
    mallory: sqlx::PgPool,
    /// The workload's accounts (named by spoofed wake-ups).
    real_accounts: Vec<String>,
    /// Running jobs whose cancel was spoofed.
    spoofed: BTreeSet<i64>,
    /// Jobs of hostile values that were wrongly accepted (not waited for at the end).
    hostile_ids: Vec<i64>,
    /// Extreme valid jobs: id, what it is, the state it must end in.
    extreme: Vec<(i64, String, &'static str)>,
    /// NotifyFlood and HostileEnqueue rounds so far (they name their accounts).
    rounds: u64,
    /// Set while a PgRestart step runs; `pg_generation` counts restarts (the liveness
    /// monitor forgets what it saw of leases across one).
    pg_restarting: Arc<AtomicBool>,
    pg_generation: Arc<AtomicU64>,
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
                self.pg_restarting.store(true, Ordering::Release);
                self.pg.stop();
                tokio::time::sleep(Duration::from_millis(down_ms)).await;
                self.pg.restart();
                self.pg_generation.fetch_add(1, Ordering::AcqRel);
                self.pg_restarting.store(false, Ordering::Release);
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
                if let Some(m) = self.members.remove(&node) {
                    self.report.reply_resets += m.proxy.resets();
                }
            }
            Step::ReplyLoss { node, ms, per_mille } => {
                self.log(kind, format!("{node}: {per_mille}‰ of reply chunks lost (connection reset), for {ms}ms"));
                self.members[&node].proxy.reply_loss(per_mille);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                self.members[&node].proxy.reply_loss(0);
            }
            Step::ReplyDelay { node, ms, delay_ms } => {
                self.log(kind, format!("{node}: replies held back {delay_ms}ms, for {ms}ms"));
                self.members[&node].proxy.reply_delay(delay_ms);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                self.members[&node].proxy.reply_delay(0);
            }
            Step::NotifyFlood { ms } => {
                self.log(kind, format!("from role mallory, for {ms}ms"));
                self.notify_flood(ms).await;
            }
            Step::HostileEnqueue => {
                self.log(kind, "SQL function and Rust client".into());
                self.hostile_enqueue().await;
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

    fn note(&mut self, line: String) {
        let line = format!("[{:>7.2}s] {line}", self.started.elapsed().as_secs_f64());
        eprintln!("{line}");
        self.report.fault_log.push(line);
    }

    /// [`Step::NotifyFlood`]: batches of spoofed NOTIFYs every 100 ms for `ms`.
    async fn notify_flood(&mut self, ms: u64) {
        use warden_runtime::store::{CHANNEL_CANCEL, CHANNEL_LEASE, CHANNEL_WAKE};
        self.rounds += 1;
        let round = self.rounds;
        let mut rng = fastrand::Rng::with_seed(self.cfg.seed ^ 0xf100d ^ round.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let parts = warden_runtime::PartitionCount::new(PARTITIONS as u32).unwrap();
        let np = PARTITIONS as u32;
        let deadline = Instant::now() + Duration::from_millis(ms);
        let (mut sent, mut failed, mut ghosts, mut cancels) = (0u64, 0u32, 0u64, 0usize);
        let mut first_error = None;
        while Instant::now() < deadline {
            let mut n: Vec<(&'static str, String)> = Vec::new();
            // Cancels of jobs running right now, for which nobody asked a cancel: the
            // nodes must ignore them (the payload is not the database's word).
            let running: Vec<(i64, i32, String)> = sqlx::query_as(
                "SELECT id, partition, account FROM warden.jobs
                 WHERE state = 'running' AND NOT cancel_requested ORDER BY id LIMIT 200",
            )
            .fetch_all(&self.pool)
            .await
            .unwrap_or_default();
            for (id, p, a) in &running {
                if self.spoofed.insert(*id) {
                    cancels += 1;
                }
                n.push((CHANNEL_CANCEL, format!("{p}:{id}:{a}")));
                n.push((CHANNEL_CANCEL, format!("{}:{id}:{a}", (*p as u32 + 1) % np)));
            }
            // Real accounts with the wrong partition (a node holding that partition must
            // not run the account under it) and with the right one (a harmless extra wake).
            for _ in 0..16 {
                let a = &self.real_accounts[rng.usize(..self.real_accounts.len())];
                let p = warden_runtime::partition_of(a, parts);
                n.push((CHANNEL_WAKE, format!("{}:{a}", (p + rng.u32(1..np)) % np)));
                n.push((CHANNEL_WAKE, format!("{p}:{a}")));
            }
            // Garbage, on every channel.
            let a = self.real_accounts[rng.usize(..self.real_accounts.len())].clone();
            let p = warden_runtime::partition_of(&a, parts);
            let noise: String = (0..rng.usize(1..64)).map(|_| rng.char(' '..='~')).collect();
            let garbage = [
                String::new(),
                ":".into(),
                "::".into(),
                "garbage".into(),
                "abc:def".into(),
                format!("-1:{a}"),
                format!("{np}:{a}"),
                format!("{}:{a}", u32::MAX),
                format!("99999999999999999999:{a}"),
                format!("{p}:"),
                format!("{p}:{a}:extra"),
                format!("\u{1F600}:{a}"),
                format!("{p}:ghost\u{301}\u{200B}"),
                "1:2:3:4".into(),
                format!("x:1:{a}"),
                format!("{p}:-5:{a}"),
                format!("{p}:{}:{a}", i64::MAX),
                format!("{p}:0:{a}"),
                format!(" {p}:{a}"),
                format!("{p} :{a}"),
                format!("0x1:{a}"),
                noise,
            ];
            for g in garbage {
                for ch in [CHANNEL_WAKE, CHANNEL_CANCEL, CHANNEL_LEASE] {
                    n.push((ch, g.clone()));
                }
            }
            // Payloads near PostgreSQL's 8,000-byte limit.
            let id = running.first().map(|r| r.0).unwrap_or(1);
            n.push((CHANNEL_WAKE, format!("{p}:{a}{}", "x".repeat(7_900))));
            n.push((CHANNEL_WAKE, format!("{p}:{}", "x".repeat(7_900))));
            n.push((CHANNEL_CANCEL, format!("{p}:{id}:{}", "y".repeat(7_880))));
            n.push((CHANNEL_LEASE, "z".repeat(7_900)));
            // Many distinct made-up accounts, each with its own partition: every holder
            // gets wake-ups for accounts that have no work (they must stay bounded).
            for _ in 0..120 {
                let g = format!("ghost-{round}-{ghosts}");
                ghosts += 1;
                n.push((CHANNEL_WAKE, format!("{}:{g}", warden_runtime::partition_of(&g, parts))));
            }
            let count = n.len() as u64;
            let (chans, payloads): (Vec<String>, Vec<String>) = n.into_iter().map(|(c, p)| (c.to_string(), p)).unzip();
            match sqlx::query("SELECT pg_notify(c, p) FROM unnest($1::text[], $2::text[]) AS t(c, p)")
                .bind(chans)
                .bind(payloads)
                .execute(&self.mallory)
                .await
            {
                Ok(_) => sent += count,
                Err(e) => {
                    failed += 1;
                    first_error.get_or_insert(e.to_string());
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.report.notifies_sent += sent;
        self.report.spoofed_running_jobs = self.spoofed.len();
        self.note(format!(
            "notify-flood: {sent} NOTIFYs sent ({failed} batches failed{}), cancels spoofed for {cancels} running jobs, {ghosts} made-up accounts",
            first_error.map(|e| format!(": {e}")).unwrap_or_default()
        ));
    }

    /// [`Step::HostileEnqueue`]: hostile values (each must be rejected) and extreme
    /// valid ones (each must be accepted and finish), through the SQL function and
    /// the Rust client. Nothing accepted is deleted or cancelled.
    async fn hostile_enqueue(&mut self) {
        self.rounds += 1;
        let round = self.rounds;
        let acct = format!("hostile-{round}");
        let audit = serde_json::json!({ "seq": 0 });
        let big = serde_json::json!({ "seq": 0, "pad": "x".repeat(70_000) });
        // The hostile values. Through the SQL function (named arguments as SQL, the
        // strings bound as parameters; PostgreSQL takes no NUL in text, so chr(1) and
        // DEL stand in for it there):
        let e = |account: &str, kind: &str| SqlEnqueue::new(account, kind, audit.clone());
        let sql_cases: Vec<(&str, SqlEnqueue)> = vec![
            ("run_at 'infinity'", e(&acct, "audit").extra(", p_run_at => 'infinity'")),
            ("run_at '-infinity'", e(&acct, "audit").extra(", p_run_at => '-infinity'")),
            ("run_at '294000-01-01'", e(&acct, "audit").extra(", p_run_at => '294000-01-01'")),
            ("run_at now + 50 years", e(&acct, "audit").extra(", p_run_at => now() + interval '50 years'")),
            ("account with \\n", e(&format!("{acct}\n"), "audit")),
            ("account with \\t", e(&format!("{acct}\t"), "audit")),
            ("account with chr(1)", e(&format!("{acct}\u{1}"), "audit")),
            ("account with DEL", e(&format!("{acct}\u{7f}"), "audit")),
            ("account empty", e("", "audit")),
            ("account of 257 bytes", e(&pad_to(&acct, 'a', 257), "audit")),
            ("kind with \\n", e(&acct, "audit\n")),
            ("kind with chr(1)", e(&acct, "audit\u{1}")),
            ("kind empty", e(&acct, "")),
            ("unique_key with \\n", e(&acct, "audit").unique_key(&format!("{round}-nl\n"))),
            ("unique_key with \\t", e(&acct, "audit").unique_key(&format!("{round}-tab\t"))),
            ("unique_key with chr(1)", e(&acct, "audit").unique_key(&format!("{round}-soh\u{1}"))),
            ("unique_key of 257 bytes", e(&acct, "audit").unique_key(&pad_to(&round.to_string(), 'k', 257))),
            ("timeout_ms 0", e(&acct, "audit").extra(", p_timeout_ms => 0")),
            ("timeout_ms -1", e(&acct, "audit").extra(", p_timeout_ms => -1")),
            ("timeout_ms 86400001 (24 h + 1 ms)", e(&acct, "audit").extra(", p_timeout_ms => 86400001")),
            ("timeout_ms 2147483647", e(&acct, "audit").extra(", p_timeout_ms => 2147483647")),
            ("max_attempts 0", e(&acct, "audit").extra(", p_max_attempts => 0")),
            ("max_attempts -1", e(&acct, "audit").extra(", p_max_attempts => -1")),
            ("max_attempts 1001", e(&acct, "audit").extra(", p_max_attempts => 1001")),
            ("args over 64 KiB", SqlEnqueue::new(&acct, "audit", big.clone())),
            ("lane 'bogus'", e(&acct, "audit").extra(", p_lane => 'bogus'")),
        ];
        // Through the Rust client (a negative timeout does not exist there: Duration).
        let j = |account: &str, kind: &str| warden_runtime::NewJob::new(account, kind, &audit).unwrap();
        let now = chrono::Utc::now();
        let rust_cases: Vec<(&str, warden_runtime::NewJob)> = vec![
            ("run_at now + 50 years", j(&acct, "audit").run_at(now + chrono::Duration::days(50 * 365))),
            (
                "run_at the latest chrono time (year 262143)",
                j(&acct, "audit").run_at(chrono::DateTime::<chrono::Utc>::MAX_UTC),
            ),
            ("run_at the earliest chrono time", j(&acct, "audit").run_at(chrono::DateTime::<chrono::Utc>::MIN_UTC)),
            ("delay 50 years", j(&acct, "audit").delay(Duration::from_secs(50 * 365 * 24 * 3600))),
            ("account with \\n", j(&format!("{acct}\n"), "audit")),
            ("account with \\t", j(&format!("{acct}\t"), "audit")),
            ("account with NUL", j(&format!("{acct}\0"), "audit")),
            ("account empty", j("", "audit")),
            ("account of 257 bytes", j(&pad_to(&acct, 'a', 257), "audit")),
            ("kind with \\n", j(&acct, "audit\n")),
            ("kind with NUL", j(&acct, "audit\0")),
            ("unique_key with \\n", j(&acct, "audit").unique_key(format!("{round}-nl\n"))),
            ("unique_key with \\t", j(&acct, "audit").unique_key(format!("{round}-tab\t"))),
            ("unique_key with NUL", j(&acct, "audit").unique_key(format!("{round}-nul\0"))),
            ("timeout 0", j(&acct, "audit").timeout(Duration::ZERO)),
            ("timeout 24 h + 1 ms", j(&acct, "audit").timeout(Duration::from_millis(86_400_001))),
            ("max_attempts 0", j(&acct, "audit").max_attempts(0)),
            ("max_attempts -1", j(&acct, "audit").max_attempts(-1)),
            ("max_attempts 1001", j(&acct, "audit").max_attempts(1001)),
            ("args over 64 KiB", warden_runtime::NewJob::new(&acct, "audit", &big).unwrap()),
            (
                "args with a \\u0000 string",
                warden_runtime::NewJob::new(&acct, "audit", serde_json::json!({ "seq": 0, "nul": "a\u{0}b" })).unwrap(),
            ),
        ];
        let hostile_n = sql_cases.len() + rust_cases.len();
        let (mut accepted, mut unavailable) = (0, Vec::new());
        for (label, c) in &sql_cases {
            self.report.hostile_tried.0 += 1;
            match try_sql(&self.pool, c).await {
                Tried::Accepted(id) => {
                    accepted += 1;
                    self.hostile_ids.push(id);
                    self.report.hostile_accepted.push(format!("warden.enqueue: {label} → job {id}"));
                }
                Tried::Rejected(_) => {}
                Tried::Unavailable(e) => unavailable.push(format!("SQL {label}: {e}")),
            }
        }
        for (label, job) in rust_cases {
            self.report.hostile_tried.1 += 1;
            match try_client(self.client.as_ref().expect("client"), job).await {
                Tried::Accepted(id) => {
                    accepted += 1;
                    self.hostile_ids.push(id);
                    self.report.hostile_accepted.push(format!("Client::enqueue: {label} → job {id}"));
                }
                Tried::Rejected(_) => {}
                Tried::Unavailable(e) => unavailable.push(format!("Rust {label}: {e}")),
            }
        }
        // A valid job behind them: it must finish (an accepted hostile job that cannot
        // be run, at the head of the account, would hold it back: lost, and a liveness
        // violation).
        let client = self.client.clone().expect("client");
        let sentinel = try_client(&client, j(&acct, "audit")).await;

        // Extreme but valid values: each through both entries, on an account of its own.
        let mut i = 0;
        let mut next = || {
            i += 1;
            format!("xtreme-{round}-{i}")
        };
        // Args just under the 64 KiB limit, by either count (compact JSON, or jsonb's
        // text with its spaces): ~65,000 bytes. AuditArgs ignores the unknown field.
        let near = serde_json::json!({ "seq": 0, "sleep_ms": 0, "fail_times": 0, "pad": "p".repeat(65_000) });
        let mut ascii_acct = || pad_to(&next(), 'a', 256);
        let (a1, a2) = (ascii_acct(), ascii_acct());
        let (m1, m2) = (pad_to(&next(), 'ü', 256), pad_to(&next(), 'ü', 256));
        let key = |tag: &str, c: char| pad_to(&format!("{round}-{tag}-"), c, 256);
        let long_kind = pad_to("xtreme-kind-", 'q', 128);
        let sql_extreme: Vec<(&str, SqlEnqueue, &'static str)> = vec![
            ("account of 256 ASCII bytes", e(&a1, "audit"), "completed"),
            ("account of 256 bytes, 2-byte characters", e(&m1, "audit"), "completed"),
            ("unique_key of 256 ASCII bytes", e(&next(), "audit").unique_key(&key("sql", 'k')), "completed"),
            (
                "unique_key of 256 bytes, 2-byte characters",
                e(&next(), "audit").unique_key(&key("sql", 'é')),
                "completed",
            ),
            ("args just under 64 KiB", SqlEnqueue::new(&next(), "audit", near.clone()), "completed"),
            ("unknown kind", e(&next(), "xtreme-unknown-kind"), "discarded"),
            ("kind of 128 bytes (unknown)", e(&next(), &long_kind), "discarded"),
            ("priority -32768", e(&next(), "audit").extra(", p_priority => (-32768)::smallint"), "completed"),
            ("priority 32767", e(&next(), "audit").extra(", p_priority => 32767::smallint"), "completed"),
            ("max_attempts 1000", e(&next(), "audit").extra(", p_max_attempts => 1000"), "completed"),
            ("timeout_ms 86400000 (24 h)", e(&next(), "audit").extra(", p_timeout_ms => 86400000"), "completed"),
            ("run_at in 2 s", e(&next(), "audit").extra(", p_run_at => now() + interval '2 seconds'"), "completed"),
            ("run_at a day ago", e(&next(), "audit").extra(", p_run_at => now() - interval '1 day'"), "completed"),
        ];
        let rust_extreme: Vec<(&str, warden_runtime::NewJob, &'static str)> = vec![
            ("account of 256 ASCII bytes", j(&a2, "audit"), "completed"),
            ("account of 256 bytes, 2-byte characters", j(&m2, "audit"), "completed"),
            ("unique_key of 256 ASCII bytes", j(&next(), "audit").unique_key(key("rs", 'k')), "completed"),
            ("unique_key of 256 bytes, 2-byte characters", j(&next(), "audit").unique_key(key("rs", 'é')), "completed"),
            ("args just under 64 KiB", warden_runtime::NewJob::new(next(), "audit", &near).unwrap(), "completed"),
            ("unknown kind", j(&next(), "xtreme-unknown-kind"), "discarded"),
            ("kind of 128 bytes (unknown)", j(&next(), &long_kind), "discarded"),
            ("priority i16::MIN", j(&next(), "audit").priority(i16::MIN), "completed"),
            ("priority i16::MAX", j(&next(), "audit").priority(i16::MAX), "completed"),
            ("max_attempts 1000", j(&next(), "audit").max_attempts(1000), "completed"),
            ("timeout 24 h", j(&next(), "audit").timeout(Duration::from_secs(24 * 3600)), "completed"),
            (
                "run_at in 2 s",
                j(&next(), "audit").run_at(chrono::Utc::now() + chrono::Duration::seconds(2)),
                "completed",
            ),
            ("delay 2 s", j(&next(), "audit").delay(Duration::from_secs(2)), "completed"),
            (
                "run_at a day ago",
                j(&next(), "audit").run_at(chrono::Utc::now() - chrono::Duration::days(1)),
                "completed",
            ),
        ];
        let extreme_n = sql_extreme.len() + rust_extreme.len();
        let mut extreme_ok = 0;
        for (label, c, end) in &sql_extreme {
            self.report.extreme_tried += 1;
            match try_sql(&self.pool, c).await {
                Tried::Accepted(id) => {
                    extreme_ok += 1;
                    self.extreme.push((id, format!("warden.enqueue: {label}"), end));
                }
                Tried::Rejected(err) => self.report.extreme_rejected.push(format!("warden.enqueue: {label}: {err}")),
                Tried::Unavailable(e) => unavailable.push(format!("SQL {label}: {e}")),
            }
        }
        for (label, job, end) in rust_extreme {
            self.report.extreme_tried += 1;
            match try_client(&client, job).await {
                Tried::Accepted(id) => {
                    extreme_ok += 1;
                    self.extreme.push((id, format!("Client::enqueue: {label}"), end));
                }
                Tried::Rejected(err) => self.report.extreme_rejected.push(format!("Client::enqueue: {label}: {err}")),
                Tried::Unavailable(e) => unavailable.push(format!("Rust {label}: {e}")),
            }
        }
        self.note(format!(
            "hostile-enqueue: {accepted} of {hostile_n} hostile values accepted (must be 0), {extreme_ok} of {extreme_n} extreme valid ones accepted (must be all), sentinel job on {acct}: {sentinel:?}{}",
            if unavailable.is_empty() { String::new() } else { format!("; not tried (database unavailable): {unavailable:?}") }
        ));
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

    /// After a join, only what the new node takes may move (sticky placement: nothing
    /// moves between the members that stayed, and the joiner takes at least its
    /// share, ⌊P/N⌋), and every partition whose owner did not change must keep its
    /// lease epoch: it was never released, so it never paused.
    fn check_scale_out(
        &mut self,
        new: &str,
        before: &BTreeMap<i32, (String, i64)>,
        after: &BTreeMap<i32, (String, i64)>,
    ) {
        let members = self.running().len().max(1);
        let share = PARTITIONS / members;
        let taken = after.values().filter(|(o, _)| o == new).count();
        if taken < share {
            self.fail(format!("scale-out: {new} holds {taken} partitions, below its share {share}"));
        }
        let mut to_new = 0;
        for (p, (owner, epoch)) in after {
            let Some((old_owner, old_epoch)) = before.get(p) else { continue };
            if owner != old_owner && owner != new {
                self.fail(format!("scale-out: partition {p} moved between old members ({old_owner} → {owner})"));
            }
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
    let mut bag = Vec::new();
    let pg = PrivatePg::start();
    let pg_addr: std::net::SocketAddr = format!("127.0.0.1:{}", pg.port).parse().unwrap();
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(4).connect(&pg.url()).await.unwrap();
    // The unprivileged role of the NotifyFlood step: may log in (the private server
    // trusts local connections), is granted nothing on schema `warden`.
    sqlx::raw_sql(
        "DO $$ BEGIN
             IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'mallory') THEN
                 CREATE ROLE mallory LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE;
             END IF;
         END $$",
    )
    .execute(&pool)
    .await
    .expect("create role mallory");
    let mallory = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(2))
        .connect_lazy(&format!("postgres://mallory@127.0.0.1:{}/postgres", pg.port))
        .unwrap();
    let mut real_accounts: Vec<String> = (0..cfg.accounts).map(|a| format!("acct-{a}")).collect();
    real_accounts.extend((0..4).map(|r| format!("race-{r}")));
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
        client: None,
        mallory,
        real_accounts,
        spoofed: BTreeSet::new(),
        hostile_ids: Vec::new(),
        extreme: Vec::new(),
        rounds: 0,
        pg_restarting: Arc::new(AtomicBool::new(false)),
        pg_generation: Arc::new(AtomicU64::new(0)),
    };
    for _ in 0..3 {
        h.add_member().await;
    }
    let client = warden_runtime::Client::connect(pool.clone()).await.unwrap();
    h.client = Some(client.clone());
    // Mallory must not reach Warden's tables or functions (only NOTIFY, which any role may).
    for what in ["SELECT count(*) FROM warden.jobs", "SELECT warden.enqueue('acct-0', 'audit')"] {
        if let Ok(r) = sqlx::query(what).execute(&h.mallory).await {
            h.fail(format!("role mallory (no grants) could run `{what}`: {r:?}"));
        }
    }

    // Liveness, checked continuously until the end-of-run drain is over.
    let live_stop = tokio_util::sync::CancellationToken::new();
    let liveness = tokio::spawn(liveness_monitor(
        h.pg.url(),
        h.pg_restarting.clone(),
        h.pg_generation.clone(),
        h.started,
        live_stop.clone(),
    ));

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
                // A fifth of the handlers work 0–200 ms (a pause catches them mid-run);
                // the rest are short, to keep throughput up.
                let sleep_ms = if wrng.u8(..5) == 0 { wrng.u64(0..=200) } else { wrng.u64(0..20) };
                let args = crate::workload::AuditArgs {
                    seq: seqs[a],
                    sleep_ms,
                    fail_times: if wrng.u8(..) < 15 { 1 } else { 0 },
                    ..Default::default()
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
                    let args = crate::workload::AuditArgs {
                        seq: 0,
                        sleep_ms: rng.u64(0..10),
                        fail_times: 0,
                        ..Default::default()
                    };
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

    // Long jobs: 15–30 s of 200 ms steps, a checkpoint every second, one every
    // `every` on its own account, so that the last ends before a random run does.
    let (c3, stop3, long_jobs) = (client.clone(), stop.clone(), cfg.long_jobs);
    let every = match &cfg.schedule {
        Schedule::Random { duration } => (*duration / (2 * long_jobs.max(1) as u32)).max(Duration::from_secs(5)),
        Schedule::Script(_) => Duration::from_secs(15),
    };
    let long_producer = tokio::spawn(async move {
        let mut lrng = fastrand::Rng::with_seed(seed ^ 0x1005);
        let mut ids = Vec::new();
        for n in 0..long_jobs {
            let total = Duration::from_millis(lrng.u64(15_000..=30_000));
            let args = crate::long_job::LongArgs::new(total, Duration::from_secs(1), Duration::from_millis(200));
            let job = warden_runtime::NewJob::new(format!("long-{n}"), crate::long_job::KIND, &args).unwrap();
            // Until accepted (the database may be restarting), or the run ends.
            while !stop3.is_cancelled() {
                match c3.enqueue(job.clone()).await {
                    Ok(e) => {
                        ids.push(e.id);
                        break;
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
                }
            }
            tokio::select! {
                _ = stop3.cancelled() => break,
                _ = tokio::time::sleep(every) => {}
            }
        }
        ids
    });

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
                match random_step(&mut rng, &mut bag, &h.running()) {
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
    report.long_enqueued = long_producer.await.unwrap();
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(4).connect(&h.pg.url()).await.unwrap();
    // Drain: wait for every job to finish, except hostile values that were wrongly
    // accepted (counted apart; one may never be due). Give up after 120 s, or after
    // 30 s in which no job finished (the cluster is stuck: the rest is lost).
    let hostile_ids = h.hostile_ids.clone();
    let drain_started = Instant::now();
    let deadline = drain_started + Duration::from_secs(120);
    let (mut last_unfinished, mut progress_at) = (i64::MAX, Instant::now());
    // A long job works for many seconds without finishing: its steps count as progress.
    let mut last_step = 0i64;
    loop {
        let step: i64 =
            sqlx::query_scalar("SELECT COALESCE(max(id), 0) FROM long_steps").fetch_one(&pool).await.unwrap_or(0);
        if step > last_step {
            (last_step, progress_at) = (step, Instant::now());
        }
        let unfinished: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM warden.jobs
             WHERE state IN ('scheduled', 'available', 'retryable', 'running') AND id <> ALL($1)",
        )
        .bind(&hostile_ids)
        .fetch_one(&pool)
        .await
        .unwrap_or(i64::MAX);
        if unfinished < last_unfinished {
            (last_unfinished, progress_at) = (unfinished, Instant::now());
        }
        if unfinished == 0 || Instant::now() > deadline || progress_at.elapsed() > Duration::from_secs(30) {
            report.lost = unfinished;
            let line = format!(
                "[{:>7.2}s] drain: {} s, {unfinished} jobs left unfinished",
                h.started.elapsed().as_secs_f64(),
                drain_started.elapsed().as_secs()
            );
            eprintln!("{line}");
            report.fault_log.push(line);
            if unfinished > 0 {
                let rows: Vec<(i64, String, String, String)> = sqlx::query_as(
                    "SELECT id, left(account, 40), state, COALESCE(left(last_error, 200), '')
                     FROM warden.jobs WHERE state IN ('scheduled', 'available', 'retryable', 'running')
                       AND id <> ALL($1) ORDER BY id LIMIT 10",
                )
                .bind(&hostile_ids)
                .fetch_all(&pool)
                .await
                .unwrap_or_default();
                for r in rows {
                    eprintln!("unfinished at the end: job {} account {:?} {} {}", r.0, r.1, r.2, r.3);
                }
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The liveness monitor watched the drain too: with no faults left, a stall there
    // is plain (and stuck work is otherwise only seen as "lost").
    live_stop.cancel();
    (report.liveness_violations, report.liveness_ticks, report.max_ownerless_s) = liveness.await.unwrap();
    // Accepted jobs missing from the table would be lost too (the workload's own
    // accounts only: hostile and extreme jobs are not in `enqueued`).
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM warden.jobs WHERE account ~ '^(acct|race)-[0-9]+$'")
        .fetch_one(&pool)
        .await
        .unwrap();
    report.lost += (report.enqueued - total).max(0);
    // Extreme valid jobs must have ended as they must.
    for (id, what, end) in &h.extreme {
        let state: Option<(String, Option<String>)> =
            sqlx::query_as("SELECT state, last_error FROM warden.jobs WHERE id = $1")
                .bind(id)
                .fetch_optional(&pool)
                .await
                .unwrap_or(None);
        match state {
            Some((s, _)) if s == *end => {}
            Some((s, err)) => report.extreme_wrong_end.push(format!(
                "{what} (job {id}) is {s}, must be {end}{}",
                err.map(|e| format!(": {}", e.chars().take(200).collect::<String>())).unwrap_or_default()
            )),
            None => report.extreme_wrong_end.push(format!("{what} (job {id}) is missing")),
        }
    }
    // Spoofed cancels must not have cancelled anything; nor may anything else (the
    // harness never asks for a cancel).
    let spoofed: Vec<i64> = h.spoofed.iter().copied().collect();
    report.spoofed_running_jobs = spoofed.len();
    report.spoofed_cancelled = sqlx::query_scalar(
        "SELECT count(*) FROM warden.jobs WHERE id = ANY($1) AND state = 'cancelled' AND NOT cancel_requested",
    )
    .bind(&spoofed)
    .fetch_one(&pool)
    .await
    .unwrap();
    report.cancelled_without_request =
        sqlx::query_scalar("SELECT count(*) FROM warden.jobs WHERE state = 'cancelled' AND NOT cancel_requested")
            .fetch_one(&pool)
            .await
            .unwrap();
    if report.cancelled_without_request > 0 {
        let rows: Vec<(i64, String, String)> = sqlx::query_as(
            "SELECT id, left(account, 40), COALESCE(left(last_error, 200), '') FROM warden.jobs
             WHERE state = 'cancelled' AND NOT cancel_requested ORDER BY id LIMIT 10",
        )
        .fetch_all(&pool)
        .await
        .unwrap_or_default();
        for r in rows {
            eprintln!(
                "cancelled without a request: job {} account {:?}{}: {}",
                r.0,
                r.1,
                if h.spoofed.contains(&r.0) { " (cancel spoofed)" } else { "" },
                r.2
            );
        }
    }
    let checks_started = Instant::now();
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
    report.audit = crate::workload::check(&pool).await.unwrap();
    report.long = crate::long_job::check(&pool, true).await.unwrap();
    eprintln!(
        "[{:>7.2}s] history, audit and long-job checks: {} ms",
        h.started.elapsed().as_secs_f64(),
        checks_started.elapsed().as_millis()
    );
    if report.audit.run_overlaps_db_clock > 0 {
        report.run_overlap_examples = crate::workload::run_overlap_examples(&pool, 5).await.unwrap_or_default();
    }
    for m in h.members.values() {
        if let Some(p) = &m.proc_ {
            tally(&mut report, p);
        }
        report.reply_resets += m.proxy.resets();
    }
    drop(h);
    report
}

/// Pad `prefix` with `c` to exactly `bytes` bytes (an ASCII `_` first if `c`'s width
/// does not divide what is left).
fn pad_to(prefix: &str, c: char, bytes: usize) -> String {
    let mut s = prefix.to_string();
    while s.len() < bytes && !(bytes - s.len()).is_multiple_of(c.len_utf8()) {
        s.push('_');
    }
    while s.len() < bytes {
        s.push(c);
    }
    s
}

/// A call of `warden.enqueue`: the strings are bound as parameters, other
/// arguments written as SQL (`extra`, e.g. `", p_run_at => 'infinity'"`).
struct SqlEnqueue {
    account: String,
    kind: String,
    args: serde_json::Value,
    unique_key: Option<String>,
    extra: String,
}

impl SqlEnqueue {
    fn new(account: &str, kind: &str, args: serde_json::Value) -> Self {
        Self { account: account.into(), kind: kind.into(), args, unique_key: None, extra: String::new() }
    }

    fn extra(mut self, sql: &str) -> Self {
        self.extra = sql.into();
        self
    }

    fn unique_key(mut self, key: &str) -> Self {
        self.unique_key = Some(key.into());
        self
    }
}

/// What an entry did with a value.
#[derive(Debug)]
enum Tried {
    Accepted(i64),
    Rejected(String),
    /// The database could not be reached (three tries): no verdict.
    Unavailable(String),
}

/// Errors that say nothing about the value: the connection failed.
fn is_unavailable(e: &sqlx::Error) -> bool {
    matches!(
        e,
        sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
    )
}

async fn try_sql(pool: &sqlx::PgPool, e: &SqlEnqueue) -> Tried {
    let sql = format!(
        "SELECT warden.enqueue(p_account => $1, p_kind => $2, p_args => $3::jsonb{}{})",
        if e.unique_key.is_some() { ", p_unique_key => $4" } else { "" },
        e.extra
    );
    let mut last = String::new();
    for _ in 0..3 {
        let mut q = sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(sql.clone()))
            .bind(&e.account)
            .bind(&e.kind)
            .bind(e.args.to_string());
        if let Some(k) = &e.unique_key {
            q = q.bind(k);
        }
        match q.fetch_one(pool).await {
            Ok(id) => return Tried::Accepted(id),
            Err(err) if is_unavailable(&err) => last = err.to_string(),
            Err(err) => return Tried::Rejected(err.to_string()),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Tried::Unavailable(last)
}

async fn try_client(client: &warden_runtime::Client, job: warden_runtime::NewJob) -> Tried {
    let mut last = String::new();
    for _ in 0..3 {
        match client.enqueue(job.clone()).await {
            Ok(e) => return Tried::Accepted(e.id),
            Err(warden_runtime::Error::Database(err)) if is_unavailable(&err) => last = err.to_string(),
            Err(err @ warden_runtime::Error::Timeout(_)) => last = err.to_string(),
            Err(err) => return Tried::Rejected(err.to_string()),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Tried::Unavailable(last)
}

/// The liveness bound B: lease TTL (2 s in [`NODE_ARGS`]) + enforcer interval
/// (0.5 s) + 2 s of slack. An account's next runnable job may stay unstarted this
/// long while its partition is held; longer is a violation.
///
/// Why faults do not trip it: a holder that cannot run (SIGSTOP, SIGKILL, cut off
/// from the database) stops renewing, so its lease expires within the TTL and the
/// hold the monitor tracks ends (a re-acquire bumps the epoch and starts a new
/// hold); a holder whose replies are late or lost still has its statements run on
/// time — its renewals, and its claims, which make the job `running` in the database
/// at once — and delays stay under 2.5 s; a partition being drained for a handoff
/// keeps its epoch, but a drain lasts at most `--drain-timeout-ms` (2 s) before the
/// lease is released; a lost wake-up is made up by the enforcer within its
/// interval; a PostgreSQL restart stops the checks while it runs and resets the
/// holds after it. Both clocks must exceed B: the job ready that long *and* the
/// partition held by one (owner, epoch) that long, as seen by the monitor.
///
/// No false positive has been seen with this bound on a runtime without the bugs
/// (the fixed scenarios, the CI seed and 4-minute random soaks, debug builds on 2
/// cores); it has not been widened. Each violation seen on the runtime before those
/// fixes was a real stall: a `-infinity` head whose claim could not be decoded,
/// claims whose reply was lost and which nobody adopted, attempts left `running`.
pub const LIVENESS_BOUND: Duration = Duration::from_millis(2000 + 500 + 2000);

/// Accounts whose next runnable serial job has been ready and unstarted longer than
/// $1 seconds: the head in (run_at, id) order among unfinished jobs, not running,
/// due. It became ready at the latest of its due time, its creation (a job enqueued
/// with a run_at in the past is not ready before it exists) and the end of the
/// account's latest finished serial job (before that, an earlier job ran). Times are
/// computed in PostgreSQL as seconds, so no value needs to decode (an accepted
/// `-infinity` due time gives an infinite age).
///
/// And heads left `running` with nothing executing them (a claim whose reply was
/// lost, say, that nobody adopts): an `audit` job (its handler records its runs in
/// `workload_runs`, outside the job transaction) whose current attempt was claimed
/// more than $1 s ago and has no handler run, or whose handler run ended more than
/// $1 s ago, or is still open more than its timeout + $1 s after it started (the
/// runtime dropped it). A handler that is merely slow (its statements' replies held
/// back) has an open run and is left alone.
const LIVENESS_SQL: &str = "
    WITH heads AS MATERIALIZED (
        SELECT DISTINCT ON (account) account, id, partition, state, kind, attempt, timeout_ms,
               due_at, created_at, attempted_at
        FROM warden.jobs
        WHERE lane = 'serial' AND state IN ('scheduled', 'available', 'retryable', 'running')
        ORDER BY account, run_at, id
    ), late AS MATERIALIZED (
        SELECT * FROM heads
        WHERE state <> 'running' AND GREATEST(due_at, created_at) <= now() - make_interval(secs => $1)
    ), claimed AS MATERIALIZED (
        SELECT * FROM heads
        WHERE state = 'running' AND kind = 'audit' AND attempted_at <= now() - make_interval(secs => $1)
    )
    SELECT 'unstarted', l.account, l.id, l.partition,
           extract(epoch FROM now())::float8,
           (extract(epoch FROM now()) - extract(epoch FROM GREATEST(l.due_at, l.created_at, f.last)))::float8
    FROM late l
    LEFT JOIN LATERAL (
        SELECT max(finished_at) AS last FROM warden.jobs j
        WHERE j.account = l.account AND j.lane = 'serial' AND j.state IN ('completed', 'discarded', 'cancelled')
    ) f ON true
    WHERE GREATEST(l.due_at, l.created_at, f.last) <= now() - make_interval(secs => $1)
    UNION ALL
    SELECT CASE WHEN r.runs = 0 THEN 'claimed, handler never started'
                WHEN r.open = 0 THEN 'handler ended, still running'
                ELSE 'handler open past its timeout' END,
           c.account, c.id, c.partition,
           extract(epoch FROM now())::float8,
           (extract(epoch FROM now()) - extract(epoch FROM GREATEST(c.attempted_at, r.last_end)))::float8
    FROM claimed c
    CROSS JOIN LATERAL (
        SELECT count(*) AS runs, count(*) FILTER (WHERE ended_at IS NULL) AS open,
               max(ended_at) AS last_end, max(started_at) AS last_start
        FROM workload_runs w WHERE w.job_id = c.id AND w.attempt = c.attempt
    ) r
    WHERE r.runs = 0
       OR (r.open = 0 AND r.last_end <= now() - make_interval(secs => $1))
       OR (r.open > 0 AND r.last_start <= now() - make_interval(secs => $1) - c.timeout_ms * interval '1 millisecond')";

/// partition, owner_node, epoch, unexpired, now (epoch seconds).
type LeaseRow = (i32, Option<String>, i64, bool, f64);
/// what, account, job id, partition, now (epoch seconds), ready for (seconds).
type LateRow = (String, String, i64, i32, f64, f64);

/// The continuous liveness check: every 500 ms until `stop`, track which (owner,
/// epoch) holds each partition since when (the monitor's own observation: a hold
/// starts when first seen), and record every account whose due head job has been
/// ready longer than [`LIVENESS_BOUND`] (or claimed with nothing running it, see
/// [`LIVENESS_SQL`]) while its partition has been held by one (owner, epoch)
/// longer than the bound. Ticks are skipped while PostgreSQL is down
/// (a query fails; what was seen of holds is then forgotten) or being restarted.
async fn liveness_monitor(
    url: String,
    restarting: Arc<AtomicBool>,
    generation: Arc<AtomicU64>,
    started: Instant,
    stop: tokio_util::sync::CancellationToken,
) -> (Vec<LivenessViolation>, u64, f64) {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(2))
        .connect_lazy(&url)
        .expect("liveness pool");
    let bound = LIVENESS_BOUND.as_secs_f64();
    let mut holds: HashMap<i32, (String, i64, f64)> = HashMap::new();
    // Partition → since when (DB seconds) it is held by nobody, and whether that
    // stretch was already reported.
    let mut unheld: HashMap<i32, (f64, bool)> = HashMap::new();
    let mut max_ownerless = 0f64;
    let mut seen_generation = generation.load(Ordering::Acquire);
    let mut found: Vec<LivenessViolation> = Vec::new();
    let mut index: HashMap<(String, i64), usize> = HashMap::new();
    let mut ticks = 0u64;
    let mut every = tokio::time::interval(Duration::from_millis(500));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = every.tick() => {}
        }
        let g = generation.load(Ordering::Acquire);
        if restarting.load(Ordering::Acquire) || g != seen_generation {
            holds.clear();
            unheld.clear();
            seen_generation = g;
            continue;
        }
        let leases: Result<Vec<LeaseRow>, _> = sqlx::query_as(
            "SELECT partition, owner_node, epoch,
                    COALESCE(owner_node IS NOT NULL AND lease_expires_at > now(), false),
                    extract(epoch FROM now())::float8
             FROM warden.leases",
        )
        .fetch_all(&pool)
        .await;
        let Ok(leases) = leases else {
            holds.clear();
            unheld.clear();
            continue;
        };
        for (p, owner, epoch, live, now) in leases {
            match owner {
                Some(o) if live => {
                    unheld.remove(&p);
                    let h = holds.entry(p).or_insert_with(|| (o.clone(), epoch, now));
                    if h.0 != o || h.1 != epoch {
                        *h = (o, epoch, now);
                    }
                }
                _ => {
                    holds.remove(&p);
                    let (since, reported) = unheld.entry(p).or_insert((now, false));
                    let ownerless = now - *since;
                    max_ownerless = max_ownerless.max(ownerless);
                    if ownerless > bound && !*reported {
                        *reported = true;
                        let v = LivenessViolation {
                            what: "held by nobody",
                            account: String::new(),
                            job_id: 0,
                            partition: p,
                            owner: "-".into(),
                            epoch,
                            seen_at_s: started.elapsed().as_secs_f64(),
                            ready_for_s: ownerless,
                            held_for_s: 0.0,
                        };
                        eprintln!("LIVENESS: {v}");
                        found.push(v);
                    }
                }
            }
        }
        let late: Result<Vec<LateRow>, _> = sqlx::query_as(LIVENESS_SQL).bind(bound).fetch_all(&pool).await;
        let Ok(late) = late else {
            holds.clear();
            continue;
        };
        ticks += 1;
        for (what, account, job_id, partition, now, ready_for) in late {
            let Some((owner, epoch, since)) = holds.get(&partition) else { continue };
            let held_for = now - since;
            if held_for <= bound {
                continue;
            }
            match index.get(&(account.clone(), job_id)) {
                Some(&i) => {
                    let v = &mut found[i];
                    v.ready_for_s = v.ready_for_s.max(ready_for);
                    v.held_for_s = v.held_for_s.max(held_for);
                }
                None => {
                    let what = match what.as_str() {
                        "unstarted" => "unstarted",
                        "claimed, handler never started" => "claimed, handler never started",
                        "handler ended, still running" => "handler ended, still running",
                        _ => "handler open past its timeout",
                    };
                    let v = LivenessViolation {
                        what,
                        account: account.clone(),
                        job_id,
                        partition,
                        owner: owner.clone(),
                        epoch: *epoch,
                        seen_at_s: started.elapsed().as_secs_f64(),
                        ready_for_s: ready_for,
                        held_for_s: held_for,
                    };
                    eprintln!("LIVENESS: {v}");
                    index.insert((account, job_id), found.len());
                    found.push(v);
                }
            }
        }
    }
    pool.close().await;
    (found, ticks, max_ownerless)
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
