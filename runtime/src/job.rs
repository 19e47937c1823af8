//! Jobs: the row, its states and lanes, the enqueue request, and input limits.
//!
//! Limits are enforced here, before anything reaches the database; the SQL
//! function `warden.enqueue` enforces the same limits for trigger enqueues.

use crate::error::{Error, Result};
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::time::Duration;

/// Maximum account id length in bytes.
pub const MAX_ACCOUNT_BYTES: usize = 256;
/// Maximum job kind length in bytes.
pub const MAX_KIND_BYTES: usize = 128;
/// Maximum serialized args size in bytes.
pub const MAX_ARGS_BYTES: usize = 64 * 1024;
/// Maximum unique key length in bytes.
pub const MAX_UNIQUE_KEY_BYTES: usize = 256;
/// Maximum attempts a job may be given.
pub const MAX_MAX_ATTEMPTS: i32 = 1000;
/// Maximum per-job timeout.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// Maximum jobs in one batch enqueue through the library (the gRPC API allows fewer:
/// `api::MAX_API_ENQUEUE_BATCH`).
pub const MAX_ENQUEUE_BATCH: usize = 10_000;
/// Latest a job may be scheduled (`delay`, or `run_at` from now), and the longest
/// retry or snooze delay a handler's outcome is clamped to. The SQL function and the
/// `jobs_times_decodable` constraint (migration 0003) hold the same line: every
/// stored time stays inside what chrono can decode.
pub const MAX_DELAY: Duration = Duration::from_secs(3650 * 24 * 3600);
/// Earliest `run_at` accepted (the Unix epoch).
pub const MIN_RUN_AT_UNIX_S: i64 = 0;
/// Longest error text stored per attempt; longer text is cut at a character boundary.
pub const MAX_ERROR_BYTES: usize = 4096;
/// How long an idempotency key is kept unless the job says otherwise.
pub const DEFAULT_IDEMPOTENCY_KEEP: Duration = Duration::from_secs(7 * 24 * 3600);

/// Lifecycle state of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Not yet due when enqueued (run_at in the future).
    Scheduled,
    Available,
    Running,
    /// Failed an attempt; waits for its backoff (`due_at`).
    Retryable,
    Completed,
    Discarded,
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 7] = [
        JobState::Scheduled,
        JobState::Available,
        JobState::Running,
        JobState::Retryable,
        JobState::Completed,
        JobState::Discarded,
        JobState::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Scheduled => "scheduled",
            JobState::Available => "available",
            JobState::Running => "running",
            JobState::Retryable => "retryable",
            JobState::Completed => "completed",
            JobState::Discarded => "discarded",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Completed, discarded and cancelled jobs never run again (unless retried by an operator).
    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Completed | JobState::Discarded | JobState::Cancelled)
    }
}

/// Ordering lane of a job within its account.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Lane {
    /// One at a time, in (run_at, id) order; a failing head blocks the jobs behind it.
    #[default]
    Serial,
    /// Runs on the account's actor when due, without blocking or being blocked by order.
    Unordered,
}

impl Lane {
    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Serial => "serial",
            Lane::Unordered => "unordered",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "serial" => Some(Lane::Serial),
            "unordered" => Some(Lane::Unordered),
            _ => None,
        }
    }
}

/// A job row as stored.
#[derive(Debug, Clone, sqlx::FromRow, Serialize)]
pub struct JobRow {
    pub id: i64,
    pub account: String,
    pub partition: i32,
    pub kind: String,
    pub args: serde_json::Value,
    pub lane: String,
    pub state: String,
    pub priority: i16,
    pub run_at: DateTime<Utc>,
    pub due_at: DateTime<Utc>,
    pub attempt: i32,
    pub max_attempts: i32,
    pub timeout_ms: i32,
    pub unique_key: Option<String>,
    pub epoch: Option<i64>,
    pub node: Option<String>,
    pub cancel_requested: bool,
    pub created_at: DateTime<Utc>,
    pub attempted_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
}

impl JobRow {
    pub fn state(&self) -> Option<JobState> {
        JobState::parse(&self.state)
    }
}

/// One recorded attempt (the audit trail).
#[derive(Debug, Clone, sqlx::FromRow, Serialize)]
pub struct AttemptRow {
    pub id: i64,
    pub job_id: i64,
    pub account: String,
    pub partition: i32,
    pub attempt: i32,
    pub node: String,
    pub epoch: i64,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub outcome: String,
    pub error: Option<String>,
}

/// When a new job becomes due.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Schedule {
    #[default]
    Now,
    At(DateTime<Utc>),
    After(Duration),
}

/// A request to enqueue one job. Build with [`NewJob::new`] and the `with_*` methods.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub account: String,
    pub kind: String,
    pub args: serde_json::Value,
    pub schedule: Schedule,
    pub priority: i16,
    /// `None`: the kind's registered default (or 25 if enqueued where no handler is known).
    pub max_attempts: Option<i32>,
    pub timeout: Option<Duration>,
    pub unique_key: Option<String>,
    pub lane: Lane,
    /// Enqueue this job at most once per (account, key) for as long as the key is
    /// kept, whatever becomes of the job (see [`NewJob::idempotency_key`]).
    pub idempotency_key: Option<String>,
    /// How long the idempotency key is kept (`None`: [`DEFAULT_IDEMPOTENCY_KEEP`]).
    pub idempotency_keep: Option<Duration>,
}

