-- Schedule upkeep. Times are milliseconds since the Unix epoch (UTC).

-- Retention deletes slot records by age, oldest first (with the runs' cutoff).
CREATE INDEX schedule_slots_by_recorded ON schedule_slots (recorded_at);

-- The fingerprint of the schedule definition (rule, zone, calendar, closed-day and DST
-- rules) the cursor was set under, as the scheduler writes it. When the scheduler sees
-- another, the cursor moves to now: a changed schedule takes effect from its next slot
-- instead of planning the slots since the old cursor under the new rule. NULL: set
-- before this migration; the scheduler takes the definition it sees as the cursor's.
ALTER TABLE schedule_cursors ADD COLUMN definition TEXT;
