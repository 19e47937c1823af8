//! Store-level tests: schema, partition hash twin, enqueue paths and limits,
//! unique keys, claim order, fencing and rescue — directly against PostgreSQL.

use std::time::Duration;
use warden_runtime::store::{self, Fence, Finish, PgStore, Store};
use warden_runtime::{Client, Error, NewJob, PartitionCount};
use warden_tests::TestDb;

const TTL: Duration = Duration::from_secs(30);

async fn setup(p: u32) -> (TestDb, PgStore, Client) {
    let db = TestDb::new().await;
    store::migrate(&db.pool).await.unwrap();
    let parts = store::init_partitions(&db.pool, PartitionCount::new(p).unwrap()).await.unwrap();
    let client = Client::connect(db.pool.clone()).await.unwrap();
    (db.clone_handle(), PgStore::new(db.pool.clone(), parts), client)
}

async fn own_all(s: &PgStore, owner: &str) -> Vec<Fence> {
    let all: Vec<u32> = (0..s.partitions().get()).collect();
    let granted = s.acquire(owner, &all, TTL).await.unwrap();
    assert_eq!(granted.len(), all.len());
    granted.iter().map(|g| Fence { partition: g.partition, epoch: g.epoch, owner: owner.into() }).collect()
}

fn fence_for(fences: &[Fence], account: &str, p: u32) -> Fence {
    fences[warden_runtime::partition_of(account, PartitionCount::new(p).unwrap()) as usize].clone()
}

