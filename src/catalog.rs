//! The job catalog: one TOML file per job in a directory, turned into [`JobSpec`]s.
//!
//! The file format structs are private to this module; every validation error
//! names the file, the 1-based line (when known) and the field.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::domain::job::*;
use crate::domain::retry::RetryPolicy;

/// Docker's CPU shares range.
const CPU_SHARES: std::ops::RangeInclusive<i64> = 2..=262_144;
/// Docker refuses less than 0.01 CPUs.
const MIN_CPU_LIMIT: f64 = 0.01;
/// Docker's minimum memory limit.
const MIN_MEMORY: u64 = 6 * 1024 * 1024;
/// Largest accepted `max_length`: Linux caps one argv/env string at 128 KiB.
const MAX_PARAM_LENGTH: i64 = 128 * 1024;
const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);
const DEFAULT_NETWORK: &str = "bridge";

/// One problem in one job file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogError {
    pub file: PathBuf,
    /// 1-based.
    pub line: Option<usize>,
    /// Dotted path, e.g. `resources.memory`, `env.FOO`, `params.name.pattern`.
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for CatalogError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        f.write_str(": ")?;
        if let Some(field) = &self.field {
            write!(f, "{field}: ")?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for CatalogError {}

/// Every problem found while loading a catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogErrors(pub Vec<CatalogError>);

impl fmt::Display for CatalogErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for CatalogErrors {}

/// The loaded jobs, keyed and iterated by name.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    jobs: BTreeMap<JobName, Arc<JobSpec>>,
}

impl Catalog {
    /// Load every `*.toml` file directly inside `dir` (not recursive). Other files,
    /// sub-directories and dot-files (editor lock/backup files) are ignored. All errors
    /// from all files are collected; any error fails the whole load.
    pub fn load_dir(dir: &Path) -> Result<Catalog, CatalogErrors> {
        let dir_error = |message: String| {
            CatalogErrors(vec![CatalogError {
                file: dir.to_path_buf(),
                line: None,
                field: None,
                message,
            }])
        };
        let entries = std::fs::read_dir(dir)
            .map_err(|e| dir_error(format!("cannot read job directory: {e}")))?;

        let mut files = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| dir_error(format!("cannot read job directory: {e}")))?;
            let path = entry.path();
            let file_name = entry.file_name();
            if file_name.to_string_lossy().starts_with('.')
                || path.extension().is_none_or(|ext| ext != "toml")
            {
                continue;
            }
            // Follows symlinks; a dangling link is reported when reading it.
            if path.is_dir() {
                continue;
            }
            files.push(path);
        }
        files.sort();

        let mut jobs = BTreeMap::new();
        let mut errors = Vec::new();
        for path in files {
            let file_error = |message: String| CatalogError {
                file: path.clone(),
                line: None,
                field: None,
                message,
            };
            // A non-UTF-8 stem becomes an invalid job name (reported), not a silent skip.
            let stem = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let text = match std::fs::read(&path) {
                Err(e) => {
                    errors.push(file_error(format!("cannot read file: {e}")));
                    continue;
                }
                Ok(bytes) => match String::from_utf8(bytes) {
                    Ok(text) => text,
                    Err(_) => {
                        errors.push(file_error("file is not valid UTF-8".to_owned()));
                        continue;
                    }
                },
            };
            match parse_job(&stem, &path, &text) {
                Ok(spec) => {
                    jobs.insert(spec.name.clone(), Arc::new(spec));
                }
                Err(errs) => errors.extend(errs),
            }
        }
        if errors.is_empty() {
            Ok(Catalog { jobs })
        } else {
            Err(CatalogErrors(errors))
        }
    }

    /// Build a catalog from already-validated specs (later duplicates win).
    pub fn from_specs(specs: impl IntoIterator<Item = JobSpec>) -> Catalog {
        Catalog {
            jobs: specs
                .into_iter()
                .map(|s| (s.name.clone(), Arc::new(s)))
                .collect(),
        }
    }

    pub fn get(&self, name: &str) -> Option<Arc<JobSpec>> {
        self.jobs.get(name).cloned()
    }

    /// Jobs sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<JobSpec>> {
        self.jobs.values()
    }

    /// Job names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &JobName> {
        self.jobs.keys()
    }

    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }
}

