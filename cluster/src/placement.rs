//! Placement: which partitions this node *should* hold. The enforcer (runtime)
//! asks on every tick and acquires/releases leases to match; nothing here is
//! trusted for safety.
//!
//! - [`SingleNode`]: one node wants every partition.
//! - [`RingPlacement`]: the consistent-hash ring with bounded loads (see
//!   [`crate::ring`]) over the *active* live members, recomputed only after the
//!   active set has been stable for `settle_delay`, so a flapping member does not
//!   churn ownership. The settle logic is the pure [`Settler`]; the thin loop
//!   [`run_ring`] feeds it membership views.

use crate::membership::{Member, MemberState, Membership};
use crate::partition::PartitionCount;
use crate::ring::{place, RingAssignment, RingConfig};
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
    pending: Option<(Vec<String>, Instant)>,
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
            Some((set, since)) if *set == active => {
                if now.duration_since(*since) >= self.delay {
                    self.applied = Some(active.clone());
                    self.pending = None;
                    return Some(active);
                }
            }
            _ => self.pending = Some((active, now)),
        }
        None
    }

    /// When to observe again to apply the pending set.
    pub fn deadline(&self) -> Option<Instant> {
        self.pending.as_ref().map(|(_, since)| *since + self.delay)
    }

    pub fn applied(&self) -> Option<&[String]> {
        self.applied.as_deref()
    }
}

/// Members that own partitions: live and `active`.
pub fn active_ids(view: &[Member]) -> Vec<String> {
    view.iter().filter(|m| m.state == MemberState::Active).map(|m| m.node_id.clone()).collect()
}

/// The ring placement for one node.
pub struct RingPlacement {
    node_id: String,
    /// `None` until the first ring is computed; then `Some(None)` when no member is active.
    ring: RwLock<Option<Option<Arc<RingAssignment>>>>,
    changes_tx: watch::Sender<u64>,
    changes_rx: watch::Receiver<u64>,
}

impl RingPlacement {
    pub fn new(node_id: impl Into<String>) -> Arc<Self> {
        let (changes_tx, changes_rx) = watch::channel(0);
        Arc::new(Self { node_id: node_id.into(), ring: RwLock::new(None), changes_tx, changes_rx })
    }

    /// The whole current ring (for observation APIs).
    pub fn ring(&self) -> Option<Arc<RingAssignment>> {
        self.ring.read().unwrap().clone().flatten()
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    fn set(&self, ring: Option<RingAssignment>) {
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

/// Feed membership views to the settler and publish ring changes to `placement`.
/// Runs until `shutdown`.
pub async fn run_ring(
    membership: Arc<dyn Membership>,
    placement: Arc<RingPlacement>,
    partitions: PartitionCount,
    config: RingConfig,
    settle_delay: Duration,
    shutdown: CancellationToken,
) {
    let mut view = membership.view();
    let mut settler = Settler::new(settle_delay);
    loop {
        let active = active_ids(&view.borrow_and_update());
        if let Some(set) = settler.observe(active, Instant::now()) {
            let ring = place(&set, partitions, &config);
            let mine = ring.as_ref().map(|r| r.partitions_of(&placement.node_id).len()).unwrap_or(0);
            tracing::info!(members = ?set, partitions_here = mine, "ownership: ring changed");
            placement.set(ring);
        }
        let deadline = settler.deadline();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = view.changed() => if changed.is_err() { return },
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
        let m = |id: &str, st| Member {
            node_id: id.into(),
            generation: 1,
            gossip_addr: ([127, 0, 0, 1], 1).into(),
            grpc_addr: None,
            state: st,
            load: Default::default(),
        };
        let view = vec![m("a", MemberState::Active), m("b", MemberState::Joining), m("c", MemberState::Leaving)];
        assert_eq!(active_ids(&view), ids(&["a"]));
    }
}
