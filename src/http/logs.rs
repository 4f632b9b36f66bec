//! `GET /v1/runs/{id}/logs`: a run's output, read or followed until the run is final.

use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderValue, header};
use axum::response::Response;
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::limits::{Caller, HoldGuard};
use super::runs::find_run;
use super::{ApiError, AppState};
use crate::domain::auth::{Action, Principal};
use crate::domain::run::RunId;
use crate::protocol::api::{ErrorBodyV1, ErrorCodeV1};
use crate::service::audit::AuditAction;
use crate::service::events::{BACKSTOP, RunWatch};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(get_logs))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct LogQuery {
    /// Stream until the run is final (takes one of the caller's holds meanwhile).
    #[serde(default)]
    follow: bool,
    /// This attempt's log (from 1); the run's current attempt when absent.
    #[param(minimum = 1)]
    attempt: Option<u32>,
    /// Skip this many bytes of the attempt's log (to resume a broken stream).
    #[serde(default, deserialize_with = "super::query::saturating")]
    #[param(schema_with = super::query::count)]
    offset: Option<u64>,
}

const LOG_READ: usize = 256 * 1024;

/// `GET /v1/runs/{id}/logs[?follow=true][&attempt=N]`: output as text/plain, bytes as
/// the container wrote them. Following streams until the run is final.
#[utoipa::path(
    get,
    path = "/v1/runs/{id}/logs",
    tag = "logs",
    operation_id = "get_logs",
    params(("id" = String, Path, description = "The run's id"), LogQuery),
    responses(
        (status = 200, description = "The attempt's output as the container wrote it (stdout and stderr interleaved)",
            content_type = "text/plain; charset=utf-8", body = String),
        (status = 400, description = "A query that cannot be read", body = ErrorBodyV1),
        (status = 404, description = "No such run (`unknown_run`, also for one the token may not read) or attempt (`unknown_attempt`)", body = ErrorBodyV1),
    ),
)]
async fn get_logs(
    State(state): State<AppState>,
    Caller(who): Caller,
    Extension(caller): Extension<Principal>,
    Path(id): Path<String>,
    query: Result<Query<LogQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query?;
    let (id, run) = find_run(&state, &caller, &id, Action::Read, AuditAction::RunRead).await?;
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
        // Given back when the stream ends or the client goes away (the body is dropped).
        let hold = state.limits.holds().take(&who)?;
        Body::from_stream(follow(
            state,
            hold,
            id,
            fixed_attempt,
            query.offset.unwrap_or(0),
        ))
    } else {
        // Streamed in pieces, so a large log never sits whole in memory. The first piece
        // is read before the answer starts, so a log that cannot be read gets an error
        // status rather than a connection closed with no answer at all.
        let attempt = fixed_attempt.unwrap_or(run.attempt);
        let runs = state.runs.clone();
        let offset = query.offset.unwrap_or(0);
        let first = if attempt == 0 {
            Bytes::new()
        } else {
            runs.read_log(id, attempt, offset, LOG_READ).await?
        };
        let start = Some((offset, Some(first)));
        let pieces = futures::stream::unfold(start, move |state| {
            let runs = runs.clone();
            async move {
                let (at, read) = state?;
                if attempt == 0 {
                    return None;
                }
                let result = match read {
                    Some(first) => Ok(first),
                    None => runs.read_log(id, attempt, at, LOG_READ).await,
                };
                match result {
                    Ok(chunk) if chunk.is_empty() => None,
                    Ok(chunk) => {
                        let next = at.saturating_add(chunk.len() as u64);
                        Some((Ok(chunk), Some((next, None))))
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
    _hold: HoldGuard,
    id: RunId,
    fixed_attempt: Option<u32>,
    attempt: u32,
    offset: u64,
    watch: RunWatch,
    done: bool,
}

fn follow(
    state: AppState,
    hold: HoldGuard,
    id: RunId,
    fixed_attempt: Option<u32>,
    offset: u64,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> {
    let watch = state.runs.events().watch(id);
    let start = Follow {
        state,
        _hold: hold,
        id,
        fixed_attempt,
        attempt: fixed_attempt.unwrap_or(0),
        offset,
        watch,
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
            // Sleep until this run's output or status changes; the backstop look
            // covers changes made by another process on the same store.
            tokio::select! {
                // A stopping server ends follow streams; clients resume with `offset`.
                _ = f.state.runs.stopping().cancelled() => return None,
                _ = tokio::time::timeout(BACKSTOP, f.watch.changed()) => {}
            }
        }
    })
}
