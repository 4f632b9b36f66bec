//! Runs and idempotency keys: accept, read, cancel, and a person's retry.

use crate::store::common::RunTexts;
use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::PgArguments;
use sqlx::query::Query;
use sqlx::{PgConnection, Postgres};

use super::super::common::{ATTEMPT_COLUMNS, RUN_COLUMNS, corrupt, ms, ttl_ms};
use super::admission::{admit_waiting, admits_arrival, set_admitted};
use super::callbacks::oblige;
use super::outbox::{drop_pending, enqueue};
use super::replies::{finished_replies_due, insert_replies};
use super::{
    PgStore, Tx, admission_col, attempt_from_row, col, db, run_from_row, run_id_col, run_state,
    store_db, write,
};
use crate::domain::auth::JobFilter;
use crate::domain::ports::{
    CancelResult, IDEMPOTENCY_WINDOW, IdempotencyKey, Inserted, NewRun, RetryResult, RunFilter,
    RunRecords, StoreError,
};
use crate::domain::run::{Attempt, Run, RunId};
use crate::domain::transition::Ending;
use crate::protocol::admission_text;

impl PgStore {
    /// Fill in each run's attempts, with one query for all of them.
    async fn with_attempts(&self, mut runs: Vec<Run>) -> Result<Vec<Run>, StoreError> {
        if runs.is_empty() {
            return Ok(runs);
        }
        let ids: Vec<String> = runs.iter().map(|r| r.id.to_string()).collect();
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {ATTEMPT_COLUMNS} FROM attempts WHERE run_id = ANY($1) \
             ORDER BY run_id, attempt"
        ));
        let rows = sqlx::query(sql)
            .bind(&ids)
            .fetch_all(self.pool())
            .await
            .map_err(store_db)?;
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
    c: &mut PgConnection,
    run_id: RunId,
    ending: &Ending,
    now: DateTime<Utc>,
) -> Tx<()> {
    let job = finalize(&mut *c, run_id, ending, now).await?;
    admit_waiting(&mut *c, &job, now).await?;
    Ok(())
}

/// Write the run's final state and, when it has a callback, the obligation to announce
/// it (in the same transaction: a final run never misses its callback); returns its job.
/// Every way a run becomes final comes through here.
async fn finalize(
    c: &mut PgConnection,
    run_id: RunId,
    ending: &Ending,
    now: DateTime<Utc>,
) -> Tx<String> {
    let row = sqlx::query(
        "UPDATE runs SET status = $1, exit_code = $2, reason = $3, reason_code = $4, \
         finished_at = $5, not_before = NULL WHERE id = $6 RETURNING job, callback_url",
    )
    .bind(ending.status.as_str())
    .bind(ending.exit_code)
    .bind(ending.reason.as_deref())
    .bind(ending.reason_code.map(|c| c.as_str()))
    .bind(ms(now))
    .bind(run_id.to_string())
    .fetch_optional(&mut *c)
    .await
    .map_err(db)?
    .ok_or_else(|| corrupt("run", format!("run {run_id} is missing")))?;
    let job: String = col(&row, "job")?;
    let callback: Option<String> = col(&row, "callback_url")?;
    if let Some(url) = callback {
        oblige(&mut *c, run_id, &url, now).await?;
    }
    finished_replies_due(&mut *c, run_id).await?;
    Ok(job)
}

/// Store a new run: admitted at once (with the outbox row of its first attempt) when
/// its admission rule allows and nothing of its job waits before it, else waiting.
/// Inside the caller's transaction.
pub(super) async fn insert_new_run(c: &mut PgConnection, run: &NewRun) -> Tx<()> {
    let RunTexts {
        params,
        spec,
        retry,
        trigger,
    } = RunTexts::of(run)?;
    let admitted = admits_arrival(&mut *c, &run.job, run.admission).await?;
    sqlx::query(
        "INSERT INTO runs (id, job, params, spec, retry, status, created_at, \"trigger\", \
         admission, admitted, callback_url, requested_by) \
         VALUES ($1, $2, $3, $4, $5, 'queued', $6, $7, $8, $9, $10, $11)",
    )
    .bind(run.id.to_string())
    .bind(&run.job)
    .bind(params)
    .bind(spec)
    .bind(retry)
    .bind(ms(run.created_at))
    .bind(trigger)
    .bind(admission_text(run.admission))
    .bind(admitted)
    .bind(run.callback.as_ref().map(|c| c.url.as_str()))
    .bind(run.requester.requested_by.as_deref())
    .execute(&mut *c)
    .await
    .map_err(db)?;
    insert_replies(&mut *c, run).await?;
    if admitted {
        enqueue(&mut *c, run.id, 1, run.created_at, None).await?;
    }
    Ok(())
}

