//! The calendars directory: one TOML file per business calendar, flattened (includes
//! merged, `closed_from` lists read) into the domain's [`Calendar`].
//!
//! A calendar is built in two steps: each file's own part (weekdays, dates, the date
//! lists it names), then the includes, depth first, so an include cycle can be named.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{NaiveDate, Weekday};
use toml::Spanned;

use super::datelist::{self, DateList};
use super::file::CalendarFile;
use super::validate::Ctx;
use super::{CatalogError, read_text, toml_files};
use crate::domain::job::JobName;
use crate::domain::schedule::Calendar;

/// The loaded calendars, by name (the file stem).
pub type Calendars = BTreeMap<String, Arc<Calendar>>;

/// Where calendars come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CalendarsDir {
    /// The default, `calendars` beside the jobs directory: a missing one means no
    /// calendars.
    Beside(PathBuf),
    /// Given on the command line: it must exist.
    Given(PathBuf),
}

impl CalendarsDir {
    /// `given`, or `<jobs_dir>/../calendars`.
    pub fn for_jobs_dir(jobs_dir: &Path, given: Option<PathBuf>) -> CalendarsDir {
        match given {
            Some(dir) => CalendarsDir::Given(dir),
            None => CalendarsDir::Beside(match (jobs_dir.file_name(), jobs_dir.parent()) {
                (Some(_), Some(parent)) => parent.join("calendars"),
                // `.`, `..` or `/`: no name to step over.
                _ => jobs_dir.join("..").join("calendars"),
            }),
        }
    }

    pub fn path(&self) -> &Path {
        match self {
            CalendarsDir::Beside(p) | CalendarsDir::Given(p) => p,
        }
    }
}

/// One file's own part, before its includes are merged.
struct Own {
    file: PathBuf,
    text: String,
    open_weekdays: BTreeSet<u32>,
    closed: BTreeSet<NaiveDate>,
    open: BTreeSet<NaiveDate>,
    include: Vec<Spanned<String>>,
}

/// The calendars of a directory: those that load, the names of those that do not (so a
/// job naming one is not told it is unknown), and every problem.
#[derive(Debug, Default)]
pub(super) struct CalendarSet {
    pub calendars: Calendars,
    pub broken: BTreeSet<String>,
    pub errors: Vec<CatalogError>,
}

/// Every calendar in `dir`, flattened. All problems of all files are reported.
pub(super) fn load(dir: &CalendarsDir) -> CalendarSet {
    let path = dir.path();
    if matches!(dir, CalendarsDir::Beside(_)) && !path.exists() {
        return CalendarSet::default();
    }
    let files = match toml_files(path, "calendar directory") {
        Ok(files) => files,
        Err(e) => {
            return CalendarSet {
                errors: vec![e],
                ..CalendarSet::default()
            };
        }
    };
    let mut errors = Vec::new();
    let mut owns = BTreeMap::new();
    let mut broken = BTreeSet::new();
    for file in files {
        let stem = file
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let text = match read_text(&file) {
            Ok(t) => t,
            Err(e) => {
                errors.push(e);
                broken.insert(stem);
                continue;
            }
        };
        let mut ctx = Ctx::new(&file, &text);
        if JobName::parse(&stem).is_err() {
            ctx.file_error(
                None,
                format!(
                    "invalid calendar name {stem:?}: use 1-63 characters from a-z, 0-9, '_' \
                     and '-', starting with a letter or digit (the name is the file name \
                     without `.toml`)"
                ),
            );
        }
        // The calendar file's own problems first, then those of the lists it names.
        let mut list_errors = Vec::new();
        let own = parse_own(&mut ctx, path, &file, &text, &mut list_errors);
        let ok = ctx.errors.is_empty() && list_errors.is_empty();
        errors.append(&mut ctx.errors);
        errors.append(&mut list_errors);
        match own {
            Some(own) if ok => {
                owns.insert(stem, own);
            }
            _ => {
                broken.insert(stem);
            }
        }
    }

    let mut done: BTreeMap<String, Option<Arc<Calendar>>> = BTreeMap::new();
    for name in owns.keys() {
        let mut stack = Vec::new();
        flatten(name, &owns, &broken, &mut done, &mut stack, &mut errors);
    }
    let mut set = CalendarSet {
        errors,
        broken,
        ..CalendarSet::default()
    };
    for (name, calendar) in done {
        match calendar {
            Some(c) => {
                set.calendars.insert(name, c);
            }
            None => {
                set.broken.insert(name);
            }
        }
    }
    set
}

