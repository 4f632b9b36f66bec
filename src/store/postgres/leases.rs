//! Attempts, claims and leases, and `settle`: the one place an ended attempt makes its
//! run final or queues the next attempt. Every change reads the rows inside the write
//! transaction, asks `domain::transition`, and writes the answer. Each operation is one
//! SERIALIZABLE transaction (see `write!`): these are the writes every run makes
//! several of.

use crate::store::common::{claim_of, retry_policy_of};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::outbox::enqueue;
use super::runs::end_run;
use super::{
    PgStore, Tx, attempt_col, attempt_state, col, db, run_id_col, run_state, store_db, write,
};
use crate::domain::ports::{
    Claim, ClaimResult, Lease, LeaseStatus, Leases, RunMessage, StoreError,
};
use crate::domain::run::{Outcome, ResourceUsage, RunId};
use crate::domain::transition::{self, Ending, Released, RunState, Settlement};
use crate::store::common::{corrupt, ms, ttl_ms};

/// The claim a worker gets for `message` under `epoch`: the run's job and frozen spec.
pub(super) async fn claim_for(
    c: &mut PgConnection,
    message: RunMessage,
    epoch: i64,
    lease_ttl: Duration,
) -> Tx<Claim> {
    let id = message.run_id;
    let row = sqlx::query("SELECT job, spec FROM runs WHERE id = $1")
        .bind(id.to_string())
        .fetch_optional(&mut *c)
        .await
        .map_err(db)?
        .ok_or_else(|| corrupt("attempt", format!("run {id} is missing")))?;
    let job: String = col(&row, "job")?;
    let spec: String = col(&row, "spec")?;
    Ok(claim_of(message, epoch, lease_ttl, job, &spec)?)
}

/// Push the attempt's lease out to `now + lease_ttl`.
async fn extend_lease(
    c: &mut PgConnection,
    run_id: RunId,
    attempt: u32,
    lease_ttl: Duration,
    now: DateTime<Utc>,
) -> Tx<()> {
    sqlx::query("UPDATE attempts SET lease_expires_at = $1 WHERE run_id = $2 AND attempt = $3")
        .bind(ms(now) + ttl_ms(lease_ttl))
        .bind(run_id.to_string())
        .bind(i64::from(attempt))
        .execute(&mut *c)
        .await
        .map_err(db)?;
    Ok(())
}

/// The run of an attempt the caller just read: there must be one (foreign key).
async fn run_of(c: &mut PgConnection, run_id: RunId) -> Tx<RunState> {
    Ok(run_state(c, run_id)
        .await?
        .ok_or_else(|| corrupt("attempt", format!("run {run_id} is missing")))?)
}

/// After an attempt ended: make the run final, or queue its next attempt when its retry
/// rules say so (never after a cancel). Runs inside the caller's transaction.
async fn settle(
    c: &mut PgConnection,
    run_id: RunId,
    attempt: u32,
    ending: &Ending,
    now: DateTime<Utc>,
) -> Tx<()> {
    let row = sqlx::query("SELECT retry, cancel_requested FROM runs WHERE id = $1")
        .bind(run_id.to_string())
        .fetch_optional(&mut *c)
        .await
        .map_err(db)?
        .ok_or_else(|| corrupt("attempt", format!("run {run_id} is missing")))?;
    let retry: Option<String> = col(&row, "retry")?;
    let cancel_requested: bool = col(&row, "cancel_requested")?;
    let policy = retry_policy_of(run_id, retry.as_deref())?;
    let jitter = rand::random::<f64>();
    match transition::settle(&policy, cancel_requested, attempt, ending, jitter, now) {
        Settlement::Next {
            attempt,
            not_before,
        } => {
            sqlx::query(
                "UPDATE runs SET status = 'queued', not_before = $1, exit_code = NULL, \
                 reason = NULL, reason_code = NULL, finished_at = NULL WHERE id = $2",
            )
            .bind(ms(not_before))
            .bind(run_id.to_string())
            .execute(&mut *c)
            .await
            .map_err(db)?;
            enqueue(c, run_id, attempt, now, Some(not_before)).await
        }
        Settlement::Final => end_run(c, run_id, ending, now).await,
    }
}

