//! The worker: takes deliveries only when it has a free slot, claims the run from the
//! control plane, acks as soon as the claim is durable, then runs the attempt's one
//! container: pull, create, attach, start, stream output, enforce timeout and cancel,
//! wait, report the outcome, remove. The lease is renewed from the claim on; at start
//! and then periodically the worker reconciles its own labelled containers with the
//! attempts the control plane says it holds.

//!
//! The parts: `lease` (the lease keeper), `attempt` (one attempt's container, from pull
//! to removal), `pump` (output to the control plane), `usage` (the container's resource
//! readings), `reconcile` (containers against held attempts). This file holds the
//! dispatch loop and the drain.

mod attempt;
#[cfg(test)]
mod dispatch_tests;
#[cfg(test)]
pub(crate) mod fakes;
mod lease;
mod pump;
mod reconcile;
#[cfg(test)]
mod tests;
mod usage;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub use self::attempt::container_name;
use crate::domain::observe::{NoObserver, WorkerObserver};
use crate::domain::ports::{
    ClaimResult, ContainerRuntime, ControlError, ControlPlane, DeliveryHandle, DeliverySource,
    RunMessage,
};
use crate::domain::run::RunId;

/// Where a fault test may make the worker die on the spot (as `kill -9` would), read
/// from `TASUKI_CRASH_AT`. Only in builds with the `fault-injection` feature: nothing
/// can make a production worker abort.
#[cfg(feature = "fault-injection")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    /// The claim is stored and the delivery acked; no container exists yet.
    AfterClaim,
    /// The container exited; its outcome is not reported yet.
    BeforeFinish,
}

#[cfg(feature = "fault-injection")]
impl CrashPoint {
    pub fn parse(s: &str) -> Option<CrashPoint> {
        match s {
            "after-claim" => Some(CrashPoint::AfterClaim),
            "before-finish" => Some(CrashPoint::BeforeFinish),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub worker_id: String,
    pub concurrency: usize,
    /// How long a stopping worker lets running containers finish.
    pub drain_timeout: Duration,
    /// How often the worker compares its containers with the attempts it holds.
    pub reconcile_interval: Duration,
    #[cfg(feature = "fault-injection")]
    pub crash_at: Option<CrashPoint>,
}

pub struct Worker {
    control: Arc<dyn ControlPlane>,
    /// Renews the leases of every attempt this worker holds, together.
    renewer: Arc<lease::Renewer>,
    runtime: Arc<dyn ContainerRuntime>,
    config: WorkerConfig,
    /// Attempts this process is working on; reconciliation leaves them alone.
    active: Mutex<HashSet<(RunId, u32)>>,
    /// Told how many slots are busy whenever that changes (the metrics).
    observer: Arc<dyn WorkerObserver>,
    /// Set by a claim the control plane did not answer; the dispatch loop waits it out.
    claim_pause: ClaimPause,
}

/// The dispatch loop's pause after failed claims: claims run in the attempts' tasks, so
/// they tell the loop through this when to stop taking deliveries, and for how long
/// (an exponential backoff, reset by any answer).
struct ClaimPause(Mutex<(Backoff, Option<tokio::time::Instant>)>);

impl ClaimPause {
    fn new() -> Self {
        Self(Mutex::new((Backoff::new(), None)))
    }

    fn locked(&self) -> std::sync::MutexGuard<'_, (Backoff, Option<tokio::time::Instant>)> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The control plane answered: no pause.
    fn succeeded(&self) {
        let mut state = self.locked();
        state.0.reset();
        state.1 = None;
    }

    /// It did not: pause for the next step of the backoff, which is returned.
    fn failed(&self) -> Duration {
        let mut state = self.locked();
        let wait = state.0.step();
        state.1 = Some(tokio::time::Instant::now() + wait);
        wait
    }

    /// Until when the loop should wait, if it should.
    fn until(&self) -> Option<tokio::time::Instant> {
        self.locked()
            .1
            .filter(|until| *until > tokio::time::Instant::now())
    }
}

/// Exponential backoff for talking to things that are down.
struct Backoff {
    next: Duration,
}

impl Backoff {
    const START: Duration = Duration::from_millis(200);
    const MAX: Duration = Duration::from_secs(30);

    fn new() -> Self {
        Self { next: Self::START }
    }
    fn reset(&mut self) {
        self.next = Self::START;
    }
    fn step(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        d
    }
}

/// Claim attempts while holding a delivery, before handing it back.
const CLAIM_TRIES: u32 = 3;

/// Forgets an attempt from the active set when its task ends, however it ends.
struct Active<'a> {
    worker: &'a Worker,
    key: (RunId, u32),
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.worker.deactivate(self.key);
    }
}

