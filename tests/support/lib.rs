//! Test support: a fresh database per test on the server named by `DATABASE_URL`
//! (run the tests through `deploy/pg.sh run …`, which starts a throwaway server),
//! polling helpers, and a handle on node processes.
//!
//! Modules: [`soak`] — the seeded fault-injection harness and its scenario steps;
//! [`gossip_net`] — UDP relays that let a test cut gossip between node processes.
//! Here: [`TestDb`], [`NodeProc`], [`PrivatePg`] (a server the test may stop and
//! restart), [`CutProxy`] (a TCP proxy that can cut a node off from PostgreSQL).

pub mod gossip_net;
pub mod soak;

use sqlx::postgres::{PgPool, PgPoolOptions};
use std::future::Future;
use std::time::Duration;
use tokio::time::Instant;

/// A database of its own for one test.
pub struct TestDb {
    pub url: String,
    pub pool: PgPool,
    pub name: String,
}

pub fn admin_url() -> String {
    std::env::var("DATABASE_URL")
        .expect("DATABASE_URL is not set: run the tests with `deploy/pg.sh run cargo nextest run --workspace`")
}

fn with_db(url: &str, db: &str) -> String {
    // postgres://user@host:port/dbname[?params]
    let (base, params) = match url.split_once('?') {
        Some((b, p)) => (b, Some(p)),
        None => (url, None),
    };
    let base = match base.rfind('/') {
        Some(i) if i > "postgres://".len() => &base[..i],
        _ => base,
    };
    match params {
        Some(p) => format!("{base}/{db}?{p}"),
        None => format!("{base}/{db}"),
    }
}

impl TestDb {
    /// Another handle on the same database.
    pub fn clone_handle(&self) -> TestDb {
        TestDb { url: self.url.clone(), pool: self.pool.clone(), name: self.name.clone() }
    }

    pub async fn new() -> TestDb {
        init_tracing();
        let admin = admin_url();
        let name = format!("wt_{}_{}", std::process::id(), fastrand::u64(..));
        let admin_pool = PgPoolOptions::new().max_connections(1).connect(&admin).await.expect("connect admin");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin_pool)
            .await
            .expect("create test database");
        admin_pool.close().await;
        let url = with_db(&admin, &name);
        let pool = PgPoolOptions::new().max_connections(8).connect(&url).await.expect("connect test db");
        TestDb { url, pool, name }
    }

    /// A pool tuned like a node's (for starting nodes in-process).
    pub async fn node_pool(&self) -> PgPool {
        warden_runtime::store::connect(&self.url, &Default::default()).await.expect("node pool")
    }
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// Poll `f` until it returns `Some`, or panic with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Count jobs in a state.
pub async fn count_state(pool: &PgPool, state: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM warden.jobs WHERE state = $1").bind(state).fetch_one(pool).await.unwrap()
}

