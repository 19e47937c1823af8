//! [`Store`] on PostgreSQL: leases, the fenced claim / finish / unclaim, rescue, the
//! due and orphan scans, member heartbeats.

use super::{JobTx, PgStore, LOCK_CHUNK};
use crate::error::{Error, Result};
use crate::job::JobRow;
use crate::progress::{Beat, BeatAck, StoredCheckpoint};
use crate::store::{
    ms, DueAccount, Fence, Finish, Finished, GrantedLease, MemberInfo, RunningJob, Store, CHANNEL_LEASE,
};
use async_trait::async_trait;
use sqlx::Row;
use std::time::Duration;
use warden_cluster::PartitionCount;

const ACQUIRE_SQL: &str = include_str!("../sql/acquire.sql");

/// Renew held leases: $1 owner, $2 ttl in ms, $3 partitions, $4 epochs (pairwise).
/// Takes no fence lock, so a renewal never queues behind fenced work.
const RENEW_SQL: &str = "
    UPDATE warden.leases l SET lease_expires_at = now() + $2::bigint * interval '1 millisecond'
    FROM unnest($3::int[], $4::bigint[]) AS h(partition, epoch)
    WHERE l.partition = h.partition AND l.epoch = h.epoch AND l.owner_node = $1
      AND l.lease_expires_at > now()
    RETURNING l.partition";

/// Release held leases and tell the others: $1 owner, $2 partitions, $3 epochs
/// (pairwise), $4 the lease channel.
const RELEASE_SQL: &str = "
    WITH r AS (
        UPDATE warden.leases l SET owner_node = NULL, lease_expires_at = NULL
        FROM unnest($2::int[], $3::bigint[]) AS h(partition, epoch)
        WHERE l.partition = h.partition AND l.epoch = h.epoch AND l.owner_node = $1
        RETURNING l.partition)
    SELECT (SELECT count(*) FROM r) AS n, pg_notify($4, $1)";

const RESCUE_SQL: &str = include_str!("../sql/rescue.sql");

/// Until the earliest of $1's leases held by someone other than $2 expires, in ms.
const LEASE_WAIT_SQL: &str = "
    SELECT (EXTRACT(EPOCH FROM (min(lease_expires_at) - now())) * 1000)::float8 FROM warden.leases
    WHERE partition = ANY($1) AND owner_node IS NOT NULL AND owner_node <> $2";

/// Accounts whose next runnable job is due: $1 partitions, $2 limit (see
/// [`Store::due_accounts`]). Public for the test that checks its cost is per account.
#[doc(hidden)]
pub const DUE_ACCOUNTS_SQL: &str = include_str!("../sql/due_accounts.sql");

/// Jobs running under $2 in partitions $1, at most $3.
const RUNNING_HERE_SQL: &str = "
    SELECT id, account, partition FROM warden.jobs
    WHERE partition = ANY($1) AND state = 'running' AND node = $2 LIMIT $3";

pub(super) const CLAIM_SQL: &str = include_str!("../sql/claim.sql");
const FINISH_SQL: &str = include_str!("../sql/finish.sql");
const UNCLAIM_SQL: &str = include_str!("../sql/unclaim.sql");
pub(super) const DISCARD_UNDECODABLE_SQL: &str = include_str!("../sql/discard_undecodable.sql");
const CANCEL_REQUESTED_SQL: &str = "SELECT cancel_requested FROM warden.jobs WHERE id = $1";
const HEARTBEAT_SQL: &str = include_str!("../sql/heartbeat.sql");
/// Live holders and their grant times (µs), for sticky placement.
const HOLDERS_SQL: &str = "
    SELECT partition, owner_node, COALESCE((extract(epoch FROM acquired_at) * 1000000)::bigint, 0) AS acquired_us
    FROM warden.leases
    WHERE owner_node IS NOT NULL AND lease_expires_at > now()";
const JOB_BEAT_SQL: &str = include_str!("../sql/job_beat.sql");
const CHECKPOINT_SQL: &str =
    "SELECT checkpoint, checkpoint_at, checkpoint_attempt FROM warden.job_progress WHERE job_id = $1 AND checkpoint IS NOT NULL";

fn partition_array(partitions: impl IntoIterator<Item = u32>) -> Vec<i32> {
    partitions.into_iter().map(|p| p as i32).collect()
}

impl PgStore {
    async fn acquire_chunk(&self, owner: &str, partitions: &[u32], ttl: Duration) -> Result<Vec<GrantedLease>> {
        let rows = sqlx::query(ACQUIRE_SQL)
            .bind(owner)
            .bind(ms(ttl))
            .bind(partition_array(partitions.iter().copied()))
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok(GrantedLease { partition: r.try_get::<i32, _>(0)? as u32, epoch: r.try_get(1)? }))
            .collect()
    }

    async fn release_chunk(&self, owner: &str, held: &[GrantedLease]) -> Result<u64> {
        if held.is_empty() {
            return Ok(0);
        }
        let epochs: Vec<i64> = held.iter().map(|h| h.epoch).collect();
        let n: i64 = sqlx::query_scalar(RELEASE_SQL)
            .bind(owner)
            .bind(partition_array(held.iter().map(|h| h.partition)))
            .bind(&epochs)
            .bind(CHANNEL_LEASE)
            .fetch_one(&self.pool)
            .await?;
        Ok(n as u64)
    }
}

