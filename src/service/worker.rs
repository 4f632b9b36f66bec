//! The worker: takes deliveries only when it has a free slot, claims the run from the
//! control plane, acks as soon as the claim is durable, then runs the attempt's one
//! container: pull, create, attach, start, stream output, enforce timeout and cancel,
//! wait, report the outcome, remove. The lease is renewed from the claim on; at start
//! and then periodically the worker reconciles its own labelled containers with the
//! attempts the control plane says it holds.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::domain::ports::{
    AdoptResult, Claim, ClaimResult, ContainerExit, ContainerInfo, ContainerRuntime, ContainerSpec,
    ContainerState, ControlError, ControlPlane, DeliverySource, Lease, LeaseStatus, OutputStream,
    RunMessage, RuntimeError,
};
use crate::domain::run::{Outcome, RunId};

/// Where a fault test may make the worker die on the spot (as `kill -9` would), read
/// from `TASUKI_CRASH_AT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    /// The claim is stored and the delivery acked; no container exists yet.
    AfterClaim,
    /// The container exited; its outcome is not reported yet.
    BeforeFinish,
}

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
    pub crash_at: Option<CrashPoint>,
}

pub struct Worker {
    control: Arc<dyn ControlPlane>,
    runtime: Arc<dyn ContainerRuntime>,
    config: WorkerConfig,
    /// Attempts this process is working on; reconciliation leaves them alone.
    active: Mutex<HashSet<(RunId, u32)>>,
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

/// Largest batch of output sent to the control plane in one call.
const LOG_BATCH_BYTES: usize = 256 * 1024;
/// After the container exits, how long its last output may take to be stored.
const PUMP_DRAIN: Duration = Duration::from_secs(60);
/// Claim attempts while holding a delivery, before handing it back.
const CLAIM_TRIES: u32 = 3;
/// The longest gap between heartbeats, whatever the lease TTL.
const HEARTBEAT_MAX: Duration = Duration::from_secs(5);
/// Grace for stopping a container found to be stale (its run is someone else's now).
const STALE_GRACE: Duration = Duration::from_secs(10);

/// What the lease keeper last heard about the lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LeaseState {
    Held,
    CancelRequested,
    Lost,
}

/// Renews the lease every third of its TTL from the claim until dropped, and tells the
/// attempt about cancels and takeovers.
struct LeaseKeeper {
    state: watch::Receiver<LeaseState>,
    feed: watch::Sender<LeaseState>,
    task: tokio::task::JoinHandle<()>,
}

