//! The worker protocol between `tasuki worker` and `tasuki serve`: claims, lease
//! answers, final states, reconciliation, sessions and orphans, and the framing of log
//! uploads. Every body is versioned by its type name (`...V1`).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::api::UsageV1;
use super::{LeaseV1, OutcomeV1, SpecV1};
use crate::domain::ports::{
    Adoption, Claim, ClaimResult, HeldAttempt, LeaseStatus, OutputChunk, OutputPosition,
    SessionGrant, Stream,
};
use crate::domain::run::{RunId, RunStatus};
use crate::domain::secret::{ClaimSecrets, RegistryCredentials, Secret};
use crate::domain::session::{OrphanVerdict, SessionRenewal, SessionRequest, WorkerSession};

/// `POST /v1/worker/claims`
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClaimRequestV1 {
    pub run_id: RunId,
    pub attempt: u32,
    pub worker_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum ClaimResponseV1 {
    Claimed {
        lease: LeaseV1,
        job: String,
        spec: Box<SpecV1>,
        lease_ttl_ms: u64,
        /// The values of the spec's secret references, for this claim only. Absent when
        /// there are none; a worker from before it ignores it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        secrets: Option<ClaimSecretsV1>,
    },
    NotClaimable {
        status: String,
        attempt: u32,
    },
    UnknownRun,
}

/// The secrets of a claim on the wire. Their values are plain text here (the worker
/// protocol should run over TLS); `Debug` prints `[redacted]` for each.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClaimSecretsV1 {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, Secret>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry: Option<RegistryCredentialsV1>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RegistryCredentialsV1 {
    pub registry: String,
    pub username: String,
    pub password: Secret,
}

impl From<&ClaimSecrets> for ClaimSecretsV1 {
    fn from(s: &ClaimSecrets) -> Self {
        Self {
            env: s.env.clone(),
            registry: s.registry.as_ref().map(|r| RegistryCredentialsV1 {
                registry: r.registry.clone(),
                username: r.username.clone(),
                password: r.password.clone(),
            }),
        }
    }
}

impl From<ClaimSecretsV1> for ClaimSecrets {
    fn from(s: ClaimSecretsV1) -> Self {
        Self {
            env: s.env,
            registry: s.registry.map(|r| RegistryCredentials {
                registry: r.registry,
                username: r.username,
                password: r.password,
            }),
        }
    }
}

impl From<&ClaimResult> for ClaimResponseV1 {
    fn from(r: &ClaimResult) -> Self {
        match r {
            ClaimResult::Claimed(c) => ClaimResponseV1::Claimed {
                lease: c.lease.into(),
                job: c.job.clone(),
                spec: Box::new(SpecV1::from(&c.spec)),
                lease_ttl_ms: super::millis(c.lease_ttl),
                secrets: (!c.secrets.is_empty()).then(|| ClaimSecretsV1::from(&c.secrets)),
            },
            ClaimResult::NotClaimable { status, attempt } => ClaimResponseV1::NotClaimable {
                status: status.as_str().to_owned(),
                attempt: *attempt,
            },
            ClaimResult::UnknownRun => ClaimResponseV1::UnknownRun,
        }
    }
}

impl TryFrom<ClaimResponseV1> for ClaimResult {
    type Error = String;
    fn try_from(r: ClaimResponseV1) -> Result<Self, String> {
        Ok(match r {
            ClaimResponseV1::Claimed {
                lease,
                job,
                spec,
                lease_ttl_ms,
                secrets,
            } => ClaimResult::Claimed(Box::new(Claim {
                lease: lease.into(),
                job,
                spec: (*spec).try_into()?,
                lease_ttl: Duration::from_millis(lease_ttl_ms),
                secrets: secrets.map(ClaimSecrets::from).unwrap_or_default(),
            })),
            ClaimResponseV1::NotClaimable { status, attempt } => ClaimResult::NotClaimable {
                status: status.parse::<RunStatus>().map_err(|e| e.to_string())?,
                attempt,
            },
            ClaimResponseV1::UnknownRun => ClaimResult::UnknownRun,
        })
    }
}

/// `POST /v1/worker/started`
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StartedV1 {
    pub lease: LeaseV1,
    pub container_id: String,
}

/// `POST /v1/worker/heartbeat`
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeartbeatV1 {
    pub lease: LeaseV1,
}

/// `POST /v1/worker/heartbeats`: every lease a worker holds, renewed in one call.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeartbeatsV1 {
    pub leases: Vec<LeaseV1>,
}

