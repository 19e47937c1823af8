//! The gRPC API (`proto/warden.proto`): cluster observation and job operations,
//! served by every node. Errors are mapped to `tonic::Status` in one place
//! ([`status`]) and never carry SQL or internal detail.
//!
//! Limits: a batch enqueue takes at most [`MAX_BATCH`] jobs, a page at most
//! [`MAX_PAGE`] jobs, a request at most 4 MiB; each connection runs at most
//! [`MAX_CONCURRENT_PER_CONNECTION`] requests at once and each request has a
//! [`REQUEST_TIMEOUT`]. Optional bearer-token authentication.

use crate::error::Error;
use crate::job::{AttemptRow, CancelResult, JobRow, Lane, NewJob};
use crate::node::Node;
use crate::store;
use chrono::{DateTime, TimeZone, Utc};
use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::time::Duration;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

pub mod pb {
    tonic::include_proto!("warden.v1");
}

use pb::cluster_server::{Cluster, ClusterServer};
use pb::jobs_server::{Jobs, JobsServer};

pub const MAX_BATCH: usize = 1000;
pub const MAX_PAGE: u32 = 500;
pub const DEFAULT_PAGE: u32 = 50;
pub const MAX_CONCURRENT_PER_CONNECTION: usize = 32;
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// Map a runtime error to a client-facing status without leaking internals.
pub fn status(e: Error) -> Status {
    match e {
        Error::InvalidInput(m) => Status::invalid_argument(m),
        Error::JobNotFound(id) => Status::not_found(format!("job {id} not found")),
        Error::NotInitialised => Status::failed_precondition("cluster schema not initialised"),
        Error::Conflict(m) => Status::aborted(m),
        Error::Timeout(_) => Status::unavailable("database unavailable, try again"),
        Error::Database(ref db) if is_unavailable(db) => {
            tracing::warn!(error = %e, "API request failed: database unavailable");
            Status::unavailable("database unavailable, try again")
        }
        other => {
            tracing::error!(error = %other, "API request failed");
            Status::internal("internal error")
        }
    }
}

fn is_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Tls(_) => true,
        // 57P01 admin shutdown, 57P03 cannot connect now, 08xxx connection exceptions.
        sqlx::Error::Database(d) => d.code().is_some_and(|c| c.starts_with("08") || c == "57P01" || c == "57P03"),
        _ => false,
    }
}

fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn job_pb(j: &JobRow) -> pb::Job {
    pb::Job {
        id: j.id,
        account: j.account.clone(),
        partition: j.partition as u32,
        kind: j.kind.clone(),
        args_json: j.args.to_string(),
        lane: j.lane.clone(),
        state: j.state.clone(),
        priority: j.priority as i32,
        run_at_unix_ms: ms(j.run_at),
        due_at_unix_ms: ms(j.due_at),
        attempt: j.attempt,
        max_attempts: j.max_attempts,
        unique_key: j.unique_key.clone().unwrap_or_default(),
        node: j.node.clone().unwrap_or_default(),
        epoch: j.epoch.unwrap_or(0),
        created_at_unix_ms: ms(j.created_at),
        finished_at_unix_ms: j.finished_at.map(ms).unwrap_or(0),
        last_error: j.last_error.clone().unwrap_or_default(),
    }
}

fn attempt_pb(a: &AttemptRow) -> pb::Attempt {
    pb::Attempt {
        attempt: a.attempt,
        node: a.node.clone(),
        epoch: a.epoch,
        started_at_unix_ms: ms(a.started_at),
        finished_at_unix_ms: ms(a.finished_at),
        outcome: a.outcome.clone(),
        error: a.error.clone().unwrap_or_default(),
    }
}

