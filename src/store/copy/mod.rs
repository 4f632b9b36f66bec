//! `tasuki store copy`: an installation's rows and logs moved from one store to
//! another (SQLite or PostgreSQL on either side), then checked by reading both again.
//!
//! The source is read inside one snapshot (a read transaction on SQLite, `REPEATABLE
//! READ READ ONLY` on PostgreSQL), table by table, parents first, in batches by primary
//! key; the target takes every row in one transaction, refused before anything is
//! written unless it is empty. The logs of every attempt go from the source's log sink
//! to the target's through the `LogSink` port while that transaction is still open, so
//! a copy that fails anywhere leaves the target without rows (logs an append put there
//! stay, and a copy run again appends only what they lack). After the commit both sides
//! are read again: per table a row count and a SHA-256 over the rows' canonical text in
//! key order, and the attempts' logs counted, measured and hashed; any difference fails
//! the copy, naming the table.

mod logs;
mod postgres;
mod schema;
mod sql;
mod sqlite;
#[cfg(test)]
mod tests;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use sqlx::postgres::PgPool;
use sqlx::{Postgres, Sqlite, Transaction};

pub use logs::LogSummary;
pub use schema::Summary;
use schema::{ATTEMPT_KEYS, Row, Summing, TABLES, Table, Value};

use super::{PgStore, SqliteStore};
use crate::domain::ports::{LogError, LogSink, StoreError};
use crate::domain::run::RunId;

/// Connections the copy opens to a PostgreSQL side: its transaction, and the log
/// sink's appends or reads beside it.
const PG_CONNECTIONS: u32 = 4;

/// Which end of the copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Source,
    Target,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Source => "source",
            Side::Target => "target",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("opening the {side}: {error}")]
    Open { side: Side, error: StoreError },
    #[error("the {side}, {what}: {error}")]
    Db {
        side: Side,
        what: String,
        error: sqlx::Error,
    },
    #[error("the {side}'s {table}.{column} holds a value that does not decode: {error}")]
    Corrupt {
        side: Side,
        table: &'static str,
        column: String,
        error: sqlx::Error,
    },
    #[error("the source's attempts name run `{0}`, which is no run id")]
    BadRunId(String),
    #[error("the target already holds {0}: copy only into an empty store (nothing was written)")]
    TargetNotEmpty(String),
    #[error("the {side}'s log of run {run_id} attempt {attempt}: {error}")]
    Log {
        side: Side,
        run_id: RunId,
        attempt: u32,
        error: LogError,
    },
    #[error("the {side}'s log of run {run_id} attempt {attempt}: {why}")]
    LogLength {
        side: Side,
        run_id: RunId,
        attempt: u32,
        why: String,
    },
    #[error("the copy differs from the source: {}", differences(.0))]
    Differs(Vec<Difference>),
}

impl CopyError {
    fn db(side: Side, what: &str, error: sqlx::Error) -> CopyError {
        CopyError::Db {
            side,
            what: what.to_owned(),
            error,
        }
    }

    fn corrupt(side: Side, table: &'static str, column: &str, error: sqlx::Error) -> CopyError {
        CopyError::Corrupt {
            side,
            table,
            column: column.to_owned(),
            error,
        }
    }
}

/// A table (or `logs`) that reads differently on the two sides after the copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    pub what: &'static str,
    pub source: String,
    pub target: String,
}

fn differences(list: &[Difference]) -> String {
    let each: Vec<String> = list
        .iter()
        .map(|d| format!("{}: source {}, target {}", d.what, d.source, d.target))
        .collect();
    each.join("; ")
}

/// One side's store, opened through its normal `open`: migrated up to this build's
/// schema, and refused when a newer build migrated it.
pub struct CopyStore {
    backend: Backend,
}

enum Backend {
    Sqlite(PathBuf),
    Postgres(PgPool),
}

impl CopyStore {
    /// The SQLite file at `path` (made when missing: give the source's only once it is
    /// known to exist).
    pub async fn open_sqlite(path: &Path, side: Side) -> Result<CopyStore, CopyError> {
        // Opened for its migrations and its schema check only; the copy uses a
        // connection of its own (`sqlite::pool`), and this one closes as it is dropped.
        let store = SqliteStore::open_file(path)
            .await
            .map_err(|error| CopyError::Open { side, error })?;
        drop(store);
        Ok(CopyStore {
            backend: Backend::Sqlite(path.to_owned()),
        })
    }

    pub async fn open_postgres(url: &str, side: Side) -> Result<CopyStore, CopyError> {
        let store = PgStore::open(url, PG_CONNECTIONS)
            .await
            .map_err(|error| CopyError::Open { side, error })?;
        Ok(CopyStore {
            backend: Backend::Postgres(store.shared_pool()),
        })
    }

    /// The PostgreSQL side's pool, for its log sink (`PgLogSink`); `None` for SQLite.
    pub fn postgres_pool(&self) -> Option<PgPool> {
        match &self.backend {
            Backend::Postgres(pool) => Some(pool.clone()),
            Backend::Sqlite(_) => None,
        }
    }

