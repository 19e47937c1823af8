//! Rolling deploys: which version group a rollout is heading for, and what
//! version-aware placement can and cannot do about partitions moving during one.
//!
//! # Versions in gossip
//!
//! Every member of this release publishes `version` (its deploy label,
//! `--node-version`; in Kubernetes the pod's `pod-template-hash`, which changes on
//! every rollout *and* on a rollback, so labels are opaque and never ordered; `""` is
//! unversioned) and `started` (its process start time, µs since the Unix epoch —
//! chitchat's generation is a start time by default, but a caller may set it to any
//! counter, so it is not trusted to compare across nodes). Releases before it publish
//! neither ([`Member::version`] is `None`).
//!
//! [`target_version`] is a pure function of the view, the same on every node whatever
//! order it learned it in: members are grouped by label; the **target** is the group
//! whose *oldest* member started *last* (a rollout's new pods all started after every
//! pod of the version they replace; an old pod that crash-restarts mid-rollout does not
//! make its group the target, because its group's oldest member is still old). Ties go
//! to the greater label. There is no target while only one group exists, or while any
//! member does not publish a version (an older binary: it cannot agree on anything
//! version-aware, so nothing version-aware may decide ownership).
//!
//! # Placement during a rollout: why it needed memory (now [`crate::sticky`])
//!
//! What follows measured the *memoryless* schemes — placements that are a function
//! of the member view alone — and explains why none of them bounds the moves of a
//! rolling replace. Sticky placement ([`crate::sticky`], the default since schema
//! v10) is the way out it names at the end: memory every node shares, the lease
//! holders. It keeps every partition to at most two moves per rolling replace (in
//! simulation and in the rolling-restart harness, BENCHMARKS.md). The plain ring
//! below is what a cluster still computes while any member publishes `ring1`.
//!
//! The goal was that a maxSurge 1 / maxUnavailable 0 rolling replace of N nodes
//! (+new₁, −old₁, +new₂, −old₂, …) moves each partition at most twice. It does not
//! hold for the plain ring ([`crate::ring::place`]), and none of the memoryless
//! version-aware schemes measured here gets there either. The two that lower the
//! worst case (a, b: 8 instead of 10 at N = 5) do it by moving *more*: +13–15% moves
//! in all and 1.5–1.8× as many partitions moving three times or more. So the plain
//! ring stayed version-blind; sticky placement uses the target version only as a
//! preference (a member of it is the first to receive what must move).
//!
//! Figures (`print_rollout_figures`, P = 1024, ε = 0.05, 200 random id sets per N;
//! per partition over the whole rollout: max moves over all runs / mean moves /
//! partitions moved ≥ 3 times per rollout). The cap held at every step of every run
//! for every scheme (asserted; worst max/mean 1.049 at N = 3, 1.050 at N = 5, 1.045
//! at N = 10; mean load is P/N by definition):
//!
//! | scheme (old version demoted while a target exists)             | N = 3           | N = 5            | N = 10           |
//! |----------------------------------------------------------------|-----------------|------------------|------------------|
//! | plain ring (today)                                             | 6 / 1.54 / 86   | 10 / 1.74 / 168  | 15 / 2.02 / 247  |
//! | (a) targets first (walk order), then olds (walk order)         | 5 / 1.71 / 158  | 8 / 1.98 / 267   | 12 / 2.33 / 369  |
//! | (b) own first old, then targets, then other olds               | 6 / 1.70 / 157  | 8 / 1.98 / 269   | 13 / 2.32 / 366  |
//! | (c) first member if old, then targets, then other olds         | 6 / 1.54 / 89   | 10 / 1.75 / 169  | 16 / 2.03 / 249  |
//! | plain ring **without** a cap (ε = 1; not allowed, for insight)  | 3 / 1.50 / 68   | 5 / 1.66 / 138   | 7 / 1.82 / 204   |
//! | memory: home over the *original* old set, then targets, olds   | 6 / 1.83 / 204  | 10 / 2.07 / 229  | 20 / 2.35 / 259  |
//!
//! By kind, per rollout at N = 5 (old→old, old→new, new→new, new→old): plain 364,
//! 1042, 363, 18; (a) 541, 1115, 276, 91; (b) 271, 1118, 540, 94; without a cap 338,
//! 1024, 338, 0; with memory of the old set 3, 1269, 606, 245.
//!
//! Why ≤ 2 is out of reach, with or without memory:
//!
//! - **The cap alternates.** With maxSurge 1 the member count goes N → N+1 → N …, so
//!   the cap goes ⌊1.05·P/N⌋ → ⌊1.05·P/(N+1)⌋ → … (215 → 179 → 215 at N = 5). Every
//!   placement that is a function of the view re-admits a member's preferred
//!   partitions when its cap rises and sheds them when it falls: spill partitions
//!   bounce every step. It is most of the tail: the plain ring without a cap moves a
//!   partition at most 5 times at N = 5 (7 at N = 10), against 10 (15) with it.
//! - **The final owner is unknown until the last new node has joined**, and the
//!   capacity forces partitions onto new nodes long before. At N = 5, after −old₂ the
//!   three old members hold at most 3·215 = 645, so the two new ones hold ≥ 379, one
//!   of them > 179; after +new₃ the cap is 179, so ≥ 21 partitions must go from a new
//!   node to another one (or back to an old one) — their second move, to a node that
//!   is their final owner only if new₄ and new₅ do not come first on their walk. The
//!   same count is ≥ 57 at +new₄ and ≥ 93 at +new₅. So even an algorithm that
//!   remembered everything would move some partitions three times in most rollouts.
//! - **Memory of the old set alone does not help**: knowing every old member that
//!   has left (so that a partition leaves the old side exactly when its own old home
//!   leaves) removes old → old moves (3 instead of 364 per rollout at N = 5), but
//!   the cap bounce then runs new → old and back, and the mean and tail get worse.
//! - **Without a cap the structure alone** (a partition's owner is the first present
//!   member on its walk) already gives ≈ 1.5–1.8 moves on average: when an old owner
//!   leaves, the next member on the walk is old as often as new, and each new node
//!   that comes before the current one on a partition's walk takes it (≈ H_N records).
//! - **Demoting the old version** (a) makes every target fill to the cap with its
//!   nearest partitions, which reshuffles the targets at every join (each one keeps
//!   only its nearest `cap` of a changing pool) and the old side at every leave.
//!
//! What helps: a placement with **memory that every node shares** — "keep the
//! current lease holder while it is eligible and under the cap", read from
//! `warden.leases`. Nodes read it at different moments, so two nodes can compute
//! different owners for a moment; no agreement protocol was needed, because the
//! lease arbitrates who gets a contested partition and sticky placement then keeps
//! it there (a fixed point), with two dampers against the stale reads: a node
//! overlays its own lease table on what it reads, and does not hand off a partition
//! within a renewal interval of its grant. See [`crate::sticky`].

