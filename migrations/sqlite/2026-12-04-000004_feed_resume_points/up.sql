-- Where a NATS partition's next owner starts (see the PostgreSQL migration
-- of the same name).
ALTER TABLE feed_fences ADD COLUMN resume_after INTEGER NOT NULL DEFAULT 0;
