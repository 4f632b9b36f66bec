//! The store port: the source of truth for runs, attempts, leases, the outbox and worker
//! sessions. One trait per part, so an implementation
//! can be read and tested a part at a time (SQLite and PostgreSQL implement them all);
//! `RunStore` is all of them together. The schedules part is `schedules.rs`.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::auth::JobFilter;
use super::callback::CallbackTarget;
pub use super::callback::Callbacks;
use super::job::ResolvedSpec;
use super::reply::{DueReply, Requester};
use super::retry::RetryPolicy;
use super::run::{Outcome, ResourceUsage, Run, RunId, RunStatus, Trigger};
use super::schedule::Admission;
use super::secret::ClaimSecrets;
use super::session::{
    OrphanVerdict, SessionDecision, SessionRenewal, SessionRequest, WorkerSession,
};

mod schedules;

pub use schedules::*;

/// A run to accept: written together with its first outbox entry, in one transaction.
#[derive(Debug, Clone)]
pub struct NewRun {
    pub id: RunId,
    pub job: String,
    pub params: BTreeMap<String, String>,
    pub spec: ResolvedSpec,
    pub retry: RetryPolicy,
    pub created_at: DateTime<Utc>,
    pub trigger: Trigger,
    /// When the run may be handed to a worker: at once, or within the job's
    /// `max_concurrent` (runs wait `queued` in arrival order until admitted).
    pub admission: Admission,
    /// Where its end is announced, if anywhere.
    pub callback: Option<CallbackTarget>,
    /// Who asked over a queue and which replies they want (default: nobody, none).
    pub requester: Requester,
}

/// An `Idempotency-Key` with what it was first sent with.
#[derive(Debug, Clone)]
pub struct IdempotencyKey {
    /// Whose key: keys of different clients never collide.
    pub scope: String,
    pub key: String,
    pub job: String,
    /// The request's params as canonical JSON.
    pub fingerprint: String,
}

/// How long an idempotency key holds.
pub const IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inserted {
    New,
    /// The key was used before, with the same job and params: this is that run.
    Existing(RunId),
    /// The key was used before for another job or other params.
    KeyReused {
        job: String,
    },
}

/// What a cancel did.
#[derive(Debug, Clone, PartialEq)]
pub enum CancelResult {
    /// It had not started: it is `cancelled` now and never will start.
    Cancelled,
    /// It is running: its worker stops the container at its next heartbeat.
    Requested,
    AlreadyFinal(RunStatus),
    UnknownRun,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RetryResult {
    /// A new attempt is queued.
    Queued {
        attempt: u32,
    },
    NotRetryable(RunStatus),
    UnknownRun,
}

/// An attempt a worker holds, as the store knows it (for reconciliation).
#[derive(Debug, Clone, PartialEq)]
pub struct HeldAttempt {
    pub lease: Lease,
    pub container_id: Option<String>,
}

/// A worker's answer about a container it found labelled with its own id.
#[derive(Debug, Clone)]
pub enum AdoptResult {
    /// Still this worker's attempt: carry on with it under this (renewed) claim. Its
    /// output dropped so far tells how much of the container's output lies behind the
    /// stored log.
    Held {
        claim: Box<Claim>,
        dropped: DroppedOutput,
    },
    /// The attempt is final, taken over or unknown: the container must go.
    Stale,
}

/// An attempt's output that is not in its log, as counted so far. The next write goes
/// where the log ends, closing up over every hole, so the log's length plus `total` is
/// how much of the container's output has been handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DroppedOutput {
    /// Every dropped byte: refused by the log sink, plus `undelivered`.
    pub total: u64,
    /// Bytes the worker could not deliver at all, as it last said (the most it said).
    pub undelivered: u64,
}

#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    pub job: Option<String>,
    pub status: Option<RunStatus>,
    /// Only runs of the jobs these globs match (the caller's `read` scopes).
    pub jobs: JobFilter,
    pub limit: u32,
    /// Only runs started this way (`Trigger::kind`: `api`, `schedule`, `webhook`).
    pub trigger: Option<&'static str>,
    /// Only runs created at or after this instant ...
    pub created_from: Option<DateTime<Utc>>,
    /// ... and before this one.
    pub created_before: Option<DateTime<Utc>>,
}

