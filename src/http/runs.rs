use std::collections::BTreeMap;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use super::{ApiError, AppState};
use crate::domain::callback::{CallbackTarget, EVENTS, Redelivery};
use crate::domain::ports::RunFilter;
use crate::domain::run::{Run, RunId, RunStatus};
use crate::protocol::api::{ErrorCodeV1, RunV1};
use crate::service::events::RunEventKind;
use crate::service::runs::MAX_IDEMPOTENCY_KEY_LEN;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/jobs/{job}/runs", post(create_run))
        .route("/v1/runs", get(list_runs))
        .route("/v1/runs/{id}", get(get_run))
        .route("/v1/runs/{id}/logs", get(get_logs))
        .route("/v1/runs/{id}/cancel", post(cancel_run))
        .route("/v1/runs/{id}/retry", post(retry_run))
        .route("/v1/runs/{id}/callbacks/redeliver", post(redeliver))
}

/// The longest `?wait=` honoured, in seconds.
const MAX_WAIT_SECS: u64 = 24 * 3600;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateRun {
    #[serde(default)]
    params: BTreeMap<String, serde_json::Value>,
    /// Where this run announces its end, instead of its job's `[callback]`.
    #[serde(default, deserialize_with = "crate::protocol::request::object")]
    callback: Option<CallbackRequest>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CallbackRequest {
    url: String,
    /// Only `finished` so far.
    #[serde(default)]
    events: Option<Vec<String>>,
}

#[derive(Deserialize)]
pub(super) struct WaitQuery {
    pub(super) wait: Option<u64>,
}

fn parse_id(id: &str) -> Result<RunId, ApiError> {
    id.parse().map_err(|e: crate::domain::run::InvalidRunId| {
        ApiError::not_found(ErrorCodeV1::UnknownRun, e.to_string())
    })
}

/// The run named in the path, or 404.
async fn find_run(state: &AppState, id: &str) -> Result<(RunId, Run), ApiError> {
    let id = parse_id(id)?;
    let run = state
        .runs
        .get(id)
        .await?
        .ok_or_else(|| ApiError::not_found(ErrorCodeV1::UnknownRun, format!("no run {id}")))?;
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

/// Read the body of `POST /v1/jobs/{job}/runs`: empty (or only whitespace) asks for
/// nothing, else a JSON object `{"params":{..},"callback":{..}}`; 400 for what is not
/// that, 422 for a parameter or callback event it cannot take. Pure, so the fuzz target
/// `create_run_body` reaches it.
pub fn parse_create_run(body: &[u8]) -> Result<RunRequestBody, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(RunRequestBody {
            params: BTreeMap::new(),
            callback: None,
        });
    }
    let request: CreateRun = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "request body is not valid JSON for a run request: {e}"
        ))
    })?;
    // serde's derive also reads a struct from an array, by position: `[{"name":"x"}]`.
    if !body.trim_ascii_start().starts_with(b"{") {
        return Err(ApiError::bad_request(
            "request body is not valid JSON for a run request: give an object, \
             {\"params\":{...}}",
        ));
    }
    Ok(RunRequestBody {
        params: params_from_json(request.params)?,
        callback: request.callback.map(callback_target).transpose()?,
    })
}

