-- Run logs, for replicas that share the database (the SQLite store keeps them in files
-- under the data dir). An attempt's log is the bytes of its container's output in
-- arrival order, the stream not kept: `log_heads` holds its length, `log_chunks` its
-- bytes, one row per append that added any, each starting where the one before ends.
-- No foreign key to runs: retention deletes the logs after the run's rows, as with files.

CREATE TABLE log_heads (
    run_id  TEXT COLLATE "C" NOT NULL,
    attempt BIGINT NOT NULL,
    len     BIGINT NOT NULL,                       -- bytes stored: the next chunk's offset
    PRIMARY KEY (run_id, attempt)
);

CREATE TABLE log_chunks (
    run_id   TEXT COLLATE "C" NOT NULL,
    attempt  BIGINT NOT NULL,
    "offset" BIGINT NOT NULL,                      -- of the chunk's first byte in the log
    data     BYTEA NOT NULL,
    PRIMARY KEY (run_id, attempt, "offset")
);
