//! The job file format as TOML reads it: private to the catalog, spans kept so every
//! error can name its line. Nothing here is checked beyond types and known keys.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct JobFile {
    pub description: Option<Spanned<String>>,
    pub image: Option<Spanned<String>>,
    pub command: Option<Spanned<Vec<Spanned<String>>>>,
    pub workdir: Option<Spanned<String>>,
    pub user: Option<Spanned<String>>,
    pub pull: Option<Spanned<String>>,
    pub timeout: Option<Spanned<String>>,
    pub stop_grace: Option<Spanned<String>>,
    pub network: Option<Spanned<String>>,
    pub schedule: Option<Spanned<String>>,
    pub time_zone: Option<Spanned<String>>,
    #[serde(default)]
    pub env: BTreeMap<Spanned<String>, Spanned<String>>,
    #[serde(default)]
    pub resources: ResourcesFile,
    #[serde(default)]
    pub params: Params,
    pub retry: Option<RetryFile>,
}

/// The `[params.NAME]` tables, keyed by name.
pub(super) type Params = BTreeMap<Spanned<String>, ParamFile>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RetryFile {
    pub max_attempts: Option<Spanned<i64>>,
    pub backoff: Option<Spanned<String>>,
    pub backoff_max: Option<Spanned<String>>,
    #[serde(default)]
    pub on_exit_codes: Vec<Spanned<i64>>,
    #[serde(default)]
    pub on: Vec<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct ResourcesFile {
    pub cpu: Option<Spanned<i64>>,
    pub cpu_limit: Option<Spanned<f64>>,
    pub memory: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ParamFile {
    pub required: Option<bool>,
    pub default: Option<Spanned<String>>,
    pub pattern: Option<Spanned<String>>,
    pub max_length: Option<Spanned<i64>>,
    pub description: Option<String>,
}
