//! Retention against a real store: expired idempotency keys, sent outbox rows nothing
//! needs, finished runs with everything that refers to them, and old schedule slot
//! records, each deleted in batches of the limit. Each test is generic over the store;
//! `retention_suite!(open)` turns them into `#[tokio::test]`s for one backend.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::{hour, publish_all, slot, slot_run};
use crate::domain::job::{PullPolicy, ResolvedSpec, Resources};
use crate::domain::ports::{
    ClaimResult, IdempotencyKey, Inserted, Lease, NewRun, RunMessage, RunStore, SlotKey,
};
use crate::domain::retention::{OutboxPurge, PrunedRun, RetentionStore, keys_expired_before};
use crate::domain::retry::RetryPolicy;
use crate::domain::run::{Outcome, RunId};
use crate::domain::schedule::{Admission, Overlap, SkipReason};

/// What the tests read of a store beyond its ports, by SQL of the backend's own.
pub(crate) trait RowCounts {
    /// The rows of `table` (one with a `run_id` column) that belong to `run`.
    async fn rows(&self, table: &str, run: RunId) -> i64;
}

/// Every retention test, for one backend: `open` is an async fn returning
/// `(store, keep_alive)`.
macro_rules! retention_suite {
    ($open:path) => {
        $crate::store::suite::retention::retention_suite!(@each $open;
            expired_idempotency_keys_are_deleted_without_the_key_being_sent_again,
            sent_outbox_rows_go_once_nothing_needs_them,
            only_final_runs_finished_before_the_cutoff_go_with_attempts_keys_and_outbox,
            finished_runs_go_in_batches_of_the_limit_oldest_first,
            old_slot_records_go_unless_their_run_lives_or_their_cursor_is_behind_them,
            backlog_counts_only_rows_whose_last_publish_failed,
        );
    };
    (@each $open:path; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $name() {
                let (store, _keep) = $open().await;
                $crate::store::suite::retention::$name(&store).await;
            }
        )*
    };
}
pub(crate) use retention_suite;

fn new_run(created_at: DateTime<Utc>) -> NewRun {
    NewRun {
        id: RunId::new(),
        job: "hello".into(),
        params: BTreeMap::new(),
        spec: ResolvedSpec {
            logs: Default::default(),
            image: "img:1".into(),
            command: vec!["true".into()],
            workdir: None,
            user: None,
            env: BTreeMap::new(),
            secret_env: BTreeMap::new(),
            pull: PullPolicy::Never,
            resources: Resources::default(),
            timeout: None,
            stop_grace: Duration::from_secs(1),
            network: "none".into(),
            hardening: Default::default(),
        },
        retry: RetryPolicy::default(),
        created_at,
        trigger: crate::domain::run::Trigger::Api,
        admission: Admission::Unlimited,
        callback: None,
        requester: crate::domain::reply::Requester::default(),
    }
}

fn key(name: &str) -> IdempotencyKey {
    IdempotencyKey {
        scope: String::new(),
        key: name.into(),
        job: "hello".into(),
        fingerprint: "{}".into(),
    }
}

fn ids(runs: Vec<PrunedRun>) -> Vec<RunId> {
    runs.into_iter().map(|r| r.id).collect()
}

async fn claim<S: RunStore>(store: &S, run: RunId, attempt: u32, now: DateTime<Utc>) -> Lease {
    let message = RunMessage {
        run_id: run,
        attempt,
    };
    match store
        .claim(message, "w1", Duration::from_secs(30), now)
        .await
        .unwrap()
    {
        ClaimResult::Claimed(c) => c.lease,
        other => panic!("claim refused: {other:?}"),
    }
}

/// A run accepted, published, run and ended with `code` at `at`.
async fn finished<S: RunStore>(
    store: &S,
    key: Option<&IdempotencyKey>,
    code: i64,
    at: DateTime<Utc>,
) -> RunId {
    let run = new_run(at);
    assert_eq!(store.insert_run(&run, key).await.unwrap(), Inserted::New);
    publish_all(store, at).await;
    let lease = claim(store, run.id, 1, at).await;
    store
        .finish(lease, &Outcome::Exited { code }, 0, None, at)
        .await
        .unwrap();
    run.id
}