impl Worker {
    pub fn new(
        control: Arc<dyn ControlPlane>,
        runtime: Arc<dyn ContainerRuntime>,
        config: WorkerConfig,
    ) -> Self {
        Self {
            renewer: lease::Renewer::new(control.clone()),
            control,
            runtime,
            config,
            active: Mutex::new(HashSet::new()),
            observer: Arc::new(NoObserver),
            claim_pause: ClaimPause::new(),
        }
    }

    /// Who is told how many slots are busy (nobody otherwise).
    pub fn with_observer(mut self, observer: Arc<dyn WorkerObserver>) -> Self {
        self.observer = observer;
        self
    }

    /// A slot is busy from the moment a delivery is being claimed to the end of its
    /// attempt; an adopted container takes one too.
    fn report_slots(&self, busy: usize) {
        self.observer.slots(busy, self.config.concurrency.max(1));
    }

    /// Mark an attempt as ours in this process; false if it already was.
    fn activate(&self, key: (RunId, u32)) -> bool {
        let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        let added = active.insert(key);
        self.report_slots(active.len());
        added
    }

    fn deactivate(&self, key: (RunId, u32)) {
        let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        active.remove(&key);
        self.report_slots(active.len());
    }

    fn is_active(&self, key: (RunId, u32)) -> bool {
        self.active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&key)
    }

    #[cfg(feature = "fault-injection")]
    fn crash_if(&self, point: CrashPoint) {
        if self.config.crash_at == Some(point) {
            tracing::error!(message = "TASUKI_CRASH_AT reached; aborting", point = ?point);
            std::process::abort();
        }
    }

    /// Take deliveries until `shutdown`, then let running attempts finish for up to the
    /// drain timeout.
    pub async fn run(self, mut source: Box<dyn DeliverySource>, shutdown: CancellationToken) {
        let this = Arc::new(self);
        this.report_slots(0);
        let slots = Arc::new(Semaphore::new(this.config.concurrency.max(1)));
        let running = TaskTracker::new();
        let mut backoff = Backoff::new();
        tracing::info!(message = "worker started", worker_id = %this.config.worker_id, concurrency = this.config.concurrency, build = crate::BUILD);

        let reconciler = {
            let this = this.clone();
            let running = running.clone();
            let stop = shutdown.clone();
            tokio::spawn(async move {
                loop {
                    this.reconcile(&running).await;
                    if sleep_or_shutdown(this.config.reconcile_interval, &stop).await {
                        return;
                    }
                }
            })
        };

        loop {
            // A slot first, then a delivery: the queue never hands us work we have no
            // room for, so nothing waits unacked behind long jobs.
            let permit = tokio::select! {
                _ = shutdown.cancelled() => break,
                p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            };
            // After a claim the control plane did not answer, wait out its backoff.
            if let Some(until) = this.claim_pause.until() {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep_until(until) => {}
                }
            }
            let delivery = tokio::select! {
                _ = shutdown.cancelled() => break,
                d = source.next() => d,
            };
            let delivery = match delivery {
                Ok(d) => {
                    backoff.reset();
                    d
                }
                Err(error) => {
                    let wait = backoff.step();
                    tracing::warn!(message = "queue unavailable", %error, retry_in_ms = wait.as_millis() as u64);
                    if sleep_or_shutdown(wait, &shutdown).await {
                        break;
                    }
                    continue;
                }
            };
            let message = match delivery.message {
                Ok(m) => m,
                Err(reason) => {
                    tracing::error!(message = "poison message dead-lettered", %reason);
                    if let Err(error) = delivery.handle.dead_letter(&reason).await {
                        tracing::warn!(message = "dead-lettering failed", %error);
                    }
                    continue;
                }
            };
            if shutdown.is_cancelled() {
                // Stopping: hand it back unclaimed for another worker.
                if let Err(error) = delivery.handle.requeue().await {
                    tracing::warn!(message = "requeue failed", %error);
                }
                break;
            }
            let key = (message.run_id, message.attempt);
            // Marked before claiming, so reconciliation never mistakes the fresh claim
            // for one a crashed process left behind.
            if !this.activate(key) {
                // This process is running that very attempt: a redelivery.
                tracing::info!(message = "delivery for an attempt this worker is running dropped", run_id = %message.run_id, attempt = message.attempt);
                if let Err(error) = delivery.handle.ack().await {
                    tracing::warn!(message = "ack failed", %error);
                }
                continue;
            }
            // The claim, its ack and the attempt go on in a task of their own, so the
            // next free slot takes its delivery without waiting for this claim's round
            // trip to the control plane: with many slots, claims overlap.
            let worker = this.clone();
            running.spawn(async move {
                let _active = Active {
                    worker: &worker,
                    key,
                };
                worker.claim_and_execute(message, delivery.handle).await;
                drop(permit);
            });
        }
        reconciler.abort();
        running.close();
        let active = running.len();
        if active > 0 {
            tracing::info!(
                message = "draining",
                running = active,
                timeout_s = this.config.drain_timeout.as_secs()
            );
        }
        if tokio::time::timeout(this.config.drain_timeout, running.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                message = "drain timeout passed; leaving containers running for this worker id to adopt when it starts again",
                running = running.len()
            );
        }
        // Only now: a claim still in flight at shutdown acks on this connection.
        drop(source);
        tracing::info!(message = "worker stopped", worker_id = %this.config.worker_id);
    }

    /// Claim the delivery's attempt; ack as soon as the claim is durable and run it, or
    /// settle the delivery as the answer says. A control plane that does not answer
    /// gets the delivery back and pauses the dispatch loop (`claim_pause`).
    async fn claim_and_execute(&self, message: RunMessage, handle: Box<dyn DeliveryHandle>) {
        match self.claim(message).await {
            Ok(ClaimResult::Claimed(claim)) => {
                self.claim_pause.succeeded();
                // The claim is durable: ack now, not when the container exits, so the
                // broker's consumer timeout can never redeliver a long job.
                if let Err(error) = handle.ack().await {
                    tracing::warn!(message = "ack after claim failed; a redelivery will be dropped as a duplicate", run_id = %message.run_id, %error);
                }
                #[cfg(feature = "fault-injection")]
                self.crash_if(CrashPoint::AfterClaim);
                let span = tracing::info_span!("run", run_id = %claim.lease.run_id, job = %claim.job, attempt = claim.lease.attempt);
                self.execute(*claim, None).instrument(span).await;
            }
            Ok(ClaimResult::NotClaimable { status, attempt }) => {
                self.claim_pause.succeeded();
                tracing::info!(message = "duplicate delivery dropped", run_id = %message.run_id, %status, attempt);
                if let Err(error) = handle.ack().await {
                    tracing::warn!(message = "ack failed", %error);
                }
            }
            Ok(ClaimResult::UnknownRun) => {
                tracing::error!(message = "delivery for an unknown run dead-lettered", run_id = %message.run_id);
                if let Err(error) = handle.dead_letter("unknown run").await {
                    tracing::warn!(message = "dead-lettering failed", %error);
                }
            }
            Err(error) => {
                // Hand it back and stop taking deliveries for a while instead of
                // spinning through requeues.
                let wait = self.claim_pause.failed();
                tracing::warn!(message = "claim failed; delivery requeued", run_id = %message.run_id, %error, retry_in_ms = wait.as_millis() as u64);
                if let Err(error) = handle.requeue().await {
                    tracing::warn!(message = "requeue failed", %error);
                }
            }
        }
    }

    /// Claim, retrying a control plane that did not answer a few times while still
    /// holding the delivery: a claim whose answer was lost is given back to the same
    /// worker, so retrying cannot strand the run.
    async fn claim(&self, message: RunMessage) -> Result<ClaimResult, ControlError> {
        let mut backoff = Backoff::new();
        let mut tries = 0;
        loop {
            tries += 1;
            match self.control.claim(message, &self.config.worker_id).await {
                Err(ControlError::Unavailable(error)) if tries < CLAIM_TRIES => {
                    let pause = backoff.step();
                    tracing::warn!(message = "claim failed; retrying", run_id = %message.run_id, %error, retry_in_ms = pause.as_millis() as u64);
                    tokio::time::sleep(pause).await;
                }
                other => return other,
            }
        }
    }
}

async fn sleep_or_shutdown(d: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}
