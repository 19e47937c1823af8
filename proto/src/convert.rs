//! Conversions between the runtime's types and the wire messages, and the one place
//! where runtime errors become `tonic::Status`.

use crate::pb;
use chrono::{DateTime, TimeZone, Utc};
use std::time::Duration;
use tonic::Status;
use warden_runtime::job::{AttemptRow, JobRow, Lane, NewJob};
use warden_runtime::scheduler::{CatchUp, Overlap, ScheduleDef, ScheduleRow, Timing, DEFAULT_CATCHUP_WINDOW};
use warden_runtime::sqlx;
use warden_runtime::{Error, JobProgress};

/// Map a runtime error to a client-facing status without leaking internals.
pub fn status(e: Error) -> Status {
    match e {
        Error::InvalidInput(m) => Status::invalid_argument(m),
        Error::JobNotFound(id) => Status::not_found(format!("job {id} not found")),
        e @ Error::ScheduleNotFound { .. } => Status::not_found(e.to_string()),
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
    let args = args_json("args_json", &j.args_json)?;
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
    if !j.idempotency_key.is_empty() {
        job = job.idempotency_key(j.idempotency_key);
    }
    if j.idempotency_keep_ms != 0 {
        job = job.idempotency_keep(Duration::from_millis(j.idempotency_keep_ms));
    }
    job.validate().map_err(status)?;
    Ok(job)
}

/// JSON args from the wire: empty is `{}`, the size is checked before parsing.
fn args_json(field: &str, text: &str) -> Result<serde_json::Value, Status> {
    if text.trim().is_empty() {
        return Ok(serde_json::json!({}));
    }
    if text.len() > warden_runtime::job::MAX_ARGS_BYTES {
        return Err(Status::invalid_argument(format!(
            "{field} is {} bytes; the limit is {}",
            text.len(),
            warden_runtime::job::MAX_ARGS_BYTES
        )));
    }
    serde_json::from_str(text).map_err(|e| Status::invalid_argument(format!("{field} is not valid JSON: {e}")))
}

/// A wire time (Unix ms); 0 is none.
fn time_opt(field: &str, unix_ms: i64) -> Result<Option<DateTime<Utc>>, Status> {
    if unix_ms == 0 {
        return Ok(None);
    }
    Utc.timestamp_millis_opt(unix_ms)
        .single()
        .map(Some)
        .ok_or_else(|| Status::invalid_argument(format!("{field} is out of range")))
}

/// Validate and convert a wire schedule definition (every check of the engine, before
/// the database; its messages name the field).
pub fn schedule_def(d: Option<pb::ScheduleDefinition>) -> Result<ScheduleDef, Status> {
    let d = d.ok_or_else(|| Status::invalid_argument("schedule is required"))?;
    let args = args_json("args_json", &d.args_json)?;
    let timing = match (d.cron.is_empty(), d.every_ms) {
        (false, 0) => Timing::Cron(d.cron),
        (true, every_ms) if every_ms != 0 => Timing::Every {
            every: Duration::from_millis(every_ms),
            anchor: time_opt("anchor_unix_ms", d.anchor_unix_ms)?.unwrap_or(DateTime::UNIX_EPOCH),
        },
        (true, _) => return Err(Status::invalid_argument("a schedule needs a timing: cron or every_ms")),
        (false, _) => return Err(Status::invalid_argument("a schedule has cron or every_ms, not both")),
    };
    if d.anchor_unix_ms != 0 && matches!(timing, Timing::Cron(_)) {
        return Err(Status::invalid_argument("anchor_unix_ms is for interval schedules (every_ms) only"));
    }
    let mut def = match timing {
        Timing::Cron(c) => ScheduleDef::cron(d.account, d.name, c, d.kind, args),
        Timing::Every { every, anchor } => {
            ScheduleDef::every(d.account, d.name, every, d.kind, args).map(|s| s.anchor(anchor))
        }
    }
    .map_err(status)?;
    if !d.zone.is_empty() {
        def = def.zone(d.zone);
    }
    def = def.jitter(Duration::from_millis(d.jitter_ms));
    if let Some(t) = time_opt("start_unix_ms", d.start_unix_ms)? {
        def = def.start(t);
    }
    if let Some(t) = time_opt("end_unix_ms", d.end_unix_ms)? {
        def = def.end(t);
    }
    if !d.lane.is_empty() {
        let lane = Lane::parse(&d.lane).ok_or_else(|| Status::invalid_argument("lane must be serial or unordered"))?;
        def = def.lane(lane);
    }
    def =
        def.priority(i16::try_from(d.priority).map_err(|_| Status::invalid_argument("priority must fit in 16 bits"))?);
    if d.max_attempts < 0 {
        return Err(Status::invalid_argument("max_attempts must not be negative"));
    }
    if d.max_attempts != 0 {
        def = def.max_attempts(d.max_attempts);
    }
    if d.timeout_ms != 0 {
        def = def.timeout(Duration::from_millis(d.timeout_ms));
    }
    if !d.overlap.is_empty() {
        def = def.overlap(Overlap::parse(&d.overlap).map_err(status)?);
    }
    let mode = if d.catchup.is_empty() { CatchUp::default() } else { CatchUp::parse(&d.catchup).map_err(status)? };
    let window = d.catchup_window_ms.map(Duration::from_millis).unwrap_or(DEFAULT_CATCHUP_WINDOW);
    def = def.catch_up(window, mode);
    def.validate().map_err(status)?;
    Ok(def)
}

/// A stored schedule as a wire message.
pub fn schedule(r: &ScheduleRow) -> pb::Schedule {
    let t = |t: Option<DateTime<Utc>>| t.map(unix_ms).unwrap_or(0);
    pb::Schedule {
        definition: Some(pb::ScheduleDefinition {
            account: r.account.clone(),
            name: r.name.clone(),
            cron: r.cron.clone().unwrap_or_default(),
            every_ms: r.every_ms.unwrap_or(0).max(0) as u64,
            anchor_unix_ms: if r.every_ms.is_some() { t(r.anchor_at) } else { 0 },
            zone: r.zone.clone(),
            jitter_ms: r.jitter_ms.max(0) as u64,
            start_unix_ms: t(r.start_at),
            end_unix_ms: t(r.end_at),
            kind: r.kind.clone(),
            args_json: r.args.to_string(),
            lane: r.lane.clone(),
            priority: r.priority as i32,
            max_attempts: r.max_attempts.unwrap_or(0),
            timeout_ms: r.timeout_ms.unwrap_or(0).max(0) as u64,
            overlap: r.overlap.clone(),
            catchup_window_ms: Some(r.catchup_window_ms.max(0) as u64),
            catchup: r.catchup.clone(),
        }),
        id: r.id,
        partition: r.partition as u32,
        paused: r.paused,
        source: r.source.clone(),
        revision: r.revision,
        next_nominal_unix_ms: t(r.next_nominal),
        next_fire_at_unix_ms: t(r.next_fire_at),
        last_nominal_unix_ms: t(r.last_nominal),
        last_fired_at_unix_ms: t(r.last_fired_at),
        last_job_id: r.last_job_id.unwrap_or(0),
        fires_total: r.fires_total,
        skipped_total: r.skipped_total,
        missed_total: r.missed_total,
        created_at_unix_ms: unix_ms(r.created_at),
        updated_at_unix_ms: unix_ms(r.updated_at),
        last_fire_lag_ms: r.last_fire_lag().map(|l| l.as_millis().min(i64::MAX as u128) as i64),
    }
}
