-- pgbench script: one message's transaction, the shape the normalizer runs
-- per message in one-per-transaction mode: check the id, look up and lock the
-- device, insert its readings, read its alarms and open alerts, update the
-- sensor and the device, record the id. Run by scripts/bench against the
-- same provisioned database and server as the normalizer.
\set d random(0, :devices - 1)
\set n random(1, 2000000000)
BEGIN;
SELECT write_token FROM processed_messages WHERE message_id = 'pgb-' || :client_id || '-' || :n;
SELECT id, profile_id FROM devices WHERE key = 'dev-' || lpad(:d::text, 5, '0') FOR UPDATE;
SELECT field, metric, scale, offset_value FROM profile_fields WHERE profile_id = (SELECT profile_id FROM devices WHERE key = 'dev-' || lpad(:d::text, 5, '0'));
SELECT id, metric, scale, offset_value, min_value, max_value, last_good_at FROM sensors WHERE device_id = (SELECT id FROM devices WHERE key = 'dev-' || lpad(:d::text, 5, '0'));
INSERT INTO readings (sensor_id, ts, value, quality, message_id)
  SELECT s.id, now() + (:n || ' microseconds')::interval, 21.5, 'good', 'pgb-' || :client_id || '-' || :n
  FROM sensors s JOIN devices d ON d.id = s.device_id
  WHERE d.key = 'dev-' || lpad(:d::text, 5, '0') AND s.metric IN ('temperature', 'light')
  ON CONFLICT (sensor_id, ts) DO NOTHING;
SELECT a.id, a.condition, a.threshold FROM alarms a JOIN sensors s ON s.id = a.sensor_id JOIN devices d ON d.id = s.device_id
  WHERE d.key = 'dev-' || lpad(:d::text, 5, '0') AND a.active;
UPDATE sensors SET last_good_at = now() WHERE device_id = (SELECT id FROM devices WHERE key = 'dev-' || lpad(:d::text, 5, '0')) AND metric IN ('temperature', 'light');
UPDATE devices SET last_seen_at = now() WHERE key = 'dev-' || lpad(:d::text, 5, '0');
INSERT INTO processed_messages (message_id, processed_at, write_token) VALUES ('pgb-' || :client_id || '-' || :n, now(), 't') ON CONFLICT DO NOTHING;
END;
