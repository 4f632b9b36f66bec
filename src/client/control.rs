use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::StatusCode;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::domain::ports::{
    Adoption, ClaimResult, ControlError, ControlPlane, HeldAttempt, Lease, LeaseStatus,
    OutputChunk, RunMessage, SessionGrant,
};
use crate::domain::run::{Outcome, ResourceUsage, RunId};
use crate::domain::session::{OrphanVerdict, SessionRenewal, SessionRequest};
use crate::protocol::api::UsageV1;
use crate::protocol::{
    AdoptRequestV1, AdoptResponseV1, ClaimRequestV1, ClaimResponseV1, FinishV1, HeartbeatV1,
    HeldAttemptV1, HeldRequestV1, LOG_CONTENT_TYPE, LeaseStatusV1, OrphanRequestV1,
    OrphanVerdictV1, ReleaseV1, SessionGrantV1, SessionOpenV1, SessionRefV1, SessionRenewalV1,
    StartedV1, encode_log_frames,
};

/// The control plane of a remote `tasuki serve`, reached with the worker token.
pub struct HttpControlPlane {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl HttpControlPlane {
    /// With `ca_cert`, that CA (PEM) is trusted for the server's certificate besides the
    /// system's roots; an unusable file is an error naming it.
    pub fn new(base: &str, token: &str, ca_cert: Option<&Path>) -> Result<Self, ControlError> {
        let http = super::connect::builder(ca_cert)
            .map_err(|e| ControlError::Unavailable(e.to_string()))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| ControlError::Unavailable(e.to_string()))?;
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
        })
    }

    async fn answer<T: DeserializeOwned>(
        response: Result<reqwest::Response, reqwest::Error>,
    ) -> Result<T, ControlError> {
        let response =
            response.map_err(|e| ControlError::Unavailable(super::connect::chain(&e)))?;
        let status = response.status();
        if status.is_success() {
            return response
                .json::<T>()
                .await
                .map_err(|e| ControlError::Unavailable(format!("reading answer: {e}")));
        }
        let text = response.text().await.unwrap_or_default();
        let message = format!("{status}: {}", text.chars().take(500).collect::<String>());
        if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
            Err(ControlError::Unavailable(message))
        } else {
            Err(ControlError::Rejected(message))
        }
    }

    async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ControlError> {
        let response = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .await;
        Self::answer(response).await
    }
}

#[async_trait]
impl ControlPlane for HttpControlPlane {
    async fn claim(
        &self,
        message: RunMessage,
        worker_id: &str,
    ) -> Result<ClaimResult, ControlError> {
        let req = ClaimRequestV1 {
            run_id: message.run_id,
            attempt: message.attempt,
            worker_id: worker_id.to_owned(),
        };
        let answer: ClaimResponseV1 = self.post("/v1/worker/claim", &req).await?;
        ClaimResult::try_from(answer).map_err(ControlError::Rejected)
    }

    async fn started(&self, lease: Lease, container_id: &str) -> Result<LeaseStatus, ControlError> {
        let req = StartedV1 {
            lease: lease.into(),
            container_id: container_id.to_owned(),
        };
        let answer: LeaseStatusV1 = self.post("/v1/worker/started", &req).await?;
        Ok(answer.into())
    }

    async fn heartbeat(&self, lease: Lease) -> Result<LeaseStatus, ControlError> {
        let answer: LeaseStatusV1 = self
            .post(
                "/v1/worker/heartbeat",
                &HeartbeatV1 {
                    lease: lease.into(),
                },
            )
            .await?;
        Ok(answer.into())
    }

