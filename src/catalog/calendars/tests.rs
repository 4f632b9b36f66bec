//! Calendar files: weekdays, dates, `closed_from` lists, includes and their cycles, and
//! the shipped Japanese calendars checked against the holiday rules.

use std::fs;
use std::path::Path;

use chrono::{Datelike, NaiveDate, Weekday};

use super::*;
use crate::catalog::{Catalog, CatalogDirs};

fn d(y: i32, m: u32, day: u32) -> NaiveDate {
    NaiveDate::from_ymd_opt(y, m, day).unwrap()
}

fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

fn load_ok(dir: &Path) -> Calendars {
    let set = load(&CalendarsDir::Given(dir.to_path_buf()));
    assert!(set.errors.is_empty(), "{:#?}", set.errors);
    set.calendars
}

/// Every error as `file-name:line: field: message`.
fn load_errors(dir: &Path) -> Vec<String> {
    let set = load(&CalendarsDir::Given(dir.to_path_buf()));
    set.errors
        .iter()
        .map(|e| {
            let name = e.file.file_name().unwrap().to_string_lossy().into_owned();
            CatalogError {
                file: name.into(),
                ..e.clone()
            }
            .to_string()
        })
        .collect()
}

#[test]
fn weekdays_and_dates() {
    let dir = dir_with(&[(
        "shop.toml",
        "open_weekdays = [\"Tue\", \"wed\", \"THURSDAY\", \"sat\"]\n\
         closed = [2026-01-01, \"2026-01-03\"]\nopen = [2026-01-04]\n",
    )]);
    let cals = load_ok(dir.path());
    let c = &cals["shop"];
    assert_eq!(c.name, "shop");
    assert_eq!(c.open_weekdays, [1, 2, 3, 5].into());
    assert_eq!(c.closed, [d(2026, 1, 1), d(2026, 1, 3)].into());
    assert_eq!(c.open, [d(2026, 1, 4)].into());
    assert!(!c.is_open(d(2026, 1, 3)) && c.is_open(d(2026, 1, 4)));
}

#[test]
fn default_weekdays_are_mon_to_fri() {
    let dir = dir_with(&[("plain.toml", "")]);
    assert_eq!(*load_ok(dir.path())["plain"], Calendar::weekdays("plain"));
}

#[test]
fn bad_weekdays_dates_and_keys_name_line_and_field() {
    let dir = dir_with(&[
        (
            "a.toml",
            "open_weekdays = [\"mon\", \"funday\"]\nclosed = [2026-01-01, 1.5, \"2026-13-01\", 2026-01-02T10:00:00]\n",
        ),
        (
            "b.toml",
            "open_weekdays = []\nclosed = [2026-02-01]\nopen = [2026-02-01]\n",
        ),
        ("c.toml", "\nholidays = [2026-01-01]\n"),
        ("Bad Name.toml", ""),
    ]);
    let errs = load_errors(dir.path());
    assert_eq!(
        errs,
        [
            "Bad Name.toml: invalid calendar name \"Bad Name\": use 1-63 characters from a-z, 0-9, \
             '_' and '-', starting with a letter or digit (the name is the file name without `.toml`)",
            "a.toml:1: open_weekdays[1]: \"funday\" is not a weekday (mon, tue, ... sun)",
            "a.toml:2: closed[1]: 1.5 is not a date (write 2026-01-01)",
            "a.toml:2: closed[2]: \"2026-13-01\" is not a date (write 2026-01-01)",
            "a.toml:2: closed[3]: 2026-01-02T10:00:00 is not a date (write 2026-01-01)",
            "b.toml:1: open_weekdays: must name at least one weekday (a calendar with no open \
             weekday never opens)",
            "b.toml: 2026-02-01 is listed in both `closed` and `open`",
            "c.toml:2: holidays: unknown field `holidays`, expected one of `open_weekdays`, \
             `closed`, `open`, `closed_from`, `include`",
        ]
    );
}

#[test]
fn closed_from_reads_ics_and_text_lists_relative_to_the_directory() {
    let dir = dir_with(&[
        (
            "x.toml",
            "closed_from = [\"feed.ics\", \"lists/more.txt\"]\nopen = [2026-05-04]\n",
        ),
        (
            "feed.ics",
            "BEGIN:VCALENDAR\r\nBEGIN:VEVENT\r\nDTSTART;VALUE=DATE:20260503\r\nDTEND;VALUE=DATE:20260506\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n",
        ),
    ]);
    fs::create_dir(dir.path().join("lists")).unwrap();
    fs::write(dir.path().join("lists/more.txt"), "# more\n2026-08-11\n").unwrap();
    let c = &load_ok(dir.path())["x"];
    // The calendar's own `open` takes a date out of what its lists close.
    assert_eq!(
        c.closed,
        [d(2026, 5, 3), d(2026, 5, 5), d(2026, 8, 11)].into()
    );
    assert_eq!(c.open, [d(2026, 5, 4)].into());
}

