//! The job store: every SQL statement Warden runs lives in this module.
//!
//! [`Store`] is the seam the executor, enforcer and lease keeper talk to;
//! [`PgStore`] implements it on PostgreSQL. The hot path is [`Store::finish`]:
//! one statement that (fenced by the lease epoch) finishes the
//! current attempt, writes its attempt row and claims the account's next job.
//!
//! Fencing: every executor write carries a [`Fence`] (partition, epoch, node) and is
//! conditional on `warden.leases` still holding exactly that, unexpired by the
//! database clock, in the same statement. A write that affects no row is reported as
//! [`Error::Fenced`]; callers must stop, not retry.
//!
//! The fence is a *shared advisory lock* on the partition plus a lease check in a
//! fresh snapshot (`warden.fence`, migration 0004); a takeover takes the same lock
//! exclusively (a trigger on `warden.leases`), so it waits for every fenced
//! transaction in flight and every later fenced statement sees its new epoch. The
//! owner's renewal takes no fence lock and never queues behind fenced work (with
//! `FOR SHARE` a busy node once starved its own renewals; regression test:
//! `store::renewal_is_not_blocked_by_fenced_work_but_takeover_is`). Until v3 the fence
//! locked the lease row `FOR KEY SHARE`, which made PostgreSQL create a MultiXact per
//! contended fenced statement; advisory locks create none (measured by
//! `warden-bench --multixact`).

use crate::error::{Error, Result};
use crate::job::{CancelResult, Enqueued, JobRow, NewJob, Schedule};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Postgres, Row};
use std::str::FromStr;
use std::time::Duration;
use warden_cluster::{partition_of, PartitionCount};

/// A handler's transaction: its writes commit atomically with the job's completion.
///
/// Not `sqlx::Transaction`: an attempt can be dropped mid-statement (timeout, lost
/// lease, abort), and a connection in that state must never go back to the pool —
/// a later `BEGIN` on it would silently continue the dead attempt's transaction and
/// commit its writes. A `JobTx` that was not explicitly committed or rolled back
/// closes its connection instead; PostgreSQL then rolls the transaction back.
pub struct JobTx {
    conn: PoolConnection<Postgres>,
    clean: bool,
}

impl JobTx {
    async fn begin(pool: &PgPool, idle_timeout: Duration) -> Result<Self> {
        let conn = pool.acquire().await?;
        let mut tx = JobTx { conn, clean: false };
        // One round trip: the transaction and its server-side idle bound.
        let sql = format!(
            "BEGIN ISOLATION LEVEL READ COMMITTED; SET LOCAL idle_in_transaction_session_timeout = {}",
            ms(idle_timeout).max(1)
        );
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut *tx.conn).await?;
        Ok(tx)
    }

    /// The connection, inside the transaction.
    pub fn conn(&mut self) -> &mut sqlx::PgConnection {
        &mut self.conn
    }

    async fn commit(mut self) -> Result<()> {
        sqlx::raw_sql("COMMIT").execute(&mut *self.conn).await?;
        self.clean = true;
        Ok(())
    }

    /// Roll back and return the connection to the pool (only when no statement can
    /// be in flight on it, i.e. the handler returned normally).
    pub async fn rollback(mut self) -> Result<()> {
        sqlx::raw_sql("ROLLBACK").execute(&mut *self.conn).await?;
        self.clean = true;
        Ok(())
    }
}

impl Drop for JobTx {
    fn drop(&mut self) {
        if !self.clean {
            self.conn.close_on_drop();
        }
    }
}

/// NOTIFY channel: `partition:account` has new due work.
pub const CHANNEL_WAKE: &str = "warden_wake";
/// NOTIFY channel: `partition:account:job_id` was asked to cancel while running.
pub const CHANNEL_CANCEL: &str = "warden_cancel";
/// NOTIFY channel: a node released leases (payload: node); owners should re-check.
pub const CHANNEL_LEASE: &str = "warden_lease";

/// The authority an executor acts under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub partition: u32,
    pub epoch: i64,
    /// The lease owner string: `node_id/generation`.
    pub owner: std::sync::Arc<str>,
}

/// What happened to an attempt, as the store records it.
#[derive(Debug, Clone, PartialEq)]
pub enum Finish {
    Completed,
    /// Failed (handler error, panic, timeout or explicit retry): retry after `after`.
    Retry {
        after: Duration,
        outcome: &'static str,
        error: String,
    },
    /// Try again after `after` without using up an attempt.
    Snooze {
        after: Duration,
    },
    /// Give up: `outcome` is `discarded`, `failed` (exhausted) or `timeout` (exhausted).
    Discard {
        outcome: &'static str,
        error: String,
    },
    Cancelled {
        error: String,
    },
    /// Stopped because the partition is being handed off (drain): run again at once
    /// on the next owner, without using up an attempt.
    Interrupted {
        error: String,
    },
}

/// The columns a [`Finish`] writes. Delays are clamped to [`crate::job::MAX_DELAY`]
/// and text made storable, so that a finish can always succeed: one PostgreSQL
/// rejects (an interval out of range, a NUL byte) would be rejected on every retry.
struct FinishColumns {
    state: &'static str,
    due_ms: Option<i64>,
    outcome: &'static str,
    error: Option<String>,
    /// Give the attempt back (snooze, interruption).
    refund: bool,
}

impl Finish {
    fn columns(&self) -> FinishColumns {
        let delay = |d: &Duration| Some(ms((*d).min(crate::job::MAX_DELAY)));
        let text = |e: &str| Some(crate::job::storable_text(e));
        let c = |state, due_ms, outcome, error, refund| FinishColumns { state, due_ms, outcome, error, refund };
        match self {
            Finish::Completed => c("completed", None, "completed", None, false),
            Finish::Retry { after, outcome, error } => c("retryable", delay(after), outcome, text(error), false),
            Finish::Snooze { after } => c("retryable", delay(after), "snoozed", None, true),
            Finish::Discard { outcome, error } => c("discarded", None, outcome, text(error), false),
            Finish::Cancelled { error } => c("cancelled", None, "cancelled", text(error), false),
            Finish::Interrupted { error } => c("retryable", Some(0), "interrupted", text(error), true),
        }
    }

    pub fn is_terminal(&self) -> bool {
        matches!(self, Finish::Completed | Finish::Discard { .. } | Finish::Cancelled { .. })
    }
}

/// What a finish statement found.
#[derive(Debug)]
pub enum Finished {
    /// The outcome was recorded; the account's next job, if one was claimed.
    Recorded(Option<JobRow>),
    /// The fence holds but the job is no longer running at this epoch: an earlier
    /// try of this finish committed and its reply was lost (or an operator finished
    /// it). Not a fence failure: the account's actor claims again, which adopts any
    /// job that earlier try claimed.
    NotRunning,
}

impl Finished {
    /// The job claimed next, if any.
    pub fn into_next(self) -> Option<JobRow> {
        match self {
            Finished::Recorded(next) => next,
            Finished::NotRunning => None,
        }
    }
}

/// A lease this node holds, as the database granted it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrantedLease {
    pub partition: u32,
    pub epoch: i64,
}

/// One row of `warden.leases`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct LeaseRow {
    pub partition: i32,
    pub owner_node: Option<String>,
    pub epoch: i64,
    pub lease_expires_at: Option<DateTime<Utc>>,
}

/// Per-state job counts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StateCounts(pub Vec<(String, i64)>);

impl StateCounts {
    pub fn get(&self, state: &str) -> i64 {
        self.0.iter().find(|(s, _)| s == state).map(|(_, n)| *n).unwrap_or(0)
    }
}

/// The storage seam. All executor writes are fenced; see the module docs.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Partition count P fixed in the database.
    fn partitions(&self) -> PartitionCount;

    /// Acquire the given partitions for `owner` where free, expired, or already ours.
    async fn acquire(&self, owner: &str, partitions: &[u32], ttl: Duration) -> Result<Vec<GrantedLease>>;
    /// Renew held leases in one statement; returns the partitions renewed.
    async fn renew(&self, owner: &str, held: &[GrantedLease], ttl: Duration) -> Result<Vec<u32>>;
    /// Release leases (owner = NULL, epoch kept) and NOTIFY so the next owner acquires at once.
    async fn release(&self, owner: &str, held: &[GrantedLease]) -> Result<u64>;
    /// Reset attempts left `running` under an older epoch in partitions just acquired
    /// (one statement for all). Returns the number of attempts rescued.
    async fn rescue(&self, owner: &str, acquired: &[GrantedLease]) -> Result<u64>;
    /// How long until the earliest of these partitions' leases, held by someone else,
    /// expires (by the database clock); `None` if none is held by another owner.
    async fn lease_wait(&self, owner: &str, partitions: &[u32]) -> Result<Option<Duration>>;
    /// Accounts whose next runnable job is due in these partitions (the serial head,
    /// or any due unordered job), oldest first, at most `limit`. An account whose
    /// serial head is backing off is not listed even if later jobs are due: it has
    /// nothing to run, and listing it would fill the scan and starve others.
    async fn due_accounts(&self, partitions: &[u32], limit: i64) -> Result<Vec<(String, u32)>>;
    /// Jobs `running` under `owner` in these partitions: (job id, account, partition).
    /// The enforcer compares them with the attempts running here; one with no local
    /// attempt is an orphan of an ambiguous result, and its account is woken to adopt it.
    async fn running_here(&self, owner: &str, partitions: &[u32], limit: i64) -> Result<Vec<(i64, String, u32)>>;

    /// Claim the account's next runnable job (serial head if due, else a due unordered
    /// job), or adopt the account's job already running at this fence's epoch and
    /// owner (see `CLAIM_SQL`). Only jobs of the fence's partition are considered.
    async fn claim(&self, account: &str, fence: &Fence) -> Result<Option<JobRow>>;
    /// Finish `job` (fenced), record its attempt, and if `claim_next` claim the account's
    /// next job, all in one statement. With `tx`, the statement runs inside the handler's
    /// transaction, which is then committed (or rolled back if fenced).
    async fn finish(
        &self,
        tx: Option<JobTx>,
        job: &JobRow,
        fence: &Fence,
        finish: &Finish,
        claim_next: bool,
    ) -> Result<Finished>;
    /// Undo a claim that will not run (the account is draining).
    async fn unclaim(&self, job: &JobRow, fence: &Fence) -> Result<()>;
    /// Has someone asked to cancel this (running) job?
    async fn cancel_requested(&self, job_id: i64) -> Result<bool>;
    /// Begin a handler transaction that PostgreSQL ends if it stays idle longer than
    /// `idle_timeout` (see `JobContext::tx`).
    async fn begin(&self, idle_timeout: Duration) -> Result<JobTx>;

    /// Record that `member` reaches the database (`warden.members`) and return the
    /// node ids seen within `within`, itself included. Placement counts only those
    /// (see `warden_cluster::placement::eligible_ids`). `None`: this store keeps no
    /// such proof (placement then trusts gossip alone).
    async fn heartbeat(&self, _member: &MemberInfo, _within: Duration) -> Result<Option<Vec<String>>> {
        Ok(None)
    }
}

