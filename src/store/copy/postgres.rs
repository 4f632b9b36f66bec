//! The copy's PostgreSQL side, on the pool of the `PgStore` that opened (and migrated)
//! the database: rows read into `Value`s and written back, flags as booleans, and the
//! sequences of the numbered tables set past the ids copied.

use sqlx::postgres::{PgArguments, PgPool, PgRow};
use sqlx::{PgConnection, Postgres, Row as _, Transaction};

use super::schema::{Kind, Row, Table, Value};
use super::sql::{self, Dialect};
use super::{CopyError, Side};

/// A snapshot: every read through it sees the database as it was when the first one
/// ran, and nothing can be written through it.
pub(super) async fn snapshot(
    pool: &PgPool,
    side: Side,
) -> Result<Transaction<'static, Postgres>, CopyError> {
    pool.begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await
        .map_err(|e| CopyError::db(side, "beginning a read transaction", e))
}

/// The target's one write transaction.
pub(super) async fn load(pool: &PgPool) -> Result<Transaction<'static, Postgres>, CopyError> {
    pool.begin()
        .await
        .map_err(|e| CopyError::db(Side::Target, "beginning the write transaction", e))
}

/// Up to `limit` rows of `table` in key order (text byte-wise), past `after` when given.
pub(super) async fn read_batch(
    c: &mut PgConnection,
    side: Side,
    table: &Table,
    after: Option<&[Value]>,
    limit: u32,
) -> Result<Vec<Row>, CopyError> {
    let text = sql::select_batch(table, Dialect::Postgres, after.is_some());
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

fn decode(row: &PgRow, side: Side, table: &Table) -> Result<Row, CopyError> {
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
                Kind::Flag => Value::Flag(row.try_get(i).map_err(|e| corrupt(column.name, e))?),
            };
            Ok(value)
        })
        .collect()
}

type Query<'q> = sqlx::query::Query<'q, Postgres, PgArguments>;

/// A value bound with its column's type, NULL included (an untyped NULL would be taken
/// for text, which a BIGINT column refuses).
fn bind<'q>(query: Query<'q>, value: &Value) -> Query<'q> {
    match value {
        Value::Int(v) => query.bind(*v),
        Value::Real(v) => query.bind(*v),
        Value::Text(v) => query.bind(v.as_deref()),
        Value::Flag(v) => query.bind(*v),
    }
}

pub(super) async fn count(
    c: &mut PgConnection,
    side: Side,
    table: &Table,
) -> Result<u64, CopyError> {
    let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql::count(table)))
        .fetch_one(&mut *c)
        .await
        .map_err(|e| CopyError::db(side, table.name, e))?;
    Ok(n.max(0) as u64)
}

/// Insert `rows` (every column, ids as they were).
pub(super) async fn insert(
    c: &mut PgConnection,
    table: &Table,
    rows: &[Row],
) -> Result<(), CopyError> {
    for part in rows.chunks(sql::rows_per_insert(table)) {
        let text = sql::insert(table, Dialect::Postgres, part.len());
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

/// Set the table's id sequence so the next id is past the largest copied (1 when the
/// table is empty): the rows came with their ids, which the sequence never handed out.
pub(super) async fn set_sequence(c: &mut PgConnection, table: &Table) -> Result<(), CopyError> {
    let text = format!(
        "SELECT setval(pg_get_serial_sequence('\"{0}\"', 'id'), COALESCE(MAX(\"id\"), 0) + 1, false) \
         FROM \"{0}\"",
        table.name
    );
    sqlx::query(sqlx::AssertSqlSafe(text))
        .execute(&mut *c)
        .await
        .map_err(|e| CopyError::db(Side::Target, table.name, e))?;
    Ok(())
}
