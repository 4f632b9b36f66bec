//! The control plane's side of the worker protocol: claims (with the values of their
//! secrets), leases, output and final states, checked against the store. The embedded
//! worker calls it in-process; remote workers reach the same code through `http::worker`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;

use crate::domain::job::{PullPolicy, ResolvedSpec};
use crate::domain::observe::RunObserver;
use crate::domain::ports::{
    AdoptResult, Adoption, ClaimResult, ControlError, ControlPlane, HeldAttempt, Lease,
    LeaseStatus, LogSink, OutputChunk, OutputPosition, RunMessage, RunStore, SessionGrant,
    StoreError,
};
use crate::domain::run::{Outcome, ResourceUsage, Run, RunId, RunStatus};
use crate::domain::secret::{
    ClaimSecrets, RegistryCredentials, SecretResolver, Unresolved, registry_host,
};
use crate::domain::session::{OrphanVerdict, SessionDecision, SessionRenewal, SessionRequest};
use crate::keyed_lock::KeyedLocks;
use crate::service::events::{RunEventKind, RunEvents};

/// One lock per attempt, held by `append_log` from its lease check to the end of its
/// write, and by every call that hands the attempt to another epoch or ends it (claim,
/// release, adopt, finish). A takeover therefore never lands between a stale writer's
/// check and its write. The reaper takes none: expiry changes no epoch, and a retry is a
/// new attempt with a log of its own.
#[derive(Clone, Default)]
struct AttemptLocks {
    locks: Arc<KeyedLocks<(RunId, u32)>>,
}

impl AttemptLocks {
    async fn lock(&self, run_id: RunId, attempt: u32) -> tokio::sync::OwnedMutexGuard<()> {
        self.locks.of((run_id, attempt)).lock_owned().await
    }
}

#[derive(Clone)]
pub struct LocalControlPlane {
    store: Arc<dyn RunStore>,
    logs: Arc<dyn LogSink>,
    events: RunEvents,
    lease_ttl: Duration,
    attempts: AttemptLocks,
    secrets: Arc<dyn SecretResolver>,
    /// Told of claims and of attempts that end (the metrics); without one, the run is
    /// not read again for it.
    observer: Option<Arc<dyn RunObserver>>,
}

impl LocalControlPlane {
    pub fn new(
        store: Arc<dyn RunStore>,
        logs: Arc<dyn LogSink>,
        events: RunEvents,
        lease_ttl: Duration,
        secrets: Arc<dyn SecretResolver>,
    ) -> Self {
        Self {
            store,
            logs,
            events,
            lease_ttl,
            attempts: AttemptLocks::default(),
            secrets,
            observer: None,
        }
    }

