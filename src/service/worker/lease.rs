//! The lease keeper: renews an attempt's lease from the claim on and tells the attempt
//! about cancels and takeovers as they come. One `Renewer` per worker renews all its
//! leases together.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::time::Instant;

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

/// Renews every lease this worker holds, together: when the first of them is due it
/// renews, in one call, all those due within half a period, so a worker holding many
/// attempts makes one or two heartbeat calls per period instead of one per attempt. A
/// lease's period is a third of its TTL (at most `HEARTBEAT_MAX`); it is renewed no
/// later than a period after its claim or its last renewal, and no sooner than half a
/// period after.
pub(super) struct Renewer {
    control: Arc<dyn ControlPlane>,
    book: Mutex<Book>,
    /// Told when a lease joins, so the renewing task looks again at what is due first.
    wake: Notify,
}

#[derive(Default)]
struct Book {
    entries: HashMap<u64, Entry>,
    next_id: u64,
    /// Whether the renewing task is alive; it ends when no lease is held.
    running: bool,
}

enum Next {
    Renew(Vec<(u64, Lease)>),
    Wait(Instant),
    Nothing,
}

struct Entry {
    lease: Lease,
    every: Duration,
    due: Instant,
    feed: watch::Sender<LeaseState>,
    /// The attempt is reporting its final state: a `lost` answer is then what a finish
    /// stored a moment before looks like, not news (the finish's own answer tells a
    /// real loss).
    finishing: bool,
}

impl Renewer {
    pub(super) fn new(control: Arc<dyn ControlPlane>) -> Arc<Self> {
        Arc::new(Self {
            control,
            book: Mutex::new(Book::default()),
            wake: Notify::new(),
        })
    }

    fn book(&self) -> MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keep `lease` renewed until the keeper is dropped (or the lease is lost).
    pub(super) fn keep(self: &Arc<Self>, lease: Lease, ttl: Duration) -> LeaseKeeper {
        let (feed, state) = watch::channel(LeaseState::Held);
        // A third of the TTL, and at least every few seconds: the answer also carries
        // cancels, which should not wait long.
        let every = (ttl / 3).clamp(Duration::from_millis(100), HEARTBEAT_MAX);
        let id = {
            let mut book = self.book();
            let id = book.next_id;
            book.next_id += 1;
            book.entries.insert(
                id,
                Entry {
                    lease,
                    every,
                    due: Instant::now() + every,
                    feed: feed.clone(),
                    finishing: false,
                },
            );
            if !book.running {
                book.running = true;
                tokio::spawn(self.clone().renew_while_held());
            }
            id
        };
        self.wake.notify_one();
        LeaseKeeper {
            renewer: self.clone(),
            id,
            state,
            feed,
        }
    }

    async fn renew_while_held(self: Arc<Self>) {
        loop {
            match self.next_due() {
                Next::Nothing => return,
                Next::Renew(due) => self.renew(due).await,
                Next::Wait(first) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(first) => {}
                        () = self.wake.notified() => {}
                    }
                }
            }
        }
    }

    /// What the renewing task does next: once the first lease is due, that one and all
    /// due within half their period (marked as renewed); before, when to look again; and
    /// with no lease held, end.
    fn next_due(&self) -> Next {
        let mut book = self.book();
        let Some(first) = book.entries.values().map(|e| e.due).min() else {
            book.running = false;
            return Next::Nothing;
        };
        let now = Instant::now();
        if first > now {
            return Next::Wait(first);
        }
        Next::Renew(
            book.entries
                .iter_mut()
                .filter(|(_, e)| e.due <= now + e.every / 2)
                .map(|(id, e)| {
                    e.due = now + e.every;
                    (*id, e.lease)
                })
                .collect(),
        )
    }

    async fn renew(&self, due: Vec<(u64, Lease)>) {
        let leases: Vec<Lease> = due.iter().map(|&(_, lease)| lease).collect();
        match self.control.heartbeat(&leases).await {
            Ok(statuses) => {
                let mut book = self.book();
                for (&(id, lease), status) in due.iter().zip(statuses) {
                    let next = LeaseState::from(status);
                    // A keeper dropped while the call was out: its attempt has ended and
                    // nobody listens for the answer.
                    let Some(entry) = book.entries.get(&id) else {
                        continue;
                    };
                    merge_into(&entry.feed, next);
                    if next == LeaseState::Lost {
                        if entry.finishing {
                            tracing::debug!(message = "lease ended while the final state was reported", run_id = %lease.run_id, attempt = lease.attempt);
                        } else {
                            tracing::warn!(message = "lease lost", run_id = %lease.run_id, attempt = lease.attempt);
                        }
                        book.entries.remove(&id);
                    }
                }
            }
            // Each lease is tried again at its next turn, as a lone heartbeat would be.
            Err(error) => {
                tracing::warn!(message = "heartbeat failed", leases = leases.len(), %error)
            }
        }
    }

    fn finishing(&self, id: u64) {
        if let Some(entry) = self.book().entries.get_mut(&id) {
            entry.finishing = true;
        }
    }

    fn forget(&self, id: u64) {
        self.book().entries.remove(&id);
    }
}

/// One attempt's lease, renewed by the worker's `Renewer` from the claim until dropped;
/// tells the attempt about cancels and takeovers.
pub(super) struct LeaseKeeper {
    renewer: Arc<Renewer>,
    id: u64,
    state: watch::Receiver<LeaseState>,
    feed: watch::Sender<LeaseState>,
}

