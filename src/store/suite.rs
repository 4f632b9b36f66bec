//! The store's behaviour, as any implementation must show it: each test is a function
//! of a fresh store, and `store_suite!(open)` turns them all into `#[tokio::test]`s for
//! one backend (`open` makes a fresh, empty store and whatever keeps it alive).

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::domain::job::{PullPolicy, ResolvedSpec, Resources};
use crate::domain::ports::{
    AdoptResult, CancelResult, Claim, ClaimResult, IdempotencyKey, Inserted, Lease, LeaseStatus,
    NewRun, RetryResult, RunMessage, RunStore,
};
use crate::domain::retry::RetryPolicy;
use crate::domain::run::{Outcome, ReasonCode, RunId, RunStatus};
use crate::domain::session::{
    OrphanVerdict, SessionDecision, SessionRenewal, SessionRequest, WorkerSession,
};

/// Every test of the suite, for one backend: `open` is an async fn returning
/// `(store, keep_alive)`.
macro_rules! store_suite {
    ($open:path) => {
        $crate::store::suite::store_suite!(@each $open;
            a_run_goes_from_outbox_to_claim_to_final_state_guarded_by_epoch,
            unclaimed_runs_are_published_again_for_a_volatile_queue,
            retry_rules_queue_the_next_attempt_after_its_backoff,
            expired_leases_become_lost_and_a_person_can_retry,
            cancel_ends_a_queued_run_and_flags_a_running_one,
            idempotency_keys_return_the_first_run,
            an_unstarted_attempt_can_be_released_and_an_adopted_one_renewed,
            only_unclaimed_due_runs_sent_long_ago_are_published_again,
            a_session_is_opened_refused_to_another_host_and_reopened_by_its_own_process,
            a_live_session_is_replaced_from_its_own_host_only_with_the_host_lock,
            an_expired_or_ended_session_gives_the_id_away,
            a_superseded_or_ended_session_is_not_renewed,
            an_orphan_goes_only_once_its_attempt_and_its_session_are_over,
        );
    };
    (@each $open:path; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $name() {
                let (store, _keep) = $open().await;
                $crate::store::suite::$name(&store).await;
            }
        )*
    };
}
pub(crate) use store_suite;

pub(crate) fn new_run() -> NewRun {
    NewRun {
        id: RunId::new(),
        job: "hello".into(),
        params: BTreeMap::from([("who".to_owned(), "x".to_owned())]),
        spec: ResolvedSpec {
            image: "img:1".into(),
            command: vec!["echo".into(), "x".into()],
            workdir: None,
            user: None,
            env: BTreeMap::new(),
            pull: PullPolicy::Never,
            resources: Resources::default(),
            timeout: Some(Duration::from_secs(5)),
            stop_grace: Duration::from_secs(1),
            network: "none".into(),
        },
        retry: RetryPolicy::default(),
        created_at: Utc::now(),
    }
}

pub(crate) async fn a_run_goes_from_outbox_to_claim_to_final_state_guarded_by_epoch(
    store: &dyn RunStore,
) {
    let run = new_run();
    store.insert_run(&run, None).await.unwrap();
    let pending = store.pending_outbox(10, Utc::now()).await.unwrap();
    assert_eq!(pending.len(), 1);
    let message = pending[0].message;
    assert_eq!(
        message,
        RunMessage {
            run_id: run.id,
            attempt: 1
        }
    );
    store
        .mark_outbox_sent(&[pending[0].id], Utc::now())
        .await
        .unwrap();
    assert!(
        store
            .pending_outbox(10, Utc::now())
            .await
            .unwrap()
            .is_empty()
    );

    let ttl = Duration::from_secs(30);
    let ClaimResult::Claimed(claim) = store.claim(message, "w1", ttl, Utc::now()).await.unwrap()
    else {
        panic!("first claim refused")
    };
    assert_eq!(claim.spec, run.spec);
    // The same worker asking again (a lost answer) gets the same lease back...
    let ClaimResult::Claimed(again) = store.claim(message, "w1", ttl, Utc::now()).await.unwrap()
    else {
        panic!("repeated claim refused")
    };
    assert_eq!(again.lease, claim.lease);
    // ...another worker does not.
    assert!(matches!(
        store.claim(message, "w2", ttl, Utc::now()).await.unwrap(),
        ClaimResult::NotClaimable {
            status: RunStatus::Running,
            attempt: 1
        }
    ));
    assert_eq!(
        store
            .mark_started(claim.lease, "c1", ttl, Utc::now())
            .await
            .unwrap(),
        LeaseStatus::Held { cancel: false }
    );
    // Once started, not even the same worker re-claims it.
    assert!(matches!(
        store.claim(message, "w1", ttl, Utc::now()).await.unwrap(),
        ClaimResult::NotClaimable { .. }
    ));

    let stale = Lease {
        epoch: claim.lease.epoch + 1,
        ..claim.lease
    };
    let outcome = Outcome::Exited { code: 3 };
    assert_eq!(
        store.finish(stale, &outcome, 0, Utc::now()).await.unwrap(),
        LeaseStatus::Lost
    );
    assert_eq!(
        store
            .finish(claim.lease, &outcome, 0, Utc::now())
            .await
            .unwrap(),
        LeaseStatus::Held { cancel: false }
    );
    let stored = store.get_run(run.id).await.unwrap().unwrap();
    assert_eq!(stored.status, RunStatus::Failed);
    assert_eq!(stored.exit_code, Some(3));
    assert_eq!(stored.reason.as_deref(), Some("exit_code 3"));
    assert!(stored.started_at.is_some() && stored.finished_at.is_some());
    // A final run is not finished twice.
    assert_eq!(
        store
            .finish(claim.lease, &outcome, 0, Utc::now())
            .await
            .unwrap(),
        LeaseStatus::Lost
    );
}