/// One file's own part. `None` when the TOML does not read (the error is in `ctx`).
fn parse_own(
    ctx: &mut Ctx<'_>,
    dir: &Path,
    file: &Path,
    text: &str,
    list_errors: &mut Vec<CatalogError>,
) -> Option<Own> {
    let raw: CalendarFile = match toml::from_str(text) {
        Ok(raw) => raw,
        Err(e) => {
            ctx.toml_error(&e);
            return None;
        }
    };
    let open_weekdays = match &raw.open_weekdays {
        None => (0..5).collect(),
        Some(days) => weekdays(ctx, days),
    };
    let mut closed = dates(ctx, &raw.closed, "closed");
    let open = dates(ctx, &raw.open, "open");
    for d in closed.intersection(&open) {
        ctx.file_error(None, format!("{d} is listed in both `closed` and `open`"));
    }
    for (i, name) in raw.closed_from.iter().enumerate() {
        let field = format!("closed_from[{i}]");
        let list_path = dir.join(name.get_ref());
        let list_text = match read_text(&list_path) {
            Ok(t) => t,
            Err(e) => {
                ctx.at(&name.span(), &field, e.message);
                continue;
            }
        };
        let is_ics = list_path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("ics"));
        let DateList { dates, errors } = if is_ics {
            datelist::parse_ics(&list_text)
        } else {
            datelist::parse_lines(&list_text)
        };
        list_errors.extend(errors.into_iter().map(|e| CatalogError {
            file: list_path.clone(),
            line: Some(e.line),
            field: None,
            message: e.message,
        }));
        closed.extend(dates);
    }
    Some(Own {
        file: file.to_path_buf(),
        text: text.to_owned(),
        open_weekdays,
        closed,
        open,
        include: raw.include,
    })
}

fn weekdays(ctx: &mut Ctx<'_>, days: &Spanned<Vec<Spanned<String>>>) -> BTreeSet<u32> {
    let mut set = BTreeSet::new();
    for (i, day) in days.get_ref().iter().enumerate() {
        match day.get_ref().parse::<Weekday>() {
            Ok(w) => {
                set.insert(w.num_days_from_monday());
            }
            Err(_) => ctx.at(
                &day.span(),
                format!("open_weekdays[{i}]"),
                format!("{:?} is not a weekday (mon, tue, ... sun)", day.get_ref()),
            ),
        }
    }
    if days.get_ref().is_empty() {
        ctx.at(
            &days.span(),
            "open_weekdays",
            "must name at least one weekday (a calendar with no open weekday never opens)",
        );
    }
    set
}

fn dates(ctx: &mut Ctx<'_>, raw: &[Spanned<toml::Value>], list: &str) -> BTreeSet<NaiveDate> {
    let mut set = BTreeSet::new();
    for (i, v) in raw.iter().enumerate() {
        let date = match v.get_ref() {
            toml::Value::Datetime(dt) => match (dt.date, dt.time, dt.offset) {
                (Some(d), None, None) => {
                    NaiveDate::from_ymd_opt(i32::from(d.year), u32::from(d.month), u32::from(d.day))
                }
                _ => None,
            },
            toml::Value::String(s) => NaiveDate::parse_from_str(s, "%Y-%m-%d").ok(),
            _ => None,
        };
        match date {
            Some(d) => {
                set.insert(d);
            }
            None => ctx.at(
                &v.span(),
                format!("{list}[{i}]"),
                format!("{} is not a date (write 2026-01-01)", v.get_ref()),
            ),
        }
    }
    set
}

/// Merge `name`'s includes into it (theirs first, its own lists after), depth first.
/// `None` when it cannot be built (the reason is in `errors`).
fn flatten(
    name: &str,
    owns: &BTreeMap<String, Own>,
    broken: &BTreeSet<String>,
    done: &mut BTreeMap<String, Option<Arc<Calendar>>>,
    stack: &mut Vec<String>,
    errors: &mut Vec<CatalogError>,
) -> Option<Arc<Calendar>> {
    if let Some(c) = done.get(name) {
        return c.clone();
    }
    let own = owns.get(name)?;
    stack.push(name.to_owned());
    let mut ctx = Ctx::new(&own.file, &own.text);
    let mut calendar = Calendar {
        name: name.to_owned(),
        open_weekdays: own.open_weekdays.clone(),
        closed: BTreeSet::new(),
        open: BTreeSet::new(),
    };
    let mut ok = true;
    for (i, inc) in own.include.iter().enumerate() {
        let other = inc.get_ref();
        let field = format!("include[{i}]");
        if let Some(at) = stack.iter().position(|s| s == other) {
            let mut cycle = stack[at..].to_vec();
            cycle.push(other.clone());
            ctx.at(
                &inc.span(),
                &field,
                format!("include cycle: {}", cycle.join(" -> ")),
            );
            ok = false;
        } else if broken.contains(other) {
            ok = false; // its own errors are reported
        } else if !owns.contains_key(other) {
            let known: Vec<&str> = owns.keys().map(String::as_str).collect();
            ctx.at(
                &inc.span(),
                &field,
                format!("unknown calendar {other:?} (known: {})", known.join(", ")),
            );
            ok = false;
        } else if let Some(c) = flatten(other, owns, broken, done, stack, errors) {
            calendar.closed.extend(c.closed.iter().copied());
            calendar.open.extend(c.open.iter().copied());
        } else {
            ok = false;
        }
    }
    // Its own lists apply after the included ones: they override them.
    for d in &own.closed {
        calendar.open.remove(d);
        calendar.closed.insert(*d);
    }
    for d in &own.open {
        calendar.closed.remove(d);
        calendar.open.insert(*d);
    }
    stack.pop();
    errors.append(&mut ctx.errors);
    let result = ok.then(|| Arc::new(calendar));
    done.insert(name.to_owned(), result.clone());
    result
}

#[cfg(test)]
mod tests;
