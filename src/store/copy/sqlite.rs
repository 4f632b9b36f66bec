//! The copy's SQLite side: a connection of its own on the file `SqliteStore::open_file`
//! migrated (the store's group committer is not used: nothing else writes in this
//! process while the copy runs), rows read into `Value`s (flags from 0/1) and written
//! back (flags as 0/1).

use std::path::Path;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Row as _, Sqlite, SqliteConnection, Transaction};

use super::schema::{Kind, Row, Table, Value};
use super::sql::{self, Dialect};
use super::{CopyError, Side};

/// Whether the copy reads a file or writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Access {
    Read,
    Write,
}

/// A pool of one connection to the file: read-only for reading (a source cannot be
/// written by mistake), read-write for the target, durable like the store's own (WAL,
/// every commit synced), foreign keys enforced.
pub(super) async fn pool(path: &Path, side: Side, access: Access) -> Result<SqlitePool, CopyError> {
    let options = SqliteConnectOptions::new()
        .filename(path)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(Duration::from_secs(10))
        .foreign_keys(true)
        .read_only(access == Access::Read);
    SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await
        .map_err(|e| CopyError::db(side, "connecting", e))
}

/// A snapshot: a read transaction (SQLite fixes what it sees at its first read, and
/// no writer changes that until it ends).
pub(super) async fn snapshot(
    pool: &SqlitePool,
    side: Side,
) -> Result<Transaction<'static, Sqlite>, CopyError> {
    pool.begin()
        .await
        .map_err(|e| CopyError::db(side, "beginning a read transaction", e))
}

/// The target's one write transaction, holding SQLite's write lock from its start.
pub(super) async fn load(pool: &SqlitePool) -> Result<Transaction<'static, Sqlite>, CopyError> {
    pool.begin_with("BEGIN IMMEDIATE")
        .await
        .map_err(|e| CopyError::db(Side::Target, "beginning the write transaction", e))
}

/// Up to `limit` rows of `table` in key order, past `after` when given.
pub(super) async fn read_batch(
    c: &mut SqliteConnection,
    side: Side,
    table: &Table,
    after: Option<&[Value]>,
    limit: u32,
) -> Result<Vec<Row>, CopyError> {
    let text = sql::select_batch(table, Dialect::Sqlite, after.is_some());
    let mut query = sqlx::query(sqlx::AssertSqlSafe(text));
    for value in after.unwrap_or_default() {
        query = bind(query, value);
    }
    let rows = query
        .bind(i64::from(limit))
        .fetch_all(&mut *c)
        .await
        .map_err(|e| CopyError::db(side, table.name, e))?;
    rows.iter().map(|r| decode(r, side, table)).collect()
}

fn decode(row: &SqliteRow, side: Side, table: &Table) -> Result<Row, CopyError> {
    let corrupt = |column: &str, e: sqlx::Error| CopyError::corrupt(side, table.name, column, e);
    table
        .columns
        .iter()
        .enumerate()
        .map(|(i, column)| {
            let value = match column.kind {
                Kind::Int => Value::Int(row.try_get(i).map_err(|e| corrupt(column.name, e))?),
                Kind::Real => Value::Real(row.try_get(i).map_err(|e| corrupt(column.name, e))?),
                Kind::Text => Value::Text(row.try_get(i).map_err(|e| corrupt(column.name, e))?),
                // As the store reads a flag: anything but 0 is set.
                Kind::Flag => Value::Flag(
                    row.try_get::<Option<i64>, _>(i)
                        .map_err(|e| corrupt(column.name, e))?
                        .map(|v| v != 0),
                ),
            };
            Ok(value)
        })
        .collect()
}

type Query<'q> = sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments>;

fn bind<'q>(query: Query<'q>, value: &Value) -> Query<'q> {
    match value {
        Value::Int(v) => query.bind(*v),
        Value::Real(v) => query.bind(*v),
        Value::Text(v) => query.bind(v.as_deref()),
        Value::Flag(v) => query.bind(v.map(i64::from)),
    }
}

pub(super) async fn count(
    c: &mut SqliteConnection,
    side: Side,
    table: &Table,
) -> Result<u64, CopyError> {
    let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql::count(table)))
        .fetch_one(&mut *c)
        .await
        .map_err(|e| CopyError::db(side, table.name, e))?;
    Ok(n.max(0) as u64)
}

/// Insert `rows` (every column, ids as they were: SQLite moves `AUTOINCREMENT`'s
/// counter past the largest one itself).
pub(super) async fn insert(
    c: &mut SqliteConnection,
    table: &Table,
    rows: &[Row],
) -> Result<(), CopyError> {
    for part in rows.chunks(sql::rows_per_insert(table)) {
        let text = sql::insert(table, Dialect::Sqlite, part.len());
        let mut query = sqlx::query(sqlx::AssertSqlSafe(text));
        for value in part.iter().flatten() {
            query = bind(query, value);
        }
        query
            .execute(&mut *c)
            .await
            .map_err(|e| CopyError::db(Side::Target, table.name, e))?;
    }
    Ok(())
}
