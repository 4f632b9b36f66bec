use async_trait::async_trait;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use tokio::sync::Mutex;

use super::{connect, declare_topology, unavailable};
use crate::domain::ports::{QueueError, RunMessage, RunQueue};
use crate::protocol::RunMessageV1;

/// Publishes run messages as persistent, mandatory messages on a confirm channel. The
/// connection is made on first use and made again after any failure.
pub struct AmqpPublisher {
    url: String,
    queue: String,
    conn: Mutex<Option<(Connection, Channel)>>,
    /// Whether the last attempt to reach the broker worked (for `ping` during a publish).
    connected: std::sync::atomic::AtomicBool,
}

/// How long a publish waits for the broker's confirm.
const CONFIRM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

impl AmqpPublisher {
    pub fn new(url: &str, queue: &str) -> Self {
        Self {
            url: url.to_owned(),
            queue: queue.to_owned(),
            conn: Mutex::new(None),
            connected: std::sync::atomic::AtomicBool::new(false),
        }
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
        let conn = connect(&self.url, "tasuki publisher").await?;
        let channel = conn.create_channel().await.map_err(unavailable)?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(unavailable)?;
        declare_topology(&channel, &self.queue).await?;
        *slot = Some((conn, channel.clone()));
        Ok(channel)
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
                self.connected
                    .store(false, std::sync::atomic::Ordering::SeqCst);
                return messages
                    .iter()
                    .map(|_| Err(QueueError::Unavailable(e.to_string())))
                    .collect();
            }
        };
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into());
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let mut pending = Vec::with_capacity(messages.len());
        for m in messages {
            let body = match serde_json::to_vec(&RunMessageV1::from(*m)) {
                Ok(b) => b,
                Err(e) => {
                    pending.push(Err(QueueError::Unavailable(e.to_string())));
                    continue;
                }
            };
            let sent = channel
                .basic_publish(
                    "".into(),
                    self.queue.as_str().into(),
                    options,
                    &body,
                    props.clone(),
                )
                .await
                .map_err(unavailable);
            pending.push(sent);
        }
        let mut results = Vec::with_capacity(messages.len());
        let mut broken = false;
        for p in pending {
            let result = match p {
                Err(e) => Err(e),
                Ok(confirm) => match tokio::time::timeout(CONFIRM_TIMEOUT, confirm).await {
                    // A broker under a memory or disk alarm blocks publishers: give up on
                    // this connection and let the relay retry later.
                    Err(_) => Err(QueueError::Unavailable(format!(
                        "no confirm from the broker within {}s",
                        CONFIRM_TIMEOUT.as_secs()
                    ))),
                    Ok(confirmation) => match confirmation {
                        Ok(Confirmation::Ack(None)) => Ok(()),
                        Ok(Confirmation::Ack(Some(returned))) => Err(QueueError::Unroutable(
                            format!("{} {}", returned.reply_code, returned.reply_text),
                        )),
                        Ok(Confirmation::Nack(_)) => Err(QueueError::Nacked),
                        Ok(Confirmation::NotRequested) => Err(QueueError::Unavailable(
                            "channel is not in confirm mode".into(),
                        )),
                        Err(e) => Err(unavailable(e)),
                    },
                },
            };
            // Unroutable too: the queue may have been deleted; reconnecting declares it.
            broken |= matches!(
                result,
                Err(QueueError::Unavailable(_) | QueueError::Unroutable(_))
            );
            results.push(result);
        }
        if broken {
            *slot = None;
        }
        self.connected
            .store(!broken, std::sync::atomic::Ordering::SeqCst);
        results
    }

    async fn ping(&self) -> Result<(), QueueError> {
        // While a publish holds the connection, ask its status instead of waiting.
        let Ok(mut slot) = self.conn.try_lock() else {
            return match self.connected.load(std::sync::atomic::Ordering::SeqCst) {
                true => Ok(()),
                false => Err(QueueError::Unavailable(
                    "not connected to the broker".into(),
                )),
            };
        };
        let result = self.channel(&mut slot).await.map(|_| ());
        self.connected
            .store(result.is_ok(), std::sync::atomic::Ordering::SeqCst);
        result
    }

    async fn ready_messages(&self) -> Result<Option<u64>, QueueError> {
        let mut slot = self.conn.lock().await;
        let channel = self.channel(&mut slot).await?;
        // Declaring again with the same arguments is a no-op that answers the count.
        match declare_topology(&channel, &self.queue).await {
            Ok(count) => Ok(Some(count)),
            Err(e) => {
                *slot = None;
                Err(e)
            }
        }
    }
}
