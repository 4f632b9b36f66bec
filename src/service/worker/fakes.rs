//! In-memory fakes of the ports the worker uses, for its unit tests: a control plane
//! with a log sink that behaves like the file sink (idempotent by offset, refuses gaps),
//! and a container engine whose containers run until a test (or `stop`) ends them.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use futures::channel::mpsc;
use tokio::sync::watch;

use crate::domain::job::{PullPolicy, ResolvedSpec, Resources};
use crate::domain::ports::{
    Adoption, Claim, ClaimResult, ContainerExit, ContainerInfo, ContainerRuntime, ContainerSpec,
    ContainerState, ControlError, ControlPlane, DroppedOutput, HeldAttempt, Lease, LeaseStatus,
    OutputChunk, OutputPosition, OutputStream, RunMessage, RuntimeError, SessionGrant, Stream,
};
use crate::domain::run::{Outcome, RunId};
use crate::domain::session::{OrphanVerdict, SessionRenewal, SessionRequest};

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) const WORKER_ID: &str = "test-worker";
/// Exit code a container stopped by `stop` reports (SIGTERM).
pub(crate) const STOPPED_CODE: i64 = 143;

pub(crate) fn run_id() -> RunId {
    "01HZZZZZZZZZZZZZZZZZZZZZZZ"
        .parse()
        .expect("a valid run id")
}

pub(crate) fn lease() -> Lease {
    Lease {
        run_id: run_id(),
        attempt: 1,
        epoch: 7,
    }
}

pub(crate) fn claim(timeout: Option<Duration>) -> Claim {
    Claim {
        lease: lease(),
        job: "test".to_owned(),
        spec: ResolvedSpec {
            image: "tasuki-example:latest".to_owned(),
            command: vec![],
            workdir: None,
            user: None,
            env: BTreeMap::new(),
            pull: PullPolicy::Never,
            resources: Resources::default(),
            timeout,
            stop_grace: Duration::from_secs(2),
            network: "none".to_owned(),
        },
        lease_ttl: Duration::from_secs(3),
    }
}

pub(crate) fn chunk(bytes: &'static [u8]) -> OutputChunk {
    OutputChunk {
        stream: Stream::Stdout,
        bytes: Bytes::from_static(bytes),
    }
}

/// How the fake control plane answers `append_log`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AppendMode {
    Store,
    /// Unreachable, every time.
    Unavailable,
    /// Its log sink fails: the bytes are counted as dropped and refused.
    SinkFault,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Finished {
    pub lease: Lease,
    pub outcome: Outcome,
    pub dropped: u64,
}

pub(crate) struct FakeControl {
    heartbeat: Mutex<LeaseStatus>,
    heartbeats: Mutex<u32>,
    append_mode: Mutex<AppendMode>,
    /// Successful and failed append calls so far, for tests to wait on.
    appends: watch::Sender<u32>,
    log: Mutex<Vec<u8>>,
    /// Bytes the sink refused, as the real control plane counts them.
    sink_dropped: Mutex<u64>,
    /// The worker's undelivered total as recorded from appends and finish (the most
    /// it said), as the real store keeps it.
    undelivered: Mutex<u64>,
    finished: Mutex<Vec<Finished>>,
    adopt_fails: Mutex<bool>,
    adopts: Mutex<u32>,
    /// What `adopt` hands back while it works: the claim, or stale when `None`.
    adoptable: Mutex<Option<Claim>>,
    held: Mutex<Vec<HeldAttempt>>,
    released: Mutex<Vec<Lease>>,
    /// Orphan verdicts by (run, attempt, worker id); unlisted ones are kept.
    orphans: Mutex<HashMap<(RunId, u32, String), OrphanVerdict>>,
}

