//! One attempt's execution: pull, create, attach, start (or carry on with a container
//! an earlier life of this worker left), supervise until it exits (timeout, cancel,
//! takeover), report the outcome, remove the container.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use tracing::Instrument;

use super::lease::{LeaseKeeper, LeaseState};
use super::pump::{Pumped, pump_output};
use super::usage::Sampler;
use super::{Backoff, Worker};
use crate::domain::job::{DEFAULT_MEMORY, DEFAULT_PIDS_LIMIT};
use crate::domain::ports::{
    Adoption, Claim, ContainerExit, ContainerSpec, ContainerState, ControlError, Lease,
    LeaseStatus, OutputPosition, OutputStream, RuntimeError,
};
use crate::domain::run::{Outcome, ResourceUsage};

/// After the container exits, how long its last output may take to be stored.
const PUMP_DRAIN: Duration = Duration::from_secs(60);
/// Tries of `adopt` for a container found under the attempt's name, before leaving it
/// to reconciliation.
const ADOPT_TRIES: u32 = 5;
/// How long a fast-mode re-attach to a container that exited meanwhile is read.
const FAST_ATTACH_LATE: Duration = Duration::from_secs(2);
/// Broken waits for a container tolerated before its outcome is a platform error.
const WAIT_TRIES: u32 = 10;

/// A container that already exists for the attempt, to be carried on with.
pub(super) struct Existing {
    pub id: String,
    pub running: bool,
    /// Where its output stands, as the control plane said when it was adopted.
    pub output: OutputPosition,
    pub started_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// How the container part of an attempt ended.
#[derive(Debug, Default)]
struct Ran {
    /// What to report; `None` when there is nothing to report: the attempt was handed
    /// back, is not ours any more, or is left to reconciliation.
    outcome: Option<Outcome>,
    /// The container, removed once the outcome is stored (or the lease is lost).
    container: Option<String>,
    /// Output bytes the control plane never got, all told.
    dropped: u64,
    /// What the container used, as far as it was read.
    usage: Option<ResourceUsage>,
}

impl Ran {
    fn report(outcome: Outcome, container: Option<String>, dropped: u64) -> Self {
        Self {
            outcome: Some(outcome),
            container,
            dropped,
            usage: None,
        }
    }

    fn with_usage(self, usage: Option<ResourceUsage>) -> Self {
        Self { usage, ..self }
    }

    fn failed(error: RuntimeError, container: Option<String>) -> Self {
        Self::report(outcome_of(error), container, 0)
    }

    fn nothing(container: Option<String>) -> Self {
        Self {
            container,
            ..Self::default()
        }
    }
}

/// What the attempt's name being taken turned out to mean.
enum Found {
    /// A container of this attempt that ran: carry on with it.
    Adopt(Existing),
    /// Dealt with already (replaced and run, or not ours to touch).
    Done(Ran),
}

/// How supervising a container ended.
struct Supervised {
    outcome: Outcome,
    pumped: Pumped,
}

impl Worker {
    pub(super) async fn execute(&self, claim: Claim, existing: Option<Existing>) {
        let lease = claim.lease;
        let started = std::time::Instant::now();
        let keeper = self.renewer.keep(lease, claim.lease_ttl);
        let ran = self.run_container(&claim, &keeper, existing).await;
        if keeper.current() == LeaseState::Lost {
            tracing::warn!(message = "lease lost; not reporting, removing our container");
            if let Some(id) = ran.container {
                let _ = self.runtime.remove(&id).await;
            }
            return;
        }
        let Some(outcome) = ran.outcome else {
            return; // handed back, or left to reconciliation: nothing to report
        };
        #[cfg(feature = "fault-injection")]
        self.crash_if(super::CrashPoint::BeforeFinish);
        let exit_code = outcome.exit_code();
        let status = outcome.status();
        let usage = ran.usage;
        keeper.finishing();
        match self.report(lease, &outcome, ran.dropped, usage).await {
            Some(LeaseStatus::Held { .. }) => {
                tracing::info!(message = "run finished", %status, exit_code, reason = outcome.reason(), elapsed_ms = started.elapsed().as_millis() as u64, peak_memory_bytes = usage.map(|u| u.peak_memory_bytes), cpu_seconds = usage.map(|u| u.cpu_seconds))
            }
            Some(LeaseStatus::Lost) => {
                tracing::warn!(message = "lease lost before the final state was stored; outcome discarded", %status, exit_code)
            }
            None => return, // no stored outcome: keep the container for reconciliation
        }
        drop(keeper);
        if let Some(id) = ran.container
            && let Err(error) = self.runtime.remove(&id).await
        {
            tracing::warn!(message = "removing container failed", container_id = %id, %error);
        }
    }

