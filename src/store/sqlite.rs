use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};
use sqlx::Row;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};

use crate::domain::job::ResolvedSpec;
use crate::domain::ports::{
    AdoptResult, CancelResult, Claim, ClaimResult, HeldAttempt, IDEMPOTENCY_WINDOW, IdempotencyKey,
    Inserted, Lease, LeaseStatus, NewRun, OutboxBacklog, OutboxEntry, RetryResult, RunFilter,
    RunMessage, RunStore, StoreError,
};
use crate::domain::retry::RetryPolicy;
use crate::domain::run::{Attempt, Outcome, ReasonCode, Run, RunId, RunStatus};
use crate::protocol::{RetryV1, SpecV1};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Clone)]
pub struct SqliteStore {
    pub(super) writer: SqlitePool,
    pub(super) reader: SqlitePool,
}

pub(super) fn unavailable(e: sqlx::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

pub(super) fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

pub(super) fn from_ms(v: Option<i64>) -> Option<DateTime<Utc>> {
    v.and_then(|v| Utc.timestamp_millis_opt(v).single())
}

fn ttl_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl SqliteStore {
    /// Open (creating if needed) `tasuki.db` in `data_dir` and bring its schema up to date.
    pub async fn open(data_dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|e| {
            StoreError::Unavailable(format!(
                "cannot create data dir {}: {e}",
                data_dir.display()
            ))
        })?;
        let options = SqliteConnectOptions::new()
            .filename(data_dir.join("tasuki.db"))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // A 202 promises the run is stored: every commit reaches the disk.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await
            .map_err(unavailable)?;
        MIGRATOR.run(&writer).await.map_err(|e| {
            StoreError::Unavailable(format!("migrating {}: {e}", data_dir.display()))
        })?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options.read_only(true))
            .await
            .map_err(unavailable)?;
        Ok(Self { writer, reader })
    }
}

fn run_from_row(row: &SqliteRow) -> Result<Run, StoreError> {
    let corrupt =
        |what: &str, e: &dyn std::fmt::Display| StoreError::Corrupt(format!("{what}: {e}"));
    let id: String = row.try_get("id").map_err(unavailable)?;
    let params: String = row.try_get("params").map_err(unavailable)?;
    let status: String = row.try_get("status").map_err(unavailable)?;
    let attempt: i64 = row.try_get("attempt").map_err(unavailable)?;
    Ok(Run {
        id: RunId::from_str(&id).map_err(|e| corrupt("run id", &e))?,
        job: row.try_get("job").map_err(unavailable)?,
        params: serde_json::from_str::<BTreeMap<String, String>>(&params)
            .map_err(|e| corrupt("params", &e))?,
        status: RunStatus::from_str(&status).map_err(|e| corrupt("status", &e))?,
        attempt: u32::try_from(attempt).map_err(|e| corrupt("attempt", &e))?,
        exit_code: row.try_get("exit_code").map_err(unavailable)?,
        reason: row.try_get("reason").map_err(unavailable)?,
        reason_code: reason_code_of(row)?,
        created_at: from_ms(row.try_get("created_at").map_err(unavailable)?).unwrap_or_default(),
        started_at: from_ms(row.try_get("started_at").map_err(unavailable)?),
        finished_at: from_ms(row.try_get("finished_at").map_err(unavailable)?),
        cancel_requested: row
            .try_get::<i64, _>("cancel_requested")
            .map_err(unavailable)?
            != 0,
        not_before: from_ms(row.try_get("not_before").map_err(unavailable)?),
        log_dropped_bytes: dropped_of(row)?,
        attempts: Vec::new(),
    })
}

/// The optional `reason_code` column, parsed.
fn reason_code_of(row: &SqliteRow) -> Result<Option<ReasonCode>, StoreError> {
    let code: Option<String> = row.try_get("reason_code").map_err(unavailable)?;
    code.map(|c| ReasonCode::from_str(&c))
        .transpose()
        .map_err(|e| StoreError::Corrupt(format!("reason_code: {e}")))
}

/// The `log_dropped_bytes` counter column.
fn dropped_of(row: &SqliteRow) -> Result<u64, StoreError> {
    let bytes: i64 = row.try_get("log_dropped_bytes").map_err(unavailable)?;
    Ok(bytes.max(0) as u64)
}

fn attempt_from_row(row: &SqliteRow) -> Result<(String, Attempt), StoreError> {
    let corrupt =
        |what: &str, e: &dyn std::fmt::Display| StoreError::Corrupt(format!("{what}: {e}"));
    let run_id: String = row.try_get("run_id").map_err(unavailable)?;
    let number: i64 = row.try_get("attempt").map_err(unavailable)?;
    let status: String = row.try_get("status").map_err(unavailable)?;
    let attempt = Attempt {
        number: u32::try_from(number).map_err(|e| corrupt("attempt", &e))?,
        status: RunStatus::from_str(&status).map_err(|e| corrupt("attempt status", &e))?,
        worker_id: row.try_get("worker_id").map_err(unavailable)?,
        container_id: row.try_get("container_id").map_err(unavailable)?,
        exit_code: row.try_get("exit_code").map_err(unavailable)?,
        reason: row.try_get("reason").map_err(unavailable)?,
        reason_code: reason_code_of(row)?,
        claimed_at: from_ms(row.try_get("claimed_at").map_err(unavailable)?).unwrap_or_default(),
        started_at: from_ms(row.try_get("started_at").map_err(unavailable)?),
        finished_at: from_ms(row.try_get("finished_at").map_err(unavailable)?),
        log_dropped_bytes: dropped_of(row)?,
    };
    Ok((run_id, attempt))
}

pub(super) fn corrupt_id(e: crate::domain::run::InvalidRunId) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

/// How an attempt ended, for `settle`.
struct Ending<'a> {
    status: RunStatus,
    exit_code: Option<i64>,
    reason: Option<&'a str>,
    reason_code: Option<ReasonCode>,
}

