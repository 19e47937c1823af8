//! The handler API: what users implement, per-kind options, and the job context.
//!
//! ```ignore
//! struct Charge;
//! #[warden_runtime::async_trait]
//! impl Handler for Charge {
//!     type Args = ChargeArgs;
//!     const KIND: &'static str = "charge";
//!     async fn run(&self, ctx: &mut JobContext, args: ChargeArgs) -> HandlerResult {
//!         sqlx::query("INSERT INTO ledger ...").execute(ctx.tx().await?).await?;
//!         ctx.enqueue(NewJob::new(ctx.account(), "invoice", &args)?).await?;
//!         Ok(Outcome::Done)
//!     }
//! }
//! ```

use crate::error::{Error, Result};
use crate::job::{JobRow, Lane, NewJob};
use crate::progress::{Beat, BeatAck, Heartbeat, Heartbeats, Progress, StopReason, MAX_CHECKPOINT_BYTES};
use crate::store::{JobTx, Store};
use async_trait::async_trait;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// What a handler asks for after an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The job is complete.
    Done,
    /// Count this attempt as failed and retry: after `after`, or the kind's backoff if `None`.
    Retry { after: Option<Duration> },
    /// Run again after the delay without using up an attempt.
    Snooze(Duration),
    /// Give up for good, with a reason that is recorded.
    Discard(String),
}

/// A handler's error: any error counts as a failed attempt and is retried per the kind's backoff.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync + 'static>;
pub type HandlerResult = std::result::Result<Outcome, HandlerError>;

/// Exponential backoff with jitter: `base · 2^(attempt−1)`, capped at `max`, then
/// multiplied by a uniform factor in `[1 − jitter, 1 + jitter]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
    /// 0.0 ..= 1.0
    pub jitter: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { base: Duration::from_secs(1), max: Duration::from_secs(3600), jitter: 0.25 }
    }
}

impl Backoff {
    /// Doubling from `base` up to `max`, without jitter: the shape of the runtime's own
    /// retries of failed statements and reconnects (see their named constants).
    pub const fn doubling(base: Duration, max: Duration) -> Self {
        Self { base, max, jitter: 0.0 }
    }

    /// Delay before retrying after failed attempt number `attempt` (1-based).
    pub fn delay(&self, attempt: i32, rng: &mut fastrand::Rng) -> Duration {
        self.delay_with_draw(attempt, rng.f64())
    }

    /// [`Backoff::delay`] with the jitter's uniform draw in `[0, 1)` given (pure).
    pub fn delay_with_draw(&self, attempt: i32, draw: f64) -> Duration {
        let factor = 1.0 + self.jitter * (draw * 2.0 - 1.0);
        self.without_jitter(attempt).mul_f64(factor.max(0.0))
    }

    /// `base · 2^(attempt−1)`, capped at `max` (attempt 1-based; the jitter ignored).
    pub fn without_jitter(&self, attempt: i32) -> Duration {
        let exp = (attempt.max(1) - 1).min(32) as u32;
        self.base.saturating_mul(1u32.checked_shl(exp).unwrap_or(u32::MAX)).min(self.max)
    }
}

/// Per-kind options.
#[derive(Debug, Clone, PartialEq)]
pub struct JobOptions {
    pub max_attempts: i32,
    /// The default for the kind's jobs (an enqueue may set its own): the handler is
    /// dropped after this long. A long job sets hours here and relies on
    /// `heartbeat_timeout` to catch a hung handler.
    pub timeout: Duration,
    pub backoff: Backoff,
    pub lane: Lane,
    /// A handler that goes this long without [`JobContext::heartbeat`] or
    /// [`JobContext::checkpoint`] (counted from its start) is hung: it is aborted and
    /// the attempt recorded as a `timeout`, retried like one. `None` (the default):
    /// no heartbeat is expected. At least [`crate::progress::MIN_HEARTBEAT_TIMEOUT`].
    pub heartbeat_timeout: Option<Duration>,
}

