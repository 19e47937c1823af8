//! The one-call host: everything a production node runs around the executor.
//!
//! ```text
//!   Host::run(shutdown)
//!    ├─ metrics recorder (Prometheus), admin HTTP (/metrics /healthz /readyz) — first,
//!    │    so the process is live (not ready) while it waits for the database
//!    ├─ pools: executor (`--max-connections`), enqueue (`--enqueue-max-connections`);
//!    │    the control plane's and the API's own pools are made by the node and the API
//!    ├─ wait for the database (retry with backoff, logged, up to `--database-wait-secs`)
//!    ├─ your set-up steps (e.g. your own migrations), then the node: migrate, gossip,
//!    │    ring, leases, enforcer, actors
//!    ├─ gRPC API (token, TLS, limits)
//!    └─ on `shutdown` (SIGTERM/SIGINT with `shutdown_signal()`), in order:
//!         publish `leaving` → drain → release → stop gRPC → stop admin; every task awaited
//! ```
//!
//! Configure it from flags ([`crate::HostFlags`]) or build a [`HostConfig`] yourself;
//! leave `admin_addr` and `api` unset for an executor-only embedding (or use
//! `warden_runtime::Node` directly, which has neither tonic nor HTTP).

use crate::admin::{self, Readiness};
use crate::api::{Api, ApiLimits, Auth, Tls};
use anyhow::Context;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use warden_cluster::{GossipConfig, GossipMembership};
use warden_runtime::node::{ClusterOptions, NodeBuilder};
use warden_runtime::store::StoreConfig;
use warden_runtime::{Handler, Node, NodeConfig};

/// How long the gRPC server may take to finish its calls at shutdown before its
/// task is aborted (open ownership streams end at once; unary calls are bounded by
/// the API's request timeout, which is longer).
pub const GRPC_STOP_BUDGET: Duration = Duration::from_secs(5);
/// How long the admin server may take to stop.
pub const ADMIN_STOP_BUDGET: Duration = Duration::from_secs(2);

/// Gossip membership and ring options: the node runs as a cluster member.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub gossip: GossipConfig,
    pub options: ClusterOptions,
}

/// The gRPC API: where it listens, its bearer token, TLS and budgets.
#[derive(Clone)]
pub struct ApiConfig {
    pub listen: SocketAddr,
    pub token: Option<String>,
    pub tls: Option<Tls>,
    pub limits: ApiLimits,
}

/// Everything a host runs with. [`HostConfig::new`] is a single node with the
/// library's defaults, no admin server and no API.
#[derive(Clone)]
pub struct HostConfig {
    pub node: NodeConfig,
    pub database_url: String,
    /// The executor pool, and how long to wait for the database at start.
    pub store: StoreConfig,
    /// Connections of the node's enqueue pool (`Node::client`).
    pub enqueue_max_connections: u32,
    /// `Some`: a cluster member over gossip; `None`: owns every partition alone.
    pub cluster: Option<ClusterConfig>,
    /// Admin HTTP (`/metrics`, `/healthz`, `/readyz`); off when `None`.
    pub admin_addr: Option<SocketAddr>,
    /// gRPC API; off when `None`.
    pub api: Option<ApiConfig>,
    /// Install the Prometheus recorder for `/metrics` (skipped, with a warning, if
    /// the process already has a `metrics` recorder).
    pub install_metrics: bool,
}

impl std::fmt::Debug for ApiConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiConfig")
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls.is_some())
            .field("limits", &self.limits)
            .finish()
    }
}

/// A database URL for `Debug` and logs: it may carry a password (in its user
/// info or its query), so show where, not who.
pub(crate) fn redacted_url(url: &str) -> String {
    match url.rsplit_once('@') {
        Some((_, host)) => format!("postgres://…@{}", host.split('?').next().unwrap_or_default()),
        None => "<redacted>".to_string(),
    }
}

impl std::fmt::Debug for HostConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostConfig")
            .field("node", &self.node)
            .field("database_url", &redacted_url(&self.database_url))
            .field("store", &self.store)
            .field("enqueue_max_connections", &self.enqueue_max_connections)
            .field("cluster", &self.cluster)
            .field("admin_addr", &self.admin_addr)
            .field("api", &self.api)
            .field("install_metrics", &self.install_metrics)
            .finish()
    }
}

