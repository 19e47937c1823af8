//! The conformance suite of the executor seam ([`Store`]): scenarios with exact
//! expectations that every store must pass. `tests/conformance.rs` runs each one
//! against the PostgreSQL store (on a fresh database) and against the model store
//! ([`crate::model_store`]) that the simulation trusts, so the model cannot drift
//! from the SQL.
//!
//! The scenarios set up jobs through the producer seam ([`ProducerStore`]) and read
//! them back through it, so its enqueue, get, attempts, cancel and retry are covered
//! on the way.
//!
//! What the suite does not cover, and why:
//! - concurrency between statements (the fence lock, SKIP LOCKED, chunking of large
//!   lease statements, enqueue locks): the model applies each statement atomically and
//!   has no locks; `tests/store.rs` and `tests/hardening.rs` test these on PostgreSQL;
//! - handler transactions ([`Store::begin`], [`Store::finish`] with a transaction) and
//!   NOTIFY: not modelled;
//! - undecodable rows, kinds published by nodes (`warden.kinds`): not modelled;
//! - the order of rows PostgreSQL leaves unspecified (granted leases, `running_here`,
//!   heartbeat ids, ties in `due_accounts`): compared as sets or kept apart by time.
//!
//! Times: leases that must expire are granted for [`SHORT_TTL`] and the scenario
//! sleeps [`PAST_SHORT_TTL`]; both stores decide expiry by their own clock.

use std::collections::BTreeSet;
use std::time::Duration;
use warden_runtime::job::{CancelResult, JobRow, NewJob, Schedule};
use warden_runtime::store::{
    DueAccount, Fence, Finish, Finished, GrantedLease, KindDefault, MemberInfo, ProducerStore, RunningJob, Store,
};
use warden_runtime::{partition_of, Error, Lane};

/// Partitions every scenario's store is created with.
pub const P: u32 = 8;
/// A lease that outlives any scenario.
pub const TTL: Duration = Duration::from_secs(60);
/// A lease a scenario lets expire.
pub const SHORT_TTL: Duration = Duration::from_millis(500);
/// How long a scenario sleeps for a [`SHORT_TTL`] lease to expire.
pub const PAST_SHORT_TTL: Duration = Duration::from_millis(800);

const A: &str = "a/1";
const B: &str = "b/1";

fn part(account: &str) -> u32 {
    partition_of(account, warden_runtime::PartitionCount::new(P).unwrap())
}

fn all() -> Vec<u32> {
    (0..P).collect()
}

fn sorted(mut v: Vec<GrantedLease>) -> Vec<GrantedLease> {
    v.sort_by_key(|g| g.partition);
    v
}

fn granted(pairs: &[(u32, i64)]) -> Vec<GrantedLease> {
    pairs.iter().map(|&(partition, epoch)| GrantedLease { partition, epoch }).collect()
}

/// Acquire every partition for `owner` and return the fences, by partition.
async fn own_all<S: Store>(s: &S, owner: &str, ttl: Duration) -> Vec<Fence> {
    let g = sorted(s.acquire(owner, &all(), ttl).await.unwrap());
    assert_eq!(g.len(), P as usize, "{owner} acquires every free partition");
    g.iter().map(|g| Fence { partition: g.partition, epoch: g.epoch, owner: owner.into() }).collect()
}

fn fence_of(fences: &[Fence], account: &str) -> Fence {
    fences[part(account) as usize].clone()
}

fn job(account: &str) -> NewJob {
    NewJob::new(account, "step", ()).unwrap()
}

async fn enqueue<S: ProducerStore>(s: &S, jobs: Vec<NewJob>) -> Vec<i64> {
    let out = s.enqueue(&jobs, &|_: &str| KindDefault::default()).await.unwrap();
    assert!(out.iter().all(|e| !e.duplicate));
    out.into_iter().map(|e| e.id).collect()
}

async fn get<S: ProducerStore>(s: &S, id: i64) -> JobRow {
    s.get_job(id).await.unwrap().expect("job exists")
}

fn claimed(r: Option<JobRow>) -> i64 {
    r.expect("a job was claimed").id
}

fn next_of(f: Finished) -> Option<i64> {
    match f {
        Finished::Recorded(next) => next.map(|j| j.id),
        Finished::NotRunning => panic!("expected the finish to be recorded"),
    }
}

fn is_fenced<T: std::fmt::Debug>(r: warden_runtime::Result<T>) -> bool {
    matches!(r, Err(Error::Fenced { .. }))
}

/// Distinct accounts in distinct partitions (the scenarios that need them).
fn accounts_in_distinct_partitions(n: usize) -> Vec<String> {
    let mut seen = BTreeSet::new();
    (0..).map(|i| format!("acct-{i}")).filter(|a| seen.insert(part(a))).take(n).collect()
}

// ---------------------------------------------------------------------------
// Leases.

/// Free partitions are granted at epoch 1; a partition held by another owner is not;
/// our own is granted again at the next epoch; an expired one is taken over at the
/// next epoch.
pub async fn acquire_grants_free_expired_and_own_partitions<S: Store + ProducerStore>(s: &S) {
    assert_eq!(sorted(s.acquire(A, &[0, 1], TTL).await.unwrap()), granted(&[(0, 1), (1, 1)]));
    assert_eq!(s.acquire(B, &[0, 1, 2], TTL).await.unwrap(), granted(&[(2, 1)]), "held by another: refused");
    assert_eq!(s.acquire(A, &[0], TTL).await.unwrap(), granted(&[(0, 2)]), "our own: a new epoch");
    assert_eq!(s.acquire(A, &[3], SHORT_TTL).await.unwrap(), granted(&[(3, 1)]));
    assert_eq!(s.acquire(B, &[3], TTL).await.unwrap(), granted(&[]), "not yet expired");
    tokio::time::sleep(PAST_SHORT_TTL).await;
    assert_eq!(s.acquire(B, &[3], TTL).await.unwrap(), granted(&[(3, 2)]), "expired: taken over");
    assert_eq!(s.acquire(A, &[], TTL).await.unwrap(), granted(&[]));
}

