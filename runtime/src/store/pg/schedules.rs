//! Schedules on PostgreSQL (migration 0008; the rules are in [`crate::scheduler`]):
//! the fenced fire transaction, the due scan, and the management statements.

use super::enqueue::insert_resolved;
use super::PgStore;
use crate::error::{Error, Result};
use crate::job::NewJob;
use crate::scheduler::{Earlier, FirePlan, ScheduleDef, ScheduleRow, Timing, MAX_BACKFILL, OVERLAP_LOOKBACK};
use crate::store::{ms, Fence, KindDefaults, CHANNEL_CANCEL};
use chrono::{DateTime, TimeDelta, Utc};
use sqlx::Row;

/// Due schedules of partitions $1, oldest first, at most $2.
const DUE_SQL: &str = "
    SELECT id, partition, next_nominal FROM warden.schedules
    WHERE partition = ANY($1) AND NOT paused AND next_fire_at <= now()
    ORDER BY next_fire_at LIMIT $2";

/// Bound the fire transaction's idle time ($1 ms): a node paused mid-fire must not
/// hold the partition's fence lock past a lease TTL.
const GUARD_SQL: &str = "SELECT set_config('idle_in_transaction_session_timeout', $1, true)";
const FENCE_SQL: &str = "SELECT warden.fence($1, $2, $3)";
/// Lock schedules $1 in id order (two fires of one partition never deadlock).
const LOCK_ROWS_SQL: &str = "SELECT * FROM warden.schedules WHERE id = ANY($1) ORDER BY id FOR UPDATE";
const LOCK_BY_NAME_SQL: &str = "SELECT * FROM warden.schedules WHERE account = $1 AND name = $2 FOR UPDATE";
const NOW_SQL: &str = "SELECT statement_timestamp()";

/// The unfinished jobs of each schedule $1's latest $2 fires: (schedule, job id,
/// state, partition, account).
const EARLIER_MANY_SQL: &str = "
    SELECT s.id, j.id, j.state, j.partition, j.account
    FROM unnest($1::bigint[]) AS s(id)
    CROSS JOIN LATERAL (SELECT job_id FROM warden.schedule_fires
                        WHERE schedule_id = s.id ORDER BY nominal_at DESC LIMIT $2) f
    JOIN warden.jobs j ON j.id = f.job_id
    WHERE j.state IN ('scheduled', 'available', 'retryable', 'running')";

/// Nominal times among $2 that schedule $1 already fired (not counting triggers).
const ALREADY_FIRED_SQL: &str = "
    SELECT nominal_at FROM warden.schedule_fires
    WHERE schedule_id = $1 AND nominal_at = ANY($2) AND via <> 'trigger'";

/// Record fires: $1 job ids, $2 schedule ids, $3 nominal times (pairwise), $4 via.
const RECORD_FIRES_MANY_SQL: &str = "
    INSERT INTO warden.schedule_fires (job_id, schedule_id, nominal_at, fired_at, via)
    SELECT j, s, n, statement_timestamp(), $4 FROM unnest($1::bigint[], $2::bigint[], $3::timestamptz[]) AS x(j, s, n)";

/// (schedule, nominal time) pairs among ($1, $2) already fired (not counting triggers).
const ALREADY_FIRED_MANY_SQL: &str = "
    SELECT f.schedule_id, f.nominal_at FROM warden.schedule_fires f
    JOIN unnest($1::bigint[], $2::timestamptz[]) AS q(s, n) ON f.schedule_id = q.s AND f.nominal_at = q.n
    WHERE f.via <> 'trigger'";

const RECORD_FIRES_SQL: &str = "
    INSERT INTO warden.schedule_fires (job_id, schedule_id, nominal_at, fired_at, via)
    SELECT unnest($1::bigint[]), $2, unnest($3::timestamptz[]), statement_timestamp(), $4";

const CANCEL_QUEUED_SQL: &str = "
    UPDATE warden.jobs SET state = 'cancelled', finished_at = statement_timestamp(), last_error = $2
    WHERE id = $1 AND state IN ('scheduled', 'available', 'retryable')";
