//! Attempts, claims and leases, and `settle`: the one place an ended attempt makes its
//! run final or queues the next attempt. Every change reads the rows inside the write
//! transaction, asks `domain::transition`, and writes the answer. All of it runs as
//! synchronous operations of the group commit (see `group`): these are the writes every
//! run makes several of.

use crate::store::common::{claim_of, retry_policy_of};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::outbox::enqueue;
use super::runs::end_run;
use super::sync::{attempt_state, exec, first, get, run_state};
use super::{SqliteStore, corrupt, db, ms, ttl_ms};
use crate::domain::ports::{
    Claim, ClaimResult, Lease, LeaseStatus, Leases, RunMessage, StoreError,
};
use crate::domain::run::{Outcome, ResourceUsage, RunId};
use crate::domain::transition::{self, Ending, Released, RunState, Settlement};

/// The claim a worker gets for `message` under `epoch`: the run's job and frozen spec.
pub(super) fn claim_for(
    conn: &rusqlite::Connection,
    message: RunMessage,
    epoch: i64,
    lease_ttl: Duration,
) -> Result<Claim, StoreError> {
    let id = message.run_id;
    let (job, spec) = first(
        conn,
        "SELECT job, spec FROM runs WHERE id = ?",
        [id.to_string()],
        |row| Ok((get::<String>(row, "job")?, get::<String>(row, "spec")?)),
    )?
    .ok_or_else(|| corrupt("attempt", format!("run {id} is missing")))?;
    claim_of(message, epoch, lease_ttl, job, &spec)
}

/// Push the attempt's lease out to `now + lease_ttl`.
fn extend_lease(
    conn: &rusqlite::Connection,
    run_id: RunId,
    attempt: u32,
    lease_ttl: Duration,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    exec(
        conn,
        "UPDATE attempts SET lease_expires_at = ? WHERE run_id = ? AND attempt = ?",
        rusqlite::params![
            ms(now) + ttl_ms(lease_ttl),
            run_id.to_string(),
            i64::from(attempt)
        ],
    )?;
    Ok(())
}

/// The run of an attempt the caller just read: there must be one (foreign key).
fn run_of(conn: &rusqlite::Connection, run_id: RunId) -> Result<RunState, StoreError> {
    run_state(conn, run_id)?.ok_or_else(|| corrupt("attempt", format!("run {run_id} is missing")))
}

/// After an attempt ended: make the run final, or queue its next attempt when its retry
/// rules say so (never after a cancel). Runs inside the caller's transaction.
fn settle(
    conn: &rusqlite::Connection,
    run_id: RunId,
    attempt: u32,
    ending: &Ending,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let (retry, cancel_requested) = first(
        conn,
        "SELECT retry, cancel_requested FROM runs WHERE id = ?",
        [run_id.to_string()],
        |row| {
            Ok((
                get::<Option<String>>(row, "retry")?,
                get::<i64>(row, "cancel_requested")? != 0,
            ))
        },
    )?
    .ok_or_else(|| corrupt("attempt", format!("run {run_id} is missing")))?;
    let policy = retry_policy_of(run_id, retry.as_deref())?;
    let jitter = rand::random::<f64>();
    match transition::settle(&policy, cancel_requested, attempt, ending, jitter, now) {
        Settlement::Next {
            attempt,
            not_before,
        } => {
            exec(
                conn,
                "UPDATE runs SET status = 'queued', not_before = ?, exit_code = NULL, reason = NULL, \
                 reason_code = NULL, finished_at = NULL WHERE id = ?",
                rusqlite::params![ms(not_before), run_id.to_string()],
            )?;
            enqueue(conn, run_id, attempt, now, Some(not_before))
        }
        Settlement::Final => end_run(conn, run_id, ending, now),
    }
}

/// Record how the attempt ended (the run is left to `settle`).
fn end_attempt(
    conn: &rusqlite::Connection,
    run_id: RunId,
    attempt: u32,
    ending: &Ending,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    exec(
        conn,
        "UPDATE attempts SET status = ?, exit_code = ?, reason = ?, reason_code = ?, finished_at = ? \
         WHERE run_id = ? AND attempt = ?",
        rusqlite::params![
            ending.status.as_str(),
            ending.exit_code,
            ending.reason.as_deref(),
            ending.reason_code.map(|c| c.as_str()),
            ms(now),
            run_id.to_string(),
            i64::from(attempt)
        ],
    )?;
    Ok(())
}

