use std::collections::BTreeMap;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::{Target, audit_done, authorize};
use super::body::{asks_for_nothing, json_object};
use super::limits::{Caller, HoldGuard};
use super::{ApiError, AppState};
use crate::domain::auth::{Action, Principal};
use crate::domain::callback::{CallbackTarget, EVENTS, Redelivery};
use crate::domain::ports::RunFilter;
use crate::domain::reply::Requester;
use crate::domain::run::{Run, RunId, RunStatus};
use crate::protocol::api::{ErrorBodyV1, ErrorCodeV1, RunV1};
use crate::service::audit::AuditAction;
use crate::service::runs::{Accepted, MAX_IDEMPOTENCY_KEY_LEN};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_run))
        .routes(routes!(list_runs))
        .routes(routes!(get_run))
        .routes(routes!(cancel_run))
        .routes(routes!(retry_run))
        .routes(routes!(redeliver))
}

/// The longest `?wait=` honoured, in seconds.
const MAX_WAIT_SECS: u64 = 24 * 3600;

/// The body of `POST /v1/jobs/{job}/runs`; an empty body asks for nothing.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateRun {
    /// The job's parameters; each reaches the job as text.
    #[serde(default)]
    #[schema(schema_with = super::openapi::param_values)]
    params: BTreeMap<String, serde_json::Value>,
    /// Where this run announces its end, instead of its job's `[callback]`.
    #[serde(default, deserialize_with = "crate::protocol::request::object")]
    callback: Option<CallbackRequest>,
}

/// A run's own completion callback.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct CallbackRequest {
    /// Where the signed `run.finished` event is posted; an address the server's
    /// callback guard refuses is answered 422 `invalid_callback`.
    #[schema(format = "uri", pattern = "^https?://")]
    url: String,
    /// Only `finished` so far.
    #[serde(default)]
    #[schema(schema_with = super::openapi::callback_events)]
    events: Option<Vec<String>>,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct WaitQuery {
    /// Hold the answer up to this many seconds (at most a day) until the run is final:
    /// 200 with the final run, else 202 with the run as it is. Takes one of the
    /// caller's holds (`limits.max_holds_per_token`) meanwhile.
    #[serde(default, deserialize_with = "super::query::saturating")]
    #[param(schema_with = super::query::count)]
    pub(super) wait: Option<u64>,
}

fn parse_id(id: &str) -> Result<RunId, ApiError> {
    id.parse().map_err(|e: crate::domain::run::InvalidRunId| {
        ApiError::not_found(ErrorCodeV1::UnknownRun, e.to_string())
    })
}

fn unknown_run(id: RunId) -> ApiError {
    ApiError::not_found(ErrorCodeV1::UnknownRun, format!("no run {id}"))
}

/// The run named in the path, if `caller` may do `action` on its job; 404 for an
/// unknown run and for one the caller may not read (the same answer), 403 for one it
/// may read but not `action`.
pub(super) async fn find_run(
    state: &AppState,
    caller: &Principal,
    id: &str,
    action: Action,
    what: AuditAction,
) -> Result<(RunId, Run), ApiError> {
    let id = parse_id(id)?;
    let run = state.runs.get(id).await?.ok_or_else(|| unknown_run(id))?;
    authorize(caller, action, what, Target::run(&run.job, id), || {
        unknown_run(id)
    })?;
    Ok((id, run))
}

fn run_response(status: StatusCode, run: Run) -> Response {
    let location = format!("/v1/runs/{}", run.id);
    let mut response = (status, Json(RunV1::from(run))).into_response();
    if let Ok(v) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, v);
    }
    response
}

/// Params may be given as strings, numbers or booleans; they reach the job as text.
fn params_from_json(
    raw: BTreeMap<String, serde_json::Value>,
) -> Result<BTreeMap<String, String>, ApiError> {
    raw.into_iter()
        .map(|(k, v)| {
            let text = match v {
                serde_json::Value::String(s) => s,
                serde_json::Value::Number(n) => n.to_string(),
                serde_json::Value::Bool(b) => b.to_string(),
                other => {
                    let kind = match other {
                        serde_json::Value::Null => "null",
                        serde_json::Value::Array(_) => "an array",
                        _ => "an object",
                    };
                    return Err(ApiError::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        ErrorCodeV1::InvalidParams,
                        format!("parameter `{k}` is {kind}; give a string, number or boolean"),
                    ));
                }
            };
            Ok((k, text))
        })
        .collect()
}

/// What the body of `POST /v1/jobs/{job}/runs` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunRequestBody {
    /// Every parameter as the text the job gets.
    pub params: BTreeMap<String, String>,
    /// The run's own callback, replacing its job's `[callback]`.
    pub callback: Option<CallbackTarget>,
}

