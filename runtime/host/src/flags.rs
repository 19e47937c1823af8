//! [`HostFlags`]: the node's command-line flags, each also an environment variable,
//! for `#[command(flatten)]` into your own `clap` parser; [`HostFlags::config`]
//! validates them into a [`HostConfig`] (reading token, secret and TLS files) with
//! errors that name the flag.

use crate::host::{ApiConfig, ClusterConfig, HostConfig};
use anyhow::{bail, Context};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use warden_cluster::{GossipConfig, RingConfig};
use warden_runtime::account_actor::ExecConfig;
use warden_runtime::lease::LeaseConfig;
use warden_runtime::node::ClusterOptions;
use warden_runtime::retention::RetentionConfig;

/// The default execution slots per node (`--max-concurrent-attempts`): twice the
/// default executor pool (16), since handlers hold a connection only while they use
/// their transaction.
pub const DEFAULT_EXECUTION_SLOTS: usize = 32;
use warden_runtime::store::StoreConfig;
use warden_runtime::{NodeConfig, PartitionCount};

/// Longest `--heartbeat-write-interval-ms`: past a minute, `GetJob` would show a live
/// job's heartbeat a minute stale and a heartbeating job would learn of a cancel late.
pub const MAX_HEARTBEAT_WRITE_INTERVAL_MS: u64 = 60_000;

/// Shortest gossip secret accepted (see `GossipConfig::with_secret`).
pub const MIN_GOSSIP_SECRET_CHARS: usize = 16;

