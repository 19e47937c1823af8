-- Enqueue, part 2 of 2: the insert after the locks of part 1 (a one-row CTE `locked`;
-- see `ENQUEUE_LOCK_CLASS`).
-- $1 accounts, $2 partitions, $3 kinds, $4 args, $5 lanes, $6 priorities, $7 delays in
-- ms, $8 run_at, $9 max attempts, $10 timeouts in ms, $11 unique keys, $14 idempotency
-- keys, $15 how long each key is kept in ms (arrays, one entry per job; $12 and $13
-- are part 1's).
--
-- Serial order is (run_at, id), fixed at insert, but a job becomes visible at commit.
-- Two transactions enqueueing for one account could commit in the other order, and
-- the later-sorting job could run before the earlier one existed. So an enqueue holds
-- a lock on its accounts until its transaction ends, and reads the order key (`now`)
-- only once it holds them: a second enqueuer of an account waits for the first to
-- commit, then sorts after it. CTEs with volatile functions are not inlined, and each
-- is computed before the first row of one that reads it, so `now` is read, and ids
-- drawn, after every lock is taken. Unique-key duplicates are skipped (the caller maps
-- them to the existing job); each (partition, account) gets one NOTIFY, delivered at
-- commit.
--
-- Ids are drawn in `src`, in input order (PostgreSQL evaluates a volatile select
-- list after the ORDER BY); the result maps inserted jobs to their input position
-- (`ord`). Jobs with idempotency keys go through enqueue_insert_keyed.sql instead
-- (this text references no table newer than schema v5, so a client of this release
-- enqueues into an older schema); `idem_key IS NULL` keeps a key from being ignored.
now AS (SELECT clock_timestamp() AS ts FROM locked),
input AS (
    SELECT ord, account, partition, kind, args, lane, priority, max_attempts, timeout_ms, unique_key, idem_key,
           COALESCE(run_at, now.ts + COALESCE(delay_ms, 0) * interval '1 millisecond') AS run_at, now.ts,
           now.ts + keep_ms * interval '1 millisecond' AS key_expires
    FROM unnest($1::text[], $2::int[], $3::text[], $4::jsonb[], $5::text[], $6::smallint[],
                $7::bigint[], $8::timestamptz[], $9::int[], $10::int[], $11::text[], $14::text[], $15::bigint[])
         WITH ORDINALITY AS s(account, partition, kind, args, lane, priority, delay_ms, run_at,
                              max_attempts, timeout_ms, unique_key, idem_key, keep_ms, ord), now),
src AS (SELECT input.*, nextval('warden.jobs_id_seq'::regclass) AS id FROM input ORDER BY ord),
ins AS (
    INSERT INTO warden.jobs (id, account, partition, kind, args, lane, state, priority, run_at, due_at,
                             max_attempts, timeout_ms, unique_key)
    SELECT src.id, account, partition, src.kind, args, lane,
           CASE WHEN run_at > ts THEN 'scheduled' ELSE 'available' END,
           priority, run_at, run_at, COALESCE(src.max_attempts, k.max_attempts, 25),
           COALESCE(src.timeout_ms, k.timeout_ms, 60000), unique_key
    FROM src LEFT JOIN warden.kinds k ON k.kind = src.kind
    WHERE src.idem_key IS NULL
    ORDER BY ord
    ON CONFLICT (account, unique_key)
        WHERE unique_key IS NOT NULL AND state IN ('scheduled', 'available', 'retryable', 'running')
        DO NOTHING
    RETURNING id, account, partition),
woke AS (
    SELECT count(pg_notify('warden_wake', w.partition::text || ':' || w.account)) AS n
    FROM (SELECT DISTINCT partition, account FROM ins) w)
SELECT src.ord, ins.id, woke.n FROM ins JOIN src ON src.id = ins.id, woke ORDER BY ins.id