const CANCEL_RUNNING_SQL: &str =
    "UPDATE warden.jobs SET cancel_requested = true WHERE id = $1 AND state = 'running' RETURNING id";
const NOTIFY_SQL: &str = "SELECT pg_notify($1, $2)";

/// Advance schedules after a fire (arrays, pairwise): $1 ids, $2 next nominal times,
/// $3 next fire times, $4 last nominal fired (NULL: keep), $5 fired at all, $6 last
/// job (NULL: keep), $7 fires, $8 skipped, $9 missed.
const ADVANCE_MANY_SQL: &str = "
    UPDATE warden.schedules s SET
        next_nominal = a.next_nominal, next_fire_at = a.next_fire_at,
        last_nominal = COALESCE(a.last_nominal, s.last_nominal),
        last_fired_at = CASE WHEN a.fired THEN statement_timestamp() ELSE s.last_fired_at END,
        last_job_id = COALESCE(a.last_job, s.last_job_id),
        fires_total = s.fires_total + a.fires, skipped_total = s.skipped_total + a.skipped,
        missed_total = s.missed_total + a.missed,
        updated_at = statement_timestamp()
    FROM unnest($1::bigint[], $2::timestamptz[], $3::timestamptz[], $4::timestamptz[], $5::bool[], $6::bigint[],
                $7::bigint[], $8::bigint[], $9::bigint[])
         AS a(id, next_nominal, next_fire_at, last_nominal, fired, last_job, fires, skipped, missed)
    WHERE s.id = a.id";

/// The columns of [`ADVANCE_MANY_SQL`], one entry per schedule.
#[derive(Default)]
struct Advance {
    id: Vec<i64>,
    next_nominal: Vec<Option<DateTime<Utc>>>,
    next_fire_at: Vec<Option<DateTime<Utc>>>,
    last_nominal: Vec<Option<DateTime<Utc>>>,
    fired: Vec<bool>,
    last_job: Vec<Option<i64>>,
    fires: Vec<i64>,
    skipped: Vec<i64>,
    missed: Vec<i64>,
}

/// Create or change a schedule; see [`crate::scheduler`] for who may change what.
/// The timing columns decide whether `next_nominal` is kept (same timing) or moved to
/// the new timing's next nominal time.
const UPSERT_SQL: &str = "
    INSERT INTO warden.schedules AS s (account, partition, name, kind, args, lane, priority, max_attempts,
        timeout_ms, cron, every_ms, anchor_at, zone, jitter_ms, start_at, end_at, overlap, catchup_window_ms,
        catchup, source, revision, next_nominal, next_fire_at)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22, $23)
    ON CONFLICT (account, name) DO UPDATE SET
        kind = EXCLUDED.kind, args = EXCLUDED.args, lane = EXCLUDED.lane, priority = EXCLUDED.priority,
        max_attempts = EXCLUDED.max_attempts, timeout_ms = EXCLUDED.timeout_ms, cron = EXCLUDED.cron,
        every_ms = EXCLUDED.every_ms, anchor_at = EXCLUDED.anchor_at, zone = EXCLUDED.zone,
        jitter_ms = EXCLUDED.jitter_ms, start_at = EXCLUDED.start_at, end_at = EXCLUDED.end_at,
        overlap = EXCLUDED.overlap, catchup_window_ms = EXCLUDED.catchup_window_ms, catchup = EXCLUDED.catchup,
        revision = EXCLUDED.revision,
        next_nominal = CASE WHEN (s.cron, s.every_ms, s.anchor_at, s.zone, s.jitter_ms, s.start_at, s.end_at)
                                 IS NOT DISTINCT FROM
                                 (EXCLUDED.cron, EXCLUDED.every_ms, EXCLUDED.anchor_at, EXCLUDED.zone,
                                  EXCLUDED.jitter_ms, EXCLUDED.start_at, EXCLUDED.end_at)
                            THEN s.next_nominal ELSE EXCLUDED.next_nominal END,
        next_fire_at = CASE WHEN (s.cron, s.every_ms, s.anchor_at, s.zone, s.jitter_ms, s.start_at, s.end_at)
                                 IS NOT DISTINCT FROM
                                 (EXCLUDED.cron, EXCLUDED.every_ms, EXCLUDED.anchor_at, EXCLUDED.zone,
                                  EXCLUDED.jitter_ms, EXCLUDED.start_at, EXCLUDED.end_at)
                            THEN s.next_fire_at ELSE EXCLUDED.next_fire_at END,
        updated_at = statement_timestamp()
    WHERE (EXCLUDED.source = 'runtime' AND s.source = 'runtime')
       OR (EXCLUDED.source = 'code' AND s.source = 'code' AND s.revision < EXCLUDED.revision)
    RETURNING *";

