//! Warden as a tenant of the application's database (issue 11): its own migration
//! history beside the application's sqlx migrations, the upgrade contract's
//! compatibility window, a fence that burns no MultiXact ids and still makes every
//! takeover — of this version or the one before — wait for fenced work, and
//! follow-up enqueues that do not hold the account's lock while the handler runs.

use serde::{Deserialize, Serialize};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::Row;
use std::time::{Duration, Instant};
use warden_runtime::store::{self, GrantedLease, PgStore, Store};
use warden_runtime::{
    async_trait, schema, Client, Handler, HandlerResult, JobContext, NewJob, NodeConfig, Outcome, PartitionCount,
};
use warden_tests::{eventually, TestDb};

const P: u32 = 16;

/// The application's own migrations, applied with sqlx's default runner and history
/// table (`public._sqlx_migrations`), as an application sharing the database would.
fn app_migrator() -> Migrator {
    Migrator::with_migrations(vec![
        Migration::new(
            1,
            "app init".into(),
            MigrationType::Simple,
            sqlx::SqlSafeStr::into_sql_str("CREATE TABLE app_orders (id int)"),
            false,
        ),
        Migration::new(
            20260101000000,
            "app more".into(),
            MigrationType::Simple,
            sqlx::SqlSafeStr::into_sql_str("ALTER TABLE app_orders ADD COLUMN total int"),
            false,
        ),
    ])
}

