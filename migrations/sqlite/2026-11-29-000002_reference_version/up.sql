-- Bumped by every provisioning load, in its transaction: normalizers (in
-- this process or another) refresh their cached reference data when it moves.
CREATE TABLE reference_version (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    version INTEGER NOT NULL
);
INSERT INTO reference_version (id, version) VALUES (1, 0);