/// A schedule (`s`) with `last_fire_started_at`: the first start of the job its fire
/// at `last_nominal` enqueued: the first attempt's start once one is recorded, else the
/// running attempt's claim (NULL while queued; `unclaim` clears it).
macro_rules! with_last_start {
    ($from:literal) => {
        concat!(
            "SELECT s.*, (SELECT COALESCE((SELECT min(a.started_at) FROM warden.attempts a WHERE a.job_id = f.job_id),
                                      (SELECT j.attempted_at FROM warden.jobs j WHERE j.id = f.job_id))
                      FROM warden.schedule_fires f
                      WHERE f.schedule_id = s.id AND f.nominal_at = s.last_nominal AND f.via = 'schedule'
                      LIMIT 1) AS last_fire_started_at ",
            $from
        )
    };
}
const GET_SQL: &str = with_last_start!("FROM warden.schedules s WHERE s.account = $1 AND s.name = $2");
/// A page of schedules after id $2 ($1 account or NULL), at most $3.
const LIST_SQL: &str = with_last_start!(
    "FROM warden.schedules s WHERE ($1::text IS NULL OR s.account = $1) AND s.id > $2 ORDER BY s.id LIMIT $3"
);
const PAUSE_SQL: &str =
    "UPDATE warden.schedules SET paused = true, updated_at = statement_timestamp() WHERE account = $1 AND name = $2 RETURNING *";
const RESUME_SQL: &str = "
    UPDATE warden.schedules SET paused = false, next_nominal = $2, next_fire_at = $3, updated_at = statement_timestamp()
    WHERE id = $1 RETURNING *";
const DELETE_SQL: &str = "DELETE FROM warden.schedules WHERE account = $1 AND name = $2 RETURNING id";
const RECORD_MANUAL_SQL: &str = "
    UPDATE warden.schedules SET last_fired_at = statement_timestamp(), last_job_id = COALESCE($2, last_job_id),
        fires_total = fires_total + $3, updated_at = statement_timestamp()
    WHERE id = $1";

/// Postpone the fire of schedule $1 at nominal time $2 by $3 ms after a failed
/// attempt; its nominal time is kept (compare-and-set on it, like a fire).
const DEFER_SQL: &str = "
    UPDATE warden.schedules SET next_fire_at = statement_timestamp() + $3 * interval '1 millisecond'
    WHERE id = $1 AND next_nominal = $2 AND NOT paused";

/// How a fire attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum FireOutcome {
    /// Fired as planned (the plan, the ids of the jobs enqueued for its fires, and the
    /// instant each of those fires was due: nominal time + jitter).
    Fired { plan: FirePlan, jobs: Vec<i64>, due: Vec<DateTime<Utc>> },
    /// The schedule changed since it was read (another fire, an update, a pause, a
    /// delete): nothing done; the next scan plans again.
    Stale,
}

/// How an upsert ended.
#[derive(Debug, Clone)]
pub enum Upserted {
    /// Created or replaced.
    Written(ScheduleRow),
    /// Left as stored (a code declaration of a revision not higher than the stored one,
    /// or a name taken by the other source).
    Kept(ScheduleRow),
}

