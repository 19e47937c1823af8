-- Finish an attempt, record it, and claim the account's next job: the hot path, one
-- statement per job (see `Store::finish`).
-- $1 job id, $2 partition, $3 epoch, $4 owner, $5 new state, $6 due in ms (NULL: keep),
-- $7 outcome, $8 error, $9 refund the attempt, $10 account, $11 claim next,
-- $12 idle timeout.
--
-- `guard` bounds how long the fence lock can outlive this statement: inside a handler
-- transaction, the lock is held until COMMIT, and a process paused between the two
-- would block every takeover of the partition. With the local
-- idle_in_transaction_session_timeout, PostgreSQL ends such a session (rolling the
-- attempt back, to be rescued) after a lease TTL.
--
-- A cancel requested while the attempt ran wins over a retry or snooze (the handler
-- failed or asked again, but its operator wants it stopped): the job ends cancelled.
-- `fence_held` tells a lost race with the fence (stop: a zombie) from a job that is
-- no longer running at this epoch although the fence holds (an earlier try of this
-- statement committed; see `Finished::NotRunning`).
--
-- `head` is claim.sql's rule (serial head if due and not running, else the earliest
-- due unordered job), skipping the job being finished ($1), which this statement's
-- snapshot still sees running.
WITH guard AS (SELECT set_config('idle_in_transaction_session_timeout', $12, true)),
fence AS (SELECT 1 WHERE warden.fence($2::int, $3::bigint, $4::text)),
done AS (
    UPDATE warden.jobs SET
        state = CASE WHEN cancel_requested AND $5 = 'retryable' THEN 'cancelled' ELSE $5 END,
        due_at = COALESCE(statement_timestamp() + $6::bigint * interval '1 millisecond', due_at),
        finished_at = CASE WHEN $5 IN ('completed', 'discarded', 'cancelled') OR (cancel_requested AND $5 = 'retryable')
                           THEN statement_timestamp() END,
        last_error = CASE WHEN cancel_requested AND $5 = 'retryable'
                          THEN 'cancelled while running; last attempt: ' || COALESCE($8, $7)
                          ELSE COALESCE($8, last_error) END,
        max_attempts = max_attempts + CASE WHEN $9 THEN 1 ELSE 0 END
    WHERE id = $1 AND partition = $2 AND state = 'running' AND epoch = $3 AND node = $4
      AND EXISTS (SELECT 1 FROM fence) AND EXISTS (SELECT 1 FROM guard)
    RETURNING id, account, partition, attempt, attempted_at, state),
att AS (
    INSERT INTO warden.attempts (job_id, account, partition, attempt, node, epoch, started_at, finished_at, outcome, error)
    SELECT id, account, partition, attempt, $4, $3, attempted_at, statement_timestamp(), $7, $8 FROM done),
head AS (
    SELECT id FROM (
        (SELECT id, state, due_at FROM warden.jobs
         WHERE account = $10 AND partition = $2 AND lane = 'serial' AND id <> $1
           AND state IN ('scheduled', 'available', 'retryable', 'running')
         ORDER BY run_at, id LIMIT 1)
    ) h WHERE h.state <> 'running' AND h.due_at <= statement_timestamp()
    UNION ALL
    (SELECT id FROM warden.jobs
     WHERE account = $10 AND partition = $2 AND lane = 'unordered' AND id <> $1
       AND state IN ('scheduled', 'available', 'retryable') AND due_at <= statement_timestamp()
     ORDER BY due_at, id LIMIT 1)
    LIMIT 1),
next AS (
    UPDATE warden.jobs j SET state = 'running', attempt = j.attempt + 1, epoch = $3, node = $4,
                             attempted_at = statement_timestamp()
    FROM head
    WHERE j.id = head.id AND j.partition = $2 AND j.state IN ('scheduled', 'available', 'retryable')
      AND $11 AND EXISTS (SELECT 1 FROM done)
    RETURNING j.*)
SELECT (SELECT count(*) FROM done) AS finished, (SELECT count(*) FROM fence) AS fence_held,
       (SELECT state FROM done) AS finished_state, next.*
FROM (SELECT 1) one LEFT JOIN next ON true