impl LeaseKeeper {
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

    /// The attempt is about to report its final state. The lease is still renewed (the
    /// report may be retried for a while), but a `lost` answer is no longer warned
    /// about: the finish may have been stored first, and if the lease really was lost
    /// the finish's own answer says so.
    pub(super) fn finishing(&self) {
        self.renewer.finishing(self.id);
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
        self.renewer.forget(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::run::RunId;
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
        let keeper = Renewer::new(control.clone()).keep(lease(), Duration::from_secs(3));
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

    fn lease_of(n: u32) -> Lease {
        Lease {
            run_id: RunId::new(),
            attempt: 1,
            epoch: i64::from(n),
        }
    }

    /// Waits (in paused time) until the fake has seen `calls` heartbeat calls.
    async fn until_calls(control: &FakeControl, calls: usize) {
        while control.heartbeats() < calls {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn leases_claimed_at_different_times_are_renewed_together_and_in_time() {
        let control = Arc::new(FakeControl::default());
        let renewer = Renewer::new(control.clone());
        let ttl = Duration::from_secs(3);
        let every = ttl / 3;
        let start = Instant::now();
        let mut keepers = Vec::new();
        let mut claimed = HashMap::new();
        // 40 claims spread over two periods.
        for n in 0..40 {
            let lease = lease_of(n);
            claimed.insert(lease.run_id, Instant::now());
            keepers.push(renewer.keep(lease, ttl));
            tokio::time::sleep(every / 20).await;
        }
        until_calls(&control, 12).await;
        let calls = control.heartbeat_calls();
        let elapsed = calls.last().expect("calls").0 - start;
        // One call per half period at most, not one per lease and period.
        let periods = elapsed.as_secs_f64() / every.as_secs_f64();
        assert!(
            calls.len() as f64 <= 2.0 * periods + 1.0,
            "{} calls in {periods:.1} periods",
            calls.len()
        );
        assert!(calls.iter().any(|(_, leases)| leases.len() > 1));
        // Every lease is renewed within a period of its claim and of its last renewal.
        for (run_id, at) in claimed {
            let mut last = at;
            for (when, leases) in &calls {
                if leases.iter().any(|l| l.run_id == run_id) {
                    assert!(*when - last <= every, "{run_id} waited {:?}", *when - last);
                    last = *when;
                }
            }
            assert!(last > at, "{run_id} was never renewed");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_lease_and_a_dropped_keeper_are_no_longer_renewed() {
        let control = Arc::new(FakeControl::default());
        let renewer = Renewer::new(control.clone());
        let ttl = Duration::from_secs(3);
        let (kept, lost, dropped) = (lease_of(1), lease_of(2), lease_of(3));
        let kept_keeper = renewer.keep(kept, ttl);
        let lost_keeper = renewer.keep(lost, ttl);
        let dropped_keeper = renewer.keep(dropped, ttl);
        control.lose_lease_of(lost.run_id);
        until_calls(&control, 1).await;
        assert_eq!(lost_keeper.current(), LeaseState::Lost);
        assert_eq!(kept_keeper.current(), LeaseState::Held);
        drop(dropped_keeper);
        let before = control.heartbeats();
        until_calls(&control, before + 2).await;
        let later: Vec<Vec<Lease>> = control.heartbeat_calls()[before..]
            .iter()
            .map(|(_, leases)| leases.clone())
            .collect();
        assert!(
            later.iter().all(|leases| leases == &vec![kept]),
            "{later:?}"
        );
        // With no lease held, the renewing task ends; a new lease starts it again.
        drop((kept_keeper, lost_keeper));
        while renewer.book().running {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let again = renewer.keep(lease_of(4), ttl);
        let before = control.heartbeats();
        until_calls(&control, before + 1).await;
        assert_eq!(again.current(), LeaseState::Held);
    }

    /// A finish stored a moment before a renewal in flight makes that renewal answer
    /// `lost`: expected while the attempt reports its final state, so no warning then,
    /// while a `lost` for an attempt that is not finishing is still warned about.
    #[tokio::test(start_paused = true)]
    async fn a_lost_answer_is_warned_about_unless_the_attempt_is_finishing() {
        let (captured, _guard) = crate::testlog::Captured::start();
        let control = Arc::new(FakeControl::default());
        let renewer = Renewer::new(control.clone());
        let ttl = Duration::from_secs(3);
        let (ending, taken) = (lease_of(1), lease_of(2));
        let ending_keeper = renewer.keep(ending, ttl);
        let taken_keeper = renewer.keep(taken, ttl);
        ending_keeper.finishing();
        // Still renewed while finishing: the report may take a while.
        until_calls(&control, 1).await;
        assert!(control.heartbeat_calls()[0].1.contains(&ending));
        control.lose_lease_of(ending.run_id);
        control.lose_lease_of(taken.run_id);
        let before = control.heartbeats();
        until_calls(&control, before + 1).await;
        assert_eq!(ending_keeper.current(), LeaseState::Lost);
        assert_eq!(taken_keeper.current(), LeaseState::Lost);
        let text = captured.text();
        let warned: Vec<&str> = text.lines().filter(|l| l.contains("lease lost")).collect();
        assert_eq!(warned.len(), 1, "{text}");
        assert!(warned[0].contains(&taken.run_id.to_string()), "{text}");
        assert!(!text.contains(&ending.run_id.to_string()), "{text}");
    }
}
