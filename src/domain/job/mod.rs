//! Job definitions: the validated, in-memory form of a job file.
//!
//! This module holds the job's name and spec; the pure helpers around it live in
//! submodules, re-exported here: request parameters (`params`), sizes and
//! durations (`units`), cron schedules (`schedule`) and container hardening
//! (`hardening`).
//!
//! Nothing in here performs I/O; the TOML file format lives in
//! `crate::catalog`.

mod hardening;
mod params;
mod schedule;
mod units;

pub use hardening::{
    BindMount, Capability, ContainerPolicy, DEFAULT_MEMORY, DEFAULT_PIDS_LIMIT, Hardening,
    InvalidCapability, MIN_PIDS_LIMIT, PolicyError, READ_ONLY_TMP, Refusal, check_mount_target,
    check_network, normalize_path,
};
pub use params::{
    ParamError, ParamErrors, ParamSpec, RESERVED_ENV_PREFIX, has_malformed_param_reference,
    is_reserved_env_name, is_valid_env_name, is_valid_param_name, param_references,
};
pub use schedule::{InvalidSchedule, Schedule};
pub use units::{
    InvalidDuration, InvalidSize, MAX_KEPT_DURATION, MAX_SIZE, parse_duration, parse_kept_duration,
    parse_size,
};

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use super::secret::SecretRef;

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

/// How a job's output reaches tasuki's log.
///
/// `Durable` (the default): the engine keeps its own copy (log driver `local`), so a
/// worker that restarts catches up on output written while it was away. `Fast`: no
/// engine copy (log driver `none`), output is taken by attach only; faster and lighter
/// on dockerd, but output written while no worker is attached is lost, and the attempt
/// says so (`output_gap`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogMode {
    #[default]
    Durable,
    Fast,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid log mode {0:?} (expected \"durable\" or \"fast\")")]
pub struct InvalidLogMode(pub String);

impl LogMode {
    pub fn parse(s: &str) -> Result<LogMode, InvalidLogMode> {
        match s {
            "durable" => Ok(LogMode::Durable),
            "fast" => Ok(LogMode::Fast),
            other => Err(InvalidLogMode(other.to_owned())),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            LogMode::Durable => "durable",
            LogMode::Fast => "fast",
        }
    }

    pub fn is_durable(&self) -> bool {
        *self == LogMode::Durable
    }
}

/// Container resource limits.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Resources {
    /// Relative CPU weight in ECS units (1024 = one core's share); Docker `CpuShares`.
    pub cpu: Option<u32>,
    /// Hard CPU cap in cores (e.g. 0.5); Docker `NanoCpus` = cores * 1e9.
    pub cpu_limit: Option<f64>,
    /// Hard memory limit in bytes; Docker `Memory`. Set for every job loaded from a
    /// file (the server's default when the file gives none); `None` only in a spec
    /// stored before that, which then runs with [`DEFAULT_MEMORY`].
    pub memory_bytes: Option<u64>,
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
    /// Environment variables whose values are secrets, by where to read them. Read when
    /// a worker claims a run, never before, and never substituted with parameters.
    pub secret_env: BTreeMap<String, SecretRef>,
    pub pull: PullPolicy,
    pub resources: Resources,
    pub timeout: Option<Duration>,
    pub stop_grace: Duration,
    pub network: String,
    /// Capabilities, pids limit, read-only root and mounts, checked against the
    /// server's `ContainerPolicy` at load.
    pub hardening: Hardening,
    /// Where the output goes on its way to tasuki's log.
    pub logs: LogMode,
    pub params: BTreeMap<String, ParamSpec>,
    /// When the job starts by itself; empty for a job only started on request.
    pub schedules: Vec<crate::domain::schedule::ScheduleSpec>,
    /// At most this many runs of the job admitted (handed to workers) at once, whatever
    /// started them; the others wait `queued` in arrival order.
    pub max_concurrent: Option<u32>,
    pub retry: super::retry::RetryPolicy,
    /// `POST /v1/hooks/{job}` starts the job when set.
    pub webhook: Option<super::webhook::WebhookSpec>,
    /// Where each run announces its end, unless its request names another place.
    pub callback: Option<crate::domain::callback::CallbackTarget>,
}

/// A job with request parameters applied: what actually gets run.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedSpec {
    pub image: String,
    pub command: Vec<String>,
    pub workdir: Option<String>,
    pub user: Option<String>,
    pub env: BTreeMap<String, String>,
    /// The job's secret references, as they are: the values never reach a spec.
    pub secret_env: BTreeMap<String, SecretRef>,
    pub pull: PullPolicy,
    pub resources: Resources,
    pub timeout: Option<Duration>,
    pub stop_grace: Duration,
    pub network: String,
    pub hardening: Hardening,
    pub logs: LogMode,
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