/// After an attempt ended: make the run final, or queue its next attempt when its retry
/// rules say so (never after a cancel). Runs inside the caller's transaction.
async fn settle(
    tx: &mut sqlx::SqliteConnection,
    run_id: &str,
    attempt: u32,
    ending: &Ending<'_>,
    now: DateTime<Utc>,
) -> Result<RunStatus, StoreError> {
    let row = sqlx::query("SELECT retry, cancel_requested FROM runs WHERE id = ?")
        .bind(run_id)
        .fetch_one(&mut *tx)
        .await
        .map_err(unavailable)?;
    let retry: Option<String> = row.try_get("retry").map_err(unavailable)?;
    let cancel: i64 = row.try_get("cancel_requested").map_err(unavailable)?;
    let policy = match retry {
        None => RetryPolicy::default(),
        Some(text) => serde_json::from_str::<RetryV1>(&text)
            .map_err(|e| e.to_string())
            .and_then(RetryPolicy::try_from)
            .map_err(|e| StoreError::Corrupt(format!("retry rules of run {run_id}: {e}")))?,
    };
    let delay = if cancel != 0 || ending.status == RunStatus::Succeeded {
        None
    } else {
        policy.next_delay(
            attempt,
            ending.reason_code,
            ending.exit_code,
            rand::random::<f64>(),
        )
    };
    match delay {
        Some(delay) => {
            let not_before = ms(now) + i64::try_from(delay.as_millis()).unwrap_or(i64::MAX / 2);
            sqlx::query(
                "UPDATE runs SET status = 'queued', not_before = ?, exit_code = NULL, reason = NULL, \
                 reason_code = NULL, finished_at = NULL WHERE id = ?",
            )
            .bind(not_before)
            .bind(run_id)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
            sqlx::query(
                "INSERT INTO outbox (run_id, attempt, created_at, not_before) VALUES (?, ?, ?, ?)",
            )
            .bind(run_id)
            .bind(i64::from(attempt) + 1)
            .bind(ms(now))
            .bind(not_before)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
            Ok(RunStatus::Queued)
        }
        None => {
            sqlx::query(
                "UPDATE runs SET status = ?, exit_code = ?, reason = ?, reason_code = ?, finished_at = ?, \
                 not_before = NULL WHERE id = ?",
            )
            .bind(ending.status.as_str())
            .bind(ending.exit_code)
            .bind(ending.reason)
            .bind(ending.reason_code.map(|c| c.as_str()))
            .bind(ms(now))
            .bind(run_id)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
            Ok(ending.status)
        }
    }
}

/// The claim a worker gets, from a row with `epoch`, `job` and `spec`.
fn claim_from_row(
    row: &SqliteRow,
    message: RunMessage,
    lease_ttl: Duration,
) -> Result<Claim, StoreError> {
    let id = message.run_id;
    let epoch: i64 = row.try_get("epoch").map_err(unavailable)?;
    let job: String = row.try_get("job").map_err(unavailable)?;
    let spec: String = row.try_get("spec").map_err(unavailable)?;
    let spec: SpecV1 = serde_json::from_str(&spec)
        .map_err(|e| StoreError::Corrupt(format!("spec of run {id}: {e}")))?;
    let spec = ResolvedSpec::try_from(spec)
        .map_err(|e| StoreError::Corrupt(format!("spec of run {id}: {e}")))?;
    Ok(Claim {
        lease: Lease {
            run_id: id,
            attempt: message.attempt,
            epoch,
        },
        job,
        spec,
        lease_ttl,
    })
}

const RUN_COLUMNS: &str = "id, job, params, status, attempt, exit_code, reason, reason_code, created_at, started_at, \
     finished_at, cancel_requested, not_before, log_dropped_bytes";
const ATTEMPT_COLUMNS: &str = "run_id, attempt, status, worker_id, container_id, exit_code, reason, reason_code, \
     claimed_at, started_at, finished_at, log_dropped_bytes";

impl SqliteStore {
    /// Fill in each run's attempts, with one query for all of them.
    async fn with_attempts(&self, mut runs: Vec<Run>) -> Result<Vec<Run>, StoreError> {
        if runs.is_empty() {
            return Ok(runs);
        }
        let ids: Vec<String> = runs.iter().map(|r| r.id.to_string()).collect();
        let ids = serde_json::to_string(&ids).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {ATTEMPT_COLUMNS} FROM attempts WHERE run_id IN (SELECT value FROM json_each(?)) \
             ORDER BY run_id, attempt"
        ));
        let rows = sqlx::query(sql)
            .bind(ids)
            .fetch_all(&self.reader)
            .await
            .map_err(unavailable)?;
        let mut by_run: BTreeMap<String, Vec<Attempt>> = BTreeMap::new();
        for row in &rows {
            let (run_id, attempt) = attempt_from_row(row)?;
            by_run.entry(run_id).or_default().push(attempt);
        }
        for run in &mut runs {
            if let Some(attempts) = by_run.remove(&run.id.to_string()) {
                run.attempts = attempts;
            }
        }
        Ok(runs)
    }
}

