//! The outbox relay: publishes pending outbox entries and marks them sent only on the
//! queue's confirm. The store is the source of truth; the queue is transport.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::{Notify, broadcast};
use tokio_util::sync::CancellationToken;

use crate::domain::ports::{QueueError, RunQueue, RunStore};
use crate::service::events::{RunEventKind, RunEvents};

const BATCH: u32 = 256;
/// Also look without being woken, for entries a failed publish left behind and retries
/// whose backoff has passed.
const IDLE_POLL: Duration = Duration::from_secs(1);
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

    /// One batch. `Ok(true)` when a full batch went out and more may be waiting;
    /// `Err` when the store or the queue failed and the caller should back off.
    async fn publish_pending(&self, shutdown: &CancellationToken) -> Result<bool, ()> {
        let entries = match self.store.pending_outbox(BATCH, Utc::now()).await {
            Ok(e) => e,
            Err(error) => {
                tracing::warn!(message = "outbox read failed", %error);
                return Err(());
            }
        };
        if entries.is_empty() {
            return Ok(false);
        }
        let messages: Vec<_> = entries.iter().map(|e| e.message).collect();
        // A full in-process queue holds the publish until a worker takes deliveries,
        // and a draining worker takes none: shutdown must not wait for it. What was not
        // confirmed stays pending in the store and goes out after the restart.
        let results = tokio::select! {
            results = self.queue.publish(&messages) => results,
            () = shutdown.cancelled() => return Ok(false),
        };
        let mut sent = Vec::with_capacity(entries.len());
        let mut failed = false;
        for (entry, result) in entries.iter().zip(results) {
            match result {
                Ok(()) => sent.push(entry.id),
                Err(error) => {
                    failed = true;
                    if matches!(error, QueueError::Unroutable(_)) {
                        tracing::error!(message = "run message unroutable; it stays pending", run_id = %entry.message.run_id, %error);
                    } else {
                        tracing::warn!(message = "publish failed; will retry", run_id = %entry.message.run_id, %error);
                    }
                    if let Err(error) = self
                        .store
                        .mark_outbox_failed(entry.id, &error.to_string())
                        .await
                    {
                        tracing::warn!(message = "recording publish failure failed", %error);
                    }
                }
            }
        }
        if let Err(error) = self.store.mark_outbox_sent(&sent, Utc::now()).await {
            // They will be published again; a worker drops the duplicate at claim time.
            tracing::warn!(message = "marking outbox entries sent failed", %error);
            return Err(());
        }
        if failed {
            return Err(());
        }
        Ok(entries.len() as u32 == BATCH)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
}
