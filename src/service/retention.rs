//! The pruning pass: expired idempotency keys, sent outbox rows nothing needs, finished
//! runs past the retention period with their logs, and schedule slot records as old. Work goes in small batches
//! with a pause between them, so the store's single writer stays free for the API.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use crate::domain::ports::{LogSink, StoreError};
use crate::domain::retention::{Retention, RetentionStore, keys_expired_before};
use crate::service::duty::Duty;

/// Rows per write transaction: a batch of runs holds the single writer (and every
/// accept behind it) for its deletes in six tables and their indexes plus one fsync,
/// so it stays small enough to be a short wait (see the benchmark's `store` section).
pub const BATCH: u32 = 200;
/// Between two batches, so requests waiting for the writer get their turn.
pub const PAUSE: Duration = Duration::from_millis(25);
/// How often `serve` prunes (it also does once at start).
pub const EVERY: Duration = Duration::from_secs(5 * 60);

/// What one pass deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PruneReport {
    pub runs: u64,
    /// Runs that had logs, deleted with them.
    pub logs: u64,
    pub keys: u64,
    pub outbox_rows: u64,
    /// Schedule slot records.
    pub slots: u64,
}

/// A pass that stopped on a store failure, with what it had deleted until then.
#[derive(Debug, thiserror::Error)]
#[error("{source} (after deleting {} run(s))", done.runs)]
pub struct PruneError {
    pub done: PruneReport,
    pub source: StoreError,
}

pub struct Pruner {
    store: Arc<dyn RetentionStore>,
    logs: Arc<dyn LogSink>,
    retention: Retention,
    batch: u32,
    pause: Duration,
    /// With replicas sharing the store, the one holding this duty prunes.
    duty: Option<Duty>,
}

impl Pruner {
    pub fn new(
        store: Arc<dyn RetentionStore>,
        logs: Arc<dyn LogSink>,
        retention: Retention,
    ) -> Self {
        Self {
            store,
            logs,
            retention,
            batch: BATCH,
            pause: PAUSE,
            duty: None,
        }
    }

    /// Prune only while this process holds `duty` (replicas sharing the store).
    pub fn with_duty(self, duty: Duty) -> Self {
        Self {
            duty: Some(duty),
            ..self
        }
    }