pub(crate) async fn expired_idempotency_keys_are_deleted_without_the_key_being_sent_again<
    S: RunStore + RetentionStore + RowCounts,
>(
    store: &S,
) {
    let now = Utc::now();
    let old = new_run(now - chrono::Duration::hours(25));
    let fresh = new_run(now - chrono::Duration::hours(1));
    store.insert_run(&old, Some(&key("old"))).await.unwrap();
    store.insert_run(&fresh, Some(&key("fresh"))).await.unwrap();

    let cutoff = keys_expired_before(now);
    assert_eq!(store.delete_expired_keys(cutoff, 500).await.unwrap(), 1);
    assert_eq!(store.rows("idempotency_keys", old.id).await, 0);
    assert_eq!(store.rows("idempotency_keys", fresh.id).await, 1);
    assert_eq!(store.delete_expired_keys(cutoff, 500).await.unwrap(), 0);
    // The run itself stays; only its key expired.
    assert!(store.get_run(old.id).await.unwrap().is_some());
    // The fresh key still answers with its run.
    assert_eq!(
        store
            .insert_run(&new_run(now), Some(&key("fresh")))
            .await
            .unwrap(),
        Inserted::Existing(fresh.id)
    );
}

pub(crate) async fn sent_outbox_rows_go_once_nothing_needs_them<
    S: RunStore + RetentionStore + RowCounts,
>(
    store: &S,
) {
    let now = Utc::now();
    let waiting = new_run(now);
    let running = new_run(now);
    let cancelled = new_run(now);
    let mut retrying = new_run(now);
    retrying.retry = RetryPolicy {
        max_attempts: 2,
        backoff: Duration::from_secs(3600),
        on_exit_codes: [1].into(),
        ..RetryPolicy::default()
    };
    for run in [&waiting, &running, &cancelled, &retrying] {
        store.insert_run(run, None).await.unwrap();
    }
    publish_all(store, now).await;
    claim(store, running.id, 1, now).await;
    store.cancel(cancelled.id, now).await.unwrap();
    let lease = claim(store, retrying.id, 1, now).await;
    store
        .finish(lease, &Outcome::Exited { code: 1 }, 0, None, now)
        .await
        .unwrap();
    // Not yet published: never touched.
    let unsent = new_run(now);
    store.insert_run(&unsent, None).await.unwrap();

    // A pass bounded below every row looks at none of them.
    let none = store.purge_sent_outbox(0, Some(0), 10).await.unwrap();
    assert_eq!((none.deleted, none.scanned_to, none.until), (0, None, 0));
    // Two rows per look, walking the ids up to the newest row when the pass began.
    let (mut after, mut until) = (0, None);
    let mut deleted = 0;
    let mut looks = 0;
    while let OutboxPurge {
        deleted: d,
        scanned_to: Some(to),
        until: u,
    } = store.purge_sent_outbox(after, until, 2).await.unwrap()
    {
        deleted += d;
        after = to;
        until = Some(u);
        looks += 1;
    }
    assert_eq!(
        deleted, 3,
        "running, cancelled, and the retried run's first attempt"
    );
    assert_eq!(looks, 2);
    assert_eq!(store.rows("outbox", running.id).await, 0);
    assert_eq!(store.rows("outbox", cancelled.id).await, 0);
    // The retry's pending publish of attempt 2 stays, its sent attempt-1 row went.
    assert_eq!(store.rows("outbox", retrying.id).await, 1);
    assert_eq!(store.rows("outbox", unsent.id).await, 1);
    assert_eq!(store.rows("outbox", waiting.id).await, 1);

    // What the lost-message sweep and a volatile queue's restart need is still there.
    let later = now + chrono::Duration::seconds(1);
    assert_eq!(
        store.republish_unclaimed(later, later).await.unwrap(),
        vec![waiting.id]
    );
    publish_all(store, later).await;
    assert_eq!(
        store.requeue_unclaimed().await.unwrap(),
        2,
        "waiting and unsent"
    );
}

