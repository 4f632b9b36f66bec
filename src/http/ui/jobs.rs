//! `/ui/jobs`: the jobs the caller may read with their last result and success rate;
//! one job's definition, schedules (next fire times, recent slots) and its "Run" form,
//! built from the job's declared params and checked again by `Runs::accept_with`.

use std::collections::BTreeMap;

use askama::Template;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Redirect, Response};

use super::session::{CsrfForm, encode};
use super::view;
use super::{Nav, Session, UiError, UiSession, render};
use crate::domain::auth::{Action, JobFilter};
use crate::domain::job::JobSpec;
use crate::domain::ports::{RunFilter, SlotOutcome};
use crate::domain::reply::Requester;
use crate::domain::run::{Run, RunStatus, Trigger};
use crate::domain::schedule::Rule;
use crate::http::auth::{Target, audit_done, authorize};
use crate::http::{ApiError, AppState};
use crate::protocol::api::ErrorCodeV1;
use crate::service::audit::AuditAction;
use crate::service::scheduler::ScheduleError;

/// The runs a job's success rate is taken over.
const WINDOW: u32 = 50;
const NEXT_FIRE_TIMES: usize = 5;
const RECENT_SLOTS: u32 = 10;

pub struct LastRun {
    pub id: String,
    pub status: &'static str,
    pub when: String,
}

/// A job's recent record: its newest finished run and its success rate.
struct Record {
    last: Option<LastRun>,
    success: String,
}

async fn record(state: &AppState, job: &str) -> Result<Record, ApiError> {
    let filter = RunFilter {
        job: Some(job.to_owned()),
        jobs: JobFilter::All,
        limit: WINDOW,
        ..RunFilter::default()
    };
    let runs = state.runs.list(&filter).await?;
    let finished: Vec<&Run> = runs.iter().filter(|r| r.status.is_final()).collect();
    let succeeded = finished
        .iter()
        .filter(|r| r.status == RunStatus::Succeeded)
        .count();
    let success = if finished.is_empty() {
        "—".to_owned()
    } else {
        format!(
            "{:.0}% ({succeeded} of {})",
            100.0 * succeeded as f64 / finished.len() as f64,
            finished.len()
        )
    };
    let last = finished.first().map(|r| LastRun {
        id: r.id.to_string(),
        status: r.status.as_str(),
        when: view::time(r.finished_at.unwrap_or(r.created_at)),
    });
    Ok(Record { last, success })
}

pub struct JobRow {
    name: String,
    description: String,
    image: String,
    schedules: String,
    last: Option<LastRun>,
    success: String,
}

#[derive(Template)]
#[template(path = "ui/jobs.html")]
struct JobsPage {
    nav: Option<Nav>,
    jobs: Vec<JobRow>,
    window: u32,
}

/// `GET /ui/jobs`
pub async fn list(
    State(state): State<AppState>,
    Session(session): Session,
) -> Result<Response, UiError> {
    let mut specs = state.runs.jobs();
    specs.retain(|j| session.principal.may(Action::Read, j.name.as_str()));
    specs.sort_by(|a, b| a.name.as_str().cmp(b.name.as_str()));
    let mut jobs = Vec::with_capacity(specs.len());
    for spec in specs {
        let Record { last, success } = record(&state, spec.name.as_str()).await?;
        jobs.push(JobRow {
            name: spec.name.as_str().to_owned(),
            description: spec.description.clone().unwrap_or_default(),
            image: spec.image.clone(),
            schedules: spec
                .schedules
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            last,
            success,
        });
    }
    Ok(render(&JobsPage {
        nav: Some(Nav::of(&session)),
        jobs,
        window: WINDOW,
    }))
}

/// One input of the Run form.
pub struct ParamInput {
    name: String,
    value: String,
    required: bool,
    /// As the job file wrote it; the page script turns it into the input's `pattern`.
    pattern: Option<String>,
    max_length: usize,
    description: Option<String>,
}

pub struct SlotLine {
    when: String,
    run: Option<String>,
    skip: &'static str,
}

pub struct ScheduleBox {
    name: String,
    rule: String,
    zone: String,
    paused: bool,
    overlap: &'static str,
    catch_up: &'static str,
    next: Vec<String>,
    recent: Vec<SlotLine>,
}

