//! Regression tests for the hardening of the guarantee (issue 10): each reproduces one
//! failure an outside review found — a lost reply, an undecodable value, a spoofed
//! notification, a finish PostgreSQL rejects, a handler polled after its lease ended,
//! per-kind options ignored — and fails without its fix. Faults are injected through
//! the node's store seam ([`warden_runtime::NodeBuilder::store_layer`]), through the
//! database directly, or by pausing a node's whole runtime.

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;
use warden_runtime::account_actor::ExecConfig;
use warden_runtime::job::JobRow;
use warden_runtime::store::{
    self, DueAccount, Fence, Finish, Finished, GrantedLease, JobTx, PgStore, RunningJob, Store,
};
use warden_runtime::{
    async_trait, history, Client, Error, Handler, HandlerResult, JobContext, JobOptions, NewJob, Node, NodeConfig,
    Outcome, PartitionCount,
};
use warden_tests::{count_state, eventually, TestDb};

const WAIT: Duration = Duration::from_secs(30);
const P: u32 = 16;

fn config() -> NodeConfig {
    let mut c = warden_tests::fast_node_config("hard-node", P);
    c.exec = ExecConfig {
        idle_timeout: Duration::from_secs(1),
        cancel_grace: Duration::from_millis(300),
        cancel_poll_interval: Duration::from_millis(200),
        drain_timeout: Duration::from_secs(2),
        max_actors: 1000,
        ..Default::default()
    };
    c
}

fn part(account: &str) -> u32 {
    warden_runtime::partition_of(account, PartitionCount::new(P).unwrap())
}

// ---------------------------------------------------------------------------
// Handlers.

/// What the `step` handler does.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Step {
    #[serde(default)]
    seq: i64,
    /// Work this long (in 20 ms ticks, each stamped outside the job transaction).
    #[serde(default)]
    work_ms: u64,
    /// "done" (default), "nul_error_once", "retry_forever_later", "snooze_forever",
    /// "stop_on_cancellation" (wait for ctx.cancellation(), fail; done from attempt 2).
    #[serde(default)]
    mode: String,
}

/// Records every attempt in the job transaction (`step_log`, committed iff it
/// completed) and, as an outside observer would, its start and every 20 ms tick
/// outside it (`step_ticks`, through its own pool).
struct StepHandler {
    node: String,
    pool: sqlx::PgPool,
}

#[async_trait]
impl Handler for StepHandler {
    type Args = Step;
    const KIND: &'static str = "step";

    fn options(&self) -> JobOptions {
        JobOptions { max_attempts: 5, timeout: Duration::from_secs(20), ..Default::default() }
    }

    async fn run(&self, ctx: &mut JobContext, s: Step) -> HandlerResult {
        let tick = |what: &'static str| {
            sqlx::query("INSERT INTO step_ticks (job_id, account, node, what) VALUES ($1, $2, $3, $4)")
                .bind(ctx.job_id())
                .bind(ctx.account().to_string())
                .bind(self.node.clone())
                .bind(what)
                .execute(&self.pool)
        };
        tick("start").await?;
        assert!(ctx.lease_remaining() > Duration::ZERO, "a running handler's lease window is open");
        let mut worked = 0;
        while worked < s.work_ms {
            tokio::time::sleep(Duration::from_millis(20)).await;
            worked += 20;
            tick("tick").await?;
        }
        match s.mode.as_str() {
            "nul_error_once" if ctx.attempt() == 1 => return Err("bad \0 byte".into()),
            "retry_forever_later" => return Ok(Outcome::Retry { after: Some(Duration::MAX) }),
            "snooze_forever" => return Ok(Outcome::Snooze(Duration::MAX)),
            "stop_on_cancellation" if ctx.attempt() == 1 => {
                tokio::select! {
                    _ = ctx.cancellation().cancelled() => return Err("stopped: told to".into()),
                    _ = tokio::time::sleep(Duration::from_secs(20)) => return Err("never told to stop".into()),
                }
            }
            _ => {}
        }
        let (id, account, attempt) = (ctx.job_id(), ctx.account().to_string(), ctx.attempt());
        sqlx::query("INSERT INTO step_log (job_id, account, seq, attempt) VALUES ($1, $2, $3, $4)")
            .bind(id)
            .bind(account)
            .bind(s.seq)
            .bind(attempt)
            .execute(ctx.tx().await?)
            .await?;
        Ok(Outcome::Done)
    }
}

async fn tables(db: &TestDb) {
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS step_log (job_id bigint, account text, seq bigint, attempt int,
                                              at timestamptz DEFAULT clock_timestamp());
         CREATE TABLE IF NOT EXISTS step_ticks (job_id bigint, account text, node text, what text,
                                                at timestamptz DEFAULT clock_timestamp());",
    )
    .execute(&db.pool)
    .await
    .unwrap();
}

async fn builder(db: &TestDb, config: NodeConfig) -> warden_runtime::NodeBuilder {
    tables(db).await;
    let node = config.node_id.clone();
    Node::builder(config).register(StepHandler { node, pool: db.pool.clone() }).unwrap()
}

fn step(account: &str, s: Step) -> NewJob {
    NewJob::new(account, "step", s).unwrap()
}

async fn wait_all_completed(db: &TestDb, n: i64) {
    eventually(WAIT, &format!("{n} jobs completed"), || async {
        (count_state(&db.pool, "completed").await == n).then_some(())
    })
    .await;
}

async fn job(db: &TestDb, id: i64) -> JobRow {
    sqlx::query_as("SELECT * FROM warden.jobs WHERE id = $1").bind(id).fetch_one(&db.pool).await.unwrap()
}

async fn assert_clean(db: &TestDb) -> history::HistoryReport {
    let h = history::check(&db.pool).await.unwrap();
    assert!(h.is_clean(), "serial guarantee violated: {h:?}");
    let dup: i64 =
        sqlx::query_scalar("SELECT count(*) FROM (SELECT job_id FROM step_log GROUP BY job_id HAVING count(*) > 1) d")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(dup, 0, "a completed job's transaction committed twice");
    h
}

