//! The job store: every statement Warden runs against its database, behind three
//! seams split by who calls them.
//!
//! | seam | trait | callers | what |
//! |---|---|---|---|
//! | executor | [`Store`] ([`executor`]) | `lease`, `enforcer`, `account_actor`, `node`, `wakeup` | partition leases, the fenced claim / finish-and-claim-next / unclaim, rescue, due and orphan scans, member heartbeats |
//! | producer | [`ProducerStore`] ([`enqueue`]) | [`crate::Client`], handler follow-ups | enqueue (also in the caller's transaction), get, attempts, cancel, retry |
//! | admin | [`AdminStore`] ([`admin`]) | the gRPC API, [`crate::retention`], [`crate::history`], `node` start | observation (leases, queue depth, job pages, account queue), retention, the history checker, publishing kind options |
//!
//! [`pg`] implements all three on PostgreSQL: [`PgStore`] (executor and producer; it
//! knows the partition count) and [`PgAdminStore`] (admin; a pool is all it needs).
//! Opening a PostgreSQL store — [`connect`], [`migrate`], [`init_partitions`],
//! [`load_partitions`] — is backend-specific and stays outside the traits: a second
//! backend (the SQLite store of DESIGN §9) brings its own constructor, then implements
//! the same traits and passes the same conformance suite (`tests/conformance.rs`,
//! which also runs the simulation's model store).
//!
//! Routing: every fenced statement names its partition ([`Fence::partition`], or the
//! partitions of a lease call), so a router implementing [`Store`] can later pick one
//! of several databases per partition and forward to a [`PgStore`] per database.
//!
//! Fencing: every executor write carries a [`Fence`] (partition, epoch, node) and is
//! conditional on `warden.leases` still holding exactly that, unexpired by the
//! database clock, in the same statement. A write that affects no row is reported as
//! [`Error::Fenced`](crate::Error::Fenced); callers must stop, not retry.
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
//!
//! Layout: this file holds the types the seams share; [`executor`], [`enqueue`] and
//! [`admin`] the traits and their result types; `pg/` the PostgreSQL implementations,
//! one file per seam, every statement whole SQL (long ones as `sql/*.sql`, short ones
//! as named constants); no statement is assembled from fragments except the two
//! enqueues, which share their insert (see `pg/enqueue.rs`).

pub mod admin;
pub mod enqueue;
pub mod executor;
pub mod pg;

pub use admin::{
    AccountQueue, AdminStore, HistoryReport, JobFilter, JobPage, PartitionDepth, ProgressRead, PruneCursor, Pruned,
    QueueDepth, SlotDemand, ACCOUNT_COUNT_CAP, DEFAULT_PARTITION_COUNT_CAP, FINISHED_COUNT_CAP, FINISHED_STATES,
    LIST_SCAN_WINDOW, MAX_PROGRESS_READ, UNFINISHED_STATES,
};
pub use enqueue::{KindDefault, KindDefaults, ProducerStore};
pub use executor::{DueAccount, MemberInfo, RunningJob, Store};
pub use pg::{
    connect, init_partitions, load_partitions, migrate, migrator, JobTx, PgAdminStore, PgStore, StoreConfig,
    DUE_ACCOUNTS_SQL, ENQUEUE_LOCK_BATCH, ENQUEUE_LOCK_CLASS, LOCK_CHUNK, RETENTION_LOCK_CLASS,
};

use chrono::{DateTime, Utc};
use std::time::Duration;

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

/// The columns a [`Finish`] writes, whatever the backend. Delays are clamped to
/// [`crate::job::MAX_DELAY`] and text made storable, so that a finish can always
/// succeed: one PostgreSQL rejects (an interval out of range, a NUL byte) would be
/// rejected on every retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinishColumns {
    /// The job's new state (before a pending cancel turns a retry into `cancelled`).
    pub state: &'static str,
    /// Due again this many ms from now; `None` keeps `due_at`.
    pub due_ms: Option<i64>,
    /// The attempt row's outcome.
    pub outcome: &'static str,
    /// The attempt's error; `None` keeps the job's `last_error`.
    pub error: Option<String>,
    /// Give the attempt back (snooze, interruption).
    pub refund: bool,
}

impl Finish {
    pub fn columns(&self) -> FinishColumns {
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
    Recorded(Option<crate::job::JobRow>),
    /// The fence holds but the job is no longer running at this epoch: an earlier
    /// try of this finish committed and its reply was lost (or an operator finished
    /// it). Not a fence failure: the account's actor claims again, which adopts any
    /// job that earlier try claimed.
    NotRunning,
}

impl Finished {
    /// The job claimed next, if any.
    pub fn into_next(self) -> Option<crate::job::JobRow> {
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

/// A duration in whole milliseconds, saturating (what the statements bind).
pub(crate) fn ms(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}
