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
//! account's next runnable job → run it in an attempt task → the task finishes the
//! job and claims the next one in the same statement → `Done` → next attempt, or idle.
//! Idle for `idle_timeout` → passivate (stop). Its partition fenced → stop at once,
//! dropping any running handler. `Drain` → no new attempts; the running one gets
//! `drain_timeout`, then it is dropped and left for rescue by the next owner.
//!
//! Invariant: an actor holds at most one claimed job at a time, and it pulls jobs one
//! by one from the database, so nothing holds a backlog in memory.

use crate::error::Error;
use crate::handler::{CallError, FencingToken, JobContext, Outcome, Registry};
use crate::job::JobRow;
use crate::lease::{ActiveLease, LeaseTable};
use crate::store::{Finish, Store};
use futures::FutureExt;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use std::collections::HashMap;
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
    /// Upper bound on concurrently live account actors on this node.
    pub max_actors: usize,
}

impl Default for ExecConfig {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(30),
            cancel_grace: Duration::from_secs(5),
            cancel_poll_interval: Duration::from_secs(2),
            drain_timeout: Duration::from_secs(10),
            max_actors: 10_000,
        }
    }
}

/// What every actor of a node shares.
pub(crate) struct Shared {
    pub store: Arc<dyn Store>,
    pub registry: Arc<Registry>,
    pub leases: Arc<LeaseTable>,
    pub config: ExecConfig,
    pub partitions: PartitionCount,
    pub node_id: Arc<str>,
    /// Pokes the enforcer (a draining partition just lost its last actor).
    pub poke_enforcer: Arc<tokio::sync::Notify>,
}

/// Messages to an account actor.
pub enum AccountMsg {
    /// There may be due work: claim it if idle.
    Wake,
    /// Cancel this job if it is the one running.
    Cancel(i64),
    /// Finish the running attempt (within drain_timeout), claim nothing more, stop.
    Drain,
    /// The partition was fenced: stop now.
    Fenced,
    /// The attempt task ended.
    Done(Box<AttemptReport>),
    /// Passivate if still idle since `generation`.
    IdleCheck(u64),
    /// Drain timeout passed: abort the running attempt.
    AbortRunning,
}

/// How an attempt task ended. (Sent boxed, so the variants' size difference is moot.)
#[allow(clippy::large_enum_variant)]
pub enum AttemptReport {
    /// The outcome was recorded; `next` is the account's next job, already claimed
    /// under `lease` (needed to undo the claim if the account is draining).
    Finished { next: Option<JobRow>, wake_in: Option<Duration>, lease: ActiveLease },
    /// The attempt was dropped without recording (fenced or aborted); stop the actor.
    Stopped,
}

struct Running {
    job_id: i64,
    cancel: CancellationToken,
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
    idle_generation: u64,
}

