//! # warden-runtime
//!
//! Account-scoped serial jobs on PostgreSQL: per-account actors run each account's
//! jobs one at a time, in order, never twice, every write fenced by a partition
//! lease epoch. See `shared/DESIGN.md` for the guarantee.
//!
//! Module map:
//!
//! - [`job`] — job rows, states, lanes, the enqueue request and its input limits.
//! - [`store`] — all SQL, behind three seams split by caller: [`store::Store`] (the
//!   executor: leases, the fenced finish-and-claim-next hot path, rescue, scans, member
//!   heartbeats), [`store::ProducerStore`] (enqueue and the client's job operations) and
//!   [`store::AdminStore`] (observation, retention, the history figures); `store::pg`
//!   implements them on PostgreSQL with the statements as `.sql` files (claims of
//!   many idle accounts travel together: `store::pg::claims`).
//! - [`schema`] — the migration runner with Warden's own history
//!   (`warden.schema_history`), adoption of a legacy sqlx history, and the
//!   compatibility check of the upgrade contract (`deploy/UPGRADING.md`).
//! - [`handler`] — the [`Handler`] trait, per-kind [`JobOptions`], [`JobContext`].
//! - [`client`] — enqueue (also inside the caller's transaction), get, cancel, retry.
//! - [`lease`] — the node's lease table and the keeper that renews and self-fences.
//! - [`account_actor`] — one ractor actor per active account; attempt execution.
//! - [`attempt`] — the attempt's outcome decided, pure: how a handler's run ended →
//!   the finish to record (retry, discard, interruption, …).
//! - [`progress`] — long-running jobs: fenced heartbeats with progress, checkpoints
//!   that the next attempt resumes from, the heartbeat timeout's rules.
//! - [`hooks`] — in-process hooks on attempt start and finish, for embedders.
//! - [`enforcer`] — `tick + run_once()`: leases ↔ placement, actors for due work; its
//!   plan is pure ([`enforcer::plan_leases`]).
//! - [`wakeup`] — LISTEN/NOTIFY routing with rescan after reconnect.
//! - [`node`] — configuration, builder, lifecycle and graceful shutdown.
//! - [`ownership_diff`] — the ownership stream's diffs, pure: the lease owners and
//!   member states a watcher saw vs now → the changes to send (the `warden` crate's
//!   gRPC API turns them into events).
//! - [`schedule`] — schedule timing, pure: cron or interval, zone, DST rule, jitter.
//! - [`retention`] — the pruner of finished jobs and their attempts (batched, one
//!   node at a time).
//! - [`scheduler`] — periodic schedules: definitions, the pure fire plan (catch-up,
//!   overlap), the node task that fires the held partitions' due schedules, and the
//!   management API ([`scheduler::Schedules`]).
//! - [`saturation`] — the scaling signal: busy execution slots / slots and CPU,
//!   averaged over a window, and runnable accounts waiting (`warden_saturation`, …).
//! - [`history`] — the checker of the serial guarantee over the attempts table
//!   (its figures come from [`store::AdminStore::history_report`]).
//! - [`telemetry`] — metric names.
//! - [`error`] — the crate's error type.
//!
//! Every configuration type is re-exported at this root ([`NodeConfig`],
//! [`ExecConfig`], [`LeaseConfig`], [`RetentionConfig`], [`StoreConfig`],
//! [`ClusterOptions`], [`GossipConfig`], [`RingConfig`]), and so is the cluster crate
//! ([`cluster`]): embedding a cluster member needs no other dependency.
//!
//! This crate has no gRPC and no HTTP. The `warden` crate (`runtime/host`) adds the
//! one-call host, admin HTTP and the gRPC API; `warden-proto` (`proto/`) the wire
//! types; `warden-cli` (`runtime/cli`) the `warden` command.

pub mod account_actor;
pub mod attempt;
pub mod client;
pub mod enforcer;
pub mod error;
pub mod handler;
pub mod history;
pub mod hooks;
pub mod job;
pub mod lease;
pub mod node;
pub mod ownership_diff;
pub mod progress;
pub mod retention;
pub mod saturation;
pub mod schedule;
pub mod scheduler;
pub mod schema;
pub mod store;
pub mod telemetry;
pub mod wakeup;

pub use async_trait::async_trait;
pub use client::Client;
pub use error::{Error, Result};
pub use handler::{Backoff, FencingToken, Handler, HandlerError, HandlerResult, JobContext, JobOptions, Outcome};
pub use hooks::{AttemptInfo, AttemptOutcome};
pub use job::{CancelResult, Enqueued, JobRow, JobState, Lane, NewJob};
pub use node::{shutdown_signal, ClusterOptions, Node, NodeBuilder, NodeConfig};
pub use progress::{Heartbeat, JobProgress, Progress, StopReason};
pub use sqlx;
// Every configuration type at this root: a node's parts and its cluster wiring.
pub use account_actor::ExecConfig;
pub use lease::LeaseConfig;
pub use retention::RetentionConfig;
pub use store::StoreConfig;
pub use warden_cluster as cluster;
pub use warden_cluster::{
    partition_of, GossipConfig, GossipMembership, Holder, Holders, Membership, PartitionCount, RingConfig,
};
