//! The shorthand and the `[[schedules]]` list: every field, every error's line and field.
use super::*;
use crate::catalog::CatalogError;
use crate::catalog::testing::*;

fn cal(name: &str) -> Calendar {
    Calendar::weekdays(name)
}

fn spec(text: &str) -> JobSpec {
    parse_with(&format!("image = \"a\"\n{text}"), &[cal("jp")]).unwrap()
}

/// The one error of a snippet (after `image = "a"` on line 1), as `line: field: message`.
fn err(text: &str) -> CatalogError {
    let mut errs =
        parse_with(&format!("image = \"a\"\n{text}"), &[cal("jp"), cal("us")]).unwrap_err();
    assert_eq!(errs.len(), 1, "{errs:#?}");
    errs.remove(0)
}

fn at(e: &CatalogError) -> (Option<usize>, &str) {
    (e.line, e.field.as_deref().unwrap_or(""))
}

#[test]
fn shorthand_and_list_together() {
    let s = spec(
        "schedule = \"0 9 * * *\"\ntime_zone = \"Asia/Tokyo\"\n\
         [[schedules]]\nname = \"eom\"\nopen_days_of_month = [-1, 1]\nat = \"02:30\"\n\
         calendar = \"jp\"\ntime_zone = \"Europe/London\"\n\
         [[schedules]]\nname = \"close\"\ncron = \"0 18 25 * *\"\ncalendar = \"jp\"\n\
         on_closed_day = \"previous_open\"\nmax_shift_days = 3\non_gap = \"skip\"\n\
         on_fold = \"both\"\noverlap = \"buffer_all\"\ncatch_up = \"all\"\n\
         catch_up_window = \"2h\"\nmax_catch_up = 5\nsuspended = true\n",
    );
    let names: Vec<&str> = s.schedules.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["default", "eom", "close"]);

    let d = &s.schedules[0];
    assert_eq!(d.time_zone, chrono_tz::Asia::Tokyo);
    assert!(d.calendar.is_none() && !d.suspended && d.params.is_empty());
    assert_eq!(d.on_closed_day, OnClosedDay::Skip);
    assert_eq!(d.catch_up, CatchUp::Latest);
    assert_eq!(d.catch_up_window, ScheduleSpec::DEFAULT_CATCH_UP_WINDOW);
    assert_eq!(d.max_catch_up, ScheduleSpec::DEFAULT_MAX_CATCH_UP);
    assert_eq!(d.max_shift_days, ScheduleSpec::DEFAULT_MAX_SHIFT_DAYS);

    let eom = &s.schedules[1];
    match &eom.rule {
        Rule::OpenDaysOfMonth { days, at } => {
            assert_eq!(days, &[-1, 1]);
            assert_eq!(*at, NaiveTime::from_hms_opt(2, 30, 0).unwrap());
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(eom.time_zone, chrono_tz::Europe::London);
    assert_eq!(eom.calendar.as_ref().unwrap().name, "jp");

    let c = &s.schedules[2];
    match &c.rule {
        Rule::Cron(cron) => {
            assert_eq!(cron.expression, "0 18 25 * *");
            assert_eq!(cron.time_zone, chrono_tz::UTC);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(c.on_closed_day, OnClosedDay::PreviousOpen);
    assert_eq!(c.max_shift_days, 3);
    assert_eq!(c.on_gap, OnGap::Skip);
    assert_eq!(c.on_fold, OnFold::Both);
    assert_eq!(c.overlap, Overlap::BufferAll);
    assert_eq!(c.catch_up, CatchUp::All);
    assert_eq!(c.catch_up_window, Duration::from_secs(7200));
    assert_eq!(c.max_catch_up, 5);
    assert!(c.suspended);
}

#[test]
fn a_cron_rule_reads_in_its_schedules_zone() {
    let s = spec("[[schedules]]\nname = \"a\"\ncron = \"0 9 * * *\"\ntime_zone = \"Asia/Tokyo\"\n");
    match &s.schedules[0].rule {
        Rule::Cron(c) => assert_eq!(c.time_zone, chrono_tz::Asia::Tokyo),
        other => panic!("{other:?}"),
    }
}

#[test]
fn open_days_without_a_calendar_are_mon_to_fri() {
    let s = spec("[[schedules]]\nname = \"a\"\nopen_days_of_month = [2]\nat = \"09:00:30\"\n");
    let c = s.schedules[0].calendar.as_ref().unwrap();
    assert_eq!(c.name, WEEKDAYS_CALENDAR);
    assert_eq!(**c, Calendar::weekdays(WEEKDAYS_CALENDAR));
    match &s.schedules[0].rule {
        Rule::OpenDaysOfMonth { at, .. } => {
            assert_eq!(*at, NaiveTime::from_hms_opt(9, 0, 30).unwrap())
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn names_are_required_valid_and_unique() {
    let e = err("[[schedules]]\ncron = \"@daily\"\n");
    assert_eq!(at(&e), (Some(2), "schedules[0].name"));
    assert_eq!(e.message, "missing required field");

    let e = err("[[schedules]]\nname = \"Nightly\"\ncron = \"@daily\"\n");
    assert_eq!(at(&e), (Some(3), "schedules[0].name"));
    assert!(e.message.contains("invalid schedule name"), "{e}");

    let e = err(
        "[[schedules]]\nname = \"a\"\ncron = \"@daily\"\n[[schedules]]\nname = \"a\"\ncron = \"@hourly\"\n",
    );
    assert_eq!(at(&e), (Some(6), "schedules[1].name"));
    assert!(e.message.contains("already the name"), "{e}");

    let e = err("schedule = \"@daily\"\n[[schedules]]\nname = \"default\"\ncron = \"@hourly\"\n");
    assert_eq!(at(&e), (Some(4), "schedules[0].name"));
    assert!(e.message.contains("shorthand"), "{e}");
    // Without the shorthand, "default" is just a name.
    assert_eq!(
        spec("[[schedules]]\nname = \"default\"\ncron = \"@daily\"\n")
            .schedules
            .len(),
        1
    );
}

#[test]
fn cron_xor_open_days_of_month() {
    let e = err(
        "[[schedules]]\nname = \"a\"\ncron = \"@daily\"\nopen_days_of_month = [1]\nat = \"01:00\"\n",
    );
    assert_eq!(at(&e), (Some(5), "schedules[0].open_days_of_month"));
    assert!(e.message.contains("not both"), "{e}");

    let e = err("[[schedules]]\nname = \"a\"\n");
    assert_eq!(at(&e), (Some(2), "schedules[0]"));
    assert!(
        e.message.contains("needs `cron` or `open_days_of_month`"),
        "{e}"
    );

    let e = err("[[schedules]]\nname = \"a\"\ncron = \"@daily\"\nat = \"01:00\"\n");
    assert_eq!(at(&e), (Some(5), "schedules[0].at"));

    let e = err("[[schedules]]\nname = \"a\"\nopen_days_of_month = [1]\n");
    assert_eq!(at(&e), (Some(4), "schedules[0].at"));
    assert!(e.message.contains("needs `at"), "{e}");

    let e = err("[[schedules]]\nname = \"a\"\ncron = \"0 9 * * 8\"\n");
    assert_eq!(at(&e), (Some(4), "schedules[0].cron"));
}

#[test]
fn open_days_and_at_bounds() {
    for (days, index) in [("[0]", 0), ("[1, 24]", 1), ("[-24]", 0), ("[2, 2]", 1)] {
        let e = err(&format!(
            "[[schedules]]\nname = \"a\"\nopen_days_of_month = {days}\nat = \"01:00\"\n"
        ));
        assert_eq!(
            at(&e),
            (
                Some(4),
                format!("schedules[0].open_days_of_month[{index}]").as_str()
            ),
            "{days}"
        );
    }
    let e = err("[[schedules]]\nname = \"a\"\nopen_days_of_month = []\nat = \"01:00\"\n");
    assert_eq!(at(&e), (Some(4), "schedules[0].open_days_of_month"));
    for bad in ["25:00", "9", "09:00 JST", "09:60"] {
        let e = err(&format!(
            "[[schedules]]\nname = \"a\"\nopen_days_of_month = [23, -23]\nat = \"{bad}\"\n"
        ));
        assert_eq!(at(&e), (Some(5), "schedules[0].at"), "{bad}");
        assert!(e.message.contains("not a time of day"), "{e}");
    }
}

#[test]
fn time_zone_and_calendar_names() {
    let e = err("[[schedules]]\nname = \"a\"\ncron = \"@daily\"\ntime_zone = \"Tokyo\"\n");
    assert_eq!(at(&e), (Some(5), "schedules[0].time_zone"));
    assert!(e.message.contains("unknown time zone"), "{e}");

    let e = err("[[schedules]]\nname = \"a\"\ncron = \"@daily\"\ncalendar = \"uk\"\n");
    assert_eq!(at(&e), (Some(5), "schedules[0].calendar"));
    assert!(
        e.message
            .contains("unknown calendar \"uk\" (known: jp, us)"),
        "{e}"
    );

    let errs =
        parse("image = \"a\"\n[[schedules]]\nname = \"a\"\ncron = \"@daily\"\ncalendar = \"uk\"\n")
            .unwrap_err();
    assert!(
        errs[0].message.contains("there are no calendars"),
        "{errs:?}"
    );
}

#[test]
fn closed_day_policy_needs_a_calendar_and_a_cron_rule() {
    let e = err("[[schedules]]\nname = \"a\"\ncron = \"@daily\"\non_closed_day = \"next_open\"\n");
    assert_eq!(at(&e), (Some(5), "schedules[0].on_closed_day"));
    assert!(e.message.contains("needs `calendar`"), "{e}");

    let e = err(
        "[[schedules]]\nname = \"a\"\nopen_days_of_month = [1]\nat = \"01:00\"\ncalendar = \"jp\"\non_closed_day = \"run\"\n",
    );
    assert_eq!(at(&e), (Some(7), "schedules[0].on_closed_day"));
    assert!(e.message.contains("only meaningful with `cron`"), "{e}");

    let e = err(
        "[[schedules]]\nname = \"a\"\ncron = \"@daily\"\ncalendar = \"jp\"\non_closed_day = \"later\"\n",
    );
    assert_eq!(at(&e), (Some(6), "schedules[0].on_closed_day"));
    assert_eq!(
        e.message,
        "invalid value \"later\" (expected \"skip\", \"previous_open\", \"next_open\", \"run\")"
    );

    let e = err(
        "[[schedules]]\nname = \"a\"\ncron = \"@daily\"\ncalendar = \"jp\"\nmax_shift_days = 3\n",
    );
    assert_eq!(at(&e), (Some(6), "schedules[0].max_shift_days"));
    assert!(
        e.message.contains("only meaningful with on_closed_day"),
        "{e}"
    );

    for bad in [0, 32] {
        let e = err(&format!(
            "[[schedules]]\nname = \"a\"\ncron = \"@daily\"\ncalendar = \"jp\"\non_closed_day = \"next_open\"\nmax_shift_days = {bad}\n"
        ));
        assert_eq!(at(&e), (Some(7), "schedules[0].max_shift_days"));
        assert!(e.message.contains("out of range (1..=31)"), "{e}");
    }
}

#[test]
fn policies_and_catch_up_limits() {
    for (key, value) in [
        ("on_gap", "\"later\""),
        ("on_fold", "\"second\""),
        ("overlap", "\"queue\""),
        ("catch_up", "\"some\""),
        ("catch_up_window", "\"soon\""),
        ("catch_up_window", "\"0s\""),
        ("max_catch_up", "0"),
        ("max_catch_up", "10001"),
    ] {
        let e = err(&format!(
            "[[schedules]]\nname = \"a\"\ncron = \"@daily\"\n{key} = {value}\n"
        ));
        assert_eq!(
            at(&e),
            (Some(5), format!("schedules[0].{key}").as_str()),
            "{e}"
        );
    }
    let s = spec("[[schedules]]\nname = \"a\"\ncron = \"@daily\"\nmax_catch_up = 10000\n");
    assert_eq!(s.schedules[0].max_catch_up, 10_000);
}

#[test]
fn unknown_and_mistyped_keys_name_the_entry() {
    let e = err(
        "[[schedules]]\nname = \"a\"\ncron = \"@daily\"\n[[schedules]]\nname = \"b\"\ncron = \"@daily\"\ncalender = \"jp\"\n",
    );
    assert_eq!(at(&e), (Some(8), "schedules[1].calender"));
    assert!(e.message.contains("unknown field `calender`"), "{e}");

    let e = err("[[schedules]]\nname = \"a\"\ncron = \"@daily\"\nsuspended = \"yes\"\n");
    assert_eq!(at(&e), (Some(5), "schedules[0].suspended"));
}

#[test]
fn params_are_checked_as_a_run_request_would_be() {
    let job = "[params.who]\nrequired = true\npattern = \"[a-z]+\"\n";
    let s = spec(&format!(
        "[[schedules]]\nname = \"a\"\ncron = \"@daily\"\nparams = {{ who = \"bob\" }}\n{job}"
    ));
    assert_eq!(s.schedules[0].params["who"], "bob");

    // Unknown: at the key.
    let errs = parse_with(
        &format!(
            "image = \"a\"\n[[schedules]]\nname = \"a\"\ncron = \"@daily\"\n[schedules.params]\nwho = \"bob\"\nwhom = \"x\"\n{job}"
        ),
        &[],
    )
    .unwrap_err();
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(at(&errs[0]), (Some(7), "schedules[0].params.whom"));
    assert!(
        errs[0].message.contains("unknown parameter `whom`"),
        "{errs:?}"
    );

    // Invalid value: at the value.
    let e = err(&format!(
        "[[schedules]]\nname = \"a\"\ncron = \"@daily\"\nparams = {{ who = \"Bob\" }}\n{job}"
    ));
    assert_eq!(at(&e), (Some(5), "schedules[0].params.who"));
    assert!(e.message.contains("does not match the pattern"), "{e}");

    // Missing a required one: at the entry.
    let e = err(&format!(
        "[[schedules]]\nname = \"a\"\ncron = \"@daily\"\n{job}"
    ));
    assert_eq!(at(&e), (Some(2), "schedules[0].params"));
    assert!(
        e.message.contains("missing required parameter `who`"),
        "{e}"
    );

    // The shorthand gives none.
    let e = err(&format!("schedule = \"@daily\"\n{job}"));
    assert_eq!(at(&e), (Some(2), "schedule"));
    assert!(e.message.contains("use a [[schedules]] entry"), "{e}");
}

#[test]
fn max_concurrent_bounds() {
    assert_eq!(
        spec("max_concurrent = 10000\n").max_concurrent,
        Some(10_000)
    );
    assert_eq!(spec("").max_concurrent, None);
    for bad in ["0", "10001", "-1"] {
        let e = err(&format!("max_concurrent = {bad}\n"));
        assert_eq!(at(&e), (Some(2), "max_concurrent"));
    }
}