impl Default for FakeControl {
    fn default() -> Self {
        Self {
            heartbeat: Mutex::new(LeaseStatus::Held { cancel: false }),
            heartbeats: Mutex::new(0),
            append_mode: Mutex::new(AppendMode::Store),
            appends: watch::channel(0).0,
            log: Mutex::new(Vec::new()),
            sink_dropped: Mutex::new(0),
            undelivered: Mutex::new(0),
            finished: Mutex::new(Vec::new()),
            adopt_fails: Mutex::new(false),
            adopts: Mutex::new(0),
            adoptable: Mutex::new(None),
            held: Mutex::new(Vec::new()),
            released: Mutex::new(Vec::new()),
            orphans: Mutex::new(HashMap::new()),
        }
    }
}

impl FakeControl {
    pub fn set_heartbeat(&self, status: LeaseStatus) {
        *locked(&self.heartbeat) = status;
    }
    pub fn heartbeats(&self) -> u32 {
        *locked(&self.heartbeats)
    }
    pub fn set_append_mode(&self, mode: AppendMode) {
        *locked(&self.append_mode) = mode;
    }
    /// Wait until `append_log` was called `n` times in all.
    pub async fn appended(&self, n: u32) {
        let mut calls = self.appends.subscribe();
        let _ = calls.wait_for(|c| *c >= n).await;
    }
    pub fn append_calls(&self) -> u32 {
        *self.appends.borrow()
    }
    pub fn log(&self) -> Vec<u8> {
        locked(&self.log).clone()
    }
    pub fn set_log(&self, bytes: &[u8]) {
        *locked(&self.log) = bytes.to_vec();
    }
    pub fn sink_dropped(&self) -> u64 {
        *locked(&self.sink_dropped)
    }
    /// The worker's undelivered total, as recorded.
    pub fn undelivered(&self) -> u64 {
        *locked(&self.undelivered)
    }
    fn record_undelivered(&self, bytes: u64) {
        let mut recorded = locked(&self.undelivered);
        *recorded = (*recorded).max(bytes);
    }
    pub fn finished(&self) -> Vec<Finished> {
        locked(&self.finished).clone()
    }
    pub fn set_adopt_fails(&self, fails: bool) {
        *locked(&self.adopt_fails) = fails;
    }
    pub fn adopts(&self) -> u32 {
        *locked(&self.adopts)
    }
    pub fn set_adoptable(&self, claim: Option<Claim>) {
        *locked(&self.adoptable) = claim;
    }
    pub fn set_held(&self, held: Vec<HeldAttempt>) {
        *locked(&self.held) = held;
    }
    pub fn released(&self) -> Vec<Lease> {
        locked(&self.released).clone()
    }
    pub fn set_orphan(&self, run_id: RunId, attempt: u32, worker_id: &str, v: OrphanVerdict) {
        locked(&self.orphans).insert((run_id, attempt, worker_id.to_owned()), v);
    }
}

#[async_trait]
impl ControlPlane for FakeControl {
    async fn claim(
        &self,
        _message: RunMessage,
        _worker_id: &str,
    ) -> Result<ClaimResult, ControlError> {
        Ok(ClaimResult::UnknownRun)
    }

    async fn started(
        &self,
        _lease: Lease,
        _container_id: &str,
    ) -> Result<LeaseStatus, ControlError> {
        Ok(*locked(&self.heartbeat))
    }

    async fn heartbeat(&self, _lease: Lease) -> Result<LeaseStatus, ControlError> {
        *locked(&self.heartbeats) += 1;
        Ok(*locked(&self.heartbeat))
    }