/// Every flag of a production node. Defaults are the library's defaults.
/// `Debug` shows the database URL's host only and never the API token.
#[derive(Clone, clap::Args)]
pub struct HostFlags {
    /// Stable node id (e.g. the pod name).
    #[arg(long, env = "WARDEN_NODE_ID", default_value = "node-1")]
    pub node_id: String,
    /// PostgreSQL URL.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// How long to wait for the database at start (seconds), retrying with backoff
    /// and logging each try, before giving up.
    #[arg(long, env = "WARDEN_DATABASE_WAIT_SECS", default_value_t = 300)]
    pub database_wait_secs: u64,
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
    /// Least time between two database writes of one running job's heartbeats
    /// (`JobContext::heartbeat`), in milliseconds: calls in between only count
    /// locally (liveness for the heartbeat timeout, the latest progress, which the
    /// next write carries). It bounds how stale `warden jobs get` shows a heartbeat
    /// and how soon a heartbeating job sees a cancel. 0: every call writes.
    /// Checkpoints are always written at once. At most 60000.
    #[arg(long, env = "WARDEN_HEARTBEAT_WRITE_INTERVAL_MS", default_value_t = 1000)]
    pub heartbeat_write_interval_ms: u64,
    /// Enforcer interval in milliseconds.
    #[arg(long, env = "WARDEN_ENFORCER_INTERVAL_MS", default_value_t = 1000)]
    pub enforcer_interval_ms: u64,
    /// Account actor idle timeout in milliseconds.
    #[arg(long, env = "WARDEN_IDLE_TIMEOUT_MS", default_value_t = 30_000)]
    pub idle_timeout_ms: u64,
    /// Execution slots: handlers running at once on this node, over all accounts.
    /// Jobs past it wait for a slot, claimed. `warden_saturation` is busy slots /
    /// this, the autoscaling signal; size it to what one node's resources (CPU, the
    /// executor pool, upstream sessions) can run at once.
    #[arg(long, env = "WARDEN_MAX_CONCURRENT_ATTEMPTS", default_value_t = DEFAULT_EXECUTION_SLOTS)]
    pub max_concurrent_attempts: usize,
    /// Max database connections of the executor pool.
    #[arg(long, env = "WARDEN_MAX_CONNECTIONS", default_value_t = 16)]
    pub max_connections: u32,
    /// Connections of the pool that enqueues (the node's `Client`), kept apart from
    /// the executor's so producers and execution do not starve each other.
    #[arg(long, env = "WARDEN_ENQUEUE_MAX_CONNECTIONS", default_value_t = 4)]
    pub enqueue_max_connections: u32,
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
    pub gossip_secret_file: Option<PathBuf>,
    /// Deploy version label published in gossip (opaque, not ordered; in Kubernetes the
    /// pod's `pod-template-hash` label). Empty: unversioned.
    #[arg(long, env = "WARDEN_NODE_VERSION", default_value = "")]
    pub node_version: String,
    /// Rebalance only after the member set was stable this long (ms).
    #[arg(long, env = "WARDEN_SETTLE_DELAY_MS", default_value_t = 500)]
    pub settle_delay_ms: u64,
    /// Placement algorithm this node publishes: `sticky` (2, the default: partitions
    /// stay with their lease holder unless a join, leave or the load cap moves them;
    /// at most two moves per partition in a rolling replace) or `ring` (1, the plain
    /// consistent-hash ring of the member set). The cluster computes the oldest any
    /// member publishes, so one `ring` member makes every node compute the ring.
    #[arg(long, env = "WARDEN_PLACEMENT", default_value = "sticky", value_parser = ["sticky", "ring"])]
    pub placement: String,
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
    pub api_token_file: Option<PathBuf>,
    /// Serve gRPC over TLS with this PEM certificate chain (needs --tls-key).
    #[arg(long, env = "WARDEN_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "WARDEN_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
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

impl std::fmt::Debug for HostFlags {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostFlags")
            .field("node_id", &self.node_id)
            .field("database_url", &crate::host::redacted_url(&self.database_url))
            .field("database_wait_secs", &self.database_wait_secs)
            .field("partitions", &self.partitions)
            .field("lease_ttl_ms", &self.lease_ttl_ms)
            .field("lease_renew_ms", &self.lease_renew_ms)
            .field("lease_margin_ms", &self.lease_margin_ms)
            .field("drain_timeout_ms", &self.drain_timeout_ms)
            .field("heartbeat_write_interval_ms", &self.heartbeat_write_interval_ms)
            .field("enforcer_interval_ms", &self.enforcer_interval_ms)
            .field("idle_timeout_ms", &self.idle_timeout_ms)
            .field("max_connections", &self.max_connections)
            .field("enqueue_max_connections", &self.enqueue_max_connections)
            .field("admin_addr", &self.admin_addr)
            .field("gossip_listen", &self.gossip_listen)
            .field("gossip_advertise", &self.gossip_advertise)
            .field("seeds", &self.seeds)
            .field("gossip_interval_ms", &self.gossip_interval_ms)
            .field("cluster_id", &self.cluster_id)
            .field("gossip_secret_file", &self.gossip_secret_file)
            .field("node_version", &self.node_version)
            .field("settle_delay_ms", &self.settle_delay_ms)
            .field("placement", &self.placement)
            .field("grpc_addr", &self.grpc_addr)
            .field("grpc_listen", &self.grpc_listen)
            .field("api_token", &self.api_token.as_ref().map(|_| "<redacted>"))
            .field("api_token_file", &self.api_token_file)
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .field("api_max_connections", &self.api_max_connections)
            .field("api_max_in_flight", &self.api_max_in_flight)
            .field("api_max_calls_per_second", &self.api_max_calls_per_second)
            .field("api_max_watch_streams", &self.api_max_watch_streams)
            .field("api_statement_timeout_ms", &self.api_statement_timeout_ms)
            .field("retention_hours", &self.retention_hours)
            .field("retention_batch", &self.retention_batch)
            .field("retention_interval_ms", &self.retention_interval_ms)
            .finish()
    }
}

impl HostFlags {
    /// The node's configuration from these flags, validated.
    pub fn node_config(&self) -> anyhow::Result<NodeConfig> {
        let ttl = Duration::from_millis(self.lease_ttl_ms);
        if self.heartbeat_write_interval_ms > MAX_HEARTBEAT_WRITE_INTERVAL_MS {
            bail!(
                "--heartbeat-write-interval-ms must be at most {MAX_HEARTBEAT_WRITE_INTERVAL_MS} (0: every heartbeat writes), got {}",
                self.heartbeat_write_interval_ms
            );
        }
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
                max_concurrent_attempts: Some(self.max_concurrent_attempts),
                heartbeat_write_interval: Duration::from_millis(self.heartbeat_write_interval_ms),
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
        config.validate().context("invalid node configuration (--lease-*, --drain-timeout-ms, --retention-*, …)")?;
        Ok(config)
    }