/// Read the body of `POST /v1/jobs/{job}/runs`: none (or JSON `null`) asks for nothing, else a JSON object `{"params":{..},"callback":{..}}`; 400 for what is not
/// that, 422 for a parameter or callback event it cannot take. Pure, so the fuzz target
/// `create_run_body` reaches it.
pub fn parse_create_run(body: &[u8]) -> Result<RunRequestBody, ApiError> {
    if asks_for_nothing(body) {
        return Ok(RunRequestBody {
            params: BTreeMap::new(),
            callback: None,
        });
    }
    let request: CreateRun = json_object(body, "run request body")?;
    Ok(RunRequestBody {
        params: params_from_json(request.params)?,
        callback: request.callback.map(callback_target).transpose()?,
    })
}

/// `POST /v1/jobs/{job}/runs`. The body is optional and read as JSON whatever its
/// content type says, since `curl -d` sends a form type.
#[utoipa::path(
    post,
    path = "/v1/jobs/{job}/runs",
    tag = "runs",
    operation_id = "create_run",
    params(
        ("job" = String, Path, description = "The job's name"),
        ("Idempotency-Key" = Option<String>, Header, min_length = 1, max_length = 255,
            pattern = r"^[!-~]([\t -~]*[!-~])?$",
            description = "1 to 255 visible ASCII characters: a repeat within 24 h answers with the first run"),
        WaitQuery,
    ),
    request_body(content = Option<CreateRun>, content_type = "application/json",
        description = "Parameters and a callback; may be empty. Read as JSON whatever its content type."),
    responses(
        (status = 200, description = "The run, final within `wait`", body = RunV1,
            headers(("Location" = String, description = "The run's URL"))),
        (status = 202, description = "The run, accepted (or an earlier run of the same idempotency key)", body = RunV1,
            headers(("Location" = String, description = "The run's URL"))),
        (status = 400, description = "A body, query or Idempotency-Key that cannot be read", body = ErrorBodyV1),
        (status = 404, description = "No such job, or one the token may not read (`unknown_job`)", body = ErrorBodyV1),
        (status = 409, description = "The idempotency key's first request is still being accepted", body = ErrorBodyV1),
        (status = 413, description = "A parameter over `limits.max_param_bytes` (`param_too_large`)", body = ErrorBodyV1),
        (status = 422, description = "Parameters the job refuses, a refused callback, or a reused idempotency key with another body", body = ErrorBodyV1),
    ),
)]
async fn create_run(
    State(state): State<AppState>,
    Caller(who): Caller,
    Extension(caller): Extension<Principal>,
    Path(job): Path<String>,
    query: Result<Query<WaitQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query?;
    let body = body?;
    let key = idempotency_key(&headers)?;
    let unknown = || ApiError::not_found(ErrorCodeV1::UnknownJob, format!("no job named `{job}`"));
    if state.runs.job(&job).is_none() {
        return Err(unknown());
    }
    authorize(
        &caller,
        Action::Run,
        AuditAction::RunStart,
        Target::job(&job),
        unknown,
    )?;
    // Before the run is accepted: a refused hold must not leave a run behind that a
    // retry of the request would start again.
    let _hold = hold(&state, &who, query.wait)?;
    let RunRequestBody { params, callback } = parse_create_run(&body)?;
    let target = callback
        .clone()
        .or_else(|| state.runs.job(&job).and_then(|j| j.callback.clone()));
    if let Some(target) = &target {
        state
            .callbacks
            .check(&target.url)
            .await
            .map_err(|refused| {
                ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    ErrorCodeV1::InvalidCallback,
                    format!("callback {}: {refused}", target.url),
                )
            })?;
    }
    // A key is the token's own: two callers never get each other's runs.
    let key = key.map(|k| (state.auth.key_scope(&caller), k));
    let requester = Requester {
        requested_by: state.auth.requested_by(&caller),
        ..Requester::default()
    };
    let accepted = state
        .runs
        .accept_from(&job, params, key, requester, callback)
        .await?;
    let repeat = matches!(accepted, Accepted::Existing(_));
    let run = accepted.into_run();
    audit_done(
        &caller,
        AuditAction::RunStart,
        Target::run(&job, run.id),
        repeat.then_some("idempotent repeat: the key's earlier run"),
    );
    finish_waiting(&state, run, query.wait).await
}

/// The `Idempotency-Key` header, if sent: 1 to 255 visible ASCII characters.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let bad = |why: &str| ApiError::bad_request(format!("invalid Idempotency-Key header: {why}"));
    let text = value
        .to_str()
        .map_err(|_| bad("it must be visible ASCII characters"))?;
    if text.is_empty() {
        return Err(bad("it is empty"));
    }
    if text.len() > MAX_IDEMPOTENCY_KEY_LEN {
        return Err(bad(&format!(
            "it is {} characters long; at most {MAX_IDEMPOTENCY_KEY_LEN} are allowed",
            text.len()
        )));
    }
    Ok(Some(text.to_owned()))
}

