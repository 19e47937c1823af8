//! Cluster logic in-process: three nodes gossiping over chitchat's in-memory
//! transport (which can cut links) and sharing one PostgreSQL. A gossip partition
//! makes the two sides disagree about who should own what — the leases must still
//! keep every account on one executor at a time.

use std::net::SocketAddr;
use std::time::Duration;
use warden_cluster::membership::ChannelTransport;
use warden_cluster::{GossipConfig, GossipMembership};
use warden_runtime::node::ClusterOptions;
use warden_runtime::{history, NewJob, Node};
use warden_tests::workload::{self, Audit, AuditArgs};
use warden_tests::{count_state, eventually, owners, TestDb};

const P: u32 = 32;

fn addr(port: u16) -> SocketAddr {
    ([127, 0, 0, 1], port).into()
}

async fn start_node(db: &TestDb, t: &ChannelTransport, id: &str, port: u16) -> Node {
    let mut g = GossipConfig::new(id, addr(port));
    g.seeds = vec!["127.0.0.1:7001".into()];
    g.gossip_interval = Duration::from_millis(20);
    let membership = GossipMembership::start(g, t).await.unwrap();
    let config = warden_tests::fast_node_config(id, P);
    Node::builder(config)
        .cluster(membership, ClusterOptions { settle_delay: Duration::from_millis(200), ..Default::default() })
        .register(Audit { node: id.into(), pool: db.pool.clone() })
        .unwrap()
        .start(db.node_pool().await)
        .await
        .unwrap()
}

