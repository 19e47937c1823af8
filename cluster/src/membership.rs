//! Membership: who is in the cluster, in what state, as seen by this node.
//!
//! [`Membership`] is the seam. [`GossipMembership`] implements it with chitchat
//! (scuttlebutt gossip + phi-accrual failure detection) over any chitchat
//! transport: UDP in production, chitchat's in-memory `ChannelTransport` (which can
//! cut links) in tests.
//!
//! Each node publishes: `grpc_addr`, `state` (`joining | active | leaving`), `db`
//! (`ok | lost`: whether it can reach the database — a node whose leases self-fenced
//! says so at once, and is dropped from the ring without waiting for the settle
//! delay), `ring` (its ring algorithm and configuration, see
//! [`crate::ring::RingConfig::fingerprint`]), `schema` (its binary's schema version),
//! `version` and `started` (its deploy version label and start time, see
//! [`crate::rollout`]), and load figures (`load.*`). Its generation (start time in µs) is part of its
//! chitchat id, so a node restarted with the same id is a new generation; the view
//! keeps only the newest live generation per node id.
//!
//! chitchat has no graceful leave: a leaving node publishes `state=leaving` first,
//! so the others drop it from the ring before it goes.

use crate::error::{ConfigError, Error};
use async_trait::async_trait;
pub use chitchat::transport::{ChannelTransport, Transport, UdpTransport};
use chitchat::{spawn_chitchat, ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig, NodeState};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// A member's announced lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MemberState {
    /// Started, not yet placed on the ring.
    Joining,
    /// On the ring: owns partitions.
    Active,
    /// Draining before it exits; off the ring.
    Leaving,
}

impl MemberState {
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Joining => "joining",
            MemberState::Active => "active",
            MemberState::Leaving => "leaving",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "joining" => Some(MemberState::Joining),
            "active" => Some(MemberState::Active),
            "leaving" => Some(MemberState::Leaving),
            _ => None,
        }
    }
}

/// One live member as seen through gossip.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub node_id: String,
    pub generation: u64,
    pub gossip_addr: SocketAddr,
    pub grpc_addr: Option<String>,
    pub state: MemberState,
    /// Published load figures (`partitions`, `actors`, ...), as strings.
    pub load: BTreeMap<String, String>,
    /// `false` once the member announced it cannot reach the database (`db=lost`).
    /// Members that publish nothing (older binaries) count as reaching it.
    pub db_ok: bool,
    /// The member's ring fingerprint, if it publishes one.
    pub ring: Option<String>,
    /// The member's binary schema version, if it publishes one.
    pub schema: Option<i64>,
    /// The member's deploy version label (`--node-version`; `""`: unversioned), if it
    /// publishes one (binaries before this field do not). Opaque: not ordered.
    pub version: Option<String>,
    /// When the member's process started, µs since the Unix epoch, if it publishes it
    /// (with `version`). Unlike `generation` (which a caller may set to any counter),
    /// always a wall-clock start time, so it compares across nodes.
    pub started_us: Option<u64>,
}

impl Member {
    /// An active member (generation 1) that reaches the database and publishes
    /// nothing else: the base of views that tests and simulations build by hand
    /// (`Member { db_ok: false, ..Member::active("a", addr) }`).
    pub fn active(node_id: impl Into<String>, gossip_addr: SocketAddr) -> Self {
        Member {
            node_id: node_id.into(),
            generation: 1,
            gossip_addr,
            grpc_addr: None,
            state: MemberState::Active,
            load: Default::default(),
            db_ok: true,
            ring: None,
            schema: None,
            version: None,
            started_us: None,
        }
    }
}

/// The membership seam.
#[async_trait]
pub trait Membership: Send + Sync + 'static {
    /// This node's id.
    fn node_id(&self) -> &str;
    /// Live members (self included), newest generation per node id, sorted by id.
    fn view(&self) -> watch::Receiver<Vec<Member>>;
    /// Announce this node's state.
    async fn set_state(&self, state: MemberState);
    /// Publish load figures under `load.<key>`.
    async fn set_load(&self, figures: &[(&str, String)]);
    /// Announce whether this node can reach the database (see the module docs).
    async fn set_db_ok(&self, _ok: bool) {}
    /// Announce this node's ring fingerprint and binary schema version.
    async fn set_versions(&self, _ring: &str, _schema: i64) {}
    /// Announce this node's deploy version label and start time (µs since the Unix
    /// epoch); see [`crate::rollout`].
    async fn set_node_version(&self, _version: &str, _started_us: u64) {}
    /// Stop gossiping (peers then detect this node as dead). Idempotent.
    async fn shutdown(&self);
}