/// What a node records about itself on every heartbeat.
#[derive(Debug, Clone)]
pub struct MemberInfo {
    pub node_id: String,
    pub started_at: DateTime<Utc>,
    /// The binary's schema version.
    pub schema: i64,
    /// Its ring fingerprint.
    pub ring: String,
}

/// Connection settings for the store.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Max connections in the executor pool.
    pub max_connections: u32,
    /// How long to wait for a pooled connection before failing the operation.
    pub acquire_timeout: Duration,
    /// Per-statement timeout set on every connection (`statement_timeout`).
    pub statement_timeout: Duration,
    /// How long [`connect`] keeps retrying a database that does not answer (yet)
    /// before giving up: a node started while PostgreSQL is down or restarting waits
    /// for it, saying so, instead of exiting. Zero: one try.
    pub connect_retry: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            max_connections: 16,
            acquire_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(30),
            connect_retry: Duration::from_secs(300),
        }
    }
}

/// Open a pool tuned for the executor hot path: long-lived connections, no ping on
/// acquire (sqlx pings by default, which costs a round trip per statement).
pub async fn connect(database_url: &str, config: &StoreConfig) -> Result<PgPool> {
    let opts = PgConnectOptions::from_str(database_url)?
        .application_name("warden")
        // Server-side TCP keepalives: PostgreSQL notices a node that vanished (cut
        // off, powered off) in ~25 s instead of the kernel's default ~2 h, and ends its
        // sessions, releasing their locks (handler transactions are bounded on top by
        // their idle timeout; see `JobContext::tx`).
        .options([
            ("statement_timeout", format!("{}", config.statement_timeout.as_millis())),
            // The fence needs READ COMMITTED (see warden.fence), whatever the
            // database's or role's default isolation is.
            ("default_transaction_isolation", "read committed".to_string()),
            ("tcp_keepalives_idle", "10".to_string()),
            ("tcp_keepalives_interval", "5".to_string()),
            ("tcp_keepalives_count", "3".to_string()),
        ]);
    let pool = PgPoolOptions::new()
        .max_connections(config.max_connections)
        .min_connections(0)
        .acquire_timeout(config.acquire_timeout)
        .test_before_acquire(false)
        .idle_timeout(Some(Duration::from_secs(300)))
        .connect_lazy_with(opts);
    // Wait for the database: retry transient failures (refused, reset, too many
    // connections, starting up) with backoff until `connect_retry`; fail at once on
    // what retrying cannot fix (bad credentials, unknown database, bad URL).
    let started = std::time::Instant::now();
    let mut delay = Duration::from_millis(200);
    let mut tries = 0u32;
    loop {
        tries += 1;
        // sqlx retries a refused connection inside `acquire` until its timeout; try
        // for 2 s at most so each failure is seen (and logged) and the bound holds.
        let tried = match tokio::time::timeout(Duration::from_secs(2), pool.acquire()).await {
            Ok(r) => r,
            Err(_) => Err(sqlx::Error::PoolTimedOut),
        };
        match tried {
            Ok(conn) => {
                drop(conn);
                if tries > 1 {
                    tracing::info!(tries, waited = ?started.elapsed(), "database reachable");
                }
                return Ok(pool);
            }
            Err(e) => {
                let permanent = match &e {
                    // 28: invalid authorization; 3D000: no such database; 42: access/syntax.
                    sqlx::Error::Database(d) => {
                        matches!(d.code().as_deref().map(|c| &c[..2.min(c.len())]), Some("28" | "42"))
                            || d.code().as_deref() == Some("3D000")
                    }
                    sqlx::Error::Configuration(_) | sqlx::Error::Tls(_) => true,
                    _ => false,
                };
                let waited = started.elapsed();
                if permanent || waited + delay > config.connect_retry {
                    return Err(e.into());
                }
                tracing::warn!(error = %e, tries, retry_in = ?delay, waited = ?waited,
                    gives_up_after = ?config.connect_retry, "database not reachable yet; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// The embedded migrations (tests apply a prefix of them to check upgrades).
pub fn migrator() -> sqlx::migrate::Migrator {
    sqlx::migrate!("./migrations")
}

/// Apply the embedded migrations with Warden's own history (`warden.schema_history`;
/// see [`crate::schema`]) and check this binary may run against the result. Several
/// nodes starting at once apply them exactly once.
pub async fn migrate(pool: &PgPool) -> Result<()> {
    crate::schema::migrate(pool, None).await?;
    Ok(())
}

/// Fix (or check) the partition count and make sure every lease row exists.
pub async fn init_partitions(pool: &PgPool, partitions: PartitionCount) -> Result<PartitionCount> {
    let mut tx = pool.begin().await?;
    // Serialise concurrent first starts on the meta row.
    sqlx::query("INSERT INTO warden.meta (key, value) VALUES ('partitions', $1) ON CONFLICT (key) DO NOTHING")
        .bind(partitions.get().to_string())
        .execute(&mut *tx)
        .await?;
    let stored: String =
        sqlx::query_scalar("SELECT value FROM warden.meta WHERE key = 'partitions'").fetch_one(&mut *tx).await?;
    let stored: u32 = stored
        .parse()
        .map_err(|_| Error::Config(format!("warden.meta partitions value {stored:?} is not a number")))?;
    if stored != partitions.get() {
        return Err(Error::PartitionMismatch { stored, configured: partitions.get() });
    }
    sqlx::query(
        "INSERT INTO warden.leases (partition) SELECT g FROM generate_series(0, $1 - 1) g ON CONFLICT DO NOTHING",
    )
    .bind(partitions.get() as i32)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(partitions)
}

/// Read P from the database (for clients that do not run a node).
pub async fn load_partitions(pool: &PgPool) -> Result<PartitionCount> {
    let stored: Option<String> =
        match sqlx::query_scalar("SELECT value FROM warden.meta WHERE key = 'partitions'").fetch_optional(pool).await {
            Ok(v) => v,
            // 42P01: undefined_table (no migrations yet); 3F000: invalid_schema_name.
            Err(sqlx::Error::Database(e)) if matches!(e.code().as_deref(), Some("42P01" | "3F000")) => None,
            Err(e) => return Err(e.into()),
        };
    let stored = stored.ok_or(Error::NotInitialised)?;
    let p: u32 = stored.parse().map_err(|_| Error::NotInitialised)?;
    PartitionCount::new(p).map_err(|e| Error::Config(e.to_string()))
}

/// Fence check, usable as a CTE body: one row while ($P partition, $E epoch, $O owner)
/// holds an unexpired lease. `warden.fence` (migration 0004) takes the partition's
/// shared fence lock and checks the lease in a fresh snapshot, so no takeover can
/// commit until this transaction ends and none committed before the check.
macro_rules! fence_sql {
    ($p:literal, $e:literal, $o:literal) => {
        concat!("SELECT 1 WHERE warden.fence(", $p, "::int, ", $e, "::bigint, ", $o, "::text)")
    };
}

/// The account's next runnable job id: the serial head if it is due and not running,
/// else the earliest due unordered job. `$A` account, `$P` the partition the fence
/// names, `$X` a job id to ignore (the one being finished in the same statement, which
/// the statement's snapshot still sees).
///
/// `partition = $P`: the account comes from a NOTIFY payload or a caller, which are
/// hints, never instructions. A job is only ever claimed under its own partition's
/// fence; a wake-up naming an account of another partition finds nothing (a spoofed
/// `warden_wake` once ran a job of an unheld partition under another one's fence).
macro_rules! head_sql {
    ($a:literal, $p:literal, $x:literal) => {
        concat!(
            "SELECT id FROM (",
            "  (SELECT id, state, due_at FROM warden.jobs",
            "    WHERE account = ",
            $a,
            " AND partition = ",
            $p,
            " AND lane = 'serial' AND id <> ",
            $x,
            "      AND state IN ('scheduled', 'available', 'retryable', 'running')",
            "    ORDER BY run_at, id LIMIT 1)",
            ") h WHERE h.state <> 'running' AND h.due_at <= statement_timestamp()",
            " UNION ALL ",
            "(SELECT id FROM warden.jobs",
            "  WHERE account = ",
            $a,
            " AND partition = ",
            $p,
            " AND lane = 'unordered' AND id <> ",
            $x,
            "    AND state IN ('scheduled', 'available', 'retryable') AND due_at <= statement_timestamp()",
            "  ORDER BY due_at, id LIMIT 1)",
            " LIMIT 1"
        )
    };
}

/// Accounts whose next runnable job is due: $1 partitions, $2 limit (see
/// [`Store::due_accounts`]). Public for the test that checks its cost is per account.
#[doc(hidden)]
pub const DUE_ACCOUNTS_SQL: &str = "SELECT a.account, a.partition FROM (
                SELECT account, partition, min(due_at) AS due, bool_or(lane = 'unordered') AS unordered_due
                FROM warden.jobs
                WHERE partition = ANY($1) AND state IN ('scheduled', 'available', 'retryable') AND due_at <= now()
                GROUP BY account, partition) a
             WHERE a.unordered_due OR EXISTS (
                SELECT 1 FROM (
                    SELECT h.state, h.due_at FROM warden.jobs h
                    WHERE h.account = a.account AND h.lane = 'serial'
                      AND h.state IN ('scheduled', 'available', 'retryable', 'running')
                    ORDER BY h.run_at, h.id LIMIT 1) head
                WHERE head.state <> 'running' AND head.due_at <= now())
             ORDER BY a.due LIMIT $2";

/// Claim the job chosen by `head` for ($P partition, $E epoch, $O owner).
macro_rules! claim_update_sql {
    ($p:literal, $e:literal, $o:literal, $cond:literal) => {
        concat!(
            "UPDATE warden.jobs j SET state = 'running', attempt = j.attempt + 1, epoch = ",
            $e,
            ", node = ",
            $o,
            ", attempted_at = statement_timestamp()",
            " FROM head WHERE j.id = head.id AND j.partition = ",
            $p,
            " AND j.state IN ('scheduled', 'available', 'retryable') AND ",
            $cond,
            " RETURNING j.*"
        )
    };
}

// $1 account, $2 partition, $3 epoch, $4 owner.
//
// `mine` adopts a job of this account already running at this (epoch, owner): the
// actor claims only while it runs nothing, so such a job has no local attempt. It is
// what an ambiguous result leaves behind — a claim or a finish-and-claim-next that
// committed but whose reply was lost, an in-doubt COMMIT, an unclaim that failed, an
// outcome that could not be recorded — and rescue never touches it while this epoch
// holds the lease. Claiming adopts it (runs it) instead of claiming past it, so
// "running at my epoch with no local attempt" cannot outlive the account's next
// claim; the enforcer's scan wakes such accounts (`Store::running_here`). Adopting
// counts an attempt, as a rescue does: a job whose outcome can never be recorded is
// then given up after `max_attempts` instead of running forever.
const CLAIM_SQL: &str = concat!(
    "WITH fence AS (",
    fence_sql!("$2", "$3", "$4"),
    "),",
    " mine AS (UPDATE warden.jobs j SET attempt = j.attempt + 1, attempted_at = statement_timestamp()",
    "   WHERE j.id = (SELECT o.id FROM warden.jobs o WHERE o.account = $1 AND o.partition = $2 AND o.state = 'running'",
    "                 AND o.epoch = $3 AND o.node = $4 ORDER BY o.id LIMIT 1)",
    "   AND j.state = 'running' AND EXISTS (SELECT 1 FROM fence) RETURNING j.*),",
    " head AS (",
    head_sql!("$1", "$2", "0"),
    "),",
    " next AS (",
    claim_update_sql!("$2", "$3", "$4", "EXISTS (SELECT 1 FROM fence) AND NOT EXISTS (SELECT 1 FROM mine)"),
    ")",
    " SELECT (SELECT count(*) FROM fence) AS fence_held, x.* FROM (SELECT 1) one",
    " LEFT JOIN (SELECT * FROM mine UNION ALL SELECT * FROM next) x ON true"
);

// $1 job id, $2 partition, $3 epoch, $4 owner, $5 new state, $6 due in ms (NULL: keep),
// $7 outcome, $8 error, $9 refund the attempt, $10 account, $11 claim next, $12 idle timeout.
//
// `guard` bounds how long the fence lock can outlive this statement: inside a handler
// transaction, the lock is held until COMMIT, and a process paused between the two
// would block every takeover of the partition. With the local
// idle_in_transaction_session_timeout, PostgreSQL ends such a session (rolling the
// attempt back, to be rescued) after a lease TTL.
//
// A cancel requested while the attempt ran wins over a retry or snooze (the handler
// failed or asked again, but its operator wants it stopped): the job ends cancelled.
// `fence_held` tells a lost race with the fence (stop: a zombie) from a job that is
// no longer running at this epoch although the fence holds (an earlier try of this
// statement committed; see [`Finished::NotRunning`]).
const FINISH_SQL: &str = concat!(
    "WITH guard AS (SELECT set_config('idle_in_transaction_session_timeout', $12, true)),",
    " fence AS (", fence_sql!("$2", "$3", "$4"), "),",
    " done AS (",
    "  UPDATE warden.jobs SET",
    "    state = CASE WHEN cancel_requested AND $5 = 'retryable' THEN 'cancelled' ELSE $5 END,",
    "    due_at = COALESCE(statement_timestamp() + $6::bigint * interval '1 millisecond', due_at),",
    "    finished_at = CASE WHEN $5 IN ('completed', 'discarded', 'cancelled') OR (cancel_requested AND $5 = 'retryable')",
    "                       THEN statement_timestamp() END,",
    "    last_error = CASE WHEN cancel_requested AND $5 = 'retryable'",
    "                      THEN 'cancelled while running; last attempt: ' || COALESCE($8, $7)",
    "                      ELSE COALESCE($8, last_error) END,",
    "    max_attempts = max_attempts + CASE WHEN $9 THEN 1 ELSE 0 END",
    "  WHERE id = $1 AND partition = $2 AND state = 'running' AND epoch = $3 AND node = $4",
    "    AND EXISTS (SELECT 1 FROM fence) AND EXISTS (SELECT 1 FROM guard)",
    "  RETURNING id, account, partition, attempt, attempted_at, state),",
    " att AS (",
    "  INSERT INTO warden.attempts (job_id, account, partition, attempt, node, epoch, started_at, finished_at, outcome, error)",
    "  SELECT id, account, partition, attempt, $4, $3, attempted_at, statement_timestamp(), $7, $8 FROM done),",
    " head AS (", head_sql!("$10", "$2", "$1"), "),",
    " next AS (", claim_update_sql!("$2", "$3", "$4", "$11 AND EXISTS (SELECT 1 FROM done)"), ")",
    " SELECT (SELECT count(*) FROM done) AS finished, (SELECT count(*) FROM fence) AS fence_held,",
    "        (SELECT state FROM done) AS finished_state, next.*",
    " FROM (SELECT 1) one LEFT JOIN next ON true"
);

// Rescue in every partition just acquired, in one statement: $1 partitions, $2 epochs
// (pairwise), $3 owner. Fenced per partition like every executor write, and epochs
// are compared within one partition only.
const RESCUE_SQL: &str = concat!(
    "WITH held AS (",
    "  SELECT l.partition, l.epoch FROM warden.leases l",
    "  JOIN unnest($1::int[], $2::bigint[]) AS h(partition, epoch) ON l.partition = h.partition AND l.epoch = h.epoch",
    "  WHERE l.owner_node = $3 AND l.lease_expires_at > statement_timestamp()",
    "    AND warden.fence(l.partition, l.epoch, l.owner_node)),",
    " r AS (",
    "  UPDATE warden.jobs j SET",
    "    state = CASE WHEN j.cancel_requested THEN 'cancelled' WHEN j.attempt >= j.max_attempts THEN 'discarded' ELSE 'retryable' END,",
    "    due_at = statement_timestamp(),",
    "    finished_at = CASE WHEN j.cancel_requested OR j.attempt >= j.max_attempts THEN statement_timestamp() END,",
    "    last_error = 'attempt ' || j.attempt || ' abandoned by ' || COALESCE(j.node, '?') || ' at epoch ' || COALESCE(j.epoch, 0) || '; rescued'",
    "  FROM held WHERE j.partition = held.partition AND j.state = 'running' AND (j.epoch IS NULL OR j.epoch < held.epoch)",
    "  RETURNING j.id, j.account, j.partition, j.attempt, j.node, j.epoch, j.attempted_at, j.last_error)",
    " INSERT INTO warden.attempts (job_id, account, partition, attempt, node, epoch, started_at, finished_at, outcome, error)",
    " SELECT id, account, partition, attempt, COALESCE(node, ''), COALESCE(epoch, 0),",
    "        COALESCE(attempted_at, statement_timestamp()), statement_timestamp(), 'rescued', last_error FROM r"
);

const UNCLAIM_SQL: &str = concat!(
    "WITH fence AS (",
    fence_sql!("$2", "$3", "$4"),
    ")",
    " UPDATE warden.jobs SET state = 'available', attempt = attempt - 1, attempted_at = NULL",
    " WHERE id = $1 AND partition = $2 AND state = 'running' AND epoch = $3 AND node = $4 AND EXISTS (SELECT 1 FROM fence)"
);

// A claimed row that cannot be decoded (see `decode_job`): discard it, fenced, with
// the reason, so it neither stalls its account nor is claimed again. $1 job id,
// $2 partition, $3 epoch, $4 owner, $5 error.
const DISCARD_UNDECODABLE_SQL: &str = concat!(
    "WITH fence AS (",
    fence_sql!("$2", "$3", "$4"),
    "), done AS (",
    " UPDATE warden.jobs SET state = 'discarded', finished_at = statement_timestamp(), last_error = $5",
    " WHERE id = $1 AND partition = $2 AND state = 'running' AND epoch = $3 AND node = $4 AND EXISTS (SELECT 1 FROM fence)",
    " RETURNING id, account, partition, attempt, attempted_at)",
    " INSERT INTO warden.attempts (job_id, account, partition, attempt, node, epoch, started_at, finished_at, outcome, error)",
    " SELECT id, account, partition, attempt, $4, $3, COALESCE(attempted_at, statement_timestamp()), statement_timestamp(),",
    "        'discarded', $5 FROM done"
);

/// Decode a job row without letting a value Rust cannot represent panic the caller
/// (sqlx's chrono decoding panics on out-of-range timestamps). Migration 0003 keeps
/// such values out of `warden.jobs`; this is the second line.
fn decode_job(row: &sqlx::postgres::PgRow) -> Result<JobRow> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| <JobRow as sqlx::FromRow<_>>::from_row(row))) {
        Ok(Ok(job)) => Ok(job),
        Ok(Err(e)) => Err(Error::Undecodable(e.to_string())),
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic".into());
            Err(Error::Undecodable(msg))
        }
    }
}

