//! The ownership stream's diffs: pure functions from what a watcher last saw (lease
//! owners, member states) and what is current to the changes that turn one into the
//! other. The gRPC `WatchOwnership` stream sends them (converted to its protobuf
//! events in `api.rs`); nothing here knows about tonic, the database or time.
//!
//! A watcher that falls behind is given the *net* change between what it saw and
//! now, never the steps in between: applying [`ownership_changes`]`(old, new)` to
//! `old` yields exactly `new` (see [`apply_ownership`]), and nothing is emitted when
//! nothing changed.

use std::collections::BTreeMap;

/// Who holds a partition's unexpired lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// The node id (without its generation).
    pub node_id: String,
    pub epoch: i64,
}

/// Held partitions: partition → holder, unexpired leases only.
pub type Owners = BTreeMap<u32, Holder>;

/// Live members: node id → gossip state (`joining`, `active`, `leaving`).
pub type MemberStates = BTreeMap<String, String>;

/// One change of a partition's ownership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnershipChange {
    /// Newly held, or held again by the same node under a new epoch.
    Acquired { partition: u32, to: String, epoch: i64 },
    /// Held by another node than before.
    Moved { partition: u32, from: String, to: String, epoch: i64 },
    /// No longer held (released or expired); `epoch` is the one last seen.
    Released { partition: u32, from: String, epoch: i64 },
}

/// One change of the member set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberChange {
    Joined { node_id: String, state: String },
    State { node_id: String, state: String },
    Left { node_id: String },
}

/// The ownership changes that turn `old` into `new`: first by partition over `new`
/// (acquired, moved), then the partitions only `old` has (released).
pub fn ownership_changes(old: &Owners, new: &Owners) -> Vec<OwnershipChange> {
    let mut out = Vec::new();
    for (&partition, h) in new {
        match old.get(&partition) {
            None => out.push(OwnershipChange::Acquired { partition, to: h.node_id.clone(), epoch: h.epoch }),
            Some(o) if o.node_id != h.node_id => out.push(OwnershipChange::Moved {
                partition,
                from: o.node_id.clone(),
                to: h.node_id.clone(),
                epoch: h.epoch,
            }),
            Some(o) if o.epoch != h.epoch => {
                out.push(OwnershipChange::Acquired { partition, to: h.node_id.clone(), epoch: h.epoch })
            }
            Some(_) => {}
        }
    }
    for (&partition, o) in old {
        if !new.contains_key(&partition) {
            out.push(OwnershipChange::Released { partition, from: o.node_id.clone(), epoch: o.epoch });
        }
    }
    out
}

/// Apply one change to a snapshot (what a client of the stream does).
pub fn apply_ownership(owners: &mut Owners, change: &OwnershipChange) {
    match change {
        OwnershipChange::Acquired { partition, to, epoch } | OwnershipChange::Moved { partition, to, epoch, .. } => {
            owners.insert(*partition, Holder { node_id: to.clone(), epoch: *epoch });
        }
        OwnershipChange::Released { partition, .. } => {
            owners.remove(partition);
        }
    }
}

/// The member changes that turn `old` into `new`: joins and state changes by node id
/// over `new`, then the members only `old` has (left).
pub fn member_changes(old: &MemberStates, new: &MemberStates) -> Vec<MemberChange> {
    let mut out = Vec::new();
    for (id, state) in new {
        match old.get(id) {
            None => out.push(MemberChange::Joined { node_id: id.clone(), state: state.clone() }),
            Some(o) if o != state => out.push(MemberChange::State { node_id: id.clone(), state: state.clone() }),
            Some(_) => {}
        }
    }
    for id in old.keys() {
        if !new.contains_key(id) {
            out.push(MemberChange::Left { node_id: id.clone() });
        }
    }
    out
}

