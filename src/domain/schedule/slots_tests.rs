//! Slot enumeration against fixed instants: DST, month ends, calendars, bounds.

use std::collections::BTreeSet;
use std::sync::Arc;

use chrono::{DateTime, Datelike, LocalResult, NaiveDate, NaiveTime, TimeZone, Utc, Weekday};
use chrono_tz::America::New_York;
use chrono_tz::Europe::Berlin;
use chrono_tz::Tz;

use super::*;

fn cron(expr: &str, tz: Tz) -> ScheduleSpec {
    let rule = Rule::Cron(CronSchedule::parse(expr, Some(tz.name())).unwrap());
    ScheduleSpec::new("t", rule, tz)
}

fn open_days(days: &[i32], h: u32, m: u32, tz: Tz) -> ScheduleSpec {
    let rule = Rule::OpenDaysOfMonth {
        days: days.to_vec(),
        at: NaiveTime::from_hms_opt(h, m, 0).unwrap(),
    };
    ScheduleSpec::new("t", rule, tz)
}

fn date(y: i32, m: u32, d: u32) -> NaiveDate {
    NaiveDate::from_ymd_opt(y, m, d).unwrap()
}

fn utc(y: i32, m: u32, d: u32, h: u32, min: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, m, d, h, min, 0).unwrap()
}

/// An instant named by an unambiguous wall time.
fn local(tz: Tz, y: i32, m: u32, d: u32, h: u32, min: u32) -> DateTime<Utc> {
    tz.with_ymd_and_hms(y, m, d, h, min, 0)
        .single()
        .unwrap()
        .with_timezone(&Utc)
}

fn assert_gap(tz: Tz, d: NaiveDate, h: u32, m: u32) {
    let wall = d.and_hms_opt(h, m, 0).unwrap();
    assert_eq!(
        tz.from_local_datetime(&wall),
        LocalResult::None,
        "{tz} {wall}"
    );
}

fn assert_fold(tz: Tz, d: NaiveDate, h: u32, m: u32) {
    let wall = d.and_hms_opt(h, m, 0).unwrap();
    assert!(
        matches!(tz.from_local_datetime(&wall), LocalResult::Ambiguous(..)),
        "{tz} {wall}"
    );
}

fn fire_times(slots: &[PlannedSlot]) -> Vec<DateTime<Utc>> {
    slots
        .iter()
        .filter(|s| s.skip.is_none())
        .map(|s| s.fire_at)
        .collect()
}

fn with_calendar(mut spec: ScheduleSpec, cal: Calendar, on: OnClosedDay) -> ScheduleSpec {
    spec.calendar = Some(Arc::new(cal));
    spec.on_closed_day = on;
    spec
}

#[test]
fn new_york_gap_shift_fires_once_at_three() {
    assert_gap(New_York, date(2026, 3, 8), 2, 30);
    let spec = cron("30 2 * * *", New_York);
    let slots = spec.slots_between(utc(2026, 3, 7, 12, 0), utc(2026, 3, 9, 12, 0), 10);
    let three = local(New_York, 2026, 3, 8, 3, 0);
    assert_eq!(three, utc(2026, 3, 8, 7, 0));
    assert_eq!(
        slots[0],
        PlannedSlot {
            nominal: three,
            fire_at: three,
            business_date: date(2026, 3, 8),
            moved: Some(Moved::DstGap),
            skip: None,
        }
    );
    assert_eq!(slots[1].fire_at, local(New_York, 2026, 3, 9, 2, 30));
    assert_eq!(slots.len(), 2);
}

#[test]
fn new_york_gap_skip_records_dst_gap() {
    let mut spec = cron("30 2 * * *", New_York);
    spec.on_gap = OnGap::Skip;
    let slots = spec.slots_between(utc(2026, 3, 7, 12, 0), utc(2026, 3, 9, 12, 0), 10);
    assert_eq!(slots.len(), 2);
    assert_eq!(slots[0].nominal, utc(2026, 3, 8, 7, 0));
    assert_eq!(slots[0].skip, Some(SkipReason::DstGap));
    assert_eq!(slots[0].moved, None);
    assert_eq!(
        spec.upcoming(utc(2026, 3, 7, 12, 0), 1)[0].fire_at,
        local(New_York, 2026, 3, 9, 2, 30)
    );
}