    /// Who is told of claims and of attempts that end (nobody otherwise).
    pub fn with_observer(mut self, observer: Arc<dyn RunObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// The run as stored now, for the observer (if there is one). A failed read only
    /// costs the observation.
    async fn observed_run(&self, run_id: RunId) -> Option<(&dyn RunObserver, Run)> {
        let observer = self.observer.as_deref()?;
        match self.store.get_run(run_id).await {
            Ok(run) => run.map(|run| (observer, run)),
            Err(error) => {
                tracing::warn!(message = "reading the run for metrics failed", %run_id, %error);
                None
            }
        }
    }

    /// Tell the observer how attempt `attempt` of the run ended.
    async fn observe_end(&self, run_id: RunId, attempt: Option<u32>) {
        let Some((observer, run)) = self.observed_run(run_id).await else {
            return;
        };
        // The reaper does not say which attempt expired: the latest lost one.
        let attempt = attempt.or_else(|| {
            run.attempts
                .iter()
                .rev()
                .find(|a| a.status == RunStatus::Lost)
                .map(|a| a.number)
        });
        if let Some(attempt) = attempt {
            observer.attempt_ended(&run, attempt);
        }
    }

    /// A claimed attempt whose secret cannot be read ends at once, through the store's
    /// one `finish` (so `settle`: final, or retried when the job's rules name
    /// `secret_unavailable`). The worker hears the run is not claimable and drops the
    /// delivery: no container, no empty value, no redelivery loop.
    async fn fail_claim(
        &self,
        lease: Lease,
        unresolved: Unresolved,
    ) -> Result<ClaimResult, ControlError> {
        tracing::warn!(message = "a secret of the run cannot be read; the attempt fails", run_id = %lease.run_id, attempt = lease.attempt, reason = %unresolved);
        let outcome = Outcome::SecretUnavailable {
            message: unresolved.to_string(),
        };
        let ended = self
            .store
            .finish(lease, &outcome, 0, None, Utc::now())
            .await
            .map_err(store_err)?;
        if matches!(ended, LeaseStatus::Held { .. }) {
            self.observe_end(lease.run_id, Some(lease.attempt)).await;
        }
        self.events.publish(lease.run_id, RunEventKind::Status);
        let status = match self.store.get_run(lease.run_id).await {
            Ok(Some(run)) => run.status,
            _ => outcome.status(),
        };
        Ok(ClaimResult::NotClaimable {
            status,
            attempt: lease.attempt,
        })
    }

    /// Turns expired leases into `lost` (or a retry) about every second until
    /// `shutdown`. It starts one lease TTL after start-up, so that workers which kept
    /// running while the control plane was down get to renew first. With replicas, the
    /// one holding the `duty` does it.
    pub async fn reap_expired_leases(
        self,
        duty: crate::service::duty::Duty,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        let every = (self.lease_ttl / 10).clamp(Duration::from_millis(200), Duration::from_secs(1));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(self.lease_ttl) => {}
        }
        loop {
            if !duty.held().await {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(every) => {}
                }
                continue;
            }
            match self.store.expire_leases(Utc::now()).await {
                Ok(changed) => {
                    for run_id in changed {
                        tracing::warn!(message = "lease expired; attempt lost", %run_id);
                        self.observe_end(run_id, None).await;
                        self.events.publish(run_id, RunEventKind::Status);
                    }
                }
                Err(error) => tracing::warn!(message = "expiring leases failed", %error),
            }
            tokio::select! {
                _ = shutdown.cancelled() => {
                    duty.release().await;
                    return;
                }
                _ = tokio::time::sleep(every) => {}
            }
        }
    }
}

/// The values a claim's spec refers to: its secret variables, and the login for its
/// image's registry when one is configured (unless the job never pulls).
async fn read_secrets(
    resolver: &dyn SecretResolver,
    spec: &ResolvedSpec,
) -> Result<ClaimSecrets, Unresolved> {
    let mut secrets = ClaimSecrets::default();
    for (name, reference) in &spec.secret_env {
        let value = resolver
            .resolve(reference)
            .await
            .map_err(|error| Unresolved {
                what: format!("env.{name}"),
                error,
            })?;
        secrets.env.insert(name.clone(), value);
    }
    if spec.pull != PullPolicy::Never {
        let registry = registry_host(&spec.image);
        if let Some(login) = resolver.registry_login(registry) {
            let password = resolver
                .resolve(&login.password)
                .await
                .map_err(|error| Unresolved {
                    what: format!("the password of registry {registry}"),
                    error,
                })?;
            secrets.registry = Some(RegistryCredentials {
                registry: registry.to_owned(),
                username: login.username,
                password,
            });
        }
    }
    Ok(secrets)
}

fn store_err(e: StoreError) -> ControlError {
    match e {
        StoreError::Unavailable(m) => ControlError::Unavailable(m),
        StoreError::Corrupt(m) => ControlError::Rejected(m),
        e @ StoreError::SchemaTooNew { .. } => ControlError::Rejected(e.to_string()),
    }
}

