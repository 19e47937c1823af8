-- Acquire partitions for $1 where free, expired or already ours; each grant is a new
-- epoch. $1 owner, $2 ttl in ms, $3 partitions.
--
-- A partition with a fenced transaction in flight (perhaps of a paused node) is
-- skipped this round instead of stalling the enforcer: its fence lock is taken with a
-- try (the trigger of migration 0004 then re-enters it), and SKIP LOCKED skips the
-- row lock a schema-v3 node's fence holds.
--
-- `acquired_at` (schema v10) is when the partition came to this owner: kept when the
-- owner re-grants a lease it still holds, set on a grant after a release, an expiry
-- or another owner (sticky placement sheds the most recent grants first).
UPDATE warden.leases l SET owner_node = $1, epoch = l.epoch + 1,
       lease_expires_at = now() + $2::bigint * interval '1 millisecond',
       acquired_at = CASE WHEN l.owner_node = $1 AND l.lease_expires_at >= now() AND l.acquired_at IS NOT NULL
                          THEN l.acquired_at ELSE now() END
FROM (SELECT partition FROM warden.leases
      WHERE partition = ANY($3)
        AND CASE WHEN owner_node IS NULL OR owner_node = $1 OR lease_expires_at < now()
                 THEN pg_try_advisory_xact_lock(1463898694, partition) ELSE false END
      FOR UPDATE SKIP LOCKED) free
WHERE l.partition = free.partition
RETURNING l.partition, l.epoch
