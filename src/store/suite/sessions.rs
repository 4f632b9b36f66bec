//! Worker sessions: who holds a worker id, heartbeats, goodbyes, and when another
//! process may remove a container as an orphan.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::{claimed, new_run};
use crate::domain::ports::RunStore;
use crate::domain::run::{Outcome, RunId};
use crate::domain::session::{
    OrphanVerdict, SessionDecision, SessionRenewal, SessionRequest, WorkerSession,
};

/// Now, to the millisecond the store keeps.
fn now_ms() -> DateTime<Utc> {
    DateTime::from_timestamp_millis(Utc::now().timestamp_millis()).unwrap_or_default()
}

fn secs(n: i64) -> chrono::Duration {
    chrono::Duration::seconds(n)
}

const SESSION_TTL: Duration = Duration::from_secs(30);

/// `lock`: the requester found the host lock last held by instance `a` (the first
/// process of every test), so that process is dead.
fn request(worker_id: &str, instance: &str, host: &str, lock: bool) -> SessionRequest {
    SessionRequest {
        worker_id: worker_id.into(),
        instance: instance.into(),
        host: host.into(),
        pid: 42,
        lock_released_by: lock.then(|| "a".to_owned()),
        build: Some(format!("0.1.0 ({instance})")),
    }
}

async fn stored_session(store: &dyn RunStore, worker_id: &str) -> WorkerSession {
    match store.session(worker_id).await.unwrap() {
        Some(s) => s,
        None => panic!("no session for {worker_id}"),
    }
}

pub(crate) async fn a_session_is_opened_refused_to_another_host_and_reopened_by_its_own_process(
    store: &dyn RunStore,
) {
    let now = now_ms();
    assert_eq!(store.session("w1").await.unwrap(), None);
    let a = request("w1", "a", "h1", true);
    assert_eq!(
        store.open_session(&a, SESSION_TTL, now).await.unwrap(),
        SessionDecision::Open { previous: None }
    );
    let live = stored_session(store, "w1").await;
    assert_eq!(
        live,
        WorkerSession {
            worker_id: "w1".into(),
            instance: "a".into(),
            host: "h1".into(),
            pid: 42,
            started_at: now,
            expires_at: now + secs(30),
            ended_at: None,
        }
    );
    // Another host's process, even with its own host's lock, is refused while it lives.
    let b = request("w1", "b", "h2", true);
    assert_eq!(
        store
            .open_session(&b, SESSION_TTL, now + secs(10))
            .await
            .unwrap(),
        SessionDecision::Refuse { live: live.clone() }
    );
    assert_eq!(
        stored_session(store, "w1").await,
        live,
        "a refusal changes nothing"
    );
    // The same process asking again (a retried request) keeps its session, pushed on.
    assert_eq!(
        store
            .open_session(&a, SESSION_TTL, now + secs(20))
            .await
            .unwrap(),
        SessionDecision::Reopen
    );
    let kept = stored_session(store, "w1").await;
    assert_eq!(kept.started_at, now);
    assert_eq!(kept.expires_at, now + secs(50));
    // Sessions of other worker ids are their own.
    assert_eq!(
        store
            .open_session(&request("w2", "b", "h2", false), SESSION_TTL, now)
            .await
            .unwrap(),
        SessionDecision::Open { previous: None }
    );
}

pub(crate) async fn a_live_session_is_replaced_from_its_own_host_only_with_the_host_lock(
    store: &dyn RunStore,
) {
    let now = now_ms();
    let a = request("w1", "a", "h1", true);
    store.open_session(&a, SESSION_TTL, now).await.unwrap();
    let crashed = stored_session(store, "w1").await;
    assert!(matches!(
        store
            .open_session(&request("w1", "b", "h1", false), SESSION_TTL, now + secs(5))
            .await
            .unwrap(),
        SessionDecision::Refuse { .. }
    ));
    let b = SessionRequest {
        pid: 43,
        ..request("w1", "b", "h1", true)
    };
    assert_eq!(
        store
            .open_session(&b, SESSION_TTL, now + secs(5))
            .await
            .unwrap(),
        SessionDecision::Open {
            previous: Some(crashed)
        }
    );
    let new = stored_session(store, "w1").await;
    assert_eq!((new.instance.as_str(), new.pid), ("b", 43));
    assert_eq!(new.started_at, now + secs(5));
    assert_eq!(new.expires_at, now + secs(35));
    assert_eq!(new.ended_at, None);
}

pub(crate) async fn an_expired_or_ended_session_gives_the_id_away(store: &dyn RunStore) {
    let now = now_ms();
    store
        .open_session(&request("w1", "a", "h1", false), SESSION_TTL, now)
        .await
        .unwrap();
    let expired = stored_session(store, "w1").await;
    let b = request("w1", "b", "h2", false);
    assert_eq!(
        store
            .open_session(&b, SESSION_TTL, now + secs(30))
            .await
            .unwrap(),
        SessionDecision::Open {
            previous: Some(expired)
        }
    );
    store.end_session("w1", "b", now + secs(31)).await.unwrap();
    let ended = stored_session(store, "w1").await;
    assert_eq!(ended.ended_at, Some(now + secs(31)));
    let c = request("w1", "c", "h3", false);
    assert_eq!(
        store
            .open_session(&c, SESSION_TTL, now + secs(32))
            .await
            .unwrap(),
        SessionDecision::Open {
            previous: Some(ended)
        }
    );
    assert_eq!(stored_session(store, "w1").await.ended_at, None);
}

