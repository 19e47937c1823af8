//! Account actors: one ractor actor per account with due work, on the node that
//! holds the account's partition lease, running that account's jobs one at a time.
//!
//! ```text
//!   Node
//!    ├─ AccountActors (typed map AccountId → ActorRef<AccountMsg>, bounded by max_actors)
//!    │    └─ AccountActor (one per active account, unsupervised; a monitor task
//!    │         │           removes it from the map when it ends, however it ends)
//!    │         └─ attempt task (at most one: handler + fenced finish-and-claim-next)
//! ```
//!
//! Life of an actor: spawned by the enforcer or a wake-up → `Wake` → claim the
//! account's next runnable job (or adopt one already claimed at this epoch) → run it
//! in an attempt task → the task finishes the job and claims the next one in the same
//! statement → `Done` → next attempt, or idle. Idle for `idle_timeout` → passivate
//! (stop); woken but nothing to claim on its first look → stop at once. Its partition
//! fenced → stop at once; the attempt task stops without polling the handler again.
//! `Drain` → no new attempts; the running handler's `ctx.cancellation()` fires and it
//! gets `drain_timeout`, then it is dropped; either way the attempt is recorded as
//! `interrupted` (not counted) so the next owner runs the job again at once.
//!
//! Invariants:
//! - An actor holds at most one claimed job at a time, and pulls jobs one by one from
//!   the database, so nothing holds a backlog in memory.
//! - A handler is polled only inside its lease's validity window (checked on every
//!   poll, not only when the lease keeper gets to run).
//! - An attempt task always reports `Done`, even if it panics outside the handler
//!   (it is supervised), so an actor never stays busy and a drain always ends.
//! - "Running at this node's epoch with no attempt here" does not last: an ambiguous
//!   claim or finish is resolved by reading the row (`Finished::NotRunning`), a claim
//!   adopts such a job, and the enforcer's scan wakes the accounts that have one.

use crate::attempt::{self, AttemptFacts, Ended};
use crate::error::Error;
use crate::handler::{Backoff, CallError, ErasedHandler, FencingToken, JobContext, JobOptions, Liveness, Registry};
use crate::hooks::{self, AttemptInfo, AttemptOutcome, Hooks};
use crate::job::{JobRow, NewJob};
use crate::lease::{ActiveLease, LeaseTable};
use crate::store::{Finish, Finished, JobTx, KindDefault, ProducerStore, Store};
use futures::FutureExt;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use warden_cluster::PartitionCount;

/// Execution settings shared by all account actors of a node.
#[derive(Debug, Clone)]
pub struct ExecConfig {
    /// Stop an account's actor after it has had nothing to do for this long.
    pub idle_timeout: Duration,
    /// After a cancel request, how long a running handler has to stop by itself.
    pub cancel_grace: Duration,
    /// While an attempt runs, how often to check the database for a cancel request
    /// (the fallback when the NOTIFY is lost).
    pub cancel_poll_interval: Duration,
    /// On drain, how long a running attempt may take to finish before it is aborted.
    pub drain_timeout: Duration,
    /// Upper bound on concurrently live account actors on this node (idle ones too).
    pub max_actors: usize,
    /// Upper bound on handlers running at once on this node (`None`: only
    /// `max_actors` bounds them). A claimed job waits for a slot before its handler
    /// starts (its timeout starts with the handler); one whose partition begins
    /// draining meanwhile is given back unrun. Waiting shows in
    /// `warden_attempts_waiting_for_slot` and `warden_attempt_slot_wait_seconds`.
    pub max_concurrent_attempts: Option<usize>,
    /// Least time between two database writes of one attempt's heartbeats
    /// (`JobContext::heartbeat`): calls in between only count locally (liveness, the
    /// latest progress). Checkpoints are always written.
    pub heartbeat_write_interval: Duration,
}

impl Default for ExecConfig {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(30),
            cancel_grace: Duration::from_secs(5),
            cancel_poll_interval: Duration::from_secs(2),
            drain_timeout: Duration::from_secs(10),
            max_actors: 10_000,
            max_concurrent_attempts: None,
            heartbeat_write_interval: Duration::from_secs(1),
        }
    }
}

/// What every actor of a node shares.
pub(crate) struct Shared {
    pub store: Arc<dyn Store>,
    /// Enqueues a handler's follow-up jobs inside its transaction (`None` in a
    /// standalone enforcer, which runs no handlers).
    pub producer: Option<Arc<dyn ProducerStore<Conn = sqlx::PgConnection>>>,
    pub registry: Arc<Registry>,
    pub leases: Arc<LeaseTable>,
    pub config: ExecConfig,
    pub partitions: PartitionCount,
    pub node_id: Arc<str>,
    /// Pokes the enforcer (a draining partition just lost its last actor).
    pub poke_enforcer: Arc<tokio::sync::Notify>,
    /// The lease TTL (bounds handler transactions on the server; see `JobContext::tx`).
    pub lease_ttl: Duration,
    /// Told when attempts start and finish.
    pub hooks: Hooks,
    /// Execution slots, if the node caps concurrent attempts.
    pub slots: Option<Arc<tokio::sync::Semaphore>>,
    /// Busy-slot accounting (see [`crate::saturation`]).
    pub meter: Arc<crate::saturation::SlotMeter>,
    /// Attempts that heartbeat, for the metrics (see [`crate::progress`]).
    pub heartbeats: Arc<crate::progress::Heartbeats>,
    /// Jobs this node's scheduler enqueued, not started yet (the fire lag).
    pub fires: Arc<crate::scheduler::PendingFires>,
}

impl Shared {
    /// Execution slots for `config` (see `ExecConfig::max_concurrent_attempts`).
    pub fn slots_for(config: &ExecConfig) -> Option<Arc<tokio::sync::Semaphore>> {
        config.max_concurrent_attempts.map(|n| Arc::new(tokio::sync::Semaphore::new(n)))
    }

    /// The busy-slot meter for `config`: its slots are `max_concurrent_attempts`,
    /// else `max_actors` (the only other bound on concurrent handlers).
    pub fn meter_for(config: &ExecConfig) -> Arc<crate::saturation::SlotMeter> {
        Arc::new(crate::saturation::SlotMeter::new(config.max_concurrent_attempts.unwrap_or(config.max_actors)))
    }
}

/// Messages to an account actor.
pub enum AccountMsg {
    /// There may be due work: claim it if idle.
    Wake,
    /// Someone may have asked to cancel this job: if it is the one running, re-read
    /// its `cancel_requested` (a NOTIFY is a hint; the row decides).
    Cancel(i64),
    /// Finish the running attempt (within drain_timeout), claim nothing more, stop.
    Drain,
    /// The partition was fenced: stop now.
    Fenced,
    /// The attempt task ended.
    Done(Box<AttemptReport>),
    /// Passivate if still idle since idle timer number `idle_seq` was armed.
    IdleCheck(u64),
    /// Drain timeout passed: abort the running handler and record the interruption.
    AbortRunning,
}

