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
}

// ---------------------------------------------------------------------------------------
// The store: source of truth for runs, attempts, leases and the outbox.

use chrono::{DateTime, Utc};

use super::job::ResolvedSpec;
use super::run::{Outcome, Run, RunId, RunStatus};

/// A run to accept: written together with its first outbox entry, in one transaction.
#[derive(Debug, Clone)]
pub struct NewRun {
    pub id: RunId,
    pub job: String,
    pub params: BTreeMap<String, String>,
    pub spec: ResolvedSpec,
    pub created_at: DateTime<Utc>,
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
    /// Store the run and its first outbox entry atomically.
    async fn insert_run(&self, run: &NewRun) -> Result<(), StoreError>;
    async fn get_run(&self, id: RunId) -> Result<Option<Run>, StoreError>;
    async fn list_runs(&self, filter: &RunFilter) -> Result<Vec<Run>, StoreError>;

    async fn pending_outbox(&self, limit: u32) -> Result<Vec<OutboxEntry>, StoreError>;
    async fn mark_outbox_sent(&self, ids: &[i64], now: DateTime<Utc>) -> Result<(), StoreError>;
    async fn mark_outbox_failed(&self, id: i64, error: &str) -> Result<(), StoreError>;
    /// For a volatile queue that lost its contents: publish every still-queued run again.
    async fn requeue_unclaimed(&self) -> Result<u64, StoreError>;

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
    async fn finish(
        &self,
        lease: Lease,
        outcome: &Outcome,
        now: DateTime<Utc>,
    ) -> Result<LeaseStatus, StoreError>;
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
    async fn finish(&self, lease: Lease, outcome: &Outcome) -> Result<LeaseStatus, ControlError>;
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
    /// Up to `max` bytes of the attempt's log from `offset` (empty at the end).
    async fn read(
        &self,
        run_id: RunId,
        attempt: u32,
        offset: u64,
        max: usize,
    ) -> Result<Bytes, LogError>;
}
