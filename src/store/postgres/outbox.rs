//! The outbox: publishes written with the state change that needs them, handed to the
//! relay until the queue confirms them.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use std::time::Duration;

use super::super::common::{ms, ttl_ms};
use super::{PgStore, Tx, attempt_col, col, db, run_id_col, store_db, write};
use crate::domain::ports::{Outbox, OutboxBacklog, OutboxEntry, RunMessage, StoreError};
use crate::domain::run::RunId;

/// Queue a publish of `attempt` of the run, due from `not_before` (now when `None`).
/// Runs inside the caller's transaction, beside the state change that needs it.
pub(super) async fn enqueue(
    c: &mut PgConnection,
    run_id: RunId,
    attempt: u32,
    now: DateTime<Utc>,
    not_before: Option<DateTime<Utc>>,
) -> Tx<()> {
    sqlx::query(
        "INSERT INTO outbox (run_id, attempt, created_at, not_before) VALUES ($1, $2, $3, $4)",
    )
    .bind(run_id.to_string())
    .bind(i64::from(attempt))
    .bind(ms(now))
    .bind(not_before.map(ms))
    .execute(&mut *c)
    .await
    .map_err(db)?;
    Ok(())
}

/// The run's publishes not sent yet will never be: marked done with `why`.
pub(super) async fn drop_pending(
    c: &mut PgConnection,
    run_id: RunId,
    why: &str,
    now: DateTime<Utc>,
) -> Tx<()> {
    sqlx::query(
        "UPDATE outbox SET sent_at = $1, last_error = $2 WHERE run_id = $3 AND sent_at IS NULL",
    )
    .bind(ms(now))
    .bind(why)
    .bind(run_id.to_string())
    .execute(&mut *c)
    .await
    .map_err(db)?;
    Ok(())
}

/// The queue confirmed these publishes.
async fn mark_sent(c: &mut PgConnection, ids: &[i64], now: DateTime<Utc>) -> Tx<()> {
    sqlx::query(
        "UPDATE outbox SET sent_at = $1, tries = tries + 1, last_error = NULL, \
         last_try_failed = FALSE WHERE id = ANY($2)",
    )
    .bind(ms(now))
    .bind(ids)
    .execute(&mut *c)
    .await
    .map_err(db)?;
    Ok(())
}

/// A publish failed; it stays pending for the relay's next pass.
async fn mark_failed(c: &mut PgConnection, id: i64, error: &str) -> Tx<()> {
    sqlx::query(
        "UPDATE outbox SET tries = tries + 1, last_error = $1, last_try_failed = TRUE, \
         claimed_until = NULL WHERE id = $2",
    )
    .bind(error)
    .bind(id)
    .execute(&mut *c)
    .await
    .map_err(db)?;
    Ok(())
}

/// Every still-queued, admitted run's publish of its next attempt is pending again.
async fn requeue(c: &mut PgConnection) -> Tx<u64> {
    let requeued = sqlx::query(
        "UPDATE outbox SET sent_at = NULL, claimed_until = NULL WHERE sent_at IS NOT NULL AND id IN (\
           SELECT o.id FROM outbox o JOIN runs r ON r.id = o.run_id \
           WHERE r.status = 'queued' AND r.admitted AND o.attempt = r.attempt + 1)",
    )
    .execute(&mut *c)
    .await
    .map_err(db)?
    .rows_affected();
    Ok(requeued)
}

