//! The in-process queue used when no AMQP URL is given. It is volatile: on start-up the
//! store republishes every run still waiting (see `RunStore::requeue_unclaimed`).
//!
//! It is bounded: a publish waits while `capacity` messages are queued or handed out
//! and not yet acked, so a backlog stays in the store (the truth) instead of growing
//! in memory. A delivery keeps its place until it is acked, so putting it back never
//! waits and never overfills the queue.

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore, mpsc};

use crate::domain::ports::{
    Delivery, DeliveryHandle, DeliverySource, QueueError, RunMessage, RunQueue,
};

/// Messages queued or in flight at most, unless told otherwise: four of the relay's
/// batches.
pub const DEFAULT_CAPACITY: usize = 1024;

/// A message with its place in the queue.
struct Queued {
    message: RunMessage,
    _place: OwnedSemaphorePermit,
}

#[derive(Clone)]
pub struct MemQueue {
    places: Arc<Semaphore>,
    tx: mpsc::UnboundedSender<Queued>,
    rx: Arc<Mutex<mpsc::UnboundedReceiver<Queued>>>,
}

impl Default for MemQueue {
    fn default() -> Self {
        Self::new()
    }
}

impl MemQueue {
    pub fn new() -> Self {
        Self::with_capacity(DEFAULT_CAPACITY)
    }

    /// `capacity` is raised to 1: a queue with no place would never take anything.
    pub fn with_capacity(capacity: usize) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Self {
            places: Arc::new(Semaphore::new(capacity.max(1))),
            tx,
            rx: Arc::new(Mutex::new(rx)),
        }
    }

    pub fn source(&self) -> MemSource {
        MemSource {
            queue: self.clone(),
        }
    }

    async fn send(&self, message: RunMessage) -> Result<(), QueueError> {
        let place = self
            .places
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| QueueError::Closed)?;
        self.tx
            .send(Queued {
                message,
                _place: place,
            })
            .map_err(|_| QueueError::Closed)
    }
}

#[async_trait]
impl RunQueue for MemQueue {
    async fn publish(&self, messages: &[RunMessage]) -> Vec<Result<(), QueueError>> {
        let mut results = Vec::with_capacity(messages.len());
        for m in messages {
            results.push(self.send(*m).await);
        }
        results
    }

    async fn ping(&self) -> Result<(), QueueError> {
        Ok(())
    }

    async fn ready_messages(&self) -> Result<Option<u64>, QueueError> {
        // What it loses, it loses all at once with the process; start-up re-queues.
        Ok(None)
    }
}

pub struct MemSource {
    queue: MemQueue,
}

#[async_trait]
impl DeliverySource for MemSource {
    async fn next(&mut self) -> Result<Delivery, QueueError> {
        let queued = self
            .queue
            .rx
            .lock()
            .await
            .recv()
            .await
            .ok_or(QueueError::Closed)?;
        Ok(Delivery {
            message: Ok(queued.message),
            handle: Box::new(MemHandle {
                queued,
                tx: self.queue.tx.clone(),
            }),
        })
    }
}

struct MemHandle {
    queued: Queued,
    tx: mpsc::UnboundedSender<Queued>,
}

#[async_trait]
impl DeliveryHandle for MemHandle {
    async fn ack(self: Box<Self>) -> Result<(), QueueError> {
        Ok(())
    }

    async fn requeue(self: Box<Self>) -> Result<(), QueueError> {
        self.tx.send(self.queued).map_err(|_| QueueError::Closed)
    }

    async fn dead_letter(self: Box<Self>, reason: &str) -> Result<(), QueueError> {
        tracing::error!(message = "in-process delivery dropped", run_id = %self.queued.message.run_id, reason);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::pin::pin;

    use futures::poll;

    use super::*;
    use crate::domain::run::RunId;

    fn messages(n: u32) -> Vec<RunMessage> {
        let run_id = RunId::new();
        (1..=n)
            .map(|attempt| RunMessage { run_id, attempt })
            .collect()
    }

    #[tokio::test]
    async fn a_publish_beyond_capacity_waits_for_the_consumer_and_loses_nothing() {
        let queue = MemQueue::with_capacity(4);
        let mut source = queue.source();
        let sent = messages(10);
        let mut publish = pin!(queue.publish(&sent));
        // Four fit; the fifth waits for a place.
        assert!(poll!(publish.as_mut()).is_pending());
        let mut got = Vec::new();
        for _ in 0..4 {
            let delivery = source.next().await.unwrap();
            got.push(delivery.message.unwrap());
            // Taken but not acked: the place is still held.
            assert!(poll!(publish.as_mut()).is_pending());
            delivery.handle.ack().await.unwrap();
        }
        // Every ack freed a place, and the publish filled each of them again.
        assert!(poll!(publish.as_mut()).is_pending());
        let consumer = async {
            while got.len() < sent.len() {
                let delivery = source.next().await.unwrap();
                got.push(delivery.message.unwrap());
                delivery.handle.ack().await.unwrap();
            }
        };
        let (results, ()) = tokio::join!(publish, consumer);
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        assert_eq!(got, sent, "in order, none lost, none twice");
    }

    #[tokio::test]
    async fn a_requeued_delivery_keeps_its_place_when_the_queue_is_full() {
        let queue = MemQueue::with_capacity(2);
        let mut source = queue.source();
        let sent = messages(2);
        assert!(queue.publish(&sent).await.iter().all(Result::is_ok));
        let first = source.next().await.unwrap();
        // Full: the taken delivery still holds its place.
        let more = messages(1);
        let mut publish = pin!(queue.publish(&more));
        assert!(poll!(publish.as_mut()).is_pending());
        first.handle.requeue().await.unwrap();
        let second = source.next().await.unwrap();
        assert_eq!(second.message.unwrap(), sent[1]);
        let again = source.next().await.unwrap();
        assert_eq!(again.message.unwrap(), sent[0]);
        second.handle.ack().await.unwrap();
        assert!(publish.await.iter().all(Result::is_ok));
        again.handle.dead_letter("test").await.unwrap();
        assert_eq!(source.next().await.unwrap().message.unwrap(), more[0]);
    }
}
