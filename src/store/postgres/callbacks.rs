//! Callback deliveries: the obligation written beside a run's final state, the due
//! ones for the relay, the record of each try, and a person's redelivery.

use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use sqlx::postgres::PgRow;
use ulid::Ulid;

use super::{PgStore, Tx, col, db, run_id_col, run_state, store_db, time_col, write};
use crate::domain::callback::{
    CallbackState, Callbacks, DueCallback, NextStep, RUN_FINISHED, Redelivery, TryResult,
};
use crate::domain::ports::StoreError;
use crate::domain::run::RunId;
use crate::store::common::{corrupt, from_ms, ms};

/// Oblige the store to announce that the run is final: one delivery due now, with a new
/// event id. Inside the transaction that makes the run final.
pub(super) async fn oblige(
    c: &mut PgConnection,
    run_id: RunId,
    url: &str,
    now: DateTime<Utc>,
) -> Tx<()> {
    sqlx::query(
        "INSERT INTO callback_deliveries (run_id, url, event, event_id, created_at, next_try_at) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(run_id.to_string())
    .bind(url)
    .bind(RUN_FINISHED)
    .bind(format!("msg_{}", Ulid::new()))
    .bind(ms(now))
    .bind(ms(now))
    .execute(&mut *c)
    .await
    .map_err(db)?;
    Ok(())
}

fn tries_col(row: &PgRow) -> Result<u32, StoreError> {
    let n: i64 = col(row, "tries")?;
    u32::try_from(n).map_err(|e| corrupt("tries", e))
}

fn state_from_row(row: &PgRow) -> Result<CallbackState, StoreError> {
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
        gave_up: col(row, "gave_up")?,
    })
}

impl PgStore {
    /// Each run's callback deliveries (`ids`: run ids as text), oldest first.
    pub(super) async fn callbacks_of(
        &self,
        ids: &[String],
    ) -> Result<BTreeMap<RunId, Vec<CallbackState>>, StoreError> {
        let rows = sqlx::query(
            "SELECT run_id, url, event, event_id, tries, last_status, last_error, delivered_at, \
             next_try_at, gave_up FROM callback_deliveries \
             WHERE run_id = ANY($1) ORDER BY run_id, id",
        )
        .bind(ids)
        .fetch_all(self.pool())
        .await
        .map_err(store_db)?;
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

/// A try's record, as `record_callback_try` writes it.
struct TryRecord {
    status: Option<i64>,
    error: Option<String>,
    delivered_at: Option<i64>,
    next_try_at: Option<i64>,
    gave_up: bool,
}

/// `record_callback_try`'s transaction.
async fn record_try(c: &mut PgConnection, id: i64, record: &TryRecord) -> Tx<()> {
    sqlx::query(
        "UPDATE callback_deliveries SET tries = tries + 1, last_status = $1, \
         last_error = $2, delivered_at = $3, next_try_at = $4, gave_up = $5 WHERE id = $6",
    )
    .bind(record.status)
    .bind(record.error.as_deref())
    .bind(record.delivered_at)
    .bind(record.next_try_at)
    .bind(record.gave_up)
    .bind(id)
    .execute(&mut *c)
    .await
    .map_err(db)?;
    Ok(())
}

/// `redeliver_callbacks`'s transaction.
async fn redeliver(c: &mut PgConnection, run_id: RunId, now: DateTime<Utc>) -> Tx<Redelivery> {
    let Some(run) = run_state(&mut *c, run_id).await? else {
        return Ok(Redelivery::UnknownRun);
    };
    if !run.status.is_final() {
        return Ok(Redelivery::NothingToDeliver);
    }
    let done = sqlx::query(
        "UPDATE callback_deliveries SET next_try_at = $1, gave_up = FALSE, delivered_at = NULL \
         WHERE run_id = $2",
    )
    .bind(ms(now))
    .bind(run_id.to_string())
    .execute(&mut *c)
    .await
    .map_err(db)?;
    Ok(match u32::try_from(done.rows_affected()) {
        Ok(0) => Redelivery::NothingToDeliver,
        Ok(n) => Redelivery::Queued(n),
        Err(_) => Redelivery::Queued(u32::MAX),
    })
}

#[async_trait]
impl Callbacks for PgStore {
    async fn due_callbacks(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<DueCallback>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, run_id, url, event, event_id, created_at, tries FROM callback_deliveries \
             WHERE delivered_at IS NULL AND NOT gave_up AND next_try_at <= $1 \
             ORDER BY next_try_at, id LIMIT $2",
        )
        .bind(ms(now))
        .bind(i64::from(limit))
        .fetch_all(self.pool())
        .await
        .map_err(store_db)?;
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

    /// One statement, outside any SERIALIZABLE transaction: the deliveries taken are
    /// due again only at `now + hold` (or when their try is recorded), and
    /// `FOR UPDATE SKIP LOCKED` passes over those another relay is taking this instant.
    async fn claim_callbacks(
        &self,
        now: DateTime<Utc>,
        limit: u32,
        hold: std::time::Duration,
    ) -> Result<Vec<DueCallback>, StoreError> {
        let rows = sqlx::query(
            "UPDATE callback_deliveries SET next_try_at = $3 WHERE id IN (\
               SELECT id FROM callback_deliveries \
               WHERE delivered_at IS NULL AND NOT gave_up AND next_try_at <= $1 \
               ORDER BY next_try_at, id LIMIT $2 FOR UPDATE SKIP LOCKED) \
             RETURNING id, run_id, url, event, event_id, created_at, tries",
        )
        .bind(ms(now))
        .bind(i64::from(limit))
        .bind(ms(now).saturating_add(super::super::common::ttl_ms(hold)))
        .fetch_all(self.pool())
        .await
        .map_err(store_db)?;
        let mut due = rows
            .iter()
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
            .collect::<Result<Vec<_>, StoreError>>()?;
        due.sort_by_key(|d| d.id);
        Ok(due)
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
        let record = TryRecord {
            status,
            error,
            delivered_at,
            next_try_at,
            gave_up,
        };
        write!(self, |c| record_try(c, id, &record))
    }

    async fn redeliver_callbacks(
        &self,
        run_id: RunId,
        now: DateTime<Utc>,
    ) -> Result<Redelivery, StoreError> {
        write!(self, |c| redeliver(c, run_id, now))
    }
}
