//! Long-running jobs: heartbeats, progress and checkpoints.
//!
//! A handler that runs for minutes or hours calls [`JobContext::heartbeat`] every so
//! often (say every second) with its [`Progress`], and [`JobContext::checkpoint`]
//! with the small state it would need to resume. Both are *fenced* writes, like
//! every executor write: they land only while this node still holds the job's
//! partition lease at the attempt's epoch and the job is still `running` as this
//! attempt (`store/sql/job_beat.sql`). The next attempt of the job — after a crash,
//! a handoff, a drain or a retry — reads the last committed checkpoint back with
//! [`JobContext::checkpointed`].
//!
//! What a heartbeat does:
//! - proves the handler is alive to the kind's heartbeat timeout
//!   ([`crate::JobOptions::heartbeat_timeout`]): a handler silent for longer is
//!   aborted and its attempt recorded as a `timeout` (retried like one);
//! - records liveness and progress for `GetJob`/`ListJobs`, the CLI and the metrics —
//!   written to the database at most once per [`ExecConfig::heartbeat_write_interval`]
//!   (the latest progress is what the next write carries), so calling it in a tight
//!   loop costs nothing;
//! - answers whether the handler should stop ([`Heartbeat::Stop`] with a
//!   [`StopReason`]): a confirmed cancel (the write reads `cancel_requested`, so
//!   heartbeating jobs see a cancel within one write interval), a handoff or shutdown
//!   (drain), or a lost lease. A write the fence rejects means another owner has the
//!   job: the handler is dropped at its next await, and nothing it does after that
//!   is recorded.
//!
//! Checkpoints are written at once (never skipped), at most
//! [`MAX_CHECKPOINT_BYTES`] of JSON, and count as a heartbeat. They are separate from
//! the job's final transaction: a checkpoint commits on its own, whatever the
//! attempt's outcome, so a resumed attempt redoes at most the work since it.
//!
//! Attempts and stops: an attempt that *returns* after a handoff or shutdown told
//! it to stop is recorded `interrupted` and gives its attempt back, so long jobs
//! moved around by deploys and scaling never run out of attempts. A crash of the
//! node (its lease expires; the next owner rescues the attempt) counts as an
//! attempt, like a failure: a job whose handler keeps killing its node is given up
//! after `max_attempts`.
//!
//! [`JobContext::heartbeat`]: crate::JobContext::heartbeat
//! [`JobContext::checkpoint`]: crate::JobContext::checkpoint
//! [`JobContext::checkpointed`]: crate::JobContext::checkpointed
//! [`ExecConfig::heartbeat_write_interval`]: crate::ExecConfig::heartbeat_write_interval

use crate::error::{Error, Result};
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// Largest checkpoint, in bytes of JSON.
pub const MAX_CHECKPOINT_BYTES: usize = 256 * 1024;
/// Largest progress message, in bytes.
pub const MAX_PROGRESS_MESSAGE_BYTES: usize = 1024;
/// Largest progress details, in bytes of JSON.
pub const MAX_PROGRESS_DETAILS_BYTES: usize = 4 * 1024;
/// The shortest heartbeat timeout a kind may set.
pub const MIN_HEARTBEAT_TIMEOUT: Duration = Duration::from_millis(100);

/// What a handler reports about how far it got. Every field is optional.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    /// 0.0 ..= 100.0
    pub percent: Option<f32>,
    /// A line for people (`warden jobs get`), at most [`MAX_PROGRESS_MESSAGE_BYTES`].
    pub message: Option<String>,
    /// Small JSON for programs, at most [`MAX_PROGRESS_DETAILS_BYTES`].
    pub details: Option<serde_json::Value>,
}

