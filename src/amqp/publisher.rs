use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::{Brokers, QueueKind, declare_topology, unavailable};
use crate::domain::ports::{QueueError, RunMessage, RunQueue};
use crate::protocol::RunMessageV1;

/// Publishes run messages as persistent, mandatory messages on a confirm channel. The
/// connection is made on first use and made again after any failure.
pub struct AmqpPublisher {
    brokers: Brokers,
    queue: String,
    conn: Mutex<Option<(Connection, Channel)>>,
    /// Whether the last attempt to reach the broker worked (for `ping` during a publish).
    connected: AtomicBool,
    /// How long one batch may take from its first publish to its last confirm.
    confirm_timeout: Duration,
    confirms: std::sync::Mutex<ConfirmWatch>,
    kind: QueueKind,
}

/// How long a batch waits for the broker's confirms, unless told otherwise.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a batch may wait for confirms before readiness says the broker is not
/// confirming, while that batch still waits.
const CONFIRM_PATIENCE: Duration = Duration::from_secs(5);

/// What readiness knows about confirms. A broker under a memory or disk alarm keeps the
/// connection open and takes publishes, but confirms nothing: connected, yet not working.
#[derive(Debug, Default)]
struct ConfirmWatch {
    /// Set while a batch waits for its confirms.
    waiting_since: Option<Instant>,
    /// The last batch ran out of time before every confirm came; cleared by a batch
    /// the broker answered in full.
    overdue: bool,
}

impl ConfirmWatch {
    fn verdict(&self, now: Instant, patience: Duration) -> Result<(), String> {
        if self.overdue {
            return Err("the broker did not confirm the last publishes in time".into());
        }
        match self.waiting_since {
            Some(since) if now.saturating_duration_since(since) >= patience => Err(format!(
                "publishes waiting for the broker's confirm for {}s",
                now.saturating_duration_since(since).as_secs()
            )),
            _ => Ok(()),
        }
    }
}

/// The broker's answers to one batch.
struct Confirms {
    results: Vec<Result<(), QueueError>>,
    /// The batch's deadline passed before every confirm came.
    timed_out: bool,
}

fn overdue(timeout: Duration) -> QueueError {
    QueueError::Unavailable(format!(
        "no confirm from the broker within {}s",
        timeout.as_secs_f64()
    ))
}

pub(super) fn confirmation_result(
    confirmation: Result<Confirmation, lapin::Error>,
) -> Result<(), QueueError> {
    match confirmation {
        Ok(Confirmation::Ack(None)) => Ok(()),
        Ok(Confirmation::Ack(Some(returned))) => Err(QueueError::Unroutable(format!(
            "{} {}",
            returned.reply_code, returned.reply_text
        ))),
        Ok(Confirmation::Nack(_)) => Err(QueueError::Nacked),
        Ok(Confirmation::NotRequested) => Err(QueueError::Unavailable(
            "channel is not in confirm mode".into(),
        )),
        Err(e) => Err(unavailable(e)),
    }
}

/// Wait for every confirm of a batch, all against one `deadline`: a broker that stops
/// confirming costs the batch one timeout, not one per message.
async fn await_confirms<F>(
    pending: Vec<Result<F, QueueError>>,
    deadline: Instant,
    timeout: Duration,
) -> Confirms
where
    F: Future<Output = Result<Confirmation, lapin::Error>>,
{
    let mut results = Vec::with_capacity(pending.len());
    let mut timed_out = false;
    for p in pending {
        let result = match p {
            Err(e) => Err(e),
            // A confirm already received still counts after the deadline: `timeout_at`
            // polls the confirm before it looks at the clock.
            Ok(confirm) => match tokio::time::timeout_at(deadline, confirm).await {
                Err(_) => {
                    timed_out = true;
                    Err(overdue(timeout))
                }
                Ok(confirmation) => confirmation_result(confirmation),
            },
        };
        results.push(result);
    }
    Confirms { results, timed_out }
}

