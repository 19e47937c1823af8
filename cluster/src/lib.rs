//! # warden-cluster
//!
//! Everything that decides *where* an account's work should run. Nothing in this
//! crate is trusted for safety: it only says who *should* own a partition; the
//! lease in PostgreSQL (see `warden-runtime::lease`) says who *may* run it.
//!
//! Module map:
//!
//! - [`error`] — the crate's errors ([`Error`], [`ConfigError`]).
//! - [`partition`] — the stable account → partition hash (`md5`-based, so the very
//!   same function also runs inside PostgreSQL for trigger enqueues).
//! - [`membership`] — who is in the cluster: the [`Membership`] seam and its chitchat
//!   gossip implementation (UDP, or chitchat's in-memory transport in tests).
//! - [`ring`] — the pure placement function: consistent-hash ring (`hashring`, virtual
//!   nodes) with bounded loads, solved as a deferred-acceptance matching, from (active
//!   members, P) to an owner per partition.
//! - [`sticky`] — placement algorithm 2, the default: the members' share of the
//!   partitions computed from the lease holders every node reads, so a partition
//!   stays where it is unless a leave, a join or the cap moves it, and moves towards
//!   the nodes a rollout keeps (at most twice per rolling replace).
//! - [`rollout`] — rolling deploys: the version group a rollout heads for
//!   ([`rollout::target_version`], from the `version`/`started` gossip keys), and the
//!   measured reasons why no memoryless placement bounds the moves of one.
//! - [`placement`] — what this node should hold: [`SingleNode`], or the placement
//!   the members agree on (sticky or the plain ring) over the eligible members with a
//!   settle delay ([`RingPlacement`], [`Settler`]).

pub mod error;
pub mod membership;
pub mod partition;
pub mod placement;
pub mod ring;
pub mod rollout;
pub mod sticky;

pub use error::{ConfigError, Error};
pub use membership::{GossipConfig, GossipMembership, Member, MemberState, Membership};
pub use partition::{partition_of, PartitionCount, PartitionCountError, DEFAULT_PARTITIONS};
pub use placement::{Assignment, Placement, RingPlacement, Settler, SingleNode};
pub use ring::{place, RingAssignment, RingConfig};
pub use sticky::{place_sticky, Candidate, Holder, Holders};
