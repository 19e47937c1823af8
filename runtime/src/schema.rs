//! Warden's schema and its migration history, owned by Warden.
//!
//! Warden lives in its users' database next to their own schema and migrations.
//! Until schema v4 it applied its migrations with sqlx's default runner, whose history
//! is `public._sqlx_migrations` — the same table the application's own
//! `sqlx::migrate!` uses, so each saw the other's versions and refused to start
//! (`VersionMissing`). Now:
//!
//! - the history is `warden.schema_history` (version, description, checksum, when,
//!   by whom, how long); nothing of Warden's is written to `public` any more;
//! - a database migrated by an earlier Warden is *adopted*: the rows of
//!   `_sqlx_migrations` (found through the search path, as sqlx's runner found it)
//!   whose version **and checksum** match Warden's own
//!   migrations are copied into `warden.schema_history`. They are left in place, so
//!   an older node restarted during the rolling upgrade still starts; once none runs,
//!   [`forget_legacy_history`] (`warden schema forget-legacy-history`) removes them
//!   and the application's migrator stops seeing them;
//! - the runner holds a *session* advisory lock (class "WARD" + 3) on a dedicated
//!   connection that is closed when it returns, whatever happened — a failed run can
//!   never leave the lock held on a pooled connection (sqlx's runner did);
//! - a database *newer* than this binary is accepted when the binary's newest version
//!   is at least the schema's `compatible_from` (`warden.meta`): expand migrations
//!   keep older binaries working and leave it alone; a contract migration raises it.
//!   Otherwise the node refuses to start with an error that names both versions.
//!
//! The upgrade contract that builds on this is written in `deploy/UPGRADING.md`.

use crate::error::{Error, Result};
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection, PgPool, Row};
use std::time::Instant;

/// Advisory lock class of the migration runner ("WARD" + 3; see `store` for the others).
pub const MIGRATION_LOCK_CLASS: i32 = 0x5741_5244 + 3;

/// The embedded migrations, in version order.
pub fn migrations() -> Vec<sqlx::migrate::Migration> {
    let mut m: Vec<_> =
        crate::store::migrator().migrations.iter().filter(|m| m.migration_type.is_up_migration()).cloned().collect();
    m.sort_by_key(|m| m.version);
    m
}

/// The newest schema version this binary knows.
pub fn binary_version() -> i64 {
    migrations().last().map(|m| m.version).unwrap_or(0)
}

/// What a database's schema looks like to this binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaStatus {
    /// Highest applied version (0: none).
    pub applied: i64,
    /// The oldest binary version the schema accepts.
    pub compatible_from: i64,
    /// This binary's newest version.
    pub binary: i64,
    /// Versions this binary knows that are not applied.
    pub pending: Vec<i64>,
    /// Warden rows still in `public._sqlx_migrations` (see [`forget_legacy_history`]).
    pub legacy_rows: i64,
}

impl SchemaStatus {
    /// Can this binary run against the schema as it is (after applying `pending`)?
    pub fn compatible(&self) -> bool {
        self.applied <= self.binary || self.binary >= self.compatible_from
    }
}

/// Apply every pending migration (up to `target`, if given) and check that this
/// binary may run against the result. Safe to call from many nodes at once.
pub async fn migrate(pool: &PgPool, target: Option<i64>) -> Result<SchemaStatus> {
    let opts: PgConnectOptions = (*pool.connect_options()).clone();
    let mut conn = PgConnection::connect_with(&opts).await?;
    let result = migrate_on(&mut conn, target).await;
    // Closing ends the session and with it the lock, on every path.
    let _ = conn.close().await;
    result
}

