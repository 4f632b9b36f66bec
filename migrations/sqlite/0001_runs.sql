-- Runs, their attempts (one row per attempt: owner, lease epoch, lease expiry) and the
-- outbox of pending publishes. Times are milliseconds since the Unix epoch (UTC).
CREATE TABLE runs (
    id               TEXT PRIMARY KEY,            -- lower-case ULID: sorts by creation time
    job              TEXT NOT NULL,
    params           TEXT NOT NULL,               -- JSON object of strings
    spec             TEXT NOT NULL,               -- protocol::SpecV1, frozen at acceptance
    status           TEXT NOT NULL,
    attempt          INTEGER NOT NULL DEFAULT 0,  -- current attempt; 0 = never claimed
    epoch            INTEGER NOT NULL DEFAULT 0,  -- bumped by every claim or takeover
    exit_code        INTEGER,
    reason           TEXT,
    reason_code      TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    not_before       INTEGER,                     -- a retry's backoff
    created_at       INTEGER NOT NULL,
    started_at       INTEGER,
    finished_at      INTEGER
);
CREATE INDEX runs_by_job ON runs (job, id);
CREATE INDEX runs_by_status ON runs (status, id);

CREATE TABLE attempts (
    run_id           TEXT NOT NULL REFERENCES runs (id),
    attempt          INTEGER NOT NULL,
    worker_id        TEXT NOT NULL,
    epoch            INTEGER NOT NULL,
    lease_expires_at INTEGER NOT NULL,
    container_id     TEXT,
    status           TEXT NOT NULL,
    exit_code        INTEGER,
    reason           TEXT,
    reason_code      TEXT,
    claimed_at       INTEGER NOT NULL,
    started_at       INTEGER,
    finished_at      INTEGER,
    PRIMARY KEY (run_id, attempt)
);
CREATE INDEX attempts_by_lease ON attempts (status, lease_expires_at);

CREATE TABLE outbox (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id     TEXT NOT NULL REFERENCES runs (id),
    attempt    INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    sent_at    INTEGER,
    tries      INTEGER NOT NULL DEFAULT 0,
    last_error TEXT
);
CREATE INDEX outbox_pending ON outbox (id) WHERE sent_at IS NULL;
