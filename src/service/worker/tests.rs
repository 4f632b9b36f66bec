//! The worker against fakes of its ports: one attempt's supervision (timeout, cancel,
//! takeover) and adoption of containers an earlier life of the worker left.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::task::TaskTracker;

use super::fakes::{
    AppendMode, Call, FakeControl, FakeRuntime, STOPPED_CODE, WORKER_ID, claim, until, worker,
};
use crate::domain::ports::LeaseStatus;
use crate::domain::run::Outcome;
use crate::domain::secret::{RegistryCredentials, Secret};

fn fakes() -> (Arc<FakeControl>, Arc<FakeRuntime>) {
    (
        Arc::new(FakeControl::default()),
        Arc::new(FakeRuntime::default()),
    )
}

fn created(runtime: &FakeRuntime) -> Option<String> {
    runtime.calls().into_iter().find_map(|c| match c {
        Call::Create(id) => Some(id),
        _ => None,
    })
}

fn started(runtime: &FakeRuntime) -> bool {
    runtime.calls().iter().any(|c| matches!(c, Call::Start(_)))
}

#[tokio::test(start_paused = true)]
async fn timeout_stops_the_container_and_reports_timed_out() {
    let (control, runtime) = fakes();
    let w = worker(&control, &runtime);
    let t0 = tokio::time::Instant::now();
    w.execute(claim(Some(Duration::from_secs(30))), None).await;
    let id = created(&runtime).expect("a container was created");
    let calls = runtime.calls();
    let stop = calls.iter().position(|c| *c == Call::Stop(id.clone()));
    let remove = calls.iter().position(|c| *c == Call::Remove(id.clone()));
    assert!(stop.is_some(), "container not stopped: {calls:?}");
    assert!(
        remove > stop,
        "container not removed after the stop: {calls:?}"
    );
    // The paused clock only moves to the next timer: the stop came at the timeout.
    assert!(t0.elapsed() >= Duration::from_secs(30));
    let finished = control.finished();
    assert_eq!(finished.len(), 1, "{finished:?}");
    assert_eq!(
        finished[0].outcome,
        Outcome::TimedOut {
            after: Duration::from_secs(30),
            code: Some(STOPPED_CODE)
        }
    );
}

#[tokio::test(start_paused = true)]
async fn cancel_from_a_heartbeat_stops_the_container_and_reports_cancelled() {
    let (control, runtime) = fakes();
    let w = worker(&control, &runtime);
    let task = tokio::spawn({
        let w = w.clone();
        async move { w.execute(claim(None), None).await }
    });
    until(|| started(&runtime)).await;
    let id = created(&runtime).expect("a container was created");
    runtime.emit(&id, b"working\n");
    until(|| control.log() == b"working\n").await;
    assert!(!runtime.touched(&id), "stopped before any cancel");
    control.set_heartbeat(LeaseStatus::Held { cancel: true });
    task.await.expect("attempt task");
    assert!(runtime.calls().contains(&Call::Stop(id.clone())));
    assert!(!runtime.exists(&id), "container not removed");
    let finished = control.finished();
    assert_eq!(finished.len(), 1, "{finished:?}");
    assert_eq!(
        finished[0].outcome,
        Outcome::Cancelled {
            code: Some(STOPPED_CODE)
        }
    );
    assert_eq!(finished[0].dropped, 0);
}

#[tokio::test(start_paused = true)]
async fn lost_lease_reports_nothing_and_removes_the_container() {
    let (control, runtime) = fakes();
    let w = worker(&control, &runtime);
    let task = tokio::spawn({
        let w = w.clone();
        async move { w.execute(claim(None), None).await }
    });
    until(|| started(&runtime)).await;
    let id = created(&runtime).expect("a container was created");
    control.set_heartbeat(LeaseStatus::Lost);
    task.await.expect("attempt task");
    assert!(control.finished().is_empty(), "{:?}", control.finished());
    assert!(runtime.calls().contains(&Call::Stop(id.clone())));
    assert!(runtime.calls().contains(&Call::Remove(id.clone())));
    assert!(!runtime.exists(&id));
}

