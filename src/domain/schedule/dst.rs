//! Wall-clock times to instants in a time zone: where a DST gap or fold puts a slot.

use chrono::{DateTime, LocalResult, NaiveDate, NaiveDateTime, Offset, TimeDelta, TimeZone, Utc};
use chrono_tz::Tz;

/// The instants a wall-clock time names in a zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Local {
    Single(DateTime<Utc>),
    /// Clocks fell back: the time occurs twice (earlier, later).
    Fold(DateTime<Utc>, DateTime<Utc>),
    /// Clocks sprang forward over it; the instant is the first one after the gap (the
    /// transition), which is where a shifted slot fires.
    Gap(DateTime<Utc>),
}

impl Local {
    /// The first instant whose wall clock reads this time or later. Monotone in the wall
    /// time, which is what makes it a lower bound for everything enumerated after it.
    pub(super) fn earliest(self) -> DateTime<Utc> {
        match self {
            Local::Single(t) | Local::Fold(t, _) | Local::Gap(t) => t,
        }
    }
}

pub(super) fn resolve(tz: Tz, wall: NaiveDateTime) -> Local {
    match tz.from_local_datetime(&wall) {
        LocalResult::Single(t) => Local::Single(t.with_timezone(&Utc)),
        LocalResult::Ambiguous(a, b) => {
            let (a, b) = (a.with_timezone(&Utc), b.with_timezone(&Utc));
            Local::Fold(a.min(b), a.max(b))
        }
        LocalResult::None => Local::Gap(gap_end(tz, wall)),
    }
}

/// The zone's wall clock at an instant.
pub(super) fn wall(tz: Tz, t: DateTime<Utc>) -> NaiveDateTime {
    t.with_timezone(&tz).naive_local()
}

pub(super) fn local_date(tz: Tz, t: DateTime<Utc>) -> NaiveDate {
    wall(tz, t).date()
}

fn offset(tz: Tz, t: DateTime<Utc>) -> TimeDelta {
    let secs = tz
        .offset_from_utc_datetime(&t.naive_utc())
        .fix()
        .local_minus_utc();
    TimeDelta::seconds(i64::from(secs))
}

/// How far before `wall(t)` a wall time can be and still have an occurrence after `t`:
/// the size of a fold that starts within a day after `t`, else zero.
pub(super) fn fold_reach_after(tz: Tz, t: DateTime<Utc>) -> TimeDelta {
    (offset(tz, t) - offset(tz, t + TimeDelta::days(1))).max(TimeDelta::zero())
}

/// How far after `wall(t)` a wall time can be and still have an occurrence at or before
/// `t`: the size of a fold that started within a day before `t`, else zero.
pub(super) fn fold_reach_before(tz: Tz, t: DateTime<Utc>) -> TimeDelta {
    (offset(tz, t - TimeDelta::days(1)) - offset(tz, t)).max(TimeDelta::zero())
}

