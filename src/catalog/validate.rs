//! Validators, one per section of a job file, each turning its part of a [`JobFile`]
//! into the domain's form. Each reports through [`Ctx`], so every error names the file,
//! the line and the field, and one file's problems are all reported together.
//!
//! Sections are checked in file order (image, command, container settings, pull,
//! timeouts, schedule, env, resources, hardening, params, retry, webhook), which is the
//! order errors print.

mod callback;
mod container;
mod env;
mod hardening;
mod params;
mod resources;
mod retry;
mod schedules;
mod webhook;

use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use toml::Spanned;

use super::CatalogError;
use super::calendars::CalendarSet;
use super::file::{JobFile, Params};
use crate::domain::job::{
    ContainerPolicy, InvalidDuration, JobName, JobSpec, LogMode, PullPolicy, parse_duration,
    parse_kept_duration,
};

pub(super) use params::check_refs;
pub use schedules::WEEKDAYS_CALENDAR;

const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);
const MAX_CONCURRENT: std::ops::RangeInclusive<i64> = 1..=10_000;

/// Collects errors for one file.
pub(super) struct Ctx<'a> {
    file: &'a Path,
    text: &'a str,
    pub(super) errors: Vec<CatalogError>,
    /// Reads `serve`'s environment (webhook secrets); tests give their own.
    pub(super) env: fn(&str) -> Option<String>,
}

fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

impl<'a> Ctx<'a> {
    pub(super) fn new(file: &'a Path, text: &'a str) -> Self {
        Self {
            file,
            text,
            errors: Vec::new(),
            env: process_env,
        }
    }

    /// 1-based line of a byte offset's span.
    pub(super) fn line_of(&self, span: &Range<usize>) -> usize {
        let end = span.start.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    /// An error that concerns the whole file (no field).
    pub(super) fn file_error(&mut self, line: Option<usize>, message: impl Into<String>) {
        self.errors.push(CatalogError {
            file: self.file.to_path_buf(),
            line,
            field: None,
            message: message.into(),
        });
    }

    /// A TOML parse or type error, at its line and (best effort) field.
    pub(super) fn toml_error(&mut self, e: &toml::de::Error) {
        let (line, field) = match e.span() {
            Some(span) => {
                let line = self.line_of(&span);
                (Some(line), super::field_at_line(self.text, line))
            }
            None => (None, None),
        };
        self.errors.push(CatalogError {
            file: self.file.to_path_buf(),
            line,
            field,
            message: e.message().trim().replace('\n', " "),
        });
    }

    fn push(&mut self, line: Option<usize>, field: impl Into<String>, message: impl Into<String>) {
        self.errors.push(CatalogError {
            file: self.file.to_path_buf(),
            line,
            field: Some(field.into()),
            message: message.into(),
        });
    }

    pub(super) fn at(
        &mut self,
        span: &Range<usize>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) {
        let line = self.line_of(span);
        self.push(Some(line), field, message);
    }

    /// Substitution happens only in `command` and `env`; anywhere else a reference
    /// would reach Docker verbatim.
    fn no_refs(&mut self, value: &Spanned<String>, field: &str) {
        if value.get_ref().contains("{{") && value.get_ref().contains("params.") {
            self.at(
                &value.span(),
                field,
                "parameters are only substituted in `command` and `env` values",
            );
        }
    }

    /// A name-like value Docker takes as one token.
    fn non_blank_token(&mut self, value: &Spanned<String>, field: &str) -> bool {
        let s = value.get_ref();
        if s.is_empty() {
            self.at(&value.span(), field, "must not be empty");
            false
        } else if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            self.at(
                &value.span(),
                field,
                format!("{s:?} must not contain whitespace or control characters"),
            );
            false
        } else {
            true
        }
    }

    /// An integer within `range`.
    fn int_in(
        &mut self,
        value: &Spanned<i64>,
        field: &str,
        range: std::ops::RangeInclusive<i64>,
    ) -> Option<u32> {
        let v = *value.get_ref();
        match u32::try_from(v) {
            Ok(n) if range.contains(&v) => Some(n),
            _ => {
                self.at(
                    &value.span(),
                    field,
                    format!("{v} is out of range ({}..={})", range.start(), range.end()),
                );
                None
            }
        }
    }

    fn duration(&mut self, value: &Spanned<String>, field: &str) -> Option<Duration> {
        self.parsed(value, field, parse_duration)
    }

    /// A duration a run keeps in its frozen spec (whole milliseconds).
    fn kept_duration(&mut self, value: &Spanned<String>, field: &str) -> Option<Duration> {
        self.parsed(value, field, parse_kept_duration)
    }

    fn parsed(
        &mut self,
        value: &Spanned<String>,
        field: &str,
        parse: fn(&str) -> Result<Duration, InvalidDuration>,
    ) -> Option<Duration> {
        match parse(value.get_ref()) {
            Ok(d) => Some(d),
            Err(e) => {
                self.at(&value.span(), field, e.to_string());
                None
            }
        }
    }
}

