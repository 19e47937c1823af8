-- Hardening (issue 10): values every reader can decode, the same input limits on
-- every entry, per-kind options known to the database, and an attempt outcome for
-- attempts interrupted by a handoff.

-- 1. Timestamps Rust can decode. PostgreSQL accepts 'infinity', '-infinity' and
-- years up to 294276; chrono panics decoding them, and the panic surfaced far from
-- where the value entered (inside a claim, stalling a whole partition). Rows that
-- already hold such values are discarded with the reason recorded, and clamped so
-- they decode; then a constraint keeps them out for good, whatever writes them.
UPDATE warden.jobs SET
    state       = CASE WHEN state IN ('scheduled', 'available', 'retryable', 'running') THEN 'discarded' ELSE state END,
    finished_at = COALESCE(finished_at, statement_timestamp()),
    last_error  = 'discarded by migration 0003: run_at ' || run_at::text || ' / due_at ' || due_at::text
                  || ' is outside 1970-01-01 .. 9999-12-31',
    run_at      = LEAST(GREATEST(run_at, '1970-01-01 00:00:00+00'::timestamptz), '9999-12-31 00:00:00+00'::timestamptz),
    due_at      = LEAST(GREATEST(due_at, '1970-01-01 00:00:00+00'::timestamptz), '9999-12-31 00:00:00+00'::timestamptz)
WHERE NOT (run_at >= '1970-01-01 00:00:00+00' AND run_at < '10000-01-01 00:00:00+00'
           AND due_at >= '1970-01-01 00:00:00+00' AND due_at < '10000-01-01 00:00:00+00');

ALTER TABLE warden.jobs ADD CONSTRAINT jobs_times_decodable CHECK (
    run_at >= '1970-01-01 00:00:00+00' AND run_at < '10000-01-01 00:00:00+00'
    AND due_at >= '1970-01-01 00:00:00+00' AND due_at < '10000-01-01 00:00:00+00');

-- Timeouts beyond 24 h were accepted by the SQL function (up to 2^31 ms). Such rows
-- are clamped to 24 h first: a NOT VALID constraint would still reject every later
-- UPDATE of them (a claim, a rescue, a cancel), stalling their account — or, through
-- the one rescue statement of a batch of acquired partitions, every partition in it.
UPDATE warden.jobs SET timeout_ms = 86400000 WHERE timeout_ms > 86400000;
ALTER TABLE warden.jobs ADD CONSTRAINT jobs_timeout_limit CHECK (timeout_ms BETWEEN 1 AND 86400000);

-- 2. An attempt stopped because its partition was handed off (drain): recorded, but
-- it does not use up one of the job's attempts.
ALTER TABLE warden.attempts DROP CONSTRAINT attempts_outcome_check;
ALTER TABLE warden.attempts ADD CONSTRAINT attempts_outcome_check CHECK (outcome IN (
    'completed', 'retry', 'snoozed', 'discarded', 'failed', 'timeout', 'cancelled', 'rescued', 'interrupted'));

-- 3. Per-kind options, published by every node for the handlers it registers, so that
-- enqueues that do not know the handler (the SQL function, a plain client, gRPC)
-- store the kind's max_attempts and timeout instead of the global defaults.
CREATE TABLE warden.kinds (
    kind         text PRIMARY KEY,
    max_attempts integer NOT NULL CHECK (max_attempts BETWEEN 1 AND 1000),
    timeout_ms   integer NOT NULL CHECK (timeout_ms BETWEEN 1 AND 86400000),
    updated_by   text NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT statement_timestamp()
);

