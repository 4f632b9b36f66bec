//! The outbox relay: publishes pending outbox entries and marks them sent only on the
//! queue's confirm. The store is the source of truth; the queue is transport.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::domain::ports::{QueueError, RunQueue, RunStore};

const BATCH: u32 = 256;
/// Also look without being woken, for entries a failed publish left behind and retries
/// whose backoff has passed.
const IDLE_POLL: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

pub struct Relay {
    pub store: Arc<dyn RunStore>,
    pub queue: Arc<dyn RunQueue>,
    pub wake: Arc<Notify>,
}

impl Relay {
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let delay = match self.publish_pending().await {
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

    /// One batch. `Ok(true)` when a full batch went out and more may be waiting;
    /// `Err` when the store or the queue failed and the caller should back off.
    async fn publish_pending(&self) -> Result<bool, ()> {
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
        let results = self.queue.publish(&messages).await;
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
