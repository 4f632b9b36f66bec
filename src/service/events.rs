//! In-process notifications that something about a run changed, so waiting requests and
//! log followers wake up at once instead of polling.
//!
//! Two ways to listen. [`RunEvents::watch`] is one run's: a `?wait`, a log follow or the
//! UI's log stream wakes only for its own run, so a thousand of them cost nothing when
//! other runs change (a broadcast of every event would wake each of them for each
//! event of any run). [`RunEvents::subscribe`] is every run's, for the few consumers
//! that need all of them (the relay's wake-up).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};

use tokio::sync::{broadcast, mpsc, watch};

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

/// How many events of each kind a watched run has had since its first watcher came.
/// Counts, not a flag: a watcher compares them with what it saw last, so however many
/// events came while it was busy, it wakes once and misses none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Changes {
    status: u64,
    log: u64,
}

/// The runs someone watches, each with its channel; an entry lives exactly as long as
/// its run has a watcher.
type Watched = Arc<Mutex<HashMap<RunId, watch::Sender<Changes>>>>;

#[derive(Clone)]
pub struct RunEvents {
    tx: broadcast::Sender<RunEvent>,
    watched: Watched,
    /// Where this process's own events also go, for other replicas (see `outbound`).
    outbound: Arc<OnceLock<Outbound>>,
}

/// The channel to the bridge that sends this process's events to other replicas, and
/// whether some were dropped because it was full (the bridge then tells the others to
/// look at every run they watch).
struct Outbound {
    tx: mpsc::Sender<RunEvent>,
    dropped: AtomicBool,
}

/// How many events may wait for the bridge to other replicas.
const OUTBOUND_CAPACITY: usize = 4096;

impl Default for RunEvents {
    fn default() -> Self {
        Self::new()
    }
}

/// How often a follower looks at its run without being woken. Every change this process
/// makes wakes it at once; this covers changes made by another process on the same store
/// (a second `serve`), at little cost for many idle followers.
pub const BACKSTOP: std::time::Duration = std::time::Duration::from_secs(10);

/// The broadcast's buffer. Its only consumer (the relay's wake-up) treats falling behind
/// as one more wake-up, so it need not hold much.
const BROADCAST_CAPACITY: usize = 256;

impl RunEvents {
    pub fn new() -> Self {
        let (tx, _) = broadcast::channel(BROADCAST_CAPACITY);
        Self {
            tx,
            watched: Arc::default(),
            outbound: Arc::default(),
        }
    }

    /// An event of this process: its watchers and the broadcast, and the replicas
    /// sharing the store when a bridge takes them (`outbound`).
    pub fn publish(&self, run_id: RunId, kind: RunEventKind) {
        if let Some(out) = self.outbound.get()
            && out.tx.try_send(RunEvent { run_id, kind }).is_err()
        {
            out.dropped.store(true, Ordering::Relaxed);
        }
        self.deliver(run_id, kind);
    }

    /// The events this process publishes from now on, for the one bridge that sends them
    /// to the other replicas of a shared store; `None` if a bridge took them already.
    /// The flag it returns is set when an event did not fit (the bridge was behind).
    pub fn outbound(&self) -> Option<(mpsc::Receiver<RunEvent>, OutboundLoss)> {
        let (tx, rx) = mpsc::channel(OUTBOUND_CAPACITY);
        let fresh = Outbound {
            tx,
            dropped: AtomicBool::new(false),
        };
        self.outbound.set(fresh).ok()?;
        Some((
            rx,
            OutboundLoss {
                outbound: self.outbound.clone(),
            },
        ))
    }

    /// Every watched run as if it changed: events may have been missed (the bridge lost
    /// its connection, or another replica's bridge fell behind). Each watcher then reads
    /// its run again, which costs little and misses nothing.
    pub fn wake_all(&self) {
        for run in lock(&self.watched).values() {
            run.send_modify(|c| {
                c.status = c.status.wrapping_add(1);
                c.log = c.log.wrapping_add(1);
            });
        }
    }

    /// An event of this process or of another replica: this process's watchers and the
    /// broadcast only (never sent on, so replicas do not echo each other).
    pub fn deliver(&self, run_id: RunId, kind: RunEventKind) {
        if let Some(run) = lock(&self.watched).get(&run_id) {
            run.send_modify(|c| match kind {
                RunEventKind::Status => c.status = c.status.wrapping_add(1),
                RunEventKind::Log => c.log = c.log.wrapping_add(1),
            });
        }
        // No receivers is fine: nobody is waiting.
        let _ = self.tx.send(RunEvent { run_id, kind });
    }

    /// Every event of every run. Receivers that fall behind see `Lagged`.
    pub fn subscribe(&self) -> broadcast::Receiver<RunEvent> {
        self.tx.subscribe()
    }

