//! Reconciliation: the attempts a worker holds, adopting a container found after a
//! restart, and the worker sessions that say which process owns a worker id.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::sqlite::SqliteRow;

use super::leases::claim_for;
use super::sync::{attempt_state, sync_on};
use super::{
    SqliteStore, attempt_col, col, corrupt, db, dropped_col, from_ms, ms, run_id_col, time_col,
};
use crate::domain::ports::{
    AdoptResult, DroppedOutput, HeldAttempt, Lease, Reconciliation, RunMessage, StoreError,
};
use crate::domain::run::RunId;
use crate::domain::session::{
    self, AttemptState, OrphanVerdict, SessionDecision, SessionRenewal, SessionRequest,
    WorkerSession, decide_renewal, decide_session, may_end, session_expiry,
};

fn session_from_row(row: &SqliteRow) -> Result<WorkerSession, StoreError> {
    let pid: i64 = col(row, "pid")?;
    Ok(WorkerSession {
        worker_id: col(row, "worker_id")?,
        instance: col(row, "instance")?,
        host: col(row, "host")?,
        pid: u32::try_from(pid).map_err(|e| corrupt("pid", e))?,
        started_at: time_col(row, "started_at")?,
        expires_at: time_col(row, "expires_at")?,
        ended_at: from_ms(col(row, "ended_at")?),
    })
}

async fn read_session(
    conn: &mut sqlx::SqliteConnection,
    worker_id: &str,
) -> Result<Option<WorkerSession>, StoreError> {
    let row = sqlx::query(
        "SELECT worker_id, instance, host, pid, started_at, expires_at, ended_at \
         FROM worker_sessions WHERE worker_id = ?",
    )
    .bind(worker_id)
    .fetch_optional(&mut *conn)
    .await
    .map_err(db)?;
    row.as_ref().map(session_from_row).transpose()
}

async fn set_expiry(
    conn: &mut sqlx::SqliteConnection,
    worker_id: &str,
    expires_at: DateTime<Utc>,
) -> Result<(), StoreError> {
    sqlx::query("UPDATE worker_sessions SET expires_at = ? WHERE worker_id = ?")
        .bind(ms(expires_at))
        .bind(worker_id)
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    Ok(())
}

#[async_trait]
impl Reconciliation for SqliteStore {
    async fn held_attempts(&self, worker_id: &str) -> Result<Vec<HeldAttempt>, StoreError> {
        let rows = sqlx::query(
            "SELECT run_id, attempt, epoch, container_id FROM attempts WHERE worker_id = ? AND status = 'running'",
        )
        .bind(worker_id)
        .fetch_all(&self.reader)
        .await
        .map_err(db)?;
        rows.iter()
            .map(|row| {
                Ok(HeldAttempt {
                    lease: Lease {
                        run_id: run_id_col(row, "run_id")?,
                        attempt: attempt_col(row, "attempt")?,
                        epoch: col(row, "epoch")?,
                    },
                    container_id: col(row, "container_id")?,
                })
            })
            .collect()
    }

    async fn adopt(
        &self,
        run_id: RunId,
        attempt: u32,
        worker_id: &str,
        lease_ttl: Duration,
        now: DateTime<Utc>,
    ) -> Result<AdoptResult, StoreError> {
        let mut tx = self.begin_write().await?;
        let Some(held) = sync_on(&mut tx, |c| attempt_state(c, run_id, attempt)).await? else {
            return Ok(AdoptResult::Stale);
        };
        if !held.adoptable_by(worker_id) {
            return Ok(AdoptResult::Stale);
        }
        sqlx::query("UPDATE attempts SET lease_expires_at = ? WHERE run_id = ? AND attempt = ?")
            .bind(ms(now) + super::ttl_ms(lease_ttl))
            .bind(run_id.to_string())
            .bind(i64::from(attempt))
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        let message = RunMessage { run_id, attempt };
        let epoch = held.epoch;
        let claim = sync_on(&mut tx, |c| claim_for(c, message, epoch, lease_ttl)).await?;
        if !claim.spec.logs.is_durable() {
            // No engine copy of a fast-mode container's output: whatever it wrote while
            // its worker was away is gone, by an amount nobody knows. Said here, in the
            // transaction that hands the attempt back, so no adoption goes unrecorded.
            sqlx::query("UPDATE attempts SET output_gap = 1 WHERE run_id = ? AND attempt = ?")
                .bind(run_id.to_string())
                .bind(i64::from(attempt))
                .execute(&mut *tx)
                .await
                .map_err(db)?;
            sqlx::query("UPDATE runs SET output_gap = 1 WHERE id = ?")
                .bind(run_id.to_string())
                .execute(&mut *tx)
                .await
                .map_err(db)?;
        }
        let row = sqlx::query(
            "SELECT log_dropped_bytes, log_undelivered_bytes FROM attempts \
             WHERE run_id = ? AND attempt = ?",
        )
        .bind(run_id.to_string())
        .bind(i64::from(attempt))
        .fetch_one(&mut *tx)
        .await
        .map_err(db)?;
        let dropped = DroppedOutput {
            total: dropped_col(&row, "log_dropped_bytes")?,
            undelivered: dropped_col(&row, "log_undelivered_bytes")?,
        };
        tx.commit().await?;
        Ok(AdoptResult::Held {
            claim: Box::new(claim),
            dropped,
        })
    }

