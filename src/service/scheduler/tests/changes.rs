//! A schedule whose definition changes (a reload, or a restart with edited job files),
//! and one removed and added back unchanged.

use super::*;

#[tokio::test]
async fn a_schedule_whose_cron_changes_fires_no_slot_of_the_new_rule_from_before_the_change() {
    let hourly = |expr: &str| {
        let mut s = cron("default", expr, "UTC");
        s.overlap = Overlap::Allow;
        s.catch_up = CatchUp::All; // would fire every missed slot of the gap
        vec![job("edited", vec![s], None)]
    };
    let f = fixture(hourly("0 * * * *"), utc(2026, 1, 5, 0, 30)).await;
    f.tick_at(utc(2026, 1, 5, 0, 30)).await;
    f.run_until(utc(2026, 1, 5, 1, 10), chrono::Duration::minutes(1))
        .await;
    // Stopped at 01:10; the job file now says half past; started again at 05:45. The
    // new rule's 01:30 .. 05:30 were never the schedule's: none fires or is recorded.
    f.jobs.set(hourly("30 * * * *"));
    assert!(f.tick_at(utc(2026, 1, 5, 5, 45)).await.is_empty());
    let cursor = f.store.cursor("edited", "default").await.unwrap().unwrap();
    assert_eq!(cursor.evaluated_until, utc(2026, 1, 5, 5, 45));
    // From then on, the new rule's slots fire.
    f.run_until(utc(2026, 1, 5, 7, 40), chrono::Duration::minutes(1))
        .await;
    assert_eq!(
        fired(&f.slots("edited").await),
        [
            utc(2026, 1, 5, 1, 0),
            utc(2026, 1, 5, 6, 30),
            utc(2026, 1, 5, 7, 30)
        ]
    );
    assert_eq!(f.slots("edited").await.len(), 3, "no slot recorded skipped");

    // A reload between two ticks: the same, the change counts from the tick that saw it.
    f.jobs.set(hourly("45 * * * *"));
    f.run_until(utc(2026, 1, 5, 8, 50), chrono::Duration::minutes(1))
        .await;
    assert_eq!(
        fired(&f.slots("edited").await).last(),
        Some(&utc(2026, 1, 5, 8, 45))
    );
}

#[tokio::test]
async fn a_schedule_back_unchanged_catches_up_and_an_old_cursor_is_adopted() {
    let mut s = cron("default", "0 * * * *", "UTC");
    s.overlap = Overlap::Allow;
    s.catch_up = CatchUp::All;
    s.catch_up_window = Duration::from_secs(3 * 3600);
    let with = vec![job("back", vec![s], None)];
    let f = fixture(with.clone(), utc(2026, 1, 5, 0, 30)).await;
    f.tick_at(utc(2026, 1, 5, 0, 30)).await;
    // Removed from the job file for a while, then added back as it was: as after
    // downtime, the catch-up policy decides, within its window.
    f.jobs.set(vec![job("back", Vec::new(), None)]);
    f.run_until(utc(2026, 1, 5, 5, 10), chrono::Duration::minutes(5))
        .await;
    f.jobs.set(with.clone());
    f.tick_at(utc(2026, 1, 5, 5, 10)).await;
    let slots = f.slots("back").await;
    assert_eq!(
        fired(&slots),
        [3, 4, 5].map(|h| utc(2026, 1, 5, h, 0)),
        "{slots:#?}"
    );
    assert_eq!(
        skipped(&slots, SkipReason::OutsideCatchUpWindow),
        [1, 2].map(|h| utc(2026, 1, 5, h, 0))
    );

    // A cursor written before definitions were kept (no definition): not a change.
    let f = fixture(with, utc(2026, 1, 5, 0, 30)).await;
    f.store
        .advance_cursor("back", "default", utc(2026, 1, 5, 0, 30))
        .await
        .unwrap();
    f.tick_at(utc(2026, 1, 5, 2, 10)).await;
    assert_eq!(
        fired(&f.slots("back").await),
        [1, 2].map(|h| utc(2026, 1, 5, h, 0))
    );
    let cursor = f.store.cursor("back", "default").await.unwrap().unwrap();
    assert!(cursor.definition.is_some_and(|d| d.starts_with("v1 cron=")));
}
