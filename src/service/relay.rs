//! The outbox relay: publishes pending outbox entries and marks them sent only on the
//! queue's confirm. The store is the source of truth; the queue is transport.
//!
//! Under load the relay is a pipeline of two: while one batch is published (and its
//! confirms awaited), the batch before it is recorded as sent. The next batch is read
//! past the last id taken, so nothing published and not yet recorded is read again.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::{Notify, broadcast};
use tokio_util::sync::CancellationToken;

use crate::domain::ports::{QueueError, RunQueue, RunStore};
use crate::service::events::{RunEventKind, RunEvents};

const BATCH: u32 = 512;
/// Batches in one pass before the relay looks up from publishing (the lost-message
/// sweep is due, a shutdown).
const PASS_BATCHES: usize = 64;
/// Also look without being woken, for entries a failed publish left behind and retries
/// whose backoff has passed.
const IDLE_POLL: Duration = Duration::from_secs(1);
/// How long a batch the relay took stays its own in a shared store (another replica's
/// relay skips it): ample for a publish and its confirm; if this replica dies with it,
/// another publishes it after that.
const CLAIM_HOLD: Duration = Duration::from_secs(60);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// The longest gap between two looks for lost messages.
const SWEEP_MAX: Duration = Duration::from_secs(60);

pub struct Relay {
    pub store: Arc<dyn RunStore>,
    pub queue: Arc<dyn RunQueue>,
    pub wake: Arc<Notify>,
    /// A run still queued this long after its message went out, while the queue is
    /// empty, lost its message (a purged or deleted queue): publish it again.
    pub republish_after: Duration,
}