/// Per-account sequences: `accounts` × `per_account` step jobs.
async fn enqueue_sequences(client: &Client, accounts: usize, per_account: i64, work_ms: u64) {
    let mut jobs = Vec::new();
    for seq in 0..per_account {
        for a in 0..accounts {
            jobs.push(step(&format!("acct-{a}"), Step { seq, work_ms, ..Default::default() }));
        }
    }
    client.enqueue_many(&jobs).await.unwrap();
}

/// Order as the handler committed it: per account, seq must rise with commit time.
async fn assert_in_order(db: &TestDb) {
    let bad: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT seq, lag(seq) OVER (PARTITION BY account ORDER BY at) AS prev FROM step_log) s
         WHERE prev IS NOT NULL AND seq < prev",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(bad, 0, "serial order broken");
}

// ---------------------------------------------------------------------------
// Fault injection through the store seam.

#[derive(Default)]
struct Plan {
    /// Finishes that commit (and claim the account's next job) whose reply is then lost.
    lose_finish_replies: AtomicU32,
    /// Claims that commit (a job was claimed) whose reply is then lost.
    lose_claim_replies: AtomicU32,
    /// Finishes that panic before reaching the database.
    panic_before_finish: AtomicU32,
    /// Finishes that commit, then panic (as a decode of the claimed next row would).
    panic_after_finish: AtomicU32,
    /// Every finish of account `perm` fails with a permanent error (one that would
    /// fail the same way on every retry), after panicking `perm_panics` times.
    perm_finish: std::sync::atomic::AtomicBool,
    perm_panics: AtomicU32,
    /// Finishes of account `perm` tried.
    perm_calls: AtomicU32,
}

fn take(n: &AtomicU32) -> bool {
    n.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| v.checked_sub(1)).is_ok()
}

fn reply_lost() -> Error {
    Error::Database(sqlx::Error::Io(std::io::Error::new(
        std::io::ErrorKind::ConnectionReset,
        "injected: connection reset after the statement committed",
    )))
}

struct Faulty {
    inner: Arc<dyn Store>,
    plan: Arc<Plan>,
}

#[async_trait]
impl Store for Faulty {
    fn partitions(&self) -> PartitionCount {
        self.inner.partitions()
    }
    async fn acquire(&self, o: &str, p: &[u32], ttl: Duration) -> warden_runtime::Result<Vec<GrantedLease>> {
        self.inner.acquire(o, p, ttl).await
    }
    async fn renew(&self, o: &str, h: &[GrantedLease], ttl: Duration) -> warden_runtime::Result<Vec<u32>> {
        self.inner.renew(o, h, ttl).await
    }
    async fn release(&self, o: &str, h: &[GrantedLease]) -> warden_runtime::Result<u64> {
        self.inner.release(o, h).await
    }
    async fn rescue(&self, o: &str, a: &[GrantedLease]) -> warden_runtime::Result<u64> {
        self.inner.rescue(o, a).await
    }
    async fn lease_wait(&self, o: &str, p: &[u32]) -> warden_runtime::Result<Option<Duration>> {
        self.inner.lease_wait(o, p).await
    }
    async fn due_accounts(&self, p: &[u32], l: i64) -> warden_runtime::Result<Vec<DueAccount>> {
        self.inner.due_accounts(p, l).await
    }
    async fn running_here(&self, o: &str, p: &[u32], l: i64) -> warden_runtime::Result<Vec<RunningJob>> {
        self.inner.running_here(o, p, l).await
    }
    async fn claim(&self, account: &str, fence: &Fence) -> warden_runtime::Result<Option<JobRow>> {
        let r = self.inner.claim(account, fence).await;
        if matches!(r, Ok(Some(_))) && take(&self.plan.lose_claim_replies) {
            return Err(reply_lost());
        }
        r
    }
    async fn finish(
        &self,
        tx: Option<JobTx>,
        job: &JobRow,
        fence: &Fence,
        finish: &Finish,
        claim_next: bool,
    ) -> warden_runtime::Result<Finished> {
        if take(&self.plan.panic_before_finish) {
            panic!("injected panic before the finish");
        }
        if job.account == "perm" {
            self.plan.perm_calls.fetch_add(1, Ordering::AcqRel);
            if take(&self.plan.perm_panics) {
                panic!("injected panic before the finish of perm");
            }
            if self.plan.perm_finish.load(Ordering::Acquire) {
                drop(tx);
                return Err(Error::InvalidInput("injected permanent error (as SQLSTATE 23514 would be)".into()));
            }
        }
        let r = self.inner.finish(tx, job, fence, finish, claim_next).await;
        if matches!(r, Ok(Finished::Recorded(Some(_)))) {
            if take(&self.plan.lose_finish_replies) {
                return Err(reply_lost());
            }
            if take(&self.plan.panic_after_finish) {
                panic!("injected panic after the finish committed");
            }
        }
        r
    }
    async fn unclaim(&self, job: &JobRow, fence: &Fence) -> warden_runtime::Result<()> {
        self.inner.unclaim(job, fence).await
    }
    async fn cancel_requested(&self, id: i64) -> warden_runtime::Result<bool> {
        self.inner.cancel_requested(id).await
    }
    async fn beat(
        &self,
        id: i64,
        attempt: i32,
        f: &Fence,
        b: &warden_runtime::progress::Beat,
    ) -> warden_runtime::Result<warden_runtime::progress::BeatAck> {
        self.inner.beat(id, attempt, f, b).await
    }
    async fn checkpoint(&self, id: i64) -> warden_runtime::Result<Option<warden_runtime::progress::StoredCheckpoint>> {
        self.inner.checkpoint(id).await
    }
    async fn heartbeat(
        &self,
        member: &warden_runtime::store::MemberInfo,
        within: Duration,
    ) -> warden_runtime::Result<Option<Vec<String>>> {
        self.inner.heartbeat(member, within).await
    }
    async fn lease_holders(&self) -> warden_runtime::Result<Option<warden_runtime::Holders>> {
        self.inner.lease_holders().await
    }
    async fn begin(&self, idle: std::time::Duration) -> warden_runtime::Result<JobTx> {
        self.inner.begin(idle).await
    }
}

