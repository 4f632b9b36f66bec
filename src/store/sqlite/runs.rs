//! Runs and idempotency keys: accept, read, cancel, and a person's retry.

use crate::store::common::RunTexts;
use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::admission::{admit_waiting, admits_arrival, set_admitted};
use super::callbacks::oblige;
use super::outbox::{drop_pending, enqueue};
use super::replies::{finished_replies_due, insert_replies};
use super::sync::{admission_get, exec, first, get, run_id_get, run_state};
use super::{
    ATTEMPT_COLUMNS, RUN_COLUMNS, SqliteStore, attempt_from_row, corrupt, db, ms, run_from_row,
    ttl_ms,
};
use crate::domain::auth::JobFilter;
use crate::domain::ports::{
    CancelResult, IDEMPOTENCY_WINDOW, IdempotencyKey, Inserted, NewRun, RetryResult, RunFilter,
    RunRecords, StoreError,
};
use crate::domain::run::{Attempt, Run, RunId};
use crate::domain::transition::Ending;
use crate::protocol::admission_text;

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
pub(super) fn end_run(
    conn: &rusqlite::Connection,
    run_id: RunId,
    ending: &Ending,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let job = finalize(conn, run_id, ending, now)?;
    admit_waiting(conn, &job, now)?;
    Ok(())
}

/// Write the run's final state and, when it has a callback, the obligation to announce
/// it (in the same transaction: a final run never misses its callback); returns its job.
/// Every way a run becomes final comes through here.
fn finalize(
    conn: &rusqlite::Connection,
    run_id: RunId,
    ending: &Ending,
    now: DateTime<Utc>,
) -> Result<String, StoreError> {
    let (job, callback) = first(
        conn,
        "UPDATE runs SET status = ?, exit_code = ?, reason = ?, reason_code = ?, finished_at = ?, \
         not_before = NULL WHERE id = ? RETURNING job, callback_url",
        rusqlite::params![
            ending.status.as_str(),
            ending.exit_code,
            ending.reason.as_deref(),
            ending.reason_code.map(|c| c.as_str()),
            ms(now),
            run_id.to_string()
        ],
        |row| {
            Ok((
                get::<String>(row, "job")?,
                get::<Option<String>>(row, "callback_url")?,
            ))
        },
    )?
    .ok_or_else(|| corrupt("run", format!("run {run_id} is missing")))?;
    if let Some(url) = callback {
        oblige(conn, run_id, &url, now)?;
    }
    finished_replies_due(conn, run_id)?;
    Ok(job)
}

/// Store a new run: admitted at once (with the outbox row of its first attempt) when
/// its admission rule allows and nothing of its job waits before it, else waiting.
/// Inside the caller's transaction.
pub(super) fn insert_new_run(conn: &rusqlite::Connection, run: &NewRun) -> Result<(), StoreError> {
    let RunTexts {
        params,
        spec,
        retry,
        trigger,
    } = RunTexts::of(run)?;
    let admitted = admits_arrival(conn, &run.job, run.admission)?;
    exec(
        conn,
        "INSERT INTO runs (id, job, params, spec, retry, status, created_at, \"trigger\", admission, admitted, \
         callback_url, requested_by) VALUES (?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?)",
        rusqlite::params![
            run.id.to_string(),
            &run.job,
            params,
            spec,
            retry,
            ms(run.created_at),
            trigger,
            admission_text(run.admission),
            i64::from(admitted),
            run.callback.as_ref().map(|c| c.url.as_str()),
            run.requester.requested_by.as_deref(),
        ],
    )?;
    insert_replies(conn, run)?;
    if admitted {
        enqueue(conn, run.id, 1, run.created_at, None)?;
    }
    Ok(())
}

/// Store a new run, or answer with the run its idempotency key already names. Inside a
/// group transaction: a key seen again changes nothing.
fn insert_run_now(
    conn: &rusqlite::Connection,
    run: &NewRun,
    key: Option<&IdempotencyKey>,
) -> Result<Inserted, StoreError> {
    let now = ms(run.created_at);
    if let Some(key) = key {
        let window = ttl_ms(IDEMPOTENCY_WINDOW);
        exec(
            conn,
            "DELETE FROM idempotency_keys WHERE scope = ? AND key = ? AND created_at < ?",
            rusqlite::params![&key.scope, &key.key, now - window],
        )?;
        let seen = first(
            conn,
            "SELECT job, params, run_id FROM idempotency_keys WHERE scope = ? AND key = ?",
            rusqlite::params![&key.scope, &key.key],
            |row| {
                let job: String = get(row, "job")?;
                let fingerprint: String = get(row, "params")?;
                Ok((job, fingerprint, run_id_get(row, "run_id")?))
            },
        )?;
        if let Some((job, fingerprint, run_id)) = seen {
            return Ok(if job == key.job && fingerprint == key.fingerprint {
                Inserted::Existing(run_id)
            } else {
                Inserted::KeyReused { job }
            });
        }
    }
    insert_new_run(conn, run)?;
    if let Some(key) = key {
        exec(
            conn,
            "INSERT INTO idempotency_keys (scope, key, job, params, run_id, created_at) \
             VALUES (?, ?, ?, ?, ?, ?)",
            rusqlite::params![
                &key.scope,
                &key.key,
                &key.job,
                &key.fingerprint,
                run.id.to_string(),
                now
            ],
        )?;
    }
    Ok(Inserted::New)
}

