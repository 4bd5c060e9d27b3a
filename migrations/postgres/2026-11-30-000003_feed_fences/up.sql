-- Fencing tokens of the NATS feed's partitions (docs/ARCHITECTURE.md,
-- "Scale-out"). An instance that takes a partition over raises its token
-- here; every transaction that applies the partition's messages checks, as
-- its last statement, that the token is still its own. A paused or cut-off
-- former owner therefore commits nothing once the new owner has claimed.
CREATE TABLE feed_fences (
    partition_key TEXT PRIMARY KEY,
    token         BIGINT NOT NULL,
    owner         TEXT NOT NULL,
    claimed_at    TIMESTAMPTZ NOT NULL
);
