//! In-memory fakes of the ports the worker uses, for its unit tests: a control plane
//! with a log sink that behaves like the file sink (idempotent by offset, refuses gaps),
//! and a container engine whose containers run until a test (or `stop`) ends them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::watch;

use crate::domain::job::{PullPolicy, ResolvedSpec, Resources};
use crate::domain::ports::{
    Adoption, Claim, ClaimResult, ControlError, ControlPlane, DroppedOutput, HeldAttempt, Lease,
    LeaseStatus, OutputChunk, OutputPosition, RunMessage, SessionGrant, Stream,
};
use crate::domain::run::{Outcome, ResourceUsage, RunId};
use crate::domain::session::{OrphanVerdict, SessionRenewal, SessionRequest};

mod runtime;
pub(crate) use runtime::{Call, FakeRuntime};

pub(super) fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
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
            logs: Default::default(),
            image: "tasuki-example:latest".to_owned(),
            command: vec![],
            workdir: None,
            user: None,
            env: BTreeMap::new(),
            secret_env: BTreeMap::new(),
            pull: PullPolicy::Never,
            resources: Resources::default(),
            timeout,
            stop_grace: Duration::from_secs(2),
            network: "none".to_owned(),
            hardening: Default::default(),
        },
        lease_ttl: Duration::from_secs(3),
        secrets: Default::default(),
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
    pub usage: Option<ResourceUsage>,
}

pub(crate) struct FakeControl {
    heartbeat: Mutex<LeaseStatus>,
    /// Each heartbeat call: when it came and the leases it carried.
    heartbeat_calls: Mutex<Vec<(tokio::time::Instant, Vec<Lease>)>>,
    /// Runs whose leases heartbeats answer `Lost`, whatever `heartbeat` says.
    heartbeat_lost: Mutex<HashSet<RunId>>,
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
    /// Answers to `open_session`, in order; granted once they run out.
    session_answers: Mutex<Vec<Result<SessionGrant, ControlError>>>,
    renewal: Mutex<SessionRenewal>,
    renewals: Mutex<u32>,
    sessions_ended: Mutex<u32>,
    /// What `claim` answers: unknown run unless a test says otherwise.
    claim_answer: Mutex<ClaimAnswer>,
    /// While set, each `claim` waits for a permit of it first.
    claim_hold: Mutex<Option<std::sync::Arc<tokio::sync::Semaphore>>>,
    /// Claims begun so far, for tests to wait on.
    claims: watch::Sender<u32>,
    /// While set, each `append_log` waits for a permit of it first (after counting).
    append_hold: Mutex<Option<std::sync::Arc<tokio::sync::Semaphore>>>,
}

/// How the fake control plane answers `claim`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClaimAnswer {
    UnknownRun,
    /// Claimed already: not claimable.
    NotClaimable,
    Unavailable,
}

impl Default for FakeControl {
    fn default() -> Self {
        Self {
            heartbeat: Mutex::new(LeaseStatus::Held { cancel: false }),
            heartbeat_calls: Mutex::new(Vec::new()),
            heartbeat_lost: Mutex::new(HashSet::new()),
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
            session_answers: Mutex::new(Vec::new()),
            renewal: Mutex::new(SessionRenewal::Renewed),
            renewals: Mutex::new(0),
            sessions_ended: Mutex::new(0),
            claim_answer: Mutex::new(ClaimAnswer::UnknownRun),
            claim_hold: Mutex::new(None),
            append_hold: Mutex::new(None),
            claims: watch::channel(0).0,
        }
    }
}

