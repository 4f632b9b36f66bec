-- Retention and the outbox health count.
-- Cancel, republish and deleting a run look up outbox rows and keys by run.
CREATE INDEX outbox_by_run ON outbox (run_id, attempt);
CREATE INDEX idempotency_keys_by_run ON idempotency_keys (run_id);
-- Expired keys and finished runs are found by age.
CREATE INDEX idempotency_keys_by_age ON idempotency_keys (created_at);
CREATE INDEX runs_by_finished ON runs (finished_at) WHERE finished_at IS NOT NULL;

-- Whether the row's latest publish try failed: `tries` also counts tries that went
-- out, so a row put back after a good publish (volatile queue restart, lost-message
-- sweep) is not a failed publish.
ALTER TABLE outbox ADD COLUMN last_try_failed INTEGER NOT NULL DEFAULT 0;
UPDATE outbox SET last_try_failed = 1
 WHERE sent_at IS NULL AND tries > 0 AND last_error IS NOT NULL
   AND last_error NOT LIKE 'published again:%';
