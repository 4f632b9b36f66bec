//! The lease keeper: renews an attempt's lease from the claim on and tells the attempt
//! about cancels and takeovers as they come.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::Instrument;

use crate::domain::ports::{ControlPlane, Lease, LeaseStatus};

/// The longest gap between heartbeats, whatever the lease TTL.
const HEARTBEAT_MAX: Duration = Duration::from_secs(5);

/// What the lease keeper last heard about the lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LeaseState {
    Held,
    CancelRequested,
    Lost,
}

impl LeaseState {
    fn rank(self) -> u8 {
        match self {
            LeaseState::Held => 0,
            LeaseState::CancelRequested => 1,
            LeaseState::Lost => 2,
        }
    }

    /// News about the lease only ever gets worse: held, then cancel requested, then
    /// lost. A late "held" answer (sent before the cancel) never undoes a cancel.
    pub(super) fn merge(self, next: LeaseState) -> LeaseState {
        if next.rank() > self.rank() {
            next
        } else {
            self
        }
    }
}

impl From<LeaseStatus> for LeaseState {
    fn from(s: LeaseStatus) -> Self {
        match s {
            LeaseStatus::Held { cancel: false } => LeaseState::Held,
            LeaseStatus::Held { cancel: true } => LeaseState::CancelRequested,
            LeaseStatus::Lost => LeaseState::Lost,
        }
    }
}

/// Renews the lease every third of its TTL from the claim until dropped, and tells the
/// attempt about cancels and takeovers.
pub(super) struct LeaseKeeper {
    state: watch::Receiver<LeaseState>,
    feed: watch::Sender<LeaseState>,
    task: tokio::task::JoinHandle<()>,
}

impl LeaseKeeper {
    pub(super) fn start(control: Arc<dyn ControlPlane>, lease: Lease, ttl: Duration) -> Self {
        let (feed, state) = watch::channel(LeaseState::Held);
        let tx = feed.clone();
        // A third of the TTL, and at least every few seconds: the answer also carries
        // cancels, which should not wait long.
        let every = (ttl / 3).clamp(Duration::from_millis(100), HEARTBEAT_MAX);
        let task = tokio::spawn(
            async move {
                let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    match control.heartbeat(lease).await {
                        Ok(status) => {
                            let next = LeaseState::from(status);
                            merge_into(&tx, next);
                            if next == LeaseState::Lost {
                                return;
                            }
                        }
                        Err(error) => tracing::warn!(message = "heartbeat failed", %error),
                    }
                }
            }
            .in_current_span(),
        );
        Self { state, feed, task }
    }

    pub(super) fn current(&self) -> LeaseState {
        *self.state.borrow()
    }

    /// A receiver that sees every change from now on.
    pub(super) fn watch(&self) -> watch::Receiver<LeaseState> {
        self.state.clone()
    }

    /// A lease answer that came another way (the `started` call).
    pub(super) fn tell(&self, status: LeaseStatus) {
        merge_into(&self.feed, LeaseState::from(status));
    }
}

fn merge_into(feed: &watch::Sender<LeaseState>, next: LeaseState) {
    feed.send_if_modified(|current| {
        let merged = current.merge(next);
        let changed = merged != *current;
        *current = merged;
        changed
    });
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::worker::fakes::{FakeControl, lease};

    #[test]
    fn lease_news_only_gets_worse() {
        use LeaseState::*;
        assert_eq!(Held.merge(CancelRequested), CancelRequested);
        assert_eq!(CancelRequested.merge(Held), CancelRequested);
        assert_eq!(CancelRequested.merge(Lost), Lost);
        assert_eq!(Lost.merge(Held), Lost);
        assert_eq!(Lost.merge(CancelRequested), Lost);
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeats_carry_the_cancel_and_a_late_held_does_not_undo_it() {
        let control = Arc::new(FakeControl::default());
        control.set_heartbeat(LeaseStatus::Held { cancel: true });
        let keeper = LeaseKeeper::start(control.clone(), lease(), Duration::from_secs(3));
        let mut state = keeper.watch();
        state.changed().await.expect("keeper alive");
        assert_eq!(*state.borrow(), LeaseState::CancelRequested);
        keeper.tell(LeaseStatus::Held { cancel: false });
        assert_eq!(keeper.current(), LeaseState::CancelRequested);
        control.set_heartbeat(LeaseStatus::Lost);
        state.changed().await.expect("keeper alive");
        assert_eq!(keeper.current(), LeaseState::Lost);
        assert!(control.heartbeats() >= 2);
    }
}
