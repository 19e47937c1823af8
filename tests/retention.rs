//! Retention (`warden_runtime::retention`): the pruner deletes finished jobs older than
//! the period and their attempts, never anything unfinished or younger; pruners of
//! several nodes at once neither conflict nor count a row twice; a node runs it.

use std::time::Duration;
use warden_runtime::retention::{Pruner, RetentionConfig};
use warden_runtime::store;
use warden_runtime::{Node, PartitionCount};
use warden_tests::{eventually, TestDb};

const P: u32 = 16;

async fn schema(db: &TestDb) {
    store::migrate(&db.pool).await.unwrap();
    store::init_partitions(&db.pool, PartitionCount::new(P).unwrap()).await.unwrap();
}

/// Insert `n` jobs of `account` in `state`, finished `age` ago (NULL for unfinished
/// states unless `force_finished_at`), each with `attempts` attempts rows.
async fn seed(db: &TestDb, account: &str, state: &str, n: i64, age: Duration, attempts: i32, force_finished_at: bool) {
    let finished = force_finished_at || matches!(state, "completed" | "discarded" | "cancelled");
    sqlx::query(
        "WITH j AS (
            INSERT INTO warden.jobs (account, partition, kind, args, state, run_at, due_at, max_attempts,
                                     timeout_ms, attempt, finished_at)
            SELECT $1, warden.partition_of($1, 16), 'step', jsonb_build_object('i', g), $2,
                   now() - make_interval(secs => $4) - interval '1 minute',
                   now() - make_interval(secs => $4) - interval '1 minute', 25, 60000, $5,
                   CASE WHEN $6 THEN now() - make_interval(secs => $4) END
            FROM generate_series(1, $3) g
            RETURNING id, account, partition)
         INSERT INTO warden.attempts (job_id, account, partition, attempt, node, epoch, started_at, finished_at, outcome)
         SELECT j.id, j.account, j.partition, a, 'n1/1', 1, now() - make_interval(secs => $4) - interval '1 minute',
                now() - make_interval(secs => $4), 'retry'
         FROM j CROSS JOIN generate_series(1, $5) a",
    )
    .bind(account)
    .bind(state)
    .bind(n)
    .bind(age.as_secs_f64())
    .bind(attempts)
    .bind(finished)
    .execute(&db.pool)
    .await
    .unwrap();
}

async fn count(db: &TestDb, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string())).fetch_one(&db.pool).await.unwrap()
}

const DAY: Duration = Duration::from_secs(24 * 3600);

fn config(batch: i64) -> RetentionConfig {
    RetentionConfig {
        period: Some(7 * DAY),
        batch_size: batch,
        batch_pause: Duration::ZERO,
        max_batches_per_run: 10_000,
        ..Default::default()
    }
}

#[tokio::test]
async fn pruning_deletes_only_finished_jobs_older_than_the_period_with_their_attempts() {
    let db = TestDb::new().await;
    schema(&db).await;
    for state in ["completed", "discarded", "cancelled"] {
        seed(&db, &format!("old-{state}"), state, 30, 10 * DAY, 2, false).await;
        seed(&db, &format!("young-{state}"), state, 10, DAY, 2, false).await;
    }
    // Unfinished jobs, however old — one even carrying a stale finished_at (as an
    // operator retry leaves none, but a hand-edited row might).
    for state in ["scheduled", "available", "retryable"] {
        seed(&db, &format!("open-{state}"), state, 10, 30 * DAY, 1, false).await;
    }
    seed(&db, "open-stale", "available", 5, 30 * DAY, 1, true).await;
    // An attempts row of another job (id beyond every job) is not the pruner's business.
    sqlx::query(
        "INSERT INTO warden.attempts (job_id, account, partition, attempt, node, epoch, started_at, finished_at, outcome)
         VALUES (999999999, 'ghost', 0, 1, 'n1/1', 1, now() - interval '30 days', now() - interval '30 days', 'completed')",
    )
    .execute(&db.pool)
    .await
    .unwrap();

    let pruner = Pruner::new(db.pool.clone(), config(7)).unwrap();
    let r = pruner.run_once().await.unwrap();
    assert_eq!((r.jobs, r.attempts, r.skipped), (90, 180, false), "{r:?}");
    assert_eq!(r.batches, 13, "90 jobs in batches of 7: 12 full and a short one ends the run: {r:?}");
    assert_eq!(count(&db, "SELECT count(*) FROM warden.jobs WHERE account LIKE 'old-%'").await, 0);
    assert_eq!(count(&db, "SELECT count(*) FROM warden.jobs WHERE account LIKE 'young-%'").await, 30);
    assert_eq!(count(&db, "SELECT count(*) FROM warden.jobs WHERE account LIKE 'open-%'").await, 35);
    assert_eq!(count(&db, "SELECT count(*) FROM warden.attempts WHERE account LIKE 'old-%'").await, 0);
    assert_eq!(count(&db, "SELECT count(*) FROM warden.attempts WHERE account LIKE 'young-%'").await, 60);
    assert_eq!(count(&db, "SELECT count(*) FROM warden.attempts WHERE account LIKE 'open-%'").await, 35);
    assert_eq!(count(&db, "SELECT count(*) FROM warden.attempts WHERE account = 'ghost'").await, 1);
    // Nothing left to do: a second run deletes nothing.
    assert_eq!(pruner.run_once().await.unwrap().jobs, 0);
    // Disabled retention deletes nothing, whatever the age.
    let off = Pruner::new(db.pool.clone(), RetentionConfig { period: Some(Duration::ZERO), ..config(7) }).unwrap();
    let short = Pruner::new(db.pool.clone(), RetentionConfig { period: Some(Duration::from_secs(1)), ..config(7) });
    assert_eq!(off.run_once().await.unwrap().jobs, 0);
    assert_eq!(count(&db, "SELECT count(*) FROM warden.jobs").await, 65);
    // A one-second period takes the young finished ones too, still no unfinished job.
    assert_eq!(short.unwrap().run_once().await.unwrap().jobs, 30);
    assert_eq!(count(&db, "SELECT count(*) FROM warden.jobs").await, 35);
}

