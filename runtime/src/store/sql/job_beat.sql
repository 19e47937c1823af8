-- A running attempt's heartbeat, with its progress and optionally a checkpoint (see
-- `Store::beat` and `crate::progress`).
-- $1 job id, $2 partition, $3 epoch, $4 owner, $5 attempt,
-- $6 replace the progress, $7 percent, $8 message, $9 details,
-- $10 write a checkpoint, $11 checkpoint, $12 its size in bytes.
--
-- Fenced like every executor write (`warden.fence`, migration 0004), and more
-- narrowly: the job must still be `running` as this very attempt, at this epoch and
-- node. So a stale owner's late heartbeat or checkpoint writes nothing, and neither
-- does an attempt whose job has been finished meanwhile. `fence_held` tells the two
-- apart (a fence failure means: you are a zombie, stop).
--
-- The job row is only read: the write goes to the narrow warden.job_progress row.
-- The heartbeat also reads `cancel_requested`, so a heartbeating handler learns of a
-- cancel with no poll of its own.
WITH fence AS (SELECT 1 WHERE warden.fence($2::int, $3::bigint, $4::text)),
job AS (
    SELECT id, cancel_requested FROM warden.jobs
    WHERE id = $1 AND partition = $2 AND state = 'running' AND epoch = $3 AND node = $4 AND attempt = $5
      AND EXISTS (SELECT 1 FROM fence)),
w AS (
    INSERT INTO warden.job_progress AS p (
        job_id, attempt, epoch, node, heartbeat_at, progress_percent, progress_message, progress_details,
        checkpoint, checkpoint_at, checkpoint_attempt, checkpoint_bytes)
    SELECT id, $5, $3, $4, statement_timestamp(),
           CASE WHEN $6 THEN $7::real END, CASE WHEN $6 THEN $8::text END, CASE WHEN $6 THEN $9::jsonb END,
           CASE WHEN $10 THEN $11::jsonb END, CASE WHEN $10 THEN statement_timestamp() END,
           CASE WHEN $10 THEN $5 END, CASE WHEN $10 THEN $12::int END
    FROM job
    ON CONFLICT (job_id) DO UPDATE SET
        attempt = EXCLUDED.attempt, epoch = EXCLUDED.epoch, node = EXCLUDED.node,
        heartbeat_at = EXCLUDED.heartbeat_at,
        progress_percent = CASE WHEN $6 THEN EXCLUDED.progress_percent ELSE p.progress_percent END,
        progress_message = CASE WHEN $6 THEN EXCLUDED.progress_message ELSE p.progress_message END,
        progress_details = CASE WHEN $6 THEN EXCLUDED.progress_details ELSE p.progress_details END,
        checkpoint = CASE WHEN $10 THEN EXCLUDED.checkpoint ELSE p.checkpoint END,
        checkpoint_at = CASE WHEN $10 THEN EXCLUDED.checkpoint_at ELSE p.checkpoint_at END,
        checkpoint_attempt = CASE WHEN $10 THEN EXCLUDED.checkpoint_attempt ELSE p.checkpoint_attempt END,
        checkpoint_bytes = CASE WHEN $10 THEN EXCLUDED.checkpoint_bytes ELSE p.checkpoint_bytes END
    -- Never an older attempt over a newer one's row: `job` above was read in this
    -- statement's snapshot, and a write of attempt N still in flight (its future
    -- dropped, its statement not) could otherwise land after attempt N+1's and roll
    -- the checkpoint back. Attempt numbers only grow (claims, rescues and retries
    -- all count up), so this is exact; the write is then reported NotRunning.
    WHERE p.attempt <= EXCLUDED.attempt
    RETURNING 1)
SELECT (SELECT count(*) FROM fence) AS fence_held, (SELECT count(*) FROM w) AS written,
       COALESCE((SELECT cancel_requested FROM job), false) AS cancel_requested
