use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use super::{ApiError, AppState};
use crate::domain::job::JobSpec;
use crate::protocol::api::ErrorCodeV1;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/jobs", get(list_jobs))
        .route("/v1/jobs/{job}", get(get_job))
}

#[derive(Serialize)]
struct ParamView {
    required: bool,
    default: Option<String>,
    pattern: Option<String>,
    max_length: usize,
    description: Option<String>,
}

#[derive(Serialize)]
struct ResourcesView {
    cpu: Option<u32>,
    cpu_limit: Option<f64>,
    memory_bytes: Option<u64>,
}

#[derive(Serialize)]
struct JobView {
    name: String,
    description: Option<String>,
    image: String,
    command: Vec<String>,
    pull: &'static str,
    network: String,
    timeout: Option<String>,
    resources: ResourcesView,
    params: BTreeMap<String, ParamView>,
    schedule: Option<String>,
    time_zone: Option<String>,
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
            resources: ResourcesView {
                cpu: j.resources.cpu,
                cpu_limit: j.resources.cpu_limit,
                memory_bytes: j.resources.memory_bytes,
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
            schedule: j.schedule.as_ref().map(|s| s.expression.clone()),
            time_zone: j.schedule.as_ref().map(|s| s.time_zone.name().to_owned()),
        }
    }
}

#[derive(Serialize)]
struct JobList {
    jobs: Vec<JobView>,
}

async fn list_jobs(State(state): State<AppState>) -> Json<JobList> {
    Json(JobList {
        jobs: state
            .runs
            .jobs()
            .iter()
            .map(|j| JobView::from(j.as_ref()))
            .collect(),
    })
}

async fn get_job(
    State(state): State<AppState>,
    Path(job): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    let spec = state.runs.job(&job).ok_or_else(|| {
        ApiError::not_found(ErrorCodeV1::UnknownJob, format!("no job named `{job}`"))
    })?;
    Ok(Json(JobView::from(spec.as_ref())))
}
