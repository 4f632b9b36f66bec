use std::sync::atomic::Ordering;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::json;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use crate::protocol::api::{ErrorCodeV1, ErrorV1};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
}

/// `/healthz`: `{"status":"ok"}` while the process serves.
#[derive(Serialize, ToSchema)]
struct Health {
    #[schema(pattern = "^ok$")]
    status: &'static str,
}

/// Alive: the process answers. No token, never rate limited.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "health",
    operation_id = "healthz",
    security(()),
    responses((status = 200, description = "The process serves", body = Health)),
)]
async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// `/readyz` when ready: `{"status":"ready","checks":{...}}`.
#[derive(ToSchema)]
#[allow(dead_code)] // Describes the JSON `readyz` writes; never built.
struct Ready {
    #[schema(pattern = "^ready$")]
    status: String,
    /// Per dependency (`store`, `broker`, `docker` when this process runs containers):
    /// `ok`, or what failed; `outbox`: runs accepted but not yet confirmed by the broker.
    checks: Object,
}

/// `/readyz` when not: the checks, and an `error` naming what is not ready.
#[derive(ToSchema)]
#[allow(dead_code)] // Describes the JSON `readyz` writes; never built.
struct NotReady {
    #[schema(pattern = "^not_ready$")]
    status: String,
    checks: Object,
    error: ErrorV1,
}

/// Any JSON object.
type Object = std::collections::BTreeMap<String, serde_json::Value>;

#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    operation_id = "readyz",
    // A token unless `[auth] open_readyz`.
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "Ready", body = Ready),
        (status = 503, description = "Not ready (`not_ready`): a dependency fails, or the server is shutting down", body = NotReady),
    ),
)]
/// Ready when the store, the broker and (if this process runs containers) Docker answer;
/// otherwise 503 naming what is not.
async fn readyz(State(state): State<AppState>) -> Response {
    let (store, queue, docker) = tokio::join!(state.store.ping(), state.queue.ping(), async {
        match &state.runtime {
            Some(r) => Some(r.ping().await),
            None => None,
        }
    });
    let mut checks = serde_json::Map::new();
    let mut failing = Vec::new();
    let mut record = |name: &str, result: Result<(), String>| {
        match result {
            Ok(()) => checks.insert(name.to_owned(), json!("ok")),
            Err(e) => {
                failing.push(name.to_owned());
                checks.insert(name.to_owned(), json!(e))
            }
        };
    };
    record("store", store.map_err(|e| e.to_string()));
    record("broker", queue.map_err(|e| e.to_string()));
    if let Some(docker) = docker {
        record("docker", docker.map_err(|e| e.to_string()));
    }
    // Runs accepted but not yet confirmed by the broker: not a readiness failure (the
    // store holds them), but what an operator looks at when the broker is down or
    // returns messages as unroutable.
    match state.store.outbox_backlog(chrono::Utc::now()).await {
        Ok(b) => {
            checks.insert(
                "outbox".to_owned(),
                json!({"pending": b.pending, "failed_publishes": b.failed, "last_error": b.last_error}),
            );
        }
        Err(e) => record("store", Err(e.to_string())),
    }
    if !state.accepting.load(Ordering::SeqCst) {
        failing.push("shutting_down".to_owned());
    }
    if failing.is_empty() {
        (
            StatusCode::OK,
            Json(json!({"status": "ready", "checks": checks})),
        )
            .into_response()
    } else {
        let error = ErrorV1 {
            code: ErrorCodeV1::NotReady,
            message: format!("not ready: {}", failing.join(", ")),
            details: Vec::new(),
        };
        let body = json!({
            "status": "not_ready",
            "checks": checks,
            "error": error,
        });
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    }
}
