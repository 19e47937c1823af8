-- Accounts that could use an execution slot (see `AdminStore::runnable_accounts`).
-- $1 partitions (NULL: every partition), $2 cap on each count.
--
-- runnable: accounts whose next job is due and not running, so a free slot would
--   start it now — the test of `due_accounts.sql`, counted: a due unordered job, or a
--   serial head (first unfinished serial job by run_at, id) that is due and not running.
-- running: accounts with a job claimed (running, or claimed and waiting for a slot).
--
-- running + runnable is the demand in slots: what KEDA's postgresql scaler divides by
-- a node's slots × target utilisation (deploy/k8s). Never the queue length: a backlog
-- of one account can use only one slot.
SELECT
    (SELECT count(*) FROM (
        SELECT 1 FROM (
            SELECT account, bool_or(lane = 'unordered') AS unordered_due
            FROM warden.jobs
            WHERE ($1::int[] IS NULL OR partition = ANY($1))
              AND state IN ('scheduled', 'available', 'retryable') AND due_at <= now()
            GROUP BY account) a
        WHERE a.unordered_due OR EXISTS (
            SELECT 1 FROM (
                SELECT h.state, h.due_at FROM warden.jobs h
                WHERE h.account = a.account AND h.lane = 'serial'
                  AND h.state IN ('scheduled', 'available', 'retryable', 'running')
                ORDER BY h.run_at, h.id LIMIT 1) head
            WHERE head.state <> 'running' AND head.due_at <= now())
        LIMIT $2) r) AS runnable,
    (SELECT count(*) FROM (
        SELECT DISTINCT account FROM warden.jobs
        WHERE ($1::int[] IS NULL OR partition = ANY($1)) AND state = 'running'
        LIMIT $2) c) AS running