/// Keep what the attempt's container used (nothing to keep: the columns stay NULL).
fn keep_usage(
    conn: &rusqlite::Connection,
    lease: Lease,
    usage: Option<ResourceUsage>,
) -> Result<(), StoreError> {
    let Some(u) = usage else {
        return Ok(());
    };
    let bytes = |b: u64| i64::try_from(b).unwrap_or(i64::MAX);
    exec(
        conn,
        "UPDATE attempts SET usage_samples = ?, usage_peak_memory_bytes = ?, \
         usage_cpu_seconds = ?, usage_memory_limit_bytes = ?, usage_cpu_limit = ? \
         WHERE run_id = ? AND attempt = ?",
        rusqlite::params![
            i64::from(u.samples),
            bytes(u.peak_memory_bytes),
            u.cpu_seconds,
            u.memory_limit_bytes.map(bytes),
            u.cpu_limit,
            lease.run_id.to_string(),
            i64::from(lease.attempt)
        ],
    )?;
    Ok(())
}

/// Count output that never reached the log sink, on the attempt and on its run.
fn count_dropped(conn: &rusqlite::Connection, lease: Lease, bytes: i64) -> Result<(), StoreError> {
    let id = lease.run_id.to_string();
    exec(
        conn,
        "UPDATE attempts SET log_dropped_bytes = log_dropped_bytes + ? WHERE run_id = ? AND attempt = ?",
        rusqlite::params![bytes, &id, i64::from(lease.attempt)],
    )?;
    exec(
        conn,
        "UPDATE runs SET log_dropped_bytes = log_dropped_bytes + ? WHERE id = ?",
        rusqlite::params![bytes, &id],
    )?;
    Ok(())
}

/// The worker reports `reported` bytes undelivered, all told: the attempt's recorded
/// total rises to it, never falls, and only the rise is counted as dropped, so a byte
/// reported with every later batch and again at finish counts once.
fn raise_undelivered(
    conn: &rusqlite::Connection,
    lease: Lease,
    reported: u64,
) -> Result<(), StoreError> {
    let recorded: Option<i64> = first(
        conn,
        "SELECT log_undelivered_bytes FROM attempts WHERE run_id = ? AND attempt = ?",
        rusqlite::params![lease.run_id.to_string(), i64::from(lease.attempt)],
        |row| get(row, "log_undelivered_bytes"),
    )?;
    let Some(recorded) = recorded else {
        return Ok(());
    };
    let reported = i64::try_from(reported).unwrap_or(i64::MAX);
    if reported <= recorded {
        return Ok(());
    }
    exec(
        conn,
        "UPDATE attempts SET log_undelivered_bytes = ? WHERE run_id = ? AND attempt = ?",
        rusqlite::params![reported, lease.run_id.to_string(), i64::from(lease.attempt)],
    )?;
    count_dropped(conn, lease, reported - recorded)
}

/// Whether the attempt is still running under `lease` (start, heartbeat, finish).
fn held(conn: &rusqlite::Connection, lease: Lease) -> Result<bool, StoreError> {
    Ok(attempt_state(conn, lease.run_id, lease.attempt)?.is_some_and(|a| a.held_under(lease)))
}

/// `write` when the lease's epoch is the attempt's, final or not: output belongs to the
/// attempt whose epoch it carries. Under another epoch nothing is written.
fn under_epoch(
    conn: &rusqlite::Connection,
    lease: Lease,
    write: impl FnOnce(&rusqlite::Connection) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let current = attempt_state(conn, lease.run_id, lease.attempt)?;
    if current.is_some_and(|a| a.epoch == lease.epoch) {
        write(conn)?;
    }
    Ok(())
}

