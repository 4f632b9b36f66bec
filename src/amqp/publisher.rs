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
}

impl AmqpPublisher {
    pub fn new(url: &str, queue: &str) -> Self {
        Self {
            url: url.to_owned(),
            queue: queue.to_owned(),
            conn: Mutex::new(None),
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
                Ok(confirm) => match confirm.await {
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
                },
            };
            broken |= matches!(result, Err(QueueError::Unavailable(_)));
            results.push(result);
        }
        if broken {
            *slot = None;
        }
        results
    }

    async fn ping(&self) -> Result<(), QueueError> {
        let mut slot = self.conn.lock().await;
        self.channel(&mut slot).await.map(|_| ())
    }
}
