-- Schema v7: idempotency keys that outlive their job (issue 14, item 6). Expand-only:
-- a new table and a new function; binaries of schema v6 and older never use them.
--
-- A job's `unique_key` dedups only while its job is unfinished. An idempotency key
-- dedups for as long as the key is kept, whatever became of its job (completed,
-- retried, pruned): the same (account, key) enqueued again returns the first job's
-- id and enqueues nothing. Producers outside Warden get exactly-once enqueue per key;
-- periodic fires use it with the key (schedule, nominal time).
--
-- Decided by this table's primary key, not by a read: an enqueue inserts the key
-- first (ON CONFLICT), and inserts the job only if the key went in — so two
-- enqueuers of one key can never both insert, whatever their snapshots saw. A key
-- past `expires_at` is taken over by the next enqueue; the retention pruner deletes
-- expired keys in batches (`store::prune_idempotency_keys`).
CREATE TABLE IF NOT EXISTS warden.idempotency_keys (
    account    text NOT NULL,
    key        text NOT NULL,
    -- No foreign key: the key outlives the job (which retention may delete).
    job_id     bigint NOT NULL,
    created_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (account, key)
);
CREATE INDEX IF NOT EXISTS idempotency_keys_expires_at ON warden.idempotency_keys (expires_at);

-- Enqueue from SQL with an idempotency key: like warden.enqueue (same checks, same
-- per-account lock, same order rule, and the same defaults: max_attempts and
-- timeout_ms left NULL come from the kind's published options in warden.kinds, else
-- 25 and 60 s), returning (job_id, duplicate). The key is kept for p_keep (default 7
-- days, at most 3650 days).
CREATE OR REPLACE FUNCTION warden.enqueue_idempotent(
    p_account      text,
    p_kind         text,
    p_key          text,
    p_args         jsonb DEFAULT '{}'::jsonb,
    p_run_at       timestamptz DEFAULT NULL,
    p_keep         interval DEFAULT interval '7 days',
    p_max_attempts integer DEFAULT NULL,
    p_priority     smallint DEFAULT 0,
    p_lane         text DEFAULT 'serial',
    p_timeout_ms   integer DEFAULT NULL,
    OUT job_id     bigint,
    OUT duplicate  boolean
)
LANGUAGE plpgsql AS $$
DECLARE
    v_partitions integer;
    v_partition  integer;
    v_now        timestamptz;
    v_run_at     timestamptz;
    v_id         bigint;
    v_locked     integer;
    v_max_attempts integer;
    v_timeout_ms   integer;
