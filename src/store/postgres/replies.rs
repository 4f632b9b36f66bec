//! Replies owed to producers: written with the run and with its final state, sent by
//! the reply relay, recorded on the run.

use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use sqlx::postgres::PgRow;

use super::{PgStore, Tx, col, db, run_id_col, run_state, store_db, write};
use crate::domain::ports::{NewRun, StoreError};
use crate::domain::reply::{DueReply, Reply, ReplyAddress, ReplyKind, ReplyState, Requester};
use crate::domain::run::RunId;
use crate::domain::store::Replies;
use crate::store::common::{corrupt, ms};

/// The new run's replies, inside the accept transaction.
pub(super) async fn insert_replies(c: &mut PgConnection, run: &NewRun) -> Tx<()> {
    let Some(address) = &run.requester.reply_to else {
        return Ok(());
    };
    for reply in run.requester.initial_replies() {
        sqlx::query(
            "INSERT INTO run_replies (run_id, kind, reply_to, correlation_id, state, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(run.id.to_string())
        .bind(reply.kind.as_str())
        .bind(&address.to)
        .bind(address.correlation_id.as_deref())
        .bind(reply.state.as_str())
        .bind(ms(run.created_at))
        .execute(&mut *c)
        .await
        .map_err(db)?;
    }
    Ok(())
}

/// The run became final: its `finished` replies are due, in the same transaction.
pub(super) async fn finished_replies_due(c: &mut PgConnection, run_id: RunId) -> Tx<()> {
    sqlx::query("UPDATE run_replies SET state = $1 WHERE run_id = $2 AND kind = $3 AND state = $4")
        .bind(ReplyState::Pending.as_str())
        .bind(run_id.to_string())
        .bind(ReplyKind::Finished.as_str())
        .bind(ReplyState::Waiting.as_str())
        .execute(&mut *c)
        .await
        .map_err(db)?;
    Ok(())
}

fn kind_col(row: &PgRow) -> Result<ReplyKind, StoreError> {
    let text: String = col(row, "kind")?;
    ReplyKind::parse(&text).ok_or_else(|| StoreError::Corrupt(format!("reply kind `{text}`")))
}

fn tries_col(row: &PgRow) -> Result<u32, StoreError> {
    let n: i64 = col(row, "tries")?;
    u32::try_from(n).map_err(|e| corrupt("reply tries", e))
}

/// Each run's replies (`ids`: run ids as text), oldest first.
pub(super) async fn replies_of(
    store: &PgStore,
    ids: &[String],
) -> Result<BTreeMap<RunId, Vec<Reply>>, StoreError> {
    let rows = sqlx::query(
        "SELECT run_id, kind, reply_to, state, tries, last_error FROM run_replies \
         WHERE run_id = ANY($1) ORDER BY id",
    )
    .bind(ids)
    .fetch_all(store.pool())
    .await
    .map_err(store_db)?;
    let mut by_run: BTreeMap<RunId, Vec<Reply>> = BTreeMap::new();
    for row in &rows {
        let state: String = col(row, "state")?;
        let reply = Reply {
            to: col(row, "reply_to")?,
            kind: kind_col(row)?,
            state: ReplyState::parse(&state)
                .ok_or_else(|| StoreError::Corrupt(format!("reply state `{state}`")))?,
            tries: tries_col(row)?,
            last_error: col(row, "last_error")?,
        };
        by_run
            .entry(run_id_col(row, "run_id")?)
            .or_default()
            .push(reply);
    }
    Ok(by_run)
}

/// `add_replies`'s transaction.
async fn add(
    c: &mut PgConnection,
    run_id: RunId,
    requester: &Requester,
    address: &ReplyAddress,
    now: DateTime<Utc>,
) -> Tx<()> {
    let Some(run) = run_state(&mut *c, run_id).await? else {
        return Ok(());
    };
    for reply in requester.initial_replies() {
        let state = match reply.state {
            ReplyState::Waiting if run.status.is_final() => ReplyState::Pending,
            s => s,
        };
        sqlx::query(
            "INSERT INTO run_replies (run_id, kind, reply_to, correlation_id, state, created_at) \
             SELECT $1, $2, $3, $4, $5, $6 WHERE NOT EXISTS (SELECT 1 FROM run_replies \
             WHERE run_id = $1 AND kind = $2 AND reply_to = $3 \
             AND correlation_id IS NOT DISTINCT FROM $4)",
        )
        .bind(run_id.to_string())
        .bind(reply.kind.as_str())
        .bind(&address.to)
        .bind(address.correlation_id.as_deref())
        .bind(state.as_str())
        .bind(ms(now))
        .execute(&mut *c)
        .await
        .map_err(db)?;
    }
    Ok(())
}

/// Set a pending reply's outcome: one statement, its own transaction.
async fn settle(c: &mut PgConnection, id: i64, outcome: Settled<'_>) -> Tx<()> {
    let pending = ReplyState::Pending.as_str();
    let query = match outcome {
        Settled::Sent { at } => sqlx::query(
            "UPDATE run_replies SET state = $1, tries = tries + 1, sent_at = $2, \
             next_try_at = NULL WHERE id = $3 AND state = $4",
        )
        .bind(ReplyState::Sent.as_str())
        .bind(ms(at))
        .bind(id)
        .bind(pending),
        Settled::Unroutable { error, at } => sqlx::query(
            "UPDATE run_replies SET state = $1, tries = tries + 1, last_error = $2, \
             sent_at = $3, next_try_at = NULL WHERE id = $4 AND state = $5",
        )
        .bind(ReplyState::Unroutable.as_str())
        .bind(error)
        .bind(ms(at))
        .bind(id)
        .bind(pending),
        Settled::Failed { error, retry_at } => sqlx::query(
            "UPDATE run_replies SET tries = tries + 1, last_error = $1, next_try_at = $2 \
             WHERE id = $3 AND state = $4",
        )
        .bind(error)
        .bind(ms(retry_at))
        .bind(id)
        .bind(pending),
    };
    query.execute(&mut *c).await.map_err(db)?;
    Ok(())
}

/// What became of a try to send a reply.
#[derive(Clone, Copy)]
enum Settled<'a> {
    Sent {
        at: DateTime<Utc>,
    },
    Unroutable {
        error: &'a str,
        at: DateTime<Utc>,
    },
    Failed {
        error: &'a str,
        retry_at: DateTime<Utc>,
    },
}

