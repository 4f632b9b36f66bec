//! `SqliteStore`: the connection pools, schema migration, and what every part shares (row
//! decoding, times as milliseconds, the reads of a run's and an attempt's state). Each
//! part of the store port has its own file: `runs` (with `admission`), `outbox`, `leases`,
//! `sessions`, `schedules`.

mod admission;
mod callbacks;
mod gauges;
mod group;
mod leases;
mod outbox;
mod replies;
mod retention;
mod runs;
mod schedules;
mod sessions;
mod sync;

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Decode, Row, Sqlite, Type};

use super::common::{ATTEMPT_COLUMNS, RUN_COLUMNS, corrupt, from_ms, ms, ttl_ms};
use crate::domain::ports::StoreError;
use crate::domain::run::{Attempt, ReasonCode, ResourceUsage, Run, RunId, RunStatus, Trigger};
use crate::domain::schedule::Admission;
use crate::protocol::{parse_admission, parse_trigger};
use group::{GroupCommit, WriteTx};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

#[derive(Clone)]
pub struct SqliteStore {
    /// The write connection (a pool of one), for tests that put rows the store never
    /// writes; the store itself writes only through `group`.
    #[cfg(test)]
    writer: SqlitePool,
    reader: SqlitePool,
    /// Every write queues here and shares a group transaction on the one write
    /// connection, which the committer owns (see `group`): nothing else takes that
    /// connection, so no write waits behind the committer for it, and a transaction
    /// that reads a row, asks the domain and writes the answer never races another
    /// writer of this process.
    group: GroupCommit,
}

impl SqliteStore {
    /// Open (creating if needed) `tasuki.db` in `data_dir` and bring its schema up to date.
    pub async fn open(data_dir: &Path) -> Result<Self, StoreError> {
        Self::open_file(&data_dir.join("tasuki.db")).await
    }

    /// Open (creating it and its directory if needed) the database file at `path` and
    /// bring its schema up to date.
    pub async fn open_file(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Unavailable(format!("cannot create directory {}: {e}", dir.display()))
            })?;
        }
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // A 202 promises the run is stored: every commit reaches the disk.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        // No ping before each acquire (sqlx's default): a connection to a local file
        // does not go stale, and the ping is one more round trip to the connection's
        // thread for every transaction and read, which under load is most of the cost.
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .test_before_acquire(false)
            .connect_with(options.clone())
            .await
            .map_err(db)?;
        refuse_newer_schema(&writer).await?;
        MIGRATOR
            .run(&writer)
            .await
            .map_err(|e| StoreError::Unavailable(format!("migrating {}: {e}", path.display())))?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .test_before_acquire(false)
            .connect_with(options.read_only(true))
            .await
            .map_err(db)?;
        let group = GroupCommit::start(writer.clone());
        Ok(Self {
            #[cfg(test)]
            writer,
            reader,
            group,
        })
    }

    /// A write operation inside a group transaction that took SQLite's write lock at once
    /// (`BEGIN IMMEDIATE`): what it reads cannot be changed by another process on the
    /// same file before it writes, and it never fails half-way for a snapshot gone stale.
    /// Its own SAVEPOINT lets it undo only itself; `commit` returns once durable.
    async fn begin_write(&self) -> Result<WriteTx, StoreError> {
        self.group.begin().await
    }

    #[cfg(test)]
    fn group(&self) -> &GroupCommit {
        &self.group
    }

    /// The write connection, for tests that need to put rows the store never writes.
    #[cfg(test)]
    pub(crate) fn writer(&self) -> &SqlitePool {
        &self.writer
    }
}

/// One process uses a SQLite store: every duty is its own (the port's defaults).
impl crate::domain::store::Duties for SqliteStore {}

/// The newest migration this build has.
fn known_schema() -> i64 {
    MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0)
}

