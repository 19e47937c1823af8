//! # warden-proto
//!
//! Warden's gRPC API as a crate of its own, shared by the server (the `warden` host
//! crate) and clients (the `warden` CLI, or your own).
//!
//! Module map:
//!
//! - [`pb`] — the code generated from `proto/warden.proto` (package `warden.v1`):
//!   messages, `cluster_client`/`jobs_client`/`schedules_client` and their servers.
//! - [`convert`] — runtime types ↔ wire messages: [`convert::job`] (with its
//!   progress: [`convert::job_with_progress`]), [`convert::attempt`], [`convert::new_job`] (every check of a wire job before the
//!   database), [`convert::schedule`] and [`convert::schedule_def`] (periodic
//!   schedules, checked by the engine's own validation), and [`convert::status`] (runtime errors → `tonic::Status`, never
//!   leaking SQL or internals).
//!
//! The executor core (`warden-runtime`) does not depend on this crate: enqueuing or
//! embedding the executor does not pull tonic.

pub mod pb {
    tonic::include_proto!("warden.v1");
}

pub mod convert;
