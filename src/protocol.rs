//! Wire formats shared by both sides: the AMQP run message, the worker protocol between
//! `tasuki worker` and `tasuki serve`, and the frozen run spec (also how the store keeps
//! it). Serde lives here so a change to a domain type never silently changes a format.
//! The public API's run JSON is in [`api`].

pub mod api;

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::domain::job::{PullPolicy, ResolvedSpec, Resources};
use crate::domain::ports::{
    Adoption, Claim, ClaimResult, HeldAttempt, Lease, LeaseStatus, OutputChunk, OutputPosition,
    RunMessage, SessionGrant, Stream,
};
use crate::domain::retry::RetryPolicy;
use crate::domain::run::{Outcome, ReasonCode, RunId, RunStatus};
use crate::domain::session::{OrphanVerdict, SessionRenewal, SessionRequest, WorkerSession};

/// The AMQP message body: `{"v":1,"run_id":"...","attempt":1}`. Small on purpose: the
/// spec comes from the control plane at claim time.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RunMessageV1 {
    pub v: u32,
    pub run_id: String,
    pub attempt: u32,
}

pub const MESSAGE_VERSION: u32 = 1;

impl From<RunMessage> for RunMessageV1 {
    fn from(m: RunMessage) -> Self {
        Self {
            v: MESSAGE_VERSION,
            run_id: m.run_id.to_string(),
            attempt: m.attempt,
        }
    }
}

/// Parse a message body; the error says what is wrong with it (it goes to the
/// dead-letter log).
pub fn parse_run_message(body: &[u8]) -> Result<RunMessage, String> {
    #[derive(Deserialize)]
    struct Version {
        v: u32,
    }
    let version: Version =
        serde_json::from_slice(body).map_err(|e| format!("not a tasuki run message: {e}"))?;
    if version.v != MESSAGE_VERSION {
        return Err(format!(
            "unknown message version {} (this worker reads {MESSAGE_VERSION})",
            version.v
        ));
    }
    let m: RunMessageV1 =
        serde_json::from_slice(body).map_err(|e| format!("malformed v1 run message: {e}"))?;
    let run_id = m.run_id.parse::<RunId>().map_err(|e| e.to_string())?;
    if m.attempt == 0 {
        return Err("attempt must be at least 1".to_owned());
    }
    Ok(RunMessage {
        run_id,
        attempt: m.attempt,
    })
}

/// The resolved spec as stored with the run and sent to the worker at claim time.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SpecV1 {
    pub image: String,
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub pull: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_limit: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    pub stop_grace_ms: u64,
    pub network: String,
}

impl From<&ResolvedSpec> for SpecV1 {
    fn from(s: &ResolvedSpec) -> Self {
        Self {
            image: s.image.clone(),
            command: s.command.clone(),
            workdir: s.workdir.clone(),
            user: s.user.clone(),
            env: s.env.clone(),
            pull: s.pull.as_str().to_owned(),
            cpu: s.resources.cpu,
            cpu_limit: s.resources.cpu_limit,
            memory_bytes: s.resources.memory_bytes,
            timeout_ms: s.timeout.map(|d| d.as_millis() as u64),
            stop_grace_ms: s.stop_grace.as_millis() as u64,
            network: s.network.clone(),
        }
    }
}

impl TryFrom<SpecV1> for ResolvedSpec {
    type Error = String;
    fn try_from(s: SpecV1) -> Result<Self, String> {
        Ok(Self {
            pull: PullPolicy::parse(&s.pull).map_err(|e| e.to_string())?,
            image: s.image,
            command: s.command,
            workdir: s.workdir,
            user: s.user,
            env: s.env,
            resources: Resources {
                cpu: s.cpu,
                cpu_limit: s.cpu_limit,
                memory_bytes: s.memory_bytes,
            },
            timeout: s.timeout_ms.map(Duration::from_millis),
            stop_grace: Duration::from_millis(s.stop_grace_ms),
            network: s.network,
        })
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct LeaseV1 {
    pub run_id: RunId,
    pub attempt: u32,
    pub epoch: i64,
}

impl From<Lease> for LeaseV1 {
    fn from(l: Lease) -> Self {
        Self {
            run_id: l.run_id,
            attempt: l.attempt,
            epoch: l.epoch,
        }
    }
}

impl From<LeaseV1> for Lease {
    fn from(l: LeaseV1) -> Self {
        Self {
            run_id: l.run_id,
            attempt: l.attempt,
            epoch: l.epoch,
        }
    }
}

impl Serialize for RunId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for RunId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

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
    },
    NotClaimable {
        status: String,
        attempt: u32,
    },
    UnknownRun,
}

