use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Extension, Path, State};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::{Target, authorize, require_admin};
use super::{ApiError, AppState};
use crate::domain::auth::{Action, Principal};
use crate::domain::job::JobSpec;
use crate::domain::schedule::{Rule, ScheduleSpec};
use crate::protocol::api::{ErrorBodyV1, ErrorCodeV1, ReloadSummaryV1};
use crate::protocol::schedules::PlannedSlotV1;
use crate::service::audit::{self, AuditAction, AuditEvent, AuditOutcome};
use crate::service::scheduler::ScheduleError;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_jobs))
        // A job may be named `reload`: GET still shows it.
        .routes(routes!(reload, get_job_named_reload))
        .routes(routes!(get_job))
}

#[derive(Serialize, ToSchema)]
struct ParamView {
    required: bool,
    default: Option<String>,
    pattern: Option<String>,
    max_length: usize,
    description: Option<String>,
}

#[derive(Serialize, ToSchema)]
struct ResourcesView {
    cpu: Option<u32>,
    cpu_limit: Option<f64>,
    memory_bytes: Option<u64>,
}

/// The hardening a job's containers run with (what is not listed is dropped or off).
#[derive(Serialize, ToSchema)]
struct ContainerView {
    capabilities: Vec<&'static str>,
    pids_limit: Option<u32>,
    read_only: bool,
    mounts: Vec<MountView>,
}

#[derive(Serialize, ToSchema)]
struct MountView {
    source: String,
    target: String,
    read_only: bool,
}

#[derive(Serialize, ToSchema)]
struct JobView {
    name: String,
    description: Option<String>,
    image: String,
    command: Vec<String>,
    pull: &'static str,
    network: String,
    timeout: Option<String>,
    /// `durable` (the engine keeps a copy a restarted worker catches up from) or
    /// `fast` (attach only; output written while no worker is attached is lost, and
    /// the attempt says so).
    logs: &'static str,
    resources: ResourcesView,
    container: ContainerView,
    params: BTreeMap<String, ParamView>,
    schedules: Vec<ScheduleView>,
    max_concurrent: Option<u32>,
}

#[derive(Serialize, ToSchema)]
struct ScheduleView {
    name: String,
    /// Set for a cron rule ...
    cron: Option<String>,
    /// ... or these two for an open-days-of-month rule.
    open_days_of_month: Option<Vec<i32>>,
    at: Option<String>,
    time_zone: String,
    calendar: Option<String>,
    params: BTreeMap<String, String>,
    on_closed_day: &'static str,
    max_shift_days: u32,
    on_gap: &'static str,
    on_fold: &'static str,
    overlap: &'static str,
    catch_up: &'static str,
    catch_up_window: String,
    max_catch_up: u32,
    suspended: bool,
    /// `GET /v1/jobs/{job}` only: paused at run time or by `suspended`.
    #[serde(skip_serializing_if = "Option::is_none")]
    paused: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pause_note: Option<String>,
    /// `GET /v1/jobs/{job}` only: the next fire times, in the zone and in UTC, marking
    /// those a DST change or a closed day moved.
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<Vec<PlannedSlotV1>>,
}

impl From<&ScheduleSpec> for ScheduleView {
    fn from(s: &ScheduleSpec) -> Self {
        let (cron, open_days_of_month, at) = match &s.rule {
            Rule::Cron(c) => (Some(c.expression.clone()), None, None),
            Rule::OpenDaysOfMonth { days, at } => (
                None,
                Some(days.clone()),
                Some(at.format("%H:%M:%S").to_string()),
            ),
        };
        Self {
            name: s.name.clone(),
            cron,
            open_days_of_month,
            at,
            time_zone: s.time_zone.name().to_owned(),
            calendar: s.calendar.as_ref().map(|c| c.name.clone()),
            params: s.params.clone(),
            on_closed_day: s.on_closed_day.as_str(),
            max_shift_days: s.max_shift_days,
            on_gap: s.on_gap.as_str(),
            on_fold: s.on_fold.as_str(),
            overlap: s.overlap.as_str(),
            catch_up: s.catch_up.as_str(),
            catch_up_window: humantime::format_duration(s.catch_up_window).to_string(),
            max_catch_up: s.max_catch_up,
            suspended: s.suspended,
            paused: None,
            pause_note: None,
            next: None,
        }
    }
}

impl From<&JobSpec> for JobView {
    fn from(j: &JobSpec) -> Self {
        Self {
            name: j.name.as_str().to_owned(),
            description: j.description.clone(),
            image: j.image.clone(),
            command: j.command.clone(),
            pull: j.pull.as_str(),
            network: j.network.clone(),
            timeout: j.timeout.map(|t| humantime::format_duration(t).to_string()),
            logs: j.logs.as_str(),
            resources: ResourcesView {
                cpu: j.resources.cpu,
                cpu_limit: j.resources.cpu_limit,
                memory_bytes: j.resources.memory_bytes,
            },
            container: ContainerView {
                capabilities: j
                    .hardening
                    .capabilities
                    .iter()
                    .map(|c| c.as_str())
                    .collect(),
                pids_limit: j.hardening.pids_limit,
                read_only: j.hardening.read_only,
                mounts: j
                    .hardening
                    .mounts
                    .iter()
                    .map(|m| MountView {
                        source: m.source.clone(),
                        target: m.target.clone(),
                        read_only: m.read_only,
                    })
                    .collect(),
            },
            params: j
                .params
                .iter()
                .map(|(name, p)| {
                    (
                        name.clone(),
                        ParamView {
                            required: p.required,
                            default: p.default.clone(),
                            pattern: p.pattern.as_ref().map(|r| r.as_str().to_owned()),
                            max_length: p.max_length,
                            description: p.description.clone(),
                        },
                    )
                })
                .collect(),
            schedules: j.schedules.iter().map(ScheduleView::from).collect(),
            max_concurrent: j.max_concurrent,
        }
    }
}