/// The first instant after the gap that swallows `wall` (the transition instant).
///
/// Read with the offset after the gap, `wall` names an instant before the transition;
/// read with the offset before it, one after (else `wall` would exist). The transition
/// lies between, and tz data puts transitions on whole seconds: bisect.
fn gap_end(tz: Tz, wall: NaiveDateTime) -> DateTime<Utc> {
    let as_utc = wall.and_utc();
    let before = offset(tz, as_utc - TimeDelta::days(1));
    let after = offset(tz, as_utc + TimeDelta::days(1));
    let reaches = |t: i64| {
        DateTime::from_timestamp(t, 0).is_some_and(|t| t.naive_utc() + offset(tz, t) >= wall)
    };
    let mut lo = (as_utc - after).timestamp(); // does not reach `wall`
    let mut hi = (as_utc - before).timestamp(); // reaches it
    if lo >= hi {
        return as_utc - before;
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if reaches(mid) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    DateTime::from_timestamp(hi, 0).unwrap_or(as_utc - before)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono_tz::America::New_York;
    use chrono_tz::Europe::Berlin;

    fn at(y: i32, m: u32, d: u32, h: u32, min: u32) -> NaiveDateTime {
        NaiveDate::from_ymd_opt(y, m, d)
            .unwrap()
            .and_hms_opt(h, min, 0)
            .unwrap()
    }

    fn utc(y: i32, m: u32, d: u32, h: u32, min: u32) -> DateTime<Utc> {
        at(y, m, d, h, min).and_utc()
    }

    /// The dates the schedule tests rely on, checked against the tz data itself.
    #[test]
    fn transition_dates_2026_are_where_the_tests_expect() {
        assert!(
            New_York
                .from_local_datetime(&at(2026, 3, 8, 2, 30))
                .single()
                .is_none()
        );
        assert!(
            New_York
                .from_local_datetime(&at(2026, 3, 8, 1, 59))
                .single()
                .is_some()
        );
        assert!(
            New_York
                .from_local_datetime(&at(2026, 3, 8, 3, 0))
                .single()
                .is_some()
        );
        assert!(matches!(
            New_York.from_local_datetime(&at(2026, 11, 1, 1, 30)),
            LocalResult::Ambiguous(..)
        ));
        assert!(
            Berlin
                .from_local_datetime(&at(2026, 3, 29, 2, 30))
                .single()
                .is_none()
        );
        assert!(matches!(
            Berlin.from_local_datetime(&at(2026, 10, 25, 2, 30)),
            LocalResult::Ambiguous(..)
        ));
        // The day before and after each is ordinary.
        for (tz, d) in [
            (New_York, at(2026, 3, 7, 2, 30)),
            (New_York, at(2026, 3, 9, 2, 30)),
            (New_York, at(2026, 10, 31, 1, 30)),
            (Berlin, at(2026, 3, 28, 2, 30)),
            (Berlin, at(2026, 10, 26, 2, 30)),
        ] {
            assert!(tz.from_local_datetime(&d).single().is_some(), "{tz} {d}");
        }
    }

    #[test]
    fn gap_resolves_to_the_transition_instant() {
        // New York: 02:00 EST = 07:00 UTC is when clocks jump to 03:00 EDT.
        for m in [0, 1, 30, 59] {
            assert_eq!(
                resolve(New_York, at(2026, 3, 8, 2, m)),
                Local::Gap(utc(2026, 3, 8, 7, 0))
            );
        }
        assert_eq!(
            resolve(New_York, at(2026, 3, 8, 3, 0)),
            Local::Single(utc(2026, 3, 8, 7, 0))
        );
        // Berlin: 02:00 CET = 01:00 UTC.
        assert_eq!(
            resolve(Berlin, at(2026, 3, 29, 2, 30)),
            Local::Gap(utc(2026, 3, 29, 1, 0))
        );
    }

    #[test]
    fn fold_resolves_to_both_occurrences_in_order() {
        assert_eq!(
            resolve(New_York, at(2026, 11, 1, 1, 30)),
            Local::Fold(utc(2026, 11, 1, 5, 30), utc(2026, 11, 1, 6, 30))
        );
        assert_eq!(
            resolve(Berlin, at(2026, 10, 25, 2, 30)),
            Local::Fold(utc(2026, 10, 25, 0, 30), utc(2026, 10, 25, 1, 30))
        );
    }

    #[test]
    fn fold_reach_is_the_fold_near_the_instant() {
        let hour = TimeDelta::hours(1);
        // 2026-11-01 05:45 UTC is 01:45 EDT; 01:10 EST (06:10 UTC) is still ahead.
        assert_eq!(fold_reach_after(New_York, utc(2026, 11, 1, 5, 45)), hour);
        assert_eq!(fold_reach_before(New_York, utc(2026, 11, 1, 6, 10)), hour);
        assert_eq!(
            fold_reach_after(New_York, utc(2026, 6, 1, 0, 0)),
            TimeDelta::zero()
        );
        // A gap is no fold.
        assert_eq!(
            fold_reach_after(New_York, utc(2026, 3, 8, 6, 0)),
            TimeDelta::zero()
        );
        assert_eq!(
            fold_reach_before(New_York, utc(2026, 3, 8, 8, 0)),
            TimeDelta::zero()
        );
    }
}
