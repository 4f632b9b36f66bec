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

pub(super) use super::group::sync_on;

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
