-- Schema v8: periodic schedules (issue 14). Expand-only: two new tables; binaries of
-- schema v7 and older never read them. (warden.jobs is not altered: an ALTER TABLE
-- would queue every statement on the table behind the handler transactions in
-- flight.)
--
-- A schedule belongs to an account, so to that account's partition and its lease:
-- the partition's owner fires it (`scheduler` in the runtime), no leader election.
-- A fire is one transaction under the partition's fence (`warden.fence`): it
-- compares-and-sets `next_nominal` (the nominal time it fires), enqueues the job with
-- the idempotency key `schedule:<id>@<nominal>` (migration 0007), and advances the
-- schedule. A kill, pause or handoff at any instant around it leaves either nothing
-- (the next owner fires it) or all of it (the next owner sees it advanced): never a
-- duplicate, never a miss.
CREATE TABLE IF NOT EXISTS warden.schedules (
    id                bigserial PRIMARY KEY,
    account           text NOT NULL,
    partition         integer NOT NULL,
    name              text NOT NULL,
    -- The job each fire enqueues.
    kind              text NOT NULL,
    args              jsonb NOT NULL DEFAULT '{}'::jsonb,
    lane              text NOT NULL DEFAULT 'serial' CHECK (lane IN ('serial', 'unordered')),
    priority          smallint NOT NULL DEFAULT 0,
    max_attempts      integer CHECK (max_attempts BETWEEN 1 AND 1000),
    timeout_ms        integer CHECK (timeout_ms BETWEEN 1 AND 86400000),
    -- The timing (schedule::Spec): a cron expression, or an interval and its anchor.
    cron              text,
    every_ms          bigint,
    anchor_at         timestamptz,
    zone              text NOT NULL DEFAULT 'UTC',
    jitter_ms         bigint NOT NULL DEFAULT 0 CHECK (jitter_ms >= 0),
    start_at          timestamptz,
    end_at            timestamptz,
    -- Policies (scheduler::Overlap, scheduler::CatchUp).
    overlap           text NOT NULL DEFAULT 'skip'
                      CHECK (overlap IN ('skip', 'buffer_one', 'buffer_all', 'cancel_previous', 'allow')),
    catchup_window_ms bigint NOT NULL DEFAULT 3600000 CHECK (catchup_window_ms >= 0),
    catchup           text NOT NULL DEFAULT 'all' CHECK (catchup IN ('all', 'latest')),
    paused            boolean NOT NULL DEFAULT false,
    -- Declared in a node's code (reconciled on start, by revision) or made at run time.
    source            text NOT NULL DEFAULT 'runtime' CHECK (source IN ('code', 'runtime')),
    revision          integer NOT NULL DEFAULT 0,
    -- State. next_nominal: the next nominal time to handle (NULL: the schedule ended);
    -- next_fire_at: when (nominal + jitter).
    next_nominal      timestamptz,
    next_fire_at      timestamptz,
    last_nominal      timestamptz,
    last_fired_at     timestamptz,
    last_job_id       bigint,
    fires_total       bigint NOT NULL DEFAULT 0,
    skipped_total     bigint NOT NULL DEFAULT 0,
    missed_total      bigint NOT NULL DEFAULT 0,
    created_at        timestamptz NOT NULL DEFAULT statement_timestamp(),
    updated_at        timestamptz NOT NULL DEFAULT statement_timestamp(),
    CHECK ((cron IS NULL) <> (every_ms IS NULL)),
    UNIQUE (account, name)
);
-- The scheduler's scan: due schedules of the partitions a node holds.
CREATE INDEX IF NOT EXISTS schedules_due ON warden.schedules (partition, next_fire_at)
    WHERE NOT paused AND next_fire_at IS NOT NULL;

-- One row per job a schedule fired: the uniqueness key (schedule, nominal time), the
-- nominal time for the handler (`JobContext::scheduled_at`) and the fire lag
-- (nominal → fired; nominal → start with warden.attempts). It goes with its job.
CREATE TABLE IF NOT EXISTS warden.schedule_fires (
    job_id      bigint PRIMARY KEY REFERENCES warden.jobs (id) ON DELETE CASCADE,
    schedule_id bigint NOT NULL,
    nominal_at  timestamptz NOT NULL,
    fired_at    timestamptz NOT NULL,
    -- How: 'schedule' (its owner on time or catching up), 'trigger', 'backfill'.
    via         text NOT NULL CHECK (via IN ('schedule', 'trigger', 'backfill'))
);
-- Exactly one fire per (schedule, nominal time), whether the schedule fired it or a
-- backfill did; a manual trigger is a fire of its own.
CREATE UNIQUE INDEX IF NOT EXISTS schedule_fires_once ON warden.schedule_fires (schedule_id, nominal_at)
    WHERE via <> 'trigger';
-- The latest fires of a schedule (its overlap policy looks at their jobs).
CREATE INDEX IF NOT EXISTS schedule_fires_latest ON warden.schedule_fires (schedule_id, nominal_at DESC);