#[async_trait]
impl ControlPlane for LocalControlPlane {
    async fn claim(
        &self,
        message: RunMessage,
        worker_id: &str,
    ) -> Result<ClaimResult, ControlError> {
        let _attempt = self.attempts.lock(message.run_id, message.attempt).await;
        let result = self
            .store
            .claim(message, worker_id, self.lease_ttl, Utc::now())
            .await
            .map_err(store_err)?;
        let ClaimResult::Claimed(mut claim) = result else {
            return Ok(result);
        };
        self.events.publish(message.run_id, RunEventKind::Status);
        if let Some((observer, run)) = self.observed_run(message.run_id).await {
            observer.attempt_claimed(&run, message.attempt);
        }
        match read_secrets(self.secrets.as_ref(), &claim.spec).await {
            Ok(secrets) => {
                claim.secrets = secrets;
                Ok(ClaimResult::Claimed(claim))
            }
            Err(unresolved) => self.fail_claim(claim.lease, unresolved).await,
        }
    }

    async fn started(&self, lease: Lease, container_id: &str) -> Result<LeaseStatus, ControlError> {
        let status = self
            .store
            .mark_started(lease, container_id, self.lease_ttl, Utc::now())
            .await
            .map_err(store_err)?;
        self.events.publish(lease.run_id, RunEventKind::Status);
        Ok(status)
    }

    async fn heartbeat(&self, leases: &[Lease]) -> Result<Vec<LeaseStatus>, ControlError> {
        self.store
            .renew_leases(leases, self.lease_ttl, Utc::now())
            .await
            .map_err(store_err)
    }

    async fn append_log(
        &self,
        lease: Lease,
        offset: u64,
        undelivered_before: u64,
        chunks: &[OutputChunk],
    ) -> Result<u64, ControlError> {
        let _attempt = self.attempts.lock(lease.run_id, lease.attempt).await;
        if !self
            .store
            .lease_is_current(lease)
            .await
            .map_err(store_err)?
        {
            return Err(ControlError::Rejected(format!(
                "attempt {} of run {} is not held under epoch {}",
                lease.attempt, lease.run_id, lease.epoch
            )));
        }
        // On record before the write: should this process die between the two, the
        // log never holds bytes that followed a hole nobody knows of, and an adopting
        // worker resumes after the hole instead of storing those bytes again.
        if undelivered_before > 0 {
            self.store
                .record_undelivered(lease, undelivered_before)
                .await
                .map_err(store_err)?;
        }
        match self
            .logs
            .append(lease.run_id, lease.attempt, offset, chunks)
            .await
        {
            Ok(len) => {
                self.events.publish(lease.run_id, RunEventKind::Log);
                Ok(len)
            }
            Err(error) => {
                // The sink could not take it (disk full, read-only, a gap): the bytes are
                // gone, the run is flagged, and the exit status is not touched.
                let bytes: u64 = chunks.iter().map(|c| c.bytes.len() as u64).sum();
                tracing::error!(message = "log write failed; output dropped", run_id = %lease.run_id, attempt = lease.attempt, bytes, %error);
                self.store
                    .add_log_dropped(lease, bytes)
                    .await
                    .map_err(store_err)?;
                Err(ControlError::Rejected(format!("log sink: {error}")))
            }
        }
    }

    async fn finish(
        &self,
        lease: Lease,
        outcome: &Outcome,
        undelivered: u64,
        usage: Option<ResourceUsage>,
    ) -> Result<LeaseStatus, ControlError> {
        // Held across the sync, so every write that passed its lease check is in the
        // synced log.
        let _attempt = self.attempts.lock(lease.run_id, lease.attempt).await;
        // The store is synchronous=FULL: sync the log first, or a power cut could keep
        // the final state and lose the output's end. A failed sync does not change the
        // outcome (the exit status is independent of the log).
        if let Err(error) = self.logs.sync(lease.run_id, lease.attempt).await {
            tracing::error!(message = "syncing the log failed", run_id = %lease.run_id, attempt = lease.attempt, %error);
        }
        let status = self
            .store
            .finish(lease, outcome, undelivered, usage, Utc::now())
            .await
            .map_err(store_err)?;
        drop(_attempt);
        // `Held`: this report ended the attempt (a repeat is `Lost`), so it counts once.
        // Counted before waiters wake, so whoever saw the run end sees it counted.
        if matches!(status, LeaseStatus::Held { .. }) {
            self.observe_end(lease.run_id, Some(lease.attempt)).await;
        }
        self.events.publish(lease.run_id, RunEventKind::Status);
        Ok(status)
    }

