//! `schedule` + `time_zone` (the one-schedule shorthand) and the `[[schedules]]` list:
//! rules, zones, calendars and policies, each checked where it is written.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::NaiveTime;
use toml::Spanned;

use super::Ctx;
use crate::catalog::calendars::CalendarSet;
use crate::catalog::file::ScheduleFile;
use crate::domain::job::{InvalidSchedule, JobName, JobSpec, ParamError, Schedule};
use crate::domain::schedule::Calendar;
use crate::domain::schedule::{
    CatchUp, DEFAULT_SCHEDULE_NAME, OnClosedDay, OnFold, OnGap, Overlap, Rule, ScheduleSpec,
};

/// The calendar of an `open_days_of_month` schedule that names none: Monday to Friday.
/// Its name cannot be a calendar file's, so it never hides one.
pub const WEEKDAYS_CALENDAR: &str = "(mon-fri)";

/// `open_days_of_month` counts at most this many open days from either end of a month.
const MAX_OPEN_DAY: i64 = 23;
const MAX_SHIFT_DAYS: std::ops::RangeInclusive<i64> = 1..=31;
const MAX_CATCH_UP: std::ops::RangeInclusive<i64> = 1..=10_000;

/// The shorthand, then every `[[schedules]]` entry.
pub(super) fn schedules(
    ctx: &mut Ctx<'_>,
    expr: Option<&Spanned<String>>,
    tz: Option<&Spanned<String>>,
    list: &[Spanned<ScheduleFile>],
    calendars: &CalendarSet,
) -> Vec<ScheduleSpec> {
    let mut specs = Vec::new();
    let mut names = BTreeSet::new();
    if let Some(cron) = shorthand(ctx, expr, tz) {
        names.insert(DEFAULT_SCHEDULE_NAME.to_owned());
        let zone = cron.time_zone;
        specs.push(ScheduleSpec::new(
            DEFAULT_SCHEDULE_NAME,
            Rule::Cron(cron),
            zone,
        ));
    }
    for (i, entry) in list.iter().enumerate() {
        let base = format!("schedules[{i}]");
        let name = name(ctx, entry, &base, &mut names, expr.is_some());
        if let Some(spec) = entry_spec(ctx, entry.get_ref(), &entry.span(), &base, calendars)
            && let Some(name) = name
        {
            specs.push(ScheduleSpec { name, ..spec });
        }
    }
    specs
}

/// `schedule` and its `time_zone`.
fn shorthand(
    ctx: &mut Ctx<'_>,
    expr: Option<&Spanned<String>>,
    tz: Option<&Spanned<String>>,
) -> Option<Schedule> {
    let expr = match (expr, tz) {
        (None, None) => return None,
        (None, Some(tz)) => {
            ctx.at(
                &tz.span(),
                "time_zone",
                "`time_zone` is only meaningful together with `schedule` (a [[schedules]] \
                 entry takes its own `time_zone`)",
            );
            return None;
        }
        (Some(expr), _) => expr,
    };
    match Schedule::parse(expr.get_ref(), tz.map(|t| t.get_ref().as_str())) {
        Ok(s) => Some(s),
        Err(e @ InvalidSchedule::TimeZone(_)) => {
            if let Some(tz) = tz {
                ctx.at(&tz.span(), "time_zone", e.to_string());
            }
            None
        }
        Err(e) => {
            ctx.at(&expr.span(), "schedule", e.to_string());
            None
        }
    }
}

/// `name`: required, a job-name-like token, unique in the job.
fn name(
    ctx: &mut Ctx<'_>,
    entry: &Spanned<ScheduleFile>,
    base: &str,
    names: &mut BTreeSet<String>,
    has_shorthand: bool,
) -> Option<String> {
    let field = format!("{base}.name");
    let Some(name) = &entry.get_ref().name else {
        ctx.at(&entry.span(), field, "missing required field");
        return None;
    };
    let n = name.get_ref();
    if JobName::parse(n).is_err() {
        ctx.at(
            &name.span(),
            field,
            format!(
                "invalid schedule name {n:?}: use 1-63 characters from a-z, 0-9, '_' and '-', \
                 starting with a letter or digit"
            ),
        );
        return None;
    }
    if !names.insert(n.clone()) {
        let why = if n == DEFAULT_SCHEDULE_NAME && has_shorthand {
            "is the name of the `schedule = \"...\"` shorthand's schedule; rename this one"
                .to_owned()
        } else {
            "is already the name of another schedule of this job".to_owned()
        };
        ctx.at(&name.span(), field, format!("{n:?} {why}"));
        return None;
    }
    Some(n.clone())
}

