//! Reconciliation: this worker's labelled containers against the attempts the control
//! plane says it holds. Each container is adopted, or removed as stale; each held
//! attempt without a container is re-queued (never started) or finished (its container
//! vanished). Nothing here touches a container before the control plane has answered
//! for its attempt.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::attempt::Existing;
use super::{Active, Worker};
use crate::domain::ports::{Adoption, ContainerInfo, ContainerState, HeldAttempt};
use crate::domain::run::{Outcome, RunId};
use crate::domain::session::OrphanVerdict;

/// Grace for stopping a container found to be stale (its run is someone else's now).
const STALE_GRACE: Duration = Duration::from_secs(10);
/// The label naming the worker id a container belongs to.
pub(super) const WORKER_LABEL: &str = "tasuki.worker-id";
/// How often a retry asks again about an earlier attempt's container it waits for.
const ORPHAN_RECHECK: Duration = Duration::from_millis(500);

impl Worker {
    /// Compare this worker's containers with the attempts the control plane says it
    /// holds, and settle every difference: adopt, finish, re-queue or remove. Adopted
    /// containers are carried on with as tasks of `running`.
    pub(super) async fn reconcile(self: &Arc<Self>, running: &TaskTracker) {
        let me = &self.config.worker_id;
        let containers = match self.runtime.list_labelled(WORKER_LABEL, me).await {
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
            self.settle_without_container(attempt).await;
        }
        self.remove_orphans().await;
    }

    /// Containers of other worker ids on this engine whose attempt is over and whose
    /// worker's session is over: what a worker that vanished for good left running.
    /// Removed, so they neither hold resources nor run beside a retry of their run.
    async fn remove_orphans(&self) {
        let containers = match self.runtime.list_with_label(WORKER_LABEL).await {
            Ok(c) => c,
            Err(error) => {
                tracing::warn!(message = "reconciliation: listing all tasuki containers failed", %error);
                return;
            }
        };
        for container in containers {
            let Some(owner) = container.labels.get(WORKER_LABEL) else {
                continue;
            };
            if *owner == self.config.worker_id {
                continue;
            }
            if let Some((run_id, attempt)) = attempt_of(&container) {
                self.remove_if_orphan(&container, run_id, attempt).await;
            }
        }
    }

    /// Before the container of attempt N is created: containers of earlier attempts of
    /// the same run still on this engine go first, each once the control plane confirms
    /// it is over, so that a retry never overlaps the attempt it replaces here. An
    /// orphan whose worker's session has not quite expired yet (its lease ran out a
    /// moment earlier) is waited for, up to one lease TTL.
    pub(super) async fn clear_earlier_attempts(&self, run_id: RunId, attempt: u32, ttl: Duration) {
        let containers = match self
            .runtime
            .list_labelled("tasuki.run-id", &run_id.to_string())
            .await
        {
            Ok(c) => c,
            Err(error) => {
                tracing::warn!(message = "listing earlier attempts' containers failed", %error);
                return;
            }
        };
        for container in containers {
            let Some((_, earlier)) = attempt_of(&container).filter(|(_, a)| *a < attempt) else {
                continue;
            };
            let mine = container.labels.get(WORKER_LABEL) == Some(&self.config.worker_id);
            if mine {
                if !self.is_active((run_id, earlier)) {
                    self.remove_if_stale(&container, run_id, earlier).await;
                }
            } else {
                let deadline = tokio::time::Instant::now() + ttl;
                while !self.remove_if_orphan(&container, run_id, earlier).await
                    && tokio::time::Instant::now() < deadline
                {
                    tokio::time::sleep(ORPHAN_RECHECK).await;
                }
            }
        }
    }

    /// True if the container was an orphan and is gone.
    async fn remove_if_orphan(
        &self,
        container: &ContainerInfo,
        run_id: RunId,
        attempt: u32,
    ) -> bool {
        let Some(owner) = container.labels.get(WORKER_LABEL) else {
            return false;
        };
        match self.control.orphan_verdict(run_id, attempt, owner).await {
            Ok(OrphanVerdict::Remove) => {
                tracing::warn!(message = "container of a vanished worker removed: its attempt is over and its worker's session expired", %run_id, attempt, worker_id = %owner, container_id = %container.id);
                self.stop_and_remove(container).await;
                true
            }
            Ok(OrphanVerdict::Keep) => false,
            Err(error) => {
                tracing::warn!(message = "asking whether a container is orphaned failed; left alone", %run_id, %error);
                false
            }
        }
    }

    /// One of our own containers of an attempt this process is not running: removed
    /// only if the control plane says the attempt is not ours any more.
    async fn remove_if_stale(&self, container: &ContainerInfo, run_id: RunId, attempt: u32) {
        match self
            .control
            .adopt(run_id, attempt, &self.config.worker_id)
            .await
        {
            Ok(Adoption::Stale) => {
                tracing::warn!(message = "stale container of an earlier attempt removed", %run_id, attempt, container_id = %container.id);
                self.stop_and_remove(container).await;
            }
            // Still ours (a reconciliation will carry on with it), or unknown: leave it.
            Ok(Adoption::Held { .. }) | Err(_) => {}
        }
    }

    async fn stop_and_remove(&self, container: &ContainerInfo) {
        if container.state == ContainerState::Running
            && let Err(error) = self.runtime.stop(&container.id, STALE_GRACE).await
        {
            tracing::warn!(message = "stopping container failed", container_id = %container.id, %error);
        }
        if let Err(error) = self.runtime.remove(&container.id).await {
            tracing::warn!(message = "removing container failed", container_id = %container.id, %error);
        }
    }

    /// A held attempt none of our containers belongs to.
    async fn settle_without_container(&self, attempt: HeldAttempt) {
        let run_id = attempt.lease.run_id;
        match attempt.container_id {
            // Claimed, but the container never came to be: nothing ran.
            None => match self.control.release(attempt.lease).await {
                Ok(_) => {
                    tracing::info!(message = "reconciliation: unstarted attempt re-queued", %run_id, attempt = attempt.lease.attempt)
                }
                Err(error) => {
                    tracing::warn!(message = "reconciliation: re-queueing failed", %run_id, %error)
                }
            },
            Some(id) => {
                let outcome = Outcome::DockerError {
                    message: format!(
                        "container {id} disappeared while its worker was away; its exit code is unknown"
                    ),
                };
                tracing::warn!(message = "reconciliation: container of a held attempt is gone", %run_id, container_id = %id);
                if let Err(error) = self.control.finish(attempt.lease, &outcome, 0, None).await {
                    tracing::warn!(message = "reconciliation: reporting failed", %run_id, %error);
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
        let (claim, output) = match adopted {
            Ok(Adoption::Held { claim, output }) => (claim, output),
            Ok(Adoption::Stale) => {
                tracing::warn!(message = "reconciliation: stale container removed", %run_id, attempt, container_id = %container.id);
                self.stop_and_remove(&container).await;
                return;
            }
            // Whose it is stays unknown: leave it exactly as it is until an answer comes.
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
                tracing::info!(message = "reconciliation: adopting container", %run_id, attempt, container_id = %container.id, log_length = output.stored, output_read = output.read);
                let existing = Existing {
                    running: container.state == ContainerState::Running,
                    id: container.id,
                    output,
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
}

/// The (run, attempt) a container belongs to, from its labels.
fn attempt_of(container: &ContainerInfo) -> Option<(RunId, u32)> {
    let run_id = container.labels.get("tasuki.run-id")?.parse().ok()?;
    let attempt = container.labels.get("tasuki.attempt")?.parse().ok()?;
    Some((run_id, attempt))
}