/// Record how the attempt ended (the run is left to `settle`).
async fn end_attempt(
    c: &mut PgConnection,
    run_id: RunId,
    attempt: u32,
    ending: &Ending,
    now: DateTime<Utc>,
) -> Tx<()> {
    sqlx::query(
        "UPDATE attempts SET status = $1, exit_code = $2, reason = $3, reason_code = $4, \
         finished_at = $5 WHERE run_id = $6 AND attempt = $7",
    )
    .bind(ending.status.as_str())
    .bind(ending.exit_code)
    .bind(ending.reason.as_deref())
    .bind(ending.reason_code.map(|c| c.as_str()))
    .bind(ms(now))
    .bind(run_id.to_string())
    .bind(i64::from(attempt))
    .execute(&mut *c)
    .await
    .map_err(db)?;
    Ok(())
}

/// Keep what the attempt's container used (nothing to keep: the columns stay NULL).
async fn keep_usage(c: &mut PgConnection, lease: Lease, usage: Option<ResourceUsage>) -> Tx<()> {
    let Some(u) = usage else {
        return Ok(());
    };
    let bytes = |b: u64| i64::try_from(b).unwrap_or(i64::MAX);
    sqlx::query(
        "UPDATE attempts SET usage_samples = $1, usage_peak_memory_bytes = $2, \
         usage_cpu_seconds = $3, usage_memory_limit_bytes = $4, usage_cpu_limit = $5 \
         WHERE run_id = $6 AND attempt = $7",
    )
    .bind(i64::from(u.samples))
    .bind(bytes(u.peak_memory_bytes))
    .bind(u.cpu_seconds)
    .bind(u.memory_limit_bytes.map(bytes))
    .bind(u.cpu_limit)
    .bind(lease.run_id.to_string())
    .bind(i64::from(lease.attempt))
    .execute(&mut *c)
    .await
    .map_err(db)?;
    Ok(())
}

/// Count output that never reached the log sink, on the attempt and on its run.
async fn count_dropped(c: &mut PgConnection, lease: Lease, bytes: i64) -> Tx<()> {
    let id = lease.run_id.to_string();
    sqlx::query(
        "UPDATE attempts SET log_dropped_bytes = log_dropped_bytes + $1 \
         WHERE run_id = $2 AND attempt = $3",
    )
    .bind(bytes)
    .bind(&id)
    .bind(i64::from(lease.attempt))
    .execute(&mut *c)
    .await
    .map_err(db)?;
    sqlx::query("UPDATE runs SET log_dropped_bytes = log_dropped_bytes + $1 WHERE id = $2")
        .bind(bytes)
        .bind(&id)
        .execute(&mut *c)
        .await
        .map_err(db)?;
    Ok(())
}

/// The worker reports `reported` bytes undelivered, all told: the attempt's recorded
/// total rises to it, never falls, and only the rise is counted as dropped, so a byte
/// reported with every later batch and again at finish counts once.
async fn raise_undelivered(c: &mut PgConnection, lease: Lease, reported: u64) -> Tx<()> {
    let recorded: Option<i64> = sqlx::query_scalar(
        "SELECT log_undelivered_bytes FROM attempts WHERE run_id = $1 AND attempt = $2",
    )
    .bind(lease.run_id.to_string())
    .bind(i64::from(lease.attempt))
    .fetch_optional(&mut *c)
    .await
    .map_err(db)?;
    let Some(recorded) = recorded else {
        return Ok(());
    };
    let reported = i64::try_from(reported).unwrap_or(i64::MAX);
    if reported <= recorded {
        return Ok(());
    }
    sqlx::query(
        "UPDATE attempts SET log_undelivered_bytes = $1 WHERE run_id = $2 AND attempt = $3",
    )
    .bind(reported)
    .bind(lease.run_id.to_string())
    .bind(i64::from(lease.attempt))
    .execute(&mut *c)
    .await
    .map_err(db)?;
    count_dropped(c, lease, reported - recorded).await
}