pub(crate) async fn only_final_runs_finished_before_the_cutoff_go_with_attempts_keys_and_outbox<
    S: RunStore + RetentionStore + RowCounts,
>(
    store: &S,
) {
    let now = Utc::now();
    let long_ago = now - chrono::Duration::days(40);
    let old_failed = finished(store, Some(&key("old")), 3, long_ago).await;
    let old_cancelled = new_run(long_ago);
    store.insert_run(&old_cancelled, None).await.unwrap();
    store.cancel(old_cancelled.id, long_ago).await.unwrap();
    let recent = finished(store, Some(&key("recent")), 0, now).await;
    // Accepted long ago but not final: never deleted, however old.
    let queued = new_run(long_ago);
    store.insert_run(&queued, None).await.unwrap();
    let running = new_run(long_ago);
    store.insert_run(&running, None).await.unwrap();
    claim(store, running.id, 1, long_ago).await;

    let cutoff = now - chrono::Duration::days(30);
    let mut gone = store.delete_finished_runs(cutoff, 500).await.unwrap();
    gone.sort();
    // With the attempts each was claimed for: their logs are the caller's to delete.
    let mut want = vec![
        PrunedRun {
            id: old_failed,
            attempts: 1,
        },
        PrunedRun {
            id: old_cancelled.id,
            attempts: 0,
        },
    ];
    want.sort();
    assert_eq!(gone, want);
    for id in [old_failed, old_cancelled.id] {
        assert!(store.get_run(id).await.unwrap().is_none());
        for table in ["attempts", "outbox", "idempotency_keys"] {
            assert_eq!(store.rows(table, id).await, 0, "{table}");
        }
    }
    for id in [recent, queued.id, running.id] {
        assert!(store.get_run(id).await.unwrap().is_some());
    }
    assert_eq!(store.rows("attempts", recent).await, 1);
    assert_eq!(store.rows("idempotency_keys", recent).await, 1);
    assert!(
        store
            .delete_finished_runs(cutoff, 500)
            .await
            .unwrap()
            .is_empty()
    );
}

pub(crate) async fn finished_runs_go_in_batches_of_the_limit_oldest_first<
    S: RunStore + RetentionStore + RowCounts,
>(
    store: &S,
) {
    let now = Utc::now();
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(finished(store, None, 0, now - chrono::Duration::hours(10 - n)).await);
    }
    let first = store.delete_finished_runs(now, 2).await.unwrap();
    assert_eq!(self::ids(first), ids[..2]);
    let next = store.delete_finished_runs(now, 2).await.unwrap();
    assert_eq!(self::ids(next), ids[2..4]);
    let last = store.delete_finished_runs(now, 2).await.unwrap();
    assert_eq!(self::ids(last), ids[4..]);
    assert!(store.delete_finished_runs(now, 2).await.unwrap().is_empty());
}

pub(crate) async fn old_slot_records_go_unless_their_run_lives_or_their_cursor_is_behind_them<
    S: RunStore + RetentionStore + RowCounts,
