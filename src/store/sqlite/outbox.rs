//! The outbox: publishes written with the state change that needs them, handed to the
//! relay until the queue confirms them.

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::sync::{exec, run_id_get, sync_db};
use super::{SqliteStore, attempt_col, col, corrupt, db, ms, run_id_col};
use crate::domain::ports::{Outbox, OutboxBacklog, OutboxEntry, RunMessage, StoreError};
use crate::domain::run::RunId;

/// Queue a publish of `attempt` of the run, due from `not_before` (now when `None`).
/// Runs inside the caller's transaction, beside the state change that needs it.
pub(super) fn enqueue(
    conn: &rusqlite::Connection,
    run_id: RunId,
    attempt: u32,
    now: DateTime<Utc>,
    not_before: Option<DateTime<Utc>>,
) -> Result<(), StoreError> {
    exec(
        conn,
        "INSERT INTO outbox (run_id, attempt, created_at, not_before) VALUES (?, ?, ?, ?)",
        rusqlite::params![
            run_id.to_string(),
            i64::from(attempt),
            ms(now),
            not_before.map(ms)
        ],
    )?;
    Ok(())
}

/// The run's publishes not sent yet will never be: marked done with `why`.
pub(super) fn drop_pending(
    conn: &rusqlite::Connection,
    run_id: RunId,
    why: &str,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    exec(
        conn,
        "UPDATE outbox SET sent_at = ?, last_error = ? WHERE run_id = ? AND sent_at IS NULL",
        rusqlite::params![ms(now), why, run_id.to_string()],
    )?;
    Ok(())
}

#[async_trait]
impl Outbox for SqliteStore {
    async fn pending_outbox(
        &self,
        limit: u32,
        now: DateTime<Utc>,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        self.pending_outbox_after(0, limit, now).await
    }

    async fn pending_outbox_after(
        &self,
        after: i64,
        limit: u32,
        now: DateTime<Utc>,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, run_id, attempt FROM outbox WHERE sent_at IS NULL AND id > ? \
             AND (not_before IS NULL OR not_before <= ?) ORDER BY id LIMIT ?",
        )
        .bind(after)
        .bind(ms(now))
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await
        .map_err(db)?;
        rows.iter()
            .map(|row| {
                Ok(OutboxEntry {
                    id: col(row, "id")?,
                    message: RunMessage {
                        run_id: run_id_col(row, "run_id")?,
                        attempt: attempt_col(row, "attempt")?,
                    },
                })
            })
            .collect()
    }

    async fn mark_outbox_sent(&self, ids: &[i64], now: DateTime<Utc>) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        let list = serde_json::to_string(ids).map_err(|e| corrupt("outbox ids", e))?;
        self.group
            .run(move |c| {
                exec(
                    c,
                    "UPDATE outbox SET sent_at = ?, tries = tries + 1, last_error = NULL, \
                     last_try_failed = 0 WHERE id IN (SELECT value FROM json_each(?))",
                    rusqlite::params![ms(now), list],
                )
                .map(drop)
            })
            .await
    }

    async fn mark_outbox_failed(&self, id: i64, error: &str) -> Result<(), StoreError> {
        let error = error.to_owned();
        self.group
            .run(move |c| {
                exec(
                    c,
                    "UPDATE outbox SET tries = tries + 1, last_error = ?, last_try_failed = 1 \
                     WHERE id = ?",
                    rusqlite::params![error, id],
                )
                .map(drop)
            })
            .await
    }

    async fn outbox_backlog(&self, now: DateTime<Utc>) -> Result<OutboxBacklog, StoreError> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS pending, COALESCE(SUM(last_try_failed), 0) AS failed, \
               (SELECT last_error FROM outbox WHERE sent_at IS NULL AND last_error IS NOT NULL \
                ORDER BY id DESC LIMIT 1) AS last_error \
             FROM outbox WHERE sent_at IS NULL AND (not_before IS NULL OR not_before <= ?)",
        )
        .bind(ms(now))
        .fetch_one(&self.reader)
        .await
        .map_err(db)?;
        let pending: i64 = col(&row, "pending")?;
        let failed: i64 = col(&row, "failed")?;
        Ok(OutboxBacklog {
            pending: pending.max(0) as u64,
            failed: failed.max(0) as u64,
            last_error: col(&row, "last_error")?,
        })
    }

    async fn requeue_unclaimed(&self) -> Result<u64, StoreError> {
        let requeued = self
            .group
            .run(|c| {
                exec(
                    c,
                    "UPDATE outbox SET sent_at = NULL WHERE sent_at IS NOT NULL AND id IN (\
                       SELECT o.id FROM outbox o JOIN runs r ON r.id = o.run_id \
                       WHERE r.status = 'queued' AND r.admitted = 1 AND o.attempt = r.attempt + 1)",
                    [],
                )
            })
            .await?;
        Ok(requeued as u64)
    }

    async fn republish_unclaimed(
        &self,
        sent_before: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<Vec<RunId>, StoreError> {
        self.group
            .run(move |c| {
                let mut stmt = c
                    .prepare_cached(
                        "UPDATE outbox SET sent_at = NULL, \
                         last_error = 'published again: the queue no longer held it' \
                         WHERE sent_at IS NOT NULL AND sent_at < ?1 AND id IN (\
                           SELECT o.id FROM outbox o JOIN runs r ON r.id = o.run_id \
                           WHERE r.status = 'queued' AND r.admitted = 1 AND o.attempt = r.attempt + 1 \
                             AND (r.not_before IS NULL OR r.not_before <= ?2) \
                             AND o.id = (SELECT MAX(id) FROM outbox WHERE run_id = r.id)) \
                         RETURNING run_id",
                    )
                    .map_err(sync_db)?;
                let mut rows = stmt
                    .query(rusqlite::params![ms(sent_before), ms(now)])
                    .map_err(sync_db)?;
                let mut runs = Vec::new();
                while let Some(row) = rows.next().map_err(sync_db)? {
                    runs.push(run_id_get(row, "run_id")?);
                }
                Ok(runs)
            })
            .await
    }
}