#[async_trait]
impl Replies for PgStore {
    async fn add_replies(
        &self,
        run_id: RunId,
        requester: &Requester,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let Some(address) = &requester.reply_to else {
            return Ok(());
        };
        write!(self, |c| add(c, run_id, requester, address, now))
    }

    async fn due_replies(
        &self,
        limit: u32,
        now: DateTime<Utc>,
    ) -> Result<Vec<DueReply>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, run_id, kind, reply_to, correlation_id, tries FROM run_replies \
             WHERE state = $1 AND (next_try_at IS NULL OR next_try_at <= $2) ORDER BY id LIMIT $3",
        )
        .bind(ReplyState::Pending.as_str())
        .bind(ms(now))
        .bind(i64::from(limit))
        .fetch_all(self.pool())
        .await
        .map_err(store_db)?;
        rows.iter()
            .map(|row| {
                Ok(DueReply {
                    id: col(row, "id")?,
                    run_id: run_id_col(row, "run_id")?,
                    kind: kind_col(row)?,
                    address: ReplyAddress {
                        to: col(row, "reply_to")?,
                        correlation_id: col(row, "correlation_id")?,
                    },
                    tries: tries_col(row)?,
                })
            })
            .collect()
    }

    /// One statement, outside any SERIALIZABLE transaction: the replies taken are due
    /// again only at `now + hold` (or once recorded), and `FOR UPDATE SKIP LOCKED`
    /// passes over those another relay is taking this instant.
    async fn claim_replies(
        &self,
        limit: u32,
        now: DateTime<Utc>,
        hold: std::time::Duration,
    ) -> Result<Vec<DueReply>, StoreError> {
        let rows = sqlx::query(
            "UPDATE run_replies SET next_try_at = $4 WHERE id IN (\
               SELECT id FROM run_replies \
               WHERE state = $1 AND (next_try_at IS NULL OR next_try_at <= $2) \
               ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED) \
             RETURNING id, run_id, kind, reply_to, correlation_id, tries",
        )
        .bind(ReplyState::Pending.as_str())
        .bind(ms(now))
        .bind(i64::from(limit))
        .bind(ms(now).saturating_add(super::super::common::ttl_ms(hold)))
        .fetch_all(self.pool())
        .await
        .map_err(store_db)?;
        let mut due = rows
            .iter()
            .map(|row| {
                Ok(DueReply {
                    id: col(row, "id")?,
                    run_id: run_id_col(row, "run_id")?,
                    kind: kind_col(row)?,
                    address: ReplyAddress {
                        to: col(row, "reply_to")?,
                        correlation_id: col(row, "correlation_id")?,
                    },
                    tries: tries_col(row)?,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        due.sort_by_key(|d| d.id);
        Ok(due)
    }

    async fn reply_sent(&self, id: i64, now: DateTime<Utc>) -> Result<(), StoreError> {
        write!(self, |c| settle(c, id, Settled::Sent { at: now }))
    }

    async fn reply_unroutable(
        &self,
        id: i64,
        error: &str,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        write!(self, |c| settle(
            c,
            id,
            Settled::Unroutable { error, at: now }
        ))
    }

    async fn reply_failed(
        &self,
        id: i64,
        error: &str,
        retry_at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        write!(self, |c| settle(c, id, Settled::Failed { error, retry_at }))
    }
}
