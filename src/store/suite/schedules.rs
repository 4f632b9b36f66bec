//! Schedule slots (fired once per key, overlap policies), cursors and pauses.

use chrono::{DateTime, NaiveDate, TimeZone, Utc};

use super::admission::{claim, run_of, take_published};
use crate::domain::ports::{
    Cursor, FireResult, Firing, NewRun, Pause, RunMessage, RunStore, SlotKey, SlotOutcome,
};
use crate::domain::run::{RunStatus, Trigger};
use crate::domain::schedule::{Admission, Overlap, SkipReason};

const JOB: &str = "nightly-job";

pub(crate) fn hour(h: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 1, h, 0, 0).unwrap()
}

pub(crate) fn slot(schedule: &str, h: u32) -> SlotKey {
    SlotKey {
        job: JOB.to_owned(),
        schedule: schedule.to_owned(),
        nominal: hour(h),
    }
}

fn day() -> NaiveDate {
    NaiveDate::from_ymd_opt(2026, 3, 1).unwrap()
}

pub(crate) fn slot_run(key: &SlotKey, admission: Admission) -> NewRun {
    NewRun {
        trigger: Trigger::Schedule {
            schedule: key.schedule.clone(),
            slot: key.nominal,
            business_date: day(),
            local_time: key.nominal.to_rfc3339(),
        },
        ..run_of(&key.job, admission)
    }
}

async fn fire(store: &dyn RunStore, key: &SlotKey, run: &NewRun, overlap: Overlap) -> Firing {
    store
        .fire_slot(key, key.nominal, day(), run, overlap, Utc::now())
        .await
        .unwrap()
}

fn first(run: &NewRun) -> RunMessage {
    RunMessage {
        run_id: run.id,
        attempt: 1,
    }
}

pub(crate) async fn a_slot_fires_once_and_its_run_carries_the_trigger(store: &dyn RunStore) {
    let key = slot("default", 1);
    let run = slot_run(&key, Admission::Unlimited);
    let fired = fire(store, &key, &run, Overlap::Skip).await;
    assert_eq!(fired.result, FireResult::Fired(run.id));
    assert!(fired.cancelled.is_empty());
    let again = slot_run(&key, Admission::Unlimited);
    assert_eq!(
        fire(store, &key, &again, Overlap::Allow).await.result,
        FireResult::AlreadyAccounted(SlotOutcome::Fired(run.id))
    );
    assert!(store.get_run(again.id).await.unwrap().is_none());
    assert_eq!(take_published(store).await, [first(&run)]);
    let stored = store.get_run(run.id).await.unwrap().unwrap();
    assert_eq!(stored.trigger, run.trigger);
    let slots = store.slots(JOB, Some("default"), 10).await.unwrap();
    assert_eq!(slots.len(), 1);
    assert_eq!(slots[0].outcome, SlotOutcome::Fired(run.id));
    assert_eq!((slots[0].fire_at, slots[0].business_date), (hour(1), day()));
}

pub(crate) async fn overlap_skip_and_allow(store: &dyn RunStore) {
    let active = run_of(JOB, Admission::Unlimited);
    store.insert_run(&active, None).await.unwrap();
    take_published(store).await;

    let key = slot("default", 1);
    let skipped = slot_run(&key, Admission::Unlimited);
    let firing = fire(store, &key, &skipped, Overlap::Skip).await;
    assert_eq!(firing.result, FireResult::SkippedOverlap);
    assert!(store.get_run(skipped.id).await.unwrap().is_none());
    let record = &store.slots(JOB, None, 10).await.unwrap()[0];
    assert_eq!(record.outcome, SlotOutcome::Skipped(SkipReason::Overlap));
    assert!(
        record
            .detail
            .as_deref()
            .is_some_and(|d| d.contains(&active.id.to_string())),
        "{record:?}"
    );

    // `allow` starts beside it (still within the job's own admission rule).
    let key = slot("default", 2);
    let allowed = slot_run(&key, Admission::Unlimited);
    assert_eq!(
        fire(store, &key, &allowed, Overlap::Allow).await.result,
        FireResult::Fired(allowed.id)
    );
    assert_eq!(take_published(store).await, [first(&allowed)]);
    let key = slot("default", 3);
    let limited = slot_run(&key, Admission::AtMost(2));
    fire(store, &key, &limited, Overlap::Allow).await;
    assert!(take_published(store).await.is_empty());
}