fn unfinished_job_state(s: &str) -> bool {
    matches!(s, "scheduled" | "available" | "retryable" | "running")
}

impl PgStore {
    /// Due schedules of `partitions` (oldest due first, at most `limit`): (id,
    /// partition, next nominal time).
    pub async fn due_schedules(&self, partitions: &[u32], limit: i64) -> Result<Vec<(i64, u32, DateTime<Utc>)>> {
        let parts: Vec<i32> = partitions.iter().map(|p| *p as i32).collect();
        let rows = sqlx::query(DUE_SQL).bind(&parts).bind(limit).fetch_all(self.pool()).await?;
        rows.iter().map(|r| Ok((r.try_get(0)?, r.try_get::<i32, _>(1)? as u32, r.try_get(2)?))).collect()
    }

    /// Fire schedule `id` for its stored next nominal time `expected`, under `fence`
    /// ([`PgStore::fire_schedules`] with one schedule).
    pub async fn fire_schedule(
        &self,
        fence: &Fence,
        id: i64,
        expected: DateTime<Utc>,
        idle_timeout: std::time::Duration,
        defaults: KindDefaults<'_>,
        plan: impl Fn(&ScheduleRow, Earlier, DateTime<Utc>) -> Result<FirePlan> + Send + Sync,
    ) -> Result<FireOutcome> {
        let mut out = self.fire_schedules(fence, &[(id, expected)], idle_timeout, defaults, plan).await?;
        match out.pop() {
            Some((_, r)) => r,
            None => Ok(FireOutcome::Stale),
        }
    }

