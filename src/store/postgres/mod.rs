//! `PgStore`: the store on PostgreSQL, for control plane replicas that share one
//! database. The connection pool, schema migration (`migrations/postgres/`), and what
//! every part shares: row decoding, the reads of a run's and an attempt's state, and
//! `write!`, the one way a part writes.
//!
//! **Every write operation is one SERIALIZABLE transaction**, run again from the start
//! when PostgreSQL finds it conflicting with a concurrent one (SQLSTATE 40001, or a
//! deadlock, 40P01). So an operation that reads a row, asks `domain::transition` and
//! writes the answer behaves as if it ran alone, whichever replica runs it: the same
//! guarantee the SQLite store has from its single writer, without a lock held across
//! replicas. Each part mirrors its SQLite twin file for file.

mod admission;
mod callbacks;
mod duties;
mod gauges;
mod leases;
mod outbox;
mod replies;
mod retention;
mod rows;
mod runs;
mod schedules;
mod sessions;

use std::ops::ControlFlow;
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{PgConnection, Postgres, Transaction};

use crate::domain::ports::StoreError;
use crate::domain::run::{RunId, RunStatus};
use crate::domain::transition::{AttemptState, RunState};
#[allow(unused_imports)]
pub(super) use rows::{
    admission_col, attempt_col, attempt_from_row, col, dropped_col, reason_code_col, run_from_row,
    run_id_col, status_col, time_col, trigger_col, usage_cols,
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// How often a write that keeps conflicting with concurrent ones is run again before
/// the store answers `Unavailable` (the caller's own retry takes it from there).
const MAX_TRIES: u32 = 12;

#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
}

/// Why a write operation stopped: the store's own error, or a conflict with a
/// concurrent transaction, after which the whole operation runs again.
#[derive(Debug)]
pub(super) enum TxError {
    Store(StoreError),
    Conflict(String),
}

impl From<StoreError> for TxError {
    fn from(e: StoreError) -> Self {
        TxError::Store(e)
    }
}

/// The result of a step inside a write operation.
pub(super) type Tx<T> = Result<T, TxError>;

/// Run `$body` (an async expression using the connection `$c`) as one SERIALIZABLE
/// transaction of `$store`, again from the start after a conflict; the value is
/// `Result<T, StoreError>`. A macro, not a function taking a closure: the body borrows
/// the caller's arguments, which a closure handing out a boxed future for any
/// connection lifetime cannot.
macro_rules! write {
    ($store:expr, |$c:ident| $body:expr) => {{
        let mut tries = 0u32;
        loop {
            let mut tx = $store.begin().await?;
            let outcome = {
                let $c: &mut sqlx::PgConnection = &mut *tx;
                $body.await
            };
            match $crate::store::postgres::end_tx(tx, outcome, &mut tries).await {
                std::ops::ControlFlow::Break(result) => break result,
                std::ops::ControlFlow::Continue(()) => continue,
            }
        }
    }};
}
pub(super) use write;

impl PgStore {
    /// Connect to `url` (`postgres://user:password@host:port/database`, with libpq's
    /// `sslmode` and friends) and bring the schema up to date. Replicas starting together
    /// migrate one at a time (sqlx holds an advisory lock while it migrates).
    pub async fn open(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::Unavailable(format!("the database URL is not usable: {e}")))?;
        // PostgreSQL's notices (a migration's "already exists, skipping") are not
        // worth a log line each start.
        let options = options
            .application_name("tasuki")
            .options([("client_min_messages", "warning")]);
        let pool = PgPoolOptions::new()
            .max_connections(max_connections.max(2))
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .map_err(|e| StoreError::Unavailable(format!("connecting to PostgreSQL: {e}")))?;
        refuse_newer_schema(&pool).await?;
        MIGRATOR
            .run(&pool)
            .await
            .map_err(|e| StoreError::Unavailable(format!("migrating the PostgreSQL store: {e}")))?;
        Ok(Self { pool })
    }

    /// A handle on the pool, for what shares the database without being the store (the
    /// logs in PostgreSQL).
    pub fn shared_pool(&self) -> PgPool {
        self.pool.clone()
    }

    /// The pool, for reads (each a statement of its own, read committed).
    pub(super) fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// A SERIALIZABLE transaction for one write operation (see `write!`).
    pub(super) async fn begin(&self) -> Result<Transaction<'static, Postgres>, StoreError> {
        self.pool
            .begin_with("BEGIN ISOLATION LEVEL SERIALIZABLE")
            .await
            .map_err(|e| StoreError::Unavailable(format!("starting a transaction: {e}")))
    }
}

