//! Job definitions: the validated, in-memory form of a job file, plus the
//! pure parsing helpers (names, sizes, durations, schedules) and request
//! parameter resolution.
//!
//! Nothing in here performs I/O; the TOML file format lives in
//! `crate::catalog`.

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;
use std::sync::LazyLock;
use std::time::Duration;

use chrono::{DateTime, Utc};
use regex::Regex;

/// A job's name: the job file's stem, `^[a-z0-9][a-z0-9_-]{0,62}$`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct JobName(String);

/// The given string is not a valid job name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid job name {0:?}: use 1-63 characters from a-z, 0-9, '_' and '-', \
     starting with a letter or digit"
)]
pub struct InvalidJobName(pub String);

impl JobName {
    /// Maximum length of a job name, in bytes (all allowed characters are ASCII).
    pub const MAX_LEN: usize = 63;

    pub fn parse(s: &str) -> Result<JobName, InvalidJobName> {
        let mut chars = s.chars();
        let first_ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        let rest_ok =
            chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
        if first_ok && rest_ok && s.len() <= Self::MAX_LEN {
            Ok(JobName(s.to_owned()))
        } else {
            Err(InvalidJobName(s.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for JobName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for JobName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// Lets a `BTreeMap<JobName, _>` / `HashMap<JobName, _>` be queried with a `&str`.
/// Sound because `Eq`, `Ord` and `Hash` are derived from the inner `String`.
impl Borrow<str> for JobName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl FromStr for JobName {
    type Err = InvalidJobName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobName::parse(s)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PullPolicy {
    #[default]
    IfNotPresent,
    Always,
    Never,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid pull policy {0:?} (expected \"if-not-present\", \"always\" or \"never\")")]
pub struct InvalidPullPolicy(pub String);

impl PullPolicy {
    pub fn parse(s: &str) -> Result<PullPolicy, InvalidPullPolicy> {
        match s {
            "if-not-present" => Ok(PullPolicy::IfNotPresent),
            "always" => Ok(PullPolicy::Always),
            "never" => Ok(PullPolicy::Never),
            other => Err(InvalidPullPolicy(other.to_owned())),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::IfNotPresent => "if-not-present",
            PullPolicy::Always => "always",
            PullPolicy::Never => "never",
        }
    }
}

impl fmt::Display for PullPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Container resource limits.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Resources {
    /// Relative CPU weight in ECS units (1024 = one core's share); Docker `CpuShares`.
    pub cpu: Option<u32>,
    /// Hard CPU cap in cores (e.g. 0.5); Docker `NanoCpus` = cores * 1e9.
    pub cpu_limit: Option<f64>,
    /// Hard memory limit in bytes; Docker `Memory`.
    pub memory_bytes: Option<u64>,
}

/// A declared request parameter.
#[derive(Debug, Clone)]
pub struct ParamSpec {
    pub required: bool,
    pub default: Option<String>,
    /// Anchored: the whole value must match. Build it with [`ParamSpec::anchored_pattern`].
    pub pattern: Option<regex::Regex>,
    /// Maximum value length in characters (Unicode scalar values).
    pub max_length: usize,
    pub description: Option<String>,
}

impl ParamSpec {
    /// Default for `max_length`.
    pub const DEFAULT_MAX_LENGTH: usize = 1024;

    /// Compile `pattern` so that it must match the whole value, whether or not the
    /// author wrote `^...$` (`^(?:pattern)$`; without the `m` flag `$` only matches at
    /// the very end of the value).
    pub fn anchored_pattern(pattern: &str) -> Result<Regex, regex::Error> {
        Regex::new(&format!("^(?:{pattern})$"))
    }

    /// Check one value against `max_length` and `pattern`.
    pub fn check_value(&self, name: &str, value: &str) -> Result<(), ParamError> {
        if value.contains('\0') {
            return Err(ParamError::ContainsNul {
                name: name.to_owned(),
            });
        }
        if value.chars().count() > self.max_length {
            return Err(ParamError::TooLong {
                name: name.to_owned(),
                max: self.max_length,
            });
        }
        if let Some(re) = &self.pattern
            && !re.is_match(value)
        {
            return Err(ParamError::PatternMismatch {
                name: name.to_owned(),
                pattern: re.as_str().to_owned(),
            });
        }
        Ok(())
    }
}

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

#[derive(Debug, Clone)]
pub struct JobSpec {
    pub name: JobName,
    pub description: Option<String>,
    pub image: String,
    /// Empty means "use the image's default command".
    pub command: Vec<String>,
    pub workdir: Option<String>,
    pub user: Option<String>,
    pub env: BTreeMap<String, String>,
    pub pull: PullPolicy,
    pub resources: Resources,
    pub timeout: Option<Duration>,
    pub stop_grace: Duration,
    pub network: String,
    pub params: BTreeMap<String, ParamSpec>,
    pub schedule: Option<Schedule>,
    pub retry: super::retry::RetryPolicy,
}

/// A job with request parameters applied: what actually gets run.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedSpec {
    pub image: String,
    pub command: Vec<String>,
    pub workdir: Option<String>,
    pub user: Option<String>,
    pub env: BTreeMap<String, String>,
    pub pull: PullPolicy,
    pub resources: Resources,
    pub timeout: Option<Duration>,
    pub stop_grace: Duration,
    pub network: String,
}

/// One problem with the parameters of a run request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamError {
    #[error("unknown parameter `{name}` ({})", declared_list(.declared))]
    Unknown { name: String, declared: Vec<String> },
    #[error("missing required parameter `{name}`")]
    Missing { name: String },
    #[error("parameter `{name}` is too long (at most {max} characters)")]
    TooLong { name: String, max: usize },
    #[error("parameter `{name}` does not match the pattern `{pattern}`")]
    PatternMismatch { name: String, pattern: String },
    #[error("parameter `{name}` contains a NUL character")]
    ContainsNul { name: String },
}

fn declared_list(declared: &[String]) -> String {
    if declared.is_empty() {
        "this job declares no parameters".to_owned()
    } else {
        format!("declared: {}", declared.join(", "))
    }
}

impl ParamError {
    /// The parameter this error is about.
    pub fn param(&self) -> &str {
        match self {
            ParamError::Unknown { name, .. }
            | ParamError::Missing { name }
            | ParamError::TooLong { name, .. }
            | ParamError::PatternMismatch { name, .. }
            | ParamError::ContainsNul { name } => name,
        }
    }
}

/// All parameter problems of one request, sorted by parameter name. Never empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamErrors(Vec<ParamError>);

impl ParamErrors {
    pub fn errors(&self) -> &[ParamError] {
        &self.0
    }
    pub fn iter(&self) -> std::slice::Iter<'_, ParamError> {
        self.0.iter()
    }
    pub fn into_vec(self) -> Vec<ParamError> {
        self.0
    }
}

impl fmt::Display for ParamErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ParamErrors {}

impl<'a> IntoIterator for &'a ParamErrors {
    type Item = &'a ParamError;
    type IntoIter = std::slice::Iter<'a, ParamError>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// `{{params.NAME}}`, optionally with spaces/tabs inside the braces.
static PARAM_REF: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"\{\{[ \t]*params\.([a-z_][a-z0-9_]*)[ \t]*\}\}").expect("constant regex is valid")
});

/// Anything that looks like an attempted reference (used to catch typos).
static PARAM_REF_LOOSE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\{\{\s*params\.").expect("constant regex is valid"));

/// Names referenced as `{{params.NAME}}` in `s`, in order of appearance.
pub fn param_references(s: &str) -> Vec<&str> {
    PARAM_REF
        .captures_iter(s)
        .filter_map(|c| c.get(1).map(|m| m.as_str()))
        .collect()
}

/// True if `s` contains something starting like a parameter reference
/// (`{{params.`) that is not a well-formed `{{params.NAME}}`.
pub fn has_malformed_param_reference(s: &str) -> bool {
    PARAM_REF_LOOSE.find_iter(s).count() != PARAM_REF.find_iter(s).count()
}

/// Replace every `{{params.NAME}}` whose NAME is in `values`. Single pass: inserted
/// values are never re-scanned. References to names not in `values` stay verbatim.
fn substitute(template: &str, values: &BTreeMap<&str, &str>) -> String {
    PARAM_REF
        .replace_all(template, |caps: &regex::Captures<'_>| {
            let whole = caps.get(0).map_or("", |m| m.as_str());
            caps.get(1)
                .and_then(|m| values.get(m.as_str()))
                .map_or_else(|| whole.to_owned(), |v| (*v).to_owned())
        })
        .into_owned()
}

/// Environment variable names a job may set: `^[A-Za-z_][A-Za-z0-9_]*$`.
pub fn is_valid_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Prefix of environment variables reserved for tasuki itself.
pub const RESERVED_ENV_PREFIX: &str = "TASUKI_";

pub fn is_reserved_env_name(name: &str) -> bool {
    name.starts_with(RESERVED_ENV_PREFIX)
}

/// Parameter names: `^[a-z_][a-z0-9_]{0,63}$`.
pub fn is_valid_param_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    name.len() <= 64
        && bytes
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

impl JobSpec {
    /// Every parameter name referenced from `command` elements and `env` values.
    pub fn referenced_params(&self) -> BTreeSet<String> {
        self.command
            .iter()
            .chain(self.env.values())
            .flat_map(|s| param_references(s))
            .map(str::to_owned)
            .collect()
    }

    /// Referenced parameters that are not declared in `params`.
    pub fn undeclared_params(&self) -> BTreeSet<String> {
        let mut refs = self.referenced_params();
        refs.retain(|name| !self.params.contains_key(name));
        refs
    }

    /// Validate request parameters and substitute them into `command` and `env`
    /// values (only there). All problems are reported, sorted by parameter name.
    /// An optional parameter without value or default substitutes as "".
    pub fn resolve(&self, given: &BTreeMap<String, String>) -> Result<ResolvedSpec, ParamErrors> {
        let mut errors = Vec::new();
        let mut values: BTreeMap<&str, &str> = BTreeMap::new();

        let names: BTreeSet<&str> = given
            .keys()
            .chain(self.params.keys())
            .map(String::as_str)
            .collect();
        for name in names {
            let Some(spec) = self.params.get(name) else {
                errors.push(ParamError::Unknown {
                    name: name.to_owned(),
                    declared: self.params.keys().cloned().collect(),
                });
                continue;
            };
            let value = match (given.get(name), &spec.default) {
                (Some(v), _) => v.as_str(),
                (None, Some(d)) => d.as_str(),
                (None, None) if spec.required => {
                    errors.push(ParamError::Missing {
                        name: name.to_owned(),
                    });
                    continue;
                }
                (None, None) => {
                    // Absent and optional: substitutes as empty, no pattern to meet.
                    values.insert(name, "");
                    continue;
                }
            };
            if let Err(e) = spec.check_value(name, value) {
                errors.push(e);
                continue;
            }
            values.insert(name, value);
        }
        if !errors.is_empty() {
            return Err(ParamErrors(errors));
        }

        Ok(ResolvedSpec {
            image: self.image.clone(),
            command: self
                .command
                .iter()
                .map(|s| substitute(s, &values))
                .collect(),
            workdir: self.workdir.clone(),
            user: self.user.clone(),
            env: self
                .env
                .iter()
                .map(|(k, v)| (k.clone(), substitute(v, &values)))
                .collect(),
            pull: self.pull,
            resources: self.resources.clone(),
            timeout: self.timeout,
            stop_grace: self.stop_grace,
            network: self.network.clone(),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid size {input:?}: {reason} (expected e.g. \"256MiB\", \"1GiB\", \"512MB\" or a number of bytes)"
)]
pub struct InvalidSize {
    pub input: String,
    pub reason: &'static str,
}

/// Largest accepted size: Docker's API carries sizes as int64.
pub const MAX_SIZE: u64 = i64::MAX as u64;

/// Parse a memory size: an integer, optional whitespace, optional unit
/// (case-insensitive).
///
/// - binary: `KiB`/`Ki` = 1024, `MiB`/`Mi` = 1024², `GiB`/`Gi`, `TiB`/`Ti`;
/// - decimal (SI, like Kubernetes): `KB`/`K` = 1000, `MB`/`M` = 1000², `GB`/`G`, `TB`/`T`;
/// - `B` or no unit: bytes.
///
/// Note `512M` is 512,000,000 bytes, not 512 MiB as `docker run -m 512m` would take it;
/// write `512MiB` when you mean that. Fractions are not accepted. Zero and values above
/// `i64::MAX` are rejected.
pub fn parse_size(input: &str) -> Result<u64, InvalidSize> {
    let err = |reason| InvalidSize {
        input: input.to_owned(),
        reason,
    };
    let s = input.trim();
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(digits_end);
    if number.is_empty() {
        return Err(err("no number"));
    }
    let unit = unit.trim_start();
    let multiplier: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "t" | "tb" => 1_000_000_000_000,
        "ki" | "kib" => 1 << 10,
        "mi" | "mib" => 1 << 20,
        "gi" | "gib" => 1 << 30,
        "ti" | "tib" => 1 << 40,
        _ if unit.starts_with('.') => return Err(err("fractions are not supported")),
        _ => return Err(err("unknown unit")),
    };
    let n: u64 = number.parse().map_err(|_| err("number too large"))?;
    let bytes = n
        .checked_mul(multiplier)
        .filter(|b| *b <= MAX_SIZE)
        .ok_or_else(|| err("number too large"))?;
    if bytes == 0 {
        return Err(err("must be greater than zero"));
    }
    Ok(bytes)
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {input:?}: {reason} (expected e.g. \"90s\", \"30m\" or \"1h 30m\")")]
pub struct InvalidDuration {
    pub input: String,
    pub reason: String,
}

/// Parse a human duration ("30m", "1h 30m", "90s") with `humantime`; zero is rejected.
pub fn parse_duration(input: &str) -> Result<Duration, InvalidDuration> {
    let d = humantime::parse_duration(input.trim()).map_err(|e| InvalidDuration {
        input: input.to_owned(),
        reason: e.to_string(),
    })?;
    if d.is_zero() {
        return Err(InvalidDuration {
            input: input.to_owned(),
            reason: "must be greater than zero".to_owned(),
        });
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Datelike, TimeZone, Timelike, Weekday};

    #[test]
    fn job_name_valid_and_invalid() {
        for ok in ["a", "hello", "0day", "a-b_c", &"a".repeat(63)] {
            let n = JobName::parse(ok).unwrap();
            assert_eq!(n.as_str(), ok);
            assert_eq!(n.to_string(), ok);
        }
        for bad in ["", "-a", "_a", "Hello", "a.b", "a b", "é", &"a".repeat(64)] {
            let err = JobName::parse(bad).unwrap_err();
            assert_eq!(err.0, bad);
            assert!(err.to_string().contains("invalid job name"));
        }
    }

    #[test]
    fn job_name_borrow_lookup() {
        let mut m = BTreeMap::new();
        m.insert(JobName::parse("x").unwrap(), 1);
        assert_eq!(m.get("x"), Some(&1));
    }

    #[test]
    fn pull_policy_round_trip() {
        for p in [
            PullPolicy::IfNotPresent,
            PullPolicy::Always,
            PullPolicy::Never,
        ] {
            assert_eq!(PullPolicy::parse(p.as_str()).unwrap(), p);
        }
        assert_eq!(PullPolicy::default(), PullPolicy::IfNotPresent);
        assert!(PullPolicy::parse("Always").is_err());
        assert!(PullPolicy::parse("missing").is_err());
    }

    #[test]
    fn sizes() {
        let cases: &[(&str, u64)] = &[
            ("1", 1),
            ("100B", 100),
            ("256MiB", 256 << 20),
            ("256 mib", 256 << 20),
            ("256Mi", 256 << 20),
            ("1GiB", 1 << 30),
            ("1gib", 1 << 30),
            ("4KiB", 4096),
            ("2TiB", 2 << 40),
            ("512M", 512_000_000),
            ("512MB", 512_000_000),
            ("512 mb", 512_000_000),
            ("1k", 1000),
            ("1G", 1_000_000_000),
            (" 7 GB ", 7_000_000_000),
        ];
        for (input, want) in cases {
            assert_eq!(parse_size(input).unwrap(), *want, "{input}");
        }
    }

    #[test]
    fn bad_sizes() {
        for bad in [
            "",
            "MiB",
            "0",
            "0MiB",
            "-1",
            "1.5GiB",
            "12 parsecs",
            "1 PiB",
            "99999999999999999999",
            "9000000TiB",
            "9223372036854775808",
        ] {
            let e = parse_size(bad).unwrap_err();
            assert!(e.to_string().contains("256MiB"), "{e}");
        }
        assert_eq!(parse_size("9223372036854775807").unwrap(), MAX_SIZE);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_duration("1h 30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        for bad in ["", "0s", "0", "soon", "10", "-5s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

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

    fn spec(pattern: Option<&str>, required: bool, default: Option<&str>) -> ParamSpec {
        ParamSpec {
            required,
            default: default.map(str::to_owned),
            pattern: pattern.map(|p| ParamSpec::anchored_pattern(p).unwrap()),
            max_length: 16,
            description: None,
        }
    }

    fn job() -> JobSpec {
        JobSpec {
            name: JobName::parse("hello").unwrap(),
            description: None,
            image: "img:{{params.who}}".to_owned(),
            command: vec![
                "sh".into(),
                "-c".into(),
                "echo {{params.who}} {{ params.greeting }}!{{params.opt}}".into(),
            ],
            workdir: Some("/{{params.who}}".into()),
            user: None,
            env: BTreeMap::from([
                ("WHO".to_owned(), "{{params.who}}".to_owned()),
                ("PLAIN".to_owned(), "x".to_owned()),
            ]),
            pull: PullPolicy::Always,
            resources: Resources::default(),
            timeout: Some(Duration::from_secs(60)),
            stop_grace: Duration::from_secs(10),
            network: "none".into(),
            params: BTreeMap::from([
                ("who".to_owned(), spec(None, true, None)),
                (
                    "greeting".to_owned(),
                    spec(Some("[a-z]+"), false, Some("hi")),
                ),
                ("opt".to_owned(), spec(None, false, None)),
            ]),
            schedule: None,
            retry: Default::default(),
        }
    }

    fn given(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn resolve_substitutes_command_and_env_only() {
        let r = job().resolve(&given(&[("who", "bob")])).unwrap();
        assert_eq!(r.command, ["sh", "-c", "echo bob hi!"]);
        assert_eq!(r.env["WHO"], "bob");
        assert_eq!(r.env["PLAIN"], "x");
        assert_eq!(r.image, "img:{{params.who}}");
        assert_eq!(r.workdir.as_deref(), Some("/{{params.who}}"));
        assert_eq!(r.pull, PullPolicy::Always);
        assert_eq!(r.network, "none");
        assert_eq!(r.timeout, Some(Duration::from_secs(60)));
    }

    #[test]
    fn resolve_values_are_verbatim_and_not_recursive() {
        let evil = "$(id); rm -rf /";
        let mut j = job();
        j.params.get_mut("who").unwrap().max_length = 100;
        let r = j
            .resolve(&given(&[("who", evil), ("opt", "{{params.who}}")]))
            .unwrap();
        assert_eq!(r.command[2], "echo $(id); rm -rf / hi!{{params.who}}");
        assert_eq!(r.env["WHO"], evil);
    }

    #[test]
    fn resolve_errors_are_sorted_and_complete() {
        let e = job()
            .resolve(&given(&[("zzz", "1"), ("greeting", "Hi"), ("aaa", "2")]))
            .unwrap_err();
        let names: Vec<&str> = e.iter().map(ParamError::param).collect();
        assert_eq!(names, ["aaa", "greeting", "who", "zzz"]);
        assert!(matches!(e.errors()[0], ParamError::Unknown { .. }));
        assert!(matches!(e.errors()[1], ParamError::PatternMismatch { .. }));
        assert!(matches!(e.errors()[2], ParamError::Missing { .. }));
        assert_eq!(
            e.errors()[0].to_string(),
            "unknown parameter `aaa` (declared: greeting, opt, who)"
        );
        assert_eq!(
            e.errors()[2].to_string(),
            "missing required parameter `who`"
        );
        assert!(e.to_string().contains("; "));
    }

    #[test]
    fn resolve_too_long_counts_chars() {
        let ok = "é".repeat(16);
        assert!(job().resolve(&given(&[("who", &ok)])).is_ok());
        let e = job()
            .resolve(&given(&[("who", &"é".repeat(17))]))
            .unwrap_err();
        assert_eq!(
            e.errors(),
            [ParamError::TooLong {
                name: "who".into(),
                max: 16
            }]
        );
        assert_eq!(
            e.to_string(),
            "parameter `who` is too long (at most 16 characters)"
        );
    }

    #[test]
    fn resolve_pattern_is_anchored() {
        // `[a-z]+` would find "hi" inside "hi there" if unanchored.
        let e = job()
            .resolve(&given(&[("who", "x"), ("greeting", "hi there")]))
            .unwrap_err();
        assert_eq!(e.errors()[0].param(), "greeting");
        // Alternation must be anchored as a whole.
        let mut j = job();
        j.params.get_mut("greeting").unwrap().pattern =
            Some(ParamSpec::anchored_pattern("a|b").unwrap());
        assert!(
            j.resolve(&given(&[("who", "x"), ("greeting", "ab")]))
                .is_err()
        );
        assert!(
            j.resolve(&given(&[("who", "x"), ("greeting", "b")]))
                .is_ok()
        );
        // Explicit anchors and a trailing newline.
        let re = ParamSpec::anchored_pattern("^[a-z]+$").unwrap();
        assert!(re.is_match("abc"));
        assert!(!re.is_match("abc\n"));
    }

    #[test]
    fn an_absent_optional_param_substitutes_empty_without_meeting_its_pattern() {
        let mut j = job();
        j.params
            .insert("tag".to_owned(), spec(Some("[a-z]+"), false, None));
        let r = j.resolve(&given(&[("who", "x")])).unwrap();
        assert_eq!(r.command[2], "echo x hi!");
        // Given, it must match.
        assert!(j.resolve(&given(&[("who", "x"), ("tag", "NO")])).is_err());
    }

    #[test]
    fn resolve_rejects_nul() {
        let e = job().resolve(&given(&[("who", "a\0b")])).unwrap_err();
        assert!(matches!(e.errors()[0], ParamError::ContainsNul { .. }));
    }

    #[test]
    fn unknown_param_when_none_declared() {
        let mut j = job();
        j.params.clear();
        j.command.clear();
        j.env.clear();
        let e = j.resolve(&given(&[("x", "1")])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown parameter `x` (this job declares no parameters)"
        );
        assert!(j.resolve(&BTreeMap::new()).is_ok());
    }

    #[test]
    fn references() {
        assert_eq!(
            param_references("{{params.a}} {{ params.b_2 }} {{params.A}} {{param.c}}"),
            ["a", "b_2"]
        );
        let mut j = job();
        j.env.insert("X".into(), "{{params.nope}}".into());
        assert_eq!(
            j.referenced_params(),
            BTreeSet::from(["who", "greeting", "opt", "nope"].map(String::from))
        );
        assert_eq!(j.undeclared_params(), BTreeSet::from(["nope".to_owned()]));
        assert!(has_malformed_param_reference("{{params.Bad}}"));
        assert!(has_malformed_param_reference("{{ params.x }"));
        assert!(!has_malformed_param_reference("{{params.ok}} {{other}}"));
    }

    #[test]
    fn name_rules() {
        assert!(is_valid_env_name("FOO_1"));
        assert!(is_valid_env_name("_x"));
        assert!(!is_valid_env_name("1X"));
        assert!(!is_valid_env_name("A-B"));
        assert!(!is_valid_env_name(""));
        assert!(is_reserved_env_name("TASUKI_RUN_ID"));
        assert!(!is_reserved_env_name("TASUKI"));
        assert!(is_valid_param_name("a"));
        assert!(is_valid_param_name(&format!("_{}", "a".repeat(63))));
        assert!(!is_valid_param_name(&"a".repeat(65)));
        assert!(!is_valid_param_name("A"));
        assert!(!is_valid_param_name("1a"));
        assert!(!is_valid_param_name("a-b"));
    }
}