/// A renewal succeeds only for the owner, at exactly the granted epoch, before expiry.
pub async fn renew_extends_only_the_same_unexpired_epoch<S: Store + ProducerStore>(s: &S) {
    s.acquire(A, &[0, 1], TTL).await.unwrap();
    let mut r = s.renew(A, &granted(&[(0, 1), (1, 1)]), TTL).await.unwrap();
    r.sort();
    assert_eq!(r, vec![0, 1]);
    assert_eq!(s.renew(A, &granted(&[(0, 2)]), TTL).await.unwrap(), Vec::<u32>::new(), "another epoch");
    assert_eq!(s.renew(B, &granted(&[(0, 1)]), TTL).await.unwrap(), Vec::<u32>::new(), "another owner");
    s.acquire(A, &[2], SHORT_TTL).await.unwrap();
    tokio::time::sleep(PAST_SHORT_TTL).await;
    assert_eq!(
        s.renew(A, &granted(&[(2, 1)]), TTL).await.unwrap(),
        Vec::<u32>::new(),
        "an expired lease is not renewed, even if nobody took it"
    );
    assert_eq!(s.acquire(A, &[2], TTL).await.unwrap(), granted(&[(2, 2)]), "it must be acquired again");
    s.release(A, &granted(&[(1, 1)])).await.unwrap();
    assert_eq!(s.renew(A, &granted(&[(1, 1)]), TTL).await.unwrap(), Vec::<u32>::new(), "released");
    assert_eq!(s.renew(A, &[], TTL).await.unwrap(), Vec::<u32>::new());
}

/// Release frees the owner's lease at that epoch (expired or not); the next grant
/// continues from the kept epoch.
pub async fn release_frees_the_lease_and_keeps_its_epoch<S: Store + ProducerStore>(s: &S) {
    s.acquire(A, &[0], TTL).await.unwrap();
    assert_eq!(s.release(B, &granted(&[(0, 1)])).await.unwrap(), 0, "not B's");
    assert_eq!(s.release(A, &granted(&[(0, 2)])).await.unwrap(), 0, "not that epoch");
    assert_eq!(s.release(A, &granted(&[(0, 1)])).await.unwrap(), 1);
    assert_eq!(s.release(A, &granted(&[(0, 1)])).await.unwrap(), 0, "already released");
    assert_eq!(s.lease_wait(B, &[0]).await.unwrap(), None, "free");
    assert_eq!(s.acquire(B, &[0], TTL).await.unwrap(), granted(&[(0, 2)]), "the epoch was kept");
    s.acquire(A, &[1], SHORT_TTL).await.unwrap();
    tokio::time::sleep(PAST_SHORT_TTL).await;
    assert_eq!(s.release(A, &granted(&[(1, 1)])).await.unwrap(), 1, "an expired lease is still released");
    assert_eq!(s.acquire(B, &[1], TTL).await.unwrap(), granted(&[(1, 2)]));
}

/// A lease statement matches each existing partition once, however often it is
/// listed; a partition that does not exist matches nothing.
pub async fn lease_statements_match_each_listed_partition_once<S: Store + ProducerStore>(s: &S) {
    assert_eq!(s.acquire(A, &[1, 1, P, 1], TTL).await.unwrap(), granted(&[(1, 1)]));
    assert_eq!(s.renew(A, &granted(&[(1, 1), (1, 1), (P, 1)]), TTL).await.unwrap(), vec![1]);
    assert_eq!(s.lease_wait(B, &[1, 1, P]).await.unwrap().map(|w| w > TTL / 2), Some(true));
    assert_eq!(s.rescue(A, &granted(&[(1, 1), (1, 1), (P, 1)])).await.unwrap(), 0);
    assert_eq!(s.release(A, &granted(&[(1, 1), (1, 1), (P, 1)])).await.unwrap(), 1);
    assert_eq!(s.acquire(B, &[1], TTL).await.unwrap(), granted(&[(1, 2)]));
}

/// lease_wait: the earliest expiry among leases held by others; zero once expired;
/// `None` for free partitions and our own.
pub async fn lease_wait_is_the_time_until_another_owners_lease_expires<S: Store + ProducerStore>(s: &S) {
    assert_eq!(s.lease_wait(B, &[0, 1]).await.unwrap(), None, "free");
    assert_eq!(s.lease_wait(B, &[]).await.unwrap(), None);
    s.acquire(A, &[0], TTL).await.unwrap();
    s.acquire(A, &[1], Duration::from_secs(30)).await.unwrap();
    let w = s.lease_wait(B, &[0, 1, 2]).await.unwrap().expect("held by A");
    assert!(w <= Duration::from_secs(30) && w > Duration::from_secs(25), "the earliest expiry: {w:?}");
    assert_eq!(s.lease_wait(A, &[0, 1]).await.unwrap(), None, "our own leases do not count");
    s.acquire(A, &[2], SHORT_TTL).await.unwrap();
    tokio::time::sleep(PAST_SHORT_TTL).await;
    assert_eq!(s.lease_wait(B, &[0, 2]).await.unwrap(), Some(Duration::ZERO), "expired but not released");
}