    /// One run's events from now on. Make it before reading the run: an event published
    /// between the read and the wait then wakes the wait at once.
    pub fn watch(&self, run_id: RunId) -> RunWatch {
        let mut watched = lock(&self.watched);
        let rx = match watched.get(&run_id) {
            Some(tx) => tx.subscribe(),
            None => {
                let (tx, rx) = watch::channel(Changes::default());
                watched.insert(run_id, tx);
                rx
            }
        };
        let seen = *rx.borrow();
        RunWatch {
            run_id,
            rx,
            seen,
            watched: self.watched.clone(),
        }
    }

    /// How many runs have a watcher now.
    #[cfg(test)]
    fn watched_runs(&self) -> usize {
        lock(&self.watched).len()
    }
}

/// Whether events for other replicas were dropped since the last look.
pub struct OutboundLoss {
    outbound: Arc<OnceLock<Outbound>>,
}

impl OutboundLoss {
    /// True once after events were dropped (and clears it).
    pub fn take(&self) -> bool {
        self.outbound
            .get()
            .is_some_and(|o| o.dropped.swap(false, Ordering::Relaxed))
    }
}

/// The map stays consistent whatever a panicking holder was doing (each change to it is
/// one insert or remove), so a poisoned lock is taken as it is.
fn lock(watched: &Watched) -> MutexGuard<'_, HashMap<RunId, watch::Sender<Changes>>> {
    watched.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A watcher of one run's events, from [`RunEvents::watch`]. The last one of a run to
/// go removes the run's entry.
pub struct RunWatch {
    run_id: RunId,
    rx: watch::Receiver<Changes>,
    /// The counts as of the watch's start or its last wake-up.
    seen: Changes,
    watched: Watched,
}

impl RunWatch {
    /// Until the run's status changes (at once if it changed since the last wake-up).
    pub async fn status_changed(&mut self) {
        self.until(|seen, now| now.status != seen.status).await
    }

    /// Until the run's status changes or it stores output.
    pub async fn changed(&mut self) {
        self.until(|seen, now| now != seen).await
    }

    async fn until(&mut self, wakes: impl Fn(&Changes, &Changes) -> bool) {
        loop {
            let now = *self.rx.borrow_and_update();
            if wakes(&self.seen, &now) {
                self.seen = now;
                return;
            }
            // The sender sits in the map while this receiver lives, so this never
            // fails; if it did, waking is the safe answer (the caller reads the run).
            if self.rx.changed().await.is_err() {
                return;
            }
        }
    }
}