async fn migrate_on(conn: &mut PgConnection, target: Option<i64>) -> Result<SchemaStatus> {
    // No statement timeout here: the lock wait (another node migrating) and a long
    // migration (an index build) must not be cut off at the pool's 30 s.
    sqlx::query("SET statement_timeout = 0").execute(&mut *conn).await?;
    sqlx::query("SELECT pg_advisory_lock($1, 0)").bind(MIGRATION_LOCK_CLASS).execute(&mut *conn).await?;
    sqlx::raw_sql(
        "CREATE SCHEMA IF NOT EXISTS warden;
         CREATE TABLE IF NOT EXISTS warden.schema_history (
             version      bigint PRIMARY KEY,
             description  text NOT NULL,
             checksum     bytea NOT NULL,
             applied_at   timestamptz NOT NULL DEFAULT now(),
             applied_by   text NOT NULL DEFAULT current_user,
             execution_ms bigint NOT NULL DEFAULT 0,
             adopted      boolean NOT NULL DEFAULT false)",
    )
    .execute(&mut *conn)
    .await?;
    adopt_legacy_history(conn).await?;
    let known = migrations();
    let applied = applied(conn).await?;
    for (version, checksum) in &applied {
        if let Some(m) = known.iter().find(|m| m.version == *version) {
            if m.checksum.as_ref() != checksum.as_slice() {
                return Err(Error::Config(format!(
                    "schema migration {version} ({}) applied to this database differs from this binary's; \
                     a released migration must never be edited",
                    m.description
                )));
            }
        }
    }
    for m in &known {
        if target.is_some_and(|t| m.version > t) || applied.iter().any(|(v, _)| *v == m.version) {
            continue;
        }
        let started = Instant::now();
        let mut tx = conn.begin().await?;
        sqlx::raw_sql(m.sql.clone())
            .execute(&mut *tx)
            .await
            .map_err(|e| Error::Config(format!("applying schema migration {} ({}): {e}", m.version, m.description)))?;
        sqlx::query(
            "INSERT INTO warden.schema_history (version, description, checksum, execution_ms) VALUES ($1, $2, $3, $4)",
        )
        .bind(m.version)
        .bind(&*m.description)
        .bind(m.checksum.as_ref())
        .bind(started.elapsed().as_millis() as i64)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        tracing::info!(version = m.version, description = %m.description, took = ?started.elapsed(), "schema: applied migration");
    }
    let status = status_on(conn).await?;
    sqlx::query("SELECT pg_advisory_unlock($1, 0)").bind(MIGRATION_LOCK_CLASS).execute(&mut *conn).await?;
    if !status.compatible() {
        return Err(incompatible(&status));
    }
    if status.applied > status.binary {
        tracing::warn!(
            schema = status.applied,
            binary = status.binary,
            compatible_from = status.compatible_from,
            "schema: the database is newer than this binary but still accepts it (expand-only); upgrade this node"
        );
    }
    Ok(status)
}

fn incompatible(s: &SchemaStatus) -> Error {
    Error::Config(format!(
        "the database's Warden schema is at version {} and accepts binaries from version {}; this binary knows \
         version {}: deploy a newer Warden (see deploy/UPGRADING.md)",
        s.applied, s.compatible_from, s.binary
    ))
}

async fn applied(conn: &mut PgConnection) -> Result<Vec<(i64, Vec<u8>)>> {
    let rows = sqlx::query("SELECT version, checksum FROM warden.schema_history ORDER BY version")
        .fetch_all(&mut *conn)
        .await?;
    rows.iter().map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).collect()
}

/// Copy Warden's rows from a legacy `public._sqlx_migrations` (a database migrated by
/// a Warden before schema history) into `warden.schema_history`, once. Only rows whose
/// version and checksum both match one of Warden's migrations are taken: the table may
/// also hold the application's own migrations.
async fn adopt_legacy_history(conn: &mut PgConnection) -> Result<()> {
    let have: i64 = sqlx::query_scalar("SELECT count(*) FROM warden.schema_history").fetch_one(&mut *conn).await?;
    if have > 0 {
        return Ok(());
    }
    let legacy: Option<String> =
        sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations')::text").fetch_one(&mut *conn).await?;
    if legacy.is_none() {
        return Ok(());
    }
    let rows = sqlx::query("SELECT version, checksum, installed_on FROM _sqlx_migrations WHERE success")
        .fetch_all(&mut *conn)
        .await?;
    let known = migrations();
    let mut adopted = 0;
    for r in &rows {
        let version: i64 = r.try_get(0)?;
        let checksum: Vec<u8> = r.try_get(1)?;
        let at: chrono::DateTime<chrono::Utc> = r.try_get(2)?;
        let Some(m) = known.iter().find(|m| m.version == version && m.checksum.as_ref() == checksum.as_slice()) else {
            continue;
        };
        sqlx::query(
            "INSERT INTO warden.schema_history (version, description, checksum, applied_at, adopted)
             VALUES ($1, $2, $3, $4, true) ON CONFLICT DO NOTHING",
        )
        .bind(version)
        .bind(&*m.description)
        .bind(&checksum)
        .bind(at)
        .execute(&mut *conn)
        .await?;
        adopted += 1;
    }
    if adopted > 0 {
        tracing::info!(adopted, "schema: adopted Warden's migration history from public._sqlx_migrations");
    }
    Ok(())
}

