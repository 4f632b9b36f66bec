//! The frozen run spec (`SpecV1`): stored with the run (`runs.spec`) and sent to the
//! worker at claim time. Fields are only ever added, each with a default, so a spec
//! stored by an older tasuki still reads.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::domain::job::{
    BindMount, Capability, Hardening, LogMode, PullPolicy, ResolvedSpec, Resources,
};

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
    /// Secret environment variables by reference (`{"from_env":"DB_PASSWORD"}`): the
    /// values are read at claim time and never stored.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secret_env: BTreeMap<String, super::SecretRefV1>,
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
    /// Capabilities added back after all are dropped (`NET_RAW`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub capabilities: Vec<String>,
    /// Absent in specs stored before tasuki set one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids_limit: Option<u32>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub read_only: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<MountV1>,
    /// `"durable"` (absent) or `"fast"`: see `LogMode`.
    #[serde(default, skip_serializing_if = "is_durable")]
    pub logs: LogsV1,
}

/// A run's log mode as stored; an older spec has none and is durable.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogsV1 {
    #[default]
    Durable,
    Fast,
}

fn is_durable(l: &LogsV1) -> bool {
    *l == LogsV1::Durable
}

impl From<LogMode> for LogsV1 {
    fn from(m: LogMode) -> Self {
        match m {
            LogMode::Durable => LogsV1::Durable,
            LogMode::Fast => LogsV1::Fast,
        }
    }
}

impl From<LogsV1> for LogMode {
    fn from(m: LogsV1) -> Self {
        match m {
            LogsV1::Durable => LogMode::Durable,
            LogsV1::Fast => LogMode::Fast,
        }
    }
}

/// A bind mount in a stored spec; `source` is the host path as checked at load.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MountV1 {
    pub source: String,
    pub target: String,
    pub read_only: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl From<&ResolvedSpec> for SpecV1 {
    fn from(s: &ResolvedSpec) -> Self {
        Self {
            image: s.image.clone(),
            command: s.command.clone(),
            workdir: s.workdir.clone(),
            user: s.user.clone(),
            env: s.env.clone(),
            secret_env: s
                .secret_env
                .iter()
                .map(|(k, r)| (k.clone(), super::SecretRefV1::from(r)))
                .collect(),
            pull: s.pull.as_str().to_owned(),
            cpu: s.resources.cpu,
            cpu_limit: s.resources.cpu_limit,
            memory_bytes: s.resources.memory_bytes,
            timeout_ms: s.timeout.map(super::millis),
            stop_grace_ms: super::millis(s.stop_grace),
            network: s.network.clone(),
            capabilities: s
                .hardening
                .capabilities
                .iter()
                .map(|c| c.as_str().to_owned())
                .collect(),
            pids_limit: s.hardening.pids_limit,
            read_only: s.hardening.read_only,
            mounts: s
                .hardening
                .mounts
                .iter()
                .map(|m| MountV1 {
                    source: m.source.clone(),
                    target: m.target.clone(),
                    read_only: m.read_only,
                })
                .collect(),
            logs: s.logs.into(),
        }
    }
}

impl TryFrom<SpecV1> for ResolvedSpec {
    type Error = String;
    fn try_from(s: SpecV1) -> Result<Self, String> {
        let capabilities = s
            .capabilities
            .iter()
            .map(|c| Capability::parse(c).map_err(|e| e.to_string()))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            pull: PullPolicy::parse(&s.pull).map_err(|e| e.to_string())?,
            image: s.image,
            command: s.command,
            workdir: s.workdir,
            user: s.user,
            env: s.env,
            secret_env: s
                .secret_env
                .into_iter()
                .map(|(k, r)| (k, crate::domain::secret::SecretRef::from(r)))
                .collect(),
            resources: Resources {
                cpu: s.cpu,
                cpu_limit: s.cpu_limit,
                memory_bytes: s.memory_bytes,
            },
            timeout: s.timeout_ms.map(Duration::from_millis),
            stop_grace: Duration::from_millis(s.stop_grace_ms),
            network: s.network,
            hardening: Hardening {
                capabilities,
                pids_limit: s.pids_limit,
                read_only: s.read_only,
                mounts: s
                    .mounts
                    .into_iter()
                    .map(|m| BindMount {
                        source: m.source,
                        target: m.target,
                        read_only: m.read_only,
                    })
                    .collect(),
            },
            logs: s.logs.into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As the store holds it for a run accepted before hardening was recorded.
    const OLD: &str = r#"{"image":"img:1","command":["true"],"env":{},"pull":"never",
        "memory_bytes":16777216,"stop_grace_ms":1000,"network":"none"}"#;

    #[test]
    fn a_spec_stored_before_hardening_still_reads_and_writes_the_same() {
        let old: SpecV1 = serde_json::from_str(OLD).unwrap();
        let spec = ResolvedSpec::try_from(old.clone()).unwrap();
        assert_eq!(spec.hardening, Hardening::default());
        assert_eq!(spec.resources.memory_bytes, Some(16 << 20));
        // Nothing new is written for a spec without hardening.
        let again: serde_json::Value = serde_json::to_value(SpecV1::from(&spec)).unwrap();
        let want: serde_json::Value = serde_json::from_str(OLD).unwrap();
        assert_eq!(again, want);
    }

    #[test]
    fn hardening_is_frozen_with_the_spec() {
        let mut spec =
            ResolvedSpec::try_from(serde_json::from_str::<SpecV1>(OLD).unwrap()).unwrap();
        spec.hardening = Hardening {
            capabilities: vec![Capability::parse("CAP_NET_RAW").unwrap()],
            pids_limit: Some(64),
            read_only: true,
            mounts: vec![BindMount {
                source: "/srv/data".into(),
                target: "/data".into(),
                read_only: true,
            }],
        };
        let json = serde_json::to_value(SpecV1::from(&spec)).unwrap();
        assert_eq!(json["capabilities"], serde_json::json!(["NET_RAW"]));
        assert_eq!(json["pids_limit"], 64);
        assert_eq!(json["read_only"], true);
        assert_eq!(
            json["mounts"],
            serde_json::json!([{"source": "/srv/data", "target": "/data", "read_only": true}])
        );
        let back: SpecV1 = serde_json::from_value(json).unwrap();
        assert_eq!(ResolvedSpec::try_from(back).unwrap(), spec);
    }

    #[test]
    fn the_log_mode_is_frozen_with_the_spec_and_absent_when_durable() {
        let mut spec =
            ResolvedSpec::try_from(serde_json::from_str::<SpecV1>(OLD).unwrap()).unwrap();
        assert_eq!(spec.logs, LogMode::Durable);
        spec.logs = LogMode::Fast;
        let json = serde_json::to_value(SpecV1::from(&spec)).unwrap();
        assert_eq!(json["logs"], "fast");
        let back: SpecV1 = serde_json::from_value(json).unwrap();
        assert_eq!(ResolvedSpec::try_from(back).unwrap(), spec);
        let mut v: serde_json::Value = serde_json::from_str(OLD).unwrap();
        v["logs"] = serde_json::json!("quick");
        assert!(serde_json::from_value::<SpecV1>(v).is_err());
    }

    #[test]
    fn an_unknown_capability_in_a_stored_spec_is_an_error() {
        let mut v: serde_json::Value = serde_json::from_str(OLD).unwrap();
        v["capabilities"] = serde_json::json!(["NET_RAWR"]);
        let spec: SpecV1 = serde_json::from_value(v).unwrap();
        let e = ResolvedSpec::try_from(spec).unwrap_err();
        assert!(e.contains("NET_RAWR"), "{e}");
    }
}