>(
    store: &S,
) {
    let day = chrono::NaiveDate::from_ymd_opt(2026, 3, 1).unwrap();
    // Each slot is recorded at its own fire time.
    let skip = async |key: &SlotKey| {
        let reason = SkipReason::Overlap;
        let at = key.nominal;
        assert!(
            store
                .skip_slot(key, at, day, reason, None, at)
                .await
                .unwrap()
        );
    };
    let fire = async |key: &SlotKey| {
        let run = slot_run(key, Admission::Unlimited);
        let at = key.nominal;
        store
            .fire_slot(key, at, day, &run, Overlap::Allow, at)
            .await
            .unwrap();
        run.id
    };
    // Schedule `a`, looked at up to 05:00. Its run deleted already: the record goes.
    let gone_run = fire(&slot("a", 5)).await;
    store.cancel(gone_run, hour(5)).await.unwrap();
    assert_eq!(
        store.delete_finished_runs(Utc::now(), 10).await.unwrap(),
        [PrunedRun {
            id: gone_run,
            attempts: 0
        }]
    );
    skip(&slot("a", 1)).await;
    let final_run = fire(&slot("a", 2)).await;
    store.cancel(final_run, hour(2)).await.unwrap();
    fire(&slot("a", 3)).await; // queued: kept
    let running = fire(&slot("a", 4)).await;
    publish_all(store, hour(4)).await;
    claim(store, running, 1, hour(4)).await; // running: kept
    skip(&slot("a", 6)).await; // ahead of the cursor: kept
    store
        .advance_cursor("nightly-job", "a", hour(5))
        .await
        .unwrap();
    // Schedule `b`, looked at up to 23:00: only the one recorded before the cutoff.
    skip(&slot("b", 9)).await;
    skip(&slot("b", 11)).await;
    store
        .advance_cursor("nightly-job", "b", hour(23))
        .await
        .unwrap();
    // Schedule `c` has no cursor (never ticked; a backfill's record).
    skip(&slot("c", 7)).await;

    let cutoff = hour(10);
    let mut batches = Vec::new();
    loop {
        let n = store.delete_old_slots(cutoff, 2).await.unwrap();
        batches.push(n);
        if n < 2 {
            break;
        }
    }
    assert_eq!(batches, [2, 2, 1]);
    let mut left: Vec<(String, DateTime<Utc>)> = store
        .slots("nightly-job", None, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|s| (s.key.schedule, s.key.nominal))
        .collect();
    left.sort();
    assert_eq!(
        left,
        [
            ("a".to_owned(), hour(3)),
            ("a".to_owned(), hour(4)),
            ("a".to_owned(), hour(6)),
            ("b".to_owned(), hour(11)),
        ]
    );
    // The run of a deleted record is untouched.
    assert!(store.get_run(final_run).await.unwrap().is_some());
    assert_eq!(store.delete_old_slots(cutoff, 2).await.unwrap(), 0);
}

/// `/readyz` reports `failed_publishes` from this count.
pub(crate) async fn backlog_counts_only_rows_whose_last_publish_failed<
    S: RunStore + RetentionStore + RowCounts,
>(
    store: &S,
) {
    let now = Utc::now();
    let (quiet, failing) = (new_run(now), new_run(now));
    for run in [&quiet, &failing] {
        store.insert_run(run, None).await.unwrap();
    }
    let entries = store.pending_outbox(10, now).await.unwrap();
    let id_of = |run: RunId| entries.iter().find(|e| e.message.run_id == run).unwrap().id;
    // One publish failed, then went out; the other went out at once.
    store
        .mark_outbox_failed(id_of(failing.id), "broker down")
        .await
        .unwrap();
    let backlog = store.outbox_backlog(now).await.unwrap();
    assert_eq!((backlog.pending, backlog.failed), (2, 1));
    publish_all(store, now).await;

    // Put back after good publishes, by the lost-message sweep and by a volatile
    // queue's restart: pending again, but their last publish did not fail.
    let later = now + chrono::Duration::seconds(1);
    assert_eq!(
        store.republish_unclaimed(later, later).await.unwrap().len(),
        2
    );
    let backlog = store.outbox_backlog(later).await.unwrap();
    assert_eq!((backlog.pending, backlog.failed), (2, 0));
    publish_all(store, later).await;
    assert_eq!(store.requeue_unclaimed().await.unwrap(), 2);
    let backlog = store.outbox_backlog(later).await.unwrap();
    assert_eq!((backlog.pending, backlog.failed), (2, 0));

    // A failure after that counts again, until the next good publish.
    store
        .mark_outbox_failed(id_of(failing.id), "broker down")
        .await
        .unwrap();
    assert_eq!(store.outbox_backlog(later).await.unwrap().failed, 1);
    store
        .mark_outbox_sent(&[id_of(failing.id)], later)
        .await
        .unwrap();
    assert_eq!(store.outbox_backlog(later).await.unwrap().failed, 0);
}
