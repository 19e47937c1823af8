//! The model store: an in-memory database whose rules mirror the SQL of
//! `runtime/src/store/sql/` statement by statement, behind the same seams as the
//! PostgreSQL store ([`Store`] and [`ProducerStore`]).
//!
//! Two users: the deterministic simulation (`tests/simulation.rs`) runs the real
//! ownership code against it under a paused clock, with a [`Network`] that gives every
//! statement a random round trip, holds statements back during an outage and applies
//! them even if the caller gave up; and the conformance suite
//! ([`crate::conformance`], `tests/conformance.rs`) runs the same scenarios against it
//! and against PostgreSQL, so the model cannot drift from the SQL.
//!
//! Clock: the model's clock is `tokio::time::Instant` (paused in the simulation, real
//! in the conformance suite); job times are that clock mapped onto UTC from the
//! moment the model was created. Leases expire by it, as PostgreSQL's leases expire
//! by the database clock.
//!
//! Not modelled (by design; the conformance suite says so where it matters): locks
//! and concurrency between statements (each statement applies atomically, under one
//! mutex — the fence lock's job in PostgreSQL), NOTIFY, handler transactions
//! ([`Store::begin`] is refused), the kinds table (a kind's defaults are 25 attempts /
//! 60 s unless the caller gives them), undecodable rows, and chunking of large lease
//! statements.

use chrono::{DateTime, Utc};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use warden_runtime::job::{AttemptRow, CancelResult, Enqueued, JobRow, NewJob, Schedule};
use warden_runtime::progress::{Beat, BeatAck, Progress, StoredCheckpoint};
use warden_runtime::store::{
    DueAccount, Fence, Finish, Finished, GrantedLease, JobTx, KindDefaults, MemberInfo, ProducerStore, RunningJob,
    Store,
};
use warden_runtime::{async_trait, partition_of, Error, PartitionCount, Result};

