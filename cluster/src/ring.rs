//! The ring: a pure, deterministic function from (active members, P) to the owner of
//! every partition. Every node runs it on every applied membership change and must
//! get the same answer from the same member set, whatever order it learned the
//! members in.
//!
//! # Algorithm
//!
//! 1. **Ring.** Members are sorted and deduplicated. Each gets `vnodes_per_member`
//!    points on a consistent-hash ring (the `hashring` crate, filled with
//!    `batch_add`). A point's position depends on the node id only:
//!    `splitmix64(h + v·0x9E3779B97F4A7C15)` with `h = md5(node_id)[0..8]`
//!    (big-endian) and `v` the point's index. Partition `q` sits at
//!    `q·⌊2⁶⁴/P⌋ + ⌊2⁶⁴/P⌋/2`, i.e. evenly spaced, so a member's first-choice load
//!    varies only with where its points landed.
//! 2. **Preferences.** A partition ranks the members in the order it meets them
//!    walking clockwise from its position (`HashRing::get` gives the first, its
//!    *primary*). A member ranks the partitions that ask it by
//!    `(rank, distance, partition)`: first the partitions for which it is the
//!    first choice, then those for which it is the second choice, and so on;
//!    within a rank, the one closest counter-clockwise of its points wins.
//! 3. **Bounded loads** (Mirrokni, Thorup, Zadimoghaddam, "Consistent Hashing with
//!    Bounded Loads"): no member holds more than
//!    `cap = max(⌈P/N⌉, ⌊(1+ε)·P/N⌋)` partitions, so max/mean ≤ 1 + ε (the second
//!    term is the largest integer allowed by the bound; the first is needed when
//!    it is below the mean, e.g. ε = 0).
//! 4. **Assignment.** The partition-proposing deferred acceptance (Gale–Shapley)
//!    matching: each partition proposes down its walk; a member keeps its best
//!    `cap` proposals and turns away the rest, who propose to their next member.
//!    It terminates with every partition placed because total capacity `N·cap ≥ P`.
//!
//! # Invariants (tested below)
//!
//! - Deterministic: the result is the *partition-optimal stable matching*, which is
//!   unique, so it does not depend on the order proposals are processed in, and the
//!   inputs are the sorted node ids only.
//! - Every partition has exactly one owner, a member; no member holds more than `cap`.
//! - Minimal spill: a member fills up with first-choice partitions before it accepts
//!   any spill-over, so the number of partitions *not* on their primary is exactly
//!   `Σ max(0, first-choice load − cap)`, the least any capped placement can have.
//! - On a join or leave, a partition that is neither the joiner's nor the leaver's
//!   moves only if it is off its primary before or after: its primary is the same
//!   in both rings, so had it been on it both times it could not have moved. Only
//!   what the load cap forces moves.
//!
//! # Why this scheme (measured, P = 1024, ε = 0.05, random member ids)
//!
//! Moves on a join N → N+1 as a multiple of the ideal 1/(N+1), mean over 200 random
//! member sets, 128 points per member (`print_ring_figures` prints this module's
//! current figures, with max/mean and moves on a leave):
//!
//! | N → N+1                                             | 2    | 5    | 10   | 20   | 29   | 30   |
//! |-----------------------------------------------------|------|------|------|------|------|------|
//! | plain bounded loads, first fit in partition order    | 1.02 | 1.06 | 1.14 | 1.29 | 1.76 | 1.54 |
//! | primaries, then hashed shedding of each overload     | 1.01 | 1.05 | 1.13 | 1.26 | 1.63 | 1.49 |
//! | deferred acceptance, members rank by distance only   | 1.01 | 1.05 | 1.12 | 1.23 | 1.67 | 1.44 |
//! | this module: deferred acceptance, (rank, distance)   | 1.01 | 1.05 | 1.12 | 1.22 | 1.62 | 1.44 |
//!
//! The worst case moves less too: at most 35 partitions besides the joiner's over
//! those runs, against 48 for the plain ring.
//!
//! The figures grow with N because the cap leaves only `ε·P/N` (1.7 partitions at
//! N = 29, 0.9 at N = 30) of slack above the mean while a member's first-choice load
//! varies by about `√(P/N)` (≈ 6): at N ≥ 20 about half the members are at the cap,
//! and the joiner takes a Poisson-distributed handful from each, which rarely matches
//! what the lower cap forces each to give up. Deferred acceptance keeps that
//! reshuffle local (the spill of a full member goes to the next member clockwise and
//! only displaces spill-over, never a first choice).
//!
//! So at P = 1024 the 1.3× target holds up to N ≈ 20 (1.22 at 20 → 21; the mean
//! over N = 2..30 is 1.21) but not at 29 → 30 (≈ 1.6×) with a strict
//! max/mean ≤ 1.05; none of the variants tried gets there.
//!
//! **It is the granularity, not the ring.** The same two schemes with more
//! partitions (`print_granularity_figures`, 40 joins per cell, this module / plain):
//!
//! | P \ N → N+1 | 10          | 20          | 25          | 29          | 30          |
//! |-------------|-------------|-------------|-------------|-------------|-------------|
//! | 1024        | 1.10 / 1.12 | 1.22 / 1.28 | 1.35 / 1.39 | 1.63 / 1.80 | 1.44 / 1.53 |
//! | 4096        | 1.09 / 1.10 | 1.16 / 1.19 | 1.18 / 1.21 | 1.19 / 1.22 | 1.19 / 1.25 |
//! | 16384       | 1.08 / 1.10 | 1.14 / 1.18 | 1.17 / 1.20 | 1.16 / 1.20 | 1.17 / 1.21 |
//!
//! The reference figures in the issue that asked for this ring ("a plain
//! bounded-load ring simulates at about 1.1× for N = 10 and 1.27× for N = 30") are
//! the P = 4096 row: there this module is under 1.3× at every N up to 30 and below
//! the plain ring everywhere (tested in
//! `with_four_partitions_per_slot_of_slack_moves_stay_under_1_3_up_to_30_nodes`).
//! At P = 1024 a member of a 30-node cluster holds 34 partitions, so one
//! partition is 3% of its load and the 5% cap is less than one partition of
//! slack. A joiner takes a Poisson-distributed 0, 1, 2, … partitions from each
//! member, where a cap that tight needs almost exactly one from each; about a third
//! of the full members lose none to it and must pass one on, and those hand-ons
//! chain through other full members. For clusters expected to grow past ~25 nodes,
//! P = 4096 is the lever (P is chosen when the schema is created). Measured on a
//! 3–4 node cluster it keeps every target (BENCHMARKS.md: failover p99 4.3 s,
//! moved partitions' p99 wait 59 ms on a join).
//! Tried and not better: hashed partition positions; 32–1024 points per member
//! (128–512 are equivalent; 128 is the cheapest); a min-cost transport instead of a
//! stable matching; a two-level cap (per point, then per member); per-member
//! randomised caps that shrink smoothly with N (1.43 at 29 → 30, but 1.31 at
//! 20 → 21 and worse on average over N = 2..40). Even the looser `⌈(1+ε)·P/N⌉`
//! rounding (max/mean up to 1.055 at N = 30) only gets 29 → 30 to ≈ 1.5×.
//!
//! # Rolling deploys
//!
//! Over a maxSurge 1 rolling replace (+new₁, −old₁, …) of N nodes this ring moves a
//! partition 1.54 / 1.74 / 2.02 times on average and at most 6 / 10 / 15 times for
//! N = 3 / 5 / 10 (P = 1024, 200 random id sets), mostly because the cap alternates
//! with the member count. Version-aware alternatives were measured and are not
//! better: see [`crate::rollout`].
//!
//! # Performance
//!
//! O(N·V·log(N·V)) to build the ring plus O(P·log cap) proposals, each walking a few
//! points. `hashring`'s `get_with_replicas` clones the whole ring per call, which
//! would make this O(P·N·V); the walk below reads the ring's sorted points instead.