impl HostConfig {
    pub fn new(node_id: impl Into<String>, database_url: impl Into<String>) -> Self {
        Self {
            node: NodeConfig { node_id: node_id.into(), ..Default::default() },
            database_url: database_url.into(),
            store: StoreConfig::default(),
            enqueue_max_connections: warden_runtime::node::DEFAULT_CLIENT_MAX_CONNECTIONS,
            cluster: None,
            admin_addr: None,
            api: None,
            install_metrics: true,
        }
    }
}

type SetupStep = Box<dyn FnOnce(sqlx::PgPool) -> Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>> + Send>;

/// A node with its handlers, not started yet. See the module docs for what it runs.
pub struct Host {
    config: HostConfig,
    builder: NodeBuilder,
    setup: Vec<SetupStep>,
}

impl Host {
    pub fn new(config: HostConfig) -> Self {
        let builder = Node::builder(config.node.clone());
        Self { config, builder, setup: Vec::new() }
    }

    /// A host configured by command-line flags (validated; see [`crate::HostFlags`]).
    pub fn from_flags(flags: &crate::HostFlags) -> anyhow::Result<Self> {
        Ok(Self::new(flags.config()?))
    }

    pub fn config(&self) -> &HostConfig {
        &self.config
    }

    /// Register a handler (one per job kind).
    pub fn register<H: Handler>(mut self, handler: H) -> anyhow::Result<Self> {
        self.builder = self.builder.register(handler)?;
        Ok(self)
    }

    /// Adjust the node builder (attempt hooks, placement, a store layer, …).
    pub fn with_node(mut self, f: impl FnOnce(NodeBuilder) -> NodeBuilder) -> Self {
        self.builder = f(self.builder);
        self
    }

    /// A step run once the database is reachable and before the node starts — your
    /// own migrations, say. Steps run in the order they were added; an error stops
    /// the start.
    pub fn setup<F, Fut>(mut self, step: F) -> Self
    where
        F: FnOnce(sqlx::PgPool) -> Fut + Send + 'static,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        self.setup.push(Box::new(move |pool| Box::pin(step(pool))));
        self
    }

    /// Start everything and run until `shutdown` resolves, then stop in order.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        self.start().await?.run_until(shutdown).await
    }

    /// Start everything and return a handle (for tests, or to do more before waiting).
    pub async fn start(self) -> anyhow::Result<RunningHost> {
        let Host { config, mut builder, setup } = self;
        let tasks = TaskTracker::new();
        let admin_stop = CancellationToken::new();
        let readiness = Readiness::default();
        let mut admin_addr = None;
        let mut admin_task = None;
        if let Some(addr) = config.admin_addr {
            let metrics = if config.install_metrics { install_metrics() } else { None };
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the admin address {addr}"))?;
            let local = listener.local_addr()?;
            tracing::info!(addr = %local, "admin HTTP listening");
            admin_addr = Some(local);
            admin_task = Some(tasks.spawn(admin::serve(listener, readiness.clone(), metrics, admin_stop.clone())));
        }
        // From here on a failed start must still stop the admin server it started.
        let started = async {
            let pool = warden_runtime::store::connect(&config.database_url, &config.store)
                .await
                .context("connecting to the database")?;
            for step in setup {
                step(pool.clone()).await?;
            }
            let client_pool = warden_runtime::store::connect(
                &config.database_url,
                &StoreConfig { max_connections: config.enqueue_max_connections, ..config.store.clone() },
            )
            .await
            .context("opening the enqueue pool")?;
            builder = builder.client_pool(client_pool);
            if let Some(cluster) = &config.cluster {
                let membership =
                    GossipMembership::start(cluster.gossip.clone(), &warden_cluster::membership::UdpTransport)
                        .await
                        .map_err(|e| anyhow::anyhow!("starting gossip on {}: {e}", cluster.gossip.listen_addr))?;
                builder = builder.cluster(membership, cluster.options.clone());
            }
            let node = builder.start(pool).await.context("starting the node")?;
            anyhow::Ok(node)
        };
        let node = match started.await {
            Ok(node) => node,
            Err(e) => {
                stop_started(&tasks, &admin_stop).await;
                return Err(e);
            }
        };
        readiness.set(node.clone());
        let grpc_stop = CancellationToken::new();
        let mut grpc_addr = None;
        let mut grpc_task = None;
        if let Some(api) = &config.api {
            let listener = match tokio::net::TcpListener::bind(api.listen).await {
                Ok(l) => l,
                Err(e) => {
                    let _ = node.shutdown().await;
                    stop_started(&tasks, &admin_stop).await;
                    return Err(e).with_context(|| format!("binding the gRPC address {}", api.listen));
                }
            };
            let local = listener.local_addr()?;
            tracing::info!(addr = %local, auth = api.token.is_some(), tls = api.tls.is_some(), "gRPC API listening");
            grpc_addr = Some(local);
            let service = Api::with_limits(node.clone(), api.limits.clone());
            let (auth, tls, stop) = (Auth::new(api.token.clone()), api.tls.clone(), grpc_stop.clone());
            grpc_task = Some(tasks.spawn(async move {
                if let Err(e) = crate::api::serve_api(listener, service, auth, tls, stop).await {
                    tracing::error!(error = %e, "gRPC server failed");
                }
            }));
        }
        tasks.close();
        tracing::info!(node = %node.owner(), "node started");
        Ok(RunningHost { node, admin_addr, grpc_addr, tasks, grpc_stop, admin_stop, grpc_task, admin_task })
    }
}

