use super::*;
use crate::domain::schedule::Overlap;
use crate::store::postgres::testdb;
use crate::store::suite::{hour, slot, slot_run};

async fn runs_with_id(store: &PgStore, id: RunId) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM runs WHERE id = $1")
        .bind(id.to_string())
        .fetch_one(store.pool())
        .await
        .unwrap()
}

/// Two stores on one database (two schedulers, or two `serve` replicas) race for the
/// same slots: each slot fires exactly once, and the loser is told which run won.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_stores_on_one_database_never_fire_a_slot_twice() {
    let (a, db) = testdb::open().await;
    let b = PgStore::open(&db.url, 4).await.unwrap();
    let day = NaiveDate::from_ymd_opt(2026, 3, 1).unwrap();
    for h in 0..20 {
        let key = slot("default", h);
        let (run_a, run_b) = (
            slot_run(&key, Admission::Unlimited),
            slot_run(&key, Admission::Unlimited),
        );
        let now = Utc::now();
        let (fa, fb) = tokio::join!(
            a.fire_slot(&key, hour(h), day, &run_a, Overlap::Allow, now),
            b.fire_slot(&key, hour(h), day, &run_b, Overlap::Allow, now),
        );
        let results = [fa.unwrap().result, fb.unwrap().result];
        let winner = match &results {
            [
                FireResult::Fired(id),
                FireResult::AlreadyAccounted(SlotOutcome::Fired(w)),
            ]
            | [
                FireResult::AlreadyAccounted(SlotOutcome::Fired(w)),
                FireResult::Fired(id),
            ] if id == w => *id,
            other => panic!("slot {h} fired as {other:?}"),
        };
        let loser = if winner == run_a.id {
            run_b.id
        } else {
            run_a.id
        };
        assert_eq!(runs_with_id(&a, winner).await, 1);
        assert_eq!(runs_with_id(&b, loser).await, 0);
    }
    let runs: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM runs")
        .fetch_one(a.pool())
        .await
        .unwrap();
    assert_eq!(runs, 20);
}

/// Two stores on one database record the same skipped slots at once: each slot is
/// written by exactly one of them (the other's insert, of a row it cannot see yet,
/// is a conflict run again, after which it sees the slot accounted for).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_stores_on_one_database_never_record_a_slot_twice() {
    let (a, db) = testdb::open().await;
    let b = PgStore::open(&db.url, 4).await.unwrap();
    let day = NaiveDate::from_ymd_opt(2026, 3, 1).unwrap();
    for h in 0..20 {
        let key = slot("default", h);
        let now = Utc::now();
        let (wa, wb) = tokio::join!(
            a.skip_slot(&key, hour(h), day, SkipReason::Overlap, Some("a"), now),
            b.skip_slot(&key, hour(h), day, SkipReason::Overlap, Some("b"), now),
        );
        let (wa, wb) = (wa.unwrap(), wb.unwrap());
        assert!(wa != wb, "slot {h}: written by a: {wa}, by b: {wb}");
        let recorded = a.slots_between(&key.job, "default", hour(h), hour(h)).await;
        let recorded = recorded.unwrap();
        assert_eq!(recorded.len(), 1);
        let writer = if wa { "a" } else { "b" };
        assert_eq!(recorded[0].detail.as_deref(), Some(writer));
    }
}
