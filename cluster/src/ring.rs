//! The ring: a pure, deterministic function from (active members, P) to the owner
//! of every partition.
//!
//! 1. Every member gets `vnodes_per_member` points on a consistent-hash ring (the
//!    `hashring` crate, with an identity hasher over our own keys). A point's position
//!    is `md5(node_id || index)`, so it depends on the node id only — not on addresses,
//!    start order or the order members are listed in.
//! 2. Partitions sit evenly spaced on the ring; each partition's *primary* is the first
//!    point clockwise from its position.
//! 3. Bounded loads (Mirrokni, Thorup, Zadimoghaddam): no member may own more than
//!    `cap = max(⌈P/N⌉, ⌊(1+ε)·P/N⌋)` partitions, so max/mean ≤ 1+ε. Two passes keep
//!    moves small: first every partition goes to its primary; then each overloaded
//!    member sheds its excess, always shedding the partitions with the highest
//!    stable *shed priority* (a hash of (partition, member)), and each shed
//!    partition walks clockwise to the first member with spare capacity. Because the
//!    shed order is a fixed property of (partition, member), the same partitions
//!    overflow before and after a membership change, instead of whichever happened
//!    to be processed last.
//!
//! Measured (P=1024, ε=0.05, 256 vnodes; `print_ring_figures`): max/mean ≤ 1.05 for
//! every N; moved fraction on a join ≈ 1.0–1.1 × the ideal 1/(N+1) up to N=10,
//! ≈ 1.25–1.3× at N=20, ≈ 1.6–1.7× at N=29→30. The last is the price of the cap: at
//! N=30, max/mean ≤ 1.05 allows 35 partitions per member for a mean of 34.1, which
//! forces a near-perfect balance that a history-free function can only reach by
//! reshuffling overflow. Tried and worse: one-pass greedy in partition order or in
//! hashed order, random partition positions, 512–1024 vnodes.

use crate::partition::PartitionCount;
use hashring::HashRing;
use md5::{Digest, Md5};
use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};

/// Ring tuning.
#[derive(Debug, Clone, PartialEq)]
pub struct RingConfig {
    /// Points per member on the ring.
    pub vnodes_per_member: u32,
    /// Load slack ε: max/mean ≤ 1 + ε.
    pub load_epsilon: f64,
}

impl Default for RingConfig {
    fn default() -> Self {
        Self { vnodes_per_member: 256, load_epsilon: 0.05 }
    }
}

/// One point on the ring: a member and a stable key.
#[derive(Debug, Clone, PartialEq, Eq)]
struct VNode {
    member: u32,
    key: u64,
}

impl Hash for VNode {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Only the stable key: the member index depends on the member list, the key does not.
        state.write_u64(self.key);
    }
}

/// Where a partition's key sits on the ring.
struct PartitionKey(u64);

/// The ring positions are our own stable keys, so the ring's hasher is the identity:
/// a point's position is exactly the `u64` written for it.
#[derive(Debug, Default, Clone, Copy)]
struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct IdentityBuild;

impl std::hash::BuildHasher for IdentityBuild {
    type Hasher = IdentityHasher;
    fn build_hasher(&self) -> IdentityHasher {
        IdentityHasher(0)
    }
}

impl Hash for PartitionKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.0);
    }
}

fn stable_u64(parts: &[&[u8]]) -> u64 {
    let mut h = Md5::new();
    for p in parts {
        h.update(p);
        h.update([0xff]);
    }
    let d = h.finalize();
    u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

/// The owner of every partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RingAssignment {
    members: Vec<String>,
    /// Index into `members`, per partition.
    owners: Vec<u32>,
}

impl RingAssignment {
    pub fn owner(&self, partition: u32) -> &str {
        &self.members[self.owners[partition as usize] as usize]
    }

    pub fn partitions_of(&self, node_id: &str) -> BTreeSet<u32> {
        let Ok(idx) = self.members.binary_search_by(|m| m.as_str().cmp(node_id)) else {
            return BTreeSet::new();
        };
        self.owners.iter().enumerate().filter(|(_, o)| **o as usize == idx).map(|(p, _)| p as u32).collect()
    }