#[tokio::test(start_paused = true)]
async fn exit_code_is_reported_and_output_stored() {
    let (control, runtime) = fakes();
    let w = worker(&control, &runtime);
    let task = tokio::spawn({
        let w = w.clone();
        async move { w.execute(claim(None), None).await }
    });
    until(|| started(&runtime)).await;
    let id = created(&runtime).expect("a container was created");
    runtime.emit(&id, b"one\n");
    runtime.emit(&id, b"two\n");
    runtime.exit(&id, 3);
    task.await.expect("attempt task");
    assert_eq!(control.log(), b"one\ntwo\n");
    let finished = control.finished();
    assert_eq!(finished.len(), 1);
    assert_eq!(finished[0].outcome, Outcome::Exited { code: 3 });
    assert!(!runtime.exists(&id));
}

/// A create finds the attempt's name taken by a running container of an earlier life
/// of this worker, and the control plane cannot say whether the attempt is still ours.
/// Ending the attempt (`docker_error`) would let a retry start next to that container.
#[tokio::test(start_paused = true)]
async fn adopt_failing_settles_nothing_and_reconciliation_adopts_later() {
    let (control, runtime) = fakes();
    let w = worker(&control, &runtime);
    let id = runtime.put_running(&claim(None), WORKER_ID, chrono::Utc::now());
    runtime.emit(&id, b"before the restart\n");
    control.set_adopt_fails(true);

    w.execute(claim(None), None).await;
    assert!(control.finished().is_empty(), "{:?}", control.finished());
    assert!(!runtime.touched(&id), "{:?}", runtime.calls());
    assert!(runtime.exists(&id));
    assert!(control.adopts() > 1, "adopt was not retried");

    // The control plane is back: the next reconciliation adopts the container.
    control.set_adopt_fails(false);
    control.set_adoptable(Some(claim(None)));
    let running = TaskTracker::new();
    w.reconcile(&running).await;
    assert_eq!(running.len(), 1, "container not adopted");
    until(|| control.log() == b"before the restart\n").await;
    runtime.emit(&id, b"after\n");
    runtime.exit(&id, 0);
    running.close();
    running.wait().await;
    let finished = control.finished();
    assert_eq!(finished.len(), 1, "{finished:?}");
    assert_eq!(finished[0].outcome, Outcome::Exited { code: 0 });
    assert_eq!(control.log(), b"before the restart\nafter\n");
    assert!(!runtime.exists(&id));
    assert!(!runtime.calls().contains(&Call::Stop(id.clone())));
}

/// While an adopted container runs, a batch is refused by the log sink. The final
/// read of the engine's log (from the start) must skip the refused bytes too, not
/// store again the bytes that followed them.
#[tokio::test(start_paused = true)]
async fn adopted_container_with_a_dropped_batch_stores_no_duplicate() {
    let (control, runtime) = fakes();
    let w = worker(&control, &runtime);
    let id = runtime.put_running(&claim(None), WORKER_ID, chrono::Utc::now());
    runtime.emit(&id, b"aaa");
    control.set_log(b"aaa");
    control.set_adoptable(Some(claim(None)));
    let running = TaskTracker::new();
    w.reconcile(&running).await;
    assert_eq!(running.len(), 1, "container not adopted");

    control.set_append_mode(AppendMode::SinkFault);
    runtime.emit(&id, b"bbb");
    control.appended(1).await;
    control.set_append_mode(AppendMode::Store);
    runtime.emit(&id, b"ccc");
    control.appended(2).await;
    runtime.exit(&id, 0);
    running.close();
    running.wait().await;

    assert_eq!(control.log(), b"aaaccc");
    assert_eq!(control.sink_dropped(), 3);
    let finished = control.finished();
    assert_eq!(finished.len(), 1, "{finished:?}");
    assert_eq!(finished[0].outcome, Outcome::Exited { code: 0 });
}

