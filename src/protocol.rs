//! Wire formats shared by both sides: the AMQP run message, the worker protocol between
//! `tasuki worker` and `tasuki serve` (in [`worker`]), and the frozen run spec (also how
//! the store keeps it, in `spec`). Serde lives here so a change to a domain type never
//! silently changes a format. The public API's run JSON is in [`api`]; a run's stored trigger and
//! admission rule in `stored`.

pub mod api;
pub mod request;
pub mod schedules;
mod spec;
mod stored;
pub mod worker;

pub use spec::*;
pub use stored::*;
pub use worker::*;

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::domain::ports::{Lease, RunMessage};
use crate::domain::retry::RetryPolicy;
use crate::domain::run::{Outcome, ReasonCode, RunId};
use crate::domain::secret::{Secret, SecretRef};

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

/// A duration as the wire and the store carry it: whole milliseconds, saturating (a
/// job file cannot give more, see `domain::job::MAX_KEPT_DURATION`), never wrapping.
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A secret's reference as job files, the server config and the stored spec write it:
/// `{"from_env":"NAME"}` or `{"from_file":"/path"}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(untagged, deny_unknown_fields)]
pub enum SecretRefV1 {
    FromEnv { from_env: String },
    FromFile { from_file: PathBuf },
}

impl From<&SecretRef> for SecretRefV1 {
    fn from(r: &SecretRef) -> Self {
        match r {
            SecretRef::Env(name) => SecretRefV1::FromEnv {
                from_env: name.clone(),
            },
            SecretRef::File(path) => SecretRefV1::FromFile {
                from_file: path.clone(),
            },
        }
    }
}

impl From<SecretRefV1> for SecretRef {
    fn from(r: SecretRefV1) -> Self {
        match r {
            SecretRefV1::FromEnv { from_env } => SecretRef::Env(from_env),
            SecretRefV1::FromFile { from_file } => SecretRef::File(from_file),
        }
    }
}

/// A secret's value on the wire (the claim answer only) is its plain text; `Debug` of
/// every body that holds one still prints `[redacted]`.
impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.expose())
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret::new)
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
            backoff_ms: millis(p.backoff),
            backoff_max_ms: millis(p.backoff_max),
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
    Exited {
        code: i64,
    },
    OomKilled {
        code: i64,
    },
    TimedOut {
        after_ms: u64,
        code: Option<i64>,
    },
    Cancelled {
        code: Option<i64>,
    },
    ImageNotFound {
        image: String,
    },
    ImagePullFailed {
        image: String,
        message: String,
        /// Absent (false) from workers that do not tell it apart.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        unauthorized: bool,
    },
    DockerError {
        message: String,
    },
    /// Written by the control plane itself (a claim whose secret could not be read);
    /// no worker sends it.
    SecretUnavailable {
        message: String,
    },
}

impl From<&Outcome> for OutcomeV1 {
    fn from(o: &Outcome) -> Self {
        match o.clone() {
            Outcome::Exited { code } => OutcomeV1::Exited { code },
            Outcome::OomKilled { code } => OutcomeV1::OomKilled { code },
            Outcome::TimedOut { after, code } => OutcomeV1::TimedOut {
                after_ms: millis(after),
                code,
            },
            Outcome::Cancelled { code } => OutcomeV1::Cancelled { code },
            Outcome::ImageNotFound { image } => OutcomeV1::ImageNotFound { image },
            Outcome::ImagePullFailed {
                image,
                message,
                unauthorized,
            } => OutcomeV1::ImagePullFailed {
                image,
                message,
                unauthorized,
            },
            Outcome::DockerError { message } => OutcomeV1::DockerError { message },
            Outcome::SecretUnavailable { message } => OutcomeV1::SecretUnavailable { message },
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
            OutcomeV1::ImagePullFailed {
                image,
                message,
                unauthorized,
            } => Outcome::ImagePullFailed {
                image,
                message,
                unauthorized,
            },
            OutcomeV1::DockerError { message } => Outcome::DockerError { message },
            OutcomeV1::SecretUnavailable { message } => Outcome::SecretUnavailable { message },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::domain::job::{PullPolicy, ResolvedSpec, Resources};
    use crate::domain::ports::{Adoption, Claim, OutputChunk, OutputPosition, Stream};
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
                logs: Default::default(),
                image: "img:1".into(),
                command: vec![],
                workdir: None,
                user: None,
                env: BTreeMap::new(),
                secret_env: BTreeMap::new(),
                pull: PullPolicy::Never,
                resources: Resources::default(),
                timeout: None,
                stop_grace: Duration::from_secs(1),
                network: "none".into(),
                hardening: Default::default(),
            },
            lease_ttl: Duration::from_secs(30),
            secrets: Default::default(),
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

    /// Found by `fuzz/fuzz_targets/job_file.rs` (a job's spec must read back from its
    /// stored form): a duration past `u64::MAX` milliseconds was stored as
    /// `as_millis() as u64`, wrapped to some other duration.
    #[test]
    fn fuzz_stored_durations_saturate_instead_of_wrapping() {
        let huge = Duration::from_secs(u64::MAX);
        assert_eq!(millis(huge), u64::MAX);
        assert_eq!(millis(Duration::from_millis(1500)), 1500);
        let spec = ResolvedSpec {
            logs: Default::default(),
            image: "img".into(),
            command: vec![],
            workdir: None,
            user: None,
            env: BTreeMap::new(),
            pull: PullPolicy::Never,
            resources: Resources::default(),
            timeout: Some(huge),
            stop_grace: huge,
            network: "none".into(),
            secret_env: BTreeMap::new(),
            hardening: Default::default(),
        };
        let stored = SpecV1::from(&spec);
        assert_eq!(stored.timeout_ms, Some(u64::MAX));
        assert_eq!(stored.stop_grace_ms, u64::MAX);
        let retry = RetryPolicy {
            backoff: huge,
            backoff_max: huge,
            ..RetryPolicy::default()
        };
        assert_eq!(RetryV1::from(&retry).backoff_max_ms, u64::MAX);
    }
}

#[cfg(test)]
mod secrets_tests;
