//! Placement: which partitions this node *should* hold. The enforcer (runtime)
//! asks on every tick and acquires/releases leases to match; nothing here is
//! trusted for safety.
//!
//! - [`SingleNode`]: one node wants every partition.
//! - [`RingPlacement`]: sticky placement over the lease holders (see
//!   [`crate::sticky`]; the default) or the consistent-hash ring with bounded loads
//!   (see [`crate::ring`]), whichever every member computes, over the *eligible* members ([`eligible_ids`]: live, `active`,
//!   not announcing `db=lost`, and — when the runtime supplies proof — seen in the
//!   database recently), recomputed only after the set has been stable for
//!   `settle_delay`, so a flapping member does not churn ownership. A member that
//!   announced it is leaving or lost the database, or whose proof lapsed, is dropped
//!   at once ([`Settler::observe_removal`]): it holds nothing any more, and waiting
//!   would only stall its partitions. The ring's config is the one every member
//!   agrees on ([`RingConfig::effective`]). The settle logic is the pure
//!   [`Settler`]; the thin loop [`run_ring`] feeds it membership views.

use crate::membership::{Member, MemberState, Membership};
use crate::partition::PartitionCount;
use crate::ring::{place, RingAssignment, RingConfig};
use crate::sticky::{place_sticky, Candidate, Holders};
use std::collections::BTreeSet;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The partitions one node should hold.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Assignment {
    pub partitions: BTreeSet<u32>,
}

impl Assignment {
    pub fn all(p: PartitionCount) -> Self {
        Self { partitions: (0..p.get()).collect() }
    }
}

/// Source of the desired assignment for the local node.
pub trait Placement: Send + Sync + 'static {
    /// `None` while unknown (e.g. before the first ring): acquire and release nothing.
    fn desired(&self, partitions: PartitionCount) -> Option<Assignment>;
    /// Bumped on every change of the desired assignment, so the enforcer reacts at once.
    fn changes(&self) -> Option<watch::Receiver<u64>> {
        None
    }
}

/// One node owns every partition.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleNode;

impl Placement for SingleNode {
    fn desired(&self, partitions: PartitionCount) -> Option<Assignment> {
        Some(Assignment::all(partitions))
    }
}

/// Pure settle logic: apply a new active member set only once it has been stable
/// for `delay`.
#[derive(Debug, Clone)]
pub struct Settler {
    delay: Duration,
    applied: Option<Vec<String>>,
    pending: Option<Pending>,
}

/// A member set seen, waiting to be stable for the settle delay.
#[derive(Debug, Clone)]
struct Pending {
    set: Vec<String>,
    since: Instant,
}

impl Settler {
    pub fn new(delay: Duration) -> Self {
        Self { delay, applied: None, pending: None }
    }

    /// Observe the current active set at `now`. Returns the set to apply if it has
    /// been stable long enough and differs from what is applied.
    pub fn observe(&mut self, mut active: Vec<String>, now: Instant) -> Option<Vec<String>> {
        active.sort();
        active.dedup();
        if self.applied.as_ref() == Some(&active) {
            self.pending = None;
            return None;
        }
        match &self.pending {
            Some(p) if p.set == active => {
                if now.duration_since(p.since) >= self.delay {
                    self.applied = Some(active.clone());
                    self.pending = None;
                    return Some(active);
                }
            }
            _ => self.pending = Some(Pending { set: active, since: now }),
        }
        None
    }

    /// Observe a set that only *removes* members known to hold nothing (announced
    /// `leaving` or `db=lost`, or unproven): apply it at once, without the settle delay.
    /// Anything else is an ordinary [`Settler::observe`].
    pub fn observe_removal(&mut self, mut active: Vec<String>, now: Instant) -> Option<Vec<String>> {
        active.sort();
        active.dedup();
        let only_removes = match &self.applied {
            Some(applied) => active.iter().all(|m| applied.contains(m)) && active.len() < applied.len(),
            None => false,
        };
        if only_removes {
            self.applied = Some(active.clone());
            self.pending = None;
            return Some(active);
        }
        self.observe(active, now)
    }

    /// When to observe again to apply the pending set.
    pub fn deadline(&self) -> Option<Instant> {
        self.pending.as_ref().map(|p| p.since + self.delay)
    }

