//! The `warden-node` binary: a Warden node with the demo (billing) and workload
//! (audit) handlers, configured by flags or environment variables, serving
//! `/metrics`, `/healthz` and `/readyz` on its admin address. Logs one line per
//! ownership change (target `warden_runtime`, "ownership: …").

use anyhow::Context;
use clap::Parser;
use std::net::SocketAddr;
use std::time::Duration;
use warden_runtime::account_actor::ExecConfig;
use warden_runtime::lease::LeaseConfig;
use warden_runtime::retention::RetentionConfig;
use warden_runtime::{Node, NodeConfig, PartitionCount};

#[derive(Debug, Clone, Parser)]
#[command(name = "warden-node", about = "Run a Warden node with the demo handlers", version)]
pub struct NodeArgs {
    /// Stable node id (e.g. the pod name).
    #[arg(long, env = "WARDEN_NODE_ID", default_value = "node-1")]
    pub node_id: String,
    /// PostgreSQL URL.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,
    /// Partition count P (fixed when the database is first used).
    #[arg(long, env = "WARDEN_PARTITIONS", default_value_t = 1024)]
    pub partitions: u32,
    /// Lease TTL in milliseconds.
    #[arg(long, env = "WARDEN_LEASE_TTL_MS", default_value_t = 4000)]
    pub lease_ttl_ms: u64,
    /// Lease renewal interval in milliseconds (default: TTL/4).
    #[arg(long, env = "WARDEN_LEASE_RENEW_MS")]
    pub lease_renew_ms: Option<u64>,
    /// Self-fence margin in milliseconds (default: TTL/4).
    #[arg(long, env = "WARDEN_LEASE_MARGIN_MS")]
    pub lease_margin_ms: Option<u64>,
    /// Drain timeout for running attempts on handoff/shutdown, in milliseconds.
    #[arg(long, env = "WARDEN_DRAIN_TIMEOUT_MS", default_value_t = 10_000)]
    pub drain_timeout_ms: u64,
    /// Enforcer interval in milliseconds.
    #[arg(long, env = "WARDEN_ENFORCER_INTERVAL_MS", default_value_t = 1000)]
    pub enforcer_interval_ms: u64,
    /// Account actor idle timeout in milliseconds.
    #[arg(long, env = "WARDEN_IDLE_TIMEOUT_MS", default_value_t = 30_000)]
    pub idle_timeout_ms: u64,
    /// Max database connections of the executor pool.
    #[arg(long, env = "WARDEN_MAX_CONNECTIONS", default_value_t = 16)]
    pub max_connections: u32,
    /// Admin HTTP address for /metrics, /healthz, /readyz (port 0 picks a free one).
    #[arg(long, env = "WARDEN_ADMIN_ADDR")]
    pub admin_addr: Option<SocketAddr>,
    /// Gossip (UDP) listen address. Setting it runs the node as a cluster member;
    /// without it the node owns every partition alone.
    #[arg(long, env = "WARDEN_GOSSIP_LISTEN")]
    pub gossip_listen: Option<SocketAddr>,
    /// Gossip address peers should use (default: the listen address).
    #[arg(long, env = "WARDEN_GOSSIP_ADVERTISE")]
    pub gossip_advertise: Option<SocketAddr>,
    /// Seeds, comma-separated `host:port`: addresses and/or DNS names (a Kubernetes
    /// headless service name resolves to every pod; names are re-resolved periodically).
    #[arg(long, env = "WARDEN_SEEDS", value_delimiter = ',')]
    pub seeds: Vec<String>,
    /// Gossip interval in milliseconds.
    #[arg(long, env = "WARDEN_GOSSIP_INTERVAL_MS", default_value_t = 100)]
    pub gossip_interval_ms: u64,
    /// Cluster id: nodes gossip only with nodes of the same id.
    #[arg(long, env = "WARDEN_CLUSTER_ID", default_value = "warden")]
    pub cluster_id: String,
    /// File holding a gossip secret: only nodes with the same cluster id and secret
    /// gossip together (see `GossipConfig::with_secret`; not cryptographic auth).
    #[arg(long, env = "WARDEN_GOSSIP_SECRET_FILE")]
    pub gossip_secret_file: Option<std::path::PathBuf>,
    /// Rebalance only after the member set was stable this long (ms).
    #[arg(long, env = "WARDEN_SETTLE_DELAY_MS", default_value_t = 500)]
    pub settle_delay_ms: u64,
    /// gRPC address announced to peers and clients (default: the gRPC listen address).
    #[arg(long, env = "WARDEN_GRPC_ADDR")]
    pub grpc_addr: Option<String>,
    /// gRPC API listen address (cluster observation and job operations); off if unset.
    #[arg(long, env = "WARDEN_GRPC_LISTEN")]
    pub grpc_listen: Option<SocketAddr>,
    /// Require this bearer token on every gRPC call.
    #[arg(long, env = "WARDEN_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    /// Read the bearer token from this file (first line).
    #[arg(long, env = "WARDEN_API_TOKEN_FILE", conflicts_with = "api_token")]
    pub api_token_file: Option<std::path::PathBuf>,
    /// Serve gRPC over TLS with this PEM certificate chain (needs --tls-key).
    #[arg(long, env = "WARDEN_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "WARDEN_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// Connections of the gRPC API's own database pool (never the executor's).
    #[arg(long, env = "WARDEN_API_MAX_CONNECTIONS", default_value_t = 4)]
    pub api_max_connections: u32,
    /// gRPC calls in progress at once over all connections (RESOURCE_EXHAUSTED beyond).
    #[arg(long, env = "WARDEN_API_MAX_IN_FLIGHT", default_value_t = 64)]
    pub api_max_in_flight: usize,
    /// API calls admitted per second (RESOURCE_EXHAUSTED beyond); 0: unlimited.
    #[arg(long, env = "WARDEN_API_MAX_CALLS_PER_SECOND", default_value_t = 200)]
    pub api_max_calls_per_second: u32,
    /// Ownership streams open at once (RESOURCE_EXHAUSTED beyond).
    #[arg(long, env = "WARDEN_API_MAX_WATCH_STREAMS", default_value_t = 64)]
    pub api_max_watch_streams: usize,
    /// Statement timeout of the API's database connections, in milliseconds.
    #[arg(long, env = "WARDEN_API_STATEMENT_TIMEOUT_MS", default_value_t = 5000)]
    pub api_statement_timeout_ms: u64,
    /// Keep finished jobs (and their attempts) this many hours; 0 keeps them forever.
    #[arg(long, env = "WARDEN_RETENTION_HOURS", default_value_t = 168)]
    pub retention_hours: u64,
    /// Finished jobs the pruner deletes per batch (one short transaction).
    #[arg(long, env = "WARDEN_RETENTION_BATCH", default_value_t = 1000)]
    pub retention_batch: i64,
    /// How often the pruner runs, in milliseconds.
    #[arg(long, env = "WARDEN_RETENTION_INTERVAL_MS", default_value_t = 60_000)]
    pub retention_interval_ms: u64,
}

