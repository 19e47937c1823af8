-- Claim for several accounts at once: claim.sql, one result row per request, in one
-- statement (see `PgStore::claim` and `store::pg::claims`, which batches the claims
-- of a node's actors that arrive while one is in flight).
-- $1 accounts, $2 partitions, $3 epochs (arrays, one entry per request, no account
-- twice), $4 owner.
--
-- Each request is exactly claim.sql for its (account, partition, epoch): `fence` holds
-- a row per (partition, epoch) whose lease this owner holds at that epoch, checked by
-- `warden.fence` in partition order (shared fence locks, as rescue.sql takes them;
-- takeovers only try-lock, so no lock cycle); `mine` adopts the account's job already
-- running at that epoch and owner; otherwise `head` is the serial head if due and not
-- running, else the earliest due unordered job, and `next` claims it. A request whose
-- fence does not hold claims nothing and reports `fence_held = 0`.
WITH req AS (
    SELECT r.account, r.partition, r.epoch, r.ord
    FROM unnest($1::text[], $2::int[], $3::bigint[]) WITH ORDINALITY AS r(account, partition, epoch, ord)),
fence AS MATERIALIZED (
    SELECT d.partition, d.epoch
    FROM (SELECT DISTINCT partition, epoch FROM req ORDER BY partition, epoch) d
    WHERE warden.fence(d.partition, d.epoch, $4::text)),
fenced AS (
    SELECT req.* FROM req JOIN fence USING (partition, epoch)),
mine AS (
    UPDATE warden.jobs j SET attempt = j.attempt + 1, attempted_at = statement_timestamp()
    FROM (SELECT f.account, f.partition,
                 (SELECT o.id FROM warden.jobs o
                  WHERE o.account = f.account AND o.partition = f.partition AND o.state = 'running'
                    AND o.epoch = f.epoch AND o.node = $4
                  ORDER BY o.id LIMIT 1) AS id
          FROM fenced f) m
    WHERE j.id = m.id AND j.partition = m.partition AND j.state = 'running'
    RETURNING j.*),
head AS (
    SELECT f.account, f.partition, f.epoch, h.id
    FROM fenced f
    CROSS JOIN LATERAL (
        SELECT id FROM (
            (SELECT id, state, due_at FROM warden.jobs
             WHERE account = f.account AND partition = f.partition AND lane = 'serial'
               AND state IN ('scheduled', 'available', 'retryable', 'running')
             ORDER BY run_at, id LIMIT 1)
        ) s WHERE s.state <> 'running' AND s.due_at <= statement_timestamp()
        UNION ALL
        (SELECT id FROM warden.jobs
         WHERE account = f.account AND partition = f.partition AND lane = 'unordered'
           AND state IN ('scheduled', 'available', 'retryable') AND due_at <= statement_timestamp()
         ORDER BY due_at, id LIMIT 1)
        LIMIT 1) h
    WHERE NOT EXISTS (SELECT 1 FROM mine WHERE mine.account = f.account AND mine.partition = f.partition)),
next AS (
    UPDATE warden.jobs j SET state = 'running', attempt = j.attempt + 1, epoch = head.epoch, node = $4,
                             attempted_at = statement_timestamp()
    FROM head
    WHERE j.id = head.id AND j.partition = head.partition AND j.state IN ('scheduled', 'available', 'retryable')
    RETURNING j.*),
got AS (SELECT * FROM mine UNION ALL SELECT * FROM next)
SELECT req.ord, (SELECT count(*) FROM fence WHERE fence.partition = req.partition AND fence.epoch = req.epoch) AS fence_held,
       got.*
FROM req LEFT JOIN got ON got.account = req.account AND got.partition = req.partition
ORDER BY req.ord