#[tokio::test(start_paused = true)]
async fn stale_container_is_stopped_and_removed() {
    let (control, runtime) = fakes();
    let w = worker(&control, &runtime);
    let id = runtime.put_running(&claim(None), WORKER_ID, chrono::Utc::now());
    control.set_adoptable(None);
    let running = TaskTracker::new();
    w.reconcile(&running).await;
    assert!(running.is_empty());
    assert!(runtime.calls().contains(&Call::Stop(id.clone())));
    assert!(!runtime.exists(&id));
    assert!(control.finished().is_empty());
}

#[tokio::test(start_paused = true)]
async fn held_attempts_without_a_container_are_released_or_finished() {
    use crate::domain::ports::HeldAttempt;
    let (control, runtime) = fakes();
    let w = worker(&control, &runtime);
    let unstarted = claim(None).lease;
    let mut vanished = unstarted;
    vanished.attempt = 2;
    control.set_held(vec![
        HeldAttempt {
            lease: unstarted,
            container_id: None,
        },
        HeldAttempt {
            lease: vanished,
            container_id: Some("gone".to_owned()),
        },
    ]);
    let running = TaskTracker::new();
    w.reconcile(&running).await;
    assert_eq!(control.released(), vec![unstarted]);
    let finished = control.finished();
    assert_eq!(finished.len(), 1, "{finished:?}");
    assert_eq!(finished[0].lease, vanished);
    assert!(matches!(finished[0].outcome, Outcome::DockerError { .. }));
}

/// Containers of other worker ids: removed only when the control plane says both the
/// attempt and its worker's session are over; everything else is left exactly as is.
#[tokio::test(start_paused = true)]
async fn orphans_of_vanished_workers_go_only_on_the_control_planes_word() {
    use crate::domain::session::OrphanVerdict;
    let (control, runtime) = fakes();
    let w = worker(&control, &runtime);
    let mut first = claim(None);
    let mut second = claim(None);
    first.lease.attempt = 1;
    second.lease.attempt = 2;
    let orphan = runtime.put_running(&first, "vanished-worker", chrono::Utc::now());
    let alive = runtime.put_running(&second, "live-worker", chrono::Utc::now());
    control.set_orphan(
        first.lease.run_id,
        1,
        "vanished-worker",
        OrphanVerdict::Remove,
    );
    let running = TaskTracker::new();
    w.reconcile(&running).await;
    assert!(runtime.calls().contains(&Call::Stop(orphan.clone())));
    assert!(!runtime.exists(&orphan));
    assert!(!runtime.touched(&alive), "{:?}", runtime.calls());
    assert!(runtime.exists(&alive));
    assert!(control.finished().is_empty());
}

/// A retry's container is created only after the orphaned container of the attempt it
/// replaces is gone from this engine: the two never run side by side here.
#[tokio::test(start_paused = true)]
async fn a_retry_removes_the_orphan_of_the_attempt_it_replaces_before_creating() {
    use crate::domain::session::OrphanVerdict;
    let (control, runtime) = fakes();
    let w = worker(&control, &runtime);
    let earlier = claim(None);
    let orphan = runtime.put_running(&earlier, "vanished-worker", chrono::Utc::now());
    control.set_orphan(
        earlier.lease.run_id,
        1,
        "vanished-worker",
        OrphanVerdict::Remove,
    );
    let mut retry = claim(None);
    retry.lease.attempt = 2;
    let task = tokio::spawn({
        let w = w.clone();
        async move { w.execute(retry, None).await }
    });
    until(|| started(&runtime)).await;
    let calls = runtime.calls();
    let removed = calls
        .iter()
        .position(|c| *c == Call::Remove(orphan.clone()));
    let create = calls.iter().position(|c| matches!(c, Call::Create(_)));
    assert!(removed.is_some(), "orphan not removed: {calls:?}");
    assert!(
        removed < create,
        "created before the orphan was gone: {calls:?}"
    );
    let id = created(&runtime).expect("a container was created");
    runtime.exit(&id, 0);
    task.await.expect("attempt task");
    assert_eq!(control.finished().len(), 1);
}