impl Default for JobOptions {
    fn default() -> Self {
        Self {
            max_attempts: 25,
            timeout: Duration::from_secs(60),
            backoff: Backoff::default(),
            lane: Lane::Serial,
            heartbeat_timeout: None,
        }
    }
}

/// A job handler for one kind, with typed arguments.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    type Args: DeserializeOwned + Send + 'static;
    /// The job kind this handler runs.
    const KIND: &'static str;

    fn options(&self) -> JobOptions {
        JobOptions::default()
    }

    async fn run(&self, ctx: &mut JobContext, args: Self::Args) -> HandlerResult;
}

/// Why an attempt produced no handler outcome.
#[derive(Debug)]
pub(crate) enum CallError {
    /// The stored args do not deserialize into the handler's type: discard.
    BadArgs(String),
    Failed(HandlerError),
}

#[async_trait]
pub(crate) trait ErasedHandler: Send + Sync {
    async fn call(&self, ctx: &mut JobContext, args: serde_json::Value) -> std::result::Result<Outcome, CallError>;
    fn options(&self) -> &JobOptions;
}

struct Typed<H: Handler> {
    handler: H,
    options: JobOptions,
}

#[async_trait]
impl<H: Handler> ErasedHandler for Typed<H> {
    async fn call(&self, ctx: &mut JobContext, args: serde_json::Value) -> std::result::Result<Outcome, CallError> {
        let args: H::Args = serde_json::from_value(args)
            .map_err(|e| CallError::BadArgs(format!("args do not match kind {:?}: {e}", H::KIND)))?;
        self.handler.run(ctx, args).await.map_err(CallError::Failed)
    }
    fn options(&self) -> &JobOptions {
        &self.options
    }
}

/// The handlers a node runs, by kind.
#[derive(Clone, Default)]
pub struct Registry {
    handlers: HashMap<String, Arc<dyn ErasedHandler>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("kinds", &self.kinds()).finish()
    }
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Register `handler` for `H::KIND`. Errors on a duplicate kind or invalid options.
    pub fn register<H: Handler>(&mut self, handler: H) -> Result<()> {
        crate::job::validate_name("kind", H::KIND, crate::job::MAX_KIND_BYTES)?;
        let options = handler.options();
        if !(1..=crate::job::MAX_MAX_ATTEMPTS).contains(&options.max_attempts) {
            return Err(Error::Config(format!("kind {}: max_attempts must be 1..=1000", H::KIND)));
        }
        if options.timeout < Duration::from_millis(1) || options.timeout > crate::job::MAX_TIMEOUT {
            return Err(Error::Config(format!("kind {}: timeout must be 1ms..=24h", H::KIND)));
        }
        if let Some(t) = options.heartbeat_timeout {
            if t < crate::progress::MIN_HEARTBEAT_TIMEOUT || t > crate::job::MAX_TIMEOUT {
                return Err(Error::Config(format!(
                    "kind {}: heartbeat_timeout must be {:?}..=24h, got {t:?}",
                    H::KIND,
                    crate::progress::MIN_HEARTBEAT_TIMEOUT
                )));
            }
        }
        if !(0.0..=1.0).contains(&options.backoff.jitter) {
            return Err(Error::Config(format!("kind {}: backoff jitter must be within 0..=1", H::KIND)));
        }
        if self.handlers.contains_key(H::KIND) {
            return Err(Error::Config(format!("a handler for kind {:?} is already registered", H::KIND)));
        }
        self.handlers.insert(H::KIND.to_string(), Arc::new(Typed { handler, options }));
        Ok(())
    }

    pub(crate) fn get(&self, kind: &str) -> Option<&Arc<dyn ErasedHandler>> {
        self.handlers.get(kind)
    }

    pub fn options(&self, kind: &str) -> Option<&JobOptions> {
        self.handlers.get(kind).map(|h| h.options())
    }

    pub fn kinds(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.handlers.keys().map(|k| k.as_str()).collect();
        v.sort_unstable();
        v
    }
}

