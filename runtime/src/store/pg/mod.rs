//! The PostgreSQL store: [`PgStore`] (the executor and producer seams) and
//! [`PgAdminStore`] (the admin seam), and opening one: [`connect`], [`migrate`],
//! [`init_partitions`], [`load_partitions`].
//!
//! Files: `executor.rs` (leases, the fenced hot path, rescue, scans, heartbeats),
//! `claims.rs` (claims of many actors batched into one statement), `enqueue.rs` (enqueue locking and the job operations of the client), `admin.rs`
//! (observation, retention, the history checker's figures). Every statement is whole
//! SQL: the long ones as files in `store/sql/` (read with `include_str!`), the short
//! ones as named constants beside the code that binds them.

mod admin;
mod claims;
mod enqueue;
mod executor;
mod schedules;

pub use admin::RETENTION_LOCK_CLASS;
pub use claims::MAX_CLAIM_BATCH;
pub use enqueue::{ENQUEUE_LOCK_BATCH, ENQUEUE_LOCK_CLASS};
pub use executor::DUE_ACCOUNTS_SQL;
pub use schedules::{FireOutcome, Upserted};

use super::{ms, Fence};
use crate::error::{Error, Result};
use crate::job::JobRow;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Postgres, Row};
use std::str::FromStr;
use std::time::Duration;
use warden_cluster::PartitionCount;

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

/// Store P unless already stored ($1 P as text).
const STORE_PARTITION_COUNT_SQL: &str =
    "INSERT INTO warden.meta (key, value) VALUES ('partitions', $1) ON CONFLICT (key) DO NOTHING";
/// The stored P (as text).
const PARTITION_COUNT_SQL: &str = "SELECT value FROM warden.meta WHERE key = 'partitions'";
/// A lease row for every partition below $1 (free, epoch 0).
const CREATE_LEASES_SQL: &str =
    "INSERT INTO warden.leases (partition) SELECT g FROM generate_series(0, $1 - 1) g ON CONFLICT DO NOTHING";

/// Fix (or check) the partition count and make sure every lease row exists.
pub async fn init_partitions(pool: &PgPool, partitions: PartitionCount) -> Result<PartitionCount> {
    let mut tx = pool.begin().await?;
    // Serialise concurrent first starts on the meta row.
    sqlx::query(STORE_PARTITION_COUNT_SQL).bind(partitions.get().to_string()).execute(&mut *tx).await?;
    let stored: String = sqlx::query_scalar(PARTITION_COUNT_SQL).fetch_one(&mut *tx).await?;
    let stored: u32 = stored
        .parse()
        .map_err(|_| Error::Config(format!("warden.meta partitions value {stored:?} is not a number")))?;
    if stored != partitions.get() {
        return Err(Error::PartitionMismatch { stored, configured: partitions.get() });
    }
    sqlx::query(CREATE_LEASES_SQL).bind(partitions.get() as i32).execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(partitions)
}

/// Read P from the database (for clients that do not run a node).
pub async fn load_partitions(pool: &PgPool) -> Result<PartitionCount> {
    let stored: Option<String> = match sqlx::query_scalar(PARTITION_COUNT_SQL).fetch_optional(pool).await {
        Ok(v) => v,
        // 42P01: undefined_table (no migrations yet); 3F000: invalid_schema_name.
        Err(sqlx::Error::Database(e)) if matches!(e.code().as_deref(), Some("42P01" | "3F000")) => None,
        Err(e) => return Err(e.into()),
    };
    let stored = stored.ok_or(Error::NotInitialised)?;
    let p: u32 = stored.parse().map_err(|_| Error::NotInitialised)?;
    PartitionCount::new(p).map_err(|e| Error::Config(e.to_string()))
}

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

/// The PostgreSQL implementation of the executor seam ([`super::Store`]) and the
/// producer seam ([`super::ProducerStore`]).
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    partitions: PartitionCount,
    /// Bound on how long a finished-but-uncommitted handler transaction may hold its
    /// fence lock (see FINISH_SQL). Set it to the lease TTL.
    finish_idle_timeout_ms: u64,
    /// Claims waiting for a statement ([`claims`]), shared by the store's clones.
    claims: std::sync::Arc<claims::ClaimBatcher>,
}

impl PgStore {
    pub fn new(pool: PgPool, partitions: PartitionCount) -> Self {
        Self { pool, partitions, finish_idle_timeout_ms: 4000, claims: Default::default() }
    }

    /// See `finish_idle_timeout_ms`.
    pub fn with_finish_idle_timeout(mut self, t: Duration) -> Self {
        self.finish_idle_timeout_ms = t.as_millis().max(1) as u64;
        self
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Partition count P fixed in the database (also [`super::Store::partitions`]).
    pub fn partitions(&self) -> PartitionCount {
        self.partitions
    }

    /// The admin seam on the same pool.
    pub fn admin(&self) -> PgAdminStore {
        PgAdminStore::new(self.pool.clone())
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
                sqlx::query(executor::DISCARD_UNDECODABLE_SQL)
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

/// The PostgreSQL implementation of the admin seam ([`super::AdminStore`]): a pool is
/// all it needs (the gRPC API, the pruner and the history checker each bring their own).
#[derive(Debug, Clone)]
pub struct PgAdminStore {
    pool: PgPool,
}

impl PgAdminStore {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

impl From<&PgPool> for PgAdminStore {
    fn from(pool: &PgPool) -> Self {
        Self::new(pool.clone())
    }
}

/// Most partitions one lease statement (acquire, release, rescue) touches. Every
/// epoch change takes the partition's fence lock in PostgreSQL's shared lock table
/// (and rescue takes one per partition), which holds `max_locks_per_transaction ×
/// max_connections` entries for the whole server — 6,400 by default, shared with the
/// application. One statement for P = 16,384 partitions failed with "out of shared
/// memory" on a default server; chunks keep each transaction to this many.
pub const LOCK_CHUNK: usize = 256;
