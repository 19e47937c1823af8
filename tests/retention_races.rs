//! Races and corner cases of retention and the API budget, found in review: a retry
//! racing the pruner, and a rate budget smaller than one heavy call's cost.

use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::Code;
use warden::api::{self, pb, Auth};
use warden_runtime::retention::{Pruner, RetentionConfig};
use warden_runtime::store::ProducerStore;
use warden_runtime::{store, Node, PartitionCount};
use warden_tests::TestDb;

/// With `max_calls_per_second` below HEAVY_CALL_COST (10) the bucket never holds 10
/// tokens: every heavy call (QueueStats, ListMembers, ListJobs, Locate) is refused
/// forever, even on an idle node (fixed: the bucket holds at least one heavy call).
#[tokio::test]
async fn heavy_calls_are_admitted_with_a_rate_budget_below_their_cost() {
    let db = TestDb::new().await;
    let pool = store::connect(&db.url, &Default::default()).await.unwrap();
    warden_tests::workload::migrate(&pool).await.unwrap();
    let node = Node::builder(warden_tests::fast_node_config("n1", 16))
        .register(warden_tests::workload::Audit { node: "n1".into(), pool: pool.clone() })
        .unwrap()
        .start(pool)
        .await
        .unwrap();
    let limits = api::ApiLimits { max_calls_per_second: 5, ..Default::default() };
    assert!(limits.validate().is_ok(), "the configuration is accepted");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(api::serve_api(
        listener,
        api::Api::with_limits(node.clone(), limits),
        Auth::new(None),
        None,
        stop.clone(),
    ));
    let ch = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let mut jobs = pb::jobs_client::JobsClient::new(ch);
    // Idle for 3 s: the bucket is as full as it gets.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let r = jobs.queue_stats(pb::QueueStatsRequest {}).await;
    node.shutdown().await.unwrap();
    match r {
        Ok(_) => {}
        Err(s) => {
            assert_ne!(
                s.code(),
                Code::ResourceExhausted,
                "an idle node with a 5/s budget refuses every heavy call: {s:?}"
            )
        }
    }
}

/// retry_job racing the pruner over old discarded jobs: every retry either wins (the
/// job is back, available, with its attempts) or reports NOT_FOUND (pruned) — never a
/// successful retry of a job that is then deleted. Expected to pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_racing_the_pruner_never_loses_the_retried_job() {
    let db = TestDb::new().await;
    store::migrate(&db.pool).await.unwrap();
    store::init_partitions(&db.pool, PartitionCount::new(16).unwrap()).await.unwrap();
    let n: i64 = 3000;
    let ids: Vec<i64> = sqlx::query_scalar(
        "WITH j AS (
            INSERT INTO warden.jobs (account, partition, kind, args, state, run_at, due_at, max_attempts, timeout_ms,
                                     attempt, finished_at)
            SELECT 'acc' || (g % 50), warden.partition_of('acc' || (g % 50), 16), 'step', '{}', 'discarded',
                   now() - interval '30 days', now() - interval '30 days', 1, 60000, 1, now() - interval '10 days'
            FROM generate_series(1, $1) g RETURNING id, account, partition),
         a AS (INSERT INTO warden.attempts (job_id, account, partition, attempt, node, epoch, started_at, finished_at, outcome)
               SELECT id, account, partition, 1, 'n', 1, now() - interval '10 days', now() - interval '10 days', 'discarded' FROM j)
         SELECT id FROM j ORDER BY id",
    )
    .bind(n)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let cfg = RetentionConfig {
        period: Some(Duration::from_secs(7 * 24 * 3600)),
        batch_size: 7,
        batch_pause: Duration::ZERO,
        max_batches_per_run: 100_000,
        ..Default::default()
    };
    let pruner = Pruner::new(Pruner::own_pool(&db.pool), cfg).unwrap();
    let prune = tokio::spawn(async move {
        let mut total = 0;
        loop {
            let r = pruner.run_once().await.unwrap();
            total += r.jobs;
            if r.jobs == 0 && !r.skipped {
                return total;
            }
        }
    });
    let mut retried = Vec::new();
    let mut not_found = 0;
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in ids.chunks(ids.len() / 4 + 1) {
        let (pool, chunk) = (db.pool.clone(), chunk.to_vec());
        tasks.spawn(async move {
            let mut ok = Vec::new();
            let mut nf = 0;
            // Interleave from the back so the pruner (oldest id first here) meets retries.
            for id in chunk.into_iter().rev() {
                match store::PgStore::new(pool.clone(), PartitionCount::new(16).unwrap()).retry_job(id).await {
                    Ok(j) => ok.push(j.id),
                    Err(warden_runtime::Error::JobNotFound(_)) => nf += 1,
                    Err(e) => panic!("retry {id}: {e}"),
                }
            }
            (ok, nf)
        });
    }
    while let Some(r) = tasks.join_next().await {
        let (ok, nf) = r.unwrap();
        retried.extend(ok);
        not_found += nf;
    }
    let pruned = prune.await.unwrap();
    let present: Vec<i64> = sqlx::query_scalar("SELECT id FROM warden.jobs WHERE id = ANY($1) AND state = 'available'")
        .bind(&retried)
        .fetch_all(&db.pool)
        .await
        .unwrap();
    let orphans: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM warden.attempts a WHERE NOT EXISTS (SELECT 1 FROM warden.jobs j WHERE j.id = a.job_id)",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let retried_without_attempts: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM warden.jobs j WHERE NOT EXISTS (SELECT 1 FROM warden.attempts a WHERE a.job_id = j.id)",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    eprintln!("retried {} not_found {not_found} pruned {pruned}", retried.len());
    assert_eq!(retried.len() as i64 + not_found, n);
    assert_eq!(present.len(), retried.len(), "a retried job was deleted");
    assert_eq!(pruned as i64, not_found, "pruned = the retries that found nothing");
    assert_eq!(orphans, 0);
    assert_eq!(retried_without_attempts, 0, "a retried job lost its attempts");
}