/// Gossip settings. Durations are tuned for fast failover on a LAN.
#[derive(Debug, Clone)]
pub struct GossipConfig {
    pub node_id: String,
    /// Distinguishes restarts of the same node id (default: start time in µs).
    pub generation: u64,
    pub listen_addr: SocketAddr,
    /// Address peers use to reach this node (defaults to `listen_addr`).
    pub advertise_addr: Option<SocketAddr>,
    /// `host:port` seeds: literal addresses or DNS names (re-resolved periodically by
    /// chitchat, so a Kubernetes headless service name finds every pod).
    pub seeds: Vec<String>,
    pub cluster_id: String,
    pub gossip_interval: Duration,
    /// Phi-accrual threshold above which a silent peer is considered dead.
    pub phi_threshold: f64,
    pub grpc_addr: Option<String>,
    /// Published as `ring` (see [`crate::ring::RingConfig::fingerprint`]).
    pub ring: Option<String>,
    /// Published as `schema`.
    pub schema: Option<i64>,
}

impl GossipConfig {
    pub fn new(node_id: impl Into<String>, listen_addr: SocketAddr) -> Self {
        Self {
            node_id: node_id.into(),
            generation: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_micros() as u64)
                .unwrap_or(0),
            listen_addr,
            advertise_addr: None,
            seeds: Vec::new(),
            cluster_id: "warden".into(),
            gossip_interval: Duration::from_millis(100),
            phi_threshold: 8.0,
            grpc_addr: None,
            ring: None,
            schema: None,
        }
    }

    /// Bind membership to a shared secret: only nodes configured with the same
    /// cluster id *and* secret gossip with each other (chitchat drops messages of
    /// another cluster id, and the id becomes `<cluster_id>#<digest of id + secret>`).
    /// This keeps other clusters and stray or misconfigured processes out; it is not
    /// cryptographic authentication (the digest travels in clear and can be replayed
    /// by someone on the network path). Ownership does not rest on gossip's word: a
    /// member counts only once it proves in the database that it can hold leases.
    pub fn with_secret(mut self, secret: &str) -> Self {
        use md5::{Digest, Md5};
        let mut h = Md5::new();
        h.update(self.cluster_id.as_bytes());
        h.update([0u8]);
        h.update(secret.as_bytes());
        let digest: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        self.cluster_id = format!("{}#{}", self.cluster_id, digest);
        self
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.node_id.is_empty() || self.node_id.len() > 128 || self.node_id.chars().any(|c| c.is_control()) {
            return Err(ConfigError::NodeId);
        }
        if !(MIN_GOSSIP_INTERVAL..=MAX_GOSSIP_INTERVAL).contains(&self.gossip_interval) {
            return Err(ConfigError::GossipInterval(self.gossip_interval));
        }
        if !(1.0..=100.0).contains(&self.phi_threshold) {
            return Err(ConfigError::PhiThreshold(self.phi_threshold));
        }
        if let Some(s) = self.seeds.iter().find(|s| !s.contains(':')) {
            return Err(ConfigError::Seed(s.clone()));
        }
        Ok(())
    }
}

/// chitchat-backed membership.
pub struct GossipMembership {
    node_id: String,
    handle: tokio::sync::Mutex<Option<ChitchatHandle>>,
    chitchat: Arc<tokio::sync::Mutex<chitchat::Chitchat>>,
    view: watch::Receiver<Vec<Member>>,
    stop: CancellationToken,
}

/// Accepted gossip intervals.
pub const MIN_GOSSIP_INTERVAL: Duration = Duration::from_millis(10);
pub const MAX_GOSSIP_INTERVAL: Duration = Duration::from_secs(10);

/// How long chitchat remembers a dead node (and its deleted keys) before forgetting
/// it: long enough that a node seen dead is never mistaken for a new one.
const FORGET_DEAD_AFTER: Duration = Duration::from_secs(3600);

const KEY_STATE: &str = "state";
const KEY_GRPC: &str = "grpc_addr";
const KEY_DB: &str = "db";
const KEY_RING: &str = "ring";
const KEY_SCHEMA: &str = "schema";
const KEY_VERSION: &str = "version";
const KEY_STARTED: &str = "started";
const LOAD_PREFIX: &str = "load.";

