//! The `warden` command-line client for a Warden cluster's gRPC API.
//!
//! Examples:
//!   warden ring                                   # partitions and load per node
//!   warden members --json
//!   warden locate tenant-42
//!   warden watch                                  # live ownership events (Ctrl-C to stop)
//!   warden jobs enqueue tenant-42 charge --args '{"purchase": 1, "amount_cents": 500}'
//!   warden jobs list --account tenant-42 --state retryable
//!   warden jobs list --running                    # running jobs: running time, heartbeat age, progress
//!   warden jobs get 1234 ; warden jobs cancel 1234 ; warden jobs retry 1234
//!   warden stats
//!   warden schedules create tenant-42 nightly --cron '0 3 * * *' --zone Europe/Berlin --kind report
//!   warden schedules list --account tenant-42 ; warden schedules get tenant-42 nightly
//!   warden schedules pause|resume|trigger|delete tenant-42 nightly
//!   warden schedules backfill tenant-42 nightly --from 2026-01-01T00:00:00Z --to 2026-01-07T00:00:00Z
//!   warden schema status --database-url postgres://…   # schema versions, upgrade window
//!   warden schema setup --partitions 1024               # create/upgrade the schema, no node needed
//!   warden schema reset --yes                           # drop Warden's schema (refused while nodes run)
//!   warden --endpoint https://node-1:7070 --ca-cert ca.pem --token-file token ring
//!
//! Exit codes: 0 ok, 1 other error, 2 bad usage, 3 not found, 4 invalid argument,
//! 5 unavailable (cannot connect / database down), 6 unauthenticated, 7 refused in the
//! current state (e.g. `schema reset` while nodes run).

use clap::{Parser, Subcommand};
use serde_json::json;
use std::process::ExitCode;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};
use warden_proto::pb;

#[derive(Parser, Debug)]
#[command(
    name = "warden",
    version,
    about = "Observe ring ownership and operate jobs and schedules of a Warden cluster",
    after_help = "Examples:\n  warden ring\n  warden locate tenant-42\n  warden watch\n  warden jobs enqueue tenant-42 charge --args '{\"purchase\":1}'\n  warden jobs list --state discarded --json\n\nExit codes: 0 ok, 1 error, 2 usage, 3 not found, 4 invalid argument, 5 unavailable, 6 unauthenticated"
)]
struct Cli {
    /// gRPC endpoint of any node.
    #[arg(long, global = true, env = "WARDEN_ENDPOINT", default_value = "http://127.0.0.1:7070")]
    endpoint: String,
    /// Bearer token (if the cluster requires one).
    #[arg(long, global = true, env = "WARDEN_API_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Read the bearer token from a file.
    #[arg(long, global = true, env = "WARDEN_API_TOKEN_FILE")]
    token_file: Option<std::path::PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// PEM CA certificate to trust for an https:// endpoint.
    #[arg(long, global = true, env = "WARDEN_CA_CERT")]
    ca_cert: Option<std::path::PathBuf>,
    /// Server name to verify in the certificate (default: the endpoint's host).
    #[arg(long, global = true, env = "WARDEN_TLS_DOMAIN")]
    tls_domain: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Members: state, partitions held (lease table) and desired (ring), load.
    Members,
    /// How partitions and load are spread over nodes; `--partitions` lists every partition.
    Ring {
        #[arg(long)]
        partitions: bool,
    },
    /// Where an account lives: partition, owners, epoch, next job.
    Locate { account: String },
    /// Stream ownership events until interrupted.
    Watch,
    /// Queue statistics: jobs per state, backlog per node and partition, oldest due job.
    Stats,
    /// Job operations.
    Jobs {
        #[command(subcommand)]
        cmd: JobsCmd,
    },
    /// Periodic schedules: list, get, create (or change), pause, resume, trigger,
    /// backfill, delete. Times are RFC 3339 (`2026-01-01T03:00:00Z`), durations like
    /// `30s`, `5m`, `1h30m`, `2d`, `500ms`.
    Schedules {
        #[command(subcommand)]
        cmd: SchedulesCmd,
    },
    /// Warden's schema in the database (connects to PostgreSQL, not to a node):
    /// versions, the compatibility window, the upgrade contract's steps
    /// (see deploy/UPGRADING.md).
    Schema {
        /// The database Warden runs in.
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
        #[command(subcommand)]
        cmd: SchemaCmd,
    },
}

#[derive(Subcommand, Debug)]
enum SchemaCmd {
    /// Applied and known versions, the compatibility window, legacy history rows.
    Status,
    /// Create or upgrade Warden's schema without starting a node: apply pending
    /// migrations and fix the partition count (idempotent; what a node does on start).
    Setup {
        /// Partition count P (must match the database once it is set).
        #[arg(long, env = "WARDEN_PARTITIONS", default_value_t = 1024)]
        partitions: u32,
    },
    /// Drop Warden's schema and everything in it (jobs, attempts, leases, history).
    /// Refused while a node holds a partition lease, unless --force.
    Reset {
        /// Confirm: this deletes every job.
        #[arg(long)]
        yes: bool,
        /// Reset even while partition leases are held (running nodes will fail).
        #[arg(long)]
        force: bool,
    },
    /// Remove Warden's rows from a legacy `public._sqlx_migrations` (run once no node
    /// older than schema v4 runs).
    ForgetLegacyHistory,
}

#[derive(Subcommand, Debug)]
enum JobsCmd {
    /// Enqueue one job.
    Enqueue {
        account: String,
        kind: String,
        /// Arguments as JSON.
        #[arg(long, default_value = "{}")]
        args: String,
        #[arg(long)]
        delay_ms: Option<u64>,
        #[arg(long)]
        unique_key: Option<String>,
        #[arg(long)]
        max_attempts: Option<i32>,
        #[arg(long)]
        priority: Option<i32>,
        /// serial (default) or unordered.
        #[arg(long)]
        lane: Option<String>,
        /// Exactly-once enqueue per key, for as long as the key is kept (even after the
        /// job finished): the same key again answers the first job's id.
        #[arg(long, conflicts_with = "unique_key")]
        idempotency_key: Option<String>,
        /// How long the idempotency key is kept (default 7d).
        #[arg(long, value_parser = parse_duration, requires = "idempotency_key")]
        idempotency_keep: Option<std::time::Duration>,
    },
    /// A job and its attempts (one page of them, oldest first).
    Get {
        id: i64,
        /// Attempts per page (max 500).
        #[arg(long, default_value_t = 50)]
        attempts_limit: u32,
        /// Continue the attempts from a previous page.
        #[arg(long)]
        attempts_page_token: Option<String>,
    },
    /// List jobs, newest first.
    List {
        #[arg(long)]
        account: Option<String>,
        #[arg(long)]
        kind: Option<String>,
        #[arg(long)]
        state: Option<String>,
        /// Running jobs (however long they have run), with their running time,
        /// heartbeat age and progress.
        #[arg(long, conflicts_with = "state")]
        running: bool,
        /// Page size (max 500).
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Continue from a previous page.
        #[arg(long)]
        page_token: Option<String>,
    },
    /// Cancel a queued job, or ask a running one to stop.
    Cancel { id: i64 },
    /// Re-queue a discarded or cancelled job.
    Retry { id: i64 },
}

