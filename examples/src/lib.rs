//! # warden-examples
//!
//! Module map:
//!
//! - [`billing`] — the demo's account handlers: charge → invoice → notify, each step a
//!   follow-up job enqueued in the previous step's transaction, with injected failures.
//! - [`cli`] — the `warden` command-line client for the gRPC API.
//! - [`workload`] — the test/benchmark workload: a handler that records its own start
//!   and end (database clock) in an audit table inside its job transaction, and an
//!   external effect log outside it.
//! - [`node_main`] — the node binary's configuration (flags and environment) and main loop,
//!   with the admin HTTP endpoints (`/metrics`, `/healthz`, `/readyz`).
//!
//! Binaries: `warden-demo` (README's run command), `warden-node`, `warden` (CLI),
//! `warden-bench`, `warden-cluster-bench`.

pub mod billing;
pub mod cli;
pub mod node_main;
pub mod workload;
