//! The admin seam: observation queries for the gRPC API and the CLI, retention,
//! the history checker's figures, and what a node publishes at start (its kinds'
//! options). None of it is on the hot path; every query is bounded (caps, windows,
//! index probes), because operators call them on live clusters.

use super::{LeaseRow, StateCounts};
use crate::error::Result;
use crate::handler::Registry;
use crate::job::{AttemptRow, JobRow};
use crate::progress::JobProgress;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::time::Duration;

/// Accounts that could use an execution slot now (see
/// [`AdminStore::runnable_accounts`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct SlotDemand {
    /// Accounts whose next job is due and not claimed: a free slot would start it
    /// now (a due unordered job, or a due serial head that is not running).
    pub runnable: i64,
    /// Accounts with a claimed job (running, or claimed and waiting for a slot).
    pub running: i64,
}

impl SlotDemand {
    /// The demand in slots: `running + runnable` (never the queue length — a backlog
    /// of one account can use only one slot).
    pub fn total(&self) -> i64 {
        self.running + self.runnable
    }
}

/// The admin storage seam.
///
/// Partition routing: these queries read the whole cluster (every partition); a
/// router over several databases would run each on every database and merge the
/// results (leases and depths by partition; pages by id).
#[async_trait]
pub trait AdminStore: Send + Sync + 'static {
    /// Publish the per-kind options of a node's handlers (`warden.kinds`), so that
    /// enqueues that do not hold the handlers — the SQL function, a plain
    /// [`crate::Client`], gRPC — store the kind's max attempts and timeout. The last
    /// node to start wins: in a rolling deploy that changes a kind's options, jobs
    /// enqueued meanwhile get either.
    async fn publish_kinds(&self, registry: &Registry, node: &str) -> Result<()>;
    /// Every partition's lease, by partition.
    async fn leases(&self) -> Result<Vec<LeaseRow>>;
    /// Per-state job counts, bounded (see [`AdminStore::queue_depth`]): unfinished
    /// states are exact up to [`DEFAULT_PARTITION_COUNT_CAP`] jobs per partition;
    /// finished states past [`FINISHED_COUNT_CAP`] are the planner's estimate. Never
    /// groups the whole table.
    async fn state_counts(&self) -> Result<StateCounts> {
        Ok(self.queue_depth(DEFAULT_PARTITION_COUNT_CAP).await?.state_counts())
    }
    /// Queue depth per partition, counted up to `cap` unfinished jobs each (see
    /// [`QueueDepth`]).
    async fn queue_depth(&self, cap: i64) -> Result<QueueDepth>;
    /// Accounts that could use an execution slot in `partitions` (every partition
    /// when `None`), each count capped at `cap`: see [`SlotDemand`]. The autoscaling
    /// figures; the KEDA query in `deploy/k8s` is the same SQL.
    async fn runnable_accounts(&self, partitions: Option<&[u32]>, cap: i64) -> Result<SlotDemand>;
    /// Age of the oldest due, not yet started job: one index probe per partition,
    /// never a scan of the backlog.
    async fn oldest_due_age(&self) -> Result<Option<Duration>>;
    /// Jobs matching the filter, newest first, bounded: kind/state are checked on at
    /// most [`LIST_SCAN_WINDOW`] rows per call; the page says where to continue.
    async fn list_jobs(&self, filter: &JobFilter) -> Result<JobPage>;
    /// The liveness and progress last recorded for each of `job_ids` that has
    /// heartbeated or checkpointed (see [`crate::progress`]), and the database clock
    /// at the read: primary-key probes of `warden.job_progress`, at most
    /// [`MAX_PROGRESS_READ`] ids.
    async fn job_progress(&self, job_ids: &[i64]) -> Result<ProgressRead>;
    /// One page of a job's attempts in order: those with attempts-row id above
    /// `after_id`, at most `limit`.
    async fn attempts_page(&self, job_id: i64, after_id: i64, limit: i64) -> Result<Vec<AttemptRow>>;
    /// The account's next job in serial order (else its next unordered job) and its
    /// number of unfinished jobs, counted up to [`ACCOUNT_COUNT_CAP`].
    async fn account_queue(&self, account: &str) -> Result<AccountQueue>;
    /// Delete up to `batch` finished jobs whose `finished_at` is older than
    /// `older_than` (database clock), with their attempts, in one short transaction,
    /// one node at a time. Rows anyone holds are skipped, not waited for; unfinished
    /// jobs are never touched. `after`: continue past this position (the previous
    /// batch's [`Pruned::last`]), so a run never re-walks the index entries of the rows
    /// it deleted (dead until vacuum).
    async fn prune_finished(&self, older_than: Duration, batch: i64, after: Option<PruneCursor>) -> Result<Pruned>;
    /// Delete up to `batch` expired idempotency keys (`expires_at` passed, database
    /// clock), in one short statement; keys anyone holds are skipped. An expired key
    /// is dead either way (the next enqueue with it takes it over): this only bounds
    /// the table. Returns how many went.
    async fn prune_idempotency_keys(&self, batch: i64) -> Result<u64>;
    /// The serial guarantee's figures over the whole history still stored (see
    /// [`crate::history`]).
    async fn history_report(&self) -> Result<HistoryReport>;
}

