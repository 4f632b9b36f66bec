//! `/ui/runs/{id}`: one run (status, reason in words, attempts with their timings and
//! resources, the log live), and its cancel, retry and "run again".

use askama::Template;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use chrono::Utc;
use serde::Deserialize;

use super::session::{CsrfForm, encode};
use super::view::{self, AttemptView, retryable};
use super::{Nav, Session, UiError, render};
use crate::domain::auth::Action;
use crate::domain::reply::Requester;
use crate::domain::run::Trigger;
use crate::http::auth::{Target, audit_done, authorize};
use crate::http::runs::find_run;
use crate::http::{ApiError, AppState};
use crate::protocol::api::ErrorCodeV1;
use crate::service::audit::AuditAction;

#[derive(Deserialize)]
pub struct PageQuery {
    /// The attempt whose log is shown (the latest when absent).
    attempt: Option<u32>,
    #[serde(default)]
    note: String,
}

#[derive(Template)]
#[template(path = "ui/run.html")]
struct RunPage {
    nav: Option<Nav>,
    csrf: String,
    note: Option<String>,
    id: String,
    job: String,
    status: &'static str,
    is_final: bool,
    cancel_requested: bool,
    cancellable: bool,
    retryable: bool,
    reason: Option<String>,
    exit_code: String,
    trigger: String,
    requested_by: String,
    params: Vec<(String, String)>,
    created: String,
    started: String,
    finished: String,
    attempts: Vec<AttemptView>,
    /// The attempt whose log is on the page (0: none yet).
    shown: u32,
    /// The attempt the log stream follows: the shown one, or the first to come.
    log_attempt: u32,
    truncated: bool,
}

/// `GET /ui/runs/{id}`
pub async fn page(
    State(state): State<AppState>,
    Session(session): Session,
    Path(id): Path<String>,
    query: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Response, UiError> {
    let Query(q) = query?;
    let caller = &session.principal;
    let (_, run) = find_run(&state, caller, &id, Action::Read, AuditAction::RunRead).await?;
    let now = Utc::now();
    let mut previous_end = run.created_at;
    let mut attempts = Vec::with_capacity(run.attempts.len());
    for a in &run.attempts {
        attempts.push(AttemptView::of(a, previous_end, now));
        previous_end = a.finished_at.unwrap_or(a.claimed_at);
    }
    let shown = match q.attempt {
        Some(n) if n >= 1 && n <= run.attempt => n,
        Some(n) => {
            return Err(ApiError::not_found(
                ErrorCodeV1::UnknownAttempt,
                format!("run {id} has no attempt {n}"),
            )
            .into());
        }
        None => run.attempt,
    };
    let dash = || "—".to_owned();
    let page = RunPage {
        nav: Some(Nav::of(&session)),
        csrf: session.csrf.clone(),
        note: (!q.note.is_empty()).then_some(q.note),
        id: run.id.to_string(),
        job: run.job.clone(),
        status: run.status.as_str(),
        is_final: run.status.is_final(),
        cancel_requested: run.cancel_requested,
        cancellable: !run.status.is_final() && caller.may(Action::Cancel, &run.job),
        retryable: retryable(run.status) && caller.may(Action::Run, &run.job),
        reason: view::reason_words(run.reason_code, run.exit_code, run.reason.as_deref()),
        exit_code: run.exit_code.map_or_else(dash, |c| c.to_string()),
        trigger: view::trigger(&run.trigger),
        requested_by: run.requested_by.clone().unwrap_or_else(dash),
        params: run.params.clone().into_iter().collect(),
        created: view::time(run.created_at),
        started: run.started_at.map_or_else(dash, view::time),
        finished: run.finished_at.map_or_else(dash, view::time),
        attempts,
        shown,
        log_attempt: shown.max(1),
        truncated: run.logs_truncated(),
    };
    Ok(render(&page))
}

fn back_to(id: &str, note: &str) -> Response {
    Redirect::to(&format!("/ui/runs/{id}?note={}", encode(note))).into_response()
}

/// `POST /ui/runs/{id}/cancel`
pub async fn cancel(
    State(state): State<AppState>,
    Path(id): Path<String>,
    form: CsrfForm,
) -> Result<Response, UiError> {
    let caller = &form.session.principal;
    let what = AuditAction::RunCancel;
    let (run_id, run) = find_run(&state, caller, &id, Action::Cancel, what).await?;
    let after = state.runs.cancel(run_id).await?;
    audit_done(caller, what, Target::run(&run.job, run_id), Some("web UI"));
    let note = if after.status.is_final() {
        "Cancelled."
    } else {
        "Cancel requested: the worker is stopping the container."
    };
    Ok(back_to(&id, note))
}

/// `POST /ui/runs/{id}/retry`: a new attempt of a failed, timed-out or lost run.
pub async fn retry(
    State(state): State<AppState>,
    Path(id): Path<String>,
    form: CsrfForm,
) -> Result<Response, UiError> {
    let caller = &form.session.principal;
    let what = AuditAction::RunRetry;
    let (run_id, run) = find_run(&state, caller, &id, Action::Run, what).await?;
    state.runs.retry(run_id).await?;
    audit_done(caller, what, Target::run(&run.job, run_id), Some("web UI"));
    Ok(back_to(&id, "A new attempt is queued."))
}

/// `POST /ui/runs/{id}/again`: a new run of the same job with the same params.
pub async fn again(
    State(state): State<AppState>,
    Path(id): Path<String>,
    form: CsrfForm,
) -> Result<Response, UiError> {
    let caller = &form.session.principal;
    let what = AuditAction::RunStart;
    let (run_id, run) = find_run(&state, caller, &id, Action::Read, AuditAction::RunRead).await?;
    authorize(
        caller,
        Action::Run,
        what,
        Target::run(&run.job, run_id),
        || ApiError::not_found(ErrorCodeV1::UnknownRun, format!("no run {run_id}")),
    )?;
    let requester = Requester {
        requested_by: state.auth.requested_by(caller),
        ..Requester::default()
    };
    let accepted = state
        .runs
        .accept_with(&run.job, run.params, None, Trigger::Api, None, requester)
        .await?;
    let new = accepted.into_run();
    let detail = format!("web UI: again as run {run_id}");
    audit_done(caller, what, Target::run(&run.job, new.id), Some(&detail));
    Ok(back_to(
        &new.id.to_string(),
        &format!("Started again with the params of run {run_id}."),
    ))
}