/// What `cancel` does to one run, inside the caller's transaction; `admit` says whether
/// the job's waiting runs are admitted when it ends (a caller cancelling several runs
/// of a job admits once, after the last).
pub(super) fn cancel_run(
    conn: &rusqlite::Connection,
    id: RunId,
    admit: bool,
    now: DateTime<Utc>,
) -> Result<CancelResult, StoreError> {
    let Some(run) = run_state(conn, id)? else {
        return Ok(CancelResult::UnknownRun);
    };
    let result = run.cancel();
    match result {
        CancelResult::Cancelled => {
            // Not started (first attempt, a retry waiting out its backoff, or a run
            // waiting for admission): final at once, and its pending publish is dropped.
            let ending = Ending::cancelled_before_start();
            if admit {
                end_run(conn, id, &ending, now)?;
            } else {
                finalize(conn, id, &ending, now)?;
            }
            flag_cancel(conn, id)?;
            drop_pending(conn, id, "run cancelled", now)?;
        }
        CancelResult::Requested => flag_cancel(conn, id)?,
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
        let run = run.clone();
        let key = key.cloned();
        self.group
            .run(move |conn| insert_run_now(conn, &run, key.as_ref()))
            .await
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
        let Some(list) = ListQuery::of(filter) else {
            return Ok(Vec::new());
        };
        let sql = sqlx::AssertSqlSafe(list.sql);
        let mut query = sqlx::query(sql);
        for value in list.binds {
            query = match value {
                Bind::Text(t) => query.bind(t),
                Bind::Int(i) => query.bind(i),
            };
        }
        let rows = query.fetch_all(&self.reader).await.map_err(db)?;
        let runs = rows
            .iter()
            .map(run_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        self.with_attempts(runs).await
    }

    async fn cancel(&self, id: RunId, now: DateTime<Utc>) -> Result<CancelResult, StoreError> {
        self.group.run(move |c| cancel_run(c, id, true, now)).await
    }

    async fn retry(&self, id: RunId, now: DateTime<Utc>) -> Result<RetryResult, StoreError> {
        self.group.run(move |c| retry_run(c, id, now)).await
    }
}

/// A person's retry of a final run: a new attempt, through the job's admission like a
/// new run. Inside a group transaction.
fn retry_run(
    conn: &rusqlite::Connection,
    id: RunId,
    now: DateTime<Utc>,
) -> Result<RetryResult, StoreError> {
    let Some(run) = run_state(conn, id)? else {
        return Ok(RetryResult::UnknownRun);
    };
    let result = run.retry();
    if let RetryResult::Queued { attempt } = result {
        // Read while this run is still final, so it does not count against itself.
        let (job, admission) = first(
            conn,
            "SELECT job, admission FROM runs WHERE id = ?",
            [id.to_string()],
            |row| Ok((get::<String>(row, "job")?, admission_get(row)?)),
        )?
        .ok_or_else(|| corrupt("run", format!("run {id} is missing")))?;
        let admitted = admits_arrival(conn, &job, admission)?;
        exec(
            conn,
            "UPDATE runs SET status = 'queued', exit_code = NULL, reason = NULL, reason_code = NULL, \
             finished_at = NULL, not_before = NULL, cancel_requested = 0 WHERE id = ?",
            [id.to_string()],
        )?;
        set_admitted(conn, id, attempt, admitted, now)?;
    }
    Ok(result)
}

/// A value the list query binds.
#[derive(Debug, PartialEq)]
enum Bind {
    Text(String),
    Int(i64),
}

/// The list's SQL with only the conditions the filter asks for: a condition written as
/// `(? IS NULL OR job = ?)` is one SQLite cannot take to an index, so every list would
/// walk the runs newest first until it found enough (the whole table for a rare job).
#[derive(Debug)]
struct ListQuery {
    sql: String,
    binds: Vec<Bind>,
}

impl ListQuery {
    /// `None` when the caller may read no job at all.
    fn of(filter: &RunFilter) -> Option<ListQuery> {
        let mut conditions: Vec<String> = Vec::new();
        let mut binds = Vec::new();
        // With a creation date, the range on `runs_by_created` is what narrows: a job or
        // a status spans all the weeks kept, and SQLite, which knows nothing of the
        // data, would pick their index and walk back to the date. A unary `+` keeps a
        // column's index out of the choice.
        let dated = filter.created_from.is_some() || filter.created_before.is_some();
        let plus = if dated { "+" } else { "" };
        if let Some(job) = &filter.job {
            conditions.push(format!("{plus}job = ?"));
            binds.push(Bind::Text(job.clone()));
        }
        if let Some(status) = filter.status {
            conditions.push(format!("{plus}status = ?"));
            binds.push(Bind::Text(status.as_str().into()));
        }
        if let Some(trigger) = filter.trigger {
            conditions.push("COALESCE(json_extract(\"trigger\", '$.type'), 'api') = ?".into());
            binds.push(Bind::Text(trigger.into()));
        }
        if let Some(from) = filter.created_from {
            conditions.push("created_at >= ?".into());
            binds.push(Bind::Int(ms(from)));
        }
        if let Some(before) = filter.created_before {
            conditions.push("created_at < ?".into());
            binds.push(Bind::Int(ms(before)));
        }
        // The caller's job globs become SQLite GLOBs: a scope glob has only `*`, `?`
        // and characters that stand for themselves, which GLOB reads the same way.
        match &filter.jobs {
            JobFilter::All => {}
            JobFilter::Globs(globs) if globs.is_empty() => return None,
            JobFilter::Globs(globs) => {
                let any = vec!["job GLOB ?"; globs.len()].join(" OR ");
                conditions.push(format!("({any})"));
                binds.extend(globs.iter().map(|g| Bind::Text(g.as_str().into())));
            }
        }
        let filter_sql = if conditions.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", conditions.join(" AND "))
        };
        binds.push(Bind::Int(i64::from(filter.limit)));
        Some(ListQuery {
            sql: format!("SELECT {RUN_COLUMNS} FROM runs{filter_sql} ORDER BY id DESC LIMIT ?"),
            binds,
        })
    }
}

