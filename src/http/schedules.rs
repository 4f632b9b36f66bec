//! Schedules at run time: slots, state and next fire times, pause, resume, backfill.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, Path, Query, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::{Target, audit_done, authorize};
use super::body::{json_object, optional_json_object};
use super::{ApiError, AppState};
use crate::domain::auth::{Action, Principal};
use crate::protocol::api::{ErrorBodyV1, ErrorCodeV1};
use crate::protocol::schedules::{
    BackfillRequestV1, BackfillV1, BackfilledSlotV1, PauseRequestV1, PlannedSlotV1,
    ScheduleStateV1, SchedulesV1, SlotV1, SlotsV1, catch_up_text, overlap_text, rule_text,
};
use crate::service::audit::AuditAction;
use crate::service::scheduler::{ScheduleError, ScheduleState};

/// Next fire times shown per schedule unless `?next=` says otherwise.
const DEFAULT_NEXT: usize = 5;
const MAX_NEXT: usize = 100;
const MAX_SLOTS: u32 = 1000;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_slots))
        .routes(routes!(list_schedules))
        .routes(routes!(pause))
        .routes(routes!(resume))
        .routes(routes!(backfill))
}

impl From<ScheduleError> for ApiError {
    fn from(e: ScheduleError) -> Self {
        match e {
            ScheduleError::UnknownJob(_) => {
                ApiError::not_found(ErrorCodeV1::UnknownJob, e.to_string())
            }
            ScheduleError::UnknownSchedule { .. } | ScheduleError::NoSchedules(_) => {
                ApiError::not_found(ErrorCodeV1::UnknownSchedule, e.to_string())
            }
            ScheduleError::BadRange(_) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                ErrorCodeV1::BadRequest,
                e.to_string(),
            ),
            ScheduleError::Accept(a) => a.into(),
            ScheduleError::Store(s) => s.into(),
        }
    }
}

/// Go on if the caller may `action` the job: reading its schedules needs `read`,
/// steering them `admin`. A job it may not read answers as an unknown one.
fn allowed(
    state: &AppState,
    caller: &Principal,
    job: &str,
    schedule: Option<&str>,
    action: Action,
    what: AuditAction,
) -> Result<(), ApiError> {
    let unknown = || ApiError::from(ScheduleError::UnknownJob(job.to_owned()));
    if state.runs.job(job).is_none() {
        return Err(unknown());
    }
    let target = match schedule {
        Some(name) => Target::schedule(job, name),
        None => Target::job(job),
    };
    authorize(caller, action, what, target, unknown)
}