/// lease_holders (sticky placement's input): every live holder as its member id
/// (without the `/generation`) and the time the partition came to it — kept across a
/// re-grant of a lease it still holds, new after a release, an expiry or another
/// owner; released and expired leases have no holder.
pub async fn lease_holders_name_live_holders_and_when_their_lease_came_to_them<S: Store + ProducerStore>(s: &S) {
    let holders = || async { s.lease_holders().await.unwrap().expect("the store keeps holders") };
    let h = holders().await;
    assert_eq!(h.len(), P as usize);
    assert!(h.iter().all(Option::is_none), "nothing held yet");
    s.acquire(A, &[0, 1], TTL).await.unwrap();
    s.acquire(A, &[2], SHORT_TTL).await.unwrap();
    let h = holders().await;
    let at = |h: &warden_cluster::Holders, p: usize| h[p].as_ref().map(|x| (x.owner.clone(), x.acquired_us));
    let (owner, t0) = at(&h, 0).expect("held");
    assert_eq!(owner, "a", "the member id, without the generation");
    assert!(t0 > 0, "a grant time");
    assert_eq!(at(&h, 1).map(|x| x.0), Some("a".to_string()));
    tokio::time::sleep(Duration::from_millis(20)).await;
    s.acquire(A, &[0], TTL).await.unwrap();
    assert_eq!(at(&holders().await, 0), Some(("a".to_string(), t0)), "a re-grant of a held lease keeps its time");
    tokio::time::sleep(PAST_SHORT_TTL).await;
    assert_eq!(at(&holders().await, 2), None, "expired: no holder");
    s.acquire(A, &[2], TTL).await.unwrap();
    let (_, t2) = at(&holders().await, 2).expect("held again");
    assert!(t2 > t0, "a grant after an expiry is new, even to the same owner");
    s.release(A, &granted(&[(1, 1)])).await.unwrap();
    assert_eq!(at(&holders().await, 1), None, "released: no holder");
    s.acquire(B, &[1], TTL).await.unwrap();
    let (owner, t1) = at(&holders().await, 1).expect("held by b");
    assert_eq!(owner, "b");
    assert!(t1 > t0, "another owner: a new time");
}

// ---------------------------------------------------------------------------
// Claim order.

/// The serial lane runs in (run_at, id) order; priority does not reorder it (the SQL
/// never reads it).
pub async fn claim_takes_the_serial_head_in_run_at_then_id_order_ignoring_priority<S: Store + ProducerStore>(s: &S) {
    let f = own_all(s, A, TTL).await;
    let acct = "order";
    let earlier = chrono::Utc::now() - chrono::Duration::seconds(60);
    let mut urgent = job(acct);
    urgent.priority = 100;
    let mut backdated = job(acct);
    backdated.schedule = Schedule::At(earlier);
    let ids = enqueue(s, vec![job(acct), backdated, urgent]).await;
    let fence = fence_of(&f, acct);
    let first = s.claim(acct, &fence).await.unwrap().expect("claimed");
    assert_eq!(first.id, ids[1], "the earliest run_at first");
    assert_eq!((first.state.as_str(), first.attempt, first.epoch), ("running", 1, Some(fence.epoch)));
    assert_eq!(first.node.as_deref(), Some(A));
    let second = next_of(s.finish(None, &first, &fence, &Finish::Completed, true).await.unwrap());
    assert_eq!(second, Some(ids[0]), "then by id among equal run_at, whatever the priority");
    let second = get(s, ids[0]).await;
    let third = next_of(s.finish(None, &second, &fence, &Finish::Completed, true).await.unwrap());
    assert_eq!(third, Some(ids[2]));
    let third = get(s, ids[2]).await;
    assert_eq!(next_of(s.finish(None, &third, &fence, &Finish::Completed, true).await.unwrap()), None);
    assert!(s.claim(acct, &fence).await.unwrap().is_none(), "nothing left");
}

/// While the serial head runs (here under an older epoch, so it is not adopted), no
/// later serial job is claimed, but a due unordered job is.
pub async fn a_running_serial_head_blocks_serial_jobs_but_not_unordered_ones<S: Store + ProducerStore>(s: &S) {
    let f = own_all(s, A, TTL).await;
    let acct = "lanes";
    let mut unordered = job(acct);
    unordered.lane = Lane::Unordered;
    let ids = enqueue(s, vec![job(acct), job(acct), unordered]).await;
    let old = fence_of(&f, acct);
    assert_eq!(claimed(s.claim(acct, &old).await.unwrap()), ids[0]);
    let epoch = s.acquire(A, &[old.partition], TTL).await.unwrap()[0].epoch;
    let new = Fence { epoch, ..old.clone() };
    assert_eq!(claimed(s.claim(acct, &new).await.unwrap()), ids[2], "the unordered job, not the second serial");
    let u = get(s, ids[2]).await;
    assert_eq!(next_of(s.finish(None, &u, &new, &Finish::Completed, true).await.unwrap()), None, "serial blocked");
    assert!(s.claim(acct, &new).await.unwrap().is_none());
    assert_eq!(get(s, ids[1]).await.state, "available");
}

/// A job scheduled for later than a due job does not block it; a head backing off
/// after a failure blocks the account's later serial jobs, and a non-terminal finish
/// claims nothing next.
pub async fn a_later_scheduled_job_does_not_block_and_a_backing_off_head_does<S: Store + ProducerStore>(s: &S) {
    let f = own_all(s, A, TTL).await;
    let acct = "sched";
    let mut later = job(acct);
    later.schedule = Schedule::After(Duration::from_secs(3600));
    let ids = enqueue(s, vec![later, job(acct)]).await;
    assert_eq!(get(s, ids[0]).await.state, "scheduled");
    let fence = fence_of(&f, acct);
    let now_job = s.claim(acct, &fence).await.unwrap().expect("the due job");
    assert_eq!(now_job.id, ids[1]);
    assert_eq!(next_of(s.finish(None, &now_job, &fence, &Finish::Completed, true).await.unwrap()), None);

    let acct = "backoff";
    let ids = enqueue(s, vec![job(acct), job(acct)]).await;
    let fence = fence_of(&f, acct);
    let head = s.claim(acct, &fence).await.unwrap().expect("head");
    let fail = Finish::Retry { after: Duration::from_secs(3600), outcome: "failed", error: "boom".into() };
    let before = chrono::Utc::now();
    assert_eq!(next_of(s.finish(None, &head, &fence, &fail, true).await.unwrap()), None, "not terminal");
    let h = get(s, ids[0]).await;
    assert_eq!((h.state.as_str(), h.attempt, h.last_error.as_deref()), ("retryable", 1, Some("boom")));
    assert!(h.finished_at.is_none());
    let backoff = (h.due_at - before).num_seconds();
    assert!((3590..=3610).contains(&backoff), "due again after the backoff: {backoff} s");
    assert!(s.claim(acct, &fence).await.unwrap().is_none(), "the backing-off head blocks the account");
    assert!(!s.due_accounts(&all(), 100).await.unwrap().iter().any(|d| d.account == acct));
}