    /// Fire due schedules of one partition, each for its stored next nominal time, in
    /// one transaction under `fence`: lock the rows (in id order) and compare-and-set
    /// each on its expected nominal time, read the earlier fires' jobs, let `plan`
    /// decide per schedule (given the row, the earlier fires and the database's
    /// `now`), cancel earlier jobs where a plan says so, enqueue all fires in one
    /// statement (skipping nominal times a backfill already fired), record them and
    /// advance the schedules. One schedule whose plan fails (a row that no longer
    /// decodes) is left alone and reported; the others fire.
    /// [`Error::Fenced`] if the fence does not hold (nothing is done).
    pub async fn fire_schedules(
        &self,
        fence: &Fence,
        due: &[(i64, DateTime<Utc>)],
        idle_timeout: std::time::Duration,
        defaults: KindDefaults<'_>,
        plan: impl Fn(&ScheduleRow, Earlier, DateTime<Utc>) -> Result<FirePlan> + Send + Sync,
    ) -> Result<Vec<(i64, Result<FireOutcome>)>> {
        if due.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self.pool().begin().await?;
        sqlx::query(GUARD_SQL).bind(ms(idle_timeout).to_string()).execute(&mut *tx).await?;
        let held: bool = sqlx::query_scalar(FENCE_SQL)
            .bind(fence.partition as i32)
            .bind(fence.epoch)
            .bind(&*fence.owner)
            .fetch_one(&mut *tx)
            .await?;
        if !held {
            tx.rollback().await?;
            return Err(Error::Fenced { partition: fence.partition, epoch: fence.epoch });
        }
        let ids: Vec<i64> = due.iter().map(|d| d.0).collect();
        let rows: Vec<ScheduleRow> = sqlx::query_as(LOCK_ROWS_SQL).bind(&ids).fetch_all(&mut *tx).await?;
        let mut out: Vec<(i64, Result<FireOutcome>)> = Vec::with_capacity(due.len());
        let mut firing: Vec<ScheduleRow> = Vec::with_capacity(rows.len());
        for (id, expected) in due {
            match rows.iter().find(|r| r.id == *id) {
                Some(r) if r.partition == fence.partition as i32 && !r.paused && r.next_nominal == Some(*expected) => {
                    firing.push(r.clone())
                }
                _ => out.push((*id, Ok(FireOutcome::Stale))),
            }
        }
        let firing_ids: Vec<i64> = firing.iter().map(|r| r.id).collect();
        let earlier_rows =
            sqlx::query(EARLIER_MANY_SQL).bind(&firing_ids).bind(OVERLAP_LOOKBACK).fetch_all(&mut *tx).await?;
        let mut earlier_jobs: std::collections::HashMap<i64, Vec<(i64, String, i32, String)>> = Default::default();
        for r in &earlier_rows {
            let schedule: i64 = r.try_get(0)?;
            let job = (r.try_get(1)?, r.try_get(2)?, r.try_get(3)?, r.try_get(4)?);
            earlier_jobs.entry(schedule).or_default().push(job);
        }
        let now: DateTime<Utc> = sqlx::query_scalar(NOW_SQL).fetch_one(&mut *tx).await?;

        // Plans, per schedule.
        let mut planned: Vec<(ScheduleRow, FirePlan)> = Vec::with_capacity(firing.len());
        for row in firing {
            let jobs = earlier_jobs.get(&row.id).map(Vec::as_slice).unwrap_or(&[]);
            let earlier = Earlier {
                unfinished: jobs.iter().filter(|j| unfinished_job_state(&j.1)).count(),
                running: jobs.iter().filter(|j| j.1 == "running").count(),
            };
            match plan(&row, earlier, now) {
                Ok(p) => planned.push((row, p)),
                Err(e) => out.push((row.id, Err(e))),
            }
        }
        // Cancel what cancel_previous plans replace.
        for (row, p) in &planned {
            if !p.cancel_earlier {
                continue;
            }
            let why = format!("cancelled by schedule {:?} (overlap policy cancel_previous)", row.name);
            for (job, state, partition, account) in earlier_jobs.get(&row.id).map(Vec::as_slice).unwrap_or(&[]) {
                if state == "running" {
                    let asked: Option<i64> =
                        sqlx::query_scalar(CANCEL_RUNNING_SQL).bind(job).fetch_optional(&mut *tx).await?;
                    if asked.is_some() {
                        sqlx::query(NOTIFY_SQL)
                            .bind(CHANNEL_CANCEL)
                            .bind(format!("{partition}:{job}:{account}"))
                            .execute(&mut *tx)
                            .await?;
                    }
                } else {
                    sqlx::query(CANCEL_QUEUED_SQL).bind(job).bind(&why).execute(&mut *tx).await?;
                }
            }
        }
        // A backfill may have fired some of these nominal times already.
        let (mut q_ids, mut q_nominals) = (Vec::new(), Vec::new());
        for (row, p) in &planned {
            for n in &p.fire {
                q_ids.push(row.id);
                q_nominals.push(*n);
            }
        }
        if !q_ids.is_empty() {
            let fired: Vec<(i64, DateTime<Utc>)> =
                sqlx::query_as(ALREADY_FIRED_MANY_SQL).bind(&q_ids).bind(&q_nominals).fetch_all(&mut *tx).await?;
            for (id, n) in fired {
                if let Some((_, p)) = planned.iter_mut().find(|(r, _)| r.id == id) {
                    p.fire.retain(|x| *x != n);
                    p.skipped += 1;
                }
            }
        }
        // Enqueue every fire in one statement, then record the fires.
        let mut jobs: Vec<NewJob> = Vec::new();
        let (mut f_schedule, mut f_nominal, mut f_due) = (Vec::new(), Vec::new(), Vec::new());
        for (row, p) in &planned {
            let def = row.def()?;
            let spec = def.spec()?;
            let key = ScheduleDef::jitter_key(&row.account, &row.name);
            for n in &p.fire {
                jobs.push(def.job());
                f_schedule.push(row.id);
                f_nominal.push(*n);
                f_due.push(spec.fire_at(&key, *n));
            }
        }
        let mut job_ids = Vec::with_capacity(jobs.len());
        for chunk in jobs.chunks(crate::job::MAX_ENQUEUE_BATCH) {
            job_ids
                .extend(insert_resolved(&mut tx, self.partitions(), chunk, defaults).await?.into_iter().map(|e| e.id));
        }
        if !job_ids.is_empty() {
            sqlx::query(RECORD_FIRES_MANY_SQL)
                .bind(&job_ids)
                .bind(&f_schedule)
                .bind(&f_nominal)
                .bind("schedule")
                .execute(&mut *tx)
                .await?;
        }
        // Advance every planned schedule.
        let mut adv = Advance::default();
        let mut cursor = 0;
        let mut fired_out = Vec::with_capacity(planned.len());
        for (row, p) in planned {
            let mine: Vec<i64> = job_ids[cursor..cursor + p.fire.len()].to_vec();
            let due: Vec<DateTime<Utc>> = f_due[cursor..cursor + p.fire.len()].to_vec();
            cursor += p.fire.len();
            adv.id.push(row.id);
            adv.next_nominal.push(p.next_nominal);
            adv.next_fire_at.push(p.next_fire_at);
            adv.last_nominal.push(p.fire.last().copied());
            adv.fired.push(!mine.is_empty());
            adv.last_job.push(mine.last().copied());
            adv.fires.push(mine.len() as i64);
            adv.skipped.push(p.skipped as i64);
            adv.missed.push(p.missed as i64);
            fired_out.push((row.id, Ok(FireOutcome::Fired { plan: p, jobs: mine, due })));
        }
        if !adv.id.is_empty() {
            sqlx::query(ADVANCE_MANY_SQL)
                .bind(&adv.id)
                .bind(&adv.next_nominal)
                .bind(&adv.next_fire_at)
                .bind(&adv.last_nominal)
                .bind(&adv.fired)
                .bind(&adv.last_job)
                .bind(&adv.fires)
                .bind(&adv.skipped)
                .bind(&adv.missed)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        out.extend(fired_out);
        Ok(out)
    }

    /// After a failed fire of schedule `id` at nominal time `expected`: postpone its
    /// next attempt by `backoff`, keeping the nominal time (so nothing is skipped: once
    /// the row is fixed, the fire happens, caught up per its policy). Without this a
    /// row that fails every time (edited by SQL to a cron that no longer parses, a zone
    /// dropped from tzdata) stays the oldest due and, with enough of them, fills every
    /// due scan: the partition's healthy schedules never fire. Fenced like a fire.
    pub async fn defer_schedule(
        &self,
        fence: &Fence,
        id: i64,
        expected: DateTime<Utc>,
        backoff: std::time::Duration,
    ) -> Result<bool> {
        let mut tx = self.pool().begin().await?;
        let held: bool = sqlx::query_scalar(FENCE_SQL)
            .bind(fence.partition as i32)
            .bind(fence.epoch)
            .bind(&*fence.owner)
            .fetch_one(&mut *tx)
            .await?;
        if !held {
            tx.rollback().await?;
            return Err(Error::Fenced { partition: fence.partition, epoch: fence.epoch });
        }
        let n = sqlx::query(DEFER_SQL).bind(id).bind(expected).bind(ms(backoff)).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(n.rows_affected() > 0)
    }

    /// Enqueue one job per nominal time for schedule `row` and record the fires.
    async fn enqueue_fires(
        &self,
        conn: &mut sqlx::PgConnection,
        row: &ScheduleRow,
        nominals: &[DateTime<Utc>],
        via: &str,
        defaults: KindDefaults<'_>,
    ) -> Result<Vec<i64>> {
        if nominals.is_empty() {
            return Ok(Vec::new());
        }
        let def = row.def()?;
        let jobs: Vec<NewJob> = nominals.iter().map(|_| def.job()).collect();
        let enqueued = insert_resolved(&mut *conn, self.partitions(), &jobs, defaults).await?;
        let ids: Vec<i64> = enqueued.iter().map(|e| e.id).collect();
        sqlx::query(RECORD_FIRES_SQL).bind(&ids).bind(row.id).bind(nominals).bind(via).execute(&mut *conn).await?;
        Ok(ids)
    }

    /// Create or change a schedule (`source`: "code" or "runtime"; see
    /// [`crate::scheduler`]). Its first nominal time is the first after the database's
    /// `now`.
    pub async fn upsert_schedule(&self, def: &ScheduleDef, source: &str) -> Result<Upserted> {
        let spec = def.validate()?;
        let now: DateTime<Utc> = sqlx::query_scalar(NOW_SQL).fetch_one(self.pool()).await?;
        let next = spec.next_after(now);
        let key = ScheduleDef::jitter_key(&def.account, &def.name);
        let (cron, every_ms, anchor) = match &def.timing {
            Timing::Cron(c) => (Some(c.clone()), None, None),
            Timing::Every { every, anchor } => (None, Some(ms(*every)), Some(*anchor)),
        };
        let row: Option<ScheduleRow> = sqlx::query_as(UPSERT_SQL)
            .bind(&def.account)
            .bind(warden_cluster::partition_of(&def.account, self.partitions()) as i32)
            .bind(&def.name)
            .bind(&def.kind)
            .bind(&def.args)
            .bind(def.lane.as_str())
            .bind(def.priority)
            .bind(def.max_attempts)
            .bind(def.timeout.map(|t| ms(t).min(i32::MAX as i64) as i32))
            .bind(cron)
            .bind(every_ms)
            .bind(anchor)
            .bind(&def.zone)
            .bind(ms(def.jitter))
            .bind(def.start)
            .bind(def.end)
            .bind(def.overlap.as_str())
            .bind(ms(def.catchup_window))
            .bind(def.catchup.as_str())
            .bind(source)
            .bind(def.revision)
            .bind(next)
            .bind(next.map(|n| spec.fire_at(&key, n)))
            .fetch_optional(self.pool())
            .await?;
        match row {
            Some(r) => Ok(Upserted::Written(r)),
            None => {
                let kept = self.get_schedule(&def.account, &def.name).await?.ok_or_else(|| {
                    Error::Conflict(format!("schedule {:?} of {:?} changed meanwhile; retry", def.name, def.account))
                })?;
                Ok(Upserted::Kept(kept))
            }
        }
    }

    pub async fn get_schedule(&self, account: &str, name: &str) -> Result<Option<ScheduleRow>> {
        Ok(sqlx::query_as(GET_SQL).bind(account).bind(name).fetch_optional(self.pool()).await?)
    }

    /// Schedules by id, after `after_id`, at most `limit` (≤ 1000); of one account or all.
    pub async fn list_schedules(&self, account: Option<&str>, after_id: i64, limit: i64) -> Result<Vec<ScheduleRow>> {
        Ok(sqlx::query_as(LIST_SQL)
            .bind(account)
            .bind(after_id)
            .bind(limit.clamp(1, 1000))
            .fetch_all(self.pool())
            .await?)
    }

    pub async fn pause_schedule(&self, account: &str, name: &str) -> Result<Option<ScheduleRow>> {
        Ok(sqlx::query_as(PAUSE_SQL).bind(account).bind(name).fetch_optional(self.pool()).await?)
    }

    /// Resume from the next nominal time after now (the paused time is not caught up).
    pub async fn resume_schedule(&self, account: &str, name: &str) -> Result<Option<ScheduleRow>> {
        let mut tx = self.pool().begin().await?;
        let row: Option<ScheduleRow> =
            sqlx::query_as(LOCK_BY_NAME_SQL).bind(account).bind(name).fetch_optional(&mut *tx).await?;
        let Some(row) = row else { return Ok(None) };
        let spec = row.def()?.spec()?;
        let now: DateTime<Utc> = sqlx::query_scalar(NOW_SQL).fetch_one(&mut *tx).await?;
        let next = spec.next_after(now);
        let key = ScheduleDef::jitter_key(account, name);
        let row: ScheduleRow = sqlx::query_as(RESUME_SQL)
            .bind(row.id)
            .bind(next)
            .bind(next.map(|n| spec.fire_at(&key, n)))
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Some(row))
    }