    async fn append_log(
        &self,
        lease: Lease,
        offset: u64,
        undelivered_before: u64,
        chunks: &[OutputChunk],
    ) -> Result<u64, ControlError> {
        #[derive(serde::Deserialize)]
        struct Appended {
            length: u64,
        }
        let response = self
            .http
            .put(format!("{}/v1/worker/log", self.base))
            .query(&[
                ("run_id", lease.run_id.to_string()),
                ("attempt", lease.attempt.to_string()),
                ("epoch", lease.epoch.to_string()),
                ("offset", offset.to_string()),
                ("undelivered", undelivered_before.to_string()),
            ])
            .bearer_auth(&self.token)
            .header(reqwest::header::CONTENT_TYPE, LOG_CONTENT_TYPE)
            .body(encode_log_frames(chunks))
            .send()
            .await;
        let answer: Appended = Self::answer(response).await?;
        Ok(answer.length)
    }

    async fn finish(
        &self,
        lease: Lease,
        outcome: &Outcome,
        undelivered: u64,
        usage: Option<ResourceUsage>,
    ) -> Result<LeaseStatus, ControlError> {
        let req = FinishV1 {
            lease: lease.into(),
            outcome: outcome.into(),
            log_dropped_bytes: undelivered,
            usage: usage.map(UsageV1::from),
        };
        let answer: LeaseStatusV1 = self.post("/v1/worker/finish", &req).await?;
        Ok(answer.into())
    }

    async fn held(&self, worker_id: &str) -> Result<Vec<HeldAttempt>, ControlError> {
        let req = HeldRequestV1 {
            worker_id: worker_id.to_owned(),
        };
        let answer: Vec<HeldAttemptV1> = self.post("/v1/worker/held", &req).await?;
        Ok(answer.into_iter().map(HeldAttempt::from).collect())
    }

    async fn adopt(
        &self,
        run_id: RunId,
        attempt: u32,
        worker_id: &str,
    ) -> Result<Adoption, ControlError> {
        let req = AdoptRequestV1 {
            run_id,
            attempt,
            worker_id: worker_id.to_owned(),
        };
        let answer: AdoptResponseV1 = self.post("/v1/worker/adopt", &req).await?;
        Adoption::try_from(answer).map_err(ControlError::Rejected)
    }

    async fn release(&self, lease: Lease) -> Result<LeaseStatus, ControlError> {
        let answer: LeaseStatusV1 = self
            .post(
                "/v1/worker/release",
                &ReleaseV1 {
                    lease: lease.into(),
                },
            )
            .await?;
        Ok(answer.into())
    }

    async fn open_session(&self, request: &SessionRequest) -> Result<SessionGrant, ControlError> {
        let answer: SessionGrantV1 = self
            .post("/v1/worker/session", &SessionOpenV1::from(request))
            .await?;
        SessionGrant::try_from(answer).map_err(ControlError::Rejected)
    }

    async fn renew_session(
        &self,
        worker_id: &str,
        instance: &str,
    ) -> Result<SessionRenewal, ControlError> {
        let req = SessionRefV1 {
            worker_id: worker_id.to_owned(),
            instance: instance.to_owned(),
        };
        let answer: SessionRenewalV1 = self.post("/v1/worker/session/heartbeat", &req).await?;
        Ok(answer.into())
    }

    async fn end_session(&self, worker_id: &str, instance: &str) -> Result<(), ControlError> {
        let req = SessionRefV1 {
            worker_id: worker_id.to_owned(),
            instance: instance.to_owned(),
        };
        let response = self
            .http
            .post(format!("{}/v1/worker/session/end", self.base))
            .bearer_auth(&self.token)
            .json(&req)
            .send()
            .await
            .map_err(|e| ControlError::Unavailable(super::connect::chain(&e)))?;
        if response.status().is_success() {
            return Ok(());
        }
        Self::answer::<serde_json::Value>(Ok(response))
            .await
            .map(|_| ())
    }

    async fn orphan_verdict(
        &self,
        run_id: RunId,
        attempt: u32,
        worker_id: &str,
    ) -> Result<OrphanVerdict, ControlError> {
        let req = OrphanRequestV1 {
            run_id,
            attempt,
            worker_id: worker_id.to_owned(),
        };
        let answer: OrphanVerdictV1 = self.post("/v1/worker/orphan", &req).await?;
        Ok(answer.into())
    }
}
