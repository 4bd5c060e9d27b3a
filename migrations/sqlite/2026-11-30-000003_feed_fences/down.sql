DROP TABLE feed_fences;
