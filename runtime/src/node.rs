//! The node: configuration, builder, and the tasks it runs.
//!
//! ```text
//!   Node::start
//!    ├─ migrate + fix P + create lease rows
//!    ├─ enforcer::run        (tick + run_once; acquires leases, wakes accounts)
//!    ├─ lease::keep_leases   (renew every ttl/3-ish, self-fence on missed deadline)
//!    ├─ wakeup::listen       (LISTEN/NOTIFY → account actors; rescan on reconnect)
//!    ├─ retention::run       (prune finished jobs past the retention period)
//!    └─ AccountActors        (see account_actor)
//! ```
//!
//! The caller owns shutdown: [`Node::shutdown`] drains every actor (bounded by
//! `drain_timeout`), releases every lease and stops the tasks. Calling it twice is safe.

use crate::account_actor::{AccountActors, ExecConfig, Shared};
use crate::client::Client;
use crate::enforcer::{self, EnforceReport, Enforcer};
use crate::error::{Error, Result};
use crate::handler::{Handler, Registry};
use crate::hooks::{AttemptInfo, AttemptOutcome, Hooks};
use crate::lease::{self, LeaseConfig, LeaseTable};
use crate::retention::{self, Pruner, RetentionConfig};
use crate::saturation::{self, Saturation};
use crate::store::{self, AdminStore, PgAdminStore, PgStore, SlotDemand, Store};
use sqlx::postgres::{PgPool, PgPoolOptions};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use warden_cluster::ring::RingConfig;
use warden_cluster::{MemberState, Membership, PartitionCount, Placement, RingPlacement, SingleNode};

/// Connections of the control plane's pool (lease renewal, enforcer, listener): the
/// listener keeps one for itself, the rest are shared (3 in all timed out after cuts
/// and restarts).
pub const CONTROL_POOL_CONNECTIONS: u32 = 5;

/// Shortest `enforcer_interval` accepted.
pub const MIN_ENFORCER_INTERVAL: Duration = Duration::from_millis(10);

/// What a graceful leave allows for the handoff's release and NOTIFY (see
/// [`Node::shutdown_budget`]).
pub const HANDOFF_RELEASE_BUDGET: Duration = Duration::from_secs(1);

/// The longest a joining node waits for its executor pool to open every connection.
pub const WARM_UP_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything a node is configured with. `Default` is a sane single-node setup.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Stable node id (e.g. the pod name). 1..=128 bytes, no control characters.
    pub node_id: String,
    /// Partition count P; must match the database once it is set.
    pub partitions: PartitionCount,
    pub lease: LeaseConfig,
    pub exec: ExecConfig,
    /// Enforcer period (jittered ±20%); also the worst-case delay of a lost wake-up.
    pub enforcer_interval: Duration,
    /// Max accounts the enforcer wakes per run.
    pub due_scan_limit: i64,
    /// Pruning of finished jobs (see [`crate::retention`]).
    pub retention: RetentionConfig,
    /// How often the scheduler looks for due schedules in the held partitions (see
    /// [`crate::scheduler`]); bounds a fire's lag.
    pub schedule_interval: Duration,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            node_id: "node-1".into(),
            partitions: PartitionCount::default(),
            lease: LeaseConfig::default(),
            exec: ExecConfig::default(),
            enforcer_interval: Duration::from_secs(1),
            due_scan_limit: enforcer::DUE_SCAN_LIMIT,
            retention: RetentionConfig::default(),
            schedule_interval: Duration::from_millis(250),
        }
    }
}

impl NodeConfig {
    pub fn validate(&self) -> Result<()> {
        crate::job::validate_name("node_id", &self.node_id, 128).map_err(|e| Error::Config(e.to_string()))?;
        if self.node_id.contains('/') {
            return Err(Error::Config("node_id must not contain '/'".into()));
        }
        self.lease.validate().map_err(Error::Config)?;
        self.retention.validate().map_err(Error::Config)?;
        if self.schedule_interval < MIN_ENFORCER_INTERVAL {
            return Err(Error::Config("schedule_interval must be at least 10ms".into()));
        }
        if self.enforcer_interval < MIN_ENFORCER_INTERVAL {
            return Err(Error::Config("enforcer_interval must be at least 10ms".into()));
        }
        if self.exec.max_actors == 0 || self.due_scan_limit <= 0 {
            return Err(Error::Config("max_actors and due_scan_limit must be positive".into()));
        }
        if self.exec.max_concurrent_attempts == Some(0) {
            return Err(Error::Config("max_concurrent_attempts must be positive (or unset)".into()));
        }
        if self.exec.idle_timeout.is_zero() || self.exec.cancel_poll_interval.is_zero() {
            return Err(Error::Config("idle_timeout and cancel_poll_interval must be positive".into()));
        }
        Ok(())
    }
}

