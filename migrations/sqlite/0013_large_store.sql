-- A store of millions of runs: reads that stay index probes however many runs are kept.
-- Times are milliseconds since the Unix epoch (UTC).

-- A job's runs in flight, counted at every accept (admission): only the active runs
-- are in it, so the count reads a few entries where `runs_by_job` walked every run the
-- job ever had. `status IN (...)` is spelled the same in the query, or SQLite would not
-- use a partial index (store/sqlite/admission.rs).
CREATE INDEX runs_active ON runs (job, status, admitted) WHERE status IN ('queued', 'running');

-- Each job's last success (read at the first metrics scrape): one probe per job.
-- Partial: an accept never writes to it, a run that succeeds once.
CREATE INDEX runs_succeeded_by_job ON runs (job, finished_at) WHERE status = 'succeeded';

-- Lists by creation date (the web UI's from/to): the day's runs, not every run since.
-- Rising with every accept, so its inserts land on the last page.
CREATE INDEX runs_by_created ON runs (created_at);
