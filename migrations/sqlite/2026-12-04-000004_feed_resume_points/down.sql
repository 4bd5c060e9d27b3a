ALTER TABLE feed_fences DROP COLUMN resume_stream;
ALTER TABLE feed_fences DROP COLUMN resume_after;