/// Cluster settings: how membership turns into ownership.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Rebalance only after the active member set has been stable this long.
    pub settle_delay: Duration,
    pub ring: RingConfig,
    /// How often load figures are published in gossip.
    pub load_interval: Duration,
    /// This node's deploy version label, published in gossip (`version`, with the
    /// node's start time): opaque, e.g. Kubernetes' `pod-template-hash`; `""` is
    /// unversioned. See `warden_cluster::rollout`.
    pub node_version: String,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            settle_delay: Duration::from_millis(500),
            ring: RingConfig::default(),
            load_interval: Duration::from_secs(1),
            node_version: String::new(),
        }
    }
}

/// A cluster member's wiring: its membership and how it turns into ownership.
struct ClusterWiring {
    membership: Arc<dyn Membership>,
    options: ClusterOptions,
}

/// Builds a node: configuration, handlers, placement.
pub struct NodeBuilder {
    config: NodeConfig,
    registry: Registry,
    placement: Arc<dyn Placement>,
    cluster: Option<ClusterWiring>,
    store_layer: Option<StoreLayer>,
    client_pool: Option<PgPool>,
    hooks: Hooks,
    schedules: Vec<crate::scheduler::ScheduleDef>,
}

/// Connections of the node's enqueue pool ([`Node::client`]) when the builder is not
/// given one: producers get their own small pool, so a burst of enqueues cannot take
/// the executor's connections and a busy executor cannot starve producers.
pub const DEFAULT_CLIENT_MAX_CONNECTIONS: u32 = 4;

/// Wraps the executor's store (fault injection in tests).
pub type StoreLayer = Arc<dyn Fn(Arc<dyn Store>) -> Arc<dyn Store> + Send + Sync>;

impl NodeBuilder {
    pub fn new(config: NodeConfig) -> Self {
        Self {
            config,
            registry: Registry::new(),
            placement: Arc::new(SingleNode),
            cluster: None,
            store_layer: None,
            client_pool: None,
            hooks: Hooks::default(),
            schedules: Vec::new(),
        }
    }

    /// The pool [`Node::client`] enqueues on (default: a separate pool of
    /// [`DEFAULT_CLIENT_MAX_CONNECTIONS`] to the executor's database).
    pub fn client_pool(mut self, pool: PgPool) -> Self {
        self.client_pool = Some(pool);
        self
    }

    /// Run as a cluster member: partitions are placed on the ring of active members
    /// seen through `membership`. The membership's node id must equal `node_id`.
    pub fn cluster(mut self, membership: Arc<dyn Membership>, options: ClusterOptions) -> Self {
        self.cluster = Some(ClusterWiring { membership, options });
        self
    }

    /// Declare a periodic schedule in code: applied on start, replacing a stored one
    /// only if its `revision` is higher (see [`crate::scheduler`]). Errors on invalid
    /// timing or policies, or a name declared twice.
    pub fn schedule(mut self, def: crate::scheduler::ScheduleDef) -> Result<Self> {
        def.validate()?;
        if self.schedules.iter().any(|d| d.account == def.account && d.name == def.name) {
            return Err(Error::Config(format!("schedule {:?} of {:?} is declared twice", def.name, def.account)));
        }
        self.schedules.push(def);
        Ok(self)
    }

    /// Register a handler for `H::KIND`.
    pub fn register<H: Handler>(mut self, handler: H) -> Result<Self> {
        self.registry.register(handler)?;
        Ok(self)
    }