#[test]
fn berlin_gap_shift_and_skip() {
    assert_gap(Berlin, date(2026, 3, 29), 2, 30);
    let three = local(Berlin, 2026, 3, 29, 3, 0);
    assert_eq!(three, utc(2026, 3, 29, 1, 0));
    let (from, to) = (utc(2026, 3, 28, 12, 0), utc(2026, 3, 29, 12, 0));
    let mut spec = cron("30 2 * * *", Berlin);
    let slots = spec.slots_between(from, to, 10);
    assert_eq!(slots.len(), 1);
    assert_eq!(
        (slots[0].fire_at, slots[0].moved),
        (three, Some(Moved::DstGap))
    );
    spec.on_gap = OnGap::Skip;
    let slots = spec.slots_between(from, to, 10);
    assert_eq!(slots.len(), 1);
    assert_eq!(
        (slots[0].nominal, slots[0].skip),
        (three, Some(SkipReason::DstGap))
    );
}

#[test]
fn new_york_fold_fires_first_occurrence_or_both() {
    assert_fold(New_York, date(2026, 11, 1), 1, 30);
    let (from, to) = (utc(2026, 10, 31, 12, 0), utc(2026, 11, 1, 12, 0));
    let mut spec = cron("30 1 * * *", New_York);
    let slots = spec.slots_between(from, to, 10);
    assert_eq!(fire_times(&slots), [utc(2026, 11, 1, 5, 30)]);
    assert_eq!(slots[0].moved, None);
    spec.on_fold = OnFold::Both;
    let slots = spec.slots_between(from, to, 10);
    assert_eq!(
        fire_times(&slots),
        [utc(2026, 11, 1, 5, 30), utc(2026, 11, 1, 6, 30)]
    );
    assert_eq!(slots[1].moved, Some(Moved::DstFoldSecond));
    assert_eq!(slots[1].nominal, slots[1].fire_at);
    assert_eq!(slots[1].business_date, date(2026, 11, 1));
    // A range that starts between the two occurrences still finds the second.
    let slots = spec.slots_between(utc(2026, 11, 1, 5, 45), to, 10);
    assert_eq!(fire_times(&slots), [utc(2026, 11, 1, 6, 30)]);
    // And one that ends between them, only the first.
    let slots = spec.slots_between(from, utc(2026, 11, 1, 6, 0), 10);
    assert_eq!(fire_times(&slots), [utc(2026, 11, 1, 5, 30)]);
}

#[test]
fn berlin_fold_both() {
    assert_fold(Berlin, date(2026, 10, 25), 2, 30);
    let mut spec = cron("30 2 * * *", Berlin);
    spec.on_fold = OnFold::Both;
    let slots = spec.slots_between(utc(2026, 10, 24, 12, 0), utc(2026, 10, 25, 12, 0), 10);
    assert_eq!(
        fire_times(&slots),
        [utc(2026, 10, 25, 0, 30), utc(2026, 10, 25, 1, 30)]
    );
}

#[test]
fn quarter_hours_in_a_gap_collapse_to_one_slot() {
    // Every quarter hour: 02:00..02:45 do not exist and merge into 03:00's slot.
    let spec = cron("*/15 * * * *", New_York);
    let slots = spec.slots_between(utc(2026, 3, 8, 6, 0), utc(2026, 3, 8, 7, 30), 100);
    let want: Vec<DateTime<Utc>> = [(6, 15), (6, 30), (6, 45), (7, 0), (7, 15), (7, 30)]
        .iter()
        .map(|(h, m)| utc(2026, 3, 8, *h, *m))
        .collect();
    assert_eq!(fire_times(&slots), want);
    assert_eq!(slots.len(), want.len());
    assert_eq!(slots[3].moved, None, "merged into the regular 03:00 slot");

    // Only inside the gap: the four wall times are one shifted slot.
    let mut spec = cron("*/15 2 * * *", New_York);
    let (from, to) = (utc(2026, 3, 8, 0, 0), utc(2026, 3, 8, 12, 0));
    let slots = spec.slots_between(from, to, 100);
    assert_eq!(slots.len(), 1);
    assert_eq!(slots[0].fire_at, utc(2026, 3, 8, 7, 0));
    assert_eq!(slots[0].moved, Some(Moved::DstGap));
    spec.on_gap = OnGap::Skip;
    let slots = spec.slots_between(from, to, 100);
    assert_eq!(slots.len(), 1);
    assert_eq!(slots[0].skip, Some(SkipReason::DstGap));
}

