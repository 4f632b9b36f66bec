-- Worker sessions: which process holds each worker id. One row per worker id, replaced
-- when another process takes the id over. Times are milliseconds since the Unix epoch.
CREATE TABLE worker_sessions (
    worker_id  TEXT PRIMARY KEY,
    instance   TEXT NOT NULL,                         -- random per process start
    host       TEXT NOT NULL,
    pid        INTEGER NOT NULL,
    started_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,                      -- pushed forward by heartbeats
    ended_at   INTEGER                                -- the process said goodbye
);