    /// Call `hook` right before every handler runs (see [`crate::hooks`]): cheap, on
    /// the attempt's task; a panic in it is caught and logged.
    pub fn on_attempt_start(mut self, hook: impl Fn(&AttemptInfo) + Send + Sync + 'static) -> Self {
        self.hooks.add_start(Arc::new(hook));
        self
    }

    /// Call `hook` once for every attempt whose handler ran, after its outcome is
    /// recorded, with how long the handler ran (see [`crate::hooks`]).
    pub fn on_attempt_finish(
        mut self,
        hook: impl Fn(&AttemptInfo, &AttemptOutcome, Duration) + Send + Sync + 'static,
    ) -> Self {
        self.hooks.add_finish(Arc::new(hook));
        self
    }

    /// Wrap the store the account actors use (claims, finishes, unclaims, cancel
    /// reads): the seam fault-injection tests use to lose replies, fail statements or
    /// panic at chosen points. Applications have no use for it.
    #[doc(hidden)]
    pub fn store_layer(mut self, layer: StoreLayer) -> Self {
        self.store_layer = Some(layer);
        self
    }

    /// Replace the placement (default: this node owns every partition).
    pub fn placement(mut self, placement: Arc<dyn Placement>) -> Self {
        self.placement = placement;
        self
    }

