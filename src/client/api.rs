use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use futures::Stream;
use futures::StreamExt;
use serde_json::json;

use crate::protocol::api::{ErrorBodyV1, ErrorCodeV1, ErrorDetailV1, ReloadSummaryV1, RunV1};
use crate::protocol::schedules::{BackfillV1, ScheduleStateV1, SchedulesV1, SlotsV1};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server could not be reached or broke off.
    #[error("cannot reach tasuki at {url}: {message}")]
    Unreachable { url: String, message: String },
    /// The client could not be set up (e.g. an unusable `--ca-cert`).
    #[error("{0}")]
    Setup(String),
    /// The server answered with an error.
    #[error("server refused ({status}): {message}")]
    Refused {
        status: u16,
        /// `None` when the answer was not an API error body (e.g. from a proxy).
        code: Option<ErrorCodeV1>,
        message: String,
    },
    /// The API token cannot be sent (a control character, say).
    #[error("the API token (--token / TASUKI_TOKEN) has characters an HTTP header cannot carry")]
    InvalidToken,
}

impl ClientError {
    /// Worth trying again: the server was unreachable, overloaded, or had a dependency
    /// down (5xx, 429). A 4xx answer will not change by asking again.
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Unreachable { .. } => true,
            ClientError::Refused { status, .. } => *status >= 500 || *status == 429,
            ClientError::Setup(_) | ClientError::InvalidToken => false,
        }
    }

    /// The server wants a token (401) or does not let this one do it (403).
    pub fn is_auth(&self) -> bool {
        matches!(
            self,
            ClientError::Refused {
                status: 401 | 403,
                ..
            }
        )
    }

    /// The API's error code, when the server answered with one.
    pub fn code(&self) -> Option<&ErrorCodeV1> {
        match self {
            ClientError::Refused { code, .. } => code.as_ref(),
            ClientError::Unreachable { .. } | ClientError::Setup(_) | ClientError::InvalidToken => {
                None
            }
        }
    }
}

/// What a reload request came to.
#[derive(Debug)]
pub enum ReloadOutcome {
    Reloaded(ReloadSummaryV1),
    /// The files are invalid; the server keeps its jobs.
    Refused {
        message: String,
        details: Vec<ErrorDetailV1>,
    },
}

/// An error's text for [`ClientError::Unreachable`]: a transport error with its causes
/// (a certificate the client does not trust shows only there).
trait Describe {
    fn describe(&self) -> String;
}

impl Describe for reqwest::Error {
    fn describe(&self) -> String {
        super::connect::chain(self)
    }
}

impl Describe for String {
    fn describe(&self) -> String {
        self.clone()
    }
}

/// The API as the CLI uses it.
pub struct ApiClient {
    http: reqwest::Client,
    base: String,
}

impl ApiClient {
    /// A client of the server at `base`; with `token`, every request carries it as
    /// `Authorization: Bearer` (marked sensitive, so it never shows in debug output);
    /// with `ca_cert`, that CA (PEM) is trusted for the server's certificate besides the
    /// system's roots.
    pub fn new(
        base: &str,
        token: Option<&str>,
        ca_cert: Option<&Path>,
    ) -> Result<Self, ClientError> {
        let base = base.trim_end_matches('/').to_owned();
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(token) = token.filter(|t| !t.is_empty()) {
            let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|_| ClientError::InvalidToken)?;
            value.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        let http = super::connect::builder(ca_cert)
            .map_err(|e| ClientError::Setup(e.to_string()))?
            .connect_timeout(Duration::from_secs(5))
            .default_headers(headers)
            .build()
            .map_err(|e| ClientError::Unreachable {
                url: base.clone(),
                message: e.to_string(),
            })?;
        Ok(Self { http, base })
    }

    fn unreachable(&self, e: impl Describe) -> ClientError {
        ClientError::Unreachable {
            url: self.base.clone(),
            message: e.describe(),
        }
    }

    async fn check(&self, response: reqwest::Response) -> Result<reqwest::Response, ClientError> {
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let text = response.text().await.unwrap_or_default();
        let (code, message) = match serde_json::from_str::<ErrorBodyV1>(&text) {
            Ok(b) => (Some(b.error.code), b.error.message),
            Err(_) => (None, text.chars().take(500).collect()),
        };
        Err(ClientError::Refused {
            status: status.as_u16(),
            code,
            message,
        })
    }

    async fn run_info(
        &self,
        response: Result<reqwest::Response, reqwest::Error>,
    ) -> Result<RunV1, ClientError> {
        let response = self
            .check(response.map_err(|e| self.unreachable(e))?)
            .await?;
        response
            .json::<RunV1>()
            .await
            .map_err(|e| self.unreachable(format!("reading answer: {e}")))
    }

