//! The callback relay: delivers due callback obligations, records each try, and decides
//! what follows by `domain::callback::after_try` (retry with backoff, stop, give up).

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::domain::callback::{CallbackSender, DueCallback, after_try};
use crate::domain::ports::RunStore;

const BATCH: u32 = 64;
/// Tries in flight at once, so one slow receiver does not hold up the others.
const PARALLEL: usize = 8;
const IDLE_POLL: Duration = Duration::from_secs(1);
/// How long the deliveries a relay took stay its own in a shared store: a batch is
/// BATCH / PARALLEL rounds of tries of at most 10 s each.
const CLAIM_HOLD: Duration = Duration::from_secs(120);

pub struct CallbackRelay {
    pub store: Arc<dyn RunStore>,
    pub sender: Arc<dyn CallbackSender>,
    /// How long after its event a delivery is still tried.
    pub max_age: Duration,
    /// Woken by a person's redelivery.
    pub wake: Arc<Notify>,
}

impl CallbackRelay {
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            let busy = match self
                .store
                .claim_callbacks(Utc::now(), BATCH, CLAIM_HOLD)
                .await
            {
                Ok(due) if !due.is_empty() => {
                    let full = due.len() as u32 == BATCH;
                    futures::stream::iter(due)
                        .for_each_concurrent(PARALLEL, |d| self.try_one(d))
                        .await;
                    full
                }
                Ok(_) => false,
                Err(error) => {
                    tracing::warn!(message = "reading due callbacks failed", %error);
                    false
                }
            };
            if busy {
                continue;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(IDLE_POLL) => {}
            }
        }
    }

    async fn try_one(&self, due: DueCallback) {
        let run = match self.store.get_run(due.run_id).await {
            Ok(Some(run)) => run,
            Ok(None) => return,
            Err(error) => {
                tracing::warn!(message = "reading a run for its callback failed", %error, run_id = %due.run_id);
                return;
            }
        };
        let now = Utc::now();
        let result = self.sender.send(&due, &run, now).await;
        let done = Utc::now();
        let next = after_try(
            &result,
            due.tries.saturating_add(1),
            due.created_at,
            done,
            self.max_age,
            rand::random::<f64>(),
        );
        tracing::info!(
            message = "callback try",
            run_id = %due.run_id,
            event_id = %due.event_id,
            ?result,
            ?next,
        );
        if let Err(error) = self
            .store
            .record_callback_try(due.id, &result, next, done)
            .await
        {
            tracing::warn!(message = "recording a callback try failed", %error, run_id = %due.run_id);
        }
    }
}
