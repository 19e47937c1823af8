-- Claim the account's next runnable job, or adopt its job already running at this
-- fence (see `Store::claim`).
-- $1 account, $2 partition, $3 epoch, $4 owner.
--
-- `fence`: one row while ($2, $3, $4) holds an unexpired lease. `warden.fence`
-- (migration 0004) takes the partition's shared fence lock and checks the lease in a
-- fresh snapshot, so no takeover can commit until this transaction ends and none
-- committed before the check.
--
-- `mine` adopts a job of this account already running at this (epoch, owner): the
-- actor claims only while it runs nothing, so such a job has no local attempt. It is
-- what an ambiguous result leaves behind — a claim or a finish-and-claim-next that
-- committed but whose reply was lost, an in-doubt COMMIT, an unclaim that failed, an
-- outcome that could not be recorded — and rescue never touches it while this epoch
-- holds the lease. Claiming adopts it (runs it) instead of claiming past it, so
-- "running at my epoch with no local attempt" cannot outlive the account's next
-- claim; the enforcer's scan wakes such accounts (`Store::running_here`). Adopting
-- counts an attempt, as a rescue does: a job whose outcome can never be recorded is
-- then given up after `max_attempts` instead of running forever.
--
-- `head`: the serial head if it is due and not running, else the earliest due
-- unordered job (the same rule as in finish.sql). `partition = $2`: the account comes
-- from a NOTIFY payload or a caller, which are hints, never instructions. A job is
-- only ever claimed under its own partition's fence; a wake-up naming an account of
-- another partition finds nothing (a spoofed `warden_wake` once ran a job of an
-- unheld partition under another one's fence).
WITH fence AS (SELECT 1 WHERE warden.fence($2::int, $3::bigint, $4::text)),
mine AS (
    UPDATE warden.jobs j SET attempt = j.attempt + 1, attempted_at = statement_timestamp()
    WHERE j.id = (SELECT o.id FROM warden.jobs o
                  WHERE o.account = $1 AND o.partition = $2 AND o.state = 'running'
                    AND o.epoch = $3 AND o.node = $4
                  ORDER BY o.id LIMIT 1)
      AND j.state = 'running' AND EXISTS (SELECT 1 FROM fence)
    RETURNING j.*),
head AS (
    SELECT id FROM (
        (SELECT id, state, due_at FROM warden.jobs
         WHERE account = $1 AND partition = $2 AND lane = 'serial'
           AND state IN ('scheduled', 'available', 'retryable', 'running')
         ORDER BY run_at, id LIMIT 1)
    ) h WHERE h.state <> 'running' AND h.due_at <= statement_timestamp()
    UNION ALL
    (SELECT id FROM warden.jobs
     WHERE account = $1 AND partition = $2 AND lane = 'unordered'
       AND state IN ('scheduled', 'available', 'retryable') AND due_at <= statement_timestamp()
     ORDER BY due_at, id LIMIT 1)
    LIMIT 1),
next AS (
    UPDATE warden.jobs j SET state = 'running', attempt = j.attempt + 1, epoch = $3, node = $4,
                             attempted_at = statement_timestamp()
    FROM head
    WHERE j.id = head.id AND j.partition = $2 AND j.state IN ('scheduled', 'available', 'retryable')
      AND EXISTS (SELECT 1 FROM fence) AND NOT EXISTS (SELECT 1 FROM mine)
    RETURNING j.*)
SELECT (SELECT count(*) FROM fence) AS fence_held, x.*
FROM (SELECT 1) one
LEFT JOIN (SELECT * FROM mine UNION ALL SELECT * FROM next) x ON true
