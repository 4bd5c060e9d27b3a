-- The contract's tables (shared/CONTRACT.md section 4) and the project's own
-- columns: profiles and their field mappings, calibration on sensors,
-- sensors.last_good_at (the alarm clock of step 6), and write tokens that make
-- a retried commit whose acknowledgement was lost recognisable.

CREATE TABLE profiles (
    id   BIGSERIAL PRIMARY KEY,
    name TEXT NOT NULL UNIQUE
);

CREATE TABLE profile_fields (
    id           BIGSERIAL PRIMARY KEY,
    profile_id   BIGINT NOT NULL REFERENCES profiles (id) ON DELETE CASCADE,
    field        TEXT NOT NULL,
    metric       TEXT NOT NULL,
    scale        DOUBLE PRECISION NOT NULL DEFAULT 1,
    offset_value DOUBLE PRECISION NOT NULL DEFAULT 0,
    UNIQUE (profile_id, field),
    UNIQUE (profile_id, metric)
);

CREATE TABLE devices (
    id           BIGSERIAL PRIMARY KEY,
    key          TEXT NOT NULL UNIQUE,
    site         TEXT NOT NULL DEFAULT '',
    profile_id   BIGINT NOT NULL REFERENCES profiles (id),
    last_seen_at TIMESTAMPTZ
);

CREATE TABLE sensors (
    id           BIGSERIAL PRIMARY KEY,
    device_id    BIGINT NOT NULL REFERENCES devices (id),
    metric       TEXT NOT NULL,
    unit         TEXT NOT NULL DEFAULT '',
    scale        DOUBLE PRECISION NOT NULL DEFAULT 1,
    offset_value DOUBLE PRECISION NOT NULL DEFAULT 0,
    min_value    DOUBLE PRECISION,
    max_value    DOUBLE PRECISION,
    last_good_at TIMESTAMPTZ,
    UNIQUE (device_id, metric)
);

CREATE TABLE alarms (
    id        BIGSERIAL PRIMARY KEY,
    sensor_id BIGINT NOT NULL REFERENCES sensors (id),
    name      TEXT NOT NULL,
    condition TEXT NOT NULL CHECK (condition IN ('gt', 'gte', 'lt', 'lte')),
    threshold DOUBLE PRECISION NOT NULL,
    active    BOOLEAN NOT NULL DEFAULT TRUE,
    UNIQUE (sensor_id, name)
);

CREATE TABLE alerts (
    id          BIGSERIAL PRIMARY KEY,
    alarm_id    BIGINT NOT NULL REFERENCES alarms (id),
    opened_at   TIMESTAMPTZ NOT NULL,
    open_value  DOUBLE PRECISION NOT NULL,
    closed_at   TIMESTAMPTZ,
    close_value DOUBLE PRECISION
);
-- An alarm has at most one open alert.
CREATE UNIQUE INDEX alerts_one_open_per_alarm ON alerts (alarm_id) WHERE closed_at IS NULL;

CREATE TABLE readings (
    id         BIGSERIAL PRIMARY KEY,
    sensor_id  BIGINT NOT NULL REFERENCES sensors (id),
    ts         TIMESTAMPTZ NOT NULL,
    value      DOUBLE PRECISION NOT NULL,
    quality    TEXT NOT NULL CHECK (quality IN ('good', 'out_of_range')),
    message_id TEXT NOT NULL,
    UNIQUE (sensor_id, ts)
);

CREATE TABLE dead_letters (
    id          BIGSERIAL PRIMARY KEY,
    message_id  TEXT UNIQUE,
    device_key  TEXT,
    kind        TEXT NOT NULL
                CHECK (kind IN ('malformed', 'invalid', 'unknown_device', 'db_rejected', 'internal')),
    error       TEXT NOT NULL,
    raw         TEXT NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 1,
    created_at  TIMESTAMPTZ NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL,
    write_token TEXT NOT NULL UNIQUE
);
CREATE INDEX dead_letters_kind ON dead_letters (kind, created_at);

CREATE TABLE processed_messages (
    message_id   TEXT PRIMARY KEY,
    processed_at TIMESTAMPTZ NOT NULL,
    write_token  TEXT NOT NULL
);
