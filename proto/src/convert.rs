//! Conversions between the runtime's types and the wire messages, and the one place
//! where runtime errors become `tonic::Status`.

use crate::pb;
use chrono::{DateTime, TimeZone, Utc};
use std::time::Duration;
use tonic::Status;
use warden_runtime::job::{AttemptRow, JobRow, Lane, NewJob};
use warden_runtime::sqlx;
use warden_runtime::{Error, JobProgress};

/// Map a runtime error to a client-facing status without leaking internals.
pub fn status(e: Error) -> Status {
    match e {
        Error::InvalidInput(m) => Status::invalid_argument(m),
        Error::JobNotFound(id) => Status::not_found(format!("job {id} not found")),
        Error::NotInitialised => Status::failed_precondition("cluster schema not initialised"),
        Error::Conflict(m) => Status::aborted(m),
        Error::Timeout(_) => Status::unavailable("database unavailable, try again"),
        Error::Database(ref db) if is_unavailable(db) => {
            tracing::warn!(error = %e, "API request failed: database unavailable");
            Status::unavailable("database unavailable, try again")
        }
        other => {
            tracing::error!(error = %other, "API request failed");
            Status::internal("internal error")
        }
    }
}

/// Whether a database error means "unavailable, try again" (not a bug).
pub fn is_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Tls(_) => true,
        // 57P01 admin shutdown, 57P03 cannot connect now, 08xxx connection exceptions.
        sqlx::Error::Database(d) => d.code().is_some_and(|c| c.starts_with("08") || c == "57P01" || c == "57P03"),
        _ => false,
    }
}

/// Milliseconds since the Unix epoch, as the wire carries times.
pub fn unix_ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

/// A job row as a wire message.
pub fn job(j: &JobRow) -> pb::Job {
    pb::Job {
        id: j.id,
        account: j.account.clone(),
        partition: j.partition as u32,
        kind: j.kind.clone(),
        args_json: j.args.to_string(),
        lane: j.lane.clone(),
        state: j.state.clone(),
        priority: j.priority as i32,
        run_at_unix_ms: unix_ms(j.run_at),
        due_at_unix_ms: unix_ms(j.due_at),
        attempt: j.attempt,
        max_attempts: j.max_attempts,
        unique_key: j.unique_key.clone().unwrap_or_default(),
        node: j.node.clone().unwrap_or_default(),
        epoch: j.epoch.unwrap_or(0),
        created_at_unix_ms: unix_ms(j.created_at),
        finished_at_unix_ms: j.finished_at.map(unix_ms).unwrap_or(0),
        last_error: j.last_error.clone().unwrap_or_default(),
        attempted_at_unix_ms: j.attempted_at.map(unix_ms).unwrap_or(0),
        progress: None,
    }
}

/// A job row with its recorded progress, if any, as a wire message; ages are
/// measured against `read_at` (the database clock at the read).
pub fn job_with_progress(j: &JobRow, progress: Option<&JobProgress>, read_at: DateTime<Utc>) -> pb::Job {
    pb::Job { progress: progress.map(|p| job_progress(p, read_at)), ..job(j) }
}

/// Recorded liveness and progress as a wire message (ages against `read_at`).
pub fn job_progress(p: &JobProgress, read_at: DateTime<Utc>) -> pb::JobProgress {
    // On the wire's millisecond times, so that age = read_at − at holds exactly.
    let age = |t: DateTime<Utc>| (unix_ms(read_at) - unix_ms(t)).max(0);
    pb::JobProgress {
        attempt: p.attempt,
        node: p.node.clone(),
        heartbeat_at_unix_ms: unix_ms(p.heartbeat_at),
        heartbeat_age_ms: age(p.heartbeat_at),
        percent: p.progress.percent,
        message: p.progress.message.clone().unwrap_or_default(),
        details_json: p.progress.details.as_ref().map(|d| d.to_string()).unwrap_or_default(),
        checkpoint_at_unix_ms: p.checkpoint_at.map(unix_ms).unwrap_or(0),
        checkpoint_age_ms: p.checkpoint_at.map(age).unwrap_or(0),
        checkpoint_attempt: p.checkpoint_attempt.unwrap_or(0),
        checkpoint_bytes: p.checkpoint_bytes.unwrap_or(0),
    }
}

/// An attempt row as a wire message.
pub fn attempt(a: &AttemptRow) -> pb::Attempt {
    pb::Attempt {
        attempt: a.attempt,
        node: a.node.clone(),
        epoch: a.epoch,
        started_at_unix_ms: unix_ms(a.started_at),
        finished_at_unix_ms: unix_ms(a.finished_at),
        outcome: a.outcome.clone(),
        error: a.error.clone().unwrap_or_default(),
    }
}

/// Validate and convert a wire job (all checks before the database).
pub fn new_job(j: Option<pb::NewJob>) -> Result<NewJob, Status> {
    let j = j.ok_or_else(|| Status::invalid_argument("job is required"))?;
    let args: serde_json::Value = if j.args_json.trim().is_empty() {
        serde_json::json!({})
    } else {
        if j.args_json.len() > warden_runtime::job::MAX_ARGS_BYTES {
            return Err(Status::invalid_argument(format!(
                "args_json is {} bytes; the limit is {}",
                j.args_json.len(),
                warden_runtime::job::MAX_ARGS_BYTES
            )));
        }
        serde_json::from_str(&j.args_json)
            .map_err(|e| Status::invalid_argument(format!("args_json is not valid JSON: {e}")))?
    };
    let mut job = NewJob::new(j.account, j.kind, args).map_err(status)?;
    if j.run_at_unix_ms != 0 {
        let at = Utc
            .timestamp_millis_opt(j.run_at_unix_ms)
            .single()
            .ok_or_else(|| Status::invalid_argument("run_at_unix_ms is out of range"))?;
        job = job.run_at(at);
    } else if j.delay_ms != 0 {
        job = job.delay(Duration::from_millis(j.delay_ms));
    }
    let priority = i16::try_from(j.priority).map_err(|_| Status::invalid_argument("priority must fit in 16 bits"))?;
    job = job.priority(priority);
    if j.max_attempts < 0 {
        return Err(Status::invalid_argument("max_attempts must not be negative"));
    }
    if j.max_attempts != 0 {
        job = job.max_attempts(j.max_attempts);
    }
    if j.timeout_ms != 0 {
        job = job.timeout(Duration::from_millis(j.timeout_ms));
    }
    if !j.unique_key.is_empty() {
        job = job.unique_key(j.unique_key);
    }
    if !j.lane.is_empty() {
        let lane = Lane::parse(&j.lane).ok_or_else(|| Status::invalid_argument("lane must be serial or unordered"))?;
        job = job.lane(lane);
    }
    job.validate().map_err(status)?;
    Ok(job)
}
