-- The engine's cache as a table, for scripts/bench-shape.sql: each device's
-- sensor ids, the ids of the sensors a generated message reads
-- (temperature, light), and its alarm ids.
CREATE TABLE bench_cache AS
SELECT d.key,
  coalesce((SELECT array_agg(s.id ORDER BY s.id) FROM sensors s WHERE s.device_id = d.id), '{}') AS sensor_ids,
  coalesce((SELECT array_agg(s.id ORDER BY s.id) FROM sensors s
            WHERE s.device_id = d.id AND s.metric IN ('temperature', 'light')), '{}') AS reading_sensors,
  coalesce((SELECT array_agg(a.id ORDER BY a.id) FROM alarms a JOIN sensors s ON s.id = a.sensor_id
            WHERE s.device_id = d.id), '{}') AS alarm_ids
FROM devices d;
ALTER TABLE bench_cache ADD PRIMARY KEY (key);
ANALYZE bench_cache;