#[test]
fn leap_day_cron() {
    let spec = cron("0 0 29 2 *", chrono_tz::UTC);
    let from = utc(2026, 1, 1, 0, 0);
    assert_eq!(
        fire_times(&spec.upcoming(from, 3)),
        [utc(2028, 2, 29, 0, 0)],
        "2032 is past the preview horizon"
    );
    assert_eq!(
        fire_times(&spec.slots_between(from, utc(2037, 1, 1, 0, 0), 10)),
        [
            utc(2028, 2, 29, 0, 0),
            utc(2032, 2, 29, 0, 0),
            utc(2036, 2, 29, 0, 0)
        ]
    );
}

#[test]
fn last_open_day_of_february() {
    let spec = open_days(&[-1], 17, 0, New_York);
    // 2028 is a leap year and Feb 29 a Tuesday; 2027's Feb 28 is a Sunday.
    assert_eq!(date(2028, 2, 29).weekday(), Weekday::Tue);
    assert_eq!(date(2027, 2, 28).weekday(), Weekday::Sun);
    let slots = spec.slots_between(utc(2028, 2, 1, 0, 0), utc(2028, 3, 1, 0, 0), 10);
    assert_eq!(fire_times(&slots), [local(New_York, 2028, 2, 29, 17, 0)]);
    assert_eq!(slots[0].business_date, date(2028, 2, 29));
    let slots = spec.slots_between(utc(2027, 2, 1, 0, 0), utc(2027, 3, 1, 0, 0), 10);
    assert_eq!(fire_times(&slots), [local(New_York, 2027, 2, 26, 17, 0)]);
}

#[test]
fn open_days_of_a_month_that_starts_on_a_weekend() {
    assert_eq!(date(2026, 8, 1).weekday(), Weekday::Sat);
    let spec = open_days(&[1, 2, -2, -1], 9, 0, Berlin);
    let slots = spec.slots_between(utc(2026, 8, 1, 0, 0), utc(2026, 9, 1, 0, 0), 10);
    let days: Vec<NaiveDate> = slots.iter().map(|s| s.business_date).collect();
    assert_eq!(
        days,
        [
            date(2026, 8, 3),
            date(2026, 8, 4),
            date(2026, 8, 28),
            date(2026, 8, 31)
        ]
    );
    // With a holiday on the first Monday, the first open day is Tuesday, and days
    // named twice (1 and -2 in a short month) are one slot.
    let mut cal = Calendar::weekdays("t");
    cal.closed.insert(date(2026, 8, 3));
    let spec = with_calendar(open_days(&[1, -21], 9, 0, Berlin), cal, OnClosedDay::Skip);
    let slots = spec.slots_between(utc(2026, 8, 1, 0, 0), utc(2026, 9, 1, 0, 0), 10);
    assert_eq!(fire_times(&slots), [local(Berlin, 2026, 8, 4, 9, 0)]);
    // No month has 30 open days: nothing, and the search ends.
    assert!(
        open_days(&[30], 9, 0, Berlin)
            .upcoming(utc(2026, 1, 1, 0, 0), 3)
            .is_empty()
    );
}