/// The worker's first life (running `task` on container `id`) dies without reporting:
/// its connections first, then the rest of it. A second life adopts the container,
/// which writes `last` and exits 0.
async fn die_then_adopt_and_finish(
    control: &Arc<FakeControl>,
    runtime: &Arc<FakeRuntime>,
    id: &str,
    task: tokio::task::JoinHandle<()>,
    last: &'static [u8],
) {
    runtime.sever(id);
    task.abort();
    let _ = task.await;
    assert!(control.finished().is_empty(), "{:?}", control.finished());

    let second = worker(control, runtime);
    control.set_adoptable(Some(claim(None)));
    let running = TaskTracker::new();
    second.reconcile(&running).await;
    assert_eq!(running.len(), 1, "container not adopted");
    runtime.emit(id, last);
    runtime.exit(id, 0);
    running.close();
    running.wait().await;
}

/// A first life of the worker drops a batch (the control plane unreachable), stores the
/// next one after the hole, and crashes. The next life adopts the container and reads
/// its output from the start: it must resume after the hole, storing nothing twice,
/// and the dropped bytes are counted once.
#[tokio::test(start_paused = true)]
async fn a_restarted_worker_resumes_after_a_hole_its_earlier_life_left() {
    let (control, runtime) = fakes();
    let first = worker(&control, &runtime);
    let task = tokio::spawn({
        let w = first.clone();
        async move { w.execute(claim(None), None).await }
    });
    until(|| started(&runtime)).await;
    let id = created(&runtime).expect("a container was created");
    runtime.emit(&id, b"aaa");
    until(|| control.log() == b"aaa").await;
    control.set_append_mode(AppendMode::Unavailable);
    let before = control.append_calls();
    runtime.emit(&id, b"bbb");
    control.appended(before + 1).await;
    // Past every retry (the paused clock jumps from timer to timer).
    tokio::time::sleep(Duration::from_secs(120)).await;
    control.set_append_mode(AppendMode::Store);
    runtime.emit(&id, b"ccc");
    until(|| control.log() == b"aaaccc").await;
    die_then_adopt_and_finish(&control, &runtime, &id, task, b"ddd").await;

    assert_eq!(control.log(), b"aaacccddd");
    let finished = control.finished();
    assert_eq!(finished.len(), 1, "{finished:?}");
    assert_eq!(finished[0].outcome, Outcome::Exited { code: 0 });
    // The first life told the control plane of the hole with the batch after it; the
    // second reports the same total, not the hole again on top of it.
    assert_eq!(finished[0].dropped, 3, "{finished:?}");
    assert_eq!(control.undelivered(), 3);
    assert_eq!(control.sink_dropped(), 0);
}

/// As above with the hole made by the control plane's log sink: the sink's own count
/// tells the next life of the worker where to resume.
#[tokio::test(start_paused = true)]
async fn a_restarted_worker_resumes_after_a_hole_the_log_sink_left() {
    let (control, runtime) = fakes();
    let first = worker(&control, &runtime);
    let task = tokio::spawn({
        let w = first.clone();
        async move { w.execute(claim(None), None).await }
    });
    until(|| started(&runtime)).await;
    let id = created(&runtime).expect("a container was created");
    runtime.emit(&id, b"aaa");
    until(|| control.log() == b"aaa").await;
    control.set_append_mode(AppendMode::SinkFault);
    runtime.emit(&id, b"bbb");
    until(|| control.sink_dropped() == 3).await;
    control.set_append_mode(AppendMode::Store);
    runtime.emit(&id, b"ccc");
    until(|| control.log() == b"aaaccc").await;
    die_then_adopt_and_finish(&control, &runtime, &id, task, b"ddd").await;

    assert_eq!(control.log(), b"aaacccddd");
    let finished = control.finished();
    assert_eq!(finished.len(), 1, "{finished:?}");
    assert_eq!(finished[0].dropped, 0, "the sink counted its own");
    assert_eq!(control.sink_dropped(), 3);
}

