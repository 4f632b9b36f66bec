-- What an attempt's container used, as its worker read it (`domain::run::ResourceUsage`),
-- written with the attempt's final state. All NULL when nothing was read: no container,
-- an attempt ended by the reaper or reconciliation, or a worker that does not sample.
ALTER TABLE attempts ADD COLUMN usage_samples INTEGER;             -- readings taken
ALTER TABLE attempts ADD COLUMN usage_peak_memory_bytes INTEGER;
ALTER TABLE attempts ADD COLUMN usage_cpu_seconds REAL;
ALTER TABLE attempts ADD COLUMN usage_memory_limit_bytes INTEGER;  -- as created
ALTER TABLE attempts ADD COLUMN usage_cpu_limit REAL;              -- cores, as created