// ---------------------------------------------------------------------------
// Finish, unclaim, fencing.

/// A terminal finish records its attempt row and claims the next job in the same
/// statement; finishing again is `NotRunning`, not a fence failure.
pub async fn finish_records_the_attempt_and_claims_the_next_job<S: Store + ProducerStore>(s: &S) {
    let f = own_all(s, A, TTL).await;
    let acct = "finish";
    let ids = enqueue(s, vec![job(acct), job(acct)]).await;
    let fence = fence_of(&f, acct);
    let first = s.claim(acct, &fence).await.unwrap().unwrap();
    let next = s.finish(None, &first, &fence, &Finish::Completed, true).await.unwrap().into_next().unwrap();
    assert_eq!((next.id, next.state.as_str(), next.attempt), (ids[1], "running", 1));
    assert_eq!((next.epoch, next.node.as_deref()), (Some(fence.epoch), Some(A)));
    let done = get(s, ids[0]).await;
    assert_eq!(done.state, "completed");
    assert!(done.finished_at.is_some());
    let att = s.attempts_of(ids[0]).await.unwrap();
    assert_eq!(att.len(), 1);
    let a = &att[0];
    assert_eq!((a.attempt, a.node.as_str(), a.epoch, a.outcome.as_str()), (1, A, fence.epoch, "completed"));
    assert_eq!(a.error, None);
    assert_eq!(Some(a.started_at), done.attempted_at);
    assert!(a.finished_at >= a.started_at);

    let discard = Finish::Discard { outcome: "discarded", error: "no".into() };
    assert_eq!(next_of(s.finish(None, &next, &fence, &discard, false).await.unwrap()), None);
    assert_eq!(get(s, ids[1]).await.state, "discarded");
    assert!(matches!(s.finish(None, &next, &fence, &discard, false).await.unwrap(), Finished::NotRunning));
    assert_eq!(s.attempts_of(ids[1]).await.unwrap().len(), 1, "the repeated finish recorded nothing");
}

/// Each outcome writes the columns the SQL writes: snooze and interruption give the
/// attempt back, a requested cancel turns a retry into `cancelled` but lets a
/// completion stand.
pub async fn finish_outcomes_write_what_the_sql_writes<S: Store + ProducerStore>(s: &S) {
    let f = own_all(s, A, TTL).await;
    let run = |acct: &'static str| {
        let fence = fence_of(&f, acct);
        async move {
            let id = enqueue(s, vec![job(acct)]).await[0];
            let j = s.claim(acct, &fence).await.unwrap().unwrap();
            assert_eq!(j.id, id);
            (j, fence)
        }
    };

    let (j, fence) = run("snooze").await;
    s.finish(None, &j, &fence, &Finish::Snooze { after: Duration::from_secs(600) }, true).await.unwrap();
    let r = get(s, j.id).await;
    assert_eq!((r.state.as_str(), r.attempt, r.max_attempts), ("retryable", 1, j.max_attempts + 1), "refunded");
    assert_eq!((r.last_error, r.finished_at), (None, None));
    let a = s.attempts_of(j.id).await.unwrap();
    assert_eq!((a[0].outcome.as_str(), a[0].error.as_deref()), ("snoozed", None));

    let (j, fence) = run("interrupt").await;
    s.finish(None, &j, &fence, &Finish::Interrupted { error: "drain".into() }, true).await.unwrap();
    let r = get(s, j.id).await;
    assert_eq!((r.state.as_str(), r.max_attempts), ("retryable", j.max_attempts + 1));
    assert_eq!(r.last_error.as_deref(), Some("drain"));
    assert_eq!(claimed(s.claim("interrupt", &fence).await.unwrap()), j.id, "due again at once");

    let (j, fence) = run("cancelled").await;
    s.finish(None, &j, &fence, &Finish::Cancelled { error: "asked".into() }, true).await.unwrap();
    let r = get(s, j.id).await;
    assert_eq!((r.state.as_str(), r.last_error.as_deref()), ("cancelled", Some("asked")));
    assert!(r.finished_at.is_some());

    let (j, fence) = run("cancel-wins").await;
    assert_eq!(s.cancel_job(j.id).await.unwrap(), CancelResult::CancelRequested);
    assert!(s.cancel_requested(j.id).await.unwrap());
    let fail = Finish::Retry { after: Duration::from_secs(1), outcome: "failed", error: "boom".into() };
    s.finish(None, &j, &fence, &fail, true).await.unwrap();
    let r = get(s, j.id).await;
    assert_eq!(r.state, "cancelled", "a requested cancel wins over a retry");
    assert_eq!(r.last_error.as_deref(), Some("cancelled while running; last attempt: boom"));
    assert!(r.finished_at.is_some());
    let a = s.attempts_of(j.id).await.unwrap();
    assert_eq!((a[0].outcome.as_str(), a[0].error.as_deref()), ("failed", Some("boom")));

    let (j, fence) = run("cancel-late").await;
    s.cancel_job(j.id).await.unwrap();
    s.finish(None, &j, &fence, &Finish::Completed, true).await.unwrap();
    assert_eq!(get(s, j.id).await.state, "completed", "a completion stands");
}