/// Store a new run, or answer with the run its idempotency key already names. One write
/// operation: a key seen again changes nothing. Two accepts of one new key at once: the
/// second one's insert of the key conflicts, and run again it finds the key.
async fn insert_run_now(
    c: &mut PgConnection,
    run: &NewRun,
    key: Option<&IdempotencyKey>,
) -> Tx<Inserted> {
    let now = ms(run.created_at);
    if let Some(key) = key {
        let window = ttl_ms(IDEMPOTENCY_WINDOW);
        sqlx::query(
            "DELETE FROM idempotency_keys WHERE scope = $1 AND key = $2 AND created_at < $3",
        )
        .bind(&key.scope)
        .bind(&key.key)
        .bind(now - window)
        .execute(&mut *c)
        .await
        .map_err(db)?;
        let seen = sqlx::query(
            "SELECT job, params, run_id FROM idempotency_keys WHERE scope = $1 AND key = $2",
        )
        .bind(&key.scope)
        .bind(&key.key)
        .fetch_optional(&mut *c)
        .await
        .map_err(db)?;
        if let Some(row) = seen {
            let job: String = col(&row, "job")?;
            let fingerprint: String = col(&row, "params")?;
            let run_id = run_id_col(&row, "run_id")?;
            return Ok(if job == key.job && fingerprint == key.fingerprint {
                Inserted::Existing(run_id)
            } else {
                Inserted::KeyReused { job }
            });
        }
    }
    insert_new_run(&mut *c, run).await?;
    if let Some(key) = key {
        sqlx::query(
            "INSERT INTO idempotency_keys (scope, key, job, params, run_id, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&key.scope)
        .bind(&key.key)
        .bind(&key.job)
        .bind(&key.fingerprint)
        .bind(run.id.to_string())
        .bind(now)
        .execute(&mut *c)
        .await
        .map_err(db)?;
    }
    Ok(Inserted::New)
}

/// What `cancel` does to one run, inside the caller's transaction; `admit` says whether
/// the job's waiting runs are admitted when it ends (a caller cancelling several runs
/// of a job admits once, after the last).
pub(super) async fn cancel_run(
    c: &mut PgConnection,
    id: RunId,
    admit: bool,
    now: DateTime<Utc>,
) -> Tx<CancelResult> {
    let Some(run) = run_state(&mut *c, id).await? else {
        return Ok(CancelResult::UnknownRun);
    };
    let result = run.cancel();
    match result {
        CancelResult::Cancelled => {
            // Not started (first attempt, a retry waiting out its backoff, or a run
            // waiting for admission): final at once, and its pending publish is dropped.
            let ending = Ending::cancelled_before_start();
            if admit {
                end_run(&mut *c, id, &ending, now).await?;
            } else {
                finalize(&mut *c, id, &ending, now).await?;
            }
            flag_cancel(&mut *c, id).await?;
            drop_pending(&mut *c, id, "run cancelled", now).await?;
        }
        CancelResult::Requested => flag_cancel(&mut *c, id).await?,
        CancelResult::AlreadyFinal(_) | CancelResult::UnknownRun => {}
    }
    Ok(result)
}

#[async_trait]
impl RunRecords for PgStore {
    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(self.pool())
            .await
            .map_err(store_db)?;
        Ok(())
    }

    async fn insert_run(
        &self,
        run: &NewRun,
        key: Option<&IdempotencyKey>,
    ) -> Result<Inserted, StoreError> {
        write!(self, |c| insert_run_now(c, run, key))
    }

    async fn get_run(&self, id: RunId) -> Result<Option<Run>, StoreError> {
        let sql = sqlx::AssertSqlSafe(format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = $1"));
        let row = sqlx::query(sql)
            .bind(id.to_string())
            .fetch_optional(self.pool())
            .await
            .map_err(store_db)?;
        let Some(run) = row.as_ref().map(run_from_row).transpose()? else {
            return Ok(None);
        };
        Ok(self.with_attempts(vec![run]).await?.pop())
    }

    async fn list_runs(&self, filter: &RunFilter) -> Result<Vec<Run>, StoreError> {
        let Some(list) = ListQuery::of(filter) else {
            return Ok(Vec::new());
        };
        let rows = list
            .query()
            .fetch_all(self.pool())
            .await
            .map_err(store_db)?;
        let runs = rows
            .iter()
            .map(run_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        self.with_attempts(runs).await
    }

    async fn cancel(&self, id: RunId, now: DateTime<Utc>) -> Result<CancelResult, StoreError> {
        write!(self, |c| cancel_run(c, id, true, now))
    }

    async fn retry(&self, id: RunId, now: DateTime<Utc>) -> Result<RetryResult, StoreError> {
        write!(self, |c| retry_run(c, id, now))
    }
}

/// A person's retry of a final run: a new attempt, through the job's admission like a
/// new run. One write operation.
async fn retry_run(c: &mut PgConnection, id: RunId, now: DateTime<Utc>) -> Tx<RetryResult> {
    let Some(run) = run_state(&mut *c, id).await? else {
        return Ok(RetryResult::UnknownRun);
    };
    let result = run.retry();
    if let RetryResult::Queued { attempt } = result {
        // Read while this run is still final, so it does not count against itself.
        let row = sqlx::query("SELECT job, admission FROM runs WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(&mut *c)
            .await
            .map_err(db)?
            .ok_or_else(|| corrupt("run", format!("run {id} is missing")))?;
        let job: String = col(&row, "job")?;
        let admission = admission_col(&row)?;
        let admitted = admits_arrival(&mut *c, &job, admission).await?;
        sqlx::query(
            "UPDATE runs SET status = 'queued', exit_code = NULL, reason = NULL, \
             reason_code = NULL, finished_at = NULL, not_before = NULL, \
             cancel_requested = FALSE WHERE id = $1",
        )
        .bind(id.to_string())
        .execute(&mut *c)
        .await
        .map_err(db)?;
        set_admitted(&mut *c, id, attempt, admitted, now).await?;
    }
    Ok(result)
}

/// Ask the run's worker to stop it (seen at its next heartbeat); also keeps a cancelled
/// run from ever being retried by rule.
async fn flag_cancel(c: &mut PgConnection, id: RunId) -> Tx<()> {
    sqlx::query("UPDATE runs SET cancel_requested = TRUE WHERE id = $1")
        .bind(id.to_string())
        .execute(&mut *c)
        .await
        .map_err(db)?;
    Ok(())
}

/// A value the list query binds.
#[derive(Debug, PartialEq)]
enum Bind {
    Text(String),
    Int(i64),
}

/// The list's SQL with only the conditions the filter asks for: a condition written as
/// `($1 IS NULL OR job = $1)` is one a prepared statement's generic plan cannot take to
/// an index, so a list could walk the runs newest first until it found enough (the
/// whole table for a rare job).
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
        // `$n` for the value just bound.
        let bind = |binds: &mut Vec<Bind>, value: Bind| {
            binds.push(value);
            format!("${}", binds.len())
        };
        // No index is kept out of the planner's choice here (SQLite's unary `+`):
        // PostgreSQL weighs a job, a status and a creation range by its statistics.
        if let Some(job) = &filter.job {
            let p = bind(&mut binds, Bind::Text(job.clone()));
            conditions.push(format!("job = {p}"));
        }
        if let Some(status) = filter.status {
            let p = bind(&mut binds, Bind::Text(status.as_str().into()));
            conditions.push(format!("status = {p}"));
        }
        if let Some(trigger) = filter.trigger {
            let p = bind(&mut binds, Bind::Text(trigger.into()));
            conditions.push(format!(
                "COALESCE(\"trigger\"::json ->> 'type', 'api') = {p}"
            ));
        }
        if let Some(from) = filter.created_from {
            let p = bind(&mut binds, Bind::Int(ms(from)));
            conditions.push(format!("created_at >= {p}"));
        }
        if let Some(before) = filter.created_before {
            let p = bind(&mut binds, Bind::Int(ms(before)));
            conditions.push(format!("created_at < {p}"));
        }
        // The caller's job globs become LIKE patterns (see `like_pattern`).
        match &filter.jobs {
            JobFilter::All => {}
            JobFilter::Globs(globs) if globs.is_empty() => return None,
            JobFilter::Globs(globs) => {
                let any: Vec<String> = globs
                    .iter()
                    .map(|g| {
                        let p = bind(&mut binds, Bind::Text(like_pattern(g.as_str())));
                        format!("job LIKE {p}")
                    })
                    .collect();
                conditions.push(format!("({})", any.join(" OR ")));
            }
        }
        let filter_sql = if conditions.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", conditions.join(" AND "))
        };
        let limit = bind(&mut binds, Bind::Int(i64::from(filter.limit)));
        Some(ListQuery {
            sql: format!(
                "SELECT {RUN_COLUMNS} FROM runs{filter_sql} ORDER BY id DESC LIMIT {limit}"
            ),
            binds,
        })
    }

    /// The query, its values bound.
    fn query(self) -> Query<'static, Postgres, PgArguments> {
        let mut query = sqlx::query(sqlx::AssertSqlSafe(self.sql));
        for value in self.binds {
            query = match value {
                Bind::Text(t) => query.bind(t),
                Bind::Int(i) => query.bind(i),
            };
        }
        query
    }
}

