//! Attempts, claims and leases, and `settle`: the one place an ended attempt makes its
//! run final or queues the next attempt. Every change reads the rows inside the write
//! transaction, asks `domain::transition`, and writes the answer.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::outbox::enqueue;
use super::runs::end_run;
use super::sync::sync_on;
use super::{
    SqliteStore, attempt_col, attempt_state, col, corrupt, db, ms, run_id_col, run_state, ttl_ms,
};
use crate::domain::job::ResolvedSpec;
use crate::domain::ports::{
    Claim, ClaimResult, Lease, LeaseStatus, Leases, RunMessage, StoreError,
};
use crate::domain::retry::RetryPolicy;
use crate::domain::run::{Outcome, ResourceUsage, RunId};
use crate::domain::secret::ClaimSecrets;
use crate::domain::transition::{self, Ending, Released, RunState, Settlement};
use crate::protocol::{RetryV1, SpecV1};

/// The claim a worker gets for `message` under `epoch`: the run's job and frozen spec.
pub(super) async fn claim_for(
    conn: &mut sqlx::SqliteConnection,
    message: RunMessage,
    epoch: i64,
    lease_ttl: Duration,
) -> Result<Claim, StoreError> {
    let id = message.run_id;
    let row = sqlx::query("SELECT job, spec FROM runs WHERE id = ?")
        .bind(id.to_string())
        .fetch_one(&mut *conn)
        .await
        .map_err(db)?;
    let spec: String = col(&row, "spec")?;
    let spec: SpecV1 =
        serde_json::from_str(&spec).map_err(|e| corrupt(&format!("spec of run {id}"), e))?;
    let spec =
        ResolvedSpec::try_from(spec).map_err(|e| corrupt(&format!("spec of run {id}"), e))?;
    Ok(Claim {
        lease: Lease {
            run_id: id,
            attempt: message.attempt,
            epoch,
        },
        job: col(&row, "job")?,
        spec,
        lease_ttl,
        secrets: ClaimSecrets::default(),
    })
}

/// Push the attempt's lease out to `now + lease_ttl`.
async fn extend_lease(
    conn: &mut sqlx::SqliteConnection,
    run_id: RunId,
    attempt: u32,
    lease_ttl: Duration,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    sqlx::query("UPDATE attempts SET lease_expires_at = ? WHERE run_id = ? AND attempt = ?")
        .bind(ms(now) + ttl_ms(lease_ttl))
        .bind(run_id.to_string())
        .bind(i64::from(attempt))
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    Ok(())
}

/// The run of an attempt the caller just read: there must be one (foreign key).
async fn run_of(conn: &mut sqlx::SqliteConnection, run_id: RunId) -> Result<RunState, StoreError> {
    run_state(conn, run_id)
        .await?
        .ok_or_else(|| corrupt("attempt", format!("run {run_id} is missing")))
}

/// After an attempt ended: make the run final, or queue its next attempt when its retry
/// rules say so (never after a cancel). Runs inside the caller's transaction.
async fn settle(
    conn: &mut sqlx::SqliteConnection,
    run_id: RunId,
    attempt: u32,
    ending: &Ending,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let row = sqlx::query("SELECT retry, cancel_requested FROM runs WHERE id = ?")
        .bind(run_id.to_string())
        .fetch_one(&mut *conn)
        .await
        .map_err(db)?;
    let retry: Option<String> = col(&row, "retry")?;
    let cancel_requested = col::<i64>(&row, "cancel_requested")? != 0;
    let policy = match retry {
        None => RetryPolicy::default(),
        Some(text) => serde_json::from_str::<RetryV1>(&text)
            .map_err(|e| e.to_string())
            .and_then(RetryPolicy::try_from)
            .map_err(|e| corrupt(&format!("retry rules of run {run_id}"), e))?,
    };
    let jitter = rand::random::<f64>();
    match transition::settle(&policy, cancel_requested, attempt, ending, jitter, now) {
        Settlement::Next {
            attempt,
            not_before,
        } => {
            sqlx::query(
                "UPDATE runs SET status = 'queued', not_before = ?, exit_code = NULL, reason = NULL, \
                 reason_code = NULL, finished_at = NULL WHERE id = ?",
            )
            .bind(ms(not_before))
            .bind(run_id.to_string())
            .execute(&mut *conn)
            .await
            .map_err(db)?;
            sync_on(conn, |c| enqueue(c, run_id, attempt, now, Some(not_before))).await
        }
        Settlement::Final => end_run(conn, run_id, ending, now).await,
    }
}

