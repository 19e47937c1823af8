//! The executor seam: partition leases and the fenced statements the account actors,
//! the enforcer and the lease keeper run. Implemented by [`super::PgStore`] and, in the
//! tests, by the simulation's model store; both pass `tests/conformance.rs`.

use super::{Fence, Finish, Finished, GrantedLease, JobTx};
use crate::error::Result;
use crate::job::JobRow;
use crate::progress::{Beat, BeatAck, StoredCheckpoint};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use std::time::Duration;
use warden_cluster::PartitionCount;

/// An account with a runnable job due (see [`Store::due_accounts`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueAccount {
    pub account: String,
    pub partition: u32,
}

/// A job `running` under this node's lease (see [`Store::running_here`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningJob {
    pub job_id: i64,
    pub account: String,
    pub partition: u32,
}

/// What a node records about itself on every heartbeat.
#[derive(Debug, Clone)]
pub struct MemberInfo {
    pub node_id: String,
    pub started_at: DateTime<Utc>,
    /// The binary's schema version.
    pub schema: i64,
    /// Its ring fingerprint.
    pub ring: String,
}

/// The executor's storage seam. All executor writes are fenced; see the module docs
/// of [`crate::store`].
///
/// Partition routing: every method that reads or writes jobs or leases names the
/// partitions it touches — a [`Fence`] (claim, finish, unclaim), a list of
/// partitions or granted leases (acquire, renew, release, rescue, lease_wait,
/// due_accounts, running_here). A future router can therefore send each call, or each
/// partition's share of a call, to the database that holds that partition. Only
/// [`Store::cancel_requested`] takes a bare job id; its callers know the job's
/// partition (the running job's fence) if a router needs it.
///
/// Clocks: expiry and "due" are decided by the store's clock (the database's), never
/// the caller's.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Partition count P fixed in the database.
    fn partitions(&self) -> PartitionCount;

    /// Acquire the given partitions for `owner` where free, expired, or already ours;
    /// each grant is a new epoch (the previous one plus one), even when re-acquiring
    /// our own lease.
    async fn acquire(&self, owner: &str, partitions: &[u32], ttl: Duration) -> Result<Vec<GrantedLease>>;
    /// Renew held leases in one statement: only where `owner` still holds exactly that
    /// epoch, unexpired. Returns the partitions renewed.
    async fn renew(&self, owner: &str, held: &[GrantedLease], ttl: Duration) -> Result<Vec<u32>>;
    /// Release leases (owner = NULL, epoch kept, whether or not expired) and notify so
    /// the next owner acquires at once. Returns how many were released.
    async fn release(&self, owner: &str, held: &[GrantedLease]) -> Result<u64>;
    /// Reset attempts left `running` under an older epoch in partitions just acquired
    /// (one statement for all): retryable, or discarded when out of attempts, or
    /// cancelled when a cancel was requested; each gets a `rescued` attempt row.
    /// Only partitions still held by `owner` at exactly that epoch are touched.
    /// Returns the number of attempts rescued.
    async fn rescue(&self, owner: &str, acquired: &[GrantedLease]) -> Result<u64>;
    /// How long until the earliest of these partitions' leases, held by someone else,
    /// expires (by the database clock; zero if already expired); `None` if none is held
    /// by another owner.
    async fn lease_wait(&self, owner: &str, partitions: &[u32]) -> Result<Option<Duration>>;
    /// Accounts whose next runnable job is due in these partitions (the serial head,
    /// or any due unordered job), oldest due first, at most `limit`. An account whose
    /// serial head is backing off or running is not listed for its serial jobs even if
    /// later ones are due: it has nothing to run, and listing it would fill the scan
    /// and starve others.
    async fn due_accounts(&self, partitions: &[u32], limit: i64) -> Result<Vec<DueAccount>>;
    /// Jobs `running` under `owner` in these partitions, at most `limit`, in no
    /// particular order. The enforcer compares them with the attempts running here;
    /// one with no local attempt is an orphan of an ambiguous result, and its account
    /// is woken to adopt it.
    async fn running_here(&self, owner: &str, partitions: &[u32], limit: i64) -> Result<Vec<RunningJob>>;

    /// Claim the account's next runnable job (serial head if due, else a due unordered
    /// job), or adopt the account's job already running at this fence's epoch and
    /// owner (see `pg/sql/claim.sql`). Only jobs of the fence's partition are
    /// considered. [`crate::Error::Fenced`] if the fence does not hold.
    async fn claim(&self, account: &str, fence: &Fence) -> Result<Option<JobRow>>;
    /// Finish `job` (fenced), record its attempt, and if `claim_next` and the finish is
    /// terminal, claim the account's next job, all in one statement. With `tx`, the
    /// statement runs inside the handler's transaction, which is then committed (or
    /// rolled back if nothing was finished).
    async fn finish(
        &self,
        tx: Option<JobTx>,
        job: &JobRow,
        fence: &Fence,
        finish: &Finish,
        claim_next: bool,
    ) -> Result<Finished>;
    /// Undo a claim that will not run (the account is draining): available again, the
    /// attempt given back. [`crate::Error::Fenced`] if the fence does not hold or the
    /// job is no longer running under it.
    async fn unclaim(&self, job: &JobRow, fence: &Fence) -> Result<()>;
    /// Has someone asked to cancel this (running) job? `false` for an unknown job.
    async fn cancel_requested(&self, job_id: i64) -> Result<bool>;
    /// Record a running attempt's heartbeat — its progress and, optionally, a
    /// checkpoint — fenced: only while `fence` holds and the job still runs as
    /// `attempt` at that epoch and node (see `pg/sql/job_beat.sql`).
    /// [`crate::Error::Fenced`] if the fence does not hold; [`BeatAck::NotRunning`]
    /// if it holds but the job no longer runs as this attempt.
    async fn beat(&self, job_id: i64, attempt: i32, fence: &Fence, beat: &Beat) -> Result<BeatAck>;
    /// The job's last committed checkpoint, whichever attempt wrote it.
    async fn checkpoint(&self, job_id: i64) -> Result<Option<StoredCheckpoint>>;
    /// The nominal time of the schedule fire that enqueued this job, if one did
    /// (`warden.schedule_fires`). Stores without schedules (the model) have none.
    async fn fired_for(&self, _job_id: i64) -> Result<Option<DateTime<Utc>>> {
        Ok(None)
    }
    /// Begin a handler transaction that the database ends if it stays idle longer than
    /// `idle_timeout` (see `JobContext::tx`). [`JobTx`] is a PostgreSQL connection
    /// today; a second backend would make it an associated type.
    async fn begin(&self, idle_timeout: Duration) -> Result<JobTx>;

    /// Record that `member` reaches the database (`warden.members`) and return the
    /// node ids seen within `within`, itself included. Placement counts only those
    /// (see `warden_cluster::placement::eligible_ids`). `None`: this store keeps no
    /// such proof (placement then trusts gossip alone).
    async fn heartbeat(&self, _member: &MemberInfo, _within: Duration) -> Result<Option<Vec<String>>> {
        Ok(None)
    }

    /// Every partition's live holder (owner of an unexpired lease) and when the lease
    /// was granted to it, indexed by partition: the shared memory sticky placement
    /// computes from (`warden_cluster::sticky`). `None`: this store keeps no grant
    /// times (placement then computes from the members alone — and disagrees with
    /// nodes that read holders, so a store that wraps another must forward this, as
    /// it must forward [`Store::heartbeat`]).
    async fn lease_holders(&self) -> Result<Option<warden_cluster::Holders>> {
        Ok(None)
    }
}
