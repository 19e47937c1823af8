//! The gRPC API (`proto/warden.proto`): cluster observation, job operations and
//! periodic schedules' management, served by every node. Errors are mapped to `tonic::Status` in one place
//! ([`status`]) and never carry SQL or internal detail.
//!
//! Limits: a batch enqueue takes at most [`MAX_API_ENQUEUE_BATCH`] jobs, a page at most
//! [`MAX_PAGE`] jobs, attempts or schedules, a backfill at most
//! [`warden_runtime::scheduler::MAX_BACKFILL`] fires, a request at most 4 MiB; each connection runs at most
//! [`MAX_CONCURRENT_PER_CONNECTION`] requests at once and each request has a
//! [`REQUEST_TIMEOUT`]. Optional bearer-token authentication.
//!
//! An abusive client must not starve execution ([`ApiLimits`]): the API has its own
//! small database pool (never an executor connection) whose statements time out after
//! a few seconds; calls in progress are capped over all connections (past the cap a
//! call waits briefly, then gets `RESOURCE_EXHAUSTED`), and so are ownership streams,
//! which all share one lease poller ([`OwnershipHub`]) instead of polling each. Every
//! query is an index lookup or bounded: queue statistics count at most a cap per
//! partition, attempts and job lists come in pages.

use chrono::Utc;
use sqlx::postgres::{PgPool, PgPoolOptions};
use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use warden_proto::convert::{
    attempt as attempt_pb, job as job_pb, job_with_progress, new_job, schedule as schedule_pb, schedule_def, status,
    unix_ms as ms,
};
use warden_runtime::job::CancelResult;
use warden_runtime::node::Node;
use warden_runtime::ownership_diff::{Holder, MemberChange, OwnershipChange};
use warden_runtime::store::{self, AdminStore, PgAdminStore};
use warden_runtime::Error;

pub use warden_proto::pb;

use pb::cluster_server::{Cluster, ClusterServer};
use pb::jobs_server::{Jobs, JobsServer};
use pb::schedules_server::{Schedules, SchedulesServer};

pub const MAX_API_ENQUEUE_BATCH: usize = 1000;
pub const MAX_PAGE: u32 = 500;
pub const DEFAULT_PAGE: u32 = 50;
pub const MAX_CONCURRENT_PER_CONNECTION: usize = 32;
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
/// HTTP/2 streams one connection may open at once (calls and ownership streams).
const MAX_STREAMS_PER_CONNECTION: u32 = 128;
/// How long a new ownership stream waits for the shared poller's first lease read.
const FIRST_SNAPSHOT_WAIT: Duration = Duration::from_secs(5);
/// Default period of the one lease poll feeding every ownership stream.
pub const DEFAULT_WATCH_POLL_INTERVAL: Duration = Duration::from_millis(200);
/// Shortest accepted watch poll period.
pub const MIN_WATCH_POLL_INTERVAL: Duration = Duration::from_millis(10);
/// Idle API database connections are closed after this long.
const API_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// HTTP/2 keepalive: a ping this often, and a connection whose ping is not answered in
/// [`HTTP2_KEEPALIVE_TIMEOUT`] is closed (a vanished client's watch streams give their
/// slots back within ~40 s).
const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Rate-limit tokens a call that reads many rows costs (an ordinary call costs 1).
pub const HEAVY_CALL_COST: f64 = 10.0;

/// Budgets that keep the API from competing with execution. `Default` is sane for a
/// node with a 16-connection executor pool.
#[derive(Debug, Clone)]
pub struct ApiLimits {
    /// Connections of the API's own database pool.
    pub max_connections: u32,
    /// How long a call waits for an API connection before `RESOURCE_EXHAUSTED`.
    pub acquire_timeout: Duration,
    /// `statement_timeout` of API connections: one slow query cannot hold one long.
    pub statement_timeout: Duration,
    /// Calls in progress at once over every connection.
    pub max_in_flight: usize,
    /// Rate-limit tokens per second over every connection (a token bucket holding one
    /// second's worth): an ordinary call costs 1, one that reads many rows (queue
    /// statistics, member backlogs, job lists, locating an account) costs
    /// [`HEAVY_CALL_COST`]; `Enqueue` and `EnqueueBatch` cost nothing (producers are
    /// bounded by the API pool and `max_in_flight` only). Beyond it
    /// `RESOURCE_EXHAUSTED`, answered after `admission_wait`. 0: no rate limit. The
    /// API shares the node's CPU and the database with execution: a client calling
    /// as fast as it can took 20–45% of a 2-core node's job throughput with only the
    /// connection and concurrency limits.
    pub max_calls_per_second: u32,
    /// How long a call waits for a slot before `RESOURCE_EXHAUSTED`.
    pub admission_wait: Duration,
    /// `WatchOwnership` streams open at once.
    pub max_watch_streams: usize,
    /// Period of the one lease poll that feeds every ownership stream.
    pub watch_poll_interval: Duration,
    /// Queue statistics count at most this many unfinished jobs per partition.
    pub stats_partition_cap: i64,
}

impl Default for ApiLimits {
    fn default() -> Self {
        Self {
            max_connections: 4,
            acquire_timeout: Duration::from_millis(500),
            statement_timeout: Duration::from_secs(5),
            max_in_flight: 64,
            max_calls_per_second: 200,
            admission_wait: Duration::from_millis(100),
            max_watch_streams: 64,
            watch_poll_interval: DEFAULT_WATCH_POLL_INTERVAL,
            stats_partition_cap: store::DEFAULT_PARTITION_COUNT_CAP,
        }
    }
}