impl From<&ClaimResult> for ClaimResponseV1 {
    fn from(r: &ClaimResult) -> Self {
        match r {
            ClaimResult::Claimed(c) => ClaimResponseV1::Claimed {
                lease: c.lease.into(),
                job: c.job.clone(),
                spec: Box::new(SpecV1::from(&c.spec)),
                lease_ttl_ms: c.lease_ttl.as_millis() as u64,
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
            } => ClaimResult::Claimed(Box::new(Claim {
                lease: lease.into(),
                job,
                spec: (*spec).try_into()?,
                lease_ttl: Duration::from_millis(lease_ttl_ms),
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
}

impl From<&SessionRequest> for SessionOpenV1 {
    fn from(r: &SessionRequest) -> Self {
        Self {
            worker_id: r.worker_id.clone(),
            instance: r.instance.clone(),
            host: r.host.clone(),
            pid: r.pid,
            lock_released_by: r.lock_released_by.clone(),
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
                ttl_ms: ttl.as_millis() as u64,
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

/// A job's retry rules as stored with each run (frozen when the run is accepted).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RetryV1 {
    pub max_attempts: u32,
    pub backoff_ms: u64,
    pub backoff_max_ms: u64,
    #[serde(default)]
    pub on_exit_codes: Vec<i64>,
    #[serde(default)]
    pub on: Vec<String>,
}

impl From<&RetryPolicy> for RetryV1 {
    fn from(p: &RetryPolicy) -> Self {
        Self {
            max_attempts: p.max_attempts,
            backoff_ms: p.backoff.as_millis() as u64,
            backoff_max_ms: p.backoff_max.as_millis() as u64,
            on_exit_codes: p.on_exit_codes.iter().copied().collect(),
            on: p.on.iter().map(|c| c.as_str().to_owned()).collect(),
        }
    }
}

impl TryFrom<RetryV1> for RetryPolicy {
    type Error = String;
    fn try_from(r: RetryV1) -> Result<Self, String> {
        Ok(Self {
            max_attempts: r.max_attempts,
            backoff: Duration::from_millis(r.backoff_ms),
            backoff_max: Duration::from_millis(r.backoff_max_ms),
            on_exit_codes: r.on_exit_codes.into_iter().collect(),
            on: r
                .on
                .iter()
                .map(|c| c.parse::<ReasonCode>().map_err(|e| e.to_string()))
                .collect::<Result<_, _>>()?,
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum OutcomeV1 {
    Exited { code: i64 },
    OomKilled { code: i64 },
    TimedOut { after_ms: u64, code: Option<i64> },
    Cancelled { code: Option<i64> },
    ImageNotFound { image: String },
    ImagePullFailed { image: String, message: String },
    DockerError { message: String },
}

impl From<&Outcome> for OutcomeV1 {
    fn from(o: &Outcome) -> Self {
        match o.clone() {
            Outcome::Exited { code } => OutcomeV1::Exited { code },
            Outcome::OomKilled { code } => OutcomeV1::OomKilled { code },
            Outcome::TimedOut { after, code } => OutcomeV1::TimedOut {
                after_ms: after.as_millis() as u64,
                code,
            },
            Outcome::Cancelled { code } => OutcomeV1::Cancelled { code },
            Outcome::ImageNotFound { image } => OutcomeV1::ImageNotFound { image },
            Outcome::ImagePullFailed { image, message } => {
                OutcomeV1::ImagePullFailed { image, message }
            }
            Outcome::DockerError { message } => OutcomeV1::DockerError { message },
        }
    }
}

impl From<OutcomeV1> for Outcome {
    fn from(o: OutcomeV1) -> Self {
        match o {
            OutcomeV1::Exited { code } => Outcome::Exited { code },
            OutcomeV1::OomKilled { code } => Outcome::OomKilled { code },
            OutcomeV1::TimedOut { after_ms, code } => Outcome::TimedOut {
                after: Duration::from_millis(after_ms),
                code,
            },
            OutcomeV1::Cancelled { code } => Outcome::Cancelled { code },
            OutcomeV1::ImageNotFound { image } => Outcome::ImageNotFound { image },
            OutcomeV1::ImagePullFailed { image, message } => {
                Outcome::ImagePullFailed { image, message }
            }
            OutcomeV1::DockerError { message } => Outcome::DockerError { message },
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
    use bytes::Bytes;

    #[test]
    fn run_message_format_is_frozen() {
        let id: RunId = "01jd0000000000000000000000".parse().unwrap();
        let m = RunMessageV1::from(RunMessage {
            run_id: id,
            attempt: 1,
        });
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            r#"{"v":1,"run_id":"01jd0000000000000000000000","attempt":1}"#
        );
        let back =
            parse_run_message(br#"{"v":1,"run_id":"01jd0000000000000000000000","attempt":1}"#)
                .unwrap();
        assert_eq!(
            back,
            RunMessage {
                run_id: id,
                attempt: 1
            }
        );
    }

    #[test]
    fn poison_messages_say_why() {
        assert!(
            parse_run_message(b"hello")
                .unwrap_err()
                .contains("not a tasuki run message")
        );
        assert!(
            parse_run_message(br#"{"v":2}"#)
                .unwrap_err()
                .contains("unknown message version 2")
        );
        assert!(
            parse_run_message(br#"{"v":1,"run_id":"x","attempt":1}"#)
                .unwrap_err()
                .contains("invalid run id")
        );
        assert!(
            parse_run_message(br#"{"v":1,"run_id":"01jd0000000000000000000000","attempt":0}"#)
                .is_err()
        );
    }

    #[test]
    fn an_adopt_answer_without_the_output_position_still_reads() {
        // As a control plane from before the output position sends it.
        let old = r#"{"result":"held","claim":{"result":"claimed",
            "lease":{"run_id":"01jd0000000000000000000000","attempt":1,"epoch":3},
            "job":"hello","spec":{"image":"img:1","command":[],"env":{},"pull":"never",
            "stop_grace_ms":1000,"network":"none"},"lease_ttl_ms":30000},"log_length":42}"#;
        let answer: AdoptResponseV1 = serde_json::from_str(old).unwrap();
        match Adoption::try_from(answer).unwrap() {
            // A control plane from before it was sent: nothing dropped on record.
            Adoption::Held { claim, output } => {
                assert_eq!(claim.lease.epoch, 3);
                assert_eq!(
                    output,
                    OutputPosition {
                        read: 42,
                        stored: 42,
                        undelivered: 0
                    }
                );
            }
            Adoption::Stale => panic!("held read as stale"),
        }
        let stale: AdoptResponseV1 = serde_json::from_str(r#"{"result":"stale"}"#).unwrap();
        assert!(matches!(Adoption::try_from(stale), Ok(Adoption::Stale)));
    }

    #[test]
    fn an_adopt_answer_carries_the_output_position_both_ways() {
        let claim = Claim {
            lease: Lease {
                run_id: "01jd0000000000000000000000".parse().unwrap(),
                attempt: 2,
                epoch: 5,
            },
            job: "hello".into(),
            spec: ResolvedSpec {
                image: "img:1".into(),
                command: vec![],
                workdir: None,
                user: None,
                env: BTreeMap::new(),
                pull: PullPolicy::Never,
                resources: Resources::default(),
                timeout: None,
                stop_grace: Duration::from_secs(1),
                network: "none".into(),
            },
            lease_ttl: Duration::from_secs(30),
        };
        let output = OutputPosition {
            read: 9,
            stored: 6,
            undelivered: 3,
        };
        let sent = AdoptResponseV1::from(&Adoption::Held {
            claim: Box::new(claim),
            output,
        });
        let json = serde_json::to_value(&sent).unwrap();
        assert_eq!(json["log_length"], 6);
        assert_eq!(json["output_read"], 9);
        assert_eq!(json["undelivered_bytes"], 3);
        let back: AdoptResponseV1 = serde_json::from_value(json).unwrap();
        match Adoption::try_from(back).unwrap() {
            Adoption::Held { output: got, .. } => assert_eq!(got, output),
            Adoption::Stale => panic!("held read as stale"),
        }
    }

    #[test]
    fn log_frames_round_trip_binary() {
        let chunks = vec![
            OutputChunk {
                stream: Stream::Stdout,
                bytes: Bytes::from_static(b"out\n"),
            },
            OutputChunk {
                stream: Stream::Stderr,
                bytes: Bytes::from_static(&[0xff, 0x00, 0xfe]),
            },
            OutputChunk {
                stream: Stream::Stdout,
                bytes: Bytes::new(),
            },
        ];
        let body = encode_log_frames(&chunks);
        assert_eq!(decode_log_frames(Bytes::from(body)).unwrap(), chunks);
        assert!(decode_log_frames(Bytes::from_static(&[1, 0, 0, 0, 0, 0, 0, 9, 1])).is_err());
        assert!(decode_log_frames(Bytes::from_static(&[7, 0, 0, 0, 0, 0, 0, 0])).is_err());
    }
}