impl Progress {
    /// No progress figures: a bare liveness beat.
    pub fn none() -> Self {
        Self::default()
    }
    /// `percent` done (0 ..= 100).
    pub fn percent(percent: f32) -> Self {
        Self { percent: Some(percent), ..Self::default() }
    }
    /// `done` of `total` units, as a percentage (and the message "done/total").
    pub fn of(done: u64, total: u64) -> Self {
        let percent = if total == 0 { 100.0 } else { (done.min(total) as f64 * 100.0 / total as f64) as f32 };
        Self { percent: Some(percent), message: Some(format!("{done}/{total}")), details: None }
    }
    pub fn with_message(mut self, message: impl Into<String>) -> Self {
        self.message = Some(message.into());
        self
    }
    pub fn with_details(mut self, details: serde_json::Value) -> Self {
        self.details = Some(details);
        self
    }
    pub fn is_empty(&self) -> bool {
        self.percent.is_none() && self.message.is_none() && self.details.is_none()
    }

    /// Check the limits; the error names the field.
    pub fn validate(&self) -> Result<()> {
        if let Some(p) = self.percent {
            if !(0.0..=100.0).contains(&p) {
                return Err(Error::invalid(format!("progress percent must be within 0..=100, got {p}")));
            }
        }
        if let Some(m) = &self.message {
            if m.len() > MAX_PROGRESS_MESSAGE_BYTES {
                return Err(Error::invalid(format!(
                    "progress message is {} bytes; the limit is {MAX_PROGRESS_MESSAGE_BYTES}",
                    m.len()
                )));
            }
            if m.contains('\0') {
                return Err(Error::invalid("progress message must not contain NUL"));
            }
        }
        if let Some(d) = &self.details {
            let len = storable_json("progress details", d)?;
            if len > MAX_PROGRESS_DETAILS_BYTES {
                return Err(Error::invalid(format!(
                    "progress details are {len} bytes of JSON; the limit is {MAX_PROGRESS_DETAILS_BYTES}"
                )));
            }
        }
        Ok(())
    }
}

/// Deepest nesting of arrays and objects in progress details and checkpoints.
///
/// serde_json refuses to *decode* JSON nested deeper than 128 levels (its recursion
/// limit), while serializing it and storing it as `jsonb` both succeed. Such a value
/// is small (200 levels are 400 bytes), so the size limits let it through, and once
/// stored it could never be read back: the next attempt's `checkpointed()` failed
/// for good, and so did `job_progress` (GetJob, and ListJobs for a whole page).
/// Refuse it on write, well below serde_json's limit.
pub const MAX_JSON_DEPTH: usize = 64;

/// Can PostgreSQL store this JSON as `jsonb`, and can it be decoded again? (No NUL in
/// any string or key: jsonb rejects `\u0000`, and a write it rejects would be
/// rejected every time; nesting at most [`MAX_JSON_DEPTH`].) Returns its length in
/// bytes.
pub(crate) fn storable_json(what: &str, v: &serde_json::Value) -> Result<usize> {
    enum Bad {
        Nul,
        Deep,
    }
    // Recursion bounded by MAX_JSON_DEPTH: a value nested deeper is refused before
    // the walk (or `to_string`, which recurses without a bound) can go further.
    fn check(v: &serde_json::Value, depth: usize) -> std::result::Result<(), Bad> {
        match v {
            serde_json::Value::String(s) if s.contains('\0') => Err(Bad::Nul),
            serde_json::Value::Array(_) | serde_json::Value::Object(_) if depth >= MAX_JSON_DEPTH => Err(Bad::Deep),
            serde_json::Value::Array(a) => a.iter().try_for_each(|v| check(v, depth + 1)),
            serde_json::Value::Object(o) => {
                o.iter().try_for_each(|(k, v)| if k.contains('\0') { Err(Bad::Nul) } else { check(v, depth + 1) })
            }
            _ => Ok(()),
        }
    }
    match check(v, 0) {
        Err(Bad::Nul) => {
            Err(Error::invalid(format!("{what} must not contain NUL characters (PostgreSQL jsonb cannot store them)")))
        }
        Err(Bad::Deep) => Err(Error::invalid(format!(
            "{what} is nested more than {MAX_JSON_DEPTH} levels deep (it could not be decoded again)"
        ))),
        Ok(()) => Ok(v.to_string().len()),
    }
}

