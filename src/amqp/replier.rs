//! Publishes on the default exchange with confirms and `mandatory`: replies to
//! producers (the reply relay's `ReplySink`) and, for the request consumer, error
//! replies and refused requests into the dead-letter queue.

use std::time::Duration;

use async_trait::async_trait;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use tokio::sync::Mutex;

use super::publisher::confirmation_result;
use super::{Brokers, unavailable};
use crate::domain::ports::{QueueError, ReplySink};
use crate::domain::reply::{ReplyAddress, ReplyKind};
use crate::domain::run::Run;
use crate::protocol::api::RunV1;

/// How long one publish may wait for its confirm.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

pub struct AmqpReplier {
    brokers: Brokers,
    conn: Mutex<Option<(Connection, Channel)>>,
}

/// A header with a text value.
pub(super) fn text(value: impl Into<String>) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value.into()))
}

impl AmqpReplier {
    /// `urls`: the broker's nodes, tried in turn (see [`Brokers`]).
    pub fn new(urls: &[String]) -> Self {
        Self {
            brokers: Brokers::new(urls),
            conn: Mutex::new(None),
        }
    }

    /// Publish to `routing_key` on the default exchange (mandatory) and wait for the
    /// confirm; a message the broker returns is `Unroutable`.
    pub(super) async fn publish(
        &self,
        routing_key: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> Result<(), QueueError> {
        let mut slot = self.conn.lock().await;
        let channel = match slot.as_ref() {
            Some((conn, channel)) if conn.status().connected() && channel.status().connected() => {
                channel.clone()
            }
            _ => {
                *slot = None;
                let conn = self.brokers.connect("tasuki replies").await?;
                let channel = conn.create_channel().await.map_err(unavailable)?;
                channel
                    .confirm_select(ConfirmSelectOptions::default())
                    .await
                    .map_err(unavailable)?;
                *slot = Some((conn, channel.clone()));
                channel
            }
        };
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let sent = async {
            let confirm = channel
                .basic_publish("".into(), routing_key.into(), options, body, props)
                .await
                .map_err(unavailable)?;
            confirmation_result(confirm.await)
        };
        let result = match tokio::time::timeout(CONFIRM_TIMEOUT, sent).await {
            Ok(r) => r,
            Err(_) => Err(QueueError::Unavailable(format!(
                "no confirm from the broker within {}s",
                CONFIRM_TIMEOUT.as_secs()
            ))),
        };
        if matches!(result, Err(QueueError::Unavailable(_))) {
            *slot = None;
        }
        result
    }
}

#[async_trait]
impl ReplySink for AmqpReplier {
    async fn send_reply(
        &self,
        address: &ReplyAddress,
        kind: ReplyKind,
        run: &Run,
    ) -> Result<(), QueueError> {
        let body = serde_json::to_vec(&RunV1::from(run.clone()))
            .map_err(|e| QueueError::Unavailable(e.to_string()))?;
        let mut headers = FieldTable::default();
        headers.insert("x-tasuki-reply".into(), text(kind.as_str()));
        headers.insert("x-tasuki-status".into(), text(run.status.as_str()));
        if let Some(code) = run.exit_code {
            headers.insert("x-tasuki-exit-code".into(), AMQPValue::LongLongInt(code));
        }
        let mut props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_headers(headers);
        if let Some(id) = &address.correlation_id {
            props = props.with_correlation_id(ShortString::from(id.clone()));
        }
        self.publish(&address.to, &body, props).await
    }
}