#[async_trait]
impl Store for PgStore {
    fn partitions(&self) -> PartitionCount {
        self.partitions
    }

    async fn acquire(&self, owner: &str, partitions: &[u32], ttl: Duration) -> Result<Vec<GrantedLease>> {
        let mut granted = Vec::new();
        for chunk in partitions.chunks(LOCK_CHUNK) {
            match self.acquire_chunk(owner, chunk, ttl).await {
                Ok(g) => granted.extend(g),
                // What earlier chunks granted is held: report it (the rest is retried
                // on the next pass) rather than leave it unknown here until it expires.
                Err(e) if !granted.is_empty() => {
                    tracing::warn!(error = %e, granted = granted.len(), "acquiring a chunk of partitions failed");
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(granted)
    }

    async fn renew(&self, owner: &str, held: &[GrantedLease], ttl: Duration) -> Result<Vec<u32>> {
        if held.is_empty() {
            return Ok(Vec::new());
        }
        let epochs: Vec<i64> = held.iter().map(|h| h.epoch).collect();
        let renewed: Vec<i32> = sqlx::query_scalar(RENEW_SQL)
            .bind(owner)
            .bind(ms(ttl))
            .bind(partition_array(held.iter().map(|h| h.partition)))
            .bind(&epochs)
            .fetch_all(&self.pool)
            .await?;
        Ok(renewed.into_iter().map(|p| p as u32).collect())
    }

    async fn release(&self, owner: &str, held: &[GrantedLease]) -> Result<u64> {
        let mut n = 0;
        for chunk in held.chunks(LOCK_CHUNK) {
            n += self.release_chunk(owner, chunk).await?;
        }
        Ok(n)
    }

    async fn rescue(&self, owner: &str, acquired: &[GrantedLease]) -> Result<u64> {
        let mut n = 0;
        for chunk in acquired.chunks(LOCK_CHUNK) {
            let epochs: Vec<i64> = chunk.iter().map(|h| h.epoch).collect();
            let r = sqlx::query(RESCUE_SQL)
                .bind(partition_array(chunk.iter().map(|h| h.partition)))
                .bind(&epochs)
                .bind(owner)
                .execute(&self.pool)
                .await?;
            n += r.rows_affected();
        }
        Ok(n)
    }

    async fn lease_wait(&self, owner: &str, partitions: &[u32]) -> Result<Option<Duration>> {
        if partitions.is_empty() {
            return Ok(None);
        }
        let ms: Option<f64> = sqlx::query_scalar(LEASE_WAIT_SQL)
            .bind(partition_array(partitions.iter().copied()))
            .bind(owner)
            .fetch_one(&self.pool)
            .await?;
        Ok(ms.map(|ms| Duration::from_millis(ms.max(0.0) as u64)))
    }

    async fn due_accounts(&self, partitions: &[u32], limit: i64) -> Result<Vec<DueAccount>> {
        if partitions.is_empty() {
            return Ok(Vec::new());
        }
        let rows: Vec<(String, i32)> = sqlx::query_as(DUE_ACCOUNTS_SQL)
            .bind(partition_array(partitions.iter().copied()))
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(|(account, p)| DueAccount { account, partition: p as u32 }).collect())
    }

    async fn running_here(&self, owner: &str, partitions: &[u32], limit: i64) -> Result<Vec<RunningJob>> {
        if partitions.is_empty() {
            return Ok(Vec::new());
        }
        let rows: Vec<(i64, String, i32)> = sqlx::query_as(RUNNING_HERE_SQL)
            .bind(partition_array(partitions.iter().copied()))
            .bind(owner)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(|(job_id, account, p)| RunningJob { job_id, account, partition: p as u32 }).collect())
    }

    async fn claim(&self, account: &str, fence: &Fence) -> Result<Option<JobRow>> {
        self.claim_batched(account, fence).await
    }

    async fn finish(
        &self,
        tx: Option<JobTx>,
        job: &JobRow,
        fence: &Fence,
        finish: &Finish,
        claim_next: bool,
    ) -> Result<Finished> {
        let c = finish.columns();
        let query = sqlx::query(FINISH_SQL)
            .bind(job.id)
            .bind(fence.partition as i32)
            .bind(fence.epoch)
            .bind(&*fence.owner)
            .bind(c.state)
            .bind(c.due_ms)
            .bind(c.outcome)
            .bind(c.error.as_deref())
            .bind(c.refund)
            .bind(&job.account)
            .bind(claim_next && finish.is_terminal())
            .bind(self.finish_idle_timeout_ms.to_string());
        let row = match tx {
            None => query.fetch_one(&self.pool).await?,
            Some(mut tx) => {
                let row = query.fetch_one(tx.conn()).await?;
                let finished: i64 = row.try_get("finished")?;
                if finished == 0 {
                    tx.rollback().await?;
                } else {
                    tx.commit().await?;
                }
                row
            }
        };
        let finished: i64 = row.try_get("finished")?;
        if finished == 0 {
            if row.try_get::<i64, _>("fence_held")? == 0 {
                return Err(Error::Fenced { partition: fence.partition, epoch: fence.epoch });
            }
            return Ok(Finished::NotRunning);
        }
        Ok(Finished::Recorded(self.claimed_row(&row, fence).await?))
    }

    async fn unclaim(&self, job: &JobRow, fence: &Fence) -> Result<()> {
        let r = sqlx::query(UNCLAIM_SQL)
            .bind(job.id)
            .bind(fence.partition as i32)
            .bind(fence.epoch)
            .bind(&*fence.owner)
            .execute(&self.pool)
            .await?;
        if r.rows_affected() == 0 {
            return Err(Error::Fenced { partition: fence.partition, epoch: fence.epoch });
        }
        Ok(())
    }

    async fn cancel_requested(&self, job_id: i64) -> Result<bool> {
        let v: Option<bool> = sqlx::query_scalar(CANCEL_REQUESTED_SQL).bind(job_id).fetch_optional(&self.pool).await?;
        Ok(v.unwrap_or(false))
    }

    async fn beat(&self, job_id: i64, attempt: i32, fence: &Fence, beat: &Beat) -> Result<BeatAck> {
        let progress = beat.progress.as_ref();
        let (checkpoint, bytes) = match &beat.checkpoint {
            Some((state, bytes)) => (Some(state), Some(i32::try_from(*bytes).unwrap_or(i32::MAX))),
            None => (None, None),
        };
        let row = sqlx::query(JOB_BEAT_SQL)
            .bind(job_id)
            .bind(fence.partition as i32)
            .bind(fence.epoch)
            .bind(&*fence.owner)
            .bind(attempt)
            .bind(progress.is_some())
            .bind(progress.and_then(|p| p.percent))
            .bind(progress.and_then(|p| p.message.as_deref()))
            .bind(progress.and_then(|p| p.details.as_ref()))
            .bind(checkpoint.is_some())
            .bind(checkpoint)
            .bind(bytes)
            .fetch_one(&self.pool)
            .await?;
        let fence_held: i64 = row.try_get("fence_held")?;
        let written: i64 = row.try_get("written")?;
        if fence_held == 0 {
            return Err(Error::Fenced { partition: fence.partition, epoch: fence.epoch });
        }
        if written == 0 {
            return Ok(BeatAck::NotRunning);
        }
        Ok(BeatAck::Recorded { cancel_requested: row.try_get("cancel_requested")? })
    }

    async fn fired_for(&self, job_id: i64) -> Result<Option<chrono::DateTime<chrono::Utc>>> {
        self.nominal_of(job_id).await
    }

    async fn checkpoint(&self, job_id: i64) -> Result<Option<StoredCheckpoint>> {
        let row = sqlx::query(CHECKPOINT_SQL).bind(job_id).fetch_optional(&self.pool).await?;
        row.map(|r| {
            Ok(StoredCheckpoint {
                state: r.try_get("checkpoint")?,
                at: r.try_get("checkpoint_at")?,
                attempt: r.try_get("checkpoint_attempt")?,
            })
        })
        .transpose()
    }

    async fn heartbeat(&self, member: &MemberInfo, within: Duration) -> Result<Option<Vec<String>>> {
        let ids: Vec<String> = sqlx::query_scalar(HEARTBEAT_SQL)
            .bind(&member.node_id)
            .bind(member.started_at)
            .bind(member.schema as i32)
            .bind(&member.ring)
            .bind(ms(within))
            .fetch_all(&self.pool)
            .await?;
        Ok(Some(ids))
    }

    async fn lease_holders(&self) -> Result<Option<warden_cluster::Holders>> {
        let rows = sqlx::query(HOLDERS_SQL).fetch_all(&self.pool).await?;
        let mut holders: warden_cluster::Holders = vec![None; self.partitions.get() as usize];
        for r in rows {
            let partition: i32 = r.try_get("partition")?;
            if let Some(slot) = usize::try_from(partition).ok().and_then(|p| holders.get_mut(p)) {
                let owner: String = r.try_get("owner_node")?;
                *slot = Some(warden_cluster::Holder {
                    owner: warden_cluster::sticky::member_of_owner(&owner).to_string(),
                    acquired_us: r.try_get("acquired_us")?,
                });
            }
        }
        Ok(Some(holders))
    }

    async fn begin(&self, idle_timeout: Duration) -> Result<JobTx> {
        JobTx::begin(&self.pool, idle_timeout).await
    }
}
