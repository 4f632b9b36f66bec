//! A job's `max_concurrent`: runs wait `queued` without an outbox row until admitted,
//! in arrival order, and each run that ends (finished, cancelled, lost) lets the next in.

use std::time::Duration;

use chrono::Utc;

use super::new_run;
use crate::domain::ports::{
    CancelResult, Claim, ClaimResult, NewRun, RetryResult, RunMessage, RunStore,
};
use crate::domain::run::{Outcome, RunId, RunStatus};
use crate::domain::schedule::Admission;

/// A run of `job` under `admission`, with an id later than every earlier one's.
pub(crate) fn run_of(job: &str, admission: Admission) -> NewRun {
    // ULIDs made in the same millisecond are not ordered: space them out.
    std::thread::sleep(Duration::from_millis(2));
    NewRun {
        job: job.to_owned(),
        admission,
        callback: None,
        ..new_run()
    }
}

/// The publishes due now, marked sent (as the relay would), in order.
pub(crate) async fn take_published(store: &dyn RunStore) -> Vec<RunMessage> {
    let pending = store.pending_outbox(100, Utc::now()).await.unwrap();
    let ids: Vec<i64> = pending.iter().map(|e| e.id).collect();
    store.mark_outbox_sent(&ids, Utc::now()).await.unwrap();
    pending.into_iter().map(|e| e.message).collect()
}

fn first(id: RunId) -> RunMessage {
    RunMessage {
        run_id: id,
        attempt: 1,
    }
}

pub(crate) async fn claim(store: &dyn RunStore, message: RunMessage) -> Claim {
    let ttl = Duration::from_secs(1);
    match store.claim(message, "w1", ttl, Utc::now()).await.unwrap() {
        ClaimResult::Claimed(claim) => *claim,
        other => panic!("claim refused: {other:?}"),
    }
}

async fn insert(store: &dyn RunStore, runs: &[NewRun]) {
    for run in runs {
        store.insert_run(run, None).await.unwrap();
    }
}

pub(crate) async fn max_concurrent_one_admits_the_next_run_whenever_one_ends(store: &dyn RunStore) {
    let runs: Vec<NewRun> = (0..5)
        .map(|_| run_of("single", Admission::AtMost(1)))
        .collect();
    insert(store, &runs).await;
    // Another job is not held up.
    let other = run_of("other", Admission::AtMost(1));
    insert(store, std::slice::from_ref(&other)).await;
    assert_eq!(
        take_published(store).await,
        [first(runs[0].id), first(other.id)]
    );

    // Finished: the next is admitted.
    let c0 = claim(store, first(runs[0].id)).await;
    store
        .finish(c0.lease, &Outcome::Exited { code: 0 }, 0, None, Utc::now())
        .await
        .unwrap();
    assert_eq!(take_published(store).await, [first(runs[1].id)]);

    // A cancel asked of a running run admits nothing until it ends; a waiting run
    // cancelled leaves without letting anyone in.
    let c1 = claim(store, first(runs[1].id)).await;
    assert_eq!(
        store.cancel(runs[1].id, Utc::now()).await.unwrap(),
        CancelResult::Requested
    );
    assert_eq!(
        store.cancel(runs[2].id, Utc::now()).await.unwrap(),
        CancelResult::Cancelled
    );
    assert!(take_published(store).await.is_empty());

    // The cancelled run's lease runs out (it ends `cancelled`): the next waiting is in.
    let later = Utc::now() + chrono::Duration::seconds(10);
    assert_eq!(store.expire_leases(later).await.unwrap(), [c1.lease.run_id]);
    assert_eq!(take_published(store).await, [first(runs[3].id)]);

    // Lost: the last one is in.
    let c3 = claim(store, first(runs[3].id)).await;
    let later = Utc::now() + chrono::Duration::seconds(10);
    assert_eq!(store.expire_leases(later).await.unwrap(), [c3.lease.run_id]);
    let lost = store.get_run(runs[3].id).await.unwrap().unwrap();
    assert_eq!(lost.status, RunStatus::Lost);
    assert_eq!(take_published(store).await, [first(runs[4].id)]);

    // A claimed run given back after a cancel ends, and admits whoever waits.
    let late = run_of("single", Admission::AtMost(1));
    insert(store, std::slice::from_ref(&late)).await;
    let c4 = claim(store, first(runs[4].id)).await;
    store.cancel(runs[4].id, Utc::now()).await.unwrap();
    store.release(c4.lease, Utc::now()).await.unwrap();
    let released = store.get_run(runs[4].id).await.unwrap().unwrap();
    assert_eq!(released.status, RunStatus::Cancelled);
    assert_eq!(take_published(store).await, [first(late.id)]);
}