/// How an attempt task ended. (Sent boxed, so the variants' size difference is moot.)
#[allow(clippy::large_enum_variant)]
pub enum AttemptReport {
    /// The outcome was recorded; `next` is the account's next job, already claimed
    /// under `lease` (needed to undo the claim if the account is draining). With
    /// `reclaim`, the finish found its job already finished (an earlier try
    /// committed; its reply was lost): claim again, which adopts whatever that try
    /// claimed.
    Finished { next: Option<JobRow>, wake_in: Option<Duration>, lease: ActiveLease, reclaim: bool },
    /// The attempt was dropped without recording (fenced, lease window closed); stop
    /// the actor.
    Stopped,
    /// The partition began draining while the job waited for an execution slot: its
    /// handler never started. Undo the claim under `lease`, and stop.
    NotStarted { job: JobRow, lease: ActiveLease },
    /// No outcome could be recorded (every statement failed for good): stop the
    /// actor; the job stays claimed here and is adopted later, after a growing delay.
    Unrecordable,
}

/// The controls of one running attempt, held by its actor.
struct Running {
    job_id: i64,
    /// Re-read `cancel_requested` now.
    check_cancel: Arc<tokio::sync::Notify>,
    /// The partition is being handed off.
    interrupt: CancellationToken,
    /// The handler's `ctx.cancellation()`: fires on a confirmed cancel, a drain or a
    /// lost lease.
    stop: CancellationToken,
    /// Drain timeout passed: drop the handler and record the interruption.
    abort: CancellationToken,
}

pub struct AccountActor;

