//! Completion callbacks: the obligation appears with the final state, one per event,
//! and every try is recorded on the run.

use std::time::Duration;

use chrono::Utc;

use super::new_run;
use crate::domain::callback::{CallbackTarget, NextStep, Redelivery, TryResult};
use crate::domain::ports::{ClaimResult, NewRun, RunMessage, RunStore};
use crate::domain::run::{Outcome, RunStatus};

fn with_callback() -> NewRun {
    NewRun {
        callback: Some(CallbackTarget {
            url: "https://hooks.example.com/x".into(),
        }),
        ..new_run()
    }
}

/// Claim, start and end the run's attempt `attempt` with `outcome`.
async fn run_to_end(store: &dyn RunStore, run: &NewRun, attempt: u32, outcome: Outcome) {
    let message = RunMessage {
        run_id: run.id,
        attempt,
    };
    let ttl = Duration::from_secs(30);
    let ClaimResult::Claimed(claim) = store.claim(message, "w1", ttl, Utc::now()).await.unwrap()
    else {
        panic!("claim refused")
    };
    store
        .mark_started(claim.lease, "c1", ttl, Utc::now())
        .await
        .unwrap();
    store
        .finish(claim.lease, &outcome, 0, None, Utc::now())
        .await
        .unwrap();
}

pub(crate) async fn a_final_state_comes_with_its_callback_obligation_one_per_event(
    store: &dyn RunStore,
) {
    let run = with_callback();
    store.insert_run(&run, None).await.unwrap();
    let plain = new_run();
    store.insert_run(&plain, None).await.unwrap();
    // Not final: nothing to announce, and nothing to redeliver.
    assert!(
        store
            .due_callbacks(Utc::now(), 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store.redeliver_callbacks(run.id, Utc::now()).await.unwrap(),
        Redelivery::NothingToDeliver
    );

    run_to_end(store, &run, 1, Outcome::Exited { code: 3 }).await;
    run_to_end(store, &plain, 1, Outcome::Exited { code: 0 }).await;
    let stored = store.get_run(run.id).await.unwrap().unwrap();
    assert_eq!(stored.status, RunStatus::Failed);
    assert_eq!(stored.callbacks.len(), 1);
    let first = &stored.callbacks[0];
    assert_eq!(first.url, "https://hooks.example.com/x");
    assert_eq!(first.event, "run.finished");
    assert!(first.event_id.starts_with("msg_"), "{}", first.event_id);
    assert_eq!((first.tries, first.gave_up), (0, false));
    // Only the run with a callback is obliged.
    let due = store.due_callbacks(Utc::now(), 10).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!((due[0].run_id, due[0].tries), (run.id, 0));
    assert_eq!(due[0].event_id, first.event_id);
    assert_eq!(
        store
            .redeliver_callbacks(plain.id, Utc::now())
            .await
            .unwrap(),
        Redelivery::NothingToDeliver
    );

    // A person's retry ends again: a second event, with an id of its own.
    store.retry(run.id, Utc::now()).await.unwrap();
    assert_eq!(
        store
            .get_run(run.id)
            .await
            .unwrap()
            .unwrap()
            .callbacks
            .len(),
        1
    );
    run_to_end(store, &run, 2, Outcome::Exited { code: 0 }).await;
    let stored = store.get_run(run.id).await.unwrap().unwrap();
    assert_eq!(stored.callbacks.len(), 2);
    assert_ne!(stored.callbacks[0].event_id, stored.callbacks[1].event_id);
}

pub(crate) async fn a_cancelled_queued_run_is_announced_too(store: &dyn RunStore) {
    let run = with_callback();
    store.insert_run(&run, None).await.unwrap();
    store.cancel(run.id, Utc::now()).await.unwrap();
    let due = store.due_callbacks(Utc::now(), 10).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].run_id, run.id);
}

pub(crate) async fn each_try_is_recorded_and_a_redelivery_makes_it_due_again(store: &dyn RunStore) {
    let run = with_callback();
    store.insert_run(&run, None).await.unwrap();
    store.cancel(run.id, Utc::now()).await.unwrap();
    let now = Utc::now();
    let due = store.due_callbacks(now, 10).await.unwrap().remove(0);

    let later = now + chrono::Duration::seconds(5);
    store
        .record_callback_try(
            due.id,
            &TryResult::Status(500),
            NextStep::RetryAt(later),
            now,
        )
        .await
        .unwrap();
    assert!(store.due_callbacks(now, 10).await.unwrap().is_empty());
    let again = store.due_callbacks(later, 10).await.unwrap().remove(0);
    assert_eq!((again.tries, &again.event_id), (1, &due.event_id));
    let view = &store.get_run(run.id).await.unwrap().unwrap().callbacks[0];
    assert_eq!(view.last_status, Some(500));
    assert_eq!(view.next_try_at, Some(later_ms(later)));

    store
        .record_callback_try(
            due.id,
            &TryResult::Failed("connection refused".into()),
            NextStep::GaveUp,
            later,
        )
        .await
        .unwrap();
    assert!(store.due_callbacks(later, 10).await.unwrap().is_empty());
    let view = &store.get_run(run.id).await.unwrap().unwrap().callbacks[0];
    assert_eq!(view.tries, 2);
    assert!(view.gave_up);
    assert_eq!(view.last_error.as_deref(), Some("connection refused"));
    assert_eq!(view.next_try_at, None);

    // A person's redelivery: due now again, same event id, no longer given up.
    assert_eq!(
        store.redeliver_callbacks(run.id, later).await.unwrap(),
        Redelivery::Queued(1)
    );
    let redo = store.due_callbacks(later, 10).await.unwrap().remove(0);
    assert_eq!(redo.event_id, due.event_id);
    store
        .record_callback_try(due.id, &TryResult::Status(204), NextStep::Delivered, later)
        .await
        .unwrap();
    let view = &store.get_run(run.id).await.unwrap().unwrap().callbacks[0];
    assert_eq!(view.delivered_at, Some(later_ms(later)));
    assert!(!view.gave_up);
    assert!(store.due_callbacks(later, 10).await.unwrap().is_empty());
    assert_eq!(
        store
            .redeliver_callbacks(crate::domain::run::RunId::new(), later)
            .await
            .unwrap(),
        Redelivery::UnknownRun
    );
}

/// Times are stored to the millisecond.
fn later_ms(t: chrono::DateTime<Utc>) -> chrono::DateTime<Utc> {
    chrono::DateTime::from_timestamp_millis(t.timestamp_millis()).unwrap()
}
