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
    Claim, ClaimResult, Lease, LeaseStatus, NewRun, OutboxEntry, RunFilter, RunMessage, RunStore,
    StoreError,
};
use crate::domain::run::{Outcome, ReasonCode, Run, RunId, RunStatus};
use crate::protocol::SpecV1;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Clone)]
pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
}

fn unavailable(e: sqlx::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn from_ms(v: Option<i64>) -> Option<DateTime<Utc>> {
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
    let reason_code: Option<String> = row.try_get("reason_code").map_err(unavailable)?;
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
        reason_code: reason_code
            .map(|c| ReasonCode::from_str(&c))
            .transpose()
            .map_err(|e| corrupt("reason_code", &e))?,
        created_at: from_ms(row.try_get("created_at").map_err(unavailable)?).unwrap_or_default(),
        started_at: from_ms(row.try_get("started_at").map_err(unavailable)?),
        finished_at: from_ms(row.try_get("finished_at").map_err(unavailable)?),
    })
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

const RUN_COLUMNS: &str = "id, job, params, status, attempt, exit_code, reason, reason_code, created_at, started_at, finished_at";

#[async_trait]
impl RunStore for SqliteStore {
    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.reader)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn insert_run(&self, run: &NewRun) -> Result<(), StoreError> {
        let params =
            serde_json::to_string(&run.params).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let spec = serde_json::to_string(&SpecV1::from(&run.spec))
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let id = run.id.to_string();
        let mut tx = self.writer.begin().await.map_err(unavailable)?;
        sqlx::query(
            "INSERT INTO runs (id, job, params, spec, status, created_at) VALUES (?, ?, ?, ?, 'queued', ?)",
        )
        .bind(&id)
        .bind(&run.job)
        .bind(params)
        .bind(spec)
        .bind(ms(run.created_at))
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        sqlx::query("INSERT INTO outbox (run_id, attempt, created_at) VALUES (?, 1, ?)")
            .bind(&id)
            .bind(ms(run.created_at))
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)
    }

    async fn get_run(&self, id: RunId) -> Result<Option<Run>, StoreError> {
        let sql = sqlx::AssertSqlSafe(format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?"));
        let row = sqlx::query(sql)
            .bind(id.to_string())
            .fetch_optional(&self.reader)
            .await
            .map_err(unavailable)?;
        row.as_ref().map(run_from_row).transpose()
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
        rows.iter().map(run_from_row).collect()
    }

    async fn pending_outbox(&self, limit: u32) -> Result<Vec<OutboxEntry>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, run_id, attempt FROM outbox WHERE sent_at IS NULL ORDER BY id LIMIT ?",
        )
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
            "UPDATE outbox SET sent_at = ?, tries = tries + 1, last_error = NULL \
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
        sqlx::query("UPDATE outbox SET tries = tries + 1, last_error = ? WHERE id = ?")
            .bind(error)
            .bind(id)
            .execute(&self.writer)
            .await
            .map_err(unavailable)?;
        Ok(())
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
        now: DateTime<Utc>,
    ) -> Result<LeaseStatus, StoreError> {
        let id = lease.run_id.to_string();
        let status = outcome.status().as_str();
        let reason = outcome.reason();
        let reason_code = outcome.reason_code().map(|c| c.as_str());
        let mut tx = self.writer.begin().await.map_err(unavailable)?;
        let done = sqlx::query(
            "UPDATE attempts SET status = ?, exit_code = ?, reason = ?, reason_code = ?, finished_at = ? \
             WHERE run_id = ? AND attempt = ? AND epoch = ? AND status = 'running'",
        )
        .bind(status)
        .bind(outcome.exit_code())
        .bind(reason.as_deref())
        .bind(reason_code)
        .bind(ms(now))
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
        sqlx::query(
            "UPDATE runs SET status = ?, exit_code = ?, reason = ?, reason_code = ?, finished_at = ? \
             WHERE id = ? AND epoch = ? AND status = 'running'",
        )
        .bind(status)
        .bind(outcome.exit_code())
        .bind(reason.as_deref())
        .bind(reason_code)
        .bind(ms(now))
        .bind(&id)
        .bind(lease.epoch)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        Ok(LeaseStatus::Held { cancel: false })
    }
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
            created_at: Utc::now(),
        }
    }

    #[tokio::test]
    async fn a_run_goes_from_outbox_to_claim_to_final_state_guarded_by_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).await.unwrap();
        let run = new_run();
        store.insert_run(&run).await.unwrap();
        let pending = store.pending_outbox(10).await.unwrap();
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
        assert!(store.pending_outbox(10).await.unwrap().is_empty());

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
            store.finish(stale, &outcome, Utc::now()).await.unwrap(),
            LeaseStatus::Lost
        );
        assert_eq!(
            store
                .finish(claim.lease, &outcome, Utc::now())
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
                .finish(claim.lease, &outcome, Utc::now())
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
        store.insert_run(&waiting).await.unwrap();
        store.insert_run(&taken).await.unwrap();
        let ids: Vec<i64> = store
            .pending_outbox(10)
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
        let pending = store.pending_outbox(10).await.unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].message.run_id, waiting.id);
    }
}
