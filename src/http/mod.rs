//! The HTTP API (axum): runs, jobs, health, and the worker protocol. One `router()` per
//! resource; `error::ApiError` is the only place errors become statuses; `auth` says who
//! is calling (every request but `/healthz` and webhooks) and what they may do.

pub mod auth;
mod body;
mod error;
mod health;
mod hooks;
mod jobs;
pub mod limits;
mod logs;
pub mod metrics;
mod openapi;
mod query;
mod runs;
mod schedules;
mod serve;
mod tls;
mod ui;
mod worker;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use tower_http::timeout::RequestBodyDeadlineLayer;
use tower_http::trace::TraceLayer;
use utoipa_axum::router::OpenApiRouter;

pub use error::ApiError;
pub use openapi::document as openapi_document;
pub use runs::{RunRequestBody, parse_create_run};
pub use serve::{ConnectionLimits, serve};
pub use tls::{TlsError, load_tls};

use crate::domain::job_lookup::ReloadJobs;
use crate::domain::ports::{ContainerRuntime, ControlPlane, RunQueue, RunStore};
use crate::service::runs::Runs;
use crate::service::scheduler::Scheduler;

/// Request bodies above this are refused with 413.
pub const BODY_LIMIT: usize = 1024 * 1024;

#[derive(Clone)]
pub struct AppState {
    pub runs: Runs,
    pub scheduler: Scheduler,
    pub control: Arc<dyn ControlPlane>,
    pub store: Arc<dyn RunStore>,
    pub queue: Arc<dyn RunQueue>,
    /// Checked by /readyz when this process runs containers itself.
    pub runtime: Option<Arc<dyn ContainerRuntime>>,
    /// API and worker tokens, and which read-only endpoints are open without one.
    pub auth: auth::Auth,
    /// Re-reads the job and calendar files (`POST /v1/jobs/reload`).
    pub reload: Arc<dyn ReloadJobs>,
    /// False once shutdown began: /readyz answers 503 so load balancers move away.
    pub accepting: Arc<AtomicBool>,
    /// The callback guard (422 for a refused URL at request time).
    pub callbacks: Arc<dyn crate::domain::callback::CallbackSender>,
    /// Wakes the callback relay after a redelivery.
    pub callback_wake: Arc<tokio::sync::Notify>,
    /// Per-caller request rate and holds, and the body deadline.
    pub limits: Arc<limits::Limits>,
    /// This process's registry, served at `/metrics`; times every request.
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// Every route of the public API, with its OpenAPI operation: what `/v1/openapi.json`
/// describes. The worker protocol is not part of it.
fn public_api() -> OpenApiRouter<AppState> {
    openapi::base()
        .merge(runs::router())
        .merge(logs::router())
        .merge(hooks::router())
        .merge(jobs::router())
        .merge(schedules::router())
        .merge(health::router())
        .merge(openapi::router())
}

/// The whole API. The rate limit reads the caller's `Principal`, so whatever puts it in
/// the request's extensions (authentication) must be a layer outside it (added later).
pub fn router(state: AppState) -> Router {
    let limits = state.limits.clone();
    let authenticate = axum::middleware::from_fn_with_state(state.auth.clone(), auth::authenticate);
    let timed = axum::middleware::from_fn_with_state(state.metrics.clone(), metrics::time_requests);
    let (public, _) = public_api().split_for_parts();
    Router::new()
        .merge(public)
        .merge(worker::router())
        .merge(metrics::router())
        .merge(ui::router())
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(axum::middleware::from_fn_with_state(
            limits.clone(),
            limits::rate_limit,
        ))
        .layer(RequestBodyDeadlineLayer::new(limits.body_timeout))
        .layer(authenticate)
        .layer(TraceLayer::new_for_http())
        .layer(timed)
        .with_state(state)
}