/// A scope glob as a LIKE pattern: a glob has only `*`, `?` and characters that stand
/// for themselves, among them `_`, which LIKE reads as a wildcard unless escaped (with
/// LIKE's default escape, the backslash).
fn like_pattern(glob: &str) -> String {
    let mut pattern = String::with_capacity(glob.len());
    for ch in glob.chars() {
        match ch {
            '*' => pattern.push('%'),
            '?' => pattern.push('_'),
            '%' | '_' | '\\' => {
                pattern.push('\\');
                pattern.push(ch);
            }
            other => pattern.push(other),
        }
    }
    pattern
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};

    use super::*;
    use crate::domain::auth::{JobGlob, Scope};
    use crate::domain::run::RunStatus;

    /// Only what the filter asks for reaches the SQL, each value bound in the order its
    /// condition appears.
    #[test]
    fn the_list_query_holds_only_the_conditions_asked_for() {
        let all = ListQuery::of(&RunFilter {
            limit: 50,
            ..RunFilter::default()
        })
        .unwrap();
        assert!(
            all.sql.ends_with("FROM runs ORDER BY id DESC LIMIT $1"),
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
                "WHERE job = $1 AND status = $2 AND COALESCE(\"trigger\"::json ->> 'type', 'api') = $3 \
                 AND created_at >= $4 AND (job LIKE $5) ORDER BY id DESC LIMIT $6"
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
                Bind::Text("%".into()),
                Bind::Int(200),
            ]
        );

        let nothing = RunFilter {
            jobs: JobFilter::Globs(Vec::new()),
            ..RunFilter::default()
        };
        assert!(ListQuery::of(&nothing).is_none());
    }

    /// A glob's `_` stands for itself, as in the domain's own match; `*` and `?` are
    /// LIKE's `%` and `_`.
    #[test]
    fn a_job_glob_becomes_a_like_pattern_of_the_same_jobs() {
        assert_eq!(like_pattern("*"), "%");
        assert_eq!(like_pattern("etl_?-*"), "etl\\__-%");
        assert_eq!(like_pattern("a%b\\c"), "a\\%b\\\\c");
    }

    /// The list's SQL runs on PostgreSQL and picks the runs asked for (a glob's `_`
    /// standing for itself), newest first.
    #[tokio::test]
    async fn the_list_query_picks_the_runs_asked_for() {
        let (store, _db) = crate::store::postgres::testdb::open().await;
        sqlx::query(
            "INSERT INTO runs (id, job, params, spec, status, created_at, \"trigger\") VALUES \
             ('01aaaaaaaaaaaaaaaaaaaaaaaa', 'etl_daily', '{}', '{}', 'failed', 1000, NULL), \
             ('01bbbbbbbbbbbbbbbbbbbbbbbb', 'etlxdaily', '{}', '{}', 'failed', 2000, NULL), \
             ('01cccccccccccccccccccccccc', 'etl_daily', '{}', '{}', 'failed', 3000, \
              '{\"type\":\"schedule\"}'), \
             ('01dddddddddddddddddddddddd', 'etl_daily', '{}', '{}', 'queued', 4000, NULL)",
        )
        .execute(store.pool())
        .await
        .unwrap();
        let ids = async |filter: RunFilter| -> Vec<String> {
            let rows = ListQuery::of(&filter)
                .unwrap()
                .query()
                .fetch_all(store.pool())
                .await
                .unwrap();
            rows.iter()
                .map(|r| col::<String>(r, "id").unwrap()[..3].to_owned())
                .collect()
        };
        let scope: Scope = "read:etl_*".parse().unwrap();
        let all = RunFilter {
            limit: 10,
            ..RunFilter::default()
        };
        assert_eq!(ids(all.clone()).await, ["01d", "01c", "01b", "01a"]);
        let etl_failed = RunFilter {
            jobs: JobFilter::Globs(vec![scope.jobs]),
            status: Some(RunStatus::Failed),
            ..all.clone()
        };
        assert_eq!(ids(etl_failed).await, ["01c", "01a"]);
        let api_dated = RunFilter {
            trigger: Some("api"),
            job: Some("etl_daily".into()),
            created_from: Some(Utc.timestamp_millis_opt(1_000).unwrap()),
            created_before: Some(Utc.timestamp_millis_opt(4_000).unwrap()),
            ..all.clone()
        };
        assert_eq!(ids(api_dated).await, ["01a"]);
        let scheduled = RunFilter {
            trigger: Some("schedule"),
            ..all
        };
        assert_eq!(ids(scheduled).await, ["01c"]);
    }
}
