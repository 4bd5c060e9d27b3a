-- Where a NATS partition's next owner starts, and in which stream (see the
-- PostgreSQL migration of the same name).
ALTER TABLE feed_fences ADD COLUMN resume_after INTEGER NOT NULL DEFAULT 0;
ALTER TABLE feed_fences ADD COLUMN resume_stream INTEGER NOT NULL DEFAULT 0;
