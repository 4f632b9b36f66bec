//! The few traits the services need from the outside world. Adapters implement them;
//! services only ever see these.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;

use super::job::{BindMount, Capability, LogMode, PullPolicy};
use super::secret::{RegistryCredentials, Secret};
use super::session::{OrphanVerdict, SessionRenewal, SessionRequest, WorkerSession};

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
    /// Environment variables whose values are secrets: put into the create request by
    /// the runtime itself, so printing a spec never shows them.
    pub secret_env: BTreeMap<String, Secret>,
    pub labels: BTreeMap<String, String>,
    /// Relative CPU weight, Docker `CpuShares` (1024 = one core, as ECS units).
    pub cpu_shares: Option<u32>,
    /// Hard CPU cap in cores, Docker `NanoCpus`.
    pub cpu_limit: Option<f64>,
    /// Hard memory limit; swap is set to the same value so the limit bites. Every
    /// container has one.
    pub memory_bytes: u64,
    /// Docker network mode (`bridge`, `none`, a network name; never `host`).
    pub network: String,
    /// Processes and threads the container may have.
    pub pids_limit: u32,
    /// Added back after all capabilities are dropped.
    pub capabilities: Vec<Capability>,
    /// Read-only root file system, with a writable tmpfs on `/tmp`.
    pub read_only_root: bool,
    pub mounts: Vec<BindMount>,
    /// `Fast`: no log driver, so output exists only on the attach stream.
    pub logs: LogMode,
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
    /// The registry refused the pull's credentials, or wanted some and got none.
    #[error("pulling image {image} failed: unauthorized: {message}")]
    PullUnauthorized { image: String, message: String },
    /// Any other pull failure (registry unreachable, refused, ...).
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
/// Readings of a running container's counters, about one a second, ending when it stops.
pub type StatsStream = BoxStream<'static, Result<StatsSample, RuntimeError>>;

/// One reading of a running container's resource counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatsSample {
    /// Memory charged to the container now (its cgroup's usage, page cache included):
    /// the figure its memory limit is enforced against.
    pub memory_bytes: u64,
    /// The kernel's high-water mark of that charge since the container started, where
    /// the engine reports one (cgroup v1); it catches peaks between readings.
    pub memory_peak_bytes: Option<u64>,
    /// CPU time used since the container started, user and system, in nanoseconds.
    pub cpu_nanos: u64,
}

/// A container engine as tasuki needs it: one-shot containers, attached before start.
#[async_trait]
pub trait ContainerRuntime: Send + Sync + 'static {
    /// Engine reachable and answering.
    async fn ping(&self) -> Result<(), RuntimeError>;
    /// Make the image present according to the pull policy; a pull logs in with
    /// `credentials` when given.
    async fn ensure_image(
        &self,
        image: &str,
        policy: PullPolicy,
        credentials: Option<&RegistryCredentials>,
    ) -> Result<(), RuntimeError>;
    /// Create (not start) the container; returns its id.
    async fn create(&self, spec: &ContainerSpec) -> Result<String, RuntimeError>;
    /// Attach to stdout+stderr (stream only, no past logs). Call before `start` so no
    /// early output is lost. The stream ends when the container exits.
    async fn attach(&self, id: &str) -> Result<OutputStream, RuntimeError>;
    async fn start(&self, id: &str) -> Result<(), RuntimeError>;
    /// Wait for the container to exit; an exit other than 0 is inspected (was it an OOM
    /// kill?), an exit 0 needs no more.
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
    /// Every container (any state) that has label `key`, whatever its value.
    async fn list_with_label(&self, key: &str) -> Result<Vec<ContainerInfo>, RuntimeError>;
    /// One container by id or name.
    async fn inspect(&self, id: &str) -> Result<ContainerInfo, RuntimeError>;
    /// The container's whole output from its start; with `follow`, on until it exits.
    /// Slower than `attach` and heavier on the engine: only for catching up with a
    /// container adopted after a restart.
    async fn logs(&self, id: &str, follow: bool) -> Result<OutputStream, RuntimeError>;
    /// Readings of the running container's resource counters as the engine takes them
    /// (about one a second); the stream ends when the container is not running (the
    /// engine has nothing to read once it exited). Open it after `start`.
    async fn stats(&self, id: &str) -> Result<StatsStream, RuntimeError>;
}

// ---------------------------------------------------------------------------------------
// The store: source of truth for runs, attempts, leases and the outbox. It lives in
// `store.rs`; re-exported here so every port is reachable from one place.

pub use super::store::*;

use super::run::{Outcome, ResourceUsage, Run, RunId};

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