    /// Start a run. With an idempotency key, a repeat of the request (after a lost
    /// answer) returns the same run instead of starting another.
    pub async fn create_run(
        &self,
        job: &str,
        params: &BTreeMap<String, String>,
        idempotency_key: Option<&str>,
    ) -> Result<RunV1, ClientError> {
        let url = format!("{}/v1/jobs/{job}/runs", self.base);
        let mut request = self.http.post(url).json(&json!({ "params": params }));
        if let Some(key) = idempotency_key {
            request = request.header("Idempotency-Key", key);
        }
        self.run_info(request.send().await).await
    }

    /// `POST /v1/runs/{id}/{action}` (`cancel`, `retry`); the run as JSON.
    pub async fn run_action(
        &self,
        id: &str,
        action: &str,
    ) -> Result<serde_json::Value, ClientError> {
        let response = self
            .http
            .post(format!("{}/v1/runs/{id}/{action}", self.base))
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        let response = self.check(response).await?;
        response.json().await.map_err(|e| self.unreachable(e))
    }

    /// `POST /v1/jobs/reload`: the summary, or the server's refusal with every problem
    /// in the files.
    pub async fn reload_jobs(&self) -> Result<ReloadOutcome, ClientError> {
        let response = self
            .http
            .post(format!("{}/v1/jobs/reload", self.base))
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        if response.status() == reqwest::StatusCode::UNPROCESSABLE_ENTITY {
            let text = response.text().await.unwrap_or_default();
            return match serde_json::from_str::<ErrorBodyV1>(&text) {
                Ok(body) if body.error.code == ErrorCodeV1::InvalidJobFiles => {
                    Ok(ReloadOutcome::Refused {
                        message: body.error.message,
                        details: body.error.details,
                    })
                }
                Ok(body) => Err(ClientError::Refused {
                    status: 422,
                    code: Some(body.error.code),
                    message: body.error.message,
                }),
                Err(_) => Err(ClientError::Refused {
                    status: 422,
                    code: None,
                    message: text.chars().take(500).collect(),
                }),
            };
        }
        let response = self.check(response).await?;
        let summary = response
            .json::<ReloadSummaryV1>()
            .await
            .map_err(|e| self.unreachable(format!("reading answer: {e}")))?;
        Ok(ReloadOutcome::Reloaded(summary))
    }

    /// The run; with `wait`, held until it is final or the wait passes.
    pub async fn get_run(&self, id: &str, wait: Option<Duration>) -> Result<RunV1, ClientError> {
        let mut request = self.http.get(format!("{}/v1/runs/{id}", self.base));
        if let Some(w) = wait {
            request = request.query(&[("wait", w.as_secs().max(1))]);
        }
        self.run_info(request.send().await).await
    }

    pub async fn get_run_json(&self, id: &str) -> Result<serde_json::Value, ClientError> {
        let response = self
            .http
            .get(format!("{}/v1/runs/{id}", self.base))
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        let response = self.check(response).await?;
        response.json().await.map_err(|e| self.unreachable(e))
    }

    async fn answer<T: serde::de::DeserializeOwned>(
        &self,
        response: Result<reqwest::Response, reqwest::Error>,
    ) -> Result<T, ClientError> {
        let response = self
            .check(response.map_err(|e| self.unreachable(e))?)
            .await?;
        response
            .json::<T>()
            .await
            .map_err(|e| self.unreachable(format!("reading answer: {e}")))
    }

    /// A job's schedules with their next `next` fire times.
    pub async fn schedules(&self, job: &str, next: usize) -> Result<SchedulesV1, ClientError> {
        let request = self
            .http
            .get(format!("{}/v1/jobs/{job}/schedules", self.base))
            .query(&[("next", next)]);
        self.answer(request.send().await).await
    }

    /// A job's past slots, newest first.
    pub async fn slots(
        &self,
        job: &str,
        schedule: Option<&str>,
        limit: u32,
    ) -> Result<SlotsV1, ClientError> {
        let mut request = self
            .http
            .get(format!("{}/v1/jobs/{job}/slots", self.base))
            .query(&[("limit", limit)]);
        if let Some(name) = schedule {
            request = request.query(&[("schedule", name)]);
        }
        self.answer(request.send().await).await
    }

    /// `pause` (with an optional note) or `resume` one schedule.
    pub async fn schedule_action(
        &self,
        job: &str,
        schedule: &str,
        action: &str,
        note: Option<&str>,
    ) -> Result<ScheduleStateV1, ClientError> {
        let mut request = self.http.post(format!(
            "{}/v1/jobs/{job}/schedules/{schedule}/{action}",
            self.base
        ));
        if action == "pause" {
            request = request.json(&json!({ "note": note }));
        }
        self.answer(request.send().await).await
    }

