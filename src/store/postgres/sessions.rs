//! Reconciliation: the attempts a worker holds, adopting a container found after a
//! restart, and the worker sessions that say which process owns a worker id.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use sqlx::postgres::PgRow;

use super::leases::claim_for;
use super::{
    PgStore, Tx, TxError, attempt_col, attempt_state, col, db, dropped_col, run_id_col, store_db,
    time_col, write,
};
use crate::domain::ports::{
    AdoptResult, DroppedOutput, HeldAttempt, Lease, Reconciliation, RunMessage, StoreError,
};
use crate::domain::run::RunId;
use crate::domain::session::{
    self, AttemptState, OrphanVerdict, SessionDecision, SessionRenewal, SessionRequest,
    WorkerSession, decide_renewal, decide_session, may_end, session_expiry,
};
use crate::store::common::{corrupt, from_ms, ms, ttl_ms};

fn session_from_row(row: &PgRow) -> Result<WorkerSession, StoreError> {
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

async fn read_session(c: &mut PgConnection, worker_id: &str) -> Tx<Option<WorkerSession>> {
    let row = sqlx::query(
        "SELECT worker_id, instance, host, pid, started_at, expires_at, ended_at \
         FROM worker_sessions WHERE worker_id = $1",
    )
    .bind(worker_id)
    .fetch_optional(&mut *c)
    .await
    .map_err(db)?;
    Ok(row.as_ref().map(session_from_row).transpose()?)
}

async fn set_expiry(c: &mut PgConnection, worker_id: &str, expires_at: DateTime<Utc>) -> Tx<()> {
    sqlx::query("UPDATE worker_sessions SET expires_at = $1 WHERE worker_id = $2")
        .bind(ms(expires_at))
        .bind(worker_id)
        .execute(&mut *c)
        .await
        .map_err(db)?;
    Ok(())
}

/// An error of a step run outside a write operation, where nothing is run again: a
/// conflict (which a read does not meet) is the database failing.
fn in_read(e: TxError) -> StoreError {
    match e {
        TxError::Store(e) => e,
        TxError::Conflict(why) => StoreError::Unavailable(why),
    }
}

async fn adopt(
    c: &mut PgConnection,
    run_id: RunId,
    attempt: u32,
    worker_id: &str,
    lease_ttl: Duration,
    now: DateTime<Utc>,
) -> Tx<AdoptResult> {
    let Some(held) = attempt_state(c, run_id, attempt).await? else {
        return Ok(AdoptResult::Stale);
    };
    if !held.adoptable_by(worker_id) {
        return Ok(AdoptResult::Stale);
    }
    sqlx::query("UPDATE attempts SET lease_expires_at = $1 WHERE run_id = $2 AND attempt = $3")
        .bind(ms(now) + ttl_ms(lease_ttl))
        .bind(run_id.to_string())
        .bind(i64::from(attempt))
        .execute(&mut *c)
        .await
        .map_err(db)?;
    let message = RunMessage { run_id, attempt };
    let claim = claim_for(c, message, held.epoch, lease_ttl).await?;
    if !claim.spec.logs.is_durable() {
        // No engine copy of a fast-mode container's output: whatever it wrote while
        // its worker was away is gone, by an amount nobody knows. Said here, in the
        // transaction that hands the attempt back, so no adoption goes unrecorded.
        sqlx::query("UPDATE attempts SET output_gap = TRUE WHERE run_id = $1 AND attempt = $2")
            .bind(run_id.to_string())
            .bind(i64::from(attempt))
            .execute(&mut *c)
            .await
            .map_err(db)?;
        sqlx::query("UPDATE runs SET output_gap = TRUE WHERE id = $1")
            .bind(run_id.to_string())
            .execute(&mut *c)
            .await
            .map_err(db)?;
    }
    let row = sqlx::query(
        "SELECT log_dropped_bytes, log_undelivered_bytes FROM attempts \
         WHERE run_id = $1 AND attempt = $2",
    )
    .bind(run_id.to_string())
    .bind(i64::from(attempt))
    .fetch_one(&mut *c)
    .await
    .map_err(db)?;
    let dropped = DroppedOutput {
        total: dropped_col(&row, "log_dropped_bytes")?,
        undelivered: dropped_col(&row, "log_undelivered_bytes")?,
    };
    Ok(AdoptResult::Held {
        claim: Box::new(claim),
        dropped,
    })
}

async fn open_session(
    c: &mut PgConnection,
    request: &SessionRequest,
    ttl: Duration,
    now: DateTime<Utc>,
) -> Tx<SessionDecision> {
    let current = read_session(c, &request.worker_id).await?;
    let decision = decide_session(current.as_ref(), request, now);
    match &decision {
        SessionDecision::Open { .. } => {
            sqlx::query(
                "INSERT INTO worker_sessions (worker_id, instance, host, pid, started_at, \
                 expires_at, ended_at, build) VALUES ($1, $2, $3, $4, $5, $6, NULL, $7) \
                 ON CONFLICT (worker_id) DO UPDATE SET instance = $2, host = $3, pid = $4, \
                 started_at = $5, expires_at = $6, ended_at = NULL, build = $7",
            )
            .bind(&request.worker_id)
            .bind(&request.instance)
            .bind(&request.host)
            .bind(i64::from(request.pid))
            .bind(ms(now))
            .bind(ms(session_expiry(now, ttl)))
            .bind(&request.build)
            .execute(&mut *c)
            .await
            .map_err(db)?;
        }
        SessionDecision::Reopen => {
            set_expiry(c, &request.worker_id, session_expiry(now, ttl)).await?;
        }
        SessionDecision::Refuse { .. } => {}
    }
    Ok(decision)
}

async fn renew_session(
    c: &mut PgConnection,
    worker_id: &str,
    instance: &str,
    ttl: Duration,
    now: DateTime<Utc>,
) -> Tx<SessionRenewal> {
    let current = read_session(c, worker_id).await?;
    let renewal = decide_renewal(current.as_ref(), instance);
    if renewal == SessionRenewal::Renewed {
        set_expiry(c, worker_id, session_expiry(now, ttl)).await?;
    }
    Ok(renewal)
}

async fn end_session(
    c: &mut PgConnection,
    worker_id: &str,
    instance: &str,
    now: DateTime<Utc>,
) -> Tx<()> {
    let current = read_session(c, worker_id).await?;
    if may_end(current.as_ref(), instance) {
        sqlx::query("UPDATE worker_sessions SET ended_at = $1 WHERE worker_id = $2")
            .bind(ms(now))
            .bind(worker_id)
            .execute(&mut *c)
            .await
            .map_err(db)?;
    }
    Ok(())
}

/// The attempt's state as an orphan check sees it, and the worker id's session.
async fn orphan_inputs(
    c: &mut PgConnection,
    run_id: RunId,
    attempt: u32,
    worker_id: &str,
) -> Tx<(AttemptState, Option<WorkerSession>)> {
    let state = match attempt_state(c, run_id, attempt).await? {
        None => AttemptState::Unknown,
        Some(a) if a.running_under(worker_id) => AttemptState::Running,
        Some(_) => AttemptState::Over,
    };
    let owner = read_session(c, worker_id).await?;
    Ok((state, owner))
}

#[async_trait]
impl Reconciliation for PgStore {
    async fn held_attempts(&self, worker_id: &str) -> Result<Vec<HeldAttempt>, StoreError> {
        let rows = sqlx::query(
            "SELECT run_id, attempt, epoch, container_id FROM attempts \
             WHERE worker_id = $1 AND status = 'running'",
        )
        .bind(worker_id)
        .fetch_all(self.pool())
        .await
        .map_err(store_db)?;
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
        write!(self, |c| adopt(
            c, run_id, attempt, worker_id, lease_ttl, now
        ))
    }

    async fn open_session(
        &self,
        request: &SessionRequest,
        ttl: Duration,
        now: DateTime<Utc>,
    ) -> Result<SessionDecision, StoreError> {
        write!(self, |c| open_session(c, request, ttl, now))
    }

    async fn renew_session(
        &self,
        worker_id: &str,
        instance: &str,
        ttl: Duration,
        now: DateTime<Utc>,
    ) -> Result<SessionRenewal, StoreError> {
        write!(self, |c| renew_session(c, worker_id, instance, ttl, now))
    }

    async fn end_session(
        &self,
        worker_id: &str,
        instance: &str,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        write!(self, |c| end_session(c, worker_id, instance, now))
    }

    async fn session(&self, worker_id: &str) -> Result<Option<WorkerSession>, StoreError> {
        let mut conn = self.pool().acquire().await.map_err(store_db)?;
        read_session(&mut conn, worker_id).await.map_err(in_read)
    }

    async fn orphan_verdict(
        &self,
        run_id: RunId,
        attempt: u32,
        worker_id: &str,
        now: DateTime<Utc>,
    ) -> Result<OrphanVerdict, StoreError> {
        // One read-only snapshot: the attempt and the session seen at the same instant
        // (REPEATABLE READ, which never conflicts when it only reads).
        let mut tx = self
            .pool()
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .map_err(store_db)?;
        let (state, owner) = orphan_inputs(&mut tx, run_id, attempt, worker_id)
            .await
            .map_err(in_read)?;
        tx.rollback().await.map_err(store_db)?;
        Ok(session::orphan_verdict(state, owner.as_ref(), now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ports::Leases;
    use crate::store::postgres::leases::tests::{claimed, queued_run};
    use crate::store::postgres::testdb;

    const TTL: Duration = Duration::from_secs(30);

    /// Now, to the millisecond the store keeps.
    fn now_ms() -> DateTime<Utc> {
        DateTime::from_timestamp_millis(Utc::now().timestamp_millis()).unwrap_or_default()
    }

    fn request(instance: &str, host: &str) -> SessionRequest {
        SessionRequest {
            worker_id: "w1".into(),
            instance: instance.into(),
            host: host.into(),
            pid: 42,
            lock_released_by: None,
            build: None,
        }
    }

    #[tokio::test]
    async fn a_session_is_stored_renewed_refused_and_ended() {
        let (store, _db) = testdb::open().await;
        let now = now_ms();
        assert_eq!(store.session("w1").await.unwrap(), None);
        let opened = store.open_session(&request("a", "h1"), TTL, now).await;
        assert_eq!(opened.unwrap(), SessionDecision::Open { previous: None });
        let stored = WorkerSession {
            worker_id: "w1".into(),
            instance: "a".into(),
            host: "h1".into(),
            pid: 42,
            started_at: now,
            expires_at: session_expiry(now, TTL),
            ended_at: None,
        };
        assert_eq!(store.session("w1").await.unwrap(), Some(stored.clone()));
        let refused = store.open_session(&request("b", "h2"), TTL, now).await;
        assert_eq!(refused.unwrap(), SessionDecision::Refuse { live: stored });
        let later = now + chrono::Duration::seconds(10);
        let renewed = store.renew_session("w1", "a", TTL, later).await.unwrap();
        assert_eq!(renewed, SessionRenewal::Renewed);
        let other = store.renew_session("w1", "b", TTL, later).await.unwrap();
        assert_eq!(other, SessionRenewal::Superseded);
        store.end_session("w1", "b", later).await.unwrap();
        let live = store.session("w1").await.unwrap().unwrap();
        assert_eq!(live.expires_at, session_expiry(later, TTL));
        assert_eq!(live.ended_at, None);
        store.end_session("w1", "a", later).await.unwrap();
        let ended = store.session("w1").await.unwrap().unwrap();
        assert_eq!(ended.ended_at, Some(later));
        let taken = store.open_session(&request("b", "h2"), TTL, later).await;
        assert_eq!(
            taken.unwrap(),
            SessionDecision::Open {
                previous: Some(ended)
            }
        );
    }

    #[tokio::test]
    async fn an_attempt_is_adopted_by_its_own_worker_and_judged_an_orphan_once_over() {
        let (store, _db) = testdb::open().await;
        let now = now_ms();
        let lease = claimed(&store, queued_run(&store).await, "w1").await;
        store.mark_started(lease, "c1", TTL, now).await.unwrap();
        store.record_undelivered(lease, 4).await.unwrap();
        let held = store.held_attempts("w1").await.unwrap();
        assert_eq!(held.len(), 1);
        assert_eq!(
            (held[0].lease, held[0].container_id.as_deref()),
            (lease, Some("c1"))
        );
        assert!(store.held_attempts("w2").await.unwrap().is_empty());

        let (id, n) = (lease.run_id, lease.attempt);
        let stale = store.adopt(id, n, "w2", TTL, now).await.unwrap();
        assert!(matches!(stale, AdoptResult::Stale));
        match store.adopt(id, n, "w1", TTL, now).await.unwrap() {
            AdoptResult::Held { claim, dropped } => {
                assert_eq!(claim.lease, lease);
                assert_eq!((dropped.total, dropped.undelivered), (4, 4));
            }
            AdoptResult::Stale => panic!("its own worker could not adopt it"),
        }
        // A durable-log attempt has no gap in its output.
        let gap: bool = sqlx::query_scalar("SELECT output_gap FROM runs WHERE id = $1")
            .bind(id.to_string())
            .fetch_one(store.pool())
            .await
            .unwrap();
        assert!(!gap);
        // Fast logs: output written while its worker was away is gone, and said so.
        let mut spec = crate::store::suite::new_run().spec;
        spec.logs = crate::domain::job::LogMode::Fast;
        let spec = serde_json::to_string(&crate::protocol::SpecV1::from(&spec)).unwrap();
        sqlx::query("UPDATE runs SET spec = $1 WHERE id = $2")
            .bind(spec)
            .bind(id.to_string())
            .execute(store.pool())
            .await
            .unwrap();
        let adopted = store.adopt(id, n, "w1", TTL, now).await.unwrap();
        assert!(matches!(adopted, AdoptResult::Held { .. }));
        let gaps: (bool, bool) = sqlx::query_as(
            "SELECT a.output_gap, r.output_gap FROM attempts a JOIN runs r ON r.id = a.run_id \
             WHERE a.run_id = $1",
        )
        .bind(id.to_string())
        .fetch_one(store.pool())
        .await
        .unwrap();
        assert_eq!(gaps, (true, true));

        store
            .open_session(&request("a", "h1"), TTL, now)
            .await
            .unwrap();
        let verdict = store.orphan_verdict(id, n, "w1", now).await.unwrap();
        assert_eq!(verdict, OrphanVerdict::Keep);
        sqlx::query("UPDATE attempts SET status = 'lost' WHERE run_id = $1")
            .bind(id.to_string())
            .execute(store.pool())
            .await
            .unwrap();
        let verdict = store.orphan_verdict(id, n, "w1", now).await.unwrap();
        assert_eq!(verdict, OrphanVerdict::Keep, "its session is still live");
        let later = now + chrono::Duration::hours(1);
        let verdict = store.orphan_verdict(id, n, "w1", later).await.unwrap();
        assert_eq!(verdict, OrphanVerdict::Remove);
        let adopted = store.adopt(id, n, "w1", TTL, later).await.unwrap();
        assert!(matches!(adopted, AdoptResult::Stale));
    }
}
