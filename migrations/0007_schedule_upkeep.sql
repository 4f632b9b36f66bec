-- Schedule upkeep. Times are milliseconds since the Unix epoch (UTC).

-- Retention deletes slot records by age, oldest first (with the runs' cutoff).
CREATE INDEX schedule_slots_by_recorded ON schedule_slots (recorded_at);