/// Everything but the name; `None` when something is wrong (reported in `ctx`).
fn entry_spec(
    ctx: &mut Ctx<'_>,
    raw: &ScheduleFile,
    span: &std::ops::Range<usize>,
    base: &str,
    calendars: &CalendarSet,
) -> Option<ScheduleSpec> {
    let errors = ctx.errors.len();
    let f = |field: &str| format!("{base}.{field}");

    let zone = match &raw.time_zone {
        None => Some(chrono_tz::UTC),
        Some(tz) => tz
            .get_ref()
            .parse::<chrono_tz::Tz>()
            .map_err(|_| {
                let e = InvalidSchedule::TimeZone(tz.get_ref().clone());
                ctx.at(&tz.span(), f("time_zone"), e.to_string());
            })
            .ok(),
    };
    let rule = rule(ctx, raw, span, base);
    let calendar = raw.calendar.as_ref().and_then(|c| {
        let found = calendars.calendars.get(c.get_ref()).cloned();
        // A calendar whose own file is wrong is reported there, not as unknown here.
        if found.is_none() && !calendars.broken.contains(c.get_ref()) {
            let known: Vec<&str> = calendars.calendars.keys().map(String::as_str).collect();
            let hint = if known.is_empty() {
                "there are no calendars; add calendars/NAME.toml".to_owned()
            } else {
                format!("known: {}", known.join(", "))
            };
            ctx.at(
                &c.span(),
                f("calendar"),
                format!("unknown calendar {:?} ({hint})", c.get_ref()),
            );
        }
        found
    });
    let on_closed_day = closed_day(ctx, raw, &rule, base);
    let max_shift_days = match &raw.max_shift_days {
        None => Some(ScheduleSpec::DEFAULT_MAX_SHIFT_DAYS),
        Some(m) => {
            let shifting = matches!(
                on_closed_day,
                Some(OnClosedDay::PreviousOpen | OnClosedDay::NextOpen)
            );
            if !shifting {
                ctx.at(
                    &m.span(),
                    f("max_shift_days"),
                    "only meaningful with on_closed_day = \"previous_open\" or \"next_open\"",
                );
            }
            ctx.int_in(m, &f("max_shift_days"), MAX_SHIFT_DAYS)
        }
    };
    let on_gap = policy(
        ctx,
        raw.on_gap.as_ref(),
        &f("on_gap"),
        OnGap::parse,
        OnGap::NAMES,
    );
    let on_fold = policy(
        ctx,
        raw.on_fold.as_ref(),
        &f("on_fold"),
        OnFold::parse,
        OnFold::NAMES,
    );
    let overlap = policy(
        ctx,
        raw.overlap.as_ref(),
        &f("overlap"),
        Overlap::parse,
        Overlap::NAMES,
    );
    let catch_up = policy(
        ctx,
        raw.catch_up.as_ref(),
        &f("catch_up"),
        CatchUp::parse,
        CatchUp::NAMES,
    );
    let catch_up_window = match &raw.catch_up_window {
        None => Some(ScheduleSpec::DEFAULT_CATCH_UP_WINDOW),
        Some(w) => ctx
            .duration(w, &f("catch_up_window"))
            .filter(|d| *d > Duration::ZERO),
    };
    let max_catch_up = match &raw.max_catch_up {
        None => Some(ScheduleSpec::DEFAULT_MAX_CATCH_UP),
        Some(m) => ctx.int_in(m, &f("max_catch_up"), MAX_CATCH_UP),
    };
    let params = raw.params.as_ref().map_or_else(BTreeMap::new, |p| {
        p.get_ref()
            .iter()
            .map(|(k, v)| (k.get_ref().clone(), v.get_ref().clone()))
            .collect()
    });
    if ctx.errors.len() > errors {
        return None;
    }
    let (rule, zone) = (rule?, zone?);
    let calendar = match (&rule, calendar) {
        (_, Some(c)) => Some(c),
        (Rule::OpenDaysOfMonth { .. }, None) => {
            Some(Arc::new(Calendar::weekdays(WEEKDAYS_CALENDAR)))
        }
        (Rule::Cron(_), None) => None,
    };
    let rule = match rule {
        // The cron rule reads its wall-clock times in the schedule's zone.
        Rule::Cron(c) => Rule::Cron(Schedule {
            time_zone: zone,
            ..c
        }),
        other => other,
    };
    Some(ScheduleSpec {
        params,
        calendar,
        on_closed_day: on_closed_day?,
        max_shift_days: max_shift_days?,
        on_gap: on_gap?,
        on_fold: on_fold?,
        overlap: overlap?,
        catch_up: catch_up?,
        catch_up_window: catch_up_window?,
        max_catch_up: max_catch_up?,
        suspended: raw.suspended.as_ref().is_some_and(|s| *s.get_ref()),
        ..ScheduleSpec::new("", rule, zone)
    })
}

