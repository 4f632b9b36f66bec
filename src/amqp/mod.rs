//! RabbitMQ through lapin: the run queue's topology, a confirming publisher (the outbox
//! relay's `RunQueue`), a slot-aware consumer (the worker's `DeliverySource`), the
//! request queue's consumer (`RequestConsumer`) and the replies to its producers
//! (`AmqpReplier`, the reply relay's `ReplySink`). Each connects to the first of its
//! broker URLs (`Brokers`: the nodes of one cluster) that answers.
//!
//! Topology: a durable queue `{queue}` whose rejected messages dead-letter (default
//! exchange) into the durable queue `{queue}.dead`. Both are declared with their final
//! arguments, since RabbitMQ refuses to redeclare a queue with different ones. They are
//! classic queues, or quorum queues (`QueueKind::Quorum`, replicated on a cluster) whose
//! messages also dead-letter once returned to the queue more than `delivery_limit` times.

mod brokers;
mod consumer;
mod publisher;
mod replier;
mod requests;

use std::time::Duration;

use lapin::Channel;
use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable, LongString};

pub use brokers::Brokers;
pub use consumer::AmqpSource;
pub use publisher::AmqpPublisher;
pub use replier::AmqpReplier;
pub use requests::RequestConsumer;

use crate::domain::ports::QueueError;

/// How long connecting to one broker may take before it counts as down.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Which kind of queue the run and request queues (and their dead-letter queues) are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QueueKind {
    #[default]
    Classic,
    /// A quorum queue; a message returned to it more than `delivery_limit` times (handed
    /// back, or its consumer gone before it acked) is dead-lettered instead of delivered
    /// again.
    Quorum { delivery_limit: u32 },
}

impl QueueKind {
    /// The arguments that make a queue of this kind, besides dead-lettering.
    fn arguments(self) -> FieldTable {
        let mut args = FieldTable::default();
        if let QueueKind::Quorum { delivery_limit } = self {
            args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString(LongString::from("quorum")),
            );
            args.insert(
                "x-delivery-limit".into(),
                AMQPValue::LongLongInt(i64::from(delivery_limit)),
            );
        }
        args
    }

    fn name(self) -> &'static str {
        match self {
            QueueKind::Classic => "classic",
            QueueKind::Quorum { .. } => "quorum",
        }
    }
}

pub fn dead_letter_queue(queue: &str) -> String {
    format!("{queue}.dead")
}

fn unavailable(e: impl std::fmt::Display) -> QueueError {
    QueueError::Unavailable(e.to_string())
}

/// The broker refused a declaration: a queue of that name that exists with other
/// arguments is named as such, since no retry or restart will change it.
fn declare_failed(queue: &str, kind: QueueKind, e: lapin::Error) -> QueueError {
    let text = e.to_string();
    if text.contains("inequivalent arg") {
        return QueueError::Unavailable(format!(
            "declaring queue {queue} as a {} queue: it exists with other arguments ({text}); \
             RabbitMQ cannot change a queue's type or arguments in place: use the \
             --queue-type and --delivery-limit it was declared with, or move to a new \
             queue (README \"Quorum queues\")",
            kind.name()
        ));
    }
    unavailable(format!("declaring queue {queue}: {text}"))
}

/// Declare a queue (the run queue, the request queue) and its dead-letter queue, both
/// of `kind`; returns the messages ready in the queue.
async fn declare_topology(
    channel: &Channel,
    queue: &str,
    kind: QueueKind,
) -> Result<u64, QueueError> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let dead = dead_letter_queue(queue);
    let mut dead_args = FieldTable::default();
    if kind != QueueKind::Classic {
        dead_args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from("quorum")),
        );
    }
    channel
        .queue_declare(dead.as_str().into(), durable, dead_args)
        .await
        .map_err(|e| declare_failed(&dead, kind, e))?;
    let mut args = kind.arguments();
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
        .map_err(|e| declare_failed(queue, kind, e))?;
    Ok(u64::from(declared.message_count()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quorum_queue_says_its_type_and_delivery_limit_and_a_classic_one_nothing() {
        assert!(QueueKind::Classic.arguments().inner().is_empty());
        let args = QueueKind::Quorum { delivery_limit: 7 }.arguments();
        let args = args.inner();
        assert_eq!(
            args.get("x-queue-type"),
            Some(&AMQPValue::LongString(LongString::from("quorum")))
        );
        assert_eq!(
            args.get("x-delivery-limit"),
            Some(&AMQPValue::LongLongInt(7))
        );
        assert_eq!(args.len(), 2);
    }
}
