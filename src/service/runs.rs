//! Accepting runs and answering questions about them.

use crate::domain::callback::CallbackTarget;
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, NaiveDate, Utc};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::domain::job::{JobSpec, ParamErrors};
use crate::domain::job_lookup::JobLookup;
use crate::domain::observe::{self, RunObserver};
use crate::domain::ports::{
    CancelResult, FireResult, IdempotencyKey, Inserted, LogError, LogSink, NewRun, RetryResult,
    RunFilter, RunStore, SlotKey, StoreError,
};
use crate::domain::reply::Requester;
use crate::domain::run::{Run, RunId, RunStatus, Trigger};
use crate::domain::schedule::{Admission, Overlap};
use crate::service::events::{RunEventKind, RunEvents};

mod limits;
pub use limits::{ParamLimitError, ParamLimits};

#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    #[error("no job named `{0}`")]
    UnknownJob(String),
    #[error(transparent)]
    Params(#[from] ParamErrors),
    /// Over `max_params` or `max_param_bytes`, checked before the job's own rules.
    #[error(transparent)]
    Limit(#[from] ParamLimitError),
    #[error(
        "Idempotency-Key `{key}` was already used within 24 h for {used_for}; send a new key for a different request"
    )]
    KeyReused { key: String, used_for: String },
    #[error("a request with Idempotency-Key `{0}` is still being accepted; try again shortly")]
    KeyInFlight(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// An idempotency key: unique within `scope`; `content`, when given, must match too.
#[derive(Debug, Clone)]
pub struct RequestKey {
    pub scope: String,
    pub key: String,
    pub content: Option<String>,
}

/// The longest `Idempotency-Key` taken.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// What `accept` did.
#[derive(Debug)]
pub enum Accepted {
    New(Run),
    /// The idempotency key named an earlier run with the same job and params.
    Existing(Run),
}

impl Accepted {
    pub fn into_run(self) -> Run {
        match self {
            Accepted::New(r) | Accepted::Existing(r) => r,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    #[error("no run {0}")]
    UnknownRun(RunId),
    #[error("run {id} is already {status}")]
    AlreadyFinal { id: RunId, status: RunStatus },
    #[error(
        "run {id} is {status}; only failed, timed_out or lost runs can be retried (a cancelled run was stopped on purpose: start a new run instead)"
    )]
    NotRetryable { id: RunId, status: RunStatus },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The variables tasuki puts in a run's frozen env about what started it (`TASUKI_` names
/// are refused in job files, so nothing here overrides a job's own).
fn trigger_env(trigger: &Trigger) -> BTreeMap<String, String> {
    let mut env = BTreeMap::from([("TASUKI_TRIGGER".to_owned(), trigger.kind().to_owned())]);
    if let Trigger::Schedule {
        schedule,
        business_date,
        local_time,
        ..
    } = trigger
    {
        env.insert("TASUKI_SCHEDULE".to_owned(), schedule.clone());
        env.insert("TASUKI_SCHEDULED_TIME".to_owned(), local_time.clone());
        env.insert(
            "TASUKI_BUSINESS_DATE".to_owned(),
            business_date.format("%Y-%m-%d").to_string(),
        );
    }
    env
}

/// Removes a key from the in-flight set when its request is done, however it ends.
struct InFlight<'a> {
    set: &'a std::sync::Mutex<HashSet<(String, String)>>,
    entry: (String, String),
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.entry);
    }
}

/// The run-facing use cases, shared by the HTTP API and the scheduler.
#[derive(Clone)]
pub struct Runs {
    jobs: Arc<dyn JobLookup>,
    store: Arc<dyn RunStore>,
    logs: Arc<dyn LogSink>,
    events: RunEvents,
    /// Wakes the outbox relay when a run was accepted.
    outbox: Arc<Notify>,
    /// Cancelled when the process begins to stop: waits answer at once with the run
    /// as it is, so shutdown is not held up by long polls.
    stopping: CancellationToken,
    /// Idempotency keys whose first request is being accepted right now.
    in_flight: Arc<std::sync::Mutex<HashSet<(String, String)>>>,
    /// What one request's parameters may come to.
    param_limits: ParamLimits,
    /// Told of runs accepted and of runs cancelled while they waited (the metrics).
    observer: Option<Arc<dyn RunObserver>>,
}