pub(super) fn state_view(s: &ScheduleState) -> ScheduleStateV1 {
    let zone = s.schedule.time_zone;
    ScheduleStateV1 {
        name: s.schedule.name.clone(),
        rule: rule_text(&s.schedule),
        time_zone: zone.name().to_owned(),
        calendar: s.schedule.calendar.as_ref().map(|c| c.name.clone()),
        overlap: overlap_text(s.schedule.overlap).to_owned(),
        catch_up: catch_up_text(s.schedule.catch_up).to_owned(),
        paused: s.paused(),
        suspended: s.schedule.suspended,
        pause_note: s.pause.as_ref().and_then(|p| p.note.clone()),
        paused_at: s
            .pause
            .as_ref()
            .map(|p| p.at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
        next: s
            .next
            .iter()
            .map(|slot| PlannedSlotV1::new(&s.schedule, slot))
            .collect(),
    }
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct SlotsQuery {
    /// Only this schedule's slots.
    schedule: Option<String>,
    /// At most this many recorded slots, newest first (100 when absent; 0 counts as 1,
    /// over 1000 as 1000).
    #[serde(default, deserialize_with = "super::query::saturating")]
    #[param(schema_with = super::query::count)]
    limit: Option<u32>,
    /// Planned slots per schedule (5 when absent, at most 100).
    #[serde(default, deserialize_with = "super::query::saturating")]
    #[param(schema_with = super::query::count)]
    next: Option<usize>,
}

#[utoipa::path(
    get,
    path = "/v1/jobs/{job}/slots",
    tag = "schedules",
    operation_id = "list_slots",
    params(("job" = String, Path, description = "The job's name"), SlotsQuery),
    responses(
        (status = 200, description = "The slots the job's schedules accounted for, and the next ones planned", body = SlotsV1),
        (status = 400, description = "A query that cannot be read", body = ErrorBodyV1),
        (status = 404, description = "No such job (`unknown_job`, also for one the token may not read) or schedule (`unknown_schedule`)", body = ErrorBodyV1),
    ),
)]
async fn list_slots(
    State(state): State<AppState>,
    Extension(caller): Extension<Principal>,
    Path(job): Path<String>,
    query: Result<Query<SlotsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<SlotsV1>, ApiError> {
    let Query(q) = query?;
    allowed(
        &state,
        &caller,
        &job,
        None,
        Action::Read,
        AuditAction::JobRead,
    )?;
    let limit = q.limit.unwrap_or(100).clamp(1, MAX_SLOTS);
    let slots = state
        .scheduler
        .slots(&job, q.schedule.as_deref(), limit)
        .await?;
    let mut planned: Vec<PlannedSlotV1> = state
        .scheduler
        .states(&job, q.next.unwrap_or(DEFAULT_NEXT).min(MAX_NEXT))
        .await?
        .iter()
        .filter(|s| q.schedule.as_ref().is_none_or(|n| *n == s.schedule.name))
        .flat_map(|s| {
            s.next
                .iter()
                .map(|slot| PlannedSlotV1::new(&s.schedule, slot))
        })
        .collect();
    planned.sort_by(|a, b| a.fire_at.cmp(&b.fire_at));
    Ok(Json(SlotsV1 {
        job,
        slots: slots.iter().map(SlotV1::from).collect(),
        planned,
    }))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct NextQuery {
    /// Planned slots per schedule (5 when absent, at most 100).
    #[serde(default, deserialize_with = "super::query::saturating")]
    #[param(schema_with = super::query::count)]
    next: Option<usize>,
}

#[utoipa::path(
    get,
    path = "/v1/jobs/{job}/schedules",
    tag = "schedules",
    operation_id = "list_schedules",
    params(("job" = String, Path, description = "The job's name"), NextQuery),
    responses(
        (status = 200, description = "The job's schedules as they stand", body = SchedulesV1),
        (status = 400, description = "A query that cannot be read", body = ErrorBodyV1),
        (status = 404, description = "No such job (`unknown_job`, also for one the token may not read) or schedule (`unknown_schedule`)", body = ErrorBodyV1),
    ),
)]
async fn list_schedules(
    State(state): State<AppState>,
    Extension(caller): Extension<Principal>,
    Path(job): Path<String>,
    query: Result<Query<NextQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<SchedulesV1>, ApiError> {
    let Query(q) = query?;
    allowed(
        &state,
        &caller,
        &job,
        None,
        Action::Read,
        AuditAction::JobRead,
    )?;
    let n = q.next.unwrap_or(DEFAULT_NEXT).min(MAX_NEXT);
    let states = state.scheduler.states(&job, n).await?;
    Ok(Json(SchedulesV1 {
        job,
        schedules: states.iter().map(state_view).collect(),
    }))
}

async fn schedule_state(
    state: &AppState,
    job: &str,
    name: &str,
) -> Result<Json<ScheduleStateV1>, ApiError> {
    let states = state.scheduler.states(job, DEFAULT_NEXT).await?;
    states
        .iter()
        .find(|s| s.schedule.name == name)
        .map(|s| Json(state_view(s)))
        .ok_or_else(|| ApiError::internal(format!("schedule {job}/{name} vanished")))
}

#[utoipa::path(
    post,
    path = "/v1/jobs/{job}/schedules/{name}/pause",
    tag = "schedules",
    operation_id = "pause_schedule",
    params(("job" = String, Path, description = "The job's name"), ("name" = String, Path, description = "The schedule's name")),
    request_body(content = Option<PauseRequestV1>, content_type = "application/json",
        description = "An optional note (at most 1000 bytes); may be empty"),
    responses(
        (status = 200, description = "The schedule, paused", body = ScheduleStateV1),
        (status = 400, description = "A body that cannot be read, or a note over 1000 bytes", body = ErrorBodyV1),
        (status = 403, description = "The token has no `admin` scope on the job (`forbidden`)", body = ErrorBodyV1),
        (status = 404, description = "No such job (`unknown_job`, also for one the token may not read) or schedule (`unknown_schedule`)", body = ErrorBodyV1),
    ),
)]
async fn pause(
    State(state): State<AppState>,
    Extension(caller): Extension<Principal>,
    Path((job, name)): Path<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<ScheduleStateV1>, ApiError> {
    let what = AuditAction::SchedulePause;
    allowed(&state, &caller, &job, Some(&name), Action::Admin, what)?;
    let req: PauseRequestV1 =
        optional_json_object(&body?, "pause body (expected {\"note\": text} or nothing)")?;
    if req.note.as_ref().is_some_and(|n| n.len() > 1000) {
        return Err(ApiError::bad_request("`note` is over 1000 bytes"));
    }
    state
        .scheduler
        .pause(&job, Some(&name), req.note.clone())
        .await?;
    let note = req.note.map(|n| format!("note: {n}"));
    audit_done(
        &caller,
        what,
        Target::schedule(&job, &name),
        note.as_deref(),
    );
    schedule_state(&state, &job, &name).await
}

#[utoipa::path(
    post,
    path = "/v1/jobs/{job}/schedules/{name}/resume",
    tag = "schedules",
    operation_id = "resume_schedule",
    params(("job" = String, Path, description = "The job's name"), ("name" = String, Path, description = "The schedule's name")),
    responses(
        (status = 200, description = "The schedule, resumed (still paused if `suspended` in its job file)", body = ScheduleStateV1),
        (status = 403, description = "The token has no `admin` scope on the job (`forbidden`)", body = ErrorBodyV1),
        (status = 404, description = "No such job (`unknown_job`, also for one the token may not read) or schedule (`unknown_schedule`)", body = ErrorBodyV1),
    ),
)]
async fn resume(
    State(state): State<AppState>,
    Extension(caller): Extension<Principal>,
    Path((job, name)): Path<(String, String)>,
) -> Result<Json<ScheduleStateV1>, ApiError> {
    let what = AuditAction::ScheduleResume;
    allowed(&state, &caller, &job, Some(&name), Action::Admin, what)?;
    state.scheduler.resume(&job, Some(&name)).await?;
    audit_done(&caller, what, Target::schedule(&job, &name), None);
    schedule_state(&state, &job, &name).await
}