pub struct AccountState {
    account: Arc<str>,
    partition: u32,
    shared: Arc<Shared>,
    actors: Arc<AccountActors>,
    wake_flag: Arc<AtomicBool>,
    claim_next: Arc<AtomicBool>,
    running: Option<Running>,
    /// A wake-up arrived while an attempt ran. The attempt's finish statement claims
    /// the next job, but a job committed after that statement looked (and before the
    /// actor heard the attempt was done) would otherwise wait for the due-work poll.
    woken_while_running: bool,
    draining: bool,
    /// Numbers the idle timers: an `IdleCheck` for an older one is stale.
    idle_seq: u64,
    /// Has this actor claimed anything yet? One that was woken and found nothing on
    /// its first claim stops at once instead of idling: wake-ups are hints (any role
    /// may NOTIFY), and a flood of made-up accounts must not fill the actor map.
    claimed_any: bool,
    /// Claims that failed in a row (backoff).
    claim_failures: u32,
    /// Held until the first claim of an actor spawned for a NOTIFY hint (see
    /// [`AccountActors::wake_hinted`]); dropped with the state in any case.
    hint_permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

pub struct AccountArgs {
    hint_permit: Option<tokio::sync::OwnedSemaphorePermit>,
    account: Arc<str>,
    partition: u32,
    shared: Arc<Shared>,
    actors: Arc<AccountActors>,
    wake_flag: Arc<AtomicBool>,
}

impl Actor for AccountActor {
    type Msg = AccountMsg;
    type State = AccountState;
    type Arguments = AccountArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<AccountMsg>,
        args: AccountArgs,
    ) -> Result<AccountState, ActorProcessingErr> {
        Ok(AccountState {
            account: args.account,
            partition: args.partition,
            shared: args.shared,
            actors: args.actors,
            wake_flag: args.wake_flag,
            claim_next: Arc::new(AtomicBool::new(true)),
            running: None,
            woken_while_running: false,
            draining: false,
            idle_seq: 0,
            claimed_any: false,
            claim_failures: 0,
            hint_permit: args.hint_permit,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<AccountMsg>,
        msg: AccountMsg,
        st: &mut AccountState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            AccountMsg::Wake => {
                st.wake_flag.store(false, Ordering::Release);
                if st.draining {
                    return Ok(());
                }
                if st.running.is_some() {
                    st.woken_while_running = true;
                    return Ok(());
                }
                claim(&myself, st).await;
            }
            AccountMsg::Done(report) => {
                st.running = None;
                let rewake = std::mem::take(&mut st.woken_while_running);
                match *report {
                    AttemptReport::Stopped => myself.stop(Some("attempt stopped".into())),
                    AttemptReport::Unrecordable => myself.stop(Some("outcome unrecordable".into())),
                    AttemptReport::NotStarted { job, lease } => {
                        unclaim(st, &job, &lease).await;
                        myself.stop(Some("drained".into()));
                    }
                    AttemptReport::Finished { next, wake_in, lease, reclaim } => match next {
                        Some(job) if st.draining => {
                            // The partition is draining, so `leases.current()` no longer
                            // answers; undo the claim under the lease it was made with.
                            unclaim(st, &job, &lease).await;
                            myself.stop(Some("drained".into()));
                        }
                        Some(job) => match st.shared.leases.current(st.partition) {
                            Some(lease) => start_attempt(&myself, st, job, lease),
                            None => {
                                // The partition began draining (or its lease lapsed) after
                                // the finish claimed this job but before this actor heard
                                // of it. The job never started: undo the claim, or the next
                                // owner's rescue would count an attempt that never ran (and
                                // discard a job with one attempt). If the lease has lapsed
                                // the fence refuses, and the rescue is the right outcome.
                                unclaim(st, &job, &lease).await;
                                myself.stop(Some("partition not held".into()))
                            }
                        },
                        None if st.draining => {
                            if reclaim {
                                // An earlier try of the finish committed and may have
                                // claimed the next job: give it back unrun (claiming adopts
                                // it), or the next owner's rescue would count an attempt
                                // that never ran.
                                if let Ok(Some(job)) = st.shared.store.claim(&st.account, &lease.fence).await {
                                    unclaim(st, &job, &lease).await;
                                }
                            }
                            myself.stop(Some("drained".into()))
                        }
                        None => {
                            if rewake || reclaim {
                                // Look again: one claim, only when a wake-up raced the
                                // finish, or the finish's own earlier try committed.
                                let _ = myself.send_message(AccountMsg::Wake);
                            } else if let Some(d) = wake_in {
                                drop(myself.send_after(d, || AccountMsg::Wake));
                            }
                            arm_idle(&myself, st);
                        }
                    },
                }
            }
            AccountMsg::Cancel(job_id) => {
                if let Some(r) = &st.running {
                    if r.job_id == job_id {
                        r.check_cancel.notify_one();
                    }
                }
            }
            AccountMsg::Drain => {
                st.draining = true;
                st.claim_next.store(false, Ordering::Release);
                match &st.running {
                    None => myself.stop(Some("drained".into())),
                    Some(r) => {
                        // The handler hears it at once (`ctx.cancellation()`), and has
                        // drain_timeout to finish or stop; see `Finish::Interrupted`.
                        r.interrupt.cancel();
                        r.stop.cancel();
                        drop(myself.send_after(st.shared.config.drain_timeout, || AccountMsg::AbortRunning));
                    }
                }
            }
            AccountMsg::AbortRunning => {
                if let Some(r) = &st.running {
                    tracing::warn!(account = %st.account, job_id = r.job_id, "drain timeout: aborting the running handler; the job runs again on the next owner");
                    r.abort.cancel();
                }
            }
            AccountMsg::Fenced => {
                // The lease's token is cancelled and its validity closed: the attempt
                // task stops on its own, without polling the handler again.
                myself.stop(Some("fenced".into()));
            }
            AccountMsg::IdleCheck(seq) => {
                if seq == st.idle_seq
                    && st.running.is_none()
                    && st.actors.remove_if_idle(&st.account, myself.get_id(), &st.wake_flag)
                {
                    myself.stop(Some("idle".into()));
                }
            }
        }
        Ok(())
    }
}

/// Claim (or adopt) the account's next job and start it; idle if there is none.
async fn claim(myself: &ActorRef<AccountMsg>, st: &mut AccountState) {
    let Some(lease) = st.shared.leases.current(st.partition) else {
        myself.stop(Some("partition not held".into()));
        return;
    };
    let claimed = st.shared.store.claim(&st.account, &lease.fence).await;
    // A wake-up hint's first claim is done: let the listener spawn the next one.
    st.hint_permit = None;
    match claimed {
        Ok(Some(job)) => {
            st.claimed_any = true;
            st.claim_failures = 0;
            start_attempt(myself, st, job, lease)
        }
        Ok(None) if !st.claimed_any => {
            // Woken for nothing: stop now (see `claimed_any`) unless another wake-up
            // is already pending.
            if st.actors.remove_if_idle(&st.account, myself.get_id(), &st.wake_flag) {
                myself.stop(Some("nothing to do".into()));
            }
        }
        Ok(None) => arm_idle(myself, st),
        Err(Error::Fenced { .. }) => myself.stop(Some("fenced".into())),
        Err(e) => {
            // Ambiguous: the claim may have committed. The retry adopts what it claimed.
            // One that fails for good (a row no statement can update) is retried with a
            // growing delay, so it costs little while an operator looks at the log.
            st.claim_failures += 1;
            let delay = if e.is_permanent() {
                tracing::error!(account = %st.account, error = %e, "claim fails permanently; backing off");
                CLAIM_BACKOFF.without_jitter(st.claim_failures.min(64) as i32)
            } else {
                tracing::warn!(account = %st.account, error = %e, "claim failed; retrying shortly");
                CLAIM_RETRY
            };
            drop(myself.send_after(delay, || AccountMsg::Wake));
        }
    }
}

/// Undo a claim that will not run, retrying transient failures while the lease it was
/// made under is still valid. If it cannot be undone, the job stays claimed at this
/// epoch: the account's next claim adopts it (or the next owner's rescue resets it).
async fn unclaim(st: &AccountState, job: &JobRow, lease: &ActiveLease) {
    for tries in 1..=UNCLAIM_TRIES {
        match st.shared.store.unclaim(job, &lease.fence).await {
            Ok(()) | Err(Error::Fenced { .. }) => return,
            Err(e) if e.is_permanent() || !lease.validity.is_valid() => {
                tracing::warn!(job_id = job.id, error = %e, "unclaim failed; the job is adopted or rescued later");
                return;
            }
            Err(e) => {
                tracing::warn!(job_id = job.id, error = %e, "unclaim failed; retrying");
                tokio::time::sleep(UNCLAIM_RETRY.without_jitter(tries)).await;
            }
        }
    }
}

/// A claim that failed (ambiguously): look again after this long.
const CLAIM_RETRY: Duration = Duration::from_millis(500);

/// A claim that fails for good (a row no statement can update), again and again:
/// 1 s doubling to 32 s, so it costs little while an operator looks at the log.
const CLAIM_BACKOFF: Backoff = Backoff::doubling(Duration::from_secs(1), Duration::from_secs(32));

/// Tries to undo a claim, and the waits between them (50 ms doubling).
const UNCLAIM_TRIES: i32 = 5;
const UNCLAIM_RETRY: Backoff = Backoff::doubling(Duration::from_millis(50), Duration::from_millis(800));

fn arm_idle(myself: &ActorRef<AccountMsg>, st: &mut AccountState) {
    st.idle_seq += 1;
    let seq = st.idle_seq;
    drop(myself.send_after(st.shared.config.idle_timeout, move || AccountMsg::IdleCheck(seq)));
}

fn start_attempt(myself: &ActorRef<AccountMsg>, st: &mut AccountState, job: JobRow, lease: ActiveLease) {
    st.idle_seq += 1;
    let ctl = AttemptControl {
        check_cancel: Arc::new(tokio::sync::Notify::new()),
        interrupt: CancellationToken::new(),
        stop: CancellationToken::new(),
        abort: CancellationToken::new(),
        claim_next: st.claim_next.clone(),
    };
    st.running = Some(Running {
        job_id: job.id,
        check_cancel: ctl.check_cancel.clone(),
        interrupt: ctl.interrupt.clone(),
        stop: ctl.stop.clone(),
        abort: ctl.abort.clone(),
    });
    st.actors.in_flight.lock().unwrap().insert(job.id);
    let (shared, actors, me, job_id) = (st.shared.clone(), st.actors.clone(), myself.clone(), job.id);
    let abort = ctl.abort.clone();
    tokio::spawn(async move {
        // Supervised: a panic anywhere in the attempt (not only in the handler, which
        // is caught on its own) still ends it, records it, and tells the actor, so
        // the actor never stays busy and a drain always completes.
        let report =
            match AssertUnwindSafe(run_attempt(shared.clone(), job.clone(), lease.clone(), ctl)).catch_unwind().await {
                Ok(report) => report,
                Err(panic) => {
                    let msg = attempt::panic_message(&panic);
                    tracing::error!(job_id, panic = %msg, "attempt task panicked; recording the attempt as failed");
                    metrics::counter!("warden_attempt_panics_total").increment(1);
                    // Recording it may panic too (the same fault): then the job stays
                    // claimed at this epoch, and the orphan scan has its account adopt it.
                    AssertUnwindSafe(record_crash(&shared, &job, &lease, &abort, &msg))
                        .catch_unwind()
                        .await
                        .unwrap_or(AttemptReport::Stopped)
                }
            };
        actors.in_flight.lock().unwrap().remove(&job_id);
        if matches!(report, AttemptReport::Unrecordable) {
            actors.hold_back(job_id);
        }
        // The actor may already be gone (fenced); then nobody needs the report.
        let _ = me.send_message(AccountMsg::Done(Box::new(report)));
    });
}

/// After a panic outside the handler: record the attempt as failed (retried with the
/// kind's backoff), or find it already recorded.
async fn record_crash(
    shared: &Shared,
    job: &JobRow,
    lease: &ActiveLease,
    abort: &CancellationToken,
    msg: &str,
) -> AttemptReport {
    let options = shared.registry.options(&job.kind).cloned().unwrap_or_default();
    let facts =
        AttemptFacts { drain_requested: false, cancel_confirmed: false, ..attempt_facts(shared, job, &options) };
    let mut finish = attempt::crashed(&facts, msg);
    // Bounded, and never past a drain's abort: an actor must not stay busy here.
    let mut permanent = false;
    for tries in 1..=RECORD_TRIES as i32 {
        if !lease.validity.is_valid() || lease.token.is_cancelled() || abort.is_cancelled() {
            break;
        }
        match shared.store.finish(None, job, &lease.fence, &finish, false).await {
            Ok(_) => return AttemptReport::Finished { next: None, wake_in: None, lease: lease.clone(), reclaim: true },
            Err(Error::Fenced { .. }) => break,
            Err(e) if e.is_permanent() => {
                tracing::error!(job_id = job.id, error = %e, "the crashed attempt cannot be recorded; discarding the job");
                finish = attempt::unrecordable(&facts, false, &e.to_string());
                permanent = true;
            }
            Err(e) => tracing::warn!(job_id = job.id, error = %e, "could not record the crashed attempt; retrying"),
        }
        tokio::time::sleep(FINISH_RETRY.without_jitter(tries)).await;
    }
    // Left claimed at this epoch: adopted (and counted) by the account's next claim.
    if permanent {
        AttemptReport::Unrecordable
    } else {
        AttemptReport::Stopped
    }
}

/// Tries to record an attempt whose outcome keeps failing for good.
const RECORD_TRIES: u32 = 5;

/// Retries of a finish statement that failed (ambiguously, or for good): 50 ms
/// doubling to 1 s, while the lease holds.
const FINISH_RETRY: Backoff = Backoff::doubling(Duration::from_millis(50), Duration::from_secs(1));

/// What an attempt task is given besides the job and its lease.
struct AttemptControl {
    check_cancel: Arc<tokio::sync::Notify>,
    interrupt: CancellationToken,
    stop: CancellationToken,
    abort: CancellationToken,
    claim_next: Arc<AtomicBool>,
}

/// The facts of an attempt known before it runs (what it learns while running —
/// a drain, a confirmed cancel — is filled in after).
fn attempt_facts(shared: &Shared, job: &JobRow, options: &JobOptions) -> AttemptFacts {
    AttemptFacts {
        attempt: job.attempt,
        max_attempts: job.max_attempts,
        timeout_ms: job.timeout_ms,
        cancel_grace: shared.config.cancel_grace,
        drain_timeout: shared.config.drain_timeout,
        drain_requested: false,
        cancel_confirmed: false,
        backoff: options.backoff,
        jitter_draw: fastrand::f64(),
    }
}

fn attempt_info(job: &JobRow, lease: &ActiveLease) -> AttemptInfo {
    AttemptInfo {
        job_id: job.id,
        account: job.account.clone(),
        kind: job.kind.clone(),
        attempt: job.attempt,
        max_attempts: job.max_attempts,
        partition: lease.fence.partition,
        epoch: lease.fence.epoch,
    }
}

/// The lease was lost while the attempt was in hand: drop it without recording.
fn lost(ctl: &AttemptControl, kind: &str, why: &'static str) -> AttemptReport {
    ctl.stop.cancel();
    metrics::counter!("warden_attempts_total", "kind" => kind.to_string(), "outcome" => "fenced").increment(1);
    tracing::warn!(why, "lease lost: attempt dropped");
    AttemptReport::Stopped
}

/// Run one attempt: wait for an execution slot (if the node caps them), run the
/// handler (with timeout, cancellation and fencing), decide the outcome
/// ([`attempt::decide`]), then record it with the fenced finish-and-claim-next
/// statement. Never returns before the outcome is recorded, unless the lease is lost.
///
/// The handler is polled only inside its lease's validity window: every poll first
/// reads the window (`LeaseValidity`), so a process resumed after a pause longer than
/// the window never runs handler code again, even before the lease keeper gets to run
/// and fence. A handler that returned inside the window still has its finish sent;
/// the database fence decides whether it counts.
async fn run_attempt(shared: Arc<Shared>, job: JobRow, lease: ActiveLease, ctl: AttemptControl) -> AttemptReport {
    let span = tracing::info_span!(
        "attempt",
        job_id = job.id,
        account = %job.account,
        kind = %job.kind,
        attempt = job.attempt,
        partition = lease.fence.partition,
        epoch = lease.fence.epoch,
    );
    async move {
        let kind = job.kind.clone();
        if let Some(started) = job.attempted_at {
            let queued = (started - job.due_at).to_std().unwrap_or_default();
            metrics::histogram!("warden_queue_seconds", "kind" => kind.clone()).record(queued.as_secs_f64());
        }
        let handler = shared.registry.get(&job.kind).cloned();
        let options = handler.as_ref().map(|h| h.options().clone()).unwrap_or_default();
        let mut facts = attempt_facts(&shared, &job, &options);
        if !lease.validity.is_valid() {
            return lost(&ctl, &kind, "lease window closed before the handler started");
        }
        let runnable = match handler {
            Some(h) if !facts.used_up_before_start() => Ok(h),
            // Adopted past its last attempt (each adoption counts one): give up on it.
            Some(_) => Err(Ended::Exhausted),
            None => Err(Ended::BadArgs(format!(
                "no handler for kind {:?} is registered on node {}",
                job.kind, shared.node_id
            ))),
        };

        // 1. The handler, in an execution slot.
        let mut started = tokio::time::Instant::now();
        let mut info = None;
        let run = match runnable {
            Err(ended) => HandlerRun { ended, cancel_confirmed: false, tx: None, staged: Vec::new() },
            Ok(h) => {
                let _slot = match wait_for_slot(&shared, &lease, &ctl).await {
                    Slot::Granted(permit) => permit,
                    Slot::Drained => return AttemptReport::NotStarted { job, lease },
                    Slot::Lost => return lost(&ctl, &kind, "lease fenced while waiting for an execution slot"),
                };
                if !lease.validity.is_valid() {
                    return lost(&ctl, &kind, "lease window closed before the handler started");
                }
                started = tokio::time::Instant::now();
                // A fire's job: its fire lag (no query; see `PendingFires`).
                shared.fires.started(job.id, job.attempted_at);
                // Busy until the handler returns (the saturation signal).
                let _busy = shared.meter.start();
                if !shared.hooks.is_empty() {
                    let i = attempt_info(&job, &lease);
                    shared.hooks.started(&i);
                    info = Some(i);
                }
                match run_handler(&shared, &job, &lease, &ctl, &*h).await {
                    Ok(run) => run,
                    Err(why) => {
                        let report = lost(&ctl, &kind, why);
                        if let Some(i) = &info {
                            shared.hooks.finished(i, &AttemptOutcome::NotRecorded, started.elapsed());
                        }
                        return report;
                    }
                }
            }
        };
        let took = started.elapsed();
        metrics::histogram!("warden_processing_seconds", "kind" => kind.clone()).record(took.as_secs_f64());

        // 2. The decision.
        facts.drain_requested = ctl.interrupt.is_cancelled();
        facts.cancel_confirmed = run.cancel_confirmed;
        let returned = run.ended.returned();
        let mut finish = attempt::decide(run.ended, &facts);
        let wake_in = attempt::wake_in(&finish);

        // 3. The handler's transaction: staged follow-ups go in with a completion;
        // anything else rolls it back.
        let tx = prepare_commit(&shared, &facts, &mut finish, run.tx, &run.staged, returned).await;

        // 4. Record it (and claim the account's next job).
        let recorded = record(&shared, &job, lease, &ctl, &facts, tx, finish, wake_in).await;
        if let Some(i) = &info {
            shared.hooks.finished(i, &hooks::outcome_of(recorded.finish.as_ref()), took);
        }
        recorded.report
    }
    .instrument(span)
    .await
}

/// Whether an attempt may start its handler.
enum Slot {
    /// Yes (holding this permit while the handler runs, if the node caps attempts).
    Granted(Option<tokio::sync::OwnedSemaphorePermit>),
    /// Its partition began draining while it waited: give the job back unrun.
    Drained,
    /// Its lease was fenced while it waited.
    Lost,
}

/// Take one of the node's execution slots (`ExecConfig::max_concurrent_attempts`),
/// waiting while all are taken — but never past a drain or a lost lease.
async fn wait_for_slot(shared: &Shared, lease: &ActiveLease, ctl: &AttemptControl) -> Slot {
    let Some(slots) = &shared.slots else { return Slot::Granted(None) };
    if let Ok(permit) = slots.clone().try_acquire_owned() {
        return Slot::Granted(Some(permit));
    }
    let waiting_since = tokio::time::Instant::now();
    let _waiting = shared.meter.wait();
    metrics::gauge!("warden_attempts_waiting_for_slot").increment(1.0);
    let slot = tokio::select! {
        biased;
        _ = lease.token.cancelled() => Slot::Lost,
        _ = ctl.interrupt.cancelled() => Slot::Drained,
        permit = slots.clone().acquire_owned() => match permit {
            Ok(p) => Slot::Granted(Some(p)),
            // The semaphore is never closed; if it were, run unbounded rather than stall.
            Err(_) => Slot::Granted(None),
        },
    };
    metrics::gauge!("warden_attempts_waiting_for_slot").decrement(1.0);
    metrics::histogram!("warden_attempt_slot_wait_seconds").record(waiting_since.elapsed().as_secs_f64());
    slot
}

/// What a handler's run left behind.
struct HandlerRun {
    ended: Ended,
    /// A cancel request was confirmed while it ran.
    cancel_confirmed: bool,
    /// The handler's transaction, if it opened one.
    tx: Option<JobTx>,
    /// Its staged follow-up jobs.
    staged: Vec<NewJob>,
}

/// Run the handler with its timeout, cancellation (polled from the database) and
/// the lease guard. `Err` names why the lease was lost while it ran: the attempt is
/// dropped without recording.
async fn run_handler(
    shared: &Arc<Shared>,
    job: &JobRow,
    lease: &ActiveLease,
    ctl: &AttemptControl,
    handler: &dyn ErasedHandler,
) -> std::result::Result<HandlerRun, &'static str> {
    let cancel = CancellationToken::new(); // a confirmed cancel request
    let rejected = CancellationToken::new(); // a heartbeat or checkpoint the fence rejected
    let beaten = Arc::new(tokio::sync::Notify::new());
    // When a heartbeat write last read `cancel_requested` (the cancel poll skips its
    // own read while that is fresh).
    let beat_recorded = Arc::new(crate::progress::Recorded::default());
    let writing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let timeout = Duration::from_millis(job.timeout_ms.max(1) as u64);
    // However the attempt ends, it no longer heartbeats here.
    let _registered = Unregister { register: &shared.heartbeats, job_id: job.id };
    let mut ctx = JobContext {
        job: job.clone(),
        fence: FencingToken { partition: lease.fence.partition, epoch: lease.fence.epoch },
        cancel: ctl.stop.clone(),
        validity: lease.validity.clone(),
        store: shared.store.clone(),
        tx: None,
        staged: Vec::new(),
        tx_idle_timeout: timeout + lease_ttl(shared),
        live: Liveness {
            fence: lease.fence.clone(),
            lease_lost: lease.token.clone(),
            interrupt: ctl.interrupt.clone(),
            cancel_confirmed: cancel.clone(),
            rejected: rejected.clone(),
            beaten: beaten.clone(),
            writing: writing.clone(),
            register: shared.heartbeats.clone(),
            write_interval: shared.config.heartbeat_write_interval,
            last_write: None,
            pending: None,
            checkpoint: None,
            recorded: beat_recorded.clone(),
        },
    };
    let ended = {
        let call = AssertUnwindSafe(handler.call(&mut ctx, job.args.clone())).catch_unwind();
        let mut call = std::pin::pin!(call);
        let validity = lease.validity.clone();
        // Every poll of the handler first checks the lease window.
        let guarded = std::future::poll_fn(|cx| {
            if !validity.is_valid() {
                return std::task::Poll::Ready(None);
            }
            call.as_mut().poll(cx).map(Some)
        });
        let grace = shared.config.cancel_grace;
        let cancel_hard = async {
            cancel.cancelled().await;
            tokio::time::sleep(grace).await;
        };
        // A kind with a heartbeat timeout: the handler must beat (or checkpoint)
        // within it, counted from its start.
        let heartbeat_timeout = handler.options().heartbeat_timeout;
        let hung = async {
            let Some(limit) = heartbeat_timeout else { return std::future::pending().await };
            loop {
                tokio::select! {
                    // Not while the handler waits on Warden's own heartbeat or
                    // checkpoint statement: that is not the handler hanging (the
                    // write's end counts as a beat).
                    _ = tokio::time::sleep(limit) => if !writing.load(Ordering::Acquire) { return limit },
                    _ = beaten.notified() => {}
                }
            }
        };
        let poll_cancel = poll_cancel(shared, job.id, &cancel, &ctl.stop, &ctl.check_cancel, &beat_recorded);
        tokio::select! {
            biased;
            _ = lease.token.cancelled() => return Err("lease fenced"),
            _ = rejected.cancelled() => return Err("a heartbeat or checkpoint was rejected by the lease fence"),
            r = guarded => match r {
                None => return Err("lease window closed while the handler ran"),
                Some(Ok(Ok(outcome))) => Ended::Returned(outcome),
                Some(Ok(Err(CallError::BadArgs(msg)))) => Ended::BadArgs(msg),
                Some(Ok(Err(CallError::Failed(e)))) => Ended::Failed(e.to_string()),
                Some(Err(panic)) => Ended::Panicked(attempt::panic_message(&panic)),
            },
            _ = ctl.abort.cancelled() => Ended::DrainTimedOut,
            _ = tokio::time::sleep(timeout) => Ended::TimedOut,
            limit = hung => {
                tracing::warn!(?limit, "no heartbeat within the kind's heartbeat_timeout: aborting the handler");
                metrics::counter!("warden_heartbeat_timeouts_total", "kind" => job.kind.clone()).increment(1);
                Ended::HeartbeatTimedOut(limit)
            }
            _ = cancel_hard => Ended::CancelledHard,
            _ = poll_cancel => unreachable!("poll_cancel never completes"),
        }
    };
    Ok(HandlerRun {
        ended,
        cancel_confirmed: cancel.is_cancelled(),
        tx: ctx.tx.take(),
        staged: std::mem::take(&mut ctx.staged),
    })
}