    /// The whole host configuration: node, pools, gossip, admin and API, with every
    /// referenced file read and checked now (before the database is contacted).
    pub fn config(&self) -> anyhow::Result<HostConfig> {
        let node = self.node_config()?;
        if self.max_connections < 2 {
            bail!("--max-connections must be at least 2 (an attempt's transaction and its finish)");
        }
        if self.enqueue_max_connections == 0 {
            bail!("--enqueue-max-connections must be at least 1");
        }
        let store = StoreConfig {
            max_connections: self.max_connections,
            connect_retry: Duration::from_secs(self.database_wait_secs),
            ..Default::default()
        };
        let cluster = match self.gossip_listen {
            None => None,
            Some(listen) => {
                let mut g = GossipConfig::new(self.node_id.clone(), listen);
                g.advertise_addr = self.gossip_advertise;
                g.seeds = self.seeds.clone();
                g.gossip_interval = Duration::from_millis(self.gossip_interval_ms);
                g.cluster_id = self.cluster_id.clone();
                if let Some(path) = &self.gossip_secret_file {
                    g = g.with_secret(&read_secret(path)?);
                }
                g.grpc_addr = self.grpc_addr.clone().or_else(|| self.grpc_listen.map(|a| a.to_string()));
                Some(ClusterConfig {
                    gossip: g,
                    options: ClusterOptions {
                        settle_delay: Duration::from_millis(self.settle_delay_ms),
                        node_version: self.node_version.clone(),
                        ring: RingConfig {
                            algorithm: if self.placement == "ring" { 1 } else { RingConfig::default().algorithm },
                            ..RingConfig::default()
                        },
                        ..Default::default()
                    },
                })
            }
        };
        let api = match self.grpc_listen {
            None => None,
            Some(listen) => {
                let token = match &self.api_token_file {
                    Some(path) => Some(
                        std::fs::read_to_string(path)
                            .with_context(|| format!("reading --api-token-file {}", path.display()))?
                            .lines()
                            .next()
                            .unwrap_or_default()
                            .trim()
                            .to_string(),
                    ),
                    None => self.api_token.clone(),
                };
                if token.as_deref() == Some("") {
                    bail!("the API token (--api-token or --api-token-file) is empty");
                }
                let tls = match (&self.tls_cert, &self.tls_key) {
                    (Some(cert), Some(key)) => Some(crate::api::Tls {
                        cert_pem: std::fs::read(cert)
                            .with_context(|| format!("reading --tls-cert {}", cert.display()))?,
                        key_pem: std::fs::read(key).with_context(|| format!("reading --tls-key {}", key.display()))?,
                    }),
                    _ => None,
                };
                let limits = crate::api::ApiLimits {
                    max_connections: self.api_max_connections,
                    max_in_flight: self.api_max_in_flight,
                    max_calls_per_second: self.api_max_calls_per_second,
                    max_watch_streams: self.api_max_watch_streams,
                    statement_timeout: Duration::from_millis(self.api_statement_timeout_ms),
                    ..Default::default()
                };
                limits.validate().map_err(|e| anyhow::anyhow!("API limits (--api-*): {e}"))?;
                Some(ApiConfig { listen, token, tls, limits })
            }
        };
        if self.grpc_listen.is_none()
            && (self.api_token.is_some() || self.api_token_file.is_some() || self.tls_cert.is_some())
        {
            bail!("--api-token/--api-token-file/--tls-cert need --grpc-listen (the gRPC API is off without it)");
        }
        Ok(HostConfig {
            node,
            database_url: self.database_url.clone(),
            store,
            enqueue_max_connections: self.enqueue_max_connections,
            cluster,
            admin_addr: self.admin_addr,
            api,
            install_metrics: true,
        })
    }
}

