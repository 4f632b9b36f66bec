//! An attempt's log for the browser: server-sent events while it is written (each
//! event's id the byte offset after its chunk, so a reconnecting `EventSource` resumes
//! with `Last-Event-ID`), and the whole log as a text download.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::{Session, UiError};
use crate::domain::auth::Action;
use crate::domain::run::{Run, RunId};
use crate::http::limits::{Caller, HoldGuard};
use crate::http::runs::find_run;
use crate::http::{ApiError, AppState};
use crate::protocol::api::ErrorCodeV1;
use crate::service::audit::AuditAction;
use crate::service::events::{BACKSTOP, RunWatch};

/// The most one event carries.
const CHUNK: usize = 64 * 1024;

/// The run, if the caller may read it and it has (or may yet have) attempt `n`.
async fn attempt_of(
    state: &AppState,
    session: &super::UiSession,
    id: &str,
    n: u32,
) -> Result<(RunId, Run), ApiError> {
    let (id, run) = find_run(
        state,
        &session.principal,
        id,
        Action::Read,
        AuditAction::RunRead,
    )
    .await?;
    let could_come = !run.status.is_final() && n == run.attempt + 1;
    if n == 0 || (n > run.attempt && !could_come) {
        return Err(ApiError::not_found(
            ErrorCodeV1::UnknownAttempt,
            format!("run {id} has no attempt {n}"),
        ));
    }
    Ok((id, run))
}

/// `GET /ui/runs/{id}/attempts/{n}/log`: the log as a text file.
pub async fn download(
    State(state): State<AppState>,
    Session(session): Session,
    Path((id, n)): Path<(String, u32)>,
) -> Result<Response, UiError> {
    let (id, _) = attempt_of(&state, &session, &id, n).await?;
    let runs = state.runs.clone();
    // In pieces, so a large log never sits whole in memory.
    let pieces = futures::stream::unfold(Some(0u64), move |at| {
        let runs = runs.clone();
        async move {
            let at = at?;
            match runs.read_log(id, n, at, CHUNK * 4).await {
                Ok(chunk) if chunk.is_empty() => None,
                Ok(chunk) => {
                    let next = at + chunk.len() as u64;
                    Some((Ok(chunk), Some(next)))
                }
                Err(e) => Some((Err(std::io::Error::other(e.to_string())), None)),
            }
        }
    });
    let mut response = Response::new(Body::from_stream(pieces));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{id}-{n}.log\"")) {
        headers.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(response)
}

#[derive(Deserialize)]
pub struct StreamQuery {
    /// Where a first connection starts; a reconnection's `Last-Event-ID` wins.
    #[serde(default)]
    from: u64,
}

/// Where to resume: `Last-Event-ID` (the offset the last event ended at), else `?from=`.
fn resume_offset(headers: &HeaderMap, from: u64) -> u64 {
    headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(from)
}

/// How much of `chunk` to send now: whole UTF-8 characters only, unless the log is
/// complete (a character cut by the end of the log is then sent as it is, replaced).
fn sendable(chunk: &[u8], complete: bool) -> usize {
    match std::str::from_utf8(chunk) {
        Ok(_) => chunk.len(),
        // An incomplete character at the end: it is finished by the next read.
        Err(e) if e.error_len().is_none() && !complete => e.valid_up_to(),
        Err(_) => chunk.len(),
    }
}

/// `GET /ui/runs/{id}/attempts/{n}/log/stream`: `text/event-stream`. Events: the
/// default one (`data` a JSON string of the text, `id` the offset after it), then `end`
/// (`data` the attempt's status) once the attempt is over and its log sent whole. Counts
/// against the caller's holds like a log follow.
pub async fn stream(
    State(state): State<AppState>,
    Caller(who): Caller,
    Session(session): Session,
    Path((id, n)): Path<(String, u32)>,
    query: Result<Query<StreamQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, UiError> {
    let Query(q) = query?;
    let (id, _) = attempt_of(&state, &session, &id, n).await?;
    let hold = state.limits.holds().take(&who)?;
    let offset = resume_offset(&headers, q.from);
    let watch = state.runs.events().watch(id);
    let follow = Follow {
        state,
        _hold: hold,
        id,
        attempt: n,
        offset,
        watch,
        done: false,
    };
    let stream = futures::stream::unfold(follow, |mut f| async move {
        if f.done {
            return None;
        }
        f.next().await.map(|event| (Ok::<_, Infallible>(event), f))
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

struct Follow {
    state: AppState,
    _hold: HoldGuard,
    id: RunId,
    attempt: u32,
    offset: u64,
    watch: RunWatch,
    done: bool,
}

impl Follow {
    /// The next event, or `None` to end the stream (run gone, server stopping).
    async fn next(&mut self) -> Option<Event> {
        loop {
            // The run before the log: once the attempt is over its log is complete
            // (the worker's log is fsynced before the outcome is stored).
            let run = match self.state.runs.get(self.id).await {
                Ok(Some(run)) => run,
                Ok(None) => return None,
                Err(e) => {
                    self.done = true;
                    return Some(Event::default().event("error").data(e.to_string()));
                }
            };
            let attempt = run
                .attempts
                .iter()
                .find(|a| a.number == self.attempt)
                .map(|a| a.status);
            let complete = match attempt {
                Some(status) => status.is_final(),
                // Never came: the run ended before this attempt was made.
                None => run.status.is_final(),
            };
            if attempt.is_some() {
                match self
                    .state
                    .runs
                    .read_log(self.id, self.attempt, self.offset, CHUNK)
                    .await
                {
                    Ok(chunk) => {
                        let take = sendable(&chunk, complete);
                        if take > 0 {
                            let text = String::from_utf8_lossy(&chunk[..take]);
                            self.offset += take as u64;
                            let data = serde_json::to_string(&text).unwrap_or_default();
                            return Some(Event::default().id(self.offset.to_string()).data(data));
                        }
                    }
                    Err(e) => {
                        self.done = true;
                        return Some(Event::default().event("error").data(e.to_string()));
                    }
                }
            }
            if complete {
                self.done = true;
                let status = attempt.unwrap_or(run.status);
                return Some(Event::default().event("end").data(status.as_str()));
            }
            if !self.wait_for_change().await {
                return None;
            }
        }
    }

    /// Sleep until this run's output or status changes (or the backstop look is due: a
    /// change made by another process on the store). False when stopping.
    async fn wait_for_change(&mut self) -> bool {
        tokio::select! {
            _ = self.state.runs.stopping().cancelled() => false,
            _ = tokio::time::timeout(BACKSTOP, self.watch.changed()) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_character_waits_for_its_rest_unless_the_log_is_complete() {
        let text = "héllo".as_bytes();
        // Cut inside `é` (two bytes from index 1).
        assert_eq!(sendable(&text[..2], false), 1);
        assert_eq!(sendable(&text[..2], true), 2);
        assert_eq!(sendable(text, false), text.len());
        // Bytes that are no UTF-8 at all are sent (replaced), not held forever.
        assert_eq!(sendable(&[b'a', 0xff, b'b'], false), 3);
    }

    #[test]
    fn last_event_id_wins_over_from() {
        let mut h = HeaderMap::new();
        assert_eq!(resume_offset(&h, 7), 7);
        h.insert("last-event-id", HeaderValue::from_static("42"));
        assert_eq!(resume_offset(&h, 7), 42);
        h.insert("last-event-id", HeaderValue::from_static("junk"));
        assert_eq!(resume_offset(&h, 7), 7);
    }
}