/// Takes an attempt off the node's register of heartbeating attempts when dropped.
struct Unregister<'a> {
    register: &'a crate::progress::Heartbeats,
    job_id: i64,
}

impl Drop for Unregister<'_> {
    fn drop(&mut self) {
        self.register.ended(self.job_id);
    }
}

/// Get the handler's transaction ready for the finish: with a completion, insert
/// its staged follow-ups in it (the enqueue locks they take live for that commit
/// only; if that fails, the attempt fails); with anything else, roll it back. If the
/// handler returned, its connection is idle and can be rolled back and reused; if its
/// future was dropped mid-statement (timeout, panic, hard cancel), dropping the
/// `JobTx` closes the connection instead.
async fn prepare_commit(
    shared: &Shared,
    facts: &AttemptFacts,
    finish: &mut Finish,
    mut tx: Option<JobTx>,
    staged: &[NewJob],
    returned: bool,
) -> Option<JobTx> {
    if matches!(finish, Finish::Completed) && !staged.is_empty() {
        if let Err(e) = insert_staged(shared, &mut tx, staged).await {
            tracing::warn!(error = %e, count = staged.len(), "inserting the attempt's follow-up jobs failed");
            *finish = attempt::follow_ups_failed(facts, staged.len(), &e.to_string());
        }
    }
    if !matches!(finish, Finish::Completed) {
        if let Some(t) = tx.take() {
            if returned {
                let _ = t.rollback().await;
            }
        }
    }
    tx
}