async fn start_faulty(db: &TestDb, plan: Arc<Plan>) -> Node {
    builder(db, config())
        .await
        .store_layer(Arc::new(move |inner| Arc::new(Faulty { inner, plan: plan.clone() }) as Arc<dyn Store>))
        .start(db.node_pool().await)
        .await
        .unwrap()
}

/// Issue 10 §1: a FINISH that also claimed the next job committed, but its reply was
/// lost. Its retry found nothing to finish, was taken for "fenced", and the claimed
/// job stayed `running` at the current epoch for good: `[(1, completed), (2, running),
/// (3, available)]` with the lease renewing normally. The handler commits through
/// `ctx.tx()`, so these are also in-doubt COMMITs of handler transactions.
#[tokio::test]
async fn finishes_whose_replies_are_lost_after_commit_neither_stall_nor_rerun() {
    let db = TestDb::new().await;
    let plan = Arc::new(Plan::default());
    plan.lose_finish_replies.store(12, Ordering::Release);
    let node = start_faulty(&db, plan.clone()).await;
    enqueue_sequences(node.client(), 4, 6, 0).await;
    wait_all_completed(&db, 24).await;
    assert_eq!(plan.lose_finish_replies.load(Ordering::Acquire), 0, "every planned reply was lost");
    let h = assert_clean(&db).await;
    assert_eq!((h.completed, h.unfinished, h.rescued_attempts), (24, 0, 0), "{h:?}");
    assert_in_order(&db).await;
    node.shutdown().await.unwrap();
}

/// Issue 10 §1: an in-doubt claim. The retry found the head already running and went
/// idle, leaving it `running` at this epoch with no attempt anywhere.
#[tokio::test]
async fn claims_whose_replies_are_lost_are_adopted_by_the_next_claim() {
    let db = TestDb::new().await;
    let plan = Arc::new(Plan::default());
    plan.lose_claim_replies.store(6, Ordering::Release);
    let node = start_faulty(&db, plan.clone()).await;
    enqueue_sequences(node.client(), 6, 3, 0).await;
    wait_all_completed(&db, 18).await;
    assert_eq!(plan.lose_claim_replies.load(Ordering::Acquire), 0);
    let h = assert_clean(&db).await;
    assert_eq!((h.completed, h.rescued_attempts), (18, 0), "{h:?}");
    assert_in_order(&db).await;
    node.shutdown().await.unwrap();
}

/// Issue 10 §1–2: a panic in the attempt task outside the handler (in the finish, or
/// decoding the next job it claimed) never sent `Done`: the actor stayed busy, the
/// job `running`, and a drain never completed (the partition stayed held for good).
#[tokio::test]
async fn a_panic_in_the_attempt_task_still_ends_the_attempt_and_lets_a_drain_finish() {
    let db = TestDb::new().await;
    let plan = Arc::new(Plan::default());
    plan.panic_before_finish.store(2, Ordering::Release);
    plan.panic_after_finish.store(2, Ordering::Release);
    let node = start_faulty(&db, plan.clone()).await;
    enqueue_sequences(node.client(), 2, 5, 0).await;
    wait_all_completed(&db, 10).await;
    let h = assert_clean(&db).await;
    assert_eq!(h.completed, 10);
    assert_in_order(&db).await;
    let t = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(10), node.shutdown()).await.expect("shutdown hung").unwrap();
    assert!(t.elapsed() < Duration::from_secs(5), "drain took {:?}", t.elapsed());
}

// ---------------------------------------------------------------------------
// The store directly.

async fn store_setup() -> (TestDb, PgStore, Client, Vec<Fence>) {
    let db = TestDb::new().await;
    store::migrate(&db.pool).await.unwrap();
    let parts = store::init_partitions(&db.pool, PartitionCount::new(P).unwrap()).await.unwrap();
    let client = Client::connect(db.pool.clone()).await.unwrap();
    let s = PgStore::new(db.pool.clone(), parts);
    let all: Vec<u32> = (0..P).collect();
    let granted = s.acquire("me/1", &all, Duration::from_secs(60)).await.unwrap();
    let fences =
        granted.iter().map(|g| Fence { partition: g.partition, epoch: g.epoch, owner: "me/1".into() }).collect();
    (db, s, client, fences)
}

fn fence_of(fences: &[Fence], account: &str) -> Fence {
    fences.iter().find(|f| f.partition == part(account)).unwrap().clone()
}