async fn history(db: &TestDb) -> Vec<(i64, bool)> {
    sqlx::query("SELECT version, adopted FROM warden.schema_history ORDER BY version")
        .fetch_all(&db.pool)
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

async fn sqlx_versions(db: &TestDb) -> Vec<i64> {
    sqlx::query_scalar("SELECT version FROM public._sqlx_migrations ORDER BY version")
        .fetch_all(&db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn warden_and_the_application_migrate_one_database_in_either_order() {
    let all: Vec<(i64, bool)> = schema::migrations().iter().map(|m| (m.version, false)).collect();
    // The application first, then Warden, then both again (every start migrates).
    let db = TestDb::new().await;
    app_migrator().run(&db.pool).await.unwrap();
    store::migrate(&db.pool).await.unwrap();
    app_migrator().run(&db.pool).await.unwrap();
    store::migrate(&db.pool).await.unwrap();
    assert_eq!(history(&db).await, all);
    assert_eq!(sqlx_versions(&db).await, vec![1, 20260101000000], "Warden writes nothing into public");
    // Warden first.
    let db = TestDb::new().await;
    store::migrate(&db.pool).await.unwrap();
    app_migrator().run(&db.pool).await.unwrap();
    store::migrate(&db.pool).await.unwrap();
    assert_eq!(history(&db).await, all);
    assert_eq!(sqlx_versions(&db).await, vec![1, 20260101000000]);
    // Nodes starting at once still apply each migration once.
    let db = TestDb::new().await;
    let runs: Vec<_> = (0..4)
        .map(|_| {
            let pool = db.pool.clone();
            tokio::spawn(async move { store::migrate(&pool).await })
        })
        .collect();
    for r in runs {
        r.await.unwrap().unwrap();
    }
    assert_eq!(history(&db).await, all);
}

/// A database migrated by a Warden before schema history (sqlx's runner, in
/// `public._sqlx_migrations`, next to the application's rows) is adopted; the legacy
/// rows stay until the operator forgets them, and the application's migrator then
/// works again.
#[tokio::test]
async fn a_legacy_history_is_adopted_and_forgotten_on_request() {
    let db = TestDb::new().await;
    let mut legacy = store::migrator();
    legacy.migrations = std::borrow::Cow::Owned(legacy.migrations.iter().filter(|m| m.version <= 3).cloned().collect());
    legacy.run(&db.pool).await.unwrap();
    // The application's row with a version Warden also uses, but other content.
    sqlx::query(
        "INSERT INTO public._sqlx_migrations (version, description, success, checksum, execution_time)
         VALUES (20260101000000, 'app more', true, '\\x00', 0)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    store::migrate(&db.pool).await.unwrap();
    let h = history(&db).await;
    assert_eq!(h[..3], [(1, true), (2, true), (3, true)], "adopted: {h:?}");
    assert!(h[3..].iter().all(|(v, adopted)| *v > 3 && !adopted), "applied by this runner: {h:?}");
    let status = schema::status(&db.pool).await.unwrap();
    assert_eq!(status.legacy_rows, 3);
    assert!(status.pending.is_empty() && status.compatible());
    assert_eq!(schema::forget_legacy_history(&db.pool).await.unwrap(), 3);
    assert_eq!(sqlx_versions(&db).await, vec![20260101000000], "the application's row is kept");
    assert_eq!(schema::status(&db.pool).await.unwrap().legacy_rows, 0);
    store::migrate(&db.pool).await.unwrap();
    assert_eq!(history(&db).await.len(), schema::migrations().len(), "nothing re-applied after forgetting");
}

async fn migration_locks_held(db: &TestDb) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid::bigint = $1")
        .bind(schema::MIGRATION_LOCK_CLASS as i64)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

/// The upgrade contract: a binary runs against a newer schema only inside the
/// schema's compatibility window, refuses outside it with both versions named, and
/// never leaves the migration lock behind.
#[tokio::test]
async fn a_newer_schema_is_accepted_only_inside_its_compatibility_window() {
    let db = TestDb::new().await;
    store::migrate(&db.pool).await.unwrap();
    let binary = schema::binary_version();
    // A newer release applied an expand migration (999) that keeps this binary working.
    sqlx::query("INSERT INTO warden.schema_history (version, description, checksum) VALUES (999, 'future', '\\x00')")
        .execute(&db.pool)
        .await
        .unwrap();
    let s = schema::migrate(&db.pool, None).await.unwrap();
    assert_eq!((s.applied, s.binary, s.compatible_from), (999, binary, 3));
    schema::check(&db.pool).await.unwrap();
    // Then a contract migration raised the window past this binary.
    sqlx::query("UPDATE warden.meta SET value = '999' WHERE key = 'compatible_from'").execute(&db.pool).await.unwrap();
    let e = schema::migrate(&db.pool, None).await.unwrap_err().to_string();
    assert!(e.contains("version 999") && e.contains(&format!("knows version {binary}")), "{e}");
    assert!(schema::check(&db.pool).await.is_err());
    let node = warden_runtime::Node::builder(config()).start(db.node_pool().await).await;
    assert!(node.is_err(), "a node outside the window refuses to start");
    assert_eq!(migration_locks_held(&db).await, 0, "a refused start leaves no migration lock");
    // An edited migration is refused as well.
    sqlx::query("UPDATE warden.meta SET value = '3' WHERE key = 'compatible_from'").execute(&db.pool).await.unwrap();
    sqlx::query("UPDATE warden.schema_history SET checksum = '\\x01' WHERE version = 2")
        .execute(&db.pool)
        .await
        .unwrap();
    let e = schema::migrate(&db.pool, None).await.unwrap_err().to_string();
    assert!(e.contains("migration 2") && e.contains("differs"), "{e}");
    assert_eq!(migration_locks_held(&db).await, 0);
}

fn config() -> NodeConfig {
    let mut c = warden_tests::fast_node_config("coexist", P);
    c.node_id = "coexist".into();
    c
}

async fn ready_store(db: &TestDb) -> PgStore {
    store::migrate(&db.pool).await.unwrap();
    let p = store::init_partitions(&db.pool, PartitionCount::new(P).unwrap()).await.unwrap();
    PgStore::new(db.pool.clone(), p)
}

/// `next_multixact_id` as of a fresh checkpoint.
async fn next_multixact(db: &TestDb) -> i64 {
    sqlx::query("CHECKPOINT").execute(&db.pool).await.unwrap();
    let v: String = sqlx::query_scalar("SELECT next_multixact_id::text FROM pg_control_checkpoint()")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    v.parse().unwrap()
}

/// Run `rounds` rounds of two transactions that fence the same partition at once.
async fn contended_fences(db: &TestDb, lease: &GrantedLease, owner: &str, sql: &'static str, rounds: usize) {
    for _ in 0..rounds {
        let mut a = db.pool.begin().await.unwrap();
        let mut b = db.pool.begin().await.unwrap();
        for tx in [&mut a, &mut b] {
            let row = sqlx::query(sql)
                .bind(lease.partition as i32)
                .bind(lease.epoch)
                .bind(owner)
                .fetch_optional(&mut **tx)
                .await
                .unwrap();
            assert!(row.is_some(), "the fence holds");
        }
        a.commit().await.unwrap();
        b.commit().await.unwrap();
    }
}

/// The fence used to lock the lease row FOR KEY SHARE, and two fenced transactions
/// of one partition in flight together made PostgreSQL allocate a MultiXact. The
/// advisory-lock fence allocates none. Both are measured here, the old one as the
/// baseline that shows the measurement sees MultiXacts at all.
#[tokio::test]
async fn fenced_statements_allocate_no_multixacts() {
    let db = TestDb::new().await;
    let s = ready_store(&db).await;
    let lease = s.acquire("n1", &[0], Duration::from_secs(60)).await.unwrap()[0];
    const ROUNDS: usize = 200;
    let before = next_multixact(&db).await;
    contended_fences(
        &db,
        &lease,
        "n1",
        "SELECT 1 FROM warden.leases WHERE partition = $1 AND epoch = $2 AND owner_node = $3 FOR KEY SHARE",
        ROUNDS,
    )
    .await;
    let old = next_multixact(&db).await - before;
    let before = next_multixact(&db).await;
    contended_fences(&db, &lease, "n1", "SELECT 1 WHERE warden.fence($1, $2, $3)", ROUNDS).await;
    let new = next_multixact(&db).await - before;
    eprintln!("MultiXacts for {ROUNDS} rounds of 2 contended fenced transactions: FOR KEY SHARE {old}, advisory {new}");
    assert!(old >= ROUNDS as i64, "the baseline allocates MultiXacts ({old})");
    assert_eq!(new, 0, "the fence allocates none");
}

/// A takeover — by this version's acquire or by a v3 node's, which knows nothing of
/// advisory locks and updates the row directly — waits for a fenced transaction in
/// flight, and a fenced statement after it sees the new epoch.
#[tokio::test]
async fn a_takeover_of_any_version_waits_for_fenced_work_in_flight() {
    let db = TestDb::new().await;
    let s = ready_store(&db).await;
    let lease = s.acquire("n1", &[3], Duration::from_millis(400)).await.unwrap()[0];
    let mut fenced = db.pool.begin().await.unwrap();
    let held: bool = sqlx::query_scalar("SELECT warden.fence($1, $2, 'n1')")
        .bind(3)
        .bind(lease.epoch)
        .fetch_one(&mut *fenced)
        .await
        .unwrap();
    assert!(held);
    tokio::time::sleep(Duration::from_millis(500)).await; // the lease expires meanwhile
                                                          // This version's acquire skips the partition while the fenced transaction runs.
    assert!(s.acquire("n2", &[3], Duration::from_secs(10)).await.unwrap().is_empty());
    // A v3 acquire (no SKIP of advisory locks): blocks in the trigger until it ends.
    let pool = db.pool.clone();
    let v3 = tokio::spawn(async move {
        let started = Instant::now();
        sqlx::query(
            "UPDATE warden.leases SET owner_node = 'v3', epoch = epoch + 1, lease_expires_at = now() + interval '10 s'
             WHERE partition = 3 AND lease_expires_at < now()",
        )
        .execute(&pool)
        .await
        .unwrap();
        started.elapsed()
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!v3.is_finished(), "the takeover waits for the fenced transaction");
    fenced.commit().await.unwrap();
    let waited = v3.await.unwrap();
    assert!(waited >= Duration::from_millis(600), "waited {waited:?}");
    let stale: bool = sqlx::query_scalar("SELECT warden.fence($1, $2, 'n1')")
        .bind(3)
        .bind(lease.epoch)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(!stale, "after the takeover the old epoch is fenced off");
}

#[derive(Serialize, Deserialize)]
struct Chain {
    follow_up_account: String,
    sleep_ms: u64,
}

struct ChainHandler;

#[async_trait]
impl Handler for ChainHandler {
    type Args = Chain;
    const KIND: &'static str = "chain";

    async fn run(&self, ctx: &mut JobContext, c: Chain) -> HandlerResult {
        if c.sleep_ms > 0 {
            ctx.enqueue(NewJob::new(c.follow_up_account.clone(), "chain", Chain { sleep_ms: 0, ..c })?).await?;
            tokio::time::sleep(Duration::from_millis(c.sleep_ms)).await;
        }
        Ok(Outcome::Done)
    }
}

/// `ctx.enqueue` used to take the target account's enqueue lock inside the handler's
/// transaction and hold it until the handler returned: every other enqueue of that
/// account waited (5.7 s seen). It now stages the job and inserts it with the
/// completion, so an enqueue of the same account during the handler's run returns at
/// once, and the follow-up still exists only once the attempt completes.
#[tokio::test]
async fn a_handler_enqueue_does_not_hold_the_accounts_lock_while_it_runs() {
    let db = TestDb::new().await;
    let node = warden_runtime::Node::builder(config())
        .register(ChainHandler)
        .unwrap()
        .start(db.node_pool().await)
        .await
        .unwrap();
    let client = Client::connect(db.pool.clone()).await.unwrap();
    let first = client
        .enqueue(NewJob::new("a", "chain", Chain { follow_up_account: "b".into(), sleep_ms: 3000 }).unwrap())
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "the handler runs", || async {
        (client.get(first.id).await.unwrap().unwrap().state == "running").then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await; // it has staged its follow-up
    let started = Instant::now();
    let other = client
        .enqueue(NewJob::new("b", "chain", Chain { follow_up_account: "b".into(), sleep_ms: 0 }).unwrap())
        .await
        .unwrap();
    let waited = started.elapsed();
    eprintln!("enqueue of the account a running handler enqueues into: {waited:?}");
    assert!(waited < Duration::from_millis(1500), "did not wait for the handler ({waited:?})");
    let b_jobs = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM warden.jobs WHERE account = 'b'")
            .fetch_one(&db.pool)
            .await
            .unwrap()
    };
    assert_eq!(b_jobs().await, 1, "the follow-up does not exist before the attempt completes");
    eventually(Duration::from_secs(15), "the chain completes", || async {
        let done: i64 = sqlx::query_scalar("SELECT count(*) FROM warden.jobs WHERE state = 'completed'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        (done == 3).then_some(())
    })
    .await;
    assert_eq!(b_jobs().await, 2);
    // The follow-up was inserted after `other`, so it sorts after it in b's lane.
    let order: Vec<i64> = sqlx::query_scalar("SELECT id FROM warden.jobs WHERE account = 'b' ORDER BY run_at, id")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(order[0], other.id);
    node.shutdown().await.unwrap();
}

/// Every epoch change takes a fence lock in PostgreSQL's shared lock table (6,400
/// entries on a default server, shared with the application): one statement for all
/// partitions failed with "out of shared memory" from P = 16,384 on a default server
/// (found in review). Lease statements now go in chunks, so even the largest P is
/// acquired, rescued and released whole.
#[tokio::test]
async fn the_largest_partition_count_is_acquired_rescued_and_released_in_chunks() {
    let db = TestDb::new().await;
    store::migrate(&db.pool).await.unwrap();
    let p = PartitionCount::new(65_536).unwrap();
    store::init_partitions(&db.pool, p).await.unwrap();
    let s = PgStore::new(db.pool.clone(), p);
    let all: Vec<u32> = (0..p.get()).collect();
    let started = Instant::now();
    let granted = s.acquire("n1", &all, Duration::from_secs(60)).await.unwrap();
    assert_eq!(granted.len(), all.len());
    s.rescue("n1", &granted).await.unwrap();
    let taken = started.elapsed();
    assert_eq!(s.release("n1", &granted).await.unwrap(), all.len() as u64);
    eprintln!("acquire + rescue of {} partitions: {taken:?}", all.len());
}

/// The fence needs READ COMMITTED (its lease check must see a takeover that committed
/// while it waited for the lock). An application may make another isolation the
/// database's default: Warden's connections override it, and a fenced statement that
/// still runs under another isolation is refused instead of trusting a stale snapshot.
#[tokio::test]
async fn fences_refuse_to_run_outside_read_committed() {
    let db = TestDb::new().await;
    let s = ready_store(&db).await;
    let lease = s.acquire("n1", &[1], Duration::from_secs(60)).await.unwrap()[0];
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE {} SET default_transaction_isolation = 'repeatable read'",
        db.name
    )))
    .execute(&db.pool)
    .await
    .unwrap();
    let plain = sqlx::postgres::PgPoolOptions::new().max_connections(1).connect(&db.url).await.unwrap();
    let e = sqlx::query_scalar::<_, bool>("SELECT warden.fence(1, $1, 'n1')")
        .bind(lease.epoch)
        .fetch_one(&plain)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("READ COMMITTED"), "{e}");
    let node_pool = db.node_pool().await;
    let held: bool =
        sqlx::query_scalar("SELECT warden.fence(1, $1, 'n1')").bind(lease.epoch).fetch_one(&node_pool).await.unwrap();
    assert!(held, "Warden's own connections run READ COMMITTED whatever the default");
}

/// A node started while PostgreSQL is down waits for it (retrying with backoff, saying
/// so) instead of exiting: `store::connect` used to fail at once. A database that will
/// never accept these credentials still fails at once.
#[tokio::test]
async fn connect_waits_for_a_database_that_is_not_up_yet() {
    let pg = warden_tests::PrivatePg::start();
    pg.stop();
    let url = pg.url();
    let waiting = tokio::spawn(async move {
        let started = Instant::now();
        let cfg = store::StoreConfig { connect_retry: Duration::from_secs(60), ..Default::default() };
        let pool = store::connect(&url, &cfg).await;
        (pool.map(|p| p.size()), started.elapsed())
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!waiting.is_finished(), "connect gave up while the database was down");
    pg.restart();
    let (pool, waited) = waiting.await.unwrap();
    assert!(pool.is_ok(), "{pool:?}");
    assert!(waited >= Duration::from_secs(2), "{waited:?}");
    // Permanent errors are not retried: an unknown database.
    let started = Instant::now();
    let bad = format!("postgres://postgres@127.0.0.1:{}/no_such_database", pg.port);
    let e = store::connect(&bad, &Default::default()).await.unwrap_err().to_string();
    assert!(started.elapsed() < Duration::from_secs(5) && e.contains("no_such_database"), "{e}");
    // And a bounded retry gives up with the last error.
    pg.stop();
    let cfg = store::StoreConfig { connect_retry: Duration::from_secs(1), ..Default::default() };
    let started = Instant::now();
    assert!(store::connect(&pg.url(), &cfg).await.is_err());
    assert!(started.elapsed() < Duration::from_secs(4), "{:?}", started.elapsed());
    pg.restart();
}