#[derive(Template)]
#[template(path = "ui/job.html")]
struct JobPage {
    nav: Option<Nav>,
    csrf: String,
    who: String,
    name: String,
    description: Option<String>,
    last: Option<LastRun>,
    success: String,
    window: u32,
    may_run: bool,
    error: Option<String>,
    params: Vec<ParamInput>,
    image: String,
    pull: &'static str,
    command: String,
    network: String,
    timeout: String,
    resources: String,
    container: String,
    max_concurrent: String,
    retry: String,
    schedules: Vec<ScheduleBox>,
}

/// The pattern as written: the catalog keeps it anchored as `^(?:pattern)$`.
fn written_pattern(anchored: &str) -> &str {
    anchored
        .strip_prefix("^(?:")
        .and_then(|p| p.strip_suffix(")$"))
        .unwrap_or(anchored)
}

fn unknown_job(job: &str) -> ApiError {
    ApiError::not_found(ErrorCodeV1::UnknownJob, format!("no job named `{job}`"))
}

/// The job, if the caller may read it (else the unknown job's 404).
fn readable(
    state: &AppState,
    session: &UiSession,
    job: &str,
) -> Result<std::sync::Arc<JobSpec>, ApiError> {
    let spec = state.runs.job(job).ok_or_else(|| unknown_job(job))?;
    authorize(
        &session.principal,
        Action::Read,
        AuditAction::JobRead,
        Target::job(job),
        || unknown_job(job),
    )?;
    Ok(spec)
}