/// The token a handler passes to downstream systems so they can reject stale writers:
/// within a partition, a later owner always has a larger epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct FencingToken {
    pub partition: u32,
    pub epoch: i64,
}

/// Everything a handler may know and use about the attempt it runs.
pub struct JobContext {
    pub(crate) job: JobRow,
    pub(crate) fence: FencingToken,
    pub(crate) cancel: CancellationToken,
    pub(crate) validity: crate::lease::LeaseValidity,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) tx: Option<JobTx>,
    /// Follow-up jobs, inserted when the attempt completes (see [`JobContext::enqueue`]).
    pub(crate) staged: Vec<NewJob>,
    /// Server-side bound on the handler transaction's idle time: the job's timeout
    /// plus the lease TTL (a transaction older than that belongs to a dead attempt).
    pub(crate) tx_idle_timeout: Duration,
    /// Heartbeats, progress and checkpoints (see [`crate::progress`]).
    pub(crate) live: Liveness,
}

/// What [`JobContext::heartbeat`] and [`JobContext::checkpoint`] need: the attempt's
/// authority, the signals it reads and fires, and what it has written.
pub(crate) struct Liveness {
    /// The lease the attempt runs under (the store's fence, with the owner).
    pub fence: crate::store::Fence,
    /// Fires when the lease keeper fences the partition.
    pub lease_lost: CancellationToken,
    /// Fires when the partition is handed off or the node shuts down (drain).
    pub interrupt: CancellationToken,
    /// Fires when a cancel request is confirmed in the database.
    pub cancel_confirmed: CancellationToken,
    /// Fired here when a heartbeat or checkpoint is rejected: the attempt is dropped.
    pub rejected: CancellationToken,
    /// Told of every heartbeat (the heartbeat-timeout watchdog waits on it).
    pub beaten: Arc<tokio::sync::Notify>,
    /// Set while the handler waits on Warden's own heartbeat/checkpoint statement:
    /// the watchdog does not count that time as the handler's silence (see
    /// [`Liveness::in_write`]).
    pub writing: Arc<std::sync::atomic::AtomicBool>,
    /// The node's register of heartbeating attempts (metrics).
    pub register: Arc<Heartbeats>,
    /// Least time between two heartbeat writes.
    pub write_interval: Duration,
    /// When the last write was sent.
    pub last_write: Option<tokio::time::Instant>,
    /// Progress given since the last write, for the next one.
    pub pending: Option<Progress>,
    /// The checkpoint as last read or written (`None`: not read yet).
    pub checkpoint: Option<Option<serde_json::Value>>,
    /// When a write last landed (and read the cancel request).
    pub recorded: Arc<crate::progress::Recorded>,
}

impl Liveness {
    /// Mark the handler as waiting on Warden's own database write until the guard
    /// drops (also if its future is dropped), then count as a fresh beat.
    ///
    /// Without this, the heartbeat-timeout watchdog charged a slow heartbeat write
    /// (up to `HEARTBEAT_WRITE_TIMEOUT`, 2 s) or checkpoint to the handler: a healthy
    /// handler with a heartbeat timeout under that was aborted as hung by a database
    /// stall. Stalls are the lease keeper's business (and the job's timeout's), not
    /// the hung-handler detector's.
    fn in_write(&self) -> WriteGuard {
        self.writing.store(true, std::sync::atomic::Ordering::Release);
        WriteGuard { writing: self.writing.clone(), beaten: self.beaten.clone() }
    }
}

struct WriteGuard {
    writing: Arc<std::sync::atomic::AtomicBool>,
    beaten: Arc<tokio::sync::Notify>,
}

impl Drop for WriteGuard {
    fn drop(&mut self) {
        self.writing.store(false, std::sync::atomic::Ordering::Release);
        self.beaten.notify_one();
    }
}