fn read_secret(path: &Path) -> anyhow::Result<String> {
    let secret =
        std::fs::read_to_string(path).with_context(|| format!("reading --gossip-secret-file {}", path.display()))?;
    let secret = secret.trim();
    if secret.chars().count() < MIN_GOSSIP_SECRET_CHARS {
        bail!("the gossip secret in {} must be at least {MIN_GOSSIP_SECRET_CHARS} characters", path.display());
    }
    Ok(secret.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        warden: HostFlags,
    }

    fn parse(args: &[&str]) -> anyhow::Result<HostConfig> {
        let mut all = vec!["node", "--database-url", "postgres://localhost/x"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all)?.warden.config()
    }

    #[test]
    fn defaults_are_a_single_node_without_api() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.node.node_id, "node-1");
        assert!(c.cluster.is_none() && c.api.is_none() && c.admin_addr.is_none());
        assert_eq!(c.store.max_connections, 16);
        assert_eq!(c.store.connect_retry, Duration::from_secs(300));
        // The flag defaults are the library's defaults.
        let d = HostConfig::new("node-1", "postgres://localhost/x");
        assert_eq!(d.node.lease.ttl, c.node.lease.ttl);
        assert_eq!(d.node.exec.drain_timeout, c.node.exec.drain_timeout);
        assert_eq!(d.node.exec.heartbeat_write_interval, c.node.exec.heartbeat_write_interval);
        assert_eq!(d.node.retention.period, c.node.retention.period);
        assert_eq!(d.enqueue_max_connections, c.enqueue_max_connections);
    }

    #[test]
    fn debug_output_hides_the_database_password_and_the_api_token() {
        let flags = Cli::try_parse_from([
            "node",
            "--database-url",
            "postgres://warden:hunter2-db@db.internal:5432/warden",
            "--grpc-listen",
            "127.0.0.1:0",
            "--api-token",
            "s3cret-api-token",
        ])
        .unwrap()
        .warden;
        let shown = format!("{flags:?}");
        assert!(!shown.contains("hunter2-db"), "database password in HostFlags' Debug: {shown}");
        assert!(!shown.contains("s3cret-api-token"), "API token in HostFlags' Debug: {shown}");
        assert!(shown.contains("db.internal"), "{shown}");
        let shown = format!("{:?}", flags.config().unwrap());
        assert!(!shown.contains("hunter2-db") && !shown.contains("s3cret-api-token"), "{shown}");
    }

    #[test]
    fn bad_values_name_their_flag() {
        let e = parse(&["--partitions", "0"]).unwrap_err().to_string();
        assert!(e.contains("--partitions"), "{e}");
        let e = parse(&["--api-token", "x"]).unwrap_err().to_string();
        assert!(e.contains("--grpc-listen"), "{e}");
        let e =
            parse(&["--grpc-listen", "127.0.0.1:0", "--api-token-file", "/nonexistent/token"]).unwrap_err().to_string();
        assert!(e.contains("--api-token-file"), "{e}");
        let e = parse(&["--gossip-listen", "127.0.0.1:0", "--gossip-secret-file", "/nonexistent/s"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--gossip-secret-file"), "{e}");
        let e = format!("{:#}", parse(&["--max-concurrent-attempts", "0"]).unwrap_err());
        assert!(e.contains("max_concurrent_attempts"), "{e}");
        let e = parse(&["--max-connections", "1"]).unwrap_err().to_string();
        assert!(e.contains("--max-connections"), "{e}");
        let e = parse(&["--heartbeat-write-interval-ms", "60001"]).unwrap_err().to_string();
        assert!(e.contains("--heartbeat-write-interval-ms"), "{e}");
        assert!(parse(&["--heartbeat-write-interval-ms", "-1"]).is_err(), "negative intervals do not parse");
        let every_call = parse(&["--heartbeat-write-interval-ms", "0"]).unwrap();
        assert_eq!(every_call.node.exec.heartbeat_write_interval, Duration::ZERO, "0: every heartbeat writes");
        let e = format!("{:#}", parse(&["--lease-ttl-ms", "10"]).unwrap_err());
        assert!(e.contains("invalid node configuration"), "{e}");
    }

    #[test]
    fn cluster_and_api_flags_are_wired() {
        let c = parse(&[
            "--gossip-listen",
            "127.0.0.1:7000",
            "--seeds",
            "a:1,b:2",
            "--grpc-listen",
            "127.0.0.1:7070",
            "--api-token",
            "t",
            "--settle-delay-ms",
            "900",
            "--node-version",
            "7d9f8c6b5",
        ])
        .unwrap();
        let cl = c.cluster.unwrap();
        assert_eq!(cl.gossip.seeds, vec!["a:1".to_string(), "b:2".to_string()]);
        assert_eq!(cl.gossip.grpc_addr.as_deref(), Some("127.0.0.1:7070"));
        assert_eq!(cl.options.settle_delay, Duration::from_millis(900));
        assert_eq!(cl.options.node_version, "7d9f8c6b5");
        let unversioned = parse(&["--gossip-listen", "127.0.0.1:7000"]).unwrap();
        assert_eq!(unversioned.cluster.unwrap().options.node_version, "", "default: unversioned");
        assert_eq!(c.api.unwrap().token.as_deref(), Some("t"));
    }
}
