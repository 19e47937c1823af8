//! Node processes against a real PostgreSQL: SIGKILL and restart, graceful SIGTERM,
//! and a database outage. Each test checks the serial guarantee from the attempts
//! table and the handler's own audit log (committed in the job transaction).

use std::time::Duration;
use warden_runtime::{CancelResult, Client, NewJob};
use warden_tests::{
    assert_guarantee, audit_jobs, count_state, eventually, free_tcp_port, http_get, NodeProc, PrivatePg, TestDb,
};

const BIN: &str = env!("CARGO_BIN_EXE_warden-test-node");
/// Short lease so tests fail over quickly; everything else default.
const FAST: &[&str] =
    &["--partitions", "16", "--lease-ttl-ms", "2000", "--enforcer-interval-ms", "200", "--drain-timeout-ms", "3000"];

#[tokio::test]
async fn sigkill_mid_run_then_restart_loses_nothing_and_reruns_nothing() {
    let db = TestDb::new().await;
    let node = NodeProc::start(BIN, &db.url, "node-a", FAST).await;
    let client = Client::connect(db.pool.clone()).await.unwrap();
    let jobs = audit_jobs(20, 40, 15);
    let total = jobs.len() as i64;
    client.enqueue_many(&jobs).await.unwrap();
    eventually(Duration::from_secs(60), "a third of the work done", || async {
        (count_state(&db.pool, "completed").await >= total / 3).then_some(())
    })
    .await;
    node.signal(libc::SIGKILL);
    drop(node);
    let running = count_state(&db.pool, "running").await;
    // Same node id, new generation: it must wait for the old leases to expire, then rescue.
    let _node = NodeProc::start(BIN, &db.url, "node-a", FAST).await;
    eventually(Duration::from_secs(60), "all work done after restart", || async {
        (count_state(&db.pool, "completed").await == total).then_some(())
    })
    .await;
    let h = assert_guarantee(&db.pool, total).await;
    assert_eq!(h.rescued_attempts, running, "every attempt the killed node left running was rescued");
}

#[tokio::test]
async fn sigterm_drains_releases_and_exits_promptly() {
    let db = TestDb::new().await;
    let mut node = NodeProc::start(BIN, &db.url, "node-a", FAST).await;
    let client = Client::connect(db.pool.clone()).await.unwrap();
    let jobs = audit_jobs(10, 30, 30);
    let total = jobs.len() as i64;
    client.enqueue_many(&jobs).await.unwrap();
    eventually(Duration::from_secs(60), "work under way", || async {
        (count_state(&db.pool, "completed").await >= 20).then_some(())
    })
    .await;
    let t = std::time::Instant::now();
    node.signal(libc::SIGTERM);
    let status = node.wait_exit(Duration::from_secs(6)).await.expect("node exits within drain timeout + 3s");
    assert!(status.success(), "graceful exit code 0, got {status}");
    assert!(t.elapsed() < Duration::from_secs(5), "exit took {:?}", t.elapsed());
    let held: i64 = sqlx::query_scalar("SELECT count(*) FROM warden.leases WHERE owner_node IS NOT NULL")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(held, 0, "every lease released on SIGTERM");
    assert_eq!(count_state(&db.pool, "running").await, 0, "in-flight attempts finished while draining");
    // A successor starts at once (no lease expiry to wait for) and finishes the work.
    let _next = NodeProc::start(BIN, &db.url, "node-b", FAST).await;
    eventually(Duration::from_secs(60), "all work done", || async {
        (count_state(&db.pool, "completed").await == total).then_some(())
    })
    .await;
    let h = assert_guarantee(&db.pool, total).await;
    assert_eq!(h.rescued_attempts, 0, "a graceful stop leaves nothing to rescue");
}

#[tokio::test]
async fn database_outage_pauses_execution_and_resumes_without_loss_or_duplicates() {
    let pg = PrivatePg::start();
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(4).connect(&pg.url()).await.unwrap();
    let node = NodeProc::start(BIN, &pg.url(), "node-a", FAST).await;
    let client = Client::connect(pool.clone()).await.unwrap();
    let jobs = audit_jobs(20, 30, 10);
    let total = jobs.len() as i64;
    client.enqueue_many(&jobs).await.unwrap();
    eventually(Duration::from_secs(60), "work under way", || async {
        (count_state(&pool, "completed").await >= total / 4).then_some(())
    })
    .await;
    pool.close().await;
    // Down for longer than the lease TTL: the node must self-fence, then recover.
    pg.stop();
    tokio::time::sleep(Duration::from_secs(3)).await;
    pg.restart();
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(4).connect(&pg.url()).await.unwrap();
    eventually(Duration::from_secs(60), "all work done after the outage", || async {
        (count_state(&pool, "completed").await == total).then_some(())
    })
    .await;
    assert_guarantee(&pool, total).await;
    assert!(node.log_contains("self-fencing") || node.log_contains("fenced"), "the node noticed it lost its leases");
}