#[async_trait]
impl RunStore for SqliteStore {
    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.reader)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn insert_run(
        &self,
        run: &NewRun,
        key: Option<&IdempotencyKey>,
    ) -> Result<Inserted, StoreError> {
        let params =
            serde_json::to_string(&run.params).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let spec = serde_json::to_string(&SpecV1::from(&run.spec))
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let retry = (run.retry != RetryPolicy::default())
            .then(|| serde_json::to_string(&RetryV1::from(&run.retry)))
            .transpose()
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let id = run.id.to_string();
        let now = ms(run.created_at);
        let mut tx = self.writer.begin().await.map_err(unavailable)?;
        if let Some(key) = key {
            let window = ttl_ms(IDEMPOTENCY_WINDOW);
            sqlx::query(
                "DELETE FROM idempotency_keys WHERE scope = ? AND key = ? AND created_at < ?",
            )
            .bind(&key.scope)
            .bind(&key.key)
            .bind(now - window)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
            let seen = sqlx::query(
                "SELECT job, params, run_id FROM idempotency_keys WHERE scope = ? AND key = ?",
            )
            .bind(&key.scope)
            .bind(&key.key)
            .fetch_optional(&mut *tx)
            .await
            .map_err(unavailable)?;
            if let Some(row) = seen {
                let job: String = row.try_get("job").map_err(unavailable)?;
                let fingerprint: String = row.try_get("params").map_err(unavailable)?;
                let run_id: String = row.try_get("run_id").map_err(unavailable)?;
                tx.rollback().await.map_err(unavailable)?;
                return Ok(if job == key.job && fingerprint == key.fingerprint {
                    Inserted::Existing(run_id.parse().map_err(corrupt_id)?)
                } else {
                    Inserted::KeyReused { job }
                });
            }
        }
        sqlx::query(
            "INSERT INTO runs (id, job, params, spec, retry, status, created_at) VALUES (?, ?, ?, ?, ?, 'queued', ?)",
        )
        .bind(&id)
        .bind(&run.job)
        .bind(params)
        .bind(spec)
        .bind(retry)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        sqlx::query("INSERT INTO outbox (run_id, attempt, created_at) VALUES (?, 1, ?)")
            .bind(&id)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        if let Some(key) = key {
            sqlx::query(
                "INSERT INTO idempotency_keys (scope, key, job, params, run_id, created_at) \
                 VALUES (?, ?, ?, ?, ?, ?)",
            )
            .bind(&key.scope)
            .bind(&key.key)
            .bind(&key.job)
            .bind(&key.fingerprint)
            .bind(&id)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(Inserted::New)
    }

    async fn get_run(&self, id: RunId) -> Result<Option<Run>, StoreError> {
        let sql = sqlx::AssertSqlSafe(format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?"));
        let row = sqlx::query(sql)
            .bind(id.to_string())
            .fetch_optional(&self.reader)
            .await
            .map_err(unavailable)?;
        let Some(run) = row.as_ref().map(run_from_row).transpose()? else {
            return Ok(None);
        };
        Ok(self.with_attempts(vec![run]).await?.pop())
    }

    async fn list_runs(&self, filter: &RunFilter) -> Result<Vec<Run>, StoreError> {
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE (?1 IS NULL OR job = ?1) AND (?2 IS NULL OR status = ?2) \
             ORDER BY id DESC LIMIT ?3"
        ));
        let rows = sqlx::query(sql)
            .bind(filter.job.as_deref())
            .bind(filter.status.map(|s| s.as_str()))
            .bind(i64::from(filter.limit))
            .fetch_all(&self.reader)
            .await
            .map_err(unavailable)?;
        let runs = rows
            .iter()
            .map(run_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        self.with_attempts(runs).await
    }

    async fn pending_outbox(
        &self,
        limit: u32,
        now: DateTime<Utc>,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, run_id, attempt FROM outbox WHERE sent_at IS NULL \
             AND (not_before IS NULL OR not_before <= ?) ORDER BY id LIMIT ?",
        )
        .bind(ms(now))
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await
        .map_err(unavailable)?;
        rows.iter()
            .map(|row| {
                let run_id: String = row.try_get("run_id").map_err(unavailable)?;
                let attempt: i64 = row.try_get("attempt").map_err(unavailable)?;
                Ok(OutboxEntry {
                    id: row.try_get("id").map_err(unavailable)?,
                    message: RunMessage {
                        run_id: run_id
                            .parse()
                            .map_err(|e: crate::domain::run::InvalidRunId| {
                                StoreError::Corrupt(e.to_string())
                            })?,
                        attempt: u32::try_from(attempt)
                            .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                    },
                })
            })
            .collect()
    }

    async fn mark_outbox_sent(&self, ids: &[i64], now: DateTime<Utc>) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        let list = serde_json::to_string(ids).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        sqlx::query(
            "UPDATE outbox SET sent_at = ?, tries = tries + 1, last_error = NULL, last_try_failed = 0 \
             WHERE id IN (SELECT value FROM json_each(?))",
        )
        .bind(ms(now))
        .bind(list)
        .execute(&self.writer)
        .await
        .map_err(unavailable)?;
        Ok(())
    }

    async fn mark_outbox_failed(&self, id: i64, error: &str) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE outbox SET tries = tries + 1, last_error = ?, last_try_failed = 1 WHERE id = ?",
        )
        .bind(error)
        .bind(id)
        .execute(&self.writer)
        .await
        .map_err(unavailable)?;
        Ok(())
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
        .map_err(unavailable)?;
        let pending: i64 = row.try_get("pending").map_err(unavailable)?;
        let failed: i64 = row.try_get("failed").map_err(unavailable)?;
        Ok(OutboxBacklog {
            pending: pending.max(0) as u64,
            failed: failed.max(0) as u64,
            last_error: row.try_get("last_error").map_err(unavailable)?,
        })
    }

    async fn requeue_unclaimed(&self) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "UPDATE outbox SET sent_at = NULL WHERE sent_at IS NOT NULL AND id IN (\
               SELECT o.id FROM outbox o JOIN runs r ON r.id = o.run_id \
               WHERE r.status = 'queued' AND o.attempt = r.attempt + 1)",
        )
        .execute(&self.writer)
        .await
        .map_err(unavailable)?;
        Ok(done.rows_affected())
    }

    async fn republish_unclaimed(
        &self,
        sent_before: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<Vec<RunId>, StoreError> {
        let rows = sqlx::query(
            "UPDATE outbox SET sent_at = NULL, last_error = 'published again: the queue no longer held it' \
             WHERE sent_at IS NOT NULL AND sent_at < ?1 AND id IN (\
               SELECT o.id FROM outbox o JOIN runs r ON r.id = o.run_id \
               WHERE r.status = 'queued' AND o.attempt = r.attempt + 1 \
                 AND (r.not_before IS NULL OR r.not_before <= ?2) \
                 AND o.id = (SELECT MAX(id) FROM outbox WHERE run_id = r.id)) \
             RETURNING run_id",
        )
        .bind(ms(sent_before))
        .bind(ms(now))
        .fetch_all(&self.writer)
        .await
        .map_err(unavailable)?;
        rows.iter()
            .map(|row| {
                let id: String = row.try_get("run_id").map_err(unavailable)?;
                id.parse().map_err(corrupt_id)
            })
            .collect()
    }

    async fn claim(
        &self,
        message: RunMessage,
        worker_id: &str,
        lease_ttl: Duration,
        now: DateTime<Utc>,
    ) -> Result<ClaimResult, StoreError> {
        let id = message.run_id.to_string();
        let attempt = i64::from(message.attempt);
        let mut tx = self.writer.begin().await.map_err(unavailable)?;
        let claimed = sqlx::query(
            "UPDATE runs SET status = 'running', attempt = ?2, epoch = epoch + 1 \
             WHERE id = ?1 AND status = 'queued' AND attempt = ?2 - 1 AND cancel_requested = 0 \
               AND (not_before IS NULL OR not_before <= ?3) \
             RETURNING epoch, job, spec",
        )
        .bind(&id)
        .bind(attempt)
        .bind(ms(now))
        .fetch_optional(&mut *tx)
        .await
        .map_err(unavailable)?;
        let Some(row) = claimed else {
            // The same worker asking again for an attempt it holds but has not started
            // (its first answer got lost on the way): give it the same lease back.
            let again = sqlx::query(
                "UPDATE attempts SET lease_expires_at = ?1 \
                 WHERE run_id = ?2 AND attempt = ?3 AND worker_id = ?4 \
                   AND status = 'running' AND container_id IS NULL \
                 RETURNING epoch, (SELECT job FROM runs WHERE id = ?2) AS job, \
                           (SELECT spec FROM runs WHERE id = ?2) AS spec",
            )
            .bind(ms(now) + ttl_ms(lease_ttl))
            .bind(&id)
            .bind(attempt)
            .bind(worker_id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(unavailable)?;
            if let Some(row) = again {
                let claim = claim_from_row(&row, message, lease_ttl)?;
                tx.commit().await.map_err(unavailable)?;
                return Ok(ClaimResult::Claimed(Box::new(claim)));
            }
            let current = sqlx::query("SELECT status, attempt FROM runs WHERE id = ?")
                .bind(&id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(unavailable)?;
            tx.rollback().await.map_err(unavailable)?;
            return match current {
                None => Ok(ClaimResult::UnknownRun),
                Some(row) => {
                    let status: String = row.try_get("status").map_err(unavailable)?;
                    let attempt: i64 = row.try_get("attempt").map_err(unavailable)?;
                    Ok(ClaimResult::NotClaimable {
                        status: status.parse().map_err(
                            |e: crate::domain::run::InvalidStatus| {
                                StoreError::Corrupt(e.to_string())
                            },
                        )?,
                        attempt: u32::try_from(attempt).unwrap_or(0),
                    })
                }
            };
        };
        let claim = claim_from_row(&row, message, lease_ttl)?;
        let epoch = claim.lease.epoch;
        sqlx::query(
            "INSERT INTO attempts (run_id, attempt, worker_id, epoch, lease_expires_at, status, claimed_at) \
             VALUES (?, ?, ?, ?, ?, 'running', ?)",
        )
        .bind(&id)
        .bind(attempt)
        .bind(worker_id)
        .bind(epoch)
        .bind(ms(now) + ttl_ms(lease_ttl))
        .bind(ms(now))
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        Ok(ClaimResult::Claimed(Box::new(claim)))
    }

    async fn mark_started(
        &self,
        lease: Lease,
        container_id: &str,
        lease_ttl: Duration,
        now: DateTime<Utc>,
    ) -> Result<LeaseStatus, StoreError> {
        let id = lease.run_id.to_string();
        let mut tx = self.writer.begin().await.map_err(unavailable)?;
        let done = sqlx::query(
            "UPDATE attempts SET container_id = ?, started_at = ?, lease_expires_at = ? \
             WHERE run_id = ? AND attempt = ? AND epoch = ? AND status = 'running'",
        )
        .bind(container_id)
        .bind(ms(now))
        .bind(ms(now) + ttl_ms(lease_ttl))
        .bind(&id)
        .bind(i64::from(lease.attempt))
        .bind(lease.epoch)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        if done.rows_affected() == 0 {
            tx.rollback().await.map_err(unavailable)?;
            return Ok(LeaseStatus::Lost);
        }
        let row =
            sqlx::query("UPDATE runs SET started_at = ? WHERE id = ? RETURNING cancel_requested")
                .bind(ms(now))
                .bind(&id)
                .fetch_one(&mut *tx)
                .await
                .map_err(unavailable)?;
        let cancel: i64 = row.try_get("cancel_requested").map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        Ok(LeaseStatus::Held {
            cancel: cancel != 0,
        })
    }

    async fn renew_lease(
        &self,
        lease: Lease,
        lease_ttl: Duration,
        now: DateTime<Utc>,
    ) -> Result<LeaseStatus, StoreError> {
        let row = sqlx::query(
            "UPDATE attempts SET lease_expires_at = ?1 \
             WHERE run_id = ?2 AND attempt = ?3 AND epoch = ?4 AND status = 'running' \
             RETURNING (SELECT cancel_requested FROM runs WHERE id = ?2) AS cancel",
        )
        .bind(ms(now) + ttl_ms(lease_ttl))
        .bind(lease.run_id.to_string())
        .bind(i64::from(lease.attempt))
        .bind(lease.epoch)
        .fetch_optional(&self.writer)
        .await
        .map_err(unavailable)?;
        match row {
            None => Ok(LeaseStatus::Lost),
            Some(row) => {
                let cancel: i64 = row.try_get("cancel").map_err(unavailable)?;
                Ok(LeaseStatus::Held {
                    cancel: cancel != 0,
                })
            }
        }
    }

    async fn finish(
        &self,
        lease: Lease,
        outcome: &Outcome,
        log_dropped_bytes: u64,
        now: DateTime<Utc>,
    ) -> Result<LeaseStatus, StoreError> {
        let id = lease.run_id.to_string();
        let reason = outcome.reason();
        let ending = Ending {
            status: outcome.status(),
            exit_code: outcome.exit_code(),
            reason: reason.as_deref(),
            reason_code: outcome.reason_code(),
        };
        let dropped = i64::try_from(log_dropped_bytes).unwrap_or(i64::MAX);
        let mut tx = self.writer.begin().await.map_err(unavailable)?;
        let done = sqlx::query(
            "UPDATE attempts SET status = ?, exit_code = ?, reason = ?, reason_code = ?, finished_at = ?, \
             log_dropped_bytes = log_dropped_bytes + ? \
             WHERE run_id = ? AND attempt = ? AND epoch = ? AND status = 'running'",
        )
        .bind(ending.status.as_str())
        .bind(ending.exit_code)
        .bind(ending.reason)
        .bind(ending.reason_code.map(|c| c.as_str()))
        .bind(ms(now))
        .bind(dropped)
        .bind(&id)
        .bind(i64::from(lease.attempt))
        .bind(lease.epoch)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        if done.rows_affected() == 0 {
            tx.rollback().await.map_err(unavailable)?;
            return Ok(LeaseStatus::Lost);
        }
        if dropped > 0 {
            sqlx::query("UPDATE runs SET log_dropped_bytes = log_dropped_bytes + ? WHERE id = ?")
                .bind(dropped)
                .bind(&id)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
        }
        settle(&mut tx, &id, lease.attempt, &ending, now).await?;
        tx.commit().await.map_err(unavailable)?;
        Ok(LeaseStatus::Held { cancel: false })
    }

    async fn cancel(&self, id: RunId, now: DateTime<Utc>) -> Result<CancelResult, StoreError> {
        let run_id = id.to_string();
        let mut tx = self.writer.begin().await.map_err(unavailable)?;
        // Not started (first attempt or a retry waiting out its backoff): final at once,
        // and its pending publish is dropped.
        let queued = sqlx::query(
            "UPDATE runs SET status = 'cancelled', cancel_requested = 1, reason = 'cancelled before it started', \
             reason_code = 'cancelled', exit_code = NULL, finished_at = ?, not_before = NULL \
             WHERE id = ? AND status = 'queued'",
        )
        .bind(ms(now))
        .bind(&run_id)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        let result = if queued.rows_affected() == 1 {
            sqlx::query(
                "UPDATE outbox SET sent_at = ?, last_error = 'run cancelled' WHERE run_id = ? AND sent_at IS NULL",
            )
            .bind(ms(now))
            .bind(&run_id)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
            CancelResult::Cancelled
        } else {
            let running = sqlx::query(
                "UPDATE runs SET cancel_requested = 1 WHERE id = ? AND status = 'running'",
            )
            .bind(&run_id)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
            if running.rows_affected() == 1 {
                CancelResult::Requested
            } else {
                match current_status(&mut tx, &run_id).await? {
                    None => CancelResult::UnknownRun,
                    Some((status, _)) => CancelResult::AlreadyFinal(status),
                }
            }
        };
        tx.commit().await.map_err(unavailable)?;
        Ok(result)
    }

    async fn retry(&self, id: RunId, now: DateTime<Utc>) -> Result<RetryResult, StoreError> {
        let run_id = id.to_string();
        let mut tx = self.writer.begin().await.map_err(unavailable)?;
        let row = sqlx::query(
            "UPDATE runs SET status = 'queued', exit_code = NULL, reason = NULL, reason_code = NULL, \
             finished_at = NULL, not_before = NULL, cancel_requested = 0 \
             WHERE id = ? AND status IN ('failed', 'timed_out', 'lost') RETURNING attempt",
        )
        .bind(&run_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(unavailable)?;
        let Some(row) = row else {
            let current = current_status(&mut tx, &run_id).await?;
            tx.rollback().await.map_err(unavailable)?;
            return Ok(match current {
                None => RetryResult::UnknownRun,
                Some((status, _)) => RetryResult::NotRetryable(status),
            });
        };
        let attempt: i64 = row.try_get("attempt").map_err(unavailable)?;
        sqlx::query("INSERT INTO outbox (run_id, attempt, created_at) VALUES (?, ?, ?)")
            .bind(&run_id)
            .bind(attempt + 1)
            .bind(ms(now))
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        Ok(RetryResult::Queued {
            attempt: u32::try_from(attempt + 1).unwrap_or(u32::MAX),
        })
    }

    async fn expire_leases(&self, now: DateTime<Utc>) -> Result<Vec<RunId>, StoreError> {
        let expired = sqlx::query(
            "SELECT run_id, attempt, epoch, worker_id, lease_expires_at FROM attempts \
             WHERE status = 'running' AND lease_expires_at < ? LIMIT 256",
        )
        .bind(ms(now))
        .fetch_all(&self.reader)
        .await
        .map_err(unavailable)?;
        let mut changed = Vec::new();
        for row in &expired {
            let run_id: String = row.try_get("run_id").map_err(unavailable)?;
            let attempt: i64 = row.try_get("attempt").map_err(unavailable)?;
            let epoch: i64 = row.try_get("epoch").map_err(unavailable)?;
            let worker: String = row.try_get("worker_id").map_err(unavailable)?;
            let expired_at = from_ms(row.try_get("lease_expires_at").map_err(unavailable)?)
                .map(|t| t.to_rfc3339())
                .unwrap_or_default();
            let mut tx = self.writer.begin().await.map_err(unavailable)?;
            let cancel: Option<i64> = sqlx::query_scalar(
                "SELECT cancel_requested FROM runs WHERE id = ? AND status = 'running' AND attempt = ?",
            )
            .bind(&run_id)
            .bind(attempt)
            .fetch_optional(&mut *tx)
            .await
            .map_err(unavailable)?;
            let (status, reason, code) = if cancel.unwrap_or(0) != 0 {
                (
                    RunStatus::Cancelled,
                    format!(
                        "cancelled; worker {worker} stopped renewing its lease (expired {expired_at}) before reporting the container stopped"
                    ),
                    ReasonCode::Cancelled,
                )
            } else {
                (
                    RunStatus::Lost,
                    format!(
                        "lost: worker {worker} stopped renewing its lease (expired {expired_at}); the container's outcome is unknown"
                    ),
                    ReasonCode::Lost,
                )
            };
            // Re-checked in the update: a heartbeat may have renewed it meanwhile.
            let done = sqlx::query(
                "UPDATE attempts SET status = ?, reason = ?, reason_code = ?, finished_at = ? \
                 WHERE run_id = ? AND attempt = ? AND epoch = ? AND status = 'running' AND lease_expires_at < ?",
            )
            .bind(status.as_str())
            .bind(&reason)
            .bind(code.as_str())
            .bind(ms(now))
            .bind(&run_id)
            .bind(attempt)
            .bind(epoch)
            .bind(ms(now))
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
            if done.rows_affected() == 1 && cancel.is_some() {
                let ending = Ending {
                    status,
                    exit_code: None,
                    reason: Some(&reason),
                    reason_code: Some(code),
                };
                let attempt =
                    u32::try_from(attempt).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                settle(&mut tx, &run_id, attempt, &ending, now).await?;
                changed.push(run_id.parse().map_err(corrupt_id)?);
            }
            tx.commit().await.map_err(unavailable)?;
        }
        Ok(changed)
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
        .map_err(unavailable)?;
        Ok(found.is_some())
    }

    async fn add_log_dropped(&self, lease: Lease, bytes: u64) -> Result<(), StoreError> {
        let bytes = i64::try_from(bytes).unwrap_or(i64::MAX);
        let id = lease.run_id.to_string();
        let mut tx = self.writer.begin().await.map_err(unavailable)?;
        let done = sqlx::query(
            "UPDATE attempts SET log_dropped_bytes = log_dropped_bytes + ? WHERE run_id = ? AND attempt = ? AND epoch = ?",
        )
        .bind(bytes)
        .bind(&id)
        .bind(i64::from(lease.attempt))
        .bind(lease.epoch)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        if done.rows_affected() == 1 {
            sqlx::query("UPDATE runs SET log_dropped_bytes = log_dropped_bytes + ? WHERE id = ?")
                .bind(bytes)
                .bind(&id)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
        }
        tx.commit().await.map_err(unavailable)
    }

    async fn held_attempts(&self, worker_id: &str) -> Result<Vec<HeldAttempt>, StoreError> {
        let rows = sqlx::query(
            "SELECT run_id, attempt, epoch, container_id FROM attempts WHERE worker_id = ? AND status = 'running'",
        )
        .bind(worker_id)
        .fetch_all(&self.reader)
        .await
        .map_err(unavailable)?;
        rows.iter()
            .map(|row| {
                let run_id: String = row.try_get("run_id").map_err(unavailable)?;
                let attempt: i64 = row.try_get("attempt").map_err(unavailable)?;
                Ok(HeldAttempt {
                    lease: Lease {
                        run_id: run_id.parse().map_err(corrupt_id)?,
                        attempt: u32::try_from(attempt)
                            .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                        epoch: row.try_get("epoch").map_err(unavailable)?,
                    },
                    container_id: row.try_get("container_id").map_err(unavailable)?,
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
        let id = run_id.to_string();
        let row = sqlx::query(
            "UPDATE attempts SET lease_expires_at = ?1 \
             WHERE run_id = ?2 AND attempt = ?3 AND worker_id = ?4 AND status = 'running' \
             RETURNING epoch, (SELECT job FROM runs WHERE id = ?2) AS job, \
                       (SELECT spec FROM runs WHERE id = ?2) AS spec",
        )
        .bind(ms(now) + ttl_ms(lease_ttl))
        .bind(&id)
        .bind(i64::from(attempt))
        .bind(worker_id)
        .fetch_optional(&self.writer)
        .await
        .map_err(unavailable)?;
        match row {
            None => Ok(AdoptResult::Stale),
            Some(row) => {
                let message = RunMessage { run_id, attempt };
                Ok(AdoptResult::Held(Box::new(claim_from_row(
                    &row, message, lease_ttl,
                )?)))
            }
        }
    }

    async fn release(&self, lease: Lease, now: DateTime<Utc>) -> Result<LeaseStatus, StoreError> {
        let id = lease.run_id.to_string();
        let attempt = i64::from(lease.attempt);
        let mut tx = self.writer.begin().await.map_err(unavailable)?;
        let done = sqlx::query(
            "DELETE FROM attempts WHERE run_id = ? AND attempt = ? AND epoch = ? \
             AND status = 'running' AND container_id IS NULL",
        )
        .bind(&id)
        .bind(attempt)
        .bind(lease.epoch)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        if done.rows_affected() == 0 {
            tx.rollback().await.map_err(unavailable)?;
            return Ok(LeaseStatus::Lost);
        }
        // The attempt never started a container: as if it had never been claimed. A
        // cancel that came meanwhile ends the run here.
        let row = sqlx::query(
            "UPDATE runs SET attempt = attempt - 1, epoch = epoch + 1, \
               status = CASE cancel_requested WHEN 0 THEN 'queued' ELSE 'cancelled' END, \
               reason = CASE cancel_requested WHEN 0 THEN NULL ELSE 'cancelled before it started' END, \
               reason_code = CASE cancel_requested WHEN 0 THEN NULL ELSE 'cancelled' END, \
               finished_at = CASE cancel_requested WHEN 0 THEN NULL ELSE ?1 END \
             WHERE id = ?2 AND attempt = ?3 AND status = 'running' RETURNING status",
        )
        .bind(ms(now))
        .bind(&id)
        .bind(attempt)
        .fetch_optional(&mut *tx)
        .await
        .map_err(unavailable)?;
        if let Some(row) = row {
            let status: String = row.try_get("status").map_err(unavailable)?;
            if status == "queued" {
                sqlx::query("INSERT INTO outbox (run_id, attempt, created_at) VALUES (?, ?, ?)")
                    .bind(&id)
                    .bind(attempt)
                    .bind(ms(now))
                    .execute(&mut *tx)
                    .await
                    .map_err(unavailable)?;
            }
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(LeaseStatus::Held { cancel: false })
    }
}

async fn current_status(
    tx: &mut sqlx::SqliteConnection,
    run_id: &str,
) -> Result<Option<(RunStatus, u32)>, StoreError> {
    let row = sqlx::query("SELECT status, attempt FROM runs WHERE id = ?")
        .bind(run_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(unavailable)?;
    let Some(row) = row else { return Ok(None) };
    let status: String = row.try_get("status").map_err(unavailable)?;
    let attempt: i64 = row.try_get("attempt").map_err(unavailable)?;
    Ok(Some((
        status
            .parse()
            .map_err(|e: crate::domain::run::InvalidStatus| StoreError::Corrupt(e.to_string()))?,
        u32::try_from(attempt).unwrap_or(0),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::job::{PullPolicy, Resources};

    fn new_run() -> NewRun {
        NewRun {
            id: RunId::new(),
            job: "hello".into(),
            params: BTreeMap::from([("who".to_owned(), "x".to_owned())]),
            spec: ResolvedSpec {
                image: "img:1".into(),
                command: vec!["echo".into(), "x".into()],
                workdir: None,
                user: None,
                env: BTreeMap::new(),
                pull: PullPolicy::Never,
                resources: Resources::default(),
                timeout: Some(Duration::from_secs(5)),
                stop_grace: Duration::from_secs(1),
                network: "none".into(),
            },
            retry: RetryPolicy::default(),
            created_at: Utc::now(),
        }
    }

    #[tokio::test]
    async fn a_run_goes_from_outbox_to_claim_to_final_state_guarded_by_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).await.unwrap();
        let run = new_run();
        store.insert_run(&run, None).await.unwrap();
        let pending = store.pending_outbox(10, Utc::now()).await.unwrap();
        assert_eq!(pending.len(), 1);
        let message = pending[0].message;
        assert_eq!(
            message,
            RunMessage {
                run_id: run.id,
                attempt: 1
            }
        );
        store
            .mark_outbox_sent(&[pending[0].id], Utc::now())
            .await
            .unwrap();
        assert!(
            store
                .pending_outbox(10, Utc::now())
                .await
                .unwrap()
                .is_empty()
        );

        let ttl = Duration::from_secs(30);
        let ClaimResult::Claimed(claim) =
            store.claim(message, "w1", ttl, Utc::now()).await.unwrap()
        else {
            panic!("first claim refused")
        };
        assert_eq!(claim.spec, run.spec);
        // The same worker asking again (a lost answer) gets the same lease back...
        let ClaimResult::Claimed(again) =
            store.claim(message, "w1", ttl, Utc::now()).await.unwrap()
        else {
            panic!("repeated claim refused")
        };
        assert_eq!(again.lease, claim.lease);
        // ...another worker does not.
        assert!(matches!(
            store.claim(message, "w2", ttl, Utc::now()).await.unwrap(),
            ClaimResult::NotClaimable {
                status: RunStatus::Running,
                attempt: 1
            }
        ));
        assert_eq!(
            store
                .mark_started(claim.lease, "c1", ttl, Utc::now())
                .await
                .unwrap(),
            LeaseStatus::Held { cancel: false }
        );
        // Once started, not even the same worker re-claims it.
        assert!(matches!(
            store.claim(message, "w1", ttl, Utc::now()).await.unwrap(),
            ClaimResult::NotClaimable { .. }
        ));

        let stale = Lease {
            epoch: claim.lease.epoch + 1,
            ..claim.lease
        };
        let outcome = Outcome::Exited { code: 3 };
        assert_eq!(
            store.finish(stale, &outcome, 0, Utc::now()).await.unwrap(),
            LeaseStatus::Lost
        );
        assert_eq!(
            store
                .finish(claim.lease, &outcome, 0, Utc::now())
                .await
                .unwrap(),
            LeaseStatus::Held { cancel: false }
        );
        let stored = store.get_run(run.id).await.unwrap().unwrap();
        assert_eq!(stored.status, RunStatus::Failed);
        assert_eq!(stored.exit_code, Some(3));
        assert_eq!(stored.reason.as_deref(), Some("exit_code 3"));
        assert!(stored.started_at.is_some() && stored.finished_at.is_some());
        // A final run is not finished twice.
        assert_eq!(
            store
                .finish(claim.lease, &outcome, 0, Utc::now())
                .await
                .unwrap(),
            LeaseStatus::Lost
        );
    }

    #[tokio::test]
    async fn unclaimed_runs_are_published_again_for_a_volatile_queue() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).await.unwrap();
        let (waiting, taken) = (new_run(), new_run());
        store.insert_run(&waiting, None).await.unwrap();
        store.insert_run(&taken, None).await.unwrap();
        let ids: Vec<i64> = store
            .pending_outbox(10, Utc::now())
            .await
            .unwrap()
            .iter()
            .map(|e| e.id)
            .collect();
        store.mark_outbox_sent(&ids, Utc::now()).await.unwrap();
        let claimed = RunMessage {
            run_id: taken.id,
            attempt: 1,
        };
        store
            .claim(claimed, "w", Duration::from_secs(30), Utc::now())
            .await
            .unwrap();

        assert_eq!(store.requeue_unclaimed().await.unwrap(), 1);
        let pending = store.pending_outbox(10, Utc::now()).await.unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].message.run_id, waiting.id);
    }

    async fn claimed(store: &SqliteStore, run: &NewRun, attempt: u32, ttl: Duration) -> Claim {
        let message = RunMessage {
            run_id: run.id,
            attempt,
        };
        match store.claim(message, "w1", ttl, Utc::now()).await.unwrap() {
            ClaimResult::Claimed(c) => *c,
            other => panic!("claim refused: {other:?}"),
        }
    }

    #[tokio::test]
    async fn retry_rules_queue_the_next_attempt_after_its_backoff() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).await.unwrap();
        let mut run = new_run();
        run.retry = RetryPolicy {
            max_attempts: 2,
            backoff: Duration::from_secs(60),
            on_exit_codes: [1].into(),
            ..RetryPolicy::default()
        };
        store.insert_run(&run, None).await.unwrap();
        let ttl = Duration::from_secs(30);
        let first = claimed(&store, &run, 1, ttl).await;
        let now = Utc::now();
        store
            .finish(first.lease, &Outcome::Exited { code: 1 }, 0, now)
            .await
            .unwrap();
        let stored = store.get_run(run.id).await.unwrap().unwrap();
        assert_eq!(stored.status, RunStatus::Queued);
        assert_eq!(stored.exit_code, None);
        assert!(stored.not_before.unwrap() > now + chrono::Duration::seconds(40));
        assert_eq!(stored.attempts.len(), 1);
        assert_eq!(stored.attempts[0].exit_code, Some(1));
        // The second attempt's publish waits for the backoff.
        let due_now = store.pending_outbox(10, now).await.unwrap();
        assert!(due_now.iter().all(|e| e.message.attempt == 1));
        let later = store
            .pending_outbox(10, now + chrono::Duration::seconds(80))
            .await
            .unwrap();
        assert!(later.iter().any(|e| e.message.attempt == 2));
        // ...and so does a claim that comes early.
        assert!(matches!(
            store
                .claim(
                    RunMessage {
                        run_id: run.id,
                        attempt: 2
                    },
                    "w1",
                    ttl,
                    now
                )
                .await
                .unwrap(),
            ClaimResult::NotClaimable { .. }
        ));
        let second = match store
            .claim(
                RunMessage {
                    run_id: run.id,
                    attempt: 2,
                },
                "w1",
                ttl,
                now + chrono::Duration::seconds(80),
            )
            .await
            .unwrap()
        {
            ClaimResult::Claimed(c) => *c,
            other => panic!("{other:?}"),
        };
        store
            .finish(second.lease, &Outcome::Exited { code: 1 }, 0, Utc::now())
            .await
            .unwrap();
        let stored = store.get_run(run.id).await.unwrap().unwrap();
        assert_eq!(stored.status, RunStatus::Failed, "attempts ran out");
        assert_eq!(stored.attempt, 2);
        assert_eq!(stored.attempts.len(), 2);
    }

    #[tokio::test]
    async fn expired_leases_become_lost_and_a_person_can_retry() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).await.unwrap();
        let run = new_run();
        store.insert_run(&run, None).await.unwrap();
        let claim = claimed(&store, &run, 1, Duration::from_millis(10)).await;
        let later = Utc::now() + chrono::Duration::seconds(1);
        assert_eq!(store.expire_leases(later).await.unwrap(), vec![run.id]);
        let stored = store.get_run(run.id).await.unwrap().unwrap();
        assert_eq!(stored.status, RunStatus::Lost);
        assert_eq!(stored.reason_code, Some(ReasonCode::Lost));
        assert!(stored.reason.unwrap().contains("w1"));
        // The vanished worker's late report is refused.
        assert_eq!(
            store
                .finish(claim.lease, &Outcome::Exited { code: 0 }, 0, later)
                .await
                .unwrap(),
            LeaseStatus::Lost
        );
        assert_eq!(
            store.retry(run.id, later).await.unwrap(),
            RetryResult::Queued { attempt: 2 }
        );
        assert_eq!(
            store.retry(run.id, later).await.unwrap(),
            RetryResult::NotRetryable(RunStatus::Queued)
        );
        let second = claimed(&store, &run, 2, Duration::from_secs(30)).await;
        assert!(second.lease.epoch > claim.lease.epoch);
    }

    #[tokio::test]
    async fn cancel_ends_a_queued_run_and_flags_a_running_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).await.unwrap();
        let (queued, running) = (new_run(), new_run());
        store.insert_run(&queued, None).await.unwrap();
        store.insert_run(&running, None).await.unwrap();
        let claim = claimed(&store, &running, 1, Duration::from_secs(30)).await;
        let now = Utc::now();
        assert_eq!(
            store.cancel(queued.id, now).await.unwrap(),
            CancelResult::Cancelled
        );
        assert!(
            store
                .pending_outbox(10, now)
                .await
                .unwrap()
                .iter()
                .all(|e| e.message.run_id != queued.id),
            "a cancelled run is not published"
        );
        assert_eq!(
            store.cancel(running.id, now).await.unwrap(),
            CancelResult::Requested
        );
        assert_eq!(
            store
                .renew_lease(claim.lease, Duration::from_secs(30), now)
                .await
                .unwrap(),
            LeaseStatus::Held { cancel: true }
        );
        assert_eq!(
            store.cancel(queued.id, now).await.unwrap(),
            CancelResult::AlreadyFinal(RunStatus::Cancelled)
        );
        assert_eq!(
            store.cancel(RunId::new(), now).await.unwrap(),
            CancelResult::UnknownRun
        );
    }

    #[tokio::test]
    async fn idempotency_keys_return_the_first_run() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).await.unwrap();
        let key = IdempotencyKey {
            scope: String::new(),
            key: "k1".into(),
            job: "hello".into(),
            fingerprint: "{}".into(),
        };
        let first = new_run();
        assert_eq!(
            store.insert_run(&first, Some(&key)).await.unwrap(),
            Inserted::New
        );
        assert_eq!(
            store.insert_run(&new_run(), Some(&key)).await.unwrap(),
            Inserted::Existing(first.id)
        );
        let other = IdempotencyKey {
            fingerprint: "{\"a\":\"1\"}".into(),
            ..key.clone()
        };
        assert_eq!(
            store.insert_run(&new_run(), Some(&other)).await.unwrap(),
            Inserted::KeyReused {
                job: "hello".into()
            }
        );
        // After the window the key is free again.
        let mut late = new_run();
        late.created_at = Utc::now() + chrono::Duration::hours(25);
        assert_eq!(
            store.insert_run(&late, Some(&key)).await.unwrap(),
            Inserted::New
        );
    }

    #[tokio::test]
    async fn an_unstarted_attempt_can_be_released_and_an_adopted_one_renewed() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).await.unwrap();
        let run = new_run();
        store.insert_run(&run, None).await.unwrap();
        let ttl = Duration::from_secs(30);
        let claim = claimed(&store, &run, 1, ttl).await;
        assert_eq!(store.held_attempts("w1").await.unwrap().len(), 1);
        store.release(claim.lease, Utc::now()).await.unwrap();
        let stored = store.get_run(run.id).await.unwrap().unwrap();
        assert_eq!((stored.status, stored.attempt), (RunStatus::Queued, 0));
        assert!(store.held_attempts("w1").await.unwrap().is_empty());

        let claim = claimed(&store, &run, 1, ttl).await;
        store
            .mark_started(claim.lease, "c1", ttl, Utc::now())
            .await
            .unwrap();
        // Started: not releasable, but adoptable by its own worker only.
        assert_eq!(
            store.release(claim.lease, Utc::now()).await.unwrap(),
            LeaseStatus::Lost
        );
        assert!(matches!(
            store.adopt(run.id, 1, "w2", ttl, Utc::now()).await.unwrap(),
            AdoptResult::Stale
        ));
        match store.adopt(run.id, 1, "w1", ttl, Utc::now()).await.unwrap() {
            AdoptResult::Held(c) => assert_eq!(c.lease, claim.lease),
            AdoptResult::Stale => panic!("own attempt not adoptable"),
        }
    }

    #[tokio::test]
    async fn only_unclaimed_due_runs_sent_long_ago_are_published_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).await.unwrap();
        let (waiting, taken) = (new_run(), new_run());
        store.insert_run(&waiting, None).await.unwrap();
        store.insert_run(&taken, None).await.unwrap();
        let now = Utc::now();
        let ids: Vec<i64> = store
            .pending_outbox(10, now)
            .await
            .unwrap()
            .iter()
            .map(|e| e.id)
            .collect();
        store.mark_outbox_sent(&ids, now).await.unwrap();
        claimed(&store, &taken, 1, Duration::from_secs(30)).await;
        // Sent just now: not yet.
        let just_before = now - chrono::Duration::seconds(1);
        assert!(
            store
                .republish_unclaimed(just_before, now)
                .await
                .unwrap()
                .is_empty()
        );
        let later = now + chrono::Duration::seconds(1);
        assert_eq!(
            store.republish_unclaimed(later, later).await.unwrap(),
            vec![waiting.id]
        );
        let pending = store.pending_outbox(10, later).await.unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].message.run_id, waiting.id);
    }
}
