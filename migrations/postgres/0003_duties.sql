-- Replicas sharing the database. Times are milliseconds since the Unix epoch (UTC).

-- Background duties one replica at a time does (the scheduler, the lease reaper,
-- retention): the holder keeps its lease by renewing it; another replica takes the
-- duty once the lease expires or is given up.
CREATE TABLE duty_leases (
    duty       TEXT PRIMARY KEY,
    holder     TEXT NOT NULL,
    expires_at BIGINT NOT NULL
);

-- A pending publish a replica's relay has taken: the others skip it until then (or
-- until it is marked sent or failed), so each goes out once.
ALTER TABLE outbox ADD COLUMN claimed_until BIGINT;