impl ApiLimits {
    pub fn validate(&self) -> Result<(), String> {
        if self.max_connections == 0 || self.max_in_flight == 0 || self.max_watch_streams == 0 {
            return Err("API max_connections, max_in_flight and max_watch_streams must be positive".into());
        }
        if self.statement_timeout < Duration::from_millis(1) || self.acquire_timeout.is_zero() {
            return Err("API statement_timeout and acquire_timeout must be positive".into());
        }
        if self.watch_poll_interval < MIN_WATCH_POLL_INTERVAL {
            return Err("API watch_poll_interval must be at least 10ms".into());
        }
        if self.stats_partition_cap <= 0 {
            return Err("API stats_partition_cap must be positive".into());
        }
        Ok(())
    }
}

/// A page size: 0 means [`DEFAULT_PAGE`], above [`MAX_PAGE`] is refused.
fn page_size(field: &str, n: u32) -> Result<u32, Status> {
    match n {
        0 => Ok(DEFAULT_PAGE),
        n if n > MAX_PAGE => Err(Status::invalid_argument(format!("{field} {n} exceeds the limit of {MAX_PAGE}"))),
        n => Ok(n),
    }
}

/// A page token (an id from the previous page); empty means the first page.
fn page_token(field: &str, token: &str) -> Result<Option<i64>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    token
        .parse::<i64>()
        .ok()
        .filter(|v| *v > 0)
        .map(Some)
        .ok_or_else(|| Status::invalid_argument(format!("invalid {field}")))
}

/// A schedule's account and name, both required (the engine checks them further).
fn schedule_ref(r: &pb::ScheduleRef) -> Result<(&str, &str), Status> {
    schedule_key(&r.account, &r.name)
}

fn schedule_key<'a>(account: &'a str, name: &'a str) -> Result<(&'a str, &'a str), Status> {
    if account.is_empty() {
        return Err(Status::invalid_argument("account must not be empty"));
    }
    if name.is_empty() {
        return Err(Status::invalid_argument("schedule name must not be empty"));
    }
    Ok((account, name))
}

/// A required time (Unix ms) of a request.
fn unix_time(field: &str, unix_ms: i64) -> Result<chrono::DateTime<Utc>, Status> {
    use chrono::TimeZone;
    if unix_ms == 0 {
        return Err(Status::invalid_argument(format!("{field} is required")));
    }
    Utc.timestamp_millis_opt(unix_ms)
        .single()
        .ok_or_else(|| Status::invalid_argument(format!("{field} is out of range")))
}

fn positive_id(id: i64) -> Result<i64, Status> {
    if id <= 0 {
        return Err(Status::invalid_argument("id must be a positive job id"));
    }
    Ok(id)
}

/// The service implementation, shared by the three gRPC services.
#[derive(Clone)]
pub struct Api {
    node: Node,
    /// The API's own pool (see [`ApiLimits`]); the executor's is never used.
    pool: PgPool,
    client: crate::Client,
    limits: Arc<ApiLimits>,
    in_flight: Arc<Semaphore>,
    /// Token bucket of [`ApiLimits::max_calls_per_second`]: (tokens, last refill).
    rate: Arc<std::sync::Mutex<(f64, std::time::Instant)>>,
    streams: Arc<Semaphore>,
    ownership: Arc<OwnershipHub>,
}

impl Api {
    pub fn new(node: Node) -> Self {
        Self::with_limits(node, ApiLimits::default())
    }

    /// The API of `node` with these budgets (its pool connects lazily).
    pub fn with_limits(node: Node, limits: ApiLimits) -> Self {
        let statement_timeout = limits.statement_timeout.as_millis().to_string();
        let options = (*node.pool().connect_options())
            .clone()
            .application_name("warden-api")
            // Appended after the executor's own `-c statement_timeout`: the last one wins.
            .options([("statement_timeout", statement_timeout)]);
        let pool = PgPoolOptions::new()
            .max_connections(limits.max_connections)
            .min_connections(0)
            .acquire_timeout(limits.acquire_timeout)
            .test_before_acquire(false)
            .idle_timeout(Some(API_POOL_IDLE_TIMEOUT))
            .connect_lazy_with(options);
        let client = node.client().on_pool(pool.clone());
        let ownership = OwnershipHub::new(pool.clone(), limits.watch_poll_interval);
        Self {
            rate: Arc::new(std::sync::Mutex::new((limits.max_calls_per_second as f64, std::time::Instant::now()))),
            in_flight: Arc::new(Semaphore::new(limits.max_in_flight)),
            streams: Arc::new(Semaphore::new(limits.max_watch_streams)),
            node,
            pool,
            client,
            limits: Arc::new(limits),
            ownership,
        }
    }

    fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The API's database pool (tests look at it).
    pub fn api_pool(&self) -> &PgPool {
        &self.pool
    }

    /// Lease reads the shared ownership poller has done (tests check that streams
    /// share them).
    pub fn ownership_polls(&self) -> u64 {
        self.ownership.polls()
    }

    /// Take `cost` tokens of the rate limit's bucket, if it holds them.
    fn take_token(&self, rate: u32, cost: f64) -> bool {
        let mut b = self.rate.lock().unwrap();
        let now = std::time::Instant::now();
        // Hold at least one heavy call's worth, or a budget below it admits none.
        let capacity = (rate as f64).max(HEAVY_CALL_COST);
        b.0 = (b.0 + now.duration_since(b.1).as_secs_f64() * rate as f64).min(capacity);
        b.1 = now;
        if cost > 0.0 && b.0 < cost {
            return false;
        }
        b.0 -= cost;
        true
    }

    /// A slot among [`ApiLimits::max_in_flight`] calls, or `RESOURCE_EXHAUSTED` after
    /// [`ApiLimits::admission_wait`]: excess load is refused, never queued unboundedly.
    async fn admit(&self) -> Result<OwnedSemaphorePermit, Status> {
        self.admit_weighted(1.0).await
    }