impl AmqpPublisher {
    /// `urls`: the broker's nodes, tried in turn (see [`Brokers`]).
    pub fn new(urls: &[String], queue: &str) -> Self {
        Self {
            brokers: Brokers::new(urls),
            queue: queue.to_owned(),
            conn: Mutex::new(None),
            connected: AtomicBool::new(false),
            confirm_timeout: CONFIRM_TIMEOUT,
            confirms: std::sync::Mutex::new(ConfirmWatch::default()),
            kind: QueueKind::Classic,
        }
    }

    /// The kind of queue to declare (classic unless told).
    pub fn with_queue_kind(mut self, kind: QueueKind) -> Self {
        self.kind = kind;
        self
    }

    fn confirm_watch(&self) -> std::sync::MutexGuard<'_, ConfirmWatch> {
        self.confirms.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn channel(
        &self,
        slot: &mut Option<(Connection, Channel)>,
    ) -> Result<Channel, QueueError> {
        if let Some((conn, channel)) = slot.as_ref()
            && conn.status().connected()
            && channel.status().connected()
        {
            return Ok(channel.clone());
        }
        *slot = None;
        let conn = self.brokers.connect("tasuki publisher").await?;
        let channel = conn.create_channel().await.map_err(unavailable)?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(unavailable)?;
        declare_topology(&channel, &self.queue, self.kind).await?;
        *slot = Some((conn, channel.clone()));
        Ok(channel)
    }

    /// Publish every message and collect the confirms, all within one deadline (a
    /// blocked connection can hold the publish itself, not only its confirm).
    async fn publish_batch(&self, channel: &Channel, messages: &[RunMessage]) -> Confirms {
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into());
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let deadline = Instant::now() + self.confirm_timeout;
        let mut pending = Vec::with_capacity(messages.len());
        let mut timed_out = false;
        for m in messages {
            let body = match serde_json::to_vec(&RunMessageV1::from(*m)) {
                Ok(b) => b,
                Err(e) => {
                    pending.push(Err(QueueError::Unavailable(e.to_string())));
                    continue;
                }
            };
            let publish = channel.basic_publish(
                "".into(),
                self.queue.as_str().into(),
                options,
                &body,
                props.clone(),
            );
            let sent = match tokio::time::timeout_at(deadline, publish).await {
                Ok(sent) => sent.map_err(unavailable),
                Err(_) => {
                    timed_out = true;
                    Err(overdue(self.confirm_timeout))
                }
            };
            pending.push(sent);
        }
        let mut confirms = await_confirms(pending, deadline, self.confirm_timeout).await;
        confirms.timed_out |= timed_out;
        confirms
    }
}

#[async_trait]
impl RunQueue for AmqpPublisher {
    async fn publish(&self, messages: &[RunMessage]) -> Vec<Result<(), QueueError>> {
        // One publisher at a time keeps confirms in order and the channel simple; the
        // relay batches, so this is not a throughput limit.
        let mut slot = self.conn.lock().await;
        let channel = match self.channel(&mut slot).await {
            Ok(c) => c,
            Err(e) => {
                self.connected.store(false, Ordering::SeqCst);
                return messages
                    .iter()
                    .map(|_| Err(QueueError::Unavailable(e.to_string())))
                    .collect();
            }
        };
        self.confirm_watch().waiting_since = Some(Instant::now());
        let Confirms { results, timed_out } = self.publish_batch(&channel, messages).await;
        {
            let mut watch = self.confirm_watch();
            watch.waiting_since = None;
            watch.overdue = timed_out;
        }
        // A broker under a memory or disk alarm blocks publishers: give up on this
        // connection and let the relay retry later. Unroutable too: the queue may have
        // been deleted; reconnecting declares it.
        let broken = results.iter().any(|r| {
            matches!(
                r,
                Err(QueueError::Unavailable(_) | QueueError::Unroutable(_))
            )
        });
        if broken {
            *slot = None;
        }
        self.connected.store(!broken, Ordering::SeqCst);
        results
    }

