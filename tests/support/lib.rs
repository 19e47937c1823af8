//! Test support: a fresh database per test on the server named by `DATABASE_URL`
//! (run the tests through `deploy/pg.sh run …`, which starts a throwaway server),
//! polling helpers, and a handle on node processes.

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
    std::env::var("DATABASE_URL").expect(
        "DATABASE_URL is not set: run the tests with `deploy/pg.sh run cargo nextest run --workspace`",
    )
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
    sqlx::query_scalar("SELECT count(*) FROM warden.jobs WHERE state = $1")
        .bind(state)
        .fetch_one(pool)
        .await
        .unwrap()
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