/// Where replies to producers go (the AMQP default exchange, routing key `reply_to`).
#[async_trait]
pub trait ReplySink: Send + Sync + 'static {
    /// Publish the run as a reply and wait for the broker's confirm. A reply the broker
    /// returns (no queue by that name) is `QueueError::Unroutable`.
    async fn send_reply(
        &self,
        address: &crate::domain::reply::ReplyAddress,
        kind: crate::domain::reply::ReplyKind,
        run: &Run,
    ) -> Result<(), QueueError>;
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
    /// Renew every lease in `leases` at once (a worker renews all it holds together);
    /// the answers are in the same order, one per lease.
    async fn heartbeat(&self, leases: &[Lease]) -> Result<Vec<LeaseStatus>, ControlError>;
    /// Append output at `offset` (bytes of this attempt's log before `chunks`). Idempotent
    /// by offset: bytes already stored are skipped. Returns the log's new length.
    /// `undelivered_before`: bytes of the attempt's output the worker dropped, all told,
    /// because it could not deliver them (before `chunks`); recorded before the write,
    /// so a log holding bytes that followed a hole always has the hole on record.
    async fn append_log(
        &self,
        lease: Lease,
        offset: u64,
        undelivered_before: u64,
        chunks: &[OutputChunk],
    ) -> Result<u64, ControlError>;
    /// `undelivered`: all the attempt's output the worker could not deliver at all
    /// (including what an earlier life of the worker reported); counted once however
    /// often it was reported. `usage`: what the container used, as far as it was read.
    async fn finish(
        &self,
        lease: Lease,
        outcome: &Outcome,
        undelivered: u64,
        usage: Option<ResourceUsage>,
    ) -> Result<LeaseStatus, ControlError>;
    /// The attempts the control plane thinks `worker_id` holds.
    async fn held(&self, worker_id: &str) -> Result<Vec<HeldAttempt>, ControlError>;
    /// See [`RunStore::adopt`]; also says where the attempt's output stands.
    async fn adopt(
        &self,
        run_id: RunId,
        attempt: u32,
        worker_id: &str,
    ) -> Result<Adoption, ControlError>;
    async fn release(&self, lease: Lease) -> Result<LeaseStatus, ControlError>;
    /// Open this process's session for its worker id (see `domain::session`).
    async fn open_session(&self, request: &SessionRequest) -> Result<SessionGrant, ControlError>;
    async fn renew_session(
        &self,
        worker_id: &str,
        instance: &str,
    ) -> Result<SessionRenewal, ControlError>;
    /// Say goodbye: the id's containers may be adopted by the next process at once.
    async fn end_session(&self, worker_id: &str, instance: &str) -> Result<(), ControlError>;
    /// May a container of attempt `attempt` of `run_id`, labelled with `worker_id`, be
    /// removed by another worker on the same engine?
    async fn orphan_verdict(
        &self,
        run_id: RunId,
        attempt: u32,
        worker_id: &str,
    ) -> Result<OrphanVerdict, ControlError>;
}

/// The control plane's answer to `adopt`.
#[derive(Debug, Clone)]
pub enum Adoption {
    /// Still this worker's attempt: carry on with it under this (renewed) claim, its
    /// output from `output`.
    Held {
        claim: Box<Claim>,
        output: OutputPosition,
    },
    /// The attempt is final, taken over or unknown: the container must go.
    Stale,
}

/// Where an attempt's output stands, for a worker that carries on with its container
/// and reads the container's output again from its start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OutputPosition {
    /// Bytes of the container's output handled: stored or dropped. A read from the
    /// start skips this many.
    pub read: u64,
    /// The stored log's length: where the next write goes.
    pub stored: u64,
    /// Of `read`, what the worker could not deliver; its count goes on from here.
    pub undelivered: u64,
}

impl OutputPosition {
    /// The position of output whose log holds `stored` bytes and lost `dropped`.
    pub fn after(stored: u64, dropped: DroppedOutput) -> Self {
        Self {
            read: stored.saturating_add(dropped.total),
            stored,
            undelivered: dropped.undelivered,
        }
    }
}

/// The control plane's answer to a session request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionGrant {
    /// Open: heartbeat well within `ttl`.
    Granted { ttl: Duration },
    /// Another live process holds the worker id.
    Refused { live: WorkerSession },
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
    /// Make what the attempt's log holds durable (fsync). Called once per attempt,
    /// before its final state is stored, so a stored end never outlives its log's end.
    async fn sync(&self, run_id: RunId, attempt: u32) -> Result<(), LogError>;
    /// Bytes stored for the attempt so far.
    async fn len(&self, run_id: RunId, attempt: u32) -> Result<u64, LogError>;
    /// Delete the logs of the run's attempts `1..=attempts` (its retention ended).
    /// Returns whether there was anything to delete.
    async fn delete_run(&self, run_id: RunId, attempts: u32) -> Result<bool, LogError>;
    /// Up to `max` bytes of the attempt's log from `offset` (empty at the end).
    async fn read(
        &self,
        run_id: RunId,
        attempt: u32,
        offset: u64,
        max: usize,
    ) -> Result<Bytes, LogError>;
}

/// Where services read the time, so tests can set it (the scheduler's slots, above all).
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> chrono::DateTime<chrono::Utc>;
}

/// The real time.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> chrono::DateTime<chrono::Utc> {
        chrono::Utc::now()
    }
}
