//! `StoreGauges` for the metrics: counts read at scrape time, each over an index (the
//! runs by status, the outbox's, the callbacks' and the replies' partial indexes).

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::{SqliteStore, col, db, ms, status_col, time_col};
use crate::domain::observe::{ActiveRuns, Backlogs, StoreGauges};
use crate::domain::ports::StoreError;
use crate::domain::reply::ReplyState;

fn count(v: i64) -> u64 {
    v.max(0) as u64
}

#[async_trait]
impl StoreGauges for SqliteStore {
    async fn active_runs(&self) -> Result<Vec<ActiveRuns>, StoreError> {
        let rows = sqlx::query(
            "SELECT job, status, COUNT(*) AS n FROM runs \
             WHERE status IN ('queued', 'running') GROUP BY job, status",
        )
        .fetch_all(&self.reader)
        .await
        .map_err(db)?;
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
                  AND (not_before IS NULL OR not_before <= ?1)) AS outbox, \
               (SELECT COUNT(*) FROM outbox WHERE sent_at IS NULL AND last_try_failed = 1 \
                  AND (not_before IS NULL OR not_before <= ?1)) AS outbox_failed, \
               (SELECT COUNT(*) FROM callback_deliveries \
                  WHERE delivered_at IS NULL AND gave_up = 0) AS callbacks, \
               (SELECT COUNT(*) FROM run_replies WHERE state = ?2) AS replies",
        )
        .bind(ms(now))
        .bind(ReplyState::Pending.as_str())
        .fetch_one(&self.reader)
        .await
        .map_err(db)?;
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
               WHERE job IS NOT NULL) WHERE at IS NOT NULL",
        )
        .fetch_all(&self.reader)
        .await
        .map_err(db)?;
        rows.iter()
            .map(|row| Ok((col(row, "job")?, time_col(row, "at")?)))
            .collect()
    }
}