/// Record the finish (fenced), claiming the account's next job unless draining.
/// Retries while the lease holds: an ambiguous failure as is (a retry that finds the
/// job already finished is `NotRunning`), one that fails for good with a plainer
/// outcome (see [`attempt::unrecordable`]).
#[allow(clippy::too_many_arguments)]
async fn record(
    shared: &Shared,
    job: &JobRow,
    lease: ActiveLease,
    ctl: &AttemptControl,
    facts: &AttemptFacts,
    mut tx: Option<JobTx>,
    mut finish: Finish,
    wake_in: Option<Duration>,
) -> Recorded {
    let kind = &job.kind;
    let mut permanent = 0;
    let mut tries = 0;
    loop {
        let with_tx = tx.is_some();
        let result = tokio::select! {
            biased;
            _ = lease.token.cancelled() => return Recorded::nothing(AttemptReport::Stopped),
            r = shared.store.finish(tx.take(), job, &lease.fence, &finish, ctl.claim_next.load(Ordering::Acquire)) => r,
        };
        match result {
            Ok(Finished::Recorded(next)) => {
                count_recorded(kind, &finish);
                let report = AttemptReport::Finished { next, wake_in, lease, reclaim: false };
                return Recorded { report, finish: Some(finish) };
            }
            Ok(Finished::NotRunning) => {
                // Not a fence failure: the lease holds, but the job no longer runs at
                // this epoch — an earlier try of this finish committed and its reply
                // was lost. Claim again: that adopts whatever the earlier try claimed.
                tracing::info!("finish found its job already finished (an earlier try committed); claiming again");
                metrics::counter!("warden_finish_in_doubt_total").increment(1);
                let report = AttemptReport::Finished { next: None, wake_in: None, lease, reclaim: true };
                return Recorded { report, finish: Some(finish) };
            }
            Err(Error::Fenced { .. }) => {
                tracing::warn!("finish rejected by the lease fence: this node no longer owns the partition");
                metrics::counter!("warden_fenced_writes_total").increment(1);
                return Recorded::nothing(AttemptReport::Stopped);
            }
            Err(e) if e.is_permanent() => {
                // The same statement would fail the same way: record a plain failure
                // instead (text and delays are already made storable; this is the
                // last line), then give up on the job with constant text. If not even
                // that can be stored, the job stays claimed here; the next claim
                // adopts it and counts an attempt, so this ends after max_attempts.
                tracing::error!(error = %e, "the attempt's outcome cannot be recorded; recording a failure instead");
                metrics::counter!("warden_finish_permanent_errors_total").increment(1);
                permanent += 1;
                if permanent > RECORD_TRIES {
                    tracing::error!("no outcome can be recorded for this attempt; leaving it to be adopted");
                    return Recorded::nothing(AttemptReport::Unrecordable);
                }
                finish = attempt::unrecordable(facts, permanent == 1, &e.to_string());
            }
            Err(e) => {
                // Ambiguous (the reply may have been lost after COMMIT): retry; a
                // retry that finds the job already finished is `NotRunning` above.
                tracing::warn!(error = %e, "could not record the attempt; retrying while the lease holds");
                if with_tx {
                    // The handler's transaction is gone (or its commit is in doubt):
                    // its writes must be redone, so this attempt counts as failed.
                    finish = attempt::uncommitted(&e.to_string());
                }
            }
        }
        tries += 1;
        tokio::select! {
            biased;
            _ = lease.token.cancelled() => return Recorded::nothing(AttemptReport::Stopped),
            _ = tokio::time::sleep(FINISH_RETRY.without_jitter(tries)) => {}
        }
    }
}