    /// [`Api::admit`] for a call that costs `cost` of the rate limit's tokens: the
    /// calls that read many rows (queue statistics, member backlogs, job lists,
    /// locating an account) cost [`HEAVY_CALL_COST`].
    async fn admit_weighted(&self, cost: f64) -> Result<OwnedSemaphorePermit, Status> {
        let rate = self.limits.max_calls_per_second;
        if rate > 0 && !self.take_token(rate, cost) {
            metrics::counter!("warden_api_rejected_total", "limit" => "rate").increment(1);
            // Answer a refusal only after the admission wait: a sleeping call costs the
            // node nothing, and a client retrying in a tight loop is slowed to a few
            // calls a second instead of spinning both sides' CPU (measured: refusals
            // answered at once let a hammering client take ~30% of the job throughput
            // of a 2-core node through refusals alone).
            tokio::time::sleep(self.limits.admission_wait).await;
            return Err(Status::resource_exhausted(format!(
                "the node admits {rate} API calls per second; try again shortly"
            )));
        }
        match tokio::time::timeout(self.limits.admission_wait, self.in_flight.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => {
                metrics::counter!("warden_api_rejected_total", "limit" => "in_flight").increment(1);
                Err(Status::resource_exhausted(format!(
                    "the node is serving its limit of {} API calls at once; try again shortly",
                    self.limits.max_in_flight
                )))
            }
        }
    }

    /// [`status`], plus what only the API pool can tell: its connections all busy,
    /// or a statement past the API's statement timeout.
    fn status(&self, e: Error) -> Status {
        match &e {
            Error::Database(sqlx::Error::PoolTimedOut)
                if self.pool.size() >= self.limits.max_connections && self.pool.num_idle() == 0 =>
            {
                metrics::counter!("warden_api_rejected_total", "limit" => "pool").increment(1);
                Status::resource_exhausted(format!(
                    "all {} API database connections are busy; try again shortly",
                    self.limits.max_connections
                ))
            }
            Error::Database(sqlx::Error::Database(d)) if d.code().as_deref() == Some("57014") => {
                metrics::counter!("warden_api_rejected_total", "limit" => "statement_timeout").increment(1);
                Status::deadline_exceeded(format!(
                    "the query ran past the API statement timeout of {} ms",
                    self.limits.statement_timeout.as_millis()
                ))
            }
            _ => status(e),
        }
    }

    fn desired_owner(&self, partition: u32) -> String {
        match self.node.ring() {
            Some(r) => r.owner(partition).to_string(),
            None if self.node.membership().is_none() => self.node.config().node_id.clone(),
            None => String::new(),
        }
    }

    /// Ownership from the lease table: partition → (owner node id, epoch, expiry) for unexpired leases.
    async fn actual(&self) -> Result<BTreeMap<u32, (String, i64, i64)>, Status> {
        let rows = PgAdminStore::from(self.pool()).leases().await.map_err(|e| self.status(e))?;
        let now = Utc::now();
        Ok(rows
            .into_iter()
            .filter_map(|l| {
                let owner = l.owner_node?;
                let exp = l.lease_expires_at?;
                (exp > now).then(|| {
                    (l.partition as u32, (owner.split('/').next().unwrap_or_default().to_string(), l.epoch, ms(exp)))
                })
            })
            .collect())
    }
}

#[tonic::async_trait]
impl Cluster for Api {
    async fn list_members(
        &self,
        _r: Request<pb::ListMembersRequest>,
    ) -> Result<Response<pb::ListMembersResponse>, Status> {
        let _permit = self.admit_weighted(HEAVY_CALL_COST).await?;
        let actual = self.actual().await?;
        let mut held: BTreeMap<String, u32> = BTreeMap::new();
        for (owner, _, _) in actual.values() {
            *held.entry(owner.clone()).or_default() += 1;
        }
        let backlog: HashMap<String, i64> = PgAdminStore::from(self.pool())
            .queue_depth(self.limits.stats_partition_cap)
            .await
            .map_err(|e| self.status(e))?
            .backlog_by_node()
            .into_iter()
            .collect();
        let ring = self.node.ring();
        let desired = |id: &str| ring.as_ref().map(|r| r.partitions_of(id).len() as u32).unwrap_or(0);
        let mut members = Vec::new();
        match self.node.membership() {
            Some(m) => {
                for mem in m.view().borrow().iter() {
                    members.push(pb::Member {
                        node_id: mem.node_id.clone(),
                        generation: mem.generation,
                        gossip_addr: mem.gossip_addr.to_string(),
                        grpc_addr: mem.grpc_addr.clone().unwrap_or_default(),
                        state: mem.state.as_str().into(),
                        live: true,
                        partitions_held: held.get(&mem.node_id).copied().unwrap_or(0),
                        partitions_desired: desired(&mem.node_id),
                        active_accounts: mem.load.get("actors").and_then(|v| v.parse().ok()).unwrap_or(0),
                        backlog: backlog.get(&mem.node_id).copied().unwrap_or(0).max(0) as u64,
                        version: mem.version.clone().unwrap_or_default(),
                    });
                }
            }
            None => {
                let id = self.node.config().node_id.clone();
                members.push(pb::Member {
                    node_id: id.clone(),
                    generation: 0,
                    gossip_addr: String::new(),
                    grpc_addr: String::new(),
                    state: "active".into(),
                    live: true,
                    partitions_held: held.get(&id).copied().unwrap_or(0),
                    partitions_desired: self.node.config().partitions.get(),
                    active_accounts: self.node.stats().active_actors as u64,
                    backlog: backlog.get(&id).copied().unwrap_or(0).max(0) as u64,
                    version: String::new(),
                });
            }
        }
        let known: std::collections::BTreeSet<&str> = members.iter().map(|m| m.node_id.as_str()).collect();
        let lease_holders_not_in_gossip = held.keys().filter(|h| !known.contains(h.as_str())).cloned().collect();
        Ok(Response::new(pb::ListMembersResponse {
            members,
            lease_holders_not_in_gossip,
            answered_by: self.node.owner().to_string(),
        }))
    }