pub(crate) async fn overlap_buffer_one_keeps_one_waiting_and_buffer_all_every_one(
    store: &dyn RunStore,
) {
    let active = run_of(JOB, Admission::Unlimited);
    store.insert_run(&active, None).await.unwrap();
    take_published(store).await;

    let k1 = slot("default", 1);
    let b1 = slot_run(&k1, Admission::Unlimited);
    assert_eq!(
        fire(store, &k1, &b1, Overlap::BufferOne).await.result,
        FireResult::Fired(b1.id)
    );
    let k2 = slot("default", 2);
    let b2 = slot_run(&k2, Admission::Unlimited);
    assert_eq!(
        fire(store, &k2, &b2, Overlap::BufferOne).await.result,
        FireResult::SkippedOverlap
    );
    let k3 = slot("default", 3);
    let b3 = slot_run(&k3, Admission::Unlimited);
    assert_eq!(
        fire(store, &k3, &b3, Overlap::BufferAll).await.result,
        FireResult::Fired(b3.id)
    );
    // Buffered runs wait for every other run of the job, one after another.
    assert!(take_published(store).await.is_empty());
    let c = claim(store, first(&active)).await;
    store
        .finish(
            c.lease,
            &crate::domain::run::Outcome::Exited { code: 0 },
            0,
            None,
            Utc::now(),
        )
        .await
        .unwrap();
    assert_eq!(take_published(store).await, [first(&b1)]);
    store.cancel(b1.id, Utc::now()).await.unwrap();
    assert_eq!(take_published(store).await, [first(&b3)]);
}

pub(crate) async fn overlap_cancel_other_stops_the_active_runs_then_starts(store: &dyn RunStore) {
    let running = run_of(JOB, Admission::AtMost(1));
    let queued = run_of(JOB, Admission::AtMost(1));
    store.insert_run(&running, None).await.unwrap();
    store.insert_run(&queued, None).await.unwrap();
    assert_eq!(take_published(store).await, [first(&running)]);
    claim(store, first(&running)).await;

    let key = slot("default", 1);
    let new = slot_run(&key, Admission::AtMost(1));
    let firing = fire(store, &key, &new, Overlap::CancelOther).await;
    assert_eq!(firing.result, FireResult::Fired(new.id));
    assert_eq!(firing.cancelled, [running.id, queued.id]);
    let q = store.get_run(queued.id).await.unwrap().unwrap();
    assert_eq!(q.status, RunStatus::Cancelled);
    let r = store.get_run(running.id).await.unwrap().unwrap();
    assert!(r.status == RunStatus::Running && r.cancel_requested);
    // max_concurrent = 1 still holds: the new run waits for the stopping one.
    assert!(take_published(store).await.is_empty());
    let later = Utc::now() + chrono::Duration::seconds(10);
    store.expire_leases(later).await.unwrap();
    assert_eq!(take_published(store).await, [first(&new)]);
}

pub(crate) async fn a_skipped_slot_is_recorded_once_and_never_fires(store: &dyn RunStore) {
    let key = slot("default", 1);
    let now = Utc::now();
    let closed = SkipReason::ClosedDay;
    let skip = |detail| store.skip_slot(&key, hour(1), day(), closed, detail, now);
    assert!(skip(Some("holiday")).await.unwrap());
    assert!(!skip(None).await.unwrap());
    let run = slot_run(&key, Admission::Unlimited);
    assert_eq!(
        fire(store, &key, &run, Overlap::Allow).await.result,
        FireResult::AlreadyAccounted(SlotOutcome::Skipped(closed))
    );
    assert!(store.get_run(run.id).await.unwrap().is_none());
    let records = store.slots(JOB, None, 10).await.unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].detail.as_deref(), Some("holiday"));
    // A fired slot is not skipped afterwards either.
    let fired = slot("default", 2);
    fire(
        store,
        &fired,
        &slot_run(&fired, Admission::Unlimited),
        Overlap::Allow,
    )
    .await;
    let reason = SkipReason::Suspended;
    assert!(
        !store
            .skip_slot(&fired, hour(2), day(), reason, None, now)
            .await
            .unwrap()
    );
}