impl GossipMembership {
    /// Start gossiping on `transport` (e.g. `&chitchat::transport::UdpTransport`).
    pub async fn start(config: GossipConfig, transport: &dyn Transport) -> Result<Arc<Self>, Error> {
        config.validate()?;
        let advertise = config.advertise_addr.unwrap_or(config.listen_addr);
        let id = ChitchatId::new(config.node_id.clone(), config.generation, advertise);
        let chitchat_config = ChitchatConfig {
            chitchat_id: id,
            cluster_id: config.cluster_id.clone(),
            gossip_interval: config.gossip_interval,
            listen_addr: config.listen_addr,
            seed_nodes: config.seeds.clone(),
            failure_detector_config: FailureDetectorConfig {
                phi_threshold: config.phi_threshold,
                initial_interval: config.gossip_interval,
                max_interval: config.gossip_interval * 20,
                dead_node_grace_period: FORGET_DEAD_AFTER,
                ..Default::default()
            },
            marked_for_deletion_grace_period: FORGET_DEAD_AFTER,
            catchup_callback: None,
            extra_liveness_predicate: None,
            protocol_version: chitchat::ProtocolVersion::V0,
        };
        let mut initial = vec![(KEY_STATE.to_string(), MemberState::Joining.as_str().to_string())];
        if let Some(g) = &config.grpc_addr {
            initial.push((KEY_GRPC.to_string(), g.clone()));
        }
        initial.push((KEY_DB.to_string(), "ok".to_string()));
        if let Some(r) = &config.ring {
            initial.push((KEY_RING.to_string(), r.clone()));
        }
        if let Some(v) = config.schema {
            initial.push((KEY_SCHEMA.to_string(), v.to_string()));
        }
        let handle = spawn_chitchat(chitchat_config, initial, transport)
            .await
            .map_err(|e| Error::Start { addr: config.listen_addr, reason: e.to_string() })?;
        let chitchat = handle.chitchat();
        let mut raw = chitchat.lock().await.live_nodes_watcher();
        let (tx, view) = watch::channel(to_members(&raw.borrow_and_update()));
        let stop = CancellationToken::new();
        let stop2 = stop.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop2.cancelled() => return,
                    changed = raw.changed() => if changed.is_err() { return },
                }
                let members = to_members(&raw.borrow_and_update());
                tx.send_if_modified(|old| {
                    if *old != members {
                        *old = members;
                        true
                    } else {
                        false
                    }
                });
            }
        });
        Ok(Arc::new(Self {
            node_id: config.node_id,
            handle: tokio::sync::Mutex::new(Some(handle)),
            chitchat,
            view,
            stop,
        }))
    }
}

/// Newest live generation per node id, with parsed keys; entries without a valid
/// state are skipped (a peer that has not published yet).
fn to_members(nodes: &BTreeMap<ChitchatId, NodeState>) -> Vec<Member> {
    let mut by_id: BTreeMap<String, Member> = BTreeMap::new();
    for (id, state) in nodes {
        let Some(st) = state.get(KEY_STATE).and_then(MemberState::parse) else { continue };
        let m = Member {
            node_id: id.node_id.to_string(),
            generation: id.generation_id,
            gossip_addr: id.gossip_advertise_addr,
            grpc_addr: state.get(KEY_GRPC).map(str::to_string),
            state: st,
            load: state
                .key_values()
                .filter_map(|(k, v)| k.strip_prefix(LOAD_PREFIX).map(|k| (k.to_string(), v.to_string())))
                .collect(),
            db_ok: state.get(KEY_DB) != Some("lost"),
            ring: state.get(KEY_RING).map(str::to_string),
            schema: state.get(KEY_SCHEMA).and_then(|v| v.parse().ok()),
            version: state.get(KEY_VERSION).map(str::to_string),
            started_us: state.get(KEY_STARTED).and_then(|v| v.parse().ok()),
        };
        match by_id.get(&m.node_id) {
            Some(existing) if existing.generation >= m.generation => {}
            _ => {
                by_id.insert(m.node_id.clone(), m);
            }
        }
    }
    by_id.into_values().collect()
}

#[async_trait]
impl Membership for GossipMembership {
    fn node_id(&self) -> &str {
        &self.node_id
    }

    fn view(&self) -> watch::Receiver<Vec<Member>> {
        self.view.clone()
    }

    async fn set_state(&self, state: MemberState) {
        self.chitchat.lock().await.self_node_state().set(KEY_STATE, state.as_str());
    }