/// A duration in whole milliseconds, saturating (as the PostgreSQL store binds it).
fn ms(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

/// Unfinished states a serial head can be in (`jobs_account_open`).
const OPEN: [&str; 4] = ["scheduled", "available", "retryable", "running"];
/// States a claim can take a job from.
const CLAIMABLE: [&str; 3] = ["scheduled", "available", "retryable"];
const TERMINAL: [&str; 3] = ["completed", "discarded", "cancelled"];

/// One row of the modelled `warden.leases`.
#[derive(Clone, Debug)]
pub struct ModelLease {
    pub owner: Option<String>,
    pub epoch: i64,
    pub expires: Instant,
    /// When the lease came to its owner (`acquired_at`, schema v10).
    pub acquired: Option<Instant>,
}

/// One row of the modelled `warden.job_progress`.
#[derive(Clone, Debug, Default)]
pub struct ModelProgress {
    pub attempt: i32,
    pub epoch: i64,
    pub heartbeat_at: Option<DateTime<Utc>>,
    pub progress: Option<Progress>,
    pub checkpoint: Option<StoredCheckpoint>,
}

/// The modelled database: leases, jobs, attempts, members.
#[derive(Debug)]
pub struct ModelDb {
    pub leases: Vec<ModelLease>,
    pub jobs: BTreeMap<i64, JobRow>,
    pub attempts: Vec<AttemptRow>,
    /// `warden.job_progress`: job id → (writer's attempt, its checkpoint).
    pub progress: BTreeMap<i64, ModelProgress>,
    /// `warden.idempotency_keys`: (account, key) → (job id, expires at).
    pub idempotency_keys: BTreeMap<(String, String), (i64, DateTime<Utc>)>,
    /// Member id → last seen.
    pub members: BTreeMap<String, DateTime<Utc>>,
    partitions: PartitionCount,
    next_job_id: i64,
    /// The clock's origin: `origin.0` is `origin.1` in UTC.
    origin: (Instant, DateTime<Utc>),
}

/// The modelled database, shared by every node's connection to it.
pub type SharedDb = Arc<Mutex<ModelDb>>;

impl ModelDb {
    /// P partitions, every lease free at epoch 0 (as `init_partitions` leaves them).
    pub fn new(partitions: u32) -> ModelDb {
        let now = Instant::now();
        ModelDb {
            leases: (0..partitions)
                .map(|_| ModelLease { owner: None, epoch: 0, expires: now, acquired: None })
                .collect(),
            jobs: BTreeMap::new(),
            attempts: Vec::new(),
            progress: BTreeMap::new(),
            idempotency_keys: BTreeMap::new(),
            members: BTreeMap::new(),
            partitions: PartitionCount::new(partitions).expect("partition count"),
            next_job_id: 1,
            origin: (now, Utc::now()),
        }
    }

    pub fn shared(partitions: u32) -> SharedDb {
        Arc::new(Mutex::new(ModelDb::new(partitions)))
    }

    /// The model's clock in UTC.
    pub fn utc(&self, now: Instant) -> DateTime<Utc> {
        self.origin.1 + chrono::Duration::from_std(now.saturating_duration_since(self.origin.0)).expect("in range")
    }

    // --- leases (acquire.sql, RENEW_SQL, RELEASE_SQL, LEASE_WAIT_SQL) ---

    /// The lease rows a statement's partition list matches: each existing partition
    /// once, however often it is listed (`partition = ANY($n)`, or an `UPDATE … FROM
    /// unnest(…)`, which updates a row at most once).
    fn matched<T: Copy>(&self, list: &[T], partition: impl Fn(T) -> u32) -> Vec<T> {
        let mut seen = std::collections::BTreeSet::new();
        list.iter()
            .copied()
            .filter(|x| (partition(*x) as usize) < self.leases.len() && seen.insert(partition(*x)))
            .collect()
    }

    /// HOLDERS_SQL: live holders and their grant times (µs since the Unix epoch).
    pub fn lease_holders(&self, now: Instant) -> warden_runtime::Holders {
        self.leases
            .iter()
            .map(|l| match (&l.owner, l.expires > now) {
                (Some(owner), true) => Some(warden_runtime::Holder {
                    owner: warden_runtime::cluster::sticky::member_of_owner(owner).to_string(),
                    acquired_us: l.acquired.map_or(0, |a| self.utc(a).timestamp_micros()),
                }),
                _ => None,
            })
            .collect()
    }

    pub fn acquire(&mut self, owner: &str, partitions: &[u32], ttl: Duration, now: Instant) -> Vec<GrantedLease> {
        let mut granted = Vec::new();
        for p in self.matched(partitions, |p| p) {
            let d = &mut self.leases[p as usize];
            if d.owner.is_none() || d.owner.as_deref() == Some(owner) || d.expires < now {
                let kept = d.owner.as_deref() == Some(owner) && d.expires >= now && d.acquired.is_some();
                if !kept {
                    d.acquired = Some(now);
                }
                d.owner = Some(owner.to_string());
                d.epoch += 1;
                d.expires = now + ttl;
                granted.push(GrantedLease { partition: p, epoch: d.epoch });
            }
        }
        granted
    }

    pub fn renew(&mut self, owner: &str, held: &[GrantedLease], ttl: Duration, now: Instant) -> Vec<u32> {
        let mut renewed = Vec::new();
        for l in held {
            let Some(d) = self.leases.get_mut(l.partition as usize) else { continue };
            // A row is updated once however often it is listed.
            if renewed.contains(&l.partition) {
                continue;
            }
            if d.owner.as_deref() == Some(owner) && d.epoch == l.epoch && d.expires > now {
                d.expires = now + ttl;
                renewed.push(l.partition);
            }
        }
        renewed
    }

    pub fn release(&mut self, owner: &str, held: &[GrantedLease]) -> u64 {
        let mut n = 0;
        for l in held {
            let Some(d) = self.leases.get_mut(l.partition as usize) else { continue };
            if d.owner.as_deref() == Some(owner) && d.epoch == l.epoch {
                d.owner = None;
                n += 1;
            }
        }
        n
    }

    pub fn lease_wait(&self, owner: &str, partitions: &[u32], now: Instant) -> Option<Duration> {
        partitions
            .iter()
            .filter_map(|p| self.leases.get(*p as usize))
            .filter(|d| d.owner.as_ref().is_some_and(|o| o != owner))
            .map(|d| d.expires.saturating_duration_since(now))
            .min()
    }

    /// `warden.fence`: the lease holds exactly this owner and epoch, unexpired.
    pub fn fence_holds(&self, fence: &Fence, now: Instant) -> bool {
        self.leases
            .get(fence.partition as usize)
            .is_some_and(|d| d.owner.as_deref() == Some(&*fence.owner) && d.epoch == fence.epoch && d.expires > now)
    }

    // --- executor statements on jobs ---

    /// rescue.sql
    pub fn rescue(&mut self, owner: &str, acquired: &[GrantedLease], now: Instant) -> u64 {
        let at = self.utc(now);
        let held: Vec<GrantedLease> = acquired
            .iter()
            .filter(|h| {
                self.leases
                    .get(h.partition as usize)
                    .is_some_and(|d| d.owner.as_deref() == Some(owner) && d.epoch == h.epoch && d.expires > now)
            })
            .copied()
            .collect();
        let mut rescued = Vec::new();
        for h in held {
            for j in self.jobs.values_mut() {
                if j.partition as u32 != h.partition || j.state != "running" || j.epoch.is_some_and(|e| e >= h.epoch) {
                    continue;
                }
                let gives_up = j.cancel_requested || j.attempt >= j.max_attempts;
                j.state = if j.cancel_requested {
                    "cancelled"
                } else if j.attempt >= j.max_attempts {
                    "discarded"
                } else {
                    "retryable"
                }
                .into();
                j.due_at = at;
                j.finished_at = gives_up.then_some(at);
                j.last_error = Some(format!(
                    "attempt {} abandoned by {} at epoch {}; rescued",
                    j.attempt,
                    j.node.as_deref().unwrap_or("?"),
                    j.epoch.unwrap_or(0)
                ));
                rescued.push(AttemptRow {
                    id: 0,
                    job_id: j.id,
                    account: j.account.clone(),
                    partition: j.partition,
                    attempt: j.attempt,
                    node: j.node.clone().unwrap_or_default(),
                    epoch: j.epoch.unwrap_or(0),
                    started_at: j.attempted_at.unwrap_or(at),
                    finished_at: at,
                    outcome: "rescued".into(),
                    error: j.last_error.clone(),
                });
            }
        }
        let n = rescued.len() as u64;
        for a in rescued {
            self.record_attempt(a);
        }
        n
    }

    fn record_attempt(&mut self, mut a: AttemptRow) {
        a.id = self.attempts.len() as i64 + 1;
        self.attempts.push(a);
    }

    /// The serial head of `account` (any partition, `id <> except`), if unfinished.
    fn serial_head(&self, account: &str, partition: Option<u32>, except: i64) -> Option<&JobRow> {
        self.jobs
            .values()
            .filter(|j| {
                j.account == account
                    && partition.is_none_or(|p| j.partition as u32 == p)
                    && j.lane == "serial"
                    && j.id != except
                    && OPEN.contains(&j.state.as_str())
            })
            .min_by_key(|j| (j.run_at, j.id))
    }

    /// claim.sql's `head`: the serial head if due and not running, else the earliest
    /// due unordered job.
    fn next_runnable(&self, account: &str, partition: u32, except: i64, at: DateTime<Utc>) -> Option<i64> {
        if let Some(h) = self.serial_head(account, Some(partition), except) {
            if h.state != "running" && h.due_at <= at {
                return Some(h.id);
            }
        }
        self.jobs
            .values()
            .filter(|j| {
                j.account == account
                    && j.partition as u32 == partition
                    && j.lane == "unordered"
                    && j.id != except
                    && CLAIMABLE.contains(&j.state.as_str())
                    && j.due_at <= at
            })
            .min_by_key(|j| (j.due_at, j.id))
            .map(|j| j.id)
    }

    /// claim.sql's `next`: run the chosen job under the fence.
    fn take(&mut self, id: i64, fence: &Fence, at: DateTime<Utc>) -> Option<JobRow> {
        let j = self.jobs.get_mut(&id)?;
        if j.partition as u32 != fence.partition || !CLAIMABLE.contains(&j.state.as_str()) {
            return None;
        }
        j.state = "running".into();
        j.attempt += 1;
        j.epoch = Some(fence.epoch);
        j.node = Some(fence.owner.to_string());
        j.attempted_at = Some(at);
        Some(j.clone())
    }

    /// claim.sql
    pub fn claim(&mut self, account: &str, fence: &Fence, now: Instant) -> Result<Option<JobRow>> {
        if !self.fence_holds(fence, now) {
            return Err(Error::Fenced { partition: fence.partition, epoch: fence.epoch });
        }
        let at = self.utc(now);
        // `mine`: adopt the account's job already running at this fence.
        let mine = self
            .jobs
            .values()
            .filter(|j| {
                j.account == account
                    && j.partition as u32 == fence.partition
                    && j.state == "running"
                    && j.epoch == Some(fence.epoch)
                    && j.node.as_deref() == Some(&*fence.owner)
            })
            .map(|j| j.id)
            .min();
        if let Some(id) = mine {
            let j = self.jobs.get_mut(&id).expect("found above");
            j.attempt += 1;
            j.attempted_at = Some(at);
            return Ok(Some(j.clone()));
        }
        Ok(self.next_runnable(account, fence.partition, 0, at).and_then(|id| self.take(id, fence, at)))
    }

    /// finish.sql (`claim_next` is the statement's $11: the caller's wish and a terminal
    /// finish).
    pub fn finish(
        &mut self,
        job: &JobRow,
        fence: &Fence,
        finish: &Finish,
        claim_next: bool,
        now: Instant,
    ) -> Result<Finished> {
        let fence_held = self.fence_holds(fence, now);
        let at = self.utc(now);
        let c = finish.columns();
        let Some(j) = self.jobs.get_mut(&job.id).filter(|j| {
            fence_held
                && j.partition as u32 == fence.partition
                && j.state == "running"
                && j.epoch == Some(fence.epoch)
                && j.node.as_deref() == Some(&*fence.owner)
        }) else {
            if !fence_held {
                return Err(Error::Fenced { partition: fence.partition, epoch: fence.epoch });
            }
            return Ok(Finished::NotRunning);
        };
        let cancel_wins = j.cancel_requested && c.state == "retryable";
        j.state = if cancel_wins { "cancelled" } else { c.state }.into();
        if let Some(ms) = c.due_ms {
            j.due_at = at + chrono::Duration::milliseconds(ms);
        }
        j.finished_at = (TERMINAL.contains(&c.state) || cancel_wins).then_some(at);
        j.last_error = if cancel_wins {
            Some(format!("cancelled while running; last attempt: {}", c.error.as_deref().unwrap_or(c.outcome)))
        } else {
            c.error.clone().or(j.last_error.take())
        };
        if c.refund {
            j.max_attempts += 1;
        }
        let attempt = AttemptRow {
            id: 0,
            job_id: j.id,
            account: j.account.clone(),
            partition: j.partition,
            attempt: j.attempt,
            node: fence.owner.to_string(),
            epoch: fence.epoch,
            started_at: j.attempted_at.unwrap_or(at),
            finished_at: at,
            outcome: c.outcome.into(),
            error: c.error.clone(),
        };
        let account = j.account.clone();
        self.record_attempt(attempt);
        if !claim_next {
            return Ok(Finished::Recorded(None));
        }
        let next = self.next_runnable(&account, fence.partition, job.id, at).and_then(|id| self.take(id, fence, at));
        Ok(Finished::Recorded(next))
    }

    /// unclaim.sql
    pub fn unclaim(&mut self, job: &JobRow, fence: &Fence, now: Instant) -> Result<()> {
        let fence_held = self.fence_holds(fence, now);
        match self.jobs.get_mut(&job.id).filter(|j| {
            fence_held
                && j.partition as u32 == fence.partition
                && j.state == "running"
                && j.epoch == Some(fence.epoch)
                && j.node.as_deref() == Some(&*fence.owner)
        }) {
            Some(j) => {
                j.state = "available".into();
                j.attempt -= 1;
                j.attempted_at = None;
                Ok(())
            }
            None => Err(Error::Fenced { partition: fence.partition, epoch: fence.epoch }),
        }
    }

    /// due_accounts.sql (ties in due time in account order; PostgreSQL leaves them
    /// unordered).
    pub fn due_accounts(&self, partitions: &[u32], limit: i64, now: Instant) -> Vec<DueAccount> {
        let at = self.utc(now);
        let mut groups: BTreeMap<(String, u32), (DateTime<Utc>, bool)> = BTreeMap::new();
        for j in self.jobs.values() {
            if partitions.contains(&(j.partition as u32)) && CLAIMABLE.contains(&j.state.as_str()) && j.due_at <= at {
                let g = groups.entry((j.account.clone(), j.partition as u32)).or_insert((j.due_at, false));
                g.0 = g.0.min(j.due_at);
                g.1 |= j.lane == "unordered";
            }
        }
        let mut due: Vec<(DateTime<Utc>, DueAccount)> = groups
            .into_iter()
            .filter(|((account, _), (_, unordered_due))| {
                *unordered_due
                    || self.serial_head(account, None, 0).is_some_and(|h| h.state != "running" && h.due_at <= at)
            })
            .map(|((account, partition), (due, _))| (due, DueAccount { account, partition }))
            .collect();
        due.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.account.cmp(&b.1.account)));
        due.into_iter().take(limit.max(0) as usize).map(|(_, d)| d).collect()
    }

    /// RUNNING_HERE_SQL (in id order; PostgreSQL's order is unspecified).
    pub fn running_here(&self, owner: &str, partitions: &[u32], limit: i64) -> Vec<RunningJob> {
        self.jobs
            .values()
            .filter(|j| {
                partitions.contains(&(j.partition as u32)) && j.state == "running" && j.node.as_deref() == Some(owner)
            })
            .take(limit.max(0) as usize)
            .map(|j| RunningJob { job_id: j.id, account: j.account.clone(), partition: j.partition as u32 })
            .collect()
    }

    pub fn cancel_requested(&self, job_id: i64) -> bool {
        self.jobs.get(&job_id).is_some_and(|j| j.cancel_requested)
    }

    /// job_beat.sql: fenced, and only while the job runs as this attempt.
    pub fn beat(&mut self, job_id: i64, attempt: i32, fence: &Fence, beat: &Beat, now: Instant) -> Result<BeatAck> {
        if !self.fence_holds(fence, now) {
            return Err(Error::Fenced { partition: fence.partition, epoch: fence.epoch });
        }
        let at = self.utc(now);
        let Some(job) = self.jobs.get(&job_id).filter(|j| {
            j.partition == fence.partition as i32
                && j.state == "running"
                && j.epoch == Some(fence.epoch)
                && j.node.as_deref() == Some(&*fence.owner)
                && j.attempt == attempt
        }) else {
            return Ok(BeatAck::NotRunning);
        };
        let cancel_requested = job.cancel_requested;
        let row = self.progress.entry(job_id).or_default();
        row.attempt = attempt;
        row.epoch = fence.epoch;
        row.heartbeat_at = Some(at);
        if let Some(p) = &beat.progress {
            row.progress = Some(p.clone());
        }
        if let Some((state, _)) = &beat.checkpoint {
            row.checkpoint = Some(StoredCheckpoint { state: state.clone(), at, attempt });
        }
        Ok(BeatAck::Recorded { cancel_requested })
    }

    pub fn checkpoint(&self, job_id: i64) -> Option<StoredCheckpoint> {
        self.progress.get(&job_id).and_then(|p| p.checkpoint.clone())
    }

    /// heartbeat.sql: the members seen within `within`, this one included (last).
    pub fn heartbeat(&mut self, member: &MemberInfo, within: Duration, now: Instant) -> Vec<String> {
        let at = self.utc(now);
        self.members.retain(|_, seen| *seen >= at - chrono::Duration::days(1));
        let fresh_after = at - chrono::Duration::from_std(within).expect("in range");
        let mut ids: Vec<String> = self
            .members
            .iter()
            .filter(|(id, seen)| **seen > fresh_after && **id != member.node_id)
            .map(|(id, _)| id.clone())
            .collect();
        self.members.insert(member.node_id.clone(), at);
        ids.push(member.node_id.clone());
        ids
    }

    // --- producer statements (enqueue_insert.sql and the client's) ---

    /// enqueue: validated jobs in order; an unfinished job holding a unique key makes
    /// the input a duplicate of it (also within the batch).
    pub fn enqueue(&mut self, jobs: &[NewJob], defaults: KindDefaults<'_>, now: Instant) -> Result<Vec<Enqueued>> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        if jobs.len() > warden_runtime::job::MAX_ENQUEUE_BATCH {
            return Err(Error::InvalidInput(format!(
                "batch of {} jobs; the limit is {}",
                jobs.len(),
                warden_runtime::job::MAX_ENQUEUE_BATCH
            )));
        }
        for j in jobs {
            j.validate()?;
        }
        let at = self.utc(now);
        let mut out = Vec::with_capacity(jobs.len());
        for j in jobs {
            if let Some(key) = &j.idempotency_key {
                let k = (j.account.clone(), key.clone());
                if let Some((id, _)) = self.idempotency_keys.get(&k).filter(|(_, expires)| *expires > at) {
                    out.push(Enqueued { id: *id, duplicate: true });
                    continue;
                }
                let expires = at + chrono::Duration::milliseconds(j.idempotency_keep_ms());
                self.idempotency_keys.insert(k, (self.next_job_id, expires));
            }
            if let Some(key) = &j.unique_key {
                let holder = self.jobs.values().find(|o| {
                    o.account == j.account && o.unique_key.as_ref() == Some(key) && OPEN.contains(&o.state.as_str())
                });
                if let Some(o) = holder {
                    out.push(Enqueued { id: o.id, duplicate: true });
                    continue;
                }
            }
            let run_at = match j.schedule {
                Schedule::Now => at,
                Schedule::After(d) => at + chrono::Duration::milliseconds(ms(d)),
                Schedule::At(t) => t,
            };
            let kind = defaults(&j.kind);
            let id = self.next_job_id;
            self.next_job_id += 1;
            self.jobs.insert(
                id,
                JobRow {
                    id,
                    account: j.account.clone(),
                    partition: partition_of(&j.account, self.partitions) as i32,
                    kind: j.kind.clone(),
                    args: j.args.clone(),
                    lane: j.lane.as_str().into(),
                    state: if run_at > at { "scheduled" } else { "available" }.into(),
                    priority: j.priority,
                    run_at,
                    due_at: run_at,
                    attempt: 0,
                    max_attempts: j.max_attempts.or(kind.max_attempts).unwrap_or(25),
                    timeout_ms: j.timeout.or(kind.timeout).map(|t| ms(t).min(i32::MAX as i64) as i32).unwrap_or(60_000),
                    unique_key: j.unique_key.clone(),
                    epoch: None,
                    node: None,
                    cancel_requested: false,
                    created_at: at,
                    attempted_at: None,
                    finished_at: None,
                    last_error: None,
                },
            );
            out.push(Enqueued { id, duplicate: false });
        }
        Ok(out)
    }

    pub fn cancel_job(&mut self, job_id: i64, now: Instant) -> Result<CancelResult> {
        let at = self.utc(now);
        let j = self.jobs.get_mut(&job_id).ok_or(Error::JobNotFound(job_id))?;
        Ok(match j.state.as_str() {
            "scheduled" | "available" | "retryable" => {
                j.state = "cancelled".into();
                j.finished_at = Some(at);
                j.last_error = Some("cancelled before it ran".into());
                CancelResult::Cancelled
            }
            "running" => {
                j.cancel_requested = true;
                CancelResult::CancelRequested
            }
            other => CancelResult::AlreadyFinished { state: other.to_string() },
        })
    }

    pub fn retry_job(&mut self, job_id: i64, now: Instant) -> Result<JobRow> {
        let at = self.utc(now);
        let j = self.jobs.get_mut(&job_id).ok_or(Error::JobNotFound(job_id))?;
        if j.state != "discarded" && j.state != "cancelled" {
            return Err(Error::InvalidInput(format!(
                "job {job_id} is {}; only discarded or cancelled jobs can be retried",
                j.state
            )));
        }
        j.state = "available".into();
        j.due_at = at;
        j.finished_at = None;
        j.cancel_requested = false;
        j.max_attempts = j.max_attempts.max(j.attempt + 1);
        Ok(j.clone())
    }
}

