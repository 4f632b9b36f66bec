//! Retention for `SqliteStore`: expired idempotency keys, sent outbox rows nothing needs
//! any more, finished runs past the cutoff, and schedule slot records as old. Each call is one short write
//! transaction of a bounded number of rows, so the API's writes wait at most that long.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::Row;

use super::sync::exec;
use super::{SqliteStore, db, from_ms, ms, time_col};
use crate::domain::ports::StoreError;
use crate::domain::retention::{
    OutboxPurge, PrunedRun, RetentionStore, SlotRecordAge, prunable_statuses, run_is_prunable,
    sent_outbox_row_is_needed, slot_record_is_prunable,
};
use crate::domain::run::{InvalidStatus, RunStatus};

fn corrupt_id(e: crate::domain::run::InvalidRunId) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

fn status_of(text: &str) -> Result<RunStatus, StoreError> {
    text.parse()
        .map_err(|e: InvalidStatus| StoreError::Corrupt(e.to_string()))
}

fn attempt_of(n: i64) -> Result<u32, StoreError> {
    u32::try_from(n).map_err(|e| StoreError::Corrupt(format!("attempt {n}: {e}")))
}

fn json_list<T: serde::Serialize>(items: &[T]) -> Result<String, StoreError> {
    serde_json::to_string(items).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// Children before the run: the foreign keys refuse it the other way round.
const DELETE_RUNS: [&str; 6] = [
    "DELETE FROM callback_deliveries WHERE run_id IN (SELECT value FROM json_each(?))",
    "DELETE FROM run_replies WHERE run_id IN (SELECT value FROM json_each(?))",
    "DELETE FROM idempotency_keys WHERE run_id IN (SELECT value FROM json_each(?))",
    "DELETE FROM outbox WHERE run_id IN (SELECT value FROM json_each(?))",
    "DELETE FROM attempts WHERE run_id IN (SELECT value FROM json_each(?))",
    "DELETE FROM runs WHERE id IN (SELECT value FROM json_each(?))",
];

/// The oldest-ended runs. `+status`: they come from `runs_by_finished` in order; left to
/// choose, SQLite took `runs_by_status` for the IN list and sorted every final run by its
/// end, 4.4 s a batch on a store of 1M runs, with the writer held all along.
const PRUNABLE_RUNS: &str = "SELECT id, status, finished_at, attempt FROM runs \
     WHERE finished_at < ? AND +status IN (SELECT value FROM json_each(?)) \
     ORDER BY finished_at LIMIT ?";

#[async_trait]
impl RetentionStore for SqliteStore {
    async fn delete_expired_keys(
        &self,
        created_before: DateTime<Utc>,
        limit: u32,
    ) -> Result<u64, StoreError> {
        let deleted = self
            .group
            .run(move |c| {
                exec(
                    c,
                    "DELETE FROM idempotency_keys WHERE rowid IN \
                     (SELECT rowid FROM idempotency_keys WHERE created_at < ? LIMIT ?)",
                    rusqlite::params![ms(created_before), i64::from(limit)],
                )
            })
            .await?;
        Ok(deleted as u64)
    }

    async fn purge_sent_outbox(
        &self,
        after: i64,
        until: Option<i64>,
        limit: u32,
    ) -> Result<OutboxPurge, StoreError> {
        // Looked at and deleted in one write transaction: no claim, retry or sweep can
        // change a run between the decision and the delete.
        let mut tx = self.begin_write().await?;
        let until = match until {
            Some(until) => until,
            None => sqlx::query_scalar("SELECT COALESCE(MAX(id), 0) FROM outbox")
                .fetch_one(&mut *tx)
                .await
                .map_err(db)?,
        };
        let rows = sqlx::query(
            "SELECT o.id, o.attempt, r.status, r.attempt AS run_attempt \
             FROM outbox o LEFT JOIN runs r ON r.id = o.run_id \
             WHERE o.id > ? AND o.id <= ? AND o.sent_at IS NOT NULL ORDER BY o.id LIMIT ?",
        )
        .bind(after)
        .bind(until)
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await
        .map_err(db)?;
        let mut scanned_to = None;
        let mut unneeded = Vec::new();
        for row in &rows {
            let id: i64 = row.try_get("id").map_err(db)?;
            let attempt = attempt_of(row.try_get("attempt").map_err(db)?)?;
            let status: Option<String> = row.try_get("status").map_err(db)?;
            let run_attempt: Option<i64> = row.try_get("run_attempt").map_err(db)?;
            let run = match (status, run_attempt) {
                (Some(s), Some(a)) => Some((status_of(&s)?, attempt_of(a)?)),
                _ => None,
            };
            if !sent_outbox_row_is_needed(attempt, run) {
                unneeded.push(id);
            }
            scanned_to = Some(id);
        }
        let mut deleted = 0;
        if !unneeded.is_empty() {
            deleted =
                sqlx::query("DELETE FROM outbox WHERE id IN (SELECT value FROM json_each(?))")
                    .bind(json_list(&unneeded)?)
                    .execute(&mut *tx)
                    .await
                    .map_err(db)?
                    .rows_affected();
        }
        tx.commit().await?;
        Ok(OutboxPurge {
            deleted,
            scanned_to,
            until,
        })
    }

    async fn delete_finished_runs(
        &self,
        finished_before: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<PrunedRun>, StoreError> {
        let statuses: Vec<&str> = prunable_statuses().map(RunStatus::as_str).collect();
        // In the writer's transaction: a person's retry cannot bring a run back between
        // the look and the delete.
        let mut tx = self.begin_write().await?;
        let rows = sqlx::query(PRUNABLE_RUNS)
            .bind(ms(finished_before))
            .bind(json_list(&statuses)?)
            .bind(i64::from(limit))
            .fetch_all(&mut *tx)
            .await
            .map_err(db)?;
        let mut ids = Vec::with_capacity(rows.len());
        let mut attempts = Vec::with_capacity(rows.len());
        for row in &rows {
            let status: String = row.try_get("status").map_err(db)?;
            let finished_at = from_ms(row.try_get("finished_at").map_err(db)?);
            if run_is_prunable(status_of(&status)?, finished_at, finished_before) {
                ids.push(row.try_get::<String, _>("id").map_err(db)?);
                let attempt: i64 = row.try_get("attempt").map_err(db)?;
                attempts.push(u32::try_from(attempt).unwrap_or(0));
            }
        }
        if ids.is_empty() {
            tx.rollback();
            return Ok(Vec::new());
        }
        let list = json_list(&ids)?;
        for sql in DELETE_RUNS {
            sqlx::query(sql)
                .bind(&list)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
        }
        tx.commit().await?;
        ids.iter()
            .zip(attempts)
            .map(|(id, attempts)| {
                Ok(PrunedRun {
                    id: id.parse().map_err(corrupt_id)?,
                    attempts,
                })
            })
            .collect()
    }

    async fn delete_old_slots(
        &self,
        recorded_before: DateTime<Utc>,
        limit: u32,
    ) -> Result<u64, StoreError> {
        let statuses: Vec<&str> = prunable_statuses().map(RunStatus::as_str).collect();
        // The filter narrows the look to rows the rule lets go (so rows kept for now
        // are not looked at again and again); the rule itself decides each one. In the
        // writer's transaction: no run is retried, no cursor moves in between.
        let mut tx = self.begin_write().await?;
        let rows = sqlx::query(
            "SELECT s.rowid AS id, s.recorded_at, s.fire_at, r.status, c.evaluated_until \
             FROM schedule_slots s \
             LEFT JOIN runs r ON r.id = s.run_id \
             LEFT JOIN schedule_cursors c ON c.job = s.job AND c.schedule = s.schedule \
             WHERE s.recorded_at < ?1 \
             AND (r.id IS NULL OR r.status IN (SELECT value FROM json_each(?2))) \
             AND (c.evaluated_until IS NULL OR s.fire_at <= c.evaluated_until) \
             ORDER BY s.recorded_at LIMIT ?3",
        )
        .bind(ms(recorded_before))
        .bind(json_list(&statuses)?)
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await
        .map_err(db)?;
        let mut ids = Vec::with_capacity(rows.len());
        for row in &rows {
            let status: Option<String> = row.try_get("status").map_err(db)?;
            let cursor: Option<i64> = row.try_get("evaluated_until").map_err(db)?;
            let slot = SlotRecordAge {
                recorded_at: time_col(row, "recorded_at")?,
                fire_at: time_col(row, "fire_at")?,
                run: status.as_deref().map(status_of).transpose()?,
                cursor: from_ms(cursor),
            };
            if slot_record_is_prunable(&slot, recorded_before) {
                ids.push(row.try_get::<i64, _>("id").map_err(db)?);
            }
        }
        if ids.is_empty() {
            tx.rollback();
            return Ok(0);
        }
        let deleted = sqlx::query(
            "DELETE FROM schedule_slots WHERE rowid IN (SELECT value FROM json_each(?))",
        )
        .bind(json_list(&ids)?)
        .execute(&mut *tx)
        .await
        .map_err(db)?
        .rows_affected();
        tx.commit().await?;
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests;
