//! Periodic schedules: what a schedule is ([`ScheduleDef`], stored as
//! `warden.schedules`, migration 0008), the pure decision of what a due schedule fires
//! ([`plan_fires`]: catch-up and overlap policies), and the node task that fires the
//! due schedules of the partitions it holds ([`run`]). Timing itself — cron,
//! intervals, zones, DST, jitter — is [`crate::schedule`].
//!
//! # Ownership and exactly one fire per nominal time
//!
//! A schedule belongs to an account and so to the account's partition: the node
//! holding that partition's lease fires it; there is no leader. A fire is one
//! transaction under the partition's fence (`store::pg::schedules`): it locks the
//! schedule row, compares its `next_nominal` with the one this node planned for
//! (compare-and-set), enqueues the jobs, records each in `warden.schedule_fires`
//! (unique per (schedule, nominal time)) and advances the schedule. A node killed,
//! paused or fenced at any instant leaves either none of it — the next owner fires the
//! same nominal time — or all of it — the next owner finds the schedule advanced. A
//! stale owner's fire fails the fence; a fire planned from a stale read fails the
//! compare-and-set and is planned again.
//!
//! # Policies (defaults in bold)
//!
//! - **Catch-up** (after downtime, a pause of the owner, a handoff): nominal times
//!   older than the catch-up window (**1 hour**) are counted as *missed*
//!   (`missed_total`, `warden_schedule_fires_total{outcome="missed"}`), never run.
//!   Within the window, [`CatchUp::All`] (**default**) fires each missed nominal time
//!   (in order, each its own job); [`CatchUp::Latest`] fires only the latest and counts
//!   the others as *skipped*.
//! - **Overlap** (earlier fires' jobs still unfinished — the latest 10 fires are
//!   looked at): [`Overlap::Skip`] (**default**) fires only when none is unfinished
//!   (and then one); [`Overlap::BufferOne`] keeps at most one waiting behind the running
//!   one; [`Overlap::BufferAll`] fires everything (the serial lane runs them one by
//!   one, in order); [`Overlap::CancelPrevious`] cancels the unfinished ones and fires
//!   the latest; [`Overlap::Allow`] fires everything to run at the same time, so it
//!   requires the unordered lane. What is not fired is counted as skipped.
//! - **Pause / resume**: a paused schedule does not fire; resuming continues from the
//!   next nominal time after the resume (the paused period is neither run nor counted
//!   missed).
//! - **Trigger now** fires once, outside the timing (`via = 'trigger'`); **backfill**
//!   fires every nominal time of a range that has no recorded fire yet and that the
//!   schedule has already passed (`via = 'backfill'`; a fire is recorded as long as
//!   its job is kept, see retention; later nominal times are left to the schedule).
//!
//! # Declared in code
//!
//! [`crate::NodeBuilder::schedule`] declares a schedule with a `revision`. On start
//! each node upserts its declarations: a stored schedule declared in code is replaced
//! only by a **higher** revision. During a rolling deploy, new nodes (revision n+1)
//! replace the definition once and old nodes (revision n) leave it alone, so they never
//! fight; equal revisions with different definitions keep the stored one and log an
//! error. Firing depends only on the stored row, so nodes of two versions never double
//! fire. A schedule created at run time (API, SQL) with the same name is never
//! overwritten by code.

use crate::error::{Error, Result};
use crate::job::{validate_name, Lane};
use crate::schedule::{Spec, SpecError};
use chrono::{DateTime, TimeDelta, Utc};
use serde::Serialize;
use std::time::Duration;

/// What to do when earlier fires' jobs are still unfinished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Overlap {
    /// Fire only when none is unfinished.
    #[default]
    Skip,
    /// At most one waiting behind the running one.
    BufferOne,
    /// Fire every time; the serial lane runs them in order.
    BufferAll,
    /// Cancel the unfinished ones, fire the latest.
    CancelPrevious,
    /// Fire every time, to run at once (the unordered lane).
    Allow,
}

impl Overlap {
    pub fn as_str(&self) -> &'static str {
        match self {
            Overlap::Skip => "skip",
            Overlap::BufferOne => "buffer_one",
            Overlap::BufferAll => "buffer_all",
            Overlap::CancelPrevious => "cancel_previous",
            Overlap::Allow => "allow",
        }
    }
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "skip" => Overlap::Skip,
            "buffer_one" => Overlap::BufferOne,
            "buffer_all" => Overlap::BufferAll,
            "cancel_previous" => Overlap::CancelPrevious,
            "allow" => Overlap::Allow,
            other => {
                return Err(Error::invalid(format!(
                    "overlap policy {other:?}: expected skip, buffer_one, buffer_all, cancel_previous or allow"
                )))
            }
        })
    }
}

/// Which missed nominal times within the catch-up window are fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CatchUp {
    /// Each of them, in order.
    #[default]
    All,
    /// Only the latest; the others are counted as skipped.
    Latest,
}

impl CatchUp {
    pub fn as_str(&self) -> &'static str {
        match self {
            CatchUp::All => "all",
            CatchUp::Latest => "latest",
        }
    }
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "all" => Ok(CatchUp::All),
            "latest" => Ok(CatchUp::Latest),
            other => Err(Error::invalid(format!("catch-up mode {other:?}: expected all or latest"))),
        }
    }
}

/// The default catch-up window.
pub const DEFAULT_CATCHUP_WINDOW: Duration = Duration::from_secs(3600);
/// The shortest catch-up window.
pub const MIN_CATCHUP_WINDOW: Duration = Duration::from_secs(1);
/// The longest catch-up window.
pub const MAX_CATCHUP_WINDOW: Duration = Duration::from_secs(366 * 86_400);
/// Nominal times one fire handles at most (a long catch-up takes several, each
/// advancing the schedule).
pub const MAX_FIRES_PER_PASS: usize = 100;
/// Missed nominal times counted one by one at most per pass (beyond, the count is a
/// lower bound and the schedule skips ahead by its timing).
pub const MAX_MISSED_COUNTED: usize = 100_000;
/// Most nominal times one backfill may fire.
pub const MAX_BACKFILL: usize = 10_000;
/// The latest fires the overlap policy looks at.
pub const OVERLAP_LOOKBACK: i64 = 10;
/// Longest schedule name, in bytes.
pub const MAX_SCHEDULE_NAME_BYTES: usize = 128;

/// A schedule's timing as written by its author (stored as such; [`Spec`] is built
/// from it).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum Timing {
    Cron(String),
    Every { every: Duration, anchor: DateTime<Utc> },
}