/// Validate and convert a wire job (all checks before the database).
fn new_job(j: Option<pb::NewJob>) -> Result<NewJob, Status> {
    let j = j.ok_or_else(|| Status::invalid_argument("job is required"))?;
    let args: serde_json::Value = if j.args_json.trim().is_empty() {
        serde_json::json!({})
    } else {
        if j.args_json.len() > crate::job::MAX_ARGS_BYTES {
            return Err(Status::invalid_argument(format!(
                "args_json is {} bytes; the limit is {}",
                j.args_json.len(),
                crate::job::MAX_ARGS_BYTES
            )));
        }
        serde_json::from_str(&j.args_json)
            .map_err(|e| Status::invalid_argument(format!("args_json is not valid JSON: {e}")))?
    };
    let mut job = NewJob::new(j.account, j.kind, args).map_err(status)?;
    if j.run_at_unix_ms != 0 {
        let at = Utc
            .timestamp_millis_opt(j.run_at_unix_ms)
            .single()
            .ok_or_else(|| Status::invalid_argument("run_at_unix_ms is out of range"))?;
        job = job.run_at(at);
    } else if j.delay_ms != 0 {
        job = job.delay(Duration::from_millis(j.delay_ms));
    }
    let priority = i16::try_from(j.priority).map_err(|_| Status::invalid_argument("priority must fit in 16 bits"))?;
    job = job.priority(priority);
    if j.max_attempts < 0 {
        return Err(Status::invalid_argument("max_attempts must not be negative"));
    }
    if j.max_attempts != 0 {
        job = job.max_attempts(j.max_attempts);
    }
    if j.timeout_ms != 0 {
        job = job.timeout(Duration::from_millis(j.timeout_ms));
    }
    if !j.unique_key.is_empty() {
        job = job.unique_key(j.unique_key);
    }
    if !j.lane.is_empty() {
        let lane = Lane::parse(&j.lane).ok_or_else(|| Status::invalid_argument("lane must be serial or unordered"))?;
        job = job.lane(lane);
    }
    job.validate().map_err(status)?;
    Ok(job)
}

fn positive_id(id: i64) -> Result<i64, Status> {
    if id <= 0 {
        return Err(Status::invalid_argument("id must be a positive job id"));
    }
    Ok(id)
}

/// The service implementation, shared by both gRPC services.
#[derive(Clone)]
pub struct Api {
    node: Node,
}

impl Api {
    pub fn new(node: Node) -> Self {
        Self { node }
    }

    fn pool(&self) -> &sqlx::PgPool {
        self.node.pool()
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
        let rows = store::leases(self.pool()).await.map_err(status)?;
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
        let actual = self.actual().await?;
        let mut held: BTreeMap<String, u32> = BTreeMap::new();
        for (owner, _, _) in actual.values() {
            *held.entry(owner.clone()).or_default() += 1;
        }
        let backlog: HashMap<String, i64> =
            store::backlog_by_node(self.pool()).await.map_err(status)?.into_iter().collect();
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
        let account = r.into_inner().account;
        crate::job::validate_name("account", &account, crate::job::MAX_ACCOUNT_BYTES).map_err(status)?;
        let partition = crate::partition_of(&account, self.node.config().partitions);
        let actual = self.actual().await?;
        let (actual_owner, epoch, _) = actual.get(&partition).cloned().unwrap_or_default();
        let here = self.node.lease_table().holds(partition);
        let (next, unfinished) = store::account_queue(self.pool(), &account).await.map_err(status)?;
        Ok(Response::new(pb::LocateResponse {
            account: account.clone(),
            partition,
            desired_owner: self.desired_owner(partition),
            actual_owner,
            epoch,
            actor_running: here && self.node.account_actors().contains(&account),
            answered_by_owner: here,
            next_due_job: next.as_ref().map(job_pb),
            unfinished_jobs: unfinished.max(0) as u64,
        }))
    }

