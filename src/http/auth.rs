//! Who is calling and what they may do. [`authenticate`] turns the bearer token of every
//! request into a `Principal` in its extensions (and a span naming the token), except
//! where a door is open: `/healthz`, `/v1/openapi.json`, `/v1/hooks/*` (signed deliveries, checked there),
//! and `/readyz`/`/metrics` when `[auth]` opens them. Worker tokens open `/v1/worker/*`
//! and nothing else; API tokens open everything but that. `/ui/*` takes the web UI's
//! session cookie instead (`ui::session::admit`), and only it does. Handlers then ask
//! [`authorize`]: out of scope is 403 when the caller may read the job, else the very
//! 404 an unknown job or run gets, so existence never leaks.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tracing::Instrument;

use super::ApiError;
use crate::domain::auth::{Action, Credential, OPEN_PRINCIPAL, Principal, TokenSet};
use crate::domain::run::RunId;
use crate::protocol::api::ErrorCodeV1;
use crate::service::audit::{self, AuditAction, AuditEvent, AuditOutcome};

/// The tokens requests are checked against, and which read-only doors are open.
#[derive(Clone)]
pub struct Auth {
    tokens: Arc<TokenSet>,
    open_readyz: bool,
    open_metrics: bool,
    /// The web UI's logins.
    ui: Arc<super::ui::session::Sessions>,
}

impl Auth {
    pub fn new(tokens: TokenSet, open_readyz: bool, open_metrics: bool) -> Auth {
        Auth {
            tokens: Arc::new(tokens),
            open_readyz,
            open_metrics,
            ui: Arc::default(),
        }
    }

    /// What a presented token is (the web UI's login form asks).
    pub(super) fn identify(&self, token: &str) -> Option<Credential> {
        self.tokens.identify(token)
    }

    pub(super) fn ui_sessions(&self) -> &super::ui::session::Sessions {
        &self.ui
    }

    /// No API tokens: every API caller is `Principal::open()` (the server listens on
    /// loopback only, unless told `--insecure-no-auth`).
    pub fn is_open(&self) -> bool {
        !self.tokens.has_api_tokens()
    }

    /// The idempotency key scope of a caller: its token, so two callers' keys never
    /// meet. An open server keeps the one scope it always had.
    pub fn key_scope(&self, caller: &Principal) -> String {
        if self.is_open() {
            String::new()
        } else {
            format!("token:{}", caller.name())
        }
    }

    /// What a run started by this caller records as `requested_by`: the token's name;
    /// nothing on an open server.
    pub fn requested_by(&self, caller: &Principal) -> Option<String> {
        (!self.is_open()).then(|| caller.name().to_owned())
    }

    /// `/metrics` needs no token (`[auth] open_metrics = true`).
    pub fn metrics_open(&self) -> bool {
        self.open_metrics
    }

    fn door(&self, path: &str) -> Door {
        match path {
            // The API's description holds no data.
            "/healthz" | "/v1/openapi.json" => Door::Open,
            "/readyz" if self.open_readyz => Door::Open,
            "/metrics" if self.open_metrics => Door::Open,
            _ if path.starts_with("/v1/hooks/") => Door::Open,
            _ if path.starts_with("/v1/worker/") => Door::Worker,
            _ if path == "/ui" || path.starts_with("/ui/") => Door::Ui,
            _ => Door::Api,
        }
    }
}

/// Which credential a path wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Door {
    /// None (or its own, like a webhook signature).
    Open,
    /// A worker token.
    Worker,
    /// An API token (unless the server is open).
    Api,
    /// The web UI's session cookie (unless the server is open); never a bearer token.
    Ui,
}

/// The worker token a `/v1/worker/*` request presented, by its name. Only
/// [`authenticate`] puts it into a request.
#[derive(Debug, Clone)]
pub struct WorkerCaller(pub Arc<str>);

/// The caller of an open door: nobody in particular, allowed nothing by scope.
fn nobody() -> Principal {
    Principal::new(OPEN_PRINCIPAL, Vec::new())
}

/// The token after `Bearer ` (the scheme in any case, as RFC 7235 has it).
fn bearer(request: &Request) -> Option<&str> {
    let value = request
        .headers()
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// `WWW-Authenticate` of a 401 for a request without a token (RFC 6750) ...
const CHALLENGE: &str = r#"Bearer realm="tasuki""#;
/// ... and for one whose token is not known.
const CHALLENGE_INVALID: &str = r#"Bearer realm="tasuki", error="invalid_token""#;

/// A refusal before routing: audited, then answered (a 401 with its challenge).
fn refuse(
    request: &Request,
    actor: &str,
    error: ApiError,
    reason: &str,
    challenge: Option<&'static str>,
) -> Response {
    let line = format!("{} {}", request.method(), request.uri().path());
    let outcome = AuditOutcome::Refused {
        status: error.status.as_u16(),
        reason,
    };
    audit::record(&AuditEvent {
        request: Some(&line),
        ..AuditEvent::new(actor, AuditAction::Request, outcome)
    });
    let mut response = error.into_response();
    if let Some(challenge) = challenge {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(challenge),
        );
    }
    response
}

fn unauthorized(message: &str) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, ErrorCodeV1::Unauthorized, message)
}

fn forbidden(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, ErrorCodeV1::Forbidden, message)
}

