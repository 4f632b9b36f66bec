//! `StoreGauges` for the metrics: counts read at scrape time, each over an index (the
//! runs by status, the outbox's, the callbacks' and the replies' partial indexes).

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::super::common::ms;
use super::{PgStore, col, status_col, store_db, time_col};
use crate::domain::observe::{ActiveRuns, Backlogs, StoreGauges};
use crate::domain::ports::StoreError;
use crate::domain::reply::ReplyState;

fn count(v: i64) -> u64 {
    v.max(0) as u64
}

#[async_trait]
impl StoreGauges for PgStore {
    async fn active_runs(&self) -> Result<Vec<ActiveRuns>, StoreError> {
        let rows = sqlx::query(
            "SELECT job, status, COUNT(*) AS n FROM runs \
             WHERE status IN ('queued', 'running') GROUP BY job, status",
        )
        .fetch_all(self.pool())
        .await
        .map_err(store_db)?;
        rows.iter()
            .map(|row| {
                Ok(ActiveRuns {
                    job: col(row, "job")?,
                    status: status_col(row, "status")?,
                    count: count(col(row, "n")?),
                })
            })
            .collect()
    }

    async fn backlogs(&self, now: DateTime<Utc>) -> Result<Backlogs, StoreError> {
        let row = sqlx::query(
            "SELECT \
               (SELECT COUNT(*) FROM outbox WHERE sent_at IS NULL \
                  AND (not_before IS NULL OR not_before <= $1)) AS outbox, \
               (SELECT COUNT(*) FROM outbox WHERE sent_at IS NULL AND last_try_failed \
                  AND (not_before IS NULL OR not_before <= $1)) AS outbox_failed, \
               (SELECT COUNT(*) FROM callback_deliveries \
                  WHERE delivered_at IS NULL AND NOT gave_up) AS callbacks, \
               (SELECT COUNT(*) FROM run_replies WHERE state = $2) AS replies",
        )
        .bind(ms(now))
        .bind(ReplyState::Pending.as_str())
        .fetch_one(self.pool())
        .await
        .map_err(store_db)?;
        Ok(Backlogs {
            outbox: count(col(&row, "outbox")?),
            outbox_failed: count(col(&row, "outbox_failed")?),
            callbacks: count(col(&row, "callbacks")?),
            replies: count(col(&row, "replies")?),
        })
    }

    async fn last_successes(&self) -> Result<Vec<(String, DateTime<Utc>)>, StoreError> {
        // Job by job: the next job is one probe past the last in `runs_by_job`, its
        // newest success one probe in `runs_succeeded_by_job`; a GROUP BY would read
        // every succeeded run there is.
        let rows = sqlx::query(
            "WITH RECURSIVE jobs (job) AS ( \
               SELECT MIN(job) FROM runs \
               UNION ALL \
               SELECT (SELECT MIN(job) FROM runs WHERE job > jobs.job) \
               FROM jobs WHERE jobs.job IS NOT NULL) \
             SELECT job, at FROM (SELECT job, (SELECT MAX(finished_at) FROM runs \
               WHERE status = 'succeeded' AND job = jobs.job) AS at FROM jobs \
               WHERE job IS NOT NULL) AS newest WHERE at IS NOT NULL",
        )
        .fetch_all(self.pool())
        .await
        .map_err(store_db)?;
        rows.iter()
            .map(|row| Ok((col(row, "job")?, time_col(row, "at")?)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::run::{RunId, RunStatus};
    use crate::store::postgres::testdb::open;

    #[tokio::test]
    async fn the_gauges_count_what_is_due_and_find_each_jobs_latest_success() {
        let (store, _db) = open().await;
        let (a, b, c) = (RunId::new(), RunId::new(), RunId::new());
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "INSERT INTO runs (id, job, params, spec, status, created_at, finished_at) VALUES \
               ('{a}', 'alpha', '{{}}', '{{}}', 'queued', 0, NULL), \
               ('{b}', 'alpha', '{{}}', '{{}}', 'succeeded', 0, 5000), \
               ('{c}', 'beta', '{{}}', '{{}}', 'failed', 0, 6000); \
             INSERT INTO outbox (run_id, attempt, created_at, not_before, last_try_failed) VALUES \
               ('{a}', 1, 0, NULL, TRUE), ('{a}', 2, 0, 99000, FALSE); \
             INSERT INTO callback_deliveries (run_id, url, event, event_id, created_at, gave_up) \
               VALUES ('{b}', 'http://x', 'run.finished', 'e1', 0, FALSE), \
                      ('{c}', 'http://x', 'run.finished', 'e2', 0, TRUE); \
             INSERT INTO run_replies (run_id, kind, reply_to, state, created_at) \
               VALUES ('{b}', 'finished', 'q', 'pending', 0), ('{c}', 'finished', 'q', 'sent', 0);"
        )))
        .execute(store.pool())
        .await
        .unwrap();

        assert_eq!(
            store.active_runs().await.unwrap(),
            [ActiveRuns {
                job: "alpha".into(),
                status: RunStatus::Queued,
                count: 1
            }]
        );
        let now = crate::store::common::from_ms(Some(10_000)).unwrap();
        assert_eq!(
            store.backlogs(now).await.unwrap(),
            Backlogs {
                outbox: 1,
                outbox_failed: 1,
                callbacks: 1,
                replies: 1
            }
        );
        let success = crate::store::common::from_ms(Some(5_000)).unwrap();
        assert_eq!(
            store.last_successes().await.unwrap(),
            [("alpha".to_owned(), success)]
        );
    }
}
