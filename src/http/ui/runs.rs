//! `/ui/runs`: the runs the caller may read, newest first, filtered by what the URL
//! says (job, status, trigger, creation dates); bulk cancel and retry.

use askama::Template;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use chrono::{NaiveDate, Utc};
use serde::Deserialize;

use super::session::{CsrfForm, encode};
use super::view::{RunRow, retryable};
use super::{Nav, Session, UiError, render};
use crate::domain::auth::Action;
use crate::domain::ports::RunFilter;
use crate::domain::run::{RunId, RunStatus};
use crate::http::auth::{Target, audit_done, authorize};
use crate::http::{ApiError, AppState};
use crate::protocol::api::ErrorCodeV1;
use crate::service::audit::AuditAction;

/// Rows one page shows.
const PAGE_ROWS: u32 = 200;
/// Runs one bulk action takes.
const MAX_BULK: usize = 200;

/// The list's filters, as the URL carries them (empty means "any").
#[derive(Deserialize, Default)]
pub struct ListQuery {
    #[serde(default)]
    job: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    trigger: String,
    /// First day (UTC) of the creation range, `YYYY-MM-DD` ...
    #[serde(default)]
    from: String,
    /// ... and its last day, included.
    #[serde(default)]
    to: String,
    /// What the last bulk action did.
    #[serde(default)]
    note: String,
}

pub struct Opt {
    pub value: String,
    pub label: String,
    pub selected: bool,
}

#[derive(Template)]
#[template(path = "ui/runs.html")]
struct RunsPage {
    nav: Option<Nav>,
    csrf: String,
    jobs: Vec<Opt>,
    statuses: Vec<Opt>,
    triggers: Vec<Opt>,
    from: String,
    to: String,
    note: Option<String>,
    /// The filters as a query string, for the bulk form's way back.
    query: String,
    rows: Vec<RunRow>,
    /// Something in the list is queued or running: the script refreshes it.
    active: bool,
}

const TRIGGERS: [&str; 3] = ["api", "schedule", "webhook"];

fn day(field: &str, text: &str) -> Result<Option<NaiveDate>, ApiError> {
    if text.is_empty() {
        return Ok(None);
    }
    NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .map(Some)
        .map_err(|_| ApiError::bad_request(format!("`{field}` must be a date, YYYY-MM-DD")))
}

/// The store filter a query asks for, limited to what `caller` may read.
fn filter_of(q: &ListQuery, session: &super::UiSession) -> Result<RunFilter, ApiError> {
    let status = (!q.status.is_empty())
        .then(|| q.status.parse::<RunStatus>())
        .transpose()
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let trigger = match q.trigger.as_str() {
        "" => None,
        t => Some(TRIGGERS.into_iter().find(|k| *k == t).ok_or_else(|| {
            ApiError::bad_request(format!("unknown trigger `{t}` (api, schedule or webhook)"))
        })?),
    };
    let start = |d: NaiveDate| d.and_hms_opt(0, 0, 0).map(|t| t.and_utc());
    let created_from = day("from", &q.from)?.and_then(start);
    let created_before = day("to", &q.to)?.and_then(|d| d.succ_opt()).and_then(start);
    Ok(RunFilter {
        job: (!q.job.is_empty()).then(|| q.job.clone()),
        status,
        jobs: session.principal.jobs_for(Action::Read),
        limit: PAGE_ROWS,
        trigger,
        created_from,
        created_before,
    })
}

/// The filters back as a query string (without the note).
fn query_of(q: &ListQuery) -> String {
    [
        ("job", &q.job),
        ("status", &q.status),
        ("trigger", &q.trigger),
        ("from", &q.from),
        ("to", &q.to),
    ]
    .into_iter()
    .filter(|(_, v)| !v.is_empty())
    .map(|(k, v)| format!("{k}={}", encode(v)))
    .collect::<Vec<_>>()
    .join("&")
}