fn instant(field: &str, text: &str) -> Result<DateTime<Utc>, ApiError> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| {
            ApiError::bad_request(format!(
                "`{field}`: {text:?} is not an RFC 3339 time (e.g. 2026-11-26T00:00:00+09:00): {e}"
            ))
        })
}

#[utoipa::path(
    post,
    path = "/v1/jobs/{job}/schedules/{name}/backfill",
    tag = "schedules",
    operation_id = "backfill_schedule",
    params(("job" = String, Path, description = "The job's name"), ("name" = String, Path, description = "The schedule's name")),
    request_body(content = BackfillRequestV1, content_type = "application/json"),
    responses(
        (status = 200, description = "What the backfill fired, found fired already, and will not fire", body = BackfillV1),
        (status = 400, description = "A body that cannot be read, or a time that is not RFC 3339", body = ErrorBodyV1),
        (status = 403, description = "The token has no `admin` scope on the job (`forbidden`)", body = ErrorBodyV1),
        (status = 404, description = "No such job (`unknown_job`, also for one the token may not read) or schedule (`unknown_schedule`)", body = ErrorBodyV1),
        (status = 413, description = "A fired slot's parameters over `limits.max_param_bytes` (`param_too_large`), or a body over 1 MiB (`body_too_large`)", body = ErrorBodyV1),
        (status = 422, description = "A range the backfill cannot take (`bad_request`), or parameters the job refuses (`invalid_params`)", body = ErrorBodyV1),
    ),
)]
async fn backfill(
    State(state): State<AppState>,
    Extension(caller): Extension<Principal>,
    Path((job, name)): Path<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<BackfillV1>, ApiError> {
    let what = AuditAction::ScheduleBackfill;
    allowed(&state, &caller, &job, Some(&name), Action::Admin, what)?;
    let body = body?;
    let req: BackfillRequestV1 = json_object(
        &body,
        "backfill body (expected {\"from\": RFC 3339, \"to\": RFC 3339})",
    )?;
    let from = instant("from", &req.from)?;
    let to = instant("to", &req.to)?;
    let report = state.scheduler.backfill(&job, &name, from, to).await?;
    let detail = format!(
        "{} to {}: {} fired, {} already fired, {} not firing",
        req.from,
        req.to,
        report.fired.len(),
        report.already_fired.len(),
        report.not_firing.len()
    );
    audit_done(&caller, what, Target::schedule(&job, &name), Some(&detail));
    let spec = state
        .runs
        .job(&job)
        .and_then(|j| j.schedules.iter().find(|s| s.name == name).cloned())
        .ok_or_else(|| ApiError::internal(format!("schedule {job}/{name} vanished")))?;
    Ok(Json(BackfillV1 {
        job,
        schedule: name,
        fired: report
            .fired
            .iter()
            .map(|(s, id)| BackfilledSlotV1::new(s, id))
            .collect(),
        already_fired: report
            .already_fired
            .iter()
            .map(|(s, id)| BackfilledSlotV1::new(s, id))
            .collect(),
        not_firing: report
            .not_firing
            .iter()
            .map(|s| PlannedSlotV1::new(&spec, s))
            .collect(),
    }))
}
