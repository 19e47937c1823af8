//! # warden
//!
//! The crate to depend on: run account-scoped serial background jobs on a cluster
//! of identical nodes. It re-exports the executor core (`warden-runtime`: handlers,
//! client, node, store, schema) and the cluster wiring (`warden-cluster`), and adds
//! what a production node runs around them. A whole node:
//!
//! ```no_run
//! # use warden::{async_trait, Handler, HandlerResult, JobContext, Outcome};
//! # struct Charge;
//! # #[async_trait] impl Handler for Charge { type Args = serde_json::Value; const KIND: &'static str = "charge";
//! #     async fn run(&self, _: &mut JobContext, _: serde_json::Value) -> HandlerResult { Ok(Outcome::Done) } }
//! use clap::Parser;
//!
//! #[derive(Parser)]
//! struct Args {
//!     #[command(flatten)]
//!     warden: warden::HostFlags, // every flag also an env var: DATABASE_URL, WARDEN_NODE_ID, …
//! }
//!
//! #[tokio::main]
//! async fn main() -> anyhow::Result<()> {
//!     warden::init_tracing();
//!     warden::Host::from_flags(&Args::parse().warden)?
//!         .register(Charge)?
//!         .run(warden::shutdown_signal())
//!         .await
//! }
//! ```
//!
//! Module map:
//!
//! - [`host`] — [`Host`]: pools, waiting for the database, gossip, the node, admin
//!   HTTP, the gRPC API, one task tracker and ordered shutdown; [`HostConfig`] to
//!   configure it in code.
//! - [`flags`] — [`HostFlags`]: the node's flags (each also an env var) for
//!   `#[command(flatten)]`, validated into a [`HostConfig`].
//! - [`admin`] — `/metrics`, `/healthz`, `/readyz`.
//! - [`api`] — the gRPC services of `proto/warden.proto` (generated code and
//!   conversions in `warden-proto`): cluster observation and job operations,
//!   bearer-token auth, TLS, limits.
//! - everything of `warden-runtime` (re-exported at this root: [`Node`], [`Client`],
//!   [`Handler`], [`NewJob`], [`store`], [`schema`], the configuration types …) and
//!   `warden-cluster` as [`cluster`] (with [`GossipConfig`] at this root).
//!
//! Embedding only the executor (no gRPC, no HTTP, no tonic in the build)? Depend on
//! `warden-runtime` and use `Node::builder` directly.

pub mod admin;
pub mod api;
pub mod flags;
pub mod host;

pub use flags::HostFlags;
pub use host::{init_tracing, ApiConfig, ClusterConfig, Host, HostConfig, RunningHost};
pub use warden_proto as proto;
pub use warden_runtime::*;