    /// Migrate the schema, take the leases this node should own and start its tasks.
    pub async fn start(self, pool: PgPool) -> Result<Node> {
        let config = self.config;
        config.validate()?;
        if let Some(ClusterWiring { membership: m, .. }) = &self.cluster {
            if m.node_id() != config.node_id {
                return Err(Error::Config(format!(
                    "membership node id {:?} differs from node_id {:?}",
                    m.node_id(),
                    config.node_id
                )));
            }
        }
        store::migrate(&pool).await?;
        let partitions = store::init_partitions(&pool, config.partitions).await?;
        let generation =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros()).unwrap_or(0);
        let owner: Arc<str> = format!("{}/{}", config.node_id, generation).into();
        let mut store: Arc<dyn Store> =
            Arc::new(PgStore::new(pool.clone(), partitions).with_finish_idle_timeout(config.lease.ttl));
        if let Some(layer) = &self.store_layer {
            store = layer(store);
        }
        // The control plane (lease renewal, enforcer, listener) has its own small pool:
        // a renewal must never wait behind handlers that hold every executor connection,
        // or a busy node would self-fence.
        // The listener keeps one of these connections for itself; renewals, heartbeats
        // and the enforcer share the rest (3 in all timed out after cuts and restarts).
        let control_pool = PgPoolOptions::new()
            .max_connections(CONTROL_POOL_CONNECTIONS)
            .acquire_timeout(config.lease.valid_for())
            .test_before_acquire(false)
            .connect_lazy_with((*pool.connect_options()).clone());
        let control: Arc<dyn Store> = Arc::new(PgStore::new(control_pool.clone(), partitions));
        let registry = Arc::new(self.registry);
        PgAdminStore::from(&pool).publish_kinds(&registry, &owner).await?;
        crate::scheduler::reconcile_declared(&PgStore::new(pool.clone(), partitions), &self.schedules).await?;
        let leases = Arc::new(LeaseTable::new(owner.clone()));
        let poke = Arc::new(Notify::new());
        let rescan = Arc::new(Notify::new());
        let meter = Shared::meter_for(&config.exec);
        let heartbeats: Arc<crate::progress::Heartbeats> = Default::default();
        let fires: Arc<crate::scheduler::PendingFires> = Default::default();
        let shared = Arc::new(Shared {
            store: store.clone(),
            producer: Some(Arc::new(PgStore::new(pool.clone(), partitions))),
            registry: registry.clone(),
            leases: leases.clone(),
            config: config.exec.clone(),
            partitions,
            node_id: config.node_id.as_str().into(),
            poke_enforcer: poke.clone(),
            lease_ttl: config.lease.ttl,
            hooks: self.hooks,
            slots: Shared::slots_for(&config.exec),
            meter: meter.clone(),
            heartbeats: heartbeats.clone(),
            fires: fires.clone(),
        });
        let actors = AccountActors::new(shared);
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let mut placement = self.placement;
        let mut ring = None;
        let (proven_tx, proven_rx) = watch::channel(None);
        let (db_ok_tx, mut db_ok_rx) = watch::channel(true);
        let db_ok = db_ok_rx.clone();
        let status = Arc::new(Status::default());
        // Follow whether the lease keeper reaches the database: a loss resets the
        // readiness latch even between probes (the partitions self-fenced meanwhile must
        // be re-acquired first), and a cluster member announces it in gossip (see
        // lease::MemberProof).
        let (gossip, st, stop) =
            (self.cluster.as_ref().map(|c| c.membership.clone()), status.clone(), shutdown.clone());
        tracker.spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    changed = db_ok_rx.changed() => if changed.is_err() { return },
                }
                let ok = *db_ok_rx.borrow_and_update();
                if !ok {
                    st.caught_up.store(false, Ordering::Release);
                }
                if let Some(m) = &gossip {
                    m.set_db_ok(ok).await;
                }
            }
        });
        let member = store::MemberInfo {
            node_id: config.node_id.clone(),
            started_at: chrono::Utc::now(),
            schema: crate::schema::binary_version(),
            ring: self.cluster.as_ref().map(|c| c.options.ring.fingerprint()).unwrap_or_else(|| "single".into()),
        };
        if let Some(ClusterWiring { membership, options }) = &self.cluster {
            membership.set_versions(&options.ring.fingerprint(), crate::schema::binary_version()).await;
            membership.set_node_version(&options.node_version, u64::try_from(generation).unwrap_or(u64::MAX)).await;
            let rp = RingPlacement::new(config.node_id.clone());
            // The lease holders sticky placement computes from, read four times per
            // renewal, with this node's own as its lease table says (see watch_holders).
            let (holders_tx, holders_rx) = watch::channel(None);
            tracker.spawn(crate::lease::watch_holders(
                store.clone(),
                config.lease.renew_interval / 4,
                config.lease.valid_for(),
                Some(leases.clone()),
                holders_tx,
                shutdown.clone(),
            ));
            tracker.spawn(warden_cluster::placement::run_ring(
                membership.clone(),
                rp.clone(),
                partitions,
                options.ring.clone(),
                options.settle_delay,
                Some(proven_rx),
                Some(holders_rx),
                shutdown.clone(),
            ));
            // Join the ring once gossip has had a settle delay to show us the cluster,
            // and once the executor pool is connected: partitions handed to us must
            // not wait for connection set-up on their first jobs (it measured as most
            // of a moved partition's pause on a loaded machine).
            let (m, delay, stop, warm_pool, st) =
                (membership.clone(), options.settle_delay, shutdown.clone(), pool.clone(), status.clone());
            tracker.spawn(async move {
                let ready = async {
                    tokio::join!(tokio::time::sleep(delay), warm_up(&warm_pool));
                };
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = ready => {
                        // Not once the node is leaving: a leave announced meanwhile stands.
                        if !st.leaving.load(Ordering::Acquire) {
                            m.set_state(MemberState::Active).await;
                            st.active.store(true, Ordering::Release);
                        }
                    }
                }
            });
            tracker.spawn(publish_load(
                membership.clone(),
                leases.clone(),
                actors.clone(),
                status.clone(),
                options.load_interval,
                shutdown.clone(),
            ));
            placement = rp.clone();
            ring = Some(rp);
        } else {
            // A single node is a member of nothing: active from the start.
            status.active.store(true, Ordering::Release);
        }
        let readiness_placement = placement.clone();
        let enforcer = Arc::new(Enforcer {
            store: control.clone(),
            leases: leases.clone(),
            actors: actors.clone(),
            placement,
            lease_config: config.lease,
            due_scan_limit: config.due_scan_limit,
            unwanted_since: Default::default(),
        });
        crate::telemetry::describe();

        let fence_actors = actors.clone();
        tracker.spawn(lease::keep_leases(
            control.clone(),
            leases.clone(),
            config.lease,
            Arc::new(move |parts: &[u32]| fence_actors.fence_partitions(parts)),
            Some(lease::MemberProof { info: member, proven: proven_tx, db_ok: db_ok_tx }),
            shutdown.clone(),
        ));
        tracker.spawn(crate::wakeup::listen(
            control_pool,
            leases.clone(),
            actors.clone(),
            poke.clone(),
            rescan.clone(),
            shutdown.clone(),
        ));
        // First reconciliation before returning, so a started node owns its partitions.
        if let Err(e) = enforcer.run_once().await {
            tracing::warn!(error = %e, "first enforcer run failed; the loop will retry");
        }
        tracker.spawn(enforcer::run(
            enforcer.clone(),
            config.enforcer_interval,
            poke.clone(),
            rescan,
            shutdown.clone(),
        ));
        // Retention runs on a one-connection pool of its own: never an executor connection.
        let pruner = Pruner::new(Pruner::own_pool(&pool), config.retention.clone())?;
        let client_pool = self.client_pool.unwrap_or_else(|| {
            PgPoolOptions::new()
                .max_connections(DEFAULT_CLIENT_MAX_CONNECTIONS)
                .test_before_acquire(false)
                .connect_lazy_with((*pool.connect_options()).clone())
        });
        tracker.spawn(retention::run(pruner, shutdown.clone()));
        let scheduler = crate::scheduler::Scheduler {
            store: PgStore::new(pool.clone(), partitions),
            leases: leases.clone(),
            registry: registry.clone(),
            idle_timeout: config.lease.ttl,
            pending: fires,
        };
        tracker.spawn(crate::scheduler::run(scheduler, config.schedule_interval, shutdown.clone()));
        status.saturation.lock().unwrap_or_else(|e| e.into_inner()).slots = meter.slots();
        tracker.spawn(measure_saturation(
            meter,
            heartbeats,
            PgAdminStore::from(&control_pool_for_counts(&pool)),
            leases.clone(),
            status.clone(),
            shutdown.clone(),
        ));
        tracing::info!(node = %owner, partitions = partitions.get(), kinds = ?registry.kinds(), "node started");
        Ok(Node {
            inner: Arc::new(NodeInner {
                config,
                owner,
                pool: pool.clone(),
                client: Client::with_registry(client_pool, partitions, registry),
                leases,
                actors,
                enforcer,
                shutdown,
                tracker,
                stopped: tokio::sync::Mutex::new(false),
                cluster: self.cluster,
                ring,
                placement: readiness_placement,
                status,
                db_ok,
            }),
        })
    }
}