/// Refuse a database a newer build migrated (its newest applied migration is one this
/// build does not have) before anything reads or writes it: this build's queries may
/// not match that schema, and migrations only ever go forward.
async fn refuse_newer_schema(pool: &SqlitePool) -> Result<(), StoreError> {
    let migrated: Option<i64> = sqlx::query_scalar(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'",
    )
    .fetch_optional(pool)
    .await
    .map_err(db)?;
    if migrated.is_none() {
        return Ok(());
    }
    let found: Option<i64> =
        sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations WHERE success = 1")
            .fetch_one(pool)
            .await
            .map_err(db)?;
    let known = known_schema();
    match found {
        Some(found) if found > known => Err(StoreError::SchemaTooNew { found, known }),
        _ => Ok(()),
    }
}

/// A database error as the store port names it: data that does not decode is corrupt
/// (an internal error, not worth a retry); anything else is the database failing.
fn db(e: sqlx::Error) -> StoreError {
    match e {
        sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::Decode(_)
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::ColumnIndexOutOfBounds { .. }
        | sqlx::Error::TypeNotFound { .. } => StoreError::Corrupt(e.to_string()),
        other => StoreError::Unavailable(other.to_string()),
    }
}

/// One column of a row; a value that does not decode is corrupt data.
fn col<'r, T>(row: &'r SqliteRow, name: &str) -> Result<T, StoreError>
where
    T: Decode<'r, Sqlite> + Type<Sqlite>,
{
    row.try_get(name).map_err(|e| corrupt(name, e))
}

/// A time column that must be there.
fn time_col(row: &SqliteRow, name: &str) -> Result<DateTime<Utc>, StoreError> {
    let v: i64 = col(row, name)?;
    from_ms(Some(v)).ok_or_else(|| corrupt(name, format!("{v} is no time")))
}

fn run_id_col(row: &SqliteRow, name: &str) -> Result<RunId, StoreError> {
    let id: String = col(row, name)?;
    RunId::from_str(&id).map_err(|e| corrupt(name, e))
}

fn status_col(row: &SqliteRow, name: &str) -> Result<RunStatus, StoreError> {
    let status: String = col(row, name)?;
    RunStatus::from_str(&status).map_err(|e| corrupt(name, e))
}

fn attempt_col(row: &SqliteRow, name: &str) -> Result<u32, StoreError> {
    let n: i64 = col(row, name)?;
    u32::try_from(n).map_err(|e| corrupt(name, e))
}

/// The optional `reason_code` column, parsed.
fn reason_code_col(row: &SqliteRow) -> Result<Option<ReasonCode>, StoreError> {
    let code: Option<String> = col(row, "reason_code")?;
    code.map(|c| ReasonCode::from_str(&c))
        .transpose()
        .map_err(|e| corrupt("reason_code", e))
}

/// The optional `trigger` column (NULL: the API).
fn trigger_col(row: &SqliteRow) -> Result<Trigger, StoreError> {
    let text: Option<String> = col(row, "trigger")?;
    parse_trigger(text.as_deref()).map_err(|e| corrupt("trigger", e))
}

/// The optional `admission` column (NULL: unlimited).
fn admission_col(row: &SqliteRow) -> Result<Admission, StoreError> {
    let text: Option<String> = col(row, "admission")?;
    parse_admission(text.as_deref()).map_err(|e| corrupt("admission", e))
}

/// A byte counter column (`log_dropped_bytes`, `log_undelivered_bytes`).
fn dropped_col(row: &SqliteRow, name: &str) -> Result<u64, StoreError> {
    let bytes: i64 = col(row, name)?;
    Ok(bytes.max(0) as u64)
}

fn run_from_row(row: &SqliteRow) -> Result<Run, StoreError> {
    let params: String = col(row, "params")?;
    Ok(Run {
        id: run_id_col(row, "id")?,
        job: col(row, "job")?,
        params: serde_json::from_str::<BTreeMap<String, String>>(&params)
            .map_err(|e| corrupt("params", e))?,
        status: status_col(row, "status")?,
        trigger: trigger_col(row)?,
        attempt: attempt_col(row, "attempt")?,
        exit_code: col(row, "exit_code")?,
        reason: col(row, "reason")?,
        reason_code: reason_code_col(row)?,
        created_at: from_ms(col(row, "created_at")?).unwrap_or_default(),
        started_at: from_ms(col(row, "started_at")?),
        finished_at: from_ms(col(row, "finished_at")?),
        cancel_requested: col::<i64>(row, "cancel_requested")? != 0,
        not_before: from_ms(col(row, "not_before")?),
        log_dropped_bytes: dropped_col(row, "log_dropped_bytes")?,
        output_gap: col::<i64>(row, "output_gap")? != 0,
        attempts: Vec::new(),
        callbacks: Vec::new(),
        requested_by: col(row, "requested_by")?,
        replies: Vec::new(),
    })
}