impl FakeControl {
    pub fn set_claim_answer(&self, answer: ClaimAnswer) {
        *locked(&self.claim_answer) = answer;
    }
    /// Every later `claim` waits for a permit of `hold` (held, never returned).
    pub fn hold_claims(&self, hold: std::sync::Arc<tokio::sync::Semaphore>) {
        *locked(&self.claim_hold) = Some(hold);
    }
    pub fn claims(&self) -> u32 {
        *self.claims.borrow()
    }
    pub fn set_heartbeat(&self, status: LeaseStatus) {
        *locked(&self.heartbeat) = status;
    }
    /// Heartbeat calls so far (each may carry many leases).
    pub fn heartbeats(&self) -> usize {
        locked(&self.heartbeat_calls).len()
    }
    pub fn heartbeat_calls(&self) -> Vec<(tokio::time::Instant, Vec<Lease>)> {
        locked(&self.heartbeat_calls).clone()
    }
    pub fn lose_lease_of(&self, run_id: RunId) {
        locked(&self.heartbeat_lost).insert(run_id);
    }
    /// Every later `append_log` waits for a permit of `hold` (held, never returned).
    pub fn hold_appends(&self, hold: std::sync::Arc<tokio::sync::Semaphore>) {
        *locked(&self.append_hold) = Some(hold);
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
    pub fn set_session_answers(&self, answers: Vec<Result<SessionGrant, ControlError>>) {
        *locked(&self.session_answers) = answers;
    }
    pub fn set_renewal(&self, renewal: SessionRenewal) {
        *locked(&self.renewal) = renewal;
    }
    pub fn renewals(&self) -> u32 {
        *locked(&self.renewals)
    }
    pub fn sessions_ended(&self) -> u32 {
        *locked(&self.sessions_ended)
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
        self.claims.send_modify(|n| *n += 1);
        let hold = locked(&self.claim_hold).clone();
        if let Some(hold) = hold {
            hold.acquire().await.expect("hold is never closed").forget();
        }
        match *locked(&self.claim_answer) {
            ClaimAnswer::UnknownRun => Ok(ClaimResult::UnknownRun),
            ClaimAnswer::NotClaimable => Ok(ClaimResult::NotClaimable {
                status: crate::domain::run::RunStatus::Running,
                attempt: 1,
            }),
            ClaimAnswer::Unavailable => Err(ControlError::Unavailable("down".into())),
        }
    }

    async fn started(
        &self,
        _lease: Lease,
        _container_id: &str,
    ) -> Result<LeaseStatus, ControlError> {
        Ok(*locked(&self.heartbeat))
    }

    async fn heartbeat(&self, leases: &[Lease]) -> Result<Vec<LeaseStatus>, ControlError> {
        locked(&self.heartbeat_calls).push((tokio::time::Instant::now(), leases.to_vec()));
        let held = *locked(&self.heartbeat);
        let lost = locked(&self.heartbeat_lost);
        Ok(leases
            .iter()
            .map(|l| {
                if lost.contains(&l.run_id) {
                    LeaseStatus::Lost
                } else {
                    held
                }
            })
            .collect())
    }

    async fn append_log(
        &self,
        _lease: Lease,
        offset: u64,
        undelivered_before: u64,
        chunks: &[OutputChunk],
    ) -> Result<u64, ControlError> {
        self.appends.send_modify(|c| *c += 1);
        let hold = locked(&self.append_hold).clone();
        if let Some(hold) = hold {
            hold.acquire().await.expect("hold is never closed").forget();
        }
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
        usage: Option<ResourceUsage>,
    ) -> Result<LeaseStatus, ControlError> {
        self.record_undelivered(undelivered);
        locked(&self.finished).push(Finished {
            lease,
            outcome: outcome.clone(),
            dropped: undelivered,
            usage,
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
        let mut answers = locked(&self.session_answers);
        if answers.is_empty() {
            return Ok(SessionGrant::Granted {
                ttl: Duration::from_secs(3),
            });
        }
        answers.remove(0)
    }

    async fn renew_session(&self, _: &str, _: &str) -> Result<SessionRenewal, ControlError> {
        *locked(&self.renewals) += 1;
        Ok(*locked(&self.renewal))
    }

    async fn end_session(&self, _: &str, _: &str) -> Result<(), ControlError> {
        *locked(&self.sessions_ended) += 1;
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
