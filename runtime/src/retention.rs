//! Retention: the pruner that deletes finished jobs (`completed`, `discarded`,
//! `cancelled`) and their attempts rows once they are older than the retention
//! period. Every node runs it (`tick + run_once()`); a transaction-level advisory
//! lock (class "WARD" + 10, [`crate::store::RETENTION_LOCK_CLASS`]) lets one node prune at a
//! time and `FOR UPDATE SKIP LOCKED` keeps a batch off rows anyone else holds.
//!
//! Each batch is one short transaction of one statement over at most
//! [`RetentionConfig::batch_size`] jobs, oldest `finished_at` first (partial index
//! `jobs_finished_at`), so no lock is held for long and enqueues and the hot path never
//! wait behind it. The batches of a run continue from where the previous one ended (a
//! keyset cursor), never re-walking the index entries of rows they deleted; a row
//! skipped because someone held it is picked up by the next run. A run stops after [`RetentionConfig::max_batches_per_run`] batches
//! and pauses [`RetentionConfig::batch_pause`] between batches.
//!
//! Expired idempotency keys (`warden.idempotency_keys`, migration 0007) are deleted by
//! the same runs, after the jobs, in batches of the same size. They are dead anyway
//! (the next enqueue of an expired key takes it over); pruning bounds the table. With
//! retention off they stay.
//!
//! What pruning gives up: unfinished jobs are never touched, so the guarantee itself
//! does not depend on history. The audit checks over the attempts table
//! ([`crate::history::check`], the tests' and the soak's checkers) hold only over the
//! history that is still there: a pruned job and its attempts are simply absent (the
//! checks stay sound over the remaining subset, but cannot see what was deleted). Tests
//! and soaks run with retention off or far longer than the run. A pruned discarded or
//! cancelled job can no longer be retried (`NOT_FOUND`).

use crate::error::{Error, Result};
use crate::store::{AdminStore, PgAdminStore, Pruned};
use sqlx::postgres::{PgPool, PgPoolOptions};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Retention settings. `Default`: keep finished jobs 7 days, prune every minute in
/// batches of 1,000, at most 100 batches per run.
#[derive(Debug, Clone)]
pub struct RetentionConfig {
    /// Finished jobs older than this (by `finished_at`, database clock) are deleted with
    /// their attempts. `None` (or zero) disables the pruner.
    pub period: Option<Duration>,
    /// Jobs deleted per batch (one short transaction each).
    pub batch_size: i64,
    /// How often a run starts (jittered ±20%).
    pub interval: Duration,
    /// At most this many batches per run, so a large backlog of history is worked off
    /// over several runs instead of in one long burst.
    pub max_batches_per_run: u32,
    /// Pause between batches of one run, leaving the database to other work.
    pub batch_pause: Duration,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            period: Some(Duration::from_secs(7 * 24 * 3600)),
            batch_size: 1_000,
            interval: Duration::from_secs(60),
            max_batches_per_run: 100,
            batch_pause: Duration::from_millis(20),
        }
    }
}

impl RetentionConfig {
    /// Retention off: nothing is ever deleted.
    pub fn disabled() -> Self {
        Self { period: None, ..Default::default() }
    }

    /// The effective period (`None` when disabled).
    pub fn enabled_period(&self) -> Option<Duration> {
        self.period.filter(|p| !p.is_zero())
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        if !(1..=100_000).contains(&self.batch_size) {
            return Err(format!("retention batch_size must be 1..=100000, got {}", self.batch_size));
        }
        if self.interval < Duration::from_millis(10) {
            return Err("retention interval must be at least 10ms".into());
        }
        if self.max_batches_per_run == 0 {
            return Err("retention max_batches_per_run must be positive".into());
        }
        Ok(())
    }
}

/// What one run did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PruneReport {
    pub jobs: u64,
    pub attempts: u64,
    /// Expired idempotency keys deleted.
    pub keys: u64,
    pub batches: u32,
    /// Another node held the pruner lock for (some of) the run.
    pub skipped: bool,
}

/// The pruner of one node.
#[derive(Debug, Clone)]
pub struct Pruner {
    store: PgAdminStore,
    config: RetentionConfig,
}

impl Pruner {
    /// A pruner on `pool` (the node gives it a one-connection pool of its own, so it
    /// never takes an executor connection).
    pub fn new(pool: PgPool, config: RetentionConfig) -> Result<Self> {
        config.validate().map_err(Error::Config)?;
        Ok(Self { store: PgAdminStore::new(pool), config })
    }