    pub async fn backfill(
        &self,
        job: &str,
        schedule: &str,
        from: &str,
        to: &str,
    ) -> Result<BackfillV1, ClientError> {
        let request = self
            .http
            .post(format!(
                "{}/v1/jobs/{job}/schedules/{schedule}/backfill",
                self.base
            ))
            .json(&json!({ "from": from, "to": to }));
        self.answer(request.send().await).await
    }

    /// The run's output from byte `offset` of its current attempt; following streams
    /// until the run is final.
    pub async fn logs(
        &self,
        id: &str,
        follow: bool,
        offset: u64,
    ) -> Result<impl Stream<Item = Result<bytes::Bytes, ClientError>> + use<>, ClientError> {
        let response = self
            .http
            .get(format!("{}/v1/runs/{id}/logs", self.base))
            .query(&[
                ("follow", follow.to_string()),
                ("offset", offset.to_string()),
            ])
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        let response = self.check(response).await?;
        let base = self.base.clone();
        Ok(response.bytes_stream().map(move |r| {
            r.map_err(|e| ClientError::Unreachable {
                url: base.clone(),
                message: e.to_string(),
            })
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn refusal(status: u16, body: &'static str) -> ClientError {
        let client = ApiClient::new("http://127.0.0.1:1", None, None).unwrap();
        let response = axum::http::Response::builder()
            .status(status)
            .body(body)
            .unwrap();
        client.check(response.into()).await.unwrap_err()
    }

    /// A server that answers every request with the `Authorization` it was sent.
    async fn echo_authorization() -> String {
        async fn echo(headers: axum::http::HeaderMap) -> axum::Json<serde_json::Value> {
            let auth = headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            axum::Json(json!({ "authorization": auth }))
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().fallback(echo);
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn a_token_goes_with_every_request_and_none_without_one() {
        let base = echo_authorization().await;
        let with = ApiClient::new(&base, Some("tsk_abc"), None).unwrap();
        let seen: serde_json::Value = with.get_run_json("r").await.unwrap();
        assert_eq!(seen["authorization"], "Bearer tsk_abc");
        let seen = with.run_action("r", "cancel").await.unwrap();
        assert_eq!(seen["authorization"], "Bearer tsk_abc");
        let without = ApiClient::new(&base, None, None).unwrap();
        assert_eq!(
            without.get_run_json("r").await.unwrap()["authorization"],
            json!(null)
        );
        let empty = ApiClient::new(&base, Some(""), None).unwrap();
        assert_eq!(
            empty.get_run_json("r").await.unwrap()["authorization"],
            json!(null)
        );
        assert!(matches!(
            ApiClient::new(&base, Some("bad\nvalue"), None),
            Err(ClientError::InvalidToken)
        ));
    }

    #[tokio::test]
    async fn refusals_of_the_caller_are_told_apart() {
        assert!(
            refusal(401, r#"{"error":{"code":"unauthorized","message":"m"}}"#)
                .await
                .is_auth()
        );
        assert!(
            refusal(403, r#"{"error":{"code":"forbidden","message":"m"}}"#)
                .await
                .is_auth()
        );
        assert!(
            !refusal(404, r#"{"error":{"code":"unknown_run","message":"m"}}"#)
                .await
                .is_auth()
        );
    }

    #[tokio::test]
    async fn an_error_body_gives_its_typed_code_and_message() {
        let e = refusal(
            409,
            r#"{"error":{"code":"idempotency_key_in_flight","message":"busy"}}"#,
        )
        .await;
        assert_eq!(e.code(), Some(&ErrorCodeV1::IdempotencyKeyInFlight));
        assert_eq!(e.to_string(), "server refused (409): busy");
    }

    #[tokio::test]
    async fn a_code_this_build_does_not_know_still_reads() {
        let e = refusal(
            400,
            r#"{"error":{"code":"quota_exceeded","message":"later"}}"#,
        )
        .await;
        assert_eq!(
            e.code(),
            Some(&ErrorCodeV1::Unknown("quota_exceeded".to_owned()))
        );
        assert_eq!(e.to_string(), "server refused (400): later");
    }

    #[tokio::test]
    async fn a_body_that_is_not_an_api_error_has_no_code() {
        let e = refusal(502, "<html>bad gateway</html>").await;
        assert_eq!(e.code(), None);
        assert!(e.is_transient());
        assert_eq!(
            e.to_string(),
            "server refused (502): <html>bad gateway</html>"
        );
    }
}
