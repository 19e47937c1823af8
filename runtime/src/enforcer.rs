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
//!
//! The decisions are pure functions at the end of this module, property-tested on
//! their own: [`plan_leases`] (steps 2–3 from a [`LeaseView`]), [`plan_release`]
//! (which partitions in handoff are released now), [`orphans_to_adopt`] and
//! [`next_lease_pass`]. The pass only reads the view and carries the plan out.

use crate::account_actor::AccountActors;
use crate::error::Result;
use crate::lease::{LeaseConfig, LeaseTable};
use crate::store::{DueAccount, RunningJob, Store};
use std::collections::{BTreeSet, HashSet};
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

/// Most accounts one due-work scan wakes, by default (`NodeConfig::due_scan_limit`).
pub const DUE_SCAN_LIMIT: i64 = 10_000;

/// An enforcer without an executor (see [`Enforcer::standalone`]).
pub struct Standalone {
    pub enforcer: Arc<Enforcer>,
    /// Give this to [`run`]: releases and drained partitions poke it.
    pub poke: Arc<Notify>,
}

pub struct Enforcer {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) leases: Arc<LeaseTable>,
    pub(crate) actors: Arc<AccountActors>,
    pub(crate) placement: Arc<dyn Placement>,
    pub(crate) lease_config: LeaseConfig,
    /// Max accounts woken per run (bounds one scan).
    pub(crate) due_scan_limit: i64,
    /// Held partitions placement no longer wants, and since when (see
    /// [`Enforcer::held_back`]).
    pub(crate) unwanted_since: std::sync::Mutex<std::collections::HashMap<u32, Instant>>,
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
    ) -> Standalone {
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
            hooks: Default::default(),
            slots: None,
            meter: crate::account_actor::Shared::meter_for(&crate::account_actor::ExecConfig::default()),
            heartbeats: Default::default(),
            fires: Default::default(),
        });
        let actors = AccountActors::new(shared);
        let enforcer = Enforcer {
            store,
            leases,
            actors,
            placement,
            lease_config,
            due_scan_limit: DUE_SCAN_LIMIT,
            unwanted_since: Default::default(),
        };
        Standalone { enforcer: Arc::new(enforcer), poke }
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
        let usable: Vec<u32> = self.usable().into_iter().collect();
        report.woken_accounts = self.wake_due(&usable).await?;
        Ok(report)
    }

    /// Held partitions not to be handed off yet, with the time left (see
    /// [`LeaseView::settling`]): those granted less than a renewal interval ago, and
    /// those placement has not wanted elsewhere for half a renewal interval yet. None
    /// when placement wants nothing here (a leaving node hands off at once).
    fn held_back(
        &self,
        desired: Option<&BTreeSet<u32>>,
        held: &BTreeSet<u32>,
        draining: &BTreeSet<u32>,
    ) -> std::collections::BTreeMap<u32, Duration> {
        let mut since = self.unwanted_since.lock().unwrap();
        // Placement wants nothing here (the node is leaving, standing by, or lost the
        // database): hand everything off at once; no flip of a read is that large.
        if desired.is_some_and(BTreeSet::is_empty) {
            since.clear();
            return Default::default();
        }
        let mut back = self.leases.settling(self.lease_config.renew_interval);
        let debounce = self.lease_config.renew_interval / 2;
        let now = Instant::now();
        let Some(desired) = desired else {
            since.clear();
            return back;
        };
        since.retain(|p, _| held.contains(p) && !desired.contains(p) && !draining.contains(p));
        for p in held.iter().filter(|p| !desired.contains(p) && !draining.contains(p)) {
            let first = *since.entry(*p).or_insert(now);
            let left = (first + debounce).saturating_duration_since(now);
            if !left.is_zero() {
                let e = back.entry(*p).or_insert(left);
                *e = (*e).max(left);
            }
        }
        back
    }

    /// Held partitions usable for new attempts now (held, not draining, inside their window).
    fn usable(&self) -> BTreeSet<u32> {
        self.leases.held().iter().map(|l| l.partition).filter(|p| self.leases.holds(*p)).collect()
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
                let ids: Vec<i64> = running.iter().map(|r| r.job_id).collect();
                let busy = self.actors.busy_jobs(&ids);
                for orphan in orphans_to_adopt(&running, &busy, &self.usable()) {
                    tracing::info!(job_id = orphan.job_id, account = %orphan.account, "job running under this lease with no attempt here; waking its account to adopt it");
                    metrics::counter!("warden_orphans_adopted_total").increment(1);
                    if self.actors.wake(&orphan.account, orphan.partition).await {
                        woken += 1;
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

    /// One lease pass: read the view, plan ([`plan_leases`]), then carry the plan out.
    async fn run(&self, scan: Scan) -> Result<EnforceReport> {
        let mut report = EnforceReport::default();
        let held = self.leases.held();
        let desired = self.placement.desired(self.store.partitions()).map(|a| a.partitions);
        let held_set: BTreeSet<u32> = held.iter().map(|l| l.partition).collect();
        let draining: BTreeSet<u32> = held_set.iter().copied().filter(|p| self.leases.is_draining(*p)).collect();
        let held_back = self.held_back(desired.as_ref(), &held_set, &draining);
        let view = LeaseView {
            desired,
            held: held_set,
            draining,
            with_actors: self.actors.partitions_with_actors(),
            settling: held_back.keys().copied().collect(),
        };
        let plan = plan_leases(&view);
        // Unwanted partitions held back: look again when the first is due.
        let desired_now = view.desired.as_ref().unwrap_or(&view.held);
        report.retry_in = held_back.iter().filter(|(p, _)| !desired_now.contains(p)).map(|(_, left)| *left).min();

        // 2. Acquire.
        if !plan.acquire.is_empty() {
            let sent_at = Instant::now();
            let granted = self.store.acquire(self.leases.owner(), &plan.acquire, self.lease_config.ttl).await?;
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
            let missing = not_granted(&plan.acquire, &report.acquired);
            if !missing.is_empty() {
                let wait = self.store.lease_wait(self.leases.owner(), &missing).await?;
                report.retry_in = match (report.retry_in, wait) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
        }

        // 3. Hand off what we should no longer own, and finish every handoff already
        // begun (see `plan_leases`).
        for &p in &plan.begin_drain {
            self.leases.begin_drain(p);
            self.actors.drain(Some(&[p]));
            tracing::info!(partition = p, "ownership: draining partition for handoff");
        }
        // Read after the drains began: no actor can start in a partition from now on,
        // so one seen without actors here stays without.
        let step = plan_release(&plan.hand_off, &self.actors.partitions_with_actors());
        report.draining = step.draining;
        if !step.release.is_empty() {
            let leases: Vec<_> = step.release.iter().filter_map(|p| self.leases.fence(*p)).collect();
            self.store.release(self.leases.owner(), &leases).await?;
            for l in &leases {
                tracing::info!(partition = l.partition, epoch = l.epoch, "ownership: released partition");
            }
            report.released = step.release;
        }

        // 4. Wake accounts with due work.
        // (With `Scan::Acquired` that was done right after acquiring.)
        if scan == Scan::All {
            let usable: Vec<u32> = self.usable().into_iter().collect();
            report.woken_accounts = self.wake_due(&usable).await?;
        }
        Ok(report)
    }

    /// Drain every actor, then release every lease. Bounded by `drain_timeout` plus
    /// [`RELEASE_ALL_SLACK`]; whatever is still running then is dropped and left for
    /// rescue.
    pub async fn release_all(&self, drain_timeout: Duration) -> Result<usize> {
        for l in self.leases.held() {
            self.leases.begin_drain(l.partition);
        }
        self.actors.drain(None);
        self.actors.wait_until_empty(Instant::now() + drain_timeout + RELEASE_ALL_SLACK).await;
        let held: Vec<_> = self.leases.held().iter().filter_map(|l| self.leases.fence(l.partition)).collect();
        let n = self.store.release(self.leases.owner(), &held).await?;
        tracing::info!(released = n, "ownership: released all partitions");
        Ok(held.len())
    }
}

/// The longest one pass may take: a statement stuck on a cut network must not stall
/// reconciliation.
const RUN_TIMEOUT: Duration = Duration::from_secs(10);

/// How long past the drain timeout [`Enforcer::release_all`] waits for actors to
/// record their interruption before it releases anyway.
pub const RELEASE_ALL_SLACK: Duration = Duration::from_secs(1);

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
    match tokio::time::timeout(RUN_TIMEOUT, pass).await {
        Ok(r) => r,
        Err(_) => Err(crate::error::Error::Timeout(RUN_TIMEOUT)),
    }
}

async fn lease_loop(enforcer: Arc<Enforcer>, interval: Duration, poke: Arc<Notify>, shutdown: CancellationToken) {
    let mut changes = enforcer.placement.changes();
    loop {
        let sleep_for = match bounded(enforcer.run_leases()).await {
            Ok(r) => next_lease_pass(interval, &r),
            Err(e) => {
                tracing::warn!(error = %e, "lease reconciliation failed; will retry");
                interval
            }
        };
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

/// The due-work scan's period varies by this fraction either way (±20%), so that
/// the nodes of a cluster do not scan in step.
const SCAN_JITTER: f64 = 0.2;

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
            _ = tokio::time::sleep(interval.mul_f64(1.0 - SCAN_JITTER + 2.0 * SCAN_JITTER * rng.f64())) => {}
            _ = rescan.notified() => {}
        }
    }
}

// ---------------------------------------------------------------------------
// The pure decisions of a pass. The loops above read the node's state into these
// inputs, and carry out what comes back; nothing below does I/O or reads a clock.

/// Slack added to the earliest foreign lease expiry before the next lease pass: the
/// database clock decides expiry, and the acquire needs a round trip.
pub const LEASE_EXPIRY_SLACK: Duration = Duration::from_millis(20);

/// While a handoff is in progress, the longest wait between lease passes. Actors poke
/// the enforcer when a draining partition empties; this is only the fallback.
pub const DRAIN_RECHECK: Duration = Duration::from_millis(50);

/// What a lease pass starts from: the inputs of [`plan_leases`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaseView {
    /// What placement says this node should own; `None` while it is unknown (no ring
    /// yet): then the node keeps what it holds and takes nothing new.
    pub desired: Option<BTreeSet<u32>>,
    /// Partitions whose lease this node holds, usable or draining.
    pub held: BTreeSet<u32>,
    /// Held partitions being handed off (a subset of `held`).
    pub draining: BTreeSet<u32>,
    /// Partitions with at least one live account actor here (perhaps still stopping
    /// from an earlier tenure).
    pub with_actors: BTreeSet<u32>,
    /// Held partitions (not draining) not to be handed off yet, even if placement no
    /// longer wants them: those granted less than a renewal interval ago, and those
    /// placement has wanted elsewhere for less than half a renewal interval. Placement
    /// is computed from lease holders every node reads at its own moment, so for a
    /// moment during a handoff two nodes can disagree on who should hold a partition,
    /// and one node's successive computations can flip while the reads catch up.
    /// Handing a partition off on such a flip moves it twice for nothing (measured in
    /// the rolling-restart harness: a third move for a few partitions in 1 of ~8
    /// rollouts); a moment later the reads agree, and sticky placement keeps a
    /// partition with its holder unless the cap says otherwise. The price: a join
    /// completes half a renewal interval later (the old owner keeps running the
    /// partition meanwhile, so nothing pauses longer).
    pub settling: BTreeSet<u32>,
}