    async fn append_log(
        &self,
        _lease: Lease,
        offset: u64,
        undelivered_before: u64,
        chunks: &[OutputChunk],
    ) -> Result<u64, ControlError> {
        self.appends.send_modify(|c| *c += 1);
        let bytes: u64 = chunks.iter().map(|c| c.bytes.len() as u64).sum();
        let mode = *locked(&self.append_mode);
        if mode == AppendMode::Unavailable {
            return Err(ControlError::Unavailable("fake: down".to_owned()));
        }
        // As the real control plane: on record before the write, whatever the sink does.
        self.record_undelivered(undelivered_before);
        let mut log = locked(&self.log);
        let len = log.len() as u64;
        if mode == AppendMode::SinkFault {
            *locked(&self.sink_dropped) += bytes;
            return Err(ControlError::Rejected("fake: log sink i/o".to_owned()));
        }
        // As the file sink: a write past the end would leave a gap and is refused (and
        // counted as dropped by the control plane); bytes below the end are skipped.
        if offset > len {
            *locked(&self.sink_dropped) += bytes;
            return Err(ControlError::Rejected(format!(
                "fake: gap at {offset}, log holds {len}"
            )));
        }
        let mut skip = len - offset;
        for c in chunks {
            let n = c.bytes.len() as u64;
            if skip >= n {
                skip -= n;
                continue;
            }
            log.extend_from_slice(&c.bytes[skip as usize..]);
            skip = 0;
        }
        Ok(log.len() as u64)
    }

    async fn finish(
        &self,
        lease: Lease,
        outcome: &Outcome,
        undelivered: u64,
    ) -> Result<LeaseStatus, ControlError> {
        self.record_undelivered(undelivered);
        locked(&self.finished).push(Finished {
            lease,
            outcome: outcome.clone(),
            dropped: undelivered,
        });
        Ok(LeaseStatus::Held { cancel: false })
    }

    async fn held(&self, _worker_id: &str) -> Result<Vec<HeldAttempt>, ControlError> {
        Ok(locked(&self.held).clone())
    }

    async fn adopt(
        &self,
        _run_id: RunId,
        _attempt: u32,
        _worker_id: &str,
    ) -> Result<Adoption, ControlError> {
        *locked(&self.adopts) += 1;
        if *locked(&self.adopt_fails) {
            return Err(ControlError::Unavailable("fake: down".to_owned()));
        }
        let stored = locked(&self.log).len() as u64;
        let undelivered = self.undelivered();
        let dropped = DroppedOutput {
            total: self.sink_dropped() + undelivered,
            undelivered,
        };
        Ok(match locked(&self.adoptable).clone() {
            Some(claim) => Adoption::Held {
                claim: Box::new(claim),
                output: OutputPosition::after(stored, dropped),
            },
            None => Adoption::Stale,
        })
    }

    async fn release(&self, lease: Lease) -> Result<LeaseStatus, ControlError> {
        locked(&self.released).push(lease);
        Ok(LeaseStatus::Held { cancel: false })
    }

    async fn open_session(&self, _: &SessionRequest) -> Result<SessionGrant, ControlError> {
        Ok(SessionGrant::Granted {
            ttl: Duration::from_secs(3),
        })
    }

    async fn renew_session(&self, _: &str, _: &str) -> Result<SessionRenewal, ControlError> {
        Ok(SessionRenewal::Renewed)
    }

    async fn end_session(&self, _: &str, _: &str) -> Result<(), ControlError> {
        Ok(())
    }

    async fn orphan_verdict(
        &self,
        run_id: RunId,
        attempt: u32,
        worker_id: &str,
    ) -> Result<OrphanVerdict, ControlError> {
        Ok(locked(&self.orphans)
            .get(&(run_id, attempt, worker_id.to_owned()))
            .copied()
            .unwrap_or(OrphanVerdict::Keep))
    }
}

struct FakeContainer {
    info: ContainerInfo,
    /// Everything it wrote, as the engine's log keeps it.
    history: Vec<OutputChunk>,
    /// Live readers (attach, following logs); dropped when it exits.
    readers: Vec<mpsc::UnboundedSender<Result<OutputChunk, RuntimeError>>>,
    exit: watch::Sender<Option<ContainerExit>>,
}

/// What the fake engine was asked to do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Call {
    Create(String),
    Start(String),
    Stop(String),
    Remove(String),
}

#[derive(Default)]
pub(crate) struct FakeRuntime {
    containers: Mutex<HashMap<String, FakeContainer>>,
    calls: Mutex<Vec<Call>>,
    next_id: Mutex<u32>,
}

impl FakeRuntime {
    pub fn calls(&self) -> Vec<Call> {
        locked(&self.calls).clone()
    }

