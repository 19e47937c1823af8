//! # warden-cluster
//!
//! Everything that decides *where* an account's work should run. Nothing in this
//! crate is trusted for safety: it only says who *should* own a partition; the
//! lease in PostgreSQL (see `warden-runtime::lease`) says who *may* run it.
//!
//! Module map:
//!
//! - [`partition`] — the stable account → partition hash (`md5`-based, so the very
//!   same function also runs inside PostgreSQL for trigger enqueues).
//! - [`placement`] — the pure placement function: (members, P) → which partitions
//!   each node should hold. Today: every partition on the single local node; the
//!   consistent-hash ring with bounded loads lands with the cluster issue.

pub mod partition;
pub mod placement;

pub use partition::{partition_of, PartitionCount, PartitionCountError, DEFAULT_PARTITIONS};
pub use placement::{Assignment, Placement, SingleNode};