/// Wake the relay whenever a run changes state in this process. A run that ends may
/// admit one of its job's runs waiting under `max_concurrent`, whose outbox row is then
/// new: it goes out at once instead of at the relay's next idle look.
pub async fn wake_on_run_changes(
    events: RunEvents,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let mut rx = events.subscribe();
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => return,
            event = rx.recv() => event,
        };
        match event {
            Ok(ev) if ev.kind == RunEventKind::Status => wake.notify_one(),
            Ok(_) => {}
            // Missed some: waking once covers them all.
            Err(broadcast::error::RecvError::Lagged(_)) => wake.notify_one(),
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

impl Relay {
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        let sweep_every = (self.republish_after / 4).clamp(Duration::from_secs(1), SWEEP_MAX);
        let mut next_sweep = tokio::time::Instant::now() + sweep_every;
        loop {
            if tokio::time::Instant::now() >= next_sweep {
                next_sweep = tokio::time::Instant::now() + sweep_every;
                self.republish_lost().await;
            }
            let delay = match self.publish_pending(&shutdown).await {
                Ok(true) => {
                    backoff = Duration::from_millis(100);
                    continue;
                }
                Ok(false) => {
                    backoff = Duration::from_millis(100);
                    IDLE_POLL
                }
                Err(()) => {
                    let d = backoff;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    d
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Only when the queue holds nothing: a run waiting behind others is not lost.
    /// A message being handed to a worker right now is not counted by the broker; if
    /// the sweep catches one, the worker drops the duplicate at claim time.
    async fn republish_lost(&self) {
        match self.queue.ready_messages().await {
            Ok(Some(0)) => {}
            Ok(_) => return,
            Err(error) => {
                tracing::debug!(message = "queue depth unknown; lost-message sweep skipped", %error);
                return;
            }
        }
        let now = Utc::now();
        let before =
            now - chrono::Duration::from_std(self.republish_after).unwrap_or(chrono::Duration::MAX);
        match self.store.republish_unclaimed(before, now).await {
            Ok(runs) if runs.is_empty() => {}
            Ok(runs) => {
                for run_id in &runs {
                    tracing::warn!(message = "queued run's message no longer in the queue; published again", %run_id);
                }
                self.wake.notify_one();
            }
            Err(error) => tracing::warn!(message = "lost-message sweep failed", %error),
        }
    }

    /// Publish what is pending, batch after batch, each batch's publish overlapping the
    /// recording of the one before as sent. `Ok(true)` when the pass ended with more
    /// perhaps waiting; `Err` when the store or the queue failed and the caller should
    /// back off. Every confirmed batch is recorded (or tried) before this returns.
    async fn publish_pending(&self, shutdown: &CancellationToken) -> Result<bool, ()> {
        let mut after = 0;
        let mut confirmed: Vec<i64> = Vec::new();
        for _ in 0..PASS_BATCHES {
            let entries = match self
                .store
                .claim_outbox(after, BATCH, Utc::now(), CLAIM_HOLD)
                .await
            {
                Ok(e) => e,
                Err(error) => {
                    tracing::warn!(message = "outbox read failed", %error);
                    let _ = self.mark_sent(&confirmed).await;
                    return Err(());
                }
            };
            let Some(last) = entries.last() else {
                return self.mark_sent(&confirmed).await.map(|()| false);
            };
            after = last.id;
            let messages: Vec<_> = entries.iter().map(|e| e.message).collect();
            // A full in-process queue holds the publish until a worker takes deliveries,
            // and a draining worker takes none: shutdown must not wait for it. What was
            // not confirmed stays pending in the store and goes out after the restart.
            let publish = async {
                tokio::select! {
                    results = self.queue.publish(&messages) => Some(results),
                    () = shutdown.cancelled() => None,
                }
            };
            let (results, marked) = tokio::join!(publish, self.mark_sent(&confirmed));
            confirmed.clear();
            let Some(results) = results else {
                return Ok(false);
            };
            let mut failed = false;
            for (entry, result) in entries.iter().zip(results) {
                match result {
                    Ok(()) => confirmed.push(entry.id),
                    Err(error) => {
                        failed = true;
                        self.record_failure(entry.id, entry.message.run_id, &error)
                            .await;
                    }
                }
            }
            if marked.is_err() || failed {
                let _ = self.mark_sent(&confirmed).await;
                return Err(());
            }
            if (entries.len() as u32) < BATCH {
                return self.mark_sent(&confirmed).await.map(|()| false);
            }
        }
        self.mark_sent(&confirmed).await.map(|()| true)
    }

    /// Record confirmed entries as sent. On failure they will be published again; a
    /// worker drops the duplicate at claim time.
    async fn mark_sent(&self, ids: &[i64]) -> Result<(), ()> {
        if ids.is_empty() {
            return Ok(());
        }
        self.store
            .mark_outbox_sent(ids, Utc::now())
            .await
            .map_err(|error| {
                tracing::warn!(message = "marking outbox entries sent failed", %error);
            })
    }

    async fn record_failure(&self, id: i64, run_id: crate::domain::run::RunId, error: &QueueError) {
        if matches!(error, QueueError::Unroutable(_)) {
            tracing::error!(message = "run message unroutable; it stays pending", %run_id, %error);
        } else {
            tracing::warn!(message = "publish failed; will retry", %run_id, %error);
        }
        if let Err(error) = self.store.mark_outbox_failed(id, &error.to_string()).await {
            tracing::warn!(message = "recording publish failure failed", %error);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ports::{Outbox, RunRecords};
    use crate::domain::run::RunId;

    #[tokio::test]
    async fn a_run_that_changes_state_wakes_the_relay() {
        let events = RunEvents::new();
        let wake = Arc::new(Notify::new());
        let stop = CancellationToken::new();
        let task = tokio::spawn(wake_on_run_changes(
            events.clone(),
            wake.clone(),
            stop.clone(),
        ));
        // The waker subscribes when it first runs; publish until it has.
        let woken = async {
            loop {
                events.publish(RunId::new(), RunEventKind::Status);
                if tokio::time::timeout(Duration::from_millis(50), wake.notified())
                    .await
                    .is_ok()
                {
                    return;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), woken)
            .await
            .expect("a status change wakes the relay");
        stop.cancel();
        task.await.unwrap();
    }

    /// A queue that records what it is given and refuses chosen messages once.
    #[derive(Default)]
    struct Recording {
        published: std::sync::Mutex<Vec<crate::domain::ports::RunMessage>>,
        refuse_once: std::sync::Mutex<Vec<RunId>>,
    }

    #[async_trait::async_trait]
    impl RunQueue for Recording {
        async fn publish(
            &self,
            messages: &[crate::domain::ports::RunMessage],
        ) -> Vec<Result<(), QueueError>> {
            let mut refuse = self.refuse_once.lock().unwrap();
            let mut published = self.published.lock().unwrap();
            messages
                .iter()
                .map(|m| {
                    if let Some(i) = refuse.iter().position(|r| *r == m.run_id) {
                        refuse.remove(i);
                        return Err(QueueError::Nacked);
                    }
                    published.push(*m);
                    Ok(())
                })
                .collect()
        }
        async fn ping(&self) -> Result<(), QueueError> {
            Ok(())
        }
        async fn ready_messages(&self) -> Result<Option<u64>, QueueError> {
            Ok(None)
        }
    }

    /// Batches overlap (one published while the one before is recorded), across more
    /// than a pass; a refused message stays pending and goes out on the next try, and
    /// no other is published twice.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_pending_entry_goes_out_once_and_a_refused_one_again_later() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(crate::store::SqliteStore::open(dir.path()).await.unwrap());
        let n = BATCH as usize * 2 + 100;
        let mut runs = Vec::with_capacity(n);
        for _ in 0..n {
            let run = crate::store::suite::new_run();
            store.insert_run(&run, None).await.unwrap();
            runs.push(run.id);
        }
        let queue = Arc::new(Recording::default());
        queue
            .refuse_once
            .lock()
            .unwrap()
            .push(runs[BATCH as usize + 7]);
        let relay = Relay {
            store: store.clone(),
            queue: queue.clone(),
            wake: Arc::new(Notify::new()),
            republish_after: Duration::from_secs(3600),
        };
        let stop = CancellationToken::new();
        // The refusal ends the first pass with `Err`; the second publishes the rest.
        assert_eq!(relay.publish_pending(&stop).await, Err(()));
        assert_eq!(relay.publish_pending(&stop).await, Ok(false));
        let published: Vec<RunId> = queue
            .published
            .lock()
            .unwrap()
            .iter()
            .map(|m| m.run_id)
            .collect();
        let mut sorted = published.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), published.len(), "none published twice");
        let mut expected = runs.clone();
        expected.sort();
        assert_eq!(sorted, expected, "every run published");
        let backlog = store.outbox_backlog(chrono::Utc::now()).await.unwrap();
        assert_eq!(backlog.pending, 0, "every confirmed entry recorded as sent");
    }
}