/// What [`crate::JobContext::heartbeat`] tells the handler.
#[must_use = "a heartbeat says whether the handler should stop"]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heartbeat {
    /// Keep going.
    Continue,
    /// Stop now: checkpoint if you can and return (see [`StopReason`]).
    Stop(StopReason),
}

impl Heartbeat {
    pub fn should_stop(&self) -> bool {
        matches!(self, Heartbeat::Stop(_))
    }
}

/// Why a running handler is told to stop. It is also an error, so a handler can
/// `return Err(reason.into())`: the attempt is then recorded as the reason says
/// (a handoff gives the attempt back; a cancel cancels the job).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StopReason {
    /// Someone cancelled the job (confirmed in the database).
    #[error("stopped: the job was cancelled")]
    Cancelled,
    /// Its partition is moving to another node, or this node is shutting down: the
    /// next owner runs the job again (from its last checkpoint), and this attempt
    /// does not count if the handler returns within the drain timeout.
    #[error("stopped: the job's partition is being handed off (drain or shutdown)")]
    Handoff,
    /// This node no longer holds the job's partition lease: nothing the handler does
    /// from now on is recorded.
    #[error("stopped: this node lost the job's partition lease")]
    LeaseLost,
}

/// A checkpoint as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredCheckpoint {
    pub state: serde_json::Value,
    /// When it was committed (database clock).
    pub at: DateTime<Utc>,
    /// The attempt that wrote it.
    pub attempt: i32,
}

/// A job's liveness and progress as last recorded (for `GetJob`, `ListJobs`, the CLI).
#[derive(Debug, Clone, PartialEq)]
pub struct JobProgress {
    /// The attempt that wrote last.
    pub attempt: i32,
    pub node: String,
    pub heartbeat_at: DateTime<Utc>,
    pub progress: Progress,
    pub checkpoint_at: Option<DateTime<Utc>>,
    pub checkpoint_attempt: Option<i32>,
    pub checkpoint_bytes: Option<i32>,
}

/// One fenced write of a running attempt: a heartbeat, with progress and optionally
/// a checkpoint.
#[derive(Debug, Clone, Default)]
pub struct Beat {
    /// Replace the recorded progress with this (`None`: keep it).
    pub progress: Option<Progress>,
    /// Commit this checkpoint (already validated; its JSON length in bytes).
    pub checkpoint: Option<(serde_json::Value, usize)>,
}

/// What a fenced beat found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BeatAck {
    /// Recorded; whether a cancel has been requested.
    Recorded { cancel_requested: bool },
    /// The fence holds but the job no longer runs as this attempt (it finished, or
    /// an operator changed it): this attempt must stop and record nothing.
    NotRunning,
}

/// When an attempt's heartbeat write last landed, on the monotonic clock (the cancel
/// poll skips its read while one is fresh: the write read `cancel_requested`).
#[derive(Debug)]
pub struct Recorded {
    base: Instant,
    /// Milliseconds after `base` + 1; 0: never.
    at_ms: std::sync::atomic::AtomicU64,
}

impl Default for Recorded {
    fn default() -> Self {
        Self { base: Instant::now(), at_ms: std::sync::atomic::AtomicU64::new(0) }
    }
}

impl Recorded {
    pub(crate) fn now(&self) {
        let ms = Instant::now().duration_since(self.base).as_millis() as u64 + 1;
        self.at_ms.store(ms, std::sync::atomic::Ordering::Release);
    }
    /// Did a write land within the last `d`?
    pub(crate) fn within(&self, d: Duration) -> bool {
        match self.at_ms.load(std::sync::atomic::Ordering::Acquire) {
            0 => false,
            ms => Instant::now().duration_since(self.base + Duration::from_millis(ms - 1)) < d,
        }
    }
}

/// The node's register of attempts that heartbeat: for the metrics
/// (`warden_heartbeating_attempts`, `warden_heartbeat_age_max_seconds`).
#[derive(Debug, Default)]
pub struct Heartbeats {
    last: Mutex<HashMap<i64, Instant>>,
}