/// A schedule: whose, when, what it enqueues, and its policies.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScheduleDef {
    pub account: String,
    /// Unique per account.
    pub name: String,
    pub timing: Timing,
    /// IANA zone (cron is matched against wall time there); default UTC.
    pub zone: String,
    pub jitter: Duration,
    pub start: Option<DateTime<Utc>>,
    pub end: Option<DateTime<Utc>>,
    pub kind: String,
    pub args: serde_json::Value,
    pub lane: Lane,
    pub priority: i16,
    pub max_attempts: Option<i32>,
    pub timeout: Option<Duration>,
    pub overlap: Overlap,
    pub catchup_window: Duration,
    pub catchup: CatchUp,
    /// Declared in code: replaced only by a higher revision (see the module docs).
    pub revision: i32,
}

impl ScheduleDef {
    /// A cron schedule (5 fields, or 6 with seconds; see [`crate::schedule`]).
    pub fn cron(
        account: impl Into<String>,
        name: impl Into<String>,
        expr: impl Into<String>,
        kind: impl Into<String>,
        args: impl Serialize,
    ) -> Result<Self> {
        Self::new(account, name, Timing::Cron(expr.into()), kind, args)
    }

    /// Every `every` (whole seconds), anchored at the Unix epoch unless
    /// [`ScheduleDef::anchor`] says otherwise.
    pub fn every(
        account: impl Into<String>,
        name: impl Into<String>,
        every: Duration,
        kind: impl Into<String>,
        args: impl Serialize,
    ) -> Result<Self> {
        Self::new(account, name, Timing::Every { every, anchor: DateTime::UNIX_EPOCH }, kind, args)
    }

    fn new(
        account: impl Into<String>,
        name: impl Into<String>,
        timing: Timing,
        kind: impl Into<String>,
        args: impl Serialize,
    ) -> Result<Self> {
        let args =
            serde_json::to_value(args).map_err(|e| Error::invalid(format!("args do not serialize to JSON: {e}")))?;
        Ok(Self {
            account: account.into(),
            name: name.into(),
            timing,
            zone: "UTC".into(),
            jitter: Duration::ZERO,
            start: None,
            end: None,
            kind: kind.into(),
            args,
            lane: Lane::Serial,
            priority: 0,
            max_attempts: None,
            timeout: None,
            overlap: Overlap::default(),
            catchup_window: DEFAULT_CATCHUP_WINDOW,
            catchup: CatchUp::default(),
            revision: 0,
        })
    }

    pub fn zone(mut self, zone: impl Into<String>) -> Self {
        self.zone = zone.into();
        self
    }
    pub fn jitter(mut self, jitter: Duration) -> Self {
        self.jitter = jitter;
        self
    }
    pub fn start(mut self, start: DateTime<Utc>) -> Self {
        self.start = Some(start);
        self
    }
    pub fn end(mut self, end: DateTime<Utc>) -> Self {
        self.end = Some(end);
        self
    }
    /// The phase of an interval schedule (fires at `anchor + k·every`).
    pub fn anchor(mut self, anchor: DateTime<Utc>) -> Self {
        if let Timing::Every { anchor: a, .. } = &mut self.timing {
            *a = anchor;
        }
        self
    }
    pub fn lane(mut self, lane: Lane) -> Self {
        self.lane = lane;
        self
    }
    pub fn priority(mut self, p: i16) -> Self {
        self.priority = p;
        self
    }
    pub fn max_attempts(mut self, n: i32) -> Self {
        self.max_attempts = Some(n);
        self
    }
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = Some(t);
        self
    }
    pub fn overlap(mut self, o: Overlap) -> Self {
        self.overlap = o;
        self
    }
    pub fn catch_up(mut self, window: Duration, mode: CatchUp) -> Self {
        self.catchup_window = window;
        self.catchup = mode;
        self
    }
    pub fn revision(mut self, r: i32) -> Self {
        self.revision = r;
        self
    }

    /// The timing as a [`Spec`] (errors name the field and the rule).
    pub fn spec(&self) -> Result<Spec> {
        let b = match &self.timing {
            Timing::Cron(e) => Spec::cron(e.clone()),
            Timing::Every { every, anchor } => Spec::every(*every, *anchor),
        };
        let mut b = b.zone(self.zone.clone()).jitter(self.jitter);
        if let Some(s) = self.start {
            b = b.start(s);
        }
        if let Some(e) = self.end {
            b = b.end(e);
        }
        b.build().map_err(|e: SpecError| e.into())
    }

    /// Check every field; the error names it.
    pub fn validate(&self) -> Result<Spec> {
        validate_name("schedule name", &self.name, MAX_SCHEDULE_NAME_BYTES)?;
        // The job every fire enqueues, checked by the enqueue's own rules (account,
        // kind, args size, attempts, timeout): one definition of them.
        self.job().validate()?;
        crate::progress::storable_json("args", &self.args)?;
        if self.catchup_window < MIN_CATCHUP_WINDOW {
            // Every fire is a little late (the scan interval, the transaction): a window
            // shorter than that would count every fire missed and never run one.
            return Err(Error::invalid(format!(
                "catch-up window must be at least {:?} (shorter, every fire would count as missed), got {:?}",
                MIN_CATCHUP_WINDOW, self.catchup_window
            )));
        }
        if self.catchup_window > MAX_CATCHUP_WINDOW {
            return Err(Error::invalid(format!(
                "catch-up window must be at most {} days, got {:?}",
                MAX_CATCHUP_WINDOW.as_secs() / 86_400,
                self.catchup_window
            )));
        }
        if self.overlap == Overlap::Allow && self.lane != Lane::Unordered {
            return Err(Error::invalid(
                "overlap policy allow lets fires run at the same time, which the serial lane never does: use Lane::Unordered",
            ));
        }
        if self.revision < 0 {
            return Err(Error::invalid("revision must not be negative"));
        }
        self.spec()
    }

    /// The job each fire of this schedule enqueues.
    pub fn job(&self) -> crate::job::NewJob {
        crate::job::NewJob {
            account: self.account.clone(),
            kind: self.kind.clone(),
            args: self.args.clone(),
            schedule: crate::job::Schedule::Now,
            priority: self.priority,
            max_attempts: self.max_attempts,
            timeout: self.timeout,
            unique_key: None,
            lane: self.lane,
            idempotency_key: None,
            idempotency_keep: None,
        }
    }

    /// The key that makes jitter deterministic for this schedule on every node.
    pub fn jitter_key(account: &str, name: &str) -> Vec<u8> {
        let mut k = account.as_bytes().to_vec();
        k.push(0);
        k.extend_from_slice(name.as_bytes());
        k
    }
}

