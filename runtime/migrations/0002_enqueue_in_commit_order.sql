-- Serial order is (run_at, id), fixed at insert, but a job becomes visible when its
-- transaction commits. Two transactions enqueueing for one account could commit in
-- the opposite order and the later-sorting job could run before the earlier one
-- existed. An enqueue now holds a lock on its account until its transaction ends,
-- and reads the order key only once it holds it: the account's group shared, then
-- the account exclusive, the same locks the Rust client takes (see
-- store::ENQUEUE_LOCK_CLASS in the runtime crate, 1463898692 = "WARD").

CREATE OR REPLACE FUNCTION warden.enqueue(
    p_account      text,
    p_kind         text,
    p_args         jsonb DEFAULT '{}'::jsonb,
    p_run_at       timestamptz DEFAULT NULL,
    p_max_attempts integer DEFAULT 25,
    p_priority     smallint DEFAULT 0,
    p_unique_key   text DEFAULT NULL,
    p_lane         text DEFAULT 'serial',
    p_timeout_ms   integer DEFAULT 60000
) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_partitions integer;
    v_partition  integer;
    v_now        timestamptz;
    v_run_at     timestamptz;
    v_id         bigint;
    v_locked     integer;
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
    IF p_unique_key IS NOT NULL AND (length(p_unique_key) = 0 OR octet_length(p_unique_key) > 256) THEN
        RAISE EXCEPTION 'warden.enqueue: unique_key must be 1..256 bytes' USING ERRCODE = '22023';
    END IF;
    IF p_max_attempts IS NULL OR p_max_attempts < 1 OR p_max_attempts > 1000 THEN
        RAISE EXCEPTION 'warden.enqueue: max_attempts must be 1..1000' USING ERRCODE = '22023';
    END IF;
    IF p_lane NOT IN ('serial', 'unordered') THEN
        RAISE EXCEPTION 'warden.enqueue: lane must be serial or unordered' USING ERRCODE = '22023';
    END IF;
    SELECT value::integer INTO v_partitions FROM warden.meta WHERE key = 'partitions';
    IF v_partitions IS NULL THEN
        RAISE EXCEPTION 'warden.enqueue: cluster not initialised (no partition count); start a node first'
            USING ERRCODE = '55000';
    END IF;
    v_partition := warden.partition_of(p_account, v_partitions);

    -- Wait for any other uncommitted enqueue of this account, then read the order
    -- key: jobs of one account sort in the order their transactions commit.
    -- Past 64 accounts locked one by one in this transaction (a trigger over a bulk
    -- update, a long loop), lock whole groups instead: the locks last until commit
    -- and PostgreSQL's lock table is shared and small.
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

    INSERT INTO warden.jobs (account, partition, kind, args, lane, state, priority, run_at, due_at,
                             max_attempts, timeout_ms, unique_key)
    VALUES (p_account, v_partition, p_kind, p_args, p_lane,
            CASE WHEN v_run_at > v_now THEN 'scheduled' ELSE 'available' END,
            p_priority, v_run_at, v_run_at, p_max_attempts, p_timeout_ms, p_unique_key)
    ON CONFLICT (account, unique_key)
        WHERE unique_key IS NOT NULL AND state IN ('scheduled', 'available', 'retryable', 'running')
        DO NOTHING
    RETURNING id INTO v_id;

    IF v_id IS NULL THEN
        SELECT id INTO v_id FROM warden.jobs
        WHERE account = p_account AND unique_key = p_unique_key
          AND state IN ('scheduled', 'available', 'retryable', 'running');
        RETURN v_id;
    END IF;

    PERFORM pg_notify('warden_wake', v_partition::text || ':' || p_account);
    RETURN v_id;
END
$$;
