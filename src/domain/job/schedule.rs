//! Cron schedules: crontab syntax translated for the `cron` crate, evaluated in
//! a time zone.

use std::collections::BTreeSet;
use std::str::FromStr;

use chrono::{DateTime, NaiveDateTime, Utc};

/// A cron schedule evaluated in a time zone.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// The expression as written by the user (crontab syntax).
    pub expression: String,
    /// The translated schedule (`cron` crate syntax: seconds first, 1 = Sunday).
    pub cron: cron::Schedule,
    pub time_zone: chrono_tz::Tz,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidSchedule {
    #[error("invalid schedule {expression:?}: {reason}")]
    Expression { expression: String, reason: String },
    #[error("unknown time zone {0:?} (expected an IANA name such as \"Asia/Tokyo\" or \"UTC\")")]
    TimeZone(String),
}

impl Schedule {
    /// Parse a crontab-style expression.
    ///
    /// Accepted forms:
    /// - 5 fields, crontab(5): `min hour dom month dow`;
    /// - 6 fields, seconds first: `sec min hour dom month dow`;
    /// - `@yearly`/`@annually`, `@monthly`, `@weekly`, `@daily`/`@midnight`, `@hourly`.
    ///
    /// The weekday field uses crontab numbering (0 or 7 = Sunday, 1 = Monday, ...,
    /// 6 = Saturday) or names (`sun`..`sat`, full names too, case-insensitive); numbers,
    /// ranges (`1-5`, `5-7`, `MON-FRI`, `MON-SUN`), lists and steps (`*/2`, `1-5/2`,
    /// `1/2` = `1-7/2`) are supported. It is expanded to an explicit list in the `cron`
    /// crate's numbering (1 = Sunday .. 7 = Saturday). The other fields are handed to
    /// the `cron` crate unchanged.
    ///
    /// Day-of-month vs day-of-week: unlike Vixie cron (which fires when *either*
    /// matches if both are restricted), the `cron` crate requires *both* to match, so
    /// `0 0 13 * 5` fires only on Friday the 13th.
    ///
    /// `tz` is an IANA time zone name; the default is UTC.
    pub fn parse(expr: &str, tz: Option<&str>) -> Result<Schedule, InvalidSchedule> {
        let time_zone = match tz {
            None => chrono_tz::UTC,
            Some(name) => name
                .parse::<chrono_tz::Tz>()
                .map_err(|_| InvalidSchedule::TimeZone(name.to_owned()))?,
        };
        let bad = |reason: String| InvalidSchedule::Expression {
            expression: expr.to_owned(),
            reason,
        };
        let translated = translate_expression(expr).map_err(bad)?;
        let cron = cron::Schedule::from_str(&translated).map_err(|e| bad(e.to_string()))?;
        Ok(Schedule {
            expression: expr.to_owned(),
            cron,
            time_zone,
        })
    }

    /// The first fire time strictly after `after`, if any.
    pub fn next_after(&self, after: &DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .after(&after.with_timezone(&self.time_zone))
            .next()
            .map(|t| t.with_timezone(&Utc))
    }

    /// The wall-clock times the expression names strictly after `after`, in order, read
    /// on a plain calendar with no zone (so no DST): mapping them to instants, with the
    /// gap and fold rules, is `domain::schedule`'s business.
    pub fn wall_times_after(
        &self,
        after: NaiveDateTime,
    ) -> impl Iterator<Item = NaiveDateTime> + '_ {
        self.cron.after(&after.and_utc()).map(|t| t.naive_utc())
    }
}

/// Turn a crontab expression into the `cron` crate's 6-field form.
fn translate_expression(expr: &str) -> Result<String, String> {
    let trimmed = expr.trim();
    let expanded = match trimmed.to_ascii_lowercase().as_str() {
        "@yearly" | "@annually" => Some("0 0 1 1 *"),
        "@monthly" => Some("0 0 1 * *"),
        "@weekly" => Some("0 0 * * 0"),
        "@daily" | "@midnight" => Some("0 0 * * *"),
        "@hourly" => Some("0 * * * *"),
        s if s.starts_with('@') => {
            return Err(format!(
                "unsupported shorthand {trimmed:?} (supported: @yearly, @annually, \
                 @monthly, @weekly, @daily, @midnight, @hourly)"
            ));
        }
        _ => None,
    };
    let fields: Vec<&str> = expanded.unwrap_or(trimmed).split_whitespace().collect();
    let (sec, rest) = match fields.len() {
        5 => ("0", &fields[..]),
        6 => (fields[0], &fields[1..]),
        n => {
            return Err(format!(
                "expected 5 fields (min hour dom month dow) or 6 fields \
                 (sec min hour dom month dow), found {n}"
            ));
        }
    };
    let dow = translate_weekdays(rest[4])?;
    Ok(format!(
        "{sec} {} {} {} {} {dow}",
        rest[0], rest[1], rest[2], rest[3]
    ))
}

