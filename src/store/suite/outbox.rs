//! The outbox as the relay and its sweeps see it: reading past an id, publishing again
//! what a volatile queue or a lost message left unclaimed.

use std::time::Duration;

use chrono::Utc;

use super::{claimed, new_run, publish_all};
use crate::domain::ports::{RunMessage, RunStore};

/// The relay reads the next batch past the last id it took while that batch is still
/// being recorded as sent; everything not recorded stays pending for a read from 0.
pub(crate) async fn the_outbox_is_read_past_an_id_while_earlier_entries_stay_pending(
    store: &dyn RunStore,
) {
    let runs: Vec<_> = (0..3).map(|_| new_run()).collect();
    for run in &runs {
        store.insert_run(run, None).await.unwrap();
    }
    let all = store.pending_outbox_after(0, 10, Utc::now()).await.unwrap();
    let ids: Vec<_> = all.iter().map(|e| e.message.run_id).collect();
    assert_eq!(ids, runs.iter().map(|r| r.id).collect::<Vec<_>>());
    let first = store.pending_outbox_after(0, 1, Utc::now()).await.unwrap();
    assert_eq!(first.len(), 1);
    let rest = store
        .pending_outbox_after(first[0].id, 10, Utc::now())
        .await
        .unwrap();
    assert_eq!(rest.len(), 2);
    assert!(rest.iter().all(|e| e.id > first[0].id));
    store
        .mark_outbox_sent(&[rest[0].id], Utc::now())
        .await
        .unwrap();
    let left: Vec<_> = store
        .pending_outbox_after(0, 10, Utc::now())
        .await
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(left, [first[0].id, rest[1].id]);
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

pub(crate) async fn only_unclaimed_due_runs_sent_long_ago_are_published_again(
    store: &dyn RunStore,
) {
    let (waiting, taken) = (new_run(), new_run());
    store.insert_run(&waiting, None).await.unwrap();
    store.insert_run(&taken, None).await.unwrap();
    let now = Utc::now();
    publish_all(store, now).await;
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