use crate::partition::PartitionCount;
use hashring::HashRing;
use md5::{Digest, Md5};
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::hash::{BuildHasher, Hash, Hasher};

/// Upper bound on `vnodes_per_member`, so a typo in a config cannot allocate
/// gigabytes on every membership change.
pub const MAX_VNODES_PER_MEMBER: u32 = 4096;

/// Ring tuning. Must be identical on every node of a cluster (like P): nodes with
/// different configs compute different owners.
#[derive(Debug, Clone, PartialEq)]
pub struct RingConfig {
    /// Points per member on the ring (clamped to `1..=MAX_VNODES_PER_MEMBER`).
    pub vnodes_per_member: u32,
    /// Load slack ε: max/mean ≤ 1 + ε. Negative or NaN is taken as 0.
    pub load_epsilon: f64,
    /// Which placement: 1 the plain ring ([`place`]), 2 sticky placement over the
    /// lease holders ([`crate::sticky`], the default). Each member publishes its own;
    /// the cluster computes the oldest any member publishes ([`RingConfig::effective`]).
    pub algorithm: u32,
}

impl Default for RingConfig {
    fn default() -> Self {
        Self { vnodes_per_member: 128, load_epsilon: 0.05, algorithm: RING_ALGORITHM }
    }
}

/// The newest placement algorithm this binary implements, and its default: 2, sticky
/// placement ([`crate::sticky`]). A binary that changes placement bumps it and must
/// still implement every older version it may run beside (see
/// [`RingConfig::effective`]): this one also computes 1, the plain ring ([`place`]).
pub const RING_ALGORITHM: u32 = 2;

/// The oldest algorithm this binary still computes.
pub const OLDEST_RING_ALGORITHM: u32 = 1;

impl RingConfig {
    /// What a member publishes in gossip (`ring`): algorithm version and config, e.g.
    /// `ring1;vnodes=128;eps=0.05`.
    pub fn fingerprint(&self) -> String {
        format!("ring{};vnodes={};eps={}", self.algorithm, self.vnodes_per_member, self.load_epsilon)
    }

    /// Parse a fingerprint of an algorithm this binary implements.
    pub fn from_fingerprint(s: &str) -> Option<RingConfig> {
        let mut parts = s.split(';');
        let algo: u32 = parts.next()?.strip_prefix("ring")?.parse().ok()?;
        if !(OLDEST_RING_ALGORITHM..=RING_ALGORITHM).contains(&algo) {
            return None;
        }
        let (mut vnodes, mut eps) = (None, None);
        for p in parts {
            match p.split_once('=')? {
                ("vnodes", v) => vnodes = v.parse().ok(),
                ("eps", v) => eps = v.parse::<f64>().ok().filter(|e| e.is_finite()),
                _ => return None,
            }
        }
        Some(RingConfig { vnodes_per_member: vnodes?, load_epsilon: eps?, algorithm: algo })
    }

