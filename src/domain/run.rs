//! Runs (one execution of a job) and their state machine. An exit code is data here,
//! never an error: a job that exits 3 is a run that worked and says `failed`.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use ulid::Ulid;

/// A run's id: a ULID, so ids sort by creation time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RunId(Ulid);

impl RunId {
    pub fn new() -> Self {
        Self(Ulid::new())
    }
}

impl Default for RunId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Lower case reads better in URLs and container names (which must be lower case).
        write!(f, "{}", self.0.to_string().to_ascii_lowercase())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("invalid run id `{0}` (expected a 26-character ULID)")]
pub struct InvalidRunId(String);

impl FromStr for RunId {
    type Err = InvalidRunId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ulid::from_string(&s.to_ascii_uppercase())
            .map(RunId)
            .map_err(|_| InvalidRunId(s.chars().take(64).collect()))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RunStatus {
    /// Accepted and waiting for a worker (or for a retry's not-before time).
    Queued,
    /// A worker holds a lease on it: pulling, starting or running the container.
    Running,
    Succeeded,
    Failed,
    TimedOut,
    Cancelled,
    /// The worker vanished and its lease expired; the outcome is unknown.
    Lost,
}

impl RunStatus {
    pub const ALL: [RunStatus; 7] = [
        RunStatus::Queued,
        RunStatus::Running,
        RunStatus::Succeeded,
        RunStatus::Failed,
        RunStatus::TimedOut,
        RunStatus::Cancelled,
        RunStatus::Lost,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Queued => "queued",
            RunStatus::Running => "running",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::TimedOut => "timed_out",
            RunStatus::Cancelled => "cancelled",
            RunStatus::Lost => "lost",
        }
    }

    pub fn is_final(self) -> bool {
        !matches!(self, RunStatus::Queued | RunStatus::Running)
    }

    /// The state machine. Final states are final; a new attempt of a finished run is a
    /// new attempt (queued again), decided by retry rules or a person, never by a worker.
    pub fn can_become(self, next: RunStatus) -> bool {
        use RunStatus::*;
        match (self, next) {
            (Queued, Running) | (Queued, Cancelled) => true,
            (Running, Succeeded | Failed | TimedOut | Cancelled | Lost) => true,
            // A retry puts a finished or lost run back in the queue as a new attempt.
            (Running | Failed | TimedOut | Lost, Queued) => true,
            _ => false,
        }
    }
}

impl fmt::Display for RunStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
#[error(
    "unknown run status `{0}` (expected one of queued, running, succeeded, failed, timed_out, cancelled, lost)"
)]
pub struct InvalidStatus(String);

impl FromStr for RunStatus {
    type Err = InvalidStatus;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RunStatus::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| InvalidStatus(s.chars().take(64).collect()))
    }
}

/// Why a run did not succeed, as a stable token for programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ReasonCode {
    ExitCode,
    OomKilled,
    TimedOut,
    ImageNotFound,
    ImagePullFailed,
    DockerError,
    Cancelled,
    Lost,
    /// A secret of the job (or its registry's password) could not be read at claim.
    SecretUnavailable,
}

impl ReasonCode {
    pub const ALL: [ReasonCode; 9] = [
        ReasonCode::ExitCode,
        ReasonCode::OomKilled,
        ReasonCode::TimedOut,
        ReasonCode::ImageNotFound,
        ReasonCode::ImagePullFailed,
        ReasonCode::DockerError,
        ReasonCode::Cancelled,
        ReasonCode::Lost,
        ReasonCode::SecretUnavailable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ReasonCode::ExitCode => "exit_code",
            ReasonCode::OomKilled => "oom_killed",
            ReasonCode::TimedOut => "timed_out",
            ReasonCode::ImageNotFound => "image_not_found",
            ReasonCode::ImagePullFailed => "image_pull_failed",
            ReasonCode::DockerError => "docker_error",
            ReasonCode::Cancelled => "cancelled",
            ReasonCode::Lost => "lost",
            ReasonCode::SecretUnavailable => "secret_unavailable",
        }
    }
}

impl FromStr for ReasonCode {
    type Err = InvalidStatus;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ReasonCode::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| InvalidStatus(s.chars().take(64).collect()))
    }
}

/// What a worker observed at the end of one attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The container ran and exited by itself.
    Exited {
        code: i64,
    },
    /// The kernel killed the container for going over its memory limit.
    OomKilled {
        code: i64,
    },
    /// tasuki stopped the container because the job's timeout passed.
    TimedOut {
        after: Duration,
        code: Option<i64>,
    },
    /// Someone cancelled the run while it ran.
    Cancelled {
        code: Option<i64>,
    },
    ImageNotFound {
        image: String,
    },
    ImagePullFailed {
        image: String,
        message: String,
        /// The registry refused the credentials, or wanted some and got none.
        unauthorized: bool,
    },
    /// The engine refused or failed; the container may never have run.
    DockerError {
        message: String,
    },
    /// A secret the attempt needs could not be read when it was claimed (says which
    /// variable or file, never a value); no container was made.
    SecretUnavailable {
        message: String,
    },
}