/// Fridays at 09:00, with Friday 2026-07-03 a holiday.
fn fridays_with_holiday(on: OnClosedDay) -> ScheduleSpec {
    assert_eq!(date(2026, 7, 3).weekday(), Weekday::Fri);
    let mut cal = Calendar::weekdays("t");
    cal.closed.insert(date(2026, 7, 3));
    with_calendar(cron("0 9 * * 5", chrono_tz::UTC), cal, on)
}

#[test]
fn holiday_skip_and_run() {
    let (from, to) = (utc(2026, 7, 1, 0, 0), utc(2026, 7, 8, 0, 0));
    let slots = fridays_with_holiday(OnClosedDay::Skip).slots_between(from, to, 10);
    assert_eq!(slots.len(), 1);
    assert_eq!(slots[0].fire_at, utc(2026, 7, 3, 9, 0));
    assert_eq!(slots[0].skip, Some(SkipReason::ClosedDay));
    let slots = fridays_with_holiday(OnClosedDay::Run).slots_between(from, to, 10);
    assert_eq!(fire_times(&slots), [utc(2026, 7, 3, 9, 0)]);
    assert_eq!(slots[0].moved, None);
}

#[test]
fn holiday_previous_open_fires_the_day_before() {
    let spec = fridays_with_holiday(OnClosedDay::PreviousOpen);
    let want = PlannedSlot {
        nominal: utc(2026, 7, 3, 9, 0),
        fire_at: utc(2026, 7, 2, 9, 0),
        business_date: date(2026, 7, 2),
        moved: Some(Moved::ClosedDay {
            from: date(2026, 7, 3),
        }),
        skip: None,
    };
    let slots = spec.slots_between(utc(2026, 7, 1, 0, 0), utc(2026, 7, 8, 0, 0), 10);
    assert_eq!(slots, std::slice::from_ref(&want));
    // Found by a range that ends before its nominal instant.
    let slots = spec.slots_between(utc(2026, 7, 2, 0, 0), utc(2026, 7, 2, 23, 0), 10);
    assert_eq!(slots, [want]);
    assert!(
        spec.slots_between(utc(2026, 7, 2, 10, 0), utc(2026, 7, 3, 23, 0), 10)
            .is_empty()
    );
}

#[test]
fn holiday_next_open_fires_on_monday() {
    let spec = fridays_with_holiday(OnClosedDay::NextOpen);
    let slots = spec.slots_between(utc(2026, 7, 6, 0, 0), utc(2026, 7, 6, 23, 0), 10);
    assert_eq!(slots.len(), 1);
    assert_eq!(slots[0].nominal, utc(2026, 7, 3, 9, 0));
    assert_eq!(slots[0].fire_at, utc(2026, 7, 6, 9, 0));
    assert_eq!(slots[0].business_date, date(2026, 7, 6));
    assert!(
        spec.slots_between(utc(2026, 7, 3, 0, 0), utc(2026, 7, 5, 23, 0), 10)
            .is_empty()
    );
}

#[test]
fn holiday_shift_bound_exceeded_is_a_closed_day() {
    let mut spec = fridays_with_holiday(OnClosedDay::NextOpen);
    spec.max_shift_days = 2; // Monday is three days away
    let slots = spec.slots_between(utc(2026, 7, 1, 0, 0), utc(2026, 7, 8, 0, 0), 10);
    assert_eq!(slots.len(), 1);
    assert_eq!(slots[0].fire_at, slots[0].nominal);
    assert_eq!(
        (slots[0].moved, slots[0].skip),
        (None, Some(SkipReason::ClosedDay))
    );
    spec.max_shift_days = 3;
    assert_eq!(
        fire_times(&spec.slots_between(utc(2026, 7, 1, 0, 0), utc(2026, 7, 8, 0, 0), 10)),
        [utc(2026, 7, 6, 9, 0)]
    );
}

