//! Partition leases on the node side: what this node holds, until when it may act
//! on it, and the keeper loop that renews leases and self-fences.
//!
//! Invariant (DESIGN §4): a node acts on partition `p` only while
//! `Instant::now() < valid_until(p)`, where `valid_until = renewal_sent_at + ttl −
//! safety_margin` on the *monotonic* clock. The database set the expiry to
//! `db_now + ttl` with `db_now ≥ renewal_sent_at`, so the node stops before anyone
//! else can acquire the lease — through database outages, network partitions and
//! process pauses alike. When a deadline passes, [`LeaseTable::fence`] removes the
//! lease and cancels its token, which aborts every attempt running under it.
//!
//! The keeper is a task: after a process pause it may run *after* the executor. So the
//! window itself is shared with the executor as a [`LeaseValidity`] (an atomic
//! deadline), and every poll of a handler reads it first; a handler is never polled
//! once its window has closed, fenced or not. What remains (one poll in flight across
//! a pause, effects already sent, clock rate) is stated in the README, "What exactly is
//! guaranteed".

use crate::store::{Fence, GrantedLease, MemberInfo, Store};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Shortest lease TTL accepted.
pub const MIN_LEASE_TTL: Duration = Duration::from_millis(300);

/// Lease timing. `renew_interval` < `ttl − safety_margin` so that a single slow
/// renewal does not fence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseConfig {
    /// Lease time-to-live, as granted by the database.
    pub ttl: Duration,
    /// How often held leases are renewed (one statement for all).
    pub renew_interval: Duration,
    /// Stop acting this long before the lease could expire in the database.
    pub safety_margin: Duration,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(4),
            renew_interval: Duration::from_millis(1000),
            safety_margin: Duration::from_millis(1000),
        }
    }
}

impl LeaseConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.ttl < MIN_LEASE_TTL {
            return Err(format!("lease_ttl must be at least 300ms, got {:?}", self.ttl));
        }
        if self.safety_margin.is_zero() || self.safety_margin >= self.ttl {
            return Err(format!(
                "lease_safety_margin must be > 0 and < lease_ttl ({:?}), got {:?}",
                self.ttl, self.safety_margin
            ));
        }
        if self.renew_interval.is_zero() || self.renew_interval >= self.ttl - self.safety_margin {
            return Err(format!(
                "lease_renew_interval must be > 0 and < lease_ttl − lease_safety_margin ({:?}), got {:?}",
                self.ttl - self.safety_margin,
                self.renew_interval
            ));
        }
        Ok(())
    }

    /// How long after sending a renewal the node may act on its result.
    pub fn valid_for(&self) -> Duration {
        self.ttl - self.safety_margin
    }
}

#[derive(Debug)]
struct Held {
    epoch: i64,
    valid_until: Instant,
    /// `valid_until` as read without the table's lock, by every poll of a handler.
    validity: LeaseValidity,
    token: CancellationToken,
    /// Handing off: keep renewing, start nothing new.
    draining: bool,
    /// When this grant was recorded here.
    granted_at: Instant,
}

/// The leases this node holds. Never held across `.await`.
#[derive(Debug)]
pub struct LeaseTable {
    owner: Arc<str>,
    held: Mutex<HashMap<u32, Held>>,
    /// Origin of every [`LeaseValidity`] deadline.
    base: Instant,
    /// How many leases are held, for those waiting until none is.
    count: watch::Sender<usize>,
}

/// A usable lease: the fence to write under, the token that fires when the keeper
/// fences it, and its validity window, readable at any instant.
#[derive(Debug, Clone)]
pub struct ActiveLease {
    pub fence: Fence,
    pub token: CancellationToken,
    pub validity: LeaseValidity,
}

/// The monotonic end of one held lease's validity window, shared with the table (a
/// renewal moves it, fencing closes it) and cheap to read: one atomic load and a clock
/// read. The token above fires only when the keeper gets to run; after a process pause
/// the executor can be polled before the keeper, so the executor asks this instead,
/// before every poll of a handler.
#[derive(Debug, Clone)]
pub struct LeaseValidity {
    base: Instant,
    /// Nanoseconds after `base`; 0 once fenced.
    until_ns: Arc<AtomicU64>,
}