fn options<'a>(values: impl IntoIterator<Item = &'a str>, current: &str) -> Vec<Opt> {
    values
        .into_iter()
        .map(|v| Opt {
            value: v.to_owned(),
            label: v.to_owned(),
            selected: v == current,
        })
        .collect()
}

/// `GET /ui/runs`
pub async fn list(
    State(state): State<AppState>,
    Session(session): Session,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Response, UiError> {
    let Query(q) = query?;
    let filter = filter_of(&q, &session)?;
    let runs = state.runs.list(&filter).await?;
    let now = Utc::now();
    let mut job_names: Vec<String> = state
        .runs
        .jobs()
        .iter()
        .map(|j| j.name.as_str().to_owned())
        .filter(|name| session.principal.may(Action::Read, name))
        .collect();
    job_names.sort();
    let page = RunsPage {
        nav: Some(Nav::of(&session)),
        csrf: session.csrf.clone(),
        jobs: options(job_names.iter().map(String::as_str), &q.job),
        statuses: options(RunStatus::ALL.iter().map(|s| s.as_str()), &q.status),
        triggers: options(TRIGGERS, &q.trigger),
        from: q.from.clone(),
        to: q.to.clone(),
        note: (!q.note.is_empty()).then(|| q.note.clone()),
        query: query_of(&q),
        active: runs.iter().any(|r| !r.status.is_final()),
        rows: runs.iter().map(|r| RunRow::of(r, now)).collect(),
    };
    Ok(render(&page))
}

/// `POST /ui/runs/bulk`: `action=cancel|retry` on every `id` checked. Each run goes
/// through the same checks as one alone; the page then says what happened to each.
pub async fn bulk(State(state): State<AppState>, form: CsrfForm) -> Result<Response, UiError> {
    let caller = &form.session.principal;
    let action = form.get("action").unwrap_or("");
    let ids: Vec<&str> = form
        .fields
        .iter()
        .filter(|(k, _)| k == "id")
        .map(|(_, v)| v.as_str())
        .take(MAX_BULK)
        .collect();
    let (needs, what) = match action {
        "cancel" => (Action::Cancel, AuditAction::RunCancel),
        "retry" => (Action::Run, AuditAction::RunRetry),
        other => {
            return Err(ApiError::bad_request(format!("unknown bulk action `{other}`")).into());
        }
    };
    let mut done = 0usize;
    let mut refused: Vec<String> = Vec::new();
    for raw in &ids {
        let outcome: Result<(), ApiError> = async {
            let unknown = || ApiError::not_found(ErrorCodeV1::UnknownRun, format!("no run {raw}"));
            let id: RunId = raw.parse().map_err(|_| unknown())?;
            let run = state.runs.get(id).await?.ok_or_else(unknown)?;
            authorize(caller, needs, what, Target::run(&run.job, id), unknown)?;
            if action == "cancel" {
                state.runs.cancel(id).await?;
            } else if retryable(run.status) {
                state.runs.retry(id).await?;
            } else {
                return Err(ApiError::bad_request(format!(
                    "run {id} is {}: not retryable",
                    run.status
                )));
            }
            audit_done(
                caller,
                what,
                Target::run(&run.job, id),
                Some("web UI, bulk"),
            );
            Ok(())
        }
        .await;
        match outcome {
            Ok(()) => done += 1,
            Err(e) => refused.push(e.message),
        }
    }
    let verb = if action == "cancel" {
        "cancelled"
    } else {
        "retried"
    };
    let mut note = format!("{done} run(s) {verb}");
    if !refused.is_empty() {
        note.push_str(&format!(
            "; {} refused: {}",
            refused.len(),
            refused.join("; ")
        ));
    }
    let back = form.get("back").unwrap_or("");
    let sep = if back.is_empty() { "" } else { "&" };
    // `back` is only ever a query string appended to our own path.
    let back: String = back
        .chars()
        .filter(|c| !matches!(c, '#' | '\r' | '\n'))
        .collect();
    let target = format!("/ui/runs?{back}{sep}note={}", encode(&note));
    Ok(Redirect::to(&target).into_response())
}