/// The schema as it is now (no lock, no change).
pub async fn status(pool: &PgPool) -> Result<SchemaStatus> {
    let mut conn = pool.acquire().await?;
    status_on(&mut conn).await
}

async fn status_on(conn: &mut PgConnection) -> Result<SchemaStatus> {
    let exists: Option<String> =
        sqlx::query_scalar("SELECT to_regclass('warden.schema_history')::text").fetch_one(&mut *conn).await?;
    let applied_versions: Vec<i64> = if exists.is_some() {
        sqlx::query_scalar("SELECT version FROM warden.schema_history ORDER BY version").fetch_all(&mut *conn).await?
    } else {
        Vec::new()
    };
    let compatible_from: Option<String> = if applied_versions.is_empty() {
        None
    } else {
        sqlx::query_scalar("SELECT value FROM warden.meta WHERE key = 'compatible_from'")
            .fetch_optional(&mut *conn)
            .await?
    };
    let legacy: Option<String> =
        sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations')::text").fetch_one(&mut *conn).await?;
    let known = migrations();
    let legacy_rows = if legacy.is_some() {
        let versions: Vec<i64> = known.iter().map(|m| m.version).collect();
        let sums: Vec<Vec<u8>> = known.iter().map(|m| m.checksum.to_vec()).collect();
        sqlx::query_scalar(
            "SELECT count(*) FROM _sqlx_migrations s
             JOIN unnest($1::bigint[], $2::bytea[]) AS k(version, checksum)
               ON s.version = k.version AND s.checksum = k.checksum",
        )
        .bind(&versions)
        .bind(&sums)
        .fetch_one(&mut *conn)
        .await?
    } else {
        0
    };
    Ok(SchemaStatus {
        applied: applied_versions.last().copied().unwrap_or(0),
        compatible_from: compatible_from.and_then(|v| v.parse().ok()).unwrap_or(0),
        binary: binary_version(),
        pending: known.iter().map(|m| m.version).filter(|v| !applied_versions.contains(v)).collect(),
        legacy_rows,
    })
}

/// Check, without changing anything, that this binary may run against the database
/// (for clients, which never migrate).
pub async fn check(pool: &PgPool) -> Result<SchemaStatus> {
    let s = status(pool).await?;
    if !s.compatible() {
        return Err(incompatible(&s));
    }
    Ok(s)
}

/// Remove Warden's rows (matching version *and* checksum) from a legacy
/// `public._sqlx_migrations`, so the application's own sqlx migrator no longer sees
/// them. Run it once no node older than schema history (v4) runs: such a node, when
/// restarted, would find no history and fail to re-create the schema. Returns the
/// number of rows removed.
pub async fn forget_legacy_history(pool: &PgPool) -> Result<u64> {
    let s = status(pool).await?;
    if s.applied == 0 {
        return Err(Error::Config("no Warden schema history here: start a node first".into()));
    }
    if s.legacy_rows == 0 {
        return Ok(0);
    }
    let mut conn = pool.acquire().await?;
    forget_legacy_history_on(&mut conn).await
}

