//! Runs from acceptance to their final state: outbox, claims, leases, retries, cancel,
//! idempotency keys, release and adoption.

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

pub(crate) fn new_run() -> NewRun {
    NewRun {
        id: RunId::new(),
        job: "hello".into(),
        params: BTreeMap::from([("who".to_owned(), "x".to_owned())]),
        spec: ResolvedSpec {
            logs: Default::default(),
            image: "img:1".into(),
            command: vec!["echo".into(), "x".into()],
            workdir: None,
            user: None,
            env: BTreeMap::new(),
            secret_env: BTreeMap::new(),
            pull: PullPolicy::Never,
            resources: Resources::default(),
            timeout: Some(Duration::from_secs(5)),
            stop_grace: Duration::from_secs(1),
            network: "none".into(),
            hardening: Default::default(),
        },
        retry: RetryPolicy::default(),
        created_at: Utc::now(),
        trigger: crate::domain::run::Trigger::Api,
        admission: crate::domain::schedule::Admission::Unlimited,
        callback: None,
        requester: crate::domain::reply::Requester::default(),
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
        store
            .finish(stale, &outcome, 0, None, Utc::now())
            .await
            .unwrap(),
        LeaseStatus::Lost
    );
    assert_eq!(
        store
            .finish(claim.lease, &outcome, 0, None, Utc::now())
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
            .finish(claim.lease, &outcome, 0, None, Utc::now())
            .await
            .unwrap(),
        LeaseStatus::Lost
    );
}

/// Every entry the outbox has due at `now`, marked sent (as the relay does once the queue
/// confirmed them).
pub(crate) async fn publish_all(store: &dyn RunStore, now: DateTime<Utc>) {
    let ids: Vec<i64> = store
        .pending_outbox(1000, now)
        .await
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    store.mark_outbox_sent(&ids, now).await.unwrap();
}

pub(crate) async fn claimed(
    store: &dyn RunStore,
    run: &NewRun,
    attempt: u32,
    ttl: Duration,
) -> Claim {
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
        .finish(first.lease, &Outcome::Exited { code: 1 }, 0, None, now)
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
        .finish(
            second.lease,
            &Outcome::Exited { code: 1 },
            0,
            None,
            Utc::now(),
        )
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
            .finish(claim.lease, &Outcome::Exited { code: 0 }, 0, None, later)
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
            .renew_leases(&[claim.lease], Duration::from_secs(30), now)
            .await
            .unwrap(),
        vec![LeaseStatus::Held { cancel: true }]
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
        AdoptResult::Held { claim: c, .. } => assert_eq!(c.lease, claim.lease),
        AdoptResult::Stale => panic!("own attempt not adoptable"),
    }
}

pub(crate) async fn a_cancel_reaches_a_run_whose_attempt_is_given_back_or_whose_worker_vanished(
    store: &dyn RunStore,
) {
    let ttl = Duration::from_secs(30);
    let now = Utc::now();
    // Given back before its container started, after a cancel: final, never published.
    let released = new_run();
    store.insert_run(&released, None).await.unwrap();
    publish_all(store, now).await;
    let claim = claimed(store, &released, 1, ttl).await;
    assert_eq!(
        store.cancel(released.id, now).await.unwrap(),
        CancelResult::Requested
    );
    assert_eq!(
        store.release(claim.lease, now).await.unwrap(),
        LeaseStatus::Held { cancel: false }
    );
    let stored = store.get_run(released.id).await.unwrap().unwrap();
    assert_eq!((stored.status, stored.attempt), (RunStatus::Cancelled, 0));
    assert_eq!(
        stored.reason.as_deref(),
        Some("cancelled before it started")
    );
    assert_eq!(stored.reason_code, Some(ReasonCode::Cancelled));
    assert!(stored.finished_at.is_some() && stored.attempts.is_empty());
    assert!(
        store
            .pending_outbox(10, now)
            .await
            .unwrap()
            .iter()
            .all(|e| e.message.run_id != released.id)
    );
    // Its worker vanished after the cancel: cancelled, not lost, and not retried.
    let mut vanished = new_run();
    vanished.retry = RetryPolicy {
        max_attempts: 3,
        on: [ReasonCode::Lost, ReasonCode::Cancelled].into(),
        ..RetryPolicy::default()
    };
    store.insert_run(&vanished, None).await.unwrap();
    let claim = claimed(store, &vanished, 1, Duration::from_millis(10)).await;
    store
        .mark_started(claim.lease, "c1", Duration::from_millis(10), now)
        .await
        .unwrap();
    store.cancel(vanished.id, now).await.unwrap();
    let later = now + chrono::Duration::seconds(1);
    assert_eq!(store.expire_leases(later).await.unwrap(), vec![vanished.id]);
    let stored = store.get_run(vanished.id).await.unwrap().unwrap();
    assert_eq!(stored.status, RunStatus::Cancelled);
    assert_eq!(stored.attempts[0].status, RunStatus::Cancelled);
    assert!(stored.reason.unwrap_or_default().contains("w1"));
    // Expiry is decided once: nothing is left to expire.
    assert!(store.expire_leases(later).await.unwrap().is_empty());
}