    async fn ping(&self) -> Result<(), QueueError> {
        self.confirm_watch()
            .verdict(Instant::now(), CONFIRM_PATIENCE.min(self.confirm_timeout))
            .map_err(QueueError::Unavailable)?;
        // While a publish holds the connection, ask its status instead of waiting.
        let Ok(mut slot) = self.conn.try_lock() else {
            return match self.connected.load(Ordering::SeqCst) {
                true => Ok(()),
                false => Err(QueueError::Unavailable(
                    "not connected to the broker".into(),
                )),
            };
        };
        let result = self.channel(&mut slot).await.map(|_| ());
        self.connected.store(result.is_ok(), Ordering::SeqCst);
        result
    }

    async fn ready_messages(&self) -> Result<Option<u64>, QueueError> {
        let mut slot = self.conn.lock().await;
        let channel = self.channel(&mut slot).await?;
        // Declaring again with the same arguments is a no-op that answers the count.
        match declare_topology(&channel, &self.queue, self.kind).await {
            Ok(count) => Ok(Some(count)),
            Err(e) => {
                *slot = None;
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;

    use super::*;

    type Confirm = Pin<Box<dyn Future<Output = Result<Confirmation, lapin::Error>> + Send>>;

    fn never() -> Result<Confirm, QueueError> {
        Ok(Box::pin(std::future::pending()))
    }

    /// Like lapin's, the confirm arrives on its own schedule, polled or not.
    fn acked_after(delay: Duration) -> Result<Confirm, QueueError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = tx.send(Confirmation::Ack(None));
        });
        Ok(Box::pin(async move {
            Ok(rx.await.unwrap_or(Confirmation::NotRequested))
        }))
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_the_broker_never_confirms_ends_after_one_deadline() {
        let timeout = Duration::from_secs(30);
        let start = Instant::now();
        let pending: Vec<_> = (0..8).map(|_| never()).collect();
        let confirms = await_confirms(pending, start + timeout, timeout).await;
        assert!(confirms.timed_out);
        assert_eq!(confirms.results.len(), 8);
        assert!(
            confirms
                .results
                .iter()
                .all(|r| matches!(r, Err(QueueError::Unavailable(_)))),
            "{:?}",
            confirms.results
        );
        // Paused time moves only to the timers that fire: one deadline for the batch,
        // where a timeout per message would have taken eight.
        assert!(start.elapsed() < 2 * timeout, "{:?}", start.elapsed());
    }

    #[tokio::test(start_paused = true)]
    async fn confirms_that_came_before_the_deadline_count_after_it() {
        let timeout = Duration::from_secs(30);
        let start = Instant::now();
        let pending = vec![
            never(),
            acked_after(Duration::from_secs(10)),
            Err(QueueError::Nacked),
            acked_after(Duration::from_secs(60)),
        ];
        let confirms = await_confirms(pending, start + timeout, timeout).await;
        assert!(confirms.timed_out);
        let kinds: Vec<_> = confirms
            .results
            .iter()
            .map(|r| match r {
                Ok(()) => "ok",
                Err(QueueError::Unavailable(_)) => "overdue",
                Err(QueueError::Nacked) => "nacked",
                Err(_) => "other",
            })
            .collect();
        assert_eq!(kinds, ["overdue", "ok", "nacked", "overdue"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_confirmed_in_full_is_not_overdue() {
        let timeout = Duration::from_secs(30);
        let pending = vec![
            acked_after(Duration::from_secs(1)),
            acked_after(Duration::ZERO),
        ];
        let confirms = await_confirms(pending, Instant::now() + timeout, timeout).await;
        assert!(!confirms.timed_out);
        assert!(confirms.results.iter().all(Result::is_ok));
    }

    #[tokio::test(start_paused = true)]
    async fn readiness_fails_while_confirms_are_slow_and_after_a_batch_timed_out() {
        let patience = Duration::from_secs(5);
        let start = Instant::now();
        let mut watch = ConfirmWatch::default();
        assert!(watch.verdict(start, patience).is_ok());
        watch.waiting_since = Some(start);
        assert!(
            watch
                .verdict(start + Duration::from_secs(1), patience)
                .is_ok()
        );
        assert!(watch.verdict(start + patience, patience).is_err());
        watch.waiting_since = None;
        watch.overdue = true;
        assert!(watch.verdict(start + patience, patience).is_err());
        watch.overdue = false;
        assert!(watch.verdict(start + patience, patience).is_ok());
    }
}