/// Issue 10 §1 at the statement level: a retried finish whose first try committed is
/// `NotRunning` (the fence holds), not `Fenced`; the next claim adopts the job that
/// first try claimed instead of finding the head running and going idle.
#[tokio::test]
async fn a_retried_finish_that_already_committed_is_not_a_fence_failure_and_its_claim_is_adopted() {
    let (_db, s, client, fences) = store_setup().await;
    let f = fence_of(&fences, "acct");
    let ids: Vec<i64> = client
        .enqueue_many(&(0..3).map(|i| NewJob::new("acct", "k", i).unwrap()).collect::<Vec<_>>())
        .await
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    let first = s.claim("acct", &f).await.unwrap().unwrap();
    assert_eq!(first.id, ids[0]);
    // The reply of this finish is "lost": its result is dropped.
    let lost = s.finish(None, &first, &f, &Finish::Completed, true).await.unwrap();
    assert!(matches!(lost, Finished::Recorded(Some(ref j)) if j.id == ids[1]));
    let retry = s.finish(None, &first, &f, &Finish::Completed, true).await.unwrap();
    assert!(matches!(retry, Finished::NotRunning), "an ambiguous result is not a fence failure: {retry:?}");
    let adopted = s.claim("acct", &f).await.unwrap().expect("the orphaned claim is adopted");
    // Adopting counts an attempt, as a rescue does (the lost one may have run).
    assert_eq!((adopted.id, adopted.state.as_str(), adopted.attempt), (ids[1], "running", 2));
    let again = s.claim("acct", &f).await.unwrap().unwrap();
    assert_eq!((again.id, again.attempt), (ids[1], 3), "adopting again adopts the same job");
    let adopted = again;
    let next = s.finish(None, &adopted, &f, &Finish::Completed, true).await.unwrap().into_next().unwrap();
    assert_eq!(next.id, ids[2]);
    // Under a newer epoch, the old one's orphan is not "mine": it is rescued instead.
    let other = Fence { epoch: f.epoch + 1, ..f.clone() };
    assert!(matches!(s.claim("acct", &other).await, Err(Error::Fenced { .. })));
}

/// Issue 10 §3: a spoofed `pg_notify('warden_wake', '12:victim')` made a node claim
/// `victim`'s job (partition 11, not held) under partition 12's fence.
#[tokio::test]
async fn a_claim_never_takes_a_job_of_another_partition() {
    let (db, s, client, fences) = store_setup().await;
    let victim = "victim";
    let other = fences.iter().find(|f| f.partition != part(victim)).unwrap().clone();
    let id = client.enqueue(NewJob::new(victim, "k", ()).unwrap()).await.unwrap().id;
    assert!(s.claim(victim, &other).await.unwrap().is_none(), "claimed under another partition's fence");
    assert_eq!(job(&db, id).await.state, "available");
    assert!(s.claim(victim, &fence_of(&fences, victim)).await.unwrap().is_some());
}

/// Issue 10, also found: a cancel that landed while the handler was failing was
/// acknowledged, then ignored by the finish (retry or snooze), and the job ran again.
#[tokio::test]
async fn a_cancel_requested_while_an_attempt_fails_ends_the_job_cancelled() {
    let (db, s, client, fences) = store_setup().await;
    let f = fence_of(&fences, "c");
    let id = client.enqueue(NewJob::new("c", "k", ()).unwrap()).await.unwrap().id;
    let j = s.claim("c", &f).await.unwrap().unwrap();
    assert_eq!(client.cancel(id).await.unwrap(), warden_runtime::CancelResult::CancelRequested);
    let retry = Finish::Retry { after: Duration::from_millis(10), outcome: "failed", error: "boom".into() };
    s.finish(None, &j, &f, &retry, true).await.unwrap();
    let row = job(&db, id).await;
    assert_eq!(row.state, "cancelled", "{row:?}");
    assert!(row.finished_at.is_some());
    let k = client.enqueue(NewJob::new("c", "k", ()).unwrap()).await.unwrap().id;
    let j = s.claim("c", &f).await.unwrap().unwrap();
    assert_eq!(j.id, k);
    client.cancel(k).await.unwrap();
    s.finish(None, &j, &f, &Finish::Snooze { after: Duration::from_secs(1) }, true).await.unwrap();
    assert_eq!(job(&db, k).await.state, "cancelled", "a snooze after a cancel request cancels too");
}

/// Issue 10, also found: the due-work scan listed accounts whose serial head was
/// backing off (their later jobs are due but cannot run): with many of them, the scan
/// limit filled up and accounts with runnable work were never woken by it.
#[tokio::test]
async fn accounts_whose_head_is_backing_off_do_not_fill_the_due_scan() {
    let (_db, s, client, fences) = store_setup().await;
    for a in 0..12 {
        let acct = format!("blocked-{a}");
        let f = fence_of(&fences, &acct);
        client.enqueue_many(&(0..3).map(|i| NewJob::new(&acct, "k", i).unwrap()).collect::<Vec<_>>()).await.unwrap();
        let head = s.claim(&acct, &f).await.unwrap().unwrap();
        let later = Finish::Retry { after: Duration::from_secs(3600), outcome: "failed", error: "later".into() };
        s.finish(None, &head, &f, &later, true).await.unwrap();
    }
    client.enqueue(NewJob::new("runnable", "k", ()).unwrap()).await.unwrap();
    let all: Vec<u32> = (0..P).collect();
    let due = s.due_accounts(&all, 5).await.unwrap();
    assert_eq!(
        due,
        vec![DueAccount { account: "runnable".to_string(), partition: part("runnable") }],
        "only accounts with a runnable head"
    );
}

// ---------------------------------------------------------------------------
// Values at every entry.

async fn sql_enqueue_err(db: &TestDb, extra: &str) -> Option<String> {
    let sql = format!("SELECT warden.enqueue('acct', 'k', '{{}}'::jsonb{extra})");
    match sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&db.pool).await {
        Ok(_) => None,
        Err(sqlx::Error::Database(e)) => Some(format!("{} {}", e.code().unwrap_or_default(), e.message())),
        Err(e) => Some(e.to_string()),
    }
}