/// Delete Warden's rows (matching version and checksum) from the `_sqlx_migrations`
/// that `search_path` finds, if there is one.
async fn forget_legacy_history_on(conn: &mut PgConnection) -> Result<u64> {
    let legacy: bool =
        sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL").fetch_one(&mut *conn).await?;
    if !legacy {
        return Ok(0);
    }
    let known = migrations();
    let versions: Vec<i64> = known.iter().map(|m| m.version).collect();
    let sums: Vec<Vec<u8>> = known.iter().map(|m| m.checksum.to_vec()).collect();
    let n = sqlx::query(
        "DELETE FROM _sqlx_migrations s USING unnest($1::bigint[], $2::bytea[]) AS k(version, checksum)
         WHERE s.version = k.version AND s.checksum = k.checksum",
    )
    .bind(&versions)
    .bind(&sums)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    Ok(n)
}

/// Set up (or upgrade) Warden's schema without starting a node: apply every pending
/// migration, then fix the partition count P in the database (the first caller's
/// P sticks; a different P later is an error) and create its lease rows. What a node
/// does on start; safe to run from many processes at once and to repeat.
pub async fn setup(pool: &PgPool, partitions: warden_cluster::PartitionCount) -> Result<SchemaStatus> {
    let status = migrate(pool, None).await?;
    crate::store::init_partitions(pool, partitions).await?;
    Ok(status)
}

/// What [`reset`] removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResetReport {
    /// Jobs that were in the schema (all states).
    pub jobs: i64,
    /// Leases that were held and unexpired (non-zero only with `force`).
    pub live_leases: i64,
    /// Warden rows removed from a legacy `public._sqlx_migrations`.
    pub legacy_rows: u64,
}

/// Remove Warden's schema and everything in it (`DROP SCHEMA warden CASCADE`: jobs,
/// attempts, leases, history), and Warden's rows of a legacy migration history.
/// Refuses while any partition lease is held and unexpired — a node is running —
/// unless `force`. Nothing of the application's is touched. Taken under the
/// migration lock, so it never interleaves with a node's migrations.
pub async fn reset(pool: &PgPool, force: bool) -> Result<ResetReport> {
    let opts: PgConnectOptions = (*pool.connect_options()).clone();
    let mut conn = PgConnection::connect_with(&opts).await?;
    let result = async {
        sqlx::query("SET statement_timeout = 0").execute(&mut conn).await?;
        sqlx::query("SELECT pg_advisory_lock($1, 0)").bind(MIGRATION_LOCK_CLASS).execute(&mut conn).await?;
        // One transaction: the lease check and the drop are one step (a lease taken
        // in between would otherwise be dropped from under its node), and a failure
        // part-way leaves everything as it was.
        let mut tx = conn.begin().await?;
        let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'warden')")
            .fetch_one(&mut *tx)
            .await?;
        let (mut jobs, mut live_leases) = (0i64, 0i64);
        if exists {
            let has = |t: &'static str| sqlx::query_scalar::<_, bool>("SELECT to_regclass($1) IS NOT NULL").bind(t);
            if has("warden.leases").fetch_one(&mut *tx).await? {
                // Wait for every acquisition in flight, and hold off new ones until
                // the drop commits (they then find no schema).
                sqlx::query("LOCK TABLE warden.leases IN ACCESS EXCLUSIVE MODE").execute(&mut *tx).await?;
                live_leases = sqlx::query_scalar(
                    "SELECT count(*) FROM warden.leases WHERE owner_node IS NOT NULL AND lease_expires_at > now()",
                )
                .fetch_one(&mut *tx)
                .await?;
            }
            if live_leases > 0 && !force {
                return Err(Error::Conflict(format!(
                    "{live_leases} partition lease(s) are held: a node is running against this database; \
                     stop every node first (or force the reset)"
                )));
            }
            if has("warden.jobs").fetch_one(&mut *tx).await? {
                jobs = sqlx::query_scalar("SELECT count(*) FROM warden.jobs").fetch_one(&mut *tx).await?;
            }
            sqlx::query("DROP SCHEMA warden CASCADE").execute(&mut *tx).await?;
        }
        let legacy_rows = forget_legacy_history_on(&mut *tx).await?;
        tx.commit().await?;
        Ok(ResetReport { jobs, live_leases, legacy_rows })
    }
    .await;
    let _ = conn.close().await;
    result
}
