-- The build each worker runs, as its session names it (`tasuki --version`: version and
-- commit), copied onto each attempt it claims, so that a run's attempts say which build
-- ran them (a rolling upgrade runs two side by side). Both are NULL for a worker from
-- before this migration, which does not name its build: a replica still on the previous
-- build writes its rows without them while the roll goes on.
ALTER TABLE worker_sessions ADD COLUMN build TEXT;
ALTER TABLE attempts ADD COLUMN worker_build TEXT;
