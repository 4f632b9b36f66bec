//! Validators, one per section of a job file, each turning its part of a [`JobFile`]
//! into the domain's form. Each reports through [`Ctx`], so every error names the file,
//! the line and the field, and one file's problems are all reported together.
//!
//! Sections are checked in file order (image, command, container settings, pull,
//! timeouts, schedule, env, resources, params, retry, webhook), which is the order errors print.

mod callback;
mod params;
mod resources;
mod retry;
mod schedules;
mod webhook;

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use toml::Spanned;

use super::CatalogError;
use super::calendars::CalendarSet;
use super::file::{JobFile, Params};
use crate::domain::job::{
    InvalidDuration, JobName, JobSpec, PullPolicy, RESERVED_ENV_PREFIX, is_reserved_env_name,
    is_valid_env_name, parse_duration, parse_kept_duration,
};

pub(super) use params::check_refs;
pub use schedules::WEEKDAYS_CALENDAR;

const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);
const DEFAULT_NETWORK: &str = "bridge";
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

/// The whole file: every section's validator, in file order. `None` when the spec
/// cannot be built (`ctx` then holds at least one error).
pub(super) fn validate(
    ctx: &mut Ctx<'_>,
    name: Option<JobName>,
    raw: &JobFile,
    calendars: &CalendarSet,
) -> Option<JobSpec> {
    let image = image(ctx, raw.image.as_ref());
    let command = command(ctx, raw.command.as_ref(), &raw.params);
    let container = container(ctx, raw);
    let pull = pull(ctx, raw.pull.as_ref());
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
    let env = env(ctx, &raw.env, &raw.params);
    let resources = resources::resources(ctx, &raw.resources);
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
        env,
        pull,
        resources,
        timeout: timeouts.timeout,
        stop_grace: timeouts.stop_grace,
        network: container.network,
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

/// `workdir`, `user` and `network`: how the container is set up around the command.
#[derive(Debug, PartialEq)]
struct Container {
    workdir: Option<String>,
    user: Option<String>,
    network: String,
}

fn container(ctx: &mut Ctx<'_>, raw: &JobFile) -> Container {
    let workdir = raw.workdir.as_ref().map(|w| {
        ctx.no_refs(w, "workdir");
        if !w.get_ref().starts_with('/') {
            ctx.at(
                &w.span(),
                "workdir",
                format!("{:?} must be an absolute path", w.get_ref()),
            );
        }
        w.get_ref().clone()
    });
    let user = raw.user.as_ref().map(|u| {
        ctx.no_refs(u, "user");
        ctx.non_blank_token(u, "user");
        u.get_ref().clone()
    });
    let network = match &raw.network {
        None => DEFAULT_NETWORK.to_owned(),
        Some(n) => {
            ctx.no_refs(n, "network");
            ctx.non_blank_token(n, "network");
            n.get_ref().clone()
        }
    };
    Container {
        workdir,
        user,
        network,
    }
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

/// `[env]`: names a shell would take, none of tasuki's own, values without NUL.
fn env(
    ctx: &mut Ctx<'_>,
    raw: &BTreeMap<Spanned<String>, Spanned<String>>,
    params: &Params,
) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for (key, value) in raw {
        let k = key.get_ref();
        let field = format!("env.{k}");
        if !is_valid_env_name(k) {
            ctx.at(
                &key.span(),
                &field,
                format!("invalid environment variable name {k:?} (use A-Z, a-z, 0-9 and '_', not starting with a digit)"),
            );
        } else if is_reserved_env_name(k) {
            ctx.at(
                &key.span(),
                &field,
                format!("names starting with `{RESERVED_ENV_PREFIX}` are reserved for tasuki"),
            );
        }
        if value.get_ref().contains('\0') {
            ctx.at(&value.span(), &field, "contains a NUL character");
        }
        check_refs(ctx, value, &field, params);
        env.insert(k.clone(), value.get_ref().clone());
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::testing::*;

    #[test]
    fn bad_duration() {
        let e = one_error("image = \"a\"\ntimeout = \"soon\"\n");
        assert_eq!(e.line, Some(2));
        assert_eq!(e.field.as_deref(), Some("timeout"));
        assert!(e.message.contains("invalid duration \"soon\""), "{e}");
        let e = one_error("image = \"a\"\nstop_grace = \"0s\"\n");
        assert_eq!(e.field.as_deref(), Some("stop_grace"));
    }

    #[test]
    fn missing_and_bad_image() {
        let e = one_error("command = [\"x\"]\n");
        assert_eq!(e.field.as_deref(), Some("image"));
        assert!(e.message.contains("missing"));
        assert_eq!(e.line, None);
        assert_eq!(one_error("image = \"\"").field.as_deref(), Some("image"));
        assert!(one_error("image = \"a b\"").message.contains("whitespace"));
    }

    #[test]
    fn references_outside_command_env_rejected() {
        let e = one_error("image = \"img:{{params.tag}}\"\n[params.tag]\n");
        assert_eq!(e.field.as_deref(), Some("image"));
        assert!(e.message.contains("only substituted"));
    }

    #[test]
    fn env_names() {
        let errs =
            errors("image = \"a\"\n[env]\n\"1BAD\" = \"x\"\nTASUKI_RUN = \"y\"\nOK_1 = \"z\"\n");
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(errs[0].starts_with("jobs/hello.toml:3: env.1BAD: invalid environment"));
        assert!(
            errs[1].starts_with("jobs/hello.toml:4: env.TASUKI_RUN: names starting with `TASUKI_`")
        );
    }

    #[test]
    fn schedule_and_time_zone() {
        let e = one_error("image = \"a\"\ntime_zone = \"UTC\"\n");
        assert_eq!(e.field.as_deref(), Some("time_zone"));
        assert_eq!(e.line, Some(2));
        let e = one_error("image = \"a\"\nschedule = \"0 9 * * 8\"\n");
        assert_eq!(e.field.as_deref(), Some("schedule"));
        let e = one_error("image = \"a\"\nschedule = \"0 9 * * *\"\ntime_zone = \"Tokyo\"\n");
        assert_eq!(e.field.as_deref(), Some("time_zone"));
        assert_eq!(e.line, Some(3));
        let s = parse("image = \"a\"\nschedule = \"@daily\"\n").unwrap();
        assert_eq!(s.schedules[0].time_zone, chrono_tz::UTC);
    }

    #[test]
    fn misc_field_validation() {
        assert_eq!(
            one_error("image = \"a\"\nworkdir = \"tmp\"")
                .field
                .as_deref(),
            Some("workdir")
        );
        assert_eq!(
            one_error("image = \"a\"\npull = \"sometimes\"")
                .field
                .as_deref(),
            Some("pull")
        );
        assert_eq!(
            one_error("image = \"a\"\ncommand = []").field.as_deref(),
            Some("command")
        );
        assert_eq!(
            one_error("image = \"a\"\nnetwork = \"\"").field.as_deref(),
            Some("network")
        );
        assert_eq!(
            one_error("image = \"a\"\n[resources]\ncpu = 1")
                .field
                .as_deref(),
            Some("resources.cpu")
        );
        assert_eq!(
            one_error("image = \"a\"\n[resources]\ncpu = 262145")
                .field
                .as_deref(),
            Some("resources.cpu")
        );
        assert_eq!(
            one_error("image = \"a\"\n[resources]\ncpu_limit = 0.0")
                .field
                .as_deref(),
            Some("resources.cpu_limit")
        );
        assert_eq!(
            one_error("image = \"a\"\n[resources]\ncpu_limit = nan")
                .field
                .as_deref(),
            Some("resources.cpu_limit")
        );
    }

    #[test]
    fn command_arguments() {
        let e = one_error("image = \"a\"\ncommand = [\"echo\", \"a\\u0000b\"]\n");
        assert_eq!(e.line, Some(2));
        assert_eq!(e.field.as_deref(), Some("command[1]"));
        assert_eq!(e.message, "contains a NUL character");
        let e = one_error("image = \"a\"\n\ncommand = []\n");
        assert_eq!(e.line, Some(3));
        assert!(e.message.contains("omit `command`"), "{e}");
        let s = parse("image = \"a\"\ncommand = [\"a b\", \"\"]\n").unwrap();
        assert_eq!(s.command, ["a b", ""]);
    }

    #[test]
    fn container_settings() {
        let s =
            parse("image = \"a\"\nworkdir = \"/w\"\nuser = \"app\"\nnetwork = \"none\"\n").unwrap();
        assert_eq!(s.workdir.as_deref(), Some("/w"));
        assert_eq!(s.user.as_deref(), Some("app"));
        assert_eq!(s.network, "none");

        let e = one_error("image = \"a\"\nworkdir = \"tmp\"\n");
        assert_eq!(
            e.to_string(),
            "jobs/hello.toml:2: workdir: \"tmp\" must be an absolute path"
        );
        let e = one_error("image = \"a\"\nuser = \"a b\"\n");
        assert_eq!(e.field.as_deref(), Some("user"));
        assert!(e.message.contains("whitespace"), "{e}");
        let e = one_error("image = \"a\"\n\nnetwork = \"{{params.n}}\"\n[params.n]\n");
        assert_eq!(e.line, Some(3));
        assert_eq!(e.field.as_deref(), Some("network"));
        assert!(e.message.contains("only substituted"), "{e}");
    }

    #[test]
    fn timeouts_default_and_parse() {
        let s = parse("image = \"a\"\ntimeout = \"1h 30m\"\n").unwrap();
        assert_eq!(s.timeout, Some(Duration::from_secs(5400)));
        assert_eq!(s.stop_grace, DEFAULT_STOP_GRACE);
        let errs = errors("image = \"a\"\ntimeout = \"x\"\nstop_grace = \"y\"\n");
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(
            errs[0].starts_with("jobs/hello.toml:2: timeout: "),
            "{errs:?}"
        );
        assert!(
            errs[1].starts_with("jobs/hello.toml:3: stop_grace: "),
            "{errs:?}"
        );
    }

    #[test]
    fn env_values() {
        let e = one_error("image = \"a\"\n[env]\nX = \"a\\u0000\"\n");
        assert_eq!(
            e.to_string(),
            "jobs/hello.toml:3: env.X: contains a NUL character"
        );
        let e = one_error("image = \"a\"\n[env]\nX = \"{{params.p}}\"\n");
        assert!(e.message.contains("no parameters are declared"), "{e}");
    }

    /// Errors print in the order of the file's sections, whatever order the file
    /// gives them in.
    #[test]
    fn errors_come_in_section_order() {
        let errs = parse(
            "[retry]\nmax_attempts = 0\n[params.X]\n[resources]\ncpu = 1\n[env]\n\"1\" = \"v\"\n",
        )
        .unwrap_err();
        let fields: Vec<_> = errs.iter().map(|e| e.field.as_deref()).collect();
        assert_eq!(
            fields,
            [
                Some("image"),
                Some("env.1"),
                Some("resources.cpu"),
                Some("params.X"),
                Some("retry.max_attempts"),
            ]
        );
        let errs = parse(
            "image = \"\"\ncommand = []\nworkdir = \"w\"\npull = \"p\"\ntimeout = \"t\"\nschedule = \"s\"\n",
        )
        .unwrap_err();
        let fields: Vec<_> = errs.iter().map(|e| e.field.as_deref()).collect();
        assert_eq!(
            fields,
            [
                Some("image"),
                Some("command"),
                Some("workdir"),
                Some("pull"),
                Some("timeout"),
                Some("schedule"),
            ]
        );
    }

    /// Found by `fuzz/fuzz_targets/job_file.rs`: `stop_grace = "18446744073709551615s"`
    /// was accepted and then stored, in milliseconds, as another duration; and a
    /// sub-millisecond `timeout` was stored as 0 (every run timed out at once).
    #[test]
    fn fuzz_stop_grace_of_u64_max_seconds_is_refused() {
        let e = one_error("image = \"a\"\nstop_grace = \"18446744073709551615s\"\n");
        assert_eq!(e.line, Some(2));
        assert_eq!(e.field.as_deref(), Some("stop_grace"));
        assert!(e.message.contains("longer than a run can keep"), "{e}");
        let e = one_error("image = \"a\"\ntimeout = \"999us\"\n");
        assert_eq!(e.field.as_deref(), Some("timeout"));
        assert!(e.message.contains("whole milliseconds"), "{e}");
        let e = one_error(
            "image = \"a\"\n[retry]\nmax_attempts = 2\non = [\"lost\"]\nbackoff = \"1ns\"\n",
        );
        assert_eq!(e.field.as_deref(), Some("retry.backoff"));
        let s = parse("image = \"a\"\ntimeout = \"1500ms\"\n").unwrap();
        assert_eq!(s.timeout, Some(Duration::from_millis(1500)));
    }
}