/// PostgreSQL implementation of [`Store`].
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    partitions: PartitionCount,
    /// Bound on how long a finished-but-uncommitted handler transaction may hold its
    /// fence lock (see FINISH_SQL). Set it to the lease TTL.
    finish_idle_timeout_ms: u64,
}

impl PgStore {
    pub fn new(pool: PgPool, partitions: PartitionCount) -> Self {
        Self { pool, partitions, finish_idle_timeout_ms: 4000 }
    }

    /// See `finish_idle_timeout_ms`.
    pub fn with_finish_idle_timeout(mut self, t: Duration) -> Self {
        self.finish_idle_timeout_ms = t.as_millis().max(1) as u64;
        self
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The job a claim (or a finish's claim-next) returned, if any. A row that cannot
    /// be decoded is discarded, fenced, with the reason recorded, instead of panicking
    /// the actor or attempt that claimed it.
    async fn claimed_row(&self, row: &sqlx::postgres::PgRow, fence: &Fence) -> Result<Option<JobRow>> {
        let Some(id) = row.try_get::<Option<i64>, _>("id")? else { return Ok(None) };
        match decode_job(row) {
            Ok(job) => Ok(Some(job)),
            Err(e) => {
                tracing::error!(job_id = id, error = %e, "claimed a job row that cannot be decoded; discarding it");
                metrics::counter!("warden_undecodable_jobs_total").increment(1);
                sqlx::query(DISCARD_UNDECODABLE_SQL)
                    .bind(id)
                    .bind(fence.partition as i32)
                    .bind(fence.epoch)
                    .bind(&*fence.owner)
                    .bind(crate::job::storable_text(&format!("the job row cannot be decoded: {e}")))
                    .execute(&self.pool)
                    .await?;
                Ok(None)
            }
        }
    }
}

/// Publish the per-kind options of a node's handlers (`warden.kinds`), so that
/// enqueues that do not hold the handlers — the SQL function, a plain [`crate::Client`],
/// gRPC — store the kind's max attempts and timeout. The last node to start wins: in a
/// rolling deploy that changes a kind's options, jobs enqueued meanwhile get either.
pub async fn publish_kinds(pool: &PgPool, registry: &crate::handler::Registry, node: &str) -> Result<()> {
    let kinds: Vec<String> = registry.kinds().into_iter().map(String::from).collect();
    if kinds.is_empty() {
        return Ok(());
    }
    let opts: Vec<&crate::handler::JobOptions> = kinds.iter().filter_map(|k| registry.options(k)).collect();
    let max_attempts: Vec<i32> = opts.iter().map(|o| o.max_attempts).collect();
    let timeout_ms: Vec<i32> = opts.iter().map(|o| ms(o.timeout).min(i32::MAX as i64) as i32).collect();
    sqlx::query(
        "INSERT INTO warden.kinds (kind, max_attempts, timeout_ms, updated_by)
         SELECT k, m, t, $4 FROM unnest($1::text[], $2::int[], $3::int[]) AS u(k, m, t)
         ON CONFLICT (kind) DO UPDATE SET max_attempts = EXCLUDED.max_attempts, timeout_ms = EXCLUDED.timeout_ms,
             updated_by = EXCLUDED.updated_by, updated_at = statement_timestamp()
         WHERE (warden.kinds.max_attempts, warden.kinds.timeout_ms) IS DISTINCT FROM (EXCLUDED.max_attempts, EXCLUDED.timeout_ms)",
    )
    .bind(&kinds)
    .bind(&max_attempts)
    .bind(&timeout_ms)
    .bind(node)
    .execute(pool)
    .await?;
    Ok(())
}

fn ms(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

/// Most partitions one lease statement (acquire, release, rescue) touches. Every
/// epoch change takes the partition's fence lock in PostgreSQL's shared lock table
/// (and rescue takes one per partition), which holds `max_locks_per_transaction ×
/// max_connections` entries for the whole server — 6,400 by default, shared with the
/// application. One statement for P = 16,384 partitions failed with "out of shared
/// memory" on a default server; chunks keep each transaction to this many.
pub const LOCK_CHUNK: usize = 256;

impl PgStore {
    async fn acquire_chunk(&self, owner: &str, partitions: &[u32], ttl: Duration) -> Result<Vec<GrantedLease>> {
        let parts: Vec<i32> = partitions.iter().map(|p| *p as i32).collect();
        let rows = sqlx::query(
            // A partition with a fenced transaction in flight (perhaps of a paused
            // node) is skipped this round instead of stalling the enforcer: its fence
            // lock is taken with a try (the trigger of migration 0004 then re-enters
            // it), and SKIP LOCKED skips the row lock a schema-v3 node's fence holds.
            "UPDATE warden.leases l SET owner_node = $1, epoch = l.epoch + 1,
                    lease_expires_at = now() + $2::bigint * interval '1 millisecond'
             FROM (SELECT partition FROM warden.leases
                   WHERE partition = ANY($3)
                     AND CASE WHEN owner_node IS NULL OR owner_node = $1 OR lease_expires_at < now()
                              THEN pg_try_advisory_xact_lock(1463898694, partition) ELSE false END
                   FOR UPDATE SKIP LOCKED) free
             WHERE l.partition = free.partition
             RETURNING l.partition, l.epoch",
        )
        .bind(owner)
        .bind(ms(ttl))
        .bind(&parts)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok(GrantedLease { partition: r.try_get::<i32, _>(0)? as u32, epoch: r.try_get(1)? }))
            .collect()
    }

    async fn release_chunk(&self, owner: &str, held: &[GrantedLease]) -> Result<u64> {
        if held.is_empty() {
            return Ok(0);
        }
        let parts: Vec<i32> = held.iter().map(|h| h.partition as i32).collect();
        let epochs: Vec<i64> = held.iter().map(|h| h.epoch).collect();
        let n: i64 = sqlx::query_scalar(
            "WITH r AS (
                UPDATE warden.leases l SET owner_node = NULL, lease_expires_at = NULL
                FROM unnest($2::int[], $3::bigint[]) AS h(partition, epoch)
                WHERE l.partition = h.partition AND l.epoch = h.epoch AND l.owner_node = $1
                RETURNING l.partition)
             SELECT (SELECT count(*) FROM r) AS n, pg_notify($4, $1)",
        )
        .bind(owner)
        .bind(&parts)
        .bind(&epochs)
        .bind(CHANNEL_LEASE)
        .fetch_one(&self.pool)
        .await?;
        Ok(n as u64)
    }
}

#[async_trait]
impl Store for PgStore {
    fn partitions(&self) -> PartitionCount {
        self.partitions
    }