    pub fn applied(&self) -> Option<&[String]> {
        self.applied.as_deref()
    }
}

/// Members that own partitions: live and `active`.
pub fn active_ids(view: &[Member]) -> Vec<String> {
    view.iter().filter(|m| m.state == MemberState::Active).map(|m| m.node_id.clone()).collect()
}

/// Node ids seen in the database recently (`None`: no proof available — every live
/// member counts, as before the runtime supplied it).
pub type Proven = Option<BTreeSet<String>>;

/// Members that may own partitions: live, `active`, not announcing `db=lost`, and
/// proven to reach the database when proof is available. Sorted.
///
/// A member that publishes no schema version is a release from before member proof
/// (schema v4), which cannot heartbeat: during a rolling upgrade from it, it counts on
/// gossip's word as it did before (excluding it would have every new node fight the
/// old ones for their partitions). Once every node runs v4 or later, every member
/// must prove itself. See `deploy/UPGRADING.md`.
pub fn eligible_ids(view: &[Member], proven: &Proven) -> Vec<String> {
    let mut ids: Vec<String> = view
        .iter()
        .filter(|m| m.state == MemberState::Active && m.db_ok)
        .filter(|m| m.schema.is_none() || proven.as_ref().is_none_or(|p| p.contains(&m.node_id)))
        .map(|m| m.node_id.clone())
        .collect();
    ids.sort();
    ids
}

/// Was every member missing from `next` (relative to `applied`) dropped for a reason
/// that means it holds nothing: it announced `leaving` or `db=lost`, or is live but
/// unproven? (A member that merely vanished from gossip may be a gossip blip: that
/// waits for the settle delay.)
pub fn removal_is_known(applied: &[String], next: &[String], view: &[Member], proven: &Proven) -> bool {
    applied.iter().filter(|id| !next.contains(id)).all(|id| {
        view.iter().any(|m| {
            m.node_id == *id
                && (m.state == MemberState::Leaving
                    || !m.db_ok
                    || (m.schema.is_some() && proven.as_ref().is_some_and(|p| !p.contains(&m.node_id))))
        })
    })
}

/// The ring placement for one node.
pub struct RingPlacement {
    node_id: String,
    /// `None` until the first ring is computed; then `Some(None)` when no member is
    /// active, or when this node cannot compute the ring the cluster agrees on (it
    /// then owns nothing: see [`RingConfig::effective`]).
    ring: RwLock<Option<Option<Arc<RingAssignment>>>>,
    changes_tx: watch::Sender<u64>,
    changes_rx: watch::Receiver<u64>,
    standby: std::sync::atomic::AtomicBool,
}

impl RingPlacement {
    pub fn new(node_id: impl Into<String>) -> Arc<Self> {
        let (changes_tx, changes_rx) = watch::channel(0);
        Arc::new(Self {
            node_id: node_id.into(),
            ring: RwLock::new(None),
            changes_tx,
            changes_rx,
            standby: Default::default(),
        })
    }