/// The whole file: every section's validator, in file order, within the server's
/// container policy. `None` when the spec cannot be built (`ctx` then holds at least
/// one error).
pub(super) fn validate(
    ctx: &mut Ctx<'_>,
    name: Option<JobName>,
    raw: &JobFile,
    calendars: &CalendarSet,
    policy: &ContainerPolicy,
) -> Option<JobSpec> {
    let image = image(ctx, raw.image.as_ref());
    let command = command(ctx, raw.command.as_ref(), &raw.params);
    let container = container::container(ctx, raw);
    let pull = pull(ctx, raw.pull.as_ref());
    let logs = logs(ctx, raw.logs.as_ref());
    let timeouts = timeouts(ctx, raw.timeout.as_ref(), raw.stop_grace.as_ref());
    let schedules = schedules::schedules(
        ctx,
        raw.schedule.as_ref(),
        raw.time_zone.as_ref(),
        &raw.schedules,
        calendars,
    );
    let max_concurrent = raw
        .max_concurrent
        .as_ref()
        .and_then(|m| ctx.int_in(m, "max_concurrent", MAX_CONCURRENT));
    let env = env::env(ctx, &raw.env, &raw.params);
    let mut resources = resources::resources(ctx, &raw.resources);
    // Filled in here, so the frozen spec of every run shows the limit it ran with.
    resources
        .memory_bytes
        .get_or_insert(policy.default_memory());
    let hardening = hardening::hardening(ctx, raw, policy);
    let params = params::params(ctx, &raw.params);
    let retry = raw
        .retry
        .as_ref()
        .map(|r| retry::retry(ctx, r))
        .unwrap_or_default();
    let webhook = raw
        .webhook
        .as_ref()
        .and_then(|w| webhook::webhook(ctx, w, &raw.params));
    let callback = raw
        .callback
        .as_ref()
        .and_then(|c| callback::callback(ctx, c));

    let spec = JobSpec {
        name: name?,
        description: raw.description.as_ref().map(|d| d.get_ref().clone()),
        image: image?,
        command,
        workdir: container.workdir,
        user: container.user,
        env: env.plain,
        secret_env: env.secrets,
        pull,
        resources,
        timeout: timeouts.timeout,
        stop_grace: timeouts.stop_grace,
        network: container.network,
        hardening,
        logs,
        params,
        schedules,
        max_concurrent,
        retry,
        webhook,
        callback,
    };
    schedules::check_params(ctx, &spec, raw);
    Some(spec)
}

/// `image`: required, one token, no parameters.
fn image(ctx: &mut Ctx<'_>, raw: Option<&Spanned<String>>) -> Option<String> {
    match raw {
        None => {
            ctx.push(None, "image", "missing required field");
            None
        }
        Some(img) => {
            ctx.no_refs(img, "image");
            ctx.non_blank_token(img, "image")
                .then(|| img.get_ref().clone())
        }
    }
}

/// `command`: absent means the image's default; present must not be empty.
fn command(
    ctx: &mut Ctx<'_>,
    raw: Option<&Spanned<Vec<Spanned<String>>>>,
    params: &Params,
) -> Vec<String> {
    let Some(cmd) = raw else {
        return Vec::new();
    };
    if cmd.get_ref().is_empty() {
        ctx.at(
            &cmd.span(),
            "command",
            "must not be empty (omit `command` to use the image's default)",
        );
    }
    let mut command = Vec::with_capacity(cmd.get_ref().len());
    for (i, arg) in cmd.get_ref().iter().enumerate() {
        let field = format!("command[{i}]");
        if arg.get_ref().contains('\0') {
            ctx.at(&arg.span(), &field, "contains a NUL character");
        }
        check_refs(ctx, arg, &field, params);
        command.push(arg.get_ref().clone());
    }
    command
}

/// `pull`
fn pull(ctx: &mut Ctx<'_>, raw: Option<&Spanned<String>>) -> PullPolicy {
    match raw {
        None => PullPolicy::default(),
        Some(p) => PullPolicy::parse(p.get_ref()).unwrap_or_else(|e| {
            ctx.at(&p.span(), "pull", e.to_string());
            PullPolicy::default()
        }),
    }
}

/// `logs`
fn logs(ctx: &mut Ctx<'_>, raw: Option<&Spanned<String>>) -> LogMode {
    match raw {
        None => LogMode::default(),
        Some(l) => LogMode::parse(l.get_ref()).unwrap_or_else(|e| {
            ctx.at(&l.span(), "logs", e.to_string());
            LogMode::default()
        }),
    }
}

/// `timeout` and `stop_grace`.
#[derive(Debug, PartialEq)]
struct Timeouts {
    timeout: Option<Duration>,
    stop_grace: Duration,
}

fn timeouts(
    ctx: &mut Ctx<'_>,
    timeout: Option<&Spanned<String>>,
    stop_grace: Option<&Spanned<String>>,
) -> Timeouts {
    Timeouts {
        timeout: timeout.and_then(|t| ctx.kept_duration(t, "timeout")),
        stop_grace: stop_grace
            .and_then(|g| ctx.kept_duration(g, "stop_grace"))
            .unwrap_or(DEFAULT_STOP_GRACE),
    }
}

#[cfg(test)]
mod tests;