/// Crontab weekday token (number 0-7 or name) to crontab number 0-7.
fn weekday_number(token: &str) -> Result<u32, String> {
    if !token.is_empty() && token.bytes().all(|b| b.is_ascii_digit()) {
        return match token.parse::<u32>() {
            Ok(n) if n <= 7 => Ok(n),
            _ => Err(format!(
                "day of week {token:?} out of range (0-7, 0 and 7 = Sunday)"
            )),
        };
    }
    let n = match token.to_ascii_lowercase().as_str() {
        "sun" | "sunday" => 0,
        "mon" | "monday" => 1,
        "tue" | "tues" | "tuesday" => 2,
        "wed" | "wednesday" => 3,
        "thu" | "thur" | "thurs" | "thursday" => 4,
        "fri" | "friday" => 5,
        "sat" | "saturday" => 6,
        _ => return Err(format!("invalid day of week {token:?}")),
    };
    Ok(n)
}

/// Expand a crontab day-of-week field into the `cron` crate's numbering
/// (1 = Sunday .. 7 = Saturday) as an explicit, sorted list; `*`/`?` stay `*`.
fn translate_weekdays(field: &str) -> Result<String, String> {
    if field == "*" || field == "?" {
        return Ok("*".to_owned());
    }
    let mut days: BTreeSet<u32> = BTreeSet::new(); // crontab numbering, 0..=6
    for item in field.split(',') {
        let (base, step) = match item.split_once('/') {
            None => (item, None),
            Some((base, step)) => {
                let step = step
                    .parse::<u32>()
                    .ok()
                    .filter(|s| (1..=7).contains(s))
                    .ok_or_else(|| format!("invalid day-of-week step in {item:?} (1-7)"))?;
                (base, Some(step))
            }
        };
        let (start, end) = if base == "*" {
            (0, 7)
        } else if let Some((a, b)) = base.split_once('-') {
            let a = weekday_number(a)?;
            let mut b_num = weekday_number(b)?;
            // `MON-SUN`: a Sunday name at the end of a range means 7.
            if b_num == 0 && a > 0 && !b.bytes().all(|c| c.is_ascii_digit()) {
                b_num = 7;
            }
            if a > b_num {
                return Err(format!(
                    "day-of-week range {base:?} goes backwards (write e.g. \"5-7\" or \"fri,sat,sun\")"
                ));
            }
            (a, b_num)
        } else {
            let a = weekday_number(base)?;
            // `N/step` means `N-7/step`, as the cron crate does for other fields.
            if step.is_some() { (a, 7) } else { (a, a) }
        };
        let step = step.unwrap_or(1) as usize;
        for d in (start..=end).step_by(step) {
            days.insert(d % 7);
        }
    }
    let list: Vec<String> = days.iter().map(|d| (d + 1).to_string()).collect();
    Ok(list.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Datelike, TimeZone, Timelike, Weekday};

    // 2024-01-01 is a Monday.
    fn fires(expr: &str, n: usize) -> Vec<DateTime<Utc>> {
        let s = Schedule::parse(expr, None).unwrap();
        let start = Utc.with_ymd_and_hms(2024, 1, 1, 0, 0, 0).unwrap();
        s.cron.after(&start).take(n).collect()
    }

    fn weekdays(expr: &str, n: usize) -> BTreeSet<u32> {
        fires(expr, n)
            .iter()
            .map(|t| t.weekday().num_days_from_sunday())
            .collect()
    }

    #[test]
    fn weekday_translation_field() {
        assert_eq!(translate_weekdays("*").unwrap(), "*");
        assert_eq!(translate_weekdays("?").unwrap(), "*");
        assert_eq!(translate_weekdays("0").unwrap(), "1");
        assert_eq!(translate_weekdays("7").unwrap(), "1");
        assert_eq!(translate_weekdays("1-5").unwrap(), "2,3,4,5,6");
        assert_eq!(translate_weekdays("5-7").unwrap(), "1,6,7");
        assert_eq!(translate_weekdays("MON-FRI").unwrap(), "2,3,4,5,6");
        assert_eq!(translate_weekdays("sat,Sun").unwrap(), "1,7");
        assert_eq!(translate_weekdays("mon-sun").unwrap(), "1,2,3,4,5,6,7");
        assert_eq!(translate_weekdays("*/2").unwrap(), "1,3,5,7");
        assert_eq!(translate_weekdays("1-5/2").unwrap(), "2,4,6");
        assert_eq!(translate_weekdays("1/3").unwrap(), "1,2,5");
        assert_eq!(translate_weekdays("0,3,7").unwrap(), "1,4");
        for bad in [
            "8", "5-1", "fri-mon", "funday", "*/0", "*/8", "1-", "", "1,,2", "L",
        ] {
            assert!(translate_weekdays(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn weekday_translation_fire_times() {
        let mon_fri = fires("0 9 * * 1-5", 10);
        assert!(mon_fri.iter().all(|t| t.hour() == 9 && t.minute() == 0));
        let days: Vec<Weekday> = mon_fri.iter().map(|t| t.weekday()).collect();
        use Weekday::*;
        assert_eq!(days, [Mon, Tue, Wed, Thu, Fri, Mon, Tue, Wed, Thu, Fri]);

        assert_eq!(weekdays("0 0 * * 0", 5), BTreeSet::from([0]));
        assert_eq!(weekdays("0 0 * * 7", 5), BTreeSet::from([0]));
        assert_eq!(weekdays("0 0 * * sun", 5), BTreeSet::from([0]));
        assert_eq!(weekdays("30 2 * * 5-7", 12), BTreeSet::from([5, 6, 0]));
        assert_eq!(
            weekdays("0 0 * * MON-FRI", 20),
            BTreeSet::from([1, 2, 3, 4, 5])
        );
        assert_eq!(weekdays("0 0 * * */2", 20), BTreeSet::from([0, 2, 4, 6]));
        assert_eq!(weekdays("0 0 * * 6,0", 20), BTreeSet::from([6, 0]));
        assert_eq!(weekdays("0 0 * * *", 14).len(), 7);
        assert_eq!(weekdays("@weekly", 3), BTreeSet::from([0]));

        let first = fires("30 2 * * 5-7", 1)[0];
        assert_eq!(first, Utc.with_ymd_and_hms(2024, 1, 5, 2, 30, 0).unwrap());
    }

    #[test]
    fn six_field_form_has_seconds_first() {
        let t = fires("0 */5 * * * *", 3);
        let start = Utc.with_ymd_and_hms(2024, 1, 1, 0, 0, 0).unwrap();
        assert_eq!(t, [5, 10, 15].map(|m| start + chrono::Duration::minutes(m)));
        let t = fires("15 0 9 * * 1", 2);
        assert_eq!(t[0], Utc.with_ymd_and_hms(2024, 1, 1, 9, 0, 15).unwrap());
        assert_eq!(t[1], Utc.with_ymd_and_hms(2024, 1, 8, 9, 0, 15).unwrap());
    }

    #[test]
    fn dom_and_dow_both_restricted_means_both_must_match() {
        // The cron crate intersects; Vixie cron would fire on every 13th and every Friday.
        let t = fires("0 0 13 * 5", 2);
        assert_eq!(t[0], Utc.with_ymd_and_hms(2024, 9, 13, 0, 0, 0).unwrap());
        assert_eq!(t[1], Utc.with_ymd_and_hms(2024, 12, 13, 0, 0, 0).unwrap());
    }

    #[test]
    fn schedule_time_zone() {
        let s = Schedule::parse("0 9 * * *", Some("Asia/Tokyo")).unwrap();
        assert_eq!(s.time_zone, chrono_tz::Asia::Tokyo);
        assert_eq!(s.expression, "0 9 * * *");
        let start = Utc.with_ymd_and_hms(2024, 1, 1, 12, 0, 0).unwrap();
        assert_eq!(
            s.next_after(&start).unwrap(),
            Utc.with_ymd_and_hms(2024, 1, 2, 0, 0, 0).unwrap()
        );
        assert_eq!(
            Schedule::parse("0 9 * * *", None).unwrap().time_zone,
            chrono_tz::UTC
        );
        assert!(matches!(
            Schedule::parse("0 9 * * *", Some("Mars/Olympus")),
            Err(InvalidSchedule::TimeZone(_))
        ));
    }

    #[test]
    fn wall_times_ignore_the_zone() {
        // 02:30 does not exist in New York on 2026-03-08; as a wall time it does.
        let s = Schedule::parse("30 2 * * *", Some("America/New_York")).unwrap();
        let day = chrono::NaiveDate::from_ymd_opt(2026, 3, 8).unwrap();
        let walls: Vec<_> = s
            .wall_times_after(day.and_hms_opt(0, 0, 0).unwrap())
            .take(2)
            .collect();
        assert_eq!(walls[0], day.and_hms_opt(2, 30, 0).unwrap());
        assert_eq!(
            walls[1],
            day.succ_opt().unwrap().and_hms_opt(2, 30, 0).unwrap()
        );
    }

    #[test]
    fn bad_schedules() {
        for bad in [
            "",
            "* * * *",
            "0 0 0 * * * 2024",
            "61 * * * *",
            "0 25 * * *",
            "0 0 * * 8",
            "0 0 32 * *",
            "@reboot",
            "every day",
        ] {
            let e = Schedule::parse(bad, None).unwrap_err();
            assert!(
                matches!(e, InvalidSchedule::Expression { .. }),
                "{bad}: {e}"
            );
        }
    }
}