/// Round trips and outages between one node and the model database (the simulation's
/// network). Statements sent while `down_until` is in the future are held back until
/// then (a proxy holding bytes), then applied.
pub struct Network {
    pub down_until: Arc<Mutex<Option<Instant>>>,
    rng: Mutex<fastrand::Rng>,
}

impl Network {
    pub fn new(seed: u64, down_until: Arc<Mutex<Option<Instant>>>) -> Network {
        Network { down_until, rng: Mutex::new(fastrand::Rng::with_seed(seed)) }
    }
}

/// One connection to the model database: [`Store`] and [`ProducerStore`] over a
/// [`ModelDb`], statements applied at once or over a [`Network`].
pub struct ModelStore {
    pub db: SharedDb,
    network: Option<Network>,
}

/// The model's stand-in for a caller's connection ([`ProducerStore::Conn`]): the model
/// has no transactions, so an enqueue "in" it applies at once.
pub struct ModelConn;

impl ModelStore {
    /// Statements apply at once (the conformance suite).
    pub fn new(db: SharedDb) -> ModelStore {
        ModelStore { db, network: None }
    }

    /// Statements travel over `network` (the simulation).
    pub fn with_network(db: SharedDb, network: Network) -> ModelStore {
        ModelStore { db, network: Some(network) }
    }

