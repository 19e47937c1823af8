//! # The test kit (`warden-tests`, not published)
//!
//! One kit for the integration tests, the soak and the benchmarks: a fresh database
//! per test on the server named by `DATABASE_URL` (run through `deploy/pg.sh run …`,
//! which starts a throwaway server), polling helpers, and node processes.
//!
//! Module map:
//!
//! - here: [`TestDb`] (a fresh database), [`NodeProc`] (a node process),
//!   [`PrivatePg`] (a server the test may stop and restart), [`CutProxy`] (a TCP
//!   proxy that can cut a node off from PostgreSQL and lose or delay its replies),
//!   [`free_udp_port`], [`free_tcp_port`], [`http_get`] (an admin endpoint),
//!   [`product_bin`] (a workspace binary such as `warden`).
//! - [`workload`] — the audit workload: a handler that records its own start and end
//!   (database clock) inside its job transaction and an external effect log outside
//!   it, and the checker of the guarantee over both.
//! - [`long_job`] — the long-job workload (issue 15): a handler that works in steps
//!   for minutes, heartbeating and checkpointing, resuming from its last checkpoint;
//!   an observer of every `warden.job_progress` write; and the checker of its runs
//!   (resumed from the last checkpoint, work redone, overlap, late writes).
//! - [`gossip_net`] — UDP relays that let a test cut gossip between node processes.
//! - [`model_store`] — the in-memory model of the store (the simulation's database).
//! - [`conformance`] — the executor-seam scenarios every store must pass (run against
//!   PostgreSQL and the model by `tests/conformance.rs`).
//! - [`soak`] — the seeded fault-injection harness and its scenario steps.
//! - [`rollout`] — the deploy harness: rolling restarts with a surge node and an
//!   HPA-like autoscaler on `warden_saturation`, over node processes, with the
//!   guarantee, per-partition pauses and moves measured (`tests/rollout.rs`,
//!   `warden-deploy-bench`).
//!
//! Binaries: `warden-test-node` (kit/bin), `warden-soak` (kit/bin), and the
//! benchmarks `warden-bench`, `warden-cluster-bench`, `warden-deploy-bench`,
//! `warden-retention-bench` (tests/bench).

pub mod conformance;
pub mod gossip_net;
pub mod long_job;
pub mod model_store;
pub mod periodic;
pub mod rollout;
pub mod soak;
pub mod workload;

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

