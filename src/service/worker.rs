//! The worker: takes deliveries only when it has a free slot, claims the run from the
//! control plane, acks as soon as the claim is durable, then runs the attempt's one
//! container: pull, create, attach, start, stream output, enforce timeout and cancel,
//! wait, report the outcome, remove.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::domain::ports::{
    Claim, ClaimResult, ContainerRuntime, ContainerSpec, ControlError, ControlPlane,
    DeliverySource, Lease, LeaseStatus, OutputStream, RunMessage, RuntimeError,
};
use crate::domain::run::Outcome;

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub worker_id: String,
    pub concurrency: usize,
    /// How long a stopping worker lets running containers finish.
    pub drain_timeout: Duration,
}

pub struct Worker {
    control: Arc<dyn ControlPlane>,
    runtime: Arc<dyn ContainerRuntime>,
    config: WorkerConfig,
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
            match this.claim(message).await {
                Ok(ClaimResult::Claimed(claim)) => {
                    backoff.reset();
                    // The claim is durable: ack now, not when the container exits, so
                    // the broker's consumer timeout can never redeliver a long job.
                    if let Err(error) = delivery.handle.ack().await {
                        tracing::warn!(message = "ack after claim failed; a redelivery will be dropped as a duplicate", run_id = %message.run_id, %error);
                    }
                    let worker = this.clone();
                    let span = tracing::info_span!("run", run_id = %claim.lease.run_id, job = %claim.job, attempt = claim.lease.attempt);
                    running.spawn(
                        async move {
                            worker.execute(*claim).await;
                            drop(permit);
                        }
                        .instrument(span),
                    );
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
                    if sleep_or_shutdown(wait, &shutdown).await {
                        break;
                    }
                }
            }
        }
        drop(source);
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
                message = "drain timeout passed; leaving containers running",
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

    async fn execute(&self, claim: Claim) {
        let lease = claim.lease;
        let started = std::time::Instant::now();
        let (outcome, container) = self.run_container(&claim).await;
        let exit_code = outcome.exit_code();
        let status = outcome.status();
        match self.report(lease, &outcome).await {
            Some(LeaseStatus::Held { .. }) => {
                tracing::info!(message = "run finished", %status, exit_code, reason = outcome.reason(), elapsed_ms = started.elapsed().as_millis() as u64)
            }
            Some(LeaseStatus::Lost) => {
                tracing::warn!(message = "lease lost before the final state was stored; outcome discarded", %status, exit_code)
            }
            None => return, // shutting down without a stored outcome: keep the container
        }
        if let Some(id) = container
            && let Err(error) = self.runtime.remove(&id).await
        {
            tracing::warn!(message = "removing container failed", container_id = %id, %error);
        }
    }

    /// Report the outcome until the control plane has it. `None` if it never answered.
    async fn report(&self, lease: Lease, outcome: &Outcome) -> Option<LeaseStatus> {
        let mut backoff = Backoff::new();
        for _ in 0..40 {
            match self.control.finish(lease, outcome).await {
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
        tracing::error!(message = "gave up reporting the final state; the lease will expire");
        None
    }

    /// Runs the attempt's container; returns the outcome and the container to remove.
    async fn run_container(&self, claim: &Claim) -> (Outcome, Option<String>) {
        let spec = &claim.spec;
        let lease = claim.lease;
        if let Err(error) = self.runtime.ensure_image(&spec.image, spec.pull).await {
            return (outcome_of(error), None);
        }
        let container = container_spec(claim, &self.config.worker_id);
        let id = match self.runtime.create(&container).await {
            Ok(id) => id,
            Err(error) => return (outcome_of(error), None),
        };
        let output = match self.runtime.attach(&id).await {
            Ok(o) => o,
            Err(error) => return (outcome_of(error), Some(id)),
        };
        let mut pump =
            tokio::spawn(pump_output(self.control.clone(), lease, output).in_current_span());
        if let Err(error) = self.runtime.start(&id).await {
            pump.abort();
            return (outcome_of(error), Some(id));
        }
        tracing::info!(message = "container started", container_id = %id);
        match self.control.started(lease, &id).await {
            Ok(LeaseStatus::Lost) => {
                tracing::warn!(message = "lease lost at start; stopping the container");
                let _ = self.runtime.stop(&id, spec.stop_grace).await;
                pump.abort();
                return (Outcome::Cancelled { code: None }, Some(id));
            }
            Ok(LeaseStatus::Held { .. }) => {}
            Err(error) => {
                tracing::warn!(message = "reporting start failed; the heartbeat will retry", %error)
            }
        }

        // Waits for the container after `pause`; re-made when a wait request breaks.
        let wait_for = |pause: Duration| {
            let runtime = self.runtime.clone();
            let id = id.clone();
            async move {
                tokio::time::sleep(pause).await;
                runtime.wait(&id).await
            }
            .boxed()
        };
        let mut wait = wait_for(Duration::ZERO);
        let mut wait_failures = 0u32;
        let mut wait_backoff = Backoff::new();
        let heartbeat_every = (claim.lease_ttl / 3).max(Duration::from_millis(100));
        let mut heartbeat = tokio::time::interval_at(
            tokio::time::Instant::now() + heartbeat_every,
            heartbeat_every,
        );
        let mut deadline = spec.timeout.map(|t| tokio::time::Instant::now() + t);
        let mut stopped_because: Option<Outcome> = None;
        let exit = loop {
            let timeout = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
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
                    if let Err(error) = self.runtime.stop(&id, spec.stop_grace).await {
                        tracing::warn!(message = "stopping container failed", %error);
                    }
                }
                _ = heartbeat.tick() => match self.control.heartbeat(lease).await {
                    Ok(LeaseStatus::Held { cancel: true }) if stopped_because.is_none() => {
                        tracing::info!(message = "cancel requested; stopping container");
                        stopped_because = Some(Outcome::Cancelled { code: None });
                        if let Err(error) = self.runtime.stop(&id, spec.stop_grace).await {
                            tracing::warn!(message = "stopping container failed", %error);
                        }
                    }
                    Ok(LeaseStatus::Held { .. }) => {}
                    Ok(LeaseStatus::Lost) => {
                        tracing::warn!(message = "lease taken over; stopping our container");
                        stopped_because = Some(Outcome::Cancelled { code: None });
                        let _ = self.runtime.stop(&id, spec.stop_grace).await;
                    }
                    Err(error) => tracing::warn!(message = "heartbeat failed", %error),
                },
            }
        };
        // The attach stream ends when the container exits; wait for the last bytes.
        match tokio::time::timeout(PUMP_DRAIN, &mut pump).await {
            Ok(Ok(bytes)) => tracing::debug!(message = "output stored", bytes),
            Ok(Err(error)) => tracing::warn!(message = "output pump failed", %error),
            Err(_) => {
                pump.abort();
                tracing::warn!(
                    message = "output still streaming after the container exited; stopped it"
                )
            }
        }
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
        (outcome, Some(id))
    }
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
/// copying the bytes. Returns how many bytes were stored.
async fn pump_output(
    control: Arc<dyn ControlPlane>,
    lease: Lease,
    mut output: OutputStream,
) -> u64 {
    let mut offset = 0u64;
    let mut dropped = 0u64;
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
                Err(error) => {
                    dropped += size as u64;
                    tracing::error!(message = "output dropped", bytes = size, %error);
                    break;
                }
            }
        }
        batch.clear();
    }
    if dropped > 0 {
        tracing::warn!(message = "output incomplete", dropped_bytes = dropped);
    }
    offset
}