pub(crate) async fn slots_are_listed_newest_first_and_ranges_oldest_first(store: &dyn RunStore) {
    let now = Utc::now();
    let reason = SkipReason::CatchUpLimit;
    for (schedule, h) in [("a", 3), ("b", 2), ("a", 1), ("a", 5), ("b", 4)] {
        let key = slot(schedule, h);
        store
            .skip_slot(&key, hour(h), day(), reason, None, now)
            .await
            .unwrap();
    }
    let hours = |records: Vec<crate::domain::ports::SlotRecord>| {
        records
            .into_iter()
            .map(|r| (r.key.schedule, r.key.nominal))
            .collect::<Vec<_>>()
    };
    let all = store.slots(JOB, None, 10).await.unwrap();
    assert_eq!(
        hours(all),
        [
            ("a".to_owned(), hour(5)),
            ("b".to_owned(), hour(4)),
            ("a".to_owned(), hour(3)),
            ("b".to_owned(), hour(2)),
            ("a".to_owned(), hour(1)),
        ]
    );
    let a = store.slots(JOB, Some("a"), 2).await.unwrap();
    assert_eq!(
        hours(a),
        [("a".to_owned(), hour(5)), ("a".to_owned(), hour(3))]
    );
    let between = store
        .slots_between(JOB, "a", hour(1), hour(3))
        .await
        .unwrap();
    assert_eq!(
        hours(between),
        [("a".to_owned(), hour(1)), ("a".to_owned(), hour(3))]
    );
    assert!(store.slots("other", None, 10).await.unwrap().is_empty());
}

fn cursor_at(until: DateTime<Utc>, definition: Option<&str>) -> Option<Cursor> {
    Some(Cursor {
        evaluated_until: until,
        definition: definition.map(str::to_owned),
    })
}

pub(crate) async fn a_cursor_never_goes_back(store: &dyn RunStore) {
    assert_eq!(store.cursor(JOB, "default").await.unwrap(), None);
    store.advance_cursor(JOB, "default", hour(5)).await.unwrap();
    store.advance_cursor(JOB, "default", hour(3)).await.unwrap();
    assert_eq!(
        store.cursor(JOB, "default").await.unwrap(),
        cursor_at(hour(5), None)
    );
    store.advance_cursor(JOB, "default", hour(6)).await.unwrap();
    assert_eq!(
        store.cursor(JOB, "default").await.unwrap(),
        cursor_at(hour(6), None)
    );
    assert_eq!(store.cursor(JOB, "other").await.unwrap(), None);
}

pub(crate) async fn a_cursor_keeps_its_definition_until_rebased_and_never_moves_back(
    store: &dyn RunStore,
) {
    // First sight: the cursor is made with its definition.
    store
        .rebase_cursor(JOB, "default", "cron 0 * * * *", hour(5))
        .await
        .unwrap();
    assert_eq!(
        store.cursor(JOB, "default").await.unwrap(),
        cursor_at(hour(5), Some("cron 0 * * * *"))
    );
    // Moving on keeps it.
    store.advance_cursor(JOB, "default", hour(6)).await.unwrap();
    assert_eq!(
        store.cursor(JOB, "default").await.unwrap(),
        cursor_at(hour(6), Some("cron 0 * * * *"))
    );
    // A changed definition from a scheduler whose clock is behind: recorded, but the
    // cursor stays where it is.
    store
        .rebase_cursor(JOB, "default", "cron 30 * * * *", hour(4))
        .await
        .unwrap();
    assert_eq!(
        store.cursor(JOB, "default").await.unwrap(),
        cursor_at(hour(6), Some("cron 30 * * * *"))
    );
    store
        .rebase_cursor(JOB, "default", "cron 15 * * * *", hour(9))
        .await
        .unwrap();
    assert_eq!(
        store.cursor(JOB, "default").await.unwrap(),
        cursor_at(hour(9), Some("cron 15 * * * *"))
    );
    // A cursor from before definitions were kept takes one where it stands.
    store.advance_cursor(JOB, "old", hour(2)).await.unwrap();
    store
        .rebase_cursor(JOB, "old", "cron", hour(2))
        .await
        .unwrap();
    assert_eq!(
        store.cursor(JOB, "old").await.unwrap(),
        cursor_at(hour(2), Some("cron"))
    );
    assert_eq!(store.cursor(JOB, "other").await.unwrap(), None);
}