/// How recording an attempt ended.
struct Recorded {
    /// For the actor.
    report: AttemptReport,
    /// What was recorded (`None` if nothing was).
    finish: Option<Finish>,
}

impl Recorded {
    fn nothing(report: AttemptReport) -> Self {
        Self { report, finish: None }
    }
}

/// Count a recorded attempt in the metrics.
fn count_recorded(kind: &str, finish: &Finish) {
    let outcome = attempt::outcome_label(finish);
    let kind = kind.to_string();
    metrics::counter!("warden_attempts_total", "kind" => kind.clone(), "outcome" => outcome).increment(1);
    let total = match finish {
        Finish::Completed => "warden_jobs_completed_total",
        Finish::Retry { .. } => "warden_retries_total",
        Finish::Discard { .. } => "warden_discards_total",
        Finish::Cancelled { .. } => "warden_cancels_total",
        Finish::Snooze { .. } => "warden_snoozes_total",
        Finish::Interrupted { .. } => "warden_interrupted_total",
    };
    metrics::counter!(total, "kind" => kind.clone()).increment(1);
    if !matches!(finish, Finish::Completed | Finish::Snooze { .. }) {
        tracing::info!(outcome, "attempt finished");
        metrics::counter!("warden_errors_total", "kind" => kind).increment(1);
    }
}

