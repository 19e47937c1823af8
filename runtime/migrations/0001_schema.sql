-- Warden schema v1. Everything lives in the `warden` schema.
-- Job states: scheduled (not due when enqueued), available, running, retryable,
-- completed, discarded, cancelled. "pending" below means scheduled|available|retryable.

CREATE SCHEMA IF NOT EXISTS warden;

-- Cluster metadata: the partition count P is fixed when the schema is first used.
CREATE TABLE warden.meta (
    key   text PRIMARY KEY,
    value text NOT NULL
);

-- One row per partition. The database clock alone decides expiry.
-- The unique (partition, epoch) index makes `epoch` a *key* column: an acquire
-- (which bumps the epoch) then conflicts with the FOR KEY SHARE lock every fenced
-- executor statement takes, while a renewal (which only moves lease_expires_at)
-- does not — so a busy partition can never starve its own renewal.
CREATE TABLE warden.leases (
    partition        integer PRIMARY KEY,
    owner_node       text,
    epoch            bigint NOT NULL DEFAULT 0,
    lease_expires_at timestamptz,
    UNIQUE (partition, epoch)
);

CREATE TABLE warden.jobs (
    id               bigserial PRIMARY KEY,
    account          text NOT NULL,
    partition        integer NOT NULL,
    kind             text NOT NULL,
    args             jsonb NOT NULL,
    lane             text NOT NULL DEFAULT 'serial' CHECK (lane IN ('serial', 'unordered')),
    state            text NOT NULL CHECK (state IN ('scheduled', 'available', 'running', 'retryable',
                                                     'completed', 'discarded', 'cancelled')),
    priority         smallint NOT NULL DEFAULT 0,
    -- The serial order key: immutable after enqueue (then id).
    run_at           timestamptz NOT NULL,
    -- When the job may next start: run_at, or later after a retry backoff or snooze.
    due_at           timestamptz NOT NULL,
    attempt          integer NOT NULL DEFAULT 0,
    max_attempts     integer NOT NULL CHECK (max_attempts >= 1),
    timeout_ms       integer NOT NULL CHECK (timeout_ms >= 1),
    unique_key       text,
    -- Holder of the current/last attempt: lease epoch and node.
    epoch            bigint,
    node             text,
    cancel_requested boolean NOT NULL DEFAULT false,
    created_at       timestamptz NOT NULL DEFAULT statement_timestamp(),
    attempted_at     timestamptz,
    finished_at      timestamptz,
    last_error       text
);

-- Head lookup for one account: its unfinished jobs in serial order.
CREATE INDEX jobs_account_open ON warden.jobs (account, run_at, id)
    WHERE state IN ('scheduled', 'available', 'retryable', 'running');
-- Enforcer scan: due work per partition.
CREATE INDEX jobs_partition_due ON warden.jobs (partition, due_at)
    WHERE state IN ('scheduled', 'available', 'retryable');
-- Rescue: running attempts per partition.
CREATE INDEX jobs_partition_running ON warden.jobs (partition)
    WHERE state = 'running';
-- Safety net: at most one running serial job per account, whatever the code does.
CREATE UNIQUE INDEX jobs_one_running_serial ON warden.jobs (account)
    WHERE state = 'running' AND lane = 'serial';
-- Idempotent enqueue: one unfinished job per (account, unique_key).
CREATE UNIQUE INDEX jobs_unique_open ON warden.jobs (account, unique_key)
    WHERE unique_key IS NOT NULL AND state IN ('scheduled', 'available', 'retryable', 'running');
CREATE INDEX jobs_account_id ON warden.jobs (account, id);

-- The audit trail: one row per attempt, written when it ends (or when it is rescued).
CREATE TABLE warden.attempts (
    id          bigserial PRIMARY KEY,
    job_id      bigint NOT NULL,
    account     text NOT NULL,
    partition   integer NOT NULL,
    attempt     integer NOT NULL,
    node        text NOT NULL,
    epoch       bigint NOT NULL,
    started_at  timestamptz NOT NULL,
    finished_at timestamptz NOT NULL,
    outcome     text NOT NULL CHECK (outcome IN ('completed', 'retry', 'snoozed', 'discarded',
                                                 'failed', 'timeout', 'cancelled', 'rescued')),
    error       text
);
CREATE INDEX attempts_job ON warden.attempts (job_id);
CREATE INDEX attempts_account ON warden.attempts (account, started_at);

-- Stable partition hash, the twin of warden_cluster::partition_of.
CREATE FUNCTION warden.partition_of(account text, partitions integer) RETURNS integer
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT (('x' || substr(md5(account), 1, 8))::bit(32)::bigint % partitions)::integer
$$;

-- Enqueue from SQL (for example from the caller's own triggers). Validates like the
-- Rust client, honours unique keys, and wakes the owning node with a NOTIFY that
-- PostgreSQL delivers only if the surrounding transaction commits.
-- Returns the new job id, or the id of the existing unfinished job with the same key.
CREATE FUNCTION warden.enqueue(
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
    v_now        timestamptz := statement_timestamp();
    v_run_at     timestamptz := COALESCE(p_run_at, statement_timestamp());
    v_id         bigint;
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