    /// Did the engine stop or remove container `id`?
    pub fn touched(&self, id: &str) -> bool {
        self.calls().iter().any(|c| match c {
            Call::Stop(x) | Call::Remove(x) => x == id,
            _ => false,
        })
    }

    pub fn exists(&self, id: &str) -> bool {
        locked(&self.containers).contains_key(id)
    }

    /// A container left by an earlier life of the worker, running since `started_at`.
    pub fn put_running(
        &self,
        claim: &Claim,
        worker_id: &str,
        started_at: chrono::DateTime<chrono::Utc>,
    ) -> String {
        let spec = super::attempt::container_spec(claim, worker_id);
        let id = self.add(&spec);
        let mut containers = locked(&self.containers);
        if let Some(c) = containers.get_mut(&id) {
            c.info.state = ContainerState::Running;
            c.info.started_at = Some(started_at);
        }
        id
    }

    fn add(&self, spec: &ContainerSpec) -> String {
        let id = {
            let mut n = locked(&self.next_id);
            *n += 1;
            format!("c{n}")
        };
        let info = ContainerInfo {
            id: id.clone(),
            name: spec.name.clone(),
            labels: spec.labels.clone(),
            state: ContainerState::Created,
            started_at: None,
        };
        locked(&self.containers).insert(
            id.clone(),
            FakeContainer {
                info,
                history: Vec::new(),
                readers: Vec::new(),
                exit: watch::channel(None).0,
            },
        );
        id
    }

    /// The container writes `bytes`.
    pub fn emit(&self, id: &str, bytes: &'static [u8]) {
        let mut containers = locked(&self.containers);
        let Some(c) = containers.get_mut(id) else {
            return;
        };
        c.history.push(chunk(bytes));
        c.readers
            .retain(|r| r.unbounded_send(Ok(chunk(bytes))).is_ok());
    }

    /// The connections of the process reading the container's output die with it (a
    /// worker crash): its readers end, the container and its history stay.
    pub fn sever(&self, id: &str) {
        if let Some(c) = locked(&self.containers).get_mut(id) {
            c.readers.clear();
        }
    }

    /// The container's main process exits with `code`.
    pub fn exit(&self, id: &str, code: i64) {
        let mut containers = locked(&self.containers);
        let Some(c) = containers.get_mut(id) else {
            return;
        };
        if matches!(c.info.state, ContainerState::Exited(_)) {
            return;
        }
        let exit = ContainerExit {
            exit_code: code,
            oom_killed: false,
        };
        c.info.state = ContainerState::Exited(exit);
        c.readers.clear();
        c.exit.send_replace(Some(exit));
    }

    fn find(&self, id_or_name: &str) -> Option<String> {
        locked(&self.containers)
            .values()
            .find(|c| c.info.id == id_or_name || c.info.name == id_or_name)
            .map(|c| c.info.id.clone())
    }

    fn reader(&self, id: &str, history: bool) -> Result<OutputStream, RuntimeError> {
        let mut containers = locked(&self.containers);
        let c = containers
            .get_mut(id)
            .ok_or_else(|| RuntimeError::NoSuchContainer(id.to_owned()))?;
        let (tx, rx) = mpsc::unbounded();
        if history {
            for h in &c.history {
                let _ = tx.unbounded_send(Ok(h.clone()));
            }
        }
        if !matches!(c.info.state, ContainerState::Exited(_)) {
            c.readers.push(tx);
        }
        Ok(rx.boxed())
    }
}

#[async_trait]
impl ContainerRuntime for FakeRuntime {
    async fn ping(&self) -> Result<(), RuntimeError> {
        Ok(())
    }

    async fn ensure_image(&self, _image: &str, _policy: PullPolicy) -> Result<(), RuntimeError> {
        Ok(())
    }

    async fn create(&self, spec: &ContainerSpec) -> Result<String, RuntimeError> {
        if self.find(&spec.name).is_some() {
            return Err(RuntimeError::NameConflict(spec.name.clone()));
        }
        let id = self.add(spec);
        locked(&self.calls).push(Call::Create(id.clone()));
        Ok(id)
    }