pub(crate) async fn unclaimed_runs_are_published_again_for_a_volatile_queue(store: &dyn RunStore) {
    let (waiting, taken) = (new_run(), new_run());
    store.insert_run(&waiting, None).await.unwrap();
    store.insert_run(&taken, None).await.unwrap();
    let ids: Vec<i64> = store
        .pending_outbox(10, Utc::now())
        .await
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    store.mark_outbox_sent(&ids, Utc::now()).await.unwrap();
    let claimed = RunMessage {
        run_id: taken.id,
        attempt: 1,
    };
    store
        .claim(claimed, "w", Duration::from_secs(30), Utc::now())
        .await
        .unwrap();

    assert_eq!(store.requeue_unclaimed().await.unwrap(), 1);
    let pending = store.pending_outbox(10, Utc::now()).await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].message.run_id, waiting.id);
}

async fn claimed(store: &dyn RunStore, run: &NewRun, attempt: u32, ttl: Duration) -> Claim {
    let message = RunMessage {
        run_id: run.id,
        attempt,
    };
    match store.claim(message, "w1", ttl, Utc::now()).await.unwrap() {
        ClaimResult::Claimed(c) => *c,
        other => panic!("claim refused: {other:?}"),
    }
}

pub(crate) async fn retry_rules_queue_the_next_attempt_after_its_backoff(store: &dyn RunStore) {
    let mut run = new_run();
    run.retry = RetryPolicy {
        max_attempts: 2,
        backoff: Duration::from_secs(60),
        on_exit_codes: [1].into(),
        ..RetryPolicy::default()
    };
    store.insert_run(&run, None).await.unwrap();
    let ttl = Duration::from_secs(30);
    let first = claimed(store, &run, 1, ttl).await;
    let now = Utc::now();
    store
        .finish(first.lease, &Outcome::Exited { code: 1 }, 0, now)
        .await
        .unwrap();
    let stored = store.get_run(run.id).await.unwrap().unwrap();
    assert_eq!(stored.status, RunStatus::Queued);
    assert_eq!(stored.exit_code, None);
    assert!(stored.not_before.unwrap() > now + chrono::Duration::seconds(40));
    assert_eq!(stored.attempts.len(), 1);
    assert_eq!(stored.attempts[0].exit_code, Some(1));
    // The second attempt's publish waits for the backoff.
    let due_now = store.pending_outbox(10, now).await.unwrap();
    assert!(due_now.iter().all(|e| e.message.attempt == 1));
    let later = store
        .pending_outbox(10, now + chrono::Duration::seconds(80))
        .await
        .unwrap();
    assert!(later.iter().any(|e| e.message.attempt == 2));
    // ...and so does a claim that comes early.
    assert!(matches!(
        store
            .claim(
                RunMessage {
                    run_id: run.id,
                    attempt: 2
                },
                "w1",
                ttl,
                now
            )
            .await
            .unwrap(),
        ClaimResult::NotClaimable { .. }
    ));
    let second = match store
        .claim(
            RunMessage {
                run_id: run.id,
                attempt: 2,
            },
            "w1",
            ttl,
            now + chrono::Duration::seconds(80),
        )
        .await
        .unwrap()
    {
        ClaimResult::Claimed(c) => *c,
        other => panic!("{other:?}"),
    };
    store
        .finish(second.lease, &Outcome::Exited { code: 1 }, 0, Utc::now())
        .await
        .unwrap();
    let stored = store.get_run(run.id).await.unwrap().unwrap();
    assert_eq!(stored.status, RunStatus::Failed, "attempts ran out");
    assert_eq!(stored.attempt, 2);
    assert_eq!(stored.attempts.len(), 2);
}