struct NodeInner {
    config: NodeConfig,
    owner: Arc<str>,
    pool: PgPool,
    client: Client,
    leases: Arc<LeaseTable>,
    actors: Arc<AccountActors>,
    enforcer: Arc<Enforcer>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    stopped: tokio::sync::Mutex<bool>,
    cluster: Option<ClusterWiring>,
    ring: Option<Arc<RingPlacement>>,
    /// What the enforcer follows (readiness compares it with the held leases).
    placement: Arc<dyn Placement>,
    status: Arc<Status>,
    /// Whether the lease keeper reaches the database.
    db_ok: watch::Receiver<bool>,
}

/// Lifecycle flags and the latest saturation figures.
#[derive(Default)]
struct Status {
    /// Announced `active` in gossip (a single node: from the start).
    active: AtomicBool,
    /// A graceful shutdown began.
    leaving: AtomicBool,
    /// Has held everything the placement assigns it since it last became active or
    /// regained the database (the readiness latch).
    caught_up: AtomicBool,
    saturation: std::sync::Mutex<Saturation>,
}

/// Why a node is or is not ready to serve (`/readyz`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeReadiness {
    /// Active, and has held every partition the ring assigns it (latched: later
    /// rebalances do not make it unready while it acquires what moved to it).
    Ready,
    /// Not yet active in the cluster, or no ring yet.
    Starting,
    /// Active, but still acquiring `missing` of the partitions assigned to it.
    CatchingUp { missing: usize },
    /// The lease keeper cannot reach the database.
    DatabaseLost,
    /// Leaving or stopped.
    Stopping,
}

impl std::fmt::Display for NodeReadiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NodeReadiness::Ready => write!(f, "ready"),
            NodeReadiness::Starting => write!(f, "not ready: starting (joining the cluster)"),
            NodeReadiness::CatchingUp { missing } => {
                write!(f, "not ready: acquiring {missing} assigned partition(s)")
            }
            NodeReadiness::DatabaseLost => write!(f, "not ready: the database is unreachable"),
            NodeReadiness::Stopping => write!(f, "not ready: leaving"),
        }
    }
}

