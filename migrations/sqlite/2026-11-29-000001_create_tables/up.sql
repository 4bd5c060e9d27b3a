-- The contract's tables (shared/CONTRACT.md section 4) and the project's own
-- columns: profiles and their field mappings, calibration on sensors,
-- sensors.last_good_at (the alarm clock of step 6), and write tokens that make
-- a retried commit whose acknowledgement was lost recognisable.
--
-- SQLite mapping: ids are INTEGER PRIMARY KEY (64-bit rowids), floats REAL,
-- booleans INTEGER 0/1, instants TEXT 'YYYY-MM-DDTHH:MM:SS.ffffffZ' in UTC
-- (fixed width, so text order is time order).

CREATE TABLE profiles (
    id   INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE
);

CREATE TABLE profile_fields (
    id           INTEGER PRIMARY KEY,
    profile_id   INTEGER NOT NULL REFERENCES profiles (id) ON DELETE CASCADE,
    field        TEXT NOT NULL,
    metric       TEXT NOT NULL,
    scale        REAL NOT NULL DEFAULT 1,
    offset_value REAL NOT NULL DEFAULT 0,
    UNIQUE (profile_id, field),
    UNIQUE (profile_id, metric)
);

CREATE TABLE devices (
    id           INTEGER PRIMARY KEY,
    key          TEXT NOT NULL UNIQUE,
    site         TEXT NOT NULL DEFAULT '',
    profile_id   INTEGER NOT NULL REFERENCES profiles (id),
    last_seen_at TEXT
);

CREATE TABLE sensors (
    id           INTEGER PRIMARY KEY,
    device_id    INTEGER NOT NULL REFERENCES devices (id),
    metric       TEXT NOT NULL,
    unit         TEXT NOT NULL DEFAULT '',
    scale        REAL NOT NULL DEFAULT 1,
    offset_value REAL NOT NULL DEFAULT 0,
    min_value    REAL,
    max_value    REAL,
    last_good_at TEXT,
    UNIQUE (device_id, metric)
);

CREATE TABLE alarms (
    id        INTEGER PRIMARY KEY,
    sensor_id INTEGER NOT NULL REFERENCES sensors (id),
    name      TEXT NOT NULL,
    condition TEXT NOT NULL CHECK (condition IN ('gt', 'gte', 'lt', 'lte')),
    threshold REAL NOT NULL,
    active    INTEGER NOT NULL DEFAULT 1,
    UNIQUE (sensor_id, name)
);

CREATE TABLE alerts (
    id          INTEGER PRIMARY KEY,
    alarm_id    INTEGER NOT NULL REFERENCES alarms (id),
    opened_at   TEXT NOT NULL,
    open_value  REAL NOT NULL,
    closed_at   TEXT,
    close_value REAL
);
-- An alarm has at most one open alert.
CREATE UNIQUE INDEX alerts_one_open_per_alarm ON alerts (alarm_id) WHERE closed_at IS NULL;

CREATE TABLE readings (
    id         INTEGER PRIMARY KEY,
    sensor_id  INTEGER NOT NULL REFERENCES sensors (id),
    ts         TEXT NOT NULL,
    value      REAL NOT NULL,
    quality    TEXT NOT NULL CHECK (quality IN ('good', 'out_of_range')),
    message_id TEXT NOT NULL,
    UNIQUE (sensor_id, ts)
);

CREATE TABLE dead_letters (
    id          INTEGER PRIMARY KEY,
    message_id  TEXT UNIQUE,
    device_key  TEXT,
    kind        TEXT NOT NULL
                CHECK (kind IN ('malformed', 'invalid', 'unknown_device', 'db_rejected', 'internal')),
    error       TEXT NOT NULL,
    raw         TEXT NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 1,
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL,
    write_token TEXT NOT NULL UNIQUE
);
CREATE INDEX dead_letters_kind ON dead_letters (kind, created_at);

CREATE TABLE processed_messages (
    message_id   TEXT PRIMARY KEY,
    processed_at TEXT NOT NULL,
    write_token  TEXT NOT NULL
);
