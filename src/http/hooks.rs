//! `POST /v1/hooks/{job}`: a signed delivery from another system (GitHub, Alertmanager)
//! starts a run of a job with a `[webhook]` table. Answers as `POST /v1/jobs/{job}/runs`.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use chrono::Utc;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::limits::Caller;
use super::runs::{WaitQuery, finish_waiting, hold};
use super::{ApiError, AppState};
use crate::domain::run::Trigger;
use crate::protocol::api::{ErrorBodyV1, ErrorCodeV1, RunV1};
use crate::service::runs::{AcceptError, MAX_IDEMPOTENCY_KEY_LEN, RequestKey};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(deliver))
}

/// What every refused signature hears; the precise reason goes to the log only.
const UNAUTHORIZED: &str = "webhook signature missing or invalid";

/// A signed delivery: no token, the job's `[webhook]` secret instead. Answers as
/// `POST /v1/jobs/{job}/runs` does.
#[utoipa::path(
    post,
    path = "/v1/hooks/{job}",
    tag = "hooks",
    operation_id = "deliver_webhook",
    security(()),
    params(
        ("job" = String, Path, description = "The job's name; its file has a `[webhook]` table"),
        ("X-Hub-Signature-256" = Option<String>, Header, description = "GitHub's signature (`scheme = \"github\"`)"),
        ("webhook-id" = Option<String>, Header, description = "Standard Webhooks: the delivery id (also the idempotency key)"),
        ("webhook-timestamp" = Option<String>, Header, description = "Standard Webhooks: seconds since the epoch"),
        ("webhook-signature" = Option<String>, Header, description = "Standard Webhooks: `v1,<base64>` signatures"),
        super::runs::WaitQuery,
    ),
    request_body(content = Object, content_type = "application/json",
        description = "The sender's JSON; the job's `params_from` pointers pick its parameters"),
    responses(
        (status = 200, description = "The run, final within `wait`", body = RunV1),
        (status = 202, description = "The run, accepted (or the first run of a redelivery)", body = RunV1,
            headers(("Location" = String, description = "The run's URL"))),
        (status = 400, description = "A body that is not JSON, a query that cannot be read, or a delivery id over 255 characters", body = ErrorBodyV1),
        (status = 401, description = "The signature is missing or invalid (`unauthorized`); always the same body", body = ErrorBodyV1),
        (status = 404, description = "No such job, or one without a `[webhook]` table (`unknown_job`)", body = ErrorBodyV1),
        (status = 409, description = "The delivery's first request is still being accepted", body = ErrorBodyV1),
        (status = 413, description = "A parameter over `limits.max_param_bytes` (`param_too_large`)", body = ErrorBodyV1),
        (status = 422, description = "Parameters the job refuses, or a redelivery with another body", body = ErrorBodyV1),
    ),
)]
async fn deliver(
    State(state): State<AppState>,
    Caller(caller): Caller,
    Path(job): Path<String>,
    query: Result<Query<WaitQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query?;
    let body = body?;
    let spec = state.runs.job(&job).ok_or_else(|| {
        ApiError::not_found(ErrorCodeV1::UnknownJob, format!("no job named `{job}`"))
    })?;
    let hook = spec.webhook.as_ref().ok_or_else(|| {
        ApiError::not_found(
            ErrorCodeV1::UnknownJob,
            format!("job `{job}` takes no webhooks (its job file has no [webhook] table)"),
        )
    })?;
    let verified = hook
        .verify(
            |name| headers.get(name).and_then(|v| v.to_str().ok()),
            &body,
            Utc::now().timestamp(),
        )
        .map_err(|reason| {
            tracing::warn!(message = "webhook delivery refused", job, %reason);
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                ErrorCodeV1::Unauthorized,
                UNAUTHORIZED,
            )
        })?;
    if let Some(id) = &verified.delivery_id
        && id.len() > MAX_IDEMPOTENCY_KEY_LEN
    {
        return Err(ApiError::bad_request(format!(
            "the delivery id is {} characters long; at most {MAX_IDEMPOTENCY_KEY_LEN} are allowed",
            id.len()
        )));
    }
    let payload: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("webhook body is not valid JSON: {e}")))?;
    let params = extract_params(&hook.params_from, &payload).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCodeV1::InvalidParams,
            e.to_string(),
        )
    })?;
    // The delivery id makes a redelivery return the first run; the body's digest makes
    // the same id with another body an error rather than a silent match.
    let _hold = hold(&state, &caller, query.wait)?;
    let key = verified.delivery_id.clone().map(|key| RequestKey {
        scope: format!("hook:{job}"),
        key,
        content: Some(format!("sha256:{:x}", Sha256::digest(&body))),
    });
    let run = match state
        .runs
        .accept_with(
            &job,
            params,
            key,
            Trigger::Webhook,
            None,
            Default::default(),
        )
        .await
    {
        Ok(accepted) => {
            let repeat = matches!(accepted, crate::service::runs::Accepted::Existing(_));
            let run = accepted.into_run();
            // The sender proved itself by the job's webhook secret, not by a token.
            crate::service::audit::record(&crate::service::audit::AuditEvent {
                job: Some(&job),
                run_id: Some(run.id),
                detail: Some(if repeat {
                    "signed webhook delivery, a repeat: the delivery's earlier run"
                } else {
                    "signed webhook delivery"
                }),
                ..crate::service::audit::AuditEvent::new(
                    "webhook",
                    crate::service::audit::AuditAction::RunStart,
                    crate::service::audit::AuditOutcome::Done,
                )
            });
            run
        }
        Err(AcceptError::KeyReused { key, .. }) => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                ErrorCodeV1::IdempotencyKeyReused,
                format!("delivery `{key}` was already received within 24 h with a different body"),
            ));
        }
        Err(e) => return Err(e.into()),
    };
    finish_waiting(&state, run, query.wait).await
}

