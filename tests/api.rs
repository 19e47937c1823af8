//! The gRPC API against real nodes and PostgreSQL: every RPC, bad input, limits,
//! NOT_FOUND / UNAVAILABLE / UNAUTHENTICATED, the ownership stream while nodes join
//! and leave. The `warden` CLI's own tests are in `runtime/cli/tests/cli.rs`.

use std::net::SocketAddr;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Code, Request};
use warden::api::{self, pb, Auth};
use warden_runtime::{Node, NodeConfig, PartitionCount};
use warden_tests::{
    audit_node as node_on, eventually, long_import_args, long_import_node, serve_api_of as serve, PrivatePg, TestDb,
};

fn config(id: &str) -> NodeConfig {
    warden_tests::fast_node_config(id, 16)
}

async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap()
}

fn job(account: &str, kind: &str, args: &str) -> pb::NewJob {
    pb::NewJob { account: account.into(), kind: kind.into(), args_json: args.into(), ..Default::default() }
}

#[tokio::test]
async fn job_service_end_to_end() {
    let db = TestDb::new().await;
    let node = node_on(&db.url, "n1").await;
    let (addr, _stop) = serve(&node, None).await;
    let mut jobs = pb::jobs_client::JobsClient::new(channel(addr).await);

    let a = jobs
        .enqueue(pb::EnqueueRequest { job: Some(job("acct", "audit", r#"{"seq": 1}"#)) })
        .await
        .unwrap()
        .into_inner();
    assert!(a.id > 0 && !a.duplicate);
    let batch = jobs
        .enqueue_batch(pb::EnqueueBatchRequest {
            jobs: vec![
                pb::NewJob { unique_key: "k1".into(), ..job("acct", "audit", r#"{"seq": 2}"#) },
                pb::NewJob { unique_key: "k1".into(), ..job("acct", "audit", r#"{"seq": 3}"#) },
                job("other", "nosuchkind", ""),
            ],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(batch.results.len(), 3);
    assert!(!batch.results[0].duplicate && batch.results[1].duplicate && batch.results[1].id == batch.results[0].id);
    let discarded = batch.results[2].id;

    // Get with attempts, once done.
    let got = eventually(Duration::from_secs(20), "job completed", || {
        let mut jobs = jobs.clone();
        async move {
            let r = jobs.get_job(pb::GetJobRequest { id: a.id, ..Default::default() }).await.unwrap().into_inner();
            (r.job.as_ref().unwrap().state == "completed").then_some(r)
        }
    })
    .await;
    assert_eq!(got.attempts.len(), 1);
    assert_eq!(got.attempts[0].outcome, "completed");
    assert!(got.attempts[0].node.starts_with("n1/"));

    // The unknown kind was discarded; an operator retries it (and it is discarded again).
    eventually(Duration::from_secs(20), "discarded", || {
        let mut jobs = jobs.clone();
        async move {
            (jobs
                .get_job(pb::GetJobRequest { id: discarded, ..Default::default() })
                .await
                .unwrap()
                .into_inner()
                .job
                .unwrap()
                .state
                == "discarded")
                .then_some(())
        }
    })
    .await;
    let retried = jobs.retry_job(pb::RetryJobRequest { id: discarded }).await.unwrap().into_inner().job.unwrap();
    assert_eq!(retried.state, "available");

    // Cancel a scheduled job.
    let later = jobs
        .enqueue(pb::EnqueueRequest {
            job: Some(pb::NewJob { delay_ms: 3_600_000, ..job("acct2", "audit", r#"{"seq": 1}"#) }),
        })
        .await
        .unwrap()
        .into_inner();
    let c = jobs.cancel_job(pb::CancelJobRequest { id: later.id }).await.unwrap().into_inner();
    assert_eq!((c.result.as_str(), c.state.as_str()), ("cancelled", "cancelled"));
    let c = jobs.cancel_job(pb::CancelJobRequest { id: later.id }).await.unwrap().into_inner();
    assert_eq!(c.result, "already_finished");

    // List with filters and pagination.
    let many: Vec<pb::NewJob> = (0..7).map(|i| job("paged", "audit", &format!(r#"{{"seq": {i}}}"#))).collect();
    jobs.enqueue_batch(pb::EnqueueBatchRequest { jobs: many }).await.unwrap();
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = jobs
            .list_jobs(pb::ListJobsRequest {
                account: "paged".into(),
                page_size: 3,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.jobs.len() <= 3);
        seen.extend(page.jobs.iter().map(|j| j.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen.len(), 7);
    assert!(seen.windows(2).all(|w| w[0] > w[1]), "newest first, no repeats: {seen:?}");
    let cancelled = jobs
        .list_jobs(pb::ListJobsRequest { state: "cancelled".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.jobs.iter().map(|j| j.id).collect::<Vec<_>>(), vec![later.id]);

    // Queue statistics.
    let stats = jobs.queue_stats(pb::QueueStatsRequest {}).await.unwrap().into_inner();
    assert_eq!(stats.by_state.get("cancelled"), Some(&1));
    assert!(stats.by_state.values().sum::<i64>() >= 11);
    node.shutdown().await.unwrap();
}

#[tokio::test]
async fn bad_input_and_missing_jobs_get_clear_statuses() {
    let db = TestDb::new().await;
    let node = node_on(&db.url, "n1").await;
    let (addr, _stop) = serve(&node, None).await;
    let mut jobs = pb::jobs_client::JobsClient::new(channel(addr).await);
    let mut cluster = pb::cluster_client::ClusterClient::new(channel(addr).await);

    let cases: Vec<(pb::NewJob, &str)> = vec![
        (job("", "audit", ""), "account must not be empty"),
        (job("a\u{1}", "audit", ""), "control character"),
        (job(&"x".repeat(300), "audit", ""), "account is 300 bytes"),
        (job("a", "", ""), "kind must not be empty"),
        (job("a", "audit", "{not json"), "args_json is not valid JSON"),
        (job("a", "audit", &format!(r#"{{"x": "{}"}}"#, "y".repeat(70_000))), "limit is 65536"),
        (pb::NewJob { lane: "sideways".into(), ..job("a", "audit", "") }, "lane must be serial or unordered"),
        (pb::NewJob { max_attempts: -1, ..job("a", "audit", "") }, "max_attempts"),
        (pb::NewJob { priority: 1 << 20, ..job("a", "audit", "") }, "priority"),
        // Times the database would store but Rust could not decode (issue 10 §2), and
        // the other limits every entry shares with the SQL function.
        (pb::NewJob { run_at_unix_ms: i64::MAX, ..job("a", "audit", "") }, "run_at"),
        (pb::NewJob { run_at_unix_ms: -1, ..job("a", "audit", "") }, "run_at must be between"),
        (pb::NewJob { run_at_unix_ms: 4_102_444_800_000 * 10, ..job("a", "audit", "") }, "run_at"),
        (pb::NewJob { delay_ms: u64::MAX, ..job("a", "audit", "") }, "delay must be at most"),
        (pb::NewJob { timeout_ms: 86_400_001, ..job("a", "audit", "") }, "timeout"),
        (pb::NewJob { unique_key: "a\nb".into(), ..job("a", "audit", "") }, "unique_key contains a control"),
    ];
    for (j, expected) in cases {
        let s = jobs.enqueue(pb::EnqueueRequest { job: Some(j) }).await.unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
        assert!(s.message().contains(expected), "{:?} should mention {expected:?}", s.message());
    }
    let s = jobs.enqueue(pb::EnqueueRequest { job: None }).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    let too_many = (0..1001).map(|i| job(&format!("a{i}"), "audit", "")).collect();
    let s = jobs.enqueue_batch(pb::EnqueueBatchRequest { jobs: too_many }).await.unwrap_err();
    assert!(s.code() == Code::InvalidArgument && s.message().contains("limit is 1000"), "{s:?}");
    let s = jobs
        .enqueue_batch(pb::EnqueueBatchRequest { jobs: vec![job("ok", "audit", ""), job("", "audit", "")] })
        .await
        .unwrap_err();
    assert!(s.message().starts_with("jobs[1]:"), "{s:?}");
    let s = jobs.list_jobs(pb::ListJobsRequest { page_size: 501, ..Default::default() }).await.unwrap_err();
    assert!(s.code() == Code::InvalidArgument && s.message().contains("limit of 500"), "{s:?}");
    let s = jobs.list_jobs(pb::ListJobsRequest { page_token: "zzz".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    let s = jobs.list_jobs(pb::ListJobsRequest { state: "sleeping".into(), ..Default::default() }).await.unwrap_err();
    assert!(s.message().contains("unknown state"), "{s:?}");
    let s = jobs.get_job(pb::GetJobRequest { id: 0, ..Default::default() }).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    for s in [
        jobs.get_job(pb::GetJobRequest { id: 424242, ..Default::default() }).await.unwrap_err(),
        jobs.cancel_job(pb::CancelJobRequest { id: 424242 }).await.unwrap_err(),
        jobs.retry_job(pb::RetryJobRequest { id: 424242 }).await.unwrap_err(),
    ] {
        assert_eq!(s.code(), Code::NotFound, "{s:?}");
        assert_eq!(s.message(), "job 424242 not found");
    }
    let s = cluster.locate(pb::LocateRequest { account: String::new() }).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    // Nothing of the above reached the database.
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM warden.jobs").fetch_one(&db.pool).await.unwrap();
    assert_eq!(n, 0);
    node.shutdown().await.unwrap();
}

fn nightly(account: &str, name: &str) -> pb::ScheduleDefinition {
    pb::ScheduleDefinition {
        account: account.into(),
        name: name.into(),
        cron: "0 3 * * *".into(),
        zone: "Europe/Berlin".into(),
        kind: "report".into(),
        args_json: r#"{"k": 1}"#.into(),
        ..Default::default()
    }
}

fn at(s: &str) -> i64 {
    s.parse::<chrono::DateTime<chrono::Utc>>().unwrap().timestamp_millis()
}

/// Issue 14, item 4 and 5 over gRPC: create, read, list in pages, pause, resume,
/// trigger, backfill and delete a schedule; its next and last fire and totals are in
/// every answer; bad definitions get the engine's message as INVALID_ARGUMENT, unknown
/// schedules NOT_FOUND.
#[tokio::test]
async fn schedules_are_managed_over_grpc() {
    let db = TestDb::new().await;
    let node = node_on(&db.url, "n1").await;
    let (addr, _stop) = serve(&node, None).await;
    let mut sch = pb::schedules_client::SchedulesClient::new(channel(addr).await);
    let mut jobs = pb::jobs_client::JobsClient::new(channel(addr).await);
    let r = |a: &str, n: &str| pb::ScheduleRef { account: a.into(), name: n.into() };

    let put = |d: pb::ScheduleDefinition| pb::PutScheduleRequest { schedule: Some(d) };
    let mut def = nightly("acct", "nightly");
    def.overlap = "buffer_one".into();
    def.catchup = "latest".into();
    def.catchup_window_ms = Some(600_000);
    let now = chrono::Utc::now().timestamp_millis();
    let s = sch.put_schedule(put(def.clone())).await.unwrap().into_inner().schedule.unwrap();
    let got = s.definition.clone().unwrap();
    assert_eq!(got, pb::ScheduleDefinition { lane: "serial".into(), args_json: r#"{"k":1}"#.into(), ..def.clone() });
    assert!((s.id > 0, s.paused, s.source.as_str(), s.revision) == (true, false, "runtime", 0), "{s:?}");
    assert!(s.next_nominal_unix_ms > now && s.next_nominal_unix_ms - now <= 86_400_000, "{s:?}");
    assert_eq!(s.next_fire_at_unix_ms, s.next_nominal_unix_ms, "no jitter");
    // 03:00 in Berlin is 01:00 or 02:00 UTC.
    let hour = chrono::DateTime::from_timestamp_millis(s.next_nominal_unix_ms).unwrap().format("%H:%M").to_string();
    assert!(hour == "01:00" || hour == "02:00", "{hour}");
    assert_eq!((s.last_fired_at_unix_ms, s.last_job_id, s.fires_total, s.missed_total), (0, 0, 0, 0));

    let every = pb::ScheduleDefinition {
        cron: String::new(),
        every_ms: 30_000,
        anchor_unix_ms: 7_000,
        zone: String::new(),
        ..nightly("acct", "half-minutely")
    };
    let e = sch.put_schedule(put(every)).await.unwrap().into_inner().schedule.unwrap();
    assert_eq!((e.next_nominal_unix_ms - 7_000) % 30_000, 0, "anchored: {e:?}");
    assert_eq!(e.definition.as_ref().unwrap().zone, "UTC");
    sch.put_schedule(put(nightly("other", "nightly"))).await.unwrap();

    // Get; list in pages, of all accounts or one.
    let g = sch.get_schedule(r("acct", "nightly")).await.unwrap().into_inner().schedule.unwrap();
    assert_eq!(g, s);
    let page = |account: &str, size: u32, token: &str| pb::ListSchedulesRequest {
        account: account.into(),
        page_size: size,
        page_token: token.into(),
    };
    let p1 = sch.list_schedules(page("", 2, "")).await.unwrap().into_inner();
    assert_eq!(p1.schedules.len(), 2);
    assert!(!p1.next_page_token.is_empty());
    let p2 = sch.list_schedules(page("", 2, &p1.next_page_token)).await.unwrap().into_inner();
    assert_eq!((p2.schedules.len(), p2.next_page_token.as_str()), (1, ""), "{p2:?}");
    let mine = sch.list_schedules(page("acct", 0, "")).await.unwrap().into_inner();
    let names: Vec<_> = mine.schedules.iter().map(|s| s.definition.as_ref().unwrap().name.clone()).collect();
    assert_eq!((names, mine.next_page_token.as_str()), (vec!["nightly".to_string(), "half-minutely".into()], ""));

    // Pause, resume.
    let p = sch.pause_schedule(r("acct", "nightly")).await.unwrap().into_inner().schedule.unwrap();
    assert!(p.paused);
    let q = sch.resume_schedule(r("acct", "nightly")).await.unwrap().into_inner().schedule.unwrap();
    assert!(!q.paused && q.next_nominal_unix_ms == s.next_nominal_unix_ms, "{q:?}");

    // Trigger: one job now, recorded as the last fire.
    let job_id = sch.trigger_schedule(r("acct", "nightly")).await.unwrap().into_inner().job_id;
    let j = jobs.get_job(pb::GetJobRequest { id: job_id, ..Default::default() }).await.unwrap().into_inner();
    let j = j.job.unwrap();
    assert_eq!((j.account.as_str(), j.kind.as_str(), j.args_json.as_str()), ("acct", "report", r#"{"k":1}"#));
    let t = sch.get_schedule(r("acct", "nightly")).await.unwrap().into_inner().schedule.unwrap();
    assert_eq!((t.fires_total, t.last_job_id), (1, job_id));
    assert!(t.last_fired_at_unix_ms >= now, "{t:?}");
    assert_eq!(t.next_nominal_unix_ms, s.next_nominal_unix_ms, "a trigger is outside the timing");

    // Backfill three nights (02:00 UTC in winter), then again: nothing new.
    let backfill = |from: &str, to: &str| pb::BackfillScheduleRequest {
        account: "acct".into(),
        name: "nightly".into(),
        from_unix_ms: at(from),
        to_unix_ms: at(to),
    };
    let b = sch.backfill_schedule(backfill("2026-01-01T00:00:00Z", "2026-01-03T23:00:00Z")).await.unwrap().into_inner();
    assert_eq!((b.job_ids.len(), b.already_fired), (3, 0), "{b:?}");
    let again = sch.backfill_schedule(backfill("2026-01-01T00:00:00Z", "2026-01-04T01:00:00Z")).await.unwrap();
    assert_eq!((again.get_ref().job_ids.len(), again.get_ref().already_fired), (0, 3));
    let nominals: Vec<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT nominal_at FROM warden.schedule_fires WHERE via = 'backfill' ORDER BY nominal_at")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        nominals.iter().map(|n| n.timestamp_millis()).collect::<Vec<_>>(),
        vec![at("2026-01-01T02:00:00Z"), at("2026-01-02T02:00:00Z"), at("2026-01-03T02:00:00Z")]
    );
    let t = sch.get_schedule(r("acct", "nightly")).await.unwrap().into_inner().schedule.unwrap();
    assert_eq!((t.fires_total, t.last_job_id), (4, *b.job_ids.last().unwrap()));

    // Delete; its jobs stay.
    sch.delete_schedule(r("acct", "nightly")).await.unwrap();
    let n: i64 =
        sqlx::query_scalar("SELECT count(*) FROM warden.jobs WHERE kind = 'report'").fetch_one(&db.pool).await.unwrap();
    assert_eq!(n, 4);

    // Unknown schedules: NOT_FOUND, naming it.
    for s in [
        sch.get_schedule(r("acct", "nightly")).await.unwrap_err(),
        sch.delete_schedule(r("acct", "nightly")).await.unwrap_err(),
        sch.pause_schedule(r("acct", "nope")).await.unwrap_err(),
        sch.resume_schedule(r("acct", "nope")).await.unwrap_err(),
        sch.trigger_schedule(r("acct", "nope")).await.unwrap_err(),
        sch.backfill_schedule(pb::BackfillScheduleRequest {
            name: "nope".into(),
            ..backfill("2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z")
        })
        .await
        .unwrap_err(),
    ] {
        assert_eq!(s.code(), Code::NotFound, "{s:?}");
        assert!(s.message().starts_with("no schedule \"n"), "{s:?}");
    }

    // Bad definitions: the engine's message, as INVALID_ARGUMENT, nothing stored.
    let bad: Vec<(pb::ScheduleDefinition, &str)> = vec![
        (pb::ScheduleDefinition { cron: "61 * * * *".into(), ..nightly("a", "b") }, "minute"),
        (pb::ScheduleDefinition { cron: "every day".into(), ..nightly("a", "b") }, "cron"),
        (pb::ScheduleDefinition { zone: "Mars/Olympus".into(), ..nightly("a", "b") }, "unknown time zone"),
        (pb::ScheduleDefinition { cron: String::new(), every_ms: 10, ..nightly("a", "b") }, "interval"),
        (pb::ScheduleDefinition { every_ms: 60_000, ..nightly("a", "b") }, "not both"),
        (pb::ScheduleDefinition { cron: String::new(), ..nightly("a", "b") }, "needs a timing"),
        (pb::ScheduleDefinition { anchor_unix_ms: 5, ..nightly("a", "b") }, "anchor_unix_ms"),
        (pb::ScheduleDefinition { overlap: "sometimes".into(), ..nightly("a", "b") }, "overlap policy"),
        (pb::ScheduleDefinition { overlap: "allow".into(), ..nightly("a", "b") }, "Unordered"),
        (pb::ScheduleDefinition { catchup: "some".into(), ..nightly("a", "b") }, "catch-up mode"),
        (pb::ScheduleDefinition { catchup_window_ms: Some(400 * 86_400_000), ..nightly("a", "b") }, "catch-up window"),
        (pb::ScheduleDefinition { args_json: "{oops".into(), ..nightly("a", "b") }, "args_json is not valid JSON"),
        (pb::ScheduleDefinition { account: String::new(), ..nightly("a", "b") }, "account must not be empty"),
        (pb::ScheduleDefinition { name: "x".repeat(200), ..nightly("a", "b") }, "schedule name"),
        (pb::ScheduleDefinition { lane: "sideways".into(), ..nightly("a", "b") }, "lane"),
    ];
    for (d, expected) in bad {
        let s = sch.put_schedule(put(d)).await.unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
        assert!(s.message().contains(expected), "{:?} should mention {expected:?}", s.message());
    }
    let s = sch.put_schedule(pb::PutScheduleRequest { schedule: None }).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    let s = sch.backfill_schedule(backfill("2026-01-03T00:00:00Z", "2026-01-01T00:00:00Z")).await.unwrap_err();
    assert!(s.code() == Code::InvalidArgument && s.message().contains("empty"), "{s:?}");
    let s = sch
        .backfill_schedule(pb::BackfillScheduleRequest {
            from_unix_ms: 0,
            ..backfill("2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z")
        })
        .await
        .unwrap_err();
    assert!(s.code() == Code::InvalidArgument && s.message().contains("from_unix_ms is required"), "{s:?}");
    let s = sch.list_schedules(page("", 501, "")).await.unwrap_err();
    assert!(s.code() == Code::InvalidArgument && s.message().contains("limit of 500"), "{s:?}");
    assert_eq!(sch.list_schedules(page("", 0, "zzz")).await.unwrap_err().code(), Code::InvalidArgument);
    assert_eq!(sch.get_schedule(r("", "x")).await.unwrap_err().code(), Code::InvalidArgument);
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM warden.schedules WHERE account = 'a'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(n, 0);

    // A schedule declared in code cannot be changed here.
    sqlx::query("UPDATE warden.schedules SET source = 'code', revision = 3 WHERE account = 'other'")
        .execute(&db.pool)
        .await
        .unwrap();
    let s = sch.put_schedule(put(nightly("other", "nightly"))).await.unwrap_err();
    assert!(s.code() == Code::InvalidArgument && s.message().contains("declared in a node's code"), "{s:?}");
    node.shutdown().await.unwrap();
}

/// Issue 14, item 6 over gRPC: an idempotency key makes an enqueue exactly-once per key
/// for as long as the key is kept, even after its job finished.
#[tokio::test]
async fn enqueue_with_an_idempotency_key_over_grpc() {
    let db = TestDb::new().await;
    let node = node_on(&db.url, "n1").await;
    let (addr, _stop) = serve(&node, None).await;
    let mut jobs = pb::jobs_client::JobsClient::new(channel(addr).await);
    let keyed = |key: &str| pb::NewJob {
        idempotency_key: key.into(),
        idempotency_keep_ms: 3_600_000,
        ..job("acct", "audit", r#"{"seq": 1}"#)
    };
    let first = jobs.enqueue(pb::EnqueueRequest { job: Some(keyed("order-7")) }).await.unwrap().into_inner();
    assert!(!first.duplicate);
    eventually(Duration::from_secs(20), "first job completed", || {
        let mut jobs = jobs.clone();
        async move {
            let r = jobs.get_job(pb::GetJobRequest { id: first.id, ..Default::default() }).await.unwrap().into_inner();
            (r.job.unwrap().state == "completed").then_some(())
        }
    })
    .await;
    let again = jobs.enqueue(pb::EnqueueRequest { job: Some(keyed("order-7")) }).await.unwrap().into_inner();
    assert_eq!((again.id, again.duplicate), (first.id, true), "the key outlives its finished job");
    let batch = jobs
        .enqueue_batch(pb::EnqueueBatchRequest { jobs: vec![keyed("order-7"), keyed("order-8")] })
        .await
        .unwrap()
        .into_inner();
    assert!(batch.results[0].duplicate && batch.results[0].id == first.id && !batch.results[1].duplicate);
    for (j, expected) in [
        (pb::NewJob { unique_key: "u".into(), ..keyed("k") }, "not both"),
        (pb::NewJob { idempotency_keep_ms: 5, ..job("acct", "audit", "") }, "without an idempotency_key"),
        (pb::NewJob { idempotency_key: "a\nb".into(), ..job("acct", "audit", "") }, "idempotency_key"),
    ] {
        let s = jobs.enqueue(pb::EnqueueRequest { job: Some(j) }).await.unwrap_err();
        assert!(s.code() == Code::InvalidArgument && s.message().contains(expected), "{s:?}");
    }
    node.shutdown().await.unwrap();
}

#[tokio::test]
async fn cluster_service_answers_from_the_lease_table() {
    let db = TestDb::new().await;
    let node = node_on(&db.url, "n1").await;
    let (addr, _stop) = serve(&node, None).await;
    let mut cluster = pb::cluster_client::ClusterClient::new(channel(addr).await);
    let a = cluster.get_assignment(pb::GetAssignmentRequest {}).await.unwrap().into_inner();
    assert_eq!(a.partitions, 16);
    assert!(a
        .assignment
        .iter()
        .all(|p| p.actual_owner == "n1" && p.desired_owner == "n1" && p.handoff == "stable" && p.epoch == 1));
    let m = cluster.list_members(pb::ListMembersRequest {}).await.unwrap().into_inner();
    assert_eq!(m.members.len(), 1);
    assert_eq!((m.members[0].node_id.as_str(), m.members[0].partitions_held), ("n1", 16));
    let stats = cluster.node_stats(pb::NodeStatsRequest {}).await.unwrap().into_inner();
    assert!(stats.ready && stats.partitions_held == 16 && stats.node.starts_with("n1/"));
    let mut jobs = pb::jobs_client::JobsClient::new(channel(addr).await);
    jobs.enqueue(pb::EnqueueRequest {
        job: Some(pb::NewJob { delay_ms: 60_000, ..job("acct-9", "audit", r#"{"seq":1}"#) }),
    })
    .await
    .unwrap();
    let l = cluster.locate(pb::LocateRequest { account: "acct-9".into() }).await.unwrap().into_inner();
    assert_eq!(l.partition, warden_runtime::partition_of("acct-9", PartitionCount::new(16).unwrap()));
    assert_eq!((l.actual_owner.as_str(), l.epoch, l.answered_by_owner, l.unfinished_jobs), ("n1", 1, true, 1));
    assert_eq!(l.next_due_job.unwrap().state, "scheduled");
    // A lease taken over behind the node's back shows up as the truth.
    sqlx::query("UPDATE warden.leases SET owner_node = 'intruder/1', epoch = epoch + 1 WHERE partition = 0")
        .execute(&db.pool)
        .await
        .unwrap();
    let a = cluster.get_assignment(pb::GetAssignmentRequest {}).await.unwrap().into_inner();
    let p0 = &a.assignment[0];
    assert_eq!(
        (p0.actual_owner.as_str(), p0.desired_owner.as_str(), p0.handoff.as_str()),
        ("intruder", "n1", "moving")
    );
    let m = cluster.list_members(pb::ListMembersRequest {}).await.unwrap().into_inner();
    assert_eq!(m.lease_holders_not_in_gossip, vec!["intruder".to_string()]);
    node.shutdown().await.unwrap();
}

#[tokio::test]
async fn bearer_token_is_required_when_configured() {
    let db = TestDb::new().await;
    let node = node_on(&db.url, "n1").await;
    let (addr, _stop) = serve(&node, Some("s3cret")).await;
    let mut cluster = pb::cluster_client::ClusterClient::new(channel(addr).await);
    let s = cluster.node_stats(pb::NodeStatsRequest {}).await.unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated);
    let mut wrong = Request::new(pb::NodeStatsRequest {});
    wrong.metadata_mut().insert("authorization", "Bearer nope".parse().unwrap());
    assert_eq!(cluster.node_stats(wrong).await.unwrap_err().code(), Code::Unauthenticated);
    let mut right = Request::new(pb::NodeStatsRequest {});
    right.metadata_mut().insert("authorization", "Bearer s3cret".parse().unwrap());
    assert!(cluster.node_stats(right).await.is_ok());
    let mut schedules = pb::schedules_client::SchedulesClient::new(channel(addr).await);
    let s = schedules.list_schedules(pb::ListSchedulesRequest::default()).await.unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated, "the schedules service is guarded too");
    node.shutdown().await.unwrap();
}

#[tokio::test]
async fn database_down_is_unavailable_without_internal_detail() {
    let pg = PrivatePg::start();
    let node = node_on(&pg.url(), "n1").await;
    let (addr, _stop) = serve(&node, None).await;
    let mut jobs = pb::jobs_client::JobsClient::new(channel(addr).await);
    pg.stop();
    let s = jobs.get_job(pb::GetJobRequest { id: 1, ..Default::default() }).await.unwrap_err();
    assert_eq!(s.code(), Code::Unavailable, "{s:?}");
    assert_eq!(s.message(), "database unavailable, try again");
    pg.restart();
    let _ = tokio::time::timeout(Duration::from_secs(10), node.shutdown()).await;
}

/// Python stubs generated from proto/ by grpcio-tools (installed into the cargo target
/// dir on first use), talking to a node: the schema alone is enough to use the API.
#[tokio::test]
async fn a_python_client_generated_from_the_proto_works() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let deps = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("pydeps");
    let py = |args: &[&str]| {
        std::process::Command::new("python3").args(args).env("PYTHONPATH", &deps).output().expect("python3 runs")
    };
    if !py(&["-c", "import grpc_tools, grpc"]).status.success() {
        let out = std::process::Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--target"])
            .arg(&deps)
            .arg("grpcio-tools==1.85.1")
            .output()
            .expect("pip runs");
        assert!(out.status.success(), "installing grpcio-tools failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let stubs = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("pystubs-{}", std::process::id()));
    std::fs::create_dir_all(&stubs).unwrap();
    let proto_dir = root.join("proto");
    let gen = py(&[
        "-m",
        "grpc_tools.protoc",
        &format!("-I{}", proto_dir.display()),
        &format!("--python_out={}", stubs.display()),
        &format!("--grpc_python_out={}", stubs.display()),
        proto_dir.join("warden.proto").to_str().unwrap(),
    ]);
    assert!(gen.status.success(), "protoc failed: {}", String::from_utf8_lossy(&gen.stderr));

    let db = TestDb::new().await;
    let node = node_on(&db.url, "n1").await;
    let (addr, _stop) = serve(&node, None).await;
    // A job with recorded progress, written as a heartbeat and checkpoint would.
    let later = warden_runtime::NewJob::new("py-later", "audit", serde_json::json!({ "seq": 1 }))
        .unwrap()
        .delay(Duration::from_secs(3600));
    let with_progress = node.client().enqueue(later).await.unwrap().id;
    sqlx::query(
        "INSERT INTO warden.job_progress (job_id, attempt, epoch, node, heartbeat_at, progress_percent,
             progress_message, progress_details, checkpoint, checkpoint_at, checkpoint_attempt, checkpoint_bytes)
         VALUES ($1, 2, 1, 'n1/1', now(), 42.5, 'step 42', '{\"k\": 1}', '{\"next\": 42}', now(), 1, 12)",
    )
    .bind(with_progress)
    .execute(&db.pool)
    .await
    .unwrap();
    let script = root.join("tests/python/client.py");
    let out = tokio::process::Command::new("python3")
        .arg(&script)
        .arg(&stubs)
        .arg(addr.to_string())
        .arg(with_progress.to_string())
        .env("PYTHONPATH", &deps)
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "python client failed: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["state"], "completed", "{v}");
    assert_eq!(v["attempts"], 1);
    assert_eq!(v["partitions"], 16);
    assert_eq!(v["owners"], serde_json::json!(["n1"]));
    assert_eq!(v["missing"], "NOT_FOUND");
    assert!(v["invalid"].as_str().unwrap().starts_with("INVALID_ARGUMENT: account must not be empty"), "{v}");
    assert_eq!(v["completed_has_progress"], false, "{v}");
    assert_eq!(
        v["progress"],
        serde_json::json!({ "has_percent": true, "percent": 42.5, "message": "step 42", "details": { "k": 1 },
                            "attempt": 2, "checkpoint_attempt": 1, "checkpoint_bytes": 12, "ages_ok": true }),
        "{v}"
    );
    assert_eq!(
        v["schedule"],
        serde_json::json!({ "names": ["nightly"], "window": 600000, "has_window": true, "next_after_now": true,
                            "bad_zone": "INVALID_ARGUMENT: unknown time zone \"Mars/Olympus\"",
                            "missing": "NOT_FOUND", "idempotent": true }),
        "{v}"
    );
    node.shutdown().await.unwrap();
}

/// Issue 15, visible progress: a running long job's heartbeat, progress and checkpoint
/// are in `GetJob` and `ListJobs` (ages on the database clock); `state=running` lists it
/// on the first page however many newer jobs there are (past the newest-rows window);
/// jobs that never heartbeated carry no progress; a cancel reaches the heartbeating
/// handler and the last progress stays readable.
#[tokio::test]
async fn a_running_long_jobs_progress_is_in_get_and_list() {
    let db = TestDb::new().await;
    let node = long_import_node(&db.url, "n1").await;
    let (addr, _stop) = serve(&node, None).await;
    let mut jobs = pb::jobs_client::JobsClient::new(channel(addr).await);
    let args = long_import_args(60).to_string();
    let long = jobs.enqueue(pb::EnqueueRequest { job: Some(job("importer", "long_import", &args)) }).await.unwrap();
    let id = long.into_inner().id;
    let got = eventually(Duration::from_secs(20), "progress with a checkpoint", || {
        let mut jobs = jobs.clone();
        async move {
            let r = jobs.get_job(pb::GetJobRequest { id, ..Default::default() }).await.unwrap().into_inner();
            let p = r.job.as_ref()?.progress.as_ref()?;
            (p.checkpoint_at_unix_ms != 0 && p.percent.unwrap_or(0.0) > 0.0).then_some(r)
        }
    })
    .await;
    let j = got.job.unwrap();
    let p = j.progress.unwrap();
    assert_eq!((j.state.as_str(), p.attempt, p.checkpoint_attempt), ("running", 1, 1), "{p:?}");
    assert!(p.node.starts_with("n1/"), "{p:?}");
    assert!(p.message.starts_with("row ") && p.message.ends_with("/6000"), "{p:?}");
    assert!(p.percent.unwrap() < 100.0);
    let cursor: serde_json::Value = serde_json::json!({ "next_row": 0 });
    assert!(p.checkpoint_bytes as usize >= cursor.to_string().len(), "{p:?}");
    assert!(got.read_at_unix_ms >= p.heartbeat_at_unix_ms && got.read_at_unix_ms >= p.checkpoint_at_unix_ms);
    assert_eq!(p.heartbeat_age_ms, got.read_at_unix_ms - p.heartbeat_at_unix_ms, "ages against read_at");
    assert!(p.heartbeat_age_ms < 5_000, "heartbeats every 50 ms: {p:?}");
    assert!(j.attempted_at_unix_ms > 0 && j.attempted_at_unix_ms <= got.read_at_unix_ms);

    // Newer jobs than the list window holds: `state=running` still finds the long job
    // on its first page, read through the running jobs' index.
    let client = node.client();
    let newer: Vec<warden_runtime::NewJob> = (0..warden_runtime::store::LIST_SCAN_WINDOW + 100)
        .map(|i| {
            warden_runtime::NewJob::new(format!("later-{i}"), "audit", serde_json::json!({ "seq": 1 }))
                .unwrap()
                .delay(Duration::from_secs(3600))
        })
        .collect();
    client.enqueue_many(&newer).await.unwrap();
    let running = jobs
        .list_jobs(pb::ListJobsRequest { state: "running".into(), page_size: 10, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(running.jobs.iter().map(|j| j.id).collect::<Vec<_>>(), vec![id], "{running:?}");
    assert!(running.next_page_token.is_empty());
    assert!(running.read_at_unix_ms > 0);
    let listed = running.jobs[0].progress.as_ref().expect("a running long job lists its progress");
    assert_eq!(listed.heartbeat_age_ms, running.read_at_unix_ms - listed.heartbeat_at_unix_ms);
    let of_kind = jobs
        .list_jobs(pb::ListJobsRequest { state: "running".into(), kind: "audit".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert!(of_kind.jobs.is_empty(), "filters apply to running jobs too");
    let newest = jobs.list_jobs(pb::ListJobsRequest { page_size: 5, ..Default::default() }).await.unwrap().into_inner();
    assert!(newest.jobs.iter().all(|j| j.progress.is_none()), "never heartbeated: no progress");

    // A cancel reaches the heartbeating handler; the last progress stays readable.
    jobs.cancel_job(pb::CancelJobRequest { id }).await.unwrap();
    let done = eventually(Duration::from_secs(20), "cancelled", || {
        let mut jobs = jobs.clone();
        async move {
            let r = jobs.get_job(pb::GetJobRequest { id, ..Default::default() }).await.unwrap().into_inner();
            (r.job.as_ref()?.state == "cancelled").then_some(r)
        }
    })
    .await;
    assert!(done.job.unwrap().progress.is_some());
    node.shutdown().await.unwrap();
}

/// The ownership stream while a node joins and leaves (in-process gossip).
#[tokio::test]
async fn ownership_stream_shows_a_node_joining_and_leaving() {
    use warden_cluster::membership::ChannelTransport;
    use warden_cluster::{GossipConfig, GossipMembership};
    let db = TestDb::new().await;
    warden_tests::workload::migrate(&db.pool).await.unwrap();
    let t = ChannelTransport::with_mtu(65_000);
    let start = |id: &'static str, port: u16| {
        let (t, url) = (t.clone(), db.url.clone());
        async move {
            let mut g = GossipConfig::new(id, ([127, 0, 0, 1], port).into());
            g.seeds = vec!["127.0.0.1:7101".into()];
            g.gossip_interval = Duration::from_millis(20);
            let m = GossipMembership::start(g, &t).await.unwrap();
            let pool = warden_runtime::store::connect(&url, &Default::default()).await.unwrap();
            Node::builder(config(id))
                .cluster(
                    m,
                    warden_runtime::node::ClusterOptions {
                        settle_delay: Duration::from_millis(200),
                        ..Default::default()
                    },
                )
                .start(pool)
                .await
                .unwrap()
        }
    };
    let n1 = start("n1", 7101).await;
    let n2 = start("n2", 7102).await;
    let (addr, _stop) = serve(&n1, None).await;
    let mut cluster = pb::cluster_client::ClusterClient::new(channel(addr).await);
    eventually(Duration::from_secs(20), "two owners", || {
        let mut c = cluster.clone();
        async move {
            let a = c.get_assignment(pb::GetAssignmentRequest {}).await.unwrap().into_inner();
            let owners: std::collections::BTreeSet<_> = a.assignment.iter().map(|p| p.actual_owner.clone()).collect();
            (owners.len() == 2 && !owners.contains("") && a.assignment.iter().all(|p| p.handoff == "stable"))
                .then_some(())
        }
    })
    .await;
    let mut stream = cluster.watch_ownership(pb::WatchOwnershipRequest {}).await.unwrap().into_inner();
    assert_eq!(stream.message().await.unwrap().unwrap().kind, "snapshot");
    let mut events = Vec::new();
    let n3 = start("n3", 7103).await;
    next_event(&mut stream, &mut events, |e| e.kind == "member_joined" && e.node_id == "n3").await;
    next_event(&mut stream, &mut events, |e| e.kind == "moved" && e.to_owner == "n3" && e.epoch > 1).await;
    n3.shutdown().await.unwrap();
    next_event(&mut stream, &mut events, |e| {
        (e.kind == "member_state" && e.node_id == "n3" && e.state == "leaving")
            || (e.kind == "member_left" && e.node_id == "n3")
    })
    .await;
    next_event(&mut stream, &mut events, |e| (e.kind == "moved" || e.kind == "released") && e.from_owner == "n3").await;
    n1.shutdown().await.unwrap();
    n2.shutdown().await.unwrap();
}

/// Read the stream until an event matches `want` (20 s at most), keeping what was seen.
async fn next_event(
    stream: &mut tonic::Streaming<pb::OwnershipEvent>,
    seen: &mut Vec<pb::OwnershipEvent>,
    want: impl Fn(&pb::OwnershipEvent) -> bool,
) {
    let found = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let e = stream.message().await.unwrap().expect("stream ended");
            let hit = want(&e);
            seen.push(e);
            if hit {
                return;
            }
        }
    })
    .await;
    assert!(found.is_ok(), "expected event not seen; got {seen:?}");
}

// ---------------------------------------------------------------------------
// An abusive client must not starve execution (issue 11 §4).
// ---------------------------------------------------------------------------

/// Serve `api` on a free port.
async fn serve_api(api: api::Api) -> (SocketAddr, CancellationToken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(api::serve_api(listener, api, Auth::new(None), None, stop.clone()));
    (addr, stop)
}

#[tokio::test]
async fn attempts_of_a_job_come_in_pages() {
    let db = TestDb::new().await;
    let node = node_on(&db.url, "n1").await;
    let (addr, _stop) = serve(&node, None).await;
    let mut jobs = pb::jobs_client::JobsClient::new(channel(addr).await);
    let id = jobs
        .enqueue(pb::EnqueueRequest {
            job: Some(pb::NewJob { delay_ms: 3_600_000, ..job("paged-attempts", "audit", r#"{"seq": 1}"#) }),
        })
        .await
        .unwrap()
        .into_inner()
        .id;
    // 120 attempts rows (as 120 snoozes would leave).
    sqlx::query(
        "INSERT INTO warden.attempts (job_id, account, partition, attempt, node, epoch, started_at, finished_at, outcome)
         SELECT $1, 'paged-attempts', 0, g, 'n1/1', 1, now(), now(), 'snoozed' FROM generate_series(1, 120) g",
    )
    .bind(id)
    .execute(&db.pool)
    .await
    .unwrap();
    // An old client (no page fields) gets the first 50 and a token.
    let first = jobs.get_job(pb::GetJobRequest { id, ..Default::default() }).await.unwrap().into_inner();
    assert_eq!(first.attempts.len(), 50);
    assert!(!first.next_attempts_page_token.is_empty());
    let all = jobs
        .get_job(pb::GetJobRequest { id, attempts_page_size: 500, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.attempts.len(), 120);
    assert!(all.next_attempts_page_token.is_empty());
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = jobs
            .get_job(pb::GetJobRequest { id, attempts_page_size: 7, attempts_page_token: token.clone() })
            .await
            .unwrap()
            .into_inner();
        assert!(page.attempts.len() <= 7);
        assert_eq!(page.job.unwrap().id, id);
        seen.extend(page.attempts.iter().map(|a| a.attempt));
        if page.next_attempts_page_token.is_empty() {
            break;
        }
        token = page.next_attempts_page_token;
    }
    assert_eq!(seen, (1..=120).collect::<Vec<_>>(), "every attempt once, in order");
    let s = jobs.get_job(pb::GetJobRequest { id, attempts_page_size: 501, ..Default::default() }).await.unwrap_err();
    assert!(s.code() == Code::InvalidArgument && s.message().contains("limit of 500"), "{s:?}");
    let s = jobs
        .get_job(pb::GetJobRequest { id, attempts_page_token: "x".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert!(s.code() == Code::InvalidArgument && s.message().contains("attempts_page_token"), "{s:?}");
    // The CLI's paging: runtime/cli/tests/cli.rs.
    node.shutdown().await.unwrap();
}

#[tokio::test]
async fn watch_streams_beyond_the_cap_are_refused_and_all_share_one_poller() {
    let db = TestDb::new().await;
    let node = node_on(&db.url, "n1").await;
    let limits = api::ApiLimits { max_watch_streams: 8, ..Default::default() };
    let api_handle = api::Api::with_limits(node.clone(), limits);
    let (addr, _stop) = serve_api(api_handle.clone()).await;
    let ch = channel(addr).await;
    let mut cluster = pb::cluster_client::ClusterClient::new(ch.clone());
    let mut open = Vec::new();
    for _ in 0..8 {
        let mut s = cluster.watch_ownership(pb::WatchOwnershipRequest {}).await.unwrap().into_inner();
        assert_eq!(s.message().await.unwrap().unwrap().kind, "snapshot");
        open.push(s);
    }
    let refused = cluster.watch_ownership(pb::WatchOwnershipRequest {}).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("at most 8 ownership streams"), "{refused:?}");
    // Eight streams for a while: one poll per interval between them, not eight.
    let polls_before = api_handle.ownership_polls();
    let started = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let polls = api_handle.ownership_polls() - polls_before;
    let per_interval = started.elapsed().as_millis() as u64 / 200;
    eprintln!("8 streams for {:?}: {polls} lease polls ({per_interval} intervals)", started.elapsed());
    assert!(polls <= per_interval + 2, "{polls} polls in {per_interval} intervals: streams poll on their own");
    // Every stream still sees changes: a released lease reaches all of them.
    let part = node.held_partitions()[0].partition;
    sqlx::query("UPDATE warden.leases SET owner_node = NULL WHERE partition = $1")
        .bind(part as i32)
        .execute(&db.pool)
        .await
        .unwrap();
    for s in &mut open {
        let mut seen = Vec::new();
        // Released, or (if the node took it back within one poll) acquired at a new epoch.
        next_event(s, &mut seen, |e| e.partition == part && (e.kind == "released" || e.kind == "acquired")).await;
    }
    // A closed stream frees its slot.
    open.pop();
    eventually(Duration::from_secs(10), "a slot is free again", || {
        let mut cluster = cluster.clone();
        async move { cluster.watch_ownership(pb::WatchOwnershipRequest {}).await.ok().map(|_| ()) }
    })
    .await;
    // With no stream left the poller stops.
    drop(open);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let idle_from = api_handle.ownership_polls();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(api_handle.ownership_polls() - idle_from <= 1, "the poller runs with no stream open");
    node.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_busy_api_pool_or_call_budget_is_refused_quickly_and_execution_goes_on() {
    let db = TestDb::new().await;
    let node = node_on(&db.url, "n1").await;
    let limits = api::ApiLimits {
        max_connections: 1,
        acquire_timeout: Duration::from_millis(1500),
        max_in_flight: 1,
        admission_wait: Duration::from_millis(50),
        ..Default::default()
    };
    let api_handle = api::Api::with_limits(node.clone(), limits);
    let (addr, _stop) = serve_api(api_handle.clone()).await;
    let jobs = pb::jobs_client::JobsClient::new(channel(addr).await);

    // The API's connections run with its own statement timeout.
    let timeout: String = sqlx::query_scalar("SHOW statement_timeout").fetch_one(api_handle.api_pool()).await.unwrap();
    assert_eq!(timeout, "5s");

    // Something holds the API's only connection (a slow query, say).
    let held = api_handle.api_pool().acquire().await.unwrap();
    let started = std::time::Instant::now();
    let (mut a, mut b) = (jobs.clone(), jobs.clone());
    let first = tokio::spawn(async move { a.queue_stats(pb::QueueStatsRequest {}).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The call budget (1) is taken by the call waiting for the pool: refused at once.
    let s = b.list_jobs(pb::ListJobsRequest::default()).await.unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert!(s.message().contains("1 API calls at once"), "{s:?}");
    assert!(started.elapsed() < Duration::from_secs(1), "refused after {:?}", started.elapsed());
    // The waiting call gives up after the acquire timeout with a clear status.
    let s = first.await.unwrap().unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert!(s.message().contains("all 1 API database connections are busy"), "{s:?}");
    assert!(started.elapsed() < Duration::from_secs(3), "answered after {:?}", started.elapsed());
    // Meanwhile execution goes on: the executor pool is not the API's.
    let id = node
        .client()
        .enqueue(warden_runtime::NewJob::new("busy-api", "audit", serde_json::json!({"seq": 1})).unwrap())
        .await
        .unwrap()
        .id;
    eventually(Duration::from_secs(10), "job completed while the API pool is exhausted", || async {
        (node.client().get(id).await.unwrap().unwrap().state == "completed").then_some(())
    })
    .await;
    drop(held);
    let mut c = jobs.clone();
    assert!(c.queue_stats(pb::QueueStatsRequest {}).await.is_ok(), "the API recovers once the connection is back");
    node.shutdown().await.unwrap();
}

#[tokio::test]
async fn queue_statistics_are_bounded_and_say_so() {
    let db = TestDb::new().await;
    let node = node_on(&db.url, "n1").await;
    let limits = api::ApiLimits { stats_partition_cap: 5, ..Default::default() };
    let (addr, _stop) = serve_api(api::Api::with_limits(node.clone(), limits)).await;
    let mut jobs = pb::jobs_client::JobsClient::new(channel(addr).await);
    let many: Vec<pb::NewJob> = (0..40)
        .map(|i| pb::NewJob { delay_ms: 3_600_000, ..job("deep", "audit", &format!(r#"{{"seq": {i}}}"#)) })
        .collect();
    jobs.enqueue_batch(pb::EnqueueBatchRequest { jobs: many }).await.unwrap();
    let done = jobs.enqueue(pb::EnqueueRequest { job: Some(job("shallow", "audit", r#"{"seq": 1}"#)) }).await.unwrap();
    eventually(Duration::from_secs(20), "job completed", || {
        let mut jobs = jobs.clone();
        let id = done.get_ref().id;
        async move {
            (jobs.get_job(pb::GetJobRequest { id, ..Default::default() }).await.unwrap().into_inner().job?.state
                == "completed")
                .then_some(())
        }
    })
    .await;
    let s = jobs.queue_stats(pb::QueueStatsRequest {}).await.unwrap().into_inner();
    assert!(s.capped && s.partition_count_cap == 5, "{s:?}");
    assert_eq!(s.by_state.get("scheduled"), Some(&5), "counted up to the cap: {s:?}");
    assert_eq!(s.by_state.get("completed"), Some(&1), "finished counted exactly while few: {s:?}");
    assert!(s.estimated_states.is_empty(), "{s:?}");
    let top = &s.top_partitions[0];
    assert!(top.capped && top.backlog == 5 && top.owner == "n1", "{top:?}");
    // Locate says its count is exact below its own cap.
    let mut cluster = pb::cluster_client::ClusterClient::new(channel(addr).await);
    let l = cluster.locate(pb::LocateRequest { account: "deep".into() }).await.unwrap().into_inner();
    assert_eq!((l.unfinished_jobs, l.unfinished_jobs_capped), (40, false));
    // A filtered list over more jobs than one scan window still pages to the end.
    let l = jobs
        .list_jobs(pb::ListJobsRequest { state: "completed".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(l.jobs.len(), 1);
    node.shutdown().await.unwrap();
}

/// Jobs/s of a drain and enqueue→start latency of a trickle, with the API idle or under
/// attack.
#[derive(Debug, Clone, Copy)]
struct Exec {
    jobs_per_s: f64,
    start_p50_ms: f64,
    start_p90_ms: f64,
}

async fn measure_execution(db: &TestDb, node: &Node, tag: &str) -> Exec {
    const ACCOUNTS: usize = 50;
    const PER_ACCOUNT: usize = 20;
    let mut batch = Vec::new();
    for seq in 0..PER_ACCOUNT {
        for a in 0..ACCOUNTS {
            batch.push(
                warden_runtime::NewJob::new(format!("{tag}-{a}"), "audit", serde_json::json!({ "seq": seq })).unwrap(),
            );
        }
    }
    let started = std::time::Instant::now();
    node.client().enqueue_many(&batch).await.unwrap();
    let total = (ACCOUNTS * PER_ACCOUNT) as i64;
    let like = format!("{tag}-%");
    eventually(Duration::from_secs(120), "drain finished", || {
        let like = like.clone();
        async move {
            let n: i64 =
                sqlx::query_scalar("SELECT count(*) FROM warden.jobs WHERE account LIKE $1 AND state = 'completed'")
                    .bind(like)
                    .fetch_one(&db.pool)
                    .await
                    .unwrap();
            (n == total).then_some(())
        }
    })
    .await;
    let jobs_per_s = total as f64 / started.elapsed().as_secs_f64();
    // Trickle: 40 single enqueues, 25 ms apart, each to an idle account.
    let mut ids = Vec::new();
    for i in 0..40 {
        let j = warden_runtime::NewJob::new(format!("{tag}-t{i}"), "audit", serde_json::json!({ "seq": 0 })).unwrap();
        ids.push(node.client().enqueue(j).await.unwrap().id);
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let lat: Vec<f64> = eventually(Duration::from_secs(60), "trickle started", || {
        let ids = ids.clone();
        async move {
            let v: Vec<f64> = sqlx::query_scalar(
                "SELECT (EXTRACT(EPOCH FROM (a.started_at - j.created_at)) * 1000)::float8
                 FROM warden.jobs j JOIN warden.attempts a ON a.job_id = j.id AND a.attempt = 1
                 WHERE j.id = ANY($1) ORDER BY 1",
            )
            .bind(&ids)
            .fetch_all(&db.pool)
            .await
            .unwrap();
            (v.len() == ids.len()).then_some(v)
        }
    })
    .await;
    Exec { jobs_per_s, start_p50_ms: lat[lat.len() / 2], start_p90_ms: lat[lat.len() * 9 / 10] }
}

/// An API client hammering every RPC and holding every watch stream it can while jobs
/// run: throughput and start latency stay close to an idle API's (same run, same
/// server; generous bounds, since the API's work still shares two cores with the
/// executor and PostgreSQL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_client_hammering_every_rpc_does_not_starve_execution() {
    let db = TestDb::new().await;
    let pool = warden_runtime::store::connect(&db.url, &Default::default()).await.unwrap();
    warden_tests::workload::migrate(&pool).await.unwrap();
    // The audit handler's outside-observer rows go through a pool of their own: on the
    // executor pool, 50 busy accounts would each hold a job transaction and wait for a
    // second connection, and the measure would be of that, not of the API.
    let audit_pool = sqlx::postgres::PgPoolOptions::new().max_connections(24).connect(&db.url).await.unwrap();
    let node = Node::builder(config("n1"))
        .register(warden_tests::workload::Audit { node: "n1".into(), pool: audit_pool })
        .unwrap()
        .start(pool)
        .await
        .unwrap();
    let api_handle = api::Api::new(node.clone());
    let (addr, _stop) = serve_api(api_handle.clone()).await;
    let warm = measure_execution(&db, &node, "warm").await;
    let idle = measure_execution(&db, &node, "idle").await;
    eprintln!("warm-up: {warm:?}");

    let ch = channel(addr).await;
    let some_job = node
        .client()
        .enqueue(warden_runtime::NewJob::new("probe", "audit", serde_json::json!({"seq": 0})).unwrap())
        .await
        .unwrap()
        .id;
    let stop = CancellationToken::new();
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let refused = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut hammer = tokio::task::JoinSet::new();
    // Every watch stream the node allows, each read by a slow consumer, and more.
    let mut streams_refused = 0;
    for i in 0..(api::ApiLimits::default().max_watch_streams + 16) {
        let mut cluster = pb::cluster_client::ClusterClient::new(channel(addr).await);
        match cluster.watch_ownership(pb::WatchOwnershipRequest {}).await {
            Ok(s) => {
                let stop = stop.clone();
                let mut s = s.into_inner();
                hammer.spawn(async move {
                    while !stop.is_cancelled() {
                        if i % 2 == 0 {
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            // slow reader
                        }
                        tokio::select! {
                            _ = stop.cancelled() => break,
                            m = s.message() => if !matches!(m, Ok(Some(_))) { break },
                        }
                    }
                });
            }
            Err(s) => {
                assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                streams_refused += 1;
            }
        }
    }
    assert_eq!(streams_refused, 16);
    for w in 0..8 {
        let (ch, stop, calls, refused) = (ch.clone(), stop.clone(), calls.clone(), refused.clone());
        hammer.spawn(async move {
            let mut jobs = pb::jobs_client::JobsClient::new(ch.clone());
            let mut cluster = pb::cluster_client::ClusterClient::new(ch);
            let mut i = 0u64;
            while !stop.is_cancelled() {
                i += 1;
                let r: Result<(), tonic::Status> = match i % 11 {
                    0 => cluster.list_members(pb::ListMembersRequest {}).await.map(|_| ()),
                    1 => cluster.get_assignment(pb::GetAssignmentRequest {}).await.map(|_| ()),
                    2 => cluster.locate(pb::LocateRequest { account: format!("idle-{w}") }).await.map(|_| ()),
                    3 => cluster.node_stats(pb::NodeStatsRequest {}).await.map(|_| ()),
                    4 => jobs.queue_stats(pb::QueueStatsRequest {}).await.map(|_| ()),
                    5 => jobs
                        .get_job(pb::GetJobRequest { id: some_job, attempts_page_size: 500, ..Default::default() })
                        .await
                        .map(|_| ()),
                    6 => jobs
                        .list_jobs(pb::ListJobsRequest {
                            state: "completed".into(),
                            page_size: 500,
                            ..Default::default()
                        })
                        .await
                        .map(|_| ()),
                    7 => jobs
                        .list_jobs(pb::ListJobsRequest { kind: "nosuch".into(), page_size: 500, ..Default::default() })
                        .await
                        .map(|_| ()),
                    8 => jobs.cancel_job(pb::CancelJobRequest { id: 1 << 40 }).await.map(|_| ()),
                    9 => jobs.retry_job(pb::RetryJobRequest { id: 1 << 40 }).await.map(|_| ()),
                    _ => jobs
                        .enqueue(pb::EnqueueRequest {
                            job: Some(pb::NewJob {
                                delay_ms: 3_600_000,
                                ..job(&format!("hammer-{w}"), "audit", r#"{"seq": 0}"#)
                            }),
                        })
                        .await
                        .map(|_| ()),
                };
                calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if let Err(s) = r {
                    match s.code() {
                        Code::NotFound => {}
                        Code::ResourceExhausted => {
                            refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        other => panic!("hammer call failed with {other:?}: {s:?}"),
                    }
                }
            }
        });
    }
    // The API never has more than its own connections open, whatever the load.
    let api_conns = tokio::spawn({
        let (pool, stop) = (db.pool.clone(), stop.clone());
        async move {
            let mut max = 0i64;
            while !stop.is_cancelled() {
                let n: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'warden-api' AND datname = current_database()",
                )
                .fetch_one(&pool)
                .await
                .unwrap();
                max = max.max(n);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            max
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let calls_before = calls.load(std::sync::atomic::Ordering::Relaxed);
    let started = std::time::Instant::now();
    let busy = measure_execution(&db, &node, "busy").await;
    let api_calls = calls.load(std::sync::atomic::Ordering::Relaxed) - calls_before;
    let api_rate = api_calls as f64 / started.elapsed().as_secs_f64();
    stop.cancel();
    while hammer.join_next().await.is_some() {}
    let max_api_conns = api_conns.await.unwrap();
    let thr = busy.jobs_per_s / idle.jobs_per_s;
    eprintln!(
        "idle API: {:.0} jobs/s, start p50 {:.1} ms p90 {:.1} ms | hammering API ({api_rate:.0} calls/s, {} refused, \
         {} streams held, {streams_refused} refused; at most {max_api_conns} API connections): {:.0} jobs/s ({:.0}%), \
         start p50 {:.1} ms p90 {:.1} ms",
        idle.jobs_per_s,
        idle.start_p50_ms,
        idle.start_p90_ms,
        refused.load(std::sync::atomic::Ordering::Relaxed),
        api::ApiLimits::default().max_watch_streams,
        busy.jobs_per_s,
        thr * 100.0,
        busy.start_p50_ms,
        busy.start_p90_ms
    );
    assert!(api_calls > 100, "the hammer hardly ran: {api_calls} calls");
    assert!(max_api_conns <= api::ApiLimits::default().max_connections as i64, "{max_api_conns} API connections");
    // Generous: CPU is shared on a 2-core box; what must not happen is starvation
    // (before this change the hammer took executor connections and the drain stalled).
    // Measured 53–82% with nextest running other tests beside it; the bound only catches
    // starvation.
    assert!(thr >= 0.3, "throughput under API load fell to {:.0}% of idle", thr * 100.0);
    assert!(
        busy.start_p50_ms <= idle.start_p50_ms * 5.0 + 100.0,
        "start latency p50 {:.1} ms under API load vs {:.1} ms idle",
        busy.start_p50_ms,
        idle.start_p50_ms
    );
    node.shutdown().await.unwrap();
}

/// The rate limit: calls that read many rows cost more of the per-second budget;
/// beyond it the node answers RESOURCE_EXHAUSTED (after the admission wait, so a
/// client retrying in a loop is slowed down), while enqueues are never rate-limited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_calls_beyond_the_rate_limit_are_refused_and_enqueues_are_not() {
    let db = TestDb::new().await;
    let node = node_on(&db.url, "n1").await;
    let limits = api::ApiLimits { max_calls_per_second: 50, ..Default::default() };
    let (addr, _stop) = serve_api(api::Api::with_limits(node.clone(), limits)).await;
    let mut jobs = pb::jobs_client::JobsClient::new(channel(addr).await);
    // 50 tokens: 5 queue statistics calls (10 each), then refusals.
    let mut ok = 0;
    let mut refused = Vec::new();
    for _ in 0..10 {
        match jobs.queue_stats(pb::QueueStatsRequest {}).await {
            Ok(_) => ok += 1,
            Err(s) => refused.push(s),
        }
    }
    assert!((5..=7).contains(&ok), "{ok} heavy calls admitted from a 50-token bucket");
    assert!(
        refused.iter().all(|s| s.code() == Code::ResourceExhausted && s.message().contains("per second")),
        "{refused:?}"
    );
    // The bucket is empty, yet producers go on.
    for i in 0..100 {
        jobs.enqueue(pb::EnqueueRequest { job: Some(job(&format!("rate-{i}"), "audit", r#"{"seq": 0}"#)) })
            .await
            .unwrap();
    }
    node.shutdown().await.unwrap();
}