/// The middleware: the caller as an `Extension<Principal>` (and, on `/v1/worker/*`, a
/// [`WorkerCaller`]), every log line of the request in a span with `token = name`; or
/// 401 (no or unknown token, with `WWW-Authenticate: Bearer`) or 403 (a token of the
/// wrong kind).
pub async fn authenticate(State(auth): State<Auth>, mut request: Request, next: Next) -> Response {
    let door = auth.door(request.uri().path());
    let credential = bearer(&request).map(|t| auth.tokens.identify(t));
    let principal = match (door, credential) {
        (Door::Open, _) => nobody(),
        (Door::Ui, _) => match super::ui::session::admit(&auth.ui, auth.is_open(), &mut request) {
            Ok(principal) => principal,
            Err(refusal) => return refusal.into_response(),
        },
        (Door::Api, _) if auth.is_open() => Principal::open(),
        (Door::Worker, _) if !auth.tokens.has_worker_tokens() => {
            let error = ApiError::new(
                StatusCode::FORBIDDEN,
                ErrorCodeV1::WorkerApiDisabled,
                "the worker API is disabled: start `tasuki serve` with --worker-token \
                 or [[worker_tokens]]",
            );
            return refuse(&request, "-", error, "no worker tokens configured", None);
        }
        (_, None) => {
            let error =
                unauthorized("this endpoint needs a token: send `Authorization: Bearer TOKEN`");
            return refuse(&request, "-", error, "no bearer token", Some(CHALLENGE));
        }
        (_, Some(None)) => {
            let error = unauthorized("the bearer token is not one this server knows");
            return refuse(
                &request,
                "-",
                error,
                "unknown token",
                Some(CHALLENGE_INVALID),
            );
        }
        (Door::Api, Some(Some(Credential::Api(principal)))) => principal,
        (Door::Api, Some(Some(Credential::Worker(name)))) => {
            let error = forbidden("a worker token opens only the worker API (/v1/worker/*)");
            return refuse(&request, &name, error, "worker token on the API", None);
        }
        (Door::Worker, Some(Some(Credential::Worker(name)))) => {
            request.extensions_mut().insert(WorkerCaller(name.clone()));
            Principal::new(&name, Vec::new())
        }
        (Door::Worker, Some(Some(Credential::Api(principal)))) => {
            let error = forbidden("an API token does not open the worker API; use a worker token");
            let reason = "API token on the worker API";
            return refuse(&request, principal.name(), error, reason, None);
        }
    };
    let span = tracing::info_span!("auth", token = %principal.name());
    request.extensions_mut().insert(principal);
    next.run(request).instrument(span).await
}

/// What a job-level check is about, for the audit log.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub job: &'a str,
    pub run_id: Option<RunId>,
    pub schedule: Option<&'a str>,
}

impl<'a> Target<'a> {
    pub fn job(job: &'a str) -> Self {
        Target {
            job,
            run_id: None,
            schedule: None,
        }
    }

    pub fn run(job: &'a str, id: RunId) -> Self {
        Target {
            run_id: Some(id),
            ..Target::job(job)
        }
    }

    pub fn schedule(job: &'a str, schedule: &'a str) -> Self {
        Target {
            schedule: Some(schedule),
            ..Target::job(job)
        }
    }
}

/// May `caller` do `action` on the target's job? If not, and it may read the job, 403;
/// if it may not even read it, `hidden()`: exactly what an unknown job or run answers.
/// Both refusals are audited as `what`.
pub fn authorize(
    caller: &Principal,
    action: Action,
    what: AuditAction,
    target: Target<'_>,
    hidden: impl FnOnce() -> ApiError,
) -> Result<(), ApiError> {
    if caller.may(action, target.job) {
        return Ok(());
    }
    let (error, reason) = if caller.may(Action::Read, target.job) {
        let message = format!(
            "token `{}` may not {} job `{}`",
            caller.name(),
            match action {
                Action::Run => "start runs of",
                Action::Read => "read",
                Action::Cancel => "cancel runs of",
                Action::Admin => "administer (admin scope) the schedules of",
            },
            target.job
        );
        (forbidden(message), "out of scope")
    } else {
        (hidden(), "not readable: answered as unknown")
    };
    audit_refusal(caller, what, target, &error, reason);
    Err(error)
}

/// `admin` only (reload): 403 for every other token.
pub fn require_admin(caller: &Principal, what: AuditAction) -> Result<(), ApiError> {
    if caller.is_admin() {
        return Ok(());
    }
    let error = forbidden(format!("token `{}` has no admin scope", caller.name()));
    let outcome = AuditOutcome::Refused {
        status: error.status.as_u16(),
        reason: "not admin",
    };
    audit::record(&AuditEvent::new(caller.name(), what, outcome));
    Err(error)
}

fn audit_refusal(
    caller: &Principal,
    what: AuditAction,
    target: Target<'_>,
    error: &ApiError,
    reason: &str,
) {
    let outcome = AuditOutcome::Refused {
        status: error.status.as_u16(),
        reason,
    };
    audit::record(&AuditEvent {
        job: Some(target.job),
        run_id: target.run_id,
        schedule: target.schedule,
        ..AuditEvent::new(caller.name(), what, outcome)
    });
}

/// Record what a caller did (see `service::audit`).
pub fn audit_done(caller: &Principal, what: AuditAction, target: Target<'_>, detail: Option<&str>) {
    audit::record(&AuditEvent {
        job: Some(target.job),
        run_id: target.run_id,
        schedule: target.schedule,
        detail,
        ..AuditEvent::new(caller.name(), what, AuditOutcome::Done)
    });
}

#[cfg(test)]
mod tests;
