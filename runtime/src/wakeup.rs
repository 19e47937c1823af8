//! Wake-ups by LISTEN/NOTIFY. Enqueues NOTIFY `partition:account` on
//! `warden_wake`; this task routes each to the account's actor if this node holds
//! the partition. Cancel requests (`warden_cancel`) go to the running actor; lease
//! releases (`warden_lease`) poke the enforcer.
//!
//! A lost notification only delays work: the enforcer polls, and after every
//! (re)connect of the listener — when notifications may have been missed — it
//! runs a full due-work scan at once.

use crate::account_actor::AccountActors;
use crate::lease::LeaseTable;
use crate::store::{CHANNEL_CANCEL, CHANNEL_LEASE, CHANNEL_WAKE};
use sqlx::postgres::{PgListener, PgPool};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub async fn listen(
    pool: PgPool,
    leases: Arc<LeaseTable>,
    actors: Arc<AccountActors>,
    poke_enforcer: Arc<Notify>,
    rescan: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut listener = match connect(&pool).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "wake-up listener could not connect; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        // Anything sent while we were not listening is lost: rescan everything.
        rescan.notify_one();
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => return,
                n = listener.try_recv() => n,
            };
            match next {
                Ok(Some(n)) => route(n.channel(), n.payload(), &leases, &actors, &poke_enforcer).await,
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
}

async fn connect(pool: &PgPool) -> Result<PgListener, sqlx::Error> {
    let mut l = PgListener::connect_with(pool).await?;
    l.ignore_pool_close_event(true);
    l.listen_all([CHANNEL_WAKE, CHANNEL_CANCEL, CHANNEL_LEASE]).await?;
    Ok(l)
}

async fn route(channel: &str, payload: &str, leases: &LeaseTable, actors: &Arc<AccountActors>, poke: &Notify) {
    match channel {
        CHANNEL_WAKE => {
            let Some((p, account)) = payload.split_once(':') else { return };
            let Ok(p) = p.parse::<u32>() else { return };
            if leases.holds(p) {
                actors.wake(account, p).await;
            }
        }
        CHANNEL_CANCEL => {
            let mut parts = payload.splitn(3, ':');
            let (Some(_p), Some(id), Some(account)) = (parts.next(), parts.next(), parts.next()) else { return };
            if let Ok(id) = id.parse::<i64>() {
                actors.cancel(account, id);
            }
        }
        CHANNEL_LEASE => poke.notify_one(),
        _ => {}
    }
}