async fn wait_owners(db: &TestDb, n: usize) {
    eventually(Duration::from_secs(30), &format!("{P} partitions over {n} nodes"), || async {
        let o = owners(&db.pool).await;
        let distinct: std::collections::BTreeSet<&String> = o.values().collect();
        (o.len() == P as usize && distinct.len() == n).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_gossip_partition_never_yields_two_owners() {
    let db = TestDb::new().await;
    workload::migrate(&db.pool).await.unwrap();
    let t = ChannelTransport::with_mtu(65_000);
    let n1 = start_node(&db, &t, "n1", 7001).await;
    let n2 = start_node(&db, &t, "n2", 7002).await;
    let n3 = start_node(&db, &t, "n3", 7003).await;
    wait_owners(&db, 3).await;
    let ring = n1.ring().unwrap();
    assert_eq!(ring.members().len(), 3);

    let mut jobs = Vec::new();
    for seq in 0..30 {
        for a in 0..40 {
            jobs.push(
                NewJob::new(
                    format!("acct-{a}"),
                    "audit",
                    AuditArgs { seq, sleep_ms: 5, fail_times: 0, ..Default::default() },
                )
                .unwrap(),
            );
        }
    }
    let total = jobs.len() as i64;
    n1.client().enqueue_many(&jobs).await.unwrap();

    // n1 can no longer gossip with n2 and n3: each side thinks the other is dead
    // and computes a ring that claims the other side's partitions.
    for other in [7002, 7003] {
        t.remove_link(addr(7001), addr(other)).await;
    }
    eventually(Duration::from_secs(20), "n1 alone in its ring", || async {
        n1.ring().filter(|r| r.members().len() == 1).map(|_| ())
    })
    .await;
    eventually(Duration::from_secs(20), "n2 and n3 without n1", || async {
        n2.ring().filter(|r| r.members().len() == 2).map(|_| ())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Every partition still has exactly one lease holder (the table's primary key),
    // and nobody stole a partition whose holder keeps renewing.
    let o = owners(&db.pool).await;
    assert_eq!(o.len(), P as usize, "no partition was left without an owner");
    for other in [7002, 7003] {
        t.add_link(addr(7001), addr(other)).await;
    }
    wait_owners(&db, 3).await;
    eventually(Duration::from_secs(60), "all jobs done", || async {
        (count_state(&db.pool, "completed").await == total).then_some(())
    })
    .await;
    let h = history::check(&db.pool).await.unwrap();
    assert!(h.is_clean(), "{h:?}");
    let audit = workload::check(&db.pool).await.unwrap();
    assert_eq!(
        (audit.rows, audit.duplicate_jobs, audit.overlaps, audit.order_violations),
        (total, 0, 0, 0),
        "{audit:?}"
    );
    for n in [n1, n2, n3] {
        n.shutdown().await.unwrap();
    }
}

/// A member that gossips `active` as this release does but never reaches the database
/// — a node whose database connections all fail, or a phantom — owns nothing: placement counts only
/// members proven in `warden.members`. Before, it kept its ring share and nobody
/// took those partitions (~1/(N+1) of them stalled for as long as it gossiped).
#[tokio::test]
async fn a_member_that_only_gossips_owns_nothing() {
    let db = TestDb::new().await;
    workload::migrate(&db.pool).await.unwrap();
    let t = ChannelTransport::with_mtu(65_000);
    let n1 = start_node(&db, &t, "n1", 7001).await;
    let n2 = start_node(&db, &t, "n2", 7002).await;
    // The phantom: gossip only, announcing itself active with this version's ring.
    let mut g = GossipConfig::new("phantom", addr(7009));
    g.seeds = vec!["127.0.0.1:7001".into()];
    g.gossip_interval = Duration::from_millis(20);
    g.ring = Some(warden_cluster::RingConfig::default().fingerprint());
    g.schema = Some(warden_runtime::schema::binary_version());
    let phantom = GossipMembership::start(g, &t).await.unwrap();
    use warden_cluster::Membership;
    phantom.set_state(warden_cluster::MemberState::Active).await;
    eventually(Duration::from_secs(10), "the phantom is seen as active", || async {
        n1.membership().and_then(|m| {
            m.view()
                .borrow()
                .iter()
                .any(|m| m.node_id == "phantom" && m.state == warden_cluster::MemberState::Active)
                .then_some(())
        })
    })
    .await;
    wait_owners(&db, 2).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let o = owners(&db.pool).await;
    assert_eq!(o.len(), P as usize, "every partition is held: {o:?}");
    assert!(o.values().all(|n| n == "n1" || n == "n2"));
    let ring = n1.ring().unwrap();
    assert_eq!(ring.members(), ["n1".to_string(), "n2".to_string()], "the phantom is not on the ring");
    let jobs = warden_tests::audit_jobs(40, 5, 1);
    let total = jobs.len() as i64;
    n1.client().enqueue_many(&jobs).await.unwrap();
    eventually(Duration::from_secs(60), "all jobs done", || async {
        (count_state(&db.pool, "completed").await == total).then_some(())
    })
    .await;
    phantom.shutdown().await;
    for n in [n1, n2] {
        n.shutdown().await.unwrap();
    }
}

/// `/readyz` promises "active and holding every partition the ring assigns it". A
/// node turns active before any ring that includes it has been computed (its own
/// ring is still the one without it, which assigns it nothing), so a latch taken
/// then says ready with nothing held — a Kubernetes rollout would then stop an old
/// pod before the new one took anything over. Poll readiness as fast as a probe
/// could and check what the node holds the first time it says ready.
#[tokio::test]
async fn a_node_says_ready_only_once_it_holds_what_the_ring_assigns_it() {
    let db = TestDb::new().await;
    workload::migrate(&db.pool).await.unwrap();
    let t = ChannelTransport::with_mtu(65_000);
    let first_ready = |n: Node| async move {
        eventually(Duration::from_secs(30), "ready", || {
            let n = n.clone();
            async move {
                let r = n.is_ready();
                // What a probe would see the moment it gets 200.
                let held = n.held_partitions().len();
                let in_ring = n.ring().is_some_and(|r| r.members().iter().any(|m| m == &n.config().node_id));
                r.then_some((held, in_ring))
            }
        })
        .await
    };
    let n1 = start_node(&db, &t, "n1", 7001).await;
    let (held, in_ring) = first_ready(n1.clone()).await;
    assert!(in_ring && held == P as usize, "the first node said ready holding {held}/{P} (in its ring: {in_ring})");
    wait_owners(&db, 1).await;
    let n2 = start_node(&db, &t, "n2", 7002).await;
    let (held, in_ring) = first_ready(n2.clone()).await;
    let assigned = n2.ring().map(|r| r.partitions_of("n2").len()).unwrap_or(0);
    assert!(
        in_ring && assigned > 0 && held >= assigned,
        "the joining node said ready holding {held} of the {assigned} partitions assigned to it (in its ring: {in_ring})"
    );
    n2.shutdown().await.unwrap();
    n1.shutdown().await.unwrap();
}
