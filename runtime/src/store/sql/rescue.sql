-- Rescue in every partition just acquired, in one statement (see `Store::rescue`).
-- $1 partitions, $2 epochs (pairwise), $3 owner. Fenced per partition like every
-- executor write, and epochs are compared within one partition only.
WITH held AS (
    SELECT l.partition, l.epoch FROM warden.leases l
    JOIN unnest($1::int[], $2::bigint[]) AS h(partition, epoch) ON l.partition = h.partition AND l.epoch = h.epoch
    WHERE l.owner_node = $3 AND l.lease_expires_at > statement_timestamp()
      AND warden.fence(l.partition, l.epoch, l.owner_node)),
r AS (
    UPDATE warden.jobs j SET
        state = CASE WHEN j.cancel_requested THEN 'cancelled'
                     WHEN j.attempt >= j.max_attempts THEN 'discarded' ELSE 'retryable' END,
        due_at = statement_timestamp(),
        finished_at = CASE WHEN j.cancel_requested OR j.attempt >= j.max_attempts THEN statement_timestamp() END,
        last_error = 'attempt ' || j.attempt || ' abandoned by ' || COALESCE(j.node, '?')
                     || ' at epoch ' || COALESCE(j.epoch, 0) || '; rescued'
    FROM held
    WHERE j.partition = held.partition AND j.state = 'running' AND (j.epoch IS NULL OR j.epoch < held.epoch)
    RETURNING j.id, j.account, j.partition, j.attempt, j.node, j.epoch, j.attempted_at, j.last_error)
INSERT INTO warden.attempts (job_id, account, partition, attempt, node, epoch, started_at, finished_at, outcome, error)
SELECT id, account, partition, attempt, COALESCE(node, ''), COALESCE(epoch, 0),
       COALESCE(attempted_at, statement_timestamp()), statement_timestamp(), 'rescued', last_error FROM r