fn claim(
    conn: &rusqlite::Connection,
    message: RunMessage,
    worker_id: &str,
    lease_ttl: Duration,
    now: DateTime<Utc>,
) -> Result<ClaimResult, StoreError> {
    let id = message.run_id;
    let Some(run) = run_state(conn, id)? else {
        return Ok(ClaimResult::UnknownRun);
    };
    if run.may_claim(message.attempt, now) {
        let epoch: i64 = first(
            conn,
            "UPDATE runs SET status = 'running', attempt = ?, epoch = epoch + 1 WHERE id = ? \
             RETURNING epoch",
            rusqlite::params![i64::from(message.attempt), id.to_string()],
            |row| get(row, "epoch"),
        )?
        .ok_or_else(|| corrupt("run", format!("run {id} is missing")))?;
        exec(
            conn,
            "INSERT INTO attempts (run_id, attempt, worker_id, epoch, lease_expires_at, status, claimed_at, \
               worker_build) \
             VALUES (?1, ?2, ?3, ?4, ?5, 'running', ?6, (SELECT build FROM worker_sessions WHERE worker_id = ?3))",
            rusqlite::params![
                id.to_string(),
                i64::from(message.attempt),
                worker_id,
                epoch,
                ms(now) + ttl_ms(lease_ttl),
                ms(now)
            ],
        )?;
        let claim = claim_for(conn, message, epoch, lease_ttl)?;
        return Ok(ClaimResult::Claimed(Box::new(claim)));
    }
    if let Some(held) = attempt_state(conn, id, message.attempt)?
        && held.reclaimable_by(worker_id)
    {
        extend_lease(conn, id, message.attempt, lease_ttl, now)?;
        let claim = claim_for(conn, message, held.epoch, lease_ttl)?;
        return Ok(ClaimResult::Claimed(Box::new(claim)));
    }
    Ok(ClaimResult::NotClaimable {
        status: run.status,
        attempt: run.attempt,
    })
}

fn mark_started(
    conn: &rusqlite::Connection,
    lease: Lease,
    container_id: &str,
    lease_ttl: Duration,
    now: DateTime<Utc>,
) -> Result<LeaseStatus, StoreError> {
    let id = lease.run_id;
    if !held(conn, lease)? {
        return Ok(LeaseStatus::Lost);
    }
    exec(
        conn,
        "UPDATE attempts SET container_id = ?, started_at = ?, lease_expires_at = ? \
         WHERE run_id = ? AND attempt = ?",
        rusqlite::params![
            container_id,
            ms(now),
            ms(now) + ttl_ms(lease_ttl),
            id.to_string(),
            i64::from(lease.attempt)
        ],
    )?;
    exec(
        conn,
        "UPDATE runs SET started_at = ? WHERE id = ?",
        rusqlite::params![ms(now), id.to_string()],
    )?;
    let run = run_of(conn, id)?;
    Ok(LeaseStatus::Held {
        cancel: run.cancel_requested,
    })
}

fn renew_lease(
    conn: &rusqlite::Connection,
    lease: Lease,
    lease_ttl: Duration,
    now: DateTime<Utc>,
) -> Result<LeaseStatus, StoreError> {
    let id = lease.run_id;
    if !held(conn, lease)? {
        return Ok(LeaseStatus::Lost);
    }
    extend_lease(conn, id, lease.attempt, lease_ttl, now)?;
    let run = run_of(conn, id)?;
    Ok(LeaseStatus::Held {
        cancel: run.cancel_requested,
    })
}

fn finish(
    conn: &rusqlite::Connection,
    lease: Lease,
    ending: &Ending,
    undelivered: u64,
    usage: Option<ResourceUsage>,
    now: DateTime<Utc>,
) -> Result<LeaseStatus, StoreError> {
    if !held(conn, lease)? {
        return Ok(LeaseStatus::Lost);
    }
    end_attempt(conn, lease.run_id, lease.attempt, ending, now)?;
    raise_undelivered(conn, lease, undelivered)?;
    keep_usage(conn, lease, usage)?;
    settle(conn, lease.run_id, lease.attempt, ending, now)?;
    Ok(LeaseStatus::Held { cancel: false })
}