    async fn acquire(&self, owner: &str, partitions: &[u32], ttl: Duration) -> Result<Vec<GrantedLease>> {
        let mut granted = Vec::new();
        for chunk in partitions.chunks(LOCK_CHUNK) {
            match self.acquire_chunk(owner, chunk, ttl).await {
                Ok(g) => granted.extend(g),
                // What earlier chunks granted is held: report it (the rest is retried
                // on the next pass) rather than leave it unknown here until it expires.
                Err(e) if !granted.is_empty() => {
                    tracing::warn!(error = %e, granted = granted.len(), "acquiring a chunk of partitions failed");
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(granted)
    }

    async fn renew(&self, owner: &str, held: &[GrantedLease], ttl: Duration) -> Result<Vec<u32>> {
        if held.is_empty() {
            return Ok(Vec::new());
        }
        let parts: Vec<i32> = held.iter().map(|h| h.partition as i32).collect();
        let epochs: Vec<i64> = held.iter().map(|h| h.epoch).collect();
        let renewed: Vec<i32> = sqlx::query_scalar(
            "UPDATE warden.leases l SET lease_expires_at = now() + $2::bigint * interval '1 millisecond'
             FROM unnest($3::int[], $4::bigint[]) AS h(partition, epoch)
             WHERE l.partition = h.partition AND l.epoch = h.epoch AND l.owner_node = $1
               AND l.lease_expires_at > now()
             RETURNING l.partition",
        )
        .bind(owner)
        .bind(ms(ttl))
        .bind(&parts)
        .bind(&epochs)
        .fetch_all(&self.pool)
        .await?;
        Ok(renewed.into_iter().map(|p| p as u32).collect())
    }

    async fn release(&self, owner: &str, held: &[GrantedLease]) -> Result<u64> {
        let mut n = 0;
        for chunk in held.chunks(LOCK_CHUNK) {
            n += self.release_chunk(owner, chunk).await?;
        }
        Ok(n)
    }

    async fn rescue(&self, owner: &str, acquired: &[GrantedLease]) -> Result<u64> {
        let mut n = 0;
        for chunk in acquired.chunks(LOCK_CHUNK) {
            let parts: Vec<i32> = chunk.iter().map(|h| h.partition as i32).collect();
            let epochs: Vec<i64> = chunk.iter().map(|h| h.epoch).collect();
            let r = sqlx::query(RESCUE_SQL).bind(&parts).bind(&epochs).bind(owner).execute(&self.pool).await?;
            n += r.rows_affected();
        }
        Ok(n)
    }

    async fn lease_wait(&self, owner: &str, partitions: &[u32]) -> Result<Option<Duration>> {
        if partitions.is_empty() {
            return Ok(None);
        }
        let parts: Vec<i32> = partitions.iter().map(|p| *p as i32).collect();
        let ms: Option<f64> = sqlx::query_scalar(
            "SELECT (EXTRACT(EPOCH FROM (min(lease_expires_at) - now())) * 1000)::float8 FROM warden.leases
             WHERE partition = ANY($1) AND owner_node IS NOT NULL AND owner_node <> $2",
        )
        .bind(&parts)
        .bind(owner)
        .fetch_one(&self.pool)
        .await?;
        Ok(ms.map(|ms| Duration::from_millis(ms.max(0.0) as u64)))
    }

    async fn due_accounts(&self, partitions: &[u32], limit: i64) -> Result<Vec<(String, u32)>> {
        if partitions.is_empty() {
            return Ok(Vec::new());
        }
        let parts: Vec<i32> = partitions.iter().map(|p| *p as i32).collect();
        // Per account, not per due job: group the due rows by account first, then probe
        // each account's serial head once (jobs_account_open, LIMIT 1) unless a due
        // unordered job already makes it runnable. A probe per due row was 13–20×
        // slower on a 200k-job backlog (found in review).
        let rows: Vec<(String, i32)> =
            sqlx::query_as(DUE_ACCOUNTS_SQL).bind(&parts).bind(limit).fetch_all(&self.pool).await?;
        Ok(rows.into_iter().map(|(a, p)| (a, p as u32)).collect())
    }

    async fn running_here(&self, owner: &str, partitions: &[u32], limit: i64) -> Result<Vec<(i64, String, u32)>> {
        if partitions.is_empty() {
            return Ok(Vec::new());
        }
        let parts: Vec<i32> = partitions.iter().map(|p| *p as i32).collect();
        let rows: Vec<(i64, String, i32)> = sqlx::query_as(
            "SELECT id, account, partition FROM warden.jobs
             WHERE partition = ANY($1) AND state = 'running' AND node = $2 LIMIT $3",
        )
        .bind(&parts)
        .bind(owner)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|(id, a, p)| (id, a, p as u32)).collect())
    }

    async fn claim(&self, account: &str, fence: &Fence) -> Result<Option<JobRow>> {
        let row = sqlx::query(CLAIM_SQL)
            .bind(account)
            .bind(fence.partition as i32)
            .bind(fence.epoch)
            .bind(&*fence.owner)
            .fetch_one(&self.pool)
            .await?;
        if row.try_get::<i64, _>("fence_held")? == 0 {
            return Err(Error::Fenced { partition: fence.partition, epoch: fence.epoch });
        }
        self.claimed_row(&row, fence).await
    }

    async fn finish(
        &self,
        tx: Option<JobTx>,
        job: &JobRow,
        fence: &Fence,
        finish: &Finish,
        claim_next: bool,
    ) -> Result<Finished> {
        let c = finish.columns();
        let query = sqlx::query(FINISH_SQL)
            .bind(job.id)
            .bind(fence.partition as i32)
            .bind(fence.epoch)
            .bind(&*fence.owner)
            .bind(c.state)
            .bind(c.due_ms)
            .bind(c.outcome)
            .bind(c.error.as_deref())
            .bind(c.refund)
            .bind(&job.account)
            .bind(claim_next && finish.is_terminal())
            .bind(self.finish_idle_timeout_ms.to_string());
        let row = match tx {
            None => query.fetch_one(&self.pool).await?,
            Some(mut tx) => {
                let row = query.fetch_one(tx.conn()).await?;
                let finished: i64 = row.try_get("finished")?;
                if finished == 0 {
                    tx.rollback().await?;
                } else {
                    tx.commit().await?;
                }
                row
            }
        };
        let finished: i64 = row.try_get("finished")?;
        if finished == 0 {
            if row.try_get::<i64, _>("fence_held")? == 0 {
                return Err(Error::Fenced { partition: fence.partition, epoch: fence.epoch });
            }
            return Ok(Finished::NotRunning);
        }
        Ok(Finished::Recorded(self.claimed_row(&row, fence).await?))
    }

    async fn unclaim(&self, job: &JobRow, fence: &Fence) -> Result<()> {
        let r = sqlx::query(UNCLAIM_SQL)
            .bind(job.id)
            .bind(fence.partition as i32)
            .bind(fence.epoch)
            .bind(&*fence.owner)
            .execute(&self.pool)
            .await?;
        if r.rows_affected() == 0 {
            return Err(Error::Fenced { partition: fence.partition, epoch: fence.epoch });
        }
        Ok(())
    }

    async fn cancel_requested(&self, job_id: i64) -> Result<bool> {
        let v: Option<bool> = sqlx::query_scalar("SELECT cancel_requested FROM warden.jobs WHERE id = $1")
            .bind(job_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(v.unwrap_or(false))
    }

    async fn heartbeat(&self, member: &MemberInfo, within: Duration) -> Result<Option<Vec<String>>> {
        // One statement: upsert our row, forget members silent for a day, list the
        // fresh ones (the table has a row per node id ever seen in the last day).
        let ids: Vec<String> = sqlx::query_scalar(
            "WITH me AS (
                INSERT INTO warden.members (node_id, seen_at, started_at, schema_version, ring)
                VALUES ($1, now(), $2, $3, $4)
                ON CONFLICT (node_id) DO UPDATE SET seen_at = now(), started_at = EXCLUDED.started_at,
                    schema_version = EXCLUDED.schema_version, ring = EXCLUDED.ring
                RETURNING node_id),
             gone AS (DELETE FROM warden.members WHERE seen_at < now() - interval '1 day')
             SELECT node_id FROM warden.members
             WHERE seen_at > now() - $5::bigint * interval '1 millisecond' AND node_id <> $1
             UNION ALL SELECT node_id FROM me",
        )
        .bind(&member.node_id)
        .bind(member.started_at)
        .bind(member.schema as i32)
        .bind(&member.ring)
        .bind(ms(within))
        .fetch_all(&self.pool)
        .await?;
        Ok(Some(ids))
    }

    async fn begin(&self, idle_timeout: Duration) -> Result<JobTx> {
        JobTx::begin(&self.pool, idle_timeout).await
    }
}

// ---------------------------------------------------------------------------
// Client-side statements (enqueue, cancel, retry, inspection). These take any
// executor so callers can run them inside their own transaction.
// ---------------------------------------------------------------------------

/// The per-account enqueue lock (transaction-scoped advisory locks). Two levels, so
/// that one statement never takes more than 256 locks (PostgreSQL's lock table is
/// shared and small: 64 × `max_connections` entries by default) and yet enqueues of
/// different accounts rarely wait for each other:
/// - an account `a` is `(ENQUEUE_LOCK_CLASS, hashtext(a))`, in group
///   `(ENQUEUE_LOCK_CLASS + 1, hashtext(a) >> 24)`, one of 256;
/// - a statement with at most [`ENQUEUE_LOCK_BATCH`] accounts takes each account's
///   group *shared*, then the account *exclusive* (`warden.enqueue`, migration 0002,
///   does this for its one account);
/// - a larger batch takes each of its groups *exclusive*, which covers every account
///   in them.
///
/// Two enqueues of one account therefore always conflict on something and run one
/// after the other. The class is "WARD"; two-key advisory locks never collide with
/// one-key (`bigint`) ones such as the migration lock.
///
/// Locks last until the transaction ends, so the bound is per *transaction* too: the
/// transaction-local setting `warden.enqueue_accounts` counts the accounts locked
/// one by one, and once that would pass [`ENQUEUE_LOCK_BATCH`] every further enqueue
/// in the transaction (a long loop, a row trigger over a bulk update) takes group
/// locks. A transaction thus holds at most 64 account locks and 256 + 256 group locks.
pub const ENQUEUE_LOCK_CLASS: i32 = 0x5741_5244;

/// Distinct accounts above which a statement locks whole groups (see [`ENQUEUE_LOCK_CLASS`]).
pub const ENQUEUE_LOCK_BATCH: usize = 64;

/// The enqueue statement after its locks (a one-row CTE `locked`, see
/// [`ENQUEUE_LOCK_CLASS`]).
///
/// Serial order is (run_at, id), fixed at insert, but a job becomes visible at commit.
/// Two transactions enqueueing for one account could commit in the other order, and
/// the later-sorting job could run before the earlier one existed. So an enqueue
/// holds a lock on its accounts until its transaction ends, and reads the order key
/// (`now`) only once it holds them: a second enqueuer of an account waits for the
/// first to commit, then sorts after it. CTEs with volatile functions are not
/// inlined, and each is computed before the first row of one that reads it, so
/// `now` is read, and ids drawn, after every lock is taken. Unique-key duplicates
/// are skipped (the caller maps them to the existing job); each (partition,
/// account) gets one NOTIFY, delivered at commit.
macro_rules! enqueue_after_locks_sql {
    () => {
        " now AS (SELECT clock_timestamp() AS ts FROM locked),
         src AS (
            SELECT ord, account, partition, kind, args, lane, priority, max_attempts, timeout_ms, unique_key,
                   COALESCE(run_at, now.ts + COALESCE(delay_ms, 0) * interval '1 millisecond') AS run_at, now.ts
            FROM unnest($1::text[], $2::int[], $3::text[], $4::jsonb[], $5::text[], $6::smallint[],
                        $7::bigint[], $8::timestamptz[], $9::int[], $10::int[], $11::text[])
                 WITH ORDINALITY AS s(account, partition, kind, args, lane, priority, delay_ms, run_at,
                                      max_attempts, timeout_ms, unique_key, ord), now),
         ins AS (
            INSERT INTO warden.jobs (account, partition, kind, args, lane, state, priority, run_at, due_at,
                                     max_attempts, timeout_ms, unique_key)
            SELECT account, partition, src.kind, args, lane,
                   CASE WHEN run_at > ts THEN 'scheduled' ELSE 'available' END,
                   priority, run_at, run_at, COALESCE(src.max_attempts, k.max_attempts, 25),
                   COALESCE(src.timeout_ms, k.timeout_ms, 60000), unique_key
            FROM src LEFT JOIN warden.kinds k ON k.kind = src.kind ORDER BY ord
            ON CONFLICT (account, unique_key)
                WHERE unique_key IS NOT NULL AND state IN ('scheduled', 'available', 'retryable', 'running')
                DO NOTHING
            RETURNING id, account, partition, unique_key),
         woke AS (
            SELECT count(pg_notify('warden_wake', w.partition::text || ':' || w.account)) AS n
            FROM (SELECT DISTINCT partition, account FROM ins) w)
         SELECT ins.id, ins.account, ins.unique_key, woke.n FROM ins, woke ORDER BY ins.id"
    };
}

/// Enqueue for one account: its group (shared; exclusive once the transaction has
/// locked [`ENQUEUE_LOCK_BATCH`] accounts one by one), then the account.
const ENQUEUE_ONE_ACCOUNT_SQL: &str = concat!(
    "WITH st AS (
        SELECT hashtext(($1::text[])[1]) AS h,
               COALESCE(NULLIF(current_setting('warden.enqueue_accounts', true), '')::int, 0) AS n),
     g AS (
        SELECT count(CASE WHEN n >= $13 THEN pg_advisory_xact_lock($12::int + 1, h >> 24)
                          ELSE pg_advisory_xact_lock_shared($12::int + 1, h >> 24) END) AS x
        FROM st),
     a AS (
        SELECT count(pg_advisory_xact_lock($12::int, h))
               + count(set_config('warden.enqueue_accounts', (n + 1)::text, true)) AS x
        FROM st, g WHERE n < $13),
     locked AS (SELECT 1 FROM g LEFT JOIN a ON true),",
    enqueue_after_locks_sql!()
);

/// Enqueue for several accounts: every lock in one global order (group, level,
/// key), so two statements cannot deadlock each other; whole groups, exclusive,
/// past [`ENQUEUE_LOCK_BATCH`] accounts in the statement plus the transaction's
/// earlier ones.
const ENQUEUE_MANY_ACCOUNTS_SQL: &str = concat!(
    "WITH acc AS (SELECT DISTINCT hashtext(a) AS f FROM unnest($1::text[]) AS u(a)),
     prior AS (SELECT COALESCE(NULLIF(current_setting('warden.enqueue_accounts', true), '')::int, 0) AS n),
     wide AS (SELECT count(*) + min(prior.n) > $13 AS batch, count(*) + min(prior.n) AS total FROM acc, prior),
     counted AS (SELECT set_config('warden.enqueue_accounts', total::text, true) AS c FROM wide WHERE NOT batch),
     keys AS (
        SELECT DISTINCT f >> 24 AS g, 0 AS level, f >> 24 AS k, w.batch FROM acc, wide w
        UNION ALL
        SELECT f >> 24, 1, f, false FROM acc, wide w WHERE NOT w.batch),
     locks AS (
        SELECT count(CASE WHEN level = 1 THEN pg_advisory_xact_lock($12::int, k)
                          WHEN batch THEN pg_advisory_xact_lock($12::int + 1, k)
                          ELSE pg_advisory_xact_lock_shared($12::int + 1, k) END) AS n
        FROM (SELECT * FROM keys ORDER BY g, level, k) ordered),
     locked AS (SELECT 1 FROM locks LEFT JOIN counted ON true),",
    enqueue_after_locks_sql!()
);

/// Insert validated jobs in one statement; unique-key duplicates return the existing id.
/// Wakes each (partition, account) with a NOTIFY delivered at commit.
/// `default_max_attempts` / `default_timeout` give a kind's options where the caller
/// knows them; `None` leaves them to the database (`warden.kinds`, then 25 / 60 s).
pub async fn insert_jobs(
    conn: &mut sqlx::PgConnection,
    partitions: PartitionCount,
    jobs: &[NewJob],
    default_max_attempts: impl Fn(&str) -> Option<i32> + Send + Sync,
    default_timeout: impl Fn(&str) -> Option<Duration> + Send + Sync,
) -> Result<Vec<Enqueued>> {
    let defaults = move |k: &str| (default_max_attempts(k), default_timeout(k));
    insert_resolved(conn, partitions, jobs, &defaults).await
}

type Defaults<'a> = &'a (dyn Fn(&str) -> (Option<i32>, Option<Duration>) + Send + Sync);

fn insert_resolved<'a>(
    conn: &'a mut sqlx::PgConnection,
    partitions: PartitionCount,
    jobs: &'a [NewJob],
    defaults: Defaults<'a>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<Enqueued>>> + Send + 'a>> {
    Box::pin(async move {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        if jobs.len() > crate::job::MAX_BATCH {
            return Err(Error::invalid(format!(
                "batch of {} jobs; the limit is {}",
                jobs.len(),
                crate::job::MAX_BATCH
            )));
        }
        let n = jobs.len();
        let mut account = Vec::with_capacity(n);
        let mut partition = Vec::with_capacity(n);
        let mut kind = Vec::with_capacity(n);
        let mut args = Vec::with_capacity(n);
        let mut lane = Vec::with_capacity(n);
        let mut priority = Vec::with_capacity(n);
        let mut delay_ms: Vec<Option<i64>> = Vec::with_capacity(n);
        let mut run_at: Vec<Option<DateTime<Utc>>> = Vec::with_capacity(n);
        let mut max_attempts: Vec<Option<i32>> = Vec::with_capacity(n);
        let mut timeout_ms: Vec<Option<i32>> = Vec::with_capacity(n);
        let mut unique_key: Vec<Option<String>> = Vec::with_capacity(n);
        for j in jobs {
            j.validate()?;
            account.push(j.account.clone());
            partition.push(partition_of(&j.account, partitions) as i32);
            kind.push(j.kind.clone());
            args.push(j.args.clone());
            lane.push(j.lane.as_str().to_string());
            priority.push(j.priority);
            match j.schedule {
                Schedule::Now => {
                    delay_ms.push(None);
                    run_at.push(None)
                }
                Schedule::After(d) => {
                    delay_ms.push(Some(ms(d)));
                    run_at.push(None)
                }
                Schedule::At(t) => {
                    delay_ms.push(None);
                    run_at.push(Some(t))
                }
            }
            // Unknown here: NULL, resolved in the statement from `warden.kinds`.
            let (default_attempts, default_timeout) = defaults(&j.kind);
            max_attempts.push(j.max_attempts.or(default_attempts));
            timeout_ms.push(j.timeout.or(default_timeout).map(|t| ms(t).min(i32::MAX as i64) as i32));
            unique_key.push(j.unique_key.clone());
        }
        // One account (a single enqueue, a job's follow-up) takes a shorter statement:
        // the general one's lock planning costs ~17% of a single enqueue's throughput.
        let one_account = jobs.iter().all(|j| j.account == jobs[0].account);
        let rows = sqlx::query(if one_account { ENQUEUE_ONE_ACCOUNT_SQL } else { ENQUEUE_MANY_ACCOUNTS_SQL })
            .bind(&account)
            .bind(&partition)
            .bind(&kind)
            .bind(&args)
            .bind(&lane)
            .bind(&priority)
            .bind(&delay_ms)
            .bind(&run_at)
            .bind(&max_attempts)
            .bind(&timeout_ms)
            .bind(&unique_key)
            .bind(ENQUEUE_LOCK_CLASS)
            .bind(ENQUEUE_LOCK_BATCH as i64)
            .fetch_all(&mut *conn)
            .await?;

        // Rows come back in id order, which is insertion order (ORDER BY ord). Inputs whose
        // unique key already had an unfinished job were skipped; map them to that job.
        let mut out = Vec::with_capacity(n);
        let mut inserted = rows
            .iter()
            .map(|r| -> Result<(i64, String, Option<String>)> { Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)) });
        let mut pending_inserted = inserted.next().transpose()?;
        let mut seen_keys: std::collections::HashMap<(String, String), i64> = Default::default();
        for j in jobs {
            let key = j.unique_key.as_ref().map(|k| (j.account.clone(), k.clone()));
            if let Some(k) = &key {
                if let Some(id) = seen_keys.get(k) {
                    out.push(Enqueued { id: *id, duplicate: true });
                    continue;
                }
            }
            match &pending_inserted {
                Some((id, acc, uk)) if *acc == j.account && *uk == j.unique_key => {
                    out.push(Enqueued { id: *id, duplicate: false });
                    if let Some(k) = key {
                        seen_keys.insert(k, *id);
                    }
                    pending_inserted = inserted.next().transpose()?;
                }
                _ => {
                    let Some((acc, uk)) = key else {
                        return Err(Error::Database(sqlx::Error::Protocol(
                            "enqueue returned fewer rows than jobs without unique keys".into(),
                        )));
                    };
                    let found: Option<i64> = sqlx::query_scalar(
                        "SELECT id FROM warden.jobs WHERE account = $1 AND unique_key = $2
                       AND state IN ('scheduled', 'available', 'retryable', 'running')",
                    )
                    .bind(&acc)
                    .bind(&uk)
                    .fetch_optional(&mut *conn)
                    .await?;
                    let id = match found {
                        Some(id) => id,
                        None => {
                            // The job that held the key finished between the insert and
                            // this read (it was RowNotFound): the key is free. One job is
                            // inserted again; in a batch that would put it after the jobs
                            // enqueued with it, so the caller is asked to retry instead.
                            if jobs.len() > 1 {
                                return Err(Error::Conflict(format!(
                                    "unique_key {uk:?} of account {acc:?} was freed while the batch was enqueued; retry the batch"
                                )));
                            }
                            let e = insert_resolved(&mut *conn, partitions, std::slice::from_ref(j), defaults)
                                .await?
                                .remove(0);
                            out.push(e);
                            seen_keys.insert((acc, uk), e.id);
                            continue;
                        }
                    };
                    seen_keys.insert((acc, uk), id);
                    out.push(Enqueued { id, duplicate: true });
                }
            }
        }
        Ok(out)
    })
}

