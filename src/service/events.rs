//! In-process notifications that something about a run changed, so waiting requests and
//! log followers wake up at once instead of polling.

use tokio::sync::broadcast;

use crate::domain::run::RunId;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunEventKind {
    /// New output was stored.
    Log,
    /// The run's status changed.
    Status,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunEvent {
    pub run_id: RunId,
    pub kind: RunEventKind,
}

#[derive(Clone)]
pub struct RunEvents {
    tx: broadcast::Sender<RunEvent>,
}

impl Default for RunEvents {
    fn default() -> Self {
        Self::new()
    }
}

impl RunEvents {
    pub fn new() -> Self {
        // Receivers that fall behind see `Lagged` and re-read the store; nothing is lost.
        let (tx, _) = broadcast::channel(4096);
        Self { tx }
    }

    pub fn publish(&self, run_id: RunId, kind: RunEventKind) {
        // No receivers is fine: nobody is waiting.
        let _ = self.tx.send(RunEvent { run_id, kind });
    }

    pub fn subscribe(&self) -> broadcast::Receiver<RunEvent> {
        self.tx.subscribe()
    }
}
