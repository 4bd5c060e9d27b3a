-- Fencing tokens of the NATS feed's partitions (see the PostgreSQL
-- migration of the same name).
CREATE TABLE feed_fences (
    partition_key TEXT PRIMARY KEY NOT NULL,
    token         INTEGER NOT NULL,
    owner         TEXT NOT NULL,
    claimed_at    TEXT NOT NULL
);