/// Record how the attempt ended (the run is left to `settle`).
async fn end_attempt(
    conn: &mut sqlx::SqliteConnection,
    run_id: RunId,
    attempt: u32,
    ending: &Ending,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE attempts SET status = ?, exit_code = ?, reason = ?, reason_code = ?, finished_at = ? \
         WHERE run_id = ? AND attempt = ?",
    )
    .bind(ending.status.as_str())
    .bind(ending.exit_code)
    .bind(ending.reason.as_deref())
    .bind(ending.reason_code.map(|c| c.as_str()))
    .bind(ms(now))
    .bind(run_id.to_string())
    .bind(i64::from(attempt))
    .execute(&mut *conn)
    .await
    .map_err(db)?;
    Ok(())
}

/// Keep what the attempt's container used (nothing to keep: the columns stay NULL).
async fn keep_usage(
    conn: &mut sqlx::SqliteConnection,
    lease: Lease,
    usage: Option<ResourceUsage>,
) -> Result<(), StoreError> {
    let Some(u) = usage else {
        return Ok(());
    };
    let bytes = |b: u64| i64::try_from(b).unwrap_or(i64::MAX);
    sqlx::query(
        "UPDATE attempts SET usage_samples = ?, usage_peak_memory_bytes = ?, \
         usage_cpu_seconds = ?, usage_memory_limit_bytes = ?, usage_cpu_limit = ? \
         WHERE run_id = ? AND attempt = ?",
    )
    .bind(i64::from(u.samples))
    .bind(bytes(u.peak_memory_bytes))
    .bind(u.cpu_seconds)
    .bind(u.memory_limit_bytes.map(bytes))
    .bind(u.cpu_limit)
    .bind(lease.run_id.to_string())
    .bind(i64::from(lease.attempt))
    .execute(&mut *conn)
    .await
    .map_err(db)?;
    Ok(())
}

/// Count output that never reached the log sink, on the attempt and on its run.
async fn count_dropped(
    conn: &mut sqlx::SqliteConnection,
    lease: Lease,
    bytes: i64,
) -> Result<(), StoreError> {
    let id = lease.run_id.to_string();
    sqlx::query(
        "UPDATE attempts SET log_dropped_bytes = log_dropped_bytes + ? WHERE run_id = ? AND attempt = ?",
    )
    .bind(bytes)
    .bind(&id)
    .bind(i64::from(lease.attempt))
    .execute(&mut *conn)
    .await
    .map_err(db)?;
    sqlx::query("UPDATE runs SET log_dropped_bytes = log_dropped_bytes + ? WHERE id = ?")
        .bind(bytes)
        .bind(&id)
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    Ok(())
}

/// The worker reports `reported` bytes undelivered, all told: the attempt's recorded
/// total rises to it, never falls, and only the rise is counted as dropped, so a byte
/// reported with every later batch and again at finish counts once.
async fn raise_undelivered(
    conn: &mut sqlx::SqliteConnection,
    lease: Lease,
    reported: u64,
) -> Result<(), StoreError> {
    let recorded: Option<i64> = sqlx::query_scalar(
        "SELECT log_undelivered_bytes FROM attempts WHERE run_id = ? AND attempt = ?",
    )
    .bind(lease.run_id.to_string())
    .bind(i64::from(lease.attempt))
    .fetch_optional(&mut *conn)
    .await
    .map_err(db)?;
    let Some(recorded) = recorded else {
        return Ok(());
    };
    let reported = i64::try_from(reported).unwrap_or(i64::MAX);
    if reported <= recorded {
        return Ok(());
    }
    sqlx::query("UPDATE attempts SET log_undelivered_bytes = ? WHERE run_id = ? AND attempt = ?")
        .bind(reported)
        .bind(lease.run_id.to_string())
        .bind(i64::from(lease.attempt))
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    count_dropped(conn, lease, reported - recorded).await
}

