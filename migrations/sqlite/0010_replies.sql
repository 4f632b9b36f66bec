-- Producers on the request queue: who asked, and the replies owed to them. Times are
-- milliseconds since the Unix epoch (UTC).

-- The broker-validated AMQP user_id of the request; NULL for other callers.
ALTER TABLE runs ADD COLUMN requested_by TEXT;

-- One row per reply a producer asked for. 'accepted' rows are written pending with the
-- run; 'finished' rows are written waiting and become pending in the transaction that
-- makes the run final. The reply relay sends pending rows and marks them sent on the
-- broker's confirm, or unroutable when the broker returns them (never retried).
CREATE TABLE run_replies (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id         TEXT NOT NULL REFERENCES runs (id),
    kind           TEXT NOT NULL,                  -- accepted | finished
    reply_to       TEXT NOT NULL,
    correlation_id TEXT,
    state          TEXT NOT NULL,                  -- waiting | pending | sent | unroutable
    tries          INTEGER NOT NULL DEFAULT 0,
    last_error     TEXT,
    next_try_at    INTEGER,
    created_at     INTEGER NOT NULL,
    sent_at        INTEGER
);
CREATE INDEX run_replies_by_run ON run_replies (run_id);
CREATE INDEX run_replies_due ON run_replies (id) WHERE state = 'pending';
