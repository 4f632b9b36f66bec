//! What synchronous store code shares: rusqlite errors and columns as the store port
//! names them, mirroring the sqlx helpers in `mod.rs`. The synchronous code runs through
//! `GroupCommit::run` or `sync_on` (see `group`).

use std::str::FromStr;

use rusqlite::Row;
use rusqlite::types::FromSql;

use super::corrupt;
use crate::domain::ports::StoreError;
use crate::domain::run::RunId;
use crate::domain::schedule::Admission;
use crate::protocol::parse_admission;

use super::from_ms;
pub(super) use super::group::sync_on;
use crate::domain::run::RunStatus;
use crate::domain::transition::{AttemptState, RunState};

/// A rusqlite error as the store port names it: data that does not decode is corrupt;
/// anything else is the database failing.
pub(super) fn sync_db(e: rusqlite::Error) -> StoreError {
    match e {
        rusqlite::Error::FromSqlConversionFailure(..)
        | rusqlite::Error::IntegralValueOutOfRange(..)
        | rusqlite::Error::InvalidColumnType(..)
        | rusqlite::Error::InvalidColumnName(_)
        | rusqlite::Error::InvalidColumnIndex(_)
        | rusqlite::Error::Utf8Error(..) => StoreError::Corrupt(e.to_string()),
        other => StoreError::Unavailable(other.to_string()),
    }
}

/// One column of a row; a value that does not decode is corrupt data.
pub(super) fn get<T: FromSql>(row: &Row<'_>, name: &str) -> Result<T, StoreError> {
    row.get(name).map_err(|e| corrupt(name, e))
}

pub(super) fn run_id_get(row: &Row<'_>, name: &str) -> Result<RunId, StoreError> {
    let id: String = get(row, name)?;
    RunId::from_str(&id).map_err(|e| corrupt(name, e))
}

pub(super) fn attempt_get(row: &Row<'_>, name: &str) -> Result<u32, StoreError> {
    let n: i64 = get(row, name)?;
    u32::try_from(n).map_err(|e| corrupt(name, e))
}

/// The optional `admission` column (NULL: unlimited).
pub(super) fn admission_get(row: &Row<'_>) -> Result<Admission, StoreError> {
    let text: Option<String> = get(row, "admission")?;
    parse_admission(text.as_deref()).map_err(|e| corrupt("admission", e))
}

/// Run one statement (prepared once per borrow of the handle), returning the rows it
/// changed.
pub(super) fn exec(
    conn: &rusqlite::Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> Result<usize, StoreError> {
    conn.prepare_cached(sql)
        .and_then(|mut s| s.execute(params))
        .map_err(sync_db)
}

/// The first row of a query, decoded by `f`, or `None`.
pub(super) fn first<T>(
    conn: &rusqlite::Connection,
    sql: &str,
    params: impl rusqlite::Params,
    f: impl FnOnce(&Row<'_>) -> Result<T, StoreError>,
) -> Result<Option<T>, StoreError> {
    let mut stmt = conn.prepare_cached(sql).map_err(sync_db)?;
    let mut rows = stmt.query(params).map_err(sync_db)?;
    match rows.next().map_err(sync_db)? {
        Some(row) => f(row).map(Some),
        None => Ok(None),
    }
}

fn status_get(row: &Row<'_>, name: &str) -> Result<RunStatus, StoreError> {
    let status: String = get(row, name)?;
    RunStatus::from_str(&status).map_err(|e| corrupt(name, e))
}

/// The run's state for the transition rules, read inside the caller's transaction.
pub(super) fn run_state(
    conn: &rusqlite::Connection,
    run_id: RunId,
) -> Result<Option<RunState>, StoreError> {
    first(
        conn,
        "SELECT status, attempt, cancel_requested, not_before FROM runs WHERE id = ?",
        [run_id.to_string()],
        |row| {
            Ok(RunState {
                status: status_get(row, "status")?,
                attempt: attempt_get(row, "attempt")?,
                cancel_requested: get::<i64>(row, "cancel_requested")? != 0,
                not_before: from_ms(get(row, "not_before")?),
            })
        },
    )
}

/// One attempt's state for the transition rules, read inside the caller's transaction.
pub(super) fn attempt_state(
    conn: &rusqlite::Connection,
    run_id: RunId,
    attempt: u32,
) -> Result<Option<AttemptState>, StoreError> {
    first(
        conn,
        "SELECT worker_id, epoch, status, container_id IS NOT NULL AS started, lease_expires_at \
         FROM attempts WHERE run_id = ? AND attempt = ?",
        rusqlite::params![run_id.to_string(), i64::from(attempt)],
        |row| {
            let expires: i64 = get(row, "lease_expires_at")?;
            Ok(AttemptState {
                worker_id: get(row, "worker_id")?,
                epoch: get(row, "epoch")?,
                status: status_get(row, "status")?,
                started: get::<i64>(row, "started")? != 0,
                lease_expires_at: from_ms(Some(expires))
                    .ok_or_else(|| corrupt("lease_expires_at", format!("{expires} is no time")))?,
            })
        },
    )
}