/// The earlier fires a plan must take into account (overlap).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Earlier {
    /// Fires among the latest [`OVERLAP_LOOKBACK`] whose jobs are unfinished.
    pub unfinished: usize,
    /// Of those, running now.
    pub running: usize,
}

/// What one fire of a due schedule does.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FirePlan {
    /// Nominal times to enqueue a job for, in order.
    pub fire: Vec<DateTime<Utc>>,
    /// Nominal times within the catch-up window not fired (overlap, catch-up latest).
    pub skipped: u64,
    /// Nominal times older than the catch-up window (a lower bound past
    /// [`MAX_MISSED_COUNTED`]).
    pub missed: u64,
    /// Cancel the unfinished earlier fires (overlap cancel_previous).
    pub cancel_earlier: bool,
    /// The schedule's next nominal time after this fire (`None`: it has ended).
    pub next_nominal: Option<DateTime<Utc>>,
    /// When that one fires (nominal + jitter).
    pub next_fire_at: Option<DateTime<Utc>>,
}

/// Decide what a due schedule fires at `now`, pure. `next_nominal` is the stored next
/// nominal time (≤ now + jitter: the scan found it due); `key` its jitter key.
pub fn plan_fires(
    spec: &Spec,
    key: &[u8],
    next_nominal: DateTime<Utc>,
    overlap: Overlap,
    catchup_window: Duration,
    catchup: CatchUp,
    earlier: Earlier,
    now: DateTime<Utc>,
) -> FirePlan {
    let mut plan = FirePlan::default();
    // Checked: a row edited by SQL may hold any window (the column is only >= 0), and
    // an overflow here panicked the node's scheduler task. Past the calendar's start,
    // everything is within the window.
    let window_start = TimeDelta::from_std(catchup_window)
        .ok()
        .and_then(|w| now.checked_sub_signed(w))
        .unwrap_or(DateTime::<Utc>::MIN_UTC);
    // 1. Missed: older than the window. Lateness is measured from when the fire was
    // due, nominal + jitter, not from the nominal time: a fire jittered by more than
    // the window is on time at its jittered instant, not missed.
    let mut first = Some(next_nominal);
    let mut counted = 0usize;
    while let Some(n) = first {
        if spec.fire_at(key, n) >= window_start {
            break;
        }
        counted += 1;
        plan.missed += 1;
        if counted == MAX_MISSED_COUNTED {
            // Skip ahead by the timing (the count is a lower bound) to just before the
            // window, and keep checking from there: `window_start` has a fraction of a
            // second, so the first nominal time after `window_start - 1 s` may still be
            // older than the window.
            first = spec.next_after(n.max(window_start.checked_sub_signed(TimeDelta::seconds(1)).unwrap_or(n)));
            continue;
        }
        first = spec.next_after(n);
    }
    // 2. Due within the window: fire_at ≤ now, at most MAX_FIRES_PER_PASS.
    let mut due = Vec::new();
    let mut cursor = first;
    while let Some(n) = cursor {
        if due.len() >= MAX_FIRES_PER_PASS || spec.fire_at(key, n) > now {
            break;
        }
        due.push(n);
        cursor = spec.next_after(n);
    }
    plan.next_nominal = cursor;
    plan.next_fire_at = cursor.map(|n| spec.fire_at(key, n));
    // 3. Catch-up mode.
    let candidates: Vec<DateTime<Utc>> = match catchup {
        CatchUp::All => due,
        CatchUp::Latest => {
            plan.skipped += due.len().saturating_sub(1) as u64;
            due.last().copied().into_iter().collect()
        }
    };
    // 4. Overlap with earlier fires (and with each other).
    let allowed = match overlap {
        Overlap::BufferAll | Overlap::Allow => candidates.len(),
        Overlap::Skip => usize::from(earlier.unfinished == 0),
        // One running plus one waiting.
        Overlap::BufferOne => 2usize.saturating_sub(earlier.unfinished.max(earlier.running)),
        Overlap::CancelPrevious => {
            plan.cancel_earlier = earlier.unfinished > 0 && !candidates.is_empty();
            1
        }
    };
    let take = allowed.min(candidates.len());
    plan.skipped += (candidates.len() - take) as u64;
    plan.fire = match overlap {
        // The latest wins when earlier ones are cancelled.
        Overlap::CancelPrevious => candidates[candidates.len() - take..].to_vec(),
        _ => candidates[..take].to_vec(),
    };
    plan
}

/// A schedule as stored.
#[derive(Debug, Clone, sqlx::FromRow, Serialize)]
pub struct ScheduleRow {
    pub id: i64,
    pub account: String,
    pub partition: i32,
    pub name: String,
    pub kind: String,
    pub args: serde_json::Value,
    pub lane: String,
    pub priority: i16,
    pub max_attempts: Option<i32>,
    pub timeout_ms: Option<i32>,
    pub cron: Option<String>,
    pub every_ms: Option<i64>,
    pub anchor_at: Option<DateTime<Utc>>,
    pub zone: String,
    pub jitter_ms: i64,
    pub start_at: Option<DateTime<Utc>>,
    pub end_at: Option<DateTime<Utc>>,
    pub overlap: String,
    pub catchup_window_ms: i64,
    pub catchup: String,
    pub paused: bool,
    pub source: String,
    pub revision: i32,
    pub next_nominal: Option<DateTime<Utc>>,
    pub next_fire_at: Option<DateTime<Utc>>,
    pub last_nominal: Option<DateTime<Utc>>,
    pub last_fired_at: Option<DateTime<Utc>>,
    pub last_job_id: Option<i64>,
    pub fires_total: i64,
    pub skipped_total: i64,
    pub missed_total: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// When the job of the last fire at `last_nominal` (not a trigger or a backfill)
    /// first started (its first attempt's claim); `None` while it has not, once it is
    /// pruned, or where the row was not read by `get`/`list`. See [`Self::last_fire_lag`].
    #[sqlx(default)]
    pub last_fire_started_at: Option<DateTime<Utc>>,
}

fn ms_duration(ms: i64) -> Duration {
    Duration::from_millis(ms.max(0) as u64)
}

impl ScheduleRow {
    /// The last fire's lag: its job's first start minus the instant the fire was due
    /// (`last_nominal` + its jitter, what `next_fire_at` said), the same figure as
    /// `warden_schedule_fire_lag_seconds`. `None` while that job has not started.
    pub fn last_fire_lag(&self) -> Option<Duration> {
        let (started, nominal) = (self.last_fire_started_at?, self.last_nominal?);
        let due = match self.def().and_then(|d| d.spec()) {
            Ok(spec) => spec.fire_at(&ScheduleDef::jitter_key(&self.account, &self.name), nominal),
            Err(_) => nominal,
        };
        Some((started - due).to_std().unwrap_or_default())
    }

