//! `LocalControlPlane` against in-memory fakes: one attempt's lease in a fake store, and
//! a fake sink that shares the fake store's record of what happened and when.

use std::collections::BTreeMap;
use std::sync::Mutex;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use tokio::sync::Notify;

use super::*;
use crate::domain::job::{PullPolicy, ResolvedSpec, Resources};
use crate::domain::ports::{
    CancelResult, Claim, IdempotencyKey, Inserted, Leases, LogError, NewRun, Outbox, OutboxBacklog,
    OutboxEntry, Reconciliation, RetryResult, RunFilter, RunRecords, Stream,
};
use crate::domain::run::{Run, RunStatus};
use crate::domain::session::{
    OrphanVerdict, SessionDecision, SessionRenewal, SessionRequest, WorkerSession,
};

/// What the fakes saw, in order, and the attempt's state.
#[derive(Default)]
struct World {
    /// The attempt's current epoch; `None` while nobody holds it (released).
    epoch: Option<i64>,
    last_epoch: i64,
    events: Vec<String>,
    /// Bytes written to the log, each with the epoch current when they were written.
    log: Vec<(i64, Vec<u8>)>,
    /// The sink refuses every write (a full disk).
    sink_fails: bool,
}

#[derive(Default)]
struct Shared {
    world: Mutex<World>,
    /// When set, a lease check answers and then waits here before it returns: the
    /// window between check and write, held open.
    hold_check: Mutex<Option<Arc<Gate>>>,
}

#[derive(Default)]
struct Gate {
    checked: Notify,
    proceed: Notify,
}

impl Shared {
    fn world(&self) -> std::sync::MutexGuard<'_, World> {
        self.world.lock().unwrap()
    }
}

struct FakeStore(Arc<Shared>);

// The parts of the store port the control plane never calls.
mod unused_ports;
struct FakeSink(Arc<Shared>);

fn spec() -> ResolvedSpec {
    ResolvedSpec {
        logs: Default::default(),
        image: "example".into(),
        command: Vec::new(),
        workdir: None,
        user: None,
        env: BTreeMap::new(),
        secret_env: BTreeMap::new(),
        pull: PullPolicy::IfNotPresent,
        resources: Resources::default(),
        timeout: None,
        stop_grace: Duration::from_secs(1),
        network: "none".into(),
        hardening: Default::default(),
    }
}

/// One control plane: every duty is its own.
impl crate::domain::store::Duties for FakeStore {}

#[async_trait]
impl RunRecords for FakeStore {
    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn insert_run(
        &self,
        _run: &NewRun,
        _key: Option<&IdempotencyKey>,
    ) -> Result<Inserted, StoreError> {
        unimplemented!("not used by the control plane")
    }

    async fn get_run(&self, _id: RunId) -> Result<Option<Run>, StoreError> {
        unimplemented!("not used by the control plane")
    }

    async fn list_runs(&self, _filter: &RunFilter) -> Result<Vec<Run>, StoreError> {
        unimplemented!("not used by the control plane")
    }

    async fn cancel(&self, _id: RunId, _now: DateTime<Utc>) -> Result<CancelResult, StoreError> {
        unimplemented!("not used by the control plane")
    }

    async fn retry(&self, _id: RunId, _now: DateTime<Utc>) -> Result<RetryResult, StoreError> {
        unimplemented!("not used by the control plane")
    }
}

#[async_trait]
impl Outbox for FakeStore {
    async fn pending_outbox(
        &self,
        _limit: u32,
        _now: DateTime<Utc>,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        unimplemented!("not used by the control plane")
    }

    async fn mark_outbox_sent(&self, _ids: &[i64], _now: DateTime<Utc>) -> Result<(), StoreError> {
        unimplemented!("not used by the control plane")
    }

    async fn mark_outbox_failed(&self, _id: i64, _error: &str) -> Result<(), StoreError> {
        unimplemented!("not used by the control plane")
    }