impl Runs {
    pub fn new(
        jobs: Arc<dyn JobLookup>,
        store: Arc<dyn RunStore>,
        logs: Arc<dyn LogSink>,
        events: RunEvents,
        outbox: Arc<Notify>,
        stopping: CancellationToken,
    ) -> Self {
        Self {
            jobs,
            store,
            logs,
            events,
            outbox,
            stopping,
            in_flight: Arc::default(),
            param_limits: ParamLimits::default(),
            observer: None,
        }
    }

    /// Who is told of runs accepted and cancelled while they waited (nobody otherwise).
    pub fn with_observer(mut self, observer: Arc<dyn RunObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// The parameter limits every `accept` checks (the defaults otherwise).
    pub fn with_param_limits(mut self, limits: ParamLimits) -> Self {
        self.param_limits = limits;
        self
    }

    pub fn stopping(&self) -> &CancellationToken {
        &self.stopping
    }

    pub fn job(&self, name: &str) -> Option<Arc<JobSpec>> {
        self.jobs.job(name)
    }

    /// Every job, sorted by name.
    pub fn jobs(&self) -> Vec<Arc<JobSpec>> {
        self.jobs.jobs()
    }

    /// A run of `job` ready to store: the parameters resolved into the frozen spec (with
    /// the trigger's `TASUKI_*` variables), the job's retry rules, and its admission rule
    /// from `max_concurrent`. Shared by `accept` and the scheduler.
    pub fn prepare(
        &self,
        job: &str,
        params: BTreeMap<String, String>,
        trigger: Trigger,
    ) -> Result<NewRun, AcceptError> {
        let spec = self
            .jobs
            .job(job)
            .ok_or_else(|| AcceptError::UnknownJob(job.to_owned()))?;
        let mut resolved = spec.resolve(&params)?;
        resolved.env.extend(trigger_env(&trigger));
        Ok(NewRun {
            id: RunId::new(),
            job: job.to_owned(),
            params,
            spec: resolved,
            retry: spec.retry.clone(),
            created_at: Utc::now(),
            trigger,
            admission: spec
                .max_concurrent
                .map_or(Admission::Unlimited, Admission::AtMost),
            callback: spec.callback.clone(),
            requester: Requester::default(),
        })
    }

    /// Resolve the parameters, then store the run and its outbox entry in one
    /// transaction (the outbox entry waits for the job's `max_concurrent`). Publishing
    /// happens from the outbox, not from here. With an idempotency key (`(scope, key)`),
    /// a request seen before returns its run.
    pub async fn accept(
        &self,
        job: &str,
        params: BTreeMap<String, String>,
        key: Option<(String, String)>,
        callback: Option<CallbackTarget>,
    ) -> Result<Accepted, AcceptError> {
        let key = key.map(|(scope, key)| RequestKey {
            scope,
            key,
            content: None,
        });
        self.accept_with(
            job,
            params,
            key,
            Trigger::Api,
            callback,
            Requester::default(),
        )
        .await
    }

    /// [`Runs::accept`] for a producer on a queue: who asked is stored on the run, and
    /// the replies it wants are stored as obligations in the same transaction (the
    /// `finished` one becomes due in the transaction that makes the run final). A
    /// repeat under an idempotency key adds no replies: the first request's stand.
    pub async fn accept_from(
        &self,
        job: &str,
        params: BTreeMap<String, String>,
        key: Option<(String, String)>,
        requester: Requester,
        callback: Option<CallbackTarget>,
    ) -> Result<Accepted, AcceptError> {
        let key = key.map(|(scope, key)| RequestKey {
            scope,
            key,
            content: None,
        });
        self.accept_with(job, params, key, Trigger::Api, callback, requester)
            .await
    }

    /// [`Runs::accept`] for any trigger. A key's `content` (e.g. a digest of a webhook
    /// body) joins the params in what a repeat must match. The parameter limits come
    /// first, before the job's rules, which may echo names and values back.
    pub async fn accept_with(
        &self,
        job: &str,
        params: BTreeMap<String, String>,
        key: Option<RequestKey>,
        trigger: Trigger,
        callback: Option<CallbackTarget>,
        requester: Requester,
    ) -> Result<Accepted, AcceptError> {
        self.param_limits.check(&params)?;
        let mut new = self.prepare(job, params, trigger)?;
        new.requester = requester;
        // The request's callback replaces the job's.
        if callback.is_some() {
            new.callback = callback;
        }
        let content = key.as_ref().and_then(|k| k.content.clone());
        let key = key.map(|k| (k.scope, k.key));
        let _in_flight = match &key {
            Some(entry) => {
                let mut set = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
                if !set.insert(entry.clone()) {
                    return Err(AcceptError::KeyInFlight(entry.1.clone()));
                }
                Some(InFlight {
                    set: &self.in_flight,
                    entry: entry.clone(),
                })
            }
            None => None,
        };
        let idempotency = key
            .as_ref()
            .map(|(scope, key)| {
                // BTreeMap serialises with sorted keys: canonical JSON.
                serde_json::to_string(&new.params).map(|params| IdempotencyKey {
                    scope: scope.clone(),
                    key: key.clone(),
                    job: job.to_owned(),
                    fingerprint: match &content {
                        Some(c) => format!("{params} {c}"),
                        None => params,
                    },
                })
            })
            .transpose()
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        match self.store.insert_run(&new, idempotency.as_ref()).await? {
            Inserted::New => {}
            Inserted::Existing(id) => {
                let run = self.store.get_run(id).await?.ok_or_else(|| {
                    StoreError::Corrupt(format!("idempotency key names missing run {id}"))
                })?;
                tracing::info!(message = "idempotent repeat answered with the original run", run_id = %id, job);
                return Ok(Accepted::Existing(run));
            }
            Inserted::KeyReused { job: used_for } => {
                let key = key.map(|(_, k)| k).unwrap_or_default();
                let used_for = if used_for == job {
                    format!("job `{job}` with other params")
                } else {
                    format!("job `{used_for}`")
                };
                return Err(AcceptError::KeyReused { key, used_for });
            }
        }
        self.outbox.notify_one();
        if let Some(observer) = &self.observer {
            observer.run_accepted(job, &new.trigger);
        }
        tracing::info!(message = "run accepted", run_id = %new.id, job);
        Ok(Accepted::New(Run {
            output_gap: false,
            id: new.id,
            job: new.job,
            params: new.params,
            status: RunStatus::Queued,
            trigger: new.trigger,
            attempt: 0,
            exit_code: None,
            reason: None,
            reason_code: None,
            created_at: new.created_at,
            started_at: None,
            finished_at: None,
            cancel_requested: false,
            not_before: None,
            log_dropped_bytes: 0,
            attempts: Vec::new(),
            callbacks: Vec::new(),
            replies: new.requester.initial_replies(),
            requested_by: new.requester.requested_by,
        }))
    }

    /// Fire a schedule's slot with a run from [`Runs::prepare`]: stored with the slot in
    /// one transaction unless the slot is accounted for already or the overlap policy
    /// skips it. Wakes the relay, and tells watchers of runs a `cancel_other` stopped.
    pub async fn fire_slot(
        &self,
        key: &SlotKey,
        fire_at: DateTime<Utc>,
        business_date: NaiveDate,
        new: NewRun,
        overlap: Overlap,
    ) -> Result<FireResult, AcceptError> {
        let firing = self
            .store
            .fire_slot(key, fire_at, business_date, &new, overlap, Utc::now())
            .await?;
        for id in &firing.cancelled {
            tracing::info!(message = "run cancelled by a schedule's cancel_other", run_id = %id, job = %key.job, schedule = %key.schedule);
            self.events.publish(*id, RunEventKind::Status);
            // A running one ends through its attempt; only a waiting one ends here.
            if let Some(observer) = &self.observer
                && let Ok(Some(run)) = self.store.get_run(*id).await
                && observe::cancelled_waiting(&run)
            {
                observer.run_ended(&run);
            }
        }
        if let FireResult::Fired(_) = firing.result {
            self.outbox.notify_one();
            if let Some(observer) = &self.observer {
                observer.run_accepted(&new.job, &new.trigger);
            }
        }
        Ok(firing.result)
    }

    /// A backfill's run for a slot that has not fired (see `Schedules::backfill_slot`).
    pub async fn backfill_slot(
        &self,
        key: &SlotKey,
        fire_at: DateTime<Utc>,
        business_date: NaiveDate,
        new: NewRun,
    ) -> Result<FireResult, AcceptError> {
        let result = self
            .store
            .backfill_slot(key, fire_at, business_date, &new, Utc::now())
            .await?;
        if let FireResult::Fired(_) = result {
            self.outbox.notify_one();
            if let Some(observer) = &self.observer {
                observer.run_accepted(&new.job, &new.trigger);
            }
        }
        Ok(result)
    }

    /// Cancel: a queued run is final at once; a running one is stopped by its worker.
    pub async fn cancel(&self, id: RunId) -> Result<Run, ActionError> {
        let result = self.store.cancel(id, Utc::now()).await?;
        match result {
            CancelResult::UnknownRun => return Err(ActionError::UnknownRun(id)),
            CancelResult::AlreadyFinal(status) => {
                return Err(ActionError::AlreadyFinal { id, status });
            }
            CancelResult::Cancelled => {
                tracing::info!(message = "queued run cancelled", run_id = %id)
            }
            CancelResult::Requested => {
                tracing::info!(message = "cancel requested for a running run", run_id = %id)
            }
        }
        self.events.publish(id, RunEventKind::Status);
        let run = self.get(id).await?.ok_or(ActionError::UnknownRun(id))?;
        if let (CancelResult::Cancelled, Some(observer)) = (&result, &self.observer) {
            observer.run_ended(&run);
        }
        Ok(run)
    }

    /// A person's new attempt of a failed, timed-out or lost run.
    pub async fn retry(&self, id: RunId) -> Result<Run, ActionError> {
        match self.store.retry(id, Utc::now()).await? {
            RetryResult::UnknownRun => return Err(ActionError::UnknownRun(id)),
            RetryResult::NotRetryable(status) => {
                return Err(ActionError::NotRetryable { id, status });
            }
            RetryResult::Queued { attempt } => {
                tracing::info!(message = "new attempt queued by request", run_id = %id, attempt)
            }
        }
        self.outbox.notify_one();
        self.events.publish(id, RunEventKind::Status);
        self.get(id).await?.ok_or(ActionError::UnknownRun(id))
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
        // Watch before reading, so a change between the read and the wait is seen.
        let mut watch = self.events.watch(id);
        loop {
            let Some(run) = self.store.get_run(id).await? else {
                return Ok(None);
            };
            if run.status.is_final() {
                return Ok(Some(run));
            }
            tokio::select! {
                _ = self.stopping.cancelled() => return self.store.get_run(id).await,
                _ = tokio::time::sleep_until(deadline) => return self.store.get_run(id).await,
                _ = watch.status_changed() => {}
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

#[cfg(test)]
mod tests;