-- 4. The SQL function with exactly the Rust client's limits (job.rs): run_at within
-- 1970-01-01 .. now + 3650 days, timeout 1 ms .. 24 h, no control characters in the
-- unique key either; options default to the kind's published ones. An enqueue whose
-- unique key matched a job that finished before it could be read inserts again
-- instead of returning nothing.
CREATE OR REPLACE FUNCTION warden.enqueue(
    p_account      text,
    p_kind         text,
    p_args         jsonb DEFAULT '{}'::jsonb,
    p_run_at       timestamptz DEFAULT NULL,
    p_max_attempts integer DEFAULT NULL,
    p_priority     smallint DEFAULT 0,
    p_unique_key   text DEFAULT NULL,
    p_lane         text DEFAULT 'serial',
    p_timeout_ms   integer DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_partitions   integer;
    v_partition    integer;
    v_now          timestamptz;
    v_run_at       timestamptz;
    v_id           bigint;
    v_locked       integer;
    v_max_attempts integer;
    v_timeout_ms   integer;
BEGIN
    IF p_account IS NULL OR length(p_account) = 0 OR octet_length(p_account) > 256
       OR p_account ~ '[[:cntrl:]]' THEN
        RAISE EXCEPTION 'warden.enqueue: account must be 1..256 bytes without control characters'
            USING ERRCODE = '22023';
    END IF;
    IF p_kind IS NULL OR length(p_kind) = 0 OR octet_length(p_kind) > 128
       OR p_kind ~ '[[:cntrl:]]' THEN
        RAISE EXCEPTION 'warden.enqueue: kind must be 1..128 bytes without control characters'
            USING ERRCODE = '22023';
    END IF;
    IF p_args IS NULL OR octet_length(p_args::text) > 65536 THEN
        RAISE EXCEPTION 'warden.enqueue: args must be JSON of at most 65536 bytes'
            USING ERRCODE = '22023';
    END IF;
    IF p_unique_key IS NOT NULL AND (length(p_unique_key) = 0 OR octet_length(p_unique_key) > 256
                                     OR p_unique_key ~ '[[:cntrl:]]') THEN
        RAISE EXCEPTION 'warden.enqueue: unique_key must be 1..256 bytes without control characters'
            USING ERRCODE = '22023';
    END IF;
    IF p_max_attempts IS NOT NULL AND (p_max_attempts < 1 OR p_max_attempts > 1000) THEN
        RAISE EXCEPTION 'warden.enqueue: max_attempts must be 1..1000' USING ERRCODE = '22023';
    END IF;
    IF p_timeout_ms IS NOT NULL AND (p_timeout_ms < 1 OR p_timeout_ms > 86400000) THEN
        RAISE EXCEPTION 'warden.enqueue: timeout_ms must be 1..86400000 (24 h)' USING ERRCODE = '22023';
    END IF;
    IF p_lane IS NULL OR p_lane NOT IN ('serial', 'unordered') THEN
        RAISE EXCEPTION 'warden.enqueue: lane must be serial or unordered' USING ERRCODE = '22023';
    END IF;
    IF p_run_at IS NOT NULL AND NOT (p_run_at >= '1970-01-01 00:00:00+00'
                                     AND p_run_at <= statement_timestamp() + interval '3650 days') THEN
        RAISE EXCEPTION 'warden.enqueue: run_at must be between 1970-01-01 and 3650 days from now, got %', p_run_at
            USING ERRCODE = '22023';
    END IF;
    SELECT value::integer INTO v_partitions FROM warden.meta WHERE key = 'partitions';
    IF v_partitions IS NULL THEN
        RAISE EXCEPTION 'warden.enqueue: cluster not initialised (no partition count); start a node first'
            USING ERRCODE = '55000';
    END IF;
    v_partition := warden.partition_of(p_account, v_partitions);
    SELECT COALESCE(p_max_attempts, k.max_attempts), COALESCE(p_timeout_ms, k.timeout_ms)
      INTO v_max_attempts, v_timeout_ms FROM warden.kinds k WHERE k.kind = p_kind;
    v_max_attempts := COALESCE(v_max_attempts, p_max_attempts, 25);
    v_timeout_ms := COALESCE(v_timeout_ms, p_timeout_ms, 60000);

    -- Wait for any other uncommitted enqueue of this account, then read the order
    -- key: jobs of one account sort in the order their transactions commit (see
    -- migration 0002 and store::ENQUEUE_LOCK_CLASS).
    v_locked := COALESCE(NULLIF(current_setting('warden.enqueue_accounts', true), '')::integer, 0);
    IF v_locked >= 64 THEN
        PERFORM pg_advisory_xact_lock(1463898693, hashtext(p_account) >> 24);
    ELSE
        PERFORM pg_advisory_xact_lock_shared(1463898693, hashtext(p_account) >> 24);
        PERFORM pg_advisory_xact_lock(1463898692, hashtext(p_account));
        PERFORM set_config('warden.enqueue_accounts', (v_locked + 1)::text, true);
    END IF;
    v_now := clock_timestamp();
    v_run_at := COALESCE(p_run_at, v_now);

    -- The unique key's earlier job may finish between the conflicting insert and the
    -- read of its id: then insert again (bounded; each round sees a newer snapshot).
    FOR i IN 1..5 LOOP
        INSERT INTO warden.jobs (account, partition, kind, args, lane, state, priority, run_at, due_at,
                                 max_attempts, timeout_ms, unique_key)
        VALUES (p_account, v_partition, p_kind, p_args, p_lane,
                CASE WHEN v_run_at > v_now THEN 'scheduled' ELSE 'available' END,
                p_priority, v_run_at, v_run_at, v_max_attempts, v_timeout_ms, p_unique_key)
        ON CONFLICT (account, unique_key)
            WHERE unique_key IS NOT NULL AND state IN ('scheduled', 'available', 'retryable', 'running')
            DO NOTHING
        RETURNING id INTO v_id;

        IF v_id IS NOT NULL THEN
            PERFORM pg_notify('warden_wake', v_partition::text || ':' || p_account);
            RETURN v_id;
        END IF;

        SELECT id INTO v_id FROM warden.jobs
        WHERE account = p_account AND unique_key = p_unique_key
          AND state IN ('scheduled', 'available', 'retryable', 'running');
        IF v_id IS NOT NULL THEN
            RETURN v_id;
        END IF;
    END LOOP;
    RAISE EXCEPTION 'warden.enqueue: unique_key % kept finishing while being enqueued; retry', p_unique_key
        USING ERRCODE = '40001';
END
$$;