pub(crate) async fn expired_leases_become_lost_and_a_person_can_retry(store: &dyn RunStore) {
    let run = new_run();
    store.insert_run(&run, None).await.unwrap();
    let claim = claimed(store, &run, 1, Duration::from_millis(10)).await;
    let later = Utc::now() + chrono::Duration::seconds(1);
    assert_eq!(store.expire_leases(later).await.unwrap(), vec![run.id]);
    let stored = store.get_run(run.id).await.unwrap().unwrap();
    assert_eq!(stored.status, RunStatus::Lost);
    assert_eq!(stored.reason_code, Some(ReasonCode::Lost));
    assert!(stored.reason.unwrap().contains("w1"));
    // The vanished worker's late report is refused.
    assert_eq!(
        store
            .finish(claim.lease, &Outcome::Exited { code: 0 }, 0, later)
            .await
            .unwrap(),
        LeaseStatus::Lost
    );
    assert_eq!(
        store.retry(run.id, later).await.unwrap(),
        RetryResult::Queued { attempt: 2 }
    );
    assert_eq!(
        store.retry(run.id, later).await.unwrap(),
        RetryResult::NotRetryable(RunStatus::Queued)
    );
    let second = claimed(store, &run, 2, Duration::from_secs(30)).await;
    assert!(second.lease.epoch > claim.lease.epoch);
}

pub(crate) async fn cancel_ends_a_queued_run_and_flags_a_running_one(store: &dyn RunStore) {
    let (queued, running) = (new_run(), new_run());
    store.insert_run(&queued, None).await.unwrap();
    store.insert_run(&running, None).await.unwrap();
    let claim = claimed(store, &running, 1, Duration::from_secs(30)).await;
    let now = Utc::now();
    assert_eq!(
        store.cancel(queued.id, now).await.unwrap(),
        CancelResult::Cancelled
    );
    assert!(
        store
            .pending_outbox(10, now)
            .await
            .unwrap()
            .iter()
            .all(|e| e.message.run_id != queued.id),
        "a cancelled run is not published"
    );
    assert_eq!(
        store.cancel(running.id, now).await.unwrap(),
        CancelResult::Requested
    );
    assert_eq!(
        store
            .renew_lease(claim.lease, Duration::from_secs(30), now)
            .await
            .unwrap(),
        LeaseStatus::Held { cancel: true }
    );
    assert_eq!(
        store.cancel(queued.id, now).await.unwrap(),
        CancelResult::AlreadyFinal(RunStatus::Cancelled)
    );
    assert_eq!(
        store.cancel(RunId::new(), now).await.unwrap(),
        CancelResult::UnknownRun
    );
}

pub(crate) async fn idempotency_keys_return_the_first_run(store: &dyn RunStore) {
    let key = IdempotencyKey {
        scope: String::new(),
        key: "k1".into(),
        job: "hello".into(),
        fingerprint: "{}".into(),
    };
    let first = new_run();
    assert_eq!(
        store.insert_run(&first, Some(&key)).await.unwrap(),
        Inserted::New
    );
    assert_eq!(
        store.insert_run(&new_run(), Some(&key)).await.unwrap(),
        Inserted::Existing(first.id)
    );
    let other = IdempotencyKey {
        fingerprint: "{\"a\":\"1\"}".into(),
        ..key.clone()
    };
    assert_eq!(
        store.insert_run(&new_run(), Some(&other)).await.unwrap(),
        Inserted::KeyReused {
            job: "hello".into()
        }
    );
    // After the window the key is free again.
    let mut late = new_run();
    late.created_at = Utc::now() + chrono::Duration::hours(25);
    assert_eq!(
        store.insert_run(&late, Some(&key)).await.unwrap(),
        Inserted::New
    );
}