/// Whether the attempt is still running under `lease` (start, heartbeat, finish).
async fn held(c: &mut PgConnection, lease: Lease) -> Tx<bool> {
    Ok(attempt_state(c, lease.run_id, lease.attempt)
        .await?
        .is_some_and(|a| a.held_under(lease)))
}

/// Whether output under `lease` is written: when the lease's epoch is the attempt's,
/// final or not, since output belongs to the attempt whose epoch it carries. Under
/// another epoch nothing is written.
async fn under_epoch(c: &mut PgConnection, lease: Lease) -> Tx<bool> {
    let current = attempt_state(c, lease.run_id, lease.attempt).await?;
    Ok(current.is_some_and(|a| a.epoch == lease.epoch))
}

async fn add_dropped(c: &mut PgConnection, lease: Lease, bytes: i64) -> Tx<()> {
    if under_epoch(c, lease).await? {
        count_dropped(c, lease, bytes).await?;
    }
    Ok(())
}

async fn record_undelivered(c: &mut PgConnection, lease: Lease, bytes: u64) -> Tx<()> {
    if under_epoch(c, lease).await? {
        raise_undelivered(c, lease, bytes).await?;
    }
    Ok(())
}

async fn claim(
    c: &mut PgConnection,
    message: RunMessage,
    worker_id: &str,
    lease_ttl: Duration,
    now: DateTime<Utc>,
) -> Tx<ClaimResult> {
    let id = message.run_id;
    let Some(run) = run_state(c, id).await? else {
        return Ok(ClaimResult::UnknownRun);
    };
    if run.may_claim(message.attempt, now) {
        let epoch: i64 = sqlx::query_scalar(
            "UPDATE runs SET status = 'running', attempt = $1, epoch = epoch + 1 WHERE id = $2 \
             RETURNING epoch",
        )
        .bind(i64::from(message.attempt))
        .bind(id.to_string())
        .fetch_optional(&mut *c)
        .await
        .map_err(db)?
        .ok_or_else(|| corrupt("run", format!("run {id} is missing")))?;
        sqlx::query(
            "INSERT INTO attempts (run_id, attempt, worker_id, epoch, lease_expires_at, status, \
             claimed_at, worker_build) VALUES ($1, $2, $3, $4, $5, 'running', $6, \
             (SELECT build FROM worker_sessions WHERE worker_id = $3))",
        )
        .bind(id.to_string())
        .bind(i64::from(message.attempt))
        .bind(worker_id)
        .bind(epoch)
        .bind(ms(now) + ttl_ms(lease_ttl))
        .bind(ms(now))
        .execute(&mut *c)
        .await
        .map_err(db)?;
        let claim = claim_for(c, message, epoch, lease_ttl).await?;
        return Ok(ClaimResult::Claimed(Box::new(claim)));
    }
    if let Some(held) = attempt_state(c, id, message.attempt).await?
        && held.reclaimable_by(worker_id)
    {
        extend_lease(c, id, message.attempt, lease_ttl, now).await?;
        let claim = claim_for(c, message, held.epoch, lease_ttl).await?;
        return Ok(ClaimResult::Claimed(Box::new(claim)));
    }
    Ok(ClaimResult::NotClaimable {
        status: run.status,
        attempt: run.attempt,
    })
}