BEGIN
    IF p_account IS NULL OR length(p_account) = 0 OR octet_length(p_account) > 256
       OR p_account ~ '[[:cntrl:]]' THEN
        RAISE EXCEPTION 'warden.enqueue_idempotent: account must be 1..256 bytes without control characters'
            USING ERRCODE = '22023';
    END IF;
    IF p_kind IS NULL OR length(p_kind) = 0 OR octet_length(p_kind) > 128
       OR p_kind ~ '[[:cntrl:]]' THEN
        RAISE EXCEPTION 'warden.enqueue_idempotent: kind must be 1..128 bytes without control characters'
            USING ERRCODE = '22023';
    END IF;
    IF p_key IS NULL OR length(p_key) = 0 OR octet_length(p_key) > 256 OR p_key ~ '[[:cntrl:]]' THEN
        RAISE EXCEPTION 'warden.enqueue_idempotent: key must be 1..256 bytes without control characters'
            USING ERRCODE = '22023';
    END IF;
    IF p_args IS NULL OR octet_length(p_args::text) > 65536 THEN
        RAISE EXCEPTION 'warden.enqueue_idempotent: args must be JSON of at most 65536 bytes'
            USING ERRCODE = '22023';
    END IF;
    IF p_keep IS NULL OR p_keep <= interval '0' OR p_keep > interval '3650 days' THEN
        RAISE EXCEPTION 'warden.enqueue_idempotent: p_keep must be more than 0 and at most 3650 days'
            USING ERRCODE = '22023';
    END IF;
    IF p_max_attempts IS NOT NULL AND (p_max_attempts < 1 OR p_max_attempts > 1000) THEN
        RAISE EXCEPTION 'warden.enqueue_idempotent: max_attempts must be 1..1000' USING ERRCODE = '22023';
    END IF;
    IF p_timeout_ms IS NOT NULL AND (p_timeout_ms < 1 OR p_timeout_ms > 86400000) THEN
        RAISE EXCEPTION 'warden.enqueue_idempotent: timeout_ms must be 1..86400000' USING ERRCODE = '22023';
    END IF;
    -- As warden.enqueue: a clear error rather than the table's constraint, and the
    -- same horizon.
    IF p_run_at IS NOT NULL AND NOT (p_run_at >= '1970-01-01 00:00:00+00'
                                     AND p_run_at <= statement_timestamp() + interval '3650 days') THEN
        RAISE EXCEPTION 'warden.enqueue_idempotent: run_at must be between 1970-01-01 and 3650 days from now, got %',
            p_run_at USING ERRCODE = '22023';
    END IF;
    IF p_lane IS NULL OR p_lane NOT IN ('serial', 'unordered') THEN
        RAISE EXCEPTION 'warden.enqueue_idempotent: lane must be serial or unordered' USING ERRCODE = '22023';
    END IF;
    SELECT value::integer INTO v_partitions FROM warden.meta WHERE key = 'partitions';
    IF v_partitions IS NULL THEN
        RAISE EXCEPTION 'warden.enqueue_idempotent: cluster not initialised (no partition count); start a node first'
            USING ERRCODE = '55000';
    END IF;
    v_partition := warden.partition_of(p_account, v_partitions);
    -- Unset options come from the kind's published ones, as in warden.enqueue (a job
    -- of a kind registered with a 10-minute timeout must not get 60 s here).
    SELECT COALESCE(p_max_attempts, k.max_attempts), COALESCE(p_timeout_ms, k.timeout_ms)
      INTO v_max_attempts, v_timeout_ms FROM warden.kinds k WHERE k.kind = p_kind;
    v_max_attempts := COALESCE(v_max_attempts, p_max_attempts, 25);
    v_timeout_ms := COALESCE(v_timeout_ms, p_timeout_ms, 60000);

    -- The account's enqueue locks, exactly as warden.enqueue takes them.
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

    -- The key first: the primary key decides (an expired key is taken over).
    v_id := nextval(pg_get_serial_sequence('warden.jobs', 'id'));
    INSERT INTO warden.idempotency_keys AS k (account, key, job_id, created_at, expires_at)
    VALUES (p_account, p_key, v_id, v_now, v_now + p_keep)
    ON CONFLICT (account, key) DO UPDATE
        SET job_id = EXCLUDED.job_id, created_at = EXCLUDED.created_at, expires_at = EXCLUDED.expires_at
        WHERE k.expires_at <= EXCLUDED.created_at
    RETURNING k.job_id INTO job_id;
    IF job_id IS NULL THEN
        SELECT k.job_id INTO job_id FROM warden.idempotency_keys k WHERE k.account = p_account AND k.key = p_key;
        duplicate := true;
        RETURN;
    END IF;

    INSERT INTO warden.jobs (id, account, partition, kind, args, lane, state, priority, run_at, due_at,
                             max_attempts, timeout_ms)
    VALUES (v_id, p_account, v_partition, p_kind, p_args, p_lane,
            CASE WHEN v_run_at > v_now THEN 'scheduled' ELSE 'available' END,
            p_priority, v_run_at, v_run_at, v_max_attempts, v_timeout_ms);
    PERFORM pg_notify('warden_wake', v_partition::text || ':' || p_account);
    duplicate := false;
END
$$;
