//! The few traits the services need from the outside world. Adapters implement them;
//! services only ever see these.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;

use super::job::PullPolicy;

/// Which of a container's output streams a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// A piece of container output, kept as the bytes the container wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputChunk {
    pub stream: Stream,
    pub bytes: Bytes,
}

/// Everything needed to create one container for one run attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerSpec {
    /// `tasuki-{run_id}-{attempt}`: unique per attempt, so a retry of a create finds the first.
    pub name: String,
    pub image: String,
    /// Empty means the image's own entrypoint/cmd.
    pub command: Vec<String>,
    pub workdir: Option<String>,
    pub user: Option<String>,
    pub env: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
    /// Relative CPU weight, Docker `CpuShares` (1024 = one core, as ECS units).
    pub cpu_shares: Option<u32>,
    /// Hard CPU cap in cores, Docker `NanoCpus`.
    pub cpu_limit: Option<f64>,
    /// Hard memory limit; swap is set to the same value so the limit bites.
    pub memory_bytes: Option<u64>,
    /// Docker network mode (`bridge`, `none`, `host`, a network name).
    pub network: String,
}

/// How a container ended, read from `inspect` after it exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContainerExit {
    pub exit_code: i64,
    pub oom_killed: bool,
}

/// Where a container is in its life, as the engine says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContainerState {
    /// Created but never started.
    Created,
    /// Running (or paused, or restarting).
    Running,
    Exited(ContainerExit),
}

/// A container as found on the engine (for reconciliation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerInfo {
    pub id: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub state: ContainerState,
    /// When it last started, if it ever did.
    pub started_at: Option<chrono::DateTime<chrono::Utc>>,
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// Absent locally with `pull = never`, or unknown to its registry.
    #[error("image not found: {image}")]
    ImageNotFound { image: String },
    /// Any other pull failure (registry unreachable, auth, ...).
    #[error("pulling image {image} failed: {message}")]
    PullFailed { image: String, message: String },
    /// The container (by name or id) does not exist.
    #[error("no such container: {0}")]
    NoSuchContainer(String),
    /// A container with this name exists already.
    #[error("container name already in use: {0}")]
    NameConflict(String),
    /// The Docker engine could not be reached at all.
    #[error("docker engine unreachable: {0}")]
    Unavailable(String),
    /// The engine answered with an error.
    #[error("{0}")]
    Docker(String),
}

pub type OutputStream = BoxStream<'static, Result<OutputChunk, RuntimeError>>;

/// A container engine as tasuki needs it: one-shot containers, attached before start.
#[async_trait]
pub trait ContainerRuntime: Send + Sync + 'static {
    /// Engine reachable and answering.
    async fn ping(&self) -> Result<(), RuntimeError>;
    /// Make the image present according to the pull policy.
    async fn ensure_image(&self, image: &str, policy: PullPolicy) -> Result<(), RuntimeError>;
    /// Create (not start) the container; returns its id.
    async fn create(&self, spec: &ContainerSpec) -> Result<String, RuntimeError>;
    /// Attach to stdout+stderr (stream only, no past logs). Call before `start` so no
    /// early output is lost. The stream ends when the container exits.
    async fn attach(&self, id: &str) -> Result<OutputStream, RuntimeError>;
    async fn start(&self, id: &str) -> Result<(), RuntimeError>;
    /// Wait for the container to exit, then inspect it.
    async fn wait(&self, id: &str) -> Result<ContainerExit, RuntimeError>;
    /// SIGTERM, then SIGKILL after `grace`.
    async fn stop(&self, id: &str, grace: Duration) -> Result<(), RuntimeError>;
    /// Force-remove; a container that is already gone is not an error.
    async fn remove(&self, id: &str) -> Result<(), RuntimeError>;
    /// Every container (any state) carrying label `key=value`.
    async fn list_labelled(
        &self,
        key: &str,
        value: &str,
    ) -> Result<Vec<ContainerInfo>, RuntimeError>;
    /// One container by id or name.
    async fn inspect(&self, id: &str) -> Result<ContainerInfo, RuntimeError>;
    /// The container's whole output from its start; with `follow`, on until it exits.
    /// Slower than `attach` and heavier on the engine: only for catching up with a
    /// container adopted after a restart.
    async fn logs(&self, id: &str, follow: bool) -> Result<OutputStream, RuntimeError>;
}

// ---------------------------------------------------------------------------------------
// The store: source of truth for runs, attempts, leases and the outbox.