#[test]
fn closed_from_errors_name_the_list_file_or_the_entry() {
    let dir = dir_with(&[
        (
            "x.toml",
            "\nclosed_from = [\"feed.ics\", \"missing.txt\"]\n",
        ),
        (
            "feed.ics",
            "BEGIN:VCALENDAR\nBEGIN:VEVENT\nDTSTART:20260503T090000\nEND:VEVENT\nEND:VCALENDAR\n",
        ),
    ]);
    let errs = load_errors(dir.path());
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert!(
        errs[0].starts_with("x.toml:2: closed_from[1]: cannot read file:"),
        "{errs:#?}"
    );
    assert!(
        errs[1].starts_with("feed.ics:3: DTSTART \"20260503T090000\" has a time of day"),
        "{errs:#?}"
    );
}

#[test]
fn includes_merge_first_and_own_lists_apply_after() {
    let dir = dir_with(&[
        (
            "base.toml",
            "closed = [2026-01-01, 2026-01-02]\nopen = [2026-01-03]\n",
        ),
        ("more.toml", "include = [\"base\"]\nclosed = [2026-01-05]\n"),
        (
            "top.toml",
            "open_weekdays = [\"mon\"]\ninclude = [\"more\"]\nclosed = [2026-01-03]\nopen = [2026-01-02]\n",
        ),
    ]);
    let cals = load_ok(dir.path());
    let top = &cals["top"];
    assert_eq!(
        top.open_weekdays,
        [0].into(),
        "weekdays are the calendar's own"
    );
    assert_eq!(
        top.closed,
        [d(2026, 1, 1), d(2026, 1, 3), d(2026, 1, 5)].into()
    );
    assert_eq!(top.open, [d(2026, 1, 2)].into());
    assert_eq!(cals["more"].closed.len(), 3);
}

#[test]
fn include_cycles_and_unknown_includes_are_errors() {
    let dir = dir_with(&[
        ("a.toml", "include = [\"b\"]\n"),
        ("b.toml", "\ninclude = [\"c\", \"a\"]\n"),
        ("c.toml", ""),
        ("d.toml", "include = [\"nope\"]\n"),
        ("e.toml", "include = [\"e\"]\n"),
    ]);
    let errs = load_errors(dir.path());
    assert_eq!(
        errs,
        [
            "b.toml:2: include[1]: include cycle: a -> b -> a",
            "d.toml:1: include[0]: unknown calendar \"nope\" (known: a, b, c, d, e)",
            "e.toml:1: include[0]: include cycle: e -> e",
        ]
    );
    let set = load(&CalendarsDir::Given(dir.path().to_path_buf()));
    assert_eq!(set.calendars.keys().collect::<Vec<_>>(), ["c"]);
    assert_eq!(set.broken, ["a", "b", "d", "e"].map(String::from).into());
}

#[test]
fn a_broken_include_is_reported_once() {
    let dir = dir_with(&[
        ("a.toml", "include = [\"b\"]\n"),
        ("b.toml", "closed = [1]\n"),
    ]);
    let errs = load_errors(dir.path());
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(errs[0].starts_with("b.toml:1: closed[0]"), "{errs:#?}");
}

#[test]
fn the_default_directory_may_be_missing_a_given_one_may_not() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("calendars");
    let set = load(&CalendarsDir::Beside(missing.clone()));
    assert!(set.errors.is_empty() && set.calendars.is_empty());
    let set = load(&CalendarsDir::Given(missing));
    assert_eq!(set.errors.len(), 1);
    assert!(
        set.errors[0]
            .message
            .contains("cannot read calendar directory")
    );
}

#[test]
fn the_default_directory_is_beside_the_jobs_directory() {
    let beside = |jobs: &str| match CalendarsDir::for_jobs_dir(Path::new(jobs), None) {
        CalendarsDir::Beside(p) => p,
        other => panic!("{other:?}"),
    };
    assert_eq!(beside("jobs"), Path::new("calendars"));
    assert_eq!(
        beside("/etc/tasuki/jobs/"),
        Path::new("/etc/tasuki/calendars")
    );
    assert_eq!(beside("."), Path::new("./../calendars"));
    assert_eq!(
        CalendarsDir::for_jobs_dir(Path::new("jobs"), Some("cals".into())),
        CalendarsDir::Given("cals".into())
    );
}

#[test]
fn a_job_naming_a_broken_calendar_gets_no_second_error() {
    let root = tempfile::tempdir().unwrap();
    fs::create_dir(root.path().join("jobs")).unwrap();
    fs::create_dir(root.path().join("calendars")).unwrap();
    fs::write(root.path().join("calendars/jp.toml"), "closed = [\"x\"]\n").unwrap();
    fs::write(
        root.path().join("jobs/a.toml"),
        "image = \"a\"\n[[schedules]]\nname = \"s\"\ncron = \"@daily\"\ncalendar = \"jp\"\n",
    )
    .unwrap();
    let errs = Catalog::load(
        &CatalogDirs::new(root.path().join("jobs"), None),
        &crate::domain::job::ContainerPolicy::default(),
    )
    .unwrap_err();
    assert_eq!(errs.0.len(), 1, "{errs}");
    assert!(errs.0[0].file.ends_with("calendars/jp.toml"), "{errs}");
}