/// Cancel a job: queued → cancelled now; running → flag it and notify its owner.
pub async fn cancel_job(pool: &PgPool, job_id: i64) -> Result<CancelResult> {
    let mut tx = pool.begin().await?;
    let row: Option<(String, i32, String)> =
        sqlx::query_as("SELECT state, partition, account FROM warden.jobs WHERE id = $1 FOR UPDATE")
            .bind(job_id)
            .fetch_optional(&mut *tx)
            .await?;
    let Some((state, partition, account)) = row else {
        return Err(Error::JobNotFound(job_id));
    };
    let result = match state.as_str() {
        "scheduled" | "available" | "retryable" => {
            sqlx::query(
                "UPDATE warden.jobs SET state = 'cancelled', finished_at = statement_timestamp(),
                        last_error = 'cancelled before it ran'
                 WHERE id = $1",
            )
            .bind(job_id)
            .execute(&mut *tx)
            .await?;
            // The account's next job may now be its head.
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(CHANNEL_WAKE)
                .bind(format!("{partition}:{account}"))
                .execute(&mut *tx)
                .await?;
            CancelResult::Cancelled
        }
        "running" => {
            sqlx::query("UPDATE warden.jobs SET cancel_requested = true WHERE id = $1")
                .bind(job_id)
                .execute(&mut *tx)
                .await?;
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(CHANNEL_CANCEL)
                .bind(format!("{partition}:{job_id}:{account}"))
                .execute(&mut *tx)
                .await?;
            CancelResult::CancelRequested
        }
        other => CancelResult::AlreadyFinished { state: other.to_string() },
    };
    tx.commit().await?;
    Ok(result)
}