/// A running node. Cheap to clone.
#[derive(Clone)]
pub struct Node {
    inner: Arc<NodeInner>,
}

/// A point-in-time view of a node.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NodeStats {
    pub owner: String,
    pub partitions_held: usize,
    pub active_actors: usize,
    pub actors_spawned: u64,
}

impl Node {
    pub fn builder(config: NodeConfig) -> NodeBuilder {
        NodeBuilder::new(config)
    }

    /// The lease owner string `node_id/generation`.
    pub fn owner(&self) -> &str {
        &self.inner.owner
    }

    pub fn config(&self) -> &NodeConfig {
        &self.inner.config
    }

    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    pub fn stats(&self) -> NodeStats {
        NodeStats {
            owner: self.inner.owner.to_string(),
            partitions_held: self.inner.leases.len(),
            active_actors: self.inner.actors.len(),
            actors_spawned: self.inner.actors.spawned(),
        }
    }

    /// The current ring (cluster mode only).
    pub fn ring(&self) -> Option<Arc<warden_cluster::ring::RingAssignment>> {
        self.inner.ring.as_ref().and_then(|r| r.ring())
    }

    /// The membership seam (cluster mode only).
    pub fn membership(&self) -> Option<&Arc<dyn Membership>> {
        self.inner.cluster.as_ref().map(|c| &c.membership)
    }

    /// Partitions this node holds (usable or draining), with epochs.
    pub fn held_partitions(&self) -> Vec<crate::store::GrantedLease> {
        self.inner.leases.held()
    }

    /// The node's lease table. Exposed for fault-injection tests, which use it to
    /// open race windows on purpose; applications have no use for it.
    #[doc(hidden)]
    pub fn lease_table(&self) -> &Arc<LeaseTable> {
        &self.inner.leases
    }

    /// Whether an actor for `account` is running on this node now.
    pub fn has_actor(&self, account: &str) -> bool {
        self.inner.actors.contains(account)
    }

    /// Run one enforcer reconciliation now (tests, operators).
    pub async fn run_enforcer_once(&self) -> Result<EnforceReport> {
        self.inner.enforcer.run_once().await
    }

    /// Ready: see [`NodeReadiness::Ready`].
    pub fn is_ready(&self) -> bool {
        self.readiness() == NodeReadiness::Ready
    }

    /// Whether the node is ready, and if not why: active in the cluster, reaching
    /// the database, and holding every partition the ring assigns it (latched once
    /// reached, until the node leaves or loses the database). A node the ring
    /// assigns nothing (more nodes than partitions) is ready once a ring that
    /// includes it is in force (before that, its ring assigns it nothing because it
    /// is not in it yet).
    pub fn readiness(&self) -> NodeReadiness {
        let st = &self.inner.status;
        if self.inner.shutdown.is_cancelled() || st.leaving.load(Ordering::Acquire) {
            return NodeReadiness::Stopping;
        }
        if !*self.inner.db_ok.borrow() {
            return NodeReadiness::DatabaseLost;
        }
        if !st.active.load(Ordering::Acquire) {
            return NodeReadiness::Starting;
        }
        if st.caught_up.load(Ordering::Acquire) {
            return NodeReadiness::Ready;
        }
        let Some(desired) = self.inner.placement.desired(self.inner.config.partitions) else {
            return NodeReadiness::Starting;
        };
        // A node turns active before the ring it computes includes it: until then the
        // ring assigns it nothing, which says nothing about what it will be assigned.
        // (A standby node cannot compute the cluster's ring and owns nothing.)
        if let Some(rp) = &self.inner.ring {
            let me = self.inner.config.node_id.as_str();
            if !rp.standby() && !rp.ring().is_some_and(|r| r.members().iter().any(|m| m == me)) {
                return NodeReadiness::Starting;
            }
        }
        let missing = desired.partitions.iter().filter(|p| self.inner.leases.current(**p).is_none()).count();
        if missing > 0 {
            return NodeReadiness::CatchingUp { missing };
        }
        st.caught_up.store(true, Ordering::Release);
        NodeReadiness::Ready
    }