    /// Send a statement. Without a network it applies at once. With one, it reaches the
    /// database after half a round trip (or when the outage ends) and is applied there
    /// whatever happens to the caller, like a statement already on the wire; the answer
    /// takes the other half.
    async fn statement<T: Send + 'static>(&self, apply: impl FnOnce(&mut ModelDb, Instant) -> T + Send + 'static) -> T {
        let Some(net) = &self.network else {
            return apply(&mut self.db.lock().unwrap(), Instant::now());
        };
        let rtt = {
            let mut rng = net.rng.lock().unwrap();
            // Mostly 1–20 ms; one statement in 50 is slow (up to 1.5 s).
            if rng.u8(0..50) == 0 {
                Duration::from_millis(rng.u64(200..1500))
            } else {
                Duration::from_millis(rng.u64(1..20))
            }
        };
        let now = Instant::now();
        let arrive = (*net.down_until.lock().unwrap()).map_or(now + rtt / 2, |d| d.max(now + rtt / 2));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let db = self.db.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(arrive).await;
            let r = apply(&mut db.lock().unwrap(), Instant::now());
            let _ = tx.send(r);
        });
        let r = rx.await.expect("statement task");
        tokio::time::sleep(rtt / 2).await;
        r
    }
}

#[async_trait]
impl Store for ModelStore {
    fn partitions(&self) -> PartitionCount {
        self.db.lock().unwrap().partitions
    }