    /// A one-connection pool beside `pool`, with the same connect options.
    pub fn own_pool(pool: &PgPool) -> PgPool {
        PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(10))
            .test_before_acquire(false)
            .connect_lazy_with((*pool.connect_options()).clone().application_name("warden-retention"))
    }

    pub fn config(&self) -> &RetentionConfig {
        &self.config
    }

    /// One run: batches until one comes back short, another node holds the lock, or
    /// `max_batches_per_run` is reached.
    pub async fn run_once(&self) -> Result<PruneReport> {
        let mut report = PruneReport::default();
        let Some(period) = self.config.enabled_period() else { return Ok(report) };
        let started = Instant::now();
        let mut cursor = None;
        for i in 0..self.config.max_batches_per_run {
            if i > 0 && !self.config.batch_pause.is_zero() {
                tokio::time::sleep(self.config.batch_pause).await;
            }
            let batch_started = Instant::now();
            let Pruned { jobs, attempts, skipped, last } =
                self.store.prune_finished(period, self.config.batch_size, cursor).await?;
            cursor = last.or(cursor);
            metrics::histogram!("warden_retention_batch_seconds").record(batch_started.elapsed().as_secs_f64());
            if skipped {
                report.skipped = true;
                break;
            }
            report.batches += 1;
            report.jobs += jobs;
            report.attempts += attempts;
            metrics::counter!("warden_retention_pruned_total", "table" => "jobs").increment(jobs);
            metrics::counter!("warden_retention_pruned_total", "table" => "attempts").increment(attempts);
            if (jobs as i64) < self.config.batch_size {
                break;
            }
        }
        // Expired idempotency keys: the same batches, after the jobs (skipped rows
        // wait for the next run).
        if !report.skipped {
            for _ in 0..self.config.max_batches_per_run {
                let keys = self.store.prune_idempotency_keys(self.config.batch_size).await?;
                report.keys += keys;
                metrics::counter!("warden_retention_pruned_total", "table" => "idempotency_keys").increment(keys);
                if (keys as i64) < self.config.batch_size {
                    break;
                }
                if !self.config.batch_pause.is_zero() {
                    tokio::time::sleep(self.config.batch_pause).await;
                }
            }
        }
        let elapsed = started.elapsed();
        metrics::histogram!("warden_retention_run_seconds").record(elapsed.as_secs_f64());
        if report.jobs > 0 || report.keys > 0 || report.skipped {
            tracing::info!(
                jobs = report.jobs,
                attempts = report.attempts,
                idempotency_keys = report.keys,
                batches = report.batches,
                skipped = report.skipped,
                elapsed_ms = elapsed.as_millis() as u64,
                "retention: pruned finished jobs older than {period:?}"
            );
        } else {
            tracing::debug!(elapsed_ms = elapsed.as_millis() as u64, "retention: nothing to prune");
        }
        Ok(report)
    }
}

/// Run the pruner every `interval` (jittered) until `stop`. The first run waits one
/// interval, so a node's start is not slowed by it.
pub async fn run(pruner: Pruner, stop: CancellationToken) {
    if pruner.config.enabled_period().is_none() {
        return;
    }
    loop {
        let jitter = 0.8 + 0.4 * fastrand::f64();
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(pruner.config.interval.mul_f64(jitter)) => {}
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            r = pruner.run_once() => if let Err(e) = r {
                tracing::warn!(error = %e, "retention run failed; the next run retries");
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_or_none_period_disables() {
        assert!(RetentionConfig::disabled().enabled_period().is_none());
        let zero = RetentionConfig { period: Some(Duration::ZERO), ..Default::default() };
        assert!(zero.enabled_period().is_none());
        assert_eq!(RetentionConfig::default().enabled_period(), Some(Duration::from_secs(604_800)));
    }

    #[test]
    fn invalid_settings_are_rejected() {
        assert!(RetentionConfig { batch_size: 0, ..Default::default() }.validate().is_err());
        assert!(RetentionConfig { max_batches_per_run: 0, ..Default::default() }.validate().is_err());
        assert!(RetentionConfig { interval: Duration::ZERO, ..Default::default() }.validate().is_err());
        assert!(RetentionConfig::default().validate().is_ok());
    }
}
