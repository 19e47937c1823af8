//! The enforcer: one per node, `tick + run_once()`. It reconciles what the node
//! should own (placement) with what it holds (leases), and makes sure every account
//! with due work in a held partition has an actor. It is also the cold-boot path:
//! after a full outage it alone rebuilds everything from the database, and it is the
//! polling fallback behind LISTEN/NOTIFY wake-ups.
//!
//! One `run_once()`:
//! 1. desired = placement(P); held = lease table.
//! 2. acquire desired − held (skipping partitions whose old actors are still
//!    stopping), rescue attempts an older epoch left running, then start using them;
//! 3. held − desired, and partitions already draining: drain their actors; once
//!    none is left, release the lease (NOTIFY) so the next owner acquires at once
//!    (a drained partition the ring wants back is re-acquired under a new epoch);
//! 4. wake (or spawn) the actor of every account with due work in usable partitions.

use crate::account_actor::AccountActors;
use crate::error::Result;
use crate::lease::{LeaseConfig, LeaseTable};
use crate::store::{DueAccount, RunningJob, Store};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use warden_cluster::Placement;

/// What one reconciliation did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnforceReport {
    pub acquired: Vec<u32>,
    pub released: Vec<u32>,
    pub draining: Vec<u32>,
    pub rescued_attempts: u64,
    pub woken_accounts: usize,
    /// Wanted partitions still held by another owner: run again when the earliest
    /// of their leases expires (crash failover without waiting for the next tick).
    pub retry_in: Option<Duration>,
}

pub struct Enforcer {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) leases: Arc<LeaseTable>,
    pub(crate) actors: Arc<AccountActors>,
    pub(crate) placement: Arc<dyn Placement>,
    pub(crate) lease_config: LeaseConfig,
    /// Max accounts woken per run (bounds one scan).
    pub(crate) due_scan_limit: i64,
}

impl Enforcer {
    /// An enforcer without an executor: its account-actor map has no handlers, so it
    /// only reconciles leases with placement. This is the ownership logic alone, as
    /// the deterministic simulation (`tests/simulation.rs`) runs it against a model
    /// store; a node builds its enforcer around its real actors instead. Returns the
    /// enforcer and the poke its [`run`] loop should be given.
    pub fn standalone(
        store: Arc<dyn Store>,
        leases: Arc<LeaseTable>,
        placement: Arc<dyn Placement>,
        lease_config: LeaseConfig,
    ) -> (Arc<Self>, Arc<Notify>) {
        let poke = Arc::new(Notify::new());
        let shared = Arc::new(crate::account_actor::Shared {
            store: store.clone(),
            producer: None,
            registry: Arc::new(crate::handler::Registry::new()),
            leases: leases.clone(),
            config: crate::account_actor::ExecConfig::default(),
            partitions: store.partitions(),
            node_id: leases.owner().clone(),
            poke_enforcer: poke.clone(),
            lease_ttl: lease_config.ttl,
        });
        let actors = AccountActors::new(shared);
        let due_scan_limit = crate::node::NodeConfig::default().due_scan_limit;
        let enforcer = Enforcer { store, leases, actors, placement, lease_config, due_scan_limit };
        (Arc::new(enforcer), poke)
    }

    /// One full reconciliation: leases, then a due-work scan of every usable partition.
    pub async fn run_once(&self) -> Result<EnforceReport> {
        self.run(Scan::All).await
    }

    /// Leases only, scanning just the partitions acquired in this run: the fast path
    /// used while a handoff is in progress (the full scan can take tens of ms with a
    /// large backlog, and would delay every release by as much).
    pub async fn run_leases(&self) -> Result<EnforceReport> {
        self.run(Scan::Acquired).await
    }

    /// Wake (or spawn) the actor of every account with due work in usable partitions.
    pub async fn scan_due(&self) -> Result<EnforceReport> {
        let mut report = EnforceReport::default();
        let usable: Vec<u32> =
            self.leases.held().iter().map(|l| l.partition).filter(|p| self.leases.holds(*p)).collect();
        report.woken_accounts = self.wake_due(&usable).await?;
        Ok(report)
    }