async fn schedules(state: &AppState, spec: &JobSpec) -> Result<Vec<ScheduleBox>, ApiError> {
    let job = spec.name.as_str();
    let states = match state.scheduler.states(job, NEXT_FIRE_TIMES).await {
        Ok(s) => s,
        Err(ScheduleError::NoSchedules(_)) => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let slots = state.scheduler.slots(job, None, RECENT_SLOTS * 4).await?;
    Ok(states
        .into_iter()
        .map(|st| {
            let s = &st.schedule;
            let rule = match &s.rule {
                Rule::Cron(c) => c.expression.clone(),
                Rule::OpenDaysOfMonth { days, at } => {
                    format!("open days {days:?} of the month at {}", at.format("%H:%M"))
                }
            };
            let recent = slots
                .iter()
                .filter(|r| r.key.schedule == s.name)
                .take(RECENT_SLOTS as usize)
                .map(|r| {
                    let (run, skip) = match &r.outcome {
                        SlotOutcome::Fired(id) => (Some(id.to_string()), ""),
                        SlotOutcome::Skipped(why) => (None, why.as_str()),
                    };
                    SlotLine {
                        when: view::time(r.fire_at),
                        run,
                        skip,
                    }
                })
                .collect();
            ScheduleBox {
                name: s.name.clone(),
                rule,
                zone: s.time_zone.name().to_owned(),
                paused: st.paused(),
                overlap: s.overlap.as_str(),
                catch_up: s.catch_up.as_str(),
                next: st
                    .next
                    .iter()
                    .map(|slot| {
                        let local = slot.fire_at.with_timezone(&s.time_zone);
                        format!(
                            "{} UTC ({}){}",
                            view::time(slot.fire_at),
                            local.format("%Y-%m-%d %H:%M %Z"),
                            if slot.skip.is_some() {
                                " · will not fire"
                            } else {
                                ""
                            }
                        )
                    })
                    .collect(),
                recent,
            }
        })
        .collect())
}

async fn job_page(
    state: &AppState,
    session: &UiSession,
    spec: &JobSpec,
    values: &BTreeMap<String, String>,
    error: Option<String>,
) -> Result<JobPage, ApiError> {
    let job = spec.name.as_str();
    let Record { last, success } = record(state, job).await?;
    let params = spec
        .params
        .iter()
        .map(|(name, p)| ParamInput {
            name: name.clone(),
            value: values
                .get(name)
                .cloned()
                .or_else(|| p.default.clone())
                .unwrap_or_default(),
            required: p.required,
            pattern: p
                .pattern
                .as_ref()
                .map(|r| written_pattern(r.as_str()).to_owned()),
            max_length: p.max_length,
            description: p.description.clone(),
        })
        .collect();
    let r = &spec.resources;
    let mut resources = Vec::new();
    if let Some(cpu) = r.cpu_limit {
        resources.push(format!("{cpu} CPUs"));
    } else if let Some(cpu) = r.cpu {
        resources.push(format!("{cpu} CPUs"));
    }
    if let Some(m) = r.memory_bytes {
        resources.push(format!("{} memory", view::bytes(m)));
    }
    let h = &spec.hardening;
    let caps: Vec<&str> = h.capabilities.iter().map(|c| c.as_str()).collect();
    let container = format!(
        "capabilities: {} · pids limit {} · {} root · {} mount(s)",
        if caps.is_empty() {
            "none".to_owned()
        } else {
            caps.join(", ")
        },
        h.pids_limit
            .map_or_else(|| "default".to_owned(), |p| p.to_string()),
        if h.read_only { "read-only" } else { "writable" },
        h.mounts.len()
    );
    let retry = &spec.retry;
    Ok(JobPage {
        nav: Some(Nav::of(session)),
        csrf: session.csrf.clone(),
        who: session.principal.name().to_owned(),
        name: job.to_owned(),
        description: spec.description.clone(),
        last,
        success,
        window: WINDOW,
        may_run: session.principal.may(Action::Run, job),
        error,
        params,
        image: spec.image.clone(),
        pull: spec.pull.as_str(),
        command: spec.command.join(" "),
        network: spec.network.clone(),
        timeout: spec.timeout.map_or_else(
            || "none".to_owned(),
            |t| humantime::format_duration(t).to_string(),
        ),
        resources: if resources.is_empty() {
            "defaults".to_owned()
        } else {
            resources.join(" · ")
        },
        container,
        max_concurrent: spec
            .max_concurrent
            .map_or_else(|| "unlimited".to_owned(), |n| n.to_string()),
        retry: if retry.max_attempts <= 1 {
            "none".to_owned()
        } else {
            format!(
                "up to {} attempts, backoff {}",
                retry.max_attempts,
                humantime::format_duration(retry.backoff)
            )
        },
        schedules: schedules(state, spec).await?,
    })
}

/// `GET /ui/jobs/{job}`
pub async fn page(
    State(state): State<AppState>,
    Session(session): Session,
    Path(job): Path<String>,
) -> Result<Response, UiError> {
    let spec = readable(&state, &session, &job)?;
    let page = job_page(&state, &session, &spec, &BTreeMap::new(), None).await?;
    Ok(render(&page))
}

/// `POST /ui/jobs/{job}/runs`: the Run form. Refused params come back on the form with
/// the server's own message, the values kept.
pub async fn start(
    State(state): State<AppState>,
    Path(job): Path<String>,
    form: CsrfForm,
) -> Result<Response, UiError> {
    let session = &form.session;
    let spec = readable(&state, session, &job)?;
    authorize(
        &session.principal,
        Action::Run,
        AuditAction::RunStart,
        Target::job(&job),
        || unknown_job(&job),
    )?;
    let params: BTreeMap<String, String> = form
        .fields
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("param.")
                .map(|name| (name.to_owned(), v.clone()))
        })
        // An empty optional field means "the default", as if it were not sent.
        .filter(|(name, v)| !v.is_empty() || spec.params.get(name).is_some_and(|p| p.required))
        .collect();
    let requester = Requester {
        requested_by: state.auth.requested_by(&session.principal),
        ..Requester::default()
    };
    match state
        .runs
        .accept_with(&job, params.clone(), None, Trigger::Api, None, requester)
        .await
    {
        Ok(accepted) => {
            let run = accepted.into_run();
            audit_done(
                &session.principal,
                AuditAction::RunStart,
                Target::run(&job, run.id),
                Some("web UI"),
            );
            let note = encode("Started from the Run form.");
            Ok(Redirect::to(&format!("/ui/runs/{}?note={note}", run.id)).into_response())
        }
        Err(e) => {
            let error = ApiError::from(e);
            if error.status.is_server_error() {
                return Err(error.into());
            }
            let message = match error.details.is_empty() {
                true => error.message,
                false => error
                    .details
                    .iter()
                    .map(|d| d.message.clone())
                    .collect::<Vec<_>>()
                    .join("; "),
            };
            // 200: the answer is the form again, with the server's message on it (a 4xx
            // page load is logged as an error in the browser's console).
            let page = job_page(&state, session, &spec, &params, Some(message)).await?;
            Ok(render(&page))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::written_pattern;

    #[test]
    fn the_anchoring_added_at_load_is_taken_off() {
        assert_eq!(written_pattern("^(?:[0-9]+)$"), "[0-9]+");
        assert_eq!(written_pattern("[a-z]"), "[a-z]");
    }
}