/// Most job ids one [`AdminStore::job_progress`] reads (a page of jobs).
pub const MAX_PROGRESS_READ: usize = 1_000;

/// What [`AdminStore::job_progress`] read.
#[derive(Debug, Clone)]
pub struct ProgressRead {
    /// The database clock at the read: ages (heartbeat, checkpoint, running time)
    /// are measured against it, on the same clock that stamped them.
    pub read_at: DateTime<Utc>,
    /// The jobs that have a progress row.
    pub jobs: std::collections::HashMap<i64, JobProgress>,
}

/// Filters and page for [`AdminStore::list_jobs`]: jobs by id descending (newest first).
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub account: Option<String>,
    pub kind: Option<String>,
    /// `running` is read through the running jobs' index, however old they are (not
    /// within [`LIST_SCAN_WINDOW`]); other states within the window.
    pub state: Option<String>,
    /// Only ids below this (the previous page's last id).
    pub before_id: Option<i64>,
    pub limit: i64,
}

/// With a kind or state filter, [`AdminStore::list_jobs`] examines at most this many jobs (newest
/// first, below `before_id`) per call, so a rare filter value cannot make one page
/// scan the whole table; the page then says where to continue.
pub const LIST_SCAN_WINDOW: i64 = 2_000;

/// A page of [`AdminStore::list_jobs`].
#[derive(Debug, Clone, Default)]
pub struct JobPage {
    /// At most `limit` jobs, newest first.
    pub jobs: Vec<JobRow>,
    /// Continue below this id; `None` when nothing older can match.
    pub next_before_id: Option<i64>,
}

/// Unfinished states, in the order [`PartitionDepth::by_state`] counts them.
pub const UNFINISHED_STATES: [&str; 4] = ["scheduled", "available", "retryable", "running"];
/// Finished states: the retention pruner deletes these after the retention period.
pub const FINISHED_STATES: [&str; 3] = ["completed", "discarded", "cancelled"];
/// Default per-partition cap of [`AdminStore::queue_depth`].
pub const DEFAULT_PARTITION_COUNT_CAP: i64 = 1_000;
/// [`AdminStore::queue_depth`] counts finished jobs exactly while there are at most this many
/// (index-only on `jobs_finished_at`); past it, it reports the planner's estimates.
pub const FINISHED_COUNT_CAP: i64 = 10_000;
/// [`AdminStore::account_queue`] counts at most this many unfinished jobs of one account.
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

/// The account's queue as [`AdminStore::account_queue`] sees it.
#[derive(Debug, Clone)]
pub struct AccountQueue {
    /// The serial head (running or not), else the earliest unordered job.
    pub next: Option<JobRow>,
    /// Unfinished jobs, at most [`ACCOUNT_COUNT_CAP`] (a count equal to it is a lower bound).
    pub unfinished: i64,
}

/// A position in the pruner's index order (`finished_at`, `id`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PruneCursor {
    pub finished_at: DateTime<Utc>,
    pub id: i64,
}

/// What one pruning batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub jobs: u64,
    pub attempts: u64,
    /// Another node holds the pruner lock: nothing was done.
    pub skipped: bool,
    /// The last job deleted: where the next batch of the same run starts.
    pub last: Option<PruneCursor>,
}

/// The history checker's figures ([`crate::history::check`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct HistoryReport {
    pub jobs: i64,
    pub completed: i64,
    pub discarded: i64,
    pub cancelled: i64,
    /// Jobs not finished yet (scheduled, available, retryable, running).
    pub unfinished: i64,
    pub attempts: i64,
    /// Attempts that ended in a retry (failed, timeout, retry).
    pub retried_attempts: i64,
    pub rescued_attempts: i64,
    /// Pairs of attempts of serial jobs of one account that overlap in time.
    pub overlaps: i64,
    /// Attempts of a serial job that started while an earlier-ordered serial job of
    /// the same account (already enqueued then) was not yet finished.
    pub order_violations: i64,
    /// Attempts that started after their job had already completed.
    pub reruns_after_completion: i64,
    /// Jobs with more than one completed attempt.
    pub double_completions: i64,
}

impl HistoryReport {
    /// True when no serial-guarantee invariant is violated.
    pub fn is_clean(&self) -> bool {
        self.overlaps == 0
            && self.order_violations == 0
            && self.reruns_after_completion == 0
            && self.double_completions == 0
    }
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