/// Put a discarded or cancelled job back in the queue with one more attempt allowed.
/// Its serial position is unchanged, so it blocks its account's later jobs again.
pub async fn retry_job(pool: &PgPool, job_id: i64) -> Result<JobRow> {
    let job = sqlx::query_as::<_, JobRow>(
        "WITH r AS (
            UPDATE warden.jobs SET state = 'available', due_at = statement_timestamp(), finished_at = NULL,
                   cancel_requested = false, max_attempts = GREATEST(max_attempts, attempt + 1)
            WHERE id = $1 AND state IN ('discarded', 'cancelled')
            RETURNING *),
         n AS (SELECT pg_notify('warden_wake', partition::text || ':' || account) FROM r)
         SELECT r.* FROM r LEFT JOIN (SELECT count(*) FROM n) c ON true",
    )
    .bind(job_id)
    .fetch_optional(pool)
    .await?;
    match job {
        Some(j) => Ok(j),
        None => match get_job(pool, job_id).await? {
            None => Err(Error::JobNotFound(job_id)),
            Some(j) => Err(Error::invalid(format!(
                "job {job_id} is {}; only discarded or cancelled jobs can be retried",
                j.state
            ))),
        },
    }
}

pub async fn get_job(pool: &PgPool, job_id: i64) -> Result<Option<JobRow>> {
    Ok(sqlx::query_as::<_, JobRow>("SELECT * FROM warden.jobs WHERE id = $1").bind(job_id).fetch_optional(pool).await?)
}

