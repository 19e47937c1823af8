//! Sticky placement — ring algorithm 2, the default: a partition stays with the
//! member that holds its lease for as long as that member is eligible and not over
//! the load cap; only what a leave, a join or the cap forces moves, and what moves
//! goes to the members least likely to be replaced next.
//!
//! # Why (measured)
//!
//! The plain ring ([`crate::ring::place`], algorithm 1) is a function of the member
//! set alone, so a maxSurge 1 rolling replace of N nodes (+new₁, −old₁, +new₂, …)
//! moves a partition up to 6 times at N = 5 (10 in simulation): the cap alternates
//! with the member count and every memoryless scheme bounces the spill-over (see
//! [`crate::rollout`] for the figures of six of them). The missing ingredient is
//! memory that every node shares, and Warden already has it: the lease table.
//! Every node reads the live holders (`warden.leases`: owner and when the lease was
//! granted to it) and computes the same function of (eligible members, their start
//! times and versions, holders); the result is the partitions each node should hold.
//!
//! # Algorithm ([`place_sticky`])
//!
//! `M` members, `cap = max(⌈P/M⌉, ⌊(1+ε)·P/M⌋)` (the ring's bound), `floor = ⌊P/M⌋`.
//! Members are ranked by *preference*: members of the rollout's target version
//! first ([`crate::rollout::target_version`]), then the youngest (latest `started`)
//! first — during a rollout the nodes started last are the ones that stay.
//!
//! 1. **Keep.** A partition whose live holder is a member stays with it.
//! 2. **Shed the cap.** A member over `cap` lets go of its most recently granted
//!    partitions (ties: hash order) until it is at `cap`.
//! 3. **Feed the starved.** While fewer partitions are free than the members below
//!    `floor` need, the least preferred member above `floor` (the oldest; ties: the
//!    most loaded, then id) lets go of its most recently granted partition.
//! 4. **Place the free ones**, in partition order: to a member below `floor` if
//!    there is one, else to one below `cap`; the most preferred such member, then the
//!    least loaded, then the partition's own hash order (rendezvous).
//!
//! Shedding the most recently granted partitions first is what bounds the moves: a
//! partition that had to land on an old node (the new ones were full) is the first
//! to go to the next new node, instead of bouncing old → old → new.
//!
//! # Invariants (tested below)
//!
//! - Deterministic: a function of the sorted inputs only.
//! - Every partition has exactly one owner, a member; no member holds more than
//!   `cap` nor fewer than `floor`.
//! - A fixed point: placing again with the result as holders changes nothing, so
//!   once the leases match the assignment nothing moves until the inputs change.
//! - Minimal movement on a join or leave outside a rollout: a leave moves only the
//!   leaver's partitions, a join only what the joiner takes (≈ P/(M+1)).
//! - A maxSurge 1 rolling replace of N = 2…10 nodes moves every partition at most
//!   twice (200 random id sets per N, P = 64…4096; `print_sticky_figures`).
//!
//! # Agreement
//!
//! Nodes read the holders at slightly different moments, so two nodes can compute
//! different owners for a moment (a partition released but not yet re-granted).
//! That is safe — the lease decides who may run it, placement only says who
//! should try — and it converges: the function is a fixed point on the holders it
//! produces, and the inputs that differ are the ones a release or grant is about to
//! make equal. What it could cost is moves, so three dampers keep a momentary
//! disagreement from becoming a handoff (each measured in the rolling-restart
//! harness, BENCHMARKS.md):
//!
//! - a node overlays its own lease table on the holders it reads
//!   (`warden_runtime::lease::watch_holders`), so it never drops what it just took
//!   or takes back what it just gave away because its read predates them;
//! - a partition is not handed off within a renewal interval of its grant, and
//! - only once placement has wanted it elsewhere for half a renewal interval
//!   (`warden_runtime::enforcer::LeaseView::settling`; a node that placement wants
//!   nothing from — leaving, standby — hands off at once). A cluster whose members do not all publish algorithm 2 computes the
//! plain ring ([`crate::ring::RingConfig::effective`]), so a rolling upgrade from a
//! release without it never mixes the two. Once every member runs it, sticky
//! placement starts from the plain ring's leases, which are within the cap: only
//! what feeds members the ring left below `floor` moves (0–6% of the partitions in
//! the `attack` probes below). A rollback (a `ring1` member joins) switches every
//! node to the plain ring in the step that adds the joiner to the placement, and
//! moves about 1 − 1/N of the partitions at once: the old release computes nothing
//! else.
//!
//! # Known limit
//!
//! The two-move bound is for a surge rollout (a node joins, then an old one leaves).
//! When a node leaves *before* its replacement joins (maxSurge 0 / maxUnavailable 1,
//! or a StatefulSet's delete-then-recreate), about 0.1–1% of the partitions move a
//! third time: the old nodes absorb the leaver's partitions, and the next join takes
//! them back only down to the cap (⌊1.05·P/M⌋), not to P/M (`attack::rollout_variants`,
//! `attack::statefulset_rolling_update`).

use crate::partition::PartitionCount;
use crate::ring::{load_cap, md5_u64, RingAssignment};
use std::cmp::Reverse;
use std::collections::BTreeMap;

/// A partition's live holder as the lease table says (`warden.leases`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// The member (node id) holding it: the lease owner without its `/generation`
    /// ([`member_of_owner`]).
    pub owner: String,
    /// When the lease was granted to this owner, µs since the Unix epoch (database
    /// clock); 0 when unknown (granted by a release before this field).
    pub acquired_us: i64,
}