/// A fence that no longer holds — an older epoch of the same owner, a lease taken
/// over, a lease expired but not taken — refuses claim, finish and unclaim, and
/// changes nothing.
pub async fn a_stale_or_expired_fence_is_refused<S: Store + ProducerStore>(s: &S) {
    let f = own_all(s, A, TTL).await;
    let acct = "fenced";
    let ids = enqueue(s, vec![job(acct), job(acct)]).await;
    let old = fence_of(&f, acct);
    let j = s.claim(acct, &old).await.unwrap().unwrap();
    let epoch = s.acquire(A, &[old.partition], SHORT_TTL).await.unwrap()[0].epoch;
    assert_eq!(epoch, old.epoch + 1);
    assert!(is_fenced(s.claim(acct, &old).await), "claim under an older epoch");
    assert!(is_fenced(s.finish(None, &j, &old, &Finish::Completed, true).await), "finish under an older epoch");
    assert!(is_fenced(s.unclaim(&j, &old).await), "unclaim under an older epoch");
    let r = get(s, ids[0]).await;
    assert_eq!((r.state.as_str(), r.attempt, r.epoch), ("running", 1, Some(old.epoch)), "unchanged");
    assert!(s.attempts_of(ids[0]).await.unwrap().is_empty());

    let current = Fence { epoch, ..old.clone() };
    tokio::time::sleep(PAST_SHORT_TTL).await;
    assert!(is_fenced(s.claim(acct, &current).await), "an expired lease fences even its owner");
    assert_eq!(s.acquire(B, &[old.partition], TTL).await.unwrap()[0].epoch, epoch + 1);
    assert!(is_fenced(s.claim(acct, &current).await), "taken over");
    let other = Fence { owner: B.into(), epoch, ..old.clone() };
    assert!(is_fenced(s.claim(acct, &other).await), "the right owner at the wrong epoch");
    assert_eq!(get(s, ids[1]).await.state, "available");
}

/// Unclaim puts the job back as available with its attempt given back; a second
/// unclaim finds nothing running and is refused.
pub async fn unclaim_gives_the_attempt_back<S: Store + ProducerStore>(s: &S) {
    let f = own_all(s, A, TTL).await;
    let acct = "unclaim";
    let id = enqueue(s, vec![job(acct)]).await[0];
    let fence = fence_of(&f, acct);
    let j = s.claim(acct, &fence).await.unwrap().unwrap();
    s.unclaim(&j, &fence).await.unwrap();
    let r = get(s, id).await;
    assert_eq!((r.state.as_str(), r.attempt, r.attempted_at), ("available", 0, None));
    assert!(is_fenced(s.unclaim(&j, &fence).await), "not running any more");
    let again = s.claim(acct, &fence).await.unwrap().unwrap();
    assert_eq!((again.id, again.attempt), (id, 1));
}

/// A job already running at this very fence (an ambiguous result left it) is adopted
/// by the next claim, counting an attempt, before anything else is claimed.
pub async fn claim_adopts_a_job_left_running_at_its_own_fence<S: Store + ProducerStore>(s: &S) {
    let f = own_all(s, A, TTL).await;
    let acct = "adopt";
    let mut unordered = job(acct);
    unordered.lane = Lane::Unordered;
    let ids = enqueue(s, vec![job(acct), unordered]).await;
    let fence = fence_of(&f, acct);
    assert_eq!(claimed(s.claim(acct, &fence).await.unwrap()), ids[0]);
    let adopted = s.claim(acct, &fence).await.unwrap().unwrap();
    assert_eq!((adopted.id, adopted.state.as_str(), adopted.attempt), (ids[0], "running", 2));
    assert_eq!(get(s, ids[1]).await.state, "available", "adoption claims nothing else");
}

/// A claim considers only jobs of the fence's partition, whatever account it names.
pub async fn claim_sees_only_the_fence_partition<S: Store + ProducerStore>(s: &S) {
    let f = own_all(s, A, TTL).await;
    let accts = accounts_in_distinct_partitions(2);
    let id = enqueue(s, vec![job(&accts[0])]).await[0];
    let wrong = fence_of(&f, &accts[1]);
    assert!(s.claim(&accts[0], &wrong).await.unwrap().is_none());
    assert_eq!(get(s, id).await.state, "available");
    assert_eq!(claimed(s.claim(&accts[0], &fence_of(&f, &accts[0])).await.unwrap()), id);
}

// ---------------------------------------------------------------------------
// Scans and rescue.

/// due_accounts: accounts with a runnable job, oldest due first, limited; not an
/// account whose serial head is running or backing off (unless an unordered job of it
/// is due); only the partitions asked for.
pub async fn due_accounts_lists_runnable_accounts_oldest_first<S: Store + ProducerStore>(s: &S) {
    let f = own_all(s, A, TTL).await;
    let ago = |secs: i64| {
        let mut j = job("");
        j.schedule = Schedule::At(chrono::Utc::now() - chrono::Duration::seconds(secs));
        j
    };
    let with = |mut j: NewJob, acct: &str| {
        j.account = acct.into();
        j
    };
    enqueue(s, vec![with(ago(30), "thirty")]).await;
    enqueue(s, vec![with(ago(60), "sixty")]).await;
    let mut later = job("later");
    later.schedule = Schedule::After(Duration::from_secs(3600));
    enqueue(s, vec![later]).await;
    // A head backing off blocks the due job behind it.
    enqueue(s, vec![with(ago(90), "backing-off"), with(ago(80), "backing-off")]).await;
    let fence = fence_of(&f, "backing-off");
    let head = s.claim("backing-off", &fence).await.unwrap().unwrap();
    let fail = Finish::Retry { after: Duration::from_secs(3600), outcome: "failed", error: "x".into() };
    s.finish(None, &head, &fence, &fail, false).await.unwrap();
    // A running head blocks its serial jobs, but a due unordered job makes it runnable.
    enqueue(s, vec![with(ago(100), "running"), with(ago(95), "running")]).await;
    s.claim("running", &fence_of(&f, "running")).await.unwrap().unwrap();
    enqueue(s, vec![with(ago(120), "running-u"), with(ago(10), "running-u")]).await;
    s.claim("running-u", &fence_of(&f, "running-u")).await.unwrap().unwrap();
    let mut u = with(ago(5), "running-u");
    u.lane = Lane::Unordered;
    enqueue(s, vec![u]).await;

    let names = |d: Vec<DueAccount>| d.into_iter().map(|d| d.account).collect::<Vec<_>>();
    assert_eq!(names(s.due_accounts(&all(), 100).await.unwrap()), vec!["sixty", "thirty", "running-u"]);
    assert_eq!(names(s.due_accounts(&all(), 2).await.unwrap()), vec!["sixty", "thirty"]);
    let due = s.due_accounts(&[part("thirty")], 100).await.unwrap();
    assert!(due.contains(&DueAccount { account: "thirty".into(), partition: part("thirty") }));
    assert!(due.iter().all(|d| d.partition == part("thirty")));
    assert!(s.due_accounts(&[], 100).await.unwrap().is_empty());
}

