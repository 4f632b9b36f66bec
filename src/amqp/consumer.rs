use async_trait::async_trait;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    BasicRejectOptions,
};
use lapin::types::FieldTable;
use lapin::{Acker, Channel, Connection};

use super::{Brokers, QueueKind, declare_topology, unavailable};
use crate::domain::ports::{Delivery, DeliveryHandle, DeliverySource, QueueError};
use crate::protocol::parse_run_message;

/// Hands out one delivery per `next()`: it consumes with a prefetch of one, takes a
/// single delivery and cancels the consumer before returning it. The worker calls
/// `next()` only while it holds a free slot, so the broker never has a delivery waiting
/// unacked here while every slot is busy.
pub struct AmqpSource {
    brokers: Brokers,
    queue: String,
    name: String,
    conn: Option<(Connection, Channel)>,
    consumers: u64,
    kind: QueueKind,
}

impl AmqpSource {
    /// `urls`: the broker's nodes, tried in turn (see [`Brokers`]).
    pub fn new(urls: &[String], queue: &str, worker_id: &str) -> Self {
        Self {
            brokers: Brokers::new(urls),
            queue: queue.to_owned(),
            name: worker_id.to_owned(),
            conn: None,
            consumers: 0,
            kind: QueueKind::Classic,
        }
    }

    /// The kind of queue to declare (classic unless told).
    pub fn with_queue_kind(mut self, kind: QueueKind) -> Self {
        self.kind = kind;
        self
    }

    async fn channel(&mut self) -> Result<Channel, QueueError> {
        if let Some((conn, channel)) = &self.conn
            && conn.status().connected()
            && channel.status().connected()
        {
            return Ok(channel.clone());
        }
        self.conn = None;
        let conn = self
            .brokers
            .connect(&format!("tasuki worker {}", self.name))
            .await?;
        let channel = conn.create_channel().await.map_err(unavailable)?;
        declare_topology(&channel, &self.queue, self.kind).await?;
        // Per consumer (global = false): each short-lived consumer gets at most one.
        channel
            .basic_qos(1, BasicQosOptions { global: false })
            .await
            .map_err(unavailable)?;
        self.conn = Some((conn, channel.clone()));
        Ok(channel)
    }

    async fn take_one(&mut self, channel: &Channel) -> Result<Delivery, QueueError> {
        self.consumers += 1;
        let tag = format!("{}-{}", self.name, self.consumers);
        let mut consumer = channel
            .basic_consume(
                self.queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(unavailable)?;
        let delivery = consumer.next().await;
        let cancelled = channel
            .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
            .await;
        let delivery = match delivery {
            Some(Ok(d)) => d,
            Some(Err(e)) => return Err(unavailable(e)),
            None => {
                return Err(QueueError::Unavailable(
                    "consumer closed by the broker".into(),
                ));
            }
        };
        // With the delivery in hand, a failed cancel only means the channel is going;
        // the broker requeues the unacked delivery then.
        cancelled.map_err(unavailable)?;
        Ok(Delivery {
            message: parse_run_message(&delivery.data),
            handle: Box::new(AmqpHandle(delivery.acker)),
        })
    }
}

#[async_trait]
impl DeliverySource for AmqpSource {
    async fn next(&mut self) -> Result<Delivery, QueueError> {
        let channel = self.channel().await?;
        let result = self.take_one(&channel).await;
        if result.is_err() {
            self.conn = None;
        }
        result
    }
}

struct AmqpHandle(Acker);

/// lapin answers `Ok(false)` when the channel is gone and nothing was sent: the broker
/// will redeliver, so that is a failure, not a success.
fn settled(result: lapin::Result<bool>) -> Result<(), QueueError> {
    match result {
        Ok(true) => Ok(()),
        Ok(false) => Err(QueueError::Unavailable(
            "channel closed before the acknowledgement was sent".into(),
        )),
        Err(e) => Err(unavailable(e)),
    }
}

#[async_trait]
impl DeliveryHandle for AmqpHandle {
    async fn ack(self: Box<Self>) -> Result<(), QueueError> {
        settled(self.0.ack(BasicAckOptions::default()).await)
    }

    async fn requeue(self: Box<Self>) -> Result<(), QueueError> {
        let options = BasicNackOptions {
            requeue: true,
            multiple: false,
        };
        settled(self.0.nack(options).await)
    }

    async fn dead_letter(self: Box<Self>, _reason: &str) -> Result<(), QueueError> {
        settled(self.0.reject(BasicRejectOptions { requeue: false }).await)
    }
}