/// `POST /v1/runs/{id}/cancel`
#[utoipa::path(
    post,
    path = "/v1/runs/{id}/cancel",
    tag = "runs",
    operation_id = "cancel_run",
    params(("id" = String, Path, description = "The run's id")),
    responses(
        (status = 202, description = "Cancellation asked; the run as it is now", body = RunV1,
            headers(("Location" = String, description = "The run's URL"))),
        (status = 404, description = "No such run, or one the token may not read (`unknown_run`)", body = ErrorBodyV1),
        (status = 409, description = "The run is final already (`run_finished`)", body = ErrorBodyV1),
    ),
)]
async fn cancel_run(
    State(state): State<AppState>,
    Extension(caller): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let what = AuditAction::RunCancel;
    let (id, run) = find_run(&state, &caller, &id, Action::Cancel, what).await?;
    let run_after = state.runs.cancel(id).await?;
    audit_done(&caller, what, Target::run(&run.job, id), None);
    Ok(run_response(StatusCode::ACCEPTED, run_after))
}

/// `POST /v1/runs/{id}/retry`
#[utoipa::path(
    post,
    path = "/v1/runs/{id}/retry",
    tag = "runs",
    operation_id = "retry_run",
    params(("id" = String, Path, description = "The run's id")),
    responses(
        (status = 202, description = "Another attempt queued; the run as it is now", body = RunV1,
            headers(("Location" = String, description = "The run's URL"))),
        (status = 404, description = "No such run, or one the token may not read (`unknown_run`)", body = ErrorBodyV1),
        (status = 409, description = "The run may not be retried (`not_retryable`): not final, or it succeeded", body = ErrorBodyV1),
    ),
)]
async fn retry_run(
    State(state): State<AppState>,
    Extension(caller): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let what = AuditAction::RunRetry;
    let (id, _) = find_run(&state, &caller, &id, Action::Run, what).await?;
    let run = state.runs.retry(id).await?;
    audit_done(&caller, what, Target::run(&run.job, id), None);
    Ok(run_response(StatusCode::ACCEPTED, run))
}

fn callback_target(raw: CallbackRequest) -> Result<CallbackTarget, ApiError> {
    if let Some(unknown) = raw
        .events
        .iter()
        .flatten()
        .find(|e| !EVENTS.contains(&e.as_str()))
    {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCodeV1::InvalidCallback,
            format!(
                "unknown callback event `{unknown}`; known: {}",
                EVENTS.join(", ")
            ),
        ));
    }
    Ok(CallbackTarget { url: raw.url })
}

/// `POST /v1/runs/{id}/callbacks/redeliver`: the run's callbacks are due again now
/// (given up or delivered ones too), with their original event ids.
#[utoipa::path(
    post,
    path = "/v1/runs/{id}/callbacks/redeliver",
    tag = "runs",
    operation_id = "redeliver_callbacks",
    params(("id" = String, Path, description = "The run's id")),
    responses(
        (status = 202, description = "The run's callbacks are due again; the run", body = RunV1,
            headers(("Location" = String, description = "The run's URL"))),
        (status = 404, description = "No such run, or one the token may not read (`unknown_run`)", body = ErrorBodyV1),
        (status = 409, description = "No callback to deliver: none, or the run is not final yet (`no_callback`)", body = ErrorBodyV1),
    ),
)]
async fn redeliver(
    State(state): State<AppState>,
    Extension(caller): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let what = AuditAction::CallbackRedeliver;
    let (id, _) = find_run(&state, &caller, &id, Action::Run, what).await?;
    match state
        .store
        .redeliver_callbacks(id, chrono::Utc::now())
        .await?
    {
        Redelivery::Queued(_) => {}
        Redelivery::UnknownRun => return Err(unknown_run(id)),
        Redelivery::NothingToDeliver => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                ErrorCodeV1::NoCallback,
                format!("run {id} has no callback to deliver (none, or it is not final yet)"),
            ));
        }
    }
    state.callback_wake.notify_one();
    let run = state.runs.get(id).await?.ok_or_else(|| unknown_run(id))?;
    audit_done(&caller, what, Target::run(&run.job, id), None);
    Ok(run_response(StatusCode::ACCEPTED, run))
}

/// One of the caller's holds when the request asks to wait (`?wait=N`, N > 0).
pub(super) fn hold(
    state: &AppState,
    caller: &std::sync::Arc<str>,
    wait: Option<u64>,
) -> Result<Option<HoldGuard>, ApiError> {
    match wait {
        Some(secs) if secs > 0 => state.limits.holds().take(caller).map(Some),
        _ => Ok(None),
    }
}