/// running_here: the jobs running under this owner in these partitions.
pub async fn running_here_lists_this_owners_running_jobs<S: Store + ProducerStore>(s: &S) {
    let f = own_all(s, A, TTL).await;
    let accts = accounts_in_distinct_partitions(3);
    let mut running = BTreeSet::new();
    for acct in &accts[..2] {
        enqueue(s, vec![job(acct)]).await;
        let j = s.claim(acct, &fence_of(&f, acct)).await.unwrap().unwrap();
        running.insert((j.id, acct.clone(), part(acct)));
    }
    enqueue(s, vec![job(&accts[2])]).await;
    let set = |v: Vec<RunningJob>| v.into_iter().map(|r| (r.job_id, r.account, r.partition)).collect::<BTreeSet<_>>();
    assert_eq!(set(s.running_here(A, &all(), 100).await.unwrap()), running);
    assert!(s.running_here(B, &all(), 100).await.unwrap().is_empty(), "not B's");
    let one = set(s.running_here(A, &[part(&accts[0])], 100).await.unwrap());
    assert_eq!(one.into_iter().map(|r| r.1).collect::<Vec<_>>(), vec![accts[0].clone()]);
    assert_eq!(s.running_here(A, &all(), 1).await.unwrap().len(), 1, "limited");
    assert!(s.running_here(A, &[], 100).await.unwrap().is_empty());
}

/// Rescue, by a new owner at a newer epoch: a previous owner's running attempts
/// become retryable (due now), discarded when out of attempts, cancelled when a
/// cancel was asked; each gets a `rescued` attempt row naming the old node and epoch.
/// Jobs running at the rescuer's own epoch, and leases it does not hold at that epoch,
/// are left alone.
pub async fn rescue_resets_what_an_older_epoch_left_running<S: Store + ProducerStore>(s: &S) {
    let f = own_all(s, A, TTL).await;
    let accts = accounts_in_distinct_partitions(3);
    let mut last = job(&accts[1]);
    last.max_attempts = Some(1);
    let ids = [
        enqueue(s, vec![job(&accts[0])]).await[0],
        enqueue(s, vec![last]).await[0],
        enqueue(s, vec![job(&accts[2])]).await[0],
    ];
    for acct in &accts {
        s.claim(acct, &fence_of(&f, acct)).await.unwrap().unwrap();
    }
    assert_eq!(s.cancel_job(ids[2]).await.unwrap(), CancelResult::CancelRequested);
    // A hands off without finishing its attempts (a drain that timed out).
    let held: Vec<GrantedLease> = f.iter().map(|f| GrantedLease { partition: f.partition, epoch: f.epoch }).collect();
    assert_eq!(s.release(A, &held).await.unwrap(), P as u64);
    let g = sorted(s.acquire(B, &all(), TTL).await.unwrap());
    assert_eq!(s.rescue(A, &g).await.unwrap(), 0, "A holds none of these");
    let before = chrono::Utc::now() - chrono::Duration::seconds(5);
    assert_eq!(s.rescue(B, &g).await.unwrap(), 3);

    let r = get(s, ids[0]).await;
    assert_eq!((r.state.as_str(), r.attempt, r.finished_at), ("retryable", 1, None));
    assert!(r.due_at >= before, "due now");
    let old_epoch = f[part(&accts[0]) as usize].epoch;
    let msg = format!("attempt 1 abandoned by {A} at epoch {old_epoch}; rescued");
    assert_eq!(r.last_error.as_deref(), Some(msg.as_str()));
    let a = s.attempts_of(ids[0]).await.unwrap();
    assert_eq!(a.len(), 1);
    assert_eq!((a[0].outcome.as_str(), a[0].node.as_str(), a[0].epoch), ("rescued", A, old_epoch));
    assert_eq!(a[0].error.as_deref(), Some(msg.as_str()));
    let r = get(s, ids[1]).await;
    assert_eq!(r.state, "discarded", "out of attempts");
    assert!(r.finished_at.is_some());
    let r = get(s, ids[2]).await;
    assert_eq!(r.state, "cancelled", "a cancel was asked");
    assert!(r.finished_at.is_some());

    assert_eq!(s.rescue(B, &g).await.unwrap(), 0, "nothing left to rescue");
    let mine = Fence { partition: part(&accts[0]), epoch: g[part(&accts[0]) as usize].epoch, owner: B.into() };
    assert_eq!(claimed(s.claim(&accts[0], &mine).await.unwrap()), ids[0]);
    assert_eq!(s.rescue(B, &g).await.unwrap(), 0, "a job running at the rescuer's epoch is left alone");
    assert_eq!(get(s, ids[0]).await.state, "running");
}

// ---------------------------------------------------------------------------
// The producer operations the scenarios lean on.

