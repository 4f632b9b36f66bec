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
use crate::domain::ports::{AdoptResult, ContainerInfo, ContainerState, HeldAttempt};
use crate::domain::run::{Outcome, RunId};

/// Grace for stopping a container found to be stale (its run is someone else's now).
const STALE_GRACE: Duration = Duration::from_secs(10);

impl Worker {
    /// Compare this worker's containers with the attempts the control plane says it
    /// holds, and settle every difference: adopt, finish, re-queue or remove. Adopted
    /// containers are carried on with as tasks of `running`.
    pub(super) async fn reconcile(self: &Arc<Self>, running: &TaskTracker) {
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
            self.settle_without_container(attempt).await;
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
                if let Err(error) = self.control.finish(attempt.lease, &outcome, 0).await {
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
}

/// The (run, attempt) a container belongs to, from its labels.
fn attempt_of(container: &ContainerInfo) -> Option<(RunId, u32)> {
    let run_id = container.labels.get("tasuki.run-id")?.parse().ok()?;
    let attempt = container.labels.get("tasuki.attempt")?.parse().ok()?;
    Some((run_id, attempt))
}