    async fn set_load(&self, figures: &[(&str, String)]) {
        let mut c = self.chitchat.lock().await;
        let me = c.self_node_state();
        for (k, v) in figures {
            if me.get(&format!("{LOAD_PREFIX}{k}")) != Some(v.as_str()) {
                me.set(format!("{LOAD_PREFIX}{k}"), v);
            }
        }
    }

    async fn set_versions(&self, ring: &str, schema: i64) {
        let mut c = self.chitchat.lock().await;
        c.self_node_state().set(KEY_RING, ring);
        c.self_node_state().set(KEY_SCHEMA, schema.to_string());
    }

    async fn set_node_version(&self, version: &str, started_us: u64) {
        let mut c = self.chitchat.lock().await;
        // `started` first: a peer that sees `version` then also has the start time
        // (chitchat sends a node's keys in the order they were set).
        c.self_node_state().set(KEY_STARTED, started_us.to_string());
        c.self_node_state().set(KEY_VERSION, version);
    }

    async fn set_db_ok(&self, ok: bool) {
        let mut c = self.chitchat.lock().await;
        let v = if ok { "ok" } else { "lost" };
        if c.self_node_state().get(KEY_DB) != Some(v) {
            c.self_node_state().set(KEY_DB, v);
        }
    }

    async fn shutdown(&self) {
        self.stop.cancel();
        if let Some(h) = self.handle.lock().await.take() {
            let _ = h.shutdown().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        ([127, 0, 0, 1], port).into()
    }

    async fn node(t: &ChannelTransport, id: &str, port: u16, seeds: &[u16], generation: u64) -> Arc<GossipMembership> {
        let mut c = GossipConfig::new(id, addr(port));
        c.generation = generation;
        c.seeds = seeds.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        c.gossip_interval = Duration::from_millis(20);
        GossipMembership::start(c, t).await.unwrap()
    }

    async fn wait_for(m: &GossipMembership, what: &str, f: impl Fn(&[Member]) -> bool) {
        let mut view = m.view();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if f(&view.borrow_and_update()) {
                return;
            }
            tokio::select! {
                _ = view.changed() => {}
                _ = tokio::time::sleep_until(deadline) => panic!("timed out waiting for {what}: {:?}", *view.borrow()),
            }
        }
    }

    #[tokio::test]
    async fn members_see_each_other_states_and_loads() {
        let t = ChannelTransport::with_mtu(65_000);
        let a = node(&t, "a", 1001, &[], 1).await;
        let b = node(&t, "b", 1002, &[1001], 1).await;
        let c = node(&t, "c", 1003, &[1001], 1).await;
        for m in [&a, &b, &c] {
            wait_for(m, "3 members", |v| v.len() == 3).await;
        }
        b.set_state(MemberState::Active).await;
        b.set_load(&[("partitions", "7".into())]).await;
        b.set_node_version("7d9f8c6b5", 1_700_000_000_000_000).await;
        wait_for(&c, "b's version", |v| {
            v.iter().any(|m| {
                m.node_id == "b"
                    && m.version.as_deref() == Some("7d9f8c6b5")
                    && m.started_us == Some(1_700_000_000_000_000)
            })
        })
        .await;
        assert!(c.view().borrow().iter().filter(|m| m.node_id != "b").all(|m| m.version.is_none()));
        wait_for(&a, "b active with load", |v| {
            v.iter().any(|m| {
                m.node_id == "b"
                    && m.state == MemberState::Active
                    && m.load.get("partitions").map(String::as_str) == Some("7")
            })
        })
        .await;
        a.shutdown().await;
        b.shutdown().await;
        c.shutdown().await;
    }

    #[tokio::test]
    async fn a_silent_member_is_dropped_and_a_restart_is_a_new_generation() {
        let t = ChannelTransport::with_mtu(65_000);
        let a = node(&t, "a", 2001, &[], 1).await;
        let b = node(&t, "b", 2002, &[2001], 1).await;
        wait_for(&a, "2 members", |v| v.len() == 2).await;
        b.shutdown().await; // a crash, as far as peers can tell
        wait_for(&a, "b detected dead", |v| v.len() == 1).await;
        let b2 = node(&t, "b", 2003, &[2001], 2).await;
        wait_for(&a, "b's new generation", |v| v.iter().any(|m| m.node_id == "b" && m.generation == 2)).await;
        a.shutdown().await;
        b2.shutdown().await;
    }
}