/// The least time between two reads of a running job's cancel request.
const CANCEL_READ_SPACING: Duration = Duration::from_millis(50);

/// Poll the database for a cancel request while an attempt runs (the NOTIFY is only
/// the fast path, and only a hint: `check` makes it re-read now, it never cancels by
/// itself). Fires `cancel` and `stop` once the row says so, then waits forever.
async fn poll_cancel(
    shared: &Shared,
    job_id: i64,
    cancel: &CancellationToken,
    stop: &CancellationToken,
    check: &tokio::sync::Notify,
    beat_recorded: &crate::progress::Recorded,
) {
    let every = shared.config.cancel_poll_interval;
    loop {
        let hinted = tokio::select! {
            _ = tokio::time::sleep(every) => false,
            _ = check.notified() => true,
        };
        // A heartbeating handler's writes read the cancel request already (and fire
        // the same tokens): the timed poll has nothing to add while one is fresh.
        // A NOTIFY hint still reads at once.
        if !hinted && beat_recorded.within(every) {
            continue;
        }
        if let Ok(true) = shared.store.cancel_requested(job_id).await {
            cancel.cancel();
            stop.cancel();
            break;
        }
        // However many notifications arrive, at most one read per CANCEL_READ_SPACING.
        tokio::time::sleep(CANCEL_READ_SPACING).await;
    }
    std::future::pending::<()>().await
}

struct Entry {
    actor: ActorRef<AccountMsg>,
    partition: u32,
    wake_flag: Arc<AtomicBool>,
}

/// The node's typed map of live account actors.
pub struct AccountActors {
    map: Mutex<HashMap<Arc<str>, Entry>>,
    shared: Arc<Shared>,
    spawned: AtomicU64,
    /// Jobs with an attempt task running here (see `Store::running_here`).
    in_flight: Mutex<HashSet<i64>>,
    /// Jobs whose outcome could not be recorded, kept from adoption for a while.
    held_back: Mutex<HashMap<i64, HeldBack>>,
    /// Permits for the first claims of actors spawned for NOTIFY hints.
    hint_claims: Arc<tokio::sync::Semaphore>,
    /// The number of live actors, for those waiting until none is left.
    live: tokio::sync::watch::Sender<usize>,
}

/// A job whose outcome could not be recorded (see [`AccountActors::hold_back`]).
struct HeldBack {
    /// Not adopted before this.
    until: tokio::time::Instant,
    /// Unrecordable outcomes so far.
    strikes: u32,
}

/// How long a job with an unrecordable outcome is kept from adoption, by strikes.
const HOLD_BACK: Backoff = Backoff::doubling(Duration::from_secs(2), Duration::from_secs(300));

/// Held-back jobs remembered before the expired ones are forgotten.
const MAX_HELD_BACK: usize = 10_000;

/// First claims of actors spawned for NOTIFY hints running at once: a flood of
/// wake-ups for made-up accounts may use this many executor connections, not the whole
/// pool. Actors the enforcer's scan spawns (for work the database confirmed) never
/// wait for these, so real work is not queued behind a flood.
pub const HINT_CLAIMS: usize = 4;

impl AccountActors {
    pub(crate) fn new(shared: Arc<Shared>) -> Arc<Self> {
        Arc::new(Self {
            map: Mutex::new(HashMap::new()),
            shared,
            spawned: AtomicU64::new(0),
            in_flight: Mutex::new(HashSet::new()),
            hint_claims: Arc::new(tokio::sync::Semaphore::new(HINT_CLAIMS)),
            live: tokio::sync::watch::channel(0).0,
            held_back: Mutex::new(HashMap::new()),
        })
    }

