//! The one place where errors become HTTP statuses. Every error body is
//! `{"error":{"code":"...","message":"..."}}`, the framework's own rejections included.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::domain::ports::{ControlError, LogError, StoreError};
use crate::service::runs::{AcceptError, ActionError};

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }
    /// Logged with its details; the client gets no internals.
    pub fn internal(error: impl std::fmt::Display) -> Self {
        tracing::error!(message = "request failed", %error);
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the server log",
        )
    }
    pub fn unavailable(what: impl std::fmt::Display) -> Self {
        tracing::warn!(message = "dependency unavailable", error = %what);
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            what.to_string(),
        )
    }
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    code: &'a str,
    message: &'a str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Body {
            error: Inner {
                code: self.code,
                message: &self.message,
            },
        };
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::PAYLOAD_TOO_LARGE {
            // The rest of the body was never read: the connection cannot carry another
            // request, so tell the client not to reuse it.
            response.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(_) => ApiError::unavailable(e),
            StoreError::Corrupt(_) => ApiError::internal(e),
        }
    }
}

impl From<LogError> for ApiError {
    fn from(e: LogError) -> Self {
        ApiError::internal(e)
    }
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> Self {
        match e {
            ControlError::Unavailable(_) => ApiError::unavailable(e),
            ControlError::Rejected(m) => ApiError::new(StatusCode::CONFLICT, "rejected", m),
        }
    }
}

impl From<AcceptError> for ApiError {
    fn from(e: AcceptError) -> Self {
        match e {
            AcceptError::UnknownJob(_) => ApiError::not_found("unknown_job", e.to_string()),
            AcceptError::Params(p) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_params",
                p.to_string(),
            ),
            AcceptError::KeyReused { .. } => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                e.to_string(),
            ),
            AcceptError::KeyInFlight(_) => ApiError::new(
                StatusCode::CONFLICT,
                "idempotency_key_in_flight",
                e.to_string(),
            ),
            AcceptError::Store(s) => s.into(),
        }
    }
}

impl From<ActionError> for ApiError {
    fn from(e: ActionError) -> Self {
        match e {
            ActionError::UnknownRun(_) => ApiError::not_found("unknown_run", e.to_string()),
            ActionError::AlreadyFinal { .. } => {
                ApiError::new(StatusCode::CONFLICT, "run_finished", e.to_string())
            }
            ActionError::NotRetryable { .. } => {
                ApiError::new(StatusCode::CONFLICT, "not_retryable", e.to_string())
            }
            ActionError::Store(s) => s.into(),
        }
    }
}

impl From<axum::extract::rejection::QueryRejection> for ApiError {
    fn from(e: axum::extract::rejection::QueryRejection) -> Self {
        ApiError::bad_request(format!("invalid query string: {}", e.body_text()))
    }
}

impl From<axum::extract::rejection::BytesRejection> for ApiError {
    fn from(e: axum::extract::rejection::BytesRejection) -> Self {
        let status = e.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                status,
                "body_too_large",
                "request body is over the 1 MiB limit",
            )
        } else {
            ApiError::new(status, "bad_request", e.body_text())
        }
    }
}

pub async fn not_found() -> ApiError {
    ApiError::not_found("not_found", "no such endpoint")
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this endpoint",
    )
}
