//! Replies owed to producers: written with the run and with its final state, sent by
//! the reply relay, recorded on the run.

use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::sqlite::SqliteRow;

use super::sync::{exec, run_state, sync_on};
use super::{SqliteStore, col, corrupt, db, ms, run_id_col};
use crate::domain::ports::{NewRun, StoreError};
use crate::domain::reply::{DueReply, Reply, ReplyAddress, ReplyKind, ReplyState, Requester};
use crate::domain::run::RunId;
use crate::domain::store::Replies;

/// The new run's replies, inside the accept transaction.
pub(super) fn insert_replies(conn: &rusqlite::Connection, run: &NewRun) -> Result<(), StoreError> {
    let Some(address) = &run.requester.reply_to else {
        return Ok(());
    };
    for reply in run.requester.initial_replies() {
        exec(
            conn,
            "INSERT INTO run_replies (run_id, kind, reply_to, correlation_id, state, created_at) \
             VALUES (?, ?, ?, ?, ?, ?)",
            rusqlite::params![
                run.id.to_string(),
                reply.kind.as_str(),
                &address.to,
                address.correlation_id.as_deref(),
                reply.state.as_str(),
                ms(run.created_at)
            ],
        )?;
    }
    Ok(())
}

/// The run became final: its `finished` replies are due, in the same transaction.
pub(super) fn finished_replies_due(
    conn: &rusqlite::Connection,
    run_id: RunId,
) -> Result<(), StoreError> {
    exec(
        conn,
        "UPDATE run_replies SET state = ? WHERE run_id = ? AND kind = ? AND state = ?",
        rusqlite::params![
            ReplyState::Pending.as_str(),
            run_id.to_string(),
            ReplyKind::Finished.as_str(),
            ReplyState::Waiting.as_str()
        ],
    )?;
    Ok(())
}

fn kind_col(row: &SqliteRow) -> Result<ReplyKind, StoreError> {
    let text: String = col(row, "kind")?;
    ReplyKind::parse(&text).ok_or_else(|| StoreError::Corrupt(format!("reply kind `{text}`")))
}

fn tries_col(row: &SqliteRow) -> Result<u32, StoreError> {
    let n: i64 = col(row, "tries")?;
    u32::try_from(n).map_err(|e| corrupt("reply tries", e))
}

/// The replies of these runs, oldest first.
pub(super) async fn replies_of(
    store: &SqliteStore,
    ids: &str,
) -> Result<BTreeMap<RunId, Vec<Reply>>, StoreError> {
    let rows = sqlx::query(
        "SELECT run_id, kind, reply_to, state, tries, last_error FROM run_replies \
         WHERE run_id IN (SELECT value FROM json_each(?)) ORDER BY id",
    )
    .bind(ids)
    .fetch_all(&store.reader)
    .await
    .map_err(db)?;
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

#[async_trait]
impl Replies for SqliteStore {
    async fn add_replies(
        &self,
        run_id: RunId,
        requester: &Requester,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let Some(address) = &requester.reply_to else {
            return Ok(());
        };
        let mut tx = self.begin_write().await?;
        let Some(run) = sync_on(&mut tx, |c| run_state(c, run_id)).await? else {
            return Ok(());
        };
        for reply in requester.initial_replies() {
            let state = match reply.state {
                ReplyState::Waiting if run.status.is_final() => ReplyState::Pending,
                s => s,
            };
            sqlx::query(
                "INSERT INTO run_replies (run_id, kind, reply_to, correlation_id, state, created_at) \
                 SELECT ?1, ?2, ?3, ?4, ?5, ?6 WHERE NOT EXISTS (SELECT 1 FROM run_replies \
                 WHERE run_id = ?1 AND kind = ?2 AND reply_to = ?3 AND correlation_id IS ?4)",
            )
            .bind(run_id.to_string())
            .bind(reply.kind.as_str())
            .bind(&address.to)
            .bind(address.correlation_id.as_deref())
            .bind(state.as_str())
            .bind(ms(now))
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn due_replies(
        &self,
        limit: u32,
        now: DateTime<Utc>,
    ) -> Result<Vec<DueReply>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, run_id, kind, reply_to, correlation_id, tries FROM run_replies \
             WHERE state = ? AND (next_try_at IS NULL OR next_try_at <= ?) ORDER BY id LIMIT ?",
        )
        .bind(ReplyState::Pending.as_str())
        .bind(ms(now))
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await
        .map_err(db)?;
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

    async fn reply_sent(&self, id: i64, now: DateTime<Utc>) -> Result<(), StoreError> {
        self.group
            .run(move |c| {
                exec(
                    c,
                    "UPDATE run_replies SET state = ?, tries = tries + 1, sent_at = ?, \
                     next_try_at = NULL WHERE id = ? AND state = ?",
                    rusqlite::params![
                        ReplyState::Sent.as_str(),
                        ms(now),
                        id,
                        ReplyState::Pending.as_str()
                    ],
                )
                .map(drop)
            })
            .await
    }

    async fn reply_unroutable(
        &self,
        id: i64,
        error: &str,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let error = error.to_owned();
        self.group
            .run(move |c| {
                exec(
                    c,
                    "UPDATE run_replies SET state = ?, tries = tries + 1, last_error = ?, \
                     sent_at = ?, next_try_at = NULL WHERE id = ? AND state = ?",
                    rusqlite::params![
                        ReplyState::Unroutable.as_str(),
                        error,
                        ms(now),
                        id,
                        ReplyState::Pending.as_str()
                    ],
                )
                .map(drop)
            })
            .await
    }

    async fn reply_failed(
        &self,
        id: i64,
        error: &str,
        retry_at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let error = error.to_owned();
        self.group
            .run(move |c| {
                exec(
                    c,
                    "UPDATE run_replies SET tries = tries + 1, last_error = ?, next_try_at = ? \
                     WHERE id = ? AND state = ?",
                    rusqlite::params![error, ms(retry_at), id, ReplyState::Pending.as_str()],
                )
                .map(drop)
            })
            .await
    }
}
