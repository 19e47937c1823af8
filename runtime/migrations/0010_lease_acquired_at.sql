-- Schema v10: when each lease was granted to its owner (issue 13: sticky placement).
-- Expand-only: one nullable column; binaries of schema v9 keep working against it
-- (they grant leases without setting it, which only makes sticky placement treat
-- those grants as old), so `compatible_from` stays where it is.
--
-- Sticky placement (`warden_cluster::sticky`) reads every live holder and this time:
-- a member over its share gives up its most recently granted partitions first, which
-- is what keeps a rolling replace to at most two moves per partition. A renewal does
-- not change it; a grant to another owner, or after a release or expiry, does.
ALTER TABLE warden.leases ADD COLUMN IF NOT EXISTS acquired_at timestamptz;
