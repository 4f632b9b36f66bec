//! Runs and idempotency keys: accept, read, cancel, and a person's retry.

use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::admission::{admit_waiting, admits_arrival, set_admitted};
use super::callbacks::oblige;
use super::outbox::{drop_pending, enqueue};
use super::replies::{finished_replies_due, insert_replies};
use super::{
    ATTEMPT_COLUMNS, RUN_COLUMNS, SqliteStore, admission_col, attempt_from_row, col, corrupt, db,
    ms, run_from_row, run_id_col, run_state, ttl_ms,
};
use crate::domain::auth::JobFilter;
use crate::domain::ports::{
    CancelResult, IDEMPOTENCY_WINDOW, IdempotencyKey, Inserted, NewRun, RetryResult, RunFilter,
    RunRecords, StoreError,
};
use crate::domain::retry::RetryPolicy;
use crate::domain::run::{Attempt, Run, RunId};
use crate::domain::transition::Ending;
use crate::protocol::{RetryV1, SpecV1, admission_text, trigger_text};

impl SqliteStore {
    /// Fill in each run's attempts, with one query for all of them.
    async fn with_attempts(&self, mut runs: Vec<Run>) -> Result<Vec<Run>, StoreError> {
        if runs.is_empty() {
            return Ok(runs);
        }
        let ids: Vec<String> = runs.iter().map(|r| r.id.to_string()).collect();
        let ids = serde_json::to_string(&ids).map_err(|e| corrupt("run ids", e))?;
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {ATTEMPT_COLUMNS} FROM attempts WHERE run_id IN (SELECT value FROM json_each(?)) \
             ORDER BY run_id, attempt"
        ));
        let rows = sqlx::query(sql)
            .bind(&ids)
            .fetch_all(&self.reader)
            .await
            .map_err(db)?;
        let mut by_run: BTreeMap<RunId, Vec<Attempt>> = BTreeMap::new();
        for row in &rows {
            let (run_id, attempt) = attempt_from_row(row)?;
            by_run.entry(run_id).or_default().push(attempt);
        }
        let mut callbacks = self.callbacks_of(&ids).await?;
        let mut replies = super::replies::replies_of(self, &ids).await?;
        for run in &mut runs {
            if let Some(attempts) = by_run.remove(&run.id) {
                run.attempts = attempts;
            }
            if let Some(found) = callbacks.remove(&run.id) {
                run.callbacks = found;
            }
            if let Some(r) = replies.remove(&run.id) {
                run.replies = r;
            }
        }
        Ok(runs)
    }
}

/// A run ends without an attempt to settle (cancelled before it started, or an unstarted
/// attempt given back after a cancel): final at once, no backoff left. Its job's waiting
/// runs are admitted as far as there is room now.
pub(super) async fn end_run(
    conn: &mut sqlx::SqliteConnection,
    run_id: RunId,
    ending: &Ending,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let job = finalize(conn, run_id, ending, now).await?;
    admit_waiting(conn, &job, now).await?;
    Ok(())
}

/// Write the run's final state and, when it has a callback, the obligation to announce
/// it (in the same transaction: a final run never misses its callback); returns its job.
/// Every way a run becomes final comes through here.
async fn finalize(
    conn: &mut sqlx::SqliteConnection,
    run_id: RunId,
    ending: &Ending,
    now: DateTime<Utc>,
) -> Result<String, StoreError> {
    let row = sqlx::query(
        "UPDATE runs SET status = ?, exit_code = ?, reason = ?, reason_code = ?, finished_at = ?, \
         not_before = NULL WHERE id = ? RETURNING job, callback_url",
    )
    .bind(ending.status.as_str())
    .bind(ending.exit_code)
    .bind(ending.reason.as_deref())
    .bind(ending.reason_code.map(|c| c.as_str()))
    .bind(ms(now))
    .bind(run_id.to_string())
    .fetch_one(&mut *conn)
    .await
    .map_err(db)?;
    let callback: Option<String> = col(&row, "callback_url")?;
    if let Some(url) = callback {
        oblige(conn, run_id, &url, now).await?;
    }
    finished_replies_due(conn, run_id).await?;
    col(&row, "job")
}