#[async_trait]
impl Leases for SqliteStore {
    async fn claim(
        &self,
        message: RunMessage,
        worker_id: &str,
        lease_ttl: Duration,
        now: DateTime<Utc>,
    ) -> Result<ClaimResult, StoreError> {
        let id = message.run_id;
        let mut tx = self.begin_write().await?;
        let Some(run) = run_state(&mut tx, id).await? else {
            return Ok(ClaimResult::UnknownRun);
        };
        if run.may_claim(message.attempt, now) {
            let epoch: i64 = sqlx::query_scalar(
                "UPDATE runs SET status = 'running', attempt = ?, epoch = epoch + 1 WHERE id = ? \
                 RETURNING epoch",
            )
            .bind(i64::from(message.attempt))
            .bind(id.to_string())
            .fetch_one(&mut *tx)
            .await
            .map_err(db)?;
            sqlx::query(
                "INSERT INTO attempts (run_id, attempt, worker_id, epoch, lease_expires_at, status, claimed_at) \
                 VALUES (?, ?, ?, ?, ?, 'running', ?)",
            )
            .bind(id.to_string())
            .bind(i64::from(message.attempt))
            .bind(worker_id)
            .bind(epoch)
            .bind(ms(now) + ttl_ms(lease_ttl))
            .bind(ms(now))
            .execute(&mut *tx)
            .await
            .map_err(db)?;
            let claim = claim_for(&mut tx, message, epoch, lease_ttl).await?;
            tx.commit().await?;
            return Ok(ClaimResult::Claimed(Box::new(claim)));
        }
        if let Some(held) = attempt_state(&mut tx, id, message.attempt).await?
            && held.reclaimable_by(worker_id)
        {
            extend_lease(&mut tx, id, message.attempt, lease_ttl, now).await?;
            let claim = claim_for(&mut tx, message, held.epoch, lease_ttl).await?;
            tx.commit().await?;
            return Ok(ClaimResult::Claimed(Box::new(claim)));
        }
        Ok(ClaimResult::NotClaimable {
            status: run.status,
            attempt: run.attempt,
        })
    }

    async fn mark_started(
        &self,
        lease: Lease,
        container_id: &str,
        lease_ttl: Duration,
        now: DateTime<Utc>,
    ) -> Result<LeaseStatus, StoreError> {
        let id = lease.run_id;
        let mut tx = self.begin_write().await?;
        let held = attempt_state(&mut tx, id, lease.attempt).await?;
        if !held.is_some_and(|a| a.held_under(lease)) {
            return Ok(LeaseStatus::Lost);
        }
        sqlx::query(
            "UPDATE attempts SET container_id = ?, started_at = ?, lease_expires_at = ? \
             WHERE run_id = ? AND attempt = ?",
        )
        .bind(container_id)
        .bind(ms(now))
        .bind(ms(now) + ttl_ms(lease_ttl))
        .bind(id.to_string())
        .bind(i64::from(lease.attempt))
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        sqlx::query("UPDATE runs SET started_at = ? WHERE id = ?")
            .bind(ms(now))
            .bind(id.to_string())
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        let run = run_of(&mut tx, id).await?;
        tx.commit().await?;
        Ok(LeaseStatus::Held {
            cancel: run.cancel_requested,
        })
    }

    async fn renew_lease(
        &self,
        lease: Lease,
        lease_ttl: Duration,
        now: DateTime<Utc>,
    ) -> Result<LeaseStatus, StoreError> {
        let id = lease.run_id;
        let mut tx = self.begin_write().await?;
        let held = attempt_state(&mut tx, id, lease.attempt).await?;
        if !held.is_some_and(|a| a.held_under(lease)) {
            return Ok(LeaseStatus::Lost);
        }
        extend_lease(&mut tx, id, lease.attempt, lease_ttl, now).await?;
        let run = run_of(&mut tx, id).await?;
        tx.commit().await?;
        Ok(LeaseStatus::Held {
            cancel: run.cancel_requested,
        })
    }

    async fn finish(
        &self,
        lease: Lease,
        outcome: &Outcome,
        undelivered: u64,
        usage: Option<ResourceUsage>,
        now: DateTime<Utc>,
    ) -> Result<LeaseStatus, StoreError> {
        let ending = Ending::of(outcome);
        let mut tx = self.begin_write().await?;
        let held = attempt_state(&mut tx, lease.run_id, lease.attempt).await?;
        if !held.is_some_and(|a| a.held_under(lease)) {
            return Ok(LeaseStatus::Lost);
        }
        end_attempt(&mut tx, lease.run_id, lease.attempt, &ending, now).await?;
        raise_undelivered(&mut tx, lease, undelivered).await?;
        keep_usage(&mut tx, lease, usage).await?;
        settle(&mut tx, lease.run_id, lease.attempt, &ending, now).await?;
        tx.commit().await?;
        Ok(LeaseStatus::Held { cancel: false })
    }