/// `cron`, or `open_days_of_month` with `at`: exactly one of them.
fn rule(
    ctx: &mut Ctx<'_>,
    raw: &ScheduleFile,
    span: &std::ops::Range<usize>,
    base: &str,
) -> Option<Rule> {
    match (&raw.cron, &raw.open_days_of_month) {
        (Some(_), Some(days)) => {
            ctx.at(
                &days.span(),
                format!("{base}.open_days_of_month"),
                "give either `cron` or `open_days_of_month`, not both",
            );
            None
        }
        (None, None) => {
            ctx.at(
                span,
                base.to_owned(),
                "needs `cron` or `open_days_of_month` (with `at`)",
            );
            None
        }
        (Some(cron), None) => {
            if let Some(at) = &raw.at {
                ctx.at(
                    &at.span(),
                    format!("{base}.at"),
                    "`at` goes with `open_days_of_month`; a cron expression has its own time",
                );
            }
            match Schedule::parse(cron.get_ref(), None) {
                Ok(s) => Some(Rule::Cron(s)),
                Err(e) => {
                    ctx.at(&cron.span(), format!("{base}.cron"), e.to_string());
                    None
                }
            }
        }
        (None, Some(days)) => {
            let field = format!("{base}.open_days_of_month");
            let mut list = Vec::new();
            for (i, d) in days.get_ref().iter().enumerate() {
                let v = *d.get_ref();
                if v == 0 || v.abs() > MAX_OPEN_DAY {
                    ctx.at(
                        &d.span(),
                        format!("{field}[{i}]"),
                        format!(
                            "{v} is out of range: 1..={MAX_OPEN_DAY} counts open days from the \
                             month's start, -1..=-{MAX_OPEN_DAY} from its end (-1 = last)"
                        ),
                    );
                } else if list.contains(&(v as i32)) {
                    ctx.at(
                        &d.span(),
                        format!("{field}[{i}]"),
                        format!("{v} is listed twice"),
                    );
                } else {
                    list.push(v as i32);
                }
            }
            if days.get_ref().is_empty() {
                ctx.at(&days.span(), &field, "must not be empty");
            }
            let at = match &raw.at {
                None => {
                    ctx.at(
                        &days.span(),
                        format!("{base}.at"),
                        "missing: `open_days_of_month` needs `at = \"HH:MM\"`",
                    );
                    None
                }
                Some(at) => {
                    let t = at.get_ref();
                    let parsed = NaiveTime::parse_from_str(t, "%H:%M:%S")
                        .or_else(|_| NaiveTime::parse_from_str(t, "%H:%M"));
                    match parsed {
                        Ok(time) => Some(time),
                        Err(_) => {
                            ctx.at(
                                &at.span(),
                                format!("{base}.at"),
                                format!(
                                    "{t:?} is not a time of day (write \"HH:MM\" or \"HH:MM:SS\")"
                                ),
                            );
                            None
                        }
                    }
                }
            };
            Some(Rule::OpenDaysOfMonth {
                days: list,
                at: at?,
            })
        }
    }
}

