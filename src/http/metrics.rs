//! `GET /metrics` (Prometheus text format) and the timing of every request by route
//! template. Open with `[auth] open_metrics = true`; otherwise an API token that may
//! read every job (`read:*`) or is `admin`, since the series name every job. A
//! `tasuki worker` serves the same text on its own listener (`--metrics-listen`).

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router};
use tokio_util::sync::CancellationToken;

use super::{ApiError, AppState};
use crate::domain::auth::{Action, Principal};
use crate::metrics::{CONTENT_TYPE, Metrics, UNMATCHED_ROUTE};
use crate::protocol::api::ErrorCodeV1;
use crate::service::audit::{self, AuditAction, AuditEvent, AuditOutcome};

pub fn router() -> Router<AppState> {
    Router::new().route("/metrics", get(scrape))
}

/// The series name every job, so a token must be able to read them all.
fn may_scrape(caller: &Principal) -> bool {
    caller.is_admin()
        || caller
            .scopes()
            .iter()
            .any(|s| s.action == Action::Read && s.jobs.as_str() == "*")
}

async fn scrape(
    State(state): State<AppState>,
    Extension(caller): Extension<Principal>,
) -> Response {
    if !state.auth.metrics_open() && !may_scrape(&caller) {
        let error = ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorCodeV1::Forbidden,
            format!(
                "token `{}` may not read metrics: they need `read:*` or `admin`",
                caller.name()
            ),
        );
        let outcome = AuditOutcome::Refused {
            status: error.status.as_u16(),
            reason: "metrics need read:* or admin",
        };
        audit::record(&AuditEvent {
            request: Some("GET /metrics"),
            ..AuditEvent::new(caller.name(), AuditAction::Request, outcome)
        });
        return error.into_response();
    }
    exposition(&state.metrics).await
}

async fn exposition(metrics: &Metrics) -> Response {
    let text = metrics.render().await;
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response()
}

/// The method as a label: one of the standard ones, else `other` (a client may send
/// any token as a method).
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// The middleware: each request's time to its response head, by method, route
/// template (never the raw path: `unmatched` when no route matched) and status.
pub async fn time_requests(
    State(metrics): State<Arc<Metrics>>,
    request: Request,
    next: Next,
) -> Response {
    let method = method_label(request.method());
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| UNMATCHED_ROUTE.to_owned(), |p| p.as_str().to_owned());
    let began = Instant::now();
    let response = next.run(request).await;
    metrics.observe_request(method, &route, response.status().as_u16(), began.elapsed());
    response
}

/// A worker's own listener: `/metrics` and `/healthz`, no token (see README, Metrics),
/// until `shutdown`.
pub async fn serve_worker_metrics(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(metrics): State<Arc<Metrics>>| async move { exposition(&metrics).await }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .with_state(metrics);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}