use crate::membership::Member;
use std::collections::BTreeMap;

/// The version group a rollout is heading for (see the module docs): the label of
/// the group whose oldest member started last, ties to the greater label. `None`
/// when the members form one group (no rollout), or when any member does not publish
/// a version and start time (a binary before this field).
pub fn target_version(members: &[Member]) -> Option<&str> {
    let mut oldest: BTreeMap<&str, u64> = BTreeMap::new();
    for m in members {
        let (Some(version), Some(started)) = (m.version.as_deref(), m.started_us) else {
            return None;
        };
        let e = oldest.entry(version).or_insert(started);
        *e = (*e).min(started);
    }
    if oldest.len() < 2 {
        return None;
    }
    oldest.into_iter().max_by_key(|(label, started)| (*started, *label)).map(|(label, _)| label)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    use crate::partition::PartitionCount;
    use crate::ring::RingConfig;

    const P: u32 = 1024;

    fn member(id: &str, version: Option<&str>, started_us: Option<u64>) -> Member {
        Member {
            schema: Some(6),
            version: version.map(str::to_string),
            started_us,
            ..Member::active(id, ([127, 0, 0, 1], 1).into())
        }
    }

    #[test]
    fn the_target_is_the_group_whose_oldest_member_started_last() {
        let v = |id, label, t| member(id, Some(label), Some(t));
        // A rollout from "aaa" to "bbb", two new pods up; an old pod restarted late.
        let view = vec![
            v("o1", "aaa", 100),
            v("o2", "aaa", 900),
            v("o3", "aaa", 110),
            v("n1", "bbb", 500),
            v("n2", "bbb", 600),
        ];
        assert_eq!(target_version(&view), Some("bbb"));
        // Labels are opaque: a rollback to a label that sorts first is still the target.
        let back = vec![v("n1", "bbb", 500), v("r1", "000", 700)];
        assert_eq!(target_version(&back), Some("000"));
        // Unversioned is a label like any other.
        assert_eq!(target_version(&[v("a", "", 5), v("b", "x", 1)]), Some(""));
        // One group: no rollout.
        assert_eq!(target_version(&[v("a", "x", 1), v("b", "x", 2)]), None);
        assert_eq!(target_version(&[]), None);
        // Ties go to the greater label.
        assert_eq!(target_version(&[v("a", "x", 7), v("b", "y", 7)]), Some("y"));
    }

    #[test]
    fn a_member_that_publishes_no_version_means_no_target() {
        let view = vec![member("a", Some("x"), Some(1)), member("b", Some("y"), Some(2)), member("old", None, None)];
        assert_eq!(target_version(&view), None);
        let half = vec![member("a", Some("x"), Some(1)), member("b", Some("y"), None)];
        assert_eq!(target_version(&half), None);
    }

    #[test]
    fn the_target_does_not_depend_on_the_order_the_view_was_learned_in() {
        let mut rng = fastrand::Rng::with_seed(fastrand::u64(..));
        for _ in 0..200 {
            let labels = ["a", "b", "c", ""];
            let mut view: Vec<Member> = (0..rng.usize(1..12))
                .map(|i| member(&format!("n{i}"), Some(labels[rng.usize(..labels.len())]), Some(rng.u64(..8))))
                .collect();
            let t = target_version(&view).map(str::to_string);
            rng.shuffle(&mut view);
            assert_eq!(target_version(&view).map(str::to_string), t);
        }
    }

    fn pc(n: u32) -> PartitionCount {
        PartitionCount::new(n).expect("valid partition count")
    }

    fn ids(n: usize, rng: &mut fastrand::Rng, taken: &BTreeSet<String>) -> Vec<String> {
        let mut out = BTreeSet::new();
        while out.len() < n {
            let id = match rng.u8(..3) {
                0 => format!("node-{}", rng.u64(..)),
                1 => format!("10.0.{}.{}:7946", rng.u8(..), rng.u8(..)),
                _ => format!("{:016x}", rng.u64(..)),
            };
            if !taken.contains(&id) {
                out.insert(id);
            }
        }
        let mut out: Vec<String> = out.into_iter().collect();
        rng.shuffle(&mut out);
        out
    }

    #[derive(Debug, Clone, Copy)]
    enum Scheme {
        Plain,
        TargetsFirst,
        HomeThenTargets,
        /// The first member if old, then targets, then other olds.
        FirstIfOld,
        /// The plain ring without a load cap (ε = 1).
        NoCap,
        /// Memory: the original old set is known (live or departed); q stays on its
        /// home over it if live, else targets, then other olds.
        BaseHome,
    }

    /// Deferred acceptance over explicit lists; members rank by (rank, distance, q).
    fn da(lists: &[Vec<(u32, u64)>], n: usize, cap: u32) -> Vec<u32> {
        let p = lists.len();
        let mut next = vec![0usize; p];
        let mut held: Vec<std::collections::BinaryHeap<(usize, u64, usize)>> = vec![Default::default(); n];
        let mut free: Vec<usize> = (0..p).rev().collect();
        while let Some(q) = free.pop() {
            let r = next[q];
            next[q] += 1;
            let (m, d) = lists[q][r];
            let h = &mut held[m as usize];
            h.push((r, d, q));
            if h.len() > cap as usize {
                free.push(h.pop().unwrap().2);
            }
        }
        let mut owners = vec![0u32; p];
        for (m, h) in held.iter().enumerate() {
            for (_, _, q) in h {
                owners[*q] = m as u32;
            }
        }
        owners
    }

    /// Owners (as ids) of every partition over `old` ∪ `new` (`new` in start order).
    fn owners(old: &[String], new: &[String], base: &[String], scheme: Scheme) -> (Vec<String>, u32) {
        let mut members: Vec<String> = old.iter().chain(new).cloned().collect();
        members.sort();
        let is_old: Vec<bool> = members.iter().map(|m| old.contains(m)).collect();
        let cap = crate::ring::load_cap(P, members.len(), RingConfig::default().load_epsilon);
        let both = !old.is_empty() && !new.is_empty();
        if matches!(scheme, Scheme::NoCap) {
            let c = RingConfig { load_epsilon: 1.0, ..RingConfig::default() };
            let a = crate::ring::place(&members, pc(P), &c).unwrap();
            return ((0..P).map(|q| a.owner(q).to_string()).collect(), a.cap());
        }
        if !both || matches!(scheme, Scheme::Plain) {
            let a = crate::ring::place(&members, pc(P), &RingConfig::default()).unwrap();
            return ((0..P).map(|q| a.owner(q).to_string()).collect(), a.cap());
        }
        let walks = crate::ring::walks(&members, P, &RingConfig::default());
        let mut base_sorted: Vec<String> = base.to_vec();
        base_sorted.sort();
        let base_walks = crate::ring::walks(&base_sorted, P, &RingConfig::default());
        let lists: Vec<Vec<(u32, u64)>> = walks
            .into_iter()
            .enumerate()
            .map(|(q, w)| {
                let old_of = |x: &(u32, u64)| is_old[x.0 as usize];
                let targets = w.iter().filter(|x| !old_of(x)).copied();
                match scheme {
                    Scheme::Plain | Scheme::NoCap => unreachable!(),
                    Scheme::BaseHome => {
                        let home = &base_sorted[base_walks[q][0].0 as usize];
                        let h = w.iter().find(|x| members[x.0 as usize] == *home).copied();
                        h.into_iter()
                            .chain(targets)
                            .chain(w.iter().filter(|x| old_of(x) && Some(**x) != h).copied())
                            .collect()
                    }
                    Scheme::TargetsFirst => targets.chain(w.iter().filter(|x| old_of(x)).copied()).collect(),
                    Scheme::HomeThenTargets => {
                        let home = *w.iter().find(|x| old_of(x)).unwrap();
                        [home]
                            .into_iter()
                            .chain(targets)
                            .chain(w.iter().filter(|x| old_of(x) && **x != home).copied())
                            .collect()
                    }
                    Scheme::FirstIfOld => {
                        if old_of(&w[0]) {
                            [w[0]]
                                .into_iter()
                                .chain(targets)
                                .chain(w[1..].iter().filter(|x| old_of(x)).copied())
                                .collect()
                        } else {
                            targets.chain(w.iter().filter(|x| old_of(x)).copied()).collect()
                        }
                    }
                }
            })
            .collect();
        let owners = da(&lists, members.len(), cap);
        (owners.iter().map(|m| members[*m as usize].clone()).collect(), cap)
    }

    #[derive(Default, Debug)]
    struct Figures {
        max_moves: u32,
        mean_moves: f64,
        /// Partitions (summed over trials) that moved k times, k = 0..=6+.
        histogram: [u64; 7],
        /// Per step: worst max/mean over trials.
        worst_ratio: Vec<f64>,
        trials: usize,
        /// Moves by kind, summed: old→old, old→new, new→new, new→old.
        kinds: [u64; 4],
    }

    /// The maxSurge 1 / maxUnavailable 0 rolling replace of `n` nodes, `trials`
    /// random id sets: +new1, −old1, +new2, −old2, …
    fn rollout(n: usize, trials: usize, passes: Scheme, seed: u64) -> Figures {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut f = Figures { worst_ratio: vec![0.0; 2 * n + 1], trials, ..Default::default() };
        let mut total_moves = 0u64;
        for _ in 0..trials {
            let old = ids(n, &mut rng, &BTreeSet::new());
            let new = ids(n, &mut rng, &old.iter().cloned().collect());
            let mut moves = vec![0u32; P as usize];
            let (mut prev, cap) = owners(&old, &[], &old, passes);
            let mut step = 0;
            let record = |owners: &[String], cap: u32, members: usize, step: usize, f: &mut Figures| {
                let mut loads = std::collections::BTreeMap::<&str, u32>::new();
                for o in owners {
                    *loads.entry(o.as_str()).or_default() += 1;
                }
                let max = loads.values().copied().max().unwrap_or(0);
                assert!(max <= cap, "step {step}: load {max} above cap {cap}");
                let r = max as f64 * members as f64 / P as f64;
                f.worst_ratio[step] = f.worst_ratio[step].max(r);
            };
            record(&prev, cap, n, step, &mut f);
            for i in 0..n {
                for phase in 0..2 {
                    let (o, w) = if phase == 0 { (&old[i..], &new[..=i]) } else { (&old[i + 1..], &new[..=i]) };
                    let (next, cap) = owners(o, w, &old, passes);
                    for q in 0..P as usize {
                        if next[q] != prev[q] {
                            moves[q] += 1;
                            let from_old = old.contains(&prev[q]);
                            let to_old = old.contains(&next[q]);
                            f.kinds[match (from_old, to_old) {
                                (true, true) => 0,
                                (true, false) => 1,
                                (false, false) => 2,
                                (false, true) => 3,
                            }] += 1;
                        }
                    }
                    step += 1;
                    record(&next, cap, o.len() + w.len(), step, &mut f);
                    prev = next;
                }
            }
            for m in &moves {
                f.max_moves = f.max_moves.max(*m);
                f.histogram[(*m as usize).min(6)] += 1;
                total_moves += *m as u64;
            }
        }
        f.mean_moves = total_moves as f64 / (trials as f64 * P as f64);
        f
    }

    fn show(name: &str, n: usize, f: &Figures) -> String {
        let per = |k: usize| f.histogram[k] as f64 / f.trials as f64;
        format!(
            "N={n:<2} {name:<28} max {} mean {:.3}  o→o {:.0} o→n {:.0} n→n {:.0} n→o {:.0}  per rollout: 1:{:.0} 2:{:.0} 3:{:.1} 4:{:.1} 5:{:.1} 6+:{:.1}  worst max/mean per step {}",
            f.max_moves,
            f.mean_moves,
            f.kinds[0] as f64 / f.trials as f64,
            f.kinds[1] as f64 / f.trials as f64,
            f.kinds[2] as f64 / f.trials as f64,
            f.kinds[3] as f64 / f.trials as f64,
            per(1),
            per(2),
            per(3),
            per(4),
            per(5),
            per(6),
            f.worst_ratio.iter().map(|r| format!("{r:.3}")).collect::<Vec<_>>().join(" ")
        )
    }

    #[test]
    fn a_rolling_replace_keeps_the_cap_and_ends_on_the_new_nodes() {
        // `rollout` asserts the cap at every step; a handful of runs in debug.
        for n in [2, 3] {
            let f = rollout(n, 2, Scheme::Plain, fastrand::u64(..));
            assert_eq!(f.histogram[0], 0, "N={n}: every partition ends on a new node, so moves at least once");
            assert!(f.max_moves >= 1 && f.mean_moves >= 1.0);
        }
    }

    /// `cargo test --release -p warden-cluster print_rollout_figures -- --ignored --nocapture`
    #[test]
    #[ignore = "prints the figures quoted in the module docs"]
    fn print_rollout_figures() {
        let trials: usize = std::env::var("WARDEN_ROLLOUT_TRIALS").ok().and_then(|s| s.parse().ok()).unwrap_or(200);
        let schemes = [
            ("plain", Scheme::Plain),
            ("targets first", Scheme::TargetsFirst),
            ("home, targets, others", Scheme::HomeThenTargets),
            ("first if old, targets", Scheme::FirstIfOld),
            ("no cap", Scheme::NoCap),
            ("memory: home over original olds", Scheme::BaseHome),
        ];
        for n in [3, 5, 10] {
            for (name, passes) in schemes {
                println!("{}", show(name, n, &rollout(n, trials, passes, 42)));
            }
        }
    }
}