pub async fn attempts_of(pool: &PgPool, job_id: i64) -> Result<Vec<crate::job::AttemptRow>> {
    Ok(sqlx::query_as("SELECT * FROM warden.attempts WHERE job_id = $1 ORDER BY id")
        .bind(job_id)
        .fetch_all(pool)
        .await?)
}

/// One page of a job's attempts in order: those with attempts-row id above `after_id`,
/// at most `limit` (index range scan on `attempts_job_id`).
pub async fn attempts_page(
    pool: &PgPool,
    job_id: i64,
    after_id: i64,
    limit: i64,
) -> Result<Vec<crate::job::AttemptRow>> {
    Ok(sqlx::query_as("SELECT * FROM warden.attempts WHERE job_id = $1 AND id > $2 ORDER BY id LIMIT $3")
        .bind(job_id)
        .bind(after_id)
        .bind(limit)
        .fetch_all(pool)
        .await?)
}

/// Per-state job counts, bounded (see [`queue_depth`]): unfinished states are exact
/// up to [`DEFAULT_PARTITION_COUNT_CAP`] jobs per partition; finished states are the
/// planner's estimate. Never groups the whole table.
pub async fn state_counts(pool: &PgPool) -> Result<StateCounts> {
    Ok(queue_depth(pool, DEFAULT_PARTITION_COUNT_CAP).await?.state_counts())
}

pub async fn leases(pool: &PgPool) -> Result<Vec<LeaseRow>> {
    Ok(sqlx::query_as("SELECT partition, owner_node, epoch, lease_expires_at FROM warden.leases ORDER BY partition")
        .fetch_all(pool)
        .await?)
}

// ---------------------------------------------------------------------------
// Observation queries (gRPC API).
// ---------------------------------------------------------------------------

/// Filters and page for [`list_jobs`]: jobs by id descending (newest first).
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub account: Option<String>,
    pub kind: Option<String>,
    pub state: Option<String>,
    /// Only ids below this (the previous page's last id).
    pub before_id: Option<i64>,
    pub limit: i64,
}

/// With a kind or state filter, [`list_jobs`] examines at most this many jobs (newest
/// first, below `before_id`) per call, so a rare filter value cannot make one page
/// scan the whole table; the page then says where to continue.
pub const LIST_SCAN_WINDOW: i64 = 2_000;

/// A page of [`list_jobs`].
#[derive(Debug, Clone, Default)]
pub struct JobPage {
    /// At most `limit` jobs, newest first.
    pub jobs: Vec<JobRow>,
    /// Continue below this id; `None` when nothing older can match.
    pub next_before_id: Option<i64>,
}

/// Jobs matching the filter, newest first, bounded: the account filter is an index
/// range (`jobs_account_id`), the primary key otherwise, and kind/state are checked on
/// at most [`LIST_SCAN_WINDOW`] rows per call.
pub async fn list_jobs(pool: &PgPool, f: &JobFilter) -> Result<JobPage> {
    let filtered = f.kind.is_some() || f.state.is_some();
    let window = if filtered { LIST_SCAN_WINDOW.max(f.limit + 1) } else { f.limit + 1 };
    // Two statements, not `($1 IS NULL OR account = $1)`: a cached generic plan of that
    // cannot use the account index and would walk the primary key past every other account.
    let window_sql = if f.account.is_some() {
        "SELECT id, kind, state FROM warden.jobs WHERE account = $1 AND id < COALESCE($4, 9223372036854775807)
         ORDER BY id DESC LIMIT $6"
    } else {
        "SELECT id, kind, state FROM warden.jobs WHERE $1::text IS NULL AND id < COALESCE($4, 9223372036854775807)
         ORDER BY id DESC LIMIT $6"
    };
    let sql = format!(
        "WITH w AS ({window_sql})
         SELECT (SELECT count(*) FROM w), (SELECT min(id) FROM w),
                ARRAY(SELECT id FROM w WHERE ($2::text IS NULL OR kind = $2) AND ($3::text IS NULL OR state = $3)
                      ORDER BY id DESC LIMIT $5 + 1)"
    );
    let (scanned, lowest, ids): (i64, Option<i64>, Vec<i64>) = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(&f.account)
        .bind(&f.kind)
        .bind(&f.state)
        .bind(f.before_id)
        .bind(f.limit)
        .bind(window)
        .fetch_one(pool)
        .await?;
    let more_matches = ids.len() as i64 > f.limit;
    let page_ids = &ids[..ids.len().min(f.limit.max(0) as usize)];
    let mut jobs: Vec<JobRow> = sqlx::query_as("SELECT * FROM warden.jobs WHERE id = ANY($1) ORDER BY id DESC")
        .bind(page_ids)
        .fetch_all(pool)
        .await?;
    // A job of the page pruned between the two reads is simply left out.
    jobs.truncate(f.limit.max(0) as usize);
    let next_before_id = if more_matches {
        page_ids.last().copied()
    } else if scanned == window {
        // The window ended before the page filled: older rows may still match.
        lowest
    } else {
        None
    };
    Ok(JobPage { jobs, next_before_id })
}

/// Unfinished states, in the order [`PartitionDepth::by_state`] counts them.
pub const UNFINISHED_STATES: [&str; 4] = ["scheduled", "available", "retryable", "running"];
/// Finished states: the retention pruner deletes these after the retention period.
pub const FINISHED_STATES: [&str; 3] = ["completed", "discarded", "cancelled"];
/// Default per-partition cap of [`queue_depth`].
pub const DEFAULT_PARTITION_COUNT_CAP: i64 = 1_000;
/// [`queue_depth`] counts finished jobs exactly while there are at most this many
/// (index-only on `jobs_finished_at`); past it, it reports the planner's estimates.
pub const FINISHED_COUNT_CAP: i64 = 10_000;
/// [`account_queue`] counts at most this many unfinished jobs of one account.
pub const ACCOUNT_COUNT_CAP: i64 = 10_000;

/// One partition's unfinished jobs, counted up to the cap.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartitionDepth {
    pub partition: u32,
    /// Node id of the unexpired lease holder, if any.
    pub holder: Option<String>,
    /// Counts per [`UNFINISHED_STATES`] entry.
    pub by_state: [i64; 4],
    /// The count reached the cap: the figures are lower bounds.
    pub capped: bool,
}

impl PartitionDepth {
    pub fn unfinished(&self) -> i64 {
        self.by_state.iter().sum()
    }
}

/// Queue depth without grouping the jobs table: per partition, at most `cap`
/// unfinished jobs are counted (index-only on `jobs_open_partition_state`, so at most
/// P × cap index entries are read); finished jobs are counted while there are at most
/// [`FINISHED_COUNT_CAP`], and past that are the planner's estimate (`pg_stats` ×
/// `reltuples`): history is as large as retention lets it be and not worth a scan.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueueDepth {
    pub cap: i64,
    pub partitions: Vec<PartitionDepth>,
    /// Rows per finished state: exact, or estimates if `finished_estimated`.
    pub finished: Vec<(String, i64)>,
    /// `finished` holds the planner's estimates (empty until the table was analyzed).
    pub finished_estimated: bool,
}

impl QueueDepth {
    /// Some partition reached the cap: unfinished totals are lower bounds.
    pub fn capped(&self) -> bool {
        self.partitions.iter().any(|p| p.capped)
    }

    /// Unfinished states summed over partitions (lower bounds if [`Self::capped`]),
    /// then the finished ones; sorted by state.
    pub fn state_counts(&self) -> StateCounts {
        let mut out: Vec<(String, i64)> = UNFINISHED_STATES
            .iter()
            .enumerate()
            .map(|(i, s)| (s.to_string(), self.partitions.iter().map(|p| p.by_state[i]).sum()))
            .filter(|(_, n)| *n > 0)
            .collect();
        out.extend(self.finished.iter().filter(|(_, n)| *n > 0).cloned());
        out.sort();
        StateCounts(out)
    }

    /// Unfinished jobs in the partitions each lease holder holds (holders with none too).
    pub fn backlog_by_node(&self) -> Vec<(String, i64)> {
        let mut by: std::collections::BTreeMap<String, i64> = Default::default();
        for p in &self.partitions {
            if let Some(h) = &p.holder {
                *by.entry(h.clone()).or_default() += p.unfinished();
            }
        }
        by.into_iter().collect()
    }

    /// The `n` largest backlogs (non-empty partitions only), largest first.
    pub fn top_partitions(&self, n: usize) -> Vec<&PartitionDepth> {
        let mut v: Vec<&PartitionDepth> = self.partitions.iter().filter(|p| p.unfinished() > 0).collect();
        v.sort_by(|a, b| b.unfinished().cmp(&a.unfinished()).then(a.partition.cmp(&b.partition)));
        v.truncate(n);
        v
    }
}