    /// The one ring every member computes when their published fingerprints differ
    /// (a rolling deploy that changes the ring, or a misconfigured node): the
    /// **oldest algorithm version** published, then the **most published config**
    /// of it, ties to the smallest fingerprint. Every member sees the same
    /// fingerprints, so every member picks the same ring — as long as it implements
    /// that algorithm. `None` when it does not (this binary is older than the
    /// oldest member's algorithm, or a fingerprint of the oldest version does not
    /// parse): the caller must then own nothing rather than compute a different ring.
    /// `published`: the *other* members' fingerprints; `own` is counted once. Members
    /// that publish none (binaries before this field) count as the default config.
    pub fn effective<'a>(own: &RingConfig, published: impl IntoIterator<Item = Option<&'a str>>) -> Option<RingConfig> {
        let own_fp = own.fingerprint();
        let legacy = RingConfig { algorithm: 1, ..RingConfig::default() }.fingerprint();
        let mut counts: BTreeMap<(u32, String), usize> = BTreeMap::new();
        *counts.entry((own.algorithm, own_fp.clone())).or_default() += 1;
        for fp in published {
            let fp = fp.unwrap_or(&legacy);
            let algo = fp
                .strip_prefix("ring")
                .and_then(|r| r.split(';').next())
                .and_then(|v| v.parse::<u32>().ok())
                .unwrap_or(u32::MAX);
            *counts.entry((algo, fp.to_string())).or_default() += 1;
        }
        let oldest = counts.keys().map(|(a, _)| *a).min()?;
        let (_, fp) = counts
            .iter()
            .filter(|((a, _), _)| *a == oldest)
            .max_by(|((_, fa), na), ((_, fb), nb)| na.cmp(nb).then_with(|| fb.cmp(fa)))?
            .0
            .clone();
        RingConfig::from_fingerprint(&fp)
    }
}

/// The owner of every partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RingAssignment {
    /// Sorted, deduplicated.
    members: Vec<String>,
    /// Index into `members`, per partition.
    owners: Vec<u32>,
    cap: u32,
}

impl RingAssignment {
    /// From sorted, deduplicated `members` and a member index per partition.
    pub(crate) fn from_parts(members: Vec<String>, owners: Vec<u32>, cap: u32) -> Self {
        debug_assert!(members.windows(2).all(|w| w[0] < w[1]));
        debug_assert!(owners.iter().all(|o| (*o as usize) < members.len()));
        Self { members, owners, cap }
    }

    /// The member that should own `partition`.
    ///
    /// # Panics
    /// If `partition >= P` (like slice indexing).
    pub fn owner(&self, partition: u32) -> &str {
        let Some(owner) = self.owners.get(partition as usize) else {
            panic!("partition {partition} out of range 0..{}", self.owners.len());
        };
        &self.members[*owner as usize]
    }

    /// The partitions `node_id` should hold; empty if it is not a member.
    pub fn partitions_of(&self, node_id: &str) -> BTreeSet<u32> {
        let Ok(idx) = self.members.binary_search_by(|m| m.as_str().cmp(node_id)) else {
            return BTreeSet::new();
        };
        let idx = idx as u32;
        (0..self.partitions()).filter(|q| self.owners[*q as usize] == idx).collect()
    }

    /// Partitions per member, including members that hold none.
    pub fn loads(&self) -> BTreeMap<String, u32> {
        let mut counts = vec![0u32; self.members.len()];
        for o in &self.owners {
            counts[*o as usize] += 1;
        }
        self.members.iter().cloned().zip(counts).collect()
    }

    /// Sorted, deduplicated member ids.
    pub fn members(&self) -> &[String] {
        &self.members
    }

    /// P.
    pub fn partitions(&self) -> u32 {
        self.owners.len() as u32
    }

    /// The load cap this assignment was computed with.
    pub fn cap(&self) -> u32 {
        self.cap
    }
}

/// Place P partitions on `members` (node ids, any order; duplicates ignored).
/// `None` if `members` is empty.
pub fn place(members: &[String], partitions: PartitionCount, config: &RingConfig) -> Option<RingAssignment> {
    let mut members: Vec<String> = members.to_vec();
    members.sort();
    members.dedup();
    if members.is_empty() {
        return None;
    }
    let p = partitions.get();
    let cap = load_cap(p, members.len(), config.load_epsilon);
    let ring = Ring::new(&members, config.vnodes_per_member);

    // Per partition: where its walk starts, how many points it has passed, how many
    // members it has asked.
    let start: Vec<usize> = (0..p).map(|q| ring.first_at_or_after(partition_position(q, p))).collect();
    let mut steps = vec![0usize; p as usize];
    let mut rank = vec![0u32; p as usize];
    // Max-heaps: the top is the proposal the member likes least, the one to turn away.
    let mut held: Vec<BinaryHeap<(u32, u64, u32)>> = vec![BinaryHeap::new(); members.len()];
    // Reverse so partitions propose in id order; the result does not depend on it,
    // but a fixed order keeps runs reproducible step by step.
    let mut free: Vec<u32> = (0..p).rev().collect();
    while let Some(q) = free.pop() {
        let Candidate { member, distance } = ring.next_member(q, p, start[q as usize], &mut steps[q as usize]);
        let proposal = (rank[q as usize], distance, q);
        rank[q as usize] += 1;
        let h = &mut held[member as usize];
        h.push(proposal);
        if h.len() > cap as usize {
            if let Some((_, _, rejected)) = h.pop() {
                free.push(rejected);
            }
        }
    }

    let mut owners = vec![0u32; p as usize];
    for (m, h) in held.iter().enumerate() {
        for (_, _, q) in h {
            owners[*q as usize] = m as u32;
        }
    }
    Some(RingAssignment { members, owners, cap })
}