/// The repository's `calendars/`: the holidays listed by the Cabinet Office, checked
/// against the rules that can be checked without an ephemeris.
#[test]
fn shipped_japanese_holidays_follow_the_rules() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("calendars");
    let cals = load_ok(&dir);
    let holidays = &cals["jp-holidays"].closed;
    let listed = |y: i32, days: &[(u32, u32)]| -> Vec<NaiveDate> {
        days.iter().map(|&(m, day)| d(y, m, day)).collect()
    };
    let mut expected = listed(
        2026,
        &[
            (1, 1),
            (1, 12),
            (2, 11),
            (2, 23),
            (3, 20),
            (4, 29),
            (5, 3),
            (5, 4),
            (5, 5),
            (5, 6),
            (7, 20),
            (8, 11),
            (9, 21),
            (9, 22),
            (9, 23),
            (10, 12),
            (11, 3),
            (11, 23),
        ],
    );
    expected.extend(listed(
        2027,
        &[
            (1, 1),
            (1, 11),
            (2, 11),
            (2, 23),
            (3, 21),
            (3, 22),
            (4, 29),
            (5, 3),
            (5, 4),
            (5, 5),
            (7, 19),
            (8, 11),
            (9, 20),
            (9, 23),
            (10, 11),
            (11, 3),
            (11, 23),
        ],
    ));
    assert_eq!(holidays.iter().copied().collect::<Vec<_>>(), expected);

    let nth_monday = |y: i32, m: u32, n: u8| {
        NaiveDate::from_weekday_of_month_opt(y, m, Weekday::Mon, n).unwrap()
    };
    for y in [2026, 2027] {
        // Happy Monday days: Coming of Age (2nd Monday of January), Marine Day (3rd of
        // July), Respect for the Aged (3rd of September), Sports Day (2nd of October).
        for (m, n) in [(1, 2), (7, 3), (9, 3), (10, 2)] {
            assert!(
                holidays.contains(&nth_monday(y, m, n)),
                "{y}-{m} Monday {n}"
            );
        }
        // Fixed dates.
        for (m, day) in [
            (1, 1),
            (2, 11),
            (2, 23),
            (4, 29),
            (5, 3),
            (5, 4),
            (5, 5),
            (8, 11),
            (11, 3),
            (11, 23),
        ] {
            assert!(holidays.contains(&d(y, m, day)), "{y}-{m}-{day}");
        }
        // One vernal and one autumnal equinox day, on the dates astronomy allows.
        assert_eq!(
            holidays
                .iter()
                .filter(|h| h.year() == y && h.month() == 3 && (20..=21).contains(&h.day()))
                .count(),
            1
        );
        assert_eq!(
            holidays
                .iter()
                .filter(|h| h.year() == y
                    && h.month() == 9
                    && (22..=23).contains(&h.day())
                    && !is_citizens(holidays, **h))
                .count(),
            1
        );
    }
    // Substitute holidays: a holiday on a Sunday moves to the next day that is not one.
    let mut substitutes = Vec::new();
    for h in holidays.iter().filter(|h| h.weekday() == Weekday::Sun) {
        let mut next = h.succ_opt().unwrap();
        while holidays.contains(&next) && holidays_named(next) {
            next = next.succ_opt().unwrap();
        }
        assert!(holidays.contains(&next), "no substitute for {h}");
        substitutes.push(next);
    }
    assert_eq!(substitutes, [d(2026, 5, 6), d(2027, 3, 22)]);
    // The citizens' holiday: a day between two holidays.
    assert!(is_citizens(holidays, d(2026, 9, 22)));

    // Banks: the holidays and the year-end closing; ordinary days stay open.
    let business = &cals["jp-business"];
    assert!(holidays.is_subset(&business.closed));
    for closed in [
        d(2026, 12, 31),
        d(2027, 1, 1),
        d(2027, 1, 2),
        d(2027, 1, 3),
        d(2026, 5, 6),
    ] {
        assert!(!business.is_open(closed), "{closed}");
    }
    for open in [d(2026, 12, 30), d(2027, 1, 4), d(2026, 9, 24)] {
        assert!(business.is_open(open), "{open}");
    }
}

/// A holiday in its own right (not a substitute or citizens' holiday), as the check
/// for substitutes walks over consecutive holidays.
fn holidays_named(day: NaiveDate) -> bool {
    !matches!(
        (day.year(), day.month(), day.day()),
        (2026, 5, 6) | (2027, 3, 22) | (2026, 9, 22)
    )
}

fn is_citizens(holidays: &BTreeSet<NaiveDate>, day: NaiveDate) -> bool {
    day.weekday() != Weekday::Sun
        && holidays.contains(&day.pred_opt().unwrap())
        && holidays.contains(&day.succ_opt().unwrap())
        && !holidays_named(day)
}
