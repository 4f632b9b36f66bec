//! Retention for `PgStore`: expired idempotency keys, sent outbox rows nothing needs
//! any more, finished runs past the cutoff, and schedule slot records as old. Each call
//! is one short write transaction of a bounded number of rows, so concurrent writes wait
//! at most that long on the rows it deletes.

use std::str::FromStr;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::super::common::{corrupt, from_ms, ms};
use super::{PgStore, Tx, attempt_col, col, db, run_id_col, status_col, time_col, write};
use crate::domain::ports::StoreError;
use crate::domain::retention::{
    OutboxPurge, PrunedRun, RetentionStore, SlotRecordAge, prunable_statuses, run_is_prunable,
    sent_outbox_row_is_needed, slot_record_is_prunable,
};
use crate::domain::run::RunStatus;

/// Children before the run: the foreign keys (without cascade) refuse it the other way
/// round.
const DELETE_RUNS: [&str; 6] = [
    "DELETE FROM callback_deliveries WHERE run_id = ANY($1)",
    "DELETE FROM run_replies WHERE run_id = ANY($1)",
    "DELETE FROM idempotency_keys WHERE run_id = ANY($1)",
    "DELETE FROM outbox WHERE run_id = ANY($1)",
    "DELETE FROM attempts WHERE run_id = ANY($1)",
    "DELETE FROM runs WHERE id = ANY($1)",
];

/// The oldest-ended runs, in order from `runs_by_finished`.
const PRUNABLE_RUNS: &str = "SELECT id, status, finished_at, attempt FROM runs \
     WHERE finished_at < $1 AND status = ANY($2) \
     ORDER BY finished_at LIMIT $3";

fn status_of(text: &str) -> Result<RunStatus, StoreError> {
    RunStatus::from_str(text).map_err(|e| corrupt("status", e))
}

fn attempt_of(n: i64) -> Result<u32, StoreError> {
    u32::try_from(n).map_err(|e| corrupt("attempt", format!("{n}: {e}")))
}

/// The statuses retention may delete, for `status = ANY(..)`.
fn prunable() -> Vec<String> {
    prunable_statuses()
        .map(|s| RunStatus::as_str(s).to_owned())
        .collect()
}

#[async_trait]
impl RetentionStore for PgStore {
    async fn delete_expired_keys(
        &self,
        created_before: DateTime<Utc>,
        limit: u32,
    ) -> Result<u64, StoreError> {
        write!(self, |c| delete_expired_keys(c, created_before, limit))
    }

    async fn purge_sent_outbox(
        &self,
        after: i64,
        until: Option<i64>,
        limit: u32,
    ) -> Result<OutboxPurge, StoreError> {
        write!(self, |c| purge_sent_outbox(c, after, until, limit))
    }