pub async fn queue_depth(pool: &PgPool, cap: i64) -> Result<QueueDepth> {
    /// partition, lease holder, state, count (state and count NULL for an empty partition)
    type DepthRow = (i32, Option<String>, Option<String>, Option<i64>);
    let rows: Vec<DepthRow> = sqlx::query_as(
        "SELECT l.partition,
                CASE WHEN l.owner_node IS NOT NULL AND l.lease_expires_at > now()
                     THEN split_part(l.owner_node, '/', 1) END,
                c.state, c.n
         FROM warden.leases l
         LEFT JOIN LATERAL (
             SELECT s.state, count(*) AS n
             FROM (SELECT j.state FROM warden.jobs j
                   WHERE j.partition = l.partition
                     AND j.state IN ('scheduled', 'available', 'retryable', 'running')
                   LIMIT $1) s
             GROUP BY s.state) c ON true
         ORDER BY l.partition",
    )
    .bind(cap)
    .fetch_all(pool)
    .await?;
    let mut partitions: Vec<PartitionDepth> = Vec::new();
    for (partition, holder, state, n) in rows {
        let partition = partition as u32;
        if partitions.last().map(|p| p.partition) != Some(partition) {
            partitions.push(PartitionDepth { partition, holder, ..Default::default() });
        }
        let p = partitions.last_mut().expect("pushed above");
        if let (Some(state), Some(n)) = (state, n) {
            if let Some(i) = UNFINISHED_STATES.iter().position(|s| *s == state) {
                p.by_state[i] = n;
            }
        }
    }
    for p in &mut partitions {
        p.capped = p.unfinished() >= cap;
    }
    let counted: Vec<(String, i64)> = sqlx::query_as(
        "SELECT s.state, count(*) FROM (
             SELECT state FROM warden.jobs WHERE state IN ('completed', 'discarded', 'cancelled')
             ORDER BY finished_at, id LIMIT $1) s
         GROUP BY s.state ORDER BY 1",
    )
    .bind(FINISHED_COUNT_CAP + 1)
    .fetch_all(pool)
    .await?;
    if counted.iter().map(|(_, n)| n).sum::<i64>() <= FINISHED_COUNT_CAP {
        return Ok(QueueDepth { cap, partitions, finished: counted, finished_estimated: false });
    }
    let estimates: Vec<(String, i64)> = sqlx::query_as(
        "SELECT v.state, (v.freq * c.reltuples)::bigint
         FROM pg_class c
         JOIN pg_namespace ns ON ns.oid = c.relnamespace AND ns.nspname = 'warden'
         CROSS JOIN LATERAL (
             SELECT unnest(s.most_common_vals::text::text[]) AS state, unnest(s.most_common_freqs) AS freq
             FROM pg_stats s WHERE s.schemaname = 'warden' AND s.tablename = 'jobs' AND s.attname = 'state') v
         WHERE c.relname = 'jobs' AND c.reltuples >= 0
           AND v.state IN ('completed', 'discarded', 'cancelled')
         ORDER BY 1",
    )
    .fetch_all(pool)
    .await?;
    Ok(QueueDepth { cap, partitions, finished: estimates, finished_estimated: true })
}

/// Age of the oldest due, not yet started job: one index probe per partition
/// (`jobs_partition_due`), never a scan of the backlog.
pub async fn oldest_due_age(pool: &PgPool) -> Result<Option<Duration>> {
    let ms: Option<f64> = sqlx::query_scalar(
        "SELECT (EXTRACT(EPOCH FROM (now() - min(d.due_at))) * 1000)::float8
         FROM warden.leases l
         CROSS JOIN LATERAL (
             SELECT j.due_at FROM warden.jobs j
             WHERE j.partition = l.partition AND j.state IN ('scheduled', 'available', 'retryable')
             ORDER BY j.due_at LIMIT 1) d
         WHERE d.due_at <= now()",
    )
    .fetch_one(pool)
    .await?;
    Ok(ms.map(|ms| Duration::from_millis(ms.max(0.0) as u64)))
}

// ---------------------------------------------------------------------------
// Retention (`crate::retention`).
// ---------------------------------------------------------------------------

/// Advisory lock class of the retention pruner ("WARD" + 10): one node prunes at a
/// time; the others skip the round.
pub const RETENTION_LOCK_CLASS: i32 = ENQUEUE_LOCK_CLASS + 10;

/// What one pruning batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub jobs: u64,
    pub attempts: u64,
    /// Another node holds the pruner lock: nothing was done.
    pub skipped: bool,
    /// `(finished_at, id)` of the last job deleted: where the next batch of the same run
    /// starts.
    pub last: Option<PruneCursor>,
}

/// A position in the pruner's index order (`finished_at`, `id`).
pub type PruneCursor = (DateTime<Utc>, i64);

/// Delete up to `batch` finished jobs whose `finished_at` is older than `older_than`
/// (database clock), with their attempts rows, in one short transaction. Rows locked
/// by anyone (a concurrent operator retry, another pruner) are skipped, not waited for;
/// unfinished jobs are never touched (the state is re-checked under the row lock).
///
/// `after`: continue past this position. The batches of one run pass it on, so each
/// starts where the previous one ended instead of walking again over the index entries
/// of the rows just deleted (dead until vacuum): without it, pruning 10 million rows
/// slowed from ~50,000 to ~20,000 jobs/s as the dead prefix grew.
pub async fn prune_finished(
    pool: &PgPool,
    older_than: Duration,
    batch: i64,
    after: Option<PruneCursor>,
) -> Result<Pruned> {
    let mut tx = pool.begin().await?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1, 0)")
        .bind(RETENTION_LOCK_CLASS)
        .fetch_one(&mut *tx)
        .await?;
    if !locked {
        tx.rollback().await?;
        return Ok(Pruned { skipped: true, ..Default::default() });
    }
    let (jobs, attempts, last_at, last_id): (i64, i64, Option<DateTime<Utc>>, Option<i64>) = sqlx::query_as(
        "WITH doomed AS (
            SELECT id FROM warden.jobs
            WHERE state IN ('completed', 'discarded', 'cancelled')
              AND finished_at < now() - make_interval(secs => $1)
              AND ($3::timestamptz IS NULL OR (finished_at, id) > ($3, $4))
            ORDER BY finished_at, id
            LIMIT $2
            FOR UPDATE SKIP LOCKED),
         gone AS (
            -- = ANY(ARRAY(...)): primary-key probes whatever the planner thinks of the
            -- CTE (a join chose a sequential scan of the table at 100k rows).
            DELETE FROM warden.jobs j
            WHERE j.id = ANY(ARRAY(SELECT id FROM doomed)) AND j.state IN ('completed', 'discarded', 'cancelled')
            RETURNING j.id, j.finished_at),
         gone_attempts AS (
            DELETE FROM warden.attempts a WHERE a.job_id IN (SELECT id FROM gone) RETURNING 1),
         last AS (SELECT finished_at, id FROM gone ORDER BY finished_at DESC, id DESC LIMIT 1)
         SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM gone_attempts),
                (SELECT finished_at FROM last), (SELECT id FROM last)",
    )
    .bind(older_than.as_secs_f64())
    .bind(batch)
    .bind(after.map(|a| a.0))
    .bind(after.map(|a| a.1))
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Pruned { jobs: jobs as u64, attempts: attempts as u64, skipped: false, last: last_at.zip(last_id) })
}

/// The account's next job in serial order and its number of unfinished jobs (at most
/// [`ACCOUNT_COUNT_CAP`]: a count equal to it is a lower bound).
pub async fn account_queue(pool: &PgPool, account: &str) -> Result<(Option<JobRow>, i64)> {
    // One probe per lane in index order (jobs_account_open): a single ORDER BY over
    // both lanes cannot follow the index and sorted the account's whole backlog.
    let lane_head = |lane: &'static str| {
        sqlx::query_as::<_, JobRow>(
            "SELECT * FROM warden.jobs WHERE account = $1 AND lane = $2
               AND state IN ('scheduled', 'available', 'retryable', 'running')
             ORDER BY run_at, id LIMIT 1",
        )
        .bind(account)
        .bind(lane)
        .fetch_optional(pool)
    };
    let next = match lane_head("serial").await? {
        Some(j) => Some(j),
        None => lane_head("unordered").await?,
    };
    // Capped: an account with millions of queued jobs costs at most the cap to count
    // (index-only on jobs_account_open).
    let n: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT 1 FROM warden.jobs WHERE account = $1
           AND state IN ('scheduled', 'available', 'retryable', 'running') LIMIT $2) s",
    )
    .bind(account)
    .bind(ACCOUNT_COUNT_CAP)
    .fetch_one(pool)
    .await?;
    Ok((next, n))
}

#[cfg(test)]
mod queue_depth_tests {
    use super::*;

    fn part(partition: u32, holder: Option<&str>, by_state: [i64; 4], cap: i64) -> PartitionDepth {
        PartitionDepth {
            partition,
            holder: holder.map(str::to_string),
            by_state,
            capped: by_state.iter().sum::<i64>() >= cap,
        }
    }

    #[test]
    fn depth_sums_states_nodes_and_ranks_partitions() {
        let d = QueueDepth {
            cap: 10,
            partitions: vec![
                part(0, Some("a"), [1, 2, 0, 1], 10),
                part(1, Some("b"), [0, 10, 0, 0], 10),
                part(2, None, [3, 0, 0, 0], 10),
                part(3, Some("a"), [0, 0, 0, 0], 10),
                part(4, Some("c"), [0, 0, 0, 0], 10),
            ],
            finished: vec![("completed".into(), 7)],
            finished_estimated: false,
        };
        assert!(d.capped());
        assert_eq!(
            d.state_counts().0,
            vec![("available".into(), 12), ("completed".into(), 7), ("running".into(), 1), ("scheduled".into(), 4)]
        );
        assert_eq!(d.backlog_by_node(), vec![("a".into(), 4), ("b".into(), 10), ("c".into(), 0)]);
        let top: Vec<u32> = d.top_partitions(2).iter().map(|p| p.partition).collect();
        assert_eq!(top, vec![1, 0]);
        assert_eq!(d.top_partitions(10).len(), 3, "empty partitions are not listed");
    }
}
