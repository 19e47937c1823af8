//! The admin HTTP server: `/metrics` (Prometheus text), `/healthz` (liveness: the
//! process serves HTTP) and `/readyz` (readiness: the node is started, active in the
//! cluster, reaches the database and has acquired every partition the ring assigns
//! it — latched once reached, so later rebalances do not flap it; 503 with the
//! reason otherwise, and from the moment a graceful shutdown begins). It starts before the database is reachable, so an orchestrator
//! sees a live but not-ready process while the node waits for PostgreSQL.

use axum::{http::StatusCode, routing::get, Router};
use std::sync::{Arc, OnceLock};
use tokio_util::sync::CancellationToken;
use warden_runtime::node::NodeReadiness;
use warden_runtime::Node;

/// What `/readyz` reads: empty until the node has started.
#[derive(Clone, Default)]
pub struct Readiness(Arc<OnceLock<Node>>);

impl Readiness {
    /// Readiness that follows `node` from now on.
    pub fn of(node: Node) -> Self {
        let r = Self::default();
        r.set(node);
        r
    }

    /// The node has started: `/readyz` follows it from now on.
    pub fn set(&self, node: Node) {
        let _ = self.0.set(node);
    }

    /// `Ok` when ready, else why not (see [`warden_runtime::node::Readiness`]).
    pub fn check(&self) -> Result<(), String> {
        match self.0.get() {
            None => Err("not ready: starting (waiting for the database)".into()),
            Some(node) => match node.readiness() {
                NodeReadiness::Ready => Ok(()),
                why => Err(why.to_string()),
            },
        }
    }
}

/// The admin routes.
pub fn router(readiness: Readiness, metrics: Option<metrics_exporter_prometheus::PrometheusHandle>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = metrics.clone();
                async move { m.map(|h| h.render()).unwrap_or_default() }
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let state = readiness.check();
                async move {
                    match state {
                        Ok(()) => (StatusCode::OK, "ready".to_string()),
                        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
                    }
                }
            }),
        )
}

/// Serve the admin routes on `listener` until `shutdown` fires.
pub async fn serve(
    listener: tokio::net::TcpListener,
    readiness: Readiness,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(readiness, metrics))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}
