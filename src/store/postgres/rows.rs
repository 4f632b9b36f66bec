//! Rows as the domain's types: the same columns as the SQLite store's, flags as
//! booleans. A value that does not decode is corrupt data, never `Unavailable`.

use std::collections::BTreeMap;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use sqlx::{Decode, Postgres, Row, Type};

use super::super::common::{corrupt, from_ms};
use crate::domain::ports::StoreError;
use crate::domain::run::{Attempt, ReasonCode, ResourceUsage, Run, RunId, RunStatus, Trigger};
use crate::domain::schedule::Admission;
use crate::protocol::{parse_admission, parse_trigger};

/// One column of a row.
pub(in crate::store) fn col<'r, T>(row: &'r PgRow, name: &str) -> Result<T, StoreError>
where
    T: Decode<'r, Postgres> + Type<Postgres>,
{
    row.try_get(name).map_err(|e| corrupt(name, e))
}

/// A time column that must be there.
pub(in crate::store) fn time_col(row: &PgRow, name: &str) -> Result<DateTime<Utc>, StoreError> {
    let v: i64 = col(row, name)?;
    from_ms(Some(v)).ok_or_else(|| corrupt(name, format!("{v} is no time")))
}

pub(in crate::store) fn run_id_col(row: &PgRow, name: &str) -> Result<RunId, StoreError> {
    let id: String = col(row, name)?;
    RunId::from_str(&id).map_err(|e| corrupt(name, e))
}

pub(in crate::store) fn status_col(row: &PgRow, name: &str) -> Result<RunStatus, StoreError> {
    let status: String = col(row, name)?;
    RunStatus::from_str(&status).map_err(|e| corrupt(name, e))
}

pub(in crate::store) fn attempt_col(row: &PgRow, name: &str) -> Result<u32, StoreError> {
    let n: i64 = col(row, name)?;
    u32::try_from(n).map_err(|e| corrupt(name, e))
}

/// The optional `reason_code` column, parsed.
pub(in crate::store) fn reason_code_col(row: &PgRow) -> Result<Option<ReasonCode>, StoreError> {
    let code: Option<String> = col(row, "reason_code")?;
    code.map(|c| ReasonCode::from_str(&c))
        .transpose()
        .map_err(|e| corrupt("reason_code", e))
}

/// The optional `trigger` column (NULL: the API).
pub(in crate::store) fn trigger_col(row: &PgRow) -> Result<Trigger, StoreError> {
    let text: Option<String> = col(row, "trigger")?;
    parse_trigger(text.as_deref()).map_err(|e| corrupt("trigger", e))
}

/// The optional `admission` column (NULL: unlimited).
pub(in crate::store) fn admission_col(row: &PgRow) -> Result<Admission, StoreError> {
    let text: Option<String> = col(row, "admission")?;
    parse_admission(text.as_deref()).map_err(|e| corrupt("admission", e))
}

/// A byte counter column (`log_dropped_bytes`, `log_undelivered_bytes`).
pub(in crate::store) fn dropped_col(row: &PgRow, name: &str) -> Result<u64, StoreError> {
    let bytes: i64 = col(row, name)?;
    Ok(bytes.max(0) as u64)
}

pub(in crate::store) fn run_from_row(row: &PgRow) -> Result<Run, StoreError> {
    let params: String = col(row, "params")?;
    Ok(Run {
        id: run_id_col(row, "id")?,
        job: col(row, "job")?,
        params: serde_json::from_str::<BTreeMap<String, String>>(&params)
            .map_err(|e| corrupt("params", e))?,
        status: status_col(row, "status")?,
        trigger: trigger_col(row)?,
        attempt: attempt_col(row, "attempt")?,
        exit_code: exit_code_col(row)?,
        reason: col(row, "reason")?,
        reason_code: reason_code_col(row)?,
        created_at: from_ms(col(row, "created_at")?).unwrap_or_default(),
        started_at: from_ms(col(row, "started_at")?),
        finished_at: from_ms(col(row, "finished_at")?),
        cancel_requested: col(row, "cancel_requested")?,
        not_before: from_ms(col(row, "not_before")?),
        log_dropped_bytes: dropped_col(row, "log_dropped_bytes")?,
        output_gap: col(row, "output_gap")?,
        attempts: Vec::new(),
        callbacks: Vec::new(),
        requested_by: col(row, "requested_by")?,
        replies: Vec::new(),
    })
}

/// An exit code, stored as BIGINT.
fn exit_code_col(row: &PgRow) -> Result<Option<i64>, StoreError> {
    col(row, "exit_code")
}

pub(in crate::store) fn attempt_from_row(row: &PgRow) -> Result<(RunId, Attempt), StoreError> {
    let attempt = Attempt {
        number: attempt_col(row, "attempt")?,
        status: status_col(row, "status")?,
        worker_id: col(row, "worker_id")?,
        worker_build: col(row, "worker_build")?,
        container_id: col(row, "container_id")?,
        exit_code: exit_code_col(row)?,
        reason: col(row, "reason")?,
        reason_code: reason_code_col(row)?,
        claimed_at: from_ms(col(row, "claimed_at")?).unwrap_or_default(),
        started_at: from_ms(col(row, "started_at")?),
        finished_at: from_ms(col(row, "finished_at")?),
        log_dropped_bytes: dropped_col(row, "log_dropped_bytes")?,
        output_gap: col(row, "output_gap")?,
        usage: usage_cols(row)?,
    };
    Ok((run_id_col(row, "run_id")?, attempt))
}

/// An attempt's usage columns; `None` when its worker read nothing.
pub(in crate::store) fn usage_cols(row: &PgRow) -> Result<Option<ResourceUsage>, StoreError> {
    let Some(samples) = col::<Option<i64>>(row, "usage_samples")? else {
        return Ok(None);
    };
    let bytes = |b: i64| b.max(0) as u64;
    Ok(Some(ResourceUsage {
        peak_memory_bytes: bytes(col::<Option<i64>>(row, "usage_peak_memory_bytes")?.unwrap_or(0)),
        cpu_seconds: col::<Option<f64>>(row, "usage_cpu_seconds")?.unwrap_or(0.0),
        memory_limit_bytes: col::<Option<i64>>(row, "usage_memory_limit_bytes")?.map(bytes),
        cpu_limit: col(row, "usage_cpu_limit")?,
        samples: u32::try_from(samples).map_err(|e| corrupt("usage_samples", e))?,
    }))
}