    async fn lease_is_current(&self, lease: Lease) -> Result<bool, StoreError> {
        let found: Option<i64> = sqlx::query_scalar(
            "SELECT 1 FROM attempts WHERE run_id = ? AND attempt = ? AND epoch = ?",
        )
        .bind(lease.run_id.to_string())
        .bind(i64::from(lease.attempt))
        .bind(lease.epoch)
        .fetch_optional(&self.reader)
        .await
        .map_err(db)?;
        Ok(found.is_some())
    }

    async fn add_log_dropped(&self, lease: Lease, bytes: u64) -> Result<(), StoreError> {
        let bytes = i64::try_from(bytes).unwrap_or(i64::MAX);
        let mut tx = self.begin_write().await?;
        // Output is counted under any current epoch, final or not: it belongs to the
        // attempt whose epoch it carries.
        let current = attempt_state(&mut tx, lease.run_id, lease.attempt).await?;
        if current.is_some_and(|a| a.epoch == lease.epoch) {
            count_dropped(&mut tx, lease, bytes).await?;
        }
        tx.commit().await
    }

    async fn record_undelivered(&self, lease: Lease, bytes: u64) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        let current = attempt_state(&mut tx, lease.run_id, lease.attempt).await?;
        if current.is_some_and(|a| a.epoch == lease.epoch) {
            raise_undelivered(&mut tx, lease, bytes).await?;
        }
        tx.commit().await
    }

    async fn expire_leases(&self, now: DateTime<Utc>) -> Result<Vec<RunId>, StoreError> {
        // Candidates only: each is read again and decided inside its own transaction,
        // since a heartbeat may have renewed it meanwhile.
        let candidates = sqlx::query(
            "SELECT run_id, attempt FROM attempts \
             WHERE status = 'running' AND lease_expires_at < ? LIMIT 256",
        )
        .bind(ms(now))
        .fetch_all(&self.reader)
        .await
        .map_err(db)?;
        let mut changed = Vec::new();
        for row in &candidates {
            let run_id = run_id_col(row, "run_id")?;
            let attempt = attempt_col(row, "attempt")?;
            let mut tx = self.begin_write().await?;
            let Some(expired) = attempt_state(&mut tx, run_id, attempt).await? else {
                continue;
            };
            if !expired.lease_expired(now) {
                continue;
            }
            // The run may have moved on (a person's retry): then only the attempt ends.
            let run = run_state(&mut tx, run_id)
                .await?
                .filter(|r| r.runs_attempt(attempt));
            let ending = expired.expired_ending(run.is_some_and(|r| r.cancel_requested));
            end_attempt(&mut tx, run_id, attempt, &ending, now).await?;
            if run.is_some() {
                settle(&mut tx, run_id, attempt, &ending, now).await?;
                changed.push(run_id);
            }
            tx.commit().await?;
        }
        Ok(changed)
    }

    async fn release(&self, lease: Lease, now: DateTime<Utc>) -> Result<LeaseStatus, StoreError> {
        let id = lease.run_id;
        let mut tx = self.begin_write().await?;
        let held = attempt_state(&mut tx, id, lease.attempt).await?;
        if !held.is_some_and(|a| a.releasable_under(lease)) {
            return Ok(LeaseStatus::Lost);
        }
        sqlx::query("DELETE FROM attempts WHERE run_id = ? AND attempt = ?")
            .bind(id.to_string())
            .bind(i64::from(lease.attempt))
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        let released = run_of(&mut tx, id).await?.release(lease.attempt);
        if let Some(released) = &released {
            // As if never claimed: the attempt number is free again, and the epoch moves
            // on so nothing written under the old lease counts.
            sqlx::query("UPDATE runs SET attempt = ?, epoch = epoch + 1 WHERE id = ?")
                .bind(i64::from(lease.attempt.saturating_sub(1)))
                .bind(id.to_string())
                .execute(&mut *tx)
                .await
                .map_err(db)?;
            match released {
                Released::Requeued => {
                    sqlx::query(
                        "UPDATE runs SET status = 'queued', reason = NULL, reason_code = NULL, \
                         finished_at = NULL WHERE id = ?",
                    )
                    .bind(id.to_string())
                    .execute(&mut *tx)
                    .await
                    .map_err(db)?;
                    let attempt = lease.attempt;
                    sync_on(&mut tx, |c| enqueue(c, id, attempt, now, None)).await?;
                }
                Released::Cancelled(ending) => end_run(&mut tx, id, ending, now).await?,
            }
        }
        tx.commit().await?;
        Ok(LeaseStatus::Held { cancel: false })
    }
}
