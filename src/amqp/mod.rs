//! RabbitMQ through lapin: the run queue's topology, a confirming publisher (the outbox
//! relay's `RunQueue`), a slot-aware consumer (the worker's `DeliverySource`), the
//! request queue's consumer (`RequestConsumer`) and the replies to its producers
//! (`AmqpReplier`, the reply relay's `ReplySink`).
//!
//! Topology: a durable queue `{queue}` whose rejected messages dead-letter (default
//! exchange) into the durable queue `{queue}.dead`. Both are declared with their final
//! arguments, since RabbitMQ refuses to redeclare a queue with different ones.

mod consumer;
mod publisher;
mod replier;
mod requests;

use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection, ConnectionProperties};

pub use consumer::AmqpSource;
pub use publisher::AmqpPublisher;
pub use replier::AmqpReplier;
pub use requests::RequestConsumer;

use crate::domain::ports::QueueError;

/// How long connecting may take before it counts as the broker being down.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub fn dead_letter_queue(queue: &str) -> String {
    format!("{queue}.dead")
}

fn unavailable(e: impl std::fmt::Display) -> QueueError {
    QueueError::Unavailable(e.to_string())
}

async fn connect(url: &str, name: &str) -> Result<Connection, QueueError> {
    let props =
        ConnectionProperties::default().with_connection_name(LongString::from(name.to_owned()));
    match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(url, props)).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(unavailable(format!("connecting to the broker: {e}"))),
        Err(_) => Err(unavailable("connecting to the broker timed out")),
    }
}

/// Declare a queue (the run queue, the request queue) and its dead-letter queue;
/// returns the messages ready in the queue.
async fn declare_topology(channel: &Channel, queue: &str) -> Result<u64, QueueError> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let dead = dead_letter_queue(queue);
    channel
        .queue_declare(dead.as_str().into(), durable, FieldTable::default())
        .await
        .map_err(|e| unavailable(format!("declaring queue {dead}: {e}")))?;
    let mut args = FieldTable::default();
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(LongString::from("")),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(LongString::from(dead.clone())),
    );
    let declared = channel
        .queue_declare(queue.into(), durable, args)
        .await
        .map_err(|e| unavailable(format!("declaring queue {queue}: {e}")))?;
    Ok(u64::from(declared.message_count()))
}