    /// The whole current ring (for observation APIs).
    pub fn ring(&self) -> Option<Arc<RingAssignment>> {
        self.ring.read().unwrap().clone().flatten()
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// True while this node cannot compute the ring the cluster agrees on and so
    /// owns nothing (see [`RingConfig::effective`]).
    pub fn standby(&self) -> bool {
        self.standby.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn set(&self, ring: Option<RingAssignment>, standby: bool) {
        self.standby.store(standby, std::sync::atomic::Ordering::Relaxed);
        *self.ring.write().unwrap() = Some(ring.map(Arc::new));
        self.changes_tx.send_modify(|v| *v += 1);
    }
}

impl Placement for RingPlacement {
    fn desired(&self, _partitions: PartitionCount) -> Option<Assignment> {
        let ring = self.ring.read().unwrap();
        let computed = ring.as_ref()?;
        Some(Assignment { partitions: computed.as_ref().map(|r| r.partitions_of(&self.node_id)).unwrap_or_default() })
    }

    fn changes(&self) -> Option<watch::Receiver<u64>> {
        Some(self.changes_rx.clone())
    }
}

/// Feed membership views (and, when given, the set of members proven to reach the
/// database and the lease holders) to the settler and publish placement changes to
/// `placement`. Runs until `shutdown`.
///
/// The placement is the one every member agrees on ([`RingConfig::effective`]):
/// sticky placement ([`crate::sticky`]) over the applied member set and the latest
/// `holders` snapshot — recomputed whenever either changes — or the plain ring
/// ([`place`]) over the applied set. With a `holders` feed that has not yet
/// delivered a snapshot, sticky placement waits for it (the node holds nothing new
/// meanwhile); without a feed it computes from the members alone.
#[allow(clippy::too_many_arguments)]
pub async fn run_ring(
    membership: Arc<dyn Membership>,
    placement: Arc<RingPlacement>,
    partitions: PartitionCount,
    config: RingConfig,
    settle_delay: Duration,
    proof: Option<watch::Receiver<Proven>>,
    holders: Option<watch::Receiver<Option<Holders>>>,
    shutdown: CancellationToken,
) {
    let mut view = membership.view();
    let mut proof = proof;
    let mut holders = holders;
    let mut settler = Settler::new(settle_delay);
    let mut applied_config: Option<RingConfig> = None;
    // A set was applied but sticky placement had no holders snapshot to compute from.
    let mut waiting_for_holders = false;
    // The snapshot the current placement was computed from. (Compared by value: the
    // `changed()` that wakes this loop has already marked the new one seen.)
    let mut computed_from: Option<Holders> = None;
    loop {
        let members = view.borrow_and_update().clone();
        let proven: Proven = proof.as_mut().and_then(|p| p.borrow_and_update().clone());
        let snapshot: Option<Holders> = holders.as_mut().and_then(|h| h.borrow_and_update().clone());
        let holders_changed = snapshot.is_some() && snapshot != computed_from;
        let eligible = eligible_ids(&members, &proven);
        let known_removal =
            settler.applied().is_some_and(|applied| removal_is_known(applied, &eligible, &members, &proven));
        let applied = if known_removal {
            settler.observe_removal(eligible, Instant::now())
        } else {
            settler.observe(eligible, Instant::now())
        };
        // The config every member agrees on, over the members placement is computed
        // for (the applied set): a joiner publishing an older algorithm switches the
        // cluster when it joins the placement, in the same step — not a settle delay
        // earlier, which would move most partitions twice (a rollback to `ring1`).
        let in_set = settler.applied().unwrap_or(&[]);
        let others = members
            .iter()
            .filter(|m| m.node_id != placement.node_id && in_set.contains(&m.node_id))
            .map(|m| m.ring.as_deref());
        let effective = RingConfig::effective(&config, others);
        let config_changed = applied_config.is_some() && effective != applied_config;
        let sticky = effective.as_ref().is_some_and(|c| c.algorithm >= 2);
        let membership_changed = applied.is_some() || config_changed;
        let set = match applied {
            Some(set) => Some(set),
            None if config_changed || waiting_for_holders || (sticky && holders_changed) => {
                settler.applied().map(<[String]>::to_vec)
            }
            None => None,
        };
        if let Some(set) = set {
            applied_config = effective.clone();
            let placed: Vec<Member> = members.iter().filter(|m| set.contains(&m.node_id)).cloned().collect();
            let rollout_target = crate::rollout::target_version(&placed).map(str::to_string);
            // Outer `None`: cannot compute yet (sticky placement without its snapshot).
            let computed: Option<Option<RingAssignment>> = match &effective {
                Some(c) if c.algorithm >= 2 => match (&holders, &snapshot) {
                    (Some(_), None) => None,
                    (_, snapshot) => {
                        let candidates: Vec<Candidate> = set
                            .iter()
                            .map(|id| {
                                let m = placed.iter().find(|m| m.node_id == *id);
                                let version = m.and_then(|m| m.version.as_deref());
                                Candidate::new(
                                    id.clone(),
                                    m.and_then(|m| m.started_us).unwrap_or(0),
                                    rollout_target.is_some() && version == rollout_target.as_deref(),
                                )
                            })
                            .collect();
                        let holders: &[Option<crate::sticky::Holder>] = snapshot.as_deref().unwrap_or(&[]);
                        computed_from = snapshot.clone();
                        Some(place_sticky(&candidates, holders, partitions, c.load_epsilon))
                    }
                },
                Some(c) => {
                    if *c != config {
                        tracing::warn!(own = %config.fingerprint(), effective = %c.fingerprint(),
                            "ownership: members publish different ring configs; computing the one they agree on");
                    }
                    Some(place(&set, partitions, c))
                }
                None => {
                    tracing::error!(own = %config.fingerprint(),
                        "ownership: the cluster's oldest ring algorithm is unknown to this binary; owning nothing");
                    Some(None)
                }
            };
            waiting_for_holders = computed.is_none();
            if let Some(ring) = computed {
                let standby = effective.is_none();
                let current = placement.ring();
                let changed = current.as_deref() != ring.as_ref() || placement.standby() != standby;
                if membership_changed || changed {
                    let mine = ring.as_ref().map(|r| r.partitions_of(&placement.node_id).len()).unwrap_or(0);
                    let algorithm = effective.as_ref().map(|c| c.algorithm);
                    if membership_changed {
                        tracing::info!(members = ?set, partitions_here = mine, standby, ?algorithm, ?rollout_target,
                            "ownership: ring changed");
                    } else {
                        let moved = match (&current, &ring) {
                            (Some(a), Some(b)) if a.partitions() == b.partitions() => {
                                (0..a.partitions()).filter(|q| a.owner(*q) != b.owner(*q)).count()
                            }
                            _ => partitions.get() as usize,
                        };
                        tracing::debug!(
                            moved,
                            partitions_here = mine,
                            "ownership: sticky placement followed the lease holders"
                        );
                    }
                    placement.set(ring, standby);
                }
            }
        }
        let deadline = settler.deadline();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = view.changed() => if changed.is_err() { return },
            changed = async {
                match proof.as_mut() {
                    Some(p) => p.changed().await,
                    None => std::future::pending().await,
                }
            } => if changed.is_err() { proof = None },
            changed = async {
                match holders.as_mut() {
                    Some(h) => h.changed().await,
                    None => std::future::pending().await,
                }
            } => if changed.is_err() { holders = None },
            _ = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_node_wants_everything() {
        let a = SingleNode.desired(PartitionCount::new(16).unwrap()).unwrap();
        assert_eq!(a.partitions.len(), 16);
        assert!(a.partitions.contains(&0) && a.partitions.contains(&15));
    }

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_set_is_applied_only_after_it_is_stable_for_the_delay() {
        let mut s = Settler::new(Duration::from_millis(500));
        let t0 = Instant::now();
        assert_eq!(s.observe(ids(&["b", "a"]), t0), None);
        assert_eq!(s.deadline(), Some(t0 + Duration::from_millis(500)));
        assert_eq!(s.observe(ids(&["a", "b"]), t0 + Duration::from_millis(499)), None);
        assert_eq!(s.observe(ids(&["a", "b"]), t0 + Duration::from_millis(500)), Some(ids(&["a", "b"])));
        assert_eq!(s.observe(ids(&["a", "b"]), t0 + Duration::from_secs(5)), None, "already applied");
        // A flapping member restarts the clock each time and is never applied mid-flap.
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(s.observe(ids(&["a", "b", "c"]), t1), None);
        assert_eq!(s.observe(ids(&["a", "b"]), t1 + Duration::from_millis(300)), None);
        assert_eq!(s.observe(ids(&["a", "b", "c"]), t1 + Duration::from_millis(600)), None);
        assert_eq!(s.observe(ids(&["a", "b", "c"]), t1 + Duration::from_millis(1000)), None);
        assert_eq!(s.observe(ids(&["a", "b", "c"]), t1 + Duration::from_millis(1100)), Some(ids(&["a", "b", "c"])));
        assert_eq!(s.applied(), Some(&ids(&["a", "b", "c"])[..]));
    }

    #[test]
    fn only_active_members_own_partitions() {
        let m = |id: &str, state| Member { state, ..Member::active(id, ([127, 0, 0, 1], 1).into()) };
        let view = vec![m("a", MemberState::Active), m("b", MemberState::Joining), m("c", MemberState::Leaving)];
        assert_eq!(active_ids(&view), ids(&["a"]));
    }

    fn member(id: &str, db_ok: bool, schema: Option<i64>) -> Member {
        Member { db_ok, schema, ..Member::active(id, ([127, 0, 0, 1], 1).into()) }
    }

    #[test]
    fn only_members_proven_in_the_database_are_eligible() {
        let view = vec![
            member("a", true, Some(4)),
            member("b", true, Some(4)),  // gossips, never proven
            member("c", false, Some(4)), // announced db=lost
            member("old", true, None),   // a pre-v4 release: cannot prove, trusted
        ];
        let proven: Proven = Some(["a", "c"].iter().map(|s| s.to_string()).collect());
        assert_eq!(eligible_ids(&view, &proven), ids(&["a", "old"]));
        assert_eq!(eligible_ids(&view, &None), ids(&["a", "b", "old"]), "no proof: gossip alone");
        // b and c are known to hold nothing: their removal skips the settle delay.
        let applied = ids(&["a", "b", "c", "old"]);
        assert!(removal_is_known(&applied, &ids(&["a", "old"]), &view, &proven));
        // A member that vanished from gossip may be a blip: it waits.
        assert!(!removal_is_known(&ids(&["a", "gone", "old"]), &ids(&["a", "old"]), &view, &proven));
    }

    #[tokio::test(start_paused = true)]
    async fn a_removal_of_members_known_to_hold_nothing_applies_at_once() {
        let mut s = Settler::new(Duration::from_secs(5));
        let t0 = Instant::now();
        s.observe(ids(&["a", "b"]), t0);
        assert_eq!(s.observe(ids(&["a", "b"]), t0 + Duration::from_secs(5)), Some(ids(&["a", "b"])));
        assert_eq!(s.observe_removal(ids(&["a"]), t0 + Duration::from_secs(6)), Some(ids(&["a"])));
        // An addition still waits for the delay.
        assert_eq!(s.observe_removal(ids(&["a", "c"]), t0 + Duration::from_secs(7)), None);
        assert_eq!(s.observe(ids(&["a", "c"]), t0 + Duration::from_secs(12)), Some(ids(&["a", "c"])));
    }

    #[test]
    fn members_agree_on_one_ring_config() {
        let own = RingConfig::default();
        let other = RingConfig { vnodes_per_member: 64, load_epsilon: 0.1, ..RingConfig::default() };
        let (o, x) = (own.fingerprint(), other.fingerprint());
        // Same everywhere: our own.
        assert_eq!(RingConfig::effective(&own, [Some(o.as_str())]), Some(own.clone()));
        // The most published config wins, whoever computes it.
        assert_eq!(RingConfig::effective(&own, [Some(x.as_str()), Some(x.as_str())]), Some(other.clone()));
        assert_eq!(RingConfig::effective(&other, [Some(o.as_str()), Some(o.as_str())]), Some(own.clone()));
        // A tie goes to the smallest fingerprint, on both sides.
        let a = RingConfig::effective(&own, [Some(x.as_str())]);
        let b = RingConfig::effective(&other, [Some(o.as_str())]);
        assert_eq!(a, b);
        // An older algorithm published by anyone wins; one this binary does not know
        // (a future "ring3" is newer, so ring2 still wins) is ignored in favour of it.
        assert_eq!(RingConfig::effective(&own, [Some("ring3;whatever")]), Some(own.clone()));
        // One member of the release before sticky placement (ring1): everyone computes
        // the plain ring until it is gone, whoever computes.
        let plain = RingConfig { algorithm: 1, ..RingConfig::default() };
        let p1 = plain.fingerprint();
        assert_eq!(p1, "ring1;vnodes=128;eps=0.05", "what the release before publishes");
        assert_eq!(RingConfig::effective(&own, [Some(o.as_str()), Some(p1.as_str())]), Some(plain.clone()));
        assert_eq!(RingConfig::effective(&plain, [Some(o.as_str()), Some(o.as_str())]), Some(plain.clone()));
        // A cluster whose oldest algorithm this binary cannot compute: own nothing.
        assert_eq!(RingConfig::effective(&own, [Some("ring0;vnodes=1;eps=0")]), None);
        // Members that publish nothing (binaries before the field) count as the
        // default config of the plain ring, the only one they compute.
        assert_eq!(RingConfig::effective(&other, [None, None]), Some(plain));
    }
}