/// Minimal HTTP GET against the node's admin port.
#[tokio::test]
async fn admin_port_serves_metrics_health_and_readiness() {
    let db = TestDb::new().await;
    let port = free_tcp_port();
    let addr = format!("127.0.0.1:{port}");
    let mut args = FAST.to_vec();
    args.extend(["--admin-addr", &addr]);
    let _node = NodeProc::start(BIN, &db.url, "node-a", &args).await;
    let client = Client::connect(db.pool.clone()).await.unwrap();
    client.enqueue_many(&audit_jobs(5, 4, 0)).await.unwrap();
    eventually(Duration::from_secs(30), "jobs done", || async {
        (count_state(&db.pool, "completed").await == 20).then_some(())
    })
    .await;
    assert_eq!(http_get(port, "/healthz").await.unwrap().0, 200);
    assert_eq!(http_get(port, "/readyz").await.unwrap().0, 200);
    // Lease renewals happen every TTL/4: poll until the first one is counted.
    let body = eventually(Duration::from_secs(10), "renewals in /metrics", || async {
        let (status, body) = http_get(port, "/metrics").await.unwrap();
        assert_eq!(status, 200);
        body.contains("warden_lease_renewals_total").then_some(body)
    })
    .await;
    for metric in [
        "warden_attempts_total",
        "warden_jobs_completed_total",
        "warden_queue_seconds",
        "warden_processing_seconds",
        "warden_active_actors",
        "warden_lease_renewals_total",
    ] {
        assert!(body.contains(metric), "{metric} missing from /metrics:\n{body}");
    }
    assert!(body.contains(r#"warden_jobs_completed_total{kind="audit"} 20"#), "{body}");
}

/// Issue 15: while a long job heartbeats and checkpoints, the node's /metrics shows the
/// heartbeating gauges and the heartbeat and checkpoint counters and histograms
/// (`--heartbeat-write-interval-ms` wired through the host flags).
#[tokio::test]
async fn metrics_show_a_heartbeating_job_while_it_runs() {
    let db = TestDb::new().await;
    let port = free_tcp_port();
    let addr = format!("127.0.0.1:{port}");
    let mut args = FAST.to_vec();
    args.extend(["--admin-addr", &addr, "--heartbeat-write-interval-ms", "100"]);
    let _node = NodeProc::start(BIN, &db.url, "node-a", &args).await;
    let client = Client::connect(db.pool.clone()).await.unwrap();
    let job = NewJob::new("importer", "long_import", warden_tests::long_import_args(60)).unwrap();
    let id = client.enqueue(job).await.unwrap().id;
    let body = eventually(Duration::from_secs(30), "a heartbeating job in /metrics", || async {
        let (status, body) = http_get(port, "/metrics").await.unwrap();
        assert_eq!(status, 200);
        let beating = body.lines().any(|l| l == "warden_heartbeating_attempts 1");
        let checkpointed = body.contains(r#"warden_checkpoints_total{kind="long_import",outcome="recorded"}"#);
        (beating && checkpointed).then_some(body)
    })
    .await;
    for metric in [
        "warden_heartbeat_age_max_seconds",
        r#"warden_heartbeats_total{kind="long_import",outcome="recorded"}"#,
        "warden_heartbeat_write_seconds",
        "warden_checkpoint_bytes",
    ] {
        assert!(body.contains(metric), "{metric} missing from /metrics:\n{body}");
    }
    let age: f64 = body
        .lines()
        .find_map(|l| l.strip_prefix("warden_heartbeat_age_max_seconds "))
        .and_then(|v| v.parse().ok())
        .expect("the heartbeat age gauge has a value");
    assert!(age < 5.0, "the job heartbeats every 100 ms, yet the oldest beat is {age} s old");
    assert!(matches!(client.cancel(id).await.unwrap(), CancelResult::CancelRequested));
    eventually(Duration::from_secs(20), "the cancel reached the heartbeating handler", || async {
        (count_state(&db.pool, "cancelled").await == 1).then_some(())
    })
    .await;
}

/// Regression: nodes started at the same moment on a fresh database raced on creating
/// tables ("type ... already exists"); the demo cluster script hit it.
#[tokio::test]
async fn nodes_started_together_on_a_fresh_database_all_come_up() {
    let db = TestDb::new().await;
    let (a, b, c) = tokio::join!(
        NodeProc::start(BIN, &db.url, "node-a", FAST),
        NodeProc::start(BIN, &db.url, "node-b", FAST),
        NodeProc::start(BIN, &db.url, "node-c", FAST),
    );
    for n in [&a, &b, &c] {
        assert!(n.log_contains("node started"), "{} did not start", n.node_id);
    }
}

/// The host starts its admin server first and waits for the database: while
/// PostgreSQL is down the process is live (`/healthz` 200) but not ready (`/readyz`
/// 503, "starting") and says it is retrying; once the database is up it starts, is
/// ready, and a SIGTERM stops it in order with exit 0.
#[tokio::test]
async fn a_node_started_before_its_database_waits_live_but_not_ready() {
    let pg = PrivatePg::start();
    pg.stop();
    let port = free_tcp_port();
    let url = pg.url();
    let starting = tokio::spawn(async move {
        let admin = format!("127.0.0.1:{port}");
        let mut args = FAST.to_vec();
        args.extend(["--admin-addr", &admin]);
        NodeProc::start(BIN, &url, "node-a", &args).await
    });
    let body = eventually(Duration::from_secs(20), "admin port up while the database is down", || async {
        let Ok((h, _)) = http_get(port, "/healthz").await else { return None };
        let (r, body) = http_get(port, "/readyz").await.unwrap();
        (h == 200 && r == 503).then_some(body)
    })
    .await;
    assert!(body.contains("starting"), "{body}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!starting.is_finished(), "the node must wait for the database, not exit");
    pg.restart();
    let mut node = tokio::time::timeout(Duration::from_secs(60), starting).await.expect("started").unwrap();
    assert!(node.log_contains("database not reachable yet; retrying"), "the wait is logged");
    eventually(Duration::from_secs(10), "ready", || async {
        (http_get(port, "/readyz").await.unwrap().0 == 200).then_some(())
    })
    .await;
    node.signal(libc::SIGTERM);
    let status = node.wait_exit(Duration::from_secs(30)).await.expect("exits after SIGTERM");
    assert!(status.success(), "{status}");
    let log = node.log.lock().unwrap().clone();
    let at = |needle: &str| log.iter().position(|l| l.contains(needle)).unwrap_or_else(|| panic!("{needle}: {log:?}"));
    assert!(at("shutting down: draining and releasing") < at("node stopped cleanly"), "{log:?}");
}

/// TLS to PostgreSQL (sqlx with rustls): `sslmode=require` encrypts, `verify-full`
/// with the server's CA (`sslrootcert`) verifies, and `verify-full` against a CA the
/// client does not trust is refused — and a node runs over it.
#[tokio::test]
async fn nodes_reach_postgresql_over_tls_and_verify_its_certificate() {
    use std::os::unix::fs::MetadataExt;
    let pg = PrivatePg::start();
    let certs = pg.dir.join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl").args(args).current_dir(&certs).output().expect("openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    std::fs::write(certs.join("san.ext"), "subjectAltName=DNS:localhost\n").unwrap();
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-subj",
        "/CN=warden-test-ca",
        "-days",
        "1",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "1",
        "-extfile",
        "san.ext",
    ]);
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "other.key",
        "-out",
        "other.crt",
        "-subj",
        "/CN=someone-else",
        "-days",
        "1",
    ]);
    // The server reads its key only if it owns it and nobody else can.
    let data = std::fs::metadata(pg.dir.join("data")).unwrap();
    for f in ["certs", "certs/server.crt", "certs/server.key"] {
        std::os::unix::fs::chown(pg.dir.join(f), Some(data.uid()), Some(data.gid())).unwrap();
    }
    std::fs::set_permissions(certs.join("server.key"), std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let admin = sqlx::PgPool::connect(&pg.url()).await.unwrap();
    for (k, v) in [("ssl_cert_file", certs.join("server.crt")), ("ssl_key_file", certs.join("server.key"))] {
        sqlx::query(sqlx::AssertSqlSafe(format!("ALTER SYSTEM SET {k} = '{}'", v.display())))
            .execute(&admin)
            .await
            .unwrap();
    }
    sqlx::query("ALTER SYSTEM SET ssl = on").execute(&admin).await.unwrap();
    sqlx::query("SELECT pg_reload_conf()").execute(&admin).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;

    let base = format!("postgres://postgres@localhost:{}/postgres", pg.port);
    let ssl_of = |url: String| async move {
        let pool = sqlx::postgres::PgPoolOptions::new().max_connections(1).connect(&url).await?;
        let on: bool =
            sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetch_one(&pool).await?;
        anyhow::Ok(on)
    };
    assert!(ssl_of(format!("{base}?sslmode=require")).await.unwrap(), "require encrypts");
    let ca = certs.join("ca.crt");
    assert!(ssl_of(format!("{base}?sslmode=verify-full&sslrootcert={}", ca.display())).await.unwrap());
    let untrusted =
        ssl_of(format!("{base}?sslmode=verify-full&sslrootcert={}", certs.join("other.crt").display())).await;
    assert!(untrusted.is_err(), "a certificate from an untrusted CA is refused: {untrusted:?}");
    assert!(!ssl_of(format!("{base}?sslmode=disable")).await.unwrap());

    // A node process over verify-full: it starts, runs jobs, and its sessions are encrypted.
    let url = format!("{base}?sslmode=verify-full&sslrootcert={}", ca.display());
    let node = NodeProc::start(BIN, &url, "tls-node", FAST).await;
    let client = Client::connect(admin.clone()).await.unwrap();
    client.enqueue_many(&audit_jobs(3, 3, 0)).await.unwrap();
    eventually(Duration::from_secs(30), "jobs done over TLS", || async {
        (count_state(&admin, "completed").await == 9).then_some(())
    })
    .await;
    let encrypted: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_stat_ssl WHERE ssl").fetch_one(&admin).await.unwrap();
    assert!(encrypted >= 3, "the node's connections are encrypted ({encrypted})");
    drop(node);
}