pub(crate) async fn a_schedule_is_paused_and_resumed(store: &dyn RunStore) {
    assert_eq!(store.pause(JOB, "default").await.unwrap(), None);
    let pause = Pause {
        note: Some("migration".to_owned()),
        at: hour(1),
    };
    store.set_pause(JOB, "default", Some(&pause)).await.unwrap();
    assert_eq!(store.pause(JOB, "default").await.unwrap(), Some(pause));
    assert_eq!(store.pause(JOB, "other").await.unwrap(), None);
    let again = Pause {
        note: None,
        at: hour(2),
    };
    store.set_pause(JOB, "default", Some(&again)).await.unwrap();
    assert_eq!(store.pause(JOB, "default").await.unwrap(), Some(again));
    store.set_pause(JOB, "default", None).await.unwrap();
    assert_eq!(store.pause(JOB, "default").await.unwrap(), None);
}

pub(crate) async fn a_backfill_fires_skipped_or_unseen_slots_and_never_a_fired_one(
    store: &dyn RunStore,
) {
    let fired = slot("default", 1);
    let skipped = slot("default", 2);
    let unseen = slot("default", 3);
    let first_run = slot_run(&fired, Admission::Unlimited);
    fire(store, &fired, &first_run, Overlap::Allow).await;
    assert!(
        store
            .skip_slot(
                &skipped,
                skipped.nominal,
                day(),
                SkipReason::Suspended,
                None,
                Utc::now()
            )
            .await
            .unwrap()
    );
    let backfill = |key: SlotKey| async move {
        let run = slot_run(&key, Admission::AtMost(1));
        let result = store
            .backfill_slot(&key, key.nominal, day(), &run, Utc::now())
            .await
            .unwrap();
        (run, result)
    };
    let (_, again) = backfill(fired.clone()).await;
    assert_eq!(
        again,
        FireResult::AlreadyAccounted(SlotOutcome::Fired(first_run.id))
    );
    let (run2, r2) = backfill(skipped.clone()).await;
    assert_eq!(r2, FireResult::Fired(run2.id));
    let (run3, r3) = backfill(unseen.clone()).await;
    assert_eq!(r3, FireResult::Fired(run3.id));
    // A second backfill over the same slots starts nothing.
    let (_, r2_again) = backfill(skipped.clone()).await;
    assert_eq!(
        r2_again,
        FireResult::AlreadyAccounted(SlotOutcome::Fired(run2.id))
    );
    let slots = store.slots(JOB, Some("default"), 10).await.unwrap();
    let outcomes: Vec<SlotOutcome> = slots.iter().map(|s| s.outcome.clone()).collect();
    assert_eq!(
        outcomes,
        [
            SlotOutcome::Fired(run3.id),
            SlotOutcome::Fired(run2.id),
            SlotOutcome::Fired(first_run.id)
        ]
    );
    assert_eq!(slots[1].detail.as_deref(), Some("backfill"));
    // Backfilled runs obey their admission (max_concurrent 1): the first run is still
    // active, so neither is published yet... except the first run itself.
    let published: Vec<_> = take_published(store)
        .await
        .into_iter()
        .map(|m| m.run_id)
        .collect();
    assert_eq!(published, [first_run.id]);
    let _ = claim;
    let status = store.get_run(run2.id).await.unwrap().unwrap().status;
    assert_eq!(status, RunStatus::Queued);
}