impl LeaseValidity {
    fn new(base: Instant, until: Instant) -> Self {
        let v = Self { base, until_ns: Arc::new(AtomicU64::new(0)) };
        v.set(until);
        v
    }

    fn set(&self, until: Instant) {
        let ns = until.saturating_duration_since(self.base).as_nanos().min(u64::MAX as u128) as u64;
        self.until_ns.store(ns, Ordering::Release);
    }

    fn close(&self) {
        self.until_ns.store(0, Ordering::Release);
    }

    fn until(&self) -> Instant {
        self.base + Duration::from_nanos(self.until_ns.load(Ordering::Acquire))
    }

    /// How long this node may still act on the lease (zero once it may not).
    pub fn remaining(&self) -> Duration {
        self.until().saturating_duration_since(Instant::now())
    }

    /// May this node act on the lease now?
    pub fn is_valid(&self) -> bool {
        Instant::now() < self.until()
    }
}

impl LeaseTable {
    pub fn new(owner: Arc<str>) -> Self {
        Self { owner, held: Mutex::new(HashMap::new()), base: Instant::now(), count: watch::channel(0).0 }
    }

    pub fn owner(&self) -> &Arc<str> {
        &self.owner
    }

    /// The lease for `partition` if held and still inside its validity window.
    pub fn current(&self, partition: u32) -> Option<ActiveLease> {
        let held = self.held.lock().unwrap();
        let h = held.get(&partition)?;
        if h.draining || Instant::now() >= h.valid_until {
            return None;
        }
        Some(ActiveLease {
            fence: Fence { partition, epoch: h.epoch, owner: self.owner.clone() },
            token: h.token.clone(),
            validity: h.validity.clone(),
        })
    }

    pub fn holds(&self, partition: u32) -> bool {
        self.current(partition).is_some()
    }

    /// Record freshly granted leases (from a statement sent at `sent_at`).
    pub fn granted(&self, leases: &[GrantedLease], valid_until: Instant) {
        let mut held = self.held.lock().unwrap();
        for l in leases {
            let validity = LeaseValidity::new(self.base, valid_until);
            if let Some(old) = held.insert(
                l.partition,
                Held {
                    epoch: l.epoch,
                    valid_until,
                    validity,
                    token: CancellationToken::new(),
                    draining: false,
                    granted_at: Instant::now(),
                },
            ) {
                old.validity.close();
                old.token.cancel();
            }
        }
        self.count.send_replace(held.len());
    }

    /// Extend the validity of renewed partitions.
    pub fn renewed(&self, partitions: &[u32], valid_until: Instant) {
        let mut held = self.held.lock().unwrap();
        for p in partitions {
            if let Some(h) = held.get_mut(p) {
                h.valid_until = h.valid_until.max(valid_until);
                h.validity.set(h.valid_until);
            }
        }
    }

    /// Start handing `partition` off: it stays held (and renewed) but is no longer usable
    /// for new attempts; attempts already running keep their fence.
    pub fn begin_drain(&self, partition: u32) {
        let mut held = self.held.lock().unwrap();
        if let Some(h) = held.get_mut(&partition) {
            if !h.draining {
                h.draining = true;
                self.count.send_replace(held.len());
            }
        }
    }

    pub fn is_draining(&self, partition: u32) -> bool {
        self.held.lock().unwrap().get(&partition).is_some_and(|h| h.draining)
    }

    /// Held partitions this node is not handing off (draining ones are on their way
    /// out), sorted: what sticky placement counts as this node's own.
    pub fn keeping(&self) -> Vec<u32> {
        let held = self.held.lock().unwrap();
        let mut v: Vec<u32> = held.iter().filter(|(_, h)| !h.draining).map(|(p, _)| *p).collect();
        v.sort_unstable();
        v
    }