    async fn wake_due(&self, partitions: &[u32]) -> Result<usize> {
        // Orphans first, and whatever the due scan does: jobs running under this
        // node's lease with no attempt running here (an ambiguous claim or finish
        // committed without its reply). Waking the account makes its actor claim,
        // which adopts the job. A job whose attempt just started or ended may show up
        // here too; the extra claim is harmless.
        let mut woken = 0;
        match self.store.running_here(self.leases.owner(), partitions, self.due_scan_limit).await {
            Ok(running) => {
                for RunningJob { job_id, account, partition } in running {
                    if !self.actors.is_in_flight(job_id)
                        && !self.actors.is_held_back(job_id)
                        && self.leases.holds(partition)
                    {
                        tracing::info!(job_id, account = %account, "job running under this lease with no attempt here; waking its account to adopt it");
                        metrics::counter!("warden_orphans_adopted_total").increment(1);
                        if self.actors.wake(&account, partition).await {
                            woken += 1;
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "orphan scan failed; will retry"),
        }
        let due = self.store.due_accounts(partitions, self.due_scan_limit).await?;
        for DueAccount { account, partition } in &due {
            if self.actors.wake(account, *partition).await {
                woken += 1;
            }
        }
        Ok(woken)
    }

    async fn run(&self, scan: Scan) -> Result<EnforceReport> {
        let mut report = EnforceReport::default();
        let p = self.store.partitions();
        let held: BTreeSet<u32> = self.leases.held().iter().map(|l| l.partition).collect();
        // Unknown placement (no ring yet): keep what we hold, take nothing new.
        let desired = match self.placement.desired(p) {
            Some(a) => a.partitions,
            None => held.clone(),
        };

        // 2. Acquire.
        let to_acquire: Vec<u32> =
            desired.difference(&held).copied().filter(|p| self.actors.count_in_partition(*p) == 0).collect();
        if !to_acquire.is_empty() {
            let sent_at = Instant::now();
            let granted = self.store.acquire(self.leases.owner(), &to_acquire, self.lease_config.ttl).await?;
            let rescued = match self.store.rescue(self.leases.owner(), &granted).await {
                Ok(n) => n,
                Err(e) => {
                    // Not usable before their rescue: give them back rather than hold
                    // partitions nobody runs (the next pass acquires and rescues again).
                    if let Err(r) = self.store.release(self.leases.owner(), &granted).await {
                        tracing::warn!(error = %r, "could not release partitions whose rescue failed; they expire");
                    }
                    return Err(e);
                }
            };
            if rescued > 0 {
                tracing::warn!(partitions = granted.len(), rescued, "rescued attempts left running by an older epoch");
                metrics::counter!("warden_rescued_attempts_total").increment(rescued);
            }
            report.rescued_attempts += rescued;
            self.leases.granted(&granted, sent_at + self.lease_config.valid_for());
            for g in &granted {
                tracing::info!(partition = g.partition, epoch = g.epoch, "ownership: acquired partition");
            }
            report.acquired = granted.iter().map(|g| g.partition).collect();
            metrics::counter!("warden_lease_acquired_total").increment(granted.len() as u64);
            // Start the acquired partitions' work before anything else: this is the
            // tail of a handoff.
            if scan == Scan::Acquired {
                report.woken_accounts = self.wake_due(&report.acquired).await?;
            }
            let missing: Vec<u32> = to_acquire.iter().copied().filter(|p| !report.acquired.contains(p)).collect();
            if !missing.is_empty() {
                report.retry_in = self.store.lease_wait(self.leases.owner(), &missing).await?;
            }
        }

        // 3. Hand off what we should no longer own, and finish every handoff already
        // begun even if the ring wants the partition back meanwhile (a join undone
        // within the drain): a drained partition is released and re-acquired, never
        // reused, because an attempt the drain timed out stays `running` at this
        // epoch and only a new epoch's rescue resets it. Reusing it would leave that
        // account blocked for good; leaving it draining would stall the partition.
        let unwanted: Vec<u32> =
            held.iter().copied().filter(|p| !desired.contains(p) || self.leases.is_draining(*p)).collect();
        let mut releasable = Vec::new();
        for p in unwanted {
            if !self.leases.is_draining(p) {
                self.leases.begin_drain(p);
                self.actors.drain(Some(&[p]));
                tracing::info!(partition = p, "ownership: draining partition for handoff");
            }
            if self.actors.count_in_partition(p) == 0 {
                releasable.push(p);
            } else {
                report.draining.push(p);
            }
        }
        if !releasable.is_empty() {
            let leases: Vec<_> = releasable.iter().filter_map(|p| self.leases.fence(*p)).collect();
            self.store.release(self.leases.owner(), &leases).await?;
            for l in &leases {
                tracing::info!(partition = l.partition, epoch = l.epoch, "ownership: released partition");
            }
            report.released = releasable;
        }

        // 4. Wake accounts with due work.
        // (With `Scan::Acquired` that was done right after acquiring.)
        if scan == Scan::All {
            let usable: Vec<u32> =
                self.leases.held().iter().map(|l| l.partition).filter(|p| self.leases.holds(*p)).collect();
            report.woken_accounts = self.wake_due(&usable).await?;
        }
        Ok(report)
    }

    /// Drain every actor, then release every lease. Bounded by `drain_timeout` plus a
    /// second; whatever is still running then is dropped and left for rescue.
    pub async fn release_all(&self, drain_timeout: Duration) -> Result<usize> {
        for l in self.leases.held() {
            self.leases.begin_drain(l.partition);
        }
        self.actors.drain(None);
        let deadline = Instant::now() + drain_timeout + Duration::from_secs(1);
        while !self.actors.is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let held: Vec<_> = self.leases.held().iter().filter_map(|l| self.leases.fence(l.partition)).collect();
        let n = self.store.release(self.leases.owner(), &held).await?;
        tracing::info!(released = n, "ownership: released all partitions");
        Ok(held.len())
    }
}

const RUN_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scan {
    All,
    Acquired,
}

/// Run the enforcer as two loops: lease reconciliation, which reacts at once to
/// pokes (lease releases, wake-up listener reconnects, drained partitions), ring
/// changes and lease expiries; and the due-work scan every `interval` (±20%), the
/// polling fallback behind NOTIFY. They are separate so that a slow scan over a large
/// backlog never delays a handoff.
/// `rescan` asks for a full due-work scan now (after the wake-up listener reconnects,
/// when notifications may have been lost).
pub async fn run(
    enforcer: Arc<Enforcer>,
    interval: Duration,
    poke: Arc<Notify>,
    rescan: Arc<Notify>,
    shutdown: CancellationToken,
) {
    tokio::join!(
        lease_loop(enforcer.clone(), interval, poke, shutdown.clone()),
        scan_loop(enforcer, interval, rescan, shutdown)
    );
}

async fn bounded(pass: impl std::future::Future<Output = Result<EnforceReport>>) -> Result<EnforceReport> {
    // A statement stuck on a cut network must not stall reconciliation.
    match tokio::time::timeout(RUN_TIMEOUT, pass).await {
        Ok(r) => r,
        Err(_) => Err(crate::error::Error::Timeout(RUN_TIMEOUT)),
    }
}

async fn lease_loop(enforcer: Arc<Enforcer>, interval: Duration, poke: Arc<Notify>, shutdown: CancellationToken) {
    let mut changes = enforcer.placement.changes();
    loop {
        let mut sleep_for = interval;
        match bounded(enforcer.run_leases()).await {
            Ok(r) => {
                if let Some(wait) = r.retry_in {
                    // The database clock decides expiry; add a little slack for the round trip.
                    sleep_for = sleep_for.min(wait + Duration::from_millis(20));
                }
                if !r.draining.is_empty() {
                    // Handoff in progress: actors poke us when a draining partition
                    // empties; this short sleep is only the fallback.
                    sleep_for = sleep_for.min(Duration::from_millis(50));
                }
            }
            Err(e) => tracing::warn!(error = %e, "lease reconciliation failed; will retry"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(sleep_for) => {}
            _ = poke.notified() => {
                // Pokes come in bursts during a handoff (one per released lease, from
                // every releasing node, and one per drained partition): gather them
                // for a moment so one pass handles many, instead of one pass each.
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(POKE_COALESCE) => {}
                }
            }
            _ = async {
                match changes.as_mut() {
                    Some(c) => { if c.changed().await.is_err() { std::future::pending::<()>().await } }
                    None => std::future::pending::<()>().await,
                }
            } => {}
        }
    }
}

/// How long the lease loop gathers pokes before a pass.
const POKE_COALESCE: Duration = Duration::from_millis(10);

async fn scan_loop(enforcer: Arc<Enforcer>, interval: Duration, rescan: Arc<Notify>, shutdown: CancellationToken) {
    let mut rng = fastrand::Rng::new();
    loop {
        if let Err(e) = bounded(enforcer.scan_due()).await {
            tracing::warn!(error = %e, "due-work scan failed; will retry");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval.mul_f64(0.8 + 0.4 * rng.f64())) => {}
            _ = rescan.notified() => {}
        }
    }
}