impl NewJob {
    /// A job for `account` of `kind` with `args` serialized to JSON.
    pub fn new(account: impl Into<String>, kind: impl Into<String>, args: impl Serialize) -> Result<Self> {
        let args =
            serde_json::to_value(args).map_err(|e| Error::invalid(format!("args do not serialize to JSON: {e}")))?;
        Ok(Self {
            account: account.into(),
            kind: kind.into(),
            args,
            schedule: Schedule::Now,
            priority: 0,
            max_attempts: None,
            timeout: None,
            unique_key: None,
            lane: Lane::Serial,
            idempotency_key: None,
            idempotency_keep: None,
        })
    }

    pub fn run_at(mut self, at: DateTime<Utc>) -> Self {
        self.schedule = Schedule::At(at);
        self
    }
    pub fn delay(mut self, d: Duration) -> Self {
        self.schedule = Schedule::After(d);
        self
    }
    pub fn priority(mut self, p: i16) -> Self {
        self.priority = p;
        self
    }
    pub fn max_attempts(mut self, n: i32) -> Self {
        self.max_attempts = Some(n);
        self
    }
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = Some(t);
        self
    }
    pub fn unique_key(mut self, k: impl Into<String>) -> Self {
        self.unique_key = Some(k.into());
        self
    }
    pub fn lane(mut self, lane: Lane) -> Self {
        self.lane = lane;
        self
    }
    /// Enqueue at most once per `(account, key)` while the key is kept
    /// ([`DEFAULT_IDEMPOTENCY_KEEP`], or [`NewJob::idempotency_keep`]): another enqueue
    /// with the same key returns the first job's id (`Enqueued::duplicate`) and
    /// enqueues nothing — even after that job completed, failed or was pruned. Unlike
    /// [`NewJob::unique_key`], which dedups only while a job with the key is
    /// unfinished. The two cannot be combined. Also from SQL:
    /// `warden.enqueue_idempotent(account, kind, key, args, …)`.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }
    /// How long this job's idempotency key is kept (at most [`MAX_DELAY`]).
    pub fn idempotency_keep(mut self, keep: Duration) -> Self {
        self.idempotency_keep = Some(keep);
        self
    }
    /// The idempotency key's lifetime in whole milliseconds, defaulted.
    pub fn idempotency_keep_ms(&self) -> i64 {
        crate::store::ms(self.idempotency_keep.unwrap_or(DEFAULT_IDEMPOTENCY_KEEP))
    }

    /// Check every limit; the error names the field and the limit.
    pub fn validate(&self) -> Result<()> {
        validate_name("account", &self.account, MAX_ACCOUNT_BYTES)?;
        validate_name("kind", &self.kind, MAX_KIND_BYTES)?;
        let args_len = self.args.to_string().len();
        if args_len > MAX_ARGS_BYTES {
            return Err(Error::invalid(format!("args are {args_len} bytes of JSON; the limit is {MAX_ARGS_BYTES}")));
        }
        if let Some(k) = &self.unique_key {
            validate_name("unique_key", k, MAX_UNIQUE_KEY_BYTES)?;
        }
        if let Some(k) = &self.idempotency_key {
            validate_name("idempotency_key", k, MAX_UNIQUE_KEY_BYTES)?;
            if self.unique_key.is_some() {
                return Err(Error::invalid(
                    "a job has a unique_key or an idempotency_key, not both (the idempotency key already dedups)",
                ));
            }
        }
        if let Some(keep) = self.idempotency_keep {
            if self.idempotency_key.is_none() {
                return Err(Error::invalid("idempotency_keep is set without an idempotency_key"));
            }
            if keep < Duration::from_millis(1) || keep > MAX_DELAY {
                return Err(Error::invalid(format!(
                    "idempotency_keep must be between 1ms and {} days, got {keep:?}",
                    MAX_DELAY.as_secs() / 86400
                )));
            }
        }
        if let Some(n) = self.max_attempts {
            if !(1..=MAX_MAX_ATTEMPTS).contains(&n) {
                return Err(Error::invalid(format!("max_attempts must be between 1 and {MAX_MAX_ATTEMPTS}, got {n}")));
            }
        }
        if let Some(t) = self.timeout {
            if t.is_zero() || t > MAX_TIMEOUT {
                return Err(Error::invalid(format!(
                    "timeout must be between 1ms and {}s, got {t:?}",
                    MAX_TIMEOUT.as_secs()
                )));
            }
        }
        match self.schedule {
            Schedule::Now => {}
            Schedule::After(d) => {
                if d > MAX_DELAY {
                    return Err(Error::invalid(format!("delay must be at most {} days", MAX_DELAY.as_secs() / 86400)));
                }
            }
            Schedule::At(t) => {
                let latest = Utc::now() + chrono::Duration::from_std(MAX_DELAY).expect("fits");
                if t.timestamp() < MIN_RUN_AT_UNIX_S || t > latest {
                    return Err(Error::invalid(format!(
                        "run_at must be between 1970-01-01 and {} days from now, got {t}",
                        MAX_DELAY.as_secs() / 86400
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Make free text (a handler's error, a discard reason, a panic message) storable:
/// PostgreSQL text cannot hold NUL, and one attempt's error is bounded. A finish
/// whose text PostgreSQL rejects would be rejected on every retry, stalling the
/// account for good.
pub fn storable_text(s: &str) -> String {
    let mut out: String = s.replace('\0', "\u{fffd}");
    if out.len() > MAX_ERROR_BYTES {
        let mut cut = MAX_ERROR_BYTES - 3;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push_str("...");
    }
    out
}

/// Validate an identifier-like string: non-empty, at most `max` bytes, no control characters.
pub fn validate_name(field: &str, value: &str, max: usize) -> Result<()> {
    if value.is_empty() {
        return Err(Error::invalid(format!("{field} must not be empty")));
    }
    if value.len() > max {
        return Err(Error::invalid(format!("{field} is {} bytes; the limit is {max}", value.len())));
    }
    if let Some(c) = value.chars().find(|c| c.is_control()) {
        return Err(Error::invalid(format!("{field} contains a control character ({:?})", c)));
    }
    Ok(())
}

/// Result of an enqueue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Enqueued {
    pub id: i64,
    /// True when an unfinished job with the same (account, unique_key) already existed;
    /// `id` is then that job's id and nothing new was inserted.
    pub duplicate: bool,
}

/// Result of a cancel request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum CancelResult {
    /// The job was queued and is now cancelled.
    Cancelled,
    /// The job is running; its handler is asked to stop and the attempt is aborted after a grace.
    CancelRequested,
    /// The job had already finished in this state.
    AlreadyFinished { state: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> NewJob {
        NewJob::new("acct", "kind", serde_json::json!({"a": 1})).unwrap()
    }

    #[test]
    fn accepts_reasonable_input() {
        job().validate().unwrap();
        job().unique_key("k").max_attempts(3).timeout(Duration::from_secs(1)).validate().unwrap();
    }

    #[test]
    fn rejects_bad_names() {
        let mut j = job();
        j.account = String::new();
        assert!(j.validate().unwrap_err().to_string().contains("account must not be empty"));
        j.account = "a".repeat(257);
        assert!(j.validate().unwrap_err().to_string().contains("limit is 256"));
        j.account = "a\u{0}b".into();
        assert!(j.validate().unwrap_err().to_string().contains("control character"));
        let mut j = job();
        j.kind = "k\n".into();
        assert!(j.validate().unwrap_err().to_string().contains("kind contains a control"));
    }

    #[test]
    fn rejects_oversized_args_and_bad_options() {
        let big = "x".repeat(MAX_ARGS_BYTES);
        let j = NewJob::new("a", "k", serde_json::json!({ "big": big })).unwrap();
        assert!(j.validate().unwrap_err().to_string().contains("args are"));
        assert!(job().max_attempts(0).validate().is_err());
        assert!(job().max_attempts(1001).validate().is_err());
        assert!(job().timeout(Duration::ZERO).validate().is_err());
        assert!(job().unique_key("").validate().is_err());
    }

    #[test]
    fn rejects_times_rust_cannot_store_or_decode() {
        let far = Utc::now() + chrono::Duration::days(3651);
        assert!(job().run_at(far).validate().unwrap_err().to_string().contains("run_at must be between"));
        let before_epoch = DateTime::<Utc>::from_timestamp(-1, 0).unwrap();
        assert!(job().run_at(before_epoch).validate().is_err());
        assert!(job().run_at(DateTime::<Utc>::MAX_UTC).validate().is_err());
        assert!(job().run_at(DateTime::<Utc>::MIN_UTC).validate().is_err());
        job().run_at(Utc::now() + chrono::Duration::days(3649)).validate().unwrap();
        assert!(job().delay(MAX_DELAY + Duration::from_secs(1)).validate().is_err());
        assert!(job().delay(Duration::MAX).validate().is_err());
        job().delay(MAX_DELAY).validate().unwrap();
    }

    #[test]
    fn storable_text_drops_nul_and_bounds_length() {
        assert_eq!(storable_text("a\0b"), "a\u{fffd}b");
        let long = "é".repeat(MAX_ERROR_BYTES);
        let s = storable_text(&long);
        assert!(s.len() <= MAX_ERROR_BYTES && s.ends_with("..."), "{}", s.len());
        assert_eq!(storable_text("fine"), "fine");
    }

    #[test]
    fn states_round_trip() {
        for s in JobState::ALL {
            assert_eq!(JobState::parse(s.as_str()), Some(s));
        }
        assert!(JobState::Completed.is_terminal() && !JobState::Retryable.is_terminal());
    }
}