    async fn get_assignment(
        &self,
        _r: Request<pb::GetAssignmentRequest>,
    ) -> Result<Response<pb::GetAssignmentResponse>, Status> {
        let _permit = self.admit().await?;
        let actual = self.actual().await?;
        let p = self.node.config().partitions.get();
        let assignment = (0..p)
            .map(|part| {
                let desired_owner = self.desired_owner(part);
                let (actual_owner, epoch, exp) = actual.get(&part).cloned().unwrap_or_default();
                let handoff = if actual_owner.is_empty() {
                    "unowned"
                } else if !desired_owner.is_empty() && desired_owner != actual_owner {
                    "moving"
                } else {
                    "stable"
                };
                pb::PartitionOwnership {
                    partition: part,
                    desired_owner,
                    actual_owner,
                    epoch,
                    lease_expires_at_unix_ms: exp,
                    handoff: handoff.into(),
                }
            })
            .collect();
        Ok(Response::new(pb::GetAssignmentResponse {
            partitions: p,
            assignment,
            answered_by: self.node.owner().to_string(),
        }))
    }

    async fn locate(&self, r: Request<pb::LocateRequest>) -> Result<Response<pb::LocateResponse>, Status> {
        let _permit = self.admit_weighted(HEAVY_CALL_COST).await?;
        let account = r.into_inner().account;
        crate::job::validate_name("account", &account, crate::job::MAX_ACCOUNT_BYTES).map_err(status)?;
        let partition = crate::partition_of(&account, self.node.config().partitions);
        let actual = self.actual().await?;
        let (actual_owner, epoch, _) = actual.get(&partition).cloned().unwrap_or_default();
        let here = self.node.lease_table().holds(partition);
        let store::AccountQueue { next, unfinished } =
            PgAdminStore::from(self.pool()).account_queue(&account).await.map_err(|e| self.status(e))?;
        Ok(Response::new(pb::LocateResponse {
            account: account.clone(),
            partition,
            desired_owner: self.desired_owner(partition),
            actual_owner,
            epoch,
            actor_running: here && self.node.has_actor(&account),
            answered_by_owner: here,
            next_due_job: next.as_ref().map(job_pb),
            unfinished_jobs: unfinished.max(0) as u64,
            unfinished_jobs_capped: unfinished >= store::ACCOUNT_COUNT_CAP,
        }))
    }

    async fn node_stats(&self, _r: Request<pb::NodeStatsRequest>) -> Result<Response<pb::NodeStatsResponse>, Status> {
        let _permit = self.admit().await?;
        let s = self.node.stats();
        Ok(Response::new(pb::NodeStatsResponse {
            node: s.owner,
            partitions_held: s.partitions_held as u32,
            active_actors: s.active_actors as u64,
            actors_spawned: s.actors_spawned,
            ready: self.node.is_ready(),
        }))
    }

    type WatchOwnershipStream = Pin<Box<dyn Stream<Item = Result<pb::OwnershipEvent, Status>> + Send + 'static>>;