impl Outcome {
    pub fn status(&self) -> RunStatus {
        match self {
            Outcome::Exited { code: 0 } => RunStatus::Succeeded,
            Outcome::Exited { .. }
            | Outcome::OomKilled { .. }
            | Outcome::ImageNotFound { .. }
            | Outcome::ImagePullFailed { .. }
            | Outcome::DockerError { .. }
            | Outcome::SecretUnavailable { .. } => RunStatus::Failed,
            Outcome::TimedOut { .. } => RunStatus::TimedOut,
            Outcome::Cancelled { .. } => RunStatus::Cancelled,
        }
    }

    /// The container's exit code; `None` when the container never ran to an exit, which
    /// is how a caller tells a platform failure from a job failure.
    pub fn exit_code(&self) -> Option<i64> {
        match self {
            Outcome::Exited { code } | Outcome::OomKilled { code } => Some(*code),
            Outcome::TimedOut { code, .. } | Outcome::Cancelled { code } => *code,
            _ => None,
        }
    }

    pub fn reason_code(&self) -> Option<ReasonCode> {
        Some(match self {
            Outcome::Exited { code: 0 } => return None,
            Outcome::Exited { .. } => ReasonCode::ExitCode,
            Outcome::OomKilled { .. } => ReasonCode::OomKilled,
            Outcome::TimedOut { .. } => ReasonCode::TimedOut,
            Outcome::Cancelled { .. } => ReasonCode::Cancelled,
            Outcome::ImageNotFound { .. } => ReasonCode::ImageNotFound,
            Outcome::ImagePullFailed { .. } => ReasonCode::ImagePullFailed,
            Outcome::DockerError { .. } => ReasonCode::DockerError,
            Outcome::SecretUnavailable { .. } => ReasonCode::SecretUnavailable,
        })
    }

    /// Why the run did not succeed, in words a person can act on.
    pub fn reason(&self) -> Option<String> {
        Some(match self {
            Outcome::Exited { code: 0 } => return None,
            Outcome::Exited { code } => format!("exit_code {code}"),
            Outcome::OomKilled { .. } => "oom_killed".to_owned(),
            Outcome::TimedOut { after, .. } => {
                format!("timeout after {}", humantime::format_duration(*after))
            }
            Outcome::Cancelled { .. } => "cancelled".to_owned(),
            Outcome::ImageNotFound { image } => format!("image_not_found: {image}"),
            Outcome::ImagePullFailed {
                image,
                message,
                unauthorized: false,
            } => format!("image_pull_failed: {image}: {message}"),
            Outcome::ImagePullFailed {
                image,
                message,
                unauthorized: true,
            } => format!("image_pull_failed: unauthorized: {image}: {message}"),
            Outcome::DockerError { message } => format!("docker_error: {message}"),
            Outcome::SecretUnavailable { message } => format!("secret_unavailable: {message}"),
        })
    }
}

/// What started a run.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Trigger {
    /// The HTTP API or the CLI (which uses it).
    #[default]
    Api,
    /// A schedule's slot (a backfill's too).
    Schedule {
        schedule: String,
        /// The slot's nominal instant.
        slot: DateTime<Utc>,
        /// The calendar date the slot belongs to, in the schedule's zone, after any shift.
        business_date: chrono::NaiveDate,
        /// The slot's nominal instant in the schedule's zone, for `TASUKI_SCHEDULED_TIME`
        /// (RFC 3339 with the zone's offset).
        local_time: String,
    },
    /// A signed delivery to `POST /v1/hooks/{job}`.
    Webhook,
}

impl Trigger {
    pub fn kind(&self) -> &'static str {
        match self {
            Trigger::Api => "api",
            Trigger::Schedule { .. } => "schedule",
            Trigger::Webhook => "webhook",
        }
    }
}

/// A run as the API shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    pub id: RunId,
    pub job: String,
    pub params: BTreeMap<String, String>,
    pub status: RunStatus,
    /// What started it: the API, a schedule's slot or a webhook delivery.
    pub trigger: Trigger,
    /// The current attempt; 0 while the first attempt has not been claimed.
    pub attempt: u32,
    pub exit_code: Option<i64>,
    pub reason: Option<String>,
    pub reason_code: Option<ReasonCode>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// Someone asked for a cancel; the worker stops the container at its next heartbeat.
    pub cancel_requested: bool,
    /// A retry's backoff: the next attempt does not start before this.
    pub not_before: Option<DateTime<Utc>>,
    /// Output bytes that never reached the log sink, over all attempts.
    pub log_dropped_bytes: u64,
    /// Some attempt's log misses output by an unknown amount (see [`Attempt::output_gap`]).
    pub output_gap: bool,
    /// Every attempt so far, oldest first, each with its own outcome and log.
    pub attempts: Vec<Attempt>,
    /// Its completion callbacks, one per event so far, oldest first.
    pub callbacks: Vec<super::callback::CallbackState>,
    /// The broker-validated user of the queue request that asked for it, if any.
    pub requested_by: Option<String>,
    /// Replies owed to (or sent to) the producer that asked for it.
    pub replies: Vec<super::reply::Reply>,
}

