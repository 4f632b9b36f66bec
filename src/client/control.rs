use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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
    AdoptRequestV1, AdoptResponseV1, ClaimRequestV1, ClaimResponseV1, FinishV1, HEARTBEATS_MAX,
    HeartbeatV1, HeartbeatsAnswerV1, HeartbeatsV1, HeldAttemptV1, HeldRequestV1, LOG_CONTENT_TYPE,
    LeaseStatusV1, LeaseV1, OrphanRequestV1, OrphanVerdictV1, ReleaseV1, SessionGrantV1,
    SessionOpenV1, SessionRefV1, SessionRenewalV1, StartedV1, encode_log_frames,
};

/// The control plane of a remote `tasuki serve`, reached with the worker token: one of
/// several replicas, the next one taken when the current one cannot be reached.
pub struct HttpControlPlane {
    http: reqwest::Client,
    /// The replicas' base URLs, in the order given; never empty.
    bases: Vec<String>,
    /// The one asked first.
    current: AtomicUsize,
    token: String,
    /// Set once the server answered 404 to `/v1/worker/heartbeats` (a server from
    /// before it): leases are then renewed one call each.
    one_by_one: AtomicBool,
}

impl HttpControlPlane {
    /// `bases`: the control plane's URLs (replicas of one installation), asked in this
    /// order. With `ca_cert`, that CA (PEM) is trusted for the server's certificate
    /// besides the system's roots; an unusable file is an error naming it.
    pub fn new(
        bases: &[String],
        token: &str,
        ca_cert: Option<&Path>,
    ) -> Result<Self, ControlError> {
        let bases: Vec<String> = bases
            .iter()
            .map(|b| b.trim().trim_end_matches('/').to_owned())
            .filter(|b| !b.is_empty())
            .collect();
        if bases.is_empty() {
            return Err(ControlError::Rejected(
                "no control plane URL given (--server)".into(),
            ));
        }
        let http = super::connect::builder(ca_cert)
            .map_err(|e| ControlError::Unavailable(e.to_string()))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| ControlError::Unavailable(e.to_string()))?;
        Ok(Self {
            http,
            bases,
            current: AtomicUsize::new(0),
            token: token.to_owned(),
            one_by_one: AtomicBool::new(false),
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

    /// Renew up to `HEARTBEATS_MAX` leases in one call, or one call each on a server
    /// that does not know the batch.
    async fn renew_batch(&self, leases: &[Lease]) -> Result<Vec<LeaseStatus>, ControlError> {
        if !self.one_by_one.load(Ordering::Relaxed) {
            let body = HeartbeatsV1 {
                leases: leases.iter().copied().map(LeaseV1::from).collect(),
            };
            let response = self
                .send(|base| {
                    self.http
                        .post(format!("{base}/v1/worker/heartbeats"))
                        .json(&body)
                })
                .await;
            let unknown = matches!(&response, Ok(r) if r.status() == StatusCode::NOT_FOUND);
            if !unknown {
                let answer: HeartbeatsAnswerV1 = Self::answer(response).await?;
                if answer.statuses.len() != leases.len() {
                    return Err(ControlError::Unavailable(format!(
                        "heartbeats answered {} statuses for {} leases",
                        answer.statuses.len(),
                        leases.len()
                    )));
                }
                return Ok(answer.statuses.into_iter().map(LeaseStatus::from).collect());
            }
            tracing::info!(
                message = "the server does not renew leases together; renewing one call each"
            );
            self.one_by_one.store(true, Ordering::Relaxed);
        }
        let each = leases.iter().map(|&lease| async move {
            let answer: LeaseStatusV1 = self
                .post(
                    "/v1/worker/heartbeat",
                    &HeartbeatV1 {
                        lease: lease.into(),
                    },
                )
                .await?;
            Ok::<_, ControlError>(LeaseStatus::from(answer))
        });
        futures::future::try_join_all(each).await
    }

    async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ControlError> {
        let response = self
            .send(|base| self.http.post(format!("{base}{path}")).json(body))
            .await;
        Self::answer(response).await
    }

    /// Send a request (built for a replica's base URL) to the current replica. When it
    /// cannot be reached (the connection failed, so nothing was sent) or says it cannot
    /// serve (502, 503), the next replica is asked, each at most once per call, and
    /// stays the one asked first. A replica that took the request and did not answer
    /// in time is not asked again elsewhere within the call, since it may have done it:
    /// the caller's retry goes to the next replica.
    async fn send(
        &self,
        build: impl Fn(&str) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, reqwest::Error> {
        let count = self.bases.len();
        let first = self.current.load(Ordering::Relaxed) % count;
        let mut tried = 0;
        loop {
            let index = (first + tried) % count;
            let base = &self.bases[index];
            let result = build(base).bearer_auth(&self.token).send().await;
            tried += 1;
            let (unusable, nothing_done) = match &result {
                Err(e) => (e.is_connect() || e.is_timeout(), e.is_connect()),
                Ok(r) => {
                    let refused = matches!(
                        r.status(),
                        StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE
                    );
                    (refused, refused)
                }
            };
            if !unusable || count == 1 {
                return result;
            }
            let next = (index + 1) % count;
            if self
                .current
                .compare_exchange(index, next, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
            {
                tracing::warn!(
                    message = "control plane replica unusable; asking the next one",
                    unusable = %base,
                    next = %self.bases[next]
                );
            }
            if !nothing_done || tried == count {
                return result;
            }
        }
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

    async fn heartbeat(&self, leases: &[Lease]) -> Result<Vec<LeaseStatus>, ControlError> {
        let mut statuses = Vec::with_capacity(leases.len());
        for batch in leases.chunks(HEARTBEATS_MAX) {
            statuses.extend(self.renew_batch(batch).await?);
        }
        Ok(statuses)
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
        let body = bytes::Bytes::from(encode_log_frames(chunks));
        let query = [
            ("run_id", lease.run_id.to_string()),
            ("attempt", lease.attempt.to_string()),
            ("epoch", lease.epoch.to_string()),
            ("offset", offset.to_string()),
            ("undelivered", undelivered_before.to_string()),
        ];
        let response = self
            .send(|base| {
                self.http
                    .put(format!("{base}/v1/worker/log"))
                    .query(&query)
                    .header(reqwest::header::CONTENT_TYPE, LOG_CONTENT_TYPE)
                    .body(body.clone())
            })
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
            .send(|base| {
                self.http
                    .post(format!("{base}/v1/worker/session/end"))
                    .json(&req)
            })
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

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use axum::Json;
    use axum::routing::post;

    use super::*;

    /// Leases with epoch 0 are lost, the rest held, whichever call renews them.
    fn status_of(lease: LeaseV1) -> LeaseStatusV1 {
        let lease = Lease::from(lease);
        if lease.epoch == 0 {
            LeaseStatusV1::Lost
        } else {
            LeaseStatusV1::Held { cancel: false }
        }
    }

    /// A worker-protocol server that records the size of each heartbeat call it gets;
    /// without `batch` it has only the one-lease call (a server from before the batch).
    async fn server(batch: bool, calls: Arc<Mutex<Vec<(&'static str, usize)>>>) -> String {
        let seen = calls.clone();
        let mut app = axum::Router::new().route(
            "/v1/worker/heartbeat",
            post(move |Json(req): Json<HeartbeatV1>| async move {
                seen.lock().unwrap().push(("one", 1));
                Json(status_of(req.lease))
            }),
        );
        if batch {
            app = app.route(
                "/v1/worker/heartbeats",
                post(move |Json(req): Json<HeartbeatsV1>| async move {
                    calls.lock().unwrap().push(("batch", req.leases.len()));
                    Json(HeartbeatsAnswerV1 {
                        statuses: req.leases.into_iter().map(status_of).collect(),
                    })
                }),
            );
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}")
    }

    fn leases(n: usize) -> Vec<Lease> {
        (0..n)
            .map(|i| Lease {
                run_id: RunId::new(),
                attempt: 1,
                epoch: (i % 3) as i64,
            })
            .collect()
    }

    fn expected(leases: &[Lease]) -> Vec<LeaseStatus> {
        leases
            .iter()
            .map(|&l| LeaseStatus::from(status_of(l.into())))
            .collect()
    }

    #[tokio::test]
    async fn leases_are_renewed_in_calls_of_at_most_the_limit_and_answered_in_order() {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let control =
            HttpControlPlane::new(&[server(true, calls.clone()).await], "t", None).unwrap();
        let many = leases(HEARTBEATS_MAX + 5);
        assert_eq!(control.heartbeat(&many).await.unwrap(), expected(&many));
        assert_eq!(
            *calls.lock().unwrap(),
            vec![("batch", HEARTBEATS_MAX), ("batch", 5)]
        );
        assert!(control.heartbeat(&[]).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_server_without_the_batch_is_asked_one_lease_at_a_time_from_then_on() {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let control =
            HttpControlPlane::new(&[server(false, calls.clone()).await], "t", None).unwrap();
        let three = leases(3);
        assert_eq!(control.heartbeat(&three).await.unwrap(), expected(&three));
        assert_eq!(control.heartbeat(&three).await.unwrap(), expected(&three));
        // The first call found no batch (404, not recorded); then six single calls.
        assert_eq!(*calls.lock().unwrap(), vec![("one", 1); 6]);
        assert!(control.one_by_one.load(Ordering::Relaxed));
    }

    /// A base URL where nothing listens: a port taken and let go at once.
    async fn nobody() -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        format!("http://{addr}")
    }

    /// A replica that answers 503 to everything (its store is down), counting calls.
    async fn unavailable(calls: Arc<Mutex<u32>>) -> String {
        let app = axum::Router::new().fallback(move || async move {
            *calls.lock().unwrap() += 1;
            axum::http::StatusCode::SERVICE_UNAVAILABLE
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn an_unreachable_or_unavailable_replica_is_passed_over_for_the_next() {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let refusals = Arc::new(Mutex::new(0));
        let bases = [
            nobody().await,
            unavailable(refusals.clone()).await,
            server(true, calls.clone()).await,
        ];
        let control = HttpControlPlane::new(&bases, "t", None).unwrap();
        let two = leases(2);
        assert_eq!(control.heartbeat(&two).await.unwrap(), expected(&two));
        assert_eq!(*refusals.lock().unwrap(), 1);
        // The replica that answered is asked first from then on.
        assert_eq!(control.heartbeat(&two).await.unwrap(), expected(&two));
        assert_eq!(*refusals.lock().unwrap(), 1);
        assert_eq!(*calls.lock().unwrap(), vec![("batch", 2); 2]);
        assert_eq!(control.current.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn with_every_replica_unreachable_the_call_is_unavailable() {
        let control = HttpControlPlane::new(&[nobody().await, nobody().await], "t", None).unwrap();
        assert!(matches!(
            control.heartbeat(&leases(1)).await,
            Err(ControlError::Unavailable(_))
        ));
        assert!(matches!(
            HttpControlPlane::new(&[" ".to_owned()], "t", None),
            Err(ControlError::Rejected(_))
        ));
    }
}