    /// The definition back from the row.
    pub fn def(&self) -> Result<ScheduleDef> {
        let timing = match (&self.cron, self.every_ms) {
            (Some(c), _) => Timing::Cron(c.clone()),
            (None, Some(ms)) => {
                Timing::Every { every: ms_duration(ms), anchor: self.anchor_at.unwrap_or(DateTime::UNIX_EPOCH) }
            }
            (None, None) => return Err(Error::Undecodable(format!("schedule {} has no timing", self.id))),
        };
        Ok(ScheduleDef {
            account: self.account.clone(),
            name: self.name.clone(),
            timing,
            zone: self.zone.clone(),
            jitter: ms_duration(self.jitter_ms),
            start: self.start_at,
            end: self.end_at,
            kind: self.kind.clone(),
            args: self.args.clone(),
            lane: Lane::parse(&self.lane).unwrap_or(Lane::Serial),
            priority: self.priority,
            max_attempts: self.max_attempts,
            timeout: self.timeout_ms.map(|t| ms_duration(t as i64)),
            overlap: Overlap::parse(&self.overlap)?,
            catchup_window: ms_duration(self.catchup_window_ms),
            catchup: CatchUp::parse(&self.catchup)?,
            revision: self.revision,
        })
    }
}

// ---------------------------------------------------------------------------
// The node task.

/// How long a schedule whose fire failed waits before the next attempt (its nominal
/// time is kept; see `PgStore::defer_schedule`).
pub const FAILED_FIRE_BACKOFF: Duration = Duration::from_secs(30);

/// Due schedules one pass fires at most (the rest wait for the next pass).
pub const DUE_SCAN_LIMIT: i64 = 1_000;

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PassReport {
    /// Jobs enqueued.
    pub fired: u64,
    pub skipped: u64,
    pub missed: u64,
    /// Fires whose schedule changed after the scan (planned again next pass).
    pub stale: u64,
    /// Fires that failed (logged).
    pub failed: u64,
}

/// The scheduler of one node: fires the due schedules of the partitions it holds.
pub struct Scheduler {
    pub(crate) store: crate::store::PgStore,
    pub(crate) leases: std::sync::Arc<crate::lease::LeaseTable>,
    pub(crate) registry: std::sync::Arc<crate::handler::Registry>,
    /// Bound on a fire transaction's idle time (the lease TTL).
    pub(crate) idle_timeout: Duration,
    /// The fires this node enqueued whose job has not started yet (the fire lag).
    pub(crate) pending: std::sync::Arc<PendingFires>,
}

/// Jobs this node's scheduler enqueued, by id, with the instant their fire was due
/// (nominal time + jitter, [`crate::schedule::Spec::fire_at`]), until their first
/// start on this node: then `warden_schedule_fire_lag_seconds` records the attempt's
/// start (`warden.jobs.attempted_at`, the database's clock at the claim) minus that
/// instant. In memory, so a job no schedule enqueued costs a map lookup, not a query.
/// A fire whose job starts on another node (its partition moved meanwhile) is not
/// recorded; the map is bounded ([`PENDING_FIRES_CAP`]).
#[derive(Debug, Default)]
pub(crate) struct PendingFires {
    due: std::sync::Mutex<std::collections::HashMap<i64, DateTime<Utc>>>,
}

/// Fires awaiting their job's start that one node remembers at most.
pub(crate) const PENDING_FIRES_CAP: usize = 100_000;

impl PendingFires {
    /// Remember that job `job` was enqueued by a fire due at `due`.
    pub(crate) fn fired(&self, job: i64, due: DateTime<Utc>) {
        let mut m = self.due.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() >= PENDING_FIRES_CAP {
            // Jobs that never start here (cancelled, moved, skipped): drop the oldest hour.
            let horizon = Utc::now() - TimeDelta::hours(1);
            m.retain(|_, d| *d > horizon);
            if m.len() >= PENDING_FIRES_CAP {
                return;
            }
        }
        m.insert(job, due);
    }

    /// Job `job` started, claimed at `attempted_at`: if a fire of this node enqueued
    /// it, record its fire lag and return it (never negative).
    pub(crate) fn started(&self, job: i64, attempted_at: Option<DateTime<Utc>>) -> Option<Duration> {
        let attempted_at = attempted_at?;
        let due = {
            let mut m = self.due.lock().unwrap_or_else(|e| e.into_inner());
            if m.is_empty() {
                return None;
            }
            m.remove(&job)?
        };
        let lag = (attempted_at - due).to_std().unwrap_or_default();
        metrics::histogram!("warden_schedule_fire_lag_seconds").record(lag.as_secs_f64());
        Some(lag)
    }
}

impl Scheduler {
    /// One pass: scan the held partitions' due schedules and fire each (one fenced
    /// transaction per schedule).
    pub async fn run_once(&self) -> Result<PassReport> {
        let mut report = PassReport::default();
        let held: Vec<u32> =
            self.leases.held().iter().map(|l| l.partition).filter(|p| self.leases.current(*p).is_some()).collect();
        if held.is_empty() {
            return Ok(report);
        }
        let due = self.store.due_schedules(&held, DUE_SCAN_LIMIT).await?;
        let registry = self.registry.clone();
        let defaults = move |kind: &str| match registry.options(kind) {
            Some(o) => crate::store::KindDefault { max_attempts: Some(o.max_attempts), timeout: Some(o.timeout) },
            None => crate::store::KindDefault::default(),
        };
        // One transaction per partition (and at most FIRE_BATCH schedules).
        let mut by_partition: std::collections::BTreeMap<u32, Vec<(i64, DateTime<Utc>)>> = Default::default();
        for (id, partition, nominal) in due {
            by_partition.entry(partition).or_default().push((id, nominal));
        }
        for (partition, due) in by_partition {
            for batch in due.chunks(FIRE_BATCH) {
                // Held and not draining, with its validity window open.
                let Some(lease) = self.leases.current(partition) else { break };
                let fired =
                    self.store.fire_schedules(&lease.fence, batch, self.idle_timeout, &defaults, plan_row).await;
                match fired {
                    Ok(outcomes) => {
                        for (id, outcome) in outcomes {
                            if outcome.is_err() {
                                let expected = batch.iter().find(|d| d.0 == id).map(|d| d.1);
                                self.defer(&lease.fence, id, expected).await;
                            }
                            self.count(id, outcome, &mut report);
                        }
                    }
                    Err(Error::Fenced { .. }) => {
                        tracing::debug!(partition, "fire fenced: the partition moved");
                        report.stale += batch.len() as u64;
                    }
                    Err(e) if e.is_permanent() && batch.len() > 1 => {
                        // One schedule's data fails the whole batch for good (its job
                        // does not enqueue): fire them one by one, so only it fails
                        // (and is deferred).
                        tracing::warn!(partition, error = %e, "a batch of fires failed for good; firing its schedules one by one");
                        for (id, nominal) in batch {
                            let one = self
                                .store
                                .fire_schedule(&lease.fence, *id, *nominal, self.idle_timeout, &defaults, plan_row)
                                .await;
                            match one {
                                Err(Error::Fenced { .. }) => report.stale += 1,
                                Err(e) => {
                                    self.defer(&lease.fence, *id, Some(*nominal)).await;
                                    self.count(*id, Err(e), &mut report);
                                }
                                Ok(o) => self.count(*id, Ok(o), &mut report),
                            }
                        }
                    }
                    Err(e) => {
                        report.failed += batch.len() as u64;
                        metrics::counter!("warden_schedule_errors_total").increment(batch.len() as u64);
                        tracing::warn!(partition, error = %e, "firing schedules failed; the next pass retries");
                    }
                }
            }
        }
        Ok(report)
    }
}