    async fn watch_ownership(
        &self,
        _r: Request<pb::WatchOwnershipRequest>,
    ) -> Result<Response<Self::WatchOwnershipStream>, Status> {
        let _permit = self.admit().await?;
        let Ok(stream_permit) = self.streams.clone().try_acquire_owned() else {
            metrics::counter!("warden_api_rejected_total", "limit" => "watch_streams").increment(1);
            return Err(Status::resource_exhausted(format!(
                "the node serves at most {} ownership streams at once; close one or try another node",
                self.limits.max_watch_streams
            )));
        };
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let api = self.clone();
        let owners = self.ownership.subscribe();
        tokio::spawn(async move {
            watch(api, owners, tx).await;
            drop(stream_permit);
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}

fn event(kind: &str) -> pb::OwnershipEvent {
    pb::OwnershipEvent { at_unix_ms: Utc::now().timestamp_millis(), kind: kind.into(), ..Default::default() }
}

/// Held partitions, unexpired leases only.
pub use crate::ownership_diff::Owners;

/// The ownership events that turn `old` into `new` (see [`crate::ownership_diff`]).
pub fn ownership_events(old: &Owners, new: &Owners) -> Vec<pb::OwnershipEvent> {
    crate::ownership_diff::ownership_changes(old, new)
        .into_iter()
        .map(|c| match c {
            OwnershipChange::Acquired { partition, to, epoch } => {
                pb::OwnershipEvent { partition, to_owner: to, epoch, ..event("acquired") }
            }
            OwnershipChange::Moved { partition, from, to, epoch } => {
                pb::OwnershipEvent { partition, from_owner: from, to_owner: to, epoch, ..event("moved") }
            }
            OwnershipChange::Released { partition, from, epoch } => {
                pb::OwnershipEvent { partition, from_owner: from, epoch, ..event("released") }
            }
        })
        .collect()
}

/// The member events that turn `old` into `new` (node id → state; see [`crate::ownership_diff`]).
pub fn member_events(old: &BTreeMap<String, String>, new: &BTreeMap<String, String>) -> Vec<pb::OwnershipEvent> {
    crate::ownership_diff::member_changes(old, new)
        .into_iter()
        .map(|c| match c {
            MemberChange::Joined { node_id, state } => pb::OwnershipEvent { node_id, state, ..event("member_joined") },
            MemberChange::State { node_id, state } => pb::OwnershipEvent { node_id, state, ..event("member_state") },
            MemberChange::Left { node_id } => pb::OwnershipEvent { node_id, ..event("member_left") },
        })
        .collect()
}

/// One lease poller for every ownership stream of a node. It runs only while at least
/// one stream is open, reads the lease table at most once per interval on the API
/// pool, and publishes the owners in a `watch` channel: it keeps only the latest
/// value, so a slow stream costs no memory — it later diffs what it last saw against
/// what is current.
pub struct OwnershipHub {
    tx: tokio::sync::watch::Sender<Option<Arc<Owners>>>,
    pool: PgPool,
    interval: Duration,
    running: Mutex<bool>,
    polls: std::sync::atomic::AtomicU64,
}

impl OwnershipHub {
    fn new(pool: PgPool, interval: Duration) -> Arc<Self> {
        Arc::new(Self {
            tx: tokio::sync::watch::channel(None).0,
            pool,
            interval,
            running: Mutex::new(false),
            polls: Default::default(),
        })
    }

    /// Lease reads done so far (tests check that streams share them).
    pub fn polls(&self) -> u64 {
        self.polls.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A receiver of the current owners; starts the poller if it is not running.
    fn subscribe(self: &Arc<Self>) -> tokio::sync::watch::Receiver<Option<Arc<Owners>>> {
        let mut running = self.running.lock().expect("hub lock");
        let rx = self.tx.subscribe();
        if !*running {
            *running = true;
            let hub = self.clone();
            tokio::spawn(async move { hub.poll().await });
        }
        rx
    }

    async fn poll(self: Arc<Self>) {
        loop {
            {
                // Decided under the lock `subscribe` takes: a stream that subscribes
                // after this either sees the poller running or starts a new one.
                let mut running = self.running.lock().expect("hub lock");
                if self.tx.receiver_count() == 0 {
                    *running = false;
                    // Start the next subscriber from a fresh read, not a stale one.
                    self.tx.send_replace(None);
                    return;
                }
            }
            self.polls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            match PgAdminStore::from(&self.pool).leases().await {
                Ok(rows) => {
                    let now = Utc::now();
                    let owners: Owners = rows
                        .into_iter()
                        .filter_map(|l| {
                            let owner = l.owner_node?;
                            (l.lease_expires_at? > now).then(|| {
                                let node_id = owner.split('/').next().unwrap_or_default().to_string();
                                (l.partition as u32, Holder { node_id, epoch: l.epoch })
                            })
                        })
                        .collect();
                    self.tx.send_if_modified(|cur| {
                        if cur.as_deref() == Some(&owners) {
                            false
                        } else {
                            *cur = Some(Arc::new(owners));
                            true
                        }
                    });
                }
                // A database blip: the next poll tries again; streams keep what they saw.
                Err(e) => tracing::debug!(error = %e, "ownership poll failed"),
            }
            tokio::time::sleep(self.interval).await;
        }
    }
}

/// Feed one watcher: membership changes from gossip, ownership changes from the shared
/// poller. Ends when the client goes away.
async fn watch(
    api: Api,
    mut owners_rx: tokio::sync::watch::Receiver<Option<Arc<Owners>>>,
    tx: tokio::sync::mpsc::Sender<Result<pb::OwnershipEvent, Status>>,
) {
    let mut view = api.node.membership().map(|m| m.view());
    let member_map = |v: &mut tokio::sync::watch::Receiver<_>| -> BTreeMap<String, String> {
        let members: &Vec<warden_cluster::Member> = &v.borrow_and_update();
        members.iter().map(|m| (m.node_id.clone(), m.state.as_str().to_string())).collect()
    };
    let mut members: BTreeMap<String, String> = view.as_mut().map(member_map).unwrap_or_default();
    let first = tokio::time::timeout(FIRST_SNAPSHOT_WAIT, async {
        owners_rx.wait_for(|o| o.is_some()).await.ok().and_then(|o| o.clone())
    })
    .await;
    let mut owners: Arc<Owners> = match first {
        Ok(Some(o)) => o,
        _ => {
            let _ = tx.send(Err(Status::unavailable("database unavailable, try again"))).await;
            return;
        }
    };
    if tx.send(Ok(event("snapshot"))).await.is_err() {
        return;
    }
    loop {
        let out = tokio::select! {
            _ = tx.closed() => return,
            changed = owners_rx.changed() => {
                if changed.is_err() {
                    return;
                }
                let Some(now) = owners_rx.borrow_and_update().clone() else { continue };
                let out = ownership_events(&owners, &now);
                owners = now;
                out
            }
            changed = async {
                match view.as_mut() {
                    Some(v) => v.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            } => {
                if !changed {
                    view = None;
                    continue;
                }
                let now = member_map(view.as_mut().expect("checked above"));
                let out = member_events(&members, &now);
                members = now;
                out
            }
        };
        for e in out {
            if tx.send(Ok(e)).await.is_err() {
                return;
            }
        }
    }
}

#[tonic::async_trait]
impl Jobs for Api {
    async fn enqueue(&self, r: Request<pb::EnqueueRequest>) -> Result<Response<pb::EnqueueResponse>, Status> {
        let _permit = self.admit_weighted(0.0).await?; // producers: not rate-limited
        let job = new_job(r.into_inner().job)?;
        let e = self.client.enqueue(job).await.map_err(|e| self.status(e))?;
        Ok(Response::new(pb::EnqueueResponse { id: e.id, duplicate: e.duplicate }))
    }

    async fn enqueue_batch(
        &self,
        r: Request<pb::EnqueueBatchRequest>,
    ) -> Result<Response<pb::EnqueueBatchResponse>, Status> {
        let _permit = self.admit_weighted(0.0).await?; // producers: not rate-limited
        let jobs = r.into_inner().jobs;
        if jobs.is_empty() {
            return Err(Status::invalid_argument("jobs must not be empty"));
        }
        if jobs.len() > MAX_API_ENQUEUE_BATCH {
            return Err(Status::invalid_argument(format!(
                "batch of {} jobs; the limit is {MAX_API_ENQUEUE_BATCH}",
                jobs.len()
            )));
        }
        let jobs = jobs
            .into_iter()
            .enumerate()
            .map(|(i, j)| new_job(Some(j)).map_err(|s| Status::invalid_argument(format!("jobs[{i}]: {}", s.message()))))
            .collect::<Result<Vec<_>, _>>()?;
        let out = self.client.enqueue_many(&jobs).await.map_err(|e| self.status(e))?;
        Ok(Response::new(pb::EnqueueBatchResponse {
            results: out.into_iter().map(|e| pb::EnqueueResponse { id: e.id, duplicate: e.duplicate }).collect(),
        }))
    }

    async fn get_job(&self, r: Request<pb::GetJobRequest>) -> Result<Response<pb::GetJobResponse>, Status> {
        let _permit = self.admit().await?;
        let r = r.into_inner();
        let id = positive_id(r.id)?;
        let page = page_size("attempts_page_size", r.attempts_page_size)?;
        let after_id = page_token("attempts_page_token", &r.attempts_page_token)?.unwrap_or(0);
        let job =
            self.client.get(id).await.map_err(|e| self.status(e))?.ok_or_else(|| status(Error::JobNotFound(id)))?;
        let admin = PgAdminStore::from(self.pool());
        let progress = admin.job_progress(&[id]).await.map_err(|e| self.status(e))?;
        let mut attempts = admin.attempts_page(id, after_id, page as i64 + 1).await.map_err(|e| self.status(e))?;
        let next_attempts_page_token = if attempts.len() > page as usize {
            attempts.truncate(page as usize);
            attempts.last().map(|a| a.id.to_string()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::GetJobResponse {
            job: Some(job_with_progress(&job, progress.jobs.get(&id), progress.read_at)),
            attempts: attempts.iter().map(attempt_pb).collect(),
            next_attempts_page_token,
            read_at_unix_ms: ms(progress.read_at),
        }))
    }

    async fn list_jobs(&self, r: Request<pb::ListJobsRequest>) -> Result<Response<pb::ListJobsResponse>, Status> {
        let _permit = self.admit_weighted(HEAVY_CALL_COST).await?;
        let r = r.into_inner();
        let page = page_size("page_size", r.page_size)?;
        let before_id = page_token("page_token", &r.page_token)?;
        let nonempty = |s: String| (!s.is_empty()).then_some(s);
        if !r.state.is_empty() && crate::job::JobState::parse(&r.state).is_none() {
            return Err(Status::invalid_argument(format!(
                "unknown state {:?}; expected one of scheduled, available, running, retryable, completed, discarded, cancelled",
                r.state
            )));
        }
        let filter = store::JobFilter {
            account: nonempty(r.account),
            kind: nonempty(r.kind),
            state: nonempty(r.state),
            before_id,
            limit: page as i64,
        };
        let admin = PgAdminStore::from(self.pool());
        let found = admin.list_jobs(&filter).await.map_err(|e| self.status(e))?;
        let ids: Vec<i64> = found.jobs.iter().map(|j| j.id).collect();
        let progress = admin.job_progress(&ids).await.map_err(|e| self.status(e))?;
        Ok(Response::new(pb::ListJobsResponse {
            jobs: found.jobs.iter().map(|j| job_with_progress(j, progress.jobs.get(&j.id), progress.read_at)).collect(),
            next_page_token: found.next_before_id.map(|id| id.to_string()).unwrap_or_default(),
            read_at_unix_ms: ms(progress.read_at),
        }))
    }

    async fn cancel_job(&self, r: Request<pb::CancelJobRequest>) -> Result<Response<pb::CancelJobResponse>, Status> {
        let _permit = self.admit().await?;
        let id = positive_id(r.into_inner().id)?;
        let (result, state) = match self.client.cancel(id).await.map_err(|e| self.status(e))? {
            CancelResult::Cancelled => ("cancelled", "cancelled".to_string()),
            CancelResult::CancelRequested => ("cancel_requested", "running".to_string()),
            CancelResult::AlreadyFinished { state } => ("already_finished", state),
        };
        Ok(Response::new(pb::CancelJobResponse { result: result.into(), state }))
    }

    async fn retry_job(&self, r: Request<pb::RetryJobRequest>) -> Result<Response<pb::RetryJobResponse>, Status> {
        let _permit = self.admit().await?;
        let id = positive_id(r.into_inner().id)?;
        let job = self.client.retry(id).await.map_err(|e| self.status(e))?;
        Ok(Response::new(pb::RetryJobResponse { job: Some(job_pb(&job)) }))
    }

    async fn queue_stats(
        &self,
        _r: Request<pb::QueueStatsRequest>,
    ) -> Result<Response<pb::QueueStatsResponse>, Status> {
        let _permit = self.admit_weighted(HEAVY_CALL_COST).await?;
        let depth = PgAdminStore::from(self.pool())
            .queue_depth(self.limits.stats_partition_cap)
            .await
            .map_err(|e| self.status(e))?;
        let oldest = PgAdminStore::from(self.pool()).oldest_due_age().await.map_err(|e| self.status(e))?;
        Ok(Response::new(pb::QueueStatsResponse {
            by_state: depth.state_counts().0.into_iter().collect(),
            backlog_by_node: depth.backlog_by_node().into_iter().collect(),
            top_partitions: depth
                .top_partitions(20)
                .into_iter()
                .map(|p| pb::PartitionBacklog {
                    partition: p.partition,
                    backlog: p.unfinished(),
                    owner: p.holder.clone().unwrap_or_default(),
                    capped: p.capped,
                })
                .collect(),
            oldest_due_age_ms: oldest.map(|d| d.as_millis() as i64).unwrap_or(0),
            estimated_states: if depth.finished_estimated {
                store::FINISHED_STATES.iter().map(|s| s.to_string()).collect()
            } else {
                Vec::new()
            },
            capped: depth.capped(),
            partition_count_cap: depth.cap,
        }))
    }
}

#[tonic::async_trait]
impl Schedules for Api {
    async fn put_schedule(&self, r: Request<pb::PutScheduleRequest>) -> Result<Response<pb::ScheduleResponse>, Status> {
        let _permit = self.admit().await?;
        let def = schedule_def(r.into_inner().schedule)?;
        let row = self.client.schedules().put(&def).await.map_err(|e| self.status(e))?;
        Ok(Response::new(pb::ScheduleResponse { schedule: Some(schedule_pb(&row)) }))
    }

    async fn get_schedule(&self, r: Request<pb::ScheduleRef>) -> Result<Response<pb::ScheduleResponse>, Status> {
        let _permit = self.admit().await?;
        let r = r.into_inner();
        let (account, name) = schedule_ref(&r)?;
        let row = self
            .client
            .schedules()
            .get(account, name)
            .await
            .map_err(|e| self.status(e))?
            .ok_or_else(|| status(Error::ScheduleNotFound { account: account.into(), name: name.into() }))?;
        Ok(Response::new(pb::ScheduleResponse { schedule: Some(schedule_pb(&row)) }))
    }

    async fn list_schedules(
        &self,
        r: Request<pb::ListSchedulesRequest>,
    ) -> Result<Response<pb::ListSchedulesResponse>, Status> {
        let _permit = self.admit_weighted(HEAVY_CALL_COST).await?;
        let r = r.into_inner();
        let page = page_size("page_size", r.page_size)?;
        let after_id = page_token("page_token", &r.page_token)?.unwrap_or(0);
        let account = (!r.account.is_empty()).then_some(r.account.as_str());
        // One more than the page: the next page token only when there is a next page.
        let mut rows =
            self.client.schedules().list(account, after_id, page as i64 + 1).await.map_err(|e| self.status(e))?;
        let next_page_token = if rows.len() > page as usize {
            rows.truncate(page as usize);
            rows.last().map(|s| s.id.to_string()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListSchedulesResponse {
            schedules: rows.iter().map(schedule_pb).collect(),
            next_page_token,
        }))
    }

    async fn pause_schedule(&self, r: Request<pb::ScheduleRef>) -> Result<Response<pb::ScheduleResponse>, Status> {
        let _permit = self.admit().await?;
        let r = r.into_inner();
        let (account, name) = schedule_ref(&r)?;
        let row = self.client.schedules().pause(account, name).await.map_err(|e| self.status(e))?;
        Ok(Response::new(pb::ScheduleResponse { schedule: Some(schedule_pb(&row)) }))
    }

    async fn resume_schedule(&self, r: Request<pb::ScheduleRef>) -> Result<Response<pb::ScheduleResponse>, Status> {
        let _permit = self.admit().await?;
        let r = r.into_inner();
        let (account, name) = schedule_ref(&r)?;
        let row = self.client.schedules().resume(account, name).await.map_err(|e| self.status(e))?;
        Ok(Response::new(pb::ScheduleResponse { schedule: Some(schedule_pb(&row)) }))
    }

    async fn trigger_schedule(
        &self,
        r: Request<pb::ScheduleRef>,
    ) -> Result<Response<pb::TriggerScheduleResponse>, Status> {
        let _permit = self.admit().await?;
        let r = r.into_inner();
        let (account, name) = schedule_ref(&r)?;
        let job_id = self.client.schedules().trigger(account, name).await.map_err(|e| self.status(e))?;
        Ok(Response::new(pb::TriggerScheduleResponse { job_id }))
    }

    async fn backfill_schedule(
        &self,
        r: Request<pb::BackfillScheduleRequest>,
    ) -> Result<Response<pb::BackfillScheduleResponse>, Status> {
        // Up to MAX_BACKFILL jobs in one transaction: priced as a heavy call.
        let _permit = self.admit_weighted(HEAVY_CALL_COST).await?;
        let r = r.into_inner();
        let (account, name) = schedule_key(&r.account, &r.name)?;
        let (from, to) = (unix_time("from_unix_ms", r.from_unix_ms)?, unix_time("to_unix_ms", r.to_unix_ms)?);
        let b = self.client.schedules().backfill(account, name, from, to).await.map_err(|e| self.status(e))?;
        Ok(Response::new(pb::BackfillScheduleResponse { job_ids: b.jobs, already_fired: b.already_fired as u32 }))
    }

    async fn delete_schedule(
        &self,
        r: Request<pb::ScheduleRef>,
    ) -> Result<Response<pb::DeleteScheduleResponse>, Status> {
        let _permit = self.admit().await?;
        let r = r.into_inner();
        let (account, name) = schedule_ref(&r)?;
        if !self.client.schedules().delete(account, name).await.map_err(|e| self.status(e))? {
            return Err(status(Error::ScheduleNotFound { account: account.into(), name: name.into() }));
        }
        Ok(Response::new(pb::DeleteScheduleResponse {}))
    }
}

/// Bearer-token check; `None` accepts every call.
#[derive(Clone)]
pub struct Auth(Option<std::sync::Arc<str>>);

impl Auth {
    pub fn new(token: Option<String>) -> Self {
        Self(token.filter(|t| !t.is_empty()).map(Into::into))
    }

    #[allow(clippy::result_large_err)]
    fn check(&self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(token) = &self.0 else { return Ok(req) };
        let given =
            req.metadata().get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        match given {
            // Constant-time comparison: do not leak the token length-prefix by timing.
            Some(g)
                if g.len() == token.len()
                    && g.bytes().zip(token.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0 =>
            {
                Ok(req)
            }
            _ => Err(Status::unauthenticated("missing or invalid bearer token")),
        }
    }
}

/// TLS for the gRPC port: PEM certificate chain and private key.
#[derive(Clone)]
pub struct Tls {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

/// Serve the gRPC services on `listener` until `shutdown` (plain HTTP/2).
pub async fn serve(
    listener: tokio::net::TcpListener,
    node: Node,
    auth: Auth,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    serve_with(listener, node, auth, None, shutdown).await
}

/// Serve the gRPC services, with TLS (rustls) when `tls` is given.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    node: Node,
    auth: Auth,
    tls: Option<Tls>,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    serve_api(listener, Api::new(node), auth, tls, shutdown).await
}

/// Serve `api` (built with [`Api::with_limits`] for other budgets than the default).
pub async fn serve_api(
    listener: tokio::net::TcpListener,
    api: Api,
    auth: Auth,
    tls: Option<Tls>,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let (a1, a2, a3) = (auth.clone(), auth.clone(), auth);
    let cluster = tonic::service::interceptor::InterceptedService::new(
        ClusterServer::new(api.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES),
        move |r| a1.check(r),
    );
    let jobs = tonic::service::interceptor::InterceptedService::new(
        JobsServer::new(api.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES),
        move |r| a2.check(r),
    );
    let schedules = tonic::service::interceptor::InterceptedService::new(
        SchedulesServer::new(api).max_decoding_message_size(MAX_MESSAGE_BYTES),
        move |r| a3.check(r),
    );
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(
            tonic::transport::ServerTlsConfig::new()
                .identity(tonic::transport::Identity::from_pem(tls.cert_pem, tls.key_pem)),
        )?;
    }
    builder
        .concurrency_limit_per_connection(MAX_CONCURRENT_PER_CONNECTION)
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        // A vanished client's watch streams give their slots back within ~40 s.
        .http2_keepalive_interval(Some(HTTP2_KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE_TIMEOUT))
        .timeout(REQUEST_TIMEOUT)
        .add_service(cluster)
        .add_service(jobs)
        .add_service(schedules)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown.cancelled_owned(),
        )
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owners(v: &[(u32, &str, i64)]) -> Owners {
        v.iter().map(|(p, o, e)| (*p, Holder { node_id: o.to_string(), epoch: *e })).collect()
    }

    fn kinds(events: &[pb::OwnershipEvent]) -> Vec<(String, u32)> {
        events.iter().map(|e| (e.kind.clone(), e.partition)).collect()
    }

    #[test]
    fn ownership_events_name_every_change_and_nothing_else() {
        let old = owners(&[(0, "a", 1), (1, "a", 1), (2, "b", 3), (3, "b", 3)]);
        let new = owners(&[(0, "a", 1), (1, "b", 2), (2, "b", 4), (4, "c", 1)]);
        let mut got = kinds(&ownership_events(&old, &new));
        got.sort();
        let want = vec![("acquired".into(), 2), ("acquired".into(), 4), ("moved".into(), 1), ("released".into(), 3)];
        assert_eq!(got, want);
        assert!(ownership_events(&new, &new).is_empty());
    }

    #[test]
    fn a_slow_reader_gets_the_net_change_between_what_it_saw_and_now() {
        // a → b → a again while the reader was away: same owner, new epoch.
        let seen = owners(&[(7, "a", 1)]);
        let now = owners(&[(7, "a", 3)]);
        assert_eq!(kinds(&ownership_events(&seen, &now)), vec![("acquired".to_string(), 7)]);
    }

    #[test]
    fn member_events_report_joins_state_changes_and_leaves() {
        let m = |v: &[(&str, &str)]| -> BTreeMap<String, String> {
            v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
        };
        let ev = member_events(&m(&[("a", "active"), ("b", "joining")]), &m(&[("b", "active"), ("c", "joining")]));
        let got: Vec<(String, String)> = ev.iter().map(|e| (e.kind.clone(), e.node_id.clone())).collect();
        assert_eq!(
            got,
            vec![
                ("member_state".to_string(), "b".to_string()),
                ("member_joined".into(), "c".into()),
                ("member_left".into(), "a".into())
            ]
        );
    }

    #[test]
    fn page_sizes_and_tokens_are_checked() {
        assert_eq!(page_size("p", 0).unwrap(), DEFAULT_PAGE);
        assert_eq!(page_size("p", MAX_PAGE).unwrap(), MAX_PAGE);
        assert!(page_size("p", MAX_PAGE + 1).unwrap_err().message().contains("limit of 500"));
        assert_eq!(page_token("t", "").unwrap(), None);
        assert_eq!(page_token("t", "42").unwrap(), Some(42));
        for bad in ["0", "-3", "x", "1.5"] {
            assert_eq!(page_token("t", bad).unwrap_err().code(), tonic::Code::InvalidArgument, "{bad}");
        }
    }

    #[test]
    fn default_limits_are_valid_and_zero_budgets_are_not() {
        assert!(ApiLimits::default().validate().is_ok());
        assert!(ApiLimits { max_in_flight: 0, ..Default::default() }.validate().is_err());
        assert!(ApiLimits { max_watch_streams: 0, ..Default::default() }.validate().is_err());
        assert!(ApiLimits { stats_partition_cap: 0, ..Default::default() }.validate().is_err());
    }
}