/// A started host.
pub struct RunningHost {
    node: Node,
    admin_addr: Option<SocketAddr>,
    grpc_addr: Option<SocketAddr>,
    tasks: TaskTracker,
    grpc_stop: CancellationToken,
    admin_stop: CancellationToken,
    grpc_task: Option<tokio::task::JoinHandle<()>>,
    admin_task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl RunningHost {
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// The admin server's bound address (useful with port 0).
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The gRPC server's bound address (useful with port 0).
    pub fn grpc_addr(&self) -> Option<SocketAddr> {
        self.grpc_addr
    }

    /// Run until `signal` resolves (or the node stops itself), then stop in order.
    pub async fn run_until(self, signal: impl Future<Output = ()>) -> anyhow::Result<()> {
        let node = self.node.clone();
        tokio::select! {
            _ = signal => {}
            _ = node.stopped() => {}
        }
        self.shutdown().await
    }

    /// Ordered stop: the node publishes `leaving`, drains and releases its partitions
    /// (within its shutdown budget); then the gRPC server stops, then the admin server;
    /// every task is awaited.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        let node_result = self.node.shutdown().await;
        self.grpc_stop.cancel();
        if let Some(task) = self.grpc_task.take() {
            stop_within(task, GRPC_STOP_BUDGET, "gRPC server").await;
        }
        self.admin_stop.cancel();
        if let Some(task) = self.admin_task.take() {
            stop_within(task, ADMIN_STOP_BUDGET, "admin server").await;
        }
        self.tasks.wait().await;
        node_result.context("stopping the node")?;
        tracing::info!("node stopped cleanly");
        Ok(())
    }
}

/// A failed start stops what it had started (the admin server) and awaits it.
async fn stop_started(tasks: &TaskTracker, admin_stop: &CancellationToken) {
    admin_stop.cancel();
    tasks.close();
    tasks.wait().await;
}

async fn stop_within<T>(mut task: tokio::task::JoinHandle<T>, budget: Duration, what: &str) {
    if tokio::time::timeout(budget, &mut task).await.is_err() {
        tracing::warn!(?budget, "{what} did not stop in time; aborting it");
        task.abort();
        let _ = task.await;
    }
}

/// Install the Prometheus recorder, or say why not.
fn install_metrics() -> Option<metrics_exporter_prometheus::PrometheusHandle> {
    match metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder() {
        Ok(handle) => Some(handle),
        Err(e) => {
            tracing::warn!(error = %e, "not installing the Prometheus recorder; /metrics will be empty");
            None
        }
    }
}

/// Log to stderr, filtered by `RUST_LOG` (default `info`, sqlx quiet).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn,sqlx::pool=error")),
        )
        .with_writer(std::io::stderr)
        .try_init();
}