    async fn outbox_backlog(&self, _now: DateTime<Utc>) -> Result<OutboxBacklog, StoreError> {
        unimplemented!("not used by the control plane")
    }

    async fn requeue_unclaimed(&self) -> Result<u64, StoreError> {
        unimplemented!("not used by the control plane")
    }

    async fn republish_unclaimed(
        &self,
        _sent_before: DateTime<Utc>,
        _now: DateTime<Utc>,
    ) -> Result<Vec<RunId>, StoreError> {
        unimplemented!("not used by the control plane")
    }
}

#[async_trait]
impl Leases for FakeStore {
    async fn claim(
        &self,
        message: RunMessage,
        _worker_id: &str,
        lease_ttl: Duration,
        _now: DateTime<Utc>,
    ) -> Result<ClaimResult, StoreError> {
        let mut w = self.0.world();
        if w.epoch.is_some() {
            return Ok(ClaimResult::NotClaimable {
                status: RunStatus::Running,
                attempt: message.attempt,
            });
        }
        w.last_epoch += 1;
        let epoch = w.last_epoch;
        w.epoch = Some(epoch);
        w.events.push(format!("claim {epoch}"));
        Ok(ClaimResult::Claimed(Box::new(Claim {
            lease: Lease {
                run_id: message.run_id,
                attempt: message.attempt,
                epoch,
            },
            job: "job".into(),
            spec: spec(),
            lease_ttl,
            secrets: Default::default(),
        })))
    }

    async fn mark_started(
        &self,
        _lease: Lease,
        _container_id: &str,
        _lease_ttl: Duration,
        _now: DateTime<Utc>,
    ) -> Result<LeaseStatus, StoreError> {
        unimplemented!("not used by these tests")
    }

    async fn renew_leases(
        &self,
        _leases: &[Lease],
        _lease_ttl: Duration,
        _now: DateTime<Utc>,
    ) -> Result<Vec<LeaseStatus>, StoreError> {
        unimplemented!("not used by these tests")
    }

    async fn finish(
        &self,
        lease: Lease,
        _outcome: &Outcome,
        _undelivered: u64,
        _usage: Option<crate::domain::run::ResourceUsage>,
        _now: DateTime<Utc>,
    ) -> Result<LeaseStatus, StoreError> {
        let mut w = self.0.world();
        w.events.push(format!("finish {}", lease.epoch));
        Ok(match w.epoch == Some(lease.epoch) {
            true => LeaseStatus::Held { cancel: false },
            false => LeaseStatus::Lost,
        })
    }

    async fn lease_is_current(&self, lease: Lease) -> Result<bool, StoreError> {
        let current = self.0.world().epoch == Some(lease.epoch);
        let gate = self.0.hold_check.lock().unwrap().take();
        if let Some(gate) = gate {
            gate.checked.notify_one();
            gate.proceed.notified().await;
        }
        Ok(current)
    }

    async fn add_log_dropped(&self, lease: Lease, bytes: u64) -> Result<(), StoreError> {
        self.0
            .world()
            .events
            .push(format!("sink dropped {bytes} under {}", lease.epoch));
        Ok(())
    }

    async fn record_undelivered(&self, lease: Lease, bytes: u64) -> Result<(), StoreError> {
        self.0
            .world()
            .events
            .push(format!("undelivered {bytes} under {}", lease.epoch));
        Ok(())
    }

    async fn expire_leases(&self, _now: DateTime<Utc>) -> Result<Vec<RunId>, StoreError> {
        Ok(Vec::new())
    }

    async fn release(&self, lease: Lease, _now: DateTime<Utc>) -> Result<LeaseStatus, StoreError> {
        let mut w = self.0.world();
        if w.epoch != Some(lease.epoch) {
            return Ok(LeaseStatus::Lost);
        }
        w.epoch = None;
        w.events.push(format!("release {}", lease.epoch));
        Ok(LeaseStatus::Held { cancel: false })
    }
}

