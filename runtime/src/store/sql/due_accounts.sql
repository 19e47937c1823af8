-- Accounts whose next runnable job is due (see `Store::due_accounts`).
-- $1 partitions, $2 limit.
--
-- Per account, not per due job: group the due rows by account first, then probe each
-- account's serial head once (jobs_account_open, LIMIT 1) unless a due unordered job
-- already makes it runnable. A probe per due row was 13–20× slower on a 200k-job
-- backlog (found in review).
SELECT a.account, a.partition FROM (
    SELECT account, partition, min(due_at) AS due, bool_or(lane = 'unordered') AS unordered_due
    FROM warden.jobs
    WHERE partition = ANY($1) AND state IN ('scheduled', 'available', 'retryable') AND due_at <= now()
    GROUP BY account, partition) a
WHERE a.unordered_due OR EXISTS (
    SELECT 1 FROM (
        SELECT h.state, h.due_at FROM warden.jobs h
        WHERE h.account = a.account AND h.lane = 'serial'
          AND h.state IN ('scheduled', 'available', 'retryable', 'running')
        ORDER BY h.run_at, h.id LIMIT 1) head
    WHERE head.state <> 'running' AND head.due_at <= now())
ORDER BY a.due LIMIT $2