/// End one attempt whose lease ran out, if it still has (a heartbeat may have renewed
/// it since it was listed); returns whether its run changed.
fn expire(
    conn: &rusqlite::Connection,
    run_id: RunId,
    attempt: u32,
    now: DateTime<Utc>,
) -> Result<bool, StoreError> {
    let Some(expired) = attempt_state(conn, run_id, attempt)? else {
        return Ok(false);
    };
    if !expired.lease_expired(now) {
        return Ok(false);
    }
    // The run may have moved on (a person's retry): then only the attempt ends.
    let run = run_state(conn, run_id)?.filter(|r| r.runs_attempt(attempt));
    let ending = expired.expired_ending(run.is_some_and(|r| r.cancel_requested));
    end_attempt(conn, run_id, attempt, &ending, now)?;
    if run.is_some() {
        settle(conn, run_id, attempt, &ending, now)?;
    }
    Ok(run.is_some())
}

fn release(
    conn: &rusqlite::Connection,
    lease: Lease,
    now: DateTime<Utc>,
) -> Result<LeaseStatus, StoreError> {
    let id = lease.run_id;
    let held = attempt_state(conn, id, lease.attempt)?;
    if !held.is_some_and(|a| a.releasable_under(lease)) {
        return Ok(LeaseStatus::Lost);
    }
    exec(
        conn,
        "DELETE FROM attempts WHERE run_id = ? AND attempt = ?",
        rusqlite::params![id.to_string(), i64::from(lease.attempt)],
    )?;
    let released = run_of(conn, id)?.release(lease.attempt);
    if let Some(released) = &released {
        // As if never claimed: the attempt number is free again, and the epoch moves
        // on so nothing written under the old lease counts.
        exec(
            conn,
            "UPDATE runs SET attempt = ?, epoch = epoch + 1 WHERE id = ?",
            rusqlite::params![i64::from(lease.attempt.saturating_sub(1)), id.to_string()],
        )?;
        match released {
            Released::Requeued => {
                exec(
                    conn,
                    "UPDATE runs SET status = 'queued', reason = NULL, reason_code = NULL, \
                     finished_at = NULL WHERE id = ?",
                    [id.to_string()],
                )?;
                enqueue(conn, id, lease.attempt, now, None)?;
            }
            Released::Cancelled(ending) => end_run(conn, id, ending, now)?,
        }
    }
    Ok(LeaseStatus::Held { cancel: false })
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
        let worker_id = worker_id.to_owned();
        self.group
            .run(move |c| claim(c, message, &worker_id, lease_ttl, now))
            .await
    }

    async fn mark_started(
        &self,
        lease: Lease,
        container_id: &str,
        lease_ttl: Duration,
        now: DateTime<Utc>,
    ) -> Result<LeaseStatus, StoreError> {
        let container_id = container_id.to_owned();
        self.group
            .run(move |c| mark_started(c, lease, &container_id, lease_ttl, now))
            .await
    }

    async fn renew_leases(
        &self,
        leases: &[Lease],
        lease_ttl: Duration,
        now: DateTime<Utc>,
    ) -> Result<Vec<LeaseStatus>, StoreError> {
        let leases = leases.to_vec();
        self.group
            .run(move |c| {
                leases
                    .into_iter()
                    .map(|lease| renew_lease(c, lease, lease_ttl, now))
                    .collect()
            })
            .await
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
        self.group
            .run(move |c| finish(c, lease, &ending, undelivered, usage, now))
            .await
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
        self.group
            .run(move |c| under_epoch(c, lease, |c| count_dropped(c, lease, bytes)))
            .await
    }

    async fn record_undelivered(&self, lease: Lease, bytes: u64) -> Result<(), StoreError> {
        self.group
            .run(move |c| under_epoch(c, lease, |c| raise_undelivered(c, lease, bytes)))
            .await
    }

    async fn expire_leases(&self, now: DateTime<Utc>) -> Result<Vec<RunId>, StoreError> {
        // Candidates only: each is read again and decided inside its own operation,
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
            let run_id = super::run_id_col(row, "run_id")?;
            let attempt = super::attempt_col(row, "attempt")?;
            if self
                .group
                .run(move |c| expire(c, run_id, attempt, now))
                .await?
            {
                changed.push(run_id);
            }
        }
        Ok(changed)
    }

    async fn release(&self, lease: Lease, now: DateTime<Utc>) -> Result<LeaseStatus, StoreError> {
        self.group.run(move |c| release(c, lease, now)).await
    }
}
