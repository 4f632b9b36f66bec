//! The public API's run JSON and error body, one definition each for the server that
//! writes them and the CLI that reads them. `fixtures/run_v1.json` and
//! `fixtures/error_v1.json` freeze their shapes: a change shows as a diff. A run's
//! `trigger` is in `api/trigger.rs`, the error body in `api/error.rs`.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::domain::run::{Attempt, ReasonCode, ResourceUsage, Run, RunStatus};

mod callback;
mod error;
mod reply;
mod schema;
mod trigger;

pub use callback::CallbackV1;
pub use error::{ErrorBodyV1, ErrorCodeV1, ErrorDetailV1, ErrorV1, ReloadSummaryV1};
pub use reply::ReplyV1;
pub use trigger::TriggerV1;

/// A run as the API shows it (`GET /v1/runs/{id}` and every answer that carries a run).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct RunV1 {
    pub id: String,
    pub job: String,
    pub status: RunStatusV1,
    pub params: BTreeMap<String, String>,
    /// What started the run; older servers sent none (the API then).
    #[serde(default)]
    pub trigger: TriggerV1,
    pub exit_code: Option<i64>,
    pub reason: Option<String>,
    pub reason_code: Option<ReasonCodeV1>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub attempt: u32,
    #[serde(default)]
    pub attempts: Vec<AttemptV1>,
    #[serde(default)]
    pub cancel_requested: bool,
    #[serde(default)]
    pub not_before: Option<String>,
    #[serde(default)]
    pub logs_truncated: bool,
    #[serde(default)]
    pub log_dropped_bytes: u64,
    /// Some attempt's log misses output by an amount nobody knows (a `logs = "fast"`
    /// container adopted after its worker was away); `logs_truncated` is then true too.
    #[serde(default, skip_serializing_if = "is_false")]
    pub output_gap: bool,
    /// Its completion callback deliveries; older servers sent none.
    #[serde(default)]
    pub callbacks: Vec<CallbackV1>,
    /// Who asked for it: the API token's name, or the AMQP `user_id` (checked by the
    /// broker) of a request over the queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_by: Option<String>,
    /// Replies owed to the producer that asked over the request queue.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replies: Vec<ReplyV1>,
}

/// One attempt in a run's `attempts`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct AttemptV1 {
    pub attempt: u32,
    pub status: RunStatusV1,
    pub exit_code: Option<i64>,
    pub reason: Option<String>,
    pub reason_code: Option<ReasonCodeV1>,
    pub worker_id: String,
    /// The build of the worker that claimed the attempt (`tasuki --version`); absent
    /// when that worker did not name it (a build from before it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_build: Option<String>,
    pub container_id: Option<String>,
    pub claimed_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub log_dropped_bytes: u64,
    /// Output is missing from this attempt's log by an amount nobody knows: its
    /// `logs = "fast"` container was adopted after its worker was away.
    #[serde(default, skip_serializing_if = "is_false")]
    pub output_gap: bool,
    /// What the attempt's container used; absent when no sample was taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageV1>,
}

/// An attempt's resource usage on the wire.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct UsageV1 {
    pub peak_memory_bytes: u64,
    pub cpu_seconds: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_limit_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_limit: Option<f64>,
    #[serde(default)]
    pub samples: u32,
}

impl From<ResourceUsage> for UsageV1 {
    fn from(u: ResourceUsage) -> Self {
        Self {
            peak_memory_bytes: u.peak_memory_bytes,
            cpu_seconds: u.cpu_seconds,
            memory_limit_bytes: u.memory_limit_bytes,
            cpu_limit: u.cpu_limit,
            samples: u.samples,
        }
    }
}

impl From<UsageV1> for ResourceUsage {
    fn from(u: UsageV1) -> Self {
        Self {
            peak_memory_bytes: u.peak_memory_bytes,
            cpu_seconds: u.cpu_seconds,
            memory_limit_bytes: u.memory_limit_bytes,
            cpu_limit: u.cpu_limit,
            samples: u.samples,
        }
    }
}