/// The node id of a lease owner: a node leases as `node_id/generation`, so that a
/// restarted node never uses its previous run's leases; placement is about the member.
pub fn member_of_owner(owner: &str) -> &str {
    owner.rsplit_once('/').map_or(owner, |(id, _)| id)
}

/// Every partition's live holder, indexed by partition (`None`: free or expired).
pub type Holders = Vec<Option<Holder>>;

/// A member sticky placement may give partitions to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub id: String,
    /// Process start (gossip `started`, µs since the Unix epoch); 0 when unknown.
    pub started_us: u64,
    /// Runs the version a rollout is heading for.
    pub target: bool,
}

impl Candidate {
    pub fn new(id: impl Into<String>, started_us: u64, target: bool) -> Self {
        Self { id: id.into(), started_us, target }
    }
}

/// A partition's hash for `member`: higher means the member prefers it (keeps it
/// longer, is chosen first among equals).
fn affinity(partition: u32, member: &str) -> u64 {
    md5_u64(format!("{partition}:{member}").as_bytes())
}

/// Place P partitions on `candidates` given the current `holders` (see the module
/// docs). `holders` shorter than P means free for the rest; holders that are not
/// candidates count as free. Duplicate ids keep their first entry. `None` if there
/// are no candidates.
pub fn place_sticky(
    candidates: &[Candidate],
    holders: &[Option<Holder>],
    partitions: PartitionCount,
    epsilon: f64,
) -> Option<RingAssignment> {
    let mut by_id: BTreeMap<&str, &Candidate> = BTreeMap::new();
    for c in candidates {
        by_id.entry(c.id.as_str()).or_insert(c);
    }
    if by_id.is_empty() {
        return None;
    }
    let members: Vec<String> = by_id.keys().map(|s| s.to_string()).collect();
    let n = members.len();
    let p = partitions.get();
    let cap = load_cap(p, n, epsilon);
    let floor = p / n as u32;
    // rank[m]: 0 is the most preferred member (target version, then youngest).
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&m| {
        let c = by_id[members[m].as_str()];
        (!c.target, Reverse(c.started_us), m)
    });
    let mut rank = vec![0usize; n];
    for (r, m) in order.iter().enumerate() {
        rank[*m] = r;
    }
    let index = |id: &str| members.binary_search_by(|m| m.as_str().cmp(id)).ok();

    // 1. Keep. held[m] is sorted so that `pop()` gives the next partition to shed:
    // the most recently granted, then the lowest affinity.
    let mut owners: Vec<Option<u32>> = vec![None; p as usize];
    let mut held: Vec<Vec<(i64, Reverse<u64>, u32)>> = vec![Vec::new(); n];
    for q in 0..p {
        let Some(Some(h)) = holders.get(q as usize) else { continue };
        let Some(m) = index(&h.owner) else { continue };
        owners[q as usize] = Some(m as u32);
        held[m].push((h.acquired_us, Reverse(affinity(q, &members[m])), q));
    }
    for h in &mut held {
        h.sort_unstable();
    }
    let mut load: Vec<u32> = held.iter().map(|h| h.len() as u32).collect();
    let mut free: Vec<u32> = (0..p).filter(|q| owners[*q as usize].is_none()).collect();
    let mut shed = |m: usize, owners: &mut Vec<Option<u32>>, load: &mut Vec<u32>, free: &mut Vec<u32>| {
        let (_, _, q) = held[m].pop().expect("a member with load holds partitions");
        owners[q as usize] = None;
        load[m] -= 1;
        free.push(q);
    };

    // 2. Shed the cap.
    for m in 0..n {
        while load[m] > cap {
            shed(m, &mut owners, &mut load, &mut free);
        }
    }

    // 3. Feed the starved, from the least preferred member above the floor.
    let needed: u32 = load.iter().map(|l| floor.saturating_sub(*l)).sum();
    while (free.len() as u32) < needed {
        let donor = (0..n)
            .filter(|m| load[*m] > floor)
            .max_by_key(|&m| (rank[m], load[m], Reverse(m)))
            .expect("members below the floor imply members above it");
        shed(donor, &mut owners, &mut load, &mut free);
    }

    // 4. Place the free ones.
    free.sort_unstable();
    for q in free {
        let starved = load.iter().any(|l| *l < floor);
        let limit = if starved { floor } else { cap };
        let m = (0..n)
            .filter(|m| load[*m] < limit)
            .min_by_key(|&m| (rank[m], load[m], Reverse(affinity(q, &members[m])), m))
            .expect("total capacity M·cap ≥ P");
        owners[q as usize] = Some(m as u32);
        load[m] += 1;
    }

    let owners = owners.into_iter().map(|o| o.expect("every partition placed")).collect();
    Some(RingAssignment::from_parts(members, owners, cap))
}