    async fn acquire(&self, owner: &str, partitions: &[u32], ttl: Duration) -> Result<Vec<GrantedLease>> {
        let (owner, partitions) = (owner.to_string(), partitions.to_vec());
        Ok(self.statement(move |db, now| db.acquire(&owner, &partitions, ttl, now)).await)
    }

    async fn renew(&self, owner: &str, held: &[GrantedLease], ttl: Duration) -> Result<Vec<u32>> {
        let (owner, held) = (owner.to_string(), held.to_vec());
        Ok(self.statement(move |db, now| db.renew(&owner, &held, ttl, now)).await)
    }

    async fn release(&self, owner: &str, held: &[GrantedLease]) -> Result<u64> {
        let (owner, held) = (owner.to_string(), held.to_vec());
        Ok(self.statement(move |db, _| db.release(&owner, &held)).await)
    }

    async fn rescue(&self, owner: &str, acquired: &[GrantedLease]) -> Result<u64> {
        let (owner, acquired) = (owner.to_string(), acquired.to_vec());
        Ok(self.statement(move |db, now| db.rescue(&owner, &acquired, now)).await)
    }

    async fn lease_wait(&self, owner: &str, partitions: &[u32]) -> Result<Option<Duration>> {
        let (owner, partitions) = (owner.to_string(), partitions.to_vec());
        Ok(self.statement(move |db, now| db.lease_wait(&owner, &partitions, now)).await)
    }