#[test]
fn moved_slots_landing_on_one_instant_fire_once() {
    let weekend = with_calendar(
        cron("0 2 * * 6,0", New_York),
        Calendar::weekdays("t"),
        OnClosedDay::NextOpen,
    );
    let (from, to) = (utc(2026, 7, 3, 0, 0), utc(2026, 7, 7, 0, 0));
    let slots = weekend.slots_between(from, to, 10);
    let monday = local(New_York, 2026, 7, 6, 2, 0);
    assert_eq!(slots.len(), 2);
    assert!(slots.iter().all(|s| s.fire_at == monday));
    assert_eq!(slots[0].nominal, local(New_York, 2026, 7, 4, 2, 0));
    assert_eq!(slots[0].skip, None, "the earliest nominal fires");
    assert_eq!(slots[1].skip, Some(SkipReason::ClosedDay));

    // Onto Monday's own slot: that one fires.
    let daily = with_calendar(
        cron("0 2 * * *", New_York),
        Calendar::weekdays("t"),
        OnClosedDay::NextOpen,
    );
    let slots = daily.slots_between(utc(2026, 7, 5, 12, 0), to, 10);
    assert_eq!(slots.len(), 3);
    let firing: Vec<&PlannedSlot> = slots.iter().filter(|s| s.skip.is_none()).collect();
    assert_eq!(firing.len(), 1);
    assert_eq!((firing[0].nominal, firing[0].moved), (monday, None));
}

#[test]
fn closed_sunday_gap_moves_to_monday() {
    // The gap Sunday is closed: its 02:30 fires at Monday 02:30, keeping the nominal
    // instant the gap gave it.
    let spec = with_calendar(
        cron("30 2 * * *", New_York),
        Calendar::weekdays("t"),
        OnClosedDay::NextOpen,
    );
    let slots = spec.slots_between(utc(2026, 3, 9, 0, 0), utc(2026, 3, 9, 12, 0), 10);
    let monday = local(New_York, 2026, 3, 9, 2, 30);
    assert_eq!(slots.len(), 3); // Saturday's, Sunday's and Monday's own
    let sunday = slots
        .iter()
        .find(|s| s.nominal == utc(2026, 3, 8, 7, 0))
        .unwrap();
    assert_eq!(sunday.fire_at, monday);
    assert_eq!(sunday.skip, Some(SkipReason::ClosedDay));
    assert_eq!(fire_times(&slots), [monday]);
}

/// Every slot of a range, and the same range read in pages of `max`.
fn whole_and_paged(spec: &ScheduleSpec, from: DateTime<Utc>, to: DateTime<Utc>, max: usize) {
    let all = spec.slots_between(from, to, usize::MAX);
    assert!(!all.is_empty());
    assert!(
        all.windows(2)
            .all(|w| (w[0].fire_at, w[0].nominal) < (w[1].fire_at, w[1].nominal))
    );
    let nominals: BTreeSet<DateTime<Utc>> = all.iter().map(|s| s.nominal).collect();
    assert_eq!(nominals.len(), all.len(), "one slot per nominal instant");
    let mut paged = Vec::new();
    let mut cursor = from;
    while cursor < to {
        let page = spec.slots_page(cursor, to, max);
        assert!(page.complete_until > cursor);
        paged.extend(page.slots);
        cursor = page.complete_until;
    }
    assert_eq!(paged, all, "pages of {max}");
}

#[test]
fn max_and_pages_cover_the_range_in_order() {
    let spec = with_calendar(
        cron("*/30 * * * *", New_York),
        Calendar::weekdays("t"),
        OnClosedDay::NextOpen,
    );
    let (from, to) = (utc(2026, 3, 5, 0, 0), utc(2026, 3, 12, 0, 0));
    let all = spec.slots_between(from, to, usize::MAX);
    let first = spec.slots_page(from, to, 5);
    assert_eq!(first.slots, all[..5]);
    assert_eq!(first.complete_until, all[4].fire_at);
    for max in [1, 7, 50] {
        whole_and_paged(&spec, from, to, max);
    }

    // Moved back over the fold weekend, both occurrences.
    let mut spec = with_calendar(
        cron("*/20 1,2 * * *", New_York),
        Calendar::weekdays("t"),
        OnClosedDay::PreviousOpen,
    );
    spec.on_fold = OnFold::Both;
    for max in [1, 4, 9] {
        whole_and_paged(&spec, utc(2026, 10, 29, 0, 0), utc(2026, 11, 4, 0, 0), max);
    }

    // Many weekend slots land on Monday 00:00..; ties are never split by a page.
    let spec = with_calendar(
        cron("*/30 * * * *", New_York),
        Calendar::weekdays("t"),
        OnClosedDay::NextOpen,
    );
    let monday = spec.slots_page(utc(2026, 3, 8, 23, 0), to, 2);
    let edge = monday.slots[1].fire_at;
    assert!(monday.slots.iter().all(|s| s.fire_at == edge) && monday.slots.len() == 3);
}