    async fn delete_finished_runs(
        &self,
        finished_before: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<PrunedRun>, StoreError> {
        write!(self, |c| delete_finished_runs(c, finished_before, limit))
    }

    async fn delete_old_slots(
        &self,
        recorded_before: DateTime<Utc>,
        limit: u32,
    ) -> Result<u64, StoreError> {
        write!(self, |c| delete_old_slots(c, recorded_before, limit))
    }
}

async fn delete_expired_keys(
    c: &mut PgConnection,
    created_before: DateTime<Utc>,
    limit: u32,
) -> Tx<u64> {
    Ok(sqlx::query(
        "DELETE FROM idempotency_keys WHERE (scope, key) IN \
         (SELECT scope, key FROM idempotency_keys WHERE created_at < $1 LIMIT $2)",
    )
    .bind(ms(created_before))
    .bind(i64::from(limit))
    .execute(&mut *c)
    .await
    .map_err(db)?
    .rows_affected())
}

/// Looked at and deleted in one transaction: no claim, retry or sweep can change a run
/// between the decision and the delete.
async fn purge_sent_outbox(
    c: &mut PgConnection,
    after: i64,
    until: Option<i64>,
    limit: u32,
) -> Tx<OutboxPurge> {
    let until = match until {
        Some(until) => until,
        None => sqlx::query_scalar("SELECT COALESCE(MAX(id), 0) FROM outbox")
            .fetch_one(&mut *c)
            .await
            .map_err(db)?,
    };
    let rows = sqlx::query(
        "SELECT o.id, o.attempt, r.status, r.attempt AS run_attempt \
         FROM outbox o LEFT JOIN runs r ON r.id = o.run_id \
         WHERE o.id > $1 AND o.id <= $2 AND o.sent_at IS NOT NULL ORDER BY o.id LIMIT $3",
    )
    .bind(after)
    .bind(until)
    .bind(i64::from(limit))
    .fetch_all(&mut *c)
    .await
    .map_err(db)?;
    let mut scanned_to = None;
    let mut unneeded = Vec::new();
    for row in &rows {
        let id: i64 = col(row, "id")?;
        let attempt = attempt_col(row, "attempt")?;
        let status: Option<String> = col(row, "status")?;
        let run_attempt: Option<i64> = col(row, "run_attempt")?;
        let run = match (status, run_attempt) {
            (Some(s), Some(a)) => Some((status_of(&s)?, attempt_of(a)?)),
            _ => None,
        };
        if !sent_outbox_row_is_needed(attempt, run) {
            unneeded.push(id);
        }
        scanned_to = Some(id);
    }
    let mut deleted = 0;
    if !unneeded.is_empty() {
        deleted = sqlx::query("DELETE FROM outbox WHERE id = ANY($1)")
            .bind(&unneeded)
            .execute(&mut *c)
            .await
            .map_err(db)?
            .rows_affected();
    }
    Ok(OutboxPurge {
        deleted,
        scanned_to,
        until,
    })
}

/// In one transaction: a person's retry cannot bring a run back between the look and
/// the delete.
async fn delete_finished_runs(
    c: &mut PgConnection,
    finished_before: DateTime<Utc>,
    limit: u32,
) -> Tx<Vec<PrunedRun>> {
    let rows = sqlx::query(PRUNABLE_RUNS)
        .bind(ms(finished_before))
        .bind(prunable())
        .bind(i64::from(limit))
        .fetch_all(&mut *c)
        .await
        .map_err(db)?;
    let mut pruned = Vec::with_capacity(rows.len());
    for row in &rows {
        let finished_at = from_ms(col(row, "finished_at")?);
        if run_is_prunable(status_col(row, "status")?, finished_at, finished_before) {
            let attempt: i64 = col(row, "attempt")?;
            pruned.push(PrunedRun {
                id: run_id_col(row, "id")?,
                attempts: u32::try_from(attempt).unwrap_or(0),
            });
        }
    }
    if pruned.is_empty() {
        return Ok(pruned);
    }
    let ids: Vec<String> = pruned.iter().map(|r| r.id.to_string()).collect();
    for sql in DELETE_RUNS {
        sqlx::query(sql)
            .bind(&ids)
            .execute(&mut *c)
            .await
            .map_err(db)?;
    }
    Ok(pruned)
}

/// The filter narrows the look to rows the rule lets go (so rows kept for now are not
/// looked at again and again); the rule itself decides each one. In one transaction: no
/// run is retried, no cursor moves in between.
async fn delete_old_slots(
    c: &mut PgConnection,
    recorded_before: DateTime<Utc>,
    limit: u32,
) -> Tx<u64> {
    let rows = sqlx::query(
        "SELECT s.job, s.schedule, s.nominal, s.recorded_at, s.fire_at, r.status, \
         c.evaluated_until \
         FROM schedule_slots s \
         LEFT JOIN runs r ON r.id = s.run_id \
         LEFT JOIN schedule_cursors c ON c.job = s.job AND c.schedule = s.schedule \
         WHERE s.recorded_at < $1 \
         AND (r.id IS NULL OR r.status = ANY($2)) \
         AND (c.evaluated_until IS NULL OR s.fire_at <= c.evaluated_until) \
         ORDER BY s.recorded_at LIMIT $3",
    )
    .bind(ms(recorded_before))
    .bind(prunable())
    .bind(i64::from(limit))
    .fetch_all(&mut *c)
    .await
    .map_err(db)?;
    // The slots to delete, by their key, as three columns for `unnest`.
    let (mut jobs, mut schedules, mut nominals) = (Vec::new(), Vec::new(), Vec::new());
    for row in &rows {
        let status: Option<String> = col(row, "status")?;
        let slot = SlotRecordAge {
            recorded_at: time_col(row, "recorded_at")?,
            fire_at: time_col(row, "fire_at")?,
            run: status.as_deref().map(status_of).transpose()?,
            cursor: from_ms(col(row, "evaluated_until")?),
        };
        if slot_record_is_prunable(&slot, recorded_before) {
            jobs.push(col::<String>(row, "job")?);
            schedules.push(col::<String>(row, "schedule")?);
            nominals.push(col::<i64>(row, "nominal")?);
        }
    }
    if jobs.is_empty() {
        return Ok(0);
    }
    Ok(sqlx::query(
        "DELETE FROM schedule_slots WHERE (job, schedule, nominal) IN \
         (SELECT * FROM unnest($1::TEXT[], $2::TEXT[], $3::BIGINT[]))",
    )
    .bind(&jobs)
    .bind(&schedules)
    .bind(&nominals)
    .execute(&mut *c)
    .await
    .map_err(db)?
    .rows_affected())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::run::RunId;
    use crate::store::postgres::testdb::open;
    use crate::store::suite::retention::{RowCounts, retention_suite};

    impl RowCounts for PgStore {
        async fn rows(&self, table: &str, run: RunId) -> i64 {
            let sql =
                sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {table} WHERE run_id = $1"));
            sqlx::query_scalar(sql)
                .bind(run.to_string())
                .fetch_one(self.pool())
                .await
                .unwrap()
        }
    }

    retention_suite!(open);

    async fn exec(store: &PgStore, sql: String) {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(store.pool())
            .await
            .unwrap();
    }

    /// A run as it is stored, written directly: `status`, `attempt`, `finished_at`.
    async fn run(store: &PgStore, status: &str, attempt: i64, finished_at: Option<i64>) -> RunId {
        let id = RunId::new();
        let finished_at = finished_at.map_or("NULL".to_owned(), |t| t.to_string());
        exec(
            store,
            format!(
                "INSERT INTO runs (id, job, params, spec, status, attempt, created_at, finished_at) \
                 VALUES ('{id}', 'hello', '{{}}', '{{}}', '{status}', {attempt}, 0, {finished_at})"
            ),
        )
        .await;
        id
    }

    /// Every row the schema lets refer to a run goes with it: the foreign keys have no
    /// cascade, so a delete in the wrong order (or a table left out) fails the batch.
    /// (The shared suite has no callback deliveries or replies.)
    #[tokio::test]
    async fn a_run_goes_with_its_callbacks_and_replies_too() {
        let (store, _db) = open().await;
        let old = run(&store, "failed", 1, Some(1_000)).await;
        let running = run(&store, "running", 1, None).await;
        exec(
            &store,
            format!(
                "INSERT INTO attempts (run_id, attempt, worker_id, epoch, lease_expires_at, status, \
                   claimed_at) VALUES ('{old}', 1, 'w1', 1, 0, 'failed', 0); \
                 INSERT INTO outbox (run_id, attempt, created_at, sent_at) VALUES ('{old}', 1, 0, 0); \
                 INSERT INTO idempotency_keys (scope, key, job, params, run_id, created_at) \
                   VALUES ('', 'k', 'hello', '{{}}', '{old}', 0); \
                 INSERT INTO callback_deliveries (run_id, url, event, event_id, created_at) \
                   VALUES ('{old}', 'http://x', 'run.finished', 'e1', 0); \
                 INSERT INTO run_replies (run_id, kind, reply_to, state, created_at) \
                   VALUES ('{old}', 'finished', 'q', 'sent', 0);"
            ),
        )
        .await;

        let cutoff = from_ms(Some(2_000)).unwrap();
        assert_eq!(
            store.delete_finished_runs(cutoff, 10).await.unwrap(),
            [PrunedRun {
                id: old,
                attempts: 1
            }]
        );
        for table in [
            "attempts",
            "outbox",
            "idempotency_keys",
            "callback_deliveries",
            "run_replies",
        ] {
            assert_eq!(store.rows(table, old).await, 0, "{table}");
        }
        let left: Vec<String> = sqlx::query_scalar("SELECT id FROM runs")
            .fetch_all(store.pool())
            .await
            .unwrap();
        assert_eq!(left, [running.to_string()]);
    }

    /// Keys, sent outbox rows and slot records, each by the rule and its key columns.
    #[tokio::test]
    async fn keys_outbox_rows_and_slot_records_go_by_their_rules() {
        let (store, _db) = open().await;
        let running = run(&store, "running", 1, None).await;
        let queued = run(&store, "queued", 0, None).await;
        let gone = RunId::new();
        exec(
            &store,
            format!(
                "INSERT INTO idempotency_keys (scope, key, job, params, run_id, created_at) \
                   VALUES ('', 'old', 'hello', '{{}}', '{running}', 0), \
                          ('', 'new', 'hello', '{{}}', '{queued}', 5000); \
                 INSERT INTO outbox (run_id, attempt, created_at, sent_at) \
                   VALUES ('{running}', 1, 0, 0), ('{queued}', 1, 0, 0); \
                 INSERT INTO schedule_cursors (job, schedule, evaluated_until) \
                   VALUES ('nightly', 'a', 10); \
                 INSERT INTO schedule_slots (job, schedule, nominal, fire_at, business_date, \
                   outcome, run_id, recorded_at) VALUES \
                   ('nightly', 'a', 1, 1, '2026-03-01', 'fired', '{gone}', 0), \
                   ('nightly', 'a', 2, 2, '2026-03-01', 'fired', '{running}', 0), \
                   ('nightly', 'a', 20, 20, '2026-03-01', 'skipped', NULL, 0);"
            ),
        )
        .await;
        let cutoff = from_ms(Some(1_000)).unwrap();

        assert_eq!(store.delete_expired_keys(cutoff, 10).await.unwrap(), 1);
        assert_eq!(store.rows("idempotency_keys", queued).await, 1);

        // The running run's sent row is read no more; the queued run's is its publish.
        let purge = store.purge_sent_outbox(0, None, 10).await.unwrap();
        assert_eq!(purge.deleted, 1);
        assert_eq!(purge.scanned_to, Some(purge.until));
        assert_eq!(store.rows("outbox", running).await, 0);
        assert_eq!(store.rows("outbox", queued).await, 1);

        // Kept: the one whose run lives, the one ahead of the cursor.
        assert_eq!(store.delete_old_slots(cutoff, 10).await.unwrap(), 1);
        let left: Vec<i64> = sqlx::query_scalar("SELECT nominal FROM schedule_slots ORDER BY 1")
            .fetch_all(store.pool())
            .await
            .unwrap();
        assert_eq!(left, [2, 20]);
    }
}
