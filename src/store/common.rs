//! What both stores share: times as milliseconds since the Unix epoch (UTC), the column
//! lists of a run and an attempt (the same columns in both schemas), the corrupt-data
//! error, and the texts a run is stored as (its spec, retry rules, trigger).

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};

use crate::domain::job::ResolvedSpec;
use crate::domain::ports::{Claim, Lease, NewRun, RunMessage, StoreError};
use crate::domain::retry::RetryPolicy;
use crate::domain::run::RunId;
use crate::domain::secret::ClaimSecrets;
use crate::protocol::{RetryV1, SpecV1, trigger_text};

pub(super) const RUN_COLUMNS: &str = "id, job, params, status, attempt, exit_code, reason, reason_code, created_at, started_at, \
     finished_at, cancel_requested, not_before, log_dropped_bytes, output_gap, \"trigger\", requested_by";
pub(super) const ATTEMPT_COLUMNS: &str = "run_id, attempt, status, worker_id, container_id, exit_code, reason, reason_code, \
     claimed_at, started_at, finished_at, log_dropped_bytes, usage_samples, usage_peak_memory_bytes, \
     usage_cpu_seconds, usage_memory_limit_bytes, usage_cpu_limit, output_gap, worker_build";

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

/// A new run's stored texts, as both stores write them: params and spec as JSON, the
/// retry rules only when not the default, the trigger (NULL: the API).
pub(super) struct RunTexts {
    pub(super) params: String,
    pub(super) spec: String,
    pub(super) retry: Option<String>,
    pub(super) trigger: Option<String>,
}

impl RunTexts {
    pub(super) fn of(run: &NewRun) -> Result<RunTexts, StoreError> {
        Ok(RunTexts {
            params: serde_json::to_string(&run.params).map_err(|e| corrupt("params", e))?,
            spec: serde_json::to_string(&SpecV1::from(&run.spec))
                .map_err(|e| corrupt("spec", e))?,
            retry: (run.retry != RetryPolicy::default())
                .then(|| serde_json::to_string(&RetryV1::from(&run.retry)))
                .transpose()
                .map_err(|e| corrupt("retry", e))?,
            trigger: trigger_text(&run.trigger).map_err(|e| corrupt("trigger", e))?,
        })
    }
}

/// The claim a worker gets for `message` under `epoch`, from the run's job and its
/// stored (frozen) spec.
pub(super) fn claim_of(
    message: RunMessage,
    epoch: i64,
    lease_ttl: Duration,
    job: String,
    spec: &str,
) -> Result<Claim, StoreError> {
    let id = message.run_id;
    let spec: SpecV1 =
        serde_json::from_str(spec).map_err(|e| corrupt(&format!("spec of run {id}"), e))?;
    let spec =
        ResolvedSpec::try_from(spec).map_err(|e| corrupt(&format!("spec of run {id}"), e))?;
    Ok(Claim {
        lease: Lease {
            run_id: id,
            attempt: message.attempt,
            epoch,
        },
        job,
        spec,
        lease_ttl,
        secrets: ClaimSecrets::default(),
    })
}

/// A run's stored retry rules (NULL: the default).
pub(super) fn retry_policy_of(
    run_id: RunId,
    text: Option<&str>,
) -> Result<RetryPolicy, StoreError> {
    match text {
        None => Ok(RetryPolicy::default()),
        Some(text) => serde_json::from_str::<RetryV1>(text)
            .map_err(|e| e.to_string())
            .and_then(RetryPolicy::try_from)
            .map_err(|e| corrupt(&format!("retry rules of run {run_id}"), e)),
    }
}
