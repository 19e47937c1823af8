//! Wake-ups by LISTEN/NOTIFY. Enqueues NOTIFY `partition:account` on
//! `warden_wake`; this task routes each to the account's actor if this node holds
//! the partition. Cancel requests (`warden_cancel`) go to the running actor; lease
//! releases (`warden_lease`) poke the enforcer.
//!
//! A lost notification only delays work: the enforcer polls, and after every
//! (re)connect of the listener — when notifications may have been missed — it
//! runs a full due-work scan at once.
//!
//! Notifications are hints, never instructions: any role that can connect may
//! NOTIFY. A payload is acted on only if it parses, names a valid account whose
//! partition (by the hash) is the one it claims and is held here; even then it only
//! makes the account's actor *look* (claim — which itself checks the job's partition
//! against its fence — or re-read a cancel request). Wake-ups are bounded: the
//! listener only parses and queues them (deduplicated, at most [`MAX_PENDING_WAKES`]),
//! so it keeps up with any flood; past the bound they are dropped and one due-work
//! scan stands in for all of them.

use crate::account_actor::AccountActors;
use crate::lease::LeaseTable;
use crate::store::{CHANNEL_CANCEL, CHANNEL_LEASE, CHANNEL_WAKE};
use sqlx::postgres::{PgListener, PgPool};
use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use warden_cluster::{partition_of, PartitionCount};

/// Distinct (partition, account) wake-ups queued at most; beyond, they are dropped
/// and a due-work scan is asked for instead.
pub const MAX_PENDING_WAKES: usize = 4096;

/// The bounded, deduplicated queue between the listener and the task that wakes actors.
#[derive(Default)]
struct WakeQueue {
    inner: Mutex<PendingWakes>,
    ready: Notify,
}

/// Queued (partition, account) wake-ups, in order and as a set.
#[derive(Default)]
struct PendingWakes {
    order: VecDeque<(u32, String)>,
    queued: HashSet<(u32, String)>,
}

impl WakeQueue {
    /// False if the queue is full (the wake-up is dropped).
    fn push(&self, partition: u32, account: &str) -> bool {
        let mut q = self.inner.lock().unwrap();
        let key = (partition, account.to_string());
        if q.queued.contains(&key) {
            return true;
        }
        if q.order.len() >= MAX_PENDING_WAKES {
            return false;
        }
        q.queued.insert(key.clone());
        q.order.push_back(key);
        drop(q);
        self.ready.notify_one();
        true
    }

    fn pop(&self) -> Option<(u32, String)> {
        let mut q = self.inner.lock().unwrap();
        let key = q.order.pop_front()?;
        q.queued.remove(&key);
        Some(key)
    }
}

/// A parsed, validated notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hint {
    Wake { partition: u32, account: String },
    Cancel { partition: u32, job_id: i64, account: String },
    LeaseReleased,
}

/// Parse a notification; `None` for anything malformed or inconsistent (a wrong
/// partition for the account, an invalid account).
pub fn parse(channel: &str, payload: &str, partitions: PartitionCount) -> Option<Hint> {
    let account_in = |p: u32, account: &str| {
        crate::job::validate_name("account", account, crate::job::MAX_ACCOUNT_BYTES).is_ok()
            && partition_of(account, partitions) == p
    };
    match channel {
        CHANNEL_WAKE => {
            let (p, account) = payload.split_once(':')?;
            let p = p.parse::<u32>().ok()?;
            account_in(p, account).then(|| Hint::Wake { partition: p, account: account.to_string() })
        }
        CHANNEL_CANCEL => {
            let mut parts = payload.splitn(3, ':');
            let (p, id, account) = (parts.next()?, parts.next()?, parts.next()?);
            let (p, job_id) = (p.parse::<u32>().ok()?, id.parse::<i64>().ok()?);
            account_in(p, account).then(|| Hint::Cancel { partition: p, job_id, account: account.to_string() })
        }
        CHANNEL_LEASE => Some(Hint::LeaseReleased),
        _ => None,
    }
}
use crate::handler::Backoff;
use std::time::Duration;
use tokio::sync::Notify;

/// Reconnects of the listener after failures in a row: 100 ms doubling to 2 s.
const RECONNECT: Backoff = Backoff::doubling(Duration::from_millis(100), Duration::from_secs(2));
use tokio_util::sync::CancellationToken;

