-- Enqueue for several accounts, part 1 of 2 (part 2: enqueue_insert.sql): every lock
-- in one global order (group, level, key), so two statements cannot deadlock each
-- other; whole groups, exclusive, past $13 accounts in the statement plus the
-- transaction's earlier ones. $12 the lock class; the other parameters are part 2's.
WITH acc AS (SELECT DISTINCT hashtext(a) AS f FROM unnest($1::text[]) AS u(a)),
prior AS (SELECT COALESCE(NULLIF(current_setting('warden.enqueue_accounts', true), '')::int, 0) AS n),
wide AS (SELECT count(*) + min(prior.n) > $13 AS batch, count(*) + min(prior.n) AS total FROM acc, prior),
counted AS (SELECT set_config('warden.enqueue_accounts', total::text, true) AS c FROM wide WHERE NOT batch),
keys AS (
    SELECT DISTINCT f >> 24 AS g, 0 AS level, f >> 24 AS k, w.batch FROM acc, wide w
    UNION ALL
    SELECT f >> 24, 1, f, false FROM acc, wide w WHERE NOT w.batch),
locks AS (
    SELECT count(CASE WHEN level = 1 THEN pg_advisory_xact_lock($12::int, k)
                      WHEN batch THEN pg_advisory_xact_lock($12::int + 1, k)
                      ELSE pg_advisory_xact_lock_shared($12::int + 1, k) END) AS n
    FROM (SELECT * FROM keys ORDER BY g, level, k) ordered),
locked AS (SELECT 1 FROM locks LEFT JOIN counted ON true),