    async fn held(&self, worker_id: &str) -> Result<Vec<HeldAttempt>, ControlError> {
        self.store.held_attempts(worker_id).await.map_err(store_err)
    }

    async fn adopt(
        &self,
        run_id: RunId,
        attempt: u32,
        worker_id: &str,
    ) -> Result<Adoption, ControlError> {
        // Under the attempt's lock, so the log's length and the dropped counts are
        // read between writes, never halfway through one.
        let _attempt = self.attempts.lock(run_id, attempt).await;
        let result = self
            .store
            .adopt(run_id, attempt, worker_id, self.lease_ttl, Utc::now())
            .await
            .map_err(store_err)?;
        match result {
            AdoptResult::Held { claim, dropped } => {
                let stored = self
                    .logs
                    .len(run_id, attempt)
                    .await
                    .map_err(|e| ControlError::Unavailable(e.to_string()))?;
                Ok(Adoption::Held {
                    claim,
                    output: OutputPosition::after(stored, dropped),
                })
            }
            AdoptResult::Stale => Ok(Adoption::Stale),
        }
    }

    async fn release(&self, lease: Lease) -> Result<LeaseStatus, ControlError> {
        let _attempt = self.attempts.lock(lease.run_id, lease.attempt).await;
        let status = self
            .store
            .release(lease, Utc::now())
            .await
            .map_err(store_err)?;
        self.events.publish(lease.run_id, RunEventKind::Status);
        Ok(status)
    }

    async fn open_session(&self, request: &SessionRequest) -> Result<SessionGrant, ControlError> {
        let decision = self
            .store
            .open_session(request, self.lease_ttl, Utc::now())
            .await
            .map_err(store_err)?;
        Ok(match decision {
            SessionDecision::Open { previous } => {
                if let Some(previous) = previous.filter(|p| p.ended_at.is_none()) {
                    tracing::warn!(message = "worker session replaced one that did not end cleanly", worker_id = %request.worker_id, previous_host = %previous.host, previous_pid = previous.pid);
                }
                tracing::info!(message = "worker session opened", worker_id = %request.worker_id, host = %request.host, pid = request.pid);
                SessionGrant::Granted {
                    ttl: self.lease_ttl,
                }
            }
            SessionDecision::Reopen => SessionGrant::Granted {
                ttl: self.lease_ttl,
            },
            SessionDecision::Refuse { live } => {
                tracing::warn!(message = "worker session refused: the id is in use", worker_id = %request.worker_id, host = %request.host, live_host = %live.host, live_pid = live.pid);
                SessionGrant::Refused { live }
            }
        })
    }

    async fn renew_session(
        &self,
        worker_id: &str,
        instance: &str,
    ) -> Result<SessionRenewal, ControlError> {
        self.store
            .renew_session(worker_id, instance, self.lease_ttl, Utc::now())
            .await
            .map_err(store_err)
    }

    async fn end_session(&self, worker_id: &str, instance: &str) -> Result<(), ControlError> {
        self.store
            .end_session(worker_id, instance, Utc::now())
            .await
            .map_err(store_err)
    }

    async fn orphan_verdict(
        &self,
        run_id: RunId,
        attempt: u32,
        worker_id: &str,
    ) -> Result<OrphanVerdict, ControlError> {
        self.store
            .orphan_verdict(run_id, attempt, worker_id, Utc::now())
            .await
            .map_err(store_err)
    }
}

#[cfg(test)]
mod secrets_tests;
#[cfg(test)]
mod tests;