/// What a lease pass does, before it knows which acquisitions succeed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeasePlan {
    /// Try to acquire: desired, not held, and with no actor of an earlier tenure still
    /// stopping (its attempt may still be recording under the old epoch).
    pub acquire: Vec<u32>,
    /// Begin handing off: held, no longer desired, not draining yet.
    pub begin_drain: Vec<u32>,
    /// Every partition in handoff once `begin_drain` is done: released as soon as its
    /// last actor is gone (see [`plan_release`]).
    pub hand_off: Vec<u32>,
}

/// Plan one lease pass.
///
/// A handoff once begun is always finished, even if the ring wants the partition
/// back meanwhile (a join undone within the drain): a drained partition is released
/// and re-acquired, never reused, because an attempt the drain timed out stays
/// `running` at this epoch and only a new epoch's rescue resets it. Reusing it would
/// leave that account blocked for good; leaving it draining would stall it.
pub fn plan_leases(view: &LeaseView) -> LeasePlan {
    let desired = view.desired.as_ref().unwrap_or(&view.held);
    let acquire = desired.iter().copied().filter(|p| !view.held.contains(p) && !view.with_actors.contains(p)).collect();
    let unwanted = |p: &u32| (!desired.contains(p) && !view.settling.contains(p)) || view.draining.contains(p);
    let begin_drain = view.held.iter().copied().filter(|p| unwanted(p) && !view.draining.contains(p)).collect();
    let hand_off = view.held.iter().copied().filter(unwanted).collect();
    LeasePlan { acquire, begin_drain, hand_off }
}