    /// Delete a schedule (its fires' jobs stay). `false` if there was none.
    pub async fn delete_schedule(&self, account: &str, name: &str) -> Result<bool> {
        let id: Option<i64> =
            sqlx::query_scalar(DELETE_SQL).bind(account).bind(name).fetch_optional(self.pool()).await?;
        Ok(id.is_some())
    }

    /// Fire once now, outside the timing. The job's id, `None` if no such schedule.
    pub async fn trigger_schedule(&self, account: &str, name: &str, defaults: KindDefaults<'_>) -> Result<Option<i64>> {
        let mut tx = self.pool().begin().await?;
        let row: Option<ScheduleRow> =
            sqlx::query_as(LOCK_BY_NAME_SQL).bind(account).bind(name).fetch_optional(&mut *tx).await?;
        let Some(row) = row else { return Ok(None) };
        let now: DateTime<Utc> = sqlx::query_scalar(NOW_SQL).fetch_one(&mut *tx).await?;
        let ids = self.enqueue_fires(&mut tx, &row, &[now], "trigger", defaults).await?;
        sqlx::query(RECORD_MANUAL_SQL).bind(row.id).bind(ids.last()).bind(ids.len() as i64).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(ids.first().copied())
    }

    /// Fire every nominal time in `[from, to]` that has no recorded fire yet (at most
    /// [`MAX_BACKFILL`]; overlap and catch-up policies do not apply: a backfill is an
    /// explicit request). Returns (fired, already fired); `None` if no such schedule.
    pub async fn backfill_schedule(
        &self,
        account: &str,
        name: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        defaults: KindDefaults<'_>,
    ) -> Result<Option<(Vec<i64>, usize)>> {
        if to < from {
            return Err(Error::invalid(format!("backfill range is empty: {from} is after {to}")));
        }
        // Jobs run from the Unix epoch on (MIN_RUN_AT_UNIX_S); and `from - 1 ns` below
        // (or a zone's offset) would overflow chrono and panic for "from the start of
        // time" (DateTime::MIN_UTC).
        if from < DateTime::UNIX_EPOCH {
            return Err(Error::invalid(format!("backfill range starts at {from}, before 1970-01-01")));
        }
        let mut tx = self.pool().begin().await?;
        let row: Option<ScheduleRow> =
            sqlx::query_as(LOCK_BY_NAME_SQL).bind(account).bind(name).fetch_optional(&mut *tx).await?;
        let Some(row) = row else { return Ok(None) };
        let spec = row.def()?.spec()?;
        let mut nominals: Vec<DateTime<Utc>> =
            spec.nominal_times(from - TimeDelta::nanoseconds(1), to, MAX_BACKFILL + 1).collect();
        if nominals.len() > MAX_BACKFILL {
            return Err(Error::invalid(format!(
                "backfill range holds more than {MAX_BACKFILL} nominal times; split it"
            )));
        }
        // Nominal times the schedule has not reached yet are its own to fire (on time,
        // under its policies): a backfill covers only the past it has moved beyond.
        nominals.retain(|n| row.next_nominal.is_none_or(|next| *n < next));
        let fired: Vec<DateTime<Utc>> =
            sqlx::query_scalar(ALREADY_FIRED_SQL).bind(row.id).bind(&nominals).fetch_all(&mut *tx).await?;
        nominals.retain(|n| !fired.contains(n));
        let ids = self.enqueue_fires(&mut tx, &row, &nominals, "backfill", defaults).await?;
        sqlx::query(RECORD_MANUAL_SQL).bind(row.id).bind(ids.last()).bind(ids.len() as i64).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(Some((ids, fired.len())))
    }

    /// The nominal time of the fire that enqueued `job_id`, if a schedule did.
    pub async fn nominal_of(&self, job_id: i64) -> Result<Option<DateTime<Utc>>> {
        Ok(sqlx::query_scalar("SELECT nominal_at FROM warden.schedule_fires WHERE job_id = $1")
            .bind(job_id)
            .fetch_optional(self.pool())
            .await?)
    }
}