async fn mark_started(
    c: &mut PgConnection,
    lease: Lease,
    container_id: &str,
    lease_ttl: Duration,
    now: DateTime<Utc>,
) -> Tx<LeaseStatus> {
    let id = lease.run_id;
    if !held(c, lease).await? {
        return Ok(LeaseStatus::Lost);
    }
    sqlx::query(
        "UPDATE attempts SET container_id = $1, started_at = $2, lease_expires_at = $3 \
         WHERE run_id = $4 AND attempt = $5",
    )
    .bind(container_id)
    .bind(ms(now))
    .bind(ms(now) + ttl_ms(lease_ttl))
    .bind(id.to_string())
    .bind(i64::from(lease.attempt))
    .execute(&mut *c)
    .await
    .map_err(db)?;
    sqlx::query("UPDATE runs SET started_at = $1 WHERE id = $2")
        .bind(ms(now))
        .bind(id.to_string())
        .execute(&mut *c)
        .await
        .map_err(db)?;
    let run = run_of(c, id).await?;
    Ok(LeaseStatus::Held {
        cancel: run.cancel_requested,
    })
}

async fn renew_lease(
    c: &mut PgConnection,
    lease: Lease,
    lease_ttl: Duration,
    now: DateTime<Utc>,
) -> Tx<LeaseStatus> {
    let id = lease.run_id;
    if !held(c, lease).await? {
        return Ok(LeaseStatus::Lost);
    }
    extend_lease(c, id, lease.attempt, lease_ttl, now).await?;
    let run = run_of(c, id).await?;
    Ok(LeaseStatus::Held {
        cancel: run.cancel_requested,
    })
}

/// Every lease of `leases` renewed in one transaction; the answers in their order.
async fn renew_leases(
    c: &mut PgConnection,
    leases: &[Lease],
    lease_ttl: Duration,
    now: DateTime<Utc>,
) -> Tx<Vec<LeaseStatus>> {
    let mut answers = Vec::with_capacity(leases.len());
    for &lease in leases {
        answers.push(renew_lease(c, lease, lease_ttl, now).await?);
    }
    Ok(answers)
}

async fn finish(
    c: &mut PgConnection,
    lease: Lease,
    ending: &Ending,
    undelivered: u64,
    usage: Option<ResourceUsage>,
    now: DateTime<Utc>,
) -> Tx<LeaseStatus> {
    if !held(c, lease).await? {
        return Ok(LeaseStatus::Lost);
    }
    end_attempt(c, lease.run_id, lease.attempt, ending, now).await?;
    raise_undelivered(c, lease, undelivered).await?;
    keep_usage(c, lease, usage).await?;
    settle(c, lease.run_id, lease.attempt, ending, now).await?;
    Ok(LeaseStatus::Held { cancel: false })
}

/// End one attempt whose lease ran out, if it still has (a heartbeat may have renewed
/// it since it was listed, or another replica ended it); returns whether its run
/// changed.
async fn expire(c: &mut PgConnection, run_id: RunId, attempt: u32, now: DateTime<Utc>) -> Tx<bool> {
    let Some(expired) = attempt_state(c, run_id, attempt).await? else {
        return Ok(false);
    };
    if !expired.lease_expired(now) {
        return Ok(false);
    }
    // The run may have moved on (a person's retry): then only the attempt ends.
    let run = run_state(c, run_id)
        .await?
        .filter(|r| r.runs_attempt(attempt));
    let ending = expired.expired_ending(run.is_some_and(|r| r.cancel_requested));
    end_attempt(c, run_id, attempt, &ending, now).await?;
    if run.is_some() {
        settle(c, run_id, attempt, &ending, now).await?;
    }
    Ok(run.is_some())
}