/// A claim's secrets reach the container's environment (beside, not inside, the plain
/// variables) and the pull's login, and nothing the worker prints shows them.
#[tokio::test(start_paused = true)]
async fn a_claims_secrets_go_to_the_container_and_the_pull_only() {
    let (control, runtime) = fakes();
    let w = worker(&control, &runtime);
    let mut c = claim(None);
    c.spec.pull = crate::domain::job::PullPolicy::Always;
    c.spec.env.insert("PLAIN".into(), "x".into());
    c.secrets
        .env
        .insert("DB_PASSWORD".into(), Secret::new("hunter2"));
    c.secrets.registry = Some(RegistryCredentials {
        registry: "reg.example:5000".into(),
        username: "ci".into(),
        password: Secret::new("s3cr3t-pw"),
    });
    let task = tokio::spawn({
        let w = w.clone();
        async move { w.execute(c, None).await }
    });
    until(|| started(&runtime)).await;
    let id = created(&runtime).expect("a container was created");
    runtime.exit(&id, 0);
    task.await.unwrap();

    let pulls = runtime.pulls();
    assert_eq!(pulls.len(), 1, "{pulls:?}");
    let login = pulls[0].1.as_ref().expect("the pull got the login");
    assert_eq!(
        (login.username.as_str(), login.password.expose()),
        ("ci", "s3cr3t-pw")
    );
    let spec = &runtime.created_specs()[0];
    assert_eq!(spec.secret_env["DB_PASSWORD"].expose(), "hunter2");
    assert!(!spec.env.contains_key("DB_PASSWORD"), "{:?}", spec.env);
    assert_eq!(spec.env["PLAIN"], "x");
    let printed = format!("{spec:?} {pulls:?}");
    assert!(
        !printed.contains("hunter2") && !printed.contains("s3cr3t-pw"),
        "{printed}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_refused_login_fails_the_attempt_as_unauthorized() {
    let (control, runtime) = fakes();
    runtime.refuse_logins();
    let w = worker(&control, &runtime);
    w.execute(claim(None), None).await;
    assert_eq!(created(&runtime), None);
    let finished = control.finished();
    assert_eq!(finished.len(), 1, "{finished:?}");
    let outcome = &finished[0].outcome;
    assert!(
        matches!(
            outcome,
            Outcome::ImagePullFailed {
                unauthorized: true,
                ..
            }
        ),
        "{outcome:?}"
    );
    assert!(
        outcome
            .reason()
            .unwrap()
            .starts_with("image_pull_failed: unauthorized: tasuki-example:latest: "),
        "{outcome:?}"
    );
}

/// The container gets the spec's hardening; a spec stored before tasuki recorded limits
/// still runs with a memory and a pids limit.
#[test]
fn a_container_carries_the_specs_hardening_and_never_goes_without_limits() {
    use crate::domain::job::{
        BindMount, Capability, DEFAULT_MEMORY, DEFAULT_PIDS_LIMIT, Hardening,
    };
    let old = super::attempt::container_spec(&claim(None), WORKER_ID);
    assert_eq!(old.memory_bytes, DEFAULT_MEMORY);
    assert_eq!(old.pids_limit, DEFAULT_PIDS_LIMIT);
    assert!(old.capabilities.is_empty() && old.mounts.is_empty() && !old.read_only_root);

    let mut c = claim(None);
    c.spec.resources.memory_bytes = Some(64 << 20);
    let mount = BindMount {
        source: "/srv/data".into(),
        target: "/data".into(),
        read_only: true,
    };
    c.spec.hardening = Hardening {
        capabilities: vec![Capability::parse("NET_RAW").unwrap()],
        pids_limit: Some(32),
        read_only: true,
        mounts: vec![mount.clone()],
    };
    let spec = super::attempt::container_spec(&c, WORKER_ID);
    assert_eq!(spec.memory_bytes, 64 << 20);
    assert_eq!(spec.pids_limit, 32);
    assert_eq!(spec.capabilities, c.spec.hardening.capabilities);
    assert!(spec.read_only_root);
    assert_eq!(spec.mounts, [mount]);
}