    /// Held partitions granted less than `within` ago, with the time left until they
    /// are not (the enforcer does not hand those off yet: see `LeaseView::settling`).
    pub fn settling(&self, within: Duration) -> BTreeMap<u32, Duration> {
        let now = Instant::now();
        let held = self.held.lock().unwrap();
        held.iter()
            .filter(|(_, h)| !h.draining)
            .filter_map(|(p, h)| (h.granted_at + within).checked_duration_since(now).map(|left| (*p, left)))
            .filter(|(_, left)| !left.is_zero())
            .collect()
    }

    /// Notified on every grant and every partition given up (fenced or released).
    pub fn changes(&self) -> watch::Receiver<usize> {
        self.count.subscribe()
    }

    pub fn held(&self) -> Vec<GrantedLease> {
        let held = self.held.lock().unwrap();
        let mut v: Vec<_> = held.iter().map(|(p, h)| GrantedLease { partition: *p, epoch: h.epoch }).collect();
        v.sort_by_key(|l| l.partition);
        v
    }

    pub fn len(&self) -> usize {
        self.held.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Wait until no lease is held, or `deadline`; true if none is.
    pub async fn wait_until_empty(&self, deadline: Instant) -> bool {
        let mut count = self.count.subscribe();
        tokio::time::timeout_at(deadline, count.wait_for(|n| *n == 0)).await.is_ok() || self.is_empty()
    }

    /// Stop acting on `partition`: forget it and abort everything running under it.
    pub fn fence(&self, partition: u32) -> Option<GrantedLease> {
        let h = {
            let mut held = self.held.lock().unwrap();
            let h = held.remove(&partition)?;
            self.count.send_replace(held.len());
            h
        };
        h.validity.close();
        h.token.cancel();
        Some(GrantedLease { partition, epoch: h.epoch })
    }

    /// Partitions whose validity window has passed at `now`.
    pub fn expired(&self, now: Instant) -> Vec<u32> {
        let held = self.held.lock().unwrap();
        let mut v: Vec<u32> = held.iter().filter(|(_, h)| now >= h.valid_until).map(|(p, _)| *p).collect();
        v.sort_unstable();
        v
    }

    #[cfg(test)]
    fn held_lease_for_test(&self, partition: u32) -> ActiveLease {
        let held = self.held.lock().unwrap();
        let h = &held[&partition];
        ActiveLease {
            fence: Fence { partition, epoch: h.epoch, owner: self.owner.clone() },
            token: h.token.clone(),
            validity: h.validity.clone(),
        }
    }

    pub fn earliest_deadline(&self) -> Option<Instant> {
        self.held.lock().unwrap().values().map(|h| h.valid_until).min()
    }
}

/// After a renewal that failed (not one that timed out), try again this soon (or at
/// the renew interval, if shorter): the window is still open, and every try counts.
pub const RENEW_RETRY: Duration = Duration::from_millis(250);

/// Told which partitions were just fenced (to stop their actors).
pub type OnFence = Arc<dyn Fn(&[u32]) + Send + Sync>;

/// Where the keeper reports whether this node reaches the database: on every renewal
/// tick — leases held or not — it heartbeats ([`Store::heartbeat`]) and publishes
/// the members proven within a lease TTL, and whether this node itself reached the
/// database within its validity window (`false` as soon as a lease self-fences for
/// want of a renewal). The node announces the latter in gossip (`db`), and placement
/// counts only proven members that do not announce `db=lost`.
pub struct MemberProof {
    pub info: MemberInfo,
    pub proven: watch::Sender<warden_cluster::placement::Proven>,
    pub db_ok: watch::Sender<bool>,
}

/// Renews held leases every `renew_interval` and self-fences partitions whose
/// window passes without a successful renewal. `on_fence` is told which partitions
/// were fenced so the caller can stop their actors.
pub async fn keep_leases(
    store: Arc<dyn Store>,
    table: Arc<LeaseTable>,
    config: LeaseConfig,
    on_fence: OnFence,
    proof: Option<MemberProof>,
    shutdown: CancellationToken,
) {
    let mut next_renew = Instant::now() + config.renew_interval;
    // Reached the database at (monotonic) time; starts "now" (the node just migrated).
    let mut db_seen = Instant::now();
    let mut last_proven: Option<BTreeSet<String>> = None;
    if let Some(p) = &proof {
        // Heartbeat at once, so a joiner is proven before it turns active.
        if let Ok(Ok(Some(ids))) = tokio::time::timeout(config.valid_for(), store.heartbeat(&p.info, config.ttl)).await
        {
            let ids: BTreeSet<String> = ids.into_iter().collect();
            last_proven = Some(ids.clone());
            p.proven.send_replace(Some(ids));
        }
    }
    loop {
        let wake_at = match table.earliest_deadline() {
            Some(d) => d.min(next_renew),
            None => next_renew,
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep_until(wake_at) => {}
        }
        if Instant::now() >= next_renew {
            let held = table.held();
            let sent_at = Instant::now();
            let deadline = table.earliest_deadline().unwrap_or(sent_at + config.valid_for());
            let result = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = tokio::time::timeout_at(deadline, store.renew(&table.owner, &held, config.ttl)) => r,
            };
            match result {
                Ok(Ok(renewed)) => {
                    table.renewed(&renewed, sent_at + config.valid_for());
                    let lost: Vec<u32> = held.iter().map(|l| l.partition).filter(|p| !renewed.contains(p)).collect();
                    if !lost.is_empty() {
                        tracing::warn!(count = lost.len(), partitions = ?lost, "lease renewal refused; fencing");
                        fence(&table, &lost, &on_fence);
                    }
                    metrics::counter!("warden_lease_renewals_total", "result" => "ok").increment(1);
                    next_renew = sent_at + config.renew_interval;
                }
                Ok(Err(e)) => {
                    metrics::counter!("warden_lease_renewals_total", "result" => "error").increment(1);
                    tracing::warn!(error = %e, "lease renewal failed; retrying");
                    next_renew = Instant::now() + config.renew_interval.min(RENEW_RETRY);
                }
                Err(_) => {
                    metrics::counter!("warden_lease_renewals_total", "result" => "timeout").increment(1);
                    tracing::warn!("lease renewal did not answer before the self-fence deadline");
                    next_renew = Instant::now();
                }
            }
            // After the renewal's result is applied (a slow heartbeat must not hold back
            // the validity window the handlers read).
            if let Some(p) = &proof {
                // Never past a lease's window: its expiry is handled below.
                let window = sent_at + config.valid_for();
                let hb_deadline = table.earliest_deadline().map_or(window, |d| d.min(window)).max(Instant::now());
                let hb = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    r = tokio::time::timeout_at(hb_deadline, store.heartbeat(&p.info, config.ttl)) => r,
                };
                match hb {
                    Ok(Ok(ids)) => {
                        db_seen = sent_at;
                        // A member missing from one answer only (its heartbeat was a
                        // moment late) stays proven until the next: proof-based
                        // removals skip the settle delay, so they must not flap.
                        let now: Option<BTreeSet<String>> = ids.map(|ids| ids.into_iter().collect());
                        let publish = match (&now, &last_proven) {
                            (Some(n), Some(l)) => Some(n.union(l).cloned().collect()),
                            _ => now.clone(),
                        };
                        last_proven = now;
                        p.proven.send_if_modified(|old| (*old != publish).then(|| *old = publish).is_some());
                    }
                    Ok(Err(e)) => tracing::debug!(error = %e, "member heartbeat failed"),
                    Err(_) => tracing::debug!("member heartbeat did not answer in time"),
                }
            }
        }
        let expired = table.expired(Instant::now());
        if !expired.is_empty() {
            tracing::warn!(count = expired.len(), "lease validity window passed without renewal; self-fencing");
            metrics::counter!("warden_self_fence_total").increment(expired.len() as u64);
            fence(&table, &expired, &on_fence);
        }
        if let Some(p) = &proof {
            // Self-fenced leases or a silent heartbeat past the window: say so at once.
            let ok = expired.is_empty() && Instant::now() < db_seen + config.valid_for();
            if p.db_ok.send_if_modified(|old| (*old != ok).then(|| *old = ok).is_some()) {
                if ok {
                    tracing::info!("database reachable again; announcing db=ok");
                } else {
                    tracing::warn!("database unreachable past the lease window; announcing db=lost");
                }
            }
        }
    }
}