    pub fn loads(&self) -> BTreeMap<String, u32> {
        let mut loads: BTreeMap<String, u32> = self.members.iter().map(|m| (m.clone(), 0)).collect();
        for o in &self.owners {
            *loads.get_mut(&self.members[*o as usize]).expect("owner is a member") += 1;
        }
        loads
    }

    /// Sorted, deduplicated member ids.
    pub fn members(&self) -> &[String] {
        &self.members
    }

    pub fn partitions(&self) -> u32 {
        self.owners.len() as u32
    }
}

/// Place P partitions on `members` (any order; duplicates ignored). `None` if empty.
pub fn place(members: &[String], partitions: PartitionCount, config: &RingConfig) -> Option<RingAssignment> {
    let mut members: Vec<String> = members.to_vec();
    members.sort();
    members.dedup();
    if members.is_empty() {
        return None;
    }
    let n = members.len() as u64;
    let p = partitions.get() as u64;
    let vnodes = config.vnodes_per_member.max(1);

    let mut ring: HashRing<VNode, IdentityBuild> = HashRing::with_hasher(IdentityBuild);
    let mut points = Vec::with_capacity(members.len() * vnodes as usize);
    for (i, m) in members.iter().enumerate() {
        for v in 0..vnodes {
            points.push(VNode { member: i as u32, key: stable_u64(&[m.as_bytes(), &v.to_be_bytes()]) });
        }
    }
    ring.batch_add(points);

    let cap = {
        let ceil = p.div_ceil(n);
        let slack = ((1.0 + config.load_epsilon.max(0.0)) * p as f64 / n as f64).floor() as u64;
        ceil.max(slack) as u32
    };
    // Partitions sit evenly spaced on the ring: their primaries' loads then vary only
    // with the members' arc lengths, not also with random partition positions.
    let spacing = u64::MAX / p;
    let key_of = |part: u32| PartitionKey(part as u64 * spacing + spacing / 2);

    let mut owners: Vec<u32> = vec![0; partitions.get() as usize];
    let mut load = vec![0u32; members.len()];
    // Pass 1: primaries.
    for part in 0..partitions.get() {
        owners[part as usize] = ring.get(&key_of(part)).expect("non-empty").member;
    }
    for o in &owners {
        load[*o as usize] += 1;
    }

    // Pass 2: overloaded members shed their highest-priority partitions.
    let shed_priority = |part: u32, member: u32| stable_u64(&[b"shed", &part.to_be_bytes(), members[member as usize].as_bytes()]);
    let mut shed: Vec<u32> = Vec::new();
    for m in 0..members.len() as u32 {
        let excess = load[m as usize].saturating_sub(cap);
        if excess == 0 {
            continue;
        }
        let mut mine: Vec<u32> = (0..partitions.get()).filter(|part| owners[*part as usize] == m).collect();
        mine.sort_by_key(|part| std::cmp::Reverse(shed_priority(*part, m)));
        shed.extend(mine.into_iter().take(excess as usize));
        load[m as usize] = cap;
    }
    // Deterministic placement order for shed partitions.
    shed.sort_by_key(|part| stable_u64(&[b"order", &part.to_be_bytes()]));
    for part in shed {
        let walk = ring.get_with_replicas(&key_of(part), ring.len()).expect("non-empty");
        let target = walk.iter().map(|v| v.member).find(|m| load[*m as usize] < cap).expect("total capacity ≥ P");
        owners[part as usize] = target;
        load[target as usize] += 1;
    }
    Some(RingAssignment { members, owners })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize, salt: u64) -> Vec<String> {
        (0..n).map(|i| format!("node-{salt}-{i}")).collect()
    }

    fn p(n: u32) -> PartitionCount {
        PartitionCount::new(n).unwrap()
    }

    #[test]
    fn same_members_in_any_order_give_the_same_assignment() {
        let seed = fastrand::u64(..);
        let mut rng = fastrand::Rng::with_seed(seed);
        for n in [1, 2, 5, 13] {
            let m = ids(n, rng.u64(..));
            let a = place(&m, p(1024), &RingConfig::default()).unwrap();
            let mut shuffled = m.clone();
            rng.shuffle(&mut shuffled);
            shuffled.push(m[0].clone());
            assert_eq!(a, place(&shuffled, p(1024), &RingConfig::default()).unwrap(), "seed {seed}");
        }
        assert!(place(&[], p(16), &RingConfig::default()).is_none());
    }

    #[test]
    fn every_partition_has_one_member_owner_and_load_is_bounded() {
        let seed = fastrand::u64(..);
        let mut rng = fastrand::Rng::with_seed(seed);
        for n in 2..=30 {
            let m = ids(n, rng.u64(..));
            let a = place(&m, p(1024), &RingConfig::default()).unwrap();
            let loads = a.loads();
            assert_eq!(loads.values().sum::<u32>(), 1024);
            let max = *loads.values().max().unwrap() as f64;
            let mean = 1024.0 / n as f64;
            assert!(max / mean <= 1.05, "N={n}: max/mean {:.3} (seed {seed})", max / mean);
            for part in 0..1024 {
                assert!(m.contains(&a.owner(part).to_string()));
            }
            let union: usize = m.iter().map(|id| a.partitions_of(id).len()).sum();
            assert_eq!(union, 1024);
        }
    }

    fn moved(a: &RingAssignment, b: &RingAssignment) -> usize {
        (0..a.partitions()).filter(|part| a.owner(*part) != b.owner(*part)).count()
    }

    /// Average moved fraction on a join, as a multiple of the ideal 1/(N+1).
    fn join_ratio(n: usize, trials: usize, rng: &mut fastrand::Rng) -> f64 {
        let mut sum = 0.0;
        for _ in 0..trials {
            let mut m = ids(n, rng.u64(..));
            let before = place(&m, p(1024), &RingConfig::default()).unwrap();
            m.push(format!("joiner-{}", rng.u64(..)));
            let after = place(&m, p(1024), &RingConfig::default()).unwrap();
            sum += moved(&before, &after) as f64 / 1024.0;
        }
        (sum / trials as f64) * (n + 1) as f64
    }

    #[test]
    fn moved_fraction_on_join_stays_close_to_ideal() {
        let seed = fastrand::u64(..);
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut table = String::from("N   moved/ideal on join\n");
        // Up to N=10 the 1.3× target holds with margin; beyond, the 1.05 load cap
        // (which wins where the two conflict) forces more reshuffling — see the module docs.
        for (n, bound) in [(2, 1.3), (3, 1.3), (5, 1.3), (10, 1.3), (20, 1.45), (29, 1.85)] {
            let r = join_ratio(n, 12, &mut rng);
            table += &format!("{n:<3} {r:.3}\n");
            assert!(r <= bound, "N={n}: moved {r:.3} × ideal > {bound} (seed {seed})\n{table}");
        }
        println!("{table}");
    }

    #[test]
    fn on_leave_only_the_leavers_partitions_and_cap_forced_ones_move() {
        let seed = fastrand::u64(..);
        let mut rng = fastrand::Rng::with_seed(seed);
        for n in [3, 5, 10, 30] {
            let m = ids(n, rng.u64(..));
            let before = place(&m, p(1024), &RingConfig::default()).unwrap();
            let leaver = m[rng.usize(..n)].clone();
            let rest: Vec<String> = m.iter().filter(|x| **x != leaver).cloned().collect();
            let after = place(&rest, p(1024), &RingConfig::default()).unwrap();
            let theirs = before.partitions_of(&leaver);
            assert!(theirs.iter().all(|part| after.owner(*part) != leaver));
            let others_moved = (0..1024).filter(|part| !theirs.contains(part) && before.owner(*part) != after.owner(*part)).count();
            // Extra moves come only from the load cap re-shuffling overflow; bound them.
            assert!(others_moved <= theirs.len() + 8, "N={n}: {others_moved} non-leaver partitions moved (leaver had {}), seed {seed}", theirs.len());
        }
    }

    #[test]
    #[ignore = "prints the figures quoted in BENCHMARKS.md"]
    fn print_ring_figures() {
        let mut rng = fastrand::Rng::with_seed(42);
        println!("N   max/mean  moved/ideal(join)");
        for n in [2, 3, 5, 10, 20, 30] {
            let m = ids(n, rng.u64(..));
            let a = place(&m, p(1024), &RingConfig::default()).unwrap();
            let max = *a.loads().values().max().unwrap() as f64;
            println!("{n:<3} {:.3}     {:.3}", max / (1024.0 / n as f64), join_ratio(n, 20, &mut rng));
        }
    }
}