/// A pending publish: "attempt N of run R is ready for a worker".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunMessage {
    pub run_id: RunId,
    pub attempt: u32,
}

/// Publishes waiting for the broker.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OutboxBacklog {
    pub pending: u64,
    /// Of those, the ones a publish already failed for (down, returned, nacked).
    pub failed: u64,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxEntry {
    pub id: i64,
    pub message: RunMessage,
}

/// The proof that a worker holds a run attempt: every write it makes carries this, and
/// the store refuses writes whose epoch is not the current one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub run_id: RunId,
    pub attempt: u32,
    pub epoch: i64,
}

/// What a worker gets when its claim succeeds: everything needed to run the attempt.
#[derive(Debug, Clone)]
pub struct Claim {
    pub lease: Lease,
    pub job: String,
    pub spec: ResolvedSpec,
    pub lease_ttl: Duration,
    /// The values of the spec's secret references (and the pull's credentials), read by
    /// the control plane for this claim only; empty as the store hands a claim out.
    pub secrets: ClaimSecrets,
}

#[derive(Debug, Clone)]
pub enum ClaimResult {
    Claimed(Box<Claim>),
    /// Claimed by someone already, finished, or cancelled: the delivery is a duplicate.
    NotClaimable {
        status: RunStatus,
        attempt: u32,
    },
    UnknownRun,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseStatus {
    /// Still ours; `cancel` asks the worker to stop the container.
    Held { cancel: bool },
    /// Taken over, expired into `lost`, or already final: stop writing.
    Lost,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// The database was migrated by a newer build: nothing of this build may run on it.
    #[error(
        "the store's schema is at version {found}, newer than this build of tasuki knows \
         (up to {known}): it was upgraded by a newer tasuki; run that version, or restore \
         the backup taken before the upgrade"
    )]
    SchemaTooNew { found: i64, known: i64 },
}

/// Runs and the idempotency keys they were accepted under.
#[async_trait]
pub trait RunRecords: Send + Sync + 'static {
    async fn ping(&self) -> Result<(), StoreError>;
    /// Store the run and its first outbox entry atomically; with a key, only if the key
    /// is new (or older than the idempotency window). The outbox entry is written only
    /// when the run is admitted: its `admission` allows the job's admitted runs that are
    /// not final and no run of the job waits already; otherwise it waits `queued`, and
    /// is admitted (in arrival order) when a run of its job becomes final.
    async fn insert_run(
        &self,
        run: &NewRun,
        key: Option<&IdempotencyKey>,
    ) -> Result<Inserted, StoreError>;
    async fn get_run(&self, id: RunId) -> Result<Option<Run>, StoreError>;
    async fn list_runs(&self, filter: &RunFilter) -> Result<Vec<Run>, StoreError>;
    async fn cancel(&self, id: RunId, now: DateTime<Utc>) -> Result<CancelResult, StoreError>;
    /// A person's new attempt of a `failed`, `timed_out` or `lost` run, admitted like a
    /// new run (or left waiting for room).
    async fn retry(&self, id: RunId, now: DateTime<Utc>) -> Result<RetryResult, StoreError>;
}

/// Publishes waiting for the queue's confirm.
#[async_trait]
pub trait Outbox: Send + Sync + 'static {
    /// Outbox entries due at `now` (a retry's entry waits for its backoff).
    async fn pending_outbox(
        &self,
        limit: u32,
        now: DateTime<Utc>,
    ) -> Result<Vec<OutboxEntry>, StoreError>;
    /// The same, only entries with an id above `after`: the relay reads the next batch
    /// while the one before is still being recorded as sent.
    async fn pending_outbox_after(
        &self,
        after: i64,
        limit: u32,
        now: DateTime<Utc>,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        let mut entries = self.pending_outbox(limit, now).await?;
        entries.retain(|e| e.id > after);
        Ok(entries)
    }
    /// The relay's read when several replicas share the store: like
    /// `pending_outbox_after`, and each entry returned is the caller's for `hold` (or
    /// until it is marked sent or failed): another replica's relay skips it meanwhile,
    /// so no publish goes out twice for it. A store only one process uses need not
    /// hold anything, and by default does not.
    async fn claim_outbox(
        &self,
        after: i64,
        limit: u32,
        now: DateTime<Utc>,
        hold: Duration,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        let _ = hold;
        self.pending_outbox_after(after, limit, now).await
    }
    async fn mark_outbox_sent(&self, ids: &[i64], now: DateTime<Utc>) -> Result<(), StoreError>;
    async fn mark_outbox_failed(&self, id: i64, error: &str) -> Result<(), StoreError>;
    /// Publishes due and not yet confirmed, for the health report.
    async fn outbox_backlog(&self, now: DateTime<Utc>) -> Result<OutboxBacklog, StoreError>;
    /// For a volatile queue that lost its contents: publish every still-queued run again.
    async fn requeue_unclaimed(&self) -> Result<u64, StoreError>;
    /// Publish again the due, still-queued runs whose message went out before
    /// `sent_before` (the queue, found empty, no longer holds them). Returns those runs.
    async fn republish_unclaimed(
        &self,
        sent_before: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<Vec<RunId>, StoreError>;
}