/// Cancel: queued → cancelled; running → flagged; finished → said so; unknown → not
/// found. Retry: only discarded or cancelled jobs, with one more attempt allowed.
pub async fn cancel_and_retry_follow_the_job_state<S: Store + ProducerStore>(s: &S) {
    let f = own_all(s, A, TTL).await;
    let acct = "cancel";
    let ids = enqueue(s, vec![job(acct), job(acct)]).await;
    assert!(matches!(s.cancel_job(i64::MAX).await, Err(Error::JobNotFound(_))));
    assert!(!s.cancel_requested(i64::MAX).await.unwrap());
    assert_eq!(s.cancel_job(ids[1]).await.unwrap(), CancelResult::Cancelled);
    let r = get(s, ids[1]).await;
    assert_eq!((r.state.as_str(), r.last_error.as_deref()), ("cancelled", Some("cancelled before it ran")));
    assert_eq!(s.cancel_job(ids[1]).await.unwrap(), CancelResult::AlreadyFinished { state: "cancelled".into() });
    let fence = fence_of(&f, acct);
    let j = s.claim(acct, &fence).await.unwrap().unwrap();
    assert!(!s.cancel_requested(j.id).await.unwrap());
    assert_eq!(s.cancel_job(j.id).await.unwrap(), CancelResult::CancelRequested);
    assert!(s.cancel_requested(j.id).await.unwrap());
    assert_eq!(get(s, j.id).await.state, "running", "a running job is only asked");

    assert!(matches!(s.retry_job(j.id).await, Err(Error::InvalidInput(_))), "running: not retryable");
    assert!(matches!(s.retry_job(i64::MAX).await, Err(Error::JobNotFound(_))));
    let discard = Finish::Discard { outcome: "failed", error: "gave up".into() };
    s.finish(None, &j, &fence, &discard, false).await.unwrap();
    let back = s.retry_job(j.id).await.unwrap();
    assert_eq!((back.state.as_str(), back.attempt, back.cancel_requested), ("available", 1, false));
    assert!(back.max_attempts >= 2 && back.finished_at.is_none());
    assert_eq!(s.retry_job(ids[1]).await.unwrap().state, "available", "a cancelled job too");
    assert_eq!(claimed(s.claim(acct, &fence).await.unwrap()), ids[0], "its serial position is kept");
}

/// An unfinished job holding a unique key makes later enqueues with the key
/// duplicates of it (within one batch too); once it finishes, the key is free.
pub async fn unique_keys_make_enqueue_idempotent<S: Store + ProducerStore>(s: &S) {
    let f = own_all(s, A, TTL).await;
    let acct = "unique";
    let keyed = || {
        let mut j = job(acct);
        j.unique_key = Some("k".into());
        j
    };
    let none = &|_: &str| KindDefault::default();
    let first = s.enqueue(&[keyed()], none).await.unwrap();
    assert!(!first[0].duplicate);
    let again = s.enqueue(&[keyed(), job(acct), keyed()], none).await.unwrap();
    assert_eq!((again[0].id, again[0].duplicate), (first[0].id, true));
    assert!(!again[1].duplicate);
    assert_eq!((again[2].id, again[2].duplicate), (first[0].id, true));
    let fence = fence_of(&f, acct);
    let j = s.claim(acct, &fence).await.unwrap().unwrap();
    assert_eq!(j.id, first[0].id);
    assert_eq!(s.enqueue(&[keyed()], none).await.unwrap()[0].id, first[0].id, "running still holds the key");
    s.finish(None, &j, &fence, &Finish::Completed, false).await.unwrap();
    let fresh = s.enqueue(&[keyed()], none).await.unwrap();
    assert!(!fresh[0].duplicate && fresh[0].id > again[1].id, "the key is free again");
}

/// heartbeat: the members seen within the window, this one included.
pub async fn heartbeat_lists_the_members_seen_within_the_window<S: Store + ProducerStore>(s: &S) {
    let member =
        |id: &str| MemberInfo { node_id: id.into(), started_at: chrono::Utc::now(), schema: 1, ring: "r".into() };
    let set = |v: Option<Vec<String>>| v.expect("this store keeps member proof").into_iter().collect::<BTreeSet<_>>();
    let window = Duration::from_secs(10);
    assert_eq!(set(s.heartbeat(&member("n1"), window).await.unwrap()), BTreeSet::from(["n1".to_string()]));
    assert_eq!(
        set(s.heartbeat(&member("n2"), window).await.unwrap()),
        BTreeSet::from(["n1".to_string(), "n2".to_string()])
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        set(s.heartbeat(&member("n2"), Duration::from_millis(20)).await.unwrap()),
        BTreeSet::from(["n2".to_string()]),
        "n1 was seen too long ago"
    );
}

// ---------------------------------------------------------------------------
// Long-running jobs: heartbeats and checkpoints (job_beat.sql).

