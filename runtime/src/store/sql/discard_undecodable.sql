-- A claimed row that cannot be decoded (see `decode_job`): discard it, fenced, with
-- the reason, so it neither stalls its account nor is claimed again.
-- $1 job id, $2 partition, $3 epoch, $4 owner, $5 error.
WITH fence AS (SELECT 1 WHERE warden.fence($2::int, $3::bigint, $4::text)),
done AS (
    UPDATE warden.jobs SET state = 'discarded', finished_at = statement_timestamp(), last_error = $5
    WHERE id = $1 AND partition = $2 AND state = 'running' AND epoch = $3 AND node = $4
      AND EXISTS (SELECT 1 FROM fence)
    RETURNING id, account, partition, attempt, attempted_at)
INSERT INTO warden.attempts (job_id, account, partition, attempt, node, epoch, started_at, finished_at, outcome, error)
SELECT id, account, partition, attempt, $4, $3, COALESCE(attempted_at, statement_timestamp()), statement_timestamp(),
       'discarded', $5 FROM done
