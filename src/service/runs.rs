//! Accepting runs and answering questions about them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::Utc;
use tokio::sync::{Notify, broadcast};
use tokio_util::sync::CancellationToken;

use crate::catalog::Catalog;
use crate::domain::job::{JobSpec, ParamErrors};
use crate::domain::ports::{LogError, LogSink, NewRun, RunFilter, RunStore, StoreError};
use crate::domain::run::{Run, RunId, RunStatus};
use crate::service::events::{RunEventKind, RunEvents};

#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    #[error("no job named `{0}`")]
    UnknownJob(String),
    #[error(transparent)]
    Params(#[from] ParamErrors),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The run-facing use cases, shared by the HTTP API and the scheduler.
#[derive(Clone)]
pub struct Runs {
    catalog: Arc<Catalog>,
    store: Arc<dyn RunStore>,
    logs: Arc<dyn LogSink>,
    events: RunEvents,
    /// Wakes the outbox relay when a run was accepted.
    outbox: Arc<Notify>,
    /// Cancelled when the process begins to stop: waits answer at once with the run
    /// as it is, so shutdown is not held up by long polls.
    stopping: CancellationToken,
}

impl Runs {
    pub fn new(
        catalog: Arc<Catalog>,
        store: Arc<dyn RunStore>,
        logs: Arc<dyn LogSink>,
        events: RunEvents,
        outbox: Arc<Notify>,
        stopping: CancellationToken,
    ) -> Self {
        Self {
            catalog,
            store,
            logs,
            events,
            outbox,
            stopping,
        }
    }

    pub fn stopping(&self) -> &CancellationToken {
        &self.stopping
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    pub fn job(&self, name: &str) -> Option<Arc<JobSpec>> {
        self.catalog.get(name)
    }

    /// Resolve the parameters, then store the run and its outbox entry in one
    /// transaction. Publishing happens from the outbox, not from here.
    pub async fn accept(
        &self,
        job: &str,
        params: BTreeMap<String, String>,
    ) -> Result<Run, AcceptError> {
        let spec = self
            .catalog
            .get(job)
            .ok_or_else(|| AcceptError::UnknownJob(job.to_owned()))?;
        let resolved = spec.resolve(&params)?;
        let new = NewRun {
            id: RunId::new(),
            job: job.to_owned(),
            params,
            spec: resolved,
            created_at: Utc::now(),
        };
        self.store.insert_run(&new).await?;
        self.outbox.notify_one();
        tracing::info!(message = "run accepted", run_id = %new.id, job);
        Ok(Run {
            id: new.id,
            job: new.job,
            params: new.params,
            status: RunStatus::Queued,
            attempt: 0,
            exit_code: None,
            reason: None,
            reason_code: None,
            created_at: new.created_at,
            started_at: None,
            finished_at: None,
        })
    }

    pub async fn get(&self, id: RunId) -> Result<Option<Run>, StoreError> {
        self.store.get_run(id).await
    }

    pub async fn list(&self, filter: &RunFilter) -> Result<Vec<Run>, StoreError> {
        self.store.list_runs(filter).await
    }

    pub fn events(&self) -> &RunEvents {
        &self.events
    }

    /// The run once it is final, or as it is when `timeout` passes.
    pub async fn wait(&self, id: RunId, timeout: Duration) -> Result<Option<Run>, StoreError> {
        let deadline = tokio::time::Instant::now() + timeout;
        // Subscribe before reading, so a change between the read and the wait is seen.
        let mut rx = self.events.subscribe();
        loop {
            let Some(run) = self.store.get_run(id).await? else {
                return Ok(None);
            };
            if run.status.is_final() {
                return Ok(Some(run));
            }
            loop {
                let event = tokio::select! {
                    _ = self.stopping.cancelled() => return self.store.get_run(id).await,
                    event = tokio::time::timeout_at(deadline, rx.recv()) => event,
                };
                match event {
                    Err(_) => return self.store.get_run(id).await,
                    Ok(Ok(ev)) if ev.run_id == id && ev.kind == RunEventKind::Status => break,
                    Ok(Ok(_)) => continue,
                    Ok(Err(broadcast::error::RecvError::Lagged(_))) => break,
                    Ok(Err(broadcast::error::RecvError::Closed)) => {
                        return self.store.get_run(id).await;
                    }
                }
            }
        }
    }

    pub async fn read_log(
        &self,
        id: RunId,
        attempt: u32,
        offset: u64,
        max: usize,
    ) -> Result<Bytes, LogError> {
        self.logs.read(id, attempt, offset, max).await
    }
}