pub(crate) async fn a_superseded_or_ended_session_is_not_renewed(store: &dyn RunStore) {
    let now = now_ms();
    store
        .open_session(&request("w1", "a", "h1", false), SESSION_TTL, now)
        .await
        .unwrap();
    // Silent past its TTL but not replaced: a slow process, still renewable.
    assert_eq!(
        store
            .renew_session("w1", "a", SESSION_TTL, now + secs(40))
            .await
            .unwrap(),
        SessionRenewal::Renewed
    );
    assert_eq!(stored_session(store, "w1").await.expires_at, now + secs(70));
    // Taken over after it expired again: the old process learns it at its next beat.
    store
        .open_session(
            &request("w1", "b", "h2", false),
            SESSION_TTL,
            now + secs(71),
        )
        .await
        .unwrap();
    assert_eq!(
        store
            .renew_session("w1", "a", SESSION_TTL, now + secs(72))
            .await
            .unwrap(),
        SessionRenewal::Superseded
    );
    // Its goodbye does not end the new owner's session.
    store.end_session("w1", "a", now + secs(72)).await.unwrap();
    let owner = stored_session(store, "w1").await;
    assert_eq!((owner.instance.as_str(), owner.ended_at), ("b", None));
    assert_eq!(owner.expires_at, now + secs(101));
    assert_eq!(
        store
            .renew_session("w1", "b", SESSION_TTL, now + secs(80))
            .await
            .unwrap(),
        SessionRenewal::Renewed
    );
    store.end_session("w1", "b", now + secs(81)).await.unwrap();
    assert_eq!(
        store
            .renew_session("w1", "b", SESSION_TTL, now + secs(82))
            .await
            .unwrap(),
        SessionRenewal::Superseded,
        "an ended session stays ended"
    );
    assert_eq!(
        store
            .renew_session("nobody", "x", SESSION_TTL, now)
            .await
            .unwrap(),
        SessionRenewal::Superseded
    );
}

pub(crate) async fn an_orphan_goes_only_once_its_attempt_and_its_session_are_over(
    store: &dyn RunStore,
) {
    let now = now_ms();
    let run = new_run();
    store.insert_run(&run, None).await.unwrap();
    store
        .open_session(&request("w1", "a", "h1", false), SESSION_TTL, now)
        .await
        .unwrap();
    let claim = claimed(store, &run, 1, Duration::from_secs(3600)).await;
    let verdict = |at: DateTime<Utc>, worker: &'static str| {
        let run_id = run.id;
        async move { store.orphan_verdict(run_id, 1, worker, at).await.unwrap() }
    };
    // Running under w1: kept, even once w1's session is long over.
    assert_eq!(verdict(now, "w1").await, OrphanVerdict::Keep);
    assert_eq!(verdict(now + secs(60), "w1").await, OrphanVerdict::Keep);
    // Not running under another worker id, but that id has no session here: it may be
    // another installation's worker on a shared engine, so its container stays.
    assert_eq!(verdict(now, "w2").await, OrphanVerdict::Keep);
    store
        .finish(claim.lease, &Outcome::Exited { code: 0 }, 0, None, now)
        .await
        .unwrap();
    // The attempt is over but its worker is alive and may still deal with it.
    assert_eq!(verdict(now + secs(10), "w1").await, OrphanVerdict::Keep);
    assert_eq!(verdict(now + secs(30), "w1").await, OrphanVerdict::Remove);
    store.end_session("w1", "a", now + secs(5)).await.unwrap();
    assert_eq!(verdict(now + secs(10), "w1").await, OrphanVerdict::Remove);
    // Runs and attempts this store does not know are never declared orphans.
    assert_eq!(
        store
            .orphan_verdict(RunId::new(), 1, "w1", now + secs(10))
            .await
            .unwrap(),
        OrphanVerdict::Keep
    );
    assert_eq!(
        store
            .orphan_verdict(run.id, 2, "w1", now + secs(10))
            .await
            .unwrap(),
        OrphanVerdict::Keep
    );
}

/// An attempt keeps the build its worker's session named when it was claimed: a later
/// session of the same id on another build (an upgraded worker) changes the attempts
/// it claims from then on, not the earlier ones; a worker that names no build (one
/// from before builds were named) leaves it empty.
pub(crate) async fn an_attempt_keeps_the_build_of_the_worker_that_claimed_it(store: &dyn RunStore) {
    let now = now_ms();
    let build_of = |run: RunId| async move {
        let run = store.get_run(run).await.unwrap().expect("run");
        run.attempts[0].worker_build.clone()
    };
    let old = new_run();
    store.insert_run(&old, None).await.unwrap();
    store
        .open_session(&request("w1", "a", "h1", false), SESSION_TTL, now)
        .await
        .unwrap();
    claimed(store, &old, 1, Duration::from_secs(3600)).await;
    assert_eq!(build_of(old.id).await.as_deref(), Some("0.1.0 (a)"));

    // The same id, upgraded: the process `a` exited, `b` runs another build.
    store.end_session("w1", "a", now).await.unwrap();
    store
        .open_session(&request("w1", "b", "h1", false), SESSION_TTL, now)
        .await
        .unwrap();
    let new = new_run();
    store.insert_run(&new, None).await.unwrap();
    claimed(store, &new, 1, Duration::from_secs(3600)).await;
    assert_eq!(build_of(new.id).await.as_deref(), Some("0.1.0 (b)"));
    assert_eq!(build_of(old.id).await.as_deref(), Some("0.1.0 (a)"));

    // A worker that does not name its build.
    store.end_session("w1", "b", now).await.unwrap();
    let unnamed = SessionRequest {
        build: None,
        ..request("w1", "c", "h1", false)
    };
    store
        .open_session(&unnamed, SESSION_TTL, now)
        .await
        .unwrap();
    let plain = new_run();
    store.insert_run(&plain, None).await.unwrap();
    claimed(store, &plain, 1, Duration::from_secs(3600)).await;
    assert_eq!(build_of(plain.id).await, None);
}