/// `POST /v1/jobs/{job}/runs`. The body is optional and read as JSON whatever its
/// content type says, since `curl -d` sends a form type.
async fn create_run(
    State(state): State<AppState>,
    Path(job): Path<String>,
    query: Result<Query<WaitQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query?;
    let body = body?;
    let key = idempotency_key(&headers)?;
    if state.runs.job(&job).is_none() {
        return Err(ApiError::not_found(
            ErrorCodeV1::UnknownJob,
            format!("no job named `{job}`"),
        ));
    }
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
    // One scope for every caller until API tokens exist; then a key is per client.
    let key = key.map(|k| (String::new(), k));
    let run = state
        .runs
        .accept(&job, params, key, callback)
        .await?
        .into_run();
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
async fn cancel_run(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let run = state.runs.cancel(id).await?;
    Ok(run_response(StatusCode::ACCEPTED, run))
}

/// `POST /v1/runs/{id}/retry`
async fn retry_run(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let run = state.runs.retry(id).await?;
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
async fn redeliver(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    match state
        .store
        .redeliver_callbacks(id, chrono::Utc::now())
        .await?
    {
        Redelivery::Queued(_) => {}
        Redelivery::UnknownRun => {
            return Err(ApiError::not_found(
                ErrorCodeV1::UnknownRun,
                format!("no run {id}"),
            ));
        }
        Redelivery::NothingToDeliver => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                ErrorCodeV1::NoCallback,
                format!("run {id} has no callback to deliver (none, or it is not final yet)"),
            ));
        }
    }
    state.callback_wake.notify_one();
    let (_, run) = find_run(&state, &id.to_string()).await?;
    Ok(run_response(StatusCode::ACCEPTED, run))
}

/// Hold the answer until the run is final or the wait passes: 200 with the finished run,
/// or 202 with the run as it is.
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
async fn get_run(
    State(state): State<AppState>,
    Path(id): Path<String>,
    query: Result<Query<WaitQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query?;
    let (_, run) = find_run(&state, &id).await?;
    if query.wait.is_some() && !run.status.is_final() {
        return finish_waiting(&state, run, query.wait).await;
    }
    Ok((StatusCode::OK, Json(RunV1::from(run))).into_response())
}

#[derive(Deserialize)]
struct ListQuery {
    job: Option<String>,
    status: Option<String>,
    limit: Option<u32>,
}

#[derive(Serialize)]
struct RunList {
    runs: Vec<RunV1>,
}

/// `GET /v1/runs?job=&status=&limit=`, newest first.
async fn list_runs(
    State(state): State<AppState>,
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
        limit,
    };
    let runs = state.runs.list(&filter).await?;
    Ok(Json(RunList {
        runs: runs.into_iter().map(RunV1::from).collect(),
    }))
}

#[derive(Deserialize)]
struct LogQuery {
    #[serde(default)]
    follow: bool,
    attempt: Option<u32>,
    /// Skip this many bytes of the attempt's log (to resume a broken stream).
    #[serde(default)]
    offset: u64,
}

const LOG_READ: usize = 256 * 1024;

