-- Schedules and per-job concurrency. Times are milliseconds since the Unix epoch (UTC).

-- What started a run: protocol::TriggerStoredV1 as JSON; NULL = the API (older rows).
ALTER TABLE runs ADD COLUMN "trigger" TEXT;
-- How the run waits to be handed to a worker: NULL = unlimited, 'at_most:N' (the job's
-- max_concurrent), 'alone' (a buffered firing); see protocol::admission_text.
ALTER TABLE runs ADD COLUMN admission TEXT;
-- 1 once the run may go to workers (its outbox row is written then); 0 while it waits
-- for room. Rows from before this migration all had their outbox row: admitted.
ALTER TABLE runs ADD COLUMN admitted INTEGER NOT NULL DEFAULT 1;
-- A job's waiting runs, in arrival (id) order.
CREATE INDEX runs_waiting ON runs (job, id) WHERE admitted = 0;

-- One row per slot a scheduler accounted for: the key is the slot's identity, so a
-- slot fires at most once however many schedulers (or stores on one file) look at it.
-- No foreign key to runs: the record of a firing outlives the run's retention.
CREATE TABLE schedule_slots (
    job           TEXT NOT NULL,
    schedule      TEXT NOT NULL,
    nominal       INTEGER NOT NULL,                 -- the slot's nominal instant
    fire_at       INTEGER NOT NULL,
    business_date TEXT NOT NULL,                    -- YYYY-MM-DD in the schedule's zone
    outcome       TEXT NOT NULL,                    -- fired | skipped
    run_id        TEXT,                             -- fired: the run it started
    reason        TEXT,                             -- skipped: domain SkipReason text
    detail        TEXT,
    recorded_at   INTEGER NOT NULL,
    PRIMARY KEY (job, schedule, nominal)
);
CREATE INDEX schedule_slots_by_job ON schedule_slots (job, nominal);

-- Up to when each schedule's slots have been looked at; only ever moves forward.
CREATE TABLE schedule_cursors (
    job             TEXT NOT NULL,
    schedule        TEXT NOT NULL,
    evaluated_until INTEGER NOT NULL,
    PRIMARY KEY (job, schedule)
);

-- Schedules paused at run time (a row = paused).
CREATE TABLE schedule_pauses (
    job      TEXT NOT NULL,
    schedule TEXT NOT NULL,
    note     TEXT,
    at       INTEGER NOT NULL,
    PRIMARY KEY (job, schedule)
);