/// `on_closed_day`: needs a calendar, and a cron rule (open days of a month are open).
fn closed_day(
    ctx: &mut Ctx<'_>,
    raw: &ScheduleFile,
    rule: &Option<Rule>,
    base: &str,
) -> Option<OnClosedDay> {
    let field = format!("{base}.on_closed_day");
    let policy = policy(
        ctx,
        raw.on_closed_day.as_ref(),
        &field,
        OnClosedDay::parse,
        OnClosedDay::NAMES,
    );
    if let Some(o) = &raw.on_closed_day {
        if raw.calendar.is_none() {
            ctx.at(
                &o.span(),
                &field,
                "needs `calendar`: without one no day is closed",
            );
        } else if matches!(rule, Some(Rule::OpenDaysOfMonth { .. }))
            || raw.open_days_of_month.is_some()
        {
            ctx.at(
                &o.span(),
                &field,
                "only meaningful with `cron`: `open_days_of_month` picks open days only",
            );
        }
    }
    policy
}

/// A policy named by one of `names`; absent means the default.
fn policy<T: Default>(
    ctx: &mut Ctx<'_>,
    raw: Option<&Spanned<String>>,
    field: &str,
    parse: fn(&str) -> Option<T>,
    names: &[&str],
) -> Option<T> {
    let Some(v) = raw else {
        return Some(T::default());
    };
    let parsed = parse(v.get_ref());
    if parsed.is_none() {
        let expected: Vec<String> = names.iter().map(|n| format!("{n:?}")).collect();
        ctx.at(
            &v.span(),
            field,
            format!(
                "invalid value {:?} (expected {})",
                v.get_ref(),
                expected.join(", ")
            ),
        );
    }
    parsed
}

/// Each schedule's fixed parameters must be what a run request of the job accepts:
/// checked by the same rule a request is ([`JobSpec::resolve`]).
pub(super) fn check_params(ctx: &mut Ctx<'_>, spec: &JobSpec, raw: &crate::catalog::file::JobFile) {
    if let Some(expr) = &raw.schedule
        && spec
            .schedules
            .iter()
            .any(|s| s.name == DEFAULT_SCHEDULE_NAME)
        && let Err(errors) = spec.resolve(&BTreeMap::new())
    {
        for e in errors.iter() {
            ctx.at(
                &expr.span(),
                "schedule",
                format!("{e}: the shorthand gives no parameters; use a [[schedules]] entry with `params`"),
            );
        }
    }
    for (i, entry) in raw.schedules.iter().enumerate() {
        let entry_ref = entry.get_ref();
        let given: BTreeMap<String, String> =
            entry_ref.params.as_ref().map_or_else(BTreeMap::new, |p| {
                p.get_ref()
                    .iter()
                    .map(|(k, v)| (k.get_ref().clone(), v.get_ref().clone()))
                    .collect()
            });
        let Err(errors) = spec.resolve(&given) else {
            continue;
        };
        let base = format!("schedules[{i}].params");
        for e in errors.iter() {
            let key = entry_ref
                .params
                .as_ref()
                .and_then(|p| p.get_ref().iter().find(|(k, _)| k.get_ref() == e.param()));
            match key {
                Some((k, v)) => {
                    let span = match e {
                        ParamError::Unknown { .. } => k.span(),
                        _ => v.span(),
                    };
                    ctx.at(&span, format!("{base}.{}", k.get_ref()), e.to_string());
                }
                None => {
                    let span = entry_ref
                        .params
                        .as_ref()
                        .map_or_else(|| entry.span(), |p| p.span());
                    ctx.at(&span, &base, e.to_string());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
