//! Business calendars: which days are open. A flattened calendar: `include`s are merged
//! by the loader (`crate::catalog`), so here a day is open or closed by three lists.

use std::collections::BTreeSet;

use chrono::{Datelike, NaiveDate, Weekday};

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
}
