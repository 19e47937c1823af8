//! Periodic schedules in-process (issue 14): exactly one fire per nominal time,
//! catch-up after downtime, overlap policies, management at run time, schedules
//! declared in code reconciled by revision, and the fire's fence and
//! compare-and-set. One node against a real PostgreSQL, one database per test.

use chrono::{DateTime, TimeDelta, Utc};
use std::collections::BTreeMap;
use std::time::Duration;
use warden_runtime::scheduler::{CatchUp, Overlap, ScheduleDef};
use warden_runtime::store::pg::FireOutcome;
use warden_runtime::store::{Fence, PgStore, Store};
use warden_runtime::{async_trait, Handler, HandlerResult, JobContext, JobOptions, Node, NodeConfig, Outcome};
use warden_tests::{eventually, TestDb};

const P: u32 = 8;
const WAIT: Duration = Duration::from_secs(30);

/// Records each run: (job id, nominal time, started).
struct Tick {
    pool: sqlx::PgPool,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct TickArgs {
    #[serde(default)]
    sleep_ms: u64,
}

#[async_trait]
impl Handler for Tick {
    type Args = TickArgs;
    const KIND: &'static str = "tick";
    fn options(&self) -> JobOptions {
        JobOptions { max_attempts: 3, ..Default::default() }
    }
    async fn run(&self, ctx: &mut JobContext, a: TickArgs) -> HandlerResult {
        let nominal = ctx.scheduled_at().await?;
        sqlx::query("INSERT INTO ticks (job_id, account, nominal, started) VALUES ($1, $2, $3, clock_timestamp())")
            .bind(ctx.job_id())
            .bind(ctx.account())
            .bind(nominal)
            .execute(&self.pool)
            .await?;
        tokio::time::sleep(Duration::from_millis(a.sleep_ms)).await;
        Ok(Outcome::Done)
    }
}

fn config(id: &str) -> NodeConfig {
    let mut c = warden_tests::fast_node_config(id, P);
    c.schedule_interval = Duration::from_millis(50);
    c
}

async fn builder(db: &TestDb, id: &str) -> warden_runtime::NodeBuilder {
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS ticks (job_id bigint, account text, nominal timestamptz, started timestamptz)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    Node::builder(config(id)).register(Tick { pool: db.pool.clone() }).unwrap()
}

async fn start(db: &TestDb, id: &str) -> Node {
    builder(db, id).await.start(db.node_pool().await).await.unwrap()
}

fn every_second(account: &str, name: &str, sleep_ms: u64) -> ScheduleDef {
    ScheduleDef::every(account, name, Duration::from_secs(1), "tick", serde_json::json!({ "sleep_ms": sleep_ms }))
        .unwrap()
}

/// Fires recorded in warden.schedule_fires of `account`'s schedules: nominal → count.
async fn fires_of(db: &TestDb, account: &str) -> BTreeMap<DateTime<Utc>, i64> {
    let rows: Vec<(DateTime<Utc>, i64)> = sqlx::query_as(
        "SELECT f.nominal_at, count(*) FROM warden.schedule_fires f JOIN warden.schedules s ON s.id = f.schedule_id
         WHERE s.account = $1 AND f.via = 'schedule' GROUP BY 1 ORDER BY 1",
    )
    .bind(account)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    rows.into_iter().collect()
}

/// Every nominal time from the first to the last fired exactly once, one second apart.
fn assert_each_second_once(fires: &BTreeMap<DateTime<Utc>, i64>) {
    assert!(fires.values().all(|n| *n == 1), "a nominal time fired twice: {fires:?}");
    let times: Vec<_> = fires.keys().copied().collect();
    for w in times.windows(2) {
        assert_eq!(w[1] - w[0], TimeDelta::seconds(1), "a nominal time was missed between {} and {}", w[0], w[1]);
    }
}

#[tokio::test]
async fn an_interval_schedule_fires_each_nominal_time_once_and_the_handler_knows_it() {
    let db = TestDb::new().await;
    let node = start(&db, "n1").await;
    let row = node.client().schedules().put(&every_second("acct-every", "beat", 0)).await.unwrap();
    assert_eq!(row.source, "runtime");
    eventually(WAIT, "5 fires", || async { (fires_of(&db, "acct-every").await.len() >= 5).then_some(()) }).await;
    let fires = fires_of(&db, "acct-every").await;
    assert_each_second_once(&fires);
    // The handler saw its nominal time, and started within a second of it.
    let lags: Vec<(Option<DateTime<Utc>>, DateTime<Utc>)> =
        sqlx::query_as("SELECT nominal, started FROM ticks WHERE account = 'acct-every' ORDER BY nominal")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert!(lags.len() >= 4);
    for (nominal, started) in &lags {
        let nominal = nominal.expect("scheduled_at is the nominal time");
        assert!(fires.contains_key(&nominal));
        let lag = *started - nominal;
        // The figure is the benchmark's (warden-schedule-bench); here only its bound,
        // loose enough for a loaded CI machine.
        assert!(lag >= TimeDelta::zero() && lag < TimeDelta::milliseconds(3000), "fire lag {lag}");
    }
    node.shutdown().await.unwrap();
}

#[tokio::test]
async fn after_downtime_fires_within_the_catch_up_window_run_and_older_ones_are_missed() {
    let db = TestDb::new().await;
    let node = start(&db, "n1").await;
    let def = every_second("acct-catchup", "beat", 0)
        .catch_up(Duration::from_secs(3), CatchUp::All)
        .overlap(Overlap::BufferAll);
    node.client().schedules().put(&def).await.unwrap();
    eventually(WAIT, "first fires", || async { (fires_of(&db, "acct-catchup").await.len() >= 2).then_some(()) }).await;
    node.shutdown().await.unwrap();
    let stopped_at = Utc::now();
    tokio::time::sleep(Duration::from_secs(7)).await;
    let node = start(&db, "n2").await;
    eventually(WAIT, "caught up", || async {
        let f = fires_of(&db, "acct-catchup").await;
        (f.keys().last().is_some_and(|t| *t > stopped_at + TimeDelta::seconds(8))).then_some(())
    })
    .await;
    let s = node.client().schedules().get("acct-catchup", "beat").await.unwrap().unwrap();
    assert!(s.missed_total >= 2, "fires older than 3 s were counted missed: {s:?}");
    let fires = fires_of(&db, "acct-catchup").await;
    assert!(fires.values().all(|n| *n == 1), "{fires:?}");
    // The gap in fired nominal times is exactly the missed ones.
    let times: Vec<_> = fires.keys().copied().collect();
    let gaps: i64 = times.windows(2).map(|w| (w[1] - w[0]).num_seconds() - 1).sum();
    assert_eq!(gaps, s.missed_total, "every nominal time either fired once or was counted missed: {times:?}");
    node.shutdown().await.unwrap();
}

#[tokio::test]
async fn overlap_skip_never_piles_up_fires_behind_a_slow_job() {
    let db = TestDb::new().await;
    let node = start(&db, "n1").await;
    node.client().schedules().put(&every_second("acct-skip", "slow", 2500)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(8)).await;
    let s = node.client().schedules().get("acct-skip", "slow").await.unwrap().unwrap();
    assert!(s.skipped_total >= 3, "fires while one ran were skipped: {s:?}");
    let open: i64 = sqlx::query_scalar(
        "SELECT max(n) FROM (SELECT count(*) AS n FROM warden.jobs WHERE account = 'acct-skip'
         AND state IN ('scheduled', 'available', 'retryable', 'running')) x",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(open <= 1, "never more than one unfinished fire: {open}");
    node.shutdown().await.unwrap();
}

#[tokio::test]
async fn schedules_are_managed_at_run_time_pause_resume_trigger_backfill_delete() {
    let db = TestDb::new().await;
    let node = start(&db, "n1").await;
    let sch = node.client().schedules();
    let def = ScheduleDef::cron("acct-admin", "hourly", "0 * * * *", "tick", serde_json::json!({})).unwrap();
    let row = sch.put(&def).await.unwrap();
    let next = row.next_nominal.unwrap();
    assert!(next > Utc::now() && next.format("%M:%S").to_string() == "00:00", "{next}");

    let bad = ScheduleDef::cron("acct-admin", "bad", "0 25 * * *", "tick", ()).unwrap();
    let err = sch.put(&bad).await.unwrap_err().to_string();
    assert!(err.contains("hour field"), "{err}");
    let zone = def.clone().zone("Europe/Pariss");
    assert!(sch.put(&zone).await.unwrap_err().to_string().contains("unknown time zone"));

    let job = sch.trigger("acct-admin", "hourly").await.unwrap();
    node.client().wait_finished(&[job], WAIT).await.unwrap();

    let from: DateTime<Utc> = "2026-01-01T00:00:00Z".parse().unwrap();
    let to: DateTime<Utc> = "2026-01-01T05:00:00Z".parse().unwrap();
    let b = sch.backfill("acct-admin", "hourly", from, to).await.unwrap();
    assert_eq!((b.jobs.len(), b.already_fired), (6, 0), "00:00 … 05:00 inclusive");
    let again = sch.backfill("acct-admin", "hourly", from, to).await.unwrap();
    assert_eq!((again.jobs.len(), again.already_fired), (0, 6), "a nominal time fires once");
    let too_many = sch.backfill("acct-admin", "hourly", from, from + TimeDelta::days(500)).await;
    assert!(too_many.unwrap_err().to_string().contains("more than"));
    for id in &b.jobs {
        node.client().wait_finished(&[*id], WAIT).await.unwrap();
    }
    let nominals: Vec<Option<DateTime<Utc>>> =
        sqlx::query_scalar("SELECT nominal FROM ticks WHERE account = 'acct-admin' ORDER BY started")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(nominals.len(), 7);
    assert_eq!(nominals[1], Some(from), "backfilled jobs run in nominal order");

    let paused = sch.pause("acct-admin", "hourly").await.unwrap();
    assert!(paused.paused);
    let resumed = sch.resume("acct-admin", "hourly").await.unwrap();
    assert!(!resumed.paused && resumed.next_nominal.unwrap() > Utc::now());
    assert_eq!(sch.list(Some("acct-admin"), 0, 10).await.unwrap().len(), 1);
    assert!(sch.delete("acct-admin", "hourly").await.unwrap());
    assert!(!sch.delete("acct-admin", "hourly").await.unwrap());
    assert!(sch.pause("acct-admin", "hourly").await.unwrap_err().to_string().contains("no schedule"));
    node.shutdown().await.unwrap();
}

#[tokio::test]
async fn schedules_declared_in_code_are_replaced_only_by_a_higher_revision() {
    let db = TestDb::new().await;
    let v1 = ScheduleDef::cron("acct-code", "nightly", "0 3 * * *", "tick", ()).unwrap().revision(1);
    let v2 = ScheduleDef::cron("acct-code", "nightly", "0 4 * * *", "tick", ()).unwrap().revision(2);
    let node = builder(&db, "new").await.schedule(v2.clone()).unwrap().start(db.node_pool().await).await.unwrap();
    let stored = node.client().schedules().get("acct-code", "nightly").await.unwrap().unwrap();
    assert_eq!((stored.cron.as_deref(), stored.revision, stored.source.as_str()), (Some("0 4 * * *"), 2, "code"));
    node.shutdown().await.unwrap();
    // An old node (revision 1) restarting mid-rollout leaves revision 2 alone.
    let old = builder(&db, "old").await.schedule(v1).unwrap().start(db.node_pool().await).await.unwrap();
    let stored = old.client().schedules().get("acct-code", "nightly").await.unwrap().unwrap();
    assert_eq!((stored.cron.as_deref(), stored.revision), (Some("0 4 * * *"), 2));
    // Run-time changes to a code schedule are refused with a clear error.
    let err = old.client().schedules().put(&v2).await.unwrap_err().to_string();
    assert!(err.contains("declared in a node's code"), "{err}");
    old.shutdown().await.unwrap();
    // Declaring one name twice is an error at build time.
    let twice = builder(&db, "x").await.schedule(v2.clone()).unwrap().schedule(v2);
    assert!(twice.is_err());
}

#[tokio::test]
async fn a_fire_is_fenced_and_compare_and_set_on_its_nominal_time() {
    let db = TestDb::new().await;
    let node = start(&db, "n1").await;
    let row = node
        .client()
        .schedules()
        .put(&ScheduleDef::cron("acct-cas", "daily", "0 0 * * *", "tick", ()).unwrap())
        .await
        .unwrap();
    node.shutdown().await.unwrap();
    let store = PgStore::new(db.pool.clone(), warden_runtime::PartitionCount::new(P).unwrap());
    let p = row.partition as u32;
    let granted = store.acquire("thief/1", &[p], Duration::from_secs(30)).await.unwrap();
    let fence = Fence { partition: p, epoch: granted[0].epoch, owner: "thief/1".into() };
    let nominal = row.next_nominal.unwrap();
    let plan = |_: &warden_runtime::scheduler::ScheduleRow, _, _| {
        Ok(warden_runtime::scheduler::FirePlan { fire: vec![nominal], ..Default::default() })
    };
    let no_defaults = |_: &str| warden_runtime::store::KindDefault::default();
    let stale = store
        .fire_schedule(&fence, row.id, nominal - TimeDelta::days(1), Duration::from_secs(5), &no_defaults, plan)
        .await
        .unwrap();
    assert_eq!(stale, FireOutcome::Stale, "a fire planned for another nominal time does nothing");
    let old = Fence { epoch: fence.epoch - 1, ..fence.clone() };
    let fenced = store.fire_schedule(&old, row.id, nominal, Duration::from_secs(5), &no_defaults, plan).await;
    assert!(matches!(fenced, Err(warden_runtime::Error::Fenced { .. })), "{fenced:?}");
    let fired = store.fire_schedule(&fence, row.id, nominal, Duration::from_secs(5), &no_defaults, plan).await.unwrap();
    assert!(matches!(fired, FireOutcome::Fired { ref jobs, .. } if jobs.len() == 1), "{fired:?}");
    // The plan said the schedule ended (no next nominal time): nothing is due any more.
    let again = store.fire_schedule(&fence, row.id, nominal, Duration::from_secs(5), &no_defaults, plan).await.unwrap();
    assert_eq!(again, FireOutcome::Stale, "the same nominal time never fires twice");
}

#[tokio::test]
async fn schedules_whose_rows_no_longer_parse_do_not_starve_the_others() {
    // Rows edited behind the API's back (a zone dropped from tzdata by an upgrade, a
    // cron expression changed by SQL) fail every fire. They are the oldest due, so
    // without a back-off they fill the due scan (DUE_SCAN_LIMIT = 1000) on every pass
    // and a healthy schedule of the same node never fires.
    let db = TestDb::new().await;
    let node = start(&db, "n1").await;
    node.client().schedules().put(&every_second("acct-healthy", "beat", 0)).await.unwrap();
    sqlx::query(
        "INSERT INTO warden.schedules (account, partition, name, kind, cron, zone, next_nominal, next_fire_at)
         SELECT 'acct-broken-' || i, warden.partition_of('acct-broken-' || i, $1), 'b', 'tick',
                CASE WHEN i % 2 = 0 THEN '0 * * * *' ELSE '0 99 * * *' END,
                CASE WHEN i % 2 = 0 THEN 'Mars/Olympus' ELSE 'UTC' END,
                now() - interval '1 hour', now() - interval '1 hour'
         FROM generate_series(1, 1200) i",
    )
    .bind(P as i32)
    .execute(&db.pool)
    .await
    .unwrap();
    eventually(WAIT, "the healthy schedule fires", || async {
        (fires_of(&db, "acct-healthy").await.len() >= 3).then_some(())
    })
    .await;
    // The broken ones fired nothing, kept their nominal time, and wait a back-off.
    let (fired, kept, deferred): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM warden.schedule_fires f JOIN warden.schedules s ON s.id = f.schedule_id
                 WHERE s.account LIKE 'acct-broken-%'),
                count(*) FILTER (WHERE next_nominal < now() - interval '50 minutes'),
                count(*) FILTER (WHERE next_fire_at > now())
         FROM warden.schedules WHERE account LIKE 'acct-broken-%'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((fired, kept), (0, 1200));
    assert!(deferred > 1000, "{deferred}");
    node.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_row_with_an_unbounded_catch_up_window_neither_kills_the_scheduler_nor_wedges_others() {
    // An operator sets "catch up forever" by SQL (the API caps the window at 366 days;
    // the column only says >= 0). `now - window` overflowed chrono and panicked inside
    // the scheduler task: the task died, and with it every schedule of the node — and
    // of each node that took the partitions over.
    let db = TestDb::new().await;
    let node = start(&db, "n1").await;
    let sch = node.client().schedules();
    sch.put(&every_second("acct-forever", "beat", 0)).await.unwrap();
    sqlx::query("UPDATE warden.schedules SET catchup_window_ms = 9223372036854775807 WHERE account = 'acct-forever'")
        .execute(&db.pool)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    sch.put(&every_second("acct-other", "beat", 0)).await.unwrap();
    eventually(WAIT, "both fire", || async {
        (fires_of(&db, "acct-forever").await.len() >= 2 && fires_of(&db, "acct-other").await.len() >= 2).then_some(())
    })
    .await;
    assert_each_second_once(&fires_of(&db, "acct-forever").await);
    node.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_backfill_from_the_start_of_time_is_refused_not_a_panic() {
    // "Everything so far": from = DateTime::MIN_UTC. `from - 1 ns` overflowed chrono and
    // panicked the caller (a management request handler, once exposed over gRPC).
    let db = TestDb::new().await;
    let node = start(&db, "n1").await;
    let sch = node.client().schedules();
    let def = ScheduleDef::cron("acct-bf", "hourly", "0 * * * *", "tick", ()).unwrap().zone("America/New_York");
    sch.put(&def).await.unwrap();
    let err = sch.backfill("acct-bf", "hourly", DateTime::<Utc>::MIN_UTC, Utc::now()).await.unwrap_err();
    assert!(err.to_string().contains("backfill"), "{err}");
    // The row lock was released: the schedule is still managed normally.
    sch.pause("acct-bf", "hourly").await.unwrap();
    node.shutdown().await.unwrap();
}

#[tokio::test]
async fn dst_transitions_through_the_fire_path_fire_each_wall_time_once() {
    // New York: 02:30 does not exist on 2026-03-08 (fires at 03:00 EDT = 07:00Z); 01:30
    // happens twice on 2026-11-01 (fires at the first, 05:30Z, never at 06:30Z). The
    // fall-back fire is planned at 06:45Z, after both, with a 2 h catch-up window.
    let db = TestDb::new().await;
    let node = start(&db, "n1").await;
    let sch = node.client().schedules();
    let spring = sch
        .put(&ScheduleDef::cron("acct-dst", "spring", "30 2 * * *", "tick", ()).unwrap().zone("America/New_York"))
        .await
        .unwrap();
    let fall = sch
        .put(&ScheduleDef::cron("acct-dst", "fall", "30 1 * * *", "tick", ()).unwrap().zone("America/New_York"))
        .await
        .unwrap();
    node.shutdown().await.unwrap();
    let store = PgStore::new(db.pool.clone(), warden_runtime::PartitionCount::new(P).unwrap());
    let p = spring.partition as u32;
    let granted = store.acquire("n2/1", &[p], Duration::from_secs(30)).await.unwrap();
    let fence = Fence { partition: p, epoch: granted[0].epoch, owner: "n2/1".into() };
    let no_defaults = |_: &str| warden_runtime::store::KindDefault::default();
    let at = |s: &str| s.parse::<DateTime<Utc>>().unwrap();
    for (row, nominal, now, next) in [
        (&spring, at("2026-03-08T07:00:00Z"), at("2026-03-08T07:00:00.2Z"), at("2026-03-09T06:30:00Z")),
        (&fall, at("2026-11-01T05:30:00Z"), at("2026-11-01T06:45:00Z"), at("2026-11-02T06:30:00Z")),
    ] {
        sqlx::query("UPDATE warden.schedules SET next_nominal = $2, next_fire_at = $2 WHERE id = $1")
            .bind(row.id)
            .bind(nominal)
            .execute(&db.pool)
            .await
            .unwrap();
        let out = store
            .fire_schedule(&fence, row.id, nominal, Duration::from_secs(5), &no_defaults, |r, earlier, _| {
                let def = r.def()?;
                let spec = def.spec()?;
                let key = ScheduleDef::jitter_key(&r.account, &r.name);
                Ok(warden_runtime::scheduler::plan_fires(
                    &spec,
                    &key,
                    nominal,
                    def.overlap,
                    Duration::from_secs(7200),
                    def.catchup,
                    earlier,
                    now,
                ))
            })
            .await
            .unwrap();
        let FireOutcome::Fired { plan, jobs, .. } = out else { panic!("{out:?}") };
        assert_eq!((plan.fire, jobs.len(), plan.missed), (vec![nominal], 1, 0), "{}", row.name);
        let stored = store.get_schedule("acct-dst", &row.name).await.unwrap().unwrap();
        assert_eq!(stored.next_nominal, Some(next), "{}: the repeated/skipped wall time fires once", row.name);
    }
}

/// Migration 0009: pause, trigger and delete from SQL, under the same row lock as the
/// runtime (the fire re-reads the row: a paused or deleted schedule does not fire); a
/// trigger's job resolves its kind's defaults as `Schedules::trigger` does. Creating and
/// resuming are not offered from SQL (they need the Rust timing code).
#[tokio::test]
async fn schedules_are_paused_triggered_and_deleted_from_sql() {
    let db = TestDb::new().await;
    let node = start(&db, "n1").await;
    node.client().schedules().put(&every_second("acct-sql", "beat", 0)).await.unwrap();
    eventually(WAIT, "2 fires", || async { (fires_of(&db, "acct-sql").await.len() >= 2).then_some(()) }).await;
    let paused: bool =
        sqlx::query_scalar("SELECT warden.schedule_pause('acct-sql', 'beat')").fetch_one(&db.pool).await.unwrap();
    assert!(paused);
    let missing: bool =
        sqlx::query_scalar("SELECT warden.schedule_pause('acct-sql', 'nope')").fetch_one(&db.pool).await.unwrap();
    assert!(!missing);
    // A fire that had the row locked before the pause may still commit; none after it.
    let at_pause = fires_of(&db, "acct-sql").await.len();
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let after = fires_of(&db, "acct-sql").await.len();
    assert!(after <= at_pause + 1, "a paused schedule fired: {at_pause} → {after}");
    assert_each_second_once(&fires_of(&db, "acct-sql").await);

    // Trigger (a paused schedule too, as the runtime's trigger does).
    let before = node.client().schedules().get("acct-sql", "beat").await.unwrap().unwrap();
    let job: i64 =
        sqlx::query_scalar("SELECT warden.schedule_trigger('acct-sql', 'beat')").fetch_one(&db.pool).await.unwrap();
    node.client().wait_finished(&[job], WAIT).await.unwrap();
    let j = node.client().get(job).await.unwrap().unwrap();
    assert_eq!((j.kind.as_str(), j.max_attempts, j.args.clone()), ("tick", 3, serde_json::json!({ "sleep_ms": 0 })));
    let via: String = sqlx::query_scalar("SELECT via FROM warden.schedule_fires WHERE job_id = $1")
        .bind(job)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(via, "trigger");
    let row = node.client().schedules().get("acct-sql", "beat").await.unwrap().unwrap();
    assert_eq!((row.fires_total, row.last_job_id), (before.fires_total + 1, Some(job)));
    assert_eq!(row.next_nominal, before.next_nominal, "a trigger is outside the timing");
    let none: Option<i64> =
        sqlx::query_scalar("SELECT warden.schedule_trigger('acct-sql', 'nope')").fetch_one(&db.pool).await.unwrap();
    assert_eq!(none, None);

    // Resuming is the runtime's (it computes the next nominal time), and it continues
    // after the resume: the paused seconds are neither fired nor counted missed.
    let resumable: Option<String> =
        sqlx::query_scalar("SELECT to_regproc('warden.schedule_resume')::text").fetch_one(&db.pool).await.unwrap();
    assert_eq!(resumable, None, "not offered from SQL");
    let resumed = node.client().schedules().resume("acct-sql", "beat").await.unwrap();
    assert!(resumed.next_nominal.unwrap() > Utc::now() - TimeDelta::seconds(1));
    let n = fires_of(&db, "acct-sql").await.len();
    eventually(WAIT, "fires again", || async { (fires_of(&db, "acct-sql").await.len() > n).then_some(()) }).await;
    assert_eq!(node.client().schedules().get("acct-sql", "beat").await.unwrap().unwrap().missed_total, 0);

    // Delete: gone, its jobs stay, and it fires no more.
    let deleted: bool =
        sqlx::query_scalar("SELECT warden.schedule_delete('acct-sql', 'beat')").fetch_one(&db.pool).await.unwrap();
    assert!(deleted);
    let again: bool =
        sqlx::query_scalar("SELECT warden.schedule_delete('acct-sql', 'beat')").fetch_one(&db.pool).await.unwrap();
    assert!(!again);
    assert!(node.client().schedules().get("acct-sql", "beat").await.unwrap().is_none());
    assert!(node.client().get(job).await.unwrap().is_some(), "its jobs stay");
    node.shutdown().await.unwrap();
}

/// `name{labels} value` lines of Prometheus text: the value of `name` (labels verbatim).
fn prom(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[tokio::test]
async fn the_fire_lag_is_due_to_first_start_in_the_metric_and_in_the_schedules_view() {
    // The only test of this binary that installs a recorder (nextest: one process per test).
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder().unwrap();
    let db = TestDb::new().await;
    let node = start(&db, "n1").await;
    let sch = node.client().schedules();
    // With jitter, so "due" (nominal + jitter) and "nominal" differ.
    let def = every_second("acct-lag", "beat", 0).jitter(Duration::from_millis(400));
    let row = sch.put(&def).await.unwrap();
    assert_eq!(row.last_fire_lag(), None, "not fired yet");
    eventually(WAIT, "3 fires started", || async { (fires_of(&db, "acct-lag").await.len() >= 3).then_some(()) }).await;
    sch.pause("acct-lag", "beat").await.unwrap();
    // The last fire's job starts; the view then carries its lag.
    let row = eventually(WAIT, "the last fire's lag", || async {
        let r = sch.get("acct-lag", "beat").await.unwrap().unwrap();
        r.last_fire_lag().is_some().then_some(r)
    })
    .await;
    let lag = row.last_fire_lag().unwrap();
    // Against the database: the first attempt's claim minus (nominal + jitter).
    let (job, nominal): (i64, DateTime<Utc>) = sqlx::query_as(
        "SELECT job_id, nominal_at FROM warden.schedule_fires WHERE schedule_id = $1 AND nominal_at = $2",
    )
    .bind(row.id)
    .bind(row.last_nominal.unwrap())
    .fetch_one(&db.pool)
    .await
    .unwrap();
    node.client().wait_finished(&[job], WAIT).await.unwrap();
    let started: DateTime<Utc> =
        sqlx::query_scalar("SELECT started_at FROM warden.attempts WHERE job_id = $1 AND attempt = 1")
            .bind(job)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    let due = def.spec().unwrap().fire_at(&ScheduleDef::jitter_key("acct-lag", "beat"), nominal);
    assert_eq!(lag, (started - due).to_std().unwrap(), "the view's lag: first start − due");
    assert!(lag < Duration::from_secs(3), "{lag:?}");

    // The metric: one observation per fire whose job started, each ≥ 0, and the view's
    // lag among them (its value is between the smallest and the largest).
    let fired = fires_of(&db, "acct-lag").await.len();
    let text = eventually(WAIT, "every fire's lag recorded", || async {
        let t = metrics.render();
        (prom(&t, "warden_schedule_fire_lag_seconds_count").unwrap_or(0.0) as usize >= fired).then_some(t)
    })
    .await;
    let count = prom(&text, "warden_schedule_fire_lag_seconds_count").unwrap();
    assert_eq!(count as usize, fired, "one observation per fire:\n{text}");
    let min = prom(&text, "warden_schedule_fire_lag_seconds{quantile=\"0\"}").unwrap();
    let max = prom(&text, "warden_schedule_fire_lag_seconds{quantile=\"1\"}").unwrap();
    assert!(min >= 0.0, "{text}");
    let l = lag.as_secs_f64();
    eprintln!("fire lag: view {l:.3} s; metric: {count} observations in [{min:.3}, {max:.3}] s");
    // (The summary's quantiles are approximate: a relative error of about 1 %.)
    let slack = 0.002 + 0.02 * max;
    assert!(l >= min - slack && l <= max + slack, "view {l} s, metric [{min}, {max}]:\n{text}");
    node.shutdown().await.unwrap();
}