impl Run {
    /// A log with holes: some output could not be stored. The exit status still holds.
    pub fn logs_truncated(&self) -> bool {
        self.log_dropped_bytes > 0 || self.output_gap
    }
}

/// One attempt of a run: one claim by one worker, at most one container.
#[derive(Debug, Clone, PartialEq)]
pub struct Attempt {
    pub number: u32,
    pub status: RunStatus,
    pub worker_id: String,
    /// The build of the worker that claimed it, as its session named it; `None` from a
    /// worker that did not.
    pub worker_build: Option<String>,
    pub container_id: Option<String>,
    pub exit_code: Option<i64>,
    pub reason: Option<String>,
    pub reason_code: Option<ReasonCode>,
    pub claimed_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub log_dropped_bytes: u64,
    /// Output is missing by an amount nobody knows: a `logs = "fast"` container was
    /// adopted after its worker was away, and the engine kept no copy of what it wrote
    /// meanwhile.
    pub output_gap: bool,
    /// What its container used, sampled by the worker while it ran; `None` when no
    /// sample was taken (no container, or a worker that does not sample).
    pub usage: Option<ResourceUsage>,
}

/// What one attempt's container used: enough to size a job's `memory` and `cpu` from
/// history, and to show an OOM-killed attempt's peak next to its limit.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ResourceUsage {
    /// The highest memory use seen, in bytes.
    pub peak_memory_bytes: u64,
    /// CPU time used (user + system), in seconds.
    pub cpu_seconds: f64,
    /// The memory limit the container ran with, in bytes.
    pub memory_limit_bytes: Option<u64>,
    /// The CPU limit the container ran with, in cores.
    pub cpu_limit: Option<f64>,
    /// How many stats samples the figures come from.
    pub samples: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_id_round_trips_in_lower_case() {
        let id = RunId::new();
        let text = id.to_string();
        assert_eq!(text, text.to_ascii_lowercase());
        assert_eq!(text.len(), 26);
        assert_eq!(text.parse::<RunId>().ok(), Some(id));
        assert!("not-an-id".parse::<RunId>().is_err());
    }

    #[test]
    fn statuses_parse_and_print() {
        for st in RunStatus::ALL {
            assert_eq!(st.as_str().parse::<RunStatus>().ok(), Some(st));
        }
        assert!("done".parse::<RunStatus>().is_err());
    }

    #[test]
    fn final_states_do_not_move_except_by_retry() {
        use RunStatus::*;
        assert!(Queued.can_become(Running));
        assert!(!Succeeded.can_become(Running));
        assert!(!Cancelled.can_become(Queued));
        assert!(!Succeeded.can_become(Queued));
        assert!(Lost.can_become(Queued));
        assert!(!Queued.can_become(Succeeded));
    }

    #[test]
    fn outcomes_say_which_side_failed() {
        let ok = Outcome::Exited { code: 0 };
        assert_eq!(ok.status(), RunStatus::Succeeded);
        assert_eq!(ok.reason(), None);
        let job = Outcome::Exited { code: 3 };
        assert_eq!(job.status(), RunStatus::Failed);
        assert_eq!(job.reason().as_deref(), Some("exit_code 3"));
        assert_eq!(job.exit_code(), Some(3));
        let platform = Outcome::ImageNotFound {
            image: "x:1".into(),
        };
        assert_eq!(platform.exit_code(), None);
        assert_eq!(platform.reason_code(), Some(ReasonCode::ImageNotFound));
        assert_eq!(platform.reason().as_deref(), Some("image_not_found: x:1"));
        let slow = Outcome::TimedOut {
            after: Duration::from_secs(1800),
            code: Some(143),
        };
        assert_eq!(slow.status(), RunStatus::TimedOut);
        assert_eq!(slow.reason().as_deref(), Some("timeout after 30m"));
        let refused = Outcome::ImagePullFailed {
            image: "reg.example/x:1".into(),
            message: "unauthorized: authentication required".into(),
            unauthorized: true,
        };
        assert_eq!(refused.reason_code(), Some(ReasonCode::ImagePullFailed));
        assert!(
            refused
                .reason()
                .unwrap()
                .starts_with("image_pull_failed: unauthorized: reg.example/x:1: ")
        );
        let secret = Outcome::SecretUnavailable {
            message: "env.DB_PASSWORD: environment variable DB_PASSWORD is not set".into(),
        };
        assert_eq!(secret.status(), RunStatus::Failed);
        assert_eq!(secret.exit_code(), None);
        assert_eq!(secret.reason_code(), Some(ReasonCode::SecretUnavailable));
        assert_eq!(
            secret.reason().as_deref(),
            Some(
                "secret_unavailable: env.DB_PASSWORD: environment variable DB_PASSWORD is not set"
            )
        );
    }
}
