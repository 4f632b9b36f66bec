-- Output a worker could not deliver (the control plane unreachable), as the worker
-- last reported it with its output: a running total that only rises. It is already
-- counted in `log_dropped_bytes`; kept apart so a restarted worker that adopts the
-- attempt's container counts on from it, and a later report counts only its rise.
ALTER TABLE attempts ADD COLUMN log_undelivered_bytes INTEGER NOT NULL DEFAULT 0;