    async fn attach(&self, id: &str) -> Result<OutputStream, RuntimeError> {
        self.reader(id, false)
    }

    async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        locked(&self.calls).push(Call::Start(id.to_owned()));
        let mut containers = locked(&self.containers);
        let c = containers
            .get_mut(id)
            .ok_or_else(|| RuntimeError::NoSuchContainer(id.to_owned()))?;
        c.info.state = ContainerState::Running;
        c.info.started_at = Some(chrono::Utc::now());
        Ok(())
    }

    async fn wait(&self, id: &str) -> Result<ContainerExit, RuntimeError> {
        let mut exit = locked(&self.containers)
            .get(id)
            .map(|c| c.exit.subscribe())
            .ok_or_else(|| RuntimeError::NoSuchContainer(id.to_owned()))?;
        let exited = exit
            .wait_for(|e| e.is_some())
            .await
            .map_err(|_| RuntimeError::NoSuchContainer(id.to_owned()))?;
        (*exited).ok_or_else(|| RuntimeError::Docker("fake: no exit".to_owned()))
    }

    async fn stop(&self, id: &str, _grace: Duration) -> Result<(), RuntimeError> {
        locked(&self.calls).push(Call::Stop(id.to_owned()));
        self.exit(id, STOPPED_CODE);
        Ok(())
    }

    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        locked(&self.calls).push(Call::Remove(id.to_owned()));
        self.exit(id, STOPPED_CODE);
        locked(&self.containers).remove(id);
        Ok(())
    }

    async fn list_labelled(
        &self,
        key: &str,
        value: &str,
    ) -> Result<Vec<ContainerInfo>, RuntimeError> {
        Ok(locked(&self.containers)
            .values()
            .filter(|c| c.info.labels.get(key).map(String::as_str) == Some(value))
            .map(|c| c.info.clone())
            .collect())
    }

    async fn list_with_label(&self, key: &str) -> Result<Vec<ContainerInfo>, RuntimeError> {
        Ok(locked(&self.containers)
            .values()
            .filter(|c| c.info.labels.contains_key(key))
            .map(|c| c.info.clone())
            .collect())
    }

    async fn inspect(&self, id: &str) -> Result<ContainerInfo, RuntimeError> {
        let found = self
            .find(id)
            .ok_or_else(|| RuntimeError::NoSuchContainer(id.to_owned()))?;
        locked(&self.containers)
            .get(&found)
            .map(|c| c.info.clone())
            .ok_or_else(|| RuntimeError::NoSuchContainer(id.to_owned()))
    }

    async fn logs(&self, id: &str, follow: bool) -> Result<OutputStream, RuntimeError> {
        if follow {
            return self.reader(id, true);
        }
        let containers = locked(&self.containers);
        let c = containers
            .get(id)
            .ok_or_else(|| RuntimeError::NoSuchContainer(id.to_owned()))?;
        let all: Vec<_> = c.history.iter().cloned().map(Ok).collect();
        Ok(futures::stream::iter(all).boxed())
    }
}

/// A worker on the fakes, as `lib.rs` would build one.
pub(crate) fn worker(
    control: &std::sync::Arc<FakeControl>,
    runtime: &std::sync::Arc<FakeRuntime>,
) -> std::sync::Arc<super::Worker> {
    std::sync::Arc::new(super::Worker::new(
        control.clone(),
        runtime.clone(),
        super::WorkerConfig {
            worker_id: WORKER_ID.to_owned(),
            concurrency: 1,
            drain_timeout: Duration::from_secs(10),
            reconcile_interval: Duration::from_secs(30),
            #[cfg(feature = "fault-injection")]
            crash_at: None,
        },
    ))
}

/// Let spawned tasks run until `done` holds; time is paused in these tests, so the
/// sleeps cost nothing and only order the tasks.
pub(crate) async fn until(mut done: impl FnMut() -> bool) {
    for _ in 0..10_000 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition not reached");
}