    async fn due_accounts(&self, partitions: &[u32], limit: i64) -> Result<Vec<DueAccount>> {
        let partitions = partitions.to_vec();
        Ok(self.statement(move |db, now| db.due_accounts(&partitions, limit, now)).await)
    }

    async fn running_here(&self, owner: &str, partitions: &[u32], limit: i64) -> Result<Vec<RunningJob>> {
        // Read at once, without a round trip even over a network: the simulation's
        // seeds were recorded when this statement cost none (the model had no jobs),
        // and a round trip here would shift every later random draw.
        Ok(self.db.lock().unwrap().running_here(owner, partitions, limit))
    }

    async fn claim(&self, account: &str, fence: &Fence) -> Result<Option<JobRow>> {
        let (account, fence) = (account.to_string(), fence.clone());
        self.statement(move |db, now| db.claim(&account, &fence, now)).await
    }

    async fn finish(
        &self,
        tx: Option<JobTx>,
        job: &JobRow,
        fence: &Fence,
        finish: &Finish,
        claim_next: bool,
    ) -> Result<Finished> {
        if tx.is_some() {
            return Err(Error::InvalidInput("the model store has no handler transactions".into()));
        }
        let (job, fence, finish) = (job.clone(), fence.clone(), finish.clone());
        let claim_next = claim_next && finish.is_terminal();
        self.statement(move |db, now| db.finish(&job, &fence, &finish, claim_next, now)).await
    }

