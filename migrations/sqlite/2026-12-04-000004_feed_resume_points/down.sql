ALTER TABLE feed_fences DROP COLUMN resume_after;
