use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use super::AppState;
use crate::protocol::api::{ErrorCodeV1, ErrorV1};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

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