/// The control plane never touches schedules.
#[async_trait]
impl Reconciliation for FakeStore {
    async fn held_attempts(&self, _worker_id: &str) -> Result<Vec<HeldAttempt>, StoreError> {
        unimplemented!("not used by these tests")
    }

    async fn adopt(
        &self,
        _run_id: RunId,
        _attempt: u32,
        _worker_id: &str,
        _lease_ttl: Duration,
        _now: DateTime<Utc>,
    ) -> Result<AdoptResult, StoreError> {
        unimplemented!("not used by these tests")
    }

    async fn open_session(
        &self,
        _request: &SessionRequest,
        _ttl: Duration,
        _now: DateTime<Utc>,
    ) -> Result<SessionDecision, StoreError> {
        Ok(SessionDecision::Open { previous: None })
    }

    async fn renew_session(
        &self,
        _worker_id: &str,
        _instance: &str,
        _ttl: Duration,
        _now: DateTime<Utc>,
    ) -> Result<SessionRenewal, StoreError> {
        Ok(SessionRenewal::Renewed)
    }

    async fn end_session(
        &self,
        _worker_id: &str,
        _instance: &str,
        _now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        Ok(())
    }

    async fn session(&self, _worker_id: &str) -> Result<Option<WorkerSession>, StoreError> {
        Ok(None)
    }

    async fn orphan_verdict(
        &self,
        _run_id: RunId,
        _attempt: u32,
        _worker_id: &str,
        _now: DateTime<Utc>,
    ) -> Result<OrphanVerdict, StoreError> {
        Ok(OrphanVerdict::Keep)
    }
}

#[async_trait]
impl LogSink for FakeSink {
    async fn append(
        &self,
        _run_id: RunId,
        _attempt: u32,
        _offset: u64,
        chunks: &[OutputChunk],
    ) -> Result<u64, LogError> {
        let mut w = self.0.world();
        if w.sink_fails {
            w.events.push("append refused".into());
            return Err(LogError::Io("fake: disk full".into()));
        }
        let epoch = w.epoch.unwrap_or(0);
        for c in chunks {
            w.log.push((epoch, c.bytes.to_vec()));
        }
        w.events.push("append".into());
        Ok(w.log.iter().map(|(_, b)| b.len() as u64).sum())
    }

    async fn sync(&self, _run_id: RunId, _attempt: u32) -> Result<(), LogError> {
        self.0.world().events.push("sync".into());
        Ok(())
    }

    async fn delete_run(&self, _run_id: RunId, _attempts: u32) -> Result<bool, LogError> {
        Ok(false)
    }

    async fn len(&self, _run_id: RunId, _attempt: u32) -> Result<u64, LogError> {
        Ok(self.0.world().log.iter().map(|(_, b)| b.len() as u64).sum())
    }

    async fn read(
        &self,
        _run_id: RunId,
        _attempt: u32,
        _offset: u64,
        _max: usize,
    ) -> Result<Bytes, LogError> {
        unimplemented!("not used by the control plane")
    }
}

fn control() -> (LocalControlPlane, Arc<Shared>) {
    let shared = Arc::new(Shared::default());
    let control = LocalControlPlane::new(
        Arc::new(FakeStore(shared.clone())),
        Arc::new(FakeSink(shared.clone())),
        RunEvents::new(),
        Duration::from_secs(30),
        Arc::new(crate::secrets::HostSecrets::new(BTreeMap::new())),
    );
    (control, shared)
}

fn chunk(bytes: &'static [u8]) -> Vec<OutputChunk> {
    vec![OutputChunk {
        stream: Stream::Stdout,
        bytes: Bytes::from_static(bytes),
    }]
}