use chrono::{DateTime, Utc};

use super::job::ResolvedSpec;
use super::retry::RetryPolicy;
use super::run::{Outcome, Run, RunId, RunStatus};

/// A run to accept: written together with its first outbox entry, in one transaction.
#[derive(Debug, Clone)]
pub struct NewRun {
    pub id: RunId,
    pub job: String,
    pub params: BTreeMap<String, String>,
    pub spec: ResolvedSpec,
    pub retry: RetryPolicy,
    pub created_at: DateTime<Utc>,
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
    /// Still this worker's attempt: carry on with it under this (renewed) claim.
    Held(Box<Claim>),
    /// The attempt is final, taken over or unknown: the container must go.
    Stale,
}

#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    pub job: Option<String>,
    pub status: Option<RunStatus>,
    pub limit: u32,
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

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

#[async_trait]
pub trait RunStore: Send + Sync + 'static {
    async fn ping(&self) -> Result<(), StoreError>;
    /// Store the run and its first outbox entry atomically; with a key, only if the key
    /// is new (or older than the idempotency window).
    async fn insert_run(
        &self,
        run: &NewRun,
        key: Option<&IdempotencyKey>,
    ) -> Result<Inserted, StoreError>;
    async fn get_run(&self, id: RunId) -> Result<Option<Run>, StoreError>;
    async fn list_runs(&self, filter: &RunFilter) -> Result<Vec<Run>, StoreError>;
    async fn cancel(&self, id: RunId, now: DateTime<Utc>) -> Result<CancelResult, StoreError>;
    /// A person's new attempt of a `failed`, `timed_out` or `lost` run.
    async fn retry(&self, id: RunId, now: DateTime<Utc>) -> Result<RetryResult, StoreError>;
    /// Attempts whose lease ran out become `lost` (or queue their retry). Returns the
    /// runs that changed.
    async fn expire_leases(&self, now: DateTime<Utc>) -> Result<Vec<RunId>, StoreError>;

    /// Outbox entries due at `now` (a retry's entry waits for its backoff).
    async fn pending_outbox(
        &self,
        limit: u32,
        now: DateTime<Utc>,
    ) -> Result<Vec<OutboxEntry>, StoreError>;
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
    async fn renew_lease(
        &self,
        lease: Lease,
        lease_ttl: Duration,
        now: DateTime<Utc>,
    ) -> Result<LeaseStatus, StoreError>;
    /// Record the attempt's final outcome; refused (`Lost`) unless the lease is current.
    /// The run becomes final, or queued again when its retry rules say so.
    async fn finish(
        &self,
        lease: Lease,
        outcome: &Outcome,
        log_dropped_bytes: u64,
        now: DateTime<Utc>,
    ) -> Result<LeaseStatus, StoreError>;
    /// The lease's epoch is still the attempt's (output may be written under it).
    async fn lease_is_current(&self, lease: Lease) -> Result<bool, StoreError>;
    async fn add_log_dropped(&self, lease: Lease, bytes: u64) -> Result<(), StoreError>;
    /// Attempts `worker_id` holds (status running).
    async fn held_attempts(&self, worker_id: &str) -> Result<Vec<HeldAttempt>, StoreError>;
    /// A worker found a container of its own for this attempt: renew and hand back the
    /// claim if the attempt is still its own and running.
    async fn adopt(
        &self,
        run_id: RunId,
        attempt: u32,
        worker_id: &str,
        lease_ttl: Duration,
        now: DateTime<Utc>,
    ) -> Result<AdoptResult, StoreError>;
    /// Give back an attempt whose container never started: the run is queued again
    /// under the same attempt number, as if never claimed.
    async fn release(&self, lease: Lease, now: DateTime<Utc>) -> Result<LeaseStatus, StoreError>;
}

// ---------------------------------------------------------------------------------------
// The queue: transport only. Publishing is confirmed; consuming hands out one delivery
// at a time, and only when the caller has a free slot for it.

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("queue unavailable: {0}")]
    Unavailable(String),
    #[error("message returned by the broker as unroutable: {0}")]
    Unroutable(String),
    #[error("broker refused the message (nack)")]
    Nacked,
    #[error("queue closed")]
    Closed,
}