    async fn unclaim(&self, job: &JobRow, fence: &Fence) -> Result<()> {
        let (job, fence) = (job.clone(), fence.clone());
        self.statement(move |db, now| db.unclaim(&job, &fence, now)).await
    }

    async fn cancel_requested(&self, job_id: i64) -> Result<bool> {
        Ok(self.statement(move |db, _| db.cancel_requested(job_id)).await)
    }

    async fn beat(&self, job_id: i64, attempt: i32, fence: &Fence, beat: &Beat) -> Result<BeatAck> {
        let (fence, beat) = (fence.clone(), beat.clone());
        self.statement(move |db, now| db.beat(job_id, attempt, &fence, &beat, now)).await
    }

    async fn checkpoint(&self, job_id: i64) -> Result<Option<StoredCheckpoint>> {
        Ok(self.statement(move |db, _| db.checkpoint(job_id)).await)
    }

    async fn begin(&self, _idle: Duration) -> Result<JobTx> {
        Err(Error::InvalidInput("the model store has no handler transactions".into()))
    }

    async fn heartbeat(&self, member: &MemberInfo, within: Duration) -> Result<Option<Vec<String>>> {
        let member = member.clone();
        Ok(Some(self.statement(move |db, now| db.heartbeat(&member, within, now)).await))
    }