/// The most leases one `POST /v1/worker/heartbeats` may carry; a worker holding more
/// sends several.
pub const HEARTBEATS_MAX: usize = 1024;

/// The answer to `POST /v1/worker/heartbeats`: one status per lease, in the order asked.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeartbeatsAnswerV1 {
    pub statuses: Vec<LeaseStatusV1>,
}

/// The answer to started, heartbeat and finish.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "lease", rename_all = "snake_case")]
pub enum LeaseStatusV1 {
    Held { cancel: bool },
    Lost,
}

impl From<LeaseStatus> for LeaseStatusV1 {
    fn from(s: LeaseStatus) -> Self {
        match s {
            LeaseStatus::Held { cancel } => LeaseStatusV1::Held { cancel },
            LeaseStatus::Lost => LeaseStatusV1::Lost,
        }
    }
}

impl From<LeaseStatusV1> for LeaseStatus {
    fn from(s: LeaseStatusV1) -> Self {
        match s {
            LeaseStatusV1::Held { cancel } => LeaseStatus::Held { cancel },
            LeaseStatusV1::Lost => LeaseStatus::Lost,
        }
    }
}

/// `POST /v1/worker/finish`
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FinishV1 {
    pub lease: LeaseV1,
    pub outcome: OutcomeV1,
    /// Output the worker could not deliver at all, all told (an earlier life's too).
    #[serde(default)]
    pub log_dropped_bytes: u64,
    /// What the container used, as far as the worker read it; absent from workers that
    /// do not sample (or read nothing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageV1>,
}

/// `POST /v1/worker/held`: which attempts does the control plane think I hold?
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeldRequestV1 {
    pub worker_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HeldAttemptV1 {
    pub lease: LeaseV1,
    pub container_id: Option<String>,
}

impl From<&HeldAttempt> for HeldAttemptV1 {
    fn from(h: &HeldAttempt) -> Self {
        Self {
            lease: h.lease.into(),
            container_id: h.container_id.clone(),
        }
    }
}

impl From<HeldAttemptV1> for HeldAttempt {
    fn from(h: HeldAttemptV1) -> Self {
        Self {
            lease: h.lease.into(),
            container_id: h.container_id,
        }
    }
}

/// `POST /v1/worker/adopt`: I found my container for this attempt.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdoptRequestV1 {
    pub run_id: RunId,
    pub attempt: u32,
    pub worker_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum AdoptResponseV1 {
    Held {
        claim: ClaimResponseV1,
        /// The stored log's length: where the next write goes.
        log_length: u64,
        /// Bytes of the container's output handled (stored or dropped); a control plane
        /// from before it was sent means `log_length`.
        #[serde(default)]
        output_read: u64,
        /// Of those, the bytes the worker could not deliver, all told.
        #[serde(default)]
        undelivered_bytes: u64,
    },
    Stale,
}

impl From<&Adoption> for AdoptResponseV1 {
    fn from(a: &Adoption) -> Self {
        match a {
            Adoption::Held { claim, output } => AdoptResponseV1::Held {
                claim: ClaimResponseV1::from(&ClaimResult::Claimed(claim.clone())),
                log_length: output.stored,
                output_read: output.read,
                undelivered_bytes: output.undelivered,
            },
            Adoption::Stale => AdoptResponseV1::Stale,
        }
    }
}

impl TryFrom<AdoptResponseV1> for Adoption {
    type Error = String;
    fn try_from(r: AdoptResponseV1) -> Result<Self, String> {
        match r {
            AdoptResponseV1::Stale => Ok(Adoption::Stale),
            AdoptResponseV1::Held {
                claim,
                log_length,
                output_read,
                undelivered_bytes,
            } => match ClaimResult::try_from(claim)? {
                ClaimResult::Claimed(claim) => {
                    // Nothing stored was not read first.
                    let read = output_read.max(log_length);
                    Ok(Adoption::Held {
                        claim,
                        output: OutputPosition {
                            read,
                            stored: log_length,
                            undelivered: undelivered_bytes.min(read - log_length),
                        },
                    })
                }
                _ => Err("adopt answered `held` without a claim".to_owned()),
            },
        }
    }
}

/// `POST /v1/worker/release`: the attempt's container never started; queue it again.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReleaseV1 {
    pub lease: LeaseV1,
}