#[tokio::test]
async fn concurrent_pruners_neither_conflict_nor_count_a_row_twice() {
    let db = TestDb::new().await;
    schema(&db).await;
    seed(&db, "old", "completed", 3_000, 10 * DAY, 2, false).await;
    seed(&db, "old-d", "discarded", 1_000, 10 * DAY, 1, false).await;
    seed(&db, "open", "available", 500, 30 * DAY, 1, false).await;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..4 {
        // Each "node" has its own pool, as nodes do.
        let pool = sqlx::postgres::PgPoolOptions::new().max_connections(1).connect(&db.url).await.unwrap();
        let pruner = Pruner::new(pool, config(100)).unwrap();
        tasks.spawn(async move {
            let (mut jobs, mut attempts, mut skipped) = (0, 0, 0);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            loop {
                let r = pruner.run_once().await.expect("a pruner run failed");
                jobs += r.jobs;
                attempts += r.attempts;
                skipped += r.skipped as u32;
                if !r.skipped && r.jobs == 0 {
                    return (jobs, attempts, skipped);
                }
                assert!(tokio::time::Instant::now() < deadline, "pruners did not finish");
                tokio::task::yield_now().await;
            }
        });
    }
    let (mut jobs, mut attempts, mut skipped) = (0, 0, 0);
    while let Some(r) = tasks.join_next().await {
        let (j, a, s) = r.unwrap();
        jobs += j;
        attempts += a;
        skipped += s;
    }
    eprintln!("4 pruners: {jobs} jobs, {attempts} attempts, {skipped} runs skipped (lock held elsewhere)");
    assert_eq!((jobs, attempts), (4_000, 7_000), "every row deleted exactly once");
    assert_eq!(count(&db, "SELECT count(*) FROM warden.jobs").await, 500);
    assert_eq!(count(&db, "SELECT count(*) FROM warden.attempts").await, 500);
}

/// The node runs the pruner in the background (here with a one-second period), and it
/// leaves the jobs the node is still working on alone.
#[tokio::test]
async fn a_node_prunes_finished_jobs_in_the_background() {
    let db = TestDb::new().await;
    let pool = db.node_pool().await;
    warden_tests::workload::migrate(&pool).await.unwrap();
    let mut config = warden_tests::fast_node_config("ret-node", P);
    config.retention = RetentionConfig {
        period: Some(Duration::from_secs(1)),
        interval: Duration::from_millis(200),
        batch_size: 50,
        ..Default::default()
    };
    let node = Node::builder(config)
        .register(warden_tests::workload::Audit { node: "ret-node".into(), pool: pool.clone() })
        .unwrap()
        .start(pool)
        .await
        .unwrap();
    node.client().enqueue_many(&warden_tests::audit_jobs(20, 10, 0)).await.unwrap();
    // Scheduled far ahead: unfinished for the whole test.
    let later = warden_runtime::NewJob::new(
        "later",
        "audit",
        warden_tests::workload::AuditArgs { seq: 0, sleep_ms: 0, fail_times: 0, ..Default::default() },
    )
    .unwrap()
    .delay(DAY);
    let later = node.client().enqueue(later).await.unwrap().id;
    eventually(Duration::from_secs(30), "every finished job pruned", || async {
        (count(&db, "SELECT count(*) FROM warden.jobs").await == 1
            && count(&db, "SELECT count(*) FROM warden.attempts").await == 0)
            .then_some(())
    })
    .await;
    assert_eq!(node.client().get(later).await.unwrap().unwrap().state, "scheduled");
    node.shutdown().await.unwrap();
}