    /// A read transaction: one snapshot for everything read through it.
    async fn snapshot(&self, side: Side) -> Result<Tx, CopyError> {
        Ok(match &self.backend {
            Backend::Sqlite(path) => {
                let pool = sqlite::pool(path, side, sqlite::Access::Read).await?;
                Tx::Sqlite(sqlite::snapshot(&pool, side).await?, side)
            }
            Backend::Postgres(pool) => Tx::Postgres(postgres::snapshot(pool, side).await?, side),
        })
    }

    /// The write transaction that takes every row.
    async fn load(&self) -> Result<Tx, CopyError> {
        let side = Side::Target;
        Ok(match &self.backend {
            Backend::Sqlite(path) => {
                let pool = sqlite::pool(path, side, sqlite::Access::Write).await?;
                Tx::Sqlite(sqlite::load(&pool).await?, side)
            }
            Backend::Postgres(pool) => Tx::Postgres(postgres::load(pool).await?, side),
        })
    }
}

/// A transaction on one side, whichever backend.
enum Tx {
    Sqlite(Transaction<'static, Sqlite>, Side),
    Postgres(Transaction<'static, Postgres>, Side),
}

impl Tx {
    async fn read_batch(
        &mut self,
        table: &Table,
        after: Option<&[Value]>,
        limit: u32,
    ) -> Result<Vec<Row>, CopyError> {
        match self {
            Tx::Sqlite(tx, side) => sqlite::read_batch(tx, *side, table, after, limit).await,
            Tx::Postgres(tx, side) => postgres::read_batch(tx, *side, table, after, limit).await,
        }
    }

    async fn count(&mut self, table: &Table) -> Result<u64, CopyError> {
        match self {
            Tx::Sqlite(tx, side) => sqlite::count(tx, *side, table).await,
            Tx::Postgres(tx, side) => postgres::count(tx, *side, table).await,
        }
    }

    async fn insert(&mut self, table: &Table, rows: &[Row]) -> Result<(), CopyError> {
        match self {
            Tx::Sqlite(tx, _) => sqlite::insert(tx, table, rows).await,
            Tx::Postgres(tx, _) => postgres::insert(tx, table, rows).await,
        }
    }

    /// After the last insert: PostgreSQL's sequences past the copied ids (SQLite moves
    /// its own).
    async fn set_sequences(&mut self) -> Result<(), CopyError> {
        if let Tx::Postgres(tx, _) = self {
            for table in TABLES.iter().filter(|t| t.serial) {
                postgres::set_sequence(tx, table).await?;
            }
        }
        Ok(())
    }

    async fn commit(self) -> Result<(), CopyError> {
        let committed = match self {
            Tx::Sqlite(tx, _) => tx.commit().await,
            Tx::Postgres(tx, _) => tx.commit().await,
        };
        committed.map_err(|e| CopyError::db(Side::Target, "committing", e))
    }

    /// Every row of `table` in key order, `batch` at a time, handed to `each`.
    async fn walk<F>(&mut self, table: &Table, batch: u32, mut each: F) -> Result<(), CopyError>
    where
        F: AsyncFnMut(Vec<Row>) -> Result<(), CopyError>,
    {
        let mut after: Option<Vec<Value>> = None;
        loop {
            let rows = self.read_batch(table, after.as_deref(), batch).await?;
            let last = rows.last().map(|r| table.key_of(r).to_vec());
            let full = rows.len() as u64 >= u64::from(batch);
            each(rows).await?;
            match last {
                Some(key) if full => after = Some(key),
                _ => return Ok(()),
            }
        }
    }

    /// Worker sessions neither ended nor expired at `now_ms`, as `worker on host`: a
    /// process that may still be writing to the store.
    async fn live_sessions(&mut self, now_ms: i64) -> Result<Vec<String>, CopyError> {
        let text = format!(
            "SELECT worker_id || ' on ' || host FROM worker_sessions \
             WHERE ended_at IS NULL AND expires_at > {now_ms} ORDER BY worker_id"
        );
        let query = sqlx::AssertSqlSafe(text);
        let found = match self {
            Tx::Sqlite(tx, _) => sqlx::query_scalar(query).fetch_all(&mut **tx).await,
            Tx::Postgres(tx, _) => sqlx::query_scalar(query).fetch_all(&mut **tx).await,
        };
        found.map_err(|e| CopyError::db(Side::Source, "worker_sessions", e))
    }

    /// The attempts' (run, attempt) keys in key order: whose logs there are.
    async fn attempts(&mut self, batch: u32) -> Result<Vec<(RunId, u32)>, CopyError> {
        let mut keys = Vec::new();
        self.walk(&ATTEMPT_KEYS, batch, async |rows| {
            for row in rows {
                keys.push(attempt_key(&row)?);
            }
            Ok(())
        })
        .await?;
        Ok(keys)
    }
}

fn attempt_key(row: &Row) -> Result<(RunId, u32), CopyError> {
    match row.as_slice() {
        [Value::Text(Some(id)), Value::Int(Some(n))] => {
            let run_id = RunId::from_str(id).map_err(|_| CopyError::BadRunId(id.clone()))?;
            let attempt =
                u32::try_from(*n).map_err(|_| CopyError::BadRunId(format!("{id}/{n}")))?;
            Ok((run_id, attempt))
        }
        _ => Err(CopyError::BadRunId(format!("{row:?}"))),
    }
}

/// One side of a copy: its store and its log sink.
#[derive(Clone, Copy)]
pub struct Endpoint<'a> {
    pub store: &'a CopyStore,
    pub logs: &'a dyn LogSink,
}

/// What both sides read after the copy: per table its rows and checksum, and the logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub tables: Vec<(&'static str, Summary)>,
    pub logs: LogSummary,
}

