-- Undo a claim that will not run (see `Store::unclaim`).
-- $1 job id, $2 partition, $3 epoch, $4 owner.
WITH fence AS (SELECT 1 WHERE warden.fence($2::int, $3::bigint, $4::text))
UPDATE warden.jobs SET state = 'available', attempt = attempt - 1, attempted_at = NULL
WHERE id = $1 AND partition = $2 AND state = 'running' AND epoch = $3 AND node = $4
  AND EXISTS (SELECT 1 FROM fence)