    async fn node_stats(&self, _r: Request<pb::NodeStatsRequest>) -> Result<Response<pb::NodeStatsResponse>, Status> {
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
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let api = self.clone();
        tokio::spawn(async move { watch(api, tx).await });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}

fn event(kind: &str) -> pb::OwnershipEvent {
    pb::OwnershipEvent { at_unix_ms: Utc::now().timestamp_millis(), kind: kind.into(), ..Default::default() }
}

/// Feed one watcher: membership changes from gossip, ownership changes from the lease
/// table (polled every 200 ms). Ends when the client goes away.
async fn watch(api: Api, tx: tokio::sync::mpsc::Sender<Result<pb::OwnershipEvent, Status>>) {
    let mut view = api.node.membership().map(|m| m.view());
    let mut members: BTreeMap<String, String> = view
        .as_mut()
        .map(|v| v.borrow_and_update().iter().map(|m| (m.node_id.clone(), m.state.as_str().to_string())).collect())
        .unwrap_or_default();
    let mut owners = match api.actual().await {
        Ok(o) => o,
        Err(s) => {
            let _ = tx.send(Err(s)).await;
            return;
        }
    };
    if tx.send(Ok(event("snapshot"))).await.is_err() {
        return;
    }
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = tx.closed() => return,
            _ = tick.tick() => {
                let now = match api.actual().await {
                    Ok(o) => o,
                    Err(_) => continue, // database blip: try again next tick
                };
                let mut out = Vec::new();
                for (p, (owner, epoch, _)) in &now {
                    match owners.get(p) {
                        None => out.push(pb::OwnershipEvent { partition: *p, to_owner: owner.clone(), epoch: *epoch, ..event("acquired") }),
                        Some((old, old_epoch, _)) if old != owner => out.push(pb::OwnershipEvent {
                            partition: *p, from_owner: old.clone(), to_owner: owner.clone(), epoch: *epoch, ..event("moved")
                        }),
                        Some((_, old_epoch, _)) if old_epoch != epoch => out.push(pb::OwnershipEvent {
                            partition: *p, to_owner: owner.clone(), epoch: *epoch, ..event("acquired")
                        }),
                        _ => {}
                    }
                }
                for (p, (owner, epoch, _)) in &owners {
                    if !now.contains_key(p) {
                        out.push(pb::OwnershipEvent { partition: *p, from_owner: owner.clone(), epoch: *epoch, ..event("released") });
                    }
                }
                owners = now;
                for e in out {
                    if tx.send(Ok(e)).await.is_err() {
                        return;
                    }
                }
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
                let now: BTreeMap<String, String> = view.as_mut().unwrap().borrow_and_update().iter()
                    .map(|m| (m.node_id.clone(), m.state.as_str().to_string())).collect();
                let mut out = Vec::new();
                for (id, st) in &now {
                    match members.get(id) {
                        None => out.push(pb::OwnershipEvent { node_id: id.clone(), state: st.clone(), ..event("member_joined") }),
                        Some(old) if old != st => out.push(pb::OwnershipEvent { node_id: id.clone(), state: st.clone(), ..event("member_state") }),
                        _ => {}
                    }
                }
                for id in members.keys() {
                    if !now.contains_key(id) {
                        out.push(pb::OwnershipEvent { node_id: id.clone(), ..event("member_left") });
                    }
                }
                members = now;
                for e in out {
                    if tx.send(Ok(e)).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

#[tonic::async_trait]
impl Jobs for Api {
    async fn enqueue(&self, r: Request<pb::EnqueueRequest>) -> Result<Response<pb::EnqueueResponse>, Status> {
        let job = new_job(r.into_inner().job)?;
        let e = self.node.client().enqueue(job).await.map_err(status)?;
        Ok(Response::new(pb::EnqueueResponse { id: e.id, duplicate: e.duplicate }))
    }

    async fn enqueue_batch(
        &self,
        r: Request<pb::EnqueueBatchRequest>,
    ) -> Result<Response<pb::EnqueueBatchResponse>, Status> {
        let jobs = r.into_inner().jobs;
        if jobs.is_empty() {
            return Err(Status::invalid_argument("jobs must not be empty"));
        }
        if jobs.len() > MAX_BATCH {
            return Err(Status::invalid_argument(format!("batch of {} jobs; the limit is {MAX_BATCH}", jobs.len())));
        }
        let jobs = jobs
            .into_iter()
            .enumerate()
            .map(|(i, j)| new_job(Some(j)).map_err(|s| Status::invalid_argument(format!("jobs[{i}]: {}", s.message()))))
            .collect::<Result<Vec<_>, _>>()?;
        let out = self.node.client().enqueue_many(&jobs).await.map_err(status)?;
        Ok(Response::new(pb::EnqueueBatchResponse {
            results: out.into_iter().map(|e| pb::EnqueueResponse { id: e.id, duplicate: e.duplicate }).collect(),
        }))
    }

    async fn get_job(&self, r: Request<pb::GetJobRequest>) -> Result<Response<pb::GetJobResponse>, Status> {
        let id = positive_id(r.into_inner().id)?;
        let job = self.node.client().get(id).await.map_err(status)?.ok_or_else(|| status(Error::JobNotFound(id)))?;
        let attempts = self.node.client().attempts(id).await.map_err(status)?;
        Ok(Response::new(pb::GetJobResponse {
            job: Some(job_pb(&job)),
            attempts: attempts.iter().map(attempt_pb).collect(),
        }))
    }

    async fn list_jobs(&self, r: Request<pb::ListJobsRequest>) -> Result<Response<pb::ListJobsResponse>, Status> {
        let r = r.into_inner();
        let page = if r.page_size == 0 { DEFAULT_PAGE } else { r.page_size };
        if page > MAX_PAGE {
            return Err(Status::invalid_argument(format!("page_size {page} exceeds the limit of {MAX_PAGE}")));
        }
        let before_id = if r.page_token.is_empty() {
            None
        } else {
            Some(
                r.page_token
                    .parse::<i64>()
                    .ok()
                    .filter(|v| *v > 0)
                    .ok_or_else(|| Status::invalid_argument("invalid page_token"))?,
            )
        };
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
            limit: page as i64 + 1,
        };
        let mut jobs = store::list_jobs(self.pool(), &filter).await.map_err(status)?;
        let next_page_token = if jobs.len() > page as usize {
            jobs.truncate(page as usize);
            jobs.last().map(|j| j.id.to_string()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListJobsResponse { jobs: jobs.iter().map(job_pb).collect(), next_page_token }))
    }

    async fn cancel_job(&self, r: Request<pb::CancelJobRequest>) -> Result<Response<pb::CancelJobResponse>, Status> {
        let id = positive_id(r.into_inner().id)?;
        let (result, state) = match self.node.client().cancel(id).await.map_err(status)? {
            CancelResult::Cancelled => ("cancelled", "cancelled".to_string()),
            CancelResult::CancelRequested => ("cancel_requested", "running".to_string()),
            CancelResult::AlreadyFinished { state } => ("already_finished", state),
        };
        Ok(Response::new(pb::CancelJobResponse { result: result.into(), state }))
    }

    async fn retry_job(&self, r: Request<pb::RetryJobRequest>) -> Result<Response<pb::RetryJobResponse>, Status> {
        let id = positive_id(r.into_inner().id)?;
        let job = self.node.client().retry(id).await.map_err(status)?;
        Ok(Response::new(pb::RetryJobResponse { job: Some(job_pb(&job)) }))
    }

    async fn queue_stats(
        &self,
        _r: Request<pb::QueueStatsRequest>,
    ) -> Result<Response<pb::QueueStatsResponse>, Status> {
        let by_state = self.node.client().state_counts().await.map_err(status)?.0.into_iter().collect();
        let backlog_by_node = store::backlog_by_node(self.pool()).await.map_err(status)?.into_iter().collect();
        let top = store::top_partition_backlogs(self.pool(), 20).await.map_err(status)?;
        let oldest = store::oldest_due_age(self.pool()).await.map_err(status)?;
        Ok(Response::new(pb::QueueStatsResponse {
            by_state,
            backlog_by_node,
            top_partitions: top
                .into_iter()
                .map(|(p, n, o)| pb::PartitionBacklog { partition: p as u32, backlog: n, owner: o.unwrap_or_default() })
                .collect(),
            oldest_due_age_ms: oldest.map(|d| d.as_millis() as i64).unwrap_or(0),
        }))
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

/// Serve both services on `listener` until `shutdown` (plain HTTP/2).
pub async fn serve(
    listener: tokio::net::TcpListener,
    node: Node,
    auth: Auth,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    serve_with(listener, node, auth, None, shutdown).await
}

/// Serve both services, with TLS (rustls) when `tls` is given.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    node: Node,
    auth: Auth,
    tls: Option<Tls>,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let api = Api::new(node);
    let (a1, a2) = (auth.clone(), auth);
    let cluster = tonic::service::interceptor::InterceptedService::new(
        ClusterServer::new(api.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES),
        move |r| a1.check(r),
    );
    let jobs = tonic::service::interceptor::InterceptedService::new(
        JobsServer::new(api).max_decoding_message_size(MAX_MESSAGE_BYTES),
        move |r| a2.check(r),
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
        .timeout(REQUEST_TIMEOUT)
        .add_service(cluster)
        .add_service(jobs)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown.cancelled_owned(),
        )
        .await
}
