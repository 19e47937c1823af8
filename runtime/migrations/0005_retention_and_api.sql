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
-- attempts_job (job_id) is now redundant. It is not dropped here: DROP INDEX takes an
-- ACCESS EXCLUSIVE lock on warden.attempts, which would queue every finish behind any
-- open reader of the table. Drop it with `DROP INDEX CONCURRENTLY warden.attempts_job`
-- when convenient (deploy/UPGRADING.md).

-- An operator's CREATE INDEX CONCURRENTLY that failed leaves an invalid index under the
-- name, which IF NOT EXISTS would accept: refuse instead.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
               JOIN pg_namespace n ON n.oid = c.relnamespace
               WHERE n.nspname = 'warden' AND NOT i.indisvalid
                 AND c.relname IN ('jobs_finished_at', 'jobs_open_partition_state', 'attempts_job_id')) THEN
        RAISE EXCEPTION 'an index of migration 0005 exists but is invalid (a failed CREATE INDEX CONCURRENTLY?): drop it and start again';
    END IF;
END $$;