/// After a write operation's body: commit it, or roll it back; run it again after a
/// conflict (in the body or at commit), up to `MAX_TRIES`, with a short random pause
/// that grows so two replicas colliding on one row do not collide again in step.
pub(super) async fn end_tx<T>(
    tx: Transaction<'static, Postgres>,
    outcome: Tx<T>,
    tries: &mut u32,
) -> ControlFlow<Result<T, StoreError>> {
    let conflict = match outcome {
        Ok(value) => match tx.commit().await {
            Ok(()) => return ControlFlow::Break(Ok(value)),
            Err(e) => match db(e) {
                TxError::Store(e) => return ControlFlow::Break(Err(e)),
                TxError::Conflict(why) => why,
            },
        },
        Err(TxError::Store(e)) => {
            // Dropping the transaction rolls it back.
            drop(tx);
            return ControlFlow::Break(Err(e));
        }
        Err(TxError::Conflict(why)) => {
            drop(tx);
            why
        }
    };
    *tries += 1;
    if *tries >= MAX_TRIES {
        return ControlFlow::Break(Err(StoreError::Unavailable(format!(
            "the write kept conflicting with concurrent ones ({} tries): {conflict}",
            *tries
        ))));
    }
    let ceiling = 2u64 << (*tries).min(6);
    let pause = rand::random_range(1..=ceiling);
    tokio::time::sleep(Duration::from_millis(pause)).await;
    ControlFlow::Continue(())
}

/// The newest migration this build has.
fn known_schema() -> i64 {
    MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0)
}

/// Refuse a database a newer build migrated, before anything reads or writes it.
async fn refuse_newer_schema(pool: &PgPool) -> Result<(), StoreError> {
    let migrated: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
        .fetch_one(pool)
        .await
        .map_err(|e| StoreError::Unavailable(format!("reading the schema version: {e}")))?;
    if !migrated {
        return Ok(());
    }
    let found: Option<i64> =
        sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations WHERE success")
            .fetch_one(pool)
            .await
            .map_err(|e| StoreError::Unavailable(format!("reading the schema version: {e}")))?;
    let known = known_schema();
    match found {
        Some(found) if found > known => Err(StoreError::SchemaTooNew { found, known }),
        _ => Ok(()),
    }
}

/// A database error as the store port names it: a conflict with a concurrent
/// transaction is run again; data that does not decode is corrupt; anything else is the
/// database failing.
pub(super) fn db(e: sqlx::Error) -> TxError {
    if let sqlx::Error::Database(d) = &e
        && matches!(d.code().as_deref(), Some("40001" | "40P01"))
    {
        return TxError::Conflict(d.message().to_owned());
    }
    TxError::Store(store_db(e))
}

/// A database error outside a write operation (a read), as the store port names it.
pub(super) fn store_db(e: sqlx::Error) -> StoreError {
    match e {
        sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::Decode(_)
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::ColumnIndexOutOfBounds { .. }
        | sqlx::Error::TypeNotFound { .. } => StoreError::Corrupt(e.to_string()),
        other => StoreError::Unavailable(other.to_string()),
    }
}

/// The run's state for the transition rules, read inside the caller's transaction.
pub(super) async fn run_state(c: &mut PgConnection, run_id: RunId) -> Tx<Option<RunState>> {
    let row =
        sqlx::query("SELECT status, attempt, cancel_requested, not_before FROM runs WHERE id = $1")
            .bind(run_id.to_string())
            .fetch_optional(&mut *c)
            .await
            .map_err(db)?;
    let Some(row) = row else {
        return Ok(None);
    };
    Ok(Some(RunState {
        status: status_col(&row, "status")?,
        attempt: attempt_col(&row, "attempt")?,
        cancel_requested: col(&row, "cancel_requested")?,
        not_before: super::common::from_ms(col(&row, "not_before")?),
    }))
}

/// One attempt's state for the transition rules, read inside the caller's transaction.
pub(super) async fn attempt_state(
    c: &mut PgConnection,
    run_id: RunId,
    attempt: u32,
) -> Tx<Option<AttemptState>> {
    let row = sqlx::query(
        "SELECT worker_id, epoch, status, container_id IS NOT NULL AS started, lease_expires_at \
         FROM attempts WHERE run_id = $1 AND attempt = $2",
    )
    .bind(run_id.to_string())
    .bind(i64::from(attempt))
    .fetch_optional(&mut *c)
    .await
    .map_err(db)?;
    let Some(row) = row else {
        return Ok(None);
    };
    Ok(Some(AttemptState {
        worker_id: col(&row, "worker_id")?,
        epoch: col(&row, "epoch")?,
        status: status_col(&row, "status")?,
        started: col(&row, "started")?,
        lease_expires_at: time_col(&row, "lease_expires_at")?,
    }))
}

/// The statuses of runs that are not final, for `status = ANY($n)`.
pub(super) fn not_final() -> Vec<&'static str> {
    RunStatus::ALL
        .into_iter()
        .filter(|s| !s.is_final())
        .map(RunStatus::as_str)
        .collect()
}

#[cfg(test)]
pub(crate) mod testdb;

#[cfg(test)]
mod tests;
