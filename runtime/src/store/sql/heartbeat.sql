-- One statement per member heartbeat: upsert our row, forget members silent for a
-- day, list the fresh ones (the table has a row per node id seen in the last day).
-- $1 node id, $2 started at, $3 schema version, $4 ring, $5 freshness window in ms.
WITH me AS (
    INSERT INTO warden.members (node_id, seen_at, started_at, schema_version, ring)
    VALUES ($1, now(), $2, $3, $4)
    ON CONFLICT (node_id) DO UPDATE SET seen_at = now(), started_at = EXCLUDED.started_at,
        schema_version = EXCLUDED.schema_version, ring = EXCLUDED.ring
    RETURNING node_id),
gone AS (DELETE FROM warden.members WHERE seen_at < now() - interval '1 day')
SELECT node_id FROM warden.members
WHERE seen_at > now() - $5::bigint * interval '1 millisecond' AND node_id <> $1
UNION ALL SELECT node_id FROM me