// ---------------------------------------------------------------------------
// File format

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JobFile {
    description: Option<Spanned<String>>,
    image: Option<Spanned<String>>,
    command: Option<Spanned<Vec<Spanned<String>>>>,
    workdir: Option<Spanned<String>>,
    user: Option<Spanned<String>>,
    pull: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    stop_grace: Option<Spanned<String>>,
    network: Option<Spanned<String>>,
    schedule: Option<Spanned<String>>,
    time_zone: Option<Spanned<String>>,
    #[serde(default)]
    env: BTreeMap<Spanned<String>, Spanned<String>>,
    #[serde(default)]
    resources: ResourcesFile,
    #[serde(default)]
    params: BTreeMap<Spanned<String>, ParamFile>,
    retry: Option<RetryFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RetryFile {
    max_attempts: Option<Spanned<i64>>,
    backoff: Option<Spanned<String>>,
    backoff_max: Option<Spanned<String>>,
    #[serde(default)]
    on_exit_codes: Vec<Spanned<i64>>,
    #[serde(default)]
    on: Vec<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ResourcesFile {
    cpu: Option<Spanned<i64>>,
    cpu_limit: Option<Spanned<f64>>,
    memory: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ParamFile {
    required: Option<bool>,
    default: Option<Spanned<String>>,
    pattern: Option<Spanned<String>>,
    max_length: Option<Spanned<i64>>,
    description: Option<String>,
}

/// Collects errors for one file.
struct Ctx<'a> {
    file: &'a Path,
    text: &'a str,
    errors: Vec<CatalogError>,
}

impl Ctx<'_> {
    fn line_of(&self, span: &Range<usize>) -> usize {
        let end = span.start.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    fn push(&mut self, line: Option<usize>, field: impl Into<String>, message: impl Into<String>) {
        self.errors.push(CatalogError {
            file: self.file.to_path_buf(),
            line,
            field: Some(field.into()),
            message: message.into(),
        });
    }

    fn at(&mut self, span: &Range<usize>, field: impl Into<String>, message: impl Into<String>) {
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

    fn check_refs(
        &mut self,
        value: &Spanned<String>,
        field: &str,
        params: &BTreeMap<Spanned<String>, ParamFile>,
    ) {
        let s = value.get_ref();
        if has_malformed_param_reference(s) {
            self.at(
                &value.span(),
                field,
                format!(
                    "malformed parameter reference in {s:?} (write `{{{{params.NAME}}}}` with \
                     NAME in lowercase)"
                ),
            );
        }
        for name in param_references(s) {
            if !params.contains_key(name) {
                let declared: Vec<&str> = params.keys().map(|k| k.get_ref().as_str()).collect();
                let hint = if declared.is_empty() {
                    "no parameters are declared".to_owned()
                } else {
                    format!("declared: {}", declared.join(", "))
                };
                self.at(
                    &value.span(),
                    field,
                    format!(
                        "references undeclared parameter `{name}` ({hint}); add a [params.{name}] table"
                    ),
                );
            }
        }
    }
}

/// Parse and validate one job file. `name` is the file stem, `file` is used in errors.
pub fn parse_job(name: &str, file: &Path, text: &str) -> Result<JobSpec, Vec<CatalogError>> {
    let mut ctx = Ctx {
        file,
        text,
        errors: Vec::new(),
    };
    let job_name = match JobName::parse(name) {
        Ok(n) => Some(n),
        Err(e) => {
            ctx.errors.push(CatalogError {
                file: file.to_path_buf(),
                line: None,
                field: None,
                message: format!("{e} (the job name is the file name without `.toml`)"),
            });
            None
        }
    };

    let raw: JobFile = match toml::from_str(text) {
        Ok(raw) => raw,
        Err(e) => {
            let (line, field) = match e.span() {
                Some(span) => {
                    let line = ctx.line_of(&span);
                    (Some(line), field_at_line(text, line))
                }
                None => (None, None),
            };
            ctx.errors.push(CatalogError {
                file: file.to_path_buf(),
                line,
                field,
                message: e.message().trim().replace('\n', " "),
            });
            return Err(ctx.errors);
        }
    };

    let spec = validate(&mut ctx, job_name, raw);
    match spec {
        Some(spec) if ctx.errors.is_empty() => Ok(spec),
        _ => Err(ctx.errors),
    }
}

fn non_blank_token(ctx: &mut Ctx<'_>, value: &Spanned<String>, field: &str) -> bool {
    let s = value.get_ref();
    if s.is_empty() {
        ctx.at(&value.span(), field, "must not be empty");
        false
    } else if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        ctx.at(
            &value.span(),
            field,
            format!("{s:?} must not contain whitespace or control characters"),
        );
        false
    } else {
        true
    }
}

fn validate(ctx: &mut Ctx<'_>, name: Option<JobName>, raw: JobFile) -> Option<JobSpec> {
    // image
    let image = match &raw.image {
        None => {
            ctx.push(None, "image", "missing required field");
            None
        }
        Some(img) => {
            ctx.no_refs(img, "image");
            non_blank_token(ctx, img, "image").then(|| img.get_ref().clone())
        }
    };

    // command
    let mut command = Vec::new();
    if let Some(cmd) = &raw.command {
        if cmd.get_ref().is_empty() {
            ctx.at(
                &cmd.span(),
                "command",
                "must not be empty (omit `command` to use the image's default)",
            );
        }
        for (i, arg) in cmd.get_ref().iter().enumerate() {
            let field = format!("command[{i}]");
            if arg.get_ref().contains('\0') {
                ctx.at(&arg.span(), &field, "contains a NUL character");
            }
            ctx.check_refs(arg, &field, &raw.params);
            command.push(arg.get_ref().clone());
        }
    }

    // workdir, user, network
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
        non_blank_token(ctx, u, "user");
        u.get_ref().clone()
    });
    let network = match &raw.network {
        None => DEFAULT_NETWORK.to_owned(),
        Some(n) => {
            ctx.no_refs(n, "network");
            non_blank_token(ctx, n, "network");
            n.get_ref().clone()
        }
    };

    // pull
    let pull = match &raw.pull {
        None => PullPolicy::default(),
        Some(p) => PullPolicy::parse(p.get_ref()).unwrap_or_else(|e| {
            ctx.at(&p.span(), "pull", e.to_string());
            PullPolicy::default()
        }),
    };

    // durations
    let mut duration = |v: &Spanned<String>, field: &str| match parse_duration(v.get_ref()) {
        Ok(d) => Some(d),
        Err(e) => {
            ctx.at(&v.span(), field, e.to_string());
            None
        }
    };
    let timeout = raw.timeout.as_ref().and_then(|t| duration(t, "timeout"));
    let stop_grace = raw
        .stop_grace
        .as_ref()
        .and_then(|g| duration(g, "stop_grace"))
        .unwrap_or(DEFAULT_STOP_GRACE);

    // schedule
    let schedule = match (&raw.schedule, &raw.time_zone) {
        (None, None) => None,
        (None, Some(tz)) => {
            ctx.at(
                &tz.span(),
                "time_zone",
                "`time_zone` is only meaningful together with `schedule`",
            );
            None
        }
        (Some(expr), tz) => {
            match Schedule::parse(expr.get_ref(), tz.as_ref().map(|t| t.get_ref().as_str())) {
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
    };

    // env
    let mut env = BTreeMap::new();
    for (key, value) in &raw.env {
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
        ctx.check_refs(value, &field, &raw.params);
        env.insert(k.clone(), value.get_ref().clone());
    }

    // resources
    let mut resources = Resources::default();
    if let Some(cpu) = &raw.resources.cpu {
        let v = *cpu.get_ref();
        match u32::try_from(v) {
            Ok(v32) if CPU_SHARES.contains(&v) => resources.cpu = Some(v32),
            _ => ctx.at(
                &cpu.span(),
                "resources.cpu",
                format!(
                    "{v} is out of range ({}..={} CPU units; 1024 = one core)",
                    CPU_SHARES.start(),
                    CPU_SHARES.end()
                ),
            ),
        }
    }
    if let Some(limit) = &raw.resources.cpu_limit {
        let v = *limit.get_ref();
        // The upper bound only guards the nanosecond conversion against overflow.
        if v.is_finite() && (MIN_CPU_LIMIT..=1_000_000.0).contains(&v) {
            resources.cpu_limit = Some(v);
        } else {
            ctx.at(
                &limit.span(),
                "resources.cpu_limit",
                format!("{v} is out of range (cores, at least {MIN_CPU_LIMIT}, e.g. 0.5)"),
            );
        }
    }
    if let Some(mem) = &raw.resources.memory {
        match parse_size(mem.get_ref()) {
            Ok(b) if b >= MIN_MEMORY => resources.memory_bytes = Some(b),
            Ok(_) => ctx.at(
                &mem.span(),
                "resources.memory",
                format!("{:?} is below Docker's minimum of 6MiB", mem.get_ref()),
            ),
            Err(e) => ctx.at(&mem.span(), "resources.memory", e.to_string()),
        }
    }

    // params
    let mut params = BTreeMap::new();
    for (key, p) in &raw.params {
        let pname = key.get_ref();
        let base = format!("params.{pname}");
        let line = Some(ctx.line_of(&key.span()));
        if !is_valid_param_name(pname) {
            ctx.push(
                line,
                &base,
                format!(
                    "invalid parameter name {pname:?} (use 1-64 characters from a-z, 0-9 and '_', not starting with a digit)"
                ),
            );
        }
        let max_length = match &p.max_length {
            None => ParamSpec::DEFAULT_MAX_LENGTH,
            Some(m) => match usize::try_from(*m.get_ref()) {
                Ok(n) if (1..=MAX_PARAM_LENGTH).contains(m.get_ref()) => n,
                _ => {
                    ctx.at(
                        &m.span(),
                        format!("{base}.max_length"),
                        format!("{} is out of range (1..={MAX_PARAM_LENGTH})", m.get_ref()),
                    );
                    ParamSpec::DEFAULT_MAX_LENGTH
                }
            },
        };
        let pattern = p.pattern.as_ref().and_then(|pat| {
            ParamSpec::anchored_pattern(pat.get_ref())
                .map_err(|e| {
                    ctx.at(
                        &pat.span(),
                        format!("{base}.pattern"),
                        format!("invalid regex: {}", regex_error_summary(&e)),
                    );
                })
                .ok()
        });
        let required = p.required.unwrap_or(false);
        let spec = ParamSpec {
            required,
            default: p.default.as_ref().map(|d| d.get_ref().clone()),
            pattern,
            max_length,
            description: p.description.clone(),
        };
        if let Some(d) = &p.default {
            let field = format!("{base}.default");
            if required {
                ctx.at(
                    &d.span(),
                    &field,
                    "a required parameter cannot have a default (drop one of them)",
                );
            }
            if let Err(e) = spec.check_value(pname, d.get_ref()) {
                ctx.at(&d.span(), &field, format!("default value is invalid: {e}"));
            }
        }
        params.insert(pname.clone(), spec);
    }

    let description = raw.description.map(Spanned::into_inner);
    let retry = raw.retry.map(|r| retry_policy(ctx, r)).unwrap_or_default();

    Some(JobSpec {
        name: name?,
        description,
        image: image?,
        command,
        workdir,
        user,
        env,
        pull,
        resources,
        timeout,
        stop_grace,
        network,
        params,
        schedule,
        retry,
    })
}

fn retry_policy(ctx: &mut Ctx<'_>, raw: RetryFile) -> RetryPolicy {
    let mut policy = RetryPolicy::default();
    match &raw.max_attempts {
        Some(n) if (1..=i64::from(RetryPolicy::MAX_ATTEMPTS)).contains(n.get_ref()) => {
            policy.max_attempts = *n.get_ref() as u32;
        }
        Some(n) => ctx.at(
            &n.span(),
            "retry.max_attempts",
            format!(
                "must be between 1 and {} (attempts in all, the first included)",
                RetryPolicy::MAX_ATTEMPTS
            ),
        ),
        None => ctx.push(
            None,
            "retry.max_attempts",
            "missing: a [retry] table must say how many attempts in all (e.g. 3)",
        ),
    }
    let mut duration = |v: &Option<Spanned<String>>, field: &str, default: Duration| match v {
        None => default,
        Some(v) => match parse_duration(v.get_ref()) {
            Ok(d) if !d.is_zero() => d,
            Ok(_) => {
                ctx.at(&v.span(), field, "must be more than 0s");
                default
            }
            Err(e) => {
                ctx.at(&v.span(), field, e.to_string());
                default
            }
        },
    };
    policy.backoff = duration(&raw.backoff, "retry.backoff", RetryPolicy::DEFAULT_BACKOFF);
    policy.backoff_max = duration(
        &raw.backoff_max,
        "retry.backoff_max",
        RetryPolicy::DEFAULT_BACKOFF_MAX.max(policy.backoff),
    );
    if policy.backoff_max < policy.backoff {
        let span = raw
            .backoff_max
            .as_ref()
            .map(|b| b.span())
            .unwrap_or_default();
        ctx.at(
            &span,
            "retry.backoff_max",
            "must not be less than retry.backoff",
        );
    }
    for (i, code) in raw.on_exit_codes.iter().enumerate() {
        if (1..=255).contains(code.get_ref()) {
            policy.on_exit_codes.insert(*code.get_ref());
        } else {
            ctx.at(
                &code.span(),
                format!("retry.on_exit_codes[{i}]"),
                "must be an exit code from 1 to 255 (0 is success)",
            );
        }
    }
    for (i, name) in raw.on.iter().enumerate() {
        match RetryPolicy::RETRYABLE
            .into_iter()
            .find(|c| c.as_str() == name.get_ref())
        {
            Some(code) => {
                policy.on.insert(code);
            }
            None => {
                let names: Vec<&str> = RetryPolicy::RETRYABLE.iter().map(|c| c.as_str()).collect();
                ctx.at(
                    &name.span(),
                    format!("retry.on[{i}]"),
                    format!(
                        "`{}` can't be retried; name any of {} (exit codes go in on_exit_codes)",
                        name.get_ref(),
                        names.join(", ")
                    ),
                );
            }
        }
    }
    if policy.max_attempts > 1 && raw.on.is_empty() && raw.on_exit_codes.is_empty() {
        ctx.push(
            None,
            "retry",
            "max_attempts > 1 but nothing is named to retry: add on_exit_codes and/or on",
        );
    }
    policy
}

/// `regex::Error` renders syntax errors over several lines with a caret diagram;
/// keep just the "error: ..." line.
fn regex_error_summary(e: &regex::Error) -> String {
    let full = e.to_string();
    full.lines()
        .find_map(|l| l.trim().strip_prefix("error: "))
        .unwrap_or_else(|| full.lines().next().unwrap_or("invalid"))
        .to_owned()
}

/// Best-effort field path for a TOML parse/deserialize error at `line`: the key on
/// that line, prefixed by the nearest `[table]` header above it.
fn field_at_line(text: &str, line: usize) -> Option<String> {
    let lines: Vec<&str> = text.lines().collect();
    let idx = line.checked_sub(1)?;
    let here = lines.get(idx)?.trim();
    let header = |l: &str| -> Option<String> {
        let l = l.trim();
        let inner = l.strip_prefix('[')?.split(']').next()?.trim();
        (!inner.is_empty() && !inner.starts_with('[')).then(|| inner.replace([' ', '"'], ""))
    };
    if let Some(h) = header(here) {
        return Some(h);
    }
    let key = here
        .split_once('=')
        .map(|(k, _)| k.trim().replace([' ', '"'], ""))
        .filter(|k| !k.is_empty() && !k.contains('#'));
    let table = lines[..idx].iter().rev().find_map(|l| header(l));
    match (table, key) {
        (Some(t), Some(k)) => Some(format!("{t}.{k}")),
        (None, Some(k)) => Some(k),
        (Some(t), None) => Some(t),
        (None, None) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn parse(text: &str) -> Result<JobSpec, Vec<CatalogError>> {
        parse_job("hello", Path::new("jobs/hello.toml"), text)
    }

    fn errors(text: &str) -> Vec<String> {
        parse(text)
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    fn one_error(text: &str) -> CatalogError {
        let mut errs = parse(text).unwrap_err();
        assert_eq!(errs.len(), 1, "{errs:?}");
        errs.remove(0)
    }

    const FULL: &str = r#"
description = "Say hello"
image = "tasuki-example:latest"
command = ["sh", "-c", "echo {{params.name}} {{ params.punct }}"]
workdir = "/tmp"
user = "1000:1000"
pull = "always"
timeout = "30m"
stop_grace = "5s"
network = "none"
schedule = "0 9 * * 1-5"
time_zone = "Asia/Tokyo"

[env]
FOO = "bar"
GREETING = "hi {{params.name}}"

[resources]
cpu = 512
cpu_limit = 0.5
memory = "256MiB"

[params.name]
default = "world"
pattern = "[a-z]+"
max_length = 64
description = "who to greet"

[params.punct]
required = true
"#;

    #[test]
    fn full_file() {
        let s = parse(FULL).unwrap();
        assert_eq!(s.name.as_str(), "hello");
        assert_eq!(s.description.as_deref(), Some("Say hello"));
        assert_eq!(s.image, "tasuki-example:latest");
        assert_eq!(s.command.len(), 3);
        assert_eq!(s.workdir.as_deref(), Some("/tmp"));
        assert_eq!(s.user.as_deref(), Some("1000:1000"));
        assert_eq!(s.pull, PullPolicy::Always);
        assert_eq!(s.timeout, Some(Duration::from_secs(1800)));
        assert_eq!(s.stop_grace, Duration::from_secs(5));
        assert_eq!(s.network, "none");
        let sched = s.schedule.as_ref().unwrap();
        assert_eq!(sched.expression, "0 9 * * 1-5");
        assert_eq!(sched.time_zone, chrono_tz::Asia::Tokyo);
        assert_eq!(s.env["FOO"], "bar");
        assert_eq!(
            s.resources,
            Resources {
                cpu: Some(512),
                cpu_limit: Some(0.5),
                memory_bytes: Some(256 << 20)
            }
        );
        let name = &s.params["name"];
        assert!(!name.required);
        assert_eq!(name.default.as_deref(), Some("world"));
        assert_eq!(name.max_length, 64);
        assert_eq!(name.description.as_deref(), Some("who to greet"));
        assert!(s.params["punct"].required);
        assert_eq!(s.params["punct"].max_length, 1024);

        let given = BTreeMap::from([("punct".to_owned(), "!".to_owned())]);
        let r = s.resolve(&given).unwrap();
        assert_eq!(r.command[2], "echo world !");
        assert_eq!(r.env["GREETING"], "hi world");
    }

    #[test]
    fn minimal_file_defaults() {
        let s = parse(r#"image = "alpine""#).unwrap();
        assert!(s.command.is_empty());
        assert_eq!(s.pull, PullPolicy::IfNotPresent);
        assert_eq!(s.stop_grace, Duration::from_secs(10));
        assert_eq!(s.network, "bridge");
        assert_eq!(s.timeout, None);
        assert_eq!(s.resources, Resources::default());
        assert!(s.params.is_empty() && s.env.is_empty() && s.schedule.is_none());
    }

    #[test]
    fn integer_cpu_limit_accepted() {
        let s = parse("image = \"a\"\n[resources]\ncpu_limit = 2\n").unwrap();
        assert_eq!(s.resources.cpu_limit, Some(2.0));
    }

    #[test]
    fn bad_size_reports_line_and_field() {
        let e = one_error("image = \"a\"\n\n[resources]\nmemory = \"12 parsecs\"\n");
        assert_eq!(e.line, Some(4));
        assert_eq!(e.field.as_deref(), Some("resources.memory"));
        assert_eq!(
            e.to_string(),
            "jobs/hello.toml:4: resources.memory: invalid size \"12 parsecs\": unknown unit \
             (expected e.g. \"256MiB\", \"1GiB\", \"512MB\" or a number of bytes)"
        );
        let e = one_error("image = \"a\"\n[resources]\nmemory = \"5MiB\"\n");
        assert!(e.message.contains("minimum"), "{e}");
    }

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
    fn unknown_field_with_line() {
        let e = one_error("image = \"a\"\n\nimgae = \"b\"\n");
        assert_eq!(e.line, Some(3));
        assert_eq!(e.field.as_deref(), Some("imgae"));
        assert!(e.message.contains("unknown field `imgae`"), "{e}");

        let e = one_error("image = \"a\"\n[resources]\ncpu = 512\nmem = \"1GiB\"\n");
        assert_eq!(e.line, Some(4));
        assert_eq!(e.field.as_deref(), Some("resources.mem"));

        let e = one_error("image = \"a\"\n[params.x]\nrequired = true\nregex = \"a\"\n");
        assert_eq!(e.line, Some(4));
        assert_eq!(e.field.as_deref(), Some("params.x.regex"));
    }

    #[test]
    fn wrong_type_and_syntax_errors() {
        let e = one_error("image = \"a\"\n[resources]\ncpu = \"lots\"\n");
        assert_eq!(e.line, Some(3));
        assert_eq!(e.field.as_deref(), Some("resources.cpu"));
        let e = one_error("image = \"a\"\n[env]\nN = 5\n");
        assert_eq!(e.line, Some(3));
        assert_eq!(e.field.as_deref(), Some("env.N"));
        let e = one_error("image = \"a\"\ncommand = [\"a\",\n");
        assert!(e.line.is_some());
        assert!(!e.message.contains('\n'));
    }

    #[test]
    fn bad_job_name_from_stem() {
        let errs =
            parse_job("Bad.Name", Path::new("jobs/Bad.Name.toml"), "image = \"a\"").unwrap_err();
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].line, None);
        assert!(
            errs[0]
                .to_string()
                .starts_with("jobs/Bad.Name.toml: invalid job name \"Bad.Name\"")
        );
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
    fn undeclared_param_reference() {
        let e = one_error("image = \"a\"\ncommand = [\"echo\", \"{{params.who}}\"]\n");
        assert_eq!(e.line, Some(2));
        assert_eq!(e.field.as_deref(), Some("command[1]"));
        assert!(e.message.contains("undeclared parameter `who`"), "{e}");

        let e = one_error("image = \"a\"\n[env]\nX = \"{{ params.y }}\"\n[params.z]\n");
        assert_eq!(e.line, Some(3));
        assert_eq!(e.field.as_deref(), Some("env.X"));
        assert!(e.message.contains("(declared: z)"), "{e}");

        let e = one_error("image = \"a\"\ncommand = [\"{{params.Who}}\"]\n");
        assert!(e.message.contains("malformed"), "{e}");
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
    fn param_validation() {
        let e = one_error("image = \"a\"\n[params.Bad]\n");
        assert_eq!(e.line, Some(2));
        assert_eq!(e.field.as_deref(), Some("params.Bad"));

        let e = one_error("image = \"a\"\n[params.x]\nrequired = true\ndefault = \"v\"\n");
        assert_eq!(e.line, Some(4));
        assert_eq!(e.field.as_deref(), Some("params.x.default"));
        assert!(e.message.contains("cannot have a default"));

        let e = one_error("image = \"a\"\n[params.x]\npattern = \"[a-z]+\"\ndefault = \"abc1\"\n");
        assert_eq!(e.field.as_deref(), Some("params.x.default"));
        assert!(e.message.contains("does not match"), "{e}");

        let e = one_error("image = \"a\"\n[params.x]\nmax_length = 3\ndefault = \"abcd\"\n");
        assert!(e.message.contains("too long"), "{e}");

        let e = one_error("image = \"a\"\n[params.x]\nmax_length = 0\n");
        assert_eq!(e.field.as_deref(), Some("params.x.max_length"));
        assert_eq!(e.line, Some(3));

        let e = one_error("image = \"a\"\n[params.x]\npattern = \"([a-z\"\n");
        assert_eq!(e.field.as_deref(), Some("params.x.pattern"));
        assert!(e.message.starts_with("invalid regex: "), "{e}");
        assert!(!e.message.contains('\n'));
    }

    #[test]
    fn pattern_anchored_even_without_caret_dollar() {
        let s = parse(
            "image = \"a\"\ncommand = [\"{{params.x}}\"]\n[params.x]\npattern = \"[a-z]+\"\n",
        )
        .unwrap();
        let given = |v: &str| BTreeMap::from([("x".to_owned(), v.to_owned())]);
        assert!(s.resolve(&given("abc")).is_ok());
        assert!(s.resolve(&given("abc; rm -rf /")).is_err());
        assert!(s.resolve(&given("1abc")).is_err());
    }

    #[test]
    fn substitution_is_verbatim() {
        let s = parse(
            "image = \"a\"\ncommand = [\"echo\", \"{{params.x}}\"]\n[env]\nV = \"<{{params.x}}>\"\n[params.x]\n",
        )
        .unwrap();
        let evil = "$(id); rm -rf /";
        let r = s
            .resolve(&BTreeMap::from([("x".to_owned(), evil.to_owned())]))
            .unwrap();
        assert_eq!(r.command, ["echo", evil]);
        assert_eq!(r.env["V"], format!("<{evil}>"));
        // optional, no value, no default -> empty string
        let r = s.resolve(&BTreeMap::new()).unwrap();
        assert_eq!(r.command, ["echo", ""]);
        assert_eq!(r.env["V"], "<>");
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
        assert_eq!(s.schedule.unwrap().time_zone, chrono_tz::UTC);
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
    fn collects_multiple_errors_per_file() {
        let errs =
            errors("image = \"a\"\ntimeout = \"x\"\npull = \"y\"\n[resources]\nmemory = \"z\"\n");
        assert_eq!(errs.len(), 3, "{errs:?}");
    }

    #[test]
    fn retry_table() {
        let s = parse(
            "image = \"a\"\n[retry]\nmax_attempts = 3\nbackoff = \"2s\"\non_exit_codes = [1, 75]\non = [\"lost\", \"oom_killed\"]\n",
        )
        .unwrap();
        assert_eq!(s.retry.max_attempts, 3);
        assert_eq!(s.retry.backoff, Duration::from_secs(2));
        assert_eq!(s.retry.on_exit_codes.len(), 2);
        assert!(s.retry.on.contains(&crate::domain::run::ReasonCode::Lost));
        assert_eq!(
            parse("image = \"a\"\n").unwrap().retry,
            RetryPolicy::default()
        );

        let e = one_error("image = \"a\"\n[retry]\nmax_attempts = 2\non = [\"cancelled\"]\n");
        assert_eq!(e.field.as_deref(), Some("retry.on[0]"));
        assert!(e.message.contains("can't be retried"), "{}", e.message);
        let e = one_error("image = \"a\"\n[retry]\nmax_attempts = 0\non = [\"lost\"]\n");
        assert_eq!(e.field.as_deref(), Some("retry.max_attempts"));
        assert_eq!(e.line, Some(3));
        let e = one_error("image = \"a\"\n[retry]\nmax_attempts = 2\non_exit_codes = [0]\n");
        assert_eq!(e.field.as_deref(), Some("retry.on_exit_codes[0]"));
        let e = one_error("image = \"a\"\n[retry]\nmax_attempts = 3\n");
        assert_eq!(e.field.as_deref(), Some("retry"));
    }

    #[test]
    fn load_dir_ok_and_sorted() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("b.toml"), "image = \"b\"").unwrap();
        fs::write(dir.path().join("a.toml"), "image = \"a\"").unwrap();
        fs::write(dir.path().join("README.md"), "not a job").unwrap();
        fs::write(dir.path().join(".#a.toml"), "garbage").unwrap();
        fs::create_dir(dir.path().join("sub.toml")).unwrap();
        fs::create_dir(dir.path().join("nested")).unwrap();
        fs::write(dir.path().join("nested/c.toml"), "image = \"c\"").unwrap();
        let c = Catalog::load_dir(dir.path()).unwrap();
        assert_eq!(c.len(), 2);
        assert!(!c.is_empty());
        let names: Vec<&str> = c.iter().map(|j| j.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(c.get("b").unwrap().image, "b");
        assert!(c.get("c").is_none());
    }

    #[test]
    fn load_dir_collects_all_errors() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("good.toml"), "image = \"g\"").unwrap();
        fs::write(dir.path().join("Bad.toml"), "image = \"g\"").unwrap();
        fs::write(dir.path().join("x.toml"), "image = \"g\"\nbogus = 1\n").unwrap();
        fs::write(dir.path().join("y.toml"), [0xff, 0xfe]).unwrap();
        let errs = Catalog::load_dir(dir.path()).unwrap_err();
        assert_eq!(errs.0.len(), 3, "{errs}");
        let text = errs.to_string();
        assert_eq!(text.lines().count(), 3);
        assert!(text.contains("Bad.toml: invalid job name"));
        assert!(
            text.contains("x.toml:2: bogus: unknown field `bogus`"),
            "{text}"
        );
        assert!(text.contains("y.toml: file is not valid UTF-8"));
    }

    #[test]
    fn load_dir_missing_directory() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let errs = Catalog::load_dir(&missing).unwrap_err();
        assert_eq!(errs.0.len(), 1);
        assert_eq!(errs.0[0].file, missing);
        assert!(errs.to_string().contains("cannot read job directory"));
    }

    #[test]
    fn empty_dir_is_empty_catalog() {
        let dir = tempfile::tempdir().unwrap();
        let c = Catalog::load_dir(dir.path()).unwrap();
        assert!(c.is_empty());
        assert_eq!(c.iter().count(), 0);
    }

    #[test]
    fn field_at_line_heuristic() {
        let t = "a = 1\n[resources]\n  memory = \"x\"\n[params.\"n\"]\nb = 2\n";
        assert_eq!(field_at_line(t, 1).as_deref(), Some("a"));
        assert_eq!(field_at_line(t, 3).as_deref(), Some("resources.memory"));
        assert_eq!(field_at_line(t, 4).as_deref(), Some("params.n"));
        assert_eq!(field_at_line(t, 5).as_deref(), Some("params.n.b"));
        assert_eq!(field_at_line(t, 99), None);
    }
}