/// A value a JSON Pointer found that cannot be a param.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("parameter `{param}` from `{pointer}` is {kind}; it must be a string, number or boolean")]
pub struct NotAParam {
    param: String,
    pointer: String,
    kind: &'static str,
}

/// The params `params_from` picks out of the body: strings as they are, numbers and
/// booleans as text. A pointer that finds nothing leaves its param out, so the param's
/// default or required rule applies.
fn extract_params(
    params_from: &BTreeMap<String, String>,
    payload: &Value,
) -> Result<BTreeMap<String, String>, NotAParam> {
    let mut params = BTreeMap::new();
    for (param, pointer) in params_from {
        let text = match payload.pointer(pointer) {
            None => continue,
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            Some(Value::Bool(b)) => b.to_string(),
            Some(other) => {
                return Err(NotAParam {
                    param: param.clone(),
                    pointer: pointer.clone(),
                    kind: match other {
                        Value::Null => "null",
                        Value::Array(_) => "an array",
                        _ => "an object",
                    },
                });
            }
        };
        params.insert(param.clone(), text);
    }
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn pointers_pick_strings_numbers_and_booleans() {
        let payload = json!({
            "ref": "refs/heads/main",
            "repository": {"full_name": "o/r", "id": 42, "private": false},
            "alerts": [{"labels": {"alertname": "DiskFull"}}],
            "a/b": {"m~n": "escaped"}
        });
        let from = map(&[
            ("ref", "/ref"),
            ("repo", "/repository/full_name"),
            ("id", "/repository/id"),
            ("private", "/repository/private"),
            ("alert", "/alerts/0/labels/alertname"),
            ("odd", "/a~1b/m~0n"),
            ("absent", "/head_commit/id"),
        ]);
        assert_eq!(
            extract_params(&from, &payload).unwrap(),
            map(&[
                ("ref", "refs/heads/main"),
                ("repo", "o/r"),
                ("id", "42"),
                ("private", "false"),
                ("alert", "DiskFull"),
                ("odd", "escaped"),
            ])
        );
    }

    #[test]
    fn objects_arrays_and_null_are_refused_naming_param_and_pointer() {
        let payload = json!({"repository": {"x": 1}, "commits": [], "n": null});
        for (pointer, kind) in [
            ("/repository", "an object"),
            ("/commits", "an array"),
            ("/n", "null"),
        ] {
            let e = extract_params(&map(&[("p", pointer)]), &payload).unwrap_err();
            assert_eq!(
                e.to_string(),
                format!(
                    "parameter `p` from `{pointer}` is {kind}; it must be a string, number or boolean"
                )
            );
        }
    }
}
