//! Placement: which partitions a node *should* hold. Pure functions only.
//!
//! The runtime's enforcer asks a [`Placement`] for the desired partition set on
//! every tick and acquires/releases leases to match. The single-node placement
//! wants everything; the ring placement (cluster issue) replaces it behind the
//! same trait.

use crate::partition::PartitionCount;
use std::collections::BTreeSet;

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
    fn desired(&self, partitions: PartitionCount) -> Assignment;
}

/// One node owns every partition.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleNode;

impl Placement for SingleNode {
    fn desired(&self, partitions: PartitionCount) -> Assignment {
        Assignment::all(partitions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_node_wants_everything() {
        let a = SingleNode.desired(PartitionCount::new(16).unwrap());
        assert_eq!(a.partitions.len(), 16);
        assert!(a.partitions.contains(&0) && a.partitions.contains(&15));
    }
}