/// Apply one member change to a snapshot.
pub fn apply_member(members: &mut MemberStates, change: &MemberChange) {
    match change {
        MemberChange::Joined { node_id, state } | MemberChange::State { node_id, state } => {
            members.insert(node_id.clone(), state.clone());
        }
        MemberChange::Left { node_id } => {
            members.remove(node_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn owners(v: &[(u32, &str, i64)]) -> Owners {
        v.iter().map(|(p, o, e)| (*p, Holder { node_id: o.to_string(), epoch: *e })).collect()
    }

    #[test]
    fn every_change_is_named_and_nothing_else() {
        let old = owners(&[(0, "a", 1), (1, "a", 1), (2, "b", 3), (3, "b", 3)]);
        let new = owners(&[(0, "a", 1), (1, "b", 2), (2, "b", 4), (4, "c", 1)]);
        assert_eq!(
            ownership_changes(&old, &new),
            vec![
                OwnershipChange::Moved { partition: 1, from: "a".into(), to: "b".into(), epoch: 2 },
                OwnershipChange::Acquired { partition: 2, to: "b".into(), epoch: 4 },
                OwnershipChange::Acquired { partition: 4, to: "c".into(), epoch: 1 },
                OwnershipChange::Released { partition: 3, from: "b".into(), epoch: 3 },
            ]
        );
    }

    #[test]
    fn a_slow_reader_gets_the_net_change() {
        // a → b → a again while the reader was away: same owner, new epoch.
        let changes = ownership_changes(&owners(&[(7, "a", 1)]), &owners(&[(7, "a", 3)]));
        assert_eq!(changes, vec![OwnershipChange::Acquired { partition: 7, to: "a".into(), epoch: 3 }]);
    }

    fn arb_owners() -> impl Strategy<Value = Owners> {
        // Few partitions, nodes and epochs, so that old and new overlap often.
        prop::collection::btree_map(0u32..24, (0usize..4, 1i64..4), 0..24).prop_map(|m| {
            m.into_iter().map(|(p, (n, e))| (p, Holder { node_id: format!("node-{n}"), epoch: e })).collect()
        })
    }

    fn arb_members() -> impl Strategy<Value = MemberStates> {
        let state = prop::sample::select(vec!["joining", "active", "leaving"]);
        prop::collection::btree_map((0usize..8).prop_map(|n| format!("node-{n}")), state.prop_map(String::from), 0..8)
    }

    proptest! {
        #[test]
        fn applying_the_changes_to_the_old_snapshot_yields_the_new(old in arb_owners(), new in arb_owners()) {
            let mut seen = old.clone();
            for c in ownership_changes(&old, &new) {
                apply_ownership(&mut seen, &c);
            }
            prop_assert_eq!(seen, new);
        }

        #[test]
        fn no_change_no_event(o in arb_owners(), m in arb_members()) {
            prop_assert!(ownership_changes(&o, &o).is_empty());
            prop_assert!(member_changes(&m, &m).is_empty());
        }

        #[test]
        fn one_event_per_changed_partition_and_none_for_the_rest(old in arb_owners(), new in arb_owners()) {
            let changes = ownership_changes(&old, &new);
            let mut touched: Vec<u32> = changes.iter().map(|c| match c {
                OwnershipChange::Acquired { partition, .. }
                | OwnershipChange::Moved { partition, .. }
                | OwnershipChange::Released { partition, .. } => *partition,
            }).collect();
            let n = touched.len();
            touched.sort_unstable();
            touched.dedup();
            prop_assert_eq!(n, touched.len(), "at most one event per partition");
            let changed: Vec<u32> = old.keys().chain(new.keys()).copied()
                .collect::<std::collections::BTreeSet<_>>().into_iter()
                .filter(|p| old.get(p) != new.get(p)).collect();
            prop_assert_eq!(touched, changed);
        }

        #[test]
        fn a_move_names_both_owners_and_a_release_the_last_epoch(old in arb_owners(), new in arb_owners()) {
            for c in ownership_changes(&old, &new) {
                match c {
                    OwnershipChange::Moved { partition, from, to, epoch } => {
                        prop_assert_eq!(&old[&partition].node_id, &from);
                        prop_assert_eq!(&new[&partition], &Holder { node_id: to, epoch });
                    }
                    OwnershipChange::Released { partition, from, epoch } => {
                        prop_assert_eq!(&old[&partition], &Holder { node_id: from, epoch });
                    }
                    OwnershipChange::Acquired { partition, to, epoch } => {
                        prop_assert!(old.get(&partition).is_none_or(|o| o.node_id == to && o.epoch != epoch));
                    }
                }
            }
        }

        #[test]
        fn applying_member_changes_yields_the_new_member_set(old in arb_members(), new in arb_members()) {
            let mut seen = old.clone();
            for c in member_changes(&old, &new) {
                apply_member(&mut seen, &c);
            }
            prop_assert_eq!(seen, new);
        }
    }
}