impl Drop for RunWatch {
    fn drop(&mut self) {
        let mut watched = lock(&self.watched);
        // Receivers come and go only under this lock, so the count is exact; this
        // watch's own receiver still counts.
        if watched
            .get(&self.run_id)
            .is_some_and(|tx| tx.receiver_count() <= 1)
        {
            watched.remove(&self.run_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::FutureExt;

    use super::*;

    fn woke(f: impl std::future::Future<Output = ()>) -> bool {
        f.now_or_never().is_some()
    }

    #[tokio::test]
    async fn an_event_between_the_read_and_the_wait_is_not_lost() {
        let events = RunEvents::new();
        let id = RunId::new();
        let mut w = events.watch(id);
        // The caller reads the run here; the run ends before it starts waiting.
        events.publish(id, RunEventKind::Status);
        assert!(woke(w.status_changed()));
        // Seen now: the next wait sleeps until the next event.
        assert!(!woke(w.status_changed()));
    }

    #[tokio::test]
    async fn a_waiter_wakes_for_its_own_run_only() {
        let events = RunEvents::new();
        let (mine, other) = (RunId::new(), RunId::new());
        let mut w = events.watch(mine);
        let _other_watch = events.watch(other);
        events.publish(other, RunEventKind::Status);
        events.publish(other, RunEventKind::Log);
        assert!(!woke(w.changed()));
        let wait = tokio::spawn(async move {
            w.status_changed().await;
        });
        tokio::task::yield_now().await;
        events.publish(mine, RunEventKind::Status);
        tokio::time::timeout(Duration::from_secs(5), wait)
            .await
            .expect("woken by its run's event")
            .expect("the task");
    }

    #[tokio::test]
    async fn output_wakes_followers_but_not_status_waiters() {
        let events = RunEvents::new();
        let id = RunId::new();
        let mut waiter = events.watch(id);
        let mut follower = events.watch(id);
        events.publish(id, RunEventKind::Log);
        assert!(!woke(waiter.status_changed()));
        assert!(woke(follower.changed()));
        events.publish(id, RunEventKind::Status);
        assert!(woke(waiter.status_changed()));
        assert!(woke(follower.changed()));
    }

    #[tokio::test]
    async fn many_events_while_busy_wake_once_and_lose_nothing() {
        let events = RunEvents::new();
        let id = RunId::new();
        let mut w = events.watch(id);
        // Far more than any buffer: a watch keeps counts, so nothing lags.
        for _ in 0..10 * BROADCAST_CAPACITY {
            events.publish(id, RunEventKind::Log);
        }
        events.publish(id, RunEventKind::Status);
        assert!(woke(w.status_changed()));
        assert!(!woke(w.changed()));
    }

    #[tokio::test]
    async fn every_watcher_of_a_run_wakes() {
        let events = RunEvents::new();
        let id = RunId::new();
        let mut tasks = Vec::new();
        for _ in 0..100 {
            let mut w = events.watch(id);
            tasks.push(tokio::spawn(async move { w.status_changed().await }));
        }
        events.publish(id, RunEventKind::Status);
        for t in tasks {
            tokio::time::timeout(Duration::from_secs(5), t)
                .await
                .expect("woken")
                .expect("the task");
        }
        assert_eq!(
            events.watched_runs(),
            0,
            "the watches went with their tasks"
        );
    }

    #[tokio::test]
    async fn the_last_watcher_to_go_removes_its_run() {
        let events = RunEvents::new();
        let (a, b) = (RunId::new(), RunId::new());
        let first = events.watch(a);
        let second = events.watch(a);
        let other = events.watch(b);
        assert_eq!(events.watched_runs(), 2);
        drop(first);
        assert_eq!(events.watched_runs(), 2, "a still has a watcher");
        drop(second);
        assert_eq!(events.watched_runs(), 1);
        drop(other);
        assert_eq!(events.watched_runs(), 0);
        // Events of runs nobody watches cost no entry.
        events.publish(a, RunEventKind::Status);
        assert_eq!(events.watched_runs(), 0);
    }

    #[tokio::test]
    async fn a_waiter_cancelled_mid_wait_leaves_no_entry() {
        let events = RunEvents::new();
        let id = RunId::new();
        let mut w = events.watch(id);
        let wait = tokio::spawn(async move { w.status_changed().await });
        tokio::task::yield_now().await;
        // A client that goes away: hyper drops the handler's future.
        wait.abort();
        let _ = wait.await;
        assert_eq!(events.watched_runs(), 0);
    }

    #[tokio::test]
    async fn a_watch_made_after_an_event_does_not_see_it() {
        let events = RunEvents::new();
        let id = RunId::new();
        let _early = events.watch(id);
        events.publish(id, RunEventKind::Status);
        // The caller reads the run after this, and sees that change there.
        let mut late = events.watch(id);
        assert!(!woke(late.changed()));
    }

    #[tokio::test]
    async fn own_events_go_out_once_and_delivered_ones_never() {
        let events = RunEvents::new();
        let (mut out, loss) = events.outbound().expect("the first bridge");
        assert!(events.outbound().is_none(), "one bridge only");
        let (mine, theirs) = (RunId::new(), RunId::new());
        let mut w = events.watch(theirs);
        events.publish(mine, RunEventKind::Log);
        events.deliver(theirs, RunEventKind::Status);
        assert!(woke(w.status_changed()), "a delivered event wakes watchers");
        assert_eq!(
            out.try_recv().expect("the own event"),
            RunEvent {
                run_id: mine,
                kind: RunEventKind::Log
            }
        );
        assert!(
            out.try_recv().is_err(),
            "the delivered event is not sent on"
        );
        assert!(!loss.take());
        for _ in 0..OUTBOUND_CAPACITY + 1 {
            events.publish(mine, RunEventKind::Log);
        }
        assert!(loss.take(), "an event that did not fit is reported");
        assert!(!loss.take(), "once");
    }

    #[tokio::test]
    async fn wake_all_wakes_every_watcher_for_status_and_output() {
        let events = RunEvents::new();
        let mut a = events.watch(RunId::new());
        let mut b = events.watch(RunId::new());
        assert!(!woke(a.changed()));
        events.wake_all();
        assert!(woke(a.status_changed()));
        assert!(woke(b.changed()));
    }

    #[tokio::test]
    async fn the_broadcast_still_carries_every_event_and_reports_lag() {
        let events = RunEvents::new();
        let mut all = events.subscribe();
        let id = RunId::new();
        events.publish(id, RunEventKind::Log);
        assert_eq!(
            all.recv().await.expect("an event"),
            RunEvent {
                run_id: id,
                kind: RunEventKind::Log
            }
        );
        for _ in 0..BROADCAST_CAPACITY + 1 {
            events.publish(id, RunEventKind::Status);
        }
        assert!(matches!(
            all.recv().await,
            Err(broadcast::error::RecvError::Lagged(_))
        ));
    }
}
