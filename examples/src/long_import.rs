//! A long-running job: import an account's rows in batches for minutes or hours,
//! heartbeating with progress, checkpointing a cursor, resuming from it after a crash,
//! a handoff, a drain or a retry, and stopping when told to. The README's long job is
//! the `impl Handler` below (checked by a test in `lib.rs`).
//!
//! Each batch is written on its own (not through `ctx.tx()`) and idempotently, so a
//! batch redone after resuming from the last checkpoint is harmless: at most one
//! checkpoint interval of work is redone.

use serde::{Deserialize, Serialize};
use std::time::Duration;
use tokio::time::Instant;
use warden::{async_trait, Handler, HandlerResult, Heartbeat, JobContext, JobOptions, Outcome, Progress, StopReason};

/// What to import.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Import {
    /// Rows to import.
    pub rows: u64,
    /// Rows per batch (one write each).
    pub batch: u64,
    /// Commit the cursor as a checkpoint at most this often.
    pub checkpoint_every_ms: u64,
    /// A slow source: time one batch takes to read (0: as fast as the database goes).
    #[serde(default)]
    pub pace_ms: u64,
}

/// Where the import got to: the checkpoint.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Cursor {
    pub next_row: u64,
}

/// The `long_import` handler; `pool` is where the rows go.
pub struct LongImport {
    pub pool: sqlx::PgPool,
}

#[async_trait]
impl Handler for LongImport {
    type Args = Import;
    const KIND: &'static str = "long_import";

    fn options(&self) -> JobOptions {
        JobOptions {
            // The whole import may take hours...
            timeout: Duration::from_secs(6 * 3600),
            // ...but a minute without a heartbeat means the handler hung: abort and retry.
            heartbeat_timeout: Some(Duration::from_secs(60)),
            max_attempts: 10,
            ..Default::default()
        }
    }

    async fn run(&self, ctx: &mut JobContext, a: Import) -> HandlerResult {
        // Resume from the last committed checkpoint, whichever attempt wrote it.
        let mut cursor: Cursor = ctx.checkpointed().await?.unwrap_or_default();
        let mut checkpointed_at = Instant::now();
        while cursor.next_row < a.rows {
            let end = (cursor.next_row + a.batch).min(a.rows);
            import_batch(&self.pool, ctx.account(), cursor.next_row..end, a.pace_ms).await?;
            cursor.next_row = end;
            // Cheap to call every batch: written at most once per heartbeat write interval.
            let progress = Progress::of(end, a.rows).with_message(format!("row {end}/{}", a.rows));
            let mut beat = ctx.heartbeat(progress).await?;
            if checkpointed_at.elapsed() >= Duration::from_millis(a.checkpoint_every_ms) {
                beat = ctx.checkpoint(&cursor).await?; // fenced, commits on its own
                checkpointed_at = Instant::now();
            }
            if let Heartbeat::Stop(reason) = beat {
                // A handoff, drain or shutdown: save the cursor and return within the
                // drain timeout, and this attempt does not count. (After a cancel there
                // is nothing to resume; after a lost lease nothing more is recorded.)
                if reason == StopReason::Handoff {
                    let _ = ctx.checkpoint(&cursor).await?; // stopping anyway
                }
                return Err(reason.into());
            }
        }
        Ok(Outcome::Done)
    }
}

/// Import rows `rows` of `account`: idempotent (a redone batch writes nothing twice).
async fn import_batch(
    pool: &sqlx::PgPool,
    account: &str,
    rows: std::ops::Range<u64>,
    pace_ms: u64,
) -> Result<(), sqlx::Error> {
    tokio::time::sleep(Duration::from_millis(pace_ms)).await;
    sqlx::query(
        "INSERT INTO imported_rows (account, row_no) SELECT $1, g FROM generate_series($2::bigint, $3::bigint - 1) g
         ON CONFLICT DO NOTHING",
    )
    .bind(account)
    .bind(rows.start as i64)
    .bind(rows.end as i64)
    .execute(pool)
    .await?;
    Ok(())
}

/// The table the import writes.
pub async fn migrate(pool: &sqlx::PgPool) -> anyhow::Result<()> {
    // Nodes start together: serialise CREATE ... IF NOT EXISTS (it races in PostgreSQL).
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('warden-examples-long-import'))").execute(&mut *tx).await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS imported_rows (account text NOT NULL, row_no bigint NOT NULL,
         PRIMARY KEY (account, row_no))",
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}