/// `GET /v1/runs/{id}/logs[?follow=true][&attempt=N]`: output as text/plain, bytes as
/// the container wrote them. Following streams until the run is final.
async fn get_logs(
    State(state): State<AppState>,
    Path(id): Path<String>,
    query: Result<Query<LogQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query?;
    let (id, run) = find_run(&state, &id).await?;
    let fixed_attempt = query.attempt;
    if let Some(a) = fixed_attempt
        && (a == 0 || a > run.attempt.max(1))
    {
        return Err(ApiError::not_found(
            ErrorCodeV1::UnknownAttempt,
            format!("run {id} has no attempt {a}"),
        ));
    }
    let body = if query.follow {
        Body::from_stream(follow(state, id, fixed_attempt, query.offset))
    } else {
        // Streamed in pieces, so a large log never sits whole in memory.
        let attempt = fixed_attempt.unwrap_or(run.attempt);
        let runs = state.runs.clone();
        let pieces = futures::stream::unfold(Some(query.offset), move |at| {
            let runs = runs.clone();
            async move {
                let at = at?;
                if attempt == 0 {
                    return None;
                }
                match runs.read_log(id, attempt, at, LOG_READ).await {
                    Ok(chunk) if chunk.is_empty() => None,
                    Ok(chunk) => {
                        let next = at + chunk.len() as u64;
                        Some((Ok(chunk), Some(next)))
                    }
                    Err(e) => Some((Err(std::io::Error::other(e.to_string())), None)),
                }
            }
        });
        Body::from_stream(pieces)
    };
    let mut response = Response::new(body);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

struct Follow {
    state: AppState,
    id: RunId,
    fixed_attempt: Option<u32>,
    attempt: u32,
    offset: u64,
    events: broadcast::Receiver<crate::service::events::RunEvent>,
    done: bool,
}

fn follow(
    state: AppState,
    id: RunId,
    fixed_attempt: Option<u32>,
    offset: u64,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> {
    let events = state.runs.events().subscribe();
    let start = Follow {
        state,
        id,
        fixed_attempt,
        attempt: fixed_attempt.unwrap_or(0),
        offset,
        events,
        done: false,
    };
    futures::stream::unfold(start, |mut f| async move {
        if f.done {
            return None;
        }
        loop {
            // Read the run before the log: if it is final now, everything it wrote is
            // already stored, so one more read after an empty one finishes the stream.
            let run = match f.state.runs.get(f.id).await {
                Ok(Some(r)) => r,
                Ok(None) => return None,
                Err(e) => {
                    return Some((
                        Err(std::io::Error::other(e.to_string())),
                        Follow { done: true, ..f },
                    ));
                }
            };
            if f.fixed_attempt.is_none() && run.attempt > f.attempt {
                // A resume offset applies to the attempt current at the first look; a
                // later attempt's log starts at its beginning.
                if f.attempt > 0 {
                    f.offset = 0;
                }
                f.attempt = run.attempt;
            }
            if f.attempt > 0 {
                match f
                    .state
                    .runs
                    .read_log(f.id, f.attempt, f.offset, LOG_READ)
                    .await
                {
                    Ok(chunk) if !chunk.is_empty() => {
                        f.offset += chunk.len() as u64;
                        return Some((Ok(chunk), f));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        return Some((
                            Err(std::io::Error::other(e.to_string())),
                            Follow { done: true, ..f },
                        ));
                    }
                }
            }
            if run.status.is_final() {
                return None;
            }
            // Sleep until this run's output or status changes; a periodic look covers
            // a remote worker's writes and missed (lagged) events.
            let wait = async {
                loop {
                    match f.events.recv().await {
                        Ok(ev)
                            if ev.run_id == f.id
                                && matches!(ev.kind, RunEventKind::Log | RunEventKind::Status) =>
                        {
                            return;
                        }
                        Ok(_) => continue,
                        Err(_) => return,
                    }
                }
            };
            tokio::select! {
                // A stopping server ends follow streams; clients resume with `offset`.
                _ = f.state.runs.stopping().cancelled() => return None,
                _ = tokio::time::timeout(Duration::from_secs(1), wait) => {}
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by `fuzz/fuzz_targets/create_run_body.rs`: `[ ]` (and `[{"name":"x"}]`,
    /// read by position as the params) was taken as a run request.
    #[test]
    fn fuzz_a_json_array_body_is_refused() {
        for body in [&b"[ ]"[..], br#"[{"name":"x"}]"#, b" \n[]"] {
            let e = parse_create_run(body).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert!(e.message.contains("give an object"), "{}", e.message);
        }
        let e = parse_create_run(br#"{"callback":["https://x.example/"]}"#).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.message.contains("expected a map"), "{}", e.message);
    }

    #[test]
    fn a_run_request_body_reads_params_as_text_and_its_callback() {
        let read = parse_create_run(
            br#" {"params":{"n":3,"b":true,"s":"x"},"callback":{"url":"https://x.example/"}}"#,
        )
        .unwrap();
        assert_eq!(read.params["n"], "3");
        assert_eq!(read.params["b"], "true");
        assert_eq!(read.params["s"], "x");
        assert_eq!(read.callback.unwrap().url, "https://x.example/");
        assert_eq!(
            parse_create_run(b" \n").unwrap(),
            parse_create_run(b"{}").unwrap()
        );
        let e = parse_create_run(br#"{"params":{"a":null}}"#).unwrap_err();
        assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY);
    }
}