/// Plan a due schedule's fire from its stored row (see [`plan_fires`]).
fn plan_row(row: &ScheduleRow, earlier: Earlier, now: DateTime<Utc>) -> Result<FirePlan> {
    let def = row.def()?;
    let spec = def.spec()?;
    let key = ScheduleDef::jitter_key(&row.account, &row.name);
    let Some(nominal) = row.next_nominal else {
        return Err(Error::Undecodable(format!("schedule {} is due without a next nominal time", row.id)));
    };
    // Pure, but fed a stored row anything may have written: a panic here would end the
    // scheduler task and every schedule of the node with it. As an error it fails
    // (and defers) this schedule only.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        plan_fires(&spec, &key, nominal, def.overlap, def.catchup_window, def.catchup, earlier, now)
    }))
    .map_err(|_| Error::Undecodable(format!("schedule {}: planning its fire panicked", row.id)))
}

impl Scheduler {
    /// Out of the due scan for [`FAILED_FIRE_BACKOFF`] (see `defer_schedule`): a row
    /// that always fails must not starve the others.
    async fn defer(&self, fence: &crate::store::Fence, id: i64, expected: Option<DateTime<Utc>>) {
        let Some(nominal) = expected else { return };
        if let Err(e) = self.store.defer_schedule(fence, id, nominal, FAILED_FIRE_BACKOFF).await {
            tracing::debug!(schedule = id, error = %e, "deferring a failed schedule failed");
        }
    }

    fn count(&self, id: i64, outcome: Result<crate::store::pg::FireOutcome>, report: &mut PassReport) {
        match outcome {
            Ok(crate::store::pg::FireOutcome::Fired { plan, jobs, due }) => {
                for (job, due) in jobs.iter().zip(&due) {
                    self.pending.fired(*job, *due);
                }
                report.fired += jobs.len() as u64;
                report.skipped += plan.skipped;
                report.missed += plan.missed;
                metrics::counter!("warden_schedule_fires_total", "outcome" => "enqueued").increment(jobs.len() as u64);
                metrics::counter!("warden_schedule_fires_total", "outcome" => "skipped").increment(plan.skipped);
                metrics::counter!("warden_schedule_fires_total", "outcome" => "missed").increment(plan.missed);
                if plan.missed > 0 {
                    tracing::warn!(
                        schedule = id,
                        missed = plan.missed,
                        "schedule fires older than the catch-up window were missed"
                    );
                }
            }
            Ok(crate::store::pg::FireOutcome::Stale) => report.stale += 1,
            Err(e) => {
                report.failed += 1;
                metrics::counter!("warden_schedule_errors_total").increment(1);
                tracing::warn!(schedule = id, error = %e, "a schedule cannot fire (its stored definition does not decode?); the others do");
            }
        }
    }
}

/// Schedules of one partition fired in one transaction, at most.
pub const FIRE_BATCH: usize = 200;

/// Run the scheduler every `interval` until `stop`.
pub(crate) async fn run(scheduler: Scheduler, interval: Duration, stop: tokio_util::sync::CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            r = scheduler.run_once() => if let Err(e) = r {
                tracing::warn!(error = %e, "scheduler pass failed; the next one retries");
            },
        }
    }
}

/// How [`reconcile_declared`] retries a transient database error (connection lost,
/// pool timed out, serialization failure, deadlock, statement timeout: whatever
/// [`Error::is_permanent`] does not call permanent): `tries` in all, waiting `first`,
/// then twice as long each time, at most `max_wait`, and none past `budget` (defaults:
/// 5 tries, 0.5 + 1 + 2 + 4 s = 7.5 s of waiting, 10 s in all). A permanent error (an
/// invalid definition, a constraint violation) is not retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReconcileRetry {
    pub tries: u32,
    pub first: Duration,
    pub max_wait: Duration,
    /// No further try once this much time would have passed (tries included).
    pub budget: Duration,
}

impl Default for ReconcileRetry {
    fn default() -> Self {
        ReconcileRetry {
            tries: 5,
            first: Duration::from_millis(500),
            max_wait: Duration::from_secs(4),
            budget: Duration::from_secs(10),
        }
    }
}

impl ReconcileRetry {
    /// The wait after failed try `n` (1-based).
    pub fn wait_after(&self, n: u32) -> Duration {
        self.first.saturating_mul(1u32 << (n.saturating_sub(1)).min(16)).min(self.max_wait)
    }
}

/// Upsert the schedules a node declares in code (see the module docs: a higher
/// revision replaces, an equal one with another definition is refused loudly).
/// Transient errors are retried per [`ReconcileRetry::default`]; the node's start
/// fails with an error naming the schedule when one is permanent or keeps failing.
pub(crate) async fn reconcile_declared(store: &crate::store::PgStore, declared: &[ScheduleDef]) -> Result<()> {
    reconcile_with(declared, ReconcileRetry::default(), |def| store.upsert_schedule(def, "code")).await
}