impl NodeArgs {
    /// The gRPC API's budgets from flags.
    pub fn api_limits(&self) -> warden_runtime::api::ApiLimits {
        warden_runtime::api::ApiLimits {
            max_connections: self.api_max_connections,
            max_in_flight: self.api_max_in_flight,
            max_calls_per_second: self.api_max_calls_per_second,
            max_watch_streams: self.api_max_watch_streams,
            statement_timeout: Duration::from_millis(self.api_statement_timeout_ms),
            ..Default::default()
        }
    }

    /// Turn flags into a validated node configuration.
    pub fn config(&self) -> anyhow::Result<NodeConfig> {
        let ttl = Duration::from_millis(self.lease_ttl_ms);
        let partitions = PartitionCount::new(self.partitions).map_err(|e| anyhow::anyhow!("--partitions: {e}"))?;
        let config = NodeConfig {
            node_id: self.node_id.clone(),
            partitions,
            lease: LeaseConfig {
                ttl,
                renew_interval: Duration::from_millis(self.lease_renew_ms.unwrap_or(self.lease_ttl_ms / 4)),
                safety_margin: Duration::from_millis(self.lease_margin_ms.unwrap_or(self.lease_ttl_ms / 4)),
            },
            exec: ExecConfig {
                idle_timeout: Duration::from_millis(self.idle_timeout_ms),
                drain_timeout: Duration::from_millis(self.drain_timeout_ms),
                ..Default::default()
            },
            enforcer_interval: Duration::from_millis(self.enforcer_interval_ms),
            retention: RetentionConfig {
                period: (self.retention_hours > 0).then(|| Duration::from_secs(self.retention_hours * 3600)),
                batch_size: self.retention_batch,
                interval: Duration::from_millis(self.retention_interval_ms),
                ..Default::default()
            },
            ..Default::default()
        };
        config.validate()?;
        Ok(config)
    }
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn,sqlx::pool=error")),
        )
        .with_writer(std::io::stderr)
        .try_init();
}

