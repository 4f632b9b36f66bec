-- 1 when some of an attempt's output is missing from its log by an amount nobody knows:
-- a `logs = "fast"` container (no engine copy) adopted after its worker was away, so
-- what it wrote meanwhile is gone. The run's column is set with any attempt's.
ALTER TABLE attempts ADD COLUMN output_gap INTEGER NOT NULL DEFAULT 0;
ALTER TABLE runs ADD COLUMN output_gap INTEGER NOT NULL DEFAULT 0;