    /// `serve`'s loop: a pass at start, then one `every`, until shutdown.
    pub async fn run(self, every: Duration, shutdown: CancellationToken) {
        loop {
            let ours = match &self.duty {
                Some(duty) => duty.held().await,
                None => true,
            };
            let pass = if ours {
                self.prune(Utc::now(), &shutdown).await
            } else {
                Ok(PruneReport::default())
            };
            match pass {
                Ok(report) if report == PruneReport::default() => {}
                Ok(report) => tracing::info!(
                    message = "pruned",
                    runs = report.runs,
                    logs = report.logs,
                    idempotency_keys = report.keys,
                    outbox_rows = report.outbox_rows,
                    schedule_slots = report.slots
                ),
                Err(error) => {
                    tracing::warn!(message = "pruning failed; trying again later", %error)
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => {
                    if let Some(duty) = &self.duty {
                        duty.release().await;
                    }
                    return;
                }
                _ = tokio::time::sleep(every) => {}
            }
        }
    }

    /// One pass as of `now`. Stops between batches once `stop` is cancelled.
    pub async fn prune(
        &self,
        now: DateTime<Utc>,
        stop: &CancellationToken,
    ) -> Result<PruneReport, PruneError> {
        let mut done = PruneReport::default();
        let result = self.prune_into(&mut done, now, stop).await;
        result
            .map(|()| done)
            .map_err(|source| PruneError { done, source })
    }

    async fn prune_into(
        &self,
        done: &mut PruneReport,
        now: DateTime<Utc>,
        stop: &CancellationToken,
    ) -> Result<(), StoreError> {
        let keys_before = keys_expired_before(now);
        loop {
            if stop.is_cancelled() {
                return Ok(());
            }
            let n = self
                .store
                .delete_expired_keys(keys_before, self.batch)
                .await?;
            done.keys += n;
            if n < u64::from(self.batch) || !self.pause(stop).await {
                break;
            }
        }
        // Up to the newest row when the pass began: rows written meanwhile wait for the
        // next pass, so the pass ends even while accepts add rows faster than it looks.
        let (mut after, mut until) = (0, None);
        loop {
            if stop.is_cancelled() {
                return Ok(());
            }
            let batch = self
                .store
                .purge_sent_outbox(after, until, self.batch)
                .await?;
            until = Some(batch.until);
            done.outbox_rows += batch.deleted;
            match batch.scanned_to {
                Some(to) if self.pause(stop).await => after = to,
                _ => break,
            }
        }
        let Some(cutoff) = self.retention.cutoff(now) else {
            return Ok(());
        };
        loop {
            if stop.is_cancelled() {
                return Ok(());
            }
            let runs = self.store.delete_finished_runs(cutoff, self.batch).await?;
            done.runs += runs.len() as u64;
            // After the rows are gone, so a run a person retried meanwhile keeps its
            // logs. A crash right here leaves logs without runs behind.
            for run in &runs {
                match self.logs.delete_run(run.id, run.attempts).await {
                    Ok(true) => done.logs += 1,
                    Ok(false) => {}
                    Err(error) => {
                        tracing::warn!(message = "deleting a pruned run's logs failed", run_id = %run.id, %error)
                    }
                }
            }
            if runs.len() < self.batch as usize || !self.pause(stop).await {
                break;
            }
        }
        // The same cutoff as runs: a slot's record goes with the runs of its time (a
        // fired slot's run that still waits or runs keeps it; see the domain's rule).
        loop {
            if stop.is_cancelled() {
                return Ok(());
            }
            let n = self.store.delete_old_slots(cutoff, self.batch).await?;
            done.slots += n;
            if n < u64::from(self.batch) || !self.pause(stop).await {
                return Ok(());
            }
        }
    }

    /// Wait between batches; `false` when asked to stop meanwhile.
    async fn pause(&self, stop: &CancellationToken) -> bool {
        tokio::select! {
            _ = stop.cancelled() => false,
            _ = tokio::time::sleep(self.pause) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use async_trait::async_trait;
    use bytes::Bytes;
    use chrono::TimeZone;

    use super::*;
    use crate::domain::ports::{LogError, OutputChunk};
    use crate::domain::retention::{OutboxPurge, PrunedRun};
    use crate::domain::run::RunId;

    /// Finished runs by finish time, each tried [`ATTEMPTS`] times; `keys` and `outbox`
    /// are counts of deletable rows.
    #[derive(Default)]
    struct FakeStore {
        runs: Mutex<Vec<(DateTime<Utc>, RunId)>>,
        keys: Mutex<u64>,
        outbox: Mutex<u64>,
        /// Outbox rows by id, 1 to this; `outbox_grow` more arrive at every look.
        outbox_total: Mutex<i64>,
        outbox_grow: Mutex<i64>,
        /// Slot records by recording time.
        slots: Mutex<Vec<DateTime<Utc>>>,
        calls: Mutex<Vec<String>>,
    }

    #[async_trait]
    impl RetentionStore for FakeStore {
        async fn delete_expired_keys(
            &self,
            created_before: DateTime<Utc>,
            limit: u32,
        ) -> Result<u64, StoreError> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("keys<{}", created_before.timestamp()));
            let mut keys = self.keys.lock().unwrap();
            let n = (*keys).min(u64::from(limit));
            *keys -= n;
            Ok(n)
        }

        async fn purge_sent_outbox(
            &self,
            after: i64,
            until: Option<i64>,
            limit: u32,
        ) -> Result<OutboxPurge, StoreError> {
            self.calls.lock().unwrap().push(format!("outbox>{after}"));
            // Rows are ids 1..=total; `grow` more arrive with every look, as under load.
            let mut total = self.outbox_total.lock().unwrap();
            let until = until.unwrap_or(*total);
            *total += *self.outbox_grow.lock().unwrap();
            let scanned = u64::from(limit).min(until.saturating_sub(after).max(0) as u64);
            let mut rows = self.outbox.lock().unwrap();
            let n = (*rows).min(scanned);
            *rows -= n;
            Ok(OutboxPurge {
                deleted: n,
                scanned_to: (scanned > 0).then(|| after + scanned as i64),
                until,
            })
        }

        async fn delete_finished_runs(
            &self,
            finished_before: DateTime<Utc>,
            limit: u32,
        ) -> Result<Vec<PrunedRun>, StoreError> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("runs<{}", finished_before.timestamp()));
            let mut runs = self.runs.lock().unwrap();
            let mut gone = Vec::new();
            runs.retain(|(at, id)| {
                let go = *at < finished_before && gone.len() < limit as usize;
                if go {
                    gone.push(PrunedRun {
                        id: *id,
                        attempts: ATTEMPTS,
                    });
                }
                !go
            });
            Ok(gone)
        }

