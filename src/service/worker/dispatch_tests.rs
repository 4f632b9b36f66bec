//! The dispatch loop on the fakes: claims overlap (a slow claim does not hold up the
//! next free slot's delivery), every delivery is settled as its claim's answer says,
//! and an unanswered claim gives its delivery back and pauses the loop.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use super::fakes::{ClaimAnswer, FakeControl, FakeRuntime, WORKER_ID, locked, run_id, until};
use super::{ClaimPause, Worker, WorkerConfig};
use crate::domain::ports::{Delivery, DeliveryHandle, DeliverySource, QueueError, RunMessage};

/// What happened to each delivery, in order.
type Settled = Arc<Mutex<Vec<&'static str>>>;

struct Handle(Settled);

#[async_trait]
impl DeliveryHandle for Handle {
    async fn ack(self: Box<Self>) -> Result<(), QueueError> {
        locked(&self.0).push("ack");
        Ok(())
    }
    async fn requeue(self: Box<Self>) -> Result<(), QueueError> {
        locked(&self.0).push("requeue");
        Ok(())
    }
    async fn dead_letter(self: Box<Self>, _reason: &str) -> Result<(), QueueError> {
        locked(&self.0).push("dead_letter");
        Ok(())
    }
}

/// Deliveries a test sends; waits forever once they run out.
struct Source(mpsc::UnboundedReceiver<Delivery>);

#[async_trait]
impl DeliverySource for Source {
    async fn next(&mut self) -> Result<Delivery, QueueError> {
        match self.0.recv().await {
            Some(d) => Ok(d),
            None => std::future::pending().await,
        }
    }
}

fn delivery(attempt: u32, settled: &Settled) -> Delivery {
    Delivery {
        message: Ok(RunMessage {
            run_id: run_id(),
            attempt,
        }),
        handle: Box::new(Handle(settled.clone())),
    }
}

fn start(
    control: &Arc<FakeControl>,
    concurrency: usize,
) -> (
    mpsc::UnboundedSender<Delivery>,
    CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    let worker = Worker::new(
        control.clone(),
        Arc::new(FakeRuntime::default()),
        WorkerConfig {
            worker_id: WORKER_ID.to_owned(),
            concurrency,
            drain_timeout: Duration::from_secs(10),
            reconcile_interval: Duration::from_secs(3600),
            #[cfg(feature = "fault-injection")]
            crash_at: None,
        },
    );
    let (tx, rx) = mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    let task = tokio::spawn(worker.run(Box::new(Source(rx)), stop.clone()));
    (tx, stop, task)
}

#[tokio::test(start_paused = true)]
async fn claims_overlap_and_each_delivery_is_settled_by_its_answer() {
    let control = Arc::new(FakeControl::default());
    control.set_claim_answer(ClaimAnswer::NotClaimable);
    let hold = Arc::new(Semaphore::new(0));
    control.hold_claims(hold.clone());
    let (tx, stop, task) = start(&control, 4);
    let settled = Settled::default();
    for attempt in 1..=3 {
        tx.send(delivery(attempt, &settled))
            .expect("worker running");
    }
    // All three are being claimed at once, none answered yet.
    until(|| control.claims() == 3).await;
    assert!(locked(&settled).is_empty());
    hold.add_permits(3);
    until(|| locked(&settled).len() == 3).await;
    assert_eq!(*locked(&settled), ["ack", "ack", "ack"]);
    stop.cancel();
    task.await.expect("worker stops");
}

#[tokio::test(start_paused = true)]
async fn an_unanswered_claim_gives_the_delivery_back() {
    let control = Arc::new(FakeControl::default());
    control.set_claim_answer(ClaimAnswer::Unavailable);
    let (tx, stop, task) = start(&control, 2);
    let settled = Settled::default();
    tx.send(delivery(1, &settled)).expect("worker running");
    until(|| !locked(&settled).is_empty()).await;
    assert_eq!(*locked(&settled), ["requeue"]);
    // Tried a few times while holding it, then handed back.
    assert_eq!(control.claims(), super::CLAIM_TRIES);
    stop.cancel();
    task.await.expect("worker stops");
}

#[tokio::test(start_paused = true)]
async fn failed_claims_pause_the_loop_longer_each_time_until_one_is_answered() {
    let pause = ClaimPause::new();
    assert!(pause.until().is_none());
    assert_eq!(pause.failed(), Duration::from_millis(200));
    assert_eq!(pause.failed(), Duration::from_millis(400));
    assert!(pause.until().is_some());
    tokio::time::sleep(Duration::from_millis(401)).await;
    assert!(pause.until().is_none(), "over once its time has passed");
    pause.failed();
    pause.succeeded();
    assert!(pause.until().is_none());
    assert_eq!(pause.failed(), Duration::from_millis(200), "reset");
}