fn attempt_from_row(row: &SqliteRow) -> Result<(RunId, Attempt), StoreError> {
    let attempt = Attempt {
        number: attempt_col(row, "attempt")?,
        status: status_col(row, "status")?,
        worker_id: col(row, "worker_id")?,
        worker_build: col(row, "worker_build")?,
        container_id: col(row, "container_id")?,
        exit_code: col(row, "exit_code")?,
        reason: col(row, "reason")?,
        reason_code: reason_code_col(row)?,
        claimed_at: from_ms(col(row, "claimed_at")?).unwrap_or_default(),
        started_at: from_ms(col(row, "started_at")?),
        finished_at: from_ms(col(row, "finished_at")?),
        log_dropped_bytes: dropped_col(row, "log_dropped_bytes")?,
        output_gap: col::<i64>(row, "output_gap")? != 0,
        usage: usage_cols(row)?,
    };
    Ok((run_id_col(row, "run_id")?, attempt))
}

/// An attempt's usage columns; `None` when its worker read nothing.
fn usage_cols(row: &SqliteRow) -> Result<Option<ResourceUsage>, StoreError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ports::RunRecords;
    use crate::store::suite;

    async fn open() -> (SqliteStore, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).await.unwrap();
        (store, dir)
    }

    suite::store_suite!(open);

    /// A store a newer build migrated is refused at open, untouched; one at this build's
    /// own version opens again.
    #[tokio::test]
    async fn a_schema_newer_than_this_build_is_refused_at_open() {
        let (store, dir) = open().await;
        let known = known_schema();
        assert!(known >= 13);
        sqlx::query(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
             VALUES (?, 'from a newer build', 1, x'00', 0)",
        )
        .bind(known + 1)
        .execute(store.writer())
        .await
        .unwrap();
        drop(store);
        match SqliteStore::open(dir.path()).await {
            Err(e @ StoreError::SchemaTooNew { .. }) => {
                let text = e.to_string();
                assert!(
                    text.contains(&format!("version {}", known + 1))
                        && text.contains(&format!("up to {known}")),
                    "{text}"
                );
            }
            Err(other) => panic!("refused for another reason: {other}"),
            Ok(_) => panic!("a newer schema was opened"),
        }
        sqlx::query("DELETE FROM _sqlx_migrations WHERE version = ?")
            .bind(known + 1)
            .execute(
                &sqlx::SqlitePool::connect(&format!(
                    "sqlite://{}",
                    dir.path().join("tasuki.db").display()
                ))
                .await
                .unwrap(),
            )
            .await
            .unwrap();
        SqliteStore::open(dir.path()).await.unwrap();
    }

    /// A row the store could never have written (here: a status no version knows) is
    /// corrupt data, an internal error; never `Unavailable`, which would have clients
    /// and workers retry forever.
    #[tokio::test]
    async fn a_row_that_does_not_decode_is_corrupt_not_unavailable() {
        let (store, _dir) = open().await;
        let run = suite::new_run();
        store.insert_run(&run, None).await.unwrap();
        sqlx::query("UPDATE runs SET status = 'exploded' WHERE id = ?")
            .bind(run.id.to_string())
            .execute(store.writer())
            .await
            .unwrap();
        assert!(matches!(
            store.get_run(run.id).await,
            Err(StoreError::Corrupt(_))
        ));
        assert!(matches!(
            store.cancel(run.id, Utc::now()).await,
            Err(StoreError::Corrupt(_))
        ));
        // A value of the wrong type (text where a number belongs) is corrupt too.
        sqlx::query("UPDATE runs SET status = 'queued', attempt = 'one' WHERE id = ?")
            .bind(run.id.to_string())
            .execute(store.writer())
            .await
            .unwrap();
        assert!(matches!(
            store.get_run(run.id).await,
            Err(StoreError::Corrupt(_))
        ));
    }
}
