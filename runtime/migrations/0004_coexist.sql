-- Schema v4: a fence that burns no MultiXact ids, members that prove they reach the
-- database, and the schema's compatibility window. Expand-only: binaries of schema
-- v3 keep working against it (see deploy/UPGRADING.md), so `compatible_from` stays 3.

-- 1. The fence without row locks.
--
-- Until v3 every fenced statement locked its lease row FOR KEY SHARE, and a takeover
-- (which bumps the key column `epoch`) waited for those locks. Two fenced statements
-- of one partition in flight at once made PostgreSQL create a MultiXact for the row:
-- 3,181 for 3,961 fenced statements at 4 clients, which at 10,000 jobs/s forces an
-- anti-wraparound vacuum of the application's database about twice a day.
--
-- Now a fenced statement takes a *shared transaction advisory lock* on its partition
-- (class 1463898694 = "WARD" + 2; the enqueue locks use + 0 and + 1) and then checks
-- the lease in a new snapshot (a statement inside a VOLATILE plpgsql function in
-- READ COMMITTED takes its own). A takeover takes the same lock *exclusively*, in the
-- trigger below, so it waits for every fenced transaction in flight and every fenced
-- statement after it waits for the takeover to commit and then sees the new epoch.
-- Advisory locks live in the lock table, not in tuples: no MultiXact, no dead tuple.
--
-- The trigger fires for any writer that changes the epoch or the owner, so a v3 node
-- acquiring during a rolling upgrade respects v4 fences, and v4 acquires still take
-- the row lock that v3 fences (FOR KEY SHARE) conflict with.
CREATE FUNCTION warden.fence(p_partition integer, p_epoch bigint, p_owner text)
RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    -- The check below relies on READ COMMITTED taking a new snapshot after the lock
    -- wait; under REPEATABLE READ or SERIALIZABLE it would read the transaction's
    -- first snapshot (an application may set default_transaction_isolation).
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'warden.fence: fenced statements must run in READ COMMITTED, not %',
            current_setting('transaction_isolation') USING ERRCODE = '0A000';
    END IF;
    PERFORM pg_advisory_xact_lock_shared(1463898694, p_partition);
    RETURN EXISTS (
        SELECT 1 FROM warden.leases
        WHERE partition = p_partition AND owner_node = p_owner AND epoch = p_epoch
          AND lease_expires_at > clock_timestamp());
END $$;

CREATE FUNCTION warden.leases_takeover_waits_for_fences() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(1463898694, NEW.partition);
    RETURN NEW;
END $$;

CREATE TRIGGER leases_takeover_waits_for_fences
    BEFORE UPDATE ON warden.leases
    FOR EACH ROW
    WHEN (OLD.epoch IS DISTINCT FROM NEW.epoch OR OLD.owner_node IS DISTINCT FROM NEW.owner_node)
    EXECUTE FUNCTION warden.leases_takeover_waits_for_fences();

-- 2. Members prove they can reach the database.
--
-- Gossip says who is alive; it cannot say who can hold a lease. Every node writes
-- its row here on every lease-renewal tick (held leases or not); placement counts
-- only gossip-active members whose row is fresh, so a member that gossips but cannot
-- reach PostgreSQL (or a phantom that only gossips) owns nothing.
CREATE TABLE warden.members (
    node_id     text PRIMARY KEY,
    seen_at     timestamptz NOT NULL,
    started_at  timestamptz NOT NULL,
    schema_version integer NOT NULL,
    ring        text NOT NULL
);

-- 3. The compatibility window (see deploy/UPGRADING.md): the oldest schema version a binary
-- may know and still run against this database. Expand migrations leave it alone;
-- a contract migration raises it.
INSERT INTO warden.meta (key, value) VALUES ('compatible_from', '3')
    ON CONFLICT (key) DO NOTHING;