pub(crate) async fn an_unstarted_attempt_can_be_released_and_an_adopted_one_renewed(
    store: &dyn RunStore,
) {
    let run = new_run();
    store.insert_run(&run, None).await.unwrap();
    let ttl = Duration::from_secs(30);
    let claim = claimed(store, &run, 1, ttl).await;
    assert_eq!(store.held_attempts("w1").await.unwrap().len(), 1);
    store.release(claim.lease, Utc::now()).await.unwrap();
    let stored = store.get_run(run.id).await.unwrap().unwrap();
    assert_eq!((stored.status, stored.attempt), (RunStatus::Queued, 0));
    assert!(store.held_attempts("w1").await.unwrap().is_empty());

    let claim = claimed(store, &run, 1, ttl).await;
    store
        .mark_started(claim.lease, "c1", ttl, Utc::now())
        .await
        .unwrap();
    // Started: not releasable, but adoptable by its own worker only.
    assert_eq!(
        store.release(claim.lease, Utc::now()).await.unwrap(),
        LeaseStatus::Lost
    );
    assert!(matches!(
        store.adopt(run.id, 1, "w2", ttl, Utc::now()).await.unwrap(),
        AdoptResult::Stale
    ));
    match store.adopt(run.id, 1, "w1", ttl, Utc::now()).await.unwrap() {
        AdoptResult::Held(c) => assert_eq!(c.lease, claim.lease),
        AdoptResult::Stale => panic!("own attempt not adoptable"),
    }
}

pub(crate) async fn only_unclaimed_due_runs_sent_long_ago_are_published_again(
    store: &dyn RunStore,
) {
    let (waiting, taken) = (new_run(), new_run());
    store.insert_run(&waiting, None).await.unwrap();
    store.insert_run(&taken, None).await.unwrap();
    let now = Utc::now();
    let ids: Vec<i64> = store
        .pending_outbox(10, now)
        .await
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    store.mark_outbox_sent(&ids, now).await.unwrap();
    claimed(store, &taken, 1, Duration::from_secs(30)).await;
    // Sent just now: not yet.
    let just_before = now - chrono::Duration::seconds(1);
    assert!(
        store
            .republish_unclaimed(just_before, now)
            .await
            .unwrap()
            .is_empty()
    );
    let later = now + chrono::Duration::seconds(1);
    assert_eq!(
        store.republish_unclaimed(later, later).await.unwrap(),
        vec![waiting.id]
    );
    let pending = store.pending_outbox(10, later).await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].message.run_id, waiting.id);
}

/// Now, to the millisecond the store keeps.
fn now_ms() -> DateTime<Utc> {
    DateTime::from_timestamp_millis(Utc::now().timestamp_millis()).unwrap_or_default()
}

fn secs(n: i64) -> chrono::Duration {
    chrono::Duration::seconds(n)
}

const SESSION_TTL: Duration = Duration::from_secs(30);

fn request(worker_id: &str, instance: &str, host: &str, lock: bool) -> SessionRequest {
    SessionRequest {
        worker_id: worker_id.into(),
        instance: instance.into(),
        host: host.into(),
        pid: 42,
        holds_host_lock: lock,
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
    // Not running under another worker id, which has no session: that one's goes.
    assert_eq!(verdict(now, "w2").await, OrphanVerdict::Remove);
    store
        .finish(claim.lease, &Outcome::Exited { code: 0 }, 0, now)
        .await
        .unwrap();
    // The attempt is over but its worker is alive and may still deal with it.
    assert_eq!(verdict(now + secs(10), "w1").await, OrphanVerdict::Keep);
    assert_eq!(verdict(now + secs(30), "w1").await, OrphanVerdict::Remove);
    store.end_session("w1", "a", now + secs(5)).await.unwrap();
    assert_eq!(verdict(now + secs(10), "w1").await, OrphanVerdict::Remove);
    // Unknown runs and attempts are not running.
    assert_eq!(
        store
            .orphan_verdict(RunId::new(), 1, "w1", now + secs(10))
            .await
            .unwrap(),
        OrphanVerdict::Remove
    );
    assert_eq!(
        store
            .orphan_verdict(run.id, 2, "nobody", now)
            .await
            .unwrap(),
        OrphanVerdict::Remove
    );
}