/// The holders a placement result means (every partition held, granted at `at_us`):
/// what the lease table looks like once the result is carried out.
pub fn holders_of(assignment: &RingAssignment, previous: &[Option<Holder>], at_us: i64) -> Holders {
    (0..assignment.partitions())
        .map(|q| {
            let owner = assignment.owner(q);
            match previous.get(q as usize) {
                Some(Some(h)) if h.owner == owner => Some(h.clone()),
                _ => Some(Holder { owner: owner.to_string(), acquired_us: at_us }),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn pc(n: u32) -> PartitionCount {
        PartitionCount::new(n).expect("valid partition count")
    }

    fn ids(n: usize, rng: &mut fastrand::Rng, taken: &BTreeSet<String>) -> Vec<String> {
        let mut out = Vec::new();
        while out.len() < n {
            let id = match rng.u8(..3) {
                0 => format!("node-{}", rng.u64(..)),
                1 => format!("10.0.{}.{}:7946", rng.u8(..), rng.u8(..)),
                _ => format!("{:016x}", rng.u64(..)),
            };
            if !taken.contains(&id) && !out.contains(&id) {
                out.push(id);
            }
        }
        out
    }

    fn check(a: &RingAssignment, n: usize, p: u32) {
        let loads = a.loads();
        assert_eq!(loads.len(), n);
        let floor = p / n as u32;
        for (m, l) in &loads {
            assert!(*l <= a.cap() && *l >= floor, "{m}: load {l} outside {floor}..={}", a.cap());
        }
        assert_eq!(loads.values().sum::<u32>(), p);
    }

    #[test]
    fn deterministic_whatever_the_input_order_and_a_fixed_point() {
        let mut rng = fastrand::Rng::with_seed(fastrand::u64(..));
        for _ in 0..50 {
            let p = [16, 64, 1024][rng.usize(..3)];
            let n = rng.usize(1..12);
            let mut cands: Vec<Candidate> = ids(n, &mut rng, &BTreeSet::new())
                .into_iter()
                .map(|id| Candidate::new(id, rng.u64(..5), rng.bool()))
                .collect();
            // Random holders, some of them not members.
            let holders: Holders = (0..p)
                .map(|_| match rng.u8(..4) {
                    0 => None,
                    1 => Some(Holder { owner: "gone".into(), acquired_us: rng.i64(..100) }),
                    _ => Some(Holder { owner: cands[rng.usize(..n)].id.clone(), acquired_us: rng.i64(..100) }),
                })
                .collect();
            let a = place_sticky(&cands, &holders, pc(p), 0.05).unwrap();
            check(&a, n, p);
            rng.shuffle(&mut cands);
            assert_eq!(place_sticky(&cands, &holders, pc(p), 0.05).unwrap(), a);
            let settled = holders_of(&a, &holders, 1_000);
            assert_eq!(place_sticky(&cands, &settled, pc(p), 0.05).unwrap(), a, "a fixed point");
            // Kept partitions stay: a member under the cap loses nothing it held.
            for q in 0..p {
                if let Some(Some(h)) = holders.get(q as usize) {
                    let load = a.loads().get(&h.owner).copied();
                    if load.is_some() && a.owner(q) != h.owner {
                        let held_before = holders.iter().flatten().filter(|x| x.owner == h.owner).count() as u32;
                        assert!(
                            held_before > p / n as u32,
                            "{} shed a partition without being above the floor",
                            h.owner
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_leave_moves_only_the_leavers_partitions_and_a_join_only_what_the_joiner_takes() {
        let mut rng = fastrand::Rng::with_seed(fastrand::u64(..));
        for _ in 0..30 {
            let p = 1024;
            let n = rng.usize(2..10);
            let names = ids(n + 1, &mut rng, &BTreeSet::new());
            let cands: Vec<Candidate> =
                names.iter().enumerate().map(|(i, id)| Candidate::new(id.clone(), i as u64, false)).collect();
            let a = place_sticky(&cands[..n], &[], pc(p), 0.05).unwrap();
            let h = holders_of(&a, &[], 1);
            // Leave of a random member.
            let gone = rng.usize(..n);
            let rest: Vec<Candidate> =
                cands[..n].iter().enumerate().filter(|(i, _)| *i != gone).map(|(_, c)| c.clone()).collect();
            if !rest.is_empty() {
                let b = place_sticky(&rest, &h, pc(p), 0.05).unwrap();
                check(&b, n - 1, p);
                for q in 0..p {
                    if a.owner(q) != cands[gone].id {
                        assert_eq!(a.owner(q), b.owner(q), "a partition of a member that stayed moved on a leave");
                    }
                }
            }
            // Join of the youngest.
            let c = place_sticky(&cands, &h, pc(p), 0.05).unwrap();
            check(&c, n + 1, p);
            let moved = (0..p).filter(|q| a.owner(*q) != c.owner(*q)).count() as u32;
            let joiner = c.partitions_of(&cands[n].id).len() as u32;
            assert_eq!(moved, joiner, "only what the joiner takes moves");
            assert!(joiner <= p / (n as u32 + 1) + 1, "the joiner takes its share, {joiner}");
        }
    }

    /// A maxSurge 1 / maxUnavailable 0 rolling replace of `n` nodes: +new₁, −old₁, …
    /// Each step's holders are the previous step's result. Returns per-partition moves.
    fn rollout(n: usize, p: u32, versioned: bool, rng: &mut fastrand::Rng) -> Vec<u32> {
        let old = ids(n, rng, &BTreeSet::new());
        let new = ids(n, rng, &old.iter().cloned().collect());
        let mut live: Vec<Candidate> =
            old.iter().map(|id| Candidate::new(id.clone(), 1 + rng.u64(..1000), false)).collect();
        let mut holders = holders_of(&place_sticky(&live, &[], pc(p), 0.05).unwrap(), &[], 0);
        let mut moves = vec![0u32; p as usize];
        // Old pods go in any order (Kubernetes picks).
        let mut leave_order = old.clone();
        rng.shuffle(&mut leave_order);
        let mut t = 1;
        for i in 0..n {
            for phase in 0..2 {
                if phase == 0 {
                    live.push(Candidate::new(new[i].clone(), 10_000 + i as u64, false));
                } else {
                    live.retain(|c| c.id != leave_order[i]);
                }
                let both = live.iter().any(|c| old.contains(&c.id)) && live.iter().any(|c| new.contains(&c.id));
                for c in &mut live {
                    c.target = versioned && both && new.contains(&c.id);
                }
                let a = place_sticky(&live, &holders, pc(p), 0.05).unwrap();
                check(&a, live.len(), p);
                for q in 0..p {
                    if holders[q as usize].as_ref().map(|h| h.owner.as_str()) != Some(a.owner(q)) {
                        moves[q as usize] += 1;
                    }
                }
                holders = holders_of(&a, &holders, t);
                t += 1;
            }
        }
        for q in 0..p {
            assert!(new.contains(&holders[q as usize].as_ref().unwrap().owner));
        }
        moves
    }

    #[test]
    fn a_rolling_replace_moves_every_partition_at_most_twice() {
        let mut rng = fastrand::Rng::with_seed(fastrand::u64(..));
        for n in [2, 3, 5] {
            for p in [64, 1024] {
                for versioned in [false, true] {
                    for _ in 0..4 {
                        let moves = rollout(n, p, versioned, &mut rng);
                        let max = moves.iter().max().copied().unwrap_or(0);
                        assert!(max <= 2, "N={n} P={p} versioned={versioned}: a partition moved {max} times");
                        assert!(moves.iter().all(|m| *m >= 1), "every partition ends on a new node");
                    }
                }
            }
        }
    }

    /// `cargo test --release -p warden-cluster print_sticky_figures -- --ignored --nocapture`
    #[test]
    #[ignore = "prints the figures quoted in the module docs"]
    fn print_sticky_figures() {
        let trials: usize = std::env::var("WARDEN_ROLLOUT_TRIALS").ok().and_then(|s| s.parse().ok()).unwrap_or(200);
        let mut rng = fastrand::Rng::with_seed(42);
        for p in [64, 1024, 4096] {
            for n in [2, 3, 5, 10] {
                for versioned in [false, true] {
                    let (mut max, mut total, mut hist) = (0u32, 0u64, [0u64; 4]);
                    for _ in 0..trials {
                        for m in rollout(n, p, versioned, &mut rng) {
                            max = max.max(m);
                            total += m as u64;
                            hist[(m as usize).min(3)] += 1;
                        }
                    }
                    println!(
                        "P={p:<5} N={n:<2} versioned={versioned:<5} max {max} mean {:.3}  moved once {:.1}% twice {:.1}% 3+ {}",
                        total as f64 / (trials as f64 * p as f64),
                        100.0 * hist[1] as f64 / (trials as f64 * p as f64),
                        100.0 * hist[2] as f64 / (trials as f64 * p as f64),
                        hist[3]
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod attack {
    use super::*;
    use std::collections::BTreeSet;

    fn pc(n: u32) -> PartitionCount {
        PartitionCount::new(n).expect("valid partition count")
    }

    fn owner(h: &Holders, q: u32) -> Option<&str> {
        h.get(q as usize).and_then(|h| h.as_ref()).map(|h| h.owner.as_str())
    }

    /// A handoff carried out part-way: each partition that moves from S to T is, at
    /// random, still with its old holder, free, or already granted to its new one (at
    /// a newer time). Recomputing from such a state must give T again, or a node acts
    /// on a different answer mid-handoff and partitions move more than once per step.
    #[test]
    #[ignore = "finding (attack-sticky): ~6% of part-way states compute another target \
                (step 4's greedy partition-order placement depends on loads already granted); \
                a_rolling_replace_with_racing_nodes shows it costs no extra move in a surge-1 rollout"]
    fn a_handoff_carried_out_part_way_recomputes_to_the_same_target() {
        let mut rng = fastrand::Rng::with_seed(7);
        let mut failures = 0;
        let mut tried = 0;
        for _ in 0..400 {
            let p = [16u32, 64, 256][rng.usize(..3)];
            let n = rng.usize(2..7);
            let mut cands: Vec<Candidate> =
                (0..n).map(|i| Candidate::new(format!("n{i}"), 1 + rng.u64(..1000), false)).collect();
            let s0 = holders_of(&place_sticky(&cands, &[], pc(p), 0.05).unwrap(), &[], 1);
            // Randomize grant times a bit, as a history would.
            let s: Holders = s0.into_iter().map(|h| h.map(|h| Holder { acquired_us: rng.i64(1..50), ..h })).collect();
            // A join or a leave.
            if rng.bool() || n == 2 {
                cands.push(Candidate::new("new", 5_000, rng.bool()));
            } else {
                let gone = rng.usize(..n);
                cands.remove(gone);
            }
            let t = place_sticky(&cands, &s, pc(p), 0.05).unwrap();
            for _ in 0..5 {
                tried += 1;
                let mut mid = s.clone();
                for q in 0..p {
                    if owner(&s, q) != Some(t.owner(q)) {
                        match rng.u8(..3) {
                            0 => {}
                            1 => mid[q as usize] = None,
                            _ => {
                                mid[q as usize] =
                                    Some(Holder { owner: t.owner(q).to_string(), acquired_us: 100 + rng.i64(..10) })
                            }
                        }
                    }
                }
                let again = place_sticky(&cands, &mid, pc(p), 0.05).unwrap();
                if again != t {
                    failures += 1;
                    if failures < 4 {
                        let diff: Vec<_> = (0..p)
                            .filter(|q| again.owner(*q) != t.owner(*q))
                            .map(|q| {
                                (
                                    q,
                                    owner(&s, q).map(str::to_string),
                                    t.owner(q).to_string(),
                                    again.owner(q).to_string(),
                                )
                            })
                            .collect();
                        eprintln!("n={n} p={p}: {} differ: {diff:?}", diff.len());
                    }
                }
            }
        }
        assert_eq!(failures, 0, "{failures} of {tried} part-way states recompute to another target");
    }
    #[derive(Debug, Clone)]
    enum Ev {
        Join(String, u64),
        Leave(String),
        /// Crash and restart with the same id: its leases expire, it stays a member
        /// (restarted within the settle delay) with a new start time.
        Crash(String, u64),
    }

    /// Run `events` as steps (each a batch applied at once), every step carried out
    /// fully before the next. Returns per-partition moves (grants), and moves not
    /// caused by a crash re-grant of the crashed node's own partitions.
    fn run(
        p: u32,
        start: &[Candidate],
        steps: &[Vec<Ev>],
        versioned: bool,
        new: &BTreeSet<String>,
    ) -> (Vec<u32>, Vec<u32>) {
        let mut live: Vec<Candidate> = start.to_vec();
        let mut holders = holders_of(&place_sticky(&live, &[], pc(p), 0.05).unwrap(), &[], 0);
        let mut moves = vec![0u32; p as usize];
        let mut avoidable = vec![0u32; p as usize];
        for (t, step) in (1i64..).zip(steps) {
            let mut crashed: Vec<String> = Vec::new();
            let mut freed: BTreeSet<u32> = BTreeSet::new();
            for ev in step {
                match ev {
                    Ev::Join(id, started) => live.push(Candidate::new(id.clone(), *started, false)),
                    Ev::Leave(id) => live.retain(|c| c.id != *id),
                    Ev::Crash(id, started) => {
                        for (q, h) in holders.iter_mut().enumerate() {
                            if h.as_ref().is_some_and(|h| h.owner == *id) {
                                *h = None;
                                freed.insert(q as u32);
                            }
                        }
                        for c in live.iter_mut().filter(|c| c.id == *id) {
                            c.started_us = *started;
                        }
                        crashed.push(id.clone());
                    }
                }
            }
            let both = live.iter().any(|c| !new.contains(&c.id)) && live.iter().any(|c| new.contains(&c.id));
            for c in &mut live {
                c.target = versioned && both && new.contains(&c.id);
            }
            let a = place_sticky(&live, &holders, pc(p), 0.05).unwrap();
            for q in 0..p {
                if holders[q as usize].as_ref().map(|h| h.owner.as_str()) != Some(a.owner(q)) {
                    moves[q as usize] += 1;
                    if !freed.contains(&q) {
                        avoidable[q as usize] += 1;
                    }
                }
            }
            holders = holders_of(&a, &holders, t);
        }
        (moves, avoidable)
    }

    fn names(prefix: &str, n: usize) -> Vec<String> {
        (0..n).map(|i| format!("{prefix}{i:02}")).collect()
    }

    fn report(label: &str, all: &[Vec<u32>]) -> u32 {
        let max = all.iter().flatten().max().copied().unwrap_or(0);
        let mut hist = [0u64; 6];
        for m in all.iter().flatten() {
            hist[(*m as usize).min(5)] += 1;
        }
        eprintln!("{label}: max {max} hist {hist:?}");
        max
    }

    /// Variants of a rolling replace, for figures: leave-before-join (the join waits
    /// the settle delay, a leave applies at once), maxSurge 2, a crash-restart of an
    /// old node mid-rollout.
    #[test]
    #[ignore = "figures (attack-sticky): `cargo test -p warden-cluster rollout_variants -- --ignored --nocapture`"]
    fn rollout_variants() {
        let mut rng = fastrand::Rng::with_seed(11);
        for n in [2usize, 3, 5] {
            for p in [64u32, 256] {
                for versioned in [false, true] {
                    let mut res: BTreeMap<&str, Vec<Vec<u32>>> = BTreeMap::new();
                    for _ in 0..20 {
                        let mut old = names("old", n);
                        let new = names("new", n);
                        rng.shuffle(&mut old);
                        let start: Vec<Candidate> =
                            old.iter().map(|id| Candidate::new(id.clone(), 1 + rng.u64(..1000), false)).collect();
                        let newset: BTreeSet<String> = new.iter().cloned().collect();
                        // maxSurge 1, join then leave (the reference).
                        let mut s = Vec::new();
                        for i in 0..n {
                            s.push(vec![Ev::Join(new[i].clone(), 10_000 + i as u64)]);
                            s.push(vec![Ev::Leave(old[i].clone())]);
                        }
                        res.entry("surge1").or_default().push(run(p, &start, &s, versioned, &newset).0);
                        // Leave applied before the join (known removal is immediate).
                        let mut s = Vec::new();
                        for i in 0..n {
                            s.push(vec![Ev::Leave(old[i].clone())]);
                            s.push(vec![Ev::Join(new[i].clone(), 10_000 + i as u64)]);
                        }
                        res.entry("leave-first").or_default().push(run(p, &start, &s, versioned, &newset).0);
                        // Join and leave applied in one step.
                        let mut s = Vec::new();
                        for i in 0..n {
                            s.push(vec![Ev::Join(new[i].clone(), 10_000 + i as u64), Ev::Leave(old[i].clone())]);
                        }
                        res.entry("together").or_default().push(run(p, &start, &s, versioned, &newset).0);
                        // maxSurge 2 (two joins within a settle delay).
                        let mut s = Vec::new();
                        for i in (0..n).step_by(2) {
                            let mut j = vec![Ev::Join(new[i].clone(), 10_000 + i as u64)];
                            if i + 1 < n {
                                j.push(Ev::Join(new[i + 1].clone(), 10_001 + i as u64));
                            }
                            s.push(j);
                            let mut l = vec![Ev::Leave(old[i].clone())];
                            if i + 1 < n {
                                l.push(Ev::Leave(old[i + 1].clone()));
                            }
                            s.push(l);
                        }
                        res.entry("surge2").or_default().push(run(p, &start, &s, versioned, &newset).0);
                        // Crash-restart of the last old node mid-rollout.
                        if n >= 2 {
                            let mut s = Vec::new();
                            for i in 0..n {
                                s.push(vec![Ev::Join(new[i].clone(), 10_000 + 10 * i as u64)]);
                                s.push(vec![Ev::Leave(old[i].clone())]);
                                if i == 0 {
                                    s.push(vec![Ev::Crash(old[n - 1].clone(), 10_005)]);
                                }
                            }
                            let (all, avoidable) = run(p, &start, &s, versioned, &newset);
                            res.entry("crash").or_default().push(all);
                            res.entry("crash-not-counting-the-crash-regrant").or_default().push(avoidable);
                        }
                    }
                    for (k, v) in &res {
                        report(&format!("N={n} P={p} versioned={versioned} {k}"), v);
                    }
                }
            }
        }
    }

    /// Agents: every node reads the DB holders at its own moments (a read can be a
    /// few ticks old), overlays its own lease table (held and not draining = its own),
    /// computes, begins draining what it should not hold (released a few ticks later),
    /// and acquires what it should hold if the DB has it free. Runs until every node
    /// agrees with the DB. Returns grants per partition.
    struct Agents {
        p: u32,
        db: Vec<Option<Holder>>,
        /// Per node: partitions draining (still its own in the DB) -> release at tick.
        draining: BTreeMap<String, BTreeMap<u32, u64>>,
        reads: BTreeMap<String, Holders>,
        grants: Vec<u32>,
        tick: u64,
        /// A node whose reads of the holders fail (time out) from now on: it keeps
        /// computing from its last snapshot, overlaid with its own lease table.
        frozen: Option<String>,
    }

    impl Agents {
        fn new(p: u32, db: Holders) -> Self {
            Self {
                p,
                db,
                draining: BTreeMap::new(),
                reads: BTreeMap::new(),
                grants: vec![0; p as usize],
                tick: 1000,
                frozen: None,
            }
        }

        fn view(&self, me: &str) -> Holders {
            let read = self.reads.get(me).cloned().unwrap_or_else(|| self.db.clone());
            let drain = self.draining.get(me);
            (0..self.p as usize)
                .map(|q| {
                    let mine_db = self.db[q].as_ref().is_some_and(|h| h.owner == me);
                    let keeping = mine_db && !drain.is_some_and(|d| d.contains_key(&(q as u32)));
                    let mine_read = read[q].as_ref().is_some_and(|h| h.owner == me);
                    if keeping {
                        if mine_read {
                            read[q].clone()
                        } else {
                            self.db[q].clone()
                        }
                    } else if mine_read {
                        None
                    } else {
                        read[q].clone()
                    }
                })
                .collect()
        }

        /// Run until quiet; `max_drain` ticks a drain may take, `stale` the chance a
        /// node acts on its previous read instead of a fresh one.
        fn settle(&mut self, live: &[Candidate], rng: &mut fastrand::Rng, max_drain: u64, stale: f64) -> bool {
            let ids: Vec<String> = live.iter().map(|c| c.id.clone()).collect();
            // Non-members (leavers) drain everything and release.
            for q in 0..self.p as usize {
                if self.db[q].as_ref().is_some_and(|h| !ids.contains(&h.owner)) {
                    let o = self.db[q].as_ref().unwrap().owner.clone();
                    let at = self.tick + rng.u64(0..=max_drain);
                    self.draining.entry(o).or_default().entry(q as u32).or_insert(at);
                }
            }
            let mut quiet = 0;
            for _ in 0..20_000 {
                self.tick += 1;
                // Finish drains that are due.
                for (o, d) in self.draining.iter_mut() {
                    let due: Vec<u32> = d.iter().filter(|(_, at)| **at <= self.tick).map(|(q, _)| *q).collect();
                    for q in due {
                        d.remove(&q);
                        if self.db[q as usize].as_ref().is_some_and(|h| h.owner == *o) {
                            self.db[q as usize] = None;
                        }
                    }
                }
                let me = &ids[rng.usize(..ids.len())];
                let frozen = self.frozen.as_deref() == Some(me.as_str()) && self.reads.contains_key(me);
                if !frozen && (rng.f64() >= stale || !self.reads.contains_key(me)) {
                    self.reads.insert(me.clone(), self.db.clone());
                }
                let a = place_sticky(live, &self.view(me), pc(self.p), 0.05).unwrap();
                let mut acted = false;
                for q in 0..self.p {
                    let holder = self.db[q as usize].as_ref().map(|h| h.owner.clone());
                    let draining = self.draining.get(me).is_some_and(|d| d.contains_key(&q));
                    if a.owner(q) == me.as_str() {
                        if holder.is_none() {
                            self.db[q as usize] = Some(Holder { owner: me.clone(), acquired_us: self.tick as i64 });
                            self.grants[q as usize] += 1;
                            acted = true;
                        }
                    } else if holder.as_deref() == Some(me.as_str()) && !draining {
                        let at = self.tick + rng.u64(0..=max_drain);
                        self.draining.entry(me.clone()).or_default().insert(q, at);
                        acted = true;
                    }
                }
                let all_drained = self.draining.values().all(|d| d.is_empty());
                let full = self.db.iter().all(|h| h.as_ref().is_some_and(|h| ids.contains(&h.owner)));
                if !acted && all_drained && full {
                    quiet += 1;
                    if quiet > 10 * ids.len() {
                        return true;
                    }
                } else {
                    quiet = 0;
                }
            }
            false
        }
    }

    fn agent_rollout(
        n: usize,
        p: u32,
        versioned: bool,
        rng: &mut fastrand::Rng,
        max_drain: u64,
        stale: f64,
        leave_first: bool,
    ) -> Vec<u32> {
        let old = names("old", n);
        let new = names("new", n);
        let mut live: Vec<Candidate> =
            old.iter().map(|id| Candidate::new(id.clone(), 1 + rng.u64(..1000), false)).collect();
        let db = holders_of(&place_sticky(&live, &[], pc(p), 0.05).unwrap(), &[], 0);
        let mut ag = Agents::new(p, db);
        let mut leave_order = old.clone();
        rng.shuffle(&mut leave_order);
        for i in 0..n {
            for phase in 0..2 {
                if (phase == 0) != leave_first {
                    live.push(Candidate::new(new[i].clone(), 10_000 + i as u64, false));
                } else {
                    live.retain(|c| c.id != leave_order[i]);
                }
                let both = live.iter().any(|c| old.contains(&c.id)) && live.iter().any(|c| new.contains(&c.id));
                for c in &mut live {
                    c.target = versioned && both && new.contains(&c.id);
                }
                assert!(ag.settle(&live, rng, max_drain, stale), "did not settle: N={n} P={p} step {i}/{phase}");
            }
        }
        ag.grants
    }

    #[test]
    #[ignore = "slow (100 s in debug): `cargo test --release -p warden-cluster racing -- --ignored --nocapture`"]
    fn a_rolling_replace_with_racing_nodes() {
        let mut rng = fastrand::Rng::with_seed(3);
        let mut worst = 0;
        for (max_drain, stale) in [(0u64, 0.0f64), (5, 0.0), (20, 0.3), (50, 0.5)] {
            for n in [3usize, 5] {
                for p in [64u32, 256] {
                    for versioned in [false, true] {
                        for leave_first in [false, true] {
                            let all: Vec<Vec<u32>> = (0..5)
                                .map(|_| agent_rollout(n, p, versioned, &mut rng, max_drain, stale, leave_first))
                                .collect();
                            let m = report(
                                &format!("agents drain≤{max_drain} stale={stale} N={n} P={p} versioned={versioned} leave_first={leave_first}"),
                                &all,
                            );
                            if !leave_first {
                                worst = worst.max(m);
                            }
                        }
                    }
                }
            }
        }
        assert!(worst <= 2, "a partition was granted {worst} times in a surge-1 rollout with racing nodes");
    }

    /// A StatefulSet rolling update: pods are replaced one at a time, highest ordinal
    /// first, *deleted before* their replacement (same name, so the same node id)
    /// starts. Unversioned: the replacement is merely the youngest.
    #[test]
    #[ignore = "figures (attack-sticky): delete-first replacement moves ~1% of partitions 3 times"]
    fn statefulset_rolling_update() {
        let mut rng = fastrand::Rng::with_seed(5);
        for n in [3usize, 5] {
            for p in [64u32, 256] {
                for versioned in [false, true] {
                    let mut all = Vec::new();
                    for _ in 0..20 {
                        let ids = names("pod-", n);
                        let mut live: Vec<Candidate> =
                            ids.iter().map(|id| Candidate::new(id.clone(), 1 + rng.u64(..1000), false)).collect();
                        let mut holders = holders_of(&place_sticky(&live, &[], pc(p), 0.05).unwrap(), &[], 0);
                        let mut moves = vec![0u32; p as usize];
                        let mut renewed: BTreeSet<String> = BTreeSet::new();
                        let mut t = 1;
                        for (i, id) in ids.iter().enumerate().rev() {
                            for phase in 0..2 {
                                if phase == 0 {
                                    live.retain(|c| c.id != *id);
                                } else {
                                    live.push(Candidate::new(id.clone(), 10_000 + i as u64, false));
                                    renewed.insert(id.clone());
                                }
                                let both = live.iter().any(|c| renewed.contains(&c.id))
                                    && live.iter().any(|c| !renewed.contains(&c.id));
                                for c in &mut live {
                                    c.target = versioned && both && renewed.contains(&c.id);
                                }
                                let a = place_sticky(&live, &holders, pc(p), 0.05).unwrap();
                                for q in 0..p {
                                    if holders[q as usize].as_ref().map(|h| h.owner.as_str()) != Some(a.owner(q)) {
                                        moves[q as usize] += 1;
                                    }
                                }
                                holders = holders_of(&a, &holders, t);
                                t += 1;
                            }
                        }
                        all.push(moves);
                    }
                    report(&format!("statefulset N={n} P={p} versioned={versioned}"), &all);
                }
            }
        }
    }

    /// The switch-over when the last ring1 member leaves: holders are the plain
    /// ring's assignment; how many partitions does sticky placement move at once?
    #[test]
    #[ignore = "figures (attack-sticky): the switch-over feeds members the plain ring left below the floor"]
    fn switch_over_from_the_plain_ring() {
        let cfg = crate::ring::RingConfig { algorithm: 1, ..crate::ring::RingConfig::default() };
        for n in [2usize, 3, 5, 10] {
            for p in [64u32, 256, 1024] {
                let mut worst = 0;
                for trial in 0..20 {
                    let ids: Vec<String> = (0..n).map(|i| format!("node-{trial}-{i}")).collect();
                    let ring = crate::ring::place(&ids, pc(p), &cfg).unwrap();
                    let h = holders_of(&ring, &[], 5);
                    let cands: Vec<Candidate> =
                        ids.iter().enumerate().map(|(i, id)| Candidate::new(id.clone(), i as u64, false)).collect();
                    let a = place_sticky(&cands, &h, pc(p), 0.05).unwrap();
                    let moved = (0..p).filter(|q| ring.owner(*q) != a.owner(*q)).count();
                    worst = worst.max(moved);
                }
                eprintln!(
                    "switch-over N={n} P={p}: up to {worst} partitions move ({:.1}%)",
                    100.0 * worst as f64 / p as f64
                );
            }
        }
    }

    /// A rollback to the release before sticky placement: the first ring1 member to
    /// turn active makes every member compute the plain ring at once, over the
    /// applied set (the joiner not in it yet). How much of a settled sticky
    /// placement moves then?
    #[test]
    #[ignore = "figures (attack-sticky): a rollback to ring1 moves (1 - 1/N) of the partitions at once"]
    fn switch_back_to_the_plain_ring_on_a_rollback() {
        let cfg = crate::ring::RingConfig { algorithm: 1, ..crate::ring::RingConfig::default() };

        for n in [3usize, 5, 10] {
            for p in [256u32, 1024] {
                let mut worst = 0.0f64;
                for trial in 0..10 {
                    // A settled sticky cluster after a history of joins (a rollout).
                    let ids: Vec<String> = (0..2 * n).map(|i| format!("node-{trial}-{i}")).collect();
                    let mut live: Vec<Candidate> = ids[..n]
                        .iter()
                        .enumerate()
                        .map(|(i, id)| Candidate::new(id.clone(), i as u64, false))
                        .collect();
                    let mut h = holders_of(&place_sticky(&live, &[], pc(p), 0.05).unwrap(), &[], 0);
                    for i in 0..n {
                        live.push(Candidate::new(ids[n + i].clone(), 100 + i as u64, false));
                        h = holders_of(&place_sticky(&live, &h, pc(p), 0.05).unwrap(), &h, 2 * i as i64 + 1);
                        let gone = live.iter().find(|c| ids[..n].contains(&c.id)).map(|c| c.id.clone());
                        live.retain(|c| Some(&c.id) != gone.as_ref());
                        h = holders_of(&place_sticky(&live, &h, pc(p), 0.05).unwrap(), &h, 2 * i as i64 + 2);
                    }
                    let set: Vec<String> = live.iter().map(|c| c.id.clone()).collect();
                    let ring = crate::ring::place(&set, pc(p), &cfg).unwrap();
                    let moved = (0..p).filter(|q| h[*q as usize].as_ref().unwrap().owner != ring.owner(*q)).count();
                    worst = worst.max(moved as f64 / p as f64);
                }
                eprintln!("rollback N={n} P={p}: up to {:.0}% of partitions move at once", 100.0 * worst);
            }
        }
    }

    /// Finding (attack-sticky): one node's holder reads stop refreshing just before a
    /// join or leave (they time out: 2 × renew/4 = 500 ms, while renewals may take the
    /// 3 s window). It computes from its old snapshot (overlaid with its own table), the
    /// others from the new holders; in ~6% of steps they disagree on a free partition
    /// in a way that neither side takes it, and it stays unowned for as long as the
    /// snapshot stays old. Once the node reads again, everything settles: the fix
    /// (`lease::watch_holders`) gives reads the renewal's window, so a node that keeps
    /// its leases also keeps its snapshot fresh.
    #[test]
    #[ignore = "slow (17 s in release): `cargo test --release -p warden-cluster stay_old -- --ignored --nocapture`"]
    fn a_node_whose_holder_reads_stay_old_leaves_partitions_unowned_until_it_reads_again() {
        let mut rng = fastrand::Rng::with_seed(21);
        let mut stuck = Vec::new();
        for trial in 0..120 {
            let p = [64u32, 256][trial % 2];
            let n = 3 + trial % 4;
            let mut live: Vec<Candidate> =
                (0..n).map(|i| Candidate::new(format!("n{i}"), 1 + rng.u64(..1000), false)).collect();
            let db = holders_of(&place_sticky(&live, &[], pc(p), 0.05).unwrap(), &[], 0);
            let mut ag = Agents::new(p, db);
            for c in &live {
                ag.reads.insert(c.id.clone(), ag.db.clone());
            }
            let frozen = live[rng.usize(..n)].id.clone();
            ag.frozen = Some(frozen.clone());
            if trial % 3 == 0 {
                live.push(Candidate::new("joiner", 5_000, false));
            } else {
                let gone = loop {
                    let g = rng.usize(..n);
                    if live[g].id != frozen {
                        break g;
                    }
                };
                live.remove(gone);
            }
            if !ag.settle(&live, &mut rng, 3, 0.0) {
                let unowned: Vec<u32> = (0..p).filter(|q| ag.db[*q as usize].is_none()).collect();
                stuck.push((trial, n, p, frozen, unowned));
                ag.frozen = None;
                assert!(ag.settle(&live, &mut rng, 3, 0.0), "trial {trial}: still unsettled after a fresh read");
            }
        }
        for s in stuck.iter().take(3) {
            eprintln!("stuck while the snapshot stayed old: {s:?}");
        }
        assert!(!stuck.is_empty(), "the finding no longer reproduces: update this test");
    }
}