/// Longest wait for one heartbeat write: a heartbeat must not hold its handler up
/// for a database stall (the lease keeper deals with those).
const HEARTBEAT_WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait for one try of a checkpoint write: the heartbeat-timeout watchdog
/// does not count the time inside Warden's writes, so each try is bounded here (a
/// timed-out try is ambiguous and retried like any other).
const CHECKPOINT_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Tries of one checkpoint write (or read) on transient errors, while the lease holds.
const CHECKPOINT_TRIES: u32 = 4;
/// Delay between those tries, doubling.
const CHECKPOINT_RETRY: Backoff = Backoff::doubling(Duration::from_millis(100), Duration::from_secs(1));

/// Most follow-up jobs one attempt may stage with [`JobContext::enqueue`].
pub const MAX_STAGED_JOBS: usize = 10_000;

impl JobContext {
    pub fn account(&self) -> &str {
        &self.job.account
    }
    pub fn job_id(&self) -> i64 {
        self.job.id
    }
    pub fn kind(&self) -> &str {
        &self.job.kind
    }
    /// 1 for the first attempt.
    pub fn attempt(&self) -> i32 {
        self.job.attempt
    }
    pub fn max_attempts(&self) -> i32 {
        self.job.max_attempts
    }
    pub fn fence(&self) -> FencingToken {
        self.fence
    }
    /// Fires when this attempt should stop: the job was cancelled (confirmed in the
    /// database, not just notified), its partition is being handed off (drain: the
    /// handler has `drain_timeout` to return; an attempt that stops because of it does
    /// not use up one of the job's attempts), or the lease was lost. Handlers that
    /// check it stop cleanly; the others are aborted after `cancel_grace` or
    /// `drain_timeout`, and after a lost lease are never polled again.
    pub fn cancellation(&self) -> &CancellationToken {
        &self.cancel
    }
    /// How much longer this node may act for the job's partition: the lease's
    /// validity window on the node's monotonic clock, zero once it has closed. Check
    /// it right before an external side effect that must not overlap the next owner's
    /// run (for example, skip or defer a call when less time is left than the call
    /// takes), and pass [`JobContext::fence`] along so the downstream system can reject
    /// a stale writer. The window ends `lease_safety_margin` before the lease can
    /// expire in the database, so no other node can hold the partition while this is
    /// non-zero; see DESIGN §4 for what the remaining window does not cover.
    pub fn lease_remaining(&self) -> Duration {
        self.validity.remaining()
    }
    /// The attempt's database transaction, opened on first use. Its writes commit
    /// in the same transaction as the job's completion — and only if the lease fence
    /// still holds then; on any other outcome they are rolled back.
    ///
    /// PostgreSQL ends the transaction (rolling it back) if it stays idle longer than
    /// the job's timeout plus the lease TTL — by then the attempt is dead anyway — so a
    /// node cut off from the database cannot hold its row locks for the hours TCP
    /// keepalive would take.
    pub async fn tx(&mut self) -> Result<&mut sqlx::PgConnection> {
        if self.tx.is_none() {
            self.tx = Some(self.store.begin(self.tx_idle_timeout).await?);
        }
        Ok(self.tx.as_mut().expect("opened above").conn())
    }
    /// Enqueue a follow-up job (a job chain): it exists if and only if this attempt
    /// completes. The job is *staged* here and inserted when the handler returns
    /// [`Outcome::Done`], in the transaction that records the completion (together
    /// with [`JobContext::tx`]'s writes). So the enqueue's ordering locks on the
    /// target account are held for the milliseconds of that commit, not for the
    /// handler's whole run — holding them that long made every other enqueue of the
    /// account (gRPC, triggers, the application's transactions) wait for the handler.
    /// A delay counts from the insert. If the insert fails, the attempt fails and is
    /// retried. At most [`MAX_STAGED_JOBS`] per attempt.
    pub async fn enqueue(&mut self, job: NewJob) -> Result<()> {
        // Bad input is the handler's to see now, not a failed completion later.
        job.validate()?;
        if self.staged.len() >= MAX_STAGED_JOBS {
            return Err(crate::Error::invalid(format!("an attempt may enqueue at most {MAX_STAGED_JOBS} jobs")));
        }
        self.staged.push(job);
        Ok(())
    }