/// Store a new run: admitted at once (with the outbox row of its first attempt) when
/// its admission rule allows and nothing of its job waits before it, else waiting.
/// Inside the caller's transaction.
pub(super) async fn insert_new_run(
    conn: &mut sqlx::SqliteConnection,
    run: &NewRun,
) -> Result<(), StoreError> {
    let params = serde_json::to_string(&run.params).map_err(|e| corrupt("params", e))?;
    let spec = serde_json::to_string(&SpecV1::from(&run.spec)).map_err(|e| corrupt("spec", e))?;
    let retry = (run.retry != RetryPolicy::default())
        .then(|| serde_json::to_string(&RetryV1::from(&run.retry)))
        .transpose()
        .map_err(|e| corrupt("retry", e))?;
    let trigger = trigger_text(&run.trigger).map_err(|e| corrupt("trigger", e))?;
    let admitted = admits_arrival(conn, &run.job, run.admission).await?;
    sqlx::query(
        "INSERT INTO runs (id, job, params, spec, retry, status, created_at, \"trigger\", admission, admitted, \
         callback_url, requested_by) VALUES (?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?)",
    )
    .bind(run.id.to_string())
    .bind(&run.job)
    .bind(params)
    .bind(spec)
    .bind(retry)
    .bind(ms(run.created_at))
    .bind(trigger)
    .bind(admission_text(run.admission))
    .bind(i64::from(admitted))
    .bind(run.callback.as_ref().map(|c| c.url.as_str()))
    .bind(run.requester.requested_by.as_deref())
    .execute(&mut *conn)
    .await
    .map_err(db)?;
    insert_replies(conn, run).await?;
    if admitted {
        enqueue(conn, run.id, 1, run.created_at, None).await?;
    }
    Ok(())
}

/// What `cancel` does to one run, inside the caller's transaction; `admit` says whether
/// the job's waiting runs are admitted when it ends (a caller cancelling several runs
/// of a job admits once, after the last).
pub(super) async fn cancel_run(
    conn: &mut sqlx::SqliteConnection,
    id: RunId,
    admit: bool,
    now: DateTime<Utc>,
) -> Result<CancelResult, StoreError> {
    let Some(run) = run_state(conn, id).await? else {
        return Ok(CancelResult::UnknownRun);
    };
    let result = run.cancel();
    match result {
        CancelResult::Cancelled => {
            // Not started (first attempt, a retry waiting out its backoff, or a run
            // waiting for admission): final at once, and its pending publish is dropped.
            let ending = Ending::cancelled_before_start();
            if admit {
                end_run(conn, id, &ending, now).await?;
            } else {
                finalize(conn, id, &ending, now).await?;
            }
            flag_cancel(conn, id).await?;
            drop_pending(conn, id, "run cancelled", now).await?;
        }
        CancelResult::Requested => flag_cancel(conn, id).await?,
        CancelResult::AlreadyFinal(_) | CancelResult::UnknownRun => {}
    }
    Ok(result)
}