    /// Report the outcome until the control plane has it. `None` if it never answered.
    async fn report(
        &self,
        lease: Lease,
        outcome: &Outcome,
        dropped: u64,
        usage: Option<ResourceUsage>,
    ) -> Option<LeaseStatus> {
        let mut backoff = Backoff::new();
        for _ in 0..40 {
            match self.control.finish(lease, outcome, dropped, usage).await {
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

    /// Runs the attempt's container, or carries on with one that exists.
    async fn run_container(
        &self,
        claim: &Claim,
        keeper: &LeaseKeeper,
        existing: Option<Existing>,
    ) -> Ran {
        let spec = &claim.spec;
        let lease = claim.lease;
        let existing = match existing {
            Some(e) => e,
            None => {
                let credentials = claim.secrets.registry.as_ref();
                if let Err(error) = self
                    .runtime
                    .ensure_image(&spec.image, spec.pull, credentials)
                    .await
                {
                    return Ran::failed(error, None);
                }
                if keeper.current() == LeaseState::CancelRequested {
                    tracing::info!(message = "cancelled before the container was created");
                    return Ran::report(Outcome::Cancelled { code: None }, None, 0);
                }
                if lease.attempt > 1 {
                    self.clear_earlier_attempts(lease.run_id, lease.attempt, claim.lease_ttl)
                        .await;
                }
                let container = container_spec(claim, &self.config.worker_id);
                match self.runtime.create(&container).await {
                    Ok(id) => return self.start_fresh(claim, keeper, id).await,
                    Err(RuntimeError::NameConflict(name)) => {
                        match self.existing_container(claim, keeper, &name).await {
                            Ok(Found::Adopt(e)) => e,
                            Ok(Found::Done(ran)) => return ran,
                            Err(error) => return Ran::failed(error, None),
                        }
                    }
                    Err(error) => return Ran::failed(error, None),
                }
            }
        };
        if !spec.logs.is_durable() {
            return self.carry_on_fast(claim, keeper, existing).await;
        }
        // Carry on with a container an earlier run of this worker left: catch its output
        // up from the engine's log, skipping what was stored or dropped already.
        let output = match self.runtime.logs(&existing.id, true).await {
            Ok(o) => o,
            Err(error) => return Ran::failed(error, Some(existing.id)),
        };
        let from = Pumped::from(existing.output);
        let (done, usage) = self
            .supervise_adopted(claim, keeper, &existing, output, from)
            .await;
        // A follow read of the engine's log can end without the container's last
        // partial entry (output without a newline). Read it once more, now that the
        // container has exited, and store whatever lies past what was handled.
        let last = match self.runtime.logs(&existing.id, false).await {
            Ok(rest) => pump_output(self.control.clone(), lease, rest, done.pumped).await,
            Err(error) => {
                tracing::warn!(message = "final read of the adopted container's log failed", %error);
                done.pumped
            }
        };
        Ran::report(done.outcome, Some(existing.id), last.undelivered).with_usage(usage)
    }

    /// Carry on with a fast-mode container an earlier life of this worker left: no
    /// engine copy of its output, and its logs endpoint must not be read (Docker 20.10
    /// wedges it), so output is taken from a fresh attach on. The store flagged the
    /// attempt's `output_gap` when it granted the adoption.
    async fn carry_on_fast(&self, claim: &Claim, keeper: &LeaseKeeper, existing: Existing) -> Ran {
        let output = if existing.running {
            match self.runtime.attach(&existing.id).await {
                Ok(o) => o,
                Err(error) => return Ran::failed(error, Some(existing.id)),
            }
        } else {
            futures::stream::empty().boxed()
        };
        // An attach to a container that exited meanwhile may never end: take only what
        // arrives while it still runs (checked once more after attaching).
        let output = match self.runtime.inspect(&existing.id).await {
            Ok(info) if info.state == ContainerState::Running => output,
            _ => output
                .take_until(tokio::time::sleep(FAST_ATTACH_LATE))
                .boxed(),
        };
        // The attach stream starts now: nothing of it was handled before.
        let from = Pumped {
            read: 0,
            ..Pumped::from(existing.output)
        };
        let (done, usage) = self
            .supervise_adopted(claim, keeper, &existing, output, from)
            .await;
        Ran::report(done.outcome, Some(existing.id), done.pumped.undelivered).with_usage(usage)
    }

    /// What carrying on with an adopted container shares, whichever way its output
    /// comes: pump `output` from `from`, read its counters while it runs, tell the
    /// control plane which container it is, and supervise it to its end.
    async fn supervise_adopted(
        &self,
        claim: &Claim,
        keeper: &LeaseKeeper,
        existing: &Existing,
        output: OutputStream,
        from: Pumped,
    ) -> (Supervised, Option<ResourceUsage>) {
        let lease = claim.lease;
        let pump =
            tokio::spawn(pump_output(self.control.clone(), lease, output, from).in_current_span());
        // Readings from now on; on cgroup v1 the kernel's high-water mark still covers
        // the time before.
        let sampler = existing.running.then(|| {
            let spec = container_spec(claim, &self.config.worker_id);
            Sampler::start(self.runtime.clone(), &existing.id, &spec)
        });
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
        let done = self
            .supervise(claim, keeper, &existing.id, pump, from, ran_for)
            .await;
        (done, sampler.and_then(Sampler::stop))
    }

    /// The attempt's container name was taken: by this very attempt, in an earlier
    /// life of this worker. A container that never started is replaced; one that ran is
    /// adopted, once the control plane confirms the attempt is still ours.
    async fn existing_container(
        &self,
        claim: &Claim,
        keeper: &LeaseKeeper,
        name: &str,
    ) -> Result<Found, RuntimeError> {
        let info = self.runtime.inspect(name).await?;
        if info.state == ContainerState::Created {
            tracing::info!(message = "an unstarted container of this attempt existed; replacing it", container_id = %info.id);
            self.runtime.remove(&info.id).await?;
            let container = container_spec(claim, &self.config.worker_id);
            let id = self.runtime.create(&container).await?;
            return Ok(Found::Done(self.start_fresh(claim, keeper, id).await));
        }
        let output = match self.adopt(claim).await {
            Some(Adoption::Held { output, .. }) => output,
            // Not ours any more: reconciliation removes it as stale.
            Some(Adoption::Stale) => return Ok(Found::Done(Ran::nothing(None))),
            // Not knowing whether the attempt is still ours, the container is neither
            // ours to stop nor a reason to end the attempt: an outcome here would let
            // a retry start while this container still runs. Reconciliation adopts it
            // once the control plane answers.
            None => {
                tracing::warn!(message = "could not confirm the existing container is ours; leaving it to reconciliation", container_id = %info.id);
                return Ok(Found::Done(Ran::nothing(None)));
            }
        };
        tracing::info!(message = "container already existed; adopting it", container_id = %info.id);
        Ok(Found::Adopt(Existing {
            running: info.state == ContainerState::Running,
            id: info.id,
            output,
            started_at: info.started_at,
        }))
    }

    /// Ask the control plane whether the attempt is still ours, retrying while it
    /// cannot be reached. `None` if no answer came.
    async fn adopt(&self, claim: &Claim) -> Option<Adoption> {
        let (run_id, attempt) = (claim.lease.run_id, claim.lease.attempt);
        let mut backoff = Backoff::new();
        for tries in 1..=ADOPT_TRIES {
            match self
                .control
                .adopt(run_id, attempt, &self.config.worker_id)
                .await
            {
                Ok(answer) => return Some(answer),
                Err(ControlError::Unavailable(error)) if tries < ADOPT_TRIES => {
                    let wait = backoff.step();
                    tracing::warn!(message = "adopt failed; retrying", %error, retry_in_ms = wait.as_millis() as u64);
                    tokio::time::sleep(wait).await;
                }
                Err(error) => {
                    tracing::warn!(message = "adopt failed", %error);
                    return None;
                }
            }
        }
        None
    }

    async fn start_fresh(&self, claim: &Claim, keeper: &LeaseKeeper, id: String) -> Ran {
        let output = match self.runtime.attach(&id).await {
            Ok(o) => o,
            Err(error) => return Ran::failed(error, Some(id)),
        };
        let pump = tokio::spawn(
            pump_output(self.control.clone(), claim.lease, output, Pumped::default())
                .in_current_span(),
        );
        match keeper.current() {
            LeaseState::Held => {}
            LeaseState::CancelRequested => {
                pump.abort();
                tracing::info!(message = "cancelled before the container started");
                return Ran::report(Outcome::Cancelled { code: None }, Some(id), 0);
            }
            LeaseState::Lost => {
                pump.abort();
                return Ran::nothing(Some(id));
            }
        }
        if let Err(error) = self.runtime.start(&id).await {
            pump.abort();
            return Ran::failed(error, Some(id));
        }
        tracing::info!(message = "container started", container_id = %id);
        let sampler = Sampler::start(
            self.runtime.clone(),
            &id,
            &container_spec(claim, &self.config.worker_id),
        );
        match self.control.started(claim.lease, &id).await {
            Ok(status) => keeper.tell(status),
            Err(error) => {
                tracing::warn!(message = "reporting start failed; reconciliation will tell it", %error)
            }
        }
        let done = self
            .supervise(claim, keeper, &id, pump, Pumped::default(), Duration::ZERO)
            .await;
        Ran::report(done.outcome, Some(id), done.pumped.undelivered).with_usage(sampler.stop())
    }

    /// Waits for the container, enforcing the timeout (`ran_for` of it already spent)
    /// and acting on cancels and takeovers; then collects the last output. `from` is
    /// where the pump started, the position to fall back on if it never ends.
    async fn supervise(
        &self,
        claim: &Claim,
        keeper: &LeaseKeeper,
        id: &str,
        mut pump: tokio::task::JoinHandle<Pumped>,
        from: Pumped,
        ran_for: Duration,
    ) -> Supervised {
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
        let mut lease_state = keeper.watch();
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
                    Err(error) if wait_failures < WAIT_TRIES => {
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
        let pumped = match tokio::time::timeout(PUMP_DRAIN, &mut pump).await {
            Ok(Ok(pumped)) => {
                tracing::debug!(
                    message = "output stored",
                    bytes = pumped.stored,
                    dropped = pumped.undelivered
                );
                pumped
            }
            Ok(Err(error)) => {
                tracing::warn!(message = "output pump failed", %error);
                from
            }
            Err(_) => {
                pump.abort();
                tracing::warn!(
                    message = "output still streaming after the container exited; stopped it"
                );
                from
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
        Supervised { outcome, pumped }
    }
}

fn outcome_of(error: RuntimeError) -> Outcome {
    match error {
        RuntimeError::ImageNotFound { image } => Outcome::ImageNotFound { image },
        RuntimeError::PullFailed { image, message } => Outcome::ImagePullFailed {
            image,
            message,
            unauthorized: false,
        },
        RuntimeError::PullUnauthorized { image, message } => Outcome::ImagePullFailed {
            image,
            message,
            unauthorized: true,
        },
        other => Outcome::DockerError {
            message: other.to_string(),
        },
    }
}

pub fn container_name(claim: &Claim) -> String {
    format!("tasuki-{}-{}", claim.lease.run_id, claim.lease.attempt)
}

pub(super) fn container_spec(claim: &Claim, worker_id: &str) -> ContainerSpec {
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
        (
            super::reconcile::WORKER_LABEL.to_owned(),
            worker_id.to_owned(),
        ),
    ]);
    ContainerSpec {
        name: container_name(claim),
        image: spec.image.clone(),
        command: spec.command.clone(),
        workdir: spec.workdir.clone(),
        user: spec.user.clone(),
        env,
        // The job's own names cannot start with `TASUKI_`, so these never shadow ours.
        secret_env: claim.secrets.env.clone(),
        labels,
        cpu_shares: spec.resources.cpu,
        cpu_limit: spec.resources.cpu_limit,
        // A spec stored before tasuki set these runs with the built-in defaults.
        memory_bytes: spec.resources.memory_bytes.unwrap_or(DEFAULT_MEMORY),
        network: spec.network.clone(),
        pids_limit: spec.hardening.pids_limit.unwrap_or(DEFAULT_PIDS_LIMIT),
        capabilities: spec.hardening.capabilities.clone(),
        read_only_root: spec.hardening.read_only,
        mounts: spec.hardening.mounts.clone(),
        logs: spec.logs,
    }
}
