//! The in-process queue used when no AMQP URL is given. It is volatile: on start-up the
//! store republishes every run still waiting (see `RunStore::requeue_unclaimed`).

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::{Mutex, mpsc};

use crate::domain::ports::{
    Delivery, DeliveryHandle, DeliverySource, QueueError, RunMessage, RunQueue,
};

#[derive(Clone)]
pub struct MemQueue {
    tx: mpsc::UnboundedSender<RunMessage>,
    rx: Arc<Mutex<mpsc::UnboundedReceiver<RunMessage>>>,
}

impl Default for MemQueue {
    fn default() -> Self {
        Self::new()
    }
}

impl MemQueue {
    pub fn new() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Self {
            tx,
            rx: Arc::new(Mutex::new(rx)),
        }
    }

    pub fn source(&self) -> MemSource {
        MemSource {
            queue: self.clone(),
        }
    }
}

#[async_trait]
impl RunQueue for MemQueue {
    async fn publish(&self, messages: &[RunMessage]) -> Vec<Result<(), QueueError>> {
        messages
            .iter()
            .map(|m| self.tx.send(*m).map_err(|_| QueueError::Closed))
            .collect()
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
        let message = self
            .queue
            .rx
            .lock()
            .await
            .recv()
            .await
            .ok_or(QueueError::Closed)?;
        Ok(Delivery {
            message: Ok(message),
            handle: Box::new(MemHandle {
                message,
                tx: self.queue.tx.clone(),
            }),
        })
    }
}

struct MemHandle {
    message: RunMessage,
    tx: mpsc::UnboundedSender<RunMessage>,
}

#[async_trait]
impl DeliveryHandle for MemHandle {
    async fn ack(self: Box<Self>) -> Result<(), QueueError> {
        Ok(())
    }

    async fn requeue(self: Box<Self>) -> Result<(), QueueError> {
        self.tx.send(self.message).map_err(|_| QueueError::Closed)
    }

    async fn dead_letter(self: Box<Self>, reason: &str) -> Result<(), QueueError> {
        tracing::error!(message = "in-process delivery dropped", run_id = %self.message.run_id, reason);
        Ok(())
    }
}