pub struct AccountArgs {
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
            idle_generation: 0,
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
                let Some(lease) = st.shared.leases.current(st.partition) else {
                    myself.stop(Some("partition not held".into()));
                    return Ok(());
                };
                match st.shared.store.claim(&st.account, &lease.fence).await {
                    Ok(Some(job)) => start_attempt(&myself, st, job, lease),
                    Ok(None) => arm_idle(&myself, st),
                    Err(Error::Fenced { .. }) => myself.stop(Some("fenced".into())),
                    Err(e) => {
                        tracing::warn!(account = %st.account, error = %e, "claim failed; retrying shortly");
                        drop(myself.send_after(Duration::from_millis(500), || AccountMsg::Wake));
                    }
                }
            }
            AccountMsg::Done(report) => {
                st.running = None;
                let rewake = std::mem::take(&mut st.woken_while_running);
                match *report {
                    AttemptReport::Stopped => myself.stop(Some("attempt stopped".into())),
                    AttemptReport::Finished { next, wake_in, lease } => match next {
                        Some(job) if st.draining => {
                            // The partition is draining, so `leases.current()` no longer
                            // answers; undo the claim under the lease it was made with.
                            if let Err(e) = st.shared.store.unclaim(&job, &lease.fence).await {
                                tracing::warn!(job_id = job.id, error = %e, "unclaim on drain failed; rescue will reset it");
                            }
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
                                if let Err(e) = st.shared.store.unclaim(&job, &lease.fence).await {
                                    tracing::warn!(job_id = job.id, error = %e, "unclaim failed; rescue will reset it");
                                }
                                myself.stop(Some("partition not held".into()))
                            }
                        },
                        None if st.draining => myself.stop(Some("drained".into())),
                        None => {
                            if rewake {
                                // Look again: one claim, only when a wake-up raced the finish.
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
                        r.cancel.cancel();
                    }
                }
            }
            AccountMsg::Drain => {
                st.draining = true;
                st.claim_next.store(false, Ordering::Release);
                if st.running.is_none() {
                    myself.stop(Some("drained".into()));
                } else {
                    drop(myself.send_after(st.shared.config.drain_timeout, || AccountMsg::AbortRunning));
                }
            }
            AccountMsg::AbortRunning => {
                if let Some(r) = &st.running {
                    tracing::warn!(account = %st.account, job_id = r.job_id, "drain timeout: aborting running attempt; it will be rescued");
                    r.abort.cancel();
                }
            }
            AccountMsg::Fenced => {
                if let Some(r) = &st.running {
                    r.abort.cancel();
                }
                myself.stop(Some("fenced".into()));
            }
            AccountMsg::IdleCheck(generation) => {
                if generation == st.idle_generation
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

fn arm_idle(myself: &ActorRef<AccountMsg>, st: &mut AccountState) {
    st.idle_generation += 1;
    let generation = st.idle_generation;
    drop(myself.send_after(st.shared.config.idle_timeout, move || AccountMsg::IdleCheck(generation)));
}

fn start_attempt(myself: &ActorRef<AccountMsg>, st: &mut AccountState, job: JobRow, lease: ActiveLease) {
    st.idle_generation += 1;
    let cancel = CancellationToken::new();
    let abort = CancellationToken::new();
    st.running = Some(Running { job_id: job.id, cancel: cancel.clone(), abort: abort.clone() });
    let shared = st.shared.clone();
    let claim_next = st.claim_next.clone();
    let me = myself.clone();
    tokio::spawn(async move {
        let report = run_attempt(shared, job, lease, cancel, abort, claim_next).await;
        // The actor may already be gone (fenced); then nobody needs the report.
        let _ = me.send_message(AccountMsg::Done(Box::new(report)));
    });
}

enum EndedKind {
    Returned,
    Dropped,
}

enum Ended {
    Returned(std::result::Result<Outcome, CallError>),
    Panicked(String),
    TimedOut,
    CancelledHard,
}

/// Run one attempt: the handler (with timeout, cancellation and fencing), then the
/// fenced finish-and-claim-next statement. Never returns before the outcome is
/// recorded, unless the lease is lost or the attempt is aborted.
async fn run_attempt(
    shared: Arc<Shared>,
    job: JobRow,
    lease: ActiveLease,
    cancel: CancellationToken,
    abort: CancellationToken,
    claim_next: Arc<AtomicBool>,
) -> AttemptReport {
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
        let kind_label = job.kind.clone();
        if let Some(started) = job.attempted_at {
            let queued = (started - job.due_at).to_std().unwrap_or_default();
            metrics::histogram!("warden_queue_seconds", "kind" => kind_label.clone()).record(queued.as_secs_f64());
        }
        let handler = shared.registry.get(&job.kind).cloned();
        let started = tokio::time::Instant::now();
        let mut ctx = JobContext {
            job: job.clone(),
            fence: FencingToken { partition: lease.fence.partition, epoch: lease.fence.epoch },
            cancel: cancel.clone(),
            store: shared.store.clone(),
            registry: shared.registry.clone(),
            partitions: shared.partitions,
            tx: None,
        };
        let ended = match &handler {
            None => Ended::Returned(Err(CallError::BadArgs(format!(
                "no handler for kind {:?} is registered on node {}",
                job.kind, shared.node_id
            )))),
            Some(h) => {
                let call = AssertUnwindSafe(h.call(&mut ctx, job.args.clone())).catch_unwind();
                let timeout = tokio::time::sleep(Duration::from_millis(job.timeout_ms.max(1) as u64));
                let grace = shared.config.cancel_grace;
                let cancel_hard = async {
                    cancel.cancelled().await;
                    tokio::time::sleep(grace).await;
                };
                let poll_cancel = poll_cancel(&shared, job.id, &cancel);
                tokio::select! {
                    r = call => match r {
                        Ok(r) => Ended::Returned(r),
                        Err(panic) => Ended::Panicked(panic_message(&panic)),
                    },
                    _ = timeout => Ended::TimedOut,
                    _ = cancel_hard => Ended::CancelledHard,
                    _ = poll_cancel => unreachable!("poll_cancel never completes"),
                    _ = lease.token.cancelled() => {
                        metrics::counter!("warden_attempts_total", "kind" => kind_label, "outcome" => "fenced").increment(1);
                        tracing::warn!("lease lost: attempt dropped");
                        return AttemptReport::Stopped;
                    }
                    _ = abort.cancelled() => {
                        metrics::counter!("warden_attempts_total", "kind" => kind_label, "outcome" => "aborted").increment(1);
                        tracing::warn!("attempt aborted; left for rescue");
                        return AttemptReport::Stopped;
                    }
                }
            }
        };
        let ended_kind = match &ended {
            Ended::Returned(_) => EndedKind::Returned,
            _ => EndedKind::Dropped,
        };
        let elapsed = started.elapsed();
        metrics::histogram!("warden_processing_seconds", "kind" => kind_label.clone()).record(elapsed.as_secs_f64());

        let options = handler.as_ref().map(|h| h.options().clone()).unwrap_or_default();
        let exhausted = job.attempt >= job.max_attempts;
        let fail = |outcome: &'static str, error: String, after: Option<Duration>| {
            if exhausted {
                Finish::Discard { outcome, error: format!("{error} (attempt {} of {}: giving up)", job.attempt, job.max_attempts) }
            } else {
                let after = after.unwrap_or_else(|| options.backoff.delay(job.attempt, &mut fastrand::Rng::new()));
                Finish::Retry { after, outcome, error }
            }
        };
        let mut finish = match ended {
            Ended::Returned(Ok(Outcome::Done)) => Finish::Completed,
            Ended::Returned(Ok(Outcome::Retry { after })) => fail("retry", "handler asked to retry".into(), after),
            Ended::Returned(Ok(Outcome::Snooze(after))) => Finish::Snooze { after },
            Ended::Returned(Ok(Outcome::Discard(reason))) => Finish::Discard { outcome: "discarded", error: reason },
            Ended::Returned(Err(CallError::BadArgs(msg))) => Finish::Discard { outcome: "discarded", error: msg },
            Ended::Returned(Err(CallError::Failed(e))) => fail("failed", format!("handler error: {e}"), None),
            Ended::Panicked(msg) => fail("failed", format!("handler panicked: {msg}"), None),
            Ended::TimedOut => fail("timeout", format!("timed out after {}ms", job.timeout_ms), None),
            Ended::CancelledHard => Finish::Cancelled {
                error: format!("cancelled while running; handler did not stop within {:?} and was aborted", shared.config.cancel_grace),
            },
        };
        if cancel.is_cancelled() && !matches!(finish, Finish::Completed | Finish::Cancelled { .. }) {
            finish = Finish::Cancelled { error: "cancelled while running".into() };
        }
        let wake_in = match &finish {
            Finish::Retry { after, .. } | Finish::Snooze { after } => Some(*after),
            _ => None,
        };
        // Handler writes commit only with a completion. If the handler returned, its
        // connection is idle and can be rolled back and reused; if its future was
        // dropped mid-statement (timeout, panic, hard cancel), dropping the JobTx
        // closes the connection instead.
        let returned = matches!(ended_kind, EndedKind::Returned);
        let mut tx = ctx.tx.take();
        if !matches!(finish, Finish::Completed) {
            if let Some(t) = tx.take() {
                if returned {
                    let _ = t.rollback().await;
                }
            }
        }
        drop(ctx);

        let mut delay = Duration::from_millis(50);
        loop {
            let with_tx = tx.is_some();
            let result = tokio::select! {
                r = shared.store.finish(tx.take(), &job, &lease.fence, &finish, claim_next.load(Ordering::Acquire)) => r,
                _ = lease.token.cancelled() => return AttemptReport::Stopped,
            };
            match result {
                Ok(next) => {
                    let outcome = attempt_outcome(&finish);
                    metrics::counter!("warden_attempts_total", "kind" => kind_label.clone(), "outcome" => outcome).increment(1);
                    match &finish {
                        Finish::Completed => metrics::counter!("warden_jobs_completed_total", "kind" => kind_label).increment(1),
                        Finish::Retry { .. } => metrics::counter!("warden_retries_total", "kind" => kind_label).increment(1),
                        Finish::Discard { .. } => metrics::counter!("warden_discards_total", "kind" => kind_label).increment(1),
                        Finish::Cancelled { .. } => metrics::counter!("warden_cancels_total", "kind" => kind_label).increment(1),
                        Finish::Snooze { .. } => metrics::counter!("warden_snoozes_total", "kind" => kind_label).increment(1),
                    }
                    if !matches!(finish, Finish::Completed | Finish::Snooze { .. }) {
                        tracing::info!(outcome, "attempt finished");
                        metrics::counter!("warden_errors_total", "kind" => job.kind.clone()).increment(1);
                    }
                    return AttemptReport::Finished { next, wake_in, lease };
                }
                Err(Error::Fenced { .. }) => {
                    tracing::warn!("finish rejected by the lease fence: this node no longer owns the partition");
                    metrics::counter!("warden_fenced_writes_total").increment(1);
                    return AttemptReport::Stopped;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not record the attempt; retrying while the lease holds");
                    if with_tx {
                        // The handler's transaction is gone (or its commit is in doubt):
                        // its writes must be redone, so this attempt counts as failed.
                        finish = Finish::Retry {
                            after: Duration::ZERO,
                            outcome: "failed",
                            error: format!("completion could not be committed: {e}"),
                        };
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = lease.token.cancelled() => return AttemptReport::Stopped,
                        _ = abort.cancelled() => return AttemptReport::Stopped,
                    }
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
    .instrument(span)
    .await
}

/// Poll the database for a cancel request while an attempt runs (the NOTIFY is only
/// the fast path). Fires `cancel` and then waits forever.
async fn poll_cancel(shared: &Shared, job_id: i64, cancel: &CancellationToken) {
    let every = shared.config.cancel_poll_interval;
    loop {
        tokio::time::sleep(every).await;
        if cancel.is_cancelled() {
            break;
        }
        if let Ok(true) = shared.store.cancel_requested(job_id).await {
            cancel.cancel();
            break;
        }
    }
    std::future::pending::<()>().await
}

fn attempt_outcome(f: &Finish) -> &'static str {
    match f {
        Finish::Completed => "completed",
        Finish::Retry { outcome, .. } | Finish::Discard { outcome, .. } => outcome,
        Finish::Snooze { .. } => "snoozed",
        Finish::Cancelled { .. } => "cancelled",
    }
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".into()
    }
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
}

impl AccountActors {
    pub(crate) fn new(shared: Arc<Shared>) -> Arc<Self> {
        Arc::new(Self { map: Mutex::new(HashMap::new()), shared, spawned: AtomicU64::new(0) })
    }

    pub fn len(&self) -> usize {
        self.map.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Total actors spawned since start.
    pub fn spawned(&self) -> u64 {
        self.spawned.load(Ordering::Relaxed)
    }

    pub fn count_in_partition(&self, partition: u32) -> usize {
        self.map.lock().unwrap().values().filter(|e| e.partition == partition).count()
    }

    /// Wake the account's actor (coalesced), spawning it if there is none.
    /// Returns false if the actor limit is reached (the enforcer will retry).
    pub async fn wake(self: &Arc<Self>, account: &str, partition: u32) -> bool {
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
            metrics::gauge!("warden_active_actors").set(map.len() as f64);
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
                metrics::gauge!("warden_active_actors").set(map.len() as f64);
                !map.values().any(|e| e.partition == partition)
            };
            // The last actor of a partition being handed off is gone: release it now.
            if emptied && me.shared.leases.is_draining(partition) {
                me.shared.poke_enforcer.notify_one();
            }
        });
        true
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
            metrics::gauge!("warden_active_actors").set(map.len() as f64);
        }
        true
    }
}
