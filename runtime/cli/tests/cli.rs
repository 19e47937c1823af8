//! The `warden` binary against a real node's gRPC API and PostgreSQL: tables, JSON,
//! exit codes, authentication, TLS, paging, and the schema commands.

use std::net::SocketAddr;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use warden::api::{self, Auth};
use warden_tests::{
    audit_node as node_on, eventually, long_import_args, long_import_node, serve_api_of as serve, TestDb,
};

const CLI: &str = env!("CARGO_BIN_EXE_warden");

/// A finished CLI process as (exit code, stdout, stderr).
fn outcome(out: std::process::Output) -> (i32, String, String) {
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// Run the CLI binary (async: the server under test runs on this test's runtime).
async fn cli(addr: SocketAddr, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = tokio::process::Command::new(CLI)
        .arg("--endpoint")
        .arg(format!("http://{addr}"))
        .args(args)
        .env_remove("WARDEN_API_TOKEN")
        .envs(env.iter().copied())
        .output()
        .await
        .unwrap();
    outcome(out)
}

#[tokio::test]
async fn cli_tables_json_and_exit_codes() {
    let db = TestDb::new().await;
    let node = node_on(&db.url, "n1").await;
    let (addr, _stop) = serve(&node, None).await;
    let (code, out, err) =
        cli(addr, &["jobs", "enqueue", "acct-7", "audit", "--args", r#"{"seq": 1}"#, "--json"], &[]).await;
    assert_eq!(code, 0, "{err}");
    let id = serde_json::from_str::<serde_json::Value>(&out).unwrap()["id"].as_i64().unwrap();
    let (code, out, _) = cli(addr, &["ring"], &[]).await;
    assert_eq!(code, 0);
    assert!(out.contains("NODE") && out.contains("n1") && out.contains("16 partitions: 0 moving, 0 unowned"), "{out}");
    let (code, out, _) = cli(addr, &["members", "--json"], &[]).await;
    assert_eq!(code, 0);
    assert_eq!(serde_json::from_str::<serde_json::Value>(&out).unwrap()["members"][0]["partitions_held"], 16);
    let (code, out, _) = cli(addr, &["locate", "acct-7"], &[]).await;
    assert!(code == 0 && out.contains("owner (lease)  n1 (epoch 1)"), "{out}");
    eventually(Duration::from_secs(20), "job done", || async {
        let (_, out, _) = cli(addr, &["jobs", "get", &id.to_string(), "--json"], &[]).await;
        (serde_json::from_str::<serde_json::Value>(&out).unwrap()["job"]["state"] == "completed").then_some(())
    })
    .await;
    let (code, out, _) = cli(addr, &["jobs", "list", "--account", "acct-7"], &[]).await;
    assert!(code == 0 && out.contains("completed"), "{out}");
    let (code, out, _) = cli(addr, &["stats", "--json"], &[]).await;
    assert!(
        code == 0 && serde_json::from_str::<serde_json::Value>(&out).unwrap()["by_state"]["completed"] == 1,
        "{out}"
    );
    // Exit codes.
    let (code, _, err) = cli(addr, &["jobs", "get", "987654"], &[]).await;
    assert_eq!((code, err.trim()), (3, "error: job 987654 not found"));
    let (code, _, err) = cli(addr, &["jobs", "enqueue", "", "audit"], &[]).await;
    assert!(code == 4 && err.contains("account must not be empty"), "{err}");
    let (code, _, err) = cli(addr, &["jobs", "enqueue", "a", "audit", "--args", "{oops"], &[]).await;
    assert!(code == 4 && err.contains("not valid JSON"), "{err}");
    let (code, _, _) = cli(addr, &["jobs", "list", "--limit", "9999"], &[]).await;
    assert_eq!(code, 4);
    let (code, _, _) = cli(addr, &["jobs", "frobnicate"], &[]).await;
    assert_eq!(code, 2, "usage errors exit 2");
    let dead: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let (code, _, err) = cli(dead, &["ring"], &[]).await;
    assert!(code == 5 && err.contains("cannot connect"), "{err}");
    let (code, out, _) = cli(addr, &["--help"], &[]).await;
    assert!(code == 0 && out.contains("Examples:") && out.contains("Exit codes"), "{out}");
    node.shutdown().await.unwrap();
}

#[tokio::test]
async fn cli_with_authentication() {
    let db = TestDb::new().await;
    let node = node_on(&db.url, "n1").await;
    let (addr, _stop) = serve(&node, Some("tok-123")).await;
    let (code, _, err) = cli(addr, &["ring"], &[]).await;
    assert!(code == 6 && err.contains("bearer token"), "{err}");
    let (code, _, _) = cli(addr, &["ring", "--token", "wrong"], &[]).await;
    assert_eq!(code, 6);
    let (code, _, _) = cli(addr, &["ring", "--token", "tok-123"], &[]).await;
    assert_eq!(code, 0);
    let (code, _, _) = cli(addr, &["ring"], &[("WARDEN_API_TOKEN", "tok-123")]).await;
    assert_eq!(code, 0);
    let file = std::env::temp_dir().join(format!("warden-token-{}", std::process::id()));
    std::fs::write(&file, "tok-123\n").unwrap();
    let (code, _, _) = cli(addr, &["ring", "--token-file", file.to_str().unwrap()], &[]).await;
    assert_eq!(code, 0);
    node.shutdown().await.unwrap();
}

/// TLS on the gRPC port (rustls), used from the CLI with a CA certificate.
#[tokio::test]
async fn tls_on_the_grpc_port_works_from_the_cli() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key, ca) = (dir.join("cert.pem"), dir.join("key.pem"), dir.join("ca.pem"));
    // A CA and a leaf certificate it signs (rustls rejects a CA certificate used as the leaf).
    std::fs::write(dir.join("leaf.ext"), "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
        .unwrap();
    let sh = format!(
        "set -e; cd {d}; EC='-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes'
         openssl req -x509 $EC -days 1 -subj /CN=warden-test-ca -keyout ca.key -out ca.pem 2>/dev/null
         openssl req $EC -subj /CN=localhost -keyout key.pem -out leaf.csr 2>/dev/null
         openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 -extfile leaf.ext -out cert.pem 2>/dev/null",
        d = dir.display()
    );
    let out = std::process::Command::new("sh").arg("-c").arg(&sh).output().expect("openssl runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let db = TestDb::new().await;
    let node = node_on(&db.url, "n1").await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let stop = CancellationToken::new();
    let tls = api::Tls { cert_pem: std::fs::read(&cert).unwrap(), key_pem: std::fs::read(&key).unwrap() };
    let server = api::serve_with(listener, node.clone(), Auth::new(Some("t".into())), Some(tls), stop.clone());
    tokio::spawn(async move { server.await.expect("TLS server runs") });
    let run = |args: Vec<String>| async move {
        outcome(tokio::process::Command::new(CLI).args(&args).env_remove("WARDEN_API_TOKEN").output().await.unwrap())
    };
    let https = format!("https://127.0.0.1:{port}");
    let ca = ca.to_str().unwrap().to_string();
    let (code, out, err) = run(vec![
        "--endpoint".into(),
        https.clone(),
        "--ca-cert".into(),
        ca.clone(),
        "--tls-domain".into(),
        "localhost".into(),
        "--token".into(),
        "t".into(),
        "ring".into(),
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("16 partitions"), "{out}");
    let (code, _, err) =
        run(vec!["--endpoint".into(), https.clone(), "--token".into(), "t".into(), "ring".into()]).await;
    assert!(code == 1 && err.contains("needs --ca-cert"), "{err}");
    let (code, _, _) =
        run(vec!["--endpoint".into(), format!("http://127.0.0.1:{port}"), "--token".into(), "t".into(), "ring".into()])
            .await;
    assert_ne!(code, 0, "plain HTTP/2 to a TLS port fails");
    stop.cancel();
    node.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_cli_pages_a_jobs_attempts() {
    let db = TestDb::new().await;
    let node = node_on(&db.url, "n1").await;
    let (addr, _stop) = serve(&node, None).await;
    let (code, out, err) = cli(
        addr,
        &["jobs", "enqueue", "paged", "audit", "--args", r#"{"seq": 1}"#, "--delay-ms", "3600000", "--json"],
        &[],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let id = serde_json::from_str::<serde_json::Value>(&out).unwrap()["id"].as_i64().unwrap();
    sqlx::query(
        "INSERT INTO warden.attempts (job_id, account, partition, attempt, node, epoch, started_at, finished_at, outcome)
         SELECT $1, 'paged', 0, g, 'n1/1', 1, now(), now(), 'snoozed' FROM generate_series(1, 12) g",
    )
    .bind(id)
    .execute(&db.pool)
    .await
    .unwrap();
    let (code, out, err) = cli(addr, &["jobs", "get", &id.to_string(), "--attempts-limit", "5"], &[]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("more attempts: --attempts-page-token"), "{out}");
    node.shutdown().await.unwrap();
}

/// Issue 15: `jobs get` shows a running long job's progress line, `jobs list --running`
/// its running time, heartbeat age and progress; `--json` carries the fields.
#[tokio::test]
async fn the_cli_shows_a_long_jobs_progress() {
    let db = TestDb::new().await;
    let node = long_import_node(&db.url, "n1").await;
    let (addr, _stop) = serve(&node, None).await;
    let args = long_import_args(60).to_string();
    let (code, out, err) =
        cli(addr, &["jobs", "enqueue", "importer", "long_import", "--args", &args, "--json"], &[]).await;
    assert_eq!(code, 0, "{err}");
    let id = serde_json::from_str::<serde_json::Value>(&out).unwrap()["id"].as_i64().unwrap().to_string();
    let got = eventually(Duration::from_secs(20), "a progress line with a checkpoint", || async {
        let (code, out, _) = cli(addr, &["jobs", "get", &id], &[]).await;
        (code == 0 && out.lines().any(|l| l.starts_with("progress") && l.contains("checkpoint"))).then_some(out)
    })
    .await;
    let line = got.lines().find(|l| l.starts_with("progress   ")).unwrap();
    // e.g. `progress   3.5%  row 210/6000 · heartbeat 0.0s ago (n1, attempt 1) · checkpoint 0.1s ago (attempt 1, 15 B)`
    let (figures, rest) = line["progress   ".len()..].split_once(" · ").unwrap();
    assert!(figures.contains("%  row ") && figures.ends_with("/6000"), "{line}");
    assert!(rest.starts_with("heartbeat ") && rest.contains("s ago (n1, attempt 1) · "), "{line}");
    assert!(rest.contains("· checkpoint ") && rest.contains("(attempt 1, ") && rest.ends_with(" B)"), "{line}");
    assert!(got.lines().any(|l| l.starts_with("running    ")), "{got}");

    let (code, out, _) = cli(addr, &["jobs", "list", "--running"], &[]).await;
    assert_eq!(code, 0);
    let mut lines = out.lines();
    let header = lines.next().unwrap();
    for column in ["ID", "ACCOUNT", "KIND", "ATTEMPT", "RUNNING", "HEARTBEAT", "NODE", "PROGRESS"] {
        assert!(header.contains(column), "{out}");
    }
    let row = lines.next().unwrap();
    assert!(row.starts_with(&id) && row.contains("importer") && row.contains("1/10") && row.contains("% "), "{out}");
    assert!(lines.next().is_none(), "only the long job runs: {out}");
    let (code, out, _) = cli(addr, &["jobs", "list", "--running", "--json"], &[]).await;
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let p = &v["jobs"][0]["progress"];
    assert!(p["percent"].as_f64().unwrap() > 0.0 && p["checkpoint_bytes"].as_i64().unwrap() > 0, "{v}");
    assert!(p["heartbeat_age_ms"].as_i64().unwrap() >= 0 && v["read_at_unix_ms"].as_i64().unwrap() > 0, "{v}");
    assert!(v["jobs"][0]["attempted_at_unix_ms"].as_i64().unwrap() > 0, "{v}");
    let (code, out, _) = cli(addr, &["jobs", "get", &id, "--json"], &[]).await;
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["job"]["progress"]["checkpoint_attempt"], 1, "{v}");
    let (code, _, err) = cli(addr, &["jobs", "list", "--running", "--state", "completed"], &[]).await;
    assert_eq!(code, 2, "--running and --state conflict: {err}");
    let (code, _, _) = cli(addr, &["jobs", "cancel", &id], &[]).await;
    assert_eq!(code, 0);
    node.shutdown().await.unwrap();
}

/// Run `warden schema …` against `url`.
async fn schema(url: &str, args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(CLI)
        .arg("schema")
        .args(args)
        .env("DATABASE_URL", url)
        .env_remove("WARDEN_PARTITIONS")
        .output()
        .await
        .unwrap();
    outcome(out)
}

#[tokio::test]
async fn schema_setup_and_reset_without_a_node() {
    let db = TestDb::new().await;
    let (code, out, err) = schema(&db.url, &["setup", "--partitions", "32"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("32 partitions"), "{out}");
    let leases: i64 = sqlx::query_scalar("SELECT count(*) FROM warden.leases").fetch_one(&db.pool).await.unwrap();
    assert_eq!(leases, 32);
    // Idempotent; a different P is refused with the stored one named.
    assert_eq!(schema(&db.url, &["setup", "--partitions", "32"]).await.0, 0);
    let (code, _, err) = schema(&db.url, &["setup", "--partitions", "64"]).await;
    assert!(code == 4 && err.contains("32"), "{code} {err}");
    let (code, out, _) = schema(&db.url, &["status", "--json"]).await;
    assert_eq!(code, 0);
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["applied"], status["binary"]);

    // A running node (it holds leases) makes reset refuse; --yes is required.
    let node =
        warden::Node::builder(warden_tests::fast_node_config("n1", 32)).start(db.node_pool().await).await.unwrap();
    let (code, _, err) = schema(&db.url, &["reset"]).await;
    assert!(code == 4 && err.contains("--yes"), "{err}");
    let (code, _, err) = schema(&db.url, &["reset", "--yes"]).await;
    assert!(code == 7 && err.contains("a node is running"), "{code} {err}");
    node.shutdown().await.unwrap();
    // Released leases are not live: the reset goes through and drops everything.
    let (code, out, err) = schema(&db.url, &["reset", "--yes"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("dropped Warden's schema"), "{out}");
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'warden')")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(!exists);
    // Reset of nothing is fine; set-up again works.
    assert_eq!(schema(&db.url, &["reset", "--yes"]).await.0, 0);
    assert_eq!(schema(&db.url, &["setup", "--partitions", "16"]).await.0, 0);
}

/// Issue 14, item 4: `warden schedules create | list | get | pause | resume | trigger |
/// backfill | delete` against a node, human output (next fire, last fire, totals) and
/// `--json`; bad input gets the engine's message and exit code 4, an unknown schedule
/// exit code 3; `jobs enqueue --idempotency-key` enqueues once per key.
#[tokio::test]
async fn cli_manages_schedules() {
    let db = TestDb::new().await;
    let node = node_on(&db.url, "n1").await;
    let (addr, _stop) = serve(&node, None).await;
    let (code, out, err) = cli(
        addr,
        &[
            "schedules",
            "create",
            "acct-s",
            "nightly",
            "--cron",
            "0 3 * * *",
            "--zone",
            "Europe/Berlin",
            "--kind",
            "report",
            "--args",
            r#"{"k": 1}"#,
            "--overlap",
            "buffer_one",
            "--catchup-window",
            "10m",
            "--catchup",
            "latest",
        ],
        &[],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("schedule acct-s / nightly  active  (id "), "{out}");
    assert!(out.contains("timing     cron \"0 3 * * *\" in Europe/Berlin"), "{out}");
    assert!(out.contains("policies   overlap buffer_one · catch-up latest within 10m 0s"), "{out}");
    assert!(out.contains("next fire  20") && out.contains("last fire  never"), "{out}");
    assert!(out.contains("fires      0 enqueued · 0 skipped · 0 missed"), "{out}");
    let (code, _, err) =
        cli(addr, &["schedules", "create", "acct-s", "beat", "--every", "30s", "--kind", "report"], &[]).await;
    assert_eq!(code, 0, "{err}");

    let (code, out, _) = cli(addr, &["schedules", "list"], &[]).await;
    assert_eq!(code, 0);
    let header = out.lines().next().unwrap();
    for column in ["ACCOUNT", "NAME", "TIMING", "ZONE", "KIND", "NEXT FIRE", "LAST FIRE", "FIRES", "SKIPPED", "MISSED"]
    {
        assert!(header.contains(column), "{out}");
    }
    assert!(out.contains("every 30s") && out.contains("cron \"0 3 * * *\""), "{out}");
    let (code, out, _) = cli(addr, &["schedules", "list", "--account", "acct-s", "--limit", "1", "--json"], &[]).await;
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["schedules"][0]["name"], "nightly");
    assert_eq!(v["schedules"][0]["catchup_window_ms"], 600_000);
    assert!(v["schedules"][0]["next_fire_at_unix_ms"].as_i64().unwrap() > 0);
    assert!(!v["next_page_token"].as_str().unwrap().is_empty(), "{v}");

    let (code, out, _) = cli(addr, &["schedules", "pause", "acct-s", "nightly"], &[]).await;
    assert!(code == 0 && out.contains("  paused  ") && out.contains("next fire  paused (was 20"), "{out}");
    let (code, out, _) = cli(addr, &["schedules", "resume", "acct-s", "nightly"], &[]).await;
    assert!(code == 0 && out.contains("  active  "), "{out}");
    let (code, out, _) = cli(addr, &["schedules", "trigger", "acct-s", "nightly", "--json"], &[]).await;
    assert_eq!(code, 0);
    let job = serde_json::from_str::<serde_json::Value>(&out).unwrap()["job_id"].as_i64().unwrap();
    let (code, out, _) = cli(
        addr,
        &[
            "schedules",
            "backfill",
            "acct-s",
            "nightly",
            "--from",
            "2026-01-01T00:00:00Z",
            "--to",
            "2026-01-02T12:00:00Z",
        ],
        &[],
    )
    .await;
    assert!(code == 0 && out.contains("2 job(s) enqueued for the range, 0 nominal time(s) already fired"), "{out}");
    let (code, out, _) = cli(addr, &["schedules", "get", "acct-s", "nightly"], &[]).await;
    assert_eq!(code, 0);
    assert!(out.contains("fires      3 enqueued · 0 skipped · 0 missed"), "{out}");
    let (_, json, _) = cli(addr, &["schedules", "get", "acct-s", "nightly", "--json"], &[]).await;
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let last = v["last_job_id"].as_i64().unwrap();
    assert!(last > job && v["fires_total"] == 3 && v["last_fired_at_unix_ms"].as_i64().unwrap() > 0, "{v}");
    assert!(out.contains("last fire  20") && out.contains(&format!(" (job {last})")), "{out}");
    let (code, out, _) = cli(addr, &["schedules", "delete", "acct-s", "nightly"], &[]).await;
    assert!(code == 0 && out.contains("deleted"), "{out}");

    // Errors.
    let (code, _, err) = cli(addr, &["schedules", "get", "acct-s", "nightly"], &[]).await;
    assert_eq!((code, err.trim()), (3, "error: no schedule \"nightly\" for account \"acct-s\""));
    let create = |timing: &'static [&'static str]| {
        let mut a = vec!["schedules", "create", "acct-s", "bad", "--kind", "report"];
        a.extend_from_slice(timing);
        a
    };
    for (args, expected) in [
        (create(&["--cron", "61 * * * *"]), "minute"),
        (create(&["--cron", "0 3 * * *", "--zone", "Mars/Olympus"]), "unknown time zone \"Mars/Olympus\""),
        (create(&["--every", "100ms"]), "interval"),
        (create(&["--cron", "* * * * *", "--overlap", "allow"]), "Unordered"),
    ] {
        let (code, _, err) = cli(addr, &args, &[]).await;
        assert!(code == 4 && err.contains(expected), "{args:?}: {code} {err}");
    }
    for args in [
        create(&[]),
        create(&["--cron", "* * * * *", "--every", "1m"]),
        create(&["--every", "5 minutes"]),
        create(&["--cron", "* * * * *", "--start", "tomorrow"]),
    ] {
        let (code, _, err) = cli(addr, &args, &[]).await;
        assert_eq!(code, 2, "usage errors exit 2: {args:?}: {err}");
    }

    // Idempotency keys.
    let enqueue = ["jobs", "enqueue", "acct-s", "audit", "--args", r#"{"seq": 1}"#, "--idempotency-key", "ext-9"];
    let (code, first, err) = cli(addr, &enqueue, &[]).await;
    assert!(code == 0 && first.starts_with("enqueued job "), "{first} {err}");
    let (code, again, _) = cli(addr, &enqueue, &[]).await;
    let id = first.trim().trim_start_matches("enqueued job ");
    assert!(
        code == 0 && again.contains(&format!("job {id} was already enqueued with that idempotency key")),
        "{again}"
    );
    let (code, _, _) = cli(addr, &["jobs", "enqueue", "a", "audit", "--idempotency-keep", "1h"], &[]).await;
    assert_eq!(code, 2, "--idempotency-keep needs --idempotency-key");
    node.shutdown().await.unwrap();
}
