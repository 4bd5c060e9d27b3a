-- pgbench script: one message's transaction, in the shape the apply engine
-- (src/db/repo/batch.rs) runs it for a batch of one (--batch-size 1): lock
-- the device, check the id, read the reference data's version (mappings,
-- sensors and alarms themselves come from the cache), read the sensors'
-- latest good readings and the open alerts, insert the readings, update the
-- sensors and the device, record the id, remove a dead letter of the id.
-- The engine has the device's sensor and alarm ids from its cache; here
-- they come with the device's lock, from `bench_cache` (one row per device,
-- made by scripts/bench before the run) joined to it in the same statement,
-- so that no lookup by key and no extra round trip is the reference's
-- handicap. Run by scripts/bench with `-M prepared` (the engine's
-- statements are prepared too) against the same provisioned database and
-- server as the normalizer.
\set d random(0, :devices - 1)
\set n random(1, 2000000000)
BEGIN;
SELECT d.id AS dev_id, c.sensor_ids, c.reading_sensors, c.alarm_ids
  FROM devices d JOIN bench_cache c ON c.key = d.key
  WHERE d.key = 'dev-' || lpad(:d::text, 5, '0') ORDER BY d.id FOR UPDATE OF d \gset
SELECT message_id, write_token FROM processed_messages WHERE message_id = ANY(ARRAY['pgb-' || :client_id || '-' || :n]);
SELECT version FROM reference_version;
SELECT id, last_good_at FROM sensors WHERE id = ANY(:sensor_ids::bigint[]);
SELECT alarm_id, id FROM alerts WHERE alarm_id = ANY(:alarm_ids::bigint[]) AND closed_at IS NULL;
INSERT INTO readings (sensor_id, ts, value, quality, message_id)
  SELECT s, now() + (:n || ' microseconds')::interval, 21.5, 'good', 'pgb-' || :client_id || '-' || :n
  FROM unnest(:reading_sensors::bigint[]) AS s
  ON CONFLICT (sensor_id, ts) DO NOTHING RETURNING sensor_id, ts;
UPDATE sensors SET last_good_at = now() WHERE id = ANY(:reading_sensors::bigint[]);
UPDATE devices SET last_seen_at = now() WHERE id = :dev_id AND (last_seen_at IS NULL OR last_seen_at < now());
INSERT INTO processed_messages (message_id, processed_at, write_token) VALUES ('pgb-' || :client_id || '-' || :n, now(), 't') ON CONFLICT DO NOTHING;
DELETE FROM dead_letters WHERE message_id = ANY(ARRAY['pgb-' || :client_id || '-' || :n]);
END;
