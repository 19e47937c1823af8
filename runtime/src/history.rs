//! The history checker: verifies the serial guarantee (DESIGN §1) from the
//! attempts table, the audit trail every attempt writes. Used by the demo, the
//! tests and the benchmarks; every figure is computed by PostgreSQL.
//!
//! It sees only the history that is still there: [`crate::retention`] deletes finished
//! jobs and their attempts after the retention period, and the checks are then sound
//! over what remains but blind to what was pruned (and `completed` counts only the
//! unpruned). Run checks with retention off or longer than the history they cover,
//! as the tests and the soak do (the default keeps 7 days).

use crate::error::Result;
use crate::store::{AdminStore, PgAdminStore};
use sqlx::postgres::PgPool;

pub use crate::store::HistoryReport;

/// Check the whole history in a store (every figure is computed by the store).
pub async fn check_store(store: &(impl AdminStore + ?Sized)) -> Result<HistoryReport> {
    store.history_report().await
}

/// Check the whole history in `warden.jobs` / `warden.attempts`.
pub async fn check(pool: &PgPool) -> Result<HistoryReport> {
    check_store(&PgAdminStore::from(pool)).await
}