#[async_trait]
impl RunRecords for SqliteStore {
    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.reader)
            .await
            .map_err(db)?;
        Ok(())
    }

    async fn insert_run(
        &self,
        run: &NewRun,
        key: Option<&IdempotencyKey>,
    ) -> Result<Inserted, StoreError> {
        let id = run.id.to_string();
        let now = ms(run.created_at);
        let mut tx = self.begin_write().await?;
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
            .map_err(db)?;
            let seen = sqlx::query(
                "SELECT job, params, run_id FROM idempotency_keys WHERE scope = ? AND key = ?",
            )
            .bind(&key.scope)
            .bind(&key.key)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db)?;
            if let Some(row) = seen {
                let job: String = col(&row, "job")?;
                let fingerprint: String = col(&row, "params")?;
                let run_id = run_id_col(&row, "run_id")?;
                tx.rollback();
                return Ok(if job == key.job && fingerprint == key.fingerprint {
                    Inserted::Existing(run_id)
                } else {
                    Inserted::KeyReused { job }
                });
            }
        }
        insert_new_run(&mut tx, run).await?;
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
            .map_err(db)?;
        }
        tx.commit().await?;
        Ok(Inserted::New)
    }

    async fn get_run(&self, id: RunId) -> Result<Option<Run>, StoreError> {
        let sql = sqlx::AssertSqlSafe(format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?"));
        let row = sqlx::query(sql)
            .bind(id.to_string())
            .fetch_optional(&self.reader)
            .await
            .map_err(db)?;
        let Some(run) = row.as_ref().map(run_from_row).transpose()? else {
            return Ok(None);
        };
        Ok(self.with_attempts(vec![run]).await?.pop())
    }

    async fn list_runs(&self, filter: &RunFilter) -> Result<Vec<Run>, StoreError> {
        // The caller's job globs become SQLite GLOBs: a scope glob has only `*`, `?`
        // and characters that stand for themselves, which GLOB reads the same way.
        let globs = match &filter.jobs {
            JobFilter::All => None,
            JobFilter::Globs(globs) if globs.is_empty() => return Ok(Vec::new()),
            JobFilter::Globs(globs) => Some(globs),
        };
        let glob_clause = globs.map_or_else(String::new, |globs| {
            let any: Vec<String> = (0..globs.len())
                .map(|i| format!("job GLOB ?{}", i + 7))
                .collect();
            format!(" AND ({})", any.join(" OR "))
        });
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE (?1 IS NULL OR job = ?1) AND (?2 IS NULL OR status = ?2) \
             AND (?4 IS NULL OR COALESCE(json_extract(\"trigger\", '$.type'), 'api') = ?4) \
             AND (?5 IS NULL OR created_at >= ?5) AND (?6 IS NULL OR created_at < ?6) \
             {glob_clause} ORDER BY id DESC LIMIT ?3"
        ));
        let mut query = sqlx::query(sql)
            .bind(filter.job.as_deref())
            .bind(filter.status.map(|s| s.as_str()))
            .bind(i64::from(filter.limit))
            .bind(filter.trigger)
            .bind(filter.created_from.map(ms))
            .bind(filter.created_before.map(ms));
        for glob in globs.into_iter().flatten() {
            query = query.bind(glob.as_str());
        }
        let rows = query.fetch_all(&self.reader).await.map_err(db)?;
        let runs = rows
            .iter()
            .map(run_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        self.with_attempts(runs).await
    }

    async fn cancel(&self, id: RunId, now: DateTime<Utc>) -> Result<CancelResult, StoreError> {
        let mut tx = self.begin_write().await?;
        let result = cancel_run(&mut tx, id, true, now).await?;
        tx.commit().await?;
        Ok(result)
    }

    async fn retry(&self, id: RunId, now: DateTime<Utc>) -> Result<RetryResult, StoreError> {
        let mut tx = self.begin_write().await?;
        let Some(run) = run_state(&mut tx, id).await? else {
            return Ok(RetryResult::UnknownRun);
        };
        let result = run.retry();
        if let RetryResult::Queued { attempt } = result {
            // Through the job's admission like a new run; read while this run is still
            // final, so it does not count against itself.
            let row = sqlx::query("SELECT job, admission FROM runs WHERE id = ?")
                .bind(id.to_string())
                .fetch_one(&mut *tx)
                .await
                .map_err(db)?;
            let job: String = col(&row, "job")?;
            let admitted = admits_arrival(&mut tx, &job, admission_col(&row)?).await?;
            sqlx::query(
                "UPDATE runs SET status = 'queued', exit_code = NULL, reason = NULL, reason_code = NULL, \
                 finished_at = NULL, not_before = NULL, cancel_requested = 0 WHERE id = ?",
            )
            .bind(id.to_string())
            .execute(&mut *tx)
            .await
            .map_err(db)?;
            set_admitted(&mut tx, id, attempt, admitted, now).await?;
            tx.commit().await?;
        }
        Ok(result)
    }
}

/// Ask the run's worker to stop it (seen at its next heartbeat); also keeps a cancelled
/// run from ever being retried by rule.
async fn flag_cancel(conn: &mut sqlx::SqliteConnection, id: RunId) -> Result<(), StoreError> {
    sqlx::query("UPDATE runs SET cancel_requested = 1 WHERE id = ?")
        .bind(id.to_string())
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    Ok(())
}