/// Store one declared schedule with `op`, retrying transient errors per `retry`
/// (tests inject failures here); errors name the schedule.
pub(crate) async fn retry_transient<T, F, Fut>(def: &ScheduleDef, retry: ReconcileRetry, mut op: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let began = tokio::time::Instant::now();
    let mut n = 0;
    loop {
        n += 1;
        let e = match op().await {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        if e.is_permanent() {
            return Err(Error::Config(format!(
                "schedule {:?} of account {:?} declared in code was refused: {e}",
                def.name, def.account
            )));
        }
        let wait = retry.wait_after(n);
        if n >= retry.tries.max(1) || began.elapsed() + wait > retry.budget {
            return Err(Error::Config(format!(
                "schedule {:?} of account {:?} declared in code could not be stored ({n} tries over {:.1} s): {e}",
                def.name,
                def.account,
                began.elapsed().as_secs_f64()
            )));
        }
        tracing::warn!(account = %def.account, name = %def.name, error = %e, attempt = n, ?wait,
            "storing a schedule declared in code failed; retrying");
        tokio::time::sleep(wait).await;
    }
}

/// The schedules declared in code, each stored with `upsert` (retried per `retry`).
async fn reconcile_with<'a, F, Fut>(declared: &'a [ScheduleDef], retry: ReconcileRetry, mut upsert: F) -> Result<()>
where
    F: FnMut(&'a ScheduleDef) -> Fut,
    Fut: std::future::Future<Output = Result<crate::store::pg::Upserted>>,
{
    for def in declared {
        let upserted = retry_transient(def, retry, || upsert(def)).await?;
        match upserted {
            crate::store::pg::Upserted::Written(row) => {
                tracing::info!(account = %row.account, name = %row.name, revision = row.revision, "schedule declared in code applied");
            }
            crate::store::pg::Upserted::Kept(row) if row.source != "code" => {
                tracing::error!(account = %row.account, name = %row.name,
                    "a schedule declared in code has the name of one created at run time; the run-time one is kept");
            }
            crate::store::pg::Upserted::Kept(row) if row.revision == def.revision => {
                let same = row.def().map(|d| d == *def).unwrap_or(false);
                if !same {
                    tracing::error!(account = %row.account, name = %row.name, revision = row.revision,
                        "a schedule declared in code differs from the stored one of the same revision; the stored one is kept (raise the revision to change it)");
                }
            }
            crate::store::pg::Upserted::Kept(row) => {
                tracing::info!(account = %row.account, name = %row.name, stored = row.revision, declared = def.revision,
                    "a newer revision of this schedule is stored; keeping it");
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Management.

/// Schedules at run time: create, change, list, pause, resume, trigger, backfill,
/// delete (also over gRPC / the CLI where the host exposes them). Get one with
/// [`crate::Client::schedules`].
#[derive(Clone, Debug)]
pub struct Schedules {
    pub(crate) store: crate::store::PgStore,
}

/// What a backfill did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backfilled {
    /// Jobs enqueued, one per nominal time not fired before, in order.
    pub jobs: Vec<i64>,
    /// Nominal times of the range already fired (left alone).
    pub already_fired: usize,
}

fn not_found(account: &str, name: &str) -> Error {
    Error::ScheduleNotFound { account: account.into(), name: name.into() }
}

fn no_defaults(_: &str) -> crate::store::KindDefault {
    crate::store::KindDefault::default()
}

impl Schedules {
    /// Create the schedule, or change it if it exists (a schedule declared in code
    /// cannot be changed here: raise its revision in the code instead). Its first
    /// fire is its first nominal time after now; a change of timing moves the next
    /// fire to the new timing's next nominal time.
    pub async fn put(&self, def: &ScheduleDef) -> Result<ScheduleRow> {
        match self.store.upsert_schedule(def, "runtime").await? {
            crate::store::pg::Upserted::Written(row) => Ok(row),
            crate::store::pg::Upserted::Kept(row) => Err(Error::invalid(format!(
                "schedule {:?} of account {:?} is declared in a node's code (revision {}); change it there",
                row.name, row.account, row.revision
            ))),
        }
    }

    pub async fn get(&self, account: &str, name: &str) -> Result<Option<ScheduleRow>> {
        self.store.get_schedule(account, name).await
    }

    /// A page of schedules (of one account, or all), by id after `after_id`.
    pub async fn list(&self, account: Option<&str>, after_id: i64, limit: i64) -> Result<Vec<ScheduleRow>> {
        self.store.list_schedules(account, after_id, limit).await
    }

    pub async fn pause(&self, account: &str, name: &str) -> Result<ScheduleRow> {
        self.store.pause_schedule(account, name).await?.ok_or_else(|| not_found(account, name))
    }

    /// Resume from the next nominal time after now.
    pub async fn resume(&self, account: &str, name: &str) -> Result<ScheduleRow> {
        self.store.resume_schedule(account, name).await?.ok_or_else(|| not_found(account, name))
    }

    /// Fire once now (outside the timing and the overlap policy); the job's id.
    pub async fn trigger(&self, account: &str, name: &str) -> Result<i64> {
        self.store.trigger_schedule(account, name, &no_defaults).await?.ok_or_else(|| not_found(account, name))
    }

    /// Fire every nominal time in `[from, to]` not fired yet (see the module docs).
    pub async fn backfill(
        &self,
        account: &str,
        name: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Backfilled> {
        let (jobs, already_fired) = self
            .store
            .backfill_schedule(account, name, from, to, &no_defaults)
            .await?
            .ok_or_else(|| not_found(account, name))?;
        Ok(Backfilled { jobs, already_fired })
    }

    /// Delete it; `false` if there was none. Its fired jobs stay.
    pub async fn delete(&self, account: &str, name: &str) -> Result<bool> {
        self.store.delete_schedule(account, name).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn declared() -> ScheduleDef {
        ScheduleDef::every("acct-r", "nightly", Duration::from_secs(60), "report", serde_json::json!({})).unwrap()
    }

    fn transient() -> Error {
        Error::Database(sqlx::Error::Io(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "connection reset")))
    }

    /// `op` failing its first `fail` calls with `err`, counting calls.
    async fn run_retry(fail: u32, err: fn() -> Error) -> (Result<u32>, u32, Duration) {
        let calls = std::sync::atomic::AtomicU32::new(0);
        let began = tokio::time::Instant::now();
        let out = retry_transient(&declared(), ReconcileRetry::default(), || {
            let n = calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            async move {
                if n <= fail {
                    Err(err())
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        (out, calls.load(std::sync::atomic::Ordering::SeqCst), began.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn reconcile_retries_a_transient_error_with_backoff_then_succeeds() {
        let (out, calls, took) = run_retry(3, transient).await;
        assert_eq!(out.unwrap(), 4);
        assert_eq!(calls, 4);
        assert_eq!(took, Duration::from_millis(500 + 1000 + 2000), "0.5 s, then doubling");
    }

    #[tokio::test(start_paused = true)]
    async fn reconcile_gives_up_on_a_lasting_transient_error_within_ten_seconds_naming_the_schedule() {
        let (out, calls, took) = run_retry(u32::MAX, transient).await;
        let e = out.unwrap_err().to_string();
        assert_eq!(calls, 5);
        assert!(took <= Duration::from_secs(10), "{took:?}");
        assert!(e.contains("\"nightly\"") && e.contains("\"acct-r\"") && e.contains("5 tries"), "{e}");
        assert!(e.contains("connection reset"), "{e}");
        // A serialization failure or a statement timeout is transient too; a pool timeout as well.
        assert!(!Error::Database(sqlx::Error::PoolTimedOut).is_permanent());
    }

    #[tokio::test(start_paused = true)]
    async fn reconcile_fails_at_once_on_a_definitive_error() {
        let (out, calls, took) = run_retry(u32::MAX, || Error::invalid("cron: hour field out of range")).await;
        let e = out.unwrap_err().to_string();
        assert_eq!((calls, took), (1, Duration::ZERO));
        assert!(e.contains("\"nightly\"") && e.contains("refused") && e.contains("hour field"), "{e}");
    }

    #[test]
    fn the_reconcile_backoff_doubles_up_to_its_cap() {
        let r = ReconcileRetry::default();
        let waits: Vec<u64> = (1..=6).map(|n| r.wait_after(n).as_millis() as u64).collect();
        assert_eq!(waits, [500, 1000, 2000, 4000, 4000, 4000]);
        let total: Duration = (1..r.tries).map(|n| r.wait_after(n)).sum();
        assert!(total <= r.budget, "{total:?}");
    }

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn minutely() -> Spec {
        Spec::cron("* * * * *").build().unwrap()
    }

    fn plan(next: &str, now: &str, overlap: Overlap, catchup: CatchUp, earlier: Earlier) -> FirePlan {
        plan_fires(&minutely(), b"k", at(next), overlap, Duration::from_secs(600), catchup, earlier, at(now))
    }

    #[test]
    fn on_time_fires_the_nominal_time_and_advances() {
        let p =
            plan("2026-01-01T10:00:00Z", "2026-01-01T10:00:00.300Z", Overlap::Skip, CatchUp::All, Earlier::default());
        assert_eq!(p.fire, vec![at("2026-01-01T10:00:00Z")]);
        assert_eq!((p.skipped, p.missed, p.cancel_earlier), (0, 0, false));
        assert_eq!(p.next_nominal, Some(at("2026-01-01T10:01:00Z")));
        assert_eq!(p.next_fire_at, p.next_nominal, "no jitter");
    }

    #[test]
    fn catch_up_fires_within_the_window_and_counts_older_as_missed() {
        // Down from 09:45 to 10:05:30 with a 10-minute window: 09:45..09:55 missed
        // (11), 09:56..10:05 due (10).
        let all =
            plan("2026-01-01T09:45:00Z", "2026-01-01T10:05:30Z", Overlap::BufferAll, CatchUp::All, Earlier::default());
        assert_eq!(all.missed, 11);
        assert_eq!(all.fire.len(), 10);
        assert_eq!(all.fire[0], at("2026-01-01T09:56:00Z"));
        assert_eq!(*all.fire.last().unwrap(), at("2026-01-01T10:05:00Z"));
        assert_eq!(all.next_nominal, Some(at("2026-01-01T10:06:00Z")));
        let latest = plan(
            "2026-01-01T09:45:00Z",
            "2026-01-01T10:05:30Z",
            Overlap::BufferAll,
            CatchUp::Latest,
            Earlier::default(),
        );
        assert_eq!((latest.fire.clone(), latest.skipped, latest.missed), (vec![at("2026-01-01T10:05:00Z")], 9, 11));
    }

    #[test]
    fn overlap_policies_decide_against_unfinished_earlier_fires() {
        let (next, now) = ("2026-01-01T10:00:00Z", "2026-01-01T10:02:10Z"); // 3 due
        let busy = Earlier { unfinished: 1, running: 1 };
        let skip = plan(next, now, Overlap::Skip, CatchUp::All, busy);
        assert_eq!((skip.fire.len(), skip.skipped), (0, 3), "skip while one runs");
        let idle = plan(next, now, Overlap::Skip, CatchUp::All, Earlier::default());
        assert_eq!((idle.fire, idle.skipped), (vec![at(next)], 2), "then one, not three overlapping");
        let one = plan(next, now, Overlap::BufferOne, CatchUp::All, busy);
        assert_eq!((one.fire.len(), one.skipped), (1, 2), "one waits behind the running one");
        let full = plan(next, now, Overlap::BufferOne, CatchUp::All, Earlier { unfinished: 2, running: 1 });
        assert_eq!((full.fire.len(), full.skipped), (0, 3));
        let idle_one = plan(next, now, Overlap::BufferOne, CatchUp::All, Earlier::default());
        assert_eq!(idle_one.fire.len(), 2, "one to run, one to wait");
        let all = plan(next, now, Overlap::BufferAll, CatchUp::All, busy);
        assert_eq!((all.fire.len(), all.skipped), (3, 0));
        let cancel = plan(next, now, Overlap::CancelPrevious, CatchUp::All, busy);
        assert_eq!((cancel.fire, cancel.skipped, cancel.cancel_earlier), (vec![at("2026-01-01T10:02:00Z")], 2, true));
        let nothing_to_cancel = plan(next, now, Overlap::CancelPrevious, CatchUp::All, Earlier::default());
        assert!(!nothing_to_cancel.cancel_earlier);
        let allow = plan(next, now, Overlap::Allow, CatchUp::All, busy);
        assert_eq!(allow.fire.len(), 3);
    }

    #[test]
    fn a_pass_is_bounded_and_the_rest_is_due_at_once() {
        let p =
            plan("2026-01-01T08:00:00Z", "2026-01-01T10:00:00Z", Overlap::BufferAll, CatchUp::All, Earlier::default());
        // Window 10 min: 08:00..09:49 missed (110), 09:50..10:00 due (11).
        assert_eq!((p.missed, p.fire.len()), (110, 11));
        let every_second = Spec::every(Duration::from_secs(1), DateTime::UNIX_EPOCH).build().unwrap();
        let p = plan_fires(
            &every_second,
            b"k",
            at("2026-01-01T09:59:00Z"),
            Overlap::BufferAll,
            Duration::from_secs(3600),
            CatchUp::All,
            Earlier::default(),
            at("2026-01-01T10:05:00Z"),
        );
        assert_eq!(p.fire.len(), MAX_FIRES_PER_PASS);
        assert_eq!(p.next_nominal, Some(at("2026-01-01T09:59:00Z") + TimeDelta::seconds(MAX_FIRES_PER_PASS as i64)));
        assert!(p.next_fire_at.unwrap() <= at("2026-01-01T10:05:00Z"), "still due: the next pass continues");
    }

    #[test]
    fn a_huge_gap_is_counted_up_to_a_bound_and_skipped_ahead() {
        let every_second = Spec::every(Duration::from_secs(1), DateTime::UNIX_EPOCH).build().unwrap();
        let p = plan_fires(
            &every_second,
            b"k",
            at("2026-01-01T00:00:00Z"),
            Overlap::BufferAll,
            Duration::from_secs(5),
            CatchUp::Latest,
            Earlier::default(),
            at("2026-01-03T00:00:00Z"),
        );
        assert_eq!(p.missed, MAX_MISSED_COUNTED as u64);
        assert_eq!(p.fire, vec![at("2026-01-03T00:00:00Z")]);
        assert_eq!(p.next_nominal, Some(at("2026-01-03T00:00:01Z")));
    }

    #[test]
    fn a_fire_jittered_past_the_catch_up_window_is_fired_not_missed() {
        // Daily at 03:00 with up to 6 h of jitter, the default 1 h catch-up window: a
        // schedule whose offset is over an hour fires on time (at nominal + offset),
        // and that on-time fire must not count as an hour late.
        let spec = Spec::cron("0 3 * * *").jitter(Duration::from_secs(6 * 3600)).build().unwrap();
        let nominal = at("2026-01-01T03:00:00Z");
        let key = (0..)
            .map(|i| ScheduleDef::jitter_key("acct", &format!("nightly-{i}")))
            .find(|k| spec.jitter_offset(k, nominal) > Duration::from_secs(2 * 3600))
            .unwrap();
        let fire_at = spec.fire_at(&key, nominal);
        let p = plan_fires(
            &spec,
            &key,
            nominal,
            Overlap::Skip,
            DEFAULT_CATCHUP_WINDOW,
            CatchUp::All,
            Earlier::default(),
            fire_at + TimeDelta::milliseconds(50),
        );
        assert_eq!((p.fire, p.missed), (vec![nominal], 0), "fired at its jittered instant, not missed");
    }

    #[test]
    fn a_huge_gap_skips_ahead_to_the_window_not_one_nominal_time_before_it() {
        // now has a fraction of a second: the window starts at 23:59:55.300, so
        // 23:59:55 is older than the window and must not fire.
        let every_second = Spec::every(Duration::from_secs(1), DateTime::UNIX_EPOCH).build().unwrap();
        let p = plan_fires(
            &every_second,
            b"k",
            at("2026-01-01T00:00:00Z"),
            Overlap::BufferAll,
            Duration::from_secs(5),
            CatchUp::All,
            Earlier::default(),
            at("2026-01-03T00:00:00.300Z"),
        );
        assert_eq!(p.fire.first(), Some(&at("2026-01-02T23:59:56Z")), "{:?}", p.fire);
        assert_eq!(p.fire.len(), 5);
    }

    #[test]
    fn an_unbounded_catch_up_window_does_not_overflow() {
        // A row edited by SQL: catchup_window_ms = i64::MAX (the column has no upper
        // bound). Everything is within such a window.
        let p = plan_fires(
            &minutely(),
            b"k",
            at("2026-01-01T09:00:00Z"),
            Overlap::BufferAll,
            Duration::from_millis(i64::MAX as u64),
            CatchUp::All,
            Earlier::default(),
            at("2026-01-01T10:00:30Z"),
        );
        assert_eq!((p.missed, p.fire.len()), (0, 61));
    }

    #[test]
    fn jitter_delays_the_fire_not_the_nominal_time() {
        let spec = Spec::cron("0 * * * *").jitter(Duration::from_secs(600)).build().unwrap();
        let key = ScheduleDef::jitter_key("acct", "hourly");
        let nominal = at("2026-01-01T10:00:00Z");
        let fire_at = spec.fire_at(&key, nominal);
        let before = plan_fires(
            &spec,
            &key,
            nominal,
            Overlap::Skip,
            DEFAULT_CATCHUP_WINDOW,
            CatchUp::All,
            Earlier::default(),
            nominal,
        );
        if fire_at > nominal {
            assert!(before.fire.is_empty(), "not before its jittered instant");
        }
        let after = plan_fires(
            &spec,
            &key,
            nominal,
            Overlap::Skip,
            DEFAULT_CATCHUP_WINDOW,
            CatchUp::All,
            Earlier::default(),
            fire_at,
        );
        assert_eq!(after.fire, vec![nominal]);
        assert_eq!(after.next_fire_at, Some(spec.fire_at(&key, at("2026-01-01T11:00:00Z"))));
    }

    #[test]
    fn definitions_are_validated_with_clear_errors() {
        let d = |t: &str| ScheduleDef::cron("acct", "n", t, "report", ()).unwrap();
        assert!(d("0 3 * * *").validate().is_ok());
        let e = d("61 * * * *").validate().unwrap_err().to_string();
        assert!(e.contains("minute"), "{e}");
        let e = d("0 3 * * *").zone("Mars/Olympus").validate().unwrap_err().to_string();
        assert!(e.contains("unknown time zone"), "{e}");
        let e = ScheduleDef::every("a", "n", Duration::from_millis(10), "k", ()).unwrap().validate().unwrap_err();
        assert!(e.to_string().contains("interval"), "{e}");
        let e = d("* * * * *").overlap(Overlap::Allow).validate().unwrap_err();
        assert!(e.to_string().contains("Unordered"), "{e}");
        assert!(d("* * * * *").overlap(Overlap::Allow).lane(Lane::Unordered).validate().is_ok());
        let e = d("* * * * *").catch_up(Duration::ZERO, CatchUp::Latest).validate().unwrap_err();
        assert!(e.to_string().contains("at least"), "{e}");
        let e = d("* * * * *").catch_up(Duration::from_secs(400 * 86400), CatchUp::All).validate().unwrap_err();
        assert!(e.to_string().contains("catch-up window"), "{e}");
        let e = ScheduleDef::cron("", "n", "* * * * *", "k", ()).unwrap().validate().unwrap_err();
        assert!(e.to_string().contains("account"), "{e}");
        assert_eq!(Overlap::parse("buffer_one").unwrap(), Overlap::BufferOne);
        assert!(Overlap::parse("sometimes").is_err());
    }
}