    pub fn len(&self) -> usize {
        self.map.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The map's size changed (called under its lock, so updates are in order).
    fn live_changed(&self, len: usize) {
        metrics::gauge!("warden_active_actors").set(len as f64);
        self.live.send_replace(len);
    }

    /// Wait until no actor is left, or `deadline`; true if none is left.
    pub async fn wait_until_empty(&self, deadline: tokio::time::Instant) -> bool {
        let mut live = self.live.subscribe();
        tokio::time::timeout_at(deadline, live.wait_for(|n| *n == 0)).await.is_ok() || self.is_empty()
    }

    /// The cluster's partition count.
    pub fn partitions(&self) -> PartitionCount {
        self.shared.partitions
    }

    /// Total actors spawned since start.
    pub fn spawned(&self) -> u64 {
        self.spawned.load(Ordering::Relaxed)
    }

    pub fn count_in_partition(&self, partition: u32) -> usize {
        self.map.lock().unwrap().values().filter(|e| e.partition == partition).count()
    }

    /// Partitions with at least one live actor here.
    pub fn partitions_with_actors(&self) -> std::collections::BTreeSet<u32> {
        self.map.lock().unwrap().values().map(|e| e.partition).collect()
    }

    /// Of these jobs, those with an attempt running here or held back from adoption
    /// (see [`AccountActors::is_in_flight`], [`AccountActors::is_held_back`]).
    pub fn busy_jobs(&self, job_ids: &[i64]) -> HashSet<i64> {
        job_ids.iter().copied().filter(|id| self.is_in_flight(*id) || self.is_held_back(*id)).collect()
    }

    /// Wake the account's actor (coalesced), spawning it if there is none.
    /// Returns false if the actor limit is reached (the enforcer will retry).
    pub async fn wake(self: &Arc<Self>, account: &str, partition: u32) -> bool {
        self.wake_with(account, partition, None).await
    }

    /// [`AccountActors::wake`] for a NOTIFY hint: waking an existing actor is
    /// immediate, but spawning one waits until fewer than [`HINT_CLAIMS`] hint-spawned
    /// actors are making their first claim. The caller (the listener's waker task)
    /// waits, its bounded queue fills, and past it a due scan stands in.
    pub async fn wake_hinted(self: &Arc<Self>, account: &str, partition: u32) -> bool {
        if self.contains(account) {
            return self.wake_with(account, partition, None).await;
        }
        let Ok(permit) = self.hint_claims.clone().acquire_owned().await else { return false };
        self.wake_with(account, partition, Some(permit)).await
    }

    async fn wake_with(
        self: &Arc<Self>,
        account: &str,
        partition: u32,
        hint_permit: Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> bool {
        {
            let map = self.map.lock().unwrap();
            if let Some(e) = map.get(account) {
                if !e.wake_flag.swap(true, Ordering::AcqRel) {
                    let _ = e.actor.send_message(AccountMsg::Wake);
                }
                return true;
            }
            if map.len() >= self.shared.config.max_actors {
                metrics::counter!("warden_actor_limit_hits_total").increment(1);
                return false;
            }
        }
        let account: Arc<str> = account.into();
        let wake_flag = Arc::new(AtomicBool::new(true));
        let args = AccountArgs {
            hint_permit,
            account: account.clone(),
            partition,
            shared: self.shared.clone(),
            actors: self.clone(),
            wake_flag: wake_flag.clone(),
        };
        let (actor, join) = match Actor::spawn(None, AccountActor, args).await {
            Ok(x) => x,
            Err(e) => {
                tracing::error!(error = %e, "could not spawn account actor");
                return false;
            }
        };
        {
            let mut map = self.map.lock().unwrap();
            if let Some(e) = map.get(&account) {
                // Lost a race with another waker: keep theirs.
                if !e.wake_flag.swap(true, Ordering::AcqRel) {
                    let _ = e.actor.send_message(AccountMsg::Wake);
                }
                actor.stop(None);
                return true;
            }
            map.insert(account.clone(), Entry { actor: actor.clone(), partition, wake_flag });
            self.live_changed(map.len());
        }
        self.spawned.fetch_add(1, Ordering::Relaxed);
        let _ = actor.send_message(AccountMsg::Wake);
        let me = self.clone();
        let id = actor.get_id();
        tokio::spawn(async move {
            let _ = join.await;
            let emptied = {
                let mut map = me.map.lock().unwrap();
                if map.get(&account).is_some_and(|e| e.actor.get_id() == id) {
                    map.remove(&account);
                }
                me.live_changed(map.len());
                !map.values().any(|e| e.partition == partition)
            };
            // The last actor of a partition being handed off is gone: release it now.
            if emptied && me.shared.leases.is_draining(partition) {
                me.shared.poke_enforcer.notify_one();
            }
        });
        true
    }

    /// Is an attempt of this job running here?
    pub fn is_in_flight(&self, job_id: i64) -> bool {
        self.in_flight.lock().unwrap().contains(&job_id)
    }

    /// Keep the orphan scan away from a job whose outcome could not be recorded, for
    /// 2 s, 4 s, 8 s, … up to 5 min on repeated failures ([`HOLD_BACK`]): it is
    /// retried (and its attempts counted on adoption) without becoming a hot loop.
    fn hold_back(&self, job_id: i64) {
        let now = tokio::time::Instant::now();
        let mut held = self.held_back.lock().unwrap();
        if held.len() >= MAX_HELD_BACK {
            held.retain(|_, h| h.until > now);
        }
        let strikes = held.get(&job_id).map_or(0, |h| h.strikes) + 1;
        let until = now + HOLD_BACK.without_jitter(strikes.min(64) as i32);
        held.insert(job_id, HeldBack { until, strikes });
    }

    /// Is this job held back from adoption for now (see `hold_back`)?
    pub fn is_held_back(&self, job_id: i64) -> bool {
        self.held_back.lock().unwrap().get(&job_id).is_some_and(|h| h.until > tokio::time::Instant::now())
    }

    /// Is there a live actor for this account here?
    pub fn contains(&self, account: &str) -> bool {
        self.map.lock().unwrap().contains_key(account)
    }

    /// Forward a cancel request to the account's actor, if it is live here.
    pub fn cancel(&self, account: &str, job_id: i64) {
        if let Some(e) = self.map.lock().unwrap().get(account) {
            let _ = e.actor.send_message(AccountMsg::Cancel(job_id));
        }
    }

    /// Stop the actors of fenced partitions at once.
    pub fn fence_partitions(&self, partitions: &[u32]) {
        let map = self.map.lock().unwrap();
        for e in map.values().filter(|e| partitions.contains(&e.partition)) {
            let _ = e.actor.send_message(AccountMsg::Fenced);
        }
    }

    /// Ask the actors of these partitions (all if `None`) to drain.
    pub fn drain(&self, partitions: Option<&[u32]>) {
        let map = self.map.lock().unwrap();
        for e in map.values().filter(|e| partitions.is_none_or(|ps| ps.contains(&e.partition))) {
            let _ = e.actor.send_message(AccountMsg::Drain);
        }
    }

    /// Passivation: remove the actor from the map unless a wake-up is pending.
    fn remove_if_idle(&self, account: &str, id: ractor::ActorId, wake_flag: &AtomicBool) -> bool {
        let mut map = self.map.lock().unwrap();
        if wake_flag.load(Ordering::Acquire) {
            return false;
        }
        if map.get(account).is_some_and(|e| e.actor.get_id() == id) {
            map.remove(account);
            self.live_changed(map.len());
        }
        true
    }
}

/// The lease TTL: the server-side idle bound of handler transactions adds it to the
/// job's timeout.
fn lease_ttl(shared: &Shared) -> Duration {
    shared.lease_ttl
}

/// Insert an attempt's staged follow-up jobs in its handler transaction (opened here
/// if the handler did not use one). On error the transaction is gone: dropping a
/// `JobTx` in an aborted state closes its connection.
async fn insert_staged(shared: &Shared, tx: &mut Option<JobTx>, staged: &[NewJob]) -> crate::Result<()> {
    if tx.is_none() {
        *tx = Some(shared.store.begin(lease_ttl(shared)).await?);
    }
    let conn = tx.as_mut().expect("opened above").conn();
    let registry = &shared.registry;
    let defaults = |k: &str| match registry.options(k) {
        Some(o) => KindDefault { max_attempts: Some(o.max_attempts), timeout: Some(o.timeout) },
        None => KindDefault::default(),
    };
    let r = match &shared.producer {
        Some(producer) => producer.enqueue_in(conn, staged, &defaults).await,
        None => Err(crate::Error::Config("this executor has no producer store to enqueue follow-up jobs".into())),
    };
    if r.is_err() {
        *tx = None;
    }
    r.map(|_| ())
}
