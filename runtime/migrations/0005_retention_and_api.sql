-- Retention and bounded operator queries (issue 11, items 4 and 7).
--
-- Independent of 0004: only indexes, each IF NOT EXISTS. On a large jobs table a
-- plain CREATE INDEX blocks writes to it while it builds; an operator can create the
-- same indexes beforehand with CREATE INDEX CONCURRENTLY under these names, and this
-- migration then only records itself.

-- The retention pruner: finished jobs, oldest first (`store::prune_finished`); with the
-- state included, `store::queue_depth` counts finished jobs by state index-only (capped).
CREATE INDEX IF NOT EXISTS jobs_finished_at ON warden.jobs (finished_at, id) INCLUDE (state)
    WHERE state IN ('completed', 'discarded', 'cancelled');

-- Queue depth per partition and state, counted index-only and capped per partition
-- (`store::queue_depth`): the unfinished rows only, so it stays as small as the backlog.
CREATE INDEX IF NOT EXISTS jobs_open_partition_state ON warden.jobs (partition, state)
    WHERE state IN ('scheduled', 'available', 'retryable', 'running');

-- A job's attempts in order, paged (`store::attempts_page`) and deleted with the job by
-- the pruner. Replaces attempts_job (job_id), which it covers.
CREATE INDEX IF NOT EXISTS attempts_job_id ON warden.attempts (job_id, id);
DROP INDEX IF EXISTS warden.attempts_job;
