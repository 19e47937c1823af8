-- Schema v6: long-running jobs (issue 15) — fenced heartbeats, progress and checkpoints.
-- Expand-only: a new table. Binaries of schema v5 never read or write it and keep
-- working (deploy/UPGRADING.md), so `compatible_from` stays where it is.
--
-- One row per job that has ever heartbeated or checkpointed, apart from warden.jobs:
-- a heartbeat every second rewrites this narrow row (no index but its key changes, so
-- the update is HOT when the page has room) instead of the wide, six-times-indexed
-- job row the hot path reads, and a job that never heartbeats costs nothing.
--
-- Every write to it is fenced like every executor write (`warden.fence` plus the job
-- still `running` at the writer's epoch, node and attempt: sql/job_beat.sql), so a
-- stale owner's late heartbeat or checkpoint changes nothing.
--
-- The checkpoint outlives the attempt that wrote it: the next attempt (after a
-- crash, a handoff, a drain or a retry) reads it back. The row goes with its job
-- (ON DELETE CASCADE), whoever deletes it: the retention pruner of this or an older
-- release, or an operator.
CREATE TABLE IF NOT EXISTS warden.job_progress (
    job_id             bigint PRIMARY KEY REFERENCES warden.jobs (id) ON DELETE CASCADE,
    -- The attempt that wrote last, and its lease epoch and node.
    attempt            integer NOT NULL,
    epoch              bigint NOT NULL,
    node               text NOT NULL,
    -- Its last heartbeat (a checkpoint counts as one), by the database clock.
    heartbeat_at       timestamptz NOT NULL,
    -- Its last reported progress (each field optional; sizes bounded by the writer).
    progress_percent   real CHECK (progress_percent IS NULL OR progress_percent BETWEEN 0 AND 100),
    progress_message   text,
    progress_details   jsonb,
    -- The last committed checkpoint, by whichever attempt wrote it.
    checkpoint         jsonb,
    checkpoint_at      timestamptz,
    checkpoint_attempt integer,
    checkpoint_bytes   integer
);