/// `POST /v1/worker/session`: a worker process starting under `worker_id`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionOpenV1 {
    pub worker_id: String,
    pub instance: String,
    pub host: String,
    pub pid: u32,
    /// The instance that held this host's lock for the id before; it is dead.
    pub lock_released_by: Option<String>,
    /// The worker's build (`tasuki --version`). Absent from a worker built before it;
    /// a control plane from before it ignores it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<String>,
}

impl From<&SessionRequest> for SessionOpenV1 {
    fn from(r: &SessionRequest) -> Self {
        Self {
            worker_id: r.worker_id.clone(),
            instance: r.instance.clone(),
            host: r.host.clone(),
            pid: r.pid,
            lock_released_by: r.lock_released_by.clone(),
            build: r.build.clone(),
        }
    }
}

impl From<SessionOpenV1> for SessionRequest {
    fn from(r: SessionOpenV1) -> Self {
        Self {
            worker_id: r.worker_id,
            instance: r.instance,
            host: r.host,
            pid: r.pid,
            lock_released_by: r.lock_released_by,
            build: r.build,
        }
    }
}

/// A live session, as a refusal names it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionV1 {
    pub worker_id: String,
    pub instance: String,
    pub host: String,
    pub pid: u32,
    /// RFC 3339.
    pub started_at: String,
    pub expires_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum SessionGrantV1 {
    Granted { ttl_ms: u64 },
    Refused { live: SessionV1 },
}

impl From<&SessionGrant> for SessionGrantV1 {
    fn from(g: &SessionGrant) -> Self {
        match g {
            SessionGrant::Granted { ttl } => SessionGrantV1::Granted {
                ttl_ms: super::millis(*ttl),
            },
            SessionGrant::Refused { live } => SessionGrantV1::Refused {
                live: SessionV1 {
                    worker_id: live.worker_id.clone(),
                    instance: live.instance.clone(),
                    host: live.host.clone(),
                    pid: live.pid,
                    started_at: live.started_at.to_rfc3339(),
                    expires_at: live.expires_at.to_rfc3339(),
                },
            },
        }
    }
}

impl TryFrom<SessionGrantV1> for SessionGrant {
    type Error = String;
    fn try_from(g: SessionGrantV1) -> Result<Self, String> {
        let time = |field: &str, text: &str| {
            chrono::DateTime::parse_from_rfc3339(text)
                .map(|t| t.with_timezone(&chrono::Utc))
                .map_err(|e| format!("session {field} `{text}`: {e}"))
        };
        Ok(match g {
            SessionGrantV1::Granted { ttl_ms } => SessionGrant::Granted {
                ttl: Duration::from_millis(ttl_ms),
            },
            SessionGrantV1::Refused { live } => SessionGrant::Refused {
                live: WorkerSession {
                    worker_id: live.worker_id,
                    instance: live.instance,
                    host: live.host,
                    pid: live.pid,
                    started_at: time("started_at", &live.started_at)?,
                    expires_at: time("expires_at", &live.expires_at)?,
                    ended_at: None,
                },
            },
        })
    }
}

/// `POST /v1/worker/session/heartbeat` and `POST /v1/worker/session/end`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionRefV1 {
    pub worker_id: String,
    pub instance: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "session", rename_all = "snake_case")]
pub enum SessionRenewalV1 {
    Renewed,
    Superseded,
}

impl From<SessionRenewal> for SessionRenewalV1 {
    fn from(r: SessionRenewal) -> Self {
        match r {
            SessionRenewal::Renewed => SessionRenewalV1::Renewed,
            SessionRenewal::Superseded => SessionRenewalV1::Superseded,
        }
    }
}

impl From<SessionRenewalV1> for SessionRenewal {
    fn from(r: SessionRenewalV1) -> Self {
        match r {
            SessionRenewalV1::Renewed => SessionRenewal::Renewed,
            SessionRenewalV1::Superseded => SessionRenewal::Superseded,
        }
    }
}