/// Publish the lease table's live holders ([`Store::lease_holders`]) every `every`,
/// for sticky placement (`warden_cluster::sticky`), which every node computes from
/// them. With this node's `table`, its own holdings are overlaid exactly as it knows
/// them (re-published at once on every local grant, drain or release): a snapshot
/// read a moment before this node acquired or let go of a partition must not make
/// it let go of what it just took, or take back what it just gave away (both
/// measured as extra moves in the rolling-restart harness before the overlay).
/// Other nodes' holdings may be a read old; that only makes an acquire wait.
/// Publishes only changes; a failed read keeps the last snapshot. Returns at once
/// if the store keeps no holders.
///
/// A read may take up to `read_timeout` — give it the lease validity window
/// ([`LeaseConfig::valid_for`]), the time a renewal may take: a node that can keep its
/// leases must also be able to refresh its snapshot. (A snapshot that stays old makes
/// this node compute a different owner for a partition being handed off than the nodes
/// that read the new holders, and the partition can wait for as long as it stays old;
/// with a timeout shorter than the database's answer, it never gets fresher.) Local
/// changes are re-published while a read is in flight.
pub async fn watch_holders(
    store: Arc<dyn Store>,
    every: Duration,
    read_timeout: Duration,
    table: Option<Arc<LeaseTable>>,
    holders: watch::Sender<Option<warden_cluster::Holders>>,
    shutdown: CancellationToken,
) {
    type Read = std::pin::Pin<
        Box<
            dyn std::future::Future<
                    Output = std::result::Result<
                        crate::error::Result<Option<warden_cluster::Holders>>,
                        tokio::time::error::Elapsed,
                    >,
                > + Send,
        >,
    >;
    let mut local = table.as_ref().map(|t| t.changes());
    let mut read: Option<warden_cluster::Holders> = None;
    let mut next_read = Instant::now();
    let mut in_flight: Option<Read> = None;
    loop {
        if in_flight.is_none() && Instant::now() >= next_read {
            let store = store.clone();
            in_flight = Some(Box::pin(async move { tokio::time::timeout(read_timeout, store.lease_holders()).await }));
        }
        if let Some(read) = &read {
            let now = match &table {
                Some(t) => overlay(read, t),
                None => read.clone(),
            };
            holders.send_if_modified(|old| (old.as_ref() != Some(&now)).then(|| *old = Some(now)).is_some());
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            result = async { in_flight.as_mut().expect("guarded").await }, if in_flight.is_some() => {
                in_flight = None;
                match result {
                    Ok(Ok(Some(now))) => read = Some(now),
                    Ok(Ok(None)) => return,
                    Ok(Err(e)) => tracing::debug!(error = %e, "reading the lease holders failed"),
                    Err(_) => tracing::debug!("reading the lease holders did not answer in time"),
                }
                next_read = Instant::now() + every;
            }
            _ = tokio::time::sleep_until(next_read), if in_flight.is_none() => {}
            changed = async {
                match local.as_mut() {
                    Some(l) => l.changed().await,
                    None => std::future::pending().await,
                }
            } => if changed.is_err() { local = None },
        }
    }
}