        async fn delete_old_slots(
            &self,
            recorded_before: DateTime<Utc>,
            limit: u32,
        ) -> Result<u64, StoreError> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("slots<{}", recorded_before.timestamp()));
            let mut slots = self.slots.lock().unwrap();
            let mut n = 0;
            slots.retain(|at| {
                let go = *at < recorded_before && n < limit;
                n += u32::from(go);
                !go
            });
            Ok(u64::from(n))
        }
    }

    const ATTEMPTS: u32 = 2;

    /// Runs with logs, by the attempt that wrote them.
    #[derive(Default)]
    struct FakeLogs {
        dirs: Mutex<BTreeMap<RunId, u32>>,
    }

    #[async_trait]
    impl LogSink for FakeLogs {
        async fn append(
            &self,
            _: RunId,
            _: u32,
            _: u64,
            _: &[OutputChunk],
        ) -> Result<u64, LogError> {
            unreachable!("retention never writes logs")
        }
        async fn len(&self, _: RunId, _: u32) -> Result<u64, LogError> {
            unreachable!("retention never reads logs")
        }
        async fn delete_run(&self, run_id: RunId, attempts: u32) -> Result<bool, LogError> {
            let mut dirs = self.dirs.lock().unwrap();
            let within = dirs.get(&run_id).is_some_and(|a| *a <= attempts);
            Ok(within && dirs.remove(&run_id).is_some())
        }
        async fn sync(&self, _: RunId, _: u32) -> Result<(), LogError> {
            Ok(())
        }
        async fn read(&self, _: RunId, _: u32, _: u64, _: usize) -> Result<Bytes, LogError> {
            unreachable!("retention never reads logs")
        }
    }

    fn at(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(secs, 0).single().unwrap()
    }

    fn pruner(store: &Arc<FakeStore>, logs: &Arc<FakeLogs>, retention: Retention) -> Pruner {
        Pruner {
            batch: 2,
            pause: Duration::ZERO,
            ..Pruner::new(store.clone(), logs.clone(), retention)
        }
    }

    const NOW: i64 = 1_000_000;

    /// Five runs finished an hour or more ago (one without logs), one just now.
    fn fixture() -> (Arc<FakeStore>, Arc<FakeLogs>, Vec<RunId>) {
        let store = Arc::new(FakeStore::default());
        let logs = Arc::new(FakeLogs::default());
        let ids: Vec<RunId> = (0..6).map(|_| RunId::new()).collect();
        for (n, id) in ids.iter().enumerate() {
            let finished = if n == 5 { NOW } else { NOW - 3600 - n as i64 };
            store.runs.lock().unwrap().push((at(finished), *id));
            if n != 4 {
                // The last attempt's log only, for some: every attempt is looked at.
                let attempt = if n % 2 == 0 { ATTEMPTS } else { 1 };
                logs.dirs.lock().unwrap().insert(*id, attempt);
            }
        }
        *store.keys.lock().unwrap() = 3;
        *store.outbox.lock().unwrap() = 3;
        *store.outbox_total.lock().unwrap() = 3;
        // Three slots recorded an hour ago or more, one just now.
        *store.slots.lock().unwrap() = vec![at(NOW - 7200), at(NOW), at(NOW - 3600), at(NOW - 61)];
        (store, logs, ids)
    }

    #[tokio::test]
    async fn a_pass_deletes_in_batches_takes_the_pruned_runs_logs_and_old_slot_records() {
        let (store, logs, ids) = fixture();
        let retention = Retention::from_setting(Duration::from_secs(60));
        let report = pruner(&store, &logs, retention)
            .prune(at(NOW), &CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(
            report,
            PruneReport {
                runs: 5,
                logs: 4,
                keys: 3,
                outbox_rows: 3,
                slots: 3,
            }
        );
        assert_eq!(store.slots.lock().unwrap().clone(), vec![at(NOW)]);
        assert_eq!(store.runs.lock().unwrap().clone(), vec![(at(NOW), ids[5])]);
        assert_eq!(
            logs.dirs
                .lock()
                .unwrap()
                .keys()
                .copied()
                .collect::<Vec<_>>(),
            vec![ids[5]],
            "the kept run keeps its logs"
        );
        let keys_cutoff = NOW - 24 * 3600;
        let runs_cutoff = NOW - 60;
        assert_eq!(
            store.calls.lock().unwrap().clone(),
            [
                format!("keys<{keys_cutoff}"),
                format!("keys<{keys_cutoff}"),
                "outbox>0".into(),
                "outbox>2".into(),
                "outbox>3".into(),
                format!("runs<{runs_cutoff}"),
                format!("runs<{runs_cutoff}"),
                format!("runs<{runs_cutoff}"),
                format!("slots<{runs_cutoff}"),
                format!("slots<{runs_cutoff}"),
            ]
        );
    }

    /// Accepts can add outbox rows faster than a pass looks at them: the pass looks
    /// only as far as the newest row when it began, and ends.
    #[tokio::test]
    async fn an_outbox_growing_faster_than_the_pass_looks_does_not_hold_it_forever() {
        let (store, logs, _) = fixture();
        *store.outbox_grow.lock().unwrap() = 5;
        let report = tokio::time::timeout(
            Duration::from_secs(10),
            pruner(&store, &logs, Retention::from_setting(Duration::ZERO))
                .prune(at(NOW), &CancellationToken::new()),
        )
        .await
        .expect("the pass ends")
        .unwrap();
        assert_eq!(report.outbox_rows, 3);
        let looks: Vec<String> = store
            .calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.starts_with("outbox"))
            .cloned()
            .collect();
        assert_eq!(looks, ["outbox>0", "outbox>2", "outbox>3"]);
    }

    #[tokio::test]
    async fn keeping_forever_still_expires_keys_and_purges_the_outbox() {
        let (store, logs, _) = fixture();
        let report = pruner(&store, &logs, Retention::from_setting(Duration::ZERO))
            .prune(at(NOW), &CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(
            report,
            PruneReport {
                runs: 0,
                logs: 0,
                keys: 3,
                outbox_rows: 3,
                slots: 0,
            }
        );
        assert_eq!(store.runs.lock().unwrap().len(), 6);
        assert_eq!(
            store.slots.lock().unwrap().len(),
            4,
            "slots are kept with the runs"
        );
        assert_eq!(logs.dirs.lock().unwrap().len(), 5);
    }

    #[tokio::test]
    async fn a_cancelled_pass_starts_no_further_batch() {
        let (store, logs, _) = fixture();
        let stop = CancellationToken::new();
        stop.cancel();
        let report = pruner(&store, &logs, Retention::For(Duration::ZERO))
            .prune(at(NOW), &stop)
            .await
            .unwrap();
        assert_eq!(report, PruneReport::default());
        assert!(store.calls.lock().unwrap().is_empty());
    }
}