/// Issue 10 §2 and the SQL function's limits: values Rust cannot decode ('infinity',
/// '-infinity', years past chrono's range) were accepted and later panicked a claim;
/// the SQL function accepted timeouts up to 2^31 ms and control characters in unique
/// keys. Every entry now holds the same limits, and the table itself refuses
/// undecodable times whatever writes them.
#[tokio::test]
async fn every_entry_rejects_values_rust_cannot_decode_with_the_same_limits() {
    let (db, _s, client, _f) = store_setup().await;
    for (extra, why) in [
        (", p_run_at => 'infinity'", "infinity"),
        (", p_run_at => '-infinity'", "-infinity"),
        (", p_run_at => '294000-01-01'", "beyond chrono"),
        (", p_run_at => now() + interval '3651 days'", "past the 3650-day horizon"),
        (", p_run_at => '1969-12-31'", "before 1970"),
        (", p_timeout_ms => 86400001", "timeout over 24 h"),
        (", p_timeout_ms => 0", "timeout 0"),
        (", p_unique_key => E'a\\nb'", "control character in the unique key"),
        (", p_max_attempts => 1001", "max_attempts"),
        (", p_lane => NULL", "no lane"),
    ] {
        let err = sql_enqueue_err(&db, extra).await.unwrap_or_else(|| panic!("SQL function accepted {why}"));
        assert!(err.starts_with("22023"), "{why}: {err}");
    }
    assert_eq!(
        sql_enqueue_err(&db, ", p_run_at => now() + interval '3649 days', p_timeout_ms => 86400000").await,
        None
    );
    let direct = sqlx::query(
        "INSERT INTO warden.jobs (account, partition, kind, args, state, run_at, due_at, max_attempts, timeout_ms)
         VALUES ('x', 0, 'k', '{}', 'available', 'infinity', 'infinity', 1, 1)",
    )
    .execute(&db.pool)
    .await
    .unwrap_err();
    assert!(direct.to_string().contains("jobs_times_decodable"), "{direct}");
    let far = chrono::Utc::now() + chrono::Duration::days(3651);
    for j in [
        NewJob::new("a", "k", ()).unwrap().run_at(far),
        NewJob::new("a", "k", ()).unwrap().run_at(chrono::DateTime::<chrono::Utc>::MAX_UTC),
        NewJob::new("a", "k", ()).unwrap().delay(Duration::MAX),
        NewJob::new("a", "k", ()).unwrap().unique_key("a\u{0}b"),
    ] {
        assert!(matches!(client.enqueue(j).await, Err(Error::InvalidInput(_))));
    }
}

/// Issue 10 §2, second line: a row that cannot be decoded (the constraint dropped by
/// hand, or a value written before it existed) is discarded with the reason, and
/// neither its account nor its partition stalls; a drain still completes.
#[tokio::test]
async fn an_undecodable_row_is_discarded_without_stalling_its_partition() {
    let db = TestDb::new().await;
    let node = builder(&db, config()).await.start(db.node_pool().await).await.unwrap();
    sqlx::query("ALTER TABLE warden.jobs DROP CONSTRAINT jobs_times_decodable").execute(&db.pool).await.unwrap();
    let p = part("poison") as i32;
    let bad: i64 = sqlx::query_scalar(
        "INSERT INTO warden.jobs (account, partition, kind, args, state, run_at, due_at, max_attempts, timeout_ms)
         VALUES ('poison', $1, 'step', '{}', 'available', '-infinity', '-infinity', 3, 1000) RETURNING id",
    )
    .bind(p)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let after = node.client().enqueue(step("poison", Step::default())).await.unwrap().id;
    sqlx::query("SELECT pg_notify('warden_wake', $1)").bind(format!("{p}:poison")).execute(&db.pool).await.unwrap();
    let row = eventually(WAIT, "the undecodable job is discarded", || async {
        let (state, err): (String, Option<String>) =
            sqlx::query_as("SELECT state, last_error FROM warden.jobs WHERE id = $1")
                .bind(bad)
                .fetch_one(&db.pool)
                .await
                .unwrap();
        (state == "discarded").then_some(err)
    })
    .await;
    assert!(row.unwrap_or_default().contains("cannot be decoded"));
    eventually(WAIT, "the account's next job ran", || async {
        (job(&db, after).await.state == "completed").then_some(())
    })
    .await;
    tokio::time::timeout(Duration::from_secs(10), node.shutdown()).await.expect("drain hung").unwrap();
}