async fn release(c: &mut PgConnection, lease: Lease, now: DateTime<Utc>) -> Tx<LeaseStatus> {
    let id = lease.run_id;
    let held = attempt_state(c, id, lease.attempt).await?;
    if !held.is_some_and(|a| a.releasable_under(lease)) {
        return Ok(LeaseStatus::Lost);
    }
    sqlx::query("DELETE FROM attempts WHERE run_id = $1 AND attempt = $2")
        .bind(id.to_string())
        .bind(i64::from(lease.attempt))
        .execute(&mut *c)
        .await
        .map_err(db)?;
    let released = run_of(c, id).await?.release(lease.attempt);
    if let Some(released) = &released {
        // As if never claimed: the attempt number is free again, and the epoch moves
        // on so nothing written under the old lease counts.
        sqlx::query("UPDATE runs SET attempt = $1, epoch = epoch + 1 WHERE id = $2")
            .bind(i64::from(lease.attempt.saturating_sub(1)))
            .bind(id.to_string())
            .execute(&mut *c)
            .await
            .map_err(db)?;
        match released {
            Released::Requeued => {
                sqlx::query(
                    "UPDATE runs SET status = 'queued', reason = NULL, reason_code = NULL, \
                     finished_at = NULL WHERE id = $1",
                )
                .bind(id.to_string())
                .execute(&mut *c)
                .await
                .map_err(db)?;
                enqueue(c, id, lease.attempt, now, None).await?;
            }
            Released::Cancelled(ending) => end_run(c, id, ending, now).await?,
        }
    }
    Ok(LeaseStatus::Held { cancel: false })
}

#[async_trait]
impl Leases for PgStore {
    async fn claim(
        &self,
        message: RunMessage,
        worker_id: &str,
        lease_ttl: Duration,
        now: DateTime<Utc>,
    ) -> Result<ClaimResult, StoreError> {
        write!(self, |c| claim(c, message, worker_id, lease_ttl, now))
    }

    async fn mark_started(
        &self,
        lease: Lease,
        container_id: &str,
        lease_ttl: Duration,
        now: DateTime<Utc>,
    ) -> Result<LeaseStatus, StoreError> {
        write!(self, |c| mark_started(
            c,
            lease,
            container_id,
            lease_ttl,
            now
        ))
    }

    async fn renew_leases(
        &self,
        leases: &[Lease],
        lease_ttl: Duration,
        now: DateTime<Utc>,
    ) -> Result<Vec<LeaseStatus>, StoreError> {
        write!(self, |c| renew_leases(c, leases, lease_ttl, now))
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
        write!(self, |c| finish(c, lease, &ending, undelivered, usage, now))
    }

    async fn lease_is_current(&self, lease: Lease) -> Result<bool, StoreError> {
        let found: Option<i32> = sqlx::query_scalar(
            "SELECT 1 FROM attempts WHERE run_id = $1 AND attempt = $2 AND epoch = $3",
        )
        .bind(lease.run_id.to_string())
        .bind(i64::from(lease.attempt))
        .bind(lease.epoch)
        .fetch_optional(self.pool())
        .await
        .map_err(store_db)?;
        Ok(found.is_some())
    }

    async fn add_log_dropped(&self, lease: Lease, bytes: u64) -> Result<(), StoreError> {
        let bytes = i64::try_from(bytes).unwrap_or(i64::MAX);
        write!(self, |c| add_dropped(c, lease, bytes))
    }

    async fn record_undelivered(&self, lease: Lease, bytes: u64) -> Result<(), StoreError> {
        write!(self, |c| record_undelivered(c, lease, bytes))
    }

    async fn expire_leases(&self, now: DateTime<Utc>) -> Result<Vec<RunId>, StoreError> {
        // Candidates only: each is read again and decided inside its own operation,
        // since a heartbeat may have renewed it meanwhile, or another replica's pass
        // ended it (the two passes conflict, and the one run again finds it over).
        let candidates = sqlx::query(
            "SELECT run_id, attempt FROM attempts \
             WHERE status = 'running' AND lease_expires_at < $1 LIMIT 256",
        )
        .bind(ms(now))
        .fetch_all(self.pool())
        .await
        .map_err(store_db)?;
        let mut changed = Vec::new();
        for row in &candidates {
            let run_id = run_id_col(row, "run_id")?;
            let attempt = attempt_col(row, "attempt")?;
            if write!(self, |c| expire(c, run_id, attempt, now))? {
                changed.push(run_id);
            }
        }
        Ok(changed)
    }

    async fn release(&self, lease: Lease, now: DateTime<Utc>) -> Result<LeaseStatus, StoreError> {
        write!(self, |c| release(c, lease, now))
    }
}

#[cfg(test)]
pub(super) mod tests;
