-- The PostgreSQL store's schema: the same tables and columns as the SQLite store after
-- its migration 13, so `tasuki store copy` moves rows column for column. Times are
-- milliseconds since the Unix epoch (UTC), as there. Identifiers compare byte-wise
-- (COLLATE "C"): a run id is a lower-case ULID, and its order is its creation order
-- whatever the database's locale.

CREATE TABLE runs (
    id                TEXT COLLATE "C" PRIMARY KEY,
    job               TEXT NOT NULL,
    params            TEXT NOT NULL,               -- JSON object of strings
    spec              TEXT NOT NULL,               -- protocol::SpecV1, frozen at acceptance
    status            TEXT NOT NULL,
    attempt           BIGINT NOT NULL DEFAULT 0,   -- current attempt; 0 = never claimed
    epoch             BIGINT NOT NULL DEFAULT 0,   -- bumped by every claim or takeover
    exit_code         BIGINT,
    reason            TEXT,
    reason_code       TEXT,
    cancel_requested  BOOLEAN NOT NULL DEFAULT FALSE,
    not_before        BIGINT,                      -- a retry's backoff
    created_at        BIGINT NOT NULL,
    started_at        BIGINT,
    finished_at       BIGINT,
    retry             TEXT,                        -- protocol::RetryV1, frozen at acceptance
    log_dropped_bytes BIGINT NOT NULL DEFAULT 0,
    "trigger"         TEXT,                        -- protocol::TriggerStoredV1; NULL = the API
    admission         TEXT,                        -- NULL = unlimited; see protocol::admission_text
    admitted          BOOLEAN NOT NULL DEFAULT TRUE, -- may go to workers (has its outbox row)
    callback_url      TEXT,
    requested_by      TEXT,                        -- the AMQP user_id of a queue request
    output_gap        BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE INDEX runs_by_job ON runs (job, id);
CREATE INDEX runs_by_status ON runs (status, id);
CREATE INDEX runs_by_finished ON runs (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX runs_waiting ON runs (job, id) WHERE NOT admitted;
CREATE INDEX runs_active ON runs (job, status, admitted) WHERE status IN ('queued', 'running');
CREATE INDEX runs_succeeded_by_job ON runs (job, finished_at) WHERE status = 'succeeded';
CREATE INDEX runs_by_created ON runs (created_at);

CREATE TABLE attempts (
    run_id                   TEXT COLLATE "C" NOT NULL REFERENCES runs (id),
    attempt                  BIGINT NOT NULL,
    worker_id                TEXT NOT NULL,
    epoch                    BIGINT NOT NULL,
    lease_expires_at         BIGINT NOT NULL,
    container_id             TEXT,
    status                   TEXT NOT NULL,
    exit_code                BIGINT,
    reason                   TEXT,
    reason_code              TEXT,
    claimed_at               BIGINT NOT NULL,
    started_at               BIGINT,
    finished_at              BIGINT,
    log_dropped_bytes        BIGINT NOT NULL DEFAULT 0,
    log_undelivered_bytes    BIGINT NOT NULL DEFAULT 0,
    usage_samples            BIGINT,
    usage_peak_memory_bytes  BIGINT,
    usage_cpu_seconds        DOUBLE PRECISION,
    usage_memory_limit_bytes BIGINT,
    usage_cpu_limit          DOUBLE PRECISION,
    output_gap               BOOLEAN NOT NULL DEFAULT FALSE,
    PRIMARY KEY (run_id, attempt)
);
CREATE INDEX attempts_by_lease ON attempts (status, lease_expires_at);
CREATE INDEX attempts_by_worker ON attempts (worker_id) WHERE status = 'running';

CREATE TABLE outbox (
    id              BIGSERIAL PRIMARY KEY,
    run_id          TEXT COLLATE "C" NOT NULL REFERENCES runs (id),
    attempt         BIGINT NOT NULL,
    created_at      BIGINT NOT NULL,
    sent_at         BIGINT,
    tries           BIGINT NOT NULL DEFAULT 0,
    last_error      TEXT,
    not_before      BIGINT,                        -- a retry's backoff: publish from then on
    last_try_failed BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE INDEX outbox_pending ON outbox (id) WHERE sent_at IS NULL;
CREATE INDEX outbox_by_run ON outbox (run_id, attempt);

CREATE TABLE idempotency_keys (
    scope      TEXT NOT NULL,
    key        TEXT NOT NULL,
    job        TEXT NOT NULL,
    params     TEXT NOT NULL,                      -- canonical JSON of the params as given
    run_id     TEXT COLLATE "C" NOT NULL REFERENCES runs (id),
    created_at BIGINT NOT NULL,
    PRIMARY KEY (scope, key)
);
CREATE INDEX idempotency_keys_by_run ON idempotency_keys (run_id);
CREATE INDEX idempotency_keys_by_age ON idempotency_keys (created_at);

CREATE TABLE worker_sessions (
    worker_id  TEXT PRIMARY KEY,
    instance   TEXT NOT NULL,
    host       TEXT NOT NULL,
    pid        BIGINT NOT NULL,
    started_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    ended_at   BIGINT
);

-- No foreign key to runs: the record of a firing outlives the run's retention.
CREATE TABLE schedule_slots (
    job           TEXT NOT NULL,
    schedule      TEXT NOT NULL,
    nominal       BIGINT NOT NULL,
    fire_at       BIGINT NOT NULL,
    business_date TEXT NOT NULL,                   -- YYYY-MM-DD in the schedule's zone
    outcome       TEXT NOT NULL,                   -- fired | skipped
    run_id        TEXT COLLATE "C",
    reason        TEXT,
    detail        TEXT,
    recorded_at   BIGINT NOT NULL,
    PRIMARY KEY (job, schedule, nominal)
);
CREATE INDEX schedule_slots_by_job ON schedule_slots (job, nominal);
CREATE INDEX schedule_slots_by_recorded ON schedule_slots (recorded_at);

CREATE TABLE schedule_cursors (
    job             TEXT NOT NULL,
    schedule        TEXT NOT NULL,
    evaluated_until BIGINT NOT NULL,
    definition      TEXT,
    PRIMARY KEY (job, schedule)
);

CREATE TABLE schedule_pauses (
    job      TEXT NOT NULL,
    schedule TEXT NOT NULL,
    note     TEXT,
    at       BIGINT NOT NULL,
    PRIMARY KEY (job, schedule)
);

CREATE TABLE callback_deliveries (
    id           BIGSERIAL PRIMARY KEY,
    run_id       TEXT COLLATE "C" NOT NULL REFERENCES runs (id),
    url          TEXT NOT NULL,
    event        TEXT NOT NULL,
    event_id     TEXT NOT NULL UNIQUE,
    created_at   BIGINT NOT NULL,
    tries        BIGINT NOT NULL DEFAULT 0,
    last_status  BIGINT,
    last_error   TEXT,
    next_try_at  BIGINT,
    delivered_at BIGINT,
    gave_up      BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE INDEX callback_deliveries_by_run ON callback_deliveries (run_id);
CREATE INDEX callback_deliveries_due ON callback_deliveries (next_try_at)
    WHERE delivered_at IS NULL AND NOT gave_up;

CREATE TABLE run_replies (
    id             BIGSERIAL PRIMARY KEY,
    run_id         TEXT COLLATE "C" NOT NULL REFERENCES runs (id),
    kind           TEXT NOT NULL,                  -- accepted | finished
    reply_to       TEXT NOT NULL,
    correlation_id TEXT,
    state          TEXT NOT NULL,                  -- waiting | pending | sent | unroutable
    tries          BIGINT NOT NULL DEFAULT 0,
    last_error     TEXT,
    next_try_at    BIGINT,
    created_at     BIGINT NOT NULL,
    sent_at        BIGINT
);
CREATE INDEX run_replies_by_run ON run_replies (run_id);
CREATE INDEX run_replies_due ON run_replies (id) WHERE state = 'pending';