pub async fn listen(
    pool: PgPool,
    leases: Arc<LeaseTable>,
    actors: Arc<AccountActors>,
    poke_enforcer: Arc<Notify>,
    rescan: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let queue = Arc::new(WakeQueue::default());
    let waker = tokio::spawn(wake_actors(queue.clone(), leases.clone(), actors.clone(), shutdown.clone()));
    let partitions = actors.partitions();
    let mut failures = 0;
    loop {
        let mut listener = match connect(&pool).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "wake-up listener could not connect; retrying");
                failures = (failures + 1).min(64);
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(RECONNECT.without_jitter(failures)) => {}
                }
                continue;
            }
        };
        failures = 0;
        // Anything sent while we were not listening is lost: rescan everything.
        rescan.notify_one();
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => { waker.abort(); return; }
                n = listener.try_recv() => n,
            };
            match next {
                Ok(Some(n)) => route(
                    parse(n.channel(), n.payload(), partitions),
                    &leases,
                    &actors,
                    &queue,
                    &poke_enforcer,
                    &rescan,
                ),
                Ok(None) => {
                    tracing::warn!("wake-up listener lost its connection; reconnecting and rescanning");
                    metrics::counter!("warden_listener_reconnects_total").increment(1);
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "wake-up listener failed; reconnecting and rescanning");
                    metrics::counter!("warden_listener_reconnects_total").increment(1);
                    break;
                }
            }
        }
    }
    waker.abort();
}

async fn connect(pool: &PgPool) -> Result<PgListener, sqlx::Error> {
    let mut l = PgListener::connect_with(pool).await?;
    l.ignore_pool_close_event(true);
    l.listen_all([CHANNEL_WAKE, CHANNEL_CANCEL, CHANNEL_LEASE]).await?;
    Ok(l)
}

/// Act on one hint without waiting on anything: the listener must keep up.
fn route(
    hint: Option<Hint>,
    leases: &LeaseTable,
    actors: &AccountActors,
    queue: &WakeQueue,
    poke: &Notify,
    rescan: &Notify,
) {
    match hint {
        None => metrics::counter!("warden_notifications_ignored_total").increment(1),
        Some(Hint::Wake { partition, account }) => {
            if leases.holds(partition) && !queue.push(partition, &account) {
                metrics::counter!("warden_wakeups_dropped_total").increment(1);
                rescan.notify_one();
            }
        }
        Some(Hint::Cancel { partition, job_id, account }) => {
            if leases.holds(partition) {
                actors.cancel(&account, job_id);
            }
        }
        Some(Hint::LeaseReleased) => poke.notify_one(),
    }
}

/// Wake (or spawn) the actors of queued wake-ups, one at a time.
async fn wake_actors(
    queue: Arc<WakeQueue>,
    leases: Arc<LeaseTable>,
    actors: Arc<AccountActors>,
    shutdown: CancellationToken,
) {
    loop {
        while let Some((partition, account)) = queue.pop() {
            if leases.holds(partition) {
                actors.wake_hinted(&account, partition).await;
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = queue.ready.notified() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_consistent_payloads_become_hints() {
        let p = PartitionCount::new(64).unwrap();
        let right = partition_of("victim", p);
        let wrong = (right + 1) % 64;
        assert_eq!(
            parse(CHANNEL_WAKE, &format!("{right}:victim"), p),
            Some(Hint::Wake { partition: right, account: "victim".into() })
        );
        assert_eq!(parse(CHANNEL_WAKE, &format!("{wrong}:victim"), p), None, "wrong partition for the account");
        assert_eq!(parse(CHANNEL_WAKE, "garbage", p), None);
        assert_eq!(parse(CHANNEL_WAKE, &format!("{right}:"), p), None);
        assert_eq!(parse(CHANNEL_WAKE, &format!("{}:{}", right, "x".repeat(300)), p), None, "account too long");
        assert_eq!(parse(CHANNEL_CANCEL, &format!("{wrong}:7:victim"), p), None);
        assert_eq!(parse(CHANNEL_CANCEL, &format!("{right}:x:victim"), p), None);
        assert_eq!(
            parse(CHANNEL_CANCEL, &format!("{right}:7:victim"), p),
            Some(Hint::Cancel { partition: right, job_id: 7, account: "victim".into() })
        );
        assert_eq!(parse("other", "1:a", p), None);
        assert_eq!(parse(CHANNEL_LEASE, "anything", p), Some(Hint::LeaseReleased));
    }

    #[test]
    fn the_wake_queue_is_bounded_and_deduplicated() {
        let q = WakeQueue::default();
        for i in 0..MAX_PENDING_WAKES {
            assert!(q.push(1, &format!("a{i}")));
        }
        assert!(q.push(1, "a0"), "a duplicate is absorbed even when full");
        assert!(!q.push(1, "one-too-many"), "beyond the bound a wake-up is dropped");
        assert_eq!(q.pop(), Some((1, "a0".into())));
        assert!(q.push(1, "one-too-many"));
    }
}
