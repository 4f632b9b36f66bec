-- Retries, cancel, log loss accounting and idempotency keys.
ALTER TABLE runs ADD COLUMN retry TEXT;               -- protocol::RetryV1, frozen at acceptance
ALTER TABLE runs ADD COLUMN log_dropped_bytes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE attempts ADD COLUMN log_dropped_bytes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE outbox ADD COLUMN not_before INTEGER;     -- a retry's backoff: publish from then on

-- `Idempotency-Key`: one run per (scope, key) for 24 hours.
CREATE TABLE idempotency_keys (
    scope      TEXT NOT NULL,                         -- the client; '' until tokens exist
    key        TEXT NOT NULL,
    job        TEXT NOT NULL,
    params     TEXT NOT NULL,                         -- canonical JSON of the params as given
    run_id     TEXT NOT NULL REFERENCES runs (id),
    created_at INTEGER NOT NULL,
    PRIMARY KEY (scope, key)
);