/// Which partitions in handoff are released now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HandoffStep {
    /// No actor left: release the lease (and NOTIFY the next owner).
    pub release: Vec<u32>,
    /// Actors still finishing: keep renewing, look again when poked.
    pub draining: Vec<u32>,
}

/// Split the partitions in handoff into those released now and those still draining.
/// `with_actors` must be read *after* their drain began: from then on no actor can
/// start in them, so a partition seen empty stays empty until it is released.
pub fn plan_release(hand_off: &[u32], with_actors: &BTreeSet<u32>) -> HandoffStep {
    let (draining, release) = hand_off.iter().partition(|p| with_actors.contains(p));
    HandoffStep { release, draining }
}

/// The partitions asked for and not granted (held by another owner, or locked).
pub fn not_granted(asked: &[u32], granted: &[u32]) -> Vec<u32> {
    asked.iter().copied().filter(|p| !granted.contains(p)).collect()
}

/// The running jobs whose accounts to wake so that their actors adopt them: those
/// with no attempt here (`busy`: in flight or held back after an unrecordable
/// outcome) in partitions still usable.
pub fn orphans_to_adopt<'a>(
    running: &'a [RunningJob],
    busy: &HashSet<i64>,
    usable: &BTreeSet<u32>,
) -> Vec<&'a RunningJob> {
    running.iter().filter(|r| !busy.contains(&r.job_id) && usable.contains(&r.partition)).collect()
}