pub(crate) async fn leases_are_renewed_together_and_answered_in_order(store: &dyn RunStore) {
    let short = Duration::from_millis(10);
    let now = Utc::now();
    let (plain, cancelled, ended) = (new_run(), new_run(), new_run());
    for run in [&plain, &cancelled, &ended] {
        store.insert_run(run, None).await.unwrap();
    }
    let plain_lease = claimed(store, &plain, 1, short).await.lease;
    let cancelled_lease = claimed(store, &cancelled, 1, short).await.lease;
    let ended_lease = claimed(store, &ended, 1, short).await.lease;
    store
        .finish(ended_lease, &Outcome::Exited { code: 0 }, 0, None, now)
        .await
        .unwrap();
    store.cancel(cancelled.id, now).await.unwrap();
    assert_eq!(
        store
            .renew_leases(
                &[ended_lease, plain_lease, cancelled_lease],
                Duration::from_secs(30),
                now
            )
            .await
            .unwrap(),
        vec![
            LeaseStatus::Lost,
            LeaseStatus::Held { cancel: false },
            LeaseStatus::Held { cancel: true },
        ]
    );
    // Both held leases now run 30 s from `now`, not 10 ms: nothing expires a second on.
    let later = now + chrono::Duration::seconds(1);
    assert!(store.expire_leases(later).await.unwrap().is_empty());
    assert!(
        store
            .renew_leases(&[], Duration::from_secs(30), now)
            .await
            .unwrap()
            .is_empty()
    );
}

pub(crate) async fn writes_under_a_stale_or_ended_lease_are_refused(store: &dyn RunStore) {
    let ttl = Duration::from_secs(30);
    let now = Utc::now();
    let run = new_run();
    store.insert_run(&run, None).await.unwrap();
    let claim = claimed(store, &run, 1, ttl).await;
    let stale = Lease {
        epoch: claim.lease.epoch - 1,
        ..claim.lease
    };
    assert_eq!(
        store.mark_started(stale, "c1", ttl, now).await.unwrap(),
        LeaseStatus::Lost
    );
    assert_eq!(
        store.renew_leases(&[stale], ttl, now).await.unwrap(),
        vec![LeaseStatus::Lost]
    );
    assert_eq!(store.release(stale, now).await.unwrap(), LeaseStatus::Lost);
    assert!(!store.lease_is_current(stale).await.unwrap());
    assert!(store.lease_is_current(claim.lease).await.unwrap());
    // Output lost under a stale lease is not counted; under the current one it is.
    store.add_log_dropped(stale, 5).await.unwrap();
    store.add_log_dropped(claim.lease, 7).await.unwrap();
    store
        .finish(claim.lease, &Outcome::Exited { code: 0 }, 3, None, now)
        .await
        .unwrap();
    let stored = store.get_run(run.id).await.unwrap().unwrap();
    assert_eq!(stored.status, RunStatus::Succeeded);
    assert_eq!(stored.log_dropped_bytes, 10);
    assert_eq!(stored.attempts[0].log_dropped_bytes, 10);
    // Ended: no heartbeat, start or release holds any more; output still counts.
    assert_eq!(
        store.renew_leases(&[claim.lease], ttl, now).await.unwrap(),
        vec![LeaseStatus::Lost]
    );
    assert_eq!(
        store.release(claim.lease, now).await.unwrap(),
        LeaseStatus::Lost
    );
    assert!(store.lease_is_current(claim.lease).await.unwrap());
    assert!(matches!(
        store.adopt(run.id, 1, "w1", ttl, now).await.unwrap(),
        AdoptResult::Stale
    ));
    assert!(matches!(
        store.adopt(RunId::new(), 1, "w1", ttl, now).await.unwrap(),
        AdoptResult::Stale
    ));
    assert_eq!(
        store.retry(run.id, now).await.unwrap(),
        RetryResult::NotRetryable(RunStatus::Succeeded)
    );
    assert_eq!(
        store.retry(RunId::new(), now).await.unwrap(),
        RetryResult::UnknownRun
    );
    assert!(matches!(
        store
            .claim(
                RunMessage {
                    run_id: RunId::new(),
                    attempt: 1
                },
                "w1",
                ttl,
                now
            )
            .await
            .unwrap(),
        ClaimResult::UnknownRun
    ));
}
