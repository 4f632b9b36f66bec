//! The worker protocol, as served to `tasuki worker` processes: claims, start, heartbeat,
//! output upload and final state. Every call needs a worker token as a bearer token (any
//! of `--worker-token` and `[[worker_tokens]]`; `auth` checks it).

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{FromRequestParts, Query, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::routing::{post, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::auth::WorkerCaller;
use super::body::json_object;
use super::{ApiError, AppState};
use crate::domain::ports::Lease;
use crate::domain::run::{ResourceUsage, RunId};
use crate::protocol::api::ErrorCodeV1;
use crate::protocol::{
    AdoptRequestV1, AdoptResponseV1, ClaimRequestV1, ClaimResponseV1, FinishV1, HEARTBEATS_MAX,
    HeartbeatV1, HeartbeatsAnswerV1, HeartbeatsV1, HeldAttemptV1, HeldRequestV1, LeaseStatusV1,
    OrphanRequestV1, OrphanVerdictV1, ReleaseV1, SessionGrantV1, SessionOpenV1, SessionRefV1,
    SessionRenewalV1, StartedV1, decode_log_frames,
};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/worker/claim", post(claim))
        .route("/v1/worker/started", post(started))
        .route("/v1/worker/heartbeat", post(heartbeat))
        .route("/v1/worker/heartbeats", post(heartbeats))
        .route("/v1/worker/log", put(append_log))
        .route("/v1/worker/finish", post(finish))
        .route("/v1/worker/held", post(held))
        .route("/v1/worker/adopt", post(adopt))
        .route("/v1/worker/release", post(release))
        .route("/v1/worker/session", post(open_session))
        .route("/v1/worker/session/heartbeat", post(renew_session))
        .route("/v1/worker/session/end", post(end_session))
        .route("/v1/worker/orphan", post(orphan))
}

/// Proof that the caller presented a worker token: set by `auth::authenticate` on
/// `/v1/worker/*` only, so a router without that middleware refuses every call.
struct WorkerAuth;

impl FromRequestParts<AppState> for WorkerAuth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &AppState) -> Result<Self, ApiError> {
        match parts.extensions.get::<WorkerCaller>() {
            Some(_) => Ok(WorkerAuth),
            None => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                ErrorCodeV1::Unauthorized,
                "missing or wrong worker token",
            )),
        }
    }
}

fn json<T: for<'de> Deserialize<'de>>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    json_object(&body?, "worker request")
}