/// A beat lands only for the job running as this attempt under a holding fence: it
/// keeps the last checkpoint across beats without one and across attempts; a stale
/// epoch, another owner or an expired lease is refused as fenced; a job that is not
/// running as this attempt (finished, or adopted as the next attempt) is
/// `NotRunning`; the beat reports a cancel request.
pub async fn beats_are_fenced_per_attempt_and_keep_the_last_checkpoint<S: Store + ProducerStore>(s: &S) {
    use warden_runtime::progress::{Beat, BeatAck, Progress};
    let f = own_all(s, A, TTL).await;
    let acct = "beat";
    let ids = enqueue(s, vec![job(acct), job(acct)]).await;
    let fence = fence_of(&f, acct);
    let j = s.claim(acct, &fence).await.unwrap().unwrap();
    assert_eq!(j.id, ids[0]);
    assert_eq!(s.checkpoint(j.id).await.unwrap(), None, "no checkpoint yet");

    let progress = Beat { progress: Some(Progress::percent(10.0).with_message("ten")), checkpoint: None };
    let ack = s.beat(j.id, j.attempt, &fence, &progress).await.unwrap();
    assert_eq!(ack, BeatAck::Recorded { cancel_requested: false });
    assert_eq!(s.checkpoint(j.id).await.unwrap(), None, "a bare beat writes no checkpoint");

    let state = serde_json::json!({ "cursor": 42 });
    let with = Beat { progress: None, checkpoint: Some((state.clone(), state.to_string().len())) };
    s.beat(j.id, j.attempt, &fence, &with).await.unwrap();
    let c = s.checkpoint(j.id).await.unwrap().expect("checkpoint committed");
    assert_eq!((c.state.clone(), c.attempt), (state.clone(), 1));
    s.beat(j.id, j.attempt, &fence, &Beat::default()).await.unwrap();
    assert_eq!(s.checkpoint(j.id).await.unwrap().unwrap().state, state, "kept by a beat without one");

    assert_eq!(
        s.beat(j.id, j.attempt + 1, &fence, &Beat::default()).await.unwrap(),
        BeatAck::NotRunning,
        "not this attempt"
    );
    assert_eq!(s.beat(ids[1], 1, &fence, &Beat::default()).await.unwrap(), BeatAck::NotRunning, "not running");
    let other = Fence { owner: B.into(), ..fence.clone() };
    assert!(is_fenced(s.beat(j.id, j.attempt, &other, &Beat::default()).await), "another owner");
    let stale = Fence { epoch: fence.epoch - 1, ..fence.clone() };
    assert!(is_fenced(s.beat(j.id, j.attempt, &stale, &Beat::default()).await), "an older epoch");

    assert_eq!(s.cancel_job(j.id).await.unwrap(), CancelResult::CancelRequested);
    let ack = s.beat(j.id, j.attempt, &fence, &Beat::default()).await.unwrap();
    assert_eq!(ack, BeatAck::Recorded { cancel_requested: true }, "a beat reports the cancel request");

    // A takeover fences the old attempt; the next owner's attempt reads the checkpoint.
    let newer = s.acquire(A, &[fence.partition], TTL).await.unwrap()[0].epoch;
    let checkpointed = Beat { progress: None, checkpoint: Some((serde_json::json!(7), 1)) };
    assert!(is_fenced(s.beat(j.id, j.attempt, &fence, &checkpointed).await), "the old epoch after a takeover");
    assert_eq!(s.checkpoint(j.id).await.unwrap().unwrap().state, state, "a refused beat changes nothing");
    let renewed = Fence { epoch: newer, ..fence.clone() };
    assert_eq!(s.rescue(A, &[GrantedLease { partition: fence.partition, epoch: newer }]).await.unwrap(), 1);
    // The rescue turned the pending cancel into a cancelled job; the checkpoint stays.
    assert_eq!(get(s, j.id).await.state, "cancelled");
    assert_eq!(s.checkpoint(j.id).await.unwrap().unwrap().state, state);
    assert_eq!(s.beat(j.id, j.attempt, &renewed, &Beat::default()).await.unwrap(), BeatAck::NotRunning);
}

// ---------------------------------------------------------------------------
// Idempotency keys (enqueue_insert.sql's `keyed`, migration 0007).

/// An idempotency key dedups while it is kept, whatever became of its job (here:
/// completed); within a batch too, in input order; an expired key is taken over by
/// the next enqueue; a key with a unique key too is refused.
pub async fn idempotency_keys_dedup_while_kept_even_after_the_job_completed<S: Store + ProducerStore>(s: &S) {
    let f = own_all(s, A, TTL).await;
    let acct = "idem";
    let enq = |jobs: Vec<NewJob>| async move { s.enqueue(&jobs, &|_: &str| KindDefault::default()).await };
    let first = enq(vec![job(acct).idempotency_key("order-1")]).await.unwrap()[0];
    assert!(!first.duplicate);
    let again = enq(vec![job(acct).idempotency_key("order-1")]).await.unwrap()[0];
    assert_eq!((again.id, again.duplicate), (first.id, true), "while unfinished");

    let fence = fence_of(&f, acct);
    let j = s.claim(acct, &fence).await.unwrap().unwrap();
    assert_eq!(j.id, first.id);
    s.finish(None, &j, &fence, &Finish::Completed, false).await.unwrap();
    let after = enq(vec![job(acct).idempotency_key("order-1")]).await.unwrap()[0];
    assert_eq!((after.id, after.duplicate), (first.id, true), "after the job completed");
    assert_eq!(get(s, first.id).await.state, "completed");

    // A batch: a new key twice, no key, an old key; another account's same key is its own.
    let batch = enq(vec![
        job(acct).idempotency_key("order-2"),
        job(acct).idempotency_key("order-2"),
        job(acct),
        job(acct).idempotency_key("order-1"),
        job("idem-other").idempotency_key("order-1"),
    ])
    .await
    .unwrap();
    assert!(!batch[0].duplicate && !batch[2].duplicate && !batch[4].duplicate);
    assert_eq!((batch[1].id, batch[1].duplicate), (batch[0].id, true), "the first of the batch wins");
    assert_eq!((batch[3].id, batch[3].duplicate), (first.id, true));
    assert!(batch[0].id < batch[2].id, "ids follow the input order");
    assert_ne!(batch[4].id, first.id, "keys are per account");

    // Expired: taken over by a new job.
    let short =
        enq(vec![job(acct).idempotency_key("short").idempotency_keep(Duration::from_millis(1))]).await.unwrap()[0];
    tokio::time::sleep(Duration::from_millis(20)).await;
    let replaced = enq(vec![job(acct).idempotency_key("short")]).await.unwrap()[0];
    assert!(!replaced.duplicate && replaced.id != short.id, "an expired key is taken over");
    let kept = enq(vec![job(acct).idempotency_key("short")]).await.unwrap()[0];
    assert_eq!((kept.id, kept.duplicate), (replaced.id, true));

    let both = enq(vec![job(acct).idempotency_key("k").unique_key("u")]).await;
    assert!(matches!(both, Err(Error::InvalidInput(_))), "{both:?}");
    let zero = enq(vec![job(acct).idempotency_key("k").idempotency_keep(Duration::ZERO)]).await;
    assert!(matches!(zero, Err(Error::InvalidInput(_))), "{zero:?}");
}