#[test]
fn per_second_cron_over_years_is_bounded() {
    let spec = cron("* * * * * *", chrono_tz::UTC);
    let (from, to) = (utc(2026, 1, 1, 0, 0), utc(2036, 1, 1, 0, 0));
    let page = spec.slots_page(from, to, usize::MAX);
    assert!(!page.slots.is_empty() && page.slots.len() <= ITERATION_BUDGET);
    assert!(page.complete_until < to);
    assert!(page.slots.iter().all(|s| s.fire_at <= page.complete_until));
    assert_eq!(
        fire_times(&spec.upcoming(from, 2)),
        [
            from + chrono::TimeDelta::seconds(1),
            from + chrono::TimeDelta::seconds(2)
        ]
    );
}

#[test]
fn per_second_cron_moved_back_makes_progress() {
    // Saturday's and Sunday's seconds all land on Friday's: three slots per second.
    let spec = with_calendar(
        cron("* * * * * *", chrono_tz::UTC),
        Calendar::weekdays("t"),
        OnClosedDay::PreviousOpen,
    );
    let from = utc(2026, 7, 31, 0, 0);
    let page = spec.slots_page(from, utc(2026, 8, 3, 0, 0), 10);
    assert_eq!(
        page.slots.len(),
        12,
        "the fourth second's three slots stay together"
    );
    assert_eq!(page.complete_until, from + chrono::TimeDelta::seconds(4));
    assert_eq!(fire_times(&page.slots).len(), 4);
}

#[test]
fn upcoming_ends_for_schedules_that_never_fire() {
    let after = utc(2026, 1, 1, 0, 0);
    assert!(
        cron("0 0 30 2 *", chrono_tz::UTC)
            .upcoming(after, 3)
            .is_empty()
    );
    let mut closed = Calendar::weekdays("closed");
    closed.open_weekdays.clear();
    for on in [OnClosedDay::Skip, OnClosedDay::NextOpen] {
        let spec = with_calendar(cron("0 9 * * *", chrono_tz::UTC), closed.clone(), on);
        assert!(spec.upcoming(after, 3).is_empty(), "{on:?}");
    }
    let spec = with_calendar(open_days(&[1], 9, 0, Berlin), closed, OnClosedDay::Skip);
    assert!(spec.upcoming(after, 3).is_empty());
}

#[test]
fn upcoming_skips_what_will_not_fire() {
    let spec = fridays_with_holiday(OnClosedDay::Skip);
    assert_eq!(
        fire_times(&spec.upcoming(utc(2026, 6, 27, 0, 0), 2)),
        [utc(2026, 7, 10, 9, 0), utc(2026, 7, 17, 9, 0)]
    );
}

#[test]
fn empty_ranges() {
    let spec = cron("* * * * *", chrono_tz::UTC);
    let t = utc(2026, 1, 1, 0, 0);
    assert_eq!(spec.slots_page(t, t, 10).complete_until, t);
    assert!(
        spec.slots_between(t, t - chrono::TimeDelta::hours(1), 10)
            .is_empty()
    );
    assert!(
        spec.slots_between(t, t + chrono::TimeDelta::hours(1), 0)
            .is_empty()
    );
    assert!(
        spec.slots_between(DateTime::<Utc>::MIN_UTC, DateTime::<Utc>::MAX_UTC, 1)
            .len()
            == 1
    );
}
