-- Where a NATS partition's next owner starts (docs/ARCHITECTURE.md,
-- "Scale-out"): the stream sequence through which every message of the
-- partition has its outcome committed, written by the owner under its token,
-- never downwards, with the creation time of the stream it counts in (a
-- stream made again under the same name counts from 1, and an old point
-- would skip its messages). The partitions' consumers keep their state in
-- one node's memory; this is what survives that node.
ALTER TABLE feed_fences ADD COLUMN resume_after BIGINT NOT NULL DEFAULT 0;
ALTER TABLE feed_fences ADD COLUMN resume_stream BIGINT NOT NULL DEFAULT 0;
