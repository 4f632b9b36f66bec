//! Business calendars: which days are open. A flattened calendar: `include`s are merged
//! by the loader (`crate::catalog`), so here a day is open or closed by three lists.

use std::collections::BTreeSet;

use chrono::{Datelike, Days, NaiveDate, Weekday};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Calendar {
    pub name: String,
    /// Weekdays open unless listed in `closed` (Mon-Fri by default).
    pub open_weekdays: BTreeSet<u32>, // Weekday::num_days_from_monday, 0 = Monday
    /// Dates closed although their weekday is open (holidays).
    pub closed: BTreeSet<NaiveDate>,
    /// Dates open although their weekday is closed or they are listed in `closed`.
    pub open: BTreeSet<NaiveDate>,
}

impl Calendar {
    /// Mon-Fri open, no exceptions.
    pub fn weekdays(name: impl Into<String>) -> Calendar {
        Calendar {
            name: name.into(),
            open_weekdays: (0..5).collect(),
            closed: BTreeSet::new(),
            open: BTreeSet::new(),
        }
    }

    pub fn is_open(&self, date: NaiveDate) -> bool {
        if self.open.contains(&date) {
            return true;
        }
        if self.closed.contains(&date) {
            return false;
        }
        self.open_weekdays
            .contains(&date.weekday().num_days_from_monday())
    }

    pub fn is_open_weekday(&self, day: Weekday) -> bool {
        self.open_weekdays.contains(&day.num_days_from_monday())
    }

    /// The open days of a month, in order (empty for a month that does not exist).
    pub fn open_days_in_month(&self, year: i32, month: u32) -> Vec<NaiveDate> {
        let Some(first) = NaiveDate::from_ymd_opt(year, month, 1) else {
            return Vec::new();
        };
        first
            .iter_days()
            .take_while(|d| d.month() == month)
            .filter(|d| self.is_open(*d))
            .collect()
    }

    /// The n-th open day of a month: 1 = first, 2 = second, -1 = last, -2 = second last.
    /// None for n = 0 or when the month has fewer than |n| open days.
    pub fn nth_open_day(&self, year: i32, month: u32, n: i32) -> Option<NaiveDate> {
        let open = self.open_days_in_month(year, month);
        let index = match n {
            0 => return None,
            n if n > 0 => usize::try_from(n - 1).ok()?,
            n => open
                .len()
                .checked_sub(usize::try_from(n.unsigned_abs()).ok()?)?,
        };
        open.get(index).copied()
    }

    /// The nearest open day before `date`, at most `within` days before it.
    pub fn previous_open(&self, date: NaiveDate, within: u32) -> Option<NaiveDate> {
        (1..=u64::from(within))
            .map_while(|k| date.checked_sub_days(Days::new(k)))
            .find(|d| self.is_open(*d))
    }

    /// The nearest open day after `date`, at most `within` days after it.
    pub fn next_open(&self, date: NaiveDate, within: u32) -> Option<NaiveDate> {
        (1..=u64::from(within))
            .map_while(|k| date.checked_add_days(Days::new(k)))
            .find(|d| self.is_open(*d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(y: i32, m: u32, day: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, day).unwrap()
    }

    #[test]
    fn exceptions_win_over_weekdays() {
        let mut c = Calendar::weekdays("t");
        assert!(c.is_open(d(2026, 11, 26))); // Thursday
        assert!(!c.is_open(d(2026, 11, 28))); // Saturday
        c.closed.insert(d(2026, 11, 23));
        assert!(!c.is_open(d(2026, 11, 23)));
        c.open.insert(d(2026, 11, 28));
        assert!(c.is_open(d(2026, 11, 28)));
        c.open.insert(d(2026, 11, 23));
        assert!(c.is_open(d(2026, 11, 23)), "open beats closed");
    }

    #[test]
    fn nth_open_day_counts_from_either_end() {
        let mut c = Calendar::weekdays("t");
        // August 2026 starts on a Saturday and ends on a Monday.
        assert_eq!(d(2026, 8, 1).weekday(), Weekday::Sat);
        assert_eq!(d(2026, 8, 31).weekday(), Weekday::Mon);
        assert_eq!(c.nth_open_day(2026, 8, 1), Some(d(2026, 8, 3)));
        assert_eq!(c.nth_open_day(2026, 8, 2), Some(d(2026, 8, 4)));
        assert_eq!(c.nth_open_day(2026, 8, -1), Some(d(2026, 8, 31)));
        assert_eq!(c.nth_open_day(2026, 8, -2), Some(d(2026, 8, 28)));
        assert_eq!(c.open_days_in_month(2026, 8).len(), 21);
        assert_eq!(c.nth_open_day(2026, 8, 21), Some(d(2026, 8, 31)));
        assert_eq!(c.nth_open_day(2026, 8, 22), None);
        assert_eq!(c.nth_open_day(2026, 8, -22), None);
        assert_eq!(c.nth_open_day(2026, 8, 0), None);
        assert_eq!(c.nth_open_day(2026, 13, 1), None);
        c.closed.insert(d(2026, 8, 3));
        assert_eq!(c.nth_open_day(2026, 8, 1), Some(d(2026, 8, 4)));
    }

    #[test]
    fn nearest_open_day_within_a_bound() {
        let c = Calendar::weekdays("t");
        let sat = d(2026, 8, 1);
        assert_eq!(c.previous_open(sat, 7), Some(d(2026, 7, 31)));
        assert_eq!(c.next_open(sat, 7), Some(d(2026, 8, 3)));
        assert_eq!(c.next_open(sat, 1), None, "Sunday is closed too");
        assert_eq!(c.next_open(sat, 2), Some(d(2026, 8, 3)));
        assert_eq!(c.previous_open(sat, 0), None);
    }
}