pub(crate) async fn at_most_two_runs_together_and_alone_waits_for_all(store: &dyn RunStore) {
    let runs: Vec<NewRun> = (0..3)
        .map(|_| run_of("pair", Admission::AtMost(2)))
        .collect();
    insert(store, &runs).await;
    assert_eq!(
        take_published(store).await,
        [first(runs[0].id), first(runs[1].id)]
    );
    // A run that wants to be alone waits behind the third; and a run after it waits
    // behind it even with room (no overtaking).
    let alone = run_of("pair", Admission::Alone);
    let after = run_of("pair", Admission::AtMost(2));
    insert(store, &[alone.clone(), after.clone()]).await;
    assert!(take_published(store).await.is_empty());

    let c0 = claim(store, first(runs[0].id)).await;
    store
        .finish(c0.lease, &Outcome::Exited { code: 0 }, 0, None, Utc::now())
        .await
        .unwrap();
    assert_eq!(take_published(store).await, [first(runs[2].id)]);
    // Two admitted (runs 1 and 2): the alone run waits for both.
    store.cancel(runs[1].id, Utc::now()).await.unwrap();
    assert!(take_published(store).await.is_empty());
    let c2 = claim(store, first(runs[2].id)).await;
    store
        .finish(c2.lease, &Outcome::Exited { code: 1 }, 0, None, Utc::now())
        .await
        .unwrap();
    // Nothing admitted is left: the alone run goes, and the one behind it has room.
    assert_eq!(
        take_published(store).await,
        [first(alone.id), first(after.id)]
    );
}

pub(crate) async fn a_persons_retry_waits_for_room_like_a_new_run(store: &dyn RunStore) {
    let a = run_of("single", Admission::AtMost(1));
    insert(store, std::slice::from_ref(&a)).await;
    take_published(store).await;
    let ca = claim(store, first(a.id)).await;
    store
        .finish(ca.lease, &Outcome::Exited { code: 1 }, 0, None, Utc::now())
        .await
        .unwrap();
    let b = run_of("single", Admission::AtMost(1));
    insert(store, std::slice::from_ref(&b)).await;
    assert_eq!(take_published(store).await, [first(b.id)]);
    let cb = claim(store, first(b.id)).await;

    assert_eq!(
        store.retry(a.id, Utc::now()).await.unwrap(),
        RetryResult::Queued { attempt: 2 }
    );
    assert_eq!(
        store.get_run(a.id).await.unwrap().unwrap().status,
        RunStatus::Queued
    );
    assert!(take_published(store).await.is_empty());
    store
        .finish(cb.lease, &Outcome::Exited { code: 0 }, 0, None, Utc::now())
        .await
        .unwrap();
    assert_eq!(
        take_published(store).await,
        [RunMessage {
            run_id: a.id,
            attempt: 2
        }]
    );
}

pub(crate) async fn a_run_waiting_for_admission_is_never_published_again(store: &dyn RunStore) {
    let a = run_of("single", Admission::AtMost(1));
    let b = run_of("single", Admission::AtMost(1));
    insert(store, &[a.clone(), b.clone()]).await;
    assert_eq!(take_published(store).await, [first(a.id)]);
    // A volatile queue restarted: only the admitted run goes out again.
    assert_eq!(store.requeue_unclaimed().await.unwrap(), 1);
    assert_eq!(take_published(store).await, [first(a.id)]);
    // The queue was found empty: the same.
    let later = Utc::now() + chrono::Duration::seconds(60);
    assert_eq!(
        store.republish_unclaimed(later, later).await.unwrap(),
        [a.id]
    );
    assert_eq!(take_published(store).await, [first(a.id)]);
    assert_eq!(
        store.get_run(b.id).await.unwrap().unwrap().status,
        RunStatus::Queued
    );
}