// Parsed once per process: the size of the create variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum SchedulesCmd {
    /// Schedules by id, with their next and last fire.
    List {
        #[arg(long)]
        account: Option<String>,
        /// Page size (max 500).
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Continue from a previous page.
        #[arg(long)]
        page_token: Option<String>,
    },
    /// One schedule: its definition, next and last fire, totals.
    Get { account: String, name: String },
    /// Create a schedule, or change it if it exists (a change of timing moves the next
    /// fire to the new timing).
    Create(CreateSchedule),
    /// Stop firing until resumed.
    Pause { account: String, name: String },
    /// Continue from the next nominal time after now (the paused time is not caught up).
    Resume { account: String, name: String },
    /// Fire once now, outside the timing.
    Trigger { account: String, name: String },
    /// Fire every nominal time in [--from, --to] not fired yet (at most 10,000).
    Backfill {
        account: String,
        name: String,
        #[arg(long, value_parser = parse_time)]
        from: chrono::DateTime<chrono::Utc>,
        #[arg(long, value_parser = parse_time)]
        to: chrono::DateTime<chrono::Utc>,
    },
    /// Delete a schedule (the jobs it fired stay).
    Delete { account: String, name: String },
}

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("timing").required(true).args(["cron", "every"])))]
struct CreateSchedule {
    account: String,
    name: String,
    /// Cron expression: 5 fields, or 6 with seconds first.
    #[arg(long)]
    cron: Option<String>,
    /// Fixed interval (whole seconds, e.g. 30s, 15m).
    #[arg(long, value_parser = parse_duration)]
    every: Option<std::time::Duration>,
    /// Phase of --every: fires at anchor + k·every (default the Unix epoch).
    #[arg(long, value_parser = parse_time, requires = "every")]
    anchor: Option<chrono::DateTime<chrono::Utc>>,
    /// The kind of job each fire enqueues.
    #[arg(long)]
    kind: String,
    /// The job's arguments as JSON.
    #[arg(long, default_value = "{}")]
    args: String,
    /// IANA time zone cron is matched in (default UTC).
    #[arg(long)]
    zone: Option<String>,
    /// Delay each fire by a fixed pseudo-random amount below this.
    #[arg(long, value_parser = parse_duration)]
    jitter: Option<std::time::Duration>,
    #[arg(long, value_parser = parse_time)]
    start: Option<chrono::DateTime<chrono::Utc>>,
    #[arg(long, value_parser = parse_time)]
    end: Option<chrono::DateTime<chrono::Utc>>,
    /// When earlier fires' jobs are unfinished: skip (default), buffer_one, buffer_all,
    /// cancel_previous, allow (unordered lane only).
    #[arg(long)]
    overlap: Option<String>,
    /// Nominal times older than this after downtime are missed, not run (default 1h).
    #[arg(long, value_parser = parse_duration)]
    catchup_window: Option<std::time::Duration>,
    /// Within the window: fire each missed time (all, default) or only the latest.
    #[arg(long)]
    catchup: Option<String>,
    /// serial (default) or unordered.
    #[arg(long)]
    lane: Option<String>,
    #[arg(long)]
    priority: Option<i32>,
    #[arg(long)]
    max_attempts: Option<i32>,
    #[arg(long, value_parser = parse_duration)]
    timeout: Option<std::time::Duration>,
}

/// `30s`, `500ms`, `5m`, `1h30m`, `2d`: one or more number-unit pairs.
fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let bad = || format!("{s:?} is not a duration (examples: 30s, 500ms, 5m, 1h30m, 2d)");
    let mut total = std::time::Duration::ZERO;
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let ms_per = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(bad()),
        };
        total += std::time::Duration::from_millis(n.checked_mul(ms_per).ok_or_else(bad)?);
        rest = &rest[unit_len..];
    }
    Ok(total)
}

/// An RFC 3339 time (`2026-01-01T03:00:00Z`, `2026-01-01T04:00:00+01:00`).
fn parse_time(s: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|e| format!("{s:?} is not an RFC 3339 time like 2026-01-01T03:00:00Z: {e}"))
}

struct Ctx {
    channel: Channel,
    token: Option<MetadataValue<tonic::metadata::Ascii>>,
    json: bool,
}

impl Ctx {
    fn req<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        if let Some(t) = &self.token {
            r.metadata_mut().insert("authorization", t.clone());
        }
        r
    }
    fn cluster(&self) -> pb::cluster_client::ClusterClient<Channel> {
        pb::cluster_client::ClusterClient::new(self.channel.clone())
    }
    fn jobs(&self) -> pb::jobs_client::JobsClient<Channel> {
        pb::jobs_client::JobsClient::new(self.channel.clone())
    }
    fn schedules(&self) -> pb::schedules_client::SchedulesClient<Channel> {
        pb::schedules_client::SchedulesClient::new(self.channel.clone())
    }
}

enum Failure {
    Status(Status),
    Other(String),
}

impl From<Status> for Failure {
    fn from(s: Status) -> Self {
        Failure::Status(s)
    }
}

fn time(ms: i64) -> String {
    if ms == 0 {
        return "-".into();
    }
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S%.3f").to_string())
        .unwrap_or_default()
}

fn job_json(j: &pb::Job) -> serde_json::Value {
    json!({
        "id": j.id, "account": j.account, "partition": j.partition, "kind": j.kind,
        "args": serde_json::from_str::<serde_json::Value>(&j.args_json).unwrap_or(serde_json::Value::Null),
        "lane": j.lane, "state": j.state, "priority": j.priority, "run_at_unix_ms": j.run_at_unix_ms,
        "due_at_unix_ms": j.due_at_unix_ms, "attempt": j.attempt, "max_attempts": j.max_attempts,
        "unique_key": j.unique_key, "node": j.node, "epoch": j.epoch, "created_at_unix_ms": j.created_at_unix_ms,
        "finished_at_unix_ms": j.finished_at_unix_ms, "last_error": j.last_error,
        "attempted_at_unix_ms": j.attempted_at_unix_ms, "progress": j.progress.as_ref().map(progress_json),
    })
}

fn progress_json(p: &pb::JobProgress) -> serde_json::Value {
    json!({
        "attempt": p.attempt, "node": p.node, "heartbeat_at_unix_ms": p.heartbeat_at_unix_ms,
        "heartbeat_age_ms": p.heartbeat_age_ms, "percent": p.percent, "message": p.message,
        "details": serde_json::from_str::<serde_json::Value>(&p.details_json).ok(),
        "checkpoint_at_unix_ms": p.checkpoint_at_unix_ms, "checkpoint_age_ms": p.checkpoint_age_ms,
        "checkpoint_attempt": p.checkpoint_attempt, "checkpoint_bytes": p.checkpoint_bytes,
    })
}

