//! The API's error body (`{"error":{"code","message"}}`, with `details` for answers that
//! list several problems) and the typed error code, which keeps codes this build does
//! not know; also the reload summary that goes with `invalid_job_files`.

use std::fmt;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Every API error answer: `{"error":{"code":"...","message":"..."}}`, the framework's
/// own rejections included.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct ErrorBodyV1 {
    pub error: ErrorV1,
}

/// The `error` object of an [`ErrorBodyV1`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct ErrorV1 {
    pub code: ErrorCodeV1,
    pub message: String,
    /// The individual problems, when there are several (e.g. every invalid line of the
    /// job files for `invalid_job_files`); absent when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<ErrorDetailV1>,
}

/// One problem in a file: `{"file","line","field","message"}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct ErrorDetailV1 {
    pub file: String,
    pub line: Option<usize>,
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for ErrorDetailV1 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.file)?;
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

/// `POST /v1/jobs/reload`: what the reload changed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct ReloadSummaryV1 {
    /// Goes up by one with each reload that changed something.
    pub generation: u64,
    pub jobs: usize,
    pub calendars: usize,
    pub added: Vec<String>,
    pub changed: Vec<String>,
    pub removed: Vec<String>,
}

impl ErrorBodyV1 {
    pub fn new(code: ErrorCodeV1, message: impl Into<String>) -> Self {
        Self {
            error: ErrorV1 {
                code,
                message: message.into(),
                details: Vec::new(),
            },
        }
    }
}

/// An API error's stable code. A code this build does not know (from a newer or older
/// server) is kept as it came, so the answer still parses and its message still shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum ErrorCodeV1 {
    BadRequest,
    NotFound,
    MethodNotAllowed,
    BodyTooLarge,
    Internal,
    Unavailable,
    NotReady,
    Rejected,
    UnknownJob,
    UnknownSchedule,
    UnknownRun,
    UnknownAttempt,
    InvalidParams,
    IdempotencyKeyReused,
    IdempotencyKeyInFlight,
    RunFinished,
    NotRetryable,
    WorkerApiDisabled,
    /// No API token, or one the server does not know (401).
    Unauthorized,
    /// A valid token that may not do this (403): out of its scopes, or a token of the
    /// other kind (worker vs API).
    Forbidden,
    InvalidJobFiles,
    /// A callback URL that may not be called (scheme, or an address the guard refuses).
    InvalidCallback,
    /// A redelivery asked of a run with no callback to deliver (none, or not final yet).
    NoCallback,
    /// Over the caller's request rate (429, with `Retry-After`).
    RateLimited,
    /// Over the caller's number of `?wait` holds and log follows open at once (429).
    TooManyHolds,
    /// A run parameter's name or value over `max_param_bytes` (413).
    ParamTooLarge,
    /// The request's body did not arrive within the body timeout (408).
    RequestTimeout,
    Unknown(String),
}

impl ErrorCodeV1 {
    /// Every code this build writes (the schema's `enum`).
    pub const KNOWN: [ErrorCodeV1; 27] = [
        ErrorCodeV1::BadRequest,
        ErrorCodeV1::NotFound,
        ErrorCodeV1::MethodNotAllowed,
        ErrorCodeV1::BodyTooLarge,
        ErrorCodeV1::Internal,
        ErrorCodeV1::Unavailable,
        ErrorCodeV1::NotReady,
        ErrorCodeV1::Rejected,
        ErrorCodeV1::UnknownJob,
        ErrorCodeV1::UnknownSchedule,
        ErrorCodeV1::UnknownRun,
        ErrorCodeV1::UnknownAttempt,
        ErrorCodeV1::InvalidParams,
        ErrorCodeV1::IdempotencyKeyReused,
        ErrorCodeV1::IdempotencyKeyInFlight,
        ErrorCodeV1::RunFinished,
        ErrorCodeV1::NotRetryable,
        ErrorCodeV1::WorkerApiDisabled,
        ErrorCodeV1::Unauthorized,
        ErrorCodeV1::Forbidden,
        ErrorCodeV1::InvalidJobFiles,
        ErrorCodeV1::InvalidCallback,
        ErrorCodeV1::NoCallback,
        ErrorCodeV1::RateLimited,
        ErrorCodeV1::TooManyHolds,
        ErrorCodeV1::ParamTooLarge,
        ErrorCodeV1::RequestTimeout,
    ];

