//! A schedule's definition as one stable text, kept with its cursor: when the text the
//! scheduler sees differs from the stored one, the schedule changed and takes effect
//! from its next slot.
//!
//! It holds what decides *which* slots a schedule has and when they fire: the rule, the
//! zone, the calendar (by name and content) and the closed-day and DST rules. What
//! only decides what a slot does (overlap, catch-up, params, `suspended`) is left out,
//! so changing those never drops a slot. The text must stay the same across versions
//! for the same definition (or every cursor resets once on upgrade): no `Debug`
//! output, no std hasher (its algorithm may change), only the spelling below.

use std::fmt::Write as _;

use chrono::NaiveDate;

use crate::domain::schedule::{Calendar, Rule, ScheduleSpec};

/// The fingerprint of `spec`'s definition, e.g.
/// `v1 cron="0 9 * * 1-5" zone=Asia/Tokyo calendar=jp:5f0c... on_closed_day=skip
/// max_shift_days=7 on_gap=shift on_fold=first`.
pub fn fingerprint(spec: &ScheduleSpec) -> String {
    let mut text = String::from("v1 ");
    match &spec.rule {
        Rule::Cron(cron) => {
            // Spacing is not meaning.
            let expression: Vec<&str> = cron.expression.split_whitespace().collect();
            let _ = write!(text, "cron={:?}", expression.join(" "));
        }
        Rule::OpenDaysOfMonth { days, at } => {
            let days: Vec<String> = days.iter().map(i32::to_string).collect();
            let _ = write!(
                text,
                "open_days_of_month={} at={}",
                days.join(","),
                at.format("%H:%M:%S%.f")
            );
        }
    }
    let _ = write!(text, " zone={}", spec.time_zone.name());
    match &spec.calendar {
        Some(calendar) => {
            let _ = write!(
                text,
                " calendar={}:{:016x}",
                calendar.name,
                content_hash(calendar)
            );
        }
        None => text.push_str(" calendar=none"),
    }
    let _ = write!(
        text,
        " on_closed_day={} max_shift_days={} on_gap={} on_fold={}",
        spec.on_closed_day.as_str(),
        spec.max_shift_days,
        spec.on_gap.as_str(),
        spec.on_fold.as_str()
    );
    text
}

/// FNV-1a (64 bit) of the calendar's days: which weekdays are open, and the dates
/// listed closed and open (sorted sets, so the order in its files does not count).
fn content_hash(calendar: &Calendar) -> u64 {
    let mut hash = Fnv1a::default();
    let dates = |set: &std::collections::BTreeSet<NaiveDate>| -> String {
        set.iter()
            .map(|d| d.format("%Y-%m-%d").to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let weekdays: Vec<String> = calendar.open_weekdays.iter().map(u32::to_string).collect();
    hash.write(format!("weekdays={}", weekdays.join(",")).as_bytes());
    hash.write(format!(";closed={}", dates(&calendar.closed)).as_bytes());
    hash.write(format!(";open={}", dates(&calendar.open)).as_bytes());
    hash.0
}

struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv1a {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use chrono::NaiveTime;

    use super::*;
    use crate::domain::job::Schedule;
    use crate::domain::schedule::{CatchUp, OnClosedDay, OnFold, Overlap};

    fn cron(expr: &str, zone: &str) -> ScheduleSpec {
        ScheduleSpec::new(
            "default",
            Rule::Cron(Schedule::parse(expr, Some(zone)).unwrap()),
            zone.parse().unwrap(),
        )
    }

    fn date(d: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(2026, 5, d).unwrap()
    }

    #[test]
    fn the_text_is_frozen_for_a_plain_cron_schedule() {
        assert_eq!(
            fingerprint(&cron("0 9 * * 1-5", "Asia/Tokyo")),
            "v1 cron=\"0 9 * * 1-5\" zone=Asia/Tokyo calendar=none on_closed_day=skip \
             max_shift_days=7 on_gap=shift on_fold=first"
        );
        // Spacing in the expression is not a change.
        assert_eq!(
            fingerprint(&cron(" 0  9 * * 1-5", "Asia/Tokyo")),
            fingerprint(&cron("0 9 * * 1-5", "Asia/Tokyo"))
        );
    }

    #[test]
    fn what_decides_the_slots_changes_it_and_what_a_slot_does_does_not() {
        let base = cron("0 9 * * *", "UTC");
        let same = fingerprint(&base);
        let mut changed = vec![cron("0 10 * * *", "UTC"), cron("0 9 * * *", "Europe/Paris")];
        let mut s = base.clone();
        s.calendar = Some(Arc::new(Calendar::weekdays("ops")));
        changed.push(s);
        let mut s = base.clone();
        s.on_closed_day = OnClosedDay::NextOpen;
        changed.push(s);
        let mut s = base.clone();
        s.max_shift_days = 3;
        changed.push(s);
        let mut s = base.clone();
        s.on_fold = OnFold::Both;
        changed.push(s);
        let mut s = base.clone();
        s.rule = Rule::OpenDaysOfMonth {
            days: vec![1, -1],
            at: NaiveTime::from_hms_opt(9, 0, 0).unwrap(),
        };
        changed.push(s);
        for s in &changed {
            assert_ne!(fingerprint(s), same, "{s:?}");
        }

        let mut s = base.clone();
        s.overlap = Overlap::Allow;
        s.catch_up = CatchUp::All;
        s.suspended = true;
        s.params.insert("region".into(), "eu".into());
        assert_eq!(fingerprint(&s), same);
    }

    #[test]
    fn a_calendar_counts_by_its_days_not_by_how_they_were_listed() {
        let with = |closed: &[u32], open: &[u32]| {
            let mut c = Calendar::weekdays("ops");
            c.closed = closed.iter().map(|d| date(*d)).collect();
            c.open = open.iter().map(|d| date(*d)).collect();
            let mut s = cron("0 9 * * *", "UTC");
            s.calendar = Some(Arc::new(c));
            fingerprint(&s)
        };
        assert_eq!(with(&[4, 5], &[]), with(&[5, 4], &[]));
        assert_ne!(with(&[4, 5], &[]), with(&[4], &[]), "a holiday less");
        assert_ne!(with(&[4], &[]), with(&[4], &[9]), "a Saturday opened");
        // The closed date moved into the open list: another calendar.
        assert_ne!(with(&[4], &[]), with(&[], &[4]));
    }
}