/// Count jobs not yet finished.
pub async fn count_unfinished(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM warden.jobs WHERE state IN ('scheduled', 'available', 'retryable', 'running')",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// A `warden-test-node` process.
pub struct NodeProc {
    pub child: std::process::Child,
    pub node_id: String,
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl NodeProc {
    /// Start a node process and wait until it prints READY (it then holds its partitions).
    pub async fn start(bin: &str, database_url: &str, node_id: &str, extra: &[&str]) -> NodeProc {
        use std::io::BufRead;
        use std::process::{Command, Stdio};
        let mut child = Command::new(bin)
            .args(["--database-url", database_url, "--node-id", node_id])
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("NODE_LOG").unwrap_or_else(|_| "warn,warden_runtime=info,warden_cluster=info".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn node process");
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (l1, l2) = (log.clone(), log.clone());
        let id = node_id.to_string();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("READY") {
                    let _ = ready_tx.send(());
                }
                l1.lock().unwrap().push(line);
            }
        });
        let pid = child.id();
        std::thread::spawn(move || {
            use std::io::Write;
            // NODE_LOG_DIR=/some/dir keeps every node's log in a file for post-mortems.
            let mut file = std::env::var("NODE_LOG_DIR")
                .ok()
                .and_then(|d| std::fs::File::create(std::path::Path::new(&d).join(format!("{id}-{pid}.log"))).ok());
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var("NODE_ECHO").is_ok() {
                    eprintln!("[{id}] {line}");
                }
                if let Some(f) = file.as_mut() {
                    let _ = writeln!(f, "{line}");
                }
                l2.lock().unwrap().push(line);
            }
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if ready_rx.try_recv().is_ok() {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("node {node_id} exited before READY ({status}): {:?}", log.lock().unwrap());
            }
            assert!(std::time::Instant::now() < deadline, "node {node_id} not READY in 30s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        NodeProc { child, node_id: node_id.to_string(), log }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// Wait for exit up to `timeout`; returns the exit status.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            if std::time::Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn log_contains(&self, needle: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(needle))
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A private PostgreSQL server (for tests that stop and restart it).
pub struct PrivatePg {
    pub dir: std::path::PathBuf,
    /// The port, stable across restarts.
    pub port: u16,
}

fn pg_script() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/pg.sh")
}

impl PrivatePg {
    pub fn start() -> PrivatePg {
        let dir = std::env::temp_dir().join(format!("warden-pg-test-{}-{}", std::process::id(), fastrand::u32(..)));
        let out = std::process::Command::new(pg_script()).arg("start").arg(&dir).output().expect("run pg.sh");
        assert!(out.status.success(), "pg.sh start failed: {}", String::from_utf8_lossy(&out.stderr));
        let port: u16 = std::fs::read_to_string(dir.join("port")).unwrap().trim().parse().unwrap();
        PrivatePg { dir, port }
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn stop(&self) {
        let out = std::process::Command::new(pg_script()).arg("stop").arg(&self.dir).output().expect("run pg.sh");
        assert!(out.status.success());
    }

    pub fn restart(&self) {
        let out = std::process::Command::new(pg_script())
            .arg("start")
            .arg(&self.dir)
            .env("PGPORT_WANTED", self.port.to_string())
            .output()
            .expect("run pg.sh");
        assert!(out.status.success(), "pg.sh restart failed: {}", String::from_utf8_lossy(&out.stderr));
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A free UDP port on 127.0.0.1 (for gossip).
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Current lease owners: partition → owner node id (without generation), for unexpired leases.
pub async fn owners(pool: &PgPool) -> std::collections::BTreeMap<i32, String> {
    let rows: Vec<(i32, String)> = sqlx::query_as(
        "SELECT partition, split_part(owner_node, '/', 1) FROM warden.leases
         WHERE owner_node IS NOT NULL AND lease_expires_at > now() ORDER BY partition",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter().collect()
}

/// A TCP proxy in front of PostgreSQL that a test can cut (black-hole: bytes stop
/// flowing both ways, connections stay open — like a network partition) and heal.
pub struct CutProxy {
    pub port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stop: tokio_util::sync::CancellationToken,
}

impl CutProxy {
    pub async fn start(target: std::net::SocketAddr) -> CutProxy {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop = tokio_util::sync::CancellationToken::new();
        let (cut2, stop2) = (cut.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (client, _) = tokio::select! {
                    _ = stop2.cancelled() => return,
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                };
                let (cut3, stop3) = (cut2.clone(), stop2.clone());
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(target).await else { return };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let pipe = |mut r: tokio::net::tcp::OwnedReadHalf,
                                mut w: tokio::net::tcp::OwnedWriteHalf,
                                cut: std::sync::Arc<std::sync::atomic::AtomicBool>| async move {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = match r.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            // While cut, hold the bytes back until healed (a partition, not a reset).
                            while cut.load(Ordering::Acquire) {
                                tokio::time::sleep(Duration::from_millis(10)).await;
                            }
                            if w.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    };
                    tokio::select! {
                        _ = stop3.cancelled() => {}
                        _ = pipe(cr, sw, cut3.clone()) => {}
                        _ = pipe(sr, cw, cut3.clone()) => {}
                    }
                });
            }
        });
        CutProxy { port, cut, stop }
    }

    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::Release);
    }

    pub fn heal(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::Release);
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Serial audit jobs: `per_account` jobs for each of `accounts` accounts, interleaved.
pub fn audit_jobs(accounts: usize, per_account: i64, sleep_ms: u64) -> Vec<warden_runtime::NewJob> {
    let mut jobs = Vec::new();
    for seq in 0..per_account {
        for a in 0..accounts {
            let args = warden_examples::workload::AuditArgs { seq, sleep_ms, fail_times: 0 };
            jobs.push(warden_runtime::NewJob::new(format!("acct-{a}"), "audit", args).unwrap());
        }
    }
    jobs
}

/// The serial guarantee over the whole history, from the attempts table and from the
/// audit handler's own log (committed in the job transaction), plus "nothing lost".
pub async fn assert_guarantee(pool: &PgPool, total: i64) -> warden_runtime::history::HistoryReport {
    let h = warden_runtime::history::check(pool).await.unwrap();
    assert!(h.is_clean(), "serial guarantee violated: {h:?}");
    assert_eq!((h.completed, h.unfinished), (total, 0), "nothing lost: {h:?}");
    let audit = warden_examples::workload::check(pool).await.unwrap();
    assert_eq!(audit.rows, total, "one committed audit row per job: {audit:?}");
    assert_eq!((audit.duplicate_jobs, audit.overlaps, audit.order_violations), (0, 0, 0), "{audit:?}");
    h
}

/// A node configuration for in-process tests: short lease (2 s), fast enforcer.
pub fn fast_node_config(id: &str, partitions: u32) -> warden_runtime::NodeConfig {
    warden_runtime::NodeConfig {
        node_id: id.into(),
        partitions: warden_runtime::PartitionCount::new(partitions).unwrap(),
        lease: warden_runtime::lease::LeaseConfig {
            ttl: Duration::from_secs(2),
            renew_interval: Duration::from_millis(400),
            safety_margin: Duration::from_millis(500),
        },
        enforcer_interval: Duration::from_millis(200),
        ..Default::default()
    }
}