/// `url` with its database name replaced (query parameters kept).
pub fn with_db(url: &str, db: &str) -> String {
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

/// Run `body` on the URL of a fresh database and drop the database afterwards, even
/// if `body` failed, so an aborted benchmark phase leaves nothing behind.
pub async fn in_fresh_db<T, Fut>(admin_url: &str, tag: &str, body: impl FnOnce(String) -> Fut) -> anyhow::Result<T>
where
    Fut: Future<Output = anyhow::Result<T>>,
{
    let db = TestDb::create(admin_url, tag).await?;
    let result = body(db.url.clone()).await;
    let dropped = db.drop_database().await;
    let value = result?;
    dropped?;
    Ok(value)
}

impl TestDb {
    /// Another handle on the same database.
    pub fn clone_handle(&self) -> TestDb {
        TestDb { url: self.url.clone(), pool: self.pool.clone(), name: self.name.clone() }
    }

    /// A fresh database on the server named by `DATABASE_URL` (panics if it cannot).
    pub async fn new() -> TestDb {
        init_tracing();
        TestDb::create(&admin_url(), "wt").await.expect("create a test database")
    }

    /// A fresh database `<tag>_<pid>_<random>` on the server of `admin_url` (tests,
    /// the soak and the benchmarks all make theirs here).
    pub async fn create(admin_url: &str, tag: &str) -> anyhow::Result<TestDb> {
        use anyhow::Context;
        let name = format!("{tag}_{}_{:x}", std::process::id(), fastrand::u64(..));
        let admin_pool = PgPoolOptions::new()
            .max_connections(1)
            .connect(admin_url)
            .await
            .context("connecting to the server (DATABASE_URL)")?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&admin_pool).await?;
        admin_pool.close().await;
        let url = with_db(admin_url, &name);
        let pool = PgPoolOptions::new().max_connections(8).connect(&url).await?;
        Ok(TestDb { url, pool, name })
    }

    /// Drop the database (`WITH (FORCE)`: lazily closed node connections must not keep
    /// it alive).
    pub async fn drop_database(self) -> anyhow::Result<()> {
        self.pool.close().await;
        let admin_pool = PgPoolOptions::new().max_connections(1).connect(&with_db(&self.url, "postgres")).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)))
            .execute(&admin_pool)
            .await?;
        admin_pool.close().await;
        Ok(())
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
        match NodeProc::spawn(bin, database_url, node_id, extra).await {
            Ok(n) => n,
            Err(e) => panic!("{e:#}"),
        }
    }

    /// [`NodeProc::start`] for callers that handle the failure (benchmarks).
    pub async fn spawn(bin: &str, database_url: &str, node_id: &str, extra: &[&str]) -> anyhow::Result<NodeProc> {
        use std::io::BufRead;
        use std::process::{Command, Stdio};
        let mut child = Command::new(bin)
            .args(["--database-url", database_url, "--node-id", node_id])
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("NODE_LOG")
                    .unwrap_or_else(|_| "warn,warden=info,warden_runtime=info,warden_cluster=info".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| anyhow::anyhow!("spawning {bin}: {e}"))?;
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
                anyhow::bail!("node {node_id} exited before READY ({status}): {:?}", log.lock().unwrap());
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                anyhow::bail!("node {node_id} not READY in 30s: {:?}", log.lock().unwrap());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(NodeProc { child, node_id: node_id.to_string(), log })
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

/// A free TCP port on 127.0.0.1 (bound and released).
pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One HTTP/1.1 GET on 127.0.0.1: (status, body).
pub async fn http_get(port: u16, path: &str) -> anyhow::Result<(u16, String)> {
    use anyhow::Context;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes()).await?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).await?;
        let status: u16 = buf.split_whitespace().nth(1).context("no status line")?.parse()?;
        let body = buf.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        anyhow::Ok((status, body))
    };
    tokio::time::timeout(Duration::from_secs(5), fetch).await.context("admin HTTP timed out")?
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
/// flowing both ways, connections stay open — like a network partition) and heal,
/// and whose replies (server → client) it can lose or delay:
///
/// - [`CutProxy::reply_loss`]: each server → client chunk is, with the given
///   probability, discarded and its whole proxied connection closed at once (the
///   client gets a reset). The statement it answered — maybe a `COMMIT` — already
///   reached PostgreSQL and ran; only its reply is lost.
/// - [`CutProxy::reply_delay`]: server → client chunks are held back for a delay
///   before they are forwarded (in order); statements still run on time.
pub struct CutProxy {
    pub port: u16,
    state: std::sync::Arc<ProxyState>,
    stop: tokio_util::sync::CancellationToken,
}

#[derive(Default)]
struct ProxyState {
    cut: std::sync::atomic::AtomicBool,
    /// Probability, per mille, that a server → client chunk is lost (and its connection reset).
    loss_per_mille: std::sync::atomic::AtomicU32,
    /// Delay for server → client chunks, in ms.
    delay_ms: std::sync::atomic::AtomicU64,
    /// Connections reset by reply loss so far.
    resets: std::sync::atomic::AtomicU64,
}