    /// The node's saturation figures (see [`crate::saturation`]), updated every
    /// [`crate::saturation::TICK`].
    pub fn saturation(&self) -> Saturation {
        *self.inner.status.saturation.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The most a graceful [`Node::shutdown`] takes before its tasks stop (plus the
    /// release statement): `drain_timeout`, and in a cluster the settle delay twice
    /// (peers apply our leave at once, our own enforcer after its next view) and 1 s
    /// for the handoff's release and NOTIFY. Orchestrators' grace periods must be
    /// longer (Kubernetes: `terminationGracePeriodSeconds`).
    pub fn shutdown_budget(&self) -> Duration {
        let drain = self.inner.config.exec.drain_timeout;
        match &self.inner.cluster {
            Some(c) => c.options.settle_delay * 2 + drain + HANDOFF_RELEASE_BUDGET,
            None => drain,
        }
    }

    /// Resolves once the node has begun to stop (a shutdown was asked for, or the
    /// node stopped itself).
    pub async fn stopped(&self) {
        self.inner.shutdown.cancelled().await
    }

    /// Run until `signal` resolves, then shut down gracefully.
    pub async fn run_until(&self, signal: impl std::future::Future<Output = ()>) -> Result<()> {
        tokio::select! {
            _ = signal => {}
            _ = self.inner.shutdown.cancelled() => {}
        }
        self.shutdown().await
    }

    /// Graceful stop: no new attempts, running ones get `drain_timeout`, then every
    /// lease is released (NOTIFY) and the node's tasks end. Idempotent.
    pub async fn shutdown(&self) -> Result<()> {
        let mut stopped = self.inner.stopped.lock().await;
        if *stopped {
            return Ok(());
        }
        *stopped = true;
        let drain = self.inner.config.exec.drain_timeout;
        let deadline = tokio::time::Instant::now() + self.shutdown_budget();
        if let Some(ClusterWiring { membership, .. }) = &self.inner.cluster {
            // Graceful leave: announce it (peers drop us from the ring at once), let the
            // ring move our partitions away through the normal handoff (drain → release
            // → NOTIFY). What is still held when only a drain's worth of the budget is
            // left is drained and released below, within the same budget.
            tracing::info!(node = %self.inner.owner, "leaving: handing off every partition");
            self.inner.status.leaving.store(true, Ordering::Release);
            membership.set_state(MemberState::Leaving).await;
            let leave_by = deadline.checked_sub(drain).unwrap_or(deadline);
            self.inner.leases.wait_until_empty(leave_by).await;
        }
        tracing::info!(node = %self.inner.owner, "shutting down: draining and releasing");
        self.inner.shutdown.cancel();
        let left = deadline.saturating_duration_since(tokio::time::Instant::now()).min(drain);
        let released = self.inner.enforcer.release_all(left).await;
        self.inner.tracker.close();
        self.inner.tracker.wait().await;
        if let Some(ClusterWiring { membership, .. }) = &self.inner.cluster {
            membership.shutdown().await;
        }
        released.map(|_| ())
    }
}

/// Publish this node's load in gossip every `every`.
async fn publish_load(
    membership: Arc<dyn Membership>,
    leases: Arc<LeaseTable>,
    actors: Arc<AccountActors>,
    status: Arc<Status>,
    every: Duration,
    stop: CancellationToken,
) {
    loop {
        let saturation = status.saturation.lock().unwrap_or_else(|e| e.into_inner()).saturation;
        membership
            .set_load(&[
                ("partitions", leases.len().to_string()),
                ("actors", actors.len().to_string()),
                ("saturation", format!("{saturation:.3}")),
            ])
            .await;
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// A one-connection pool for the runnable-accounts count: never an executor
/// connection, and lazily connected (a node that never counts opens none).
///
/// The count's own deadline is enforced by the server too (`statement_timeout`):
/// dropping a timed-out query on the client does not stop it in PostgreSQL, so with
/// the executor's 30 s statement timeout a backlog that makes the count slower than
/// [`saturation::RUNNABLE_EVERY`] piled up one more full scan every 5 s per node.
fn control_pool_for_counts(pool: &PgPool) -> PgPool {
    let timeout_ms = saturation::RUNNABLE_EVERY.as_millis().to_string();
    PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        // Appended after the pool's own `-c statement_timeout`: the last one wins.
        .connect_lazy_with((*pool.connect_options()).clone().options([("statement_timeout", timeout_ms)]))
}

/// Update the saturation gauges every [`saturation::TICK`] and count the runnable
/// accounts of the held partitions every [`saturation::RUNNABLE_EVERY`].
async fn measure_saturation(
    meter: Arc<saturation::SlotMeter>,
    heartbeats: Arc<crate::progress::Heartbeats>,
    admin: PgAdminStore,
    leases: Arc<LeaseTable>,
    status: Arc<Status>,
    stop: CancellationToken,
) {
    let cores = saturation::available_cores();
    let mut window = saturation::Window::new(saturation::WINDOW, cores);
    let mut last_count: Option<std::time::Instant> = None;
    let mut demand: Option<SlotDemand> = None;
    let mut count_every = saturation::RUNNABLE_EVERY;
    metrics::gauge!("warden_execution_slots").set(meter.slots() as f64);
    loop {
        let now = std::time::Instant::now();
        let busy_seconds = meter.busy_seconds(now);
        let (sat, cpu) = window.push(now, busy_seconds, saturation::process_cpu_seconds(), meter.slots());
        if last_count.is_none_or(|t| now.duration_since(t) >= count_every) {
            last_count = Some(now);
            let held: Vec<u32> = leases.held().iter().map(|l| l.partition).collect();
            demand = if held.is_empty() {
                Some(SlotDemand::default())
            } else {
                let counted = tokio::time::timeout(
                    saturation::RUNNABLE_EVERY,
                    admin.runnable_accounts(Some(&held), saturation::RUNNABLE_CAP),
                )
                .await;
                count_every = saturation::runnable_interval(now.elapsed());
                match counted {
                    Ok(Ok(d)) => Some(d),
                    // A stale count is worse than none: the figure says unknown.
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "counting runnable accounts failed");
                        None
                    }
                    Err(_) => None,
                }
            };
        }
        // Waiting for a slot: due and unclaimed in our partitions, plus claimed here
        // and waiting for one of our slots.
        let waiting_here = meter.waiting();
        let runnable = demand.map(|d| d.runnable + waiting_here as i64);
        if let Some(n) = runnable {
            metrics::gauge!("warden_runnable_accounts").set(n as f64);
        }
        let busy = meter.busy();
        metrics::gauge!("warden_execution_slots_busy").set(busy as f64);
        metrics::counter!("warden_execution_busy_seconds_total").absolute(busy_seconds as u64);
        metrics::gauge!("warden_saturation").set(sat);
        if let Some(c) = cpu {
            metrics::gauge!("warden_process_cpu_ratio").set(c);
        }
        let (beating, oldest) = heartbeats.snapshot(tokio::time::Instant::now());
        metrics::gauge!("warden_heartbeating_attempts").set(beating as f64);
        metrics::gauge!("warden_heartbeat_age_max_seconds").set(oldest.as_secs_f64());
        *status.saturation.lock().unwrap_or_else(|e| e.into_inner()) =
            Saturation { slots: meter.slots(), busy, saturation: sat, cpu, runnable_accounts: runnable };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(saturation::TICK) => {}
        }
    }
}

/// A future that resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Open every executor connection now (bounded by [`WARM_UP_TIMEOUT`]), so the first
/// jobs after a join do not pay for connection set-up. Failures are only logged: the
/// pool connects lazily anyway.
async fn warm_up(pool: &PgPool) {
    let n = pool.options().get_max_connections();
    let mut opening = tokio::task::JoinSet::new();
    for _ in 0..n {
        let pool = pool.clone();
        opening.spawn(async move { pool.acquire().await });
    }
    // Hold every connection until all are open, or acquire would reuse the first.
    let mut open = Vec::new();
    let collect = async {
        while let Some(r) = opening.join_next().await {
            if let Ok(Ok(c)) = r {
                open.push(c);
            }
        }
    };
    match tokio::time::timeout(WARM_UP_TIMEOUT, collect).await {
        Ok(()) => tracing::debug!(connections = open.len(), "executor pool warmed up"),
        Err(_) => tracing::warn!(connections = open.len(), "executor pool warm-up timed out; joining anyway"),
    }
}
