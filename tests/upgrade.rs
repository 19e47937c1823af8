//! A rolling upgrade from the previous release to this one, under load: three nodes of
//! the previous release (`deploy/PREVIOUS_RELEASE`, built by `deploy/build-previous.sh`,
//! path in `WARDEN_PREVIOUS_NODE`) run jobs; each is replaced in turn by a node of this
//! build (SIGTERM → drain → exit 0 → start the new one). Then a node of the previous
//! release restarts against the upgraded schema — what an old node does during a
//! rollback or a crash loop mid-rollout. Throughout, the serial guarantee is checked
//! from the attempts table and the handler's own audit log.
//!
//! `.ci/run` builds the previous release and sets `WARDEN_PREVIOUS_NODE`. Without it
//! (a local run that did not build it), the test says so and does nothing.

use std::collections::BTreeMap;
use std::time::Duration;
use warden_runtime::Client;
use warden_tests::{assert_guarantee, audit_jobs, count_state, eventually, free_udp_port, NodeProc, TestDb};

const NEW: &str = env!("CARGO_BIN_EXE_warden-test-node");
const P: usize = 64;

async fn start(bin: &str, url: &str, id: &str, gossip: u16, seed: u16) -> NodeProc {
    let a = warden_tests::cluster_node_args(P, gossip, seed);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    NodeProc::start(bin, url, id, &a).await
}

async fn wait_owned_by(pool: &sqlx::PgPool, expected: &[&str]) {
    warden_tests::wait_owned_by(pool, P, expected, Duration::from_secs(30)).await;
}

#[tokio::test]
async fn a_rolling_upgrade_from_the_previous_release_keeps_the_guarantee() {
    let Ok(old) = std::env::var("WARDEN_PREVIOUS_NODE") else {
        eprintln!("WARDEN_PREVIOUS_NODE is not set: run deploy/build-previous.sh (CI does); nothing tested");
        return;
    };
    assert!(std::path::Path::new(&old).exists(), "WARDEN_PREVIOUS_NODE={old} does not exist");
    let db = TestDb::new().await;
    let seed = free_udp_port();
    let ids = ["n1", "n2", "n3"];
    let mut ports = BTreeMap::new();
    let mut nodes = BTreeMap::new();
    for (i, id) in ids.iter().enumerate() {
        let port = if i == 0 { seed } else { free_udp_port() };
        ports.insert(*id, port);
        nodes.insert(*id, start(&old, &db.url, id, port, seed).await);
    }
    wait_owned_by(&db.pool, &ids).await;
    let legacy: i64 =
        sqlx::query_scalar("SELECT count(*) FROM public._sqlx_migrations").fetch_one(&db.pool).await.unwrap();
    assert_eq!(legacy, 3, "the previous release keeps its history in public._sqlx_migrations");

    // Load that outlives the rollout: 80 accounts × 40 serial jobs of ~10 ms.
    let client = Client::connect(db.pool.clone()).await.unwrap();
    let jobs = audit_jobs(80, 40, 10);
    let total = jobs.len() as i64;
    client.enqueue_many(&jobs).await.unwrap();
    eventually(Duration::from_secs(60), "work under way", || async {
        (count_state(&db.pool, "completed").await >= total / 10).then_some(())
    })
    .await;

    let started = std::time::Instant::now();
    for id in ids {
        let mut n = nodes.remove(id).unwrap();
        n.signal(libc::SIGTERM);
        let status = n.wait_exit(Duration::from_secs(20)).await.expect("the old node exits after its drain");
        assert!(status.success(), "{id} (previous release) exited with {status}");
        nodes.insert(id, start(NEW, &db.url, id, ports[id], seed).await);
        wait_owned_by(&db.pool, &ids).await;
        eprintln!(
            "{id} upgraded at {:?}; {} jobs completed",
            started.elapsed(),
            count_state(&db.pool, "completed").await
        );
    }
    let history: Vec<(i64, bool)> =
        sqlx::query_as("SELECT version, adopted FROM warden.schema_history ORDER BY version")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(&history[..3], &[(1, true), (2, true), (3, true)], "the legacy history was adopted: {history:?}");
    assert_eq!(history.len(), warden_runtime::schema::migrations().len());

    // An old node restarted after the upgrade (a rollback, a crash loop mid-rollout):
    // the schema is inside its window, it starts and works beside the new ones.
    let mut n3 = nodes.remove("n3").unwrap();
    n3.signal(libc::SIGTERM);
    assert!(n3.wait_exit(Duration::from_secs(20)).await.expect("n3 exits").success());
    nodes.insert("n3", start(&old, &db.url, "n3", ports["n3"], seed).await);
    wait_owned_by(&db.pool, &ids).await;

    eventually(Duration::from_secs(120), "all jobs completed", || async {
        (count_state(&db.pool, "completed").await == total).then_some(())
    })
    .await;
    eprintln!("rolling upgrade under load: {total} jobs completed in {:?} after the rollout began", started.elapsed());
    assert_guarantee(&db.pool, total).await;
    for (_, mut n) in nodes {
        n.signal(libc::SIGTERM);
        let _ = n.wait_exit(Duration::from_secs(20)).await;
    }
}