/// `POST /v1/worker/orphan`: may I remove this container of another worker id?
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OrphanRequestV1 {
    pub run_id: RunId,
    pub attempt: u32,
    pub worker_id: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum OrphanVerdictV1 {
    Remove,
    Keep,
}

impl From<OrphanVerdict> for OrphanVerdictV1 {
    fn from(v: OrphanVerdict) -> Self {
        match v {
            OrphanVerdict::Remove => OrphanVerdictV1::Remove,
            OrphanVerdict::Keep => OrphanVerdictV1::Keep,
        }
    }
}

impl From<OrphanVerdictV1> for OrphanVerdict {
    fn from(v: OrphanVerdictV1) -> Self {
        match v {
            OrphanVerdictV1::Remove => OrphanVerdict::Remove,
            OrphanVerdictV1::Keep => OrphanVerdict::Keep,
        }
    }
}

/// Log upload body (`PUT /v1/worker/log?run_id=R&attempt=N&epoch=E&offset=O&undelivered=U`,
/// `undelivered` being the bytes the worker could not deliver before these, all told;
/// absent means 0):
/// frames of `[stream: u8][0,0,0][len: u32 big-endian][len bytes]`, stream 1 = stdout,
/// 2 = stderr (the same framing Docker uses for attach), so stream identity survives the
/// trip without copying bytes into JSON.
pub const LOG_CONTENT_TYPE: &str = "application/vnd.tasuki.log-frames";

pub fn encode_log_frames(chunks: &[OutputChunk]) -> Vec<u8> {
    let total: usize = chunks.iter().map(|c| c.bytes.len() + 8).sum();
    let mut out = Vec::with_capacity(total);
    for c in chunks {
        let tag = match c.stream {
            Stream::Stdout => 1u8,
            Stream::Stderr => 2u8,
        };
        out.push(tag);
        out.extend_from_slice(&[0, 0, 0]);
        out.extend_from_slice(&(c.bytes.len() as u32).to_be_bytes());
        out.extend_from_slice(&c.bytes);
    }
    out
}

pub fn decode_log_frames(mut body: bytes::Bytes) -> Result<Vec<OutputChunk>, String> {
    let mut chunks = Vec::new();
    while !body.is_empty() {
        if body.len() < 8 {
            return Err(format!(
                "truncated log frame header ({} bytes left)",
                body.len()
            ));
        }
        let stream = match body[0] {
            1 => Stream::Stdout,
            2 => Stream::Stderr,
            other => return Err(format!("unknown log stream tag {other}")),
        };
        // Bytes 1-3 are always zero: anything else is not a frame this protocol wrote.
        if body[1..4] != [0, 0, 0] {
            return Err(format!(
                "log frame header bytes 1-3 are {:?}, not zero",
                &body[1..4]
            ));
        }
        let len = u32::from_be_bytes([body[4], body[5], body[6], body[7]]) as usize;
        if body.len() < 8 + len {
            return Err(format!(
                "log frame says {len} bytes but {} remain",
                body.len() - 8
            ));
        }
        let _ = body.split_to(8);
        chunks.push(OutputChunk {
            stream,
            bytes: body.split_to(len),
        });
    }
    Ok(chunks)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by `fuzz/fuzz_targets/log_frames.rs`: a header whose bytes 1-3 were not
    /// zero decoded all the same, so one upload had several encodings (and a corrupt
    /// one was stored as output).
    #[test]
    fn fuzz_a_frame_header_with_nonzero_padding_is_refused() {
        let e =
            decode_log_frames(bytes::Bytes::from_static(&[1, 1, 0, 0, 0, 0, 0, 0])).unwrap_err();
        assert!(e.contains("bytes 1-3"), "{e}");
        assert!(decode_log_frames(bytes::Bytes::from_static(&[2, 0, 0, 7, 0, 0, 0, 0])).is_err());
        let chunk =
            decode_log_frames(bytes::Bytes::from_static(&[2, 0, 0, 0, 0, 0, 0, 1, b'x'])).unwrap();
        assert_eq!(chunk[0].stream, Stream::Stderr);
        assert_eq!(&chunk[0].bytes[..], b"x");
    }

    /// A worker from before usage sends none; one with usage carries it whole.
    #[test]
    fn a_finish_report_may_carry_usage() {
        let old = r#"{"lease":{"run_id":"01HZZZZZZZZZZZZZZZZZZZZZZZ","attempt":1,"epoch":3},
            "outcome":{"kind":"exited","code":0},"log_dropped_bytes":0}"#;
        let old: FinishV1 = serde_json::from_str(old).expect("an old worker's report");
        assert_eq!(old.usage, None);
        let usage = UsageV1 {
            peak_memory_bytes: 41_943_040,
            cpu_seconds: 0.83,
            memory_limit_bytes: Some(67_108_864),
            cpu_limit: None,
            samples: 4,
        };
        let new = FinishV1 {
            usage: Some(usage),
            ..old
        };
        let text = serde_json::to_string(&new).expect("serialize");
        let back: FinishV1 = serde_json::from_str(&text).expect("round trip");
        assert_eq!(back.usage, Some(usage));
    }
}
