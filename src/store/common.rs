//! What both stores share: times as milliseconds since the Unix epoch (UTC), the column
//! lists of a run and an attempt (the same columns in both schemas), and the corrupt-data
//! error.

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};

use crate::domain::ports::StoreError;

pub(super) const RUN_COLUMNS: &str = "id, job, params, status, attempt, exit_code, reason, reason_code, created_at, started_at, \
     finished_at, cancel_requested, not_before, log_dropped_bytes, output_gap, \"trigger\", requested_by";
pub(super) const ATTEMPT_COLUMNS: &str = "run_id, attempt, status, worker_id, container_id, exit_code, reason, reason_code, \
     claimed_at, started_at, finished_at, log_dropped_bytes, usage_samples, usage_peak_memory_bytes, \
     usage_cpu_seconds, usage_memory_limit_bytes, usage_cpu_limit, output_gap";

pub(super) fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {e}"))
}

pub(super) fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

pub(super) fn from_ms(v: Option<i64>) -> Option<DateTime<Utc>> {
    v.and_then(|v| Utc.timestamp_millis_opt(v).single())
}

pub(super) fn ttl_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}