#[derive(Serialize, ToSchema)]
struct JobList {
    jobs: Vec<JobView>,
}

/// `GET /v1/jobs`: the jobs the caller may read.
#[utoipa::path(
    get,
    path = "/v1/jobs",
    tag = "jobs",
    operation_id = "list_jobs",
    responses((status = 200, description = "The jobs the token may read", body = JobList)),
)]
async fn list_jobs(
    State(state): State<AppState>,
    Extension(caller): Extension<Principal>,
) -> Json<JobList> {
    Json(JobList {
        jobs: state
            .runs
            .jobs()
            .iter()
            .filter(|j| caller.may(Action::Read, j.name.as_str()))
            .map(|j| JobView::from(j.as_ref()))
            .collect(),
    })
}

#[utoipa::path(
    get,
    path = "/v1/jobs/{job}",
    tag = "jobs",
    operation_id = "get_job",
    params(("job" = String, Path, description = "The job's name")),
    responses(
        (status = 200, description = "The job, with its schedules' state and next fire times", body = JobView),
        (status = 404, description = "No such job, or one the token may not read (`unknown_job`)", body = ErrorBodyV1),
    ),
)]
async fn get_job(
    State(state): State<AppState>,
    Extension(caller): Extension<Principal>,
    Path(job): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    let unknown = || ApiError::not_found(ErrorCodeV1::UnknownJob, format!("no job named `{job}`"));
    let spec = state.runs.job(&job).ok_or_else(unknown)?;
    authorize(
        &caller,
        Action::Read,
        AuditAction::JobRead,
        Target::job(&job),
        unknown,
    )?;
    let mut view = JobView::from(spec.as_ref());
    let states = state
        .scheduler
        .states(&job, NEXT_FIRE_TIMES)
        .await
        .or_else(|e| match e {
            // A job without schedules has no states to add.
            ScheduleError::NoSchedules(_) => Ok(Vec::new()),
            other => Err(other),
        })?;
    for (schedule, st) in view.schedules.iter_mut().zip(&states) {
        schedule.paused = Some(st.paused());
        schedule.pause_note = st.pause.as_ref().and_then(|p| p.note.clone());
        schedule.next = Some(
            st.next
                .iter()
                .map(|slot| PlannedSlotV1::new(&st.schedule, slot))
                .collect(),
        );
    }
    Ok(Json(view))
}

/// `GET /v1/jobs/reload`: the job named `reload`, as `GET /v1/jobs/{job}` shows it
/// (the name is taken by `POST /v1/jobs/reload`, but a job may still have it).
#[utoipa::path(
    get,
    path = "/v1/jobs/reload",
    tag = "jobs",
    operation_id = "get_job_named_reload",
    responses(
        (status = 200, description = "The job named `reload`", body = JobView),
        (status = 404, description = "No job named `reload`, or the token may not read it (`unknown_job`)", body = ErrorBodyV1),
    ),
)]
async fn get_job_named_reload(
    state: State<AppState>,
    caller: Extension<Principal>,
) -> Result<Json<JobView>, ApiError> {
    get_job(state, caller, Path("reload".to_owned())).await
}

/// Next fire times shown per schedule by `GET /v1/jobs/{job}`.
const NEXT_FIRE_TIMES: usize = 5;

/// `POST /v1/jobs/reload`: read the job and calendar files again. 200 with what changed,
/// or 422 `invalid_job_files` with every problem (the running jobs stay).
#[utoipa::path(
    post,
    path = "/v1/jobs/reload",
    tag = "jobs",
    operation_id = "reload_jobs",
    responses(
        (status = 200, description = "The files were read; what changed", body = ReloadSummaryV1),
        (status = 403, description = "The token has no `admin` scope (`forbidden`)", body = ErrorBodyV1),
        (status = 422, description = "The files have errors, each in `details`; the running jobs stay (`invalid_job_files`)", body = ErrorBodyV1),
    ),
)]
async fn reload(
    State(state): State<AppState>,
    Extension(caller): Extension<Principal>,
) -> Result<Json<ReloadSummaryV1>, ApiError> {
    require_admin(&caller, AuditAction::JobsReload)?;
    let reloader = state.reload.clone();
    let result = tokio::task::spawn_blocking(move || reloader.reload())
        .await
        .map_err(ApiError::internal)?;
    match result {
        Ok(s) => {
            tracing::info!(
                message = "jobs reloaded",
                generation = s.generation,
                added = ?s.added,
                changed = ?s.changed,
                removed = ?s.removed
            );
            let detail = format!(
                "generation {}: {} added, {} changed, {} removed",
                s.generation,
                s.added.len(),
                s.changed.len(),
                s.removed.len()
            );
            audit::record(&AuditEvent {
                detail: Some(&detail),
                ..AuditEvent::new(caller.name(), AuditAction::JobsReload, AuditOutcome::Done)
            });
            Ok(Json(ReloadSummaryV1 {
                generation: s.generation,
                jobs: s.jobs,
                calendars: s.calendars,
                added: s.added,
                changed: s.changed,
                removed: s.removed,
            }))
        }
        Err(errors) => {
            tracing::warn!(message = "reload refused: invalid job files", errors = %errors);
            let outcome = AuditOutcome::Refused {
                status: 422,
                reason: "invalid job files",
            };
            audit::record(&AuditEvent::new(
                caller.name(),
                AuditAction::JobsReload,
                outcome,
            ));
            Err(errors.into())
        }
    }
}