    pub fn as_str(&self) -> &str {
        match self {
            ErrorCodeV1::BadRequest => "bad_request",
            ErrorCodeV1::NotFound => "not_found",
            ErrorCodeV1::MethodNotAllowed => "method_not_allowed",
            ErrorCodeV1::BodyTooLarge => "body_too_large",
            ErrorCodeV1::Internal => "internal",
            ErrorCodeV1::Unavailable => "unavailable",
            ErrorCodeV1::NotReady => "not_ready",
            ErrorCodeV1::Rejected => "rejected",
            ErrorCodeV1::UnknownJob => "unknown_job",
            ErrorCodeV1::UnknownSchedule => "unknown_schedule",
            ErrorCodeV1::UnknownRun => "unknown_run",
            ErrorCodeV1::UnknownAttempt => "unknown_attempt",
            ErrorCodeV1::InvalidParams => "invalid_params",
            ErrorCodeV1::IdempotencyKeyReused => "idempotency_key_reused",
            ErrorCodeV1::IdempotencyKeyInFlight => "idempotency_key_in_flight",
            ErrorCodeV1::RunFinished => "run_finished",
            ErrorCodeV1::NotRetryable => "not_retryable",
            ErrorCodeV1::WorkerApiDisabled => "worker_api_disabled",
            ErrorCodeV1::Unauthorized => "unauthorized",
            ErrorCodeV1::Forbidden => "forbidden",
            ErrorCodeV1::InvalidJobFiles => "invalid_job_files",
            ErrorCodeV1::InvalidCallback => "invalid_callback",
            ErrorCodeV1::NoCallback => "no_callback",
            ErrorCodeV1::RateLimited => "rate_limited",
            ErrorCodeV1::TooManyHolds => "too_many_holds",
            ErrorCodeV1::ParamTooLarge => "param_too_large",
            ErrorCodeV1::RequestTimeout => "request_timeout",
            ErrorCodeV1::Unknown(s) => s,
        }
    }
}

impl From<String> for ErrorCodeV1 {
    fn from(s: String) -> Self {
        match s.as_str() {
            "bad_request" => ErrorCodeV1::BadRequest,
            "not_found" => ErrorCodeV1::NotFound,
            "method_not_allowed" => ErrorCodeV1::MethodNotAllowed,
            "body_too_large" => ErrorCodeV1::BodyTooLarge,
            "internal" => ErrorCodeV1::Internal,
            "unavailable" => ErrorCodeV1::Unavailable,
            "not_ready" => ErrorCodeV1::NotReady,
            "rejected" => ErrorCodeV1::Rejected,
            "unknown_job" => ErrorCodeV1::UnknownJob,
            "unknown_schedule" => ErrorCodeV1::UnknownSchedule,
            "unknown_run" => ErrorCodeV1::UnknownRun,
            "unknown_attempt" => ErrorCodeV1::UnknownAttempt,
            "invalid_params" => ErrorCodeV1::InvalidParams,
            "idempotency_key_reused" => ErrorCodeV1::IdempotencyKeyReused,
            "idempotency_key_in_flight" => ErrorCodeV1::IdempotencyKeyInFlight,
            "run_finished" => ErrorCodeV1::RunFinished,
            "not_retryable" => ErrorCodeV1::NotRetryable,
            "worker_api_disabled" => ErrorCodeV1::WorkerApiDisabled,
            "unauthorized" => ErrorCodeV1::Unauthorized,
            "forbidden" => ErrorCodeV1::Forbidden,
            "invalid_job_files" => ErrorCodeV1::InvalidJobFiles,
            "invalid_callback" => ErrorCodeV1::InvalidCallback,
            "no_callback" => ErrorCodeV1::NoCallback,
            "rate_limited" => ErrorCodeV1::RateLimited,
            "too_many_holds" => ErrorCodeV1::TooManyHolds,
            "param_too_large" => ErrorCodeV1::ParamTooLarge,
            "request_timeout" => ErrorCodeV1::RequestTimeout,
            _ => ErrorCodeV1::Unknown(s),
        }
    }
}

impl From<ErrorCodeV1> for String {
    fn from(c: ErrorCodeV1) -> Self {
        match c {
            ErrorCodeV1::Unknown(s) => s,
            known => known.as_str().to_owned(),
        }
    }
}

impl fmt::Display for ErrorCodeV1 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