    /// Say the handler is alive, with its progress, and learn whether it should stop.
    /// Call it every second or so from a long handler (more often costs nothing:
    /// the database is written at most once per `ExecConfig::heartbeat_write_interval`,
    /// with the latest progress). What it does:
    ///
    /// - resets the kind's heartbeat timeout ([`JobOptions::heartbeat_timeout`]);
    /// - records the heartbeat and progress, fenced by the lease epoch (see
    ///   [`crate::progress`]); shown by `GetJob`/`ListJobs` and `warden jobs get`;
    /// - returns [`Heartbeat::Stop`] when the handler should stop: the job was
    ///   cancelled, its partition is being handed off or the node is shutting down
    ///   (checkpoint and return: the next attempt resumes from the checkpoint and this
    ///   one does not count), or the lease is lost (a write the fence rejected: the
    ///   handler is dropped at its next await, nothing more is recorded).
    ///
    /// `Err` only for progress over its limits. A write that fails for another
    /// reason (the database is slow or away) is logged and counted
    /// (`warden_heartbeats_total{outcome="error"}`) and tried again on the next call.
    pub async fn heartbeat(&mut self, progress: Progress) -> Result<Heartbeat> {
        progress.validate()?;
        let now = tokio::time::Instant::now();
        self.live.beaten.notify_one();
        self.live.register.beat(self.job.id, now);
        if !progress.is_empty() {
            self.live.pending = Some(progress);
        }
        if let Some(stop) = self.lease_stop() {
            return Ok(Heartbeat::Stop(stop));
        }
        let due = self.live.last_write.is_none_or(|t| now.duration_since(t) >= self.live.write_interval);
        if due {
            let beat = Beat { progress: self.live.pending.clone(), checkpoint: None };
            let started = tokio::time::Instant::now();
            let in_write = self.live.in_write();
            let written = tokio::time::timeout(HEARTBEAT_WRITE_TIMEOUT, self.write(&beat)).await;
            drop(in_write);
            metrics::histogram!("warden_heartbeat_write_seconds").record(started.elapsed().as_secs_f64());
            let outcome = match written {
                Ok(Ok(())) => {
                    self.live.last_write = Some(now);
                    self.live.pending = None;
                    "recorded"
                }
                Ok(Err(Error::Fenced { .. })) => "fenced",
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, job_id = self.job.id, "heartbeat not recorded; trying again on the next one");
                    "error"
                }
                Err(_) => {
                    tracing::warn!(job_id = self.job.id, "heartbeat write timed out; trying again on the next one");
                    "error"
                }
            };
            metrics::counter!("warden_heartbeats_total", "kind" => self.job.kind.clone(), "outcome" => outcome)
                .increment(1);
        }
        Ok(self.stop_reason().map_or(Heartbeat::Continue, Heartbeat::Stop))
    }

    /// Commit `state` as the job's checkpoint, now, fenced (and as a heartbeat): the
    /// next attempt of this job — after a crash, a handoff, a drain or a retry —
    /// starts with [`JobContext::checkpointed`] returning it. It commits on its own,
    /// apart from [`JobContext::tx`] and the job's completion: checkpoint work whose
    /// effects are already durable (or idempotent), so that resuming from here redoes
    /// nothing that matters.
    ///
    /// At most [`MAX_CHECKPOINT_BYTES`] of JSON. Returns like
    /// [`JobContext::heartbeat`] whether to stop. `Err`: the state is too large or
    /// not storable ([`Error::InvalidInput`]); the lease fence rejected the write
    /// ([`Error::Fenced`]: another owner has the job, stop); or the database failed
    /// on every one of a few tries.
    pub async fn checkpoint<T: Serialize + ?Sized>(&mut self, state: &T) -> Result<Heartbeat> {
        let value =
            serde_json::to_value(state).map_err(|e| Error::invalid(format!("checkpoint does not serialize: {e}")))?;
        let bytes = crate::progress::storable_json("checkpoint", &value)?;
        if bytes > MAX_CHECKPOINT_BYTES {
            return Err(Error::invalid(format!(
                "checkpoint is {bytes} bytes of JSON; the limit is {MAX_CHECKPOINT_BYTES}"
            )));
        }
        let now = tokio::time::Instant::now();
        self.live.beaten.notify_one();
        self.live.register.beat(self.job.id, now);
        let kind = self.job.kind.clone();
        let count = |outcome: &'static str| {
            metrics::counter!("warden_checkpoints_total", "kind" => kind.clone(), "outcome" => outcome).increment(1)
        };
        if let Some(stop) = self.lease_stop() {
            count("fenced");
            return Err(self.fenced_error(stop));
        }
        let beat = Beat { progress: self.live.pending.clone(), checkpoint: Some((value, bytes)) };
        // Its tries and the waits between them are Warden's time, not the handler's.
        let _in_write = self.live.in_write();
        let mut tries = 0;
        loop {
            tries += 1;
            let written = tokio::time::timeout(CHECKPOINT_WRITE_TIMEOUT, self.write(&beat))
                .await
                .unwrap_or(Err(Error::Timeout(CHECKPOINT_WRITE_TIMEOUT)));
            match written {
                Ok(()) => {
                    count("recorded");
                    metrics::histogram!("warden_checkpoint_bytes").record(bytes as f64);
                    self.live.last_write = Some(now);
                    self.live.pending = None;
                    self.live.checkpoint = beat.checkpoint.map(|(v, _)| Some(v));
                    return Ok(self.stop_reason().map_or(Heartbeat::Continue, Heartbeat::Stop));
                }
                Err(e @ Error::Fenced { .. }) => {
                    count("fenced");
                    return Err(e);
                }
                Err(e) if e.is_permanent() || tries >= CHECKPOINT_TRIES || !self.validity.is_valid() => {
                    count("error");
                    return Err(e);
                }
                Err(e) => {
                    // Ambiguous (the reply may be lost after the commit): writing the
                    // same checkpoint again is harmless.
                    tracing::warn!(error = %e, job_id = self.job.id, tries, "checkpoint not recorded; retrying");
                    tokio::time::sleep(CHECKPOINT_RETRY.without_jitter(tries as i32)).await;
                }
            }
        }
    }

    /// The job's last committed checkpoint ([`JobContext::checkpoint`]), whichever
    /// attempt wrote it; `None` if it never checkpointed. Read from the database on
    /// first use. `Err(Error::Undecodable)` if it does not decode as `T` (the
    /// checkpoint's type changed between releases: decode into an enum or
    /// `serde_json::Value` to migrate it).
    pub async fn checkpointed<T: serde::de::DeserializeOwned>(&mut self) -> Result<Option<T>> {
        if self.live.checkpoint.is_none() {
            let _in_read = self.live.in_write();
            let mut tries = 0;
            let stored = loop {
                tries += 1;
                match self.store.checkpoint(self.job.id).await {
                    Ok(c) => break c,
                    Err(e) if e.is_permanent() || tries >= CHECKPOINT_TRIES => return Err(e),
                    Err(e) => {
                        tracing::warn!(error = %e, job_id = self.job.id, tries, "reading the checkpoint failed; retrying");
                        tokio::time::sleep(CHECKPOINT_RETRY.without_jitter(tries as i32)).await;
                    }
                }
            };
            self.live.checkpoint = Some(stored.map(|c| c.state));
        }
        match self.live.checkpoint.as_ref().expect("read above") {
            None => Ok(None),
            Some(v) => serde_json::from_value(v.clone()).map(Some).map_err(|e| {
                Error::Undecodable(format!(
                    "job {}'s checkpoint does not decode as {}: {e}",
                    self.job.id,
                    std::any::type_name::<T>()
                ))
            }),
        }
    }

    /// The nominal time this job was fired for, if a schedule fired it (see
    /// [`crate::scheduler`]): the time the work is *for* ("the report of 10:00"),
    /// which a catch-up or a late fire runs after. `None` for other jobs.
    pub async fn scheduled_at(&self) -> Result<Option<chrono::DateTime<chrono::Utc>>> {
        self.store.fired_for(self.job.id).await
    }

    /// Why the handler should stop, if it should (what [`JobContext::heartbeat`]
    /// returns, read locally without a write).
    pub fn stop_reason(&self) -> Option<StopReason> {
        if let Some(lost) = self.lease_stop() {
            Some(lost)
        } else if self.live.cancel_confirmed.is_cancelled() {
            Some(StopReason::Cancelled)
        } else if self.live.interrupt.is_cancelled() {
            Some(StopReason::Handoff)
        } else {
            None
        }
    }

    /// `Some(LeaseLost)` once the lease is gone, by any sign: the keeper fenced it,
    /// its validity window closed, or a write of this attempt was rejected.
    fn lease_stop(&self) -> Option<StopReason> {
        let lost =
            self.live.lease_lost.is_cancelled() || self.live.rejected.is_cancelled() || !self.validity.is_valid();
        lost.then_some(StopReason::LeaseLost)
    }

    fn fenced_error(&self, _why: StopReason) -> Error {
        Error::Fenced { partition: self.live.fence.partition, epoch: self.live.fence.epoch }
    }

    /// One fenced beat; a rejection drops the attempt, a cancel is passed on.
    async fn write(&mut self, beat: &Beat) -> Result<()> {
        let ack = self.store.beat(self.job.id, self.job.attempt, &self.live.fence, beat).await;
        match ack {
            Ok(BeatAck::Recorded { cancel_requested }) => {
                self.live.recorded.now();
                if cancel_requested {
                    self.live.cancel_confirmed.cancel();
                    self.cancel.cancel();
                }
                Ok(())
            }
            Ok(BeatAck::NotRunning) => {
                tracing::warn!(
                    job_id = self.job.id,
                    "heartbeat found the job no longer running as this attempt: stopping it"
                );
                self.reject();
                Err(self.fenced_error(StopReason::LeaseLost))
            }
            Err(e @ Error::Fenced { .. }) => {
                tracing::warn!(
                    job_id = self.job.id,
                    "heartbeat rejected by the lease fence: another node owns the job now; stopping it"
                );
                metrics::counter!("warden_fenced_writes_total").increment(1);
                self.reject();
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    fn reject(&self) {
        self.live.rejected.cancel();
        self.cancel.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_exponentially_with_bounded_jitter() {
        let b = Backoff { base: Duration::from_millis(100), max: Duration::from_secs(10), jitter: 0.2 };
        let mut rng = fastrand::Rng::with_seed(7);
        for attempt in 1..=12 {
            let raw = Duration::from_millis(100 * (1u64 << (attempt - 1))).min(Duration::from_secs(10));
            for _ in 0..50 {
                let d = b.delay(attempt, &mut rng);
                assert!(d >= raw.mul_f64(0.8) && d <= raw.mul_f64(1.2), "attempt {attempt}: {d:?} vs {raw:?}");
            }
        }
        let none = Backoff { jitter: 0.0, ..b };
        assert_eq!(none.delay(1, &mut rng), Duration::from_millis(100));
        assert_eq!(none.delay(40, &mut rng), Duration::from_secs(10));
    }
}
