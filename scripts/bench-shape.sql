-- pgbench script: one message's transaction, in the shape the apply engine
-- (src/db/repo/batch.rs) runs it for a batch of one (--batch-size 1): lock
-- the device, check the id, read the reference data's version (mappings,
-- sensors and alarms themselves come from the cache), read the sensors'
-- latest good readings and the open alerts, insert the readings, update the
-- sensors and the device, record the id, remove a dead letter of the id.
-- The sensor and alarm ids the engine has from its cache are looked up here
-- by the device's key. Run by scripts/bench against the same provisioned
-- database and server as the normalizer.
\set d random(0, :devices - 1)
\set n random(1, 2000000000)
BEGIN;
SELECT id, key FROM devices WHERE key = ANY(ARRAY['dev-' || lpad(:d::text, 5, '0')]) ORDER BY id FOR UPDATE;
SELECT message_id, write_token FROM processed_messages WHERE message_id = ANY(ARRAY['pgb-' || :client_id || '-' || :n]);
SELECT version FROM reference_version;
SELECT s.id, s.last_good_at FROM sensors s JOIN devices d ON d.id = s.device_id WHERE d.key = 'dev-' || lpad(:d::text, 5, '0');
SELECT al.alarm_id, al.id FROM alerts al JOIN alarms a ON a.id = al.alarm_id JOIN sensors s ON s.id = a.sensor_id JOIN devices d ON d.id = s.device_id
  WHERE d.key = 'dev-' || lpad(:d::text, 5, '0') AND al.closed_at IS NULL;
INSERT INTO readings (sensor_id, ts, value, quality, message_id)
  SELECT s.id, now() + (:n || ' microseconds')::interval, 21.5, 'good', 'pgb-' || :client_id || '-' || :n
  FROM sensors s JOIN devices d ON d.id = s.device_id
  WHERE d.key = 'dev-' || lpad(:d::text, 5, '0') AND s.metric IN ('temperature', 'light')
  ON CONFLICT (sensor_id, ts) DO NOTHING RETURNING sensor_id, ts;
UPDATE sensors SET last_good_at = now() WHERE device_id = (SELECT id FROM devices WHERE key = 'dev-' || lpad(:d::text, 5, '0')) AND metric IN ('temperature', 'light');
UPDATE devices SET last_seen_at = now() WHERE key = 'dev-' || lpad(:d::text, 5, '0') AND (last_seen_at IS NULL OR last_seen_at < now());
INSERT INTO processed_messages (message_id, processed_at, write_token) VALUES ('pgb-' || :client_id || '-' || :n, now(), 't') ON CONFLICT DO NOTHING;
DELETE FROM dead_letters WHERE message_id = ANY(ARRAY['pgb-' || :client_id || '-' || :n]);
END;