/// `max(⌈P/N⌉, ⌊(1+ε)·P/N⌋)`, at most P.
pub(crate) fn load_cap(p: u32, n: usize, epsilon: f64) -> u32 {
    let n = n as u64;
    let ceil = (p as u64).div_ceil(n) as u32;
    // Negative and NaN ε (for which `ε > 0` is false) mean no slack.
    let epsilon = if epsilon > 0.0 { epsilon } else { 0.0 };
    let slack = ((1.0 + epsilon) * p as f64 / n as f64).floor().min(p as f64) as u32;
    ceil.max(slack).min(p)
}

/// Evenly spaced: a partition's position must not depend on the members, and even
/// spacing removes the partitions' own randomness from the members' loads.
fn partition_position(q: u32, p: u32) -> u64 {
    let spacing = u64::MAX / p as u64;
    q as u64 * spacing + spacing / 2
}

/// The first 8 bytes of md5, big-endian: the crate's documented stable hash (see
/// [`crate::partition`]), not `std`'s `Hash`, whose byte feed is not promised to be
/// the same across Rust versions or endianness.
pub(crate) fn md5_u64(bytes: &[u8]) -> u64 {
    let d = Md5::digest(bytes);
    u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

/// splitmix64's finaliser (Steele, Lea, Flood 2014): a fixed bijection that mixes
/// well and, unlike one md5 per point, is cheap in debug builds.
fn splitmix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Position of point `v` of the member whose id hashes to `h`.
fn vnode_position(h: u64, v: u32) -> u64 {
    splitmix64(h.wrapping_add((v as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)))
}

/// One point on the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct VNode {
    member: u32,
    position: u64,
}

impl Hash for VNode {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // The position alone: with the identity hasher below it *is* the ring key.
        state.write_u64(self.position);
    }
}

/// A partition's position as a `hashring` lookup key.
struct Position(u64);

impl Hash for Position {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.0);
    }
}

/// `hashring` hashes whatever it is given; our keys are already stable, well-mixed
/// positions, so its hasher must pass them through unchanged. (Its default,
/// SipHash with fixed zero keys, is deterministic across processes, but it would
/// hash `std`'s `Hash` byte feed, see [`md5_u64`].)
#[derive(Debug, Default, Clone, Copy)]
struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is ever fed; fold anything else rather than drop it.
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

impl BuildHasher for IdentityBuild {
    type Hasher = IdentityHasher;
    fn build_hasher(&self) -> IdentityHasher {
        IdentityHasher(0)
    }
}

/// The ring: `hashring` holds the points and answers "first point clockwise of a
/// partition" (`get`); the walk beyond it reads our own copy of the points in
/// clockwise order, because `HashRing` does not expose its sorted points (it only
/// iterates them with its default hasher) and `get_with_replicas` clones the whole
/// ring per call. `by_member` holds each member's own sorted positions, to tell a
/// member's first point on a walk from its later ones.
struct Ring {
    ring: HashRing<VNode, IdentityBuild>,
    points: Vec<VNode>,
    by_member: Vec<Vec<u64>>,
}

impl Ring {
    fn new(members: &[String], vnodes_per_member: u32) -> Self {
        let vnodes = vnodes_per_member.clamp(1, MAX_VNODES_PER_MEMBER);
        let mut by_member = Vec::with_capacity(members.len());
        let mut points = Vec::with_capacity(members.len() * vnodes as usize);
        for (i, m) in members.iter().enumerate() {
            let h = md5_u64(m.as_bytes());
            let mut mine: Vec<u64> = (0..vnodes).map(|v| vnode_position(h, v)).collect();
            points.extend(mine.iter().map(|&position| VNode { member: i as u32, position }));
            mine.sort_unstable();
            by_member.push(mine);
        }
        let ring = hashring_of(points.clone());
        // Stable, like `HashRing`'s own sort, so equal positions (a 2⁻⁶⁴ event) keep
        // a fixed order too.
        points.sort_by_key(|v| v.position);
        Ring { ring, points, by_member }
    }

    /// Index in `points` of the first point at or clockwise after `position`.
    fn first_at_or_after(&self, position: u64) -> usize {
        match self.ring.get(&Position(position)) {
            Some(first) => self.points.partition_point(|v| v.position < first.position),
            // Unreachable: `place` never builds an empty ring.
            None => 0,
        }
    }

    /// The next member on partition `q`'s walk that it has not asked yet, and the
    /// clockwise distance from `q` to that member's nearest point.
    fn next_member(&self, q: u32, p: u32, start: usize, steps: &mut usize) -> Candidate {
        match self.try_next_member(q, p, start, steps) {
            Some(c) => c,
            // Unreachable: a partition turned away by all N members would mean all N
            // hold `cap` others, i.e. N·cap + 1 ≤ P partitions, but `cap ≥ ⌈P/N⌉`.
            None => unreachable!("partition {q} was turned away by every member"),
        }
    }

    /// [`Ring::next_member`], `None` once the walk has met every member.
    fn try_next_member(&self, q: u32, p: u32, start: usize, steps: &mut usize) -> Option<Candidate> {
        let from = partition_position(q, p);
        let len = self.points.len();
        while *steps < len {
            let v = self.points[(start + *steps) % len];
            *steps += 1;
            // A member is met first at its nearest point clockwise of `from`; its
            // later points on the walk are not new members.
            let mine = &self.by_member[v.member as usize];
            let nearest = mine[mine.partition_point(|k| *k < from) % mine.len()];
            if nearest == v.position {
                return Some(Candidate { member: v.member, distance: v.position.wrapping_sub(from) });
            }
        }
        None
    }
}

/// A member on a partition's walk: its index, and the clockwise distance from the
/// partition to the member's nearest point.
struct Candidate {
    member: u32,
    distance: u64,
}