    async fn open_session(
        &self,
        request: &SessionRequest,
        ttl: Duration,
        now: DateTime<Utc>,
    ) -> Result<SessionDecision, StoreError> {
        let mut tx = self.begin_write().await?;
        let current = read_session(&mut tx, &request.worker_id).await?;
        let decision = decide_session(current.as_ref(), request, now);
        match &decision {
            SessionDecision::Open { .. } => {
                sqlx::query(
                    "INSERT INTO worker_sessions (worker_id, instance, host, pid, started_at, expires_at, ended_at, build) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, NULL, ?7) \
                     ON CONFLICT (worker_id) DO UPDATE SET instance = ?2, host = ?3, pid = ?4, \
                       started_at = ?5, expires_at = ?6, ended_at = NULL, build = ?7",
                )
                .bind(&request.worker_id)
                .bind(&request.instance)
                .bind(&request.host)
                .bind(i64::from(request.pid))
                .bind(ms(now))
                .bind(ms(session_expiry(now, ttl)))
                .bind(&request.build)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
            }
            SessionDecision::Reopen => {
                set_expiry(&mut tx, &request.worker_id, session_expiry(now, ttl)).await?;
            }
            SessionDecision::Refuse { .. } => return Ok(decision),
        }
        tx.commit().await?;
        Ok(decision)
    }

    async fn renew_session(
        &self,
        worker_id: &str,
        instance: &str,
        ttl: Duration,
        now: DateTime<Utc>,
    ) -> Result<SessionRenewal, StoreError> {
        let mut tx = self.begin_write().await?;
        let current = read_session(&mut tx, worker_id).await?;
        let renewal = decide_renewal(current.as_ref(), instance);
        if renewal == SessionRenewal::Renewed {
            set_expiry(&mut tx, worker_id, session_expiry(now, ttl)).await?;
            tx.commit().await?;
        }
        Ok(renewal)
    }

    async fn end_session(
        &self,
        worker_id: &str,
        instance: &str,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        let current = read_session(&mut tx, worker_id).await?;
        if may_end(current.as_ref(), instance) {
            sqlx::query("UPDATE worker_sessions SET ended_at = ? WHERE worker_id = ?")
                .bind(ms(now))
                .bind(worker_id)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
            tx.commit().await?;
        }
        Ok(())
    }

    async fn session(&self, worker_id: &str) -> Result<Option<WorkerSession>, StoreError> {
        let mut conn = self.reader.acquire().await.map_err(db)?;
        read_session(&mut conn, worker_id).await
    }

    async fn orphan_verdict(
        &self,
        run_id: RunId,
        attempt: u32,
        worker_id: &str,
        now: DateTime<Utc>,
    ) -> Result<OrphanVerdict, StoreError> {
        // One read transaction: the attempt and the session seen at the same instant.
        let mut tx = self.reader.begin().await.map_err(db)?;
        let state = match sync_on(&mut tx, |c| attempt_state(c, run_id, attempt)).await? {
            None => AttemptState::Unknown,
            Some(a) if a.running_under(worker_id) => AttemptState::Running,
            Some(_) => AttemptState::Over,
        };
        let owner = read_session(&mut tx, worker_id).await?;
        tx.rollback().await.map_err(db)?;
        Ok(session::orphan_verdict(state, owner.as_ref(), now))
    }
}
