//! Claim batching: the claims a node's account actors make while one claim statement
//! is in flight go to the database together, in one statement
//! (`sql/claim_many.sql`), instead of one round trip and one fenced statement each.
//!
//! A burst of wake-ups — a scheduler pass firing a partition's due schedules, a batch
//! enqueue across accounts, a partition acquired with work waiting — wakes many
//! idle actors at once, and each must claim before it can run anything (its later
//! jobs come with its finishes, `finish.sql`). At 100,000 per-account schedules a
//! minute that was one claim statement per job, about a third of the database's
//! time per fire.
//!
//! Invariants:
//! - Per request, the result is exactly what `claim.sql` gives (same fence, same
//!   adoption of a job already running at this epoch, same head rule): batching
//!   changes how claims travel, not what they do. A lone claim still uses
//!   `claim.sql` itself.
//! - No timer: at most one claim statement is in flight per store, and a claim that
//!   finds none in flight starts one at once, so an idle node adds no latency; under
//!   load the batches grow by themselves (the busier the database, the more claims
//!   each statement carries).
//! - A batch never holds the same (partition, account) twice: the later request
//!   waits for the next batch (an account has one actor, which has one claim in
//!   flight, so this only happens around an actor's restart).
//! - A batch that fails for good (a row no statement can update) is split into single
//!   claims, so one bad row fails only its own claim. A transient failure (a lost
//!   reply: the batch may have committed) fails every request in it; each actor
//!   retries, and its retry adopts whatever the batch claimed for it.
//! - The statement runs in its own task, not in a caller's: a caller that gives up
//!   (its future dropped) cannot strand the others. What it leaves — at worst a job
//!   running at this epoch with no attempt — is adopted by the account's next claim,
//!   as after a dropped single claim.

use super::executor::CLAIM_SQL;
use super::PgStore;
use crate::error::{Error, Result};
use crate::job::JobRow;
use crate::store::Fence;
use sqlx::Row;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

/// Claims one statement carries at most.
pub const MAX_CLAIM_BATCH: usize = 128;

const CLAIM_MANY_SQL: &str = include_str!("../sql/claim_many.sql");

/// The queue of claims waiting for a statement (shared by the clones of a store).
#[derive(Debug, Default)]
pub(crate) struct ClaimBatcher {
    state: Mutex<BatchState>,
}

#[derive(Debug, Default)]
struct BatchState {
    queue: Vec<Request>,
    /// A task is sending batches (it stops when the queue is empty).
    running: bool,
}

#[derive(Debug)]
struct Request {
    account: String,
    fence: Fence,
    reply: oneshot::Sender<Result<Option<JobRow>>>,
}

/// Resets `running` if the draining task panics, so later claims start a new one;
/// the requests it held see their reply dropped (a transient error). (On a normal
/// end, [`ClaimBatcher::next_batch`] has reset it under the lock.)
struct Running(Arc<ClaimBatcher>);

impl Drop for Running {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut st = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
            st.running = false;
        }
    }
}

impl ClaimBatcher {
    /// Queue a claim; `true` if the caller must start the draining task.
    fn push(&self, r: Request) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.queue.push(r);
        !std::mem::replace(&mut st.running, true)
    }

    /// The next batch, in arrival order, at most [`MAX_CLAIM_BATCH`], no account
    /// twice, one owner (the first's: a node's fences all name the node, but a store
    /// may be shared); empty (and no longer running) when nothing waits.
    fn next_batch(&self) -> Vec<Request> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.queue.is_empty() {
            st.running = false;
            return Vec::new();
        }
        let owner = st.queue[0].fence.owner.clone();
        let mut seen = HashSet::new();
        let mut batch = Vec::new();
        let mut rest = Vec::new();
        for r in std::mem::take(&mut st.queue) {
            if batch.len() < MAX_CLAIM_BATCH
                && r.fence.owner == owner
                && seen.insert((r.fence.partition, r.account.clone()))
            {
                batch.push(r);
            } else {
                rest.push(r);
            }
        }
        st.queue = rest;
        batch
    }
}

/// A transient stand-in for an error that failed a whole batch (errors are not
/// `Clone`): the caller retries, as after any ambiguous claim.
fn batch_failed(e: &Error) -> Error {
    Error::Database(sqlx::Error::Io(std::io::Error::other(format!("batched claim failed: {e}"))))
}