impl Heartbeats {
    pub(crate) fn beat(&self, job_id: i64, now: Instant) {
        self.last.lock().expect("heartbeats lock").insert(job_id, now);
    }
    pub(crate) fn ended(&self, job_id: i64) {
        self.last.lock().expect("heartbeats lock").remove(&job_id);
    }
    /// Attempts running here that have heartbeated, and the longest time since one
    /// of them last did.
    pub fn snapshot(&self, now: Instant) -> (usize, Duration) {
        let last = self.last.lock().expect("heartbeats lock");
        let oldest = last.values().map(|t| now.saturating_duration_since(*t)).max().unwrap_or_default();
        (last.len(), oldest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_limits_name_the_field() {
        assert!(Progress::percent(50.0).validate().is_ok());
        assert!(Progress::none().validate().is_ok());
        for bad in [-0.1, 100.5, f32::NAN, f32::INFINITY] {
            let e = Progress::percent(bad).validate().unwrap_err().to_string();
            assert!(e.contains("percent"), "{e}");
        }
        let e = Progress::none().with_message("x".repeat(MAX_PROGRESS_MESSAGE_BYTES + 1)).validate().unwrap_err();
        assert!(e.to_string().contains("message"), "{e}");
        let e = Progress::none().with_message("a\0b").validate().unwrap_err();
        assert!(e.to_string().contains("NUL"), "{e}");
        let big = serde_json::json!({ "k": "x".repeat(MAX_PROGRESS_DETAILS_BYTES) });
        let e = Progress::none().with_details(big).validate().unwrap_err();
        assert!(e.to_string().contains("details"), "{e}");
        let nul = serde_json::json!({ "k": ["ok", { "a\0": 1 }] });
        let e = Progress::none().with_details(nul).validate().unwrap_err();
        assert!(e.to_string().contains("NUL"), "{e}");
        // Nesting: up to MAX_JSON_DEPTH levels is fine, one more is refused.
        let nest = |depth: usize| (0..depth).fold(serde_json::json!(1), |v, _| serde_json::json!([v]));
        assert!(Progress::none().with_details(nest(MAX_JSON_DEPTH)).validate().is_ok());
        let e = Progress::none().with_details(nest(MAX_JSON_DEPTH + 1)).validate().unwrap_err();
        assert!(e.to_string().contains("nested"), "{e}");
        let deep_value = serde_json::to_string(&nest(MAX_JSON_DEPTH)).unwrap();
        assert!(serde_json::from_str::<serde_json::Value>(&deep_value).is_ok(), "the deepest accepted value decodes");
    }

    #[test]
    fn progress_of_counts_is_a_bounded_percentage() {
        assert_eq!(Progress::of(1, 4).percent, Some(25.0));
        assert_eq!(Progress::of(9, 4).percent, Some(100.0));
        assert_eq!(Progress::of(0, 0).percent, Some(100.0));
        assert_eq!(Progress::of(3, 7).message.as_deref(), Some("3/7"));
        assert!(Progress::of(u64::MAX, u64::MAX).validate().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_recorded_write_is_fresh_for_the_given_time() {
        let r = Recorded::default();
        assert!(!r.within(Duration::from_secs(2)), "never written");
        r.now();
        assert!(r.within(Duration::from_secs(2)));
        tokio::time::advance(Duration::from_millis(2500)).await;
        assert!(!r.within(Duration::from_secs(2)));
    }

    #[test]
    fn heartbeat_register_reports_the_oldest_beat() {
        let h = Heartbeats::default();
        let t0 = Instant::now();
        assert_eq!(h.snapshot(t0), (0, Duration::ZERO));
        h.beat(1, t0);
        h.beat(2, t0 + Duration::from_secs(3));
        assert_eq!(h.snapshot(t0 + Duration::from_secs(5)), (2, Duration::from_secs(5)));
        h.ended(1);
        assert_eq!(h.snapshot(t0 + Duration::from_secs(5)), (1, Duration::from_secs(2)));
    }
}