/// The due, still-queued runs whose latest publish went out before `sent_before`:
/// pending again, with the reason noted. Returns those runs.
async fn republish(
    c: &mut PgConnection,
    sent_before: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Tx<Vec<RunId>> {
    let rows = sqlx::query(
        "UPDATE outbox SET sent_at = NULL, claimed_until = NULL, \
         last_error = 'published again: the queue no longer held it' \
         WHERE sent_at IS NOT NULL AND sent_at < $1 AND id IN (\
           SELECT o.id FROM outbox o JOIN runs r ON r.id = o.run_id \
           WHERE r.status = 'queued' AND r.admitted AND o.attempt = r.attempt + 1 \
             AND (r.not_before IS NULL OR r.not_before <= $2) \
             AND o.id = (SELECT MAX(id) FROM outbox WHERE run_id = r.id)) \
         RETURNING run_id",
    )
    .bind(ms(sent_before))
    .bind(ms(now))
    .fetch_all(&mut *c)
    .await
    .map_err(db)?;
    let runs = rows
        .iter()
        .map(|row| run_id_col(row, "run_id"))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(runs)
}

#[async_trait]
impl Outbox for PgStore {
    async fn pending_outbox(
        &self,
        limit: u32,
        now: DateTime<Utc>,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        self.pending_outbox_after(0, limit, now).await
    }

    /// A plain read, no row locked: the relay marks what the queue confirmed.
    async fn pending_outbox_after(
        &self,
        after: i64,
        limit: u32,
        now: DateTime<Utc>,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, run_id, attempt FROM outbox WHERE sent_at IS NULL AND id > $1 \
             AND (not_before IS NULL OR not_before <= $2) ORDER BY id LIMIT $3",
        )
        .bind(after)
        .bind(ms(now))
        .bind(i64::from(limit))
        .fetch_all(self.pool())
        .await
        .map_err(store_db)?;
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

    /// One statement, outside any SERIALIZABLE transaction: `FOR UPDATE SKIP LOCKED`
    /// passes over rows another relay is taking this instant, and `claimed_until` over
    /// the ones it took earlier and has not marked yet.
    async fn claim_outbox(
        &self,
        after: i64,
        limit: u32,
        now: DateTime<Utc>,
        hold: Duration,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        let rows = sqlx::query(
            "UPDATE outbox SET claimed_until = $4 WHERE id IN (\
               SELECT id FROM outbox WHERE sent_at IS NULL AND id > $1 \
                 AND (not_before IS NULL OR not_before <= $2) \
                 AND (claimed_until IS NULL OR claimed_until <= $2) \
               ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED) \
             RETURNING id, run_id, attempt",
        )
        .bind(after)
        .bind(ms(now))
        .bind(i64::from(limit))
        .bind(ms(now).saturating_add(ttl_ms(hold)))
        .fetch_all(self.pool())
        .await
        .map_err(store_db)?;
        let mut entries = rows
            .iter()
            .map(|row| {
                Ok(OutboxEntry {
                    id: col(row, "id")?,
                    message: RunMessage {
                        run_id: run_id_col(row, "run_id")?,
                        attempt: attempt_col(row, "attempt")?,
                    },
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        entries.sort_by_key(|e| e.id);
        Ok(entries)
    }

    async fn mark_outbox_sent(&self, ids: &[i64], now: DateTime<Utc>) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        write!(self, |c| mark_sent(c, ids, now))
    }

    async fn mark_outbox_failed(&self, id: i64, error: &str) -> Result<(), StoreError> {
        write!(self, |c| mark_failed(c, id, error))
    }

    async fn outbox_backlog(&self, now: DateTime<Utc>) -> Result<OutboxBacklog, StoreError> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS pending, COUNT(*) FILTER (WHERE last_try_failed) AS failed, \
               (SELECT last_error FROM outbox WHERE sent_at IS NULL AND last_error IS NOT NULL \
                ORDER BY id DESC LIMIT 1) AS last_error \
             FROM outbox WHERE sent_at IS NULL AND (not_before IS NULL OR not_before <= $1)",
        )
        .bind(ms(now))
        .fetch_one(self.pool())
        .await
        .map_err(store_db)?;
        let pending: i64 = col(&row, "pending")?;
        let failed: i64 = col(&row, "failed")?;
        Ok(OutboxBacklog {
            pending: pending.max(0) as u64,
            failed: failed.max(0) as u64,
            last_error: col(&row, "last_error")?,
        })
    }

    async fn requeue_unclaimed(&self) -> Result<u64, StoreError> {
        write!(self, |c| requeue(c))
    }

    async fn republish_unclaimed(
        &self,
        sent_before: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<Vec<RunId>, StoreError> {
        write!(self, |c| republish(c, sent_before, now))
    }
}

#[cfg(test)]
mod tests {
    use chrono::Duration;

    use super::*;
    use crate::store::postgres::{testdb, write};

    /// A publish goes out once due, stays pending through a failure, is done once sent,
    /// pending again when the queue lost it, and dropped when its run no longer wants it.
    #[tokio::test]
    async fn a_publish_is_pending_until_sent_or_dropped() -> Result<(), StoreError> {
        let (store, _db) = testdb::open().await;
        let now = Utc::now();
        let (a, b) = (RunId::new(), RunId::new());
        for id in [a, b] {
            sqlx::query(
                "INSERT INTO runs (id, job, params, spec, status, created_at) \
                 VALUES ($1, 'j', '{}', '{}', 'queued', 0)",
            )
            .bind(id.to_string())
            .execute(store.pool())
            .await
            .unwrap();
        }
        let later = now + Duration::hours(1);
        write!(store, |c| enqueue(c, a, 1, now, None))?;
        write!(store, |c| enqueue(c, b, 1, now, Some(later)))?;

        let due = store.pending_outbox(10, now).await.unwrap();
        assert_eq!(due.len(), 1, "{due:?}");
        assert_eq!(
            due[0].message,
            RunMessage {
                run_id: a,
                attempt: 1
            }
        );
        assert_eq!(store.pending_outbox(10, later).await.unwrap().len(), 2);
        let id = due[0].id;
        assert!(
            store
                .pending_outbox_after(id, 10, now)
                .await
                .unwrap()
                .is_empty()
        );

        store.mark_outbox_failed(id, "down").await.unwrap();
        let backlog = store.outbox_backlog(now).await.unwrap();
        assert_eq!((backlog.pending, backlog.failed), (1, 1));
        assert_eq!(backlog.last_error.as_deref(), Some("down"));

        store.mark_outbox_sent(&[id], now).await.unwrap();
        assert_eq!(
            store.outbox_backlog(now).await.unwrap(),
            OutboxBacklog::default()
        );
        assert!(store.pending_outbox(10, now).await.unwrap().is_empty());

        let after = now + Duration::milliseconds(1);
        assert_eq!(store.republish_unclaimed(now, now).await.unwrap(), []);
        assert_eq!(store.republish_unclaimed(after, now).await.unwrap(), [a]);
        assert_eq!(store.pending_outbox(10, now).await.unwrap()[0].id, id);
        store.mark_outbox_sent(&[id], now).await.unwrap();
        assert_eq!(store.requeue_unclaimed().await.unwrap(), 1);

        write!(store, |c| drop_pending(c, a, "run cancelled", now))?;
        write!(store, |c| drop_pending(c, b, "run cancelled", now))?;
        assert!(store.pending_outbox(10, later).await.unwrap().is_empty());
        Ok(())
    }
}