#[tokio::test]
async fn migrations_are_idempotent_and_concurrent_starts_are_safe() {
    let db = TestDb::new().await;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let pool = db.pool.clone();
        tasks.push(tokio::spawn(async move {
            store::migrate(&pool).await.unwrap();
            store::init_partitions(&pool, PartitionCount::new(64).unwrap()).await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let leases: i64 = sqlx::query_scalar("SELECT count(*) FROM warden.leases").fetch_one(&db.pool).await.unwrap();
    assert_eq!(leases, 64);
    let err = store::init_partitions(&db.pool, PartitionCount::new(128).unwrap()).await.unwrap_err();
    assert!(matches!(err, Error::PartitionMismatch { stored: 64, configured: 128 }), "{err}");
}

#[tokio::test]
async fn client_on_uninitialised_database_says_so() {
    let db = TestDb::new().await;
    let err = Client::connect(db.pool.clone()).await.unwrap_err();
    assert!(matches!(err, Error::NotInitialised), "{err}");
}

#[tokio::test]
async fn sql_partition_function_matches_rust() {
    let (db, _s, _c) = setup(1024).await;
    for i in 0..500 {
        let account = format!("acct-{i}-{}", "é".repeat(i % 3));
        let sql: i32 = sqlx::query_scalar("SELECT warden.partition_of($1, 1024)")
            .bind(&account)
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_eq!(sql as u32, warden_runtime::partition_of(&account, PartitionCount::new(1024).unwrap()), "{account}");
    }
}

#[tokio::test]
async fn bad_input_is_rejected_before_the_database() {
    let (db, _s, client) = setup(16).await;
    let cases: Vec<(NewJob, &str)> = vec![
        (NewJob::new("", "k", ()).unwrap(), "account must not be empty"),
        (NewJob::new("a".repeat(300), "k", ()).unwrap(), "account is 300 bytes"),
        (NewJob::new("a\tb", "k", ()).unwrap(), "account contains a control character"),
        (NewJob::new("a", "", ()).unwrap(), "kind must not be empty"),
        (NewJob::new("a", "k\u{7}", ()).unwrap(), "kind contains a control character"),
        (NewJob::new("a", "k", "x".repeat(70_000)).unwrap(), "args are"),
        (NewJob::new("a", "k", ()).unwrap().max_attempts(0), "max_attempts"),
        (NewJob::new("a", "k", ()).unwrap().unique_key("u".repeat(257)), "unique_key is 257 bytes"),
    ];
    for (job, expected) in cases {
        let err = client.enqueue(job).await.unwrap_err();
        assert!(matches!(err, Error::InvalidInput(_)), "{err}");
        assert!(err.to_string().contains(expected), "{err} should mention {expected}");
    }
    let too_many: Vec<NewJob> = (0..10_001).map(|i| NewJob::new(format!("a{i}"), "k", ()).unwrap()).collect();
    assert!(client.enqueue_many(&too_many).await.unwrap_err().to_string().contains("limit is 10000"));
    assert_eq!(warden_tests::count_unfinished(&db.pool).await, 0, "nothing was stored");
}

#[tokio::test]
async fn unique_keys_make_enqueue_idempotent_while_unfinished() {
    let (db, s, client) = setup(16).await;
    let a = client.enqueue(NewJob::new("acct", "k", 1).unwrap().unique_key("order-1")).await.unwrap();
    let b = client.enqueue(NewJob::new("acct", "k", 2).unwrap().unique_key("order-1")).await.unwrap();
    assert!(!a.duplicate && b.duplicate && a.id == b.id);
    // Same key on another account is independent.
    let c = client.enqueue(NewJob::new("other", "k", 1).unwrap().unique_key("order-1")).await.unwrap();
    assert!(!c.duplicate && c.id != a.id);
    // In one batch: the second occurrence is a duplicate of the first.
    let batch = client
        .enqueue_many(&[
            NewJob::new("acct", "k", 3).unwrap().unique_key("order-2"),
            NewJob::new("acct", "k", 4).unwrap(),
            NewJob::new("acct", "k", 5).unwrap().unique_key("order-2"),
            NewJob::new("acct", "k", 6).unwrap().unique_key("order-1"),
        ])
        .await
        .unwrap();
    assert!(!batch[0].duplicate && !batch[1].duplicate && batch[2].duplicate && batch[3].duplicate);
    assert_eq!(batch[2].id, batch[0].id);
    assert_eq!(batch[3].id, a.id);
    // Once the job is finished, the key is free again.
    let fences = own_all(&s, "n/1").await;
    let f = fence_for(&fences, "acct", 16);
    let job = s.claim("acct", &f).await.unwrap().unwrap();
    assert_eq!(job.id, a.id);
    s.finish(None, &job, &f, &Finish::Completed, false).await.unwrap();
    let again = client.enqueue(NewJob::new("acct", "k", 7).unwrap().unique_key("order-1")).await.unwrap();
    assert!(!again.duplicate && again.id != a.id);
    drop(db);
}

#[tokio::test]
async fn transactional_enqueue_rolls_back_with_the_caller() {
    let (db, _s, client) = setup(16).await;
    let mut tx = db.pool.begin().await.unwrap();
    client.enqueue_in(&mut tx, NewJob::new("acct", "k", ()).unwrap()).await.unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(warden_tests::count_unfinished(&db.pool).await, 0);
    let mut tx = db.pool.begin().await.unwrap();
    let e = client.enqueue_in(&mut tx, NewJob::new("acct", "k", ()).unwrap()).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(client.get(e.id).await.unwrap().unwrap().state, "available");
}

/// How a test enqueue is made.
#[derive(Debug, Clone, Copy)]
enum Via {
    /// The client, one job.
    Client,
    /// `warden.enqueue` in SQL.
    Sql,
    /// The client, a batch over more accounts than `ENQUEUE_LOCK_BATCH`, `account`'s first.
    Batch,
}

async fn enqueue_in_tx(via: Via, client: &Client, tx: &mut sqlx::PgConnection, account: &str) -> i64 {
    match via {
        Via::Client => client.enqueue_in(tx, NewJob::new(account, "step", ()).unwrap()).await.unwrap().id,
        Via::Sql => sqlx::query_scalar("SELECT warden.enqueue($1, 'step')").bind(account).fetch_one(tx).await.unwrap(),
        Via::Batch => {
            let mut jobs = vec![NewJob::new(account, "step", ()).unwrap()];
            jobs.extend(
                (0..store::ENQUEUE_LOCK_BATCH + 10).map(|i| NewJob::new(format!("{account}-{i}"), "step", ()).unwrap()),
            );
            client.enqueue_many_in(tx, &jobs).await.unwrap()[0].id
        }
    }
}

/// Regression: serial order is (run_at, id), fixed at insert, but a job is visible
/// only once its transaction commits. Two transactions enqueueing for one account
/// could commit in the other order, so the job sorted first could appear after the
/// one sorted second had already run. An enqueue now waits for the account's other
/// uncommitted enqueues and sorts after them, whichever way each was made (one job,
/// SQL, a batch that locks whole groups); other accounts are not held up by a
/// single-account enqueue.
#[tokio::test]
async fn concurrent_enqueues_of_one_account_sort_in_commit_order() {
    let (db, _s, client) = setup(16).await;
    let cases = [(Via::Client, Via::Sql), (Via::Sql, Via::Client), (Via::Batch, Via::Sql), (Via::Client, Via::Batch)];
    for (n, (first_via, second_via)) in cases.into_iter().enumerate() {
        let account = format!("order-{n}");
        let mut tx1 = db.pool.begin().await.unwrap();
        let first = enqueue_in_tx(first_via, &client, &mut tx1, &account).await;
        let (pool, c2, acc) = (db.pool.clone(), client.clone(), account.clone());
        let second = tokio::spawn(async move {
            let mut tx2 = pool.begin().await.unwrap();
            let id = enqueue_in_tx(second_via, &c2, &mut tx2, &acc).await;
            tx2.commit().await.unwrap();
            id
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let case = format!("{first_via:?} then {second_via:?}");
        assert!(!second.is_finished(), "{case}: the second enqueue waits for the first one's commit");
        // A batch locks whole groups (and a waiting one keeps those it has), so only
        // single-account enqueues are sure not to hold up another account.
        if !matches!(first_via, Via::Batch) && !matches!(second_via, Via::Batch) {
            let other = client.enqueue(NewJob::new(format!("unrelated-{n}"), "step", ()).unwrap());
            let other = tokio::time::timeout(Duration::from_secs(5), other).await;
            assert!(other.is_ok(), "{case}: another account's enqueue is not held up");
        }
        // The first transaction enqueues again while the second waits: the second must
        // still sort last, i.e. read its order key after the lock, not at its start.
        let first_again = enqueue_in_tx(first_via, &client, &mut tx1, &account).await;
        tx1.commit().await.unwrap();
        let second = second.await.unwrap();
        let keys: Vec<(chrono::DateTime<chrono::Utc>, i64)> =
            sqlx::query_as("SELECT run_at, id FROM warden.jobs WHERE account = $1 ORDER BY run_at, id")
                .bind(&account)
                .fetch_all(&db.pool)
                .await
                .unwrap();
        assert_eq!(keys.iter().map(|k| k.1).collect::<Vec<_>>(), vec![first, first_again, second], "{case}: {keys:?}");
        assert!(keys[1].0 < keys[2].0, "{case}: the later commit reads its run_at later: {keys:?}");
    }
}

/// Enqueue locks last until commit, and PostgreSQL's lock table is shared and small
/// (64 × max_connections entries by default): a transaction that enqueues for many
/// accounts one at a time (a loop, a row trigger over a bulk update) must not hold a
/// lock per account. Past 64 it switches to group locks, which still make another
/// transaction's enqueue for any of those accounts wait.
#[tokio::test]
async fn a_transaction_enqueueing_for_many_accounts_holds_a_bounded_number_of_locks() {
    let (db, _s, client) = setup(16).await;
    for via in [Via::Client, Via::Sql] {
        let mut tx = db.pool.begin().await.unwrap();
        for i in 0..600 {
            enqueue_in_tx(via, &client, &mut tx, &format!("many-{via:?}-{i}")).await;
        }
        let held: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()")
                .fetch_one(&mut *tx)
                .await
                .unwrap();
        assert!(held <= 64 + 256 + 256, "{via:?}: {held} advisory locks held for 600 accounts");
        let (pool, c2, last) = (db.pool.clone(), client.clone(), format!("many-{via:?}-599"));
        let other = tokio::spawn(async move {
            let mut tx2 = pool.begin().await.unwrap();
            enqueue_in_tx(Via::Client, &c2, &mut tx2, &last).await;
            tx2.commit().await.unwrap();
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!other.is_finished(), "{via:?}: an account locked through its group still makes others wait");
        tx.commit().await.unwrap();
        other.await.unwrap();
    }
}

#[tokio::test]
async fn a_row_update_enqueues_a_job_through_a_trigger() {
    let (db, _s, client) = setup(16).await;
    sqlx::raw_sql(
        "CREATE TABLE orders (id bigint PRIMARY KEY, account text NOT NULL, status text NOT NULL);
         CREATE FUNCTION orders_paid() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.status = 'paid' AND OLD.status <> 'paid' THEN
                 PERFORM warden.enqueue(NEW.account, 'ship_order', jsonb_build_object('order', NEW.id),
                                        p_unique_key => 'ship-' || NEW.id);
             END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER orders_paid AFTER UPDATE ON orders FOR EACH ROW EXECUTE FUNCTION orders_paid();
         INSERT INTO orders VALUES (1, 'acct-42', 'new');",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query("UPDATE orders SET status = 'paid' WHERE id = 1").execute(&db.pool).await.unwrap();
    let job: warden_runtime::JobRow =
        sqlx::query_as("SELECT * FROM warden.jobs WHERE kind = 'ship_order'").fetch_one(&db.pool).await.unwrap();
    assert_eq!(job.account, "acct-42");
    assert_eq!(job.args, serde_json::json!({"order": 1}));
    assert_eq!(job.partition as u32, warden_runtime::partition_of("acct-42", client.partitions()));
    assert_eq!(job.state, "available");
    // A rolled-back row change enqueues nothing.
    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query("INSERT INTO orders VALUES (2, 'acct-42', 'new')").execute(&mut *tx).await.unwrap();
    sqlx::query("UPDATE orders SET status = 'paid' WHERE id = 2").execute(&mut *tx).await.unwrap();
    tx.rollback().await.unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM warden.jobs").fetch_one(&db.pool).await.unwrap();
    assert_eq!(n, 1);
    // The SQL function validates like the client.
    let err = sqlx::query("SELECT warden.enqueue('', 'k')").execute(&db.pool).await.unwrap_err();
    assert!(err.to_string().contains("account must be 1..256 bytes"), "{err}");
    let err = sqlx::query("SELECT warden.enqueue('a', E'k\\n')").execute(&db.pool).await.unwrap_err();
    assert!(err.to_string().contains("kind must be"), "{err}");
}

#[tokio::test]
async fn claim_follows_serial_order_and_a_failing_head_blocks() {
    let (_db, s, client) = setup(16).await;
    let fences = own_all(&s, "n/1").await;
    let f = fence_for(&fences, "acct", 16);
    let later = chrono::Utc::now() + chrono::Duration::hours(1);
    // Scheduled for later: must not block the earlier-ordered jobs.
    let sched = client.enqueue(NewJob::new("acct", "k", "sched").unwrap().run_at(later)).await.unwrap();
    let ids =
        client.enqueue_many(&(0..3).map(|i| NewJob::new("acct", "k", i).unwrap()).collect::<Vec<_>>()).await.unwrap();
    let j0 = s.claim("acct", &f).await.unwrap().unwrap();
    assert_eq!(j0.id, ids[0].id);
    // One running serial job per account: claiming again (an actor retrying a claim
    // whose reply it lost) adopts the job already running at this epoch.
    assert_eq!(s.claim("acct", &f).await.unwrap().map(|j| j.id), Some(j0.id), "one running serial job per account");
    // Head fails and retries later: nothing behind it may run.
    let next = s
        .finish(
            None,
            &j0,
            &f,
            &Finish::Retry { after: Duration::from_millis(300), outcome: "failed", error: "boom".into() },
            true,
        )
        .await
        .unwrap()
        .into_next();
    assert!(next.is_none(), "a retrying head blocks its account");
    assert!(s.claim("acct", &f).await.unwrap().is_none());
    tokio::time::sleep(Duration::from_millis(350)).await;
    let j0b = s.claim("acct", &f).await.unwrap().unwrap();
    assert_eq!((j0b.id, j0b.attempt), (ids[0].id, 3));
    // Completing claims the next in the same statement.
    let j1 = s.finish(None, &j0b, &f, &Finish::Completed, true).await.unwrap().into_next().unwrap();
    assert_eq!(j1.id, ids[1].id);
    let j2 = s.finish(None, &j1, &f, &Finish::Completed, true).await.unwrap().into_next().unwrap();
    assert_eq!(j2.id, ids[2].id);
    let none = s.finish(None, &j2, &f, &Finish::Completed, true).await.unwrap().into_next();
    assert!(none.is_none(), "the scheduled job is not due");
    assert_eq!(client.get(sched.id).await.unwrap().unwrap().state, "scheduled");
}

#[tokio::test]
async fn a_write_with_a_stale_epoch_is_rejected() {
    let (db, s, client) = setup(4).await;
    let old = own_all(&s, "old/1").await;
    let e = client.enqueue(NewJob::new("acct", "k", ()).unwrap()).await.unwrap();
    let f_old = fence_for(&old, "acct", 4);
    let job = s.claim("acct", &f_old).await.unwrap().unwrap();
    // The lease expires (the old owner paused) and a new owner takes it.
    sqlx::query("UPDATE warden.leases SET lease_expires_at = now() - interval '1 second'")
        .execute(&db.pool)
        .await
        .unwrap();
    let new = own_all(&s, "new/1").await;
    let f_new = fence_for(&new, "acct", 4);
    assert_eq!(f_new.epoch, f_old.epoch + 1);
    // The zombie's completion is refused and its handler writes roll back.
    let mut tx = s.begin(Duration::from_secs(60)).await.unwrap();
    sqlx::raw_sql("CREATE TABLE zombie_effect (x int); INSERT INTO zombie_effect VALUES (1)")
        .execute(tx.conn())
        .await
        .unwrap();
    let err = s.finish(Some(tx), &job, &f_old, &Finish::Completed, true).await.unwrap_err();
    assert!(matches!(err, Error::Fenced { .. }), "{err}");
    let exists: Option<String> =
        sqlx::query_scalar("SELECT to_regclass('zombie_effect')::text").fetch_one(&db.pool).await.unwrap();
    assert!(exists.is_none(), "fenced handler writes must roll back");
    assert!(matches!(s.claim("acct", &f_old).await.unwrap_err(), Error::Fenced { .. }));
    assert!(matches!(s.unclaim(&job, &f_old).await.unwrap_err(), Error::Fenced { .. }));
    // Renewal by the old owner fails; the new owner rescues the abandoned attempt.
    let renewed = s
        .renew("old/1", &[warden_runtime::store::GrantedLease { partition: f_old.partition, epoch: f_old.epoch }], TTL)
        .await
        .unwrap();
    assert!(renewed.is_empty());
    assert_eq!(
        s.rescue("new/1", &[warden_runtime::store::GrantedLease { partition: f_new.partition, epoch: f_new.epoch }])
            .await
            .unwrap(),
        1
    );
    let j = client.get(e.id).await.unwrap().unwrap();
    assert_eq!((j.state.as_str(), j.attempt), ("retryable", 1));
    let attempts = client.attempts(e.id).await.unwrap();
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].outcome, "rescued");
    assert_eq!(attempts[0].epoch, f_old.epoch);
    // The new owner runs it to completion. A rescue never touches the current
    // epoch's running attempt, a completed job, or anything when the caller does not
    // hold the lease.
    let lease_new = [warden_runtime::store::GrantedLease { partition: f_new.partition, epoch: f_new.epoch }];
    let j2 = s.claim("acct", &f_new).await.unwrap().unwrap();
    assert_eq!(j2.attempt, 2);
    assert_eq!(s.rescue("new/1", &lease_new).await.unwrap(), 0, "the current epoch's attempt is left running");
    assert_eq!(s.rescue("old/1", &lease_new).await.unwrap(), 0, "only the lease holder rescues");
    let running = client.get(e.id).await.unwrap().unwrap();
    assert_eq!((running.state.as_str(), running.attempt), ("running", 2));
    s.finish(None, &j2, &f_new, &Finish::Completed, true).await.unwrap();
    assert_eq!(s.rescue("new/1", &lease_new).await.unwrap(), 0);
    assert_eq!(client.get(e.id).await.unwrap().unwrap().state, "completed");
    assert_eq!(client.attempts(e.id).await.unwrap().len(), 2, "one rescued, one completed: nothing added");
}

#[tokio::test]
async fn released_leases_keep_their_epoch_and_free_the_partition() {
    let (_db, s, _c) = setup(4).await;
    let a = own_all(&s, "a/1").await;
    // Held leases cannot be taken by another owner.
    assert!(s.acquire("b/1", &[0, 1, 2, 3], TTL).await.unwrap().is_empty());
    let held: Vec<_> =
        a.iter().map(|f| warden_runtime::store::GrantedLease { partition: f.partition, epoch: f.epoch }).collect();
    assert_eq!(s.release("a/1", &held).await.unwrap(), 4);
    let b = s.acquire("b/1", &[0, 1, 2, 3], TTL).await.unwrap();
    assert_eq!(b.len(), 4);
    for g in b {
        assert_eq!(g.epoch, a[g.partition as usize].epoch + 1, "epochs only grow");
    }
}

#[tokio::test]
async fn cancel_and_retry_from_the_client() {
    let (_db, s, client) = setup(4).await;
    let fences = own_all(&s, "n/1").await;
    let f = fence_for(&fences, "acct", 4);
    let a = client.enqueue(NewJob::new("acct", "k", 1).unwrap()).await.unwrap();
    let b = client.enqueue(NewJob::new("acct", "k", 2).unwrap()).await.unwrap();
    assert_eq!(client.cancel(b.id).await.unwrap(), warden_runtime::CancelResult::Cancelled);
    let job = s.claim("acct", &f).await.unwrap().unwrap();
    assert_eq!(client.cancel(a.id).await.unwrap(), warden_runtime::CancelResult::CancelRequested);
    assert!(s.cancel_requested(a.id).await.unwrap());
    s.finish(None, &job, &f, &Finish::Discard { outcome: "discarded", error: "x".into() }, true).await.unwrap();
    assert!(matches!(client.cancel(a.id).await.unwrap(), warden_runtime::CancelResult::AlreadyFinished { .. }));
    assert!(matches!(client.cancel(999_999).await.unwrap_err(), Error::JobNotFound(999_999)));
    let r = client.retry(a.id).await.unwrap();
    assert_eq!(r.state, "available");
    assert!(client.retry(a.id).await.unwrap_err().to_string().contains("only discarded or cancelled"));
}

/// Regression: with `FOR SHARE` fences a busy node starved its own lease renewals
/// and self-fenced. Fences now lock `FOR KEY SHARE` and `epoch` is a key column.
#[tokio::test]
async fn renewal_is_not_blocked_by_fenced_work_but_takeover_is() {
    let (db, s, _client) = setup(4).await;
    let fences = own_all(&s, "a/1").await;
    let f = fences[0].clone();
    // An executor statement in flight holds the fence lock (the one `warden.fence` takes in every fenced statement).
    let mut tx = db.pool.begin().await.unwrap();
    let held: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT 1 FROM warden.leases WHERE partition = $1 AND owner_node = $2 AND epoch = $3
                                AND lease_expires_at > statement_timestamp() FOR KEY SHARE) x",
    )
    .bind(f.partition as i32)
    .bind("a/1")
    .bind(f.epoch)
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    assert_eq!(held, 1);
    // The owner's renewal goes through at once.
    let renewed = tokio::time::timeout(
        Duration::from_secs(2),
        s.renew("a/1", &[warden_runtime::store::GrantedLease { partition: f.partition, epoch: f.epoch }], TTL),
    )
    .await
    .expect("renewal must not wait for fenced work")
    .unwrap();
    assert_eq!(renewed, vec![f.partition]);
    // A takeover (epoch bump) must not run while a fenced statement is in flight;
    // it skips the locked partition (never blocking the enforcer) and gets it later.
    sqlx::query("UPDATE warden.leases SET lease_expires_at = now() - interval '1 second' WHERE partition = $1")
        .bind(f.partition as i32)
        .execute(&db.pool)
        .await
        .unwrap();
    let skipped = tokio::time::timeout(Duration::from_secs(2), s.acquire("b/1", &[f.partition], TTL))
        .await
        .expect("acquire must not block on a locked lease row")
        .unwrap();
    assert!(skipped.is_empty(), "a lease row under a fence lock is not taken over");
    tx.commit().await.unwrap();
    let granted = s.acquire("b/1", &[f.partition], TTL).await.unwrap();
    assert_eq!(granted.len(), 1);
    assert_eq!(granted[0].epoch, f.epoch + 1);
}

/// `schema::reset` refuses while a lease is held. A lease taken while the reset
/// runs — after it counted the live leases, before its DROP — must not be dropped
/// from under its node: the check and the drop have to be one atomic step.
/// (Found in review: the count ran in autocommit, so an acquisition in flight was
/// invisible to it, and the DROP then waited for that acquisition's commit and
/// dropped the schema under a node that had just started executing.)
#[tokio::test]
async fn schema_reset_never_drops_a_lease_acquired_while_it_checks() {
    let (db, _store, _client) = setup(4).await;
    // A node acquiring a lease: its transaction has written the lease, not yet committed.
    let mut node = db.pool.begin().await.unwrap();
    sqlx::query(
        "UPDATE warden.leases SET owner_node = 'node-a', epoch = epoch + 1,
                lease_expires_at = now() + interval '1 hour' WHERE partition = 0",
    )
    .execute(&mut *node)
    .await
    .unwrap();
    let pool = db.pool.clone();
    let reset = tokio::spawn(async move { warden_runtime::schema::reset(&pool, false).await });
    // Let the reset reach its check (and block behind the acquisition), then commit it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    node.commit().await.unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(30), reset).await.unwrap().unwrap();
    let schema_left: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'warden')")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(
        matches!(outcome, Err(Error::Conflict(_))) && schema_left,
        "reset dropped the schema under a lease acquired while it checked: {outcome:?}, schema left: {schema_left}"
    );
}

/// `wait_finished` with "no limit" (`Duration::MAX`) waits; it must not panic
/// computing its deadline (`Instant + Duration::MAX` overflows).
#[tokio::test]
async fn wait_finished_accepts_an_unbounded_timeout() {
    let (_db, _store, client) = setup(4).await;
    let r = tokio::spawn(async move { client.wait_finished(&[424242], Duration::MAX).await }).await;
    assert!(matches!(r, Ok(Err(Error::JobNotFound(424242)))), "{r:?}");
}

/// The autoscaling count (`AdminStore::runnable_accounts`, the KEDA query): an account
/// counts once when a free slot would start one of its jobs now.
#[tokio::test]
async fn runnable_accounts_counts_accounts_a_free_slot_would_start() {
    use warden_runtime::store::{AdminStore, PgAdminStore};
    use warden_runtime::Lane;
    let (db, _s, client) = setup(16).await;
    let admin = PgAdminStore::from(&db.pool);
    let runnable = |ps: Option<Vec<u32>>, cap: i64| {
        let admin = &admin;
        async move { admin.runnable_accounts(ps.as_deref(), cap).await.unwrap() }
    };
    assert_eq!(runnable(None, 1000).await.total(), 0);
    let job = |account: &str| NewJob::new(account, "k", &serde_json::json!({})).unwrap();
    // due-1: two due serial jobs → one account.
    client.enqueue(job("due-1")).await.unwrap();
    client.enqueue(job("due-1")).await.unwrap();
    // busy: its head is running, the next one waits for it → not runnable.
    let head = client.enqueue(job("busy")).await.unwrap().id;
    client.enqueue(job("busy")).await.unwrap();
    sqlx::query("UPDATE warden.jobs SET state = 'running' WHERE id = $1").bind(head).execute(&db.pool).await.unwrap();
    // later: only a future job → not runnable.
    client.enqueue(job("later").run_at(chrono::Utc::now() + chrono::Duration::hours(1))).await.unwrap();
    // mixed: serial head running, but a due unordered job → runnable.
    let head = client.enqueue(job("mixed")).await.unwrap().id;
    sqlx::query("UPDATE warden.jobs SET state = 'running' WHERE id = $1").bind(head).execute(&db.pool).await.unwrap();
    client.enqueue(job("mixed").lane(Lane::Unordered)).await.unwrap();
    // backoff: a retryable head not yet due blocks the account.
    let head = client.enqueue(job("backoff")).await.unwrap().id;
    client.enqueue(job("backoff")).await.unwrap();
    sqlx::query("UPDATE warden.jobs SET state = 'retryable', due_at = now() + interval '1 hour' WHERE id = $1")
        .bind(head)
        .execute(&db.pool)
        .await
        .unwrap();
    // retry-due: a retryable head that is due → runnable.
    let head = client.enqueue(job("retry-due")).await.unwrap().id;
    sqlx::query("UPDATE warden.jobs SET state = 'retryable' WHERE id = $1").bind(head).execute(&db.pool).await.unwrap();
    // done: finished jobs never count.
    let done = client.enqueue(job("done")).await.unwrap().id;
    sqlx::query("UPDATE warden.jobs SET state = 'completed', finished_at = now() WHERE id = $1")
        .bind(done)
        .execute(&db.pool)
        .await
        .unwrap();

    let all = runnable(None, 1000).await;
    assert_eq!(all.runnable, 3, "due-1, mixed, retry-due: {all:?}");
    assert_eq!(all.running, 2, "busy, mixed: {all:?}");
    assert_eq!(all.total(), 5);
    let capped = runnable(None, 2).await;
    assert_eq!((capped.runnable, capped.running), (2, 2), "capped");
    let p = PartitionCount::new(16).unwrap();
    let of = |a: &str| warden_runtime::partition_of(a, p);
    let in_one = |q: u32| ["due-1", "mixed", "retry-due"].iter().filter(|a| of(a) == q).count() as i64;
    assert_eq!(runnable(Some(vec![of("due-1")]), 1000).await.runnable, in_one(of("due-1")));
    let quiet: Vec<u32> =
        (0..16).filter(|q| !["due-1", "mixed", "retry-due", "busy"].iter().any(|a| of(a) == *q)).collect();
    assert_eq!(runnable(Some(quiet), 1000).await.total(), 0);
}

// ---------------------------------------------------------------------------
// Idempotency keys (migration 0007). The shared rules are in the conformance suite;
// these are PostgreSQL's own: concurrency, the SQL function, pruning.

#[tokio::test]
async fn concurrent_enqueues_of_one_idempotency_key_insert_one_job_whatever_the_path() {
    let (db, _s, client) = setup(16).await;
    let mut tasks = Vec::new();
    for i in 0..24 {
        let (client, pool) = (client.clone(), db.pool.clone());
        tasks.push(tokio::spawn(async move {
            if i % 2 == 0 {
                let e = client
                    .enqueue(NewJob::new("idem-race", "step", i).unwrap().idempotency_key("pay-7"))
                    .await
                    .unwrap();
                (e.id, e.duplicate)
            } else {
                let (id, duplicate): (i64, bool) = sqlx::query_as(
                    "SELECT job_id, duplicate FROM warden.enqueue_idempotent('idem-race', 'step', 'pay-7')",
                )
                .fetch_one(&pool)
                .await
                .unwrap();
                (id, duplicate)
            }
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM warden.jobs WHERE account = 'idem-race'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(jobs, 1, "one job for one key: {results:?}");
    assert_eq!(results.iter().filter(|r| !r.1).count(), 1, "exactly one enqueue inserted: {results:?}");
    assert!(results.iter().all(|r| r.0 == results[0].0), "every enqueue names the same job: {results:?}");
}

#[tokio::test]
async fn an_idempotency_key_outlives_its_job_pruned_by_retention() {
    let (db, s, client) = setup(16).await;
    let first = client.enqueue(NewJob::new("idem-pruned", "step", ()).unwrap().idempotency_key("k")).await.unwrap();
    let fences = own_all(&s, "n1").await;
    let fence = fence_for(&fences, "idem-pruned", 16);
    let j = s.claim("idem-pruned", &fence).await.unwrap().unwrap();
    s.finish(None, &j, &fence, &Finish::Completed, false).await.unwrap();
    sqlx::query("UPDATE warden.jobs SET finished_at = now() - interval '30 days' WHERE id = $1")
        .bind(first.id)
        .execute(&db.pool)
        .await
        .unwrap();
    let admin = store::PgAdminStore::from(&db.pool);
    use warden_runtime::store::AdminStore;
    let pruned = admin.prune_finished(Duration::from_secs(7 * 86400), 100, None).await.unwrap();
    assert_eq!(pruned.jobs, 1);
    assert!(client.get(first.id).await.unwrap().is_none(), "the job is gone");
    let again = client.enqueue(NewJob::new("idem-pruned", "step", ()).unwrap().idempotency_key("k")).await.unwrap();
    assert_eq!((again.id, again.duplicate), (first.id, true), "the key still names it");
    let (id, dup): (i64, bool) =
        sqlx::query_as("SELECT job_id, duplicate FROM warden.enqueue_idempotent('idem-pruned', 'step', 'k')")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!((id, dup), (first.id, true));
}

#[tokio::test]
async fn expired_idempotency_keys_are_pruned_and_live_ones_kept() {
    let (db, _s, client) = setup(16).await;
    for i in 0..5 {
        let j = NewJob::new("idem-exp", "step", ()).unwrap().idempotency_key(format!("old-{i}"));
        client.enqueue(j.idempotency_keep(Duration::from_millis(1))).await.unwrap();
    }
    client.enqueue(NewJob::new("idem-exp", "step", ()).unwrap().idempotency_key("live")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    use warden_runtime::store::AdminStore;
    let admin = store::PgAdminStore::from(&db.pool);
    assert_eq!(admin.prune_idempotency_keys(3).await.unwrap(), 3, "a batch is bounded");
    assert_eq!(admin.prune_idempotency_keys(100).await.unwrap(), 2);
    assert_eq!(admin.prune_idempotency_keys(100).await.unwrap(), 0);
    let left: Vec<String> =
        sqlx::query_scalar("SELECT key FROM warden.idempotency_keys").fetch_all(&db.pool).await.unwrap();
    assert_eq!(left, ["live"]);
}

#[tokio::test]
async fn enqueue_idempotent_in_sql_checks_its_input() {
    let (db, _s, _c) = setup(16).await;
    for (sql, says) in [
        ("SELECT * FROM warden.enqueue_idempotent('a', 'k', '')", "key must be"),
        ("SELECT * FROM warden.enqueue_idempotent('a', 'k', NULL)", "key must be"),
        ("SELECT * FROM warden.enqueue_idempotent('', 'k', 'x')", "account must be"),
        ("SELECT * FROM warden.enqueue_idempotent('a', 'k', 'x', p_keep => interval '0')", "p_keep"),
        ("SELECT * FROM warden.enqueue_idempotent('a', 'k', 'x', p_keep => interval '4000 days')", "p_keep"),
        ("SELECT * FROM warden.enqueue_idempotent('a', 'k', 'x', p_lane => 'fast')", "lane must be"),
        ("SELECT * FROM warden.enqueue_idempotent('a', 'k', 'x', p_timeout_ms => 0)", "timeout_ms"),
    ] {
        let err = sqlx::query(sql).execute(&db.pool).await.unwrap_err().to_string();
        assert!(err.contains(says), "{sql}: {err}");
    }
    let (id, dup): (i64, bool) = sqlx::query_as(
        "SELECT job_id, duplicate FROM warden.enqueue_idempotent('a', 'k', 'x', '{\"n\": 1}', p_lane => 'unordered')",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(!dup);
    let (lane, args): (String, serde_json::Value) =
        sqlx::query_as("SELECT lane, args FROM warden.jobs WHERE id = $1").bind(id).fetch_one(&db.pool).await.unwrap();
    assert_eq!((lane.as_str(), args), ("unordered", serde_json::json!({ "n": 1 })));
}

#[tokio::test]
async fn enqueue_idempotent_in_sql_resolves_kind_defaults_like_warden_enqueue() {
    // A kind published with its own options (a node registered it): warden.enqueue
    // uses them when the caller passes none; warden.enqueue_idempotent must too,
    // not 25 attempts / 60 s.
    let (db, _s, _c) = setup(16).await;
    sqlx::query(
        "INSERT INTO warden.kinds (kind, max_attempts, timeout_ms, updated_by) VALUES ('long', 3, 600000, 'n1')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let plain: i64 = sqlx::query_scalar("SELECT warden.enqueue('a', 'long')").fetch_one(&db.pool).await.unwrap();
    let (keyed, _): (i64, bool) =
        sqlx::query_as("SELECT job_id, duplicate FROM warden.enqueue_idempotent('a', 'long', 'x')")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    let opts = |id: i64| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_as::<_, (i32, i32)>("SELECT max_attempts, timeout_ms FROM warden.jobs WHERE id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    assert_eq!(opts(plain).await, (3, 600000));
    assert_eq!(opts(keyed).await, (3, 600000), "the kind's options, as warden.enqueue");
    // Explicit values win, as in warden.enqueue.
    let (explicit, _): (i64, bool) = sqlx::query_as(
        "SELECT job_id, duplicate FROM warden.enqueue_idempotent('a', 'long', 'y', p_max_attempts => 7, p_timeout_ms => 1000)",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(opts(explicit).await, (7, 1000));
    // run_at is bounded as in warden.enqueue, with the same clear error.
    let err = sqlx::query("SELECT * FROM warden.enqueue_idempotent('a', 'long', 'z', p_run_at => '1900-01-01')")
        .execute(&db.pool)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("run_at must be"), "{err}");
}

#[tokio::test]
async fn a_batch_mixing_keyed_and_unkeyed_jobs_over_many_accounts_keeps_input_order() {
    // More accounts than ENQUEUE_LOCK_BATCH (the group-lock statement), keys repeated
    // within the batch, keys already taken, unique keys, plain jobs: every inserted
    // job's id follows input order, and every duplicate names its key's job.
    let (db, _s, client) = setup(16).await;
    let before = client.enqueue(NewJob::new("mix-0", "step", ()).unwrap().idempotency_key("taken")).await.unwrap();
    let held = client.enqueue(NewJob::new("mix-1", "step", ()).unwrap().unique_key("u")).await.unwrap();
    let mut batch = Vec::new();
    for i in 0..300 {
        let account = format!("mix-{}", i % 100);
        let j = NewJob::new(account, "step", i).unwrap();
        batch.push(match i % 5 {
            0 => j.idempotency_key(format!("k-{}", i % 40)), // repeats within the batch
            1 => j.idempotency_key("taken"),                 // taken only for mix-0
            2 => j.unique_key("u"),                          // held only for mix-1
            _ => j,
        });
    }
    let out = client.enqueue_many(&batch).await.unwrap();
    assert_eq!(out.len(), batch.len());
    let fresh: Vec<i64> = out.iter().filter(|e| !e.duplicate).map(|e| e.id).collect();
    assert!(fresh.windows(2).all(|w| w[0] < w[1]), "inserted ids follow input order: {fresh:?}");
    assert!(fresh[0] > held.id);
    let mut first_of: std::collections::HashMap<(String, String), i64> = Default::default();
    for (j, e) in batch.iter().zip(&out) {
        let key = j.idempotency_key.clone().or(j.unique_key.clone());
        if let Some(k) = key {
            let seen = first_of.get(&(j.account.clone(), k.clone())).copied();
            if j.account == "mix-0" && k == "taken" {
                assert_eq!((e.id, e.duplicate), (before.id, true));
            } else if j.account == "mix-1" && k == "u" {
                assert_eq!((e.id, e.duplicate), (held.id, true));
            } else if let Some(first) = seen {
                assert_eq!((e.id, e.duplicate), (first, true), "{j:?}");
            } else {
                assert!(!e.duplicate, "the first of its key is inserted: {j:?}");
            }
            first_of.entry((j.account.clone(), k)).or_insert(e.id);
        }
        let row = client.get(e.id).await.unwrap().expect("every returned id is a job");
        assert_eq!(row.account, j.account, "{e:?} belongs to {j:?}");
    }
    // One job per (account, key), and the job's args are its first input's.
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM warden.jobs WHERE account LIKE 'mix-%'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(jobs as usize, 2 + fresh.len());
    for (j, e) in batch.iter().zip(&out).filter(|(_, e)| !e.duplicate) {
        let row = client.get(e.id).await.unwrap().unwrap();
        assert_eq!(row.args, j.args, "job {} carries its own input's args", e.id);
    }
}

#[tokio::test]
async fn an_idempotency_key_held_by_a_transaction_that_rolls_back_goes_to_the_waiting_enqueuer() {
    // T1 enqueues key K in the caller's transaction and holds it; T2 (the client, and
    // the SQL function) enqueues K meanwhile and waits. T1 rolls back: T2 must insert
    // its own job, not return T1's vanished id as a duplicate.
    for sql in [false, true] {
        let (db, _s, client) = setup(16).await;
        let mut tx = db.pool.begin().await.unwrap();
        let t1 =
            client.enqueue_in(&mut tx, NewJob::new("idem-rb", "step", 1).unwrap().idempotency_key("K")).await.unwrap();
        let (c2, pool) = (client.clone(), db.pool.clone());
        let t2 = tokio::spawn(async move {
            if sql {
                sqlx::query_as::<_, (i64, bool)>(
                    "SELECT job_id, duplicate FROM warden.enqueue_idempotent('idem-rb', 'step', 'K')",
                )
                .fetch_one(&pool)
                .await
                .unwrap()
            } else {
                let e = c2.enqueue(NewJob::new("idem-rb", "step", 2).unwrap().idempotency_key("K")).await.unwrap();
                (e.id, e.duplicate)
            }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!t2.is_finished(), "T2 waits for T1");
        tx.rollback().await.unwrap();
        let (id, dup) = t2.await.unwrap();
        assert!(!dup && id != t1.id, "T2 inserted its own job ({id}, {dup}) after T1 ({}) rolled back", t1.id);
        assert!(client.get(id).await.unwrap().is_some());
        let holder: i64 =
            sqlx::query_scalar("SELECT job_id FROM warden.idempotency_keys WHERE account = 'idem-rb' AND key = 'K'")
                .fetch_one(&db.pool)
                .await
                .unwrap();
        assert_eq!(holder, id);
    }
}

/// Batched claims (`store::pg::claims`, `claim_many.sql`) give each account exactly
/// what a lone claim (`claim.sql`) gives: its due serial head, a due unordered job, an
/// adoption of its job already running at this epoch, nothing behind a retrying head
/// or before a scheduled time, and a refusal under a fence that does not hold.
#[tokio::test]
async fn a_batched_claim_gives_each_account_what_a_lone_claim_would() {
    let (_db, s, client) = setup(8).await;
    let fences = own_all(&s, "n/1").await;
    let f = |a: &str| fence_for(&fences, a, 8);
    let mut plain = Vec::new();
    for i in 0..20 {
        plain.push(client.enqueue(NewJob::new(format!("a{i}"), "k", i).unwrap()).await.unwrap().id);
    }
    // Claimed already (a claim whose reply was lost): adopted, one more attempt.
    let adopt = client.enqueue(NewJob::new("adopt", "k", ()).unwrap()).await.unwrap().id;
    assert_eq!(s.claim("adopt", &f("adopt")).await.unwrap().unwrap().attempt, 1);
    // A head retrying in an hour blocks the job behind it.
    let blocked: Vec<i64> = client
        .enqueue_many(&[NewJob::new("blocked", "k", 0).unwrap(), NewJob::new("blocked", "k", 1).unwrap()])
        .await
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    let head = s.claim("blocked", &f("blocked")).await.unwrap().unwrap();
    assert_eq!(head.id, blocked[0]);
    let retry = Finish::Retry { after: Duration::from_secs(3600), outcome: "failed", error: "later".into() };
    assert!(s.finish(None, &head, &f("blocked"), &retry, true).await.unwrap().into_next().is_none());
    let unordered = client
        .enqueue(NewJob::new("unord", "k", ()).unwrap().lane(warden_runtime::Lane::Unordered))
        .await
        .unwrap()
        .id;
    client
        .enqueue(NewJob::new("later", "k", ()).unwrap().run_at(chrono::Utc::now() + chrono::Duration::hours(1)))
        .await
        .unwrap();
    client.enqueue(NewJob::new("stale", "k", ()).unwrap()).await.unwrap();
    let stale = Fence { epoch: f("stale").epoch + 7, ..f("stale") };

    let mut accounts: Vec<String> = (0..20).map(|i| format!("a{i}")).collect();
    accounts.extend(["adopt", "blocked", "unord", "later", "empty"].map(String::from));
    let fs: Vec<Fence> = accounts.iter().map(|a| f(a)).collect();
    let mut req: Vec<(&str, &Fence)> = accounts.iter().map(String::as_str).zip(fs.iter()).collect();
    req.push(("stale", &stale));
    let out = s.claim_together(&req).await.unwrap();
    assert_eq!(out.len(), req.len());
    let got = |i: usize| out[i].as_ref().unwrap().as_ref().map(|j| (j.id, j.attempt, j.account.clone()));
    for (i, id) in plain.iter().enumerate() {
        assert_eq!(got(i), Some((*id, 1, format!("a{i}"))), "a{i}: its due head");
    }
    assert_eq!(got(20), Some((adopt, 2, "adopt".into())), "adopted, counted");
    assert_eq!(got(21), None, "nothing runs behind a retrying head");
    assert_eq!(got(22), Some((unordered, 1, "unord".into())), "a due unordered job");
    assert_eq!(got(23), None, "not due yet");
    assert_eq!(got(24), None, "no job");
    assert!(matches!(out[25], Err(Error::Fenced { .. })), "a fence that does not hold: {:?}", out[25]);
    for (i, id) in plain.iter().enumerate() {
        let j = client.get(*id).await.unwrap().unwrap();
        assert_eq!((j.state.as_str(), j.attempt, j.epoch), ("running", 1, Some(fs[i].epoch)), "a{i}");
    }
    assert_eq!(client.get(blocked[1]).await.unwrap().unwrap().state, "available");
    // Claiming again (the batch's reply lost) adopts the same jobs.
    let again = s.claim_together(&req[..20]).await.unwrap();
    for (i, id) in plain.iter().enumerate() {
        let j = again[i].as_ref().unwrap().as_ref().unwrap();
        assert_eq!((j.id, j.attempt), (*id, 2), "a{i}: adopted");
    }
    // Misuse is refused before the database.
    assert!(matches!(s.claim_together(&[("a0", &fs[0]), ("a0", &fs[0])]).await, Err(Error::InvalidInput(_))));
}

/// Claims arriving while one is in flight travel together: with the first claim
/// stuck behind a lock, 40 more actors' claims wait in the node's queue, not in 40
/// statements, and each gets its own account's job once the lock goes.
#[tokio::test]
async fn claims_made_while_one_is_in_flight_go_in_one_statement() {
    let (db, s, client) = setup(8).await;
    let fences = own_all(&s, "n/1").await;
    let accounts: Vec<String> = (0..41).map(|i| format!("c{i}")).collect();
    let mut ids = std::collections::HashMap::new();
    for a in &accounts {
        ids.insert(a.clone(), client.enqueue(NewJob::new(a.clone(), "k", ()).unwrap()).await.unwrap().id);
    }
    let mut lock = db.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE warden.leases IN ACCESS EXCLUSIVE MODE").execute(&mut *lock).await.unwrap();
    let mut tasks = Vec::new();
    for a in &accounts {
        let (s, a, f) = (s.clone(), a.clone(), fence_for(&fences, a, 8));
        tasks.push(tokio::spawn(async move { (a.clone(), s.claim(&a, &f).await) }));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let waiting: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND query LIKE '%Claim%'
           AND state = 'active' AND wait_event_type = 'Lock'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(waiting, 1, "one claim statement in flight, the others queued behind it");
    lock.rollback().await.unwrap();
    for t in tasks {
        let (a, r) = t.await.unwrap();
        let j = r.unwrap().unwrap_or_else(|| panic!("{a}: claimed nothing"));
        assert_eq!((j.id, j.account.as_str(), j.attempt), (ids[&a], a.as_str(), 1));
    }
}