/// Ask the run's worker to stop it (seen at its next heartbeat); also keeps a cancelled
/// run from ever being retried by rule.
fn flag_cancel(conn: &rusqlite::Connection, id: RunId) -> Result<(), StoreError> {
    exec(
        conn,
        "UPDATE runs SET cancel_requested = 1 WHERE id = ?",
        [id.to_string()],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};

    use super::*;
    use crate::domain::auth::JobGlob;
    use crate::domain::run::RunStatus;

    /// Only what the filter asks for reaches the SQL (so SQLite can pick the index that
    /// serves it), each value bound in the order its condition appears.
    #[test]
    fn the_list_query_holds_only_the_conditions_asked_for() {
        let all = ListQuery::of(&RunFilter {
            limit: 50,
            ..RunFilter::default()
        })
        .unwrap();
        assert!(
            all.sql.ends_with("FROM runs ORDER BY id DESC LIMIT ?"),
            "{}",
            all.sql
        );
        assert_eq!(all.binds, [Bind::Int(50)]);

        let from = Utc.with_ymd_and_hms(2026, 3, 1, 0, 0, 0).unwrap();
        let some = ListQuery::of(&RunFilter {
            job: Some("etl".into()),
            status: Some(RunStatus::Failed),
            trigger: Some("schedule"),
            created_from: Some(from),
            jobs: JobFilter::Globs(vec![JobGlob::any()]),
            limit: 200,
            ..RunFilter::default()
        })
        .unwrap();
        assert!(!some.sql.contains("IS NULL"), "{}", some.sql);
        assert!(
            some.sql.contains(
                "WHERE +job = ? AND +status = ? AND COALESCE(json_extract(\"trigger\", '$.type'), 'api') = ? \
                 AND created_at >= ? AND (job GLOB ?) ORDER BY id DESC LIMIT ?"
            ),
            "{}",
            some.sql
        );
        assert_eq!(
            some.binds,
            [
                Bind::Text("etl".into()),
                Bind::Text("failed".into()),
                Bind::Text("schedule".into()),
                Bind::Int(ms(from)),
                Bind::Text("*".into()),
                Bind::Int(200),
            ]
        );

        let nothing = RunFilter {
            jobs: JobFilter::Globs(Vec::new()),
            ..RunFilter::default()
        };
        assert!(ListQuery::of(&nothing).is_none());
    }
}
