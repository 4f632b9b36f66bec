//! The reply relay: sends replies owed to producers (stored with their runs) and marks
//! them sent on the broker's confirm, or unroutable when the broker returns them. Like
//! the outbox relay, the store is the source of truth, so a restart of `serve` loses
//! no reply.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::domain::ports::{QueueError, ReplySink, RunStore};
use crate::domain::reply::{DueReply, next_try};
use crate::domain::store::Replies;

const BATCH: u32 = 64;
/// Also look without being woken: a run that ended in another process, a retry whose
/// delay has passed.
const IDLE_POLL: Duration = Duration::from_secs(1);
/// How long the replies a relay took stay its own in a shared store (another
/// replica's relay skips them): ample for a batch of publishes and their confirms.
const CLAIM_HOLD: Duration = Duration::from_secs(60);

pub struct ReplyRelay {
    pub store: Arc<dyn RunStore>,
    pub replies: Arc<dyn Replies>,
    pub sink: Arc<dyn ReplySink>,
    /// Woken by accepts with an `accepted` reply and by run state changes.
    pub wake: Arc<Notify>,
}

/// What became of one reply.
enum Sent {
    Done,
    Retry,
}

impl ReplyRelay {
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            let more = self.send_due().await;
            if more {
                continue;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(IDLE_POLL) => {}
            }
        }
    }

    /// One batch; true when it was full and more may be due.
    async fn send_due(&self) -> bool {
        let due = match self
            .replies
            .claim_replies(BATCH, Utc::now(), CLAIM_HOLD)
            .await
        {
            Ok(due) => due,
            Err(error) => {
                tracing::warn!(message = "reading due replies failed", %error);
                return false;
            }
        };
        let mut failed = false;
        for reply in &due {
            if let Sent::Retry = self.send(reply).await {
                failed = true;
            }
        }
        !failed && due.len() == BATCH as usize
    }

    async fn send(&self, reply: &DueReply) -> Sent {
        let run = match self.store.get_run(reply.run_id).await {
            Ok(Some(run)) => run,
            Ok(None) => {
                // Pruned: nothing left to say; recorded so it is not looked at again.
                let _ = self
                    .replies
                    .reply_unroutable(reply.id, "the run no longer exists", Utc::now())
                    .await;
                return Sent::Done;
            }
            Err(error) => {
                tracing::warn!(message = "reading a run for its reply failed", run_id = %reply.run_id, %error);
                return Sent::Retry;
            }
        };
        let result = self.sink.send_reply(&reply.address, reply.kind, &run).await;
        let now = Utc::now();
        let recorded = match &result {
            Ok(()) => {
                tracing::info!(message = "reply sent", run_id = %reply.run_id, kind = reply.kind.as_str(), to = %reply.address.to);
                self.replies.reply_sent(reply.id, now).await
            }
            Err(QueueError::Unroutable(why)) => {
                tracing::warn!(message = "reply unroutable: no queue by that name; not retried", run_id = %reply.run_id, to = %reply.address.to, %why);
                self.replies
                    .reply_unroutable(reply.id, &format!("unroutable: {why}"), now)
                    .await
            }
            Err(error) => {
                tracing::warn!(message = "reply failed; will retry", run_id = %reply.run_id, %error);
                self.replies
                    .reply_failed(
                        reply.id,
                        &error.to_string(),
                        next_try(now, reply.tries.saturating_add(1)),
                    )
                    .await
            }
        };
        if let Err(error) = recorded {
            // Sent again later: a producer may see a duplicate reply, never none.
            tracing::warn!(message = "recording a reply failed", run_id = %reply.run_id, %error);
            return Sent::Retry;
        }
        match result {
            Ok(()) | Err(QueueError::Unroutable(_)) => Sent::Done,
            Err(_) => Sent::Retry,
        }
    }
}
