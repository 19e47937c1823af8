-- Enqueue for one account, part 1 of 2 (part 2: enqueue_insert.sql): its group
-- (shared; exclusive once the transaction has locked $13 accounts one by one), then
-- the account. $12 the lock class, $13 the per-transaction account bound; the other
-- parameters are part 2's.
WITH st AS (
    SELECT hashtext(($1::text[])[1]) AS h,
           COALESCE(NULLIF(current_setting('warden.enqueue_accounts', true), '')::int, 0) AS n),
g AS (
    SELECT count(CASE WHEN n >= $13 THEN pg_advisory_xact_lock($12::int + 1, h >> 24)
                      ELSE pg_advisory_xact_lock_shared($12::int + 1, h >> 24) END) AS x
    FROM st),
a AS (
    SELECT count(pg_advisory_xact_lock($12::int, h))
           + count(set_config('warden.enqueue_accounts', (n + 1)::text, true)) AS x
    FROM st, g WHERE n < $13),
locked AS (SELECT 1 FROM g LEFT JOIN a ON true),