/// Attempts, the claims that start them and the leases that keep them.
#[async_trait]
pub trait Leases: Send + Sync + 'static {
    async fn claim(
        &self,
        message: RunMessage,
        worker_id: &str,
        lease_ttl: Duration,
        now: DateTime<Utc>,
    ) -> Result<ClaimResult, StoreError>;
    async fn mark_started(
        &self,
        lease: Lease,
        container_id: &str,
        lease_ttl: Duration,
        now: DateTime<Utc>,
    ) -> Result<LeaseStatus, StoreError>;
    /// Push each current lease out to `now + lease_ttl`, all in one write; the answers
    /// are in the order of `leases` (`Lost` for one that is no longer current).
    async fn renew_leases(
        &self,
        leases: &[Lease],
        lease_ttl: Duration,
        now: DateTime<Utc>,
    ) -> Result<Vec<LeaseStatus>, StoreError>;
    /// Record the attempt's final outcome; refused (`Lost`) unless the lease is current.
    /// The run becomes final, or queued again when its retry rules say so.
    /// `undelivered`: all the attempt's output its worker could not deliver, counted as
    /// [`Leases::record_undelivered`] does (what was recorded already counts once).
    /// `usage`: what the attempt's container used, kept with the attempt.
    async fn finish(
        &self,
        lease: Lease,
        outcome: &Outcome,
        undelivered: u64,
        usage: Option<ResourceUsage>,
        now: DateTime<Utc>,
    ) -> Result<LeaseStatus, StoreError>;
    /// The lease's epoch is still the attempt's (output may be written under it).
    async fn lease_is_current(&self, lease: Lease) -> Result<bool, StoreError>;
    /// Output the log sink refused, counted in `log_dropped_bytes` of the attempt and
    /// its run.
    async fn add_log_dropped(&self, lease: Lease, bytes: u64) -> Result<(), StoreError>;
    /// The worker says `bytes` of the attempt's output so far never reached the control
    /// plane (a running total). The attempt's recorded total rises to it and never
    /// falls (a late or repeated report says less), and only the rise is counted in
    /// `log_dropped_bytes`. Like `add_log_dropped`, it counts under the attempt's
    /// current epoch, final or not.
    async fn record_undelivered(&self, lease: Lease, bytes: u64) -> Result<(), StoreError>;
    /// Attempts whose lease ran out become `lost` (or queue their retry). Returns the
    /// runs that changed.
    async fn expire_leases(&self, now: DateTime<Utc>) -> Result<Vec<RunId>, StoreError>;
    /// Give back an attempt whose container never started: the run is queued again
    /// under the same attempt number, as if never claimed.
    async fn release(&self, lease: Lease, now: DateTime<Utc>) -> Result<LeaseStatus, StoreError>;
}