impl LeaseKeeper {
    fn start(control: Arc<dyn ControlPlane>, lease: Lease, ttl: Duration) -> Self {
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

    fn current(&self) -> LeaseState {
        *self.state.borrow()
    }

    /// A lease answer that came another way (the `started` call).
    fn tell(&self, status: LeaseStatus) {
        merge_into(&self.feed, LeaseState::from(status));
    }
}

/// News about the lease only ever gets worse: held, then cancel requested, then lost.
fn merge_into(feed: &watch::Sender<LeaseState>, next: LeaseState) {
    let rank = |s: LeaseState| match s {
        LeaseState::Held => 0,
        LeaseState::CancelRequested => 1,
        LeaseState::Lost => 2,
    };
    feed.send_if_modified(|current| {
        if rank(next) > rank(*current) {
            *current = next;
            true
        } else {
            false
        }
    });
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.task.abort();
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

/// A container that already exists for the attempt, to be carried on with.
struct Existing {
    id: String,
    running: bool,
    /// Bytes of its output the log sink already holds.
    log_length: u64,
    started_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl Worker {
    pub fn new(
        control: Arc<dyn ControlPlane>,
        runtime: Arc<dyn ContainerRuntime>,
        config: WorkerConfig,
    ) -> Self {
        Self {
            control,
            runtime,
            config,
            active: Mutex::new(HashSet::new()),
        }
    }

    /// Mark an attempt as ours in this process; false if it already was.
    fn activate(&self, key: (RunId, u32)) -> bool {
        self.active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key)
    }

    fn deactivate(&self, key: (RunId, u32)) {
        self.active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
    }

    fn is_active(&self, key: (RunId, u32)) -> bool {
        self.active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&key)
    }

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
        let slots = Arc::new(Semaphore::new(this.config.concurrency.max(1)));
        let running = TaskTracker::new();
        let mut backoff = Backoff::new();
        tracing::info!(message = "worker started", worker_id = %this.config.worker_id, concurrency = this.config.concurrency);

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
            let delivery = tokio::select! {
                _ = shutdown.cancelled() => break,
                d = source.next() => d,
            };
            let delivery = match delivery {
                Ok(d) => d,
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
            match this.claim(message).await {
                Ok(ClaimResult::Claimed(claim)) => {
                    backoff.reset();
                    // The claim is durable: ack now, not when the container exits, so
                    // the broker's consumer timeout can never redeliver a long job.
                    if let Err(error) = delivery.handle.ack().await {
                        tracing::warn!(message = "ack after claim failed; a redelivery will be dropped as a duplicate", run_id = %message.run_id, %error);
                    }
                    this.crash_if(CrashPoint::AfterClaim);
                    let worker = this.clone();
                    let span = tracing::info_span!("run", run_id = %claim.lease.run_id, job = %claim.job, attempt = claim.lease.attempt);
                    running.spawn(
                        async move {
                            let _active = Active {
                                worker: &worker,
                                key,
                            };
                            worker.execute(*claim, None).await;
                            drop(permit);
                        }
                        .instrument(span),
                    );
                    continue;
                }
                Ok(ClaimResult::NotClaimable { status, attempt }) => {
                    backoff.reset();
                    tracing::info!(message = "duplicate delivery dropped", run_id = %message.run_id, %status, attempt);
                    if let Err(error) = delivery.handle.ack().await {
                        tracing::warn!(message = "ack failed", %error);
                    }
                }
                Ok(ClaimResult::UnknownRun) => {
                    tracing::error!(message = "delivery for an unknown run dead-lettered", run_id = %message.run_id);
                    if let Err(error) = delivery.handle.dead_letter("unknown run").await {
                        tracing::warn!(message = "dead-lettering failed", %error);
                    }
                }
                Err(error) => {
                    // Hand it back and stop taking deliveries for a while instead of
                    // spinning through requeues.
                    let wait = backoff.step();
                    tracing::warn!(message = "claim failed; delivery requeued", run_id = %message.run_id, %error, retry_in_ms = wait.as_millis() as u64);
                    if let Err(error) = delivery.handle.requeue().await {
                        tracing::warn!(message = "requeue failed", %error);
                    }
                    this.deactivate(key);
                    if sleep_or_shutdown(wait, &shutdown).await {
                        break;
                    }
                    continue;
                }
            }
            this.deactivate(key);
        }
        drop(source);
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
        tracing::info!(message = "worker stopped", worker_id = %this.config.worker_id);
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

    /// Compare this worker's containers with the attempts the control plane says it
    /// holds, and settle every difference: adopt, finish, re-queue or remove.
    async fn reconcile(self: &Arc<Self>, running: &TaskTracker) {
        let me = &self.config.worker_id;
        let containers = match self.runtime.list_labelled("tasuki.worker-id", me).await {
            Ok(c) => c,
            Err(error) => {
                tracing::warn!(message = "reconciliation: listing containers failed", %error);
                return;
            }
        };
        let mut seen = HashSet::new();
        for container in containers {
            let Some(key) = attempt_of(&container) else {
                tracing::warn!(message = "reconciliation: container without run labels left alone", container_id = %container.id);
                continue;
            };
            seen.insert(key);
            if self.is_active(key) {
                continue;
            }
            self.reconcile_container(key, container, running).await;
        }
        let held = match self.control.held(me).await {
            Ok(h) => h,
            Err(error) => {
                tracing::warn!(message = "reconciliation: asking for held attempts failed", %error);
                return;
            }
        };
        for attempt in held {
            let key = (attempt.lease.run_id, attempt.lease.attempt);
            if seen.contains(&key) || self.is_active(key) {
                continue;
            }
            match attempt.container_id {
                // Claimed, but the container never came to be: nothing ran.
                None => match self.control.release(attempt.lease).await {
                    Ok(_) => {
                        tracing::info!(message = "reconciliation: unstarted attempt re-queued", run_id = %key.0, attempt = key.1)
                    }
                    Err(error) => {
                        tracing::warn!(message = "reconciliation: re-queueing failed", run_id = %key.0, %error)
                    }
                },
                Some(id) => {
                    let outcome = Outcome::DockerError {
                        message: format!(
                            "container {id} disappeared while its worker was away; its exit code is unknown"
                        ),
                    };
                    tracing::warn!(message = "reconciliation: container of a held attempt is gone", run_id = %key.0, container_id = %id);
                    if let Err(error) = self.control.finish(attempt.lease, &outcome, 0).await {
                        tracing::warn!(message = "reconciliation: reporting failed", run_id = %key.0, %error);
                    }
                }
            }
        }
    }

    async fn reconcile_container(
        self: &Arc<Self>,
        key: (RunId, u32),
        container: ContainerInfo,
        running: &TaskTracker,
    ) {
        let (run_id, attempt) = key;
        let adopted = self
            .control
            .adopt(run_id, attempt, &self.config.worker_id)
            .await;
        let (claim, log_length) = match adopted {
            Ok((AdoptResult::Held(claim), len)) => (claim, len),
            Ok((AdoptResult::Stale, _)) => {
                tracing::warn!(message = "reconciliation: stale container removed", %run_id, attempt, container_id = %container.id);
                if container.state == ContainerState::Running {
                    let _ = self.runtime.stop(&container.id, STALE_GRACE).await;
                }
                if let Err(error) = self.runtime.remove(&container.id).await {
                    tracing::warn!(message = "removing stale container failed", %error);
                }
                return;
            }
            Err(error) => {
                tracing::warn!(message = "reconciliation: adopt failed; will try again", %run_id, %error);
                return;
            }
        };
        match container.state {
            ContainerState::Created => {
                // Never started: nothing ran. Remove it and let the run go round again.
                if let Err(error) = self.runtime.remove(&container.id).await {
                    tracing::warn!(message = "removing unstarted container failed", %error);
                    return;
                }
                match self.control.release(claim.lease).await {
                    Ok(_) => {
                        tracing::info!(message = "reconciliation: unstarted container removed, run re-queued", %run_id, attempt)
                    }
                    Err(error) => tracing::warn!(message = "re-queueing failed", %run_id, %error),
                }
            }
            ContainerState::Running | ContainerState::Exited(_) => {
                if !self.activate(key) {
                    return;
                }
                tracing::info!(message = "reconciliation: adopting container", %run_id, attempt, container_id = %container.id, log_length);
                let existing = Existing {
                    running: container.state == ContainerState::Running,
                    id: container.id,
                    log_length,
                    started_at: container.started_at,
                };
                let worker = self.clone();
                let span = tracing::info_span!("run", %run_id, job = %claim.job, attempt);
                running.spawn(
                    async move {
                        let _active = Active {
                            worker: &worker,
                            key,
                        };
                        worker.execute(*claim, Some(existing)).await;
                    }
                    .instrument(span),
                );
            }
        }
    }

    async fn execute(&self, claim: Claim, existing: Option<Existing>) {
        let lease = claim.lease;
        let started = std::time::Instant::now();
        let keeper = LeaseKeeper::start(self.control.clone(), lease, claim.lease_ttl);
        let (outcome, container, dropped) = self.run_container(&claim, &keeper, existing).await;
        if keeper.current() == LeaseState::Lost {
            tracing::warn!(message = "lease lost; not reporting, removing our container");
            if let Some(id) = container {
                let _ = self.runtime.remove(&id).await;
            }
            return;
        }
        let Some(outcome) = outcome else {
            return; // handed back to the queue; nothing to report
        };
        self.crash_if(CrashPoint::BeforeFinish);
        let exit_code = outcome.exit_code();
        let status = outcome.status();
        match self.report(lease, &outcome, dropped).await {
            Some(LeaseStatus::Held { .. }) => {
                tracing::info!(message = "run finished", %status, exit_code, reason = outcome.reason(), elapsed_ms = started.elapsed().as_millis() as u64)
            }
            Some(LeaseStatus::Lost) => {
                tracing::warn!(message = "lease lost before the final state was stored; outcome discarded", %status, exit_code)
            }
            None => return, // no stored outcome: keep the container for reconciliation
        }
        drop(keeper);
        if let Some(id) = container
            && let Err(error) = self.runtime.remove(&id).await
        {
            tracing::warn!(message = "removing container failed", container_id = %id, %error);
        }
    }

    /// Report the outcome until the control plane has it. `None` if it never answered.
    async fn report(&self, lease: Lease, outcome: &Outcome, dropped: u64) -> Option<LeaseStatus> {
        let mut backoff = Backoff::new();
        for _ in 0..40 {
            match self.control.finish(lease, outcome, dropped).await {
                Ok(status) => return Some(status),
                Err(ControlError::Rejected(error)) => {
                    // Nothing was stored: keep the container as the evidence.
                    tracing::error!(message = "control plane refused the final state; container kept", %error);
                    return None;
                }
                Err(ControlError::Unavailable(error)) => {
                    let wait = backoff.step();
                    tracing::warn!(message = "reporting the final state failed; retrying", %error, retry_in_ms = wait.as_millis() as u64);
                    tokio::time::sleep(wait).await;
                }
            }
        }
        tracing::error!(
            message = "gave up reporting the final state; reconciliation will try again"
        );
        None
    }

    /// Runs the attempt's container (or carries on with one that exists). Returns the
    /// outcome (`None`: the attempt was handed back unstarted), the container to remove,
    /// and the output bytes that could not be delivered.
    async fn run_container(
        &self,
        claim: &Claim,
        keeper: &LeaseKeeper,
        existing: Option<Existing>,
    ) -> (Option<Outcome>, Option<String>, u64) {
        let spec = &claim.spec;
        let lease = claim.lease;
        let existing = match existing {
            Some(e) => e,
            None => {
                if let Err(error) = self.runtime.ensure_image(&spec.image, spec.pull).await {
                    return (Some(outcome_of(error)), None, 0);
                }
                if keeper.current() == LeaseState::CancelRequested {
                    tracing::info!(message = "cancelled before the container was created");
                    return (Some(Outcome::Cancelled { code: None }), None, 0);
                }
                let container = container_spec(claim, &self.config.worker_id);
                match self.runtime.create(&container).await {
                    Ok(id) => return self.start_fresh(claim, keeper, id).await,
                    Err(RuntimeError::NameConflict(name)) => {
                        match self.existing_container(claim, keeper, &name).await {
                            Ok(Ok(e)) => e,
                            Ok(Err(done)) => return done,
                            Err(error) => return (Some(outcome_of(error)), None, 0),
                        }
                    }
                    Err(error) => return (Some(outcome_of(error)), None, 0),
                }
            }
        };
        // Carry on with a container an earlier run of this worker left: catch its output
        // up from the engine's log, skipping what the sink already holds.
        let output = match self.runtime.logs(&existing.id, true).await {
            Ok(o) => o,
            Err(error) => return (Some(outcome_of(error)), Some(existing.id), 0),
        };
        let pump = tokio::spawn(
            pump_output(
                self.control.clone(),
                lease,
                output,
                existing.log_length,
                existing.log_length,
            )
            .in_current_span(),
        );
        if existing.running {
            // Tell the control plane which container it is, in case the earlier run of
            // this worker died before it could.
            match self.control.started(lease, &existing.id).await {
                Ok(status) => keeper.tell(status),
                Err(error) => {
                    tracing::warn!(message = "reporting the adopted container failed", %error)
                }
            }
        }
        let ran_for = existing
            .started_at
            .map(|t| (chrono::Utc::now() - t).to_std().unwrap_or_default())
            .unwrap_or_default();
        let (outcome, stored, mut dropped) = self
            .supervise(claim, keeper, &existing.id, pump, ran_for)
            .await;
        // A follow read of the engine's log can end without the container's last
        // partial entry (output without a newline). Read it once more, now that the
        // container has exited, and store whatever lies past what we have.
        match self.runtime.logs(&existing.id, false).await {
            Ok(rest) => {
                let (_, undelivered) =
                    pump_output(self.control.clone(), lease, rest, stored, stored).await;
                dropped += undelivered;
            }
            Err(error) => {
                tracing::warn!(message = "final read of the adopted container's log failed", %error)
            }
        }
        (Some(outcome), Some(existing.id), dropped)
    }

    /// The attempt's container name was taken: by this very attempt, in an earlier
    /// life of this worker. A container that never started is replaced; one that ran is
    /// adopted (`None`: the attempt is not ours any more).
    async fn existing_container(
        &self,
        claim: &Claim,
        keeper: &LeaseKeeper,
        name: &str,
    ) -> Result<Result<Existing, (Option<Outcome>, Option<String>, u64)>, RuntimeError> {
        let info = self.runtime.inspect(name).await?;
        if info.state == ContainerState::Created {
            tracing::info!(message = "an unstarted container of this attempt existed; replacing it", container_id = %info.id);
            self.runtime.remove(&info.id).await?;
            let container = container_spec(claim, &self.config.worker_id);
            let id = self.runtime.create(&container).await?;
            return Ok(Err(self.start_fresh(claim, keeper, id).await));
        }
        let log_length = match self
            .control
            .adopt(
                claim.lease.run_id,
                claim.lease.attempt,
                &self.config.worker_id,
            )
            .await
        {
            Ok((AdoptResult::Held(_), len)) => len,
            Ok((AdoptResult::Stale, _)) => return Ok(Err((None, None, 0))),
            Err(error) => {
                return Err(RuntimeError::Docker(format!(
                    "adopting container {name}: {error}"
                )));
            }
        };
        tracing::info!(message = "container already existed; adopting it", container_id = %info.id);
        Ok(Ok(Existing {
            running: info.state == ContainerState::Running,
            id: info.id,
            log_length,
            started_at: info.started_at,
        }))
    }

    async fn start_fresh(
        &self,
        claim: &Claim,
        keeper: &LeaseKeeper,
        id: String,
    ) -> (Option<Outcome>, Option<String>, u64) {
        let output = match self.runtime.attach(&id).await {
            Ok(o) => o,
            Err(error) => return (Some(outcome_of(error)), Some(id), 0),
        };
        let pump = tokio::spawn(
            pump_output(self.control.clone(), claim.lease, output, 0, 0).in_current_span(),
        );
        match keeper.current() {
            LeaseState::Held => {}
            LeaseState::CancelRequested => {
                pump.abort();
                tracing::info!(message = "cancelled before the container started");
                return (Some(Outcome::Cancelled { code: None }), Some(id), 0);
            }
            LeaseState::Lost => {
                pump.abort();
                return (None, Some(id), 0);
            }
        }
        if let Err(error) = self.runtime.start(&id).await {
            pump.abort();
            return (Some(outcome_of(error)), Some(id), 0);
        }
        tracing::info!(message = "container started", container_id = %id);
        match self.control.started(claim.lease, &id).await {
            Ok(status) => keeper.tell(status),
            Err(error) => {
                tracing::warn!(message = "reporting start failed; reconciliation will tell it", %error)
            }
        }
        let (outcome, _, dropped) = self
            .supervise(claim, keeper, &id, pump, Duration::ZERO)
            .await;
        (Some(outcome), Some(id), dropped)
    }

    /// Waits for the container, enforcing the timeout (`ran_for` of it already spent)
    /// and acting on cancels and takeovers; then collects the last output. Returns the
    /// outcome, the log's stored length and the bytes that could not be delivered.
    async fn supervise(
        &self,
        claim: &Claim,
        keeper: &LeaseKeeper,
        id: &str,
        mut pump: tokio::task::JoinHandle<(u64, u64)>,
        ran_for: Duration,
    ) -> (Outcome, u64, u64) {
        let spec = &claim.spec;
        // Waits for the container after `pause`; re-made when a wait request breaks.
        let wait_for = |pause: Duration| {
            let runtime = self.runtime.clone();
            let id = id.to_owned();
            async move {
                tokio::time::sleep(pause).await;
                runtime.wait(&id).await
            }
            .boxed()
        };
        let mut wait = wait_for(Duration::ZERO);
        let mut wait_failures = 0u32;
        let mut wait_backoff = Backoff::new();
        let mut lease_state = keeper.state.clone();
        let mut deadline = spec
            .timeout
            .map(|t| tokio::time::Instant::now() + t.saturating_sub(ran_for));
        let mut stopped_because: Option<Outcome> = None;
        let mut lease_watch_open = true;
        let exit: Result<ContainerExit, RuntimeError> = loop {
            let timeout = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            // Look at the lease state first: a cancel may have come before we got here.
            let state = *lease_state.borrow_and_update();
            if stopped_because.is_none() && state != LeaseState::Held {
                if state == LeaseState::CancelRequested {
                    tracing::info!(message = "cancel requested; stopping container");
                } else {
                    tracing::warn!(message = "lease taken over; stopping our container");
                }
                stopped_because = Some(Outcome::Cancelled { code: None });
                if let Err(error) = self.runtime.stop(id, spec.stop_grace).await {
                    tracing::warn!(message = "stopping container failed", %error);
                }
            }
            tokio::select! {
                exit = &mut wait => match exit {
                    Ok(exit) => break Ok(exit),
                    Err(RuntimeError::NoSuchContainer(id)) => break Err(RuntimeError::NoSuchContainer(id)),
                    // A broken wait request (engine restart, proxy idle timeout) is not the
                    // container ending: wait again, and keep enforcing timeout and cancel.
                    Err(error) if wait_failures < 10 => {
                        wait_failures += 1;
                        let pause = wait_backoff.step();
                        tracing::warn!(message = "waiting for the container failed; waiting again", %error, retry_in_ms = pause.as_millis() as u64);
                        wait = wait_for(pause);
                    }
                    Err(error) => break Err(error),
                },
                _ = timeout => {
                    deadline = None;
                    let after = spec.timeout.unwrap_or_default();
                    tracing::info!(message = "timeout passed; stopping container", timeout_s = after.as_secs());
                    stopped_because = Some(Outcome::TimedOut { after, code: None });
                    if let Err(error) = self.runtime.stop(id, spec.stop_grace).await {
                        tracing::warn!(message = "stopping container failed", %error);
                    }
                }
                changed = lease_state.changed(), if lease_watch_open => {
                    if changed.is_err() {
                        lease_watch_open = false;
                    }
                }
            }
        };
        // The output stream ends when the container exits; wait for the last bytes.
        let (stored, dropped) = match tokio::time::timeout(PUMP_DRAIN, &mut pump).await {
            Ok(Ok((stored, dropped))) => {
                tracing::debug!(message = "output stored", bytes = stored, dropped);
                (stored, dropped)
            }
            Ok(Err(error)) => {
                tracing::warn!(message = "output pump failed", %error);
                (0, 0)
            }
            Err(_) => {
                pump.abort();
                tracing::warn!(
                    message = "output still streaming after the container exited; stopped it"
                );
                (0, 0)
            }
        };
        let outcome = match exit {
            Err(error) => outcome_of(error),
            Ok(exit) => match stopped_because {
                Some(Outcome::TimedOut { after, .. }) => Outcome::TimedOut {
                    after,
                    code: Some(exit.exit_code),
                },
                Some(Outcome::Cancelled { .. }) => Outcome::Cancelled {
                    code: Some(exit.exit_code),
                },
                // Docker flags any OOM kill inside the container; a job whose main
                // process still exited 0 handled it and succeeded.
                _ if exit.oom_killed && exit.exit_code != 0 => Outcome::OomKilled {
                    code: exit.exit_code,
                },
                _ => Outcome::Exited {
                    code: exit.exit_code,
                },
            },
        };
        (outcome, stored, dropped)
    }
}

/// The (run, attempt) a container belongs to, from its labels.
fn attempt_of(container: &ContainerInfo) -> Option<(RunId, u32)> {
    let run_id = container.labels.get("tasuki.run-id")?.parse().ok()?;
    let attempt = container.labels.get("tasuki.attempt")?.parse().ok()?;
    Some((run_id, attempt))
}

async fn sleep_or_shutdown(d: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}

fn outcome_of(error: RuntimeError) -> Outcome {
    match error {
        RuntimeError::ImageNotFound { image } => Outcome::ImageNotFound { image },
        RuntimeError::PullFailed { image, message } => Outcome::ImagePullFailed { image, message },
        other => Outcome::DockerError {
            message: other.to_string(),
        },
    }
}

pub fn container_name(claim: &Claim) -> String {
    format!("tasuki-{}-{}", claim.lease.run_id, claim.lease.attempt)
}

fn container_spec(claim: &Claim, worker_id: &str) -> ContainerSpec {
    let spec = &claim.spec;
    let run_id = claim.lease.run_id.to_string();
    let attempt = claim.lease.attempt.to_string();
    let mut env = spec.env.clone();
    env.insert("TASUKI_RUN_ID".to_owned(), run_id.clone());
    env.insert("TASUKI_ATTEMPT".to_owned(), attempt.clone());
    env.insert("TASUKI_JOB".to_owned(), claim.job.clone());
    let labels = BTreeMap::from([
        ("tasuki.run-id".to_owned(), run_id),
        ("tasuki.job".to_owned(), claim.job.clone()),
        ("tasuki.attempt".to_owned(), attempt),
        ("tasuki.worker-id".to_owned(), worker_id.to_owned()),
    ]);
    ContainerSpec {
        name: container_name(claim),
        image: spec.image.clone(),
        command: spec.command.clone(),
        workdir: spec.workdir.clone(),
        user: spec.user.clone(),
        env,
        labels,
        cpu_shares: spec.resources.cpu,
        cpu_limit: spec.resources.cpu_limit,
        memory_bytes: spec.resources.memory_bytes,
        network: spec.network.clone(),
    }
}

/// Streams output to the control plane in batches of whatever has arrived, without
/// copying the bytes. The first `skip` bytes of `output` are already stored (a catch-up
/// after a re-attach); `offset` is the stored length. Returns the log's length at the end
/// and the bytes that could not be delivered at all.
async fn pump_output(
    control: Arc<dyn ControlPlane>,
    lease: Lease,
    mut output: OutputStream,
    offset: u64,
    skip: u64,
) -> (u64, u64) {
    let mut offset = offset;
    let mut skip = skip;
    let mut undelivered = 0u64;
    let mut batch = Vec::new();
    let mut ended = false;
    while !ended {
        // Block for the first chunk, then take whatever else is ready right now.
        match output.next().await {
            None => break,
            Some(Err(error)) => {
                tracing::warn!(message = "output stream broke", %error);
                break;
            }
            Some(Ok(chunk)) => batch.push(chunk),
        }
        let mut size: usize = batch.iter().map(|c| c.bytes.len()).sum();
        while size < LOG_BATCH_BYTES {
            match output.next().now_or_never() {
                Some(Some(Ok(chunk))) => {
                    size += chunk.bytes.len();
                    batch.push(chunk);
                }
                Some(Some(Err(_))) | Some(None) => {
                    ended = true;
                    break;
                }
                None => break,
            }
        }
        if skip > 0 {
            batch.retain_mut(|chunk| {
                let n = chunk.bytes.len() as u64;
                if skip >= n {
                    skip -= n;
                    return false;
                }
                let _ = chunk.bytes.split_to(skip as usize);
                skip = 0;
                true
            });
            size = batch.iter().map(|c| c.bytes.len()).sum();
            if batch.is_empty() {
                continue;
            }
        }
        let mut backoff = Backoff::new();
        loop {
            match control.append_log(lease, offset, &batch).await {
                Ok(len) => {
                    offset = len;
                    break;
                }
                Err(ControlError::Unavailable(error)) if backoff.next < Backoff::MAX => {
                    let wait = backoff.step();
                    tracing::warn!(message = "storing output failed; retrying", %error, retry_in_ms = wait.as_millis() as u64);
                    tokio::time::sleep(wait).await;
                }
                Err(ControlError::Unavailable(error)) => {
                    undelivered += size as u64;
                    tracing::error!(message = "control plane unreachable; output dropped", bytes = size, %error);
                    break;
                }
                Err(ControlError::Rejected(error)) => {
                    // The control plane counted these itself (a log sink fault) or
                    // refused them (not our lease): not ours to count.
                    tracing::error!(message = "output refused", bytes = size, %error);
                    break;
                }
            }
        }
        batch.clear();
    }
    if undelivered > 0 {
        tracing::warn!(message = "output incomplete", dropped_bytes = undelivered);
    }
    (offset, undelivered)
}