#[async_trait]
pub trait RunQueue: Send + Sync + 'static {
    /// Publish and wait for the broker's confirm of each message. One result per message.
    async fn publish(&self, messages: &[RunMessage]) -> Vec<Result<(), QueueError>>;
    /// Broker reachable.
    async fn ping(&self) -> Result<(), QueueError>;
    /// Messages waiting in the queue (not counting ones handed to a consumer), where
    /// the queue can tell; `None` for a queue that cannot lose what it confirmed.
    async fn ready_messages(&self) -> Result<Option<u64>, QueueError>;
}

/// What a worker does with a delivery once it has looked at it.
#[async_trait]
pub trait DeliveryHandle: Send + 'static {
    async fn ack(self: Box<Self>) -> Result<(), QueueError>;
    /// Put it back for another worker (or this one, later).
    async fn requeue(self: Box<Self>) -> Result<(), QueueError>;
    /// Reject without requeue: it goes to the dead-letter queue.
    async fn dead_letter(self: Box<Self>, reason: &str) -> Result<(), QueueError>;
}

pub struct Delivery {
    /// The parsed message, or why it could not be parsed (a poison message).
    pub message: Result<RunMessage, String>,
    pub handle: Box<dyn DeliveryHandle>,
}

#[async_trait]
pub trait DeliverySource: Send + 'static {
    /// The next delivery. Called only when the caller has a free slot; an implementation
    /// must not leave deliveries waiting unacked on its side between calls.
    async fn next(&mut self) -> Result<Delivery, QueueError>;
}

// ---------------------------------------------------------------------------------------
// The control plane as a worker sees it: in-process for the embedded worker, over HTTP
// for `tasuki worker`.

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Could not reach it or it failed; try again later.
    #[error("control plane unavailable: {0}")]
    Unavailable(String),
    /// It answered and said no; retrying the same request will not help.
    #[error("control plane refused the request: {0}")]
    Rejected(String),
}

#[async_trait]
pub trait ControlPlane: Send + Sync + 'static {
    async fn claim(
        &self,
        message: RunMessage,
        worker_id: &str,
    ) -> Result<ClaimResult, ControlError>;
    async fn started(&self, lease: Lease, container_id: &str) -> Result<LeaseStatus, ControlError>;
    async fn heartbeat(&self, lease: Lease) -> Result<LeaseStatus, ControlError>;
    /// Append output at `offset` (bytes of this attempt's log before `chunks`). Idempotent
    /// by offset: bytes already stored are skipped. Returns the log's new length.
    async fn append_log(
        &self,
        lease: Lease,
        offset: u64,
        chunks: &[OutputChunk],
    ) -> Result<u64, ControlError>;
    /// `log_dropped_bytes`: output the worker could not deliver at all.
    async fn finish(
        &self,
        lease: Lease,
        outcome: &Outcome,
        log_dropped_bytes: u64,
    ) -> Result<LeaseStatus, ControlError>;
    /// The attempts the control plane thinks `worker_id` holds.
    async fn held(&self, worker_id: &str) -> Result<Vec<HeldAttempt>, ControlError>;
    /// See [`RunStore::adopt`]; also says how much of the attempt's log is stored.
    async fn adopt(
        &self,
        run_id: RunId,
        attempt: u32,
        worker_id: &str,
    ) -> Result<(AdoptResult, u64), ControlError>;
    async fn release(&self, lease: Lease) -> Result<LeaseStatus, ControlError>;
}

// ---------------------------------------------------------------------------------------
// The log sink: where output of run attempts ends up.

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("log write at offset {offset} would leave a gap: the log holds {len} bytes")]
    Gap { offset: u64, len: u64 },
    #[error("log sink i/o: {0}")]
    Io(String),
}

#[async_trait]
pub trait LogSink: Send + Sync + 'static {
    /// Append chunks whose first byte sits at `offset` of the attempt's log; bytes below
    /// the current length are already there and are skipped. Returns the new length.
    async fn append(
        &self,
        run_id: RunId,
        attempt: u32,
        offset: u64,
        chunks: &[OutputChunk],
    ) -> Result<u64, LogError>;
    /// Bytes stored for the attempt so far.
    async fn len(&self, run_id: RunId, attempt: u32) -> Result<u64, LogError>;
    /// Delete the logs of every attempt of the run (its retention ended). Returns whether
    /// there was anything to delete.
    async fn delete_run(&self, run_id: RunId) -> Result<bool, LogError>;
    /// Up to `max` bytes of the attempt's log from `offset` (empty at the end).
    async fn read(
        &self,
        run_id: RunId,
        attempt: u32,
        offset: u64,
        max: usize,
    ) -> Result<Bytes, LogError>;
}
