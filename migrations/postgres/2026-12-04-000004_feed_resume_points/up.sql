-- Where a NATS partition's next owner starts (docs/ARCHITECTURE.md,
-- "Scale-out"): the stream sequence through which every message of the
-- partition has its outcome committed, written by the owner under its token,
-- never downwards. The partitions' consumers keep their state in one node's
-- memory; this is what survives that node.
ALTER TABLE feed_fences ADD COLUMN resume_after BIGINT NOT NULL DEFAULT 0;