/// What a worker process needs after a restart, or to judge containers it finds: the
/// attempts it holds, and the sessions that say which process owns a worker id.
#[async_trait]
pub trait Reconciliation: Send + Sync + 'static {
    /// Attempts `worker_id` holds (status running).
    async fn held_attempts(&self, worker_id: &str) -> Result<Vec<HeldAttempt>, StoreError>;
    /// A worker found a container of its own for this attempt: renew and hand back the
    /// claim, with the output dropped so far, if the attempt is still its own and
    /// running.
    async fn adopt(
        &self,
        run_id: RunId,
        attempt: u32,
        worker_id: &str,
        lease_ttl: Duration,
        now: DateTime<Utc>,
    ) -> Result<AdoptResult, StoreError>;
    /// A process asks for its worker id: decided by [`super::session::decide_session`]
    /// on the stored session, and applied (opened, kept, or left alone when refused).
    async fn open_session(
        &self,
        request: &SessionRequest,
        ttl: Duration,
        now: DateTime<Utc>,
    ) -> Result<SessionDecision, StoreError>;
    /// A session's heartbeat: renewed while it is still this instance's and not ended
    /// (expired but not yet replaced is still renewable).
    async fn renew_session(
        &self,
        worker_id: &str,
        instance: &str,
        ttl: Duration,
        now: DateTime<Utc>,
    ) -> Result<SessionRenewal, StoreError>;
    /// The process says goodbye; a no-op once another instance holds the id.
    async fn end_session(
        &self,
        worker_id: &str,
        instance: &str,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError>;
    async fn session(&self, worker_id: &str) -> Result<Option<WorkerSession>, StoreError>;
    /// May a container labelled with `worker_id` for this attempt be removed by another
    /// process? See [`super::session::orphan_verdict`].
    async fn orphan_verdict(
        &self,
        run_id: RunId,
        attempt: u32,
        worker_id: &str,
        now: DateTime<Utc>,
    ) -> Result<OrphanVerdict, StoreError>;
}

/// Replies owed to producers, written with the run (`accepted`) and with its final
/// state (`finished`), sent by the reply relay.
#[async_trait]
pub trait Replies: Send + Sync + 'static {
    /// A repeat of a request (same idempotency key) whose run exists: the replies it
    /// asks for are added unless the same ones (kind, queue, correlation id) are owed
    /// already (a redelivery). A `finished` reply of a run already final is due at once.
    async fn add_replies(
        &self,
        run_id: RunId,
        requester: &Requester,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError>;
    /// Replies due now, oldest first.
    async fn due_replies(
        &self,
        limit: u32,
        now: DateTime<Utc>,
    ) -> Result<Vec<DueReply>, StoreError>;
    /// The reply relay's read when several replicas share the store: like
    /// `due_replies`, and each reply returned is the caller's for `hold` (until then
    /// due for nobody else, unless it is recorded sooner). By default nothing is held.
    async fn claim_replies(
        &self,
        limit: u32,
        now: DateTime<Utc>,
        hold: Duration,
    ) -> Result<Vec<DueReply>, StoreError> {
        let _ = hold;
        self.due_replies(limit, now).await
    }
    /// The broker confirmed the reply.
    async fn reply_sent(&self, id: i64, now: DateTime<Utc>) -> Result<(), StoreError>;
    /// The broker returned the reply as unroutable: recorded, never tried again.
    async fn reply_unroutable(
        &self,
        id: i64,
        error: &str,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError>;
    /// The publish failed (broker down, nacked): tried again from `retry_at`.
    async fn reply_failed(
        &self,
        id: i64,
        error: &str,
        retry_at: DateTime<Utc>,
    ) -> Result<(), StoreError>;
}

/// Background work only one replica of a shared store does at a time (the scheduler,
/// the lease reaper, retention): a lease per duty in the store, taken and kept by its
/// holder, free for another once it expires or is given up. A store only one process
/// uses has every duty always held, and by default says so.
#[async_trait]
pub trait Duties: Send + Sync + 'static {
    /// Take `duty` for `holder` until `now + ttl`, or keep it: true when it is the
    /// holder's now (it was free, had expired, or was its own already).
    async fn hold_duty(
        &self,
        duty: &str,
        holder: &str,
        ttl: Duration,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let _ = (duty, holder, ttl, now);
        Ok(true)
    }
    /// Give `duty` up if `holder` has it, so another replica takes it at once.
    async fn release_duty(&self, duty: &str, holder: &str) -> Result<(), StoreError> {
        let _ = (duty, holder);
        Ok(())
    }
}

/// The whole store, as services hold it (`Arc<dyn RunStore>`).
pub trait RunStore:
    RunRecords + Outbox + Leases + Reconciliation + Schedules + Callbacks + Duties
{
}

impl<T: RunRecords + Outbox + Leases + Reconciliation + Schedules + Callbacks + Duties> RunStore
    for T
{
}