/// A duration for people: `0.8s`, `42s`, `12m 3s`, `3h 12m`, `2d 4h`.
fn age(ms: i64) -> String {
    let ms = ms.max(0);
    let s = ms / 1000;
    match s {
        0..=9 => format!("{:.1}s", ms as f64 / 1000.0),
        10..=59 => format!("{s}s"),
        60..=3599 => format!("{}m {}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// A size for people: `120 B`, `3.2 KiB`.
fn size(bytes: i32) -> String {
    if bytes < 1024 {
        format!("{bytes} B")
    } else {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    }
}

/// The node id of an owner (`node_id/generation`): the generation is for machines.
fn node_id(owner: &str) -> &str {
    owner.split('/').next().unwrap_or(owner)
}

/// What the handler reported: `42.0%  step 42/100` (either part may be missing).
fn progress_figures(p: &pb::JobProgress) -> String {
    let mut parts = Vec::new();
    if let Some(pct) = p.percent {
        parts.push(format!("{pct:.1}%"));
    }
    if !p.message.is_empty() {
        parts.push(p.message.clone());
    }
    parts.join("  ")
}

/// `warden jobs get`'s progress line: `42.0%  step 42/100 · heartbeat 0.8s ago (node-a,
/// attempt 2) · checkpoint 3.1s ago (attempt 2, 120 B)`.
fn progress_line(p: &pb::JobProgress) -> String {
    let mut parts = Vec::new();
    let figures = progress_figures(p);
    if !figures.is_empty() {
        parts.push(figures);
    }
    parts.push(format!("heartbeat {} ago ({}, attempt {})", age(p.heartbeat_age_ms), node_id(&p.node), p.attempt));
    if p.checkpoint_at_unix_ms != 0 {
        parts.push(format!(
            "checkpoint {} ago (attempt {}, {})",
            age(p.checkpoint_age_ms),
            p.checkpoint_attempt,
            size(p.checkpoint_bytes)
        ));
    }
    parts.join(" · ")
}

/// Text for a terminal: what handlers and users wrote (a job's progress message, its
/// last error, an account, kind or schedule name, args) may hold control characters,
/// and an escape sequence or a newline printed raw can garble or spoof the operator's
/// terminal. Every control character (C0 including tab and newline, DEL, C1) and the
/// bidirectional-text controls (U+202A–U+202E, U+2066–U+2069) become a visible escape
/// (`\u{1b}`, `\n`); printable Unicode stays. `--json` output is not passed through
/// this: it stays exact.
fn safe(s: &str) -> String {
    let unsafe_char = |c: char| c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
    if !s.chars().any(unsafe_char) {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if unsafe_char(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// `println!` for people: the line goes through [`safe`] (our formats have no
/// control characters of their own).
macro_rules! say {
    ($($t:tt)*) => { println!("{}", safe(&format!($($t)*))) };
}

/// Print rows as an aligned table.
fn table(headers: &[&str], rows: &[Vec<String>]) {
    print!("{}", table_text(headers, rows));
}

/// Rows as an aligned table, each cell through [`safe`], one line each.
fn table_text(headers: &[&str], rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> = rows.iter().map(|r| r.iter().map(|c| safe(c)).collect()).collect();
    let mut w: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<String>| {
        let s: Vec<String> = cells.iter().enumerate().map(|(i, c)| format!("{c:<width$}", width = w[i])).collect();
        out.push_str(s.join("  ").trim_end());
        out.push('\n');
    };
    line(headers.iter().map(|h| h.to_uppercase()).collect());
    for r in rows {
        line(r);
    }
    out
}

/// A schema error: refusals and bad input are the caller's to fix, the rest is the
/// database's.
fn schema_err(e: warden_runtime::Error) -> Failure {
    match e {
        warden_runtime::Error::Conflict(m) => Failure::Status(Status::failed_precondition(m)),
        e @ (warden_runtime::Error::PartitionMismatch { .. } | warden_runtime::Error::Config(_)) => {
            Failure::Status(Status::invalid_argument(e.to_string()))
        }
        e => Failure::Status(Status::unavailable(format!("database: {e}"))),
    }
}

async fn schema_cmd(database_url: &str, cmd: SchemaCmd, json_out: bool) -> Result<(), Failure> {
    let db = |e: warden_runtime::Error| Failure::Status(Status::unavailable(format!("database: {e}")));
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(std::time::Duration::from_secs(10))
        .connect(database_url)
        .await
        .map_err(|e| Failure::Status(Status::unavailable(format!("cannot connect to the database: {e}"))))?;
    match cmd {
        SchemaCmd::Status => {
            let s = warden_runtime::schema::status(&pool).await.map_err(db)?;
            if json_out {
                println!(
                    "{}",
                    json!({"applied": s.applied, "compatible_from": s.compatible_from, "binary": s.binary,
                           "pending": s.pending, "legacy_rows": s.legacy_rows, "compatible": s.compatible()})
                );
            } else {
                println!("schema applied:        {}", s.applied);
                println!("compatible from:       {}", s.compatible_from);
                println!("this binary knows:     {}", s.binary);
                println!("pending for this binary: {:?}", s.pending);
                println!("legacy history rows:   {} (in public._sqlx_migrations)", s.legacy_rows);
                println!("this binary may run:   {}", if s.compatible() { "yes" } else { "no" });
            }
        }
        SchemaCmd::Setup { partitions } => {
            let p = warden_runtime::PartitionCount::new(partitions)
                .map_err(|e| Failure::Status(Status::invalid_argument(format!("--partitions: {e}"))))?;
            let s = warden_runtime::schema::setup(&pool, p).await.map_err(schema_err)?;
            if json_out {
                println!("{}", json!({"applied": s.applied, "partitions": partitions}));
            } else {
                println!("schema at version {} with {partitions} partitions", s.applied);
            }
        }
        SchemaCmd::Reset { yes, force } => {
            if !yes {
                return Err(Failure::Status(Status::invalid_argument(
                    "this drops every Warden job, attempt and lease in the database: pass --yes to confirm",
                )));
            }
            let r = warden_runtime::schema::reset(&pool, force).await.map_err(schema_err)?;
            if json_out {
                println!("{}", json!({"jobs": r.jobs, "live_leases": r.live_leases, "legacy_rows": r.legacy_rows}));
            } else {
                println!(
                    "dropped Warden's schema ({} jobs, {} live leases); removed {} legacy history rows",
                    r.jobs, r.live_leases, r.legacy_rows
                );
            }
        }
        SchemaCmd::ForgetLegacyHistory => {
            let n = warden_runtime::schema::forget_legacy_history(&pool).await.map_err(db)?;
            println!("removed {n} Warden row(s) from public._sqlx_migrations");
        }
    }
    Ok(())
}

async fn run(cli: Cli) -> Result<(), Failure> {
    if let Cmd::Schema { database_url, cmd } = cli.cmd {
        return schema_cmd(&database_url, cmd, cli.json).await;
    }
    let token = match (&cli.token_file, &cli.token) {
        (Some(path), _) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| Failure::Other(format!("reading token file {}: {e}", path.display())))?
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_string(),
        ),
        (None, t) => t.clone(),
    };
    let token = token
        .filter(|t| !t.is_empty())
        .map(|t| format!("Bearer {t}").parse::<MetadataValue<_>>())
        .transpose()
        .map_err(|_| Failure::Other("the token contains characters not allowed in a header".into()))?;
    let mut endpoint = tonic::transport::Endpoint::from_shared(cli.endpoint.clone())
        .map_err(|e| Failure::Other(format!("invalid --endpoint {:?}: {e}", cli.endpoint)))?
        .connect_timeout(std::time::Duration::from_secs(5));
    if cli.endpoint.starts_with("https://") {
        let ca = cli.ca_cert.as_ref().ok_or_else(|| {
            Failure::Other("an https:// endpoint needs --ca-cert (the CA that signed the node's certificate)".into())
        })?;
        let pem = std::fs::read(ca).map_err(|e| Failure::Other(format!("reading --ca-cert {}: {e}", ca.display())))?;
        let mut tls =
            tonic::transport::ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(pem));
        if let Some(d) = &cli.tls_domain {
            tls = tls.domain_name(d.clone());
        }
        endpoint = endpoint.tls_config(tls).map_err(|e| Failure::Other(format!("TLS configuration: {e}")))?;
    }
    let channel = endpoint.connect().await.map_err(|e| {
        // The transport error's sources say what actually failed (refused, TLS, DNS...).
        let mut msg = format!("cannot connect to {}: {e}", cli.endpoint);
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg.push_str(&format!(": {s}"));
            src = s.source();
        }
        Failure::Status(Status::unavailable(msg))
    })?;
    let cx = Ctx { channel, token, json: cli.json };
    match cli.cmd {
        Cmd::Members => {
            let r = cx.cluster().list_members(cx.req(pb::ListMembersRequest {})).await?.into_inner();
            if cx.json {
                let members: Vec<_> = r.members.iter().map(|m| json!({
                    "node_id": m.node_id, "generation": m.generation, "gossip_addr": m.gossip_addr, "grpc_addr": m.grpc_addr,
                    "state": m.state, "live": m.live, "partitions_held": m.partitions_held, "partitions_desired": m.partitions_desired,
                    "active_accounts": m.active_accounts, "backlog": m.backlog, "version": m.version })).collect();
                println!(
                    "{}",
                    json!({ "members": members, "lease_holders_not_in_gossip": r.lease_holders_not_in_gossip, "answered_by": r.answered_by })
                );
            } else {
                let rows: Vec<Vec<String>> = r
                    .members
                    .iter()
                    .map(|m| {
                        vec![
                            m.node_id.clone(),
                            m.state.clone(),
                            m.partitions_held.to_string(),
                            m.partitions_desired.to_string(),
                            m.active_accounts.to_string(),
                            m.backlog.to_string(),
                            m.grpc_addr.clone(),
                            m.generation.to_string(),
                        ]
                    })
                    .collect();
                table(&["node", "state", "held", "desired", "actors", "backlog", "grpc", "generation"], &rows);
                if !r.lease_holders_not_in_gossip.is_empty() {
                    say!("\nholding leases but not seen in gossip: {}", r.lease_holders_not_in_gossip.join(", "));
                }
            }
        }
        Cmd::Ring { partitions } => {
            let r = cx.cluster().get_assignment(cx.req(pb::GetAssignmentRequest {})).await?.into_inner();
            if cx.json {
                let a: Vec<_> = r.assignment.iter().map(|p| json!({ "partition": p.partition, "desired_owner": p.desired_owner,
                    "actual_owner": p.actual_owner, "epoch": p.epoch, "lease_expires_at_unix_ms": p.lease_expires_at_unix_ms, "handoff": p.handoff })).collect();
                println!("{}", json!({ "partitions": r.partitions, "assignment": a, "answered_by": r.answered_by }));
                return Ok(());
            }
            let mut per: std::collections::BTreeMap<String, (u32, u32, u32)> = Default::default();
            let (mut moving, mut unowned) = (0, 0);
            for p in &r.assignment {
                if !p.actual_owner.is_empty() {
                    per.entry(p.actual_owner.clone()).or_default().0 += 1;
                }
                if !p.desired_owner.is_empty() {
                    per.entry(p.desired_owner.clone()).or_default().1 += 1;
                }
                match p.handoff.as_str() {
                    "moving" => {
                        moving += 1;
                        per.entry(p.actual_owner.clone()).or_default().2 += 1;
                    }
                    "unowned" => unowned += 1,
                    _ => {}
                }
            }
            let mean = r.partitions as f64 / per.len().max(1) as f64;
            let rows: Vec<Vec<String>> = per
                .iter()
                .map(|(n, (held, desired, mv))| {
                    let bar = "#".repeat(((*held as f64 / r.partitions as f64) * 40.0).round() as usize);
                    vec![
                        n.clone(),
                        held.to_string(),
                        desired.to_string(),
                        mv.to_string(),
                        format!("{:.2}", *held as f64 / mean),
                        bar,
                    ]
                })
                .collect();
            table(&["node", "held", "desired", "moving", "load/mean", "share"], &rows);
            say!(
                "\n{} partitions: {} moving, {} unowned (answered by {})",
                r.partitions,
                moving,
                unowned,
                r.answered_by
            );
            if partitions {
                println!();
                let rows: Vec<Vec<String>> = r
                    .assignment
                    .iter()
                    .map(|p| {
                        vec![
                            p.partition.to_string(),
                            p.actual_owner.clone(),
                            p.desired_owner.clone(),
                            p.epoch.to_string(),
                            time(p.lease_expires_at_unix_ms),
                            p.handoff.clone(),
                        ]
                    })
                    .collect();
                table(&["partition", "owner", "desired", "epoch", "lease expires", "handoff"], &rows);
            }
        }
        Cmd::Locate { account } => {
            let r = cx.cluster().locate(cx.req(pb::LocateRequest { account })).await?.into_inner();
            if cx.json {
                println!(
                    "{}",
                    json!({ "account": r.account, "partition": r.partition, "desired_owner": r.desired_owner,
                    "actual_owner": r.actual_owner, "epoch": r.epoch, "actor_running": r.actor_running,
                    "answered_by_owner": r.answered_by_owner, "unfinished_jobs": r.unfinished_jobs,
                    "next_due_job": r.next_due_job.as_ref().map(job_json) })
                );
            } else {
                say!("account        {}", r.account);
                say!("partition      {}", r.partition);
                say!(
                    "owner (lease)  {} (epoch {})",
                    if r.actual_owner.is_empty() { "-" } else { &r.actual_owner },
                    r.epoch
                );
                say!("owner (ring)   {}", if r.desired_owner.is_empty() { "-" } else { &r.desired_owner });
                say!(
                    "actor running  {}",
                    if r.answered_by_owner { r.actor_running.to_string() } else { "unknown (ask the owner)".into() }
                );
                say!("unfinished     {}", r.unfinished_jobs);
                if let Some(j) = r.next_due_job {
                    say!("next job       #{} {} ({}, due {})", j.id, j.kind, j.state, time(j.due_at_unix_ms));
                }
            }
        }
        Cmd::Watch => {
            let mut stream = cx.cluster().watch_ownership(cx.req(pb::WatchOwnershipRequest {})).await?.into_inner();
            while let Some(e) = stream.message().await? {
                if cx.json {
                    println!(
                        "{}",
                        json!({ "at_unix_ms": e.at_unix_ms, "kind": e.kind, "node_id": e.node_id, "state": e.state,
                        "partition": e.partition, "from_owner": e.from_owner, "to_owner": e.to_owner, "epoch": e.epoch })
                    );
                } else {
                    let what = match e.kind.as_str() {
                        "snapshot" => "watching (events follow)".to_string(),
                        "member_joined" => format!("member {} joined ({})", e.node_id, e.state),
                        "member_left" => format!("member {} left", e.node_id),
                        "member_state" => format!("member {} is now {}", e.node_id, e.state),
                        "acquired" => {
                            format!("partition {} acquired by {} (epoch {})", e.partition, e.to_owner, e.epoch)
                        }
                        "released" => {
                            format!("partition {} released by {} (epoch {})", e.partition, e.from_owner, e.epoch)
                        }
                        "moved" => format!(
                            "partition {} moved {} → {} (epoch {})",
                            e.partition, e.from_owner, e.to_owner, e.epoch
                        ),
                        other => other.to_string(),
                    };
                    say!("{}  {what}", time(e.at_unix_ms));
                }
                use std::io::Write;
                let _ = std::io::stdout().flush();
            }
        }
        Cmd::Stats => {
            let r = cx.jobs().queue_stats(cx.req(pb::QueueStatsRequest {})).await?.into_inner();
            if cx.json {
                let top: Vec<_> = r
                    .top_partitions
                    .iter()
                    .map(|p| json!({ "partition": p.partition, "backlog": p.backlog, "owner": p.owner, "capped": p.capped }))
                    .collect();
                println!(
                    "{}",
                    json!({ "by_state": r.by_state, "backlog_by_node": r.backlog_by_node, "top_partitions": top,
                            "oldest_due_age_ms": r.oldest_due_age_ms, "estimated_states": r.estimated_states,
                            "capped": r.capped, "partition_count_cap": r.partition_count_cap })
                );
            } else {
                let mut states: Vec<_> = r.by_state.iter().collect();
                states.sort();
                let shown = |s: &str, n: i64| {
                    if r.estimated_states.iter().any(|e| e == s) {
                        format!("~{n} (estimate)")
                    } else if r.capped {
                        format!("{n}+")
                    } else {
                        n.to_string()
                    }
                };
                table(
                    &["state", "jobs"],
                    &states.iter().map(|(s, n)| vec![s.to_string(), shown(s, **n)]).collect::<Vec<_>>(),
                );
                if r.capped {
                    say!(
                        "(counting stopped at {} unfinished jobs per partition: `+` figures are lower bounds)",
                        r.partition_count_cap
                    );
                }
                println!();
                let mut nodes: Vec<_> = r.backlog_by_node.iter().collect();
                nodes.sort();
                table(
                    &["node", "backlog"],
                    &nodes.iter().map(|(s, n)| vec![s.to_string(), n.to_string()]).collect::<Vec<_>>(),
                );
                say!("\noldest due job waiting: {} ms", r.oldest_due_age_ms);
            }
        }
        Cmd::Jobs { cmd } => jobs(&cx, cmd).await?,
        Cmd::Schedules { cmd } => schedules(&cx, cmd).await?,
        Cmd::Schema { .. } => unreachable!("handled before connecting"),
    }
    Ok(())
}

async fn jobs(cx: &Ctx, cmd: JobsCmd) -> Result<(), Failure> {
    match cmd {
        JobsCmd::Enqueue {
            account,
            kind,
            args,
            delay_ms,
            unique_key,
            max_attempts,
            priority,
            lane,
            idempotency_key,
            idempotency_keep,
        } => {
            let keyed = idempotency_key.is_some();
            let job = pb::NewJob {
                account,
                kind,
                args_json: args,
                delay_ms: delay_ms.unwrap_or(0),
                unique_key: unique_key.unwrap_or_default(),
                max_attempts: max_attempts.unwrap_or(0),
                priority: priority.unwrap_or(0),
                lane: lane.unwrap_or_default(),
                idempotency_key: idempotency_key.unwrap_or_default(),
                idempotency_keep_ms: idempotency_keep.map(|d| d.as_millis() as u64).unwrap_or(0),
                ..Default::default()
            };
            let r = cx.jobs().enqueue(cx.req(pb::EnqueueRequest { job: Some(job) })).await?.into_inner();
            if cx.json {
                println!("{}", json!({ "id": r.id, "duplicate": r.duplicate }));
            } else if r.duplicate && keyed {
                say!("job {} was already enqueued with that idempotency key (nothing enqueued)", r.id);
            } else if r.duplicate {
                say!("job {} already queued with that unique key", r.id);
            } else {
                say!("enqueued job {}", r.id);
            }
        }
        JobsCmd::Get { id, attempts_limit, attempts_page_token } => {
            let r = cx
                .jobs()
                .get_job(cx.req(pb::GetJobRequest {
                    id,
                    attempts_page_size: attempts_limit,
                    attempts_page_token: attempts_page_token.unwrap_or_default(),
                }))
                .await?
                .into_inner();
            let j = r.job.ok_or_else(|| Failure::Other("empty response".into()))?;
            if cx.json {
                let attempts: Vec<_> = r.attempts.iter().map(|a| json!({ "attempt": a.attempt, "node": a.node, "epoch": a.epoch,
                    "started_at_unix_ms": a.started_at_unix_ms, "finished_at_unix_ms": a.finished_at_unix_ms, "outcome": a.outcome, "error": a.error })).collect();
                println!(
                    "{}",
                    json!({ "job": job_json(&j), "attempts": attempts, "next_attempts_page_token": r.next_attempts_page_token,
                            "read_at_unix_ms": r.read_at_unix_ms })
                );
            } else {
                say!(
                    "job {}  {} / {}  state {}  attempt {}/{}",
                    j.id,
                    j.account,
                    j.kind,
                    j.state,
                    j.attempt,
                    j.max_attempts
                );
                say!(
                    "args {}  lane {}  partition {}  run_at {}  due {}",
                    j.args_json,
                    j.lane,
                    j.partition,
                    time(j.run_at_unix_ms),
                    time(j.due_at_unix_ms)
                );
                if j.state == "running" && j.attempted_at_unix_ms != 0 {
                    say!(
                        "running    {} (since {})",
                        age(r.read_at_unix_ms - j.attempted_at_unix_ms),
                        time(j.attempted_at_unix_ms)
                    );
                }
                if let Some(p) = &j.progress {
                    say!("progress   {}", progress_line(p));
                }
                if !j.last_error.is_empty() {
                    say!("last error: {}", j.last_error);
                }
                println!();
                let rows: Vec<Vec<String>> = r
                    .attempts
                    .iter()
                    .map(|a| {
                        vec![
                            a.attempt.to_string(),
                            a.outcome.clone(),
                            a.node.clone(),
                            a.epoch.to_string(),
                            time(a.started_at_unix_ms),
                            format!("{} ms", a.finished_at_unix_ms - a.started_at_unix_ms),
                            a.error.clone(),
                        ]
                    })
                    .collect();
                table(&["attempt", "outcome", "node", "epoch", "started", "took", "error"], &rows);
                if !r.next_attempts_page_token.is_empty() {
                    say!("\nmore attempts: --attempts-page-token {}", r.next_attempts_page_token);
                }
            }
        }
        JobsCmd::List { account, kind, state, running, limit, page_token } => {
            let state = if running { Some("running".to_string()) } else { state };
            let r = cx
                .jobs()
                .list_jobs(cx.req(pb::ListJobsRequest {
                    account: account.unwrap_or_default(),
                    kind: kind.unwrap_or_default(),
                    state: state.unwrap_or_default(),
                    page_size: limit,
                    page_token: page_token.unwrap_or_default(),
                }))
                .await?
                .into_inner();
            if cx.json {
                println!(
                    "{}",
                    json!({ "jobs": r.jobs.iter().map(job_json).collect::<Vec<_>>(), "next_page_token": r.next_page_token,
                            "read_at_unix_ms": r.read_at_unix_ms })
                );
            } else if running {
                let rows: Vec<Vec<String>> = r
                    .jobs
                    .iter()
                    .map(|j| {
                        let p = j.progress.as_ref();
                        vec![
                            j.id.to_string(),
                            j.account.clone(),
                            j.kind.clone(),
                            format!("{}/{}", j.attempt, j.max_attempts),
                            if j.attempted_at_unix_ms == 0 {
                                "-".into()
                            } else {
                                age(r.read_at_unix_ms - j.attempted_at_unix_ms)
                            },
                            p.map_or("-".into(), |p| age(p.heartbeat_age_ms)),
                            node_id(&j.node).to_string(),
                            p.map(progress_figures).unwrap_or_default().chars().take(60).collect(),
                        ]
                    })
                    .collect();
                table(&["id", "account", "kind", "attempt", "running", "heartbeat", "node", "progress"], &rows);
                if !r.next_page_token.is_empty() {
                    say!("\nmore: --page-token {}", r.next_page_token);
                }
            } else {
                let rows: Vec<Vec<String>> = r
                    .jobs
                    .iter()
                    .map(|j| {
                        vec![
                            j.id.to_string(),
                            j.account.clone(),
                            j.kind.clone(),
                            j.state.clone(),
                            format!("{}/{}", j.attempt, j.max_attempts),
                            time(j.run_at_unix_ms),
                            j.last_error.chars().take(60).collect(),
                        ]
                    })
                    .collect();
                table(&["id", "account", "kind", "state", "attempts", "run_at", "last error"], &rows);
                if !r.next_page_token.is_empty() {
                    say!("\nmore: --page-token {}", r.next_page_token);
                }
            }
        }
        JobsCmd::Cancel { id } => {
            let r = cx.jobs().cancel_job(cx.req(pb::CancelJobRequest { id })).await?.into_inner();
            if cx.json {
                println!("{}", json!({ "result": r.result, "state": r.state }));
            } else {
                match r.result.as_str() {
                    "cancelled" => say!("job {id} cancelled"),
                    "cancel_requested" => {
                        say!("job {id} is running: asked to stop (aborted after the grace period)")
                    }
                    _ => say!("job {id} had already finished ({})", r.state),
                }
            }
        }
        JobsCmd::Retry { id } => {
            let r = cx.jobs().retry_job(cx.req(pb::RetryJobRequest { id })).await?.into_inner();
            let j = r.job.ok_or_else(|| Failure::Other("empty response".into()))?;
            if cx.json {
                println!("{}", job_json(&j));
            } else {
                say!("job {} re-queued ({}; attempts {}/{})", j.id, j.state, j.attempt, j.max_attempts);
            }
        }
    }
    Ok(())
}

fn schedule_json(s: &pb::Schedule) -> serde_json::Value {
    let d = s.definition.clone().unwrap_or_default();
    json!({
        "id": s.id, "account": d.account, "name": d.name, "partition": s.partition,
        "cron": (!d.cron.is_empty()).then_some(&d.cron), "every_ms": (d.every_ms != 0).then_some(d.every_ms),
        "anchor_unix_ms": (d.every_ms != 0).then_some(d.anchor_unix_ms), "zone": d.zone, "jitter_ms": d.jitter_ms,
        "start_unix_ms": d.start_unix_ms, "end_unix_ms": d.end_unix_ms, "kind": d.kind,
        "args": serde_json::from_str::<serde_json::Value>(&d.args_json).unwrap_or(serde_json::Value::Null),
        "lane": d.lane, "priority": d.priority, "max_attempts": d.max_attempts, "timeout_ms": d.timeout_ms,
        "overlap": d.overlap, "catchup_window_ms": d.catchup_window_ms, "catchup": d.catchup,
        "paused": s.paused, "source": s.source, "revision": s.revision,
        "next_nominal_unix_ms": s.next_nominal_unix_ms, "next_fire_at_unix_ms": s.next_fire_at_unix_ms,
        "last_nominal_unix_ms": s.last_nominal_unix_ms, "last_fired_at_unix_ms": s.last_fired_at_unix_ms,
        "last_job_id": s.last_job_id, "fires_total": s.fires_total, "skipped_total": s.skipped_total,
        "missed_total": s.missed_total, "created_at_unix_ms": s.created_at_unix_ms,
        "updated_at_unix_ms": s.updated_at_unix_ms, "last_fire_lag_ms": s.last_fire_lag_ms,
    })
}

/// `cron "0 3 * * *"` or `every 30s`; the zone when it matters.
fn timing(d: &pb::ScheduleDefinition) -> String {
    if !d.cron.is_empty() {
        format!("cron {:?}", d.cron)
    } else if d.anchor_unix_ms != 0 {
        format!("every {} from {}", age(d.every_ms as i64), time(d.anchor_unix_ms))
    } else {
        format!("every {}", age(d.every_ms as i64))
    }
}

/// The next fire: `2026-01-02 02:00:00.000` (+ jitter), `paused`, or `ended`.
fn next_fire(s: &pb::Schedule) -> String {
    if s.next_nominal_unix_ms == 0 {
        "ended".into()
    } else if s.paused {
        "paused".into()
    } else {
        time(s.next_fire_at_unix_ms)
    }
}

/// `warden schedules get` and the answers to create, pause and resume.
fn print_schedule(s: &pb::Schedule) {
    print!("{}", schedule_text(s));
}

/// `warden schedules get`'s text, each line through [`safe`].
fn schedule_text(s: &pb::Schedule) -> String {
    let mut out: Vec<String> = Vec::new();
    macro_rules! say {
        ($($t:tt)*) => { out.push(safe(&format!($($t)*))) };
    }
    let d = s.definition.clone().unwrap_or_default();
    let state = if s.paused { "paused" } else { "active" };
    let origin =
        if s.source == "code" { format!("declared in code, revision {}", s.revision) } else { s.source.clone() };
    say!("schedule {} / {}  {state}  (id {}, partition {}, {origin})", d.account, d.name, s.id, s.partition);
    say!("timing     {} in {}", timing(&d), d.zone);
    if d.jitter_ms != 0 || d.start_unix_ms != 0 || d.end_unix_ms != 0 {
        say!(
            "           jitter {} · start {} · end {}",
            age(d.jitter_ms as i64),
            time(d.start_unix_ms),
            time(d.end_unix_ms)
        );
    }
    say!("job        {} {}  lane {}", d.kind, d.args_json, d.lane);
    say!(
        "policies   overlap {} · catch-up {} within {}",
        d.overlap,
        d.catchup,
        age(d.catchup_window_ms.unwrap_or(0) as i64)
    );
    match (s.next_nominal_unix_ms, s.paused) {
        (0, _) => say!("next fire  none (the schedule has ended)"),
        (n, true) => say!("next fire  paused (was {})", time(n)),
        (n, false) if n == s.next_fire_at_unix_ms => say!("next fire  {}", time(n)),
        (n, false) => say!("next fire  {} (nominal {})", time(s.next_fire_at_unix_ms), time(n)),
    }
    if s.last_fired_at_unix_ms == 0 {
        say!("last fire  never");
    } else {
        say!("last fire  {} (job {})", time(s.last_fired_at_unix_ms), s.last_job_id);
    }
    // Triggers and backfills are fires too, but only the schedule's own fires advance
    // the last nominal time.
    if s.last_nominal_unix_ms != 0 {
        let lag = match s.last_fire_lag_ms {
            Some(ms) => format!("fire lag {:.3} s", ms as f64 / 1000.0),
            None => "its job not started".into(),
        };
        say!("           last scheduled nominal time {} ({lag})", time(s.last_nominal_unix_ms));
    }
    say!("fires      {} enqueued · {} skipped · {} missed", s.fires_total, s.skipped_total, s.missed_total);
    out.push(String::new());
    out.join("\n")
}

async fn schedules(cx: &Ctx, cmd: SchedulesCmd) -> Result<(), Failure> {
    let one = |s: Option<pb::Schedule>| s.ok_or_else(|| Failure::Other("empty response".into()));
    let show = |s: &pb::Schedule| {
        if cx.json {
            println!("{}", schedule_json(s));
        } else {
            print_schedule(s);
        }
    };
    let r = |account: String, name: String| cx.req(pb::ScheduleRef { account, name });
    match cmd {
        SchedulesCmd::List { account, limit, page_token } => {
            let r = cx
                .schedules()
                .list_schedules(cx.req(pb::ListSchedulesRequest {
                    account: account.unwrap_or_default(),
                    page_size: limit,
                    page_token: page_token.unwrap_or_default(),
                }))
                .await?
                .into_inner();
            if cx.json {
                println!(
                    "{}",
                    json!({ "schedules": r.schedules.iter().map(schedule_json).collect::<Vec<_>>(),
                            "next_page_token": r.next_page_token })
                );
            } else {
                let rows: Vec<Vec<String>> = r
                    .schedules
                    .iter()
                    .map(|s| {
                        let d = s.definition.clone().unwrap_or_default();
                        let when = timing(&d);
                        vec![
                            d.account,
                            d.name,
                            when,
                            d.zone,
                            d.kind,
                            next_fire(s),
                            time(s.last_fired_at_unix_ms),
                            s.fires_total.to_string(),
                            s.skipped_total.to_string(),
                            s.missed_total.to_string(),
                        ]
                    })
                    .collect();
                table(
                    &[
                        "account",
                        "name",
                        "timing",
                        "zone",
                        "kind",
                        "next fire",
                        "last fire",
                        "fires",
                        "skipped",
                        "missed",
                    ],
                    &rows,
                );
                if !r.next_page_token.is_empty() {
                    say!("\nmore: --page-token {}", r.next_page_token);
                }
            }
        }
        SchedulesCmd::Get { account, name } => {
            show(&one(cx.schedules().get_schedule(r(account, name)).await?.into_inner().schedule)?)
        }
        SchedulesCmd::Create(c) => {
            let def = pb::ScheduleDefinition {
                account: c.account,
                name: c.name,
                cron: c.cron.unwrap_or_default(),
                every_ms: c.every.map(|d| d.as_millis() as u64).unwrap_or(0),
                anchor_unix_ms: c.anchor.map(|t| t.timestamp_millis()).unwrap_or(0),
                zone: c.zone.unwrap_or_default(),
                jitter_ms: c.jitter.map(|d| d.as_millis() as u64).unwrap_or(0),
                start_unix_ms: c.start.map(|t| t.timestamp_millis()).unwrap_or(0),
                end_unix_ms: c.end.map(|t| t.timestamp_millis()).unwrap_or(0),
                kind: c.kind,
                args_json: c.args,
                lane: c.lane.unwrap_or_default(),
                priority: c.priority.unwrap_or(0),
                max_attempts: c.max_attempts.unwrap_or(0),
                timeout_ms: c.timeout.map(|d| d.as_millis() as u64).unwrap_or(0),
                overlap: c.overlap.unwrap_or_default(),
                catchup_window_ms: c.catchup_window.map(|d| d.as_millis() as u64),
                catchup: c.catchup.unwrap_or_default(),
            };
            let put = pb::PutScheduleRequest { schedule: Some(def) };
            show(&one(cx.schedules().put_schedule(cx.req(put)).await?.into_inner().schedule)?)
        }
        SchedulesCmd::Pause { account, name } => {
            show(&one(cx.schedules().pause_schedule(r(account, name)).await?.into_inner().schedule)?)
        }
        SchedulesCmd::Resume { account, name } => {
            show(&one(cx.schedules().resume_schedule(r(account, name)).await?.into_inner().schedule)?)
        }
        SchedulesCmd::Trigger { account, name } => {
            let job_id = cx.schedules().trigger_schedule(r(account, name.clone())).await?.into_inner().job_id;
            if cx.json {
                println!("{}", json!({ "job_id": job_id }));
            } else {
                say!("schedule {name} fired now: job {job_id}");
            }
        }
        SchedulesCmd::Backfill { account, name, from, to } => {
            let b = cx
                .schedules()
                .backfill_schedule(cx.req(pb::BackfillScheduleRequest {
                    account,
                    name: name.clone(),
                    from_unix_ms: from.timestamp_millis(),
                    to_unix_ms: to.timestamp_millis(),
                }))
                .await?
                .into_inner();
            if cx.json {
                println!("{}", json!({ "job_ids": b.job_ids, "already_fired": b.already_fired }));
            } else {
                say!(
                    "schedule {name}: {} job(s) enqueued for the range, {} nominal time(s) already fired",
                    b.job_ids.len(),
                    b.already_fired
                );
                if let (Some(first), Some(last)) = (b.job_ids.first(), b.job_ids.last()) {
                    say!("jobs {first} … {last}");
                }
            }
        }
        SchedulesCmd::Delete { account, name } => {
            cx.schedules().delete_schedule(r(account, name.clone())).await?;
            if cx.json {
                println!("{}", json!({ "deleted": true }));
            } else {
                say!("schedule {name} deleted (the jobs it fired stay)");
            }
        }
    }
    Ok(())
}

/// The whole `warden` CLI: parse the process arguments, run, map the outcome to an exit code.
#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Other(m)) => {
            eprintln!("error: {}", safe(&m));
            ExitCode::from(1)
        }
        Err(Failure::Status(s)) => {
            eprintln!("error: {}", safe(s.message()));
            ExitCode::from(match s.code() {
                Code::NotFound => 3,
                Code::InvalidArgument => 4,
                Code::Unavailable | Code::DeadlineExceeded => 5,
                Code::Unauthenticated => 6,
                Code::FailedPrecondition => 7,
                _ => 1,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_get_shows_the_last_fire_lag_and_escapes_names() {
        let mut s = pb::Schedule {
            definition: Some(pb::ScheduleDefinition {
                account: "acct-1".into(),
                name: "beat\u{1b}[2J".into(),
                every_ms: 1000,
                zone: "UTC".into(),
                kind: "tick".into(),
                args_json: "{}".into(),
                ..Default::default()
            }),
            source: "runtime".into(),
            next_nominal_unix_ms: 1_767_225_602_000,
            next_fire_at_unix_ms: 1_767_225_602_000,
            last_nominal_unix_ms: 1_767_225_601_000,
            last_fired_at_unix_ms: 1_767_225_601_010,
            last_job_id: 7,
            last_fire_lag_ms: Some(123),
            ..Default::default()
        };
        let text = schedule_text(&s);
        assert!(text.starts_with("schedule acct-1 / beat\\u{1b}[2J  active"), "{text}");
        assert!(!text.contains('\u{1b}'), "{text}");
        assert!(text.contains("last scheduled nominal time 2026-01-01 00:00:01.000 (fire lag 0.123 s)"), "{text}");
        s.last_fire_lag_ms = None;
        assert!(schedule_text(&s).contains("(its job not started)"));
        assert_eq!(schedule_json(&s)["last_fire_lag_ms"], serde_json::Value::Null);
        s.last_fire_lag_ms = Some(5);
        assert_eq!(schedule_json(&s)["last_fire_lag_ms"], 5);
        assert_eq!(schedule_json(&s)["name"], "beat\u{1b}[2J", "--json stays exact");
    }

    #[test]
    fn text_from_handlers_is_shown_with_its_control_characters_escaped() {
        // ESC sequences (clear screen, colour, OSC title), newlines, CR, tab, DEL, C1, bidi.
        assert_eq!(safe("\u{1b}[2J\u{1b}[31mred"), "\\u{1b}[2J\\u{1b}[31mred");
        assert_eq!(safe("a\nFAKE LINE\rb\tc"), "a\\nFAKE LINE\\rb\\tc");
        assert_eq!(safe("\u{1b}]0;title\u{7}"), "\\u{1b}]0;title\\u{7}");
        assert_eq!(safe("del\u{7f} c1\u{9b}31m"), "del\\u{7f} c1\\u{9b}31m");
        assert_eq!(safe("abc\u{202e}gpj.exe"), "abc\\u{202e}gpj.exe");
        // Printable Unicode (and a backslash) stays as written.
        for ok in ["step 42/100", "Grüße · 日本語 · émoji 🚀", "C:\\path", ""] {
            assert_eq!(safe(ok), ok);
        }
        // Nothing raw is left: no control character survives.
        let all: String = (0u32..0x2100).filter_map(char::from_u32).collect();
        assert!(!safe(&all).chars().any(|c| c.is_control()));
    }

    #[test]
    fn jobs_list_running_renders_a_hostile_progress_message_on_one_visible_line() {
        let p = pb::JobProgress {
            attempt: 1,
            node: "node-a/1".into(),
            heartbeat_age_ms: 800,
            message: "ok\u{1b}[2K\rDONE 100%\nfake row".into(),
            ..Default::default()
        };
        let rows = vec![vec!["7".into(), "acct\u{1b}[8m".into(), "sync".into(), progress_figures(&p)]];
        let text = table_text(&["id", "account", "kind", "progress"], &rows);
        assert!(!text.contains('\u{1b}') && !text.contains('\r'), "{text:?}");
        assert_eq!(text.lines().count(), 2, "a header and one row: {text:?}");
        let row = text.lines().nth(1).unwrap();
        assert_eq!(row, "7   acct\\u{1b}[8m  sync  ok\\u{1b}[2K\\rDONE 100%\\nfake row");
        // Columns are aligned on the escaped text.
        assert_eq!(text.lines().next().unwrap(), format!("ID  {:<13}  KIND  PROGRESS", "ACCOUNT"), "{text}");
        // --json stays exact.
        assert_eq!(progress_json(&p)["message"], "ok\u{1b}[2K\rDONE 100%\nfake row");
    }

    #[test]
    fn ages_read_as_people_say_them() {
        assert_eq!(age(800), "0.8s");
        assert_eq!(age(-5), "0.0s", "clock noise is not a negative age");
        assert_eq!(age(42_000), "42s");
        assert_eq!(age(723_000), "12m 3s");
        assert_eq!(age(3 * 3_600_000 + 12 * 60_000), "3h 12m");
        assert_eq!(age(2 * 86_400_000 + 4 * 3_600_000), "2d 4h");
        assert_eq!(size(120), "120 B");
        assert_eq!(size(3277), "3.2 KiB");
    }

    #[test]
    fn durations_and_times_parse_as_written() {
        let d = |s: &str| parse_duration(s).map(|d| d.as_millis());
        assert_eq!(d("30s"), Ok(30_000));
        assert_eq!(d("500ms"), Ok(500));
        assert_eq!(d("1h30m"), Ok(5_400_000));
        assert_eq!(d("2d"), Ok(172_800_000));
        for bad in ["", "30", "s", "3x", "1.5h", "-1s"] {
            assert!(d(bad).unwrap_err().contains("not a duration"), "{bad}");
        }
        assert_eq!(parse_time("2026-01-01T04:00:00+01:00").unwrap().to_rfc3339(), "2026-01-01T03:00:00+00:00");
        assert!(parse_time("yesterday").unwrap_err().contains("RFC 3339"));
    }

    #[test]
    fn the_progress_line_says_what_was_recorded() {
        let mut p = pb::JobProgress {
            attempt: 2,
            node: "node-a/1".into(),
            heartbeat_age_ms: 800,
            percent: Some(42.0),
            message: "step 42/100".into(),
            checkpoint_at_unix_ms: 1,
            checkpoint_age_ms: 3_100,
            checkpoint_attempt: 2,
            checkpoint_bytes: 120,
            ..Default::default()
        };
        assert_eq!(
            progress_line(&p),
            "42.0%  step 42/100 · heartbeat 0.8s ago (node-a, attempt 2) · checkpoint 3.1s ago (attempt 2, 120 B)"
        );
        p.percent = None;
        p.message.clear();
        p.checkpoint_at_unix_ms = 0;
        assert_eq!(progress_line(&p), "heartbeat 0.8s ago (node-a, attempt 2)", "a bare beat, no checkpoint");
    }
}
