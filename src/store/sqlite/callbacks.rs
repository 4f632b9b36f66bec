//! Callback deliveries: the obligation written beside a run's final state, the due
//! ones for the relay, the record of each try, and a person's redelivery.

use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::sqlite::SqliteRow;
use ulid::Ulid;

use super::sync::{exec, run_state, sync_on};
use super::{SqliteStore, col, corrupt, db, from_ms, ms, run_id_col, time_col};
use crate::domain::callback::{
    CallbackState, Callbacks, DueCallback, NextStep, RUN_FINISHED, Redelivery, TryResult,
};
use crate::domain::ports::StoreError;
use crate::domain::run::RunId;

/// Oblige the store to announce that the run is final: one delivery due now, with a new
/// event id. Inside the transaction that makes the run final.
pub(super) fn oblige(
    conn: &rusqlite::Connection,
    run_id: RunId,
    url: &str,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    exec(
        conn,
        "INSERT INTO callback_deliveries (run_id, url, event, event_id, created_at, next_try_at) \
         VALUES (?, ?, ?, ?, ?, ?)",
        rusqlite::params![
            run_id.to_string(),
            url,
            RUN_FINISHED,
            format!("msg_{}", Ulid::new()),
            ms(now),
            ms(now)
        ],
    )?;
    Ok(())
}

fn tries_col(row: &SqliteRow) -> Result<u32, StoreError> {
    let n: i64 = col(row, "tries")?;
    u32::try_from(n).map_err(|e| corrupt("tries", e))
}

fn state_from_row(row: &SqliteRow) -> Result<CallbackState, StoreError> {
    let status: Option<i64> = col(row, "last_status")?;
    Ok(CallbackState {
        url: col(row, "url")?,
        event: col(row, "event")?,
        event_id: col(row, "event_id")?,
        tries: tries_col(row)?,
        last_status: status
            .map(|s| u16::try_from(s).map_err(|e| corrupt("last_status", e)))
            .transpose()?,
        last_error: col(row, "last_error")?,
        delivered_at: from_ms(col(row, "delivered_at")?),
        next_try_at: from_ms(col(row, "next_try_at")?),
        gave_up: col::<i64>(row, "gave_up")? != 0,
    })
}

impl SqliteStore {
    /// The callbacks of the runs in `ids` (a JSON list of run ids), oldest first.
    pub(super) async fn callbacks_of(
        &self,
        ids: &str,
    ) -> Result<BTreeMap<RunId, Vec<CallbackState>>, StoreError> {
        let rows = sqlx::query(
            "SELECT run_id, url, event, event_id, tries, last_status, last_error, delivered_at, \
             next_try_at, gave_up FROM callback_deliveries \
             WHERE run_id IN (SELECT value FROM json_each(?)) ORDER BY run_id, id",
        )
        .bind(ids)
        .fetch_all(&self.reader)
        .await
        .map_err(db)?;
        let mut by_run: BTreeMap<RunId, Vec<CallbackState>> = BTreeMap::new();
        for row in &rows {
            by_run
                .entry(run_id_col(row, "run_id")?)
                .or_default()
                .push(state_from_row(row)?);
        }
        Ok(by_run)
    }
}

#[async_trait]
impl Callbacks for SqliteStore {
    async fn due_callbacks(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<DueCallback>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, run_id, url, event, event_id, created_at, tries FROM callback_deliveries \
             WHERE delivered_at IS NULL AND gave_up = 0 AND next_try_at <= ? \
             ORDER BY next_try_at, id LIMIT ?",
        )
        .bind(ms(now))
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await
        .map_err(db)?;
        rows.iter()
            .map(|row| {
                Ok(DueCallback {
                    id: col(row, "id")?,
                    run_id: run_id_col(row, "run_id")?,
                    url: col(row, "url")?,
                    event: col(row, "event")?,
                    event_id: col(row, "event_id")?,
                    created_at: time_col(row, "created_at")?,
                    tries: tries_col(row)?,
                })
            })
            .collect()
    }

    async fn record_callback_try(
        &self,
        id: i64,
        result: &TryResult,
        next: NextStep,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let (status, error) = match result {
            TryResult::Status(s) => (Some(i64::from(*s)), None),
            TryResult::Failed(e) => (None, Some(e.clone())),
        };
        let (delivered_at, next_try_at, gave_up) = match next {
            NextStep::Delivered => (Some(ms(now)), None, false),
            NextStep::RetryAt(t) => (None, Some(ms(t)), false),
            NextStep::Stopped | NextStep::GaveUp => (None, None, true),
        };
        self.group
            .run(move |c| {
                exec(
                    c,
                    "UPDATE callback_deliveries SET tries = tries + 1, last_status = ?, \
                     last_error = ?, delivered_at = ?, next_try_at = ?, gave_up = ? WHERE id = ?",
                    rusqlite::params![
                        status,
                        error,
                        delivered_at,
                        next_try_at,
                        i64::from(gave_up),
                        id
                    ],
                )
                .map(drop)
            })
            .await
    }

    async fn redeliver_callbacks(
        &self,
        run_id: RunId,
        now: DateTime<Utc>,
    ) -> Result<Redelivery, StoreError> {
        let mut tx = self.begin_write().await?;
        let Some(run) = sync_on(&mut tx, |c| run_state(c, run_id)).await? else {
            return Ok(Redelivery::UnknownRun);
        };
        if !run.status.is_final() {
            return Ok(Redelivery::NothingToDeliver);
        }
        let done = sqlx::query(
            "UPDATE callback_deliveries SET next_try_at = ?, gave_up = 0, delivered_at = NULL \
             WHERE run_id = ?",
        )
        .bind(ms(now))
        .bind(run_id.to_string())
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        tx.commit().await?;
        Ok(match u32::try_from(done.rows_affected()) {
            Ok(0) => Redelivery::NothingToDeliver,
            Ok(n) => Redelivery::Queued(n),
            Err(_) => Redelivery::Queued(u32::MAX),
        })
    }
}