/// How long the lease loop sleeps after a pass (unless poked or the ring changes):
/// the interval, shorter until a foreign lease we want expires, and short while a
/// handoff is in progress.
pub fn next_lease_pass(interval: Duration, report: &EnforceReport) -> Duration {
    let mut sleep_for = interval;
    if let Some(wait) = report.retry_in {
        sleep_for = sleep_for.min(wait.saturating_add(LEASE_EXPIRY_SLACK));
    }
    if !report.draining.is_empty() {
        sleep_for = sleep_for.min(DRAIN_RECHECK);
    }
    sleep_for
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const P: u32 = 16;

    fn set(v: &[u32]) -> BTreeSet<u32> {
        v.iter().copied().collect()
    }

    fn arb_view() -> impl Strategy<Value = LeaseView> {
        let parts = || prop::collection::btree_set(0..P, 0..P as usize);
        (prop::option::weighted(0.9, parts()), parts(), parts(), parts(), parts()).prop_map(
            |(desired, held, draining, with_actors, settling)| {
                // Only held partitions can be draining; settling ones are held, not draining.
                let draining: BTreeSet<u32> = draining.intersection(&held).copied().collect();
                let settling = settling.intersection(&held).filter(|p| !draining.contains(p)).copied().collect();
                LeaseView { desired, held, draining, with_actors, settling }
            },
        )
    }

    /// Carry a plan out: every acquisition granted, every drain begun, then
    /// `with_actors_after` actors left (a subset of the view's), and what
    /// [`plan_release`] says released.
    fn apply(view: &LeaseView, plan: &LeasePlan, with_actors_after: &BTreeSet<u32>) -> (LeaseView, HandoffStep) {
        let step = plan_release(&plan.hand_off, with_actors_after);
        let mut next = view.clone();
        next.held.extend(&plan.acquire);
        next.draining.extend(&plan.begin_drain);
        for p in &step.release {
            next.held.remove(p);
            next.draining.remove(p);
            next.settling.remove(p);
        }
        next.with_actors = with_actors_after.clone();
        (next, step)
    }

    #[test]
    fn a_join_undone_during_the_drain_still_releases_then_reacquires() {
        let view =
            LeaseView { desired: Some(set(&[1, 2])), held: set(&[1, 2]), draining: set(&[2]), ..Default::default() };
        let plan = plan_leases(&view);
        assert_eq!(plan, LeasePlan { acquire: vec![], begin_drain: vec![], hand_off: vec![2] });
        let (next, step) = apply(&view, &plan, &set(&[]));
        assert_eq!(step.release, vec![2]);
        assert_eq!(plan_leases(&next).acquire, vec![2]);
    }

    #[test]
    fn unknown_placement_keeps_what_is_held_and_takes_nothing() {
        let view = LeaseView {
            desired: None,
            held: set(&[3, 4]),
            draining: set(&[4]),
            with_actors: set(&[4]),
            ..Default::default()
        };
        assert_eq!(plan_leases(&view), LeasePlan { acquire: vec![], begin_drain: vec![], hand_off: vec![4] });
    }

    #[test]
    fn the_lease_loop_sleeps_less_for_expiries_and_drains() {
        let i = Duration::from_secs(1);
        let r = |retry_in, draining: Vec<u32>| EnforceReport { retry_in, draining, ..Default::default() };
        assert_eq!(next_lease_pass(i, &r(None, vec![])), i);
        assert_eq!(next_lease_pass(i, &r(Some(Duration::from_millis(100)), vec![])), Duration::from_millis(120));
        assert_eq!(next_lease_pass(i, &r(Some(Duration::from_secs(5)), vec![])), i);
        assert_eq!(next_lease_pass(i, &r(Some(Duration::from_secs(5)), vec![1])), DRAIN_RECHECK);
        assert_eq!(next_lease_pass(i, &r(Some(Duration::MAX), vec![])), i, "no overflow");
    }

    proptest! {
        #[test]
        fn never_acquires_what_is_held_draining_or_still_has_actors(view in arb_view()) {
            let plan = plan_leases(&view);
            for p in &plan.acquire {
                prop_assert!(!view.held.contains(p) && !view.draining.contains(p));
                prop_assert!(!view.with_actors.contains(p), "an earlier tenure's actors are still stopping");
                prop_assert!(view.desired.as_ref().is_some_and(|d| d.contains(p)), "only what placement wants");
            }
        }

        #[test]
        fn never_releases_what_is_not_held_nor_a_partition_with_actors(view in arb_view(), keep in any::<u64>()) {
            let plan = plan_leases(&view);
            // Any subset of the actors may have stopped by the time the release is planned.
            let after: BTreeSet<u32> = view.with_actors.iter().copied().filter(|p| keep >> (p % 64) & 1 == 1).collect();
            let step = plan_release(&plan.hand_off, &after);
            for p in &step.release {
                prop_assert!(view.held.contains(p));
                prop_assert!(!after.contains(p));
            }
            let mut all: Vec<u32> = step.release.iter().chain(&step.draining).copied().collect();
            all.sort_unstable();
            prop_assert_eq!(all, plan.hand_off.clone(), "every partition in handoff is either released or draining");
        }

        #[test]
        fn desired_held_and_not_draining_is_kept(view in arb_view()) {
            let plan = plan_leases(&view);
            let desired = view.desired.clone().unwrap_or_else(|| view.held.clone());
            for p in view.held.iter().filter(|p| desired.contains(p) && !view.draining.contains(p)) {
                prop_assert!(!plan.begin_drain.contains(p) && !plan.hand_off.contains(p));
            }
        }

        #[test]
        fn a_partition_just_granted_is_not_handed_off_until_it_settles(view in arb_view()) {
            let plan = plan_leases(&view);
            for p in view.settling.iter().filter(|p| !view.draining.contains(p)) {
                prop_assert!(!plan.begin_drain.contains(p) && !plan.hand_off.contains(p));
            }
            // Once settled, an unwanted one is handed off.
            let settled = LeaseView { settling: BTreeSet::new(), ..view.clone() };
            let plan = plan_leases(&settled);
            if let Some(desired) = &view.desired {
                for p in view.held.iter().filter(|p| !desired.contains(p)) {
                    prop_assert!(plan.hand_off.contains(p));
                }
            }
        }

        #[test]
        fn a_handoff_once_begun_is_finished(view in arb_view()) {
            let plan = plan_leases(&view);
            for p in &view.draining {
                prop_assert!(plan.hand_off.contains(p));
                prop_assert!(!plan.begin_drain.contains(p), "a drain begins once");
            }
            for p in &plan.begin_drain {
                prop_assert!(view.held.contains(p) && plan.hand_off.contains(p));
            }
        }

        #[test]
        fn unknown_placement_takes_and_gives_up_nothing_new(mut view in arb_view()) {
            view.desired = None;
            let plan = plan_leases(&view);
            prop_assert!(plan.acquire.is_empty() && plan.begin_drain.is_empty());
            prop_assert_eq!(plan.hand_off, view.draining.iter().copied().collect::<Vec<_>>());
        }

        #[test]
        fn the_plan_is_idempotent_once_applied(view in arb_view()) {
            // Nothing changed meanwhile (same placement, same actors): the next pass
            // only re-acquires what a finished handoff just released and placement
            // wants back (under a new epoch); the one after has nothing to do.
            let (next, step) = apply(&view, &plan_leases(&view), &view.with_actors);
            let again = plan_leases(&next);
            prop_assert!(again.acquire.iter().all(|p| step.release.contains(p)), "{:?}", again);
            prop_assert!(again.begin_drain.is_empty(), "{:?}", again);
            prop_assert!(plan_release(&again.hand_off, &next.with_actors).release.is_empty());
            let (last, _) = apply(&next, &again, &next.with_actors);
            let third = plan_leases(&last);
            prop_assert!(third.acquire.is_empty() && third.begin_drain.is_empty(), "{:?}", third);
            prop_assert_eq!(plan_release(&third.hand_off, &last.with_actors), HandoffStep {
                release: vec![],
                draining: third.hand_off.clone(),
            });
        }

        #[test]
        fn once_actors_are_gone_two_passes_reach_the_placement(mut view in arb_view()) {
            // (Partitions still settling after their grant are kept a moment longer:
            // `a_partition_just_granted_is_not_handed_off_until_it_settles`.)
            view.settling.clear();
            let desired = view.desired.get_or_insert_with(BTreeSet::new).clone();
            let (next, _) = apply(&view, &plan_leases(&view), &BTreeSet::new());
            let (last, _) = apply(&next, &plan_leases(&next), &BTreeSet::new());
            prop_assert_eq!(&last.held, &desired);
            prop_assert!(last.draining.is_empty());
        }

        #[test]
        fn orphans_are_only_jobs_with_no_attempt_here_in_usable_partitions(
            rows in prop::collection::vec((0i64..20, 0..P), 0..20),
            busy in prop::collection::hash_set(0i64..20, 0..10),
            usable in prop::collection::btree_set(0..P, 0..P as usize),
        ) {
            let running: Vec<RunningJob> = rows.iter()
                .map(|(id, p)| RunningJob { job_id: *id, account: format!("a{id}"), partition: *p }).collect();
            let picked = orphans_to_adopt(&running, &busy, &usable);
            for r in &running {
                let expect = !busy.contains(&r.job_id) && usable.contains(&r.partition);
                prop_assert_eq!(picked.iter().any(|o| std::ptr::eq(*o, r)), expect);
            }
        }

        #[test]
        fn the_lease_loop_never_sleeps_past_its_interval(
            interval_ms in 10u64..5000, retry_ms in prop::option::of(0u64..10_000), draining in any::<bool>(),
        ) {
            let report = EnforceReport {
                retry_in: retry_ms.map(Duration::from_millis),
                draining: if draining { vec![1] } else { vec![] },
                ..Default::default()
            };
            let d = next_lease_pass(Duration::from_millis(interval_ms), &report);
            prop_assert!(d <= Duration::from_millis(interval_ms));
            if draining { prop_assert!(d <= DRAIN_RECHECK); }
            if let Some(r) = retry_ms { prop_assert!(d <= Duration::from_millis(r) + LEASE_EXPIRY_SLACK); }
        }
    }
}