/// A run's status on the wire. Text this build does not know (from a newer server) is
/// kept as it came, so a client can still print it and treat it as "not ours to map".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum RunStatusV1 {
    Queued,
    Running,
    Succeeded,
    Failed,
    TimedOut,
    Cancelled,
    Lost,
    Unknown(String),
}

impl RunStatusV1 {
    pub fn as_str(&self) -> &str {
        match self {
            RunStatusV1::Queued => "queued",
            RunStatusV1::Running => "running",
            RunStatusV1::Succeeded => "succeeded",
            RunStatusV1::Failed => "failed",
            RunStatusV1::TimedOut => "timed_out",
            RunStatusV1::Cancelled => "cancelled",
            RunStatusV1::Lost => "lost",
            RunStatusV1::Unknown(s) => s,
        }
    }

    /// Still waiting or running: the run will change.
    pub fn is_pending(&self) -> bool {
        matches!(self, RunStatusV1::Queued | RunStatusV1::Running)
    }
}

impl From<RunStatus> for RunStatusV1 {
    fn from(s: RunStatus) -> Self {
        match s {
            RunStatus::Queued => RunStatusV1::Queued,
            RunStatus::Running => RunStatusV1::Running,
            RunStatus::Succeeded => RunStatusV1::Succeeded,
            RunStatus::Failed => RunStatusV1::Failed,
            RunStatus::TimedOut => RunStatusV1::TimedOut,
            RunStatus::Cancelled => RunStatusV1::Cancelled,
            RunStatus::Lost => RunStatusV1::Lost,
        }
    }
}

impl From<String> for RunStatusV1 {
    fn from(s: String) -> Self {
        match s.as_str() {
            "queued" => RunStatusV1::Queued,
            "running" => RunStatusV1::Running,
            "succeeded" => RunStatusV1::Succeeded,
            "failed" => RunStatusV1::Failed,
            "timed_out" => RunStatusV1::TimedOut,
            "cancelled" => RunStatusV1::Cancelled,
            "lost" => RunStatusV1::Lost,
            _ => RunStatusV1::Unknown(s),
        }
    }
}

impl From<RunStatusV1> for String {
    fn from(s: RunStatusV1) -> Self {
        match s {
            RunStatusV1::Unknown(s) => s,
            known => known.as_str().to_owned(),
        }
    }
}