/// Hold the answer until the run is final or the wait passes: 200 with the finished run,
/// or 202 with the run as it is. The caller holds a [`HoldGuard`] meanwhile.
pub(super) async fn finish_waiting(
    state: &AppState,
    run: Run,
    wait: Option<u64>,
) -> Result<Response, ApiError> {
    let Some(secs) = wait.filter(|s| *s > 0) else {
        let status = if run.status.is_final() {
            StatusCode::OK
        } else {
            StatusCode::ACCEPTED
        };
        return Ok(run_response(status, run));
    };
    let id = run.id;
    let waited = state
        .runs
        .wait(id, Duration::from_secs(secs.min(MAX_WAIT_SECS)))
        .await?;
    let run = waited.unwrap_or(run);
    let status = if run.status.is_final() {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok(run_response(status, run))
}

/// `GET /v1/runs/{id}`, with an optional `?wait=SECONDS` long poll.
#[utoipa::path(
    get,
    path = "/v1/runs/{id}",
    tag = "runs",
    operation_id = "get_run",
    params(("id" = String, Path, description = "The run's id"), WaitQuery),
    responses(
        (status = 200, description = "The run (final, when `wait` was given and it ended in time)", body = RunV1),
        (status = 202, description = "`wait` passed before the run ended: the run as it is", body = RunV1,
            headers(("Location" = String, description = "The run's URL"))),
        (status = 400, description = "A query that cannot be read", body = ErrorBodyV1),
        (status = 404, description = "No such run, or one the token may not read (`unknown_run`)", body = ErrorBodyV1),
    ),
)]
async fn get_run(
    State(state): State<AppState>,
    Caller(who): Caller,
    Extension(caller): Extension<Principal>,
    Path(id): Path<String>,
    query: Result<Query<WaitQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query?;
    let (_, run) = find_run(&state, &caller, &id, Action::Read, AuditAction::RunRead).await?;
    if query.wait.is_some() && !run.status.is_final() {
        let _hold = hold(&state, &who, query.wait)?;
        return finish_waiting(&state, run, query.wait).await;
    }
    Ok((StatusCode::OK, Json(RunV1::from(run))).into_response())
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct ListQuery {
    /// Only this job's runs.
    job: Option<String>,
    /// Only runs in this status (empty: any).
    #[param(schema_with = super::openapi::status_filter)]
    status: Option<String>,
    /// At most this many (1 to 1000; 50 when absent).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
}

#[derive(Serialize, ToSchema)]
struct RunList {
    runs: Vec<RunV1>,
}

/// `GET /v1/runs?job=&status=&limit=`, newest first: only runs of jobs the caller
/// may read.
#[utoipa::path(
    get,
    path = "/v1/runs",
    tag = "runs",
    operation_id = "list_runs",
    params(ListQuery),
    responses(
        (status = 200, description = "Runs of jobs the token may read, newest first", body = RunList),
        (status = 400, description = "A query that cannot be read, an unknown status, or a limit out of range", body = ErrorBodyV1),
    ),
)]
async fn list_runs(
    State(state): State<AppState>,
    Extension(caller): Extension<Principal>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<RunList>, ApiError> {
    let Query(query) = query?;
    let status = query
        .status
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<RunStatus>())
        .transpose()
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let limit = query.limit.unwrap_or(50);
    if limit == 0 || limit > 1000 {
        return Err(ApiError::bad_request(format!(
            "limit must be between 1 and 1000, got {limit}"
        )));
    }
    let filter = RunFilter {
        job: query.job.filter(|j| !j.is_empty()),
        status,
        jobs: caller.jobs_for(Action::Read),
        limit,
        ..RunFilter::default()
    };
    let runs = state.runs.list(&filter).await?;
    Ok(Json(RunList {
        runs: runs.into_iter().map(RunV1::from).collect(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// schemathesis sent `null` for the optional body (the schema allows no body) and
    /// got a 400: JSON `null` is "no body", like an empty one. Whitespace alone is not
    /// JSON: its negative cases send `\t` and expect a 400.
    #[test]
    fn a_null_body_asks_for_nothing() {
        for body in [&b""[..], b"null", b" null\n"] {
            let read = parse_create_run(body).expect("nothing asked");
            assert!(read.params.is_empty() && read.callback.is_none());
        }
        for body in [
            &b"nul"[..],
            b"[null]",
            b"\"null\"",
            b"null null",
            b"  ",
            b"\t",
        ] {
            assert_eq!(parse_create_run(body).unwrap_err().status, 400);
        }
    }
}