/// Build and start a node with the demo and workload handlers.
pub async fn start_node(args: &NodeArgs) -> anyhow::Result<Node> {
    let config = args.config()?;
    let store_config =
        warden_runtime::store::StoreConfig { max_connections: args.max_connections, ..Default::default() };
    let pool = warden_runtime::store::connect(&args.database_url, &store_config)
        .await
        .context("connecting to the database")?;
    crate::billing::migrate(&pool).await?;
    crate::workload::migrate(&pool).await?;
    let faults = crate::billing::Faults::default();
    let mut builder = Node::builder(config);
    if let Some(listen) = args.gossip_listen {
        let mut g = warden_cluster::GossipConfig::new(args.node_id.clone(), listen);
        g.advertise_addr = args.gossip_advertise;
        g.seeds = args.seeds.clone();
        g.gossip_interval = Duration::from_millis(args.gossip_interval_ms);
        g.cluster_id = args.cluster_id.clone();
        if let Some(path) = &args.gossip_secret_file {
            let secret = std::fs::read_to_string(path)
                .with_context(|| format!("reading the gossip secret file {}", path.display()))?;
            let secret = secret.trim();
            if secret.len() < 16 {
                anyhow::bail!("the gossip secret in {} must be at least 16 characters", path.display());
            }
            g = g.with_secret(secret);
        }
        g.grpc_addr = args.grpc_addr.clone().or_else(|| args.grpc_listen.map(|a| a.to_string()));
        let membership = warden_cluster::GossipMembership::start(g, &warden_cluster::membership::UdpTransport)
            .await
            .map_err(|e| anyhow::anyhow!("gossip: {e}"))?;
        builder = builder.cluster(
            membership,
            warden_runtime::node::ClusterOptions {
                settle_delay: Duration::from_millis(args.settle_delay_ms),
                ..Default::default()
            },
        );
    }
    let node = builder
        .register(crate::billing::Charge(faults))?
        .register(crate::billing::Invoice)?
        .register(crate::billing::Notify(faults))?
        // The audit handler's "external" effect log gets its own small pool, as an
        // external system would: it must not compete with the executor's connections.
        .register(crate::workload::Audit {
            node: args.node_id.clone(),
            pool: sqlx::postgres::PgPoolOptions::new().max_connections(4).connect(&args.database_url).await?,
        })?
        .start(pool)
        .await?;
    Ok(node)
}

/// Serve `/metrics`, `/healthz` and `/readyz` until `shutdown` fires.
pub async fn serve_admin(
    listener: tokio::net::TcpListener,
    node: Node,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    use axum::{http::StatusCode, routing::get, Router};
    let ready_node = node.clone();
    let app = Router::new()
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
                let ready = ready_node.is_ready();
                async move {
                    if ready {
                        (StatusCode::OK, "ready")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "not ready: no partitions held")
                    }
                }
            }),
        );
    axum::serve(listener, app).with_graceful_shutdown(async move { shutdown.cancelled().await }).await?;
    Ok(())
}

/// The whole `warden-node` main: start, serve admin, run until SIGTERM/SIGINT, drain, exit.
pub async fn run(args: NodeArgs) -> anyhow::Result<()> {
    init_tracing();
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| anyhow::anyhow!("installing the metrics recorder: {e}"))?;
    let node = start_node(&args).await?;
    let admin_stop = tokio_util::sync::CancellationToken::new();
    if let Some(addr) = args.admin_addr {
        let listener =
            tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding admin address {addr}"))?;
        tracing::info!(addr = %listener.local_addr()?, "admin HTTP listening");
        tokio::spawn(serve_admin(listener, node.clone(), Some(metrics), admin_stop.clone()));
    }
    if let Some(addr) = args.grpc_listen {
        let token = match &args.api_token_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading the API token file {}", path.display()))?
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_string(),
            ),
            None => args.api_token.clone(),
        };
        if token.as_deref() == Some("") {
            anyhow::bail!("the API token is empty");
        }
        let tls = match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => Some(warden_runtime::api::Tls {
                cert_pem: std::fs::read(cert).with_context(|| format!("reading --tls-cert {}", cert.display()))?,
                key_pem: std::fs::read(key).with_context(|| format!("reading --tls-key {}", key.display()))?,
            }),
            _ => None,
        };
        let listener =
            tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding gRPC address {addr}"))?;
        tracing::info!(addr = %listener.local_addr()?, auth = token.is_some(), tls = tls.is_some(), "gRPC API listening");
        let limits = args.api_limits();
        limits.validate().map_err(|e| anyhow::anyhow!("API limits: {e}"))?;
        let api = warden_runtime::api::Api::with_limits(node.clone(), limits);
        let stop = admin_stop.clone();
        tokio::spawn(async move {
            if let Err(e) =
                warden_runtime::api::serve_api(listener, api, warden_runtime::api::Auth::new(token), tls, stop).await
            {
                tracing::error!(error = %e, "gRPC server failed");
            }
        });
    }
    println!("READY {}", node.owner());
    node.run_until(warden_runtime::shutdown_signal()).await?;
    admin_stop.cancel();
    tracing::info!("node stopped cleanly");
    Ok(())
}