/// Issue 10 §4: a finish PostgreSQL rejects every time — a NUL byte in the handler's
/// error, a retry or snooze delay beyond the interval range (`Duration::MAX` also
/// wrapped to −1 ms) — was retried forever with the job `running`.
#[tokio::test]
async fn finishes_postgres_would_reject_are_made_storable() {
    let db = TestDb::new().await;
    let node = builder(&db, config()).await.start(db.node_pool().await).await.unwrap();
    let c = node.client();
    let nul = c.enqueue(step("nul", Step { mode: "nul_error_once".into(), ..Default::default() })).await.unwrap().id;
    let retry =
        c.enqueue(step("later", Step { mode: "retry_forever_later".into(), ..Default::default() })).await.unwrap();
    let snooze = c.enqueue(step("snooze", Step { mode: "snooze_forever".into(), ..Default::default() })).await.unwrap();
    eventually(WAIT, "the NUL job completed on its second attempt", || async {
        (job(&db, nul).await.state == "completed").then_some(())
    })
    .await;
    let err: String = sqlx::query_scalar("SELECT error FROM warden.attempts WHERE job_id = $1 AND attempt = 1")
        .bind(nul)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(err.contains("bad \u{fffd} byte"), "{err}");
    for id in [retry.id, snooze.id] {
        let row = eventually(WAIT, "recorded as retryable, far away", || async {
            let j = job(&db, id).await;
            (j.state == "retryable").then_some(j)
        })
        .await;
        let days = (row.due_at - chrono::Utc::now()).num_days();
        assert!((3640..=3650).contains(&days), "clamped to the 3650-day horizon: {days}");
    }
    node.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------
// Notifications are hints.

/// A placement of every partition but one.
struct AllBut(u32);

impl warden_cluster::placement::Placement for AllBut {
    fn desired(&self, p: PartitionCount) -> Option<warden_cluster::placement::Assignment> {
        let mut a = warden_cluster::placement::Assignment::all(p);
        a.partitions.remove(&self.0);
        Some(a)
    }
}

/// A role that may connect and NOTIFY and nothing else, as anyone on the database could.
async fn mallory(db: &TestDb) -> sqlx::PgPool {
    let _ = sqlx::query("CREATE ROLE mallory LOGIN").execute(&db.pool).await;
    // The test server trusts local connections (deploy/pg.sh); mallory has no password.
    let opts = (*db.pool.connect_options()).clone().username("mallory").password("");
    sqlx::postgres::PgPoolOptions::new().max_connections(1).connect_with(opts).await.unwrap()
}

/// Issue 10 §3: wake-ups naming an account of an unheld partition (with a held
/// partition in the payload, or its own), and cancels naming a running job whose
/// `cancel_requested` is false, from a role with no rights on Warden's schema.
#[tokio::test]
async fn spoofed_notifications_neither_run_nor_cancel_anything() {
    let db = TestDb::new().await;
    let victim = "victim";
    let pv = part(victim);
    let node = builder(&db, config()).await.placement(Arc::new(AllBut(pv))).start(db.node_pool().await).await.unwrap();
    let queued = node.client().enqueue(step(victim, Step::default())).await.unwrap().id;
    let running = node.client().enqueue(step("worker", Step { work_ms: 1500, ..Default::default() })).await.unwrap().id;
    let pw = part("worker");
    eventually(WAIT, "worker running", || async { (job(&db, running).await.state == "running").then_some(()) }).await;
    let m = mallory(&db).await;
    let held = (pv + 1) % P;
    for (chan, payload) in [
        ("warden_wake", format!("{held}:{victim}")),
        ("warden_wake", format!("{pv}:{victim}")),
        ("warden_cancel", format!("{pw}:{running}:worker")),
        ("warden_cancel", format!("{held}:{running}:worker")),
        ("warden_lease", "x".repeat(7000)),
        ("warden_wake", "::::".into()),
    ] {
        sqlx::query("SELECT pg_notify($1, $2)").bind(chan).bind(&payload).execute(&m).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    let v = job(&db, queued).await;
    assert_eq!((v.state.as_str(), v.attempt), ("available", 0), "a job of an unheld partition ran");
    let w = eventually(WAIT, "worker finished", || async {
        let j = job(&db, running).await;
        (j.state != "running").then_some(j)
    })
    .await;
    assert_eq!(w.state, "completed", "a spoofed cancel stopped a job nobody cancelled: {w:?}");
    assert_clean(&db).await;
    node.shutdown().await.unwrap();
}

/// Issue 10 §3: a NOTIFY flood of made-up accounts grew the listener's buffer and the
/// actor set (each idled for `idle_timeout`). Now an actor woken for nothing stops at
/// once and wake-ups are queued with a bound; real work still runs.
#[tokio::test]
async fn a_notify_flood_leaves_the_actor_set_bounded_and_real_work_running() {
    let db = TestDb::new().await;
    let mut cfg = config();
    cfg.exec.idle_timeout = Duration::from_secs(60);
    let node = builder(&db, cfg).await.start(db.node_pool().await).await.unwrap();
    let m = mallory(&db).await;
    let payloads: Vec<String> =
        (1..=20_000).map(|g| format!("ghost-{g}")).map(|a| format!("{}:{a}", part(&a))).collect();
    sqlx::query("SELECT count(pg_notify('warden_wake', p)) FROM unnest($1::text[]) p")
        .bind(&payloads)
        .execute(&m)
        .await
        .unwrap();
    let real = node.client().enqueue(step("real", Step::default())).await.unwrap().id;
    eventually(WAIT, "real work ran during the flood", || async {
        (job(&db, real).await.state == "completed").then_some(())
    })
    .await;
    eventually(Duration::from_secs(10), "ghost actors gone", || async {
        (node.stats().active_actors <= 1).then_some(())
    })
    .await;
    node.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------
// Handlers and their lease.

/// Issue 10 §5 and "also found": `ctx.cancellation()` did not fire on drain (the
/// handler was just dropped at the drain timeout), and the aborted attempt was left
/// for a rescue that counted it — a job allowed one attempt was discarded by a
/// handoff. Now the handler hears the drain, and an attempt that stops because of it
/// does not use up an attempt.
#[tokio::test]
async fn handlers_hear_a_drain_and_an_interrupted_attempt_is_not_counted() {
    let db = TestDb::new().await;
    let node = builder(&db, config()).await.start(db.node_pool().await).await.unwrap();
    let id = node
        .client()
        .enqueue(step("long", Step { mode: "stop_on_cancellation".into(), ..Default::default() }).max_attempts(1))
        .await
        .unwrap()
        .id;
    eventually(WAIT, "running", || async { (job(&db, id).await.state == "running").then_some(()) }).await;
    let t = std::time::Instant::now();
    node.shutdown().await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(1), "the handler stopped when told, not at the drain timeout");
    let row = job(&db, id).await;
    assert_eq!((row.state.as_str(), row.attempt, row.max_attempts), ("retryable", 1, 2), "{row:?}");
    let outcome: String = sqlx::query_scalar("SELECT outcome FROM warden.attempts WHERE job_id = $1")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(outcome, "interrupted");
    let node2 = builder(&db, config()).await.start(db.node_pool().await).await.unwrap();
    eventually(WAIT, "completed on the next owner", || async {
        (job(&db, id).await.state == "completed").then_some(())
    })
    .await;
    assert_clean(&db).await;
    node2.shutdown().await.unwrap();
}

/// Issue 10 §5: after a pause longer than the lease TTL, the resumed node polled its
/// handlers again before its lease keeper self-fenced: they ran (and made external
/// effects) alongside the next owner's runs of the same accounts. Here node A runs on
/// its own single-threaded runtime, which a blocking sleep pauses as a SIGSTOP would
/// (no timer, task or I/O of A progresses); node B takes over meanwhile. No handler
/// tick of A may be stamped after B started work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_resumed_after_its_lease_expired_never_polls_a_handler_again() {
    let db = TestDb::new().await;
    tables(&db).await;
    let url = db.url.clone();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
    let (pause_tx, pause_rx) = tokio::sync::oneshot::channel::<Duration>();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let a = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let mut cfg = config();
            cfg.node_id = "node-a".into();
            // Pools of this runtime's own: its sockets must be driven by its reactor.
            let node_pool = warden_runtime::store::connect(&url, &Default::default()).await.unwrap();
            let pool = sqlx::postgres::PgPoolOptions::new().max_connections(8).connect(&url).await.unwrap();
            let node = Node::builder(cfg)
                .register(StepHandler { node: "node-a".into(), pool })
                .unwrap()
                .start(node_pool)
                .await
                .unwrap();
            ready_tx.send(()).unwrap();
            let pause = pause_rx.await.unwrap();
            std::thread::sleep(pause); // the whole runtime stops, as under SIGSTOP
                                       // Resumed: give every timer and task the chance to run, then stop.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let _ = done_tx.send(());
            drop(node);
        });
    });
    ready_rx.await.unwrap();
    let client = Client::connect(db.pool.clone()).await.unwrap();
    enqueue_sequences(&client, 6, 2, 4_000).await;
    eventually(WAIT, "A runs every account", || async {
        let n: i64 = sqlx::query_scalar("SELECT count(DISTINCT account) FROM step_ticks WHERE node = 'node-a'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        (n == 6).then_some(())
    })
    .await;
    pause_tx.send(Duration::from_millis(4_500)).unwrap();
    let mut cfg = config();
    cfg.node_id = "node-b".into();
    let b = Node::builder(cfg)
        .register(StepHandler { node: "node-b".into(), pool: db.pool.clone() })
        .unwrap()
        .start(db.node_pool().await)
        .await
        .unwrap();
    eventually(WAIT, "B took over and started work", || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM step_ticks WHERE node = 'node-b'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        (n > 0).then_some(())
    })
    .await;
    done_rx.await.unwrap();
    a.join().unwrap();
    let late: Vec<(String, String)> = sqlx::query_as(
        "SELECT a.account, a.what || ' at ' || a.at::text FROM step_ticks a
         WHERE a.node = 'node-a' AND a.at > (SELECT min(at) FROM step_ticks WHERE node = 'node-b')",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert!(late.is_empty(), "node A ran handler code after node B took over: {late:?}");
    wait_all_completed(&db, 12).await;
    assert_clean(&db).await;
    b.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------
// Per-kind options.

/// Issue 10 §6: a handler's `options()` applied only when the enqueuing client held the
/// node's registry; `warden.enqueue` and a plain `Client` stored 25 attempts / 60 s.
#[tokio::test]
async fn per_kind_options_apply_to_jobs_enqueued_without_the_handler() {
    let db = TestDb::new().await;
    let node = builder(&db, config()).await.start(db.node_pool().await).await.unwrap();
    node.shutdown().await.unwrap();
    let plain = Client::connect(db.pool.clone()).await.unwrap();
    let a = plain.enqueue(step("o", Step::default()).delay(Duration::from_secs(3600))).await.unwrap().id;
    let b: i64 = sqlx::query_scalar("SELECT warden.enqueue('o', 'step', '{}', now() + interval '1 hour')")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let c: i64 =
        sqlx::query_scalar("SELECT warden.enqueue('o', 'step', '{}', now() + interval '1 hour', p_max_attempts => 9)")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    let d: i64 = sqlx::query_scalar("SELECT warden.enqueue('o', 'unknown-kind', '{}', now() + interval '1 hour')")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    for (id, want) in [(a, (5, 20_000)), (b, (5, 20_000)), (c, (9, 20_000)), (d, (25, 60_000))] {
        let j = job(&db, id).await;
        assert_eq!((j.max_attempts, j.timeout_ms), want, "job {id}");
    }
}

// ---------------------------------------------------------------------------
// Found in review of the fixes above.

async fn handler_runs(db: &TestDb, id: i64) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM step_ticks WHERE job_id = $1 AND what = 'start'")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

/// A finish that fails for good ended in "leave it to be adopted"; adoption did not
/// count an attempt, so the handler ran again and again (29 runs in 6 s with
/// max_attempts 3), each with its external effects. Now adoption counts, the job is
/// given up after its attempts, and the handler runs at most max_attempts times.
#[tokio::test]
async fn a_job_whose_outcome_can_never_be_recorded_runs_at_most_max_attempts_times() {
    let db = TestDb::new().await;
    let plan = Arc::new(Plan::default());
    plan.perm_finish.store(true, Ordering::Release);
    let node = start_faulty(&db, plan.clone()).await;
    let id = node.client().enqueue(step("perm", Step::default()).max_attempts(3)).await.unwrap().id;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let runs = handler_runs(&db, id).await;
    assert!((1..=3).contains(&runs), "max_attempts is 3, the handler ran {runs} times");
    let calls = plan.perm_calls.load(Ordering::Acquire);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(plan.perm_calls.load(Ordering::Acquire) - calls <= 6, "recording in a hot loop");
    // Once outcomes can be recorded again, the job ends within its attempts.
    plan.perm_finish.store(false, Ordering::Release);
    let end = eventually(WAIT, "finished", || async {
        let j = job(&db, id).await;
        j.state().filter(|s| s.is_terminal()).map(|_| j)
    })
    .await;
    assert!(end.attempt <= 3 && handler_runs(&db, id).await <= 3, "{end:?}");
    node.shutdown().await.unwrap();
}

/// After a panic in the attempt task, recording the crash retried every error —
/// permanent ones too — for as long as the lease held, ignoring a drain: the actor
/// stayed busy and a handoff of its partition never completed.
#[tokio::test]
async fn recording_a_crashed_attempt_is_bounded() {
    let db = TestDb::new().await;
    let plan = Arc::new(Plan::default());
    plan.perm_panics.store(1, Ordering::Release);
    plan.perm_finish.store(true, Ordering::Release);
    let node = start_faulty(&db, plan.clone()).await;
    let other = node.client().enqueue(step("other", Step::default())).await.unwrap().id;
    node.client().enqueue(step("perm", Step::default()).max_attempts(2)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let c0 = plan.perm_calls.load(Ordering::Acquire);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let c1 = plan.perm_calls.load(Ordering::Acquire);
    assert!(c1 - c0 <= 8, "recording keeps retrying a permanent error: {} calls in 4 s", c1 - c0);
    assert_eq!(job(&db, other).await.state, "completed");
    tokio::time::timeout(Duration::from_secs(10), node.shutdown()).await.expect("drain hung").unwrap();
}

/// The due-work scan probed every due row for being its account's head: 13–20× slower
/// than before on a 200k-job backlog, past the enforcer's 10 s pass timeout near 1M
/// jobs. The probe must run once per account: checked on the plan (loops of every
/// node ≤ accounts), not on a clock.
#[tokio::test]
async fn the_due_scan_probes_once_per_account_not_once_per_due_job() {
    let (db, s, _client, _f) = store_setup().await;
    sqlx::query(
        "INSERT INTO warden.jobs (account, partition, kind, args, state, run_at, due_at, max_attempts, timeout_ms)
         SELECT 'a' || a, warden.partition_of('a' || a, 16), 'k', '{}', 'available',
                now() - interval '1 hour' + s * interval '1 ms', now() - interval '1 hour' + s * interval '1 ms', 25, 60000
         FROM generate_series(1, 500) a, generate_series(1, 100) s",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE warden.jobs").execute(&db.pool).await.unwrap();
    let all: Vec<i32> = (0..P as i32).collect();
    let explain = format!("EXPLAIN (ANALYZE, FORMAT JSON) {}", store::DUE_ACCOUNTS_SQL);
    let plan: serde_json::Value =
        sqlx::query_scalar(sqlx::AssertSqlSafe(explain)).bind(&all).bind(10_000i64).fetch_one(&db.pool).await.unwrap();
    fn max_loops(v: &serde_json::Value) -> i64 {
        let here = v.get("Actual Loops").and_then(|l| l.as_i64()).unwrap_or(0);
        let kids = v.get("Plans").and_then(|p| p.as_array()).map(|a| a.iter().map(max_loops).max().unwrap_or(0));
        here.max(kids.unwrap_or(0)).max(v.get("Plan").map(max_loops).unwrap_or(0))
    }
    let loops = max_loops(&plan[0]);
    assert!(loops <= 500, "a plan node ran {loops} times for 500 accounts / 50,000 due jobs:\n{plan:#}");
    let started = std::time::Instant::now();
    assert_eq!(s.due_accounts(&(0..P).collect::<Vec<_>>(), 10_000).await.unwrap().len(), 500);
    eprintln!("due scan of 50,000 due jobs over 500 accounts: {:?} (loops {loops})", started.elapsed());
}

/// Upgrading a database that ran migrations 0001–0002 with rows the new limits forbid
/// — times Rust cannot decode, timeouts over 24 h, one of them `running` under an old
/// node — leaves nothing stalled: before the fix, a NOT VALID constraint rejected every
/// later update of the long-timeout rows, so their claim failed forever and the one
/// rescue statement of a cold start failed for every partition acquired with it.
#[tokio::test]
async fn an_upgrade_with_rows_the_new_limits_forbid_stalls_nothing() {
    let db = TestDb::new().await;
    let mut old = store::migrator();
    old.migrations = std::borrow::Cow::Owned(old.migrations.iter().filter(|m| m.version <= 2).cloned().collect());
    old.run(&db.pool).await.unwrap();
    store::init_partitions(&db.pool, PartitionCount::new(P).unwrap()).await.unwrap();
    let legacy = |account: &str, state: &str, run_at: &str, timeout_ms: i32| {
        let running = state == "running";
        sqlx::query_scalar::<_, i64>(
            "INSERT INTO warden.jobs (account, partition, kind, args, state, run_at, due_at, max_attempts, timeout_ms,
                                      attempt, epoch, node, attempted_at)
             VALUES ($1, warden.partition_of($1, 16), 'step', '{}', $2, $3::timestamptz, $3::timestamptz, 3, $4,
                     $5, $6, $7, now()) RETURNING id",
        )
        .bind(account.to_string())
        .bind(state.to_string())
        .bind(run_at.to_string())
        .bind(timeout_ms)
        .bind(if running { 1 } else { 0 })
        .bind(running.then_some(0i64))
        .bind(running.then_some("old-node/1"))
        .fetch_one(&db.pool)
    };
    let long_running = legacy("legacy-run", "running", "2026-01-01", 100_000_000).await.unwrap();
    let long_queued = legacy("legacy-q", "available", "2026-01-01", 100_000_000).await.unwrap();
    let infinite = legacy("legacy-inf", "available", "infinity", 1000).await.unwrap();
    store::migrate(&db.pool).await.unwrap();
    let node = builder(&db, config()).await.start(db.node_pool().await).await.unwrap();
    let mut fresh = Vec::new();
    for a in ["legacy-q", "legacy-inf", "other-1", "other-2", "other-3"] {
        fresh.push(node.client().enqueue(step(a, Step::default())).await.unwrap().id);
    }
    for id in fresh.iter().chain([long_running, long_queued].iter()) {
        eventually(WAIT, &format!("job {id} completed"), || async {
            (job(&db, *id).await.state == "completed").then_some(())
        })
        .await;
    }
    let inf = job(&db, infinite).await;
    assert_eq!(inf.state, "discarded", "{inf:?}");
    assert!(inf.last_error.unwrap_or_default().contains("migration 0003"));
    assert_eq!(job(&db, long_queued).await.timeout_ms, 86_400_000, "clamped to the 24 h limit");
    assert_clean(&db).await;
    node.shutdown().await.unwrap();
}