impl PgStore {
    /// Claim through the batcher (see the module docs).
    pub(super) async fn claim_batched(&self, account: &str, fence: &Fence) -> Result<Option<JobRow>> {
        let (reply, rx) = oneshot::channel();
        let req = Request { account: account.to_string(), fence: fence.clone(), reply };
        if self.claims.push(req) {
            let store = self.clone();
            tokio::spawn(async move {
                let _running = Running(store.claims.clone());
                loop {
                    let batch = store.claims.next_batch();
                    if batch.is_empty() {
                        return;
                    }
                    store.claim_batch(batch).await;
                }
            });
        }
        rx.await.unwrap_or_else(|_| {
            Err(Error::Database(sqlx::Error::Io(std::io::Error::other("the claim batch ended without a reply"))))
        })
    }

    /// Claim for several accounts in one statement, as the batcher does (one owner;
    /// no account twice, or [`Error::InvalidInput`]); results in request order. For
    /// tests and tools: actors claim through [`crate::store::Store::claim`].
    pub async fn claim_together(&self, requests: &[(&str, &Fence)]) -> Result<Vec<Result<Option<JobRow>>>> {
        let mut seen = HashSet::new();
        for (account, fence) in requests {
            if fence.owner != requests[0].1.owner || !seen.insert((fence.partition, *account)) {
                return Err(Error::invalid("claim_together: one owner, and each account once"));
            }
        }
        let mut rx = Vec::new();
        let mut batch = Vec::new();
        for (account, fence) in requests {
            let (reply, r) = oneshot::channel();
            batch.push(Request { account: account.to_string(), fence: (*fence).clone(), reply });
            rx.push(r);
        }
        self.claim_batch(batch).await;
        let mut out = Vec::new();
        for r in rx {
            out.push(r.await.map_err(|_| Error::invalid("claim_together: no reply"))?);
        }
        Ok(out)
    }

    async fn claim_batch(&self, batch: Vec<Request>) {
        metrics::histogram!("warden_claims_per_statement").record(batch.len() as f64);
        if batch.len() == 1 {
            let r = batch.into_iter().next().expect("one");
            let out = self.claim_one(&r.account, &r.fence).await;
            let _ = r.reply.send(out);
            return;
        }
        match self.claim_many(&batch).await {
            Ok(rows) => {
                for (r, row) in batch.into_iter().zip(rows) {
                    let out = match row.try_get::<i64, _>("fence_held") {
                        Ok(0) => Err(Error::Fenced { partition: r.fence.partition, epoch: r.fence.epoch }),
                        Ok(_) => self.claimed_row(&row, &r.fence).await,
                        Err(e) => Err(e.into()),
                    };
                    let _ = r.reply.send(out);
                }
            }
            Err(e) if e.is_permanent() => {
                tracing::warn!(claims = batch.len(), error = %e, "a batch of claims failed for good; claiming one by one");
                for r in batch {
                    let out = self.claim_one(&r.account, &r.fence).await;
                    let _ = r.reply.send(out);
                }
            }
            Err(e) => {
                let mut batch = batch.into_iter();
                if let Some(first) = batch.next() {
                    for r in batch {
                        let _ = r.reply.send(Err(batch_failed(&e)));
                    }
                    let _ = first.reply.send(Err(e));
                }
            }
        }
    }

    /// `claim.sql` for one account.
    pub(super) async fn claim_one(&self, account: &str, fence: &Fence) -> Result<Option<JobRow>> {
        let row = sqlx::query(CLAIM_SQL)
            .bind(account)
            .bind(fence.partition as i32)
            .bind(fence.epoch)
            .bind(&*fence.owner)
            .fetch_one(self.pool())
            .await?;
        if row.try_get::<i64, _>("fence_held")? == 0 {
            return Err(Error::Fenced { partition: fence.partition, epoch: fence.epoch });
        }
        self.claimed_row(&row, fence).await
    }

    /// `claim_many.sql`: one row per request, in request order.
    async fn claim_many(&self, batch: &[Request]) -> Result<Vec<sqlx::postgres::PgRow>> {
        let accounts: Vec<&str> = batch.iter().map(|r| r.account.as_str()).collect();
        let partitions: Vec<i32> = batch.iter().map(|r| r.fence.partition as i32).collect();
        let epochs: Vec<i64> = batch.iter().map(|r| r.fence.epoch).collect();
        // One owner per batch (`next_batch`).
        let owner = &*batch[0].fence.owner;
        let rows = sqlx::query(CLAIM_MANY_SQL)
            .bind(&accounts)
            .bind(&partitions)
            .bind(&epochs)
            .bind(owner)
            .fetch_all(self.pool())
            .await?;
        if rows.len() != batch.len() {
            return Err(Error::Database(sqlx::Error::Protocol(format!(
                "claim_many returned {} rows for {} requests",
                rows.len(),
                batch.len()
            ))));
        }
        Ok(rows)
    }
}