/// Copy everything of `from` into `to` (which must be empty), `batch` rows per read and
/// insert, then verify. A verified copy's report is what both sides read.
pub async fn copy(from: Endpoint<'_>, to: Endpoint<'_>, batch: u32) -> Result<Report, CopyError> {
    let batch = batch.max(1);
    let mut target = to.store.load().await?;
    refuse_unless_empty(&mut target).await?;
    let mut source = from.store.snapshot(Side::Source).await?;
    let live = source
        .live_sessions(chrono::Utc::now().timestamp_millis())
        .await?;
    if !live.is_empty() {
        tracing::warn!(
            message = "the source looks in use: a worker session is live; what it writes \
                       after this moment is not copied (stop every serve and worker first)",
            sessions = %live.join(", ")
        );
    }
    for table in TABLES {
        let mut copied = 0u64;
        source
            .walk(table, batch, async |rows| {
                target.insert(table, &rows).await?;
                copied += rows.len() as u64;
                Ok(())
            })
            .await?;
        tracing::info!(message = "table copied", table = table.name, rows = copied);
    }
    target.set_sequences().await?;
    let attempts = source.attempts(batch).await?;
    drop(source);
    let (mut logs, mut bytes) = (0u64, 0u64);
    for (done, &(run_id, attempt)) in attempts.iter().enumerate() {
        let len = logs::copy_log(from.logs, to.logs, run_id, attempt).await?;
        if len > 0 {
            logs += 1;
            bytes += len;
        }
        if (done + 1) % 1000 == 0 {
            tracing::info!(
                message = "copying logs",
                attempts = done + 1,
                of = attempts.len()
            );
        }
    }
    tracing::info!(message = "logs copied", logs, bytes);
    target.commit().await?;
    verify(from, to, batch).await
}

/// Refuse a target that holds any row of a copied table, naming what it holds.
async fn refuse_unless_empty(target: &mut Tx) -> Result<(), CopyError> {
    let mut held = Vec::new();
    for table in TABLES {
        let n = target.count(table).await?;
        if n > 0 {
            held.push(if table.name == "runs" {
                format!("{n} run(s)")
            } else {
                format!("{n} row(s) in {}", table.name)
            });
        }
    }
    if held.is_empty() {
        Ok(())
    } else {
        Err(CopyError::TargetNotEmpty(held.join(", ")))
    }
}

/// Read both sides again and compare them: every table's count and checksum, and the
/// logs'. The report when they agree; `Differs`, naming each table that does not.
pub async fn verify(from: Endpoint<'_>, to: Endpoint<'_>, batch: u32) -> Result<Report, CopyError> {
    let source = summarize(from, from.store.snapshot(Side::Source).await?, batch).await?;
    let target = summarize(to, to.store.snapshot(Side::Target).await?, batch).await?;
    let mut differ = Vec::new();
    for ((name, s), (_, t)) in source.tables.iter().zip(&target.tables) {
        if s != t {
            differ.push(Difference {
                what: name,
                source: format!("{} rows, sha256 {}", s.rows, s.prefix(12)),
                target: format!("{} rows, sha256 {}", t.rows, t.prefix(12)),
            });
        }
    }
    if source.logs != target.logs {
        let show = |l: &LogSummary| {
            format!(
                "{} logs of {} bytes, sha256 {}",
                l.logs,
                l.bytes,
                l.prefix(12)
            )
        };
        differ.push(Difference {
            what: "logs",
            source: show(&source.logs),
            target: show(&target.logs),
        });
    }
    if differ.is_empty() {
        Ok(source)
    } else {
        Err(CopyError::Differs(differ))
    }
}

/// One side's tables and logs, counted and hashed, the rows read in `tx`.
async fn summarize(end: Endpoint<'_>, mut tx: Tx, batch: u32) -> Result<Report, CopyError> {
    let mut tables = Vec::with_capacity(TABLES.len());
    for table in TABLES {
        let mut sum = Summing::new(table);
        tx.walk(table, batch, async |rows| {
            rows.iter().for_each(|r| sum.add(r));
            Ok(())
        })
        .await?;
        tables.push((table.name, sum.finish()));
    }
    let attempts = tx.attempts(batch).await?;
    let which = match tx {
        Tx::Sqlite(_, side) | Tx::Postgres(_, side) => side,
    };
    drop(tx);
    let logs = logs::summarize(end.logs, which, &attempts).await?;
    Ok(Report { tables, logs })
}