/// `read` with this node's own holdings replaced by what `table` says: partitions it
/// keeps are its own (at the time read, or now if the read predates the grant), any
/// other partition the read gives it is free.
fn overlay(read: &warden_cluster::Holders, table: &LeaseTable) -> warden_cluster::Holders {
    let me = warden_cluster::sticky::member_of_owner(table.owner());
    let keeping = table.keeping();
    let now_us = chrono::Utc::now().timestamp_micros();
    read.iter()
        .enumerate()
        .map(|(p, h)| {
            let mine = h.as_ref().is_some_and(|h| h.owner == me);
            if keeping.binary_search(&(p as u32)).is_ok() {
                if mine {
                    h.clone()
                } else {
                    Some(warden_cluster::Holder { owner: me.to_string(), acquired_us: now_us })
                }
            } else if mine {
                None
            } else {
                h.clone()
            }
        })
        .collect()
}

fn fence(table: &LeaseTable, partitions: &[u32], on_fence: &OnFence) {
    for p in partitions {
        if let Some(l) = table.fence(*p) {
            tracing::info!(partition = l.partition, epoch = l.epoch, "ownership: fenced partition");
        }
    }
    on_fence(partitions);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn lease_is_usable_only_inside_its_window() {
        let t = LeaseTable::new("n1/1".into());
        t.granted(&[GrantedLease { partition: 3, epoch: 7 }], Instant::now() + Duration::from_secs(2));
        let a = t.current(3).expect("held");
        assert_eq!(a.fence.epoch, 7);
        tokio::time::advance(Duration::from_millis(1999)).await;
        assert!(t.holds(3));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(!t.holds(3), "expired window must not be usable");
        assert_eq!(t.expired(Instant::now()), vec![3]);
        t.fence(3);
        assert!(a.token.is_cancelled(), "fencing cancels running work");
        assert!(!a.validity.is_valid());
        assert!(t.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn renewal_extends_only_held_partitions() {
        let t = LeaseTable::new("n1/1".into());
        let now = Instant::now();
        t.granted(&[GrantedLease { partition: 1, epoch: 1 }], now + Duration::from_secs(1));
        t.renewed(&[1, 2], now + Duration::from_secs(5));
        assert_eq!(t.held(), vec![GrantedLease { partition: 1, epoch: 1 }]);
        assert_eq!(t.earliest_deadline(), Some(now + Duration::from_secs(5)));
    }

    #[tokio::test(start_paused = true)]
    async fn validity_follows_renewals_and_closes_on_fence_without_the_keeper() {
        let t = LeaseTable::new("n1/1".into());
        let now = Instant::now();
        t.granted(&[GrantedLease { partition: 1, epoch: 1 }], now + Duration::from_secs(2));
        let v = t.current(1).unwrap().validity;
        assert_eq!(v.remaining(), Duration::from_secs(2));
        t.renewed(&[1], now + Duration::from_secs(3));
        assert_eq!(v.remaining(), Duration::from_secs(3), "a renewal extends the window the executor reads");
        // A pause: time passes the window while nobody runs. The validity says so on
        // its own, before the keeper fences or cancels anything.
        tokio::time::advance(Duration::from_secs(4)).await;
        assert!(!v.is_valid() && v.remaining().is_zero());
        assert!(!t.current(1).unwrap_or_else(|| t.held_lease_for_test(1)).token.is_cancelled());
    }

    /// A store whose holders read answers after `delay` (the first at once).
    struct SlowHolders {
        delay: Duration,
        reads: AtomicU64,
    }

    #[async_trait::async_trait]
    impl Store for SlowHolders {
        fn partitions(&self) -> warden_cluster::PartitionCount {
            warden_cluster::PartitionCount::new(4).unwrap()
        }
        async fn acquire(&self, _: &str, _: &[u32], _: Duration) -> crate::error::Result<Vec<GrantedLease>> {
            unreachable!()
        }
        async fn renew(&self, _: &str, _: &[GrantedLease], _: Duration) -> crate::error::Result<Vec<u32>> {
            unreachable!()
        }
        async fn release(&self, _: &str, _: &[GrantedLease]) -> crate::error::Result<u64> {
            unreachable!()
        }
        async fn rescue(&self, _: &str, _: &[GrantedLease]) -> crate::error::Result<u64> {
            unreachable!()
        }
        async fn lease_wait(&self, _: &str, _: &[u32]) -> crate::error::Result<Option<Duration>> {
            unreachable!()
        }
        async fn due_accounts(&self, _: &[u32], _: i64) -> crate::error::Result<Vec<crate::store::DueAccount>> {
            unreachable!()
        }
        async fn running_here(
            &self,
            _: &str,
            _: &[u32],
            _: i64,
        ) -> crate::error::Result<Vec<crate::store::RunningJob>> {
            unreachable!()
        }
        async fn claim(&self, _: &str, _: &Fence) -> crate::error::Result<Option<crate::job::JobRow>> {
            unreachable!()
        }
        async fn finish(
            &self,
            _: Option<crate::store::JobTx>,
            _: &crate::job::JobRow,
            _: &Fence,
            _: &crate::store::Finish,
            _: bool,
        ) -> crate::error::Result<crate::store::Finished> {
            unreachable!()
        }
        async fn unclaim(&self, _: &crate::job::JobRow, _: &Fence) -> crate::error::Result<()> {
            unreachable!()
        }
        async fn cancel_requested(&self, _: i64) -> crate::error::Result<bool> {
            unreachable!()
        }
        async fn beat(
            &self,
            _: i64,
            _: i32,
            _: &Fence,
            _: &crate::progress::Beat,
        ) -> crate::error::Result<crate::progress::BeatAck> {
            unreachable!()
        }
        async fn checkpoint(&self, _: i64) -> crate::error::Result<Option<crate::progress::StoredCheckpoint>> {
            unreachable!()
        }
        async fn begin(&self, _: Duration) -> crate::error::Result<crate::store::JobTx> {
            unreachable!()
        }
        async fn lease_holders(&self) -> crate::error::Result<Option<warden_cluster::Holders>> {
            let n = self.reads.fetch_add(1, Ordering::SeqCst);
            if n > 0 {
                tokio::time::sleep(self.delay).await;
            }
            let h = warden_cluster::Holder { owner: "other".into(), acquired_us: n as i64 };
            Ok(Some(vec![Some(h); 4]))
        }
    }

    /// A database that answers the holders read in 800 ms — slower than the 500 ms the
    /// read was given (2 × renew/4), well inside the 3 s a renewal is: the node keeps its
    /// leases, so its snapshot must keep up too (a snapshot that stays old left
    /// partitions unowned in `sticky::attack`'s agents). And a local grant is published
    /// while a read is in flight.
    #[tokio::test(start_paused = true)]
    async fn holders_keep_up_with_a_slow_database_and_local_grants_do_not_wait_for_a_read() {
        let config = LeaseConfig::default();
        let store = Arc::new(SlowHolders { delay: Duration::from_millis(800), reads: AtomicU64::new(0) });
        let table = Arc::new(LeaseTable::new("n1/1".into()));
        let (tx, mut rx) = watch::channel(None);
        let stop = CancellationToken::new();
        let task = tokio::spawn(watch_holders(
            store.clone(),
            config.renew_interval / 4,
            config.valid_for(),
            Some(table.clone()),
            tx,
            stop.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(300)).await;
        let first = rx.borrow_and_update().clone().expect("the first read");
        assert_eq!(first[1].as_ref().unwrap().acquired_us, 0);
        // A read is in flight now (since 250 ms, until 1050 ms): a grant shows at once.
        table.granted(&[GrantedLease { partition: 1, epoch: 1 }], Instant::now() + Duration::from_secs(3));
        tokio::time::sleep(Duration::from_millis(10)).await;
        let now = rx.borrow_and_update().clone().unwrap();
        assert_eq!(now[1].as_ref().unwrap().owner, "n1", "the local grant waited for the read");
        // Reads that take 800 ms complete: the snapshot gets fresher.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let later = rx.borrow_and_update().clone().unwrap();
        assert!(later[0].as_ref().unwrap().acquired_us >= 2, "the snapshot never got fresher: {later:?}");
        stop.cancel();
        task.await.unwrap();
    }

    #[test]
    fn config_validation() {
        LeaseConfig::default().validate().unwrap();
        let bad = LeaseConfig { safety_margin: Duration::from_secs(5), ..Default::default() };
        assert!(bad.validate().is_err());
        let bad = LeaseConfig { renew_interval: Duration::from_secs(3), ..Default::default() };
        assert!(bad.validate().unwrap_err().contains("lease_renew_interval"));
    }
}
