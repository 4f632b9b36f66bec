-- Completion callbacks. Times are milliseconds since the Unix epoch (UTC).

-- Where the run announces its end (from the request or its job file); NULL: nowhere.
ALTER TABLE runs ADD COLUMN callback_url TEXT;

-- One row per event to deliver, written in the transaction that makes the run final.
-- `event_id` is the `webhook-id`, the same across retries. Due while neither delivered
-- nor given up, from `next_try_at`.
CREATE TABLE callback_deliveries (
    id           INTEGER PRIMARY KEY,
    run_id       TEXT NOT NULL REFERENCES runs (id),
    url          TEXT NOT NULL,
    event        TEXT NOT NULL,
    event_id     TEXT NOT NULL UNIQUE,
    created_at   INTEGER NOT NULL,
    tries        INTEGER NOT NULL DEFAULT 0,
    last_status  INTEGER,
    last_error   TEXT,
    next_try_at  INTEGER,
    delivered_at INTEGER,
    gave_up      INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX callback_deliveries_by_run ON callback_deliveries (run_id);
CREATE INDEX callback_deliveries_due ON callback_deliveries (next_try_at)
    WHERE delivered_at IS NULL AND gave_up = 0;