async fn claimed(control: &LocalControlPlane, message: RunMessage, worker: &str) -> Lease {
    match control.claim(message, worker).await.unwrap() {
        ClaimResult::Claimed(claim) => claim.lease,
        other => panic!("not claimed: {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_takeover_cannot_land_between_the_lease_check_and_the_write() {
    let (control, shared) = control();
    let message = RunMessage {
        run_id: RunId::new(),
        attempt: 1,
    };
    let stale = claimed(&control, message, "w1").await;

    // The old holder's write passes its lease check and is held right there.
    let gate = Arc::new(Gate::default());
    *shared.hold_check.lock().unwrap() = Some(gate.clone());
    let writer = tokio::spawn({
        let control = control.clone();
        async move { control.append_log(stale, 0, 0, &chunk(b"stale ")).await }
    });
    gate.checked.notified().await;

    // Meanwhile the attempt is given back and claimed by another worker.
    let mut takeover = tokio::spawn({
        let control = control.clone();
        async move {
            control.release(stale).await.unwrap();
            claimed(&control, message, "w2").await
        }
    });
    // Paused time moves on only once every task is stuck: the takeover either finished
    // or waits for the writer.
    let early = tokio::time::timeout(Duration::from_secs(1), &mut takeover).await;
    let finished_early = early.is_ok();
    gate.proceed.notify_one();
    let written = writer.await.unwrap();
    let fresh = match early {
        Ok(fresh) => fresh.unwrap(),
        Err(_) => takeover.await.unwrap(),
    };
    assert!(!finished_early, "the takeover went through mid-write");
    assert!(
        written.is_ok(),
        "checked and written under its lease: {written:?}"
    );

    // From now on the old holder's bytes are refused; the new holder's go in.
    let refused = control.append_log(stale, 6, 0, &chunk(b"late ")).await;
    assert!(
        matches!(refused, Err(ControlError::Rejected(_))),
        "{refused:?}"
    );
    control
        .append_log(fresh, 6, 0, &chunk(b"fresh"))
        .await
        .unwrap();

    let w = shared.world();
    assert!(fresh.epoch > stale.epoch);
    // Every byte went in under the epoch of the lease that wrote it.
    assert_eq!(
        w.log,
        vec![
            (stale.epoch, b"stale ".to_vec()),
            (fresh.epoch, b"fresh".to_vec())
        ]
    );
}

#[tokio::test]
async fn finish_syncs_the_log_once_before_the_final_state_is_stored() {
    let (control, shared) = control();
    let message = RunMessage {
        run_id: RunId::new(),
        attempt: 1,
    };
    let lease = claimed(&control, message, "w1").await;
    control
        .append_log(lease, 0, 0, &chunk(b"one "))
        .await
        .unwrap();
    control
        .append_log(lease, 4, 0, &chunk(b"two"))
        .await
        .unwrap();
    let status = control
        .finish(lease, &Outcome::Exited { code: 0 }, 0, None)
        .await
        .unwrap();
    assert_eq!(status, LeaseStatus::Held { cancel: false });
    let events = shared.world().events.clone();
    assert_eq!(
        events,
        ["claim 1", "append", "append", "sync", "finish 1"],
        "synced once per attempt, not per write, and before the store's finish"
    );
}

/// The worker's count of output it could not deliver is on record before the batch that
/// follows the hole is written, whatever the sink then does: a log never holds bytes
/// that followed a hole the store does not know of.
#[tokio::test]
async fn undelivered_output_is_recorded_before_the_write_that_follows_it() {
    let (control, shared) = control();
    let message = RunMessage {
        run_id: RunId::new(),
        attempt: 1,
    };
    let lease = claimed(&control, message, "w1").await;
    control
        .append_log(lease, 0, 0, &chunk(b"aaa"))
        .await
        .unwrap();
    control
        .append_log(lease, 3, 3, &chunk(b"ccc"))
        .await
        .unwrap();
    shared.world().sink_fails = true;
    let refused = control.append_log(lease, 6, 5, &chunk(b"eee")).await;
    assert!(
        matches!(refused, Err(ControlError::Rejected(_))),
        "{refused:?}"
    );
    let events = shared.world().events.clone();
    assert_eq!(
        events,
        [
            "claim 1",
            "append",
            "undelivered 3 under 1",
            "append",
            "undelivered 5 under 1",
            "append refused",
            "sink dropped 3 under 1",
        ],
    );
}
