-- Schema v9: managing periodic schedules from SQL (issue 14, item 4). Expand-only: three
-- new functions; binaries of schema v8 keep working against it (deploy/UPGRADING.md),
-- so `compatible_from` stays where it is.
--
-- Only what SQL can do exactly as the runtime does, and nothing that could fire twice:
--
--   warden.schedule_pause(account, name)   → true if it exists (now paused)
--   warden.schedule_delete(account, name)  → true if it existed (its fired jobs stay)
--   warden.schedule_trigger(account, name) → the job id of one fire now, NULL if none
--
-- Not offered from SQL, on purpose: *creating or changing* a schedule and *resuming*
-- one. Both must compute the schedule's next nominal time — cron matched against wall
-- time in an IANA zone with the DST rule, intervals, start/end, the per-schedule jitter
-- (`runtime/src/schedule`) — and a second implementation of that in PL/pgSQL would be
-- one that can disagree with the scheduler. Resuming by clearing `paused` alone would
-- be wrong: the schedule would catch up the paused period (firing it, or counting it
-- missed) instead of continuing after the resume. Use the Rust client
-- (`Client::schedules()`), gRPC (`Schedules`) or `warden schedules` for those.
--
-- Why these three are safe: the scheduler fires a schedule only under its row lock,
-- after re-reading the row (`store::pg::schedules::fire_schedule`: paused, deleted or
-- advanced since its scan → nothing fired). A pause or delete committed before that
-- lock is seen by it; one waiting behind a fire applies after the fire, which was due
-- anyway. A trigger is by definition one extra fire (`via = 'trigger'`, outside the
-- (schedule, nominal time) uniqueness), taken under the same row lock as the runtime's
-- trigger, with the job enqueued through `warden.enqueue` (same checks, same order
-- rule, kind defaults resolved from `warden.kinds`).

CREATE OR REPLACE FUNCTION warden.schedule_pause(p_account text, p_name text) RETURNS boolean
LANGUAGE sql AS $$
    WITH paused AS (
        UPDATE warden.schedules SET paused = true, updated_at = statement_timestamp()
        WHERE account = p_account AND name = p_name
        RETURNING 1
    )
    SELECT EXISTS (SELECT 1 FROM paused)
$$;

CREATE OR REPLACE FUNCTION warden.schedule_delete(p_account text, p_name text) RETURNS boolean
LANGUAGE sql AS $$
    WITH deleted AS (
        DELETE FROM warden.schedules WHERE account = p_account AND name = p_name RETURNING 1
    )
    SELECT EXISTS (SELECT 1 FROM deleted)
$$;

CREATE OR REPLACE FUNCTION warden.schedule_trigger(p_account text, p_name text) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    s     warden.schedules%ROWTYPE;
    v_job bigint;
BEGIN
    SELECT * INTO s FROM warden.schedules WHERE account = p_account AND name = p_name FOR UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    v_job := warden.enqueue(s.account, s.kind, s.args, NULL, s.max_attempts, s.priority, NULL, s.lane,
                            s.timeout_ms);
    INSERT INTO warden.schedule_fires (job_id, schedule_id, nominal_at, fired_at, via)
    VALUES (v_job, s.id, statement_timestamp(), statement_timestamp(), 'trigger');
    UPDATE warden.schedules
    SET last_fired_at = statement_timestamp(), last_job_id = v_job, fires_total = fires_total + 1,
        updated_at = statement_timestamp()
    WHERE id = s.id;
    RETURN v_job;
END
$$;