    async fn lease_holders(&self) -> Result<Option<warden_runtime::Holders>> {
        Ok(Some(self.statement(move |db, now| db.lease_holders(now)).await))
    }
}

#[async_trait]
impl ProducerStore for ModelStore {
    type Conn = ModelConn;

    async fn enqueue(&self, jobs: &[NewJob], defaults: KindDefaults<'_>) -> Result<Vec<Enqueued>> {
        // The defaults are looked up here, before the statement: the closure borrows
        // from the caller and a statement may outlive it.
        let resolved: Vec<_> = jobs.iter().map(|j| defaults(&j.kind)).collect();
        let jobs = jobs.to_vec();
        self.statement(move |db, now| {
            let by_kind: BTreeMap<String, _> = jobs.iter().map(|j| j.kind.clone()).zip(resolved).collect();
            db.enqueue(&jobs, &|k| by_kind.get(k).copied().unwrap_or_default(), now)
        })
        .await
    }

    async fn enqueue_in(
        &self,
        _conn: &mut ModelConn,
        jobs: &[NewJob],
        defaults: KindDefaults<'_>,
    ) -> Result<Vec<Enqueued>> {
        self.enqueue(jobs, defaults).await
    }

    async fn get_job(&self, job_id: i64) -> Result<Option<JobRow>> {
        Ok(self.statement(move |db, _| db.jobs.get(&job_id).cloned()).await)
    }

    async fn get_jobs(&self, job_ids: &[i64]) -> Result<Vec<JobRow>> {
        let mut ids = job_ids.to_vec();
        ids.sort_unstable();
        ids.dedup();
        Ok(self.statement(move |db, _| ids.iter().filter_map(|id| db.jobs.get(id).cloned()).collect()).await)
    }

    async fn attempts_of(&self, job_id: i64) -> Result<Vec<AttemptRow>> {
        Ok(self.statement(move |db, _| db.attempts.iter().filter(|a| a.job_id == job_id).cloned().collect()).await)
    }

    async fn cancel_job(&self, job_id: i64) -> Result<CancelResult> {
        self.statement(move |db, now| db.cancel_job(job_id, now)).await
    }

    async fn retry_job(&self, job_id: i64) -> Result<JobRow> {
        self.statement(move |db, now| db.retry_job(job_id, now)).await
    }
}