fn hashring_of(points: Vec<VNode>) -> HashRing<VNode, IdentityBuild> {
    let mut ring = HashRing::with_hasher(IdentityBuild);
    ring.batch_add(points);
    ring
}

/// Every partition's whole walk over sorted, deduplicated `members`: (member index,
/// clockwise distance) in the order the partition meets them. For experiments with
/// other preference lists (see `crate::rollout`'s figures).
#[cfg(test)]
pub(crate) fn walks(members: &[String], p: u32, config: &RingConfig) -> Vec<Vec<(u32, u64)>> {
    let ring = Ring::new(members, config.vnodes_per_member);
    (0..p)
        .map(|q| {
            let (start, mut steps) = (ring.first_at_or_after(partition_position(q, p)), 0);
            std::iter::from_fn(|| ring.try_next_member(q, p, start, &mut steps).map(|c| (c.member, c.distance)))
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    const P: u32 = 1024;

    fn pc(n: u32) -> PartitionCount {
        PartitionCount::new(n).expect("valid partition count")
    }

    /// A fresh random seed per run, or `WARDEN_RING_SEED` to replay a failure.
    fn rng() -> (fastrand::Rng, u64) {
        let seed =
            std::env::var("WARDEN_RING_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| fastrand::u64(..));
        (fastrand::Rng::with_seed(seed), seed)
    }

    /// N random node ids of assorted shapes.
    fn ids(n: usize, rng: &mut fastrand::Rng) -> Vec<String> {
        let mut out = BTreeSet::new();
        while out.len() < n {
            out.insert(match rng.u8(..3) {
                0 => format!("node-{}", rng.u64(..)),
                1 => format!("10.0.{}.{}:7946", rng.u8(..), rng.u8(..)),
                _ => format!("{:016x}", rng.u64(..)),
            });
        }
        let mut out: Vec<String> = out.into_iter().collect();
        rng.shuffle(&mut out);
        out
    }

    fn joiner(rng: &mut fastrand::Rng, m: &[String]) -> String {
        loop {
            let id = format!("joiner-{}", rng.u64(..));
            if !m.contains(&id) {
                return id;
            }
        }
    }

    fn place_default(m: &[String]) -> RingAssignment {
        place(m, pc(P), &RingConfig::default()).expect("non-empty member set")
    }

    /// Each partition's first choice, by brute force: the member with a point at
    /// the smallest clockwise distance (independent of `hashring` and of the walk).
    fn primaries(m: &[String], p: u32, config: &RingConfig) -> Vec<String> {
        let mut m = m.to_vec();
        m.sort();
        m.dedup();
        let vnodes = config.vnodes_per_member.clamp(1, MAX_VNODES_PER_MEMBER);
        let points: Vec<Vec<u64>> = m
            .iter()
            .map(|id| {
                let h = md5_u64(id.as_bytes());
                let mut mine: Vec<u64> = (0..vnodes).map(|v| vnode_position(h, v)).collect();
                mine.sort_unstable();
                mine
            })
            .collect();
        (0..p)
            .map(|q| {
                let from = partition_position(q, p);
                let nearest =
                    |mine: &Vec<u64>| mine[mine.partition_point(|k| *k < from) % mine.len()].wrapping_sub(from);
                let best = (0..m.len()).min_by_key(|i| (nearest(&points[*i]), *i)).expect("non-empty");
                m[best].clone()
            })
            .collect()
    }

    fn off_primary(a: &RingAssignment, primary: &[String]) -> BTreeSet<u32> {
        (0..a.partitions()).filter(|q| a.owner(*q) != primary[*q as usize]).collect()
    }

    fn moved(a: &RingAssignment, b: &RingAssignment) -> BTreeSet<u32> {
        (0..a.partitions()).filter(|q| a.owner(*q) != b.owner(*q)).collect()
    }

    fn max_over_mean(a: &RingAssignment) -> f64 {
        let max = a.loads().values().copied().max().unwrap_or(0) as f64;
        max * a.members().len() as f64 / a.partitions() as f64
    }

    /// One join N → N+1 with random ids: (moved / ideal, joiner's share ok) and the
    /// structural check that every other move is one the cap forced.
    fn join_once(n: usize, rng: &mut fastrand::Rng, seed: u64) -> f64 {
        let before_ids = ids(n, rng);
        let mut after_ids = before_ids.clone();
        let x = joiner(rng, &before_ids);
        after_ids.push(x.clone());
        let (before, after) = (place_default(&before_ids), place_default(&after_ids));
        let cfg = RingConfig::default();
        let (pa, pb) = (primaries(&before_ids, P, &cfg), primaries(&after_ids, P, &cfg));
        let forced: BTreeSet<u32> = off_primary(&before, &pa).union(&off_primary(&after, &pb)).copied().collect();
        let moves = moved(&before, &after);
        for q in &moves {
            assert!(
                after.owner(*q) == x || forced.contains(q),
                "N={n}: partition {q} moved {} → {} though on its primary both times (seed {seed})",
                before.owner(*q),
                after.owner(*q)
            );
        }
        moves.len() as f64 / P as f64 * (n + 1) as f64
    }

    #[test]
    fn same_members_in_any_order_give_the_same_assignment() {
        let (mut rng, seed) = rng();
        assert!(place(&[], pc(16), &RingConfig::default()).is_none());
        for n in [1, 2, 3, 7, 16, 30] {
            for _ in 0..3 {
                let m = ids(n, &mut rng);
                let a = place_default(&m);
                let mut again = m.clone();
                rng.shuffle(&mut again);
                again.push(m[rng.usize(..n)].clone());
                again.extend(m.iter().take(2).cloned());
                rng.shuffle(&mut again);
                assert_eq!(a, place_default(&again), "N={n} (seed {seed})");
                let mut sorted = m.clone();
                sorted.sort();
                assert_eq!(a.members(), &sorted[..]);
            }
        }
        let solo = place_default(&["only".to_string()]);
        assert_eq!(solo.partitions_of("only").len(), P as usize);
        assert!(solo.partitions_of("other").is_empty());
    }

    #[test]
    fn known_placement_never_changes() {
        // Pinned: every node of a cluster, across versions and platforms, must agree.
        // If this fails on purpose, the change re-homes partitions in a rolling upgrade.
        let m: Vec<String> = ["node-a", "node-b", "node-c"].iter().map(|s| s.to_string()).collect();
        let a = place(&m, pc(16), &RingConfig::default()).expect("non-empty");
        let owners: Vec<&str> = (0..16).map(|q| a.owner(q)).collect();
        assert_eq!(owners, PINNED_16_OVER_ABC, "placement of 16 partitions over node-a/b/c changed");
        assert_eq!(md5_u64(b"a"), 0x0cc1_75b9_c0f1_b6a8);
        assert_eq!(splitmix64(0), 0);
        assert_eq!(splitmix64(1), 0x5692_161d_100b_05e5);
    }

    #[rustfmt::skip]
    const PINNED_16_OVER_ABC: [&str; 16] = [
        "node-c", "node-a", "node-c", "node-a", "node-c", "node-b", "node-c", "node-b",
        "node-b", "node-b", "node-a", "node-b", "node-c", "node-a", "node-b", "node-c",
    ];

    #[test]
    fn every_partition_has_one_member_owner_and_max_over_mean_is_bounded() {
        let (mut rng, seed) = rng();
        for n in 2..=30 {
            for _ in 0..3 {
                let m = ids(n, &mut rng);
                let a = place_default(&m);
                let loads = a.loads();
                assert_eq!(loads.len(), n);
                assert_eq!(loads.values().sum::<u32>(), P);
                let r = max_over_mean(&a);
                assert!(r <= 1.05, "N={n}: max/mean {r:.4} (seed {seed})");
                for q in 0..P {
                    assert!(m.iter().any(|id| id == a.owner(q)), "N={n}: owner of {q} is not a member (seed {seed})");
                }
                let mut seen = BTreeSet::new();
                for id in &m {
                    let mine = a.partitions_of(id);
                    assert_eq!(mine.len() as u32, loads[id]);
                    assert!(mine.iter().all(|q| seen.insert(*q)), "N={n}: a partition has two owners (seed {seed})");
                }
                assert_eq!(seen.len() as u32, P);
            }
        }
    }

    #[test]
    fn odd_sizes_and_configs_still_give_a_valid_capped_placement() {
        let (mut rng, seed) = rng();
        let configs = [
            RingConfig::default(),
            RingConfig { vnodes_per_member: 0, load_epsilon: 0.05, ..RingConfig::default() },
            RingConfig { vnodes_per_member: 1, load_epsilon: 0.0, ..RingConfig::default() },
            RingConfig { vnodes_per_member: 7, load_epsilon: -1.0, ..RingConfig::default() },
            RingConfig { vnodes_per_member: 64, load_epsilon: f64::NAN, ..RingConfig::default() },
            RingConfig { vnodes_per_member: 16, load_epsilon: f64::INFINITY, ..RingConfig::default() },
            RingConfig { vnodes_per_member: u32::MAX, load_epsilon: 0.25, ..RingConfig::default() },
        ];
        for config in &configs {
            for (p, n) in [(1, 1), (1, 5), (3, 10), (7, 3), (100, 9), (1000, 1), (65_536, 4)] {
                let m = ids(n, &mut rng);
                let a = place(&m, pc(p), config).expect("non-empty");
                let loads = a.loads();
                assert_eq!(loads.values().sum::<u32>(), p, "{config:?} P={p} N={n} (seed {seed})");
                let cap = load_cap(p, n, config.load_epsilon);
                assert_eq!(a.cap(), cap);
                assert!(loads.values().all(|l| *l <= cap), "{config:?} P={p} N={n}: {loads:?} (seed {seed})");
                assert!(cap as u64 * n as u64 >= p as u64);
            }
        }
        assert_eq!(load_cap(1024, 30, 0.05), 35);
        assert_eq!(load_cap(1024, 29, 0.05), 37);
        assert_eq!(load_cap(1024, 10, 0.0), 103);
        assert_eq!(load_cap(1024, 10, f64::INFINITY), 1024);
    }

    #[test]
    fn only_the_cap_pushes_partitions_off_their_first_choice() {
        // Minimal spill: members serve first choices before spill-over, so exactly
        // Σ max(0, first-choice load − cap) partitions are off their primary.
        let (mut rng, seed) = rng();
        let cfg = RingConfig::default();
        for n in [1, 2, 3, 5, 10, 20, 30, 45] {
            let m = ids(n, &mut rng);
            let a = place_default(&m);
            let primary = primaries(&m, P, &cfg);
            let mut first_choice_load: BTreeMap<&str, u32> = BTreeMap::new();
            for id in &primary {
                *first_choice_load.entry(id.as_str()).or_default() += 1;
            }
            let overload: u32 = first_choice_load.values().map(|l| l.saturating_sub(a.cap())).sum();
            assert_eq!(off_primary(&a, &primary).len() as u32, overload, "N={n} (seed {seed})");
        }
    }

    #[test]
    fn moves_on_join_stay_close_to_ideal() {
        let (mut rng, seed) = rng();
        // Bounds: 1.3× where the cap leaves room (measured ≤ 1.25 at N ≤ 20); at
        // 29 → 30 the 1.05 cap leaves 0.9 partitions of slack per member and the
        // measured mean is ≈ 1.6× (see module docs), so the bound there only guards
        // against regressions.
        // 32 joins per N: the per-join ratio has a standard deviation of ≈ 0.1, so
        // the mean at 20 → 21 (≈ 1.23) sits ~4 standard errors below 1.3.
        let trials = 32;
        let mut table = format!("N→N+1  moved/ideal (mean of {trials} joins)\n");
        let mut failures = Vec::new();
        for (n, bound) in [(2, 1.3), (3, 1.3), (5, 1.3), (10, 1.3), (20, 1.3), (29, 1.85)] {
            let r = (0..trials).map(|_| join_once(n, &mut rng, seed)).sum::<f64>() / trials as f64;
            table += &format!("{n:>2}→{:<3}  {r:.3}  (bound {bound})\n", n + 1);
            if r > bound {
                failures.push(n);
            }
        }
        println!("{table}");
        assert!(failures.is_empty(), "moved/ideal above bound for N={failures:?} (seed {seed})\n{table}");
    }

    /// The baseline the issue compares against: Mirrokni et al.'s bounded loads as
    /// usually implemented, partitions placed in id order, each on the first member
    /// of its clockwise walk that is below the same cap.
    fn plain_bounded_loads(members: &[String], p: u32) -> Vec<String> {
        let mut members = members.to_vec();
        members.sort();
        let cfg = RingConfig::default();
        let cap = load_cap(p, members.len(), cfg.load_epsilon);
        let ring = Ring::new(&members, cfg.vnodes_per_member);
        let mut load = vec![0u32; members.len()];
        (0..p)
            .map(|q| {
                let (start, mut steps) = (ring.first_at_or_after(partition_position(q, p)), 0);
                loop {
                    let m = ring.next_member(q, p, start, &mut steps).member;
                    if load[m as usize] < cap {
                        load[m as usize] += 1;
                        return members[m as usize].clone();
                    }
                }
            })
            .collect()
    }

    /// One random join N → N+1 with P partitions, placed by this module and by the
    /// plain baseline: (moved / ideal) for each.
    fn join_vs_plain(n: usize, p: u32, rng: &mut fastrand::Rng) -> (f64, f64) {
        let before = ids(n, rng);
        let mut after = before.clone();
        after.push(joiner(rng, &before));
        let ideal = p as f64 / (n + 1) as f64;
        let cfg = RingConfig::default();
        let (a, b) = (place(&before, pc(p), &cfg).expect("members"), place(&after, pc(p), &cfg).expect("members"));
        let ours = moved(&a, &b).len() as f64 / ideal;
        let (pa, pb) = (plain_bounded_loads(&before, p), plain_bounded_loads(&after, p));
        let plain = pa.iter().zip(&pb).filter(|(x, y)| x != y).count() as f64 / ideal;
        (ours, plain)
    }

    /// [`join_vs_plain`] averaged over `trials` random joins: (ours, plain).
    fn mean_join_vs_plain(n: usize, p: u32, trials: usize, rng: &mut fastrand::Rng) -> (f64, f64) {
        let (mut ours, mut plain) = (0.0, 0.0);
        for _ in 0..trials {
            let (o, b) = join_vs_plain(n, p, rng);
            ours += o / trials as f64;
            plain += b / trials as f64;
        }
        (ours, plain)
    }

    /// Where the reference figures come from. A plain bounded-load ring
    /// moves ≈ 1.1× the ideal at N = 10 and ≈ 1.27× at N = 30 when P = 4096 (it is
    /// ≈ 1.6× at N = 30 with P = 1024: see the module docs). At that granularity
    /// this module stays under 1.3× for every N up to 30, and below the baseline.
    #[test]
    fn with_four_partitions_per_slot_of_slack_moves_stay_under_1_3_up_to_30_nodes() {
        let (mut rng, seed) = rng();
        let p = 4096;
        // Per-join ratios vary by ≈ 0.06 here; 12 paired joins put the means
        // (≈ 1.20 ours, ≈ 1.27 plain at N = 30) several standard errors apart.
        let trials = 12;
        let mut table = format!("P={p}: N→N+1  ours  plain (mean of {trials} joins)\n");
        let mut failures = Vec::new();
        let (mut ours_total, mut plain_total) = (0.0, 0.0);
        for n in [10, 25, 30] {
            let (ours, plain) = mean_join_vs_plain(n, p, trials, &mut rng);
            table += &format!("{n:>2}→{:<3} {ours:.3} {plain:.3}\n", n + 1);
            if ours > 1.3 {
                failures.push(n);
            }
            (ours_total, plain_total) = (ours_total + ours, plain_total + plain);
        }
        println!("{table}");
        assert!(failures.is_empty(), "N={failures:?}: moved/ideal above 1.3 (seed {seed})\n{table}");
        // Per N the gap can be small (≈ 0.01 at N = 10); summed it is ≈ 0.1.
        assert!(ours_total < plain_total, "not below the plain ring (seed {seed})\n{table}");
    }

    #[test]
    fn on_leave_only_the_leavers_and_cap_forced_partitions_move() {
        let (mut rng, seed) = rng();
        let cfg = RingConfig::default();
        for n in [2, 3, 5, 10, 20, 30] {
            for _ in 0..4 {
                let m = ids(n, &mut rng);
                let before = place_default(&m);
                let leaver = m[rng.usize(..n)].clone();
                let rest: Vec<String> = m.iter().filter(|id| **id != leaver).cloned().collect();
                let after = place_default(&rest);
                let theirs = before.partitions_of(&leaver);
                assert!(theirs.iter().all(|q| after.owner(*q) != leaver), "N={n} (seed {seed})");
                assert!(after.partitions_of(&leaver).is_empty());

                // The bound: besides the leaver's, only partitions the cap kept off
                // their primary before or after may move (their primary is the same
                // member in both rings). Assert it partition by partition.
                let (pa, pb) = (primaries(&m, P, &cfg), primaries(&rest, P, &cfg));
                let forced: BTreeSet<u32> =
                    off_primary(&before, &pa).union(&off_primary(&after, &pb)).copied().collect();
                let others: BTreeSet<u32> = moved(&before, &after).difference(&theirs).copied().collect();
                assert!(
                    others.is_subset(&forced),
                    "N={n}: {:?} moved unforced (seed {seed})",
                    others.difference(&forced).collect::<Vec<_>>()
                );
                // In numbers: at most the spill before plus the spill after, each
                // exactly the first-choice overload (tested above). Measured over 1000
                // leaves: ≤ 0.5× the leaver's count up to N = 20, ≤ 1.25× at N = 30.
                let overload = |ids: &[String], a: &RingAssignment| {
                    let mut l: BTreeMap<String, u32> = BTreeMap::new();
                    for id in primaries(ids, P, &cfg) {
                        *l.entry(id).or_default() += 1;
                    }
                    l.values().map(|x| x.saturating_sub(a.cap()) as usize).sum::<usize>()
                };
                assert!(others.len() <= overload(&m, &before) + overload(&rest, &after));
                let factor = if n <= 20 { 1.0 } else { 1.5 };
                assert!(
                    others.len() as f64 <= factor * theirs.len() as f64,
                    "N={n}: {} others moved for {} of the leaver's (seed {seed})",
                    others.len(),
                    theirs.len()
                );
            }
        }
    }

    #[test]
    fn a_walk_starts_at_the_partitions_nearest_member() {
        let (mut rng, seed) = rng();
        let cfg = RingConfig { vnodes_per_member: 32, load_epsilon: 0.05, ..RingConfig::default() };
        for n in [1, 4, 17] {
            let mut m = ids(n, &mut rng);
            m.sort();
            let ring = Ring::new(&m, cfg.vnodes_per_member);
            let primary = primaries(&m, 300, &cfg);
            for q in 0..300 {
                let mut steps = 0;
                let start = ring.first_at_or_after(partition_position(q, 300));
                let first = ring.next_member(q, 300, start, &mut steps).member;
                assert_eq!(m[first as usize], primary[q as usize], "N={n} q={q} (seed {seed})");
                assert_eq!(steps, 1);
            }
        }
    }

    #[test]
    fn place_is_fast() {
        let (mut rng, _) = rng();
        let m = ids(30, &mut rng);
        let t = Instant::now();
        for _ in 0..5 {
            std::hint::black_box(place_default(&m));
        }
        let each = t.elapsed() / 5;
        println!("place(P=1024, N=30): {each:?}");
        // Generous: the target is well under 50 ms in debug, but this machine also
        // runs other builds; this catches an accidental O(P·N·V) walk.
        assert!(each.as_millis() < 250, "place took {each:?}");
    }

    /// `cargo test -p warden-cluster print_ring_figures -- --ignored --nocapture`
    #[test]
    #[ignore = "prints the figures quoted in the module docs"]
    fn print_ring_figures() {
        let seed = 42;
        let mut rng = fastrand::Rng::with_seed(seed);
        let trials = 60;
        println!("P={P}, {:?}, {trials} random member sets per N", RingConfig::default());
        println!(
            "N   max/mean(worst)  moved/ideal on join N→N+1  spill(off primary)  others moved on a leave / leaver's"
        );
        for n in (2..=30).chain([40, 50]) {
            let mut worst: f64 = 0.0;
            let mut join = 0.0;
            let mut spill = 0.0;
            let mut leave = 0.0;
            for _ in 0..trials {
                let m = ids(n, &mut rng);
                let a = place_default(&m);
                worst = worst.max(max_over_mean(&a));
                spill += off_primary(&a, &primaries(&m, P, &RingConfig::default())).len() as f64;
                join += join_once(n, &mut rng, seed);
                let leaver = m[rng.usize(..n)].clone();
                let rest: Vec<String> = m.iter().filter(|id| **id != leaver).cloned().collect();
                if let Some(after) = place(&rest, pc(P), &RingConfig::default()) {
                    let theirs = a.partitions_of(&leaver);
                    let others = moved(&a, &after).difference(&theirs).count();
                    leave += others as f64 / theirs.len().max(1) as f64;
                }
            }
            println!(
                "{n:<3} {worst:.3}            {:.3}                      {:<18.1}  {:.2}",
                join / trials as f64,
                spill / trials as f64,
                leave / trials as f64
            );
        }
    }

    /// `cargo test --release -p warden-cluster print_granularity_figures -- --ignored --nocapture`
    #[test]
    #[ignore = "prints the P-granularity table quoted in the module docs"]
    fn print_granularity_figures() {
        let mut rng = fastrand::Rng::with_seed(42);
        let trials = 40;
        println!("moved/ideal on a join N→N+1, this module / plain bounded loads, mean of {trials} random member sets");
        for p in [1024, 4096, 16384] {
            let mut line = format!("P={p:<6}");
            for n in [5, 10, 20, 25, 29, 30] {
                let (ours, plain) = mean_join_vs_plain(n, p, trials, &mut rng);
                line += &format!("  {n}→{}: {ours:.2} / {plain:.2}", n + 1);
            }
            println!("{line}");
        }
    }
}