async fn claim(
    _: WorkerAuth,
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<ClaimResponseV1>, ApiError> {
    let req: ClaimRequestV1 = json(body)?;
    if req.attempt == 0 || req.worker_id.is_empty() {
        return Err(ApiError::bad_request(
            "claim needs attempt >= 1 and a worker_id",
        ));
    }
    let message = crate::domain::ports::RunMessage {
        run_id: req.run_id,
        attempt: req.attempt,
    };
    let result = state.control.claim(message, &req.worker_id).await?;
    Ok(Json(ClaimResponseV1::from(&result)))
}

async fn started(
    _: WorkerAuth,
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<LeaseStatusV1>, ApiError> {
    let req: StartedV1 = json(body)?;
    let status = state
        .control
        .started(req.lease.into(), &req.container_id)
        .await?;
    Ok(Json(status.into()))
}

async fn heartbeat(
    _: WorkerAuth,
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<LeaseStatusV1>, ApiError> {
    let req: HeartbeatV1 = json(body)?;
    let statuses = state.control.heartbeat(&[req.lease.into()]).await?;
    let status = statuses
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::internal("the control plane answered no status for the lease"))?;
    Ok(Json(status.into()))
}

/// Every lease of a worker renewed in one call (`/v1/worker/heartbeat` renews one, as
/// workers from before this call do).
async fn heartbeats(
    _: WorkerAuth,
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<HeartbeatsAnswerV1>, ApiError> {
    let req: HeartbeatsV1 = json(body)?;
    if req.leases.len() > HEARTBEATS_MAX {
        return Err(ApiError::bad_request(format!(
            "heartbeats carries {} leases; at most {HEARTBEATS_MAX} per call",
            req.leases.len()
        )));
    }
    let leases: Vec<Lease> = req.leases.into_iter().map(Lease::from).collect();
    let statuses = state.control.heartbeat(&leases).await?;
    Ok(Json(HeartbeatsAnswerV1 {
        statuses: statuses.into_iter().map(LeaseStatusV1::from).collect(),
    }))
}

async fn finish(
    _: WorkerAuth,
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<LeaseStatusV1>, ApiError> {
    let req: FinishV1 = json(body)?;
    let status = state
        .control
        .finish(
            req.lease.into(),
            &req.outcome.into(),
            req.log_dropped_bytes,
            req.usage.map(ResourceUsage::from),
        )
        .await?;
    Ok(Json(status.into()))
}

async fn held(
    _: WorkerAuth,
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Vec<HeldAttemptV1>>, ApiError> {
    let req: HeldRequestV1 = json(body)?;
    let held = state.control.held(&req.worker_id).await?;
    Ok(Json(held.iter().map(HeldAttemptV1::from).collect()))
}

async fn adopt(
    _: WorkerAuth,
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<AdoptResponseV1>, ApiError> {
    let req: AdoptRequestV1 = json(body)?;
    let adoption = state
        .control
        .adopt(req.run_id, req.attempt, &req.worker_id)
        .await?;
    Ok(Json(AdoptResponseV1::from(&adoption)))
}

async fn release(
    _: WorkerAuth,
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<LeaseStatusV1>, ApiError> {
    let req: ReleaseV1 = json(body)?;
    let status = state.control.release(req.lease.into()).await?;
    Ok(Json(status.into()))
}

async fn open_session(
    _: WorkerAuth,
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<SessionGrantV1>, ApiError> {
    let req: SessionOpenV1 = json(body)?;
    if req.worker_id.is_empty() || req.instance.is_empty() {
        return Err(ApiError::bad_request(
            "a session needs a worker_id and an instance",
        ));
    }
    let grant = state.control.open_session(&req.into()).await?;
    Ok(Json(SessionGrantV1::from(&grant)))
}

async fn renew_session(
    _: WorkerAuth,
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<SessionRenewalV1>, ApiError> {
    let req: SessionRefV1 = json(body)?;
    let renewal = state
        .control
        .renew_session(&req.worker_id, &req.instance)
        .await?;
    Ok(Json(renewal.into()))
}

async fn end_session(
    _: WorkerAuth,
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<StatusCode, ApiError> {
    let req: SessionRefV1 = json(body)?;
    state
        .control
        .end_session(&req.worker_id, &req.instance)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn orphan(
    _: WorkerAuth,
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<OrphanVerdictV1>, ApiError> {
    let req: OrphanRequestV1 = json(body)?;
    let verdict = state
        .control
        .orphan_verdict(req.run_id, req.attempt, &req.worker_id)
        .await?;
    Ok(Json(verdict.into()))
}

#[derive(Deserialize)]
struct LogTarget {
    run_id: RunId,
    attempt: u32,
    epoch: i64,
    offset: u64,
    /// Absent from workers that do not count it.
    #[serde(default)]
    undelivered: u64,
}

#[derive(Serialize, Deserialize)]
pub struct LogAppended {
    pub length: u64,
}

/// `PUT /v1/worker/log?run_id=&attempt=&epoch=&offset=&undelivered=` with a body of log
/// frames.
async fn append_log(
    _: WorkerAuth,
    State(state): State<AppState>,
    query: Result<Query<LogTarget>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<LogAppended>, ApiError> {
    let Query(t) = query?;
    let chunks = decode_log_frames(body?).map_err(ApiError::bad_request)?;
    let lease = Lease {
        run_id: t.run_id,
        attempt: t.attempt,
        epoch: t.epoch,
    };
    let length = state
        .control
        .append_log(lease, t.offset, t.undelivered, &chunks)
        .await?;
    Ok(Json(LogAppended { length }))
}