impl CutProxy {
    pub async fn start(target: std::net::SocketAddr) -> CutProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = std::sync::Arc::new(ProxyState::default());
        let stop = tokio_util::sync::CancellationToken::new();
        let (state2, stop2) = (state.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (client, _) = tokio::select! {
                    _ = stop2.cancelled() => return,
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                };
                let (state3, stop3) = (state2.clone(), stop2.clone());
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(target).await else { return };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::select! {
                        _ = stop3.cancelled() => {}
                        _ = client_to_server(cr, sw, state3.clone()) => {}
                        _ = server_to_client(sr, cw, state3.clone()) => {}
                    }
                });
            }
        });
        CutProxy { port, state, stop }
    }

    pub fn cut(&self) {
        self.state.cut.store(true, std::sync::atomic::Ordering::Release);
    }

    pub fn heal(&self) {
        self.state.cut.store(false, std::sync::atomic::Ordering::Release);
    }

    /// Lose each reply chunk with probability `per_mille`/1000 (and reset its
    /// connection); 0 turns it off.
    pub fn reply_loss(&self, per_mille: u32) {
        self.state.loss_per_mille.store(per_mille.min(1000), std::sync::atomic::Ordering::Release);
    }

    /// Hold every reply chunk back for `ms` before forwarding it; 0 turns it off.
    pub fn reply_delay(&self, ms: u64) {
        self.state.delay_ms.store(ms, std::sync::atomic::Ordering::Release);
    }

    /// Connections reset by reply loss so far.
    pub fn resets(&self) -> u64 {
        self.state.resets.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// Client → server: bytes flow unless cut (then they are held back until healed).
async fn client_to_server(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    state: std::sync::Arc<ProxyState>,
) {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // While cut, hold the bytes back until healed (a partition, not a reset).
        while state.cut.load(Ordering::Acquire) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if w.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Server → client: the reader stamps each chunk with the time it may be forwarded
/// (now + the reply delay) or, on a reply loss, drops it and resets the connection;
/// the writer forwards chunks in order once due and not cut. Returning ends the
/// whole proxied connection (the caller drops both sockets).
async fn server_to_client(
    mut r: tokio::net::tcp::OwnedReadHalf,
    w: tokio::net::tcp::OwnedWriteHalf,
    state: std::sync::Arc<ProxyState>,
) {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let lost = tokio_util::sync::CancellationToken::new();
    let lost2 = lost.clone();
    let st = state.clone();
    let reader = async move {
        let mut rng = fastrand::Rng::new();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match r.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let loss = st.loss_per_mille.load(Ordering::Acquire);
            if loss > 0 && rng.u32(0..1000) < loss {
                st.resets.fetch_add(1, Ordering::AcqRel);
                lost2.cancel();
                return;
            }
            let at = tokio::time::Instant::now() + Duration::from_millis(st.delay_ms.load(Ordering::Acquire));
            if tx.send((at, buf[..n].to_vec())).is_err() {
                return;
            }
        }
    };
    let writer = async move {
        let mut w = w;
        loop {
            let item = tokio::select! {
                _ = lost.cancelled() => break,
                i = rx.recv() => i,
            };
            // The reader ended (server closed): everything queued was forwarded.
            let Some((at, bytes)) = item else { return };
            tokio::select! {
                _ = lost.cancelled() => break,
                _ = tokio::time::sleep_until(at) => {}
            }
            while state.cut.load(Ordering::Acquire) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if w.write_all(&bytes).await.is_err() {
                return;
            }
        }
        // Reply lost: reset the client's connection (RST, not an orderly close).
        let _ = AsRef::<tokio::net::TcpStream>::as_ref(&w).set_zero_linger();
    };
    tokio::join!(reader, writer);
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
            let args = crate::workload::AuditArgs { seq, sleep_ms, fail_times: 0, ..Default::default() };
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
    let audit = crate::workload::check(pool).await.unwrap();
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

/// Flags of a `warden-test-node` cluster member for the process tests: `partitions`
/// partitions, a 2 s lease, fast enforcer, settle and gossip, gossip on `gossip` with
/// `seed` as the seed.
pub fn cluster_node_args(partitions: usize, gossip: u16, seed: u16) -> Vec<String> {
    [
        "--partitions",
        &partitions.to_string(),
        "--lease-ttl-ms",
        "2000",
        "--enforcer-interval-ms",
        "500",
        "--drain-timeout-ms",
        "3000",
        "--settle-delay-ms",
        "300",
        "--gossip-interval-ms",
        "50",
        "--gossip-listen",
        &format!("127.0.0.1:{gossip}"),
        "--seeds",
        &format!("127.0.0.1:{seed}"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Wait until every one of `partitions` partitions is held (unexpired) by exactly the
/// `expected` nodes; returns partition → owner.
pub async fn wait_owned_by(
    pool: &PgPool,
    partitions: usize,
    expected: &[&str],
    timeout: Duration,
) -> std::collections::BTreeMap<i32, String> {
    eventually(timeout, &format!("all {partitions} partitions owned by {expected:?}"), || async {
        let o = owners(pool).await;
        let per: std::collections::BTreeSet<&str> = o.values().map(String::as_str).collect();
        let ok = o.len() == partitions && per.len() == expected.len() && expected.iter().all(|e| per.contains(e));
        ok.then_some(o)
    })
    .await
}

/// The path of a binary built from this workspace (e.g. `warden-node` of the examples),
/// next to the running test's own profile directory (`target/<profile>/`). A test
/// binary lives in `target/<profile>/deps/`; `cargo nextest run --workspace` builds
/// every package's binaries before any test runs. Panics, saying how to build it, if
/// the binary is not there.
pub fn product_bin(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    let mut dir = exe.parent().expect("a directory").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is not built: run the tests with `cargo nextest run --workspace`, or `cargo build --bins --workspace` first",
        path.display()
    );
    path
}

/// A node in this process on `url` with the audit handler (fast test timings, 16
/// partitions), its schema and the workload's tables migrated.
pub async fn audit_node(url: &str, id: &str) -> warden_runtime::Node {
    let pool = warden_runtime::store::connect(url, &Default::default()).await.unwrap();
    workload::migrate(&pool).await.unwrap();
    warden_runtime::Node::builder(fast_node_config(id, 16))
        .register(workload::Audit { node: id.into(), pool: pool.clone() })
        .unwrap()
        .start(pool)
        .await
        .unwrap()
}

/// [`audit_node`] with the examples' long import too (`long_import`, a heartbeating,
/// checkpointing job), writing its heartbeats every 50 ms.
pub async fn long_import_node(url: &str, id: &str) -> warden_runtime::Node {
    let pool = warden_runtime::store::connect(url, &Default::default()).await.unwrap();
    workload::migrate(&pool).await.unwrap();
    warden_examples::long_import::migrate(&pool).await.unwrap();
    let mut config = fast_node_config(id, 16);
    config.exec.heartbeat_write_interval = Duration::from_millis(50);
    warden_runtime::Node::builder(config)
        .register(workload::Audit { node: id.into(), pool: pool.clone() })
        .unwrap()
        .register(warden_examples::long_import::LongImport { pool: pool.clone() })
        .unwrap()
        .start(pool)
        .await
        .unwrap()
}

/// Args of a `long_import` job that runs about `secs` seconds (10 batches a second,
/// heartbeating every batch, checkpointing every 200 ms).
pub fn long_import_args(secs: u64) -> serde_json::Value {
    serde_json::json!({ "rows": secs * 100, "batch": 10, "checkpoint_every_ms": 200, "pace_ms": 100 })
}

/// Serve the gRPC API of `node` on a free port (optionally with a bearer token);
/// returns its address and the token that stops it.
pub async fn serve_api_of(
    node: &warden_runtime::Node,
    token: Option<&str>,
) -> (std::net::SocketAddr, tokio_util::sync::CancellationToken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(warden::api::serve(
        listener,
        node.clone(),
        warden::api::Auth::new(token.map(str::to_string)),
        stop.clone(),
    ));
    (addr, stop)
}