impl fmt::Display for RunStatusV1 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a run did not succeed, on the wire; unknown text is kept as for [`RunStatusV1`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum ReasonCodeV1 {
    ExitCode,
    OomKilled,
    TimedOut,
    ImageNotFound,
    ImagePullFailed,
    DockerError,
    Cancelled,
    Lost,
    SecretUnavailable,
    Unknown(String),
}

impl ReasonCodeV1 {
    pub fn as_str(&self) -> &str {
        match self {
            ReasonCodeV1::ExitCode => "exit_code",
            ReasonCodeV1::OomKilled => "oom_killed",
            ReasonCodeV1::TimedOut => "timed_out",
            ReasonCodeV1::ImageNotFound => "image_not_found",
            ReasonCodeV1::ImagePullFailed => "image_pull_failed",
            ReasonCodeV1::DockerError => "docker_error",
            ReasonCodeV1::Cancelled => "cancelled",
            ReasonCodeV1::Lost => "lost",
            ReasonCodeV1::SecretUnavailable => "secret_unavailable",
            ReasonCodeV1::Unknown(s) => s,
        }
    }
}

impl From<ReasonCode> for ReasonCodeV1 {
    fn from(c: ReasonCode) -> Self {
        match c {
            ReasonCode::ExitCode => ReasonCodeV1::ExitCode,
            ReasonCode::OomKilled => ReasonCodeV1::OomKilled,
            ReasonCode::TimedOut => ReasonCodeV1::TimedOut,
            ReasonCode::ImageNotFound => ReasonCodeV1::ImageNotFound,
            ReasonCode::ImagePullFailed => ReasonCodeV1::ImagePullFailed,
            ReasonCode::DockerError => ReasonCodeV1::DockerError,
            ReasonCode::Cancelled => ReasonCodeV1::Cancelled,
            ReasonCode::Lost => ReasonCodeV1::Lost,
            ReasonCode::SecretUnavailable => ReasonCodeV1::SecretUnavailable,
        }
    }
}

impl From<String> for ReasonCodeV1 {
    fn from(s: String) -> Self {
        match s.as_str() {
            "exit_code" => ReasonCodeV1::ExitCode,
            "oom_killed" => ReasonCodeV1::OomKilled,
            "timed_out" => ReasonCodeV1::TimedOut,
            "image_not_found" => ReasonCodeV1::ImageNotFound,
            "image_pull_failed" => ReasonCodeV1::ImagePullFailed,
            "docker_error" => ReasonCodeV1::DockerError,
            "cancelled" => ReasonCodeV1::Cancelled,
            "lost" => ReasonCodeV1::Lost,
            "secret_unavailable" => ReasonCodeV1::SecretUnavailable,
            _ => ReasonCodeV1::Unknown(s),
        }
    }
}

impl From<ReasonCodeV1> for String {
    fn from(c: ReasonCodeV1) -> Self {
        match c {
            ReasonCodeV1::Unknown(s) => s,
            known => known.as_str().to_owned(),
        }
    }
}

fn time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

impl From<Run> for RunV1 {
    fn from(r: Run) -> Self {
        let logs_truncated = r.logs_truncated();
        Self {
            id: r.id.to_string(),
            job: r.job,
            status: r.status.into(),
            params: r.params,
            trigger: TriggerV1::from(&r.trigger),
            exit_code: r.exit_code,
            reason: r.reason,
            reason_code: r.reason_code.map(Into::into),
            created_at: time(r.created_at),
            started_at: r.started_at.map(time),
            finished_at: r.finished_at.map(time),
            attempt: r.attempt,
            cancel_requested: r.cancel_requested,
            not_before: r.not_before.map(time),
            logs_truncated,
            log_dropped_bytes: r.log_dropped_bytes,
            output_gap: r.output_gap,
            attempts: r.attempts.into_iter().map(AttemptV1::from).collect(),
            callbacks: r.callbacks.into_iter().map(CallbackV1::from).collect(),
            requested_by: r.requested_by,
            replies: r.replies.into_iter().map(ReplyV1::from).collect(),
        }
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl From<Attempt> for AttemptV1 {
    fn from(a: Attempt) -> Self {
        Self {
            attempt: a.number,
            status: a.status.into(),
            exit_code: a.exit_code,
            reason: a.reason,
            reason_code: a.reason_code.map(Into::into),
            worker_id: a.worker_id,
            worker_build: a.worker_build,
            container_id: a.container_id,
            claimed_at: time(a.claimed_at),
            started_at: a.started_at.map(time),
            finished_at: a.finished_at.map(time),
            log_dropped_bytes: a.log_dropped_bytes,
            output_gap: a.output_gap,
            usage: a.usage.map(UsageV1::from),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::reply::{Reply, ReplyKind, ReplyState};
    use crate::domain::run::Trigger;
    use chrono::TimeZone;

    const FIXTURE: &str = include_str!("fixtures/run_v1.json");

    fn at(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_767_225_600 + secs, 123_000_000)
            .single()
            .unwrap()
    }

    /// A run on its second attempt after the first failed, with every field set.
    fn sample() -> Run {
        Run {
            output_gap: false,
            id: "01jd0000000000000000000000".parse().unwrap(),
            job: "greet".to_owned(),
            params: BTreeMap::from([("name".to_owned(), "world".to_owned())]),
            status: RunStatus::Running,
            trigger: Trigger::Schedule {
                schedule: "nightly".to_owned(),
                slot: at(-3600),
                business_date: chrono::NaiveDate::from_ymd_opt(2025, 12, 31).unwrap(),
                local_time: "2025-12-31T23:00:00.123+00:00".to_owned(),
            },
            attempt: 2,
            exit_code: None,
            reason: None,
            reason_code: None,
            created_at: at(0),
            started_at: Some(at(5)),
            finished_at: None,
            cancel_requested: true,
            not_before: Some(at(3)),
            log_dropped_bytes: 12,
            attempts: vec![
                Attempt {
                    output_gap: false,
                    number: 1,
                    status: RunStatus::Failed,
                    worker_id: "worker-a".to_owned(),
                    worker_build: Some("0.1.0 (9032ab919e70)".to_owned()),
                    container_id: Some("c0ffee".to_owned()),
                    exit_code: Some(3),
                    reason: Some("exit_code 3".to_owned()),
                    reason_code: Some(ReasonCode::ExitCode),
                    claimed_at: at(1),
                    started_at: Some(at(1)),
                    finished_at: Some(at(2)),
                    log_dropped_bytes: 12,
                    usage: Some(ResourceUsage {
                        peak_memory_bytes: 1_048_576,
                        cpu_seconds: 0.25,
                        memory_limit_bytes: Some(536_870_912),
                        cpu_limit: Some(0.5),
                        samples: 3,
                    }),
                },
                Attempt {
                    output_gap: false,
                    number: 2,
                    status: RunStatus::Running,
                    worker_id: "worker-b".to_owned(),
                    worker_build: None,
                    container_id: None,
                    exit_code: None,
                    reason: None,
                    reason_code: None,
                    claimed_at: at(4),
                    started_at: Some(at(5)),
                    finished_at: None,
                    log_dropped_bytes: 0,
                    usage: None,
                },
            ],
            // The first attempt's end was final before a person's retry: announced.
            callbacks: vec![crate::domain::callback::CallbackState {
                url: "https://hooks.example.com/tasuki".to_owned(),
                event: "run.finished".to_owned(),
                event_id: "msg_01jd0000000000000000000001".to_owned(),
                tries: 2,
                last_status: Some(500),
                last_error: None,
                delivered_at: None,
                next_try_at: Some(at(4)),
                gave_up: false,
            }],
            requested_by: Some("billing".to_owned()),
            replies: vec![Reply {
                to: "amq.gen-reply".to_owned(),
                kind: ReplyKind::Finished,
                state: ReplyState::Waiting,
                tries: 0,
                last_error: None,
            }],
        }
    }

    #[test]
    fn run_json_is_frozen() {
        let json = serde_json::to_string_pretty(&RunV1::from(sample())).unwrap();
        assert_eq!(
            json,
            FIXTURE.trim_end(),
            "the run JSON changed; if on purpose, update src/protocol/fixtures/run_v1.json"
        );
        let back: RunV1 = serde_json::from_str(FIXTURE).unwrap();
        assert_eq!(back, RunV1::from(sample()));
    }

    #[test]
    fn statuses_and_reasons_use_the_domain_strings() {
        for st in RunStatus::ALL {
            let wire = RunStatusV1::from(st);
            assert_eq!(wire.as_str(), st.as_str());
            assert_eq!(RunStatusV1::from(st.as_str().to_owned()), wire);
            assert_eq!(
                serde_json::to_string(&wire).unwrap(),
                format!("\"{}\"", st.as_str())
            );
        }
        for c in ReasonCode::ALL {
            let wire = ReasonCodeV1::from(c);
            assert_eq!(wire.as_str(), c.as_str());
            assert_eq!(ReasonCodeV1::from(c.as_str().to_owned()), wire);
        }
    }

    #[test]
    fn unknown_text_is_kept() {
        let st: RunStatusV1 = serde_json::from_str("\"paused\"").unwrap();
        assert_eq!(st, RunStatusV1::Unknown("paused".to_owned()));
        assert!(!st.is_pending());
        assert_eq!(serde_json::to_string(&st).unwrap(), "\"paused\"");
        let c: ReasonCodeV1 = serde_json::from_str("\"gone\"").unwrap();
        assert_eq!(c.as_str(), "gone");
    }

    const ERROR_FIXTURE: &str = include_str!("fixtures/error_v1.json");

    #[test]
    fn error_json_is_frozen() {
        let body = ErrorBodyV1::new(
            ErrorCodeV1::IdempotencyKeyInFlight,
            "a request with idempotency key k is still being accepted",
        );
        let json = serde_json::to_string_pretty(&body).unwrap();
        assert_eq!(
            json,
            ERROR_FIXTURE.trim_end(),
            "the error JSON changed; if on purpose, update src/protocol/fixtures/error_v1.json"
        );
        let back: ErrorBodyV1 = serde_json::from_str(ERROR_FIXTURE).unwrap();
        assert_eq!(back, body);
    }

    /// The codes are part of the API (clients branch on them): each one is spelled here
    /// once more so a rename shows as a failing test, and each reads back as itself.
    #[test]
    fn error_codes_are_frozen() {
        use ErrorCodeV1::*;
        let codes = [
            (BadRequest, "bad_request"),
            (NotFound, "not_found"),
            (MethodNotAllowed, "method_not_allowed"),
            (BodyTooLarge, "body_too_large"),
            (Internal, "internal"),
            (Unavailable, "unavailable"),
            (NotReady, "not_ready"),
            (Rejected, "rejected"),
            (UnknownJob, "unknown_job"),
            (UnknownSchedule, "unknown_schedule"),
            (UnknownRun, "unknown_run"),
            (UnknownAttempt, "unknown_attempt"),
            (InvalidParams, "invalid_params"),
            (IdempotencyKeyReused, "idempotency_key_reused"),
            (IdempotencyKeyInFlight, "idempotency_key_in_flight"),
            (RunFinished, "run_finished"),
            (NotRetryable, "not_retryable"),
            (WorkerApiDisabled, "worker_api_disabled"),
            (Unauthorized, "unauthorized"),
            (Forbidden, "forbidden"),
            (InvalidJobFiles, "invalid_job_files"),
            (InvalidCallback, "invalid_callback"),
            (NoCallback, "no_callback"),
            (RateLimited, "rate_limited"),
            (TooManyHolds, "too_many_holds"),
            (ParamTooLarge, "param_too_large"),
            (RequestTimeout, "request_timeout"),
        ];
        // The schema's `enum` is `KNOWN`: every code, no other.
        assert_eq!(ErrorCodeV1::KNOWN.len(), codes.len());
        for (code, text) in codes {
            assert!(ErrorCodeV1::KNOWN.contains(&code), "{text} is not in KNOWN");
            assert_eq!(code.as_str(), text);
            assert_eq!(ErrorCodeV1::from(text.to_owned()), code);
            assert_eq!(serde_json::to_string(&code).unwrap(), format!("\"{text}\""));
        }
    }

    #[test]
    fn an_unknown_error_code_still_parses() {
        let body: ErrorBodyV1 =
            serde_json::from_str(r#"{"error":{"code":"quota_exceeded","message":"slow down"}}"#)
                .unwrap();
        assert_eq!(
            body.error.code,
            ErrorCodeV1::Unknown("quota_exceeded".to_owned())
        );
        assert_eq!(body.error.message, "slow down");
        assert_eq!(
            serde_json::to_string(&body).unwrap(),
            r#"{"error":{"code":"quota_exceeded","message":"slow down"}}"#
        );
    }

    /// Older servers sent no `attempts`, `cancel_requested`, `not_before`,
    /// `logs_truncated`, `log_dropped_bytes` or `trigger`.
    #[test]
    fn reads_a_run_without_the_later_fields() {
        let run: RunV1 = serde_json::from_str(
            r#"{"id":"r","job":"j","status":"succeeded","params":{},"exit_code":0,
                "reason":null,"reason_code":null,"created_at":"t","started_at":null,
                "finished_at":null,"attempt":1}"#,
        )
        .unwrap();
        assert_eq!(run.status, RunStatusV1::Succeeded);
        assert!(run.attempts.is_empty() && !run.logs_truncated);
        assert_eq!(run.trigger, TriggerV1::Api);
    }

    #[test]
    fn triggers_read_back_and_unknown_types_still_parse() {
        assert_eq!(
            serde_json::to_string(&TriggerV1::from(&Trigger::Api)).unwrap(),
            r#"{"type":"api"}"#
        );
        assert_eq!(
            serde_json::to_string(&TriggerV1::from(&Trigger::Webhook)).unwrap(),
            r#"{"type":"webhook"}"#
        );
        let t: TriggerV1 = serde_json::from_str(r#"{"type":"email","from":"x"}"#).unwrap();
        assert_eq!(t, TriggerV1::Unknown);
    }
}
