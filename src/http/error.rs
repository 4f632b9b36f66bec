//! The one place where errors become HTTP statuses. Every error body is a
//! [`ErrorBodyV1`], the framework's own rejections included.

use crate::domain::job_lookup::CatalogErrors;
use crate::domain::ports::{ControlError, LogError, StoreError};
use crate::protocol::api::{ErrorBodyV1, ErrorCodeV1, ErrorDetailV1};
use crate::service::runs::{AcceptError, ActionError, ParamLimitError};
use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: ErrorCodeV1,
    pub message: String,
    pub details: Vec<ErrorDetailV1>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: ErrorCodeV1, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            details: Vec::new(),
        }
    }
    pub fn with_details(mut self, details: Vec<ErrorDetailV1>) -> Self {
        self.details = details;
        self
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorCodeV1::BadRequest, message)
    }
    pub fn not_found(code: ErrorCodeV1, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }
    /// Logged with its details; the client gets no internals.
    pub fn internal(error: impl std::fmt::Display) -> Self {
        tracing::error!(message = "request failed", %error);
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCodeV1::Internal,
            "internal error; see the server log",
        )
    }
    pub fn unavailable(what: impl std::fmt::Display) -> Self {
        tracing::warn!(message = "dependency unavailable", error = %what);
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCodeV1::Unavailable,
            what.to_string(),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let unread_body = matches!(
            self.code,
            ErrorCodeV1::BodyTooLarge | ErrorCodeV1::RequestTimeout
        );
        let mut body = ErrorBodyV1::new(self.code, self.message);
        body.error.details = self.details;
        let mut response = (self.status, Json(body)).into_response();
        if unread_body {
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
            StoreError::Corrupt(_) | StoreError::SchemaTooNew { .. } => ApiError::internal(e),
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
            ControlError::Rejected(m) => {
                ApiError::new(StatusCode::CONFLICT, ErrorCodeV1::Rejected, m)
            }
        }
    }
}

impl From<AcceptError> for ApiError {
    fn from(e: AcceptError) -> Self {
        match e {
            AcceptError::UnknownJob(_) => {
                ApiError::not_found(ErrorCodeV1::UnknownJob, e.to_string())
            }
            AcceptError::Params(p) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                ErrorCodeV1::InvalidParams,
                p.to_string(),
            ),
            AcceptError::Limit(l @ ParamLimitError::TooMany { .. }) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                ErrorCodeV1::InvalidParams,
                l.to_string(),
            ),
            AcceptError::Limit(l) => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCodeV1::ParamTooLarge,
                l.to_string(),
            ),
            AcceptError::KeyReused { .. } => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                ErrorCodeV1::IdempotencyKeyReused,
                e.to_string(),
            ),
            AcceptError::KeyInFlight(_) => ApiError::new(
                StatusCode::CONFLICT,
                ErrorCodeV1::IdempotencyKeyInFlight,
                e.to_string(),
            ),
            AcceptError::Store(s) => s.into(),
        }
    }
}

impl From<ActionError> for ApiError {
    fn from(e: ActionError) -> Self {
        match e {
            ActionError::UnknownRun(_) => {
                ApiError::not_found(ErrorCodeV1::UnknownRun, e.to_string())
            }
            ActionError::AlreadyFinal { .. } => ApiError::new(
                StatusCode::CONFLICT,
                ErrorCodeV1::RunFinished,
                e.to_string(),
            ),
            ActionError::NotRetryable { .. } => ApiError::new(
                StatusCode::CONFLICT,
                ErrorCodeV1::NotRetryable,
                e.to_string(),
            ),
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
        if super::limits::is_body_timeout(&e) {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                ErrorCodeV1::RequestTimeout,
                "the request body did not arrive in time (limits.body_timeout)",
            )
        } else if status == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                status,
                ErrorCodeV1::BodyTooLarge,
                "request body is over the 1 MiB limit",
            )
        } else {
            ApiError::new(status, ErrorCodeV1::BadRequest, e.body_text())
        }
    }
}

impl From<CatalogErrors> for ApiError {
    fn from(e: CatalogErrors) -> Self {
        let details: Vec<ErrorDetailV1> =
            e.0.into_iter()
                .map(|e| ErrorDetailV1 {
                    file: e.file.display().to_string(),
                    line: e.line,
                    field: e.field,
                    message: e.message,
                })
                .collect();
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCodeV1::InvalidJobFiles,
            format!(
                "the job files have {} error(s); the running jobs stay as they were",
                details.len()
            ),
        )
        .with_details(details)
    }
}

pub async fn not_found() -> ApiError {
    ApiError::not_found(ErrorCodeV1::NotFound, "no such endpoint")
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        ErrorCodeV1::MethodNotAllowed,
        "method not allowed on this endpoint",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::job_lookup::CatalogError;

    #[tokio::test]
    async fn invalid_job_files_answer_422_with_every_problem() {
        let errors = CatalogErrors(vec![CatalogError {
            file: "jobs/a.toml".into(),
            line: Some(3),
            field: Some("schedules[0].calendar".into()),
            message: "unknown calendar \"x\"".into(),
        }]);
        let response = ApiError::from(errors).into_response();
        assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["error"]["code"], "invalid_job_files");
        assert_eq!(
            json["error"]["details"],
            serde_json::json!([{"file": "jobs/a.toml", "line": 3,
                "field": "schedules[0].calendar", "message": "unknown calendar \"x\""}])
        );
        let back: ErrorBodyV1 = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            back.error.details[0].to_string(),
            "jobs/a.toml:3: schedules[0].calendar: unknown calendar \"x\""
        );
    }
}
