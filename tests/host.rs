//! The one-call host configured in code (no flags): admin HTTP and the gRPC API on
//! free ports, a set-up step before the node starts, ordered shutdown; and an
//! executor-only host (no HTTP, no gRPC).

use std::time::Duration;
use warden::api::pb;
use warden::{Host, HostConfig};
use warden_tests::workload::{self, Audit};
use warden_tests::{audit_jobs, count_state, eventually, http_get, TestDb};

fn config(db: &TestDb, id: &str) -> HostConfig {
    let mut c = HostConfig::new(id, db.url.clone());
    c.node = warden_tests::fast_node_config(id, 16);
    c.install_metrics = false; // one recorder per process; the process tests cover /metrics
    c
}

#[tokio::test]
async fn a_host_configured_in_code_serves_admin_and_grpc_and_stops_in_order() {
    let db = TestDb::new().await;
    let mut c = config(&db, "h1");
    c.admin_addr = Some("127.0.0.1:0".parse().unwrap());
    c.api = Some(warden::ApiConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        token: Some("tok".into()),
        tls: None,
        limits: Default::default(),
    });
    let ran_setup = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = ran_setup.clone();
    let host = Host::new(c)
        .setup(move |pool| async move {
            workload::migrate(&pool).await?;
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        })
        .register(Audit { node: "h1".into(), pool: db.pool.clone() })
        .unwrap()
        .start()
        .await
        .unwrap();
    assert!(ran_setup.load(std::sync::atomic::Ordering::SeqCst), "set-up ran before the node started");
    let admin = host.admin_addr().unwrap();
    assert_eq!(http_get(admin.port(), "/healthz").await.unwrap().0, 200);
    eventually(Duration::from_secs(10), "ready", || async {
        (http_get(admin.port(), "/readyz").await.unwrap().0 == 200).then_some(())
    })
    .await;
    // The node's enqueue pool is its own (not the executor's).
    assert_eq!(host.node().client().pool().options().get_max_connections(), 4);
    host.node().client().enqueue_many(&audit_jobs(4, 5, 0)).await.unwrap();
    eventually(Duration::from_secs(30), "jobs done", || async {
        (count_state(&db.pool, "completed").await == 20).then_some(())
    })
    .await;
    // gRPC with its token.
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", host.grpc_addr().unwrap()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut cluster = pb::cluster_client::ClusterClient::new(channel);
    let mut req = tonic::Request::new(pb::NodeStatsRequest {});
    req.metadata_mut().insert("authorization", "Bearer tok".parse().unwrap());
    let stats = cluster.node_stats(req).await.unwrap().into_inner();
    assert_eq!(stats.partitions_held, 16);
    let unauth = cluster.node_stats(pb::NodeStatsRequest {}).await.unwrap_err();
    assert_eq!(unauth.code(), tonic::Code::Unauthenticated);
    // Ordered stop: leases released, then both servers gone, within the budget.
    let grpc = host.grpc_addr().unwrap();
    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(30), host.shutdown()).await.expect("stops in time").unwrap();
    assert!(started.elapsed() < Duration::from_secs(15), "{:?}", started.elapsed());
    let held: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM warden.leases WHERE owner_node IS NOT NULL AND lease_expires_at > now()",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(held, 0, "every lease released");
    assert!(tokio::net::TcpStream::connect(grpc).await.is_err(), "gRPC stopped");
    assert!(tokio::net::TcpStream::connect(admin).await.is_err(), "admin stopped");
}

#[tokio::test]
async fn an_executor_only_host_runs_jobs_without_http_or_grpc() {
    let db = TestDb::new().await;
    workload::migrate(&db.pool).await.unwrap();
    let host = Host::new(config(&db, "h2"))
        .register(Audit { node: "h2".into(), pool: db.pool.clone() })
        .unwrap()
        .start()
        .await
        .unwrap();
    assert!(host.admin_addr().is_none() && host.grpc_addr().is_none());
    host.node().client().enqueue_many(&audit_jobs(3, 3, 0)).await.unwrap();
    eventually(Duration::from_secs(30), "jobs done", || async {
        (count_state(&db.pool, "completed").await == 9).then_some(())
    })
    .await;
    // `run_until` with a signal that has already fired stops at once, in order.
    tokio::time::timeout(Duration::from_secs(30), host.run_until(async {})).await.unwrap().unwrap();
}

#[tokio::test]
async fn a_failing_setup_step_stops_the_start_and_frees_the_admin_port() {
    let db = TestDb::new().await;
    let mut c = config(&db, "h3");
    let port = warden_tests::free_tcp_port();
    c.admin_addr = Some(format!("127.0.0.1:{port}").parse().unwrap());
    let err = Host::new(c)
        .setup(|_| async { anyhow::bail!("the application's migration failed") })
        .start()
        .await
        .err()
        .expect("the start fails");
    assert!(format!("{err:#}").contains("the application's migration failed"), "{err:#}");
    // The admin server it had started is stopped: the port can be bound again.
    std::net::TcpListener::bind(("127.0.0.1", port)).expect("admin port freed");
    let leases: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_namespace WHERE nspname = 'warden'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(leases, 0, "the node never started (no schema created)");
}
