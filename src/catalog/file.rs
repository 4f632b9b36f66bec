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
    pub capabilities: Option<Spanned<Vec<Spanned<String>>>>,
    pub pids_limit: Option<Spanned<i64>>,
    pub read_only: Option<Spanned<bool>>,
    #[serde(default)]
    pub mounts: Vec<Spanned<MountFile>>,
    /// `"durable"` (default) or `"fast"`.
    pub logs: Option<Spanned<String>>,
    pub schedule: Option<Spanned<String>>,
    pub time_zone: Option<Spanned<String>>,
    #[serde(default)]
    pub schedules: Vec<Spanned<ScheduleFile>>,
    pub max_concurrent: Option<Spanned<i64>>,
    /// A string, or a secret's reference (`{ from_env = .. }`, `{ from_file = .. }`).
    #[serde(default)]
    pub env: BTreeMap<Spanned<String>, Spanned<toml::Value>>,
    #[serde(default)]
    pub resources: ResourcesFile,
    #[serde(default)]
    pub params: Params,
    pub retry: Option<RetryFile>,
    pub webhook: Option<Spanned<WebhookFile>>,
    pub callback: Option<CallbackFile>,
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

/// The `[webhook]` table: `POST /v1/hooks/{job}` starts the job.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct WebhookFile {
    pub signature: Option<Spanned<String>>,
    pub secrets_from_env: Option<Spanned<Vec<Spanned<String>>>>,
    pub tolerance: Option<Spanned<String>>,
    #[serde(default)]
    pub params_from: BTreeMap<Spanned<String>, Spanned<String>>,
}

/// `[callback]`: where every run of the job announces its end (unless its request names
/// another).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CallbackFile {
    pub url: Spanned<String>,
}

/// One `[[mounts]]` entry: a host path bind-mounted into the container.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct MountFile {
    pub source: Option<Spanned<String>>,
    pub target: Option<Spanned<String>>,
    pub read_only: Option<Spanned<bool>>,
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

/// One `[[schedules]]` entry.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ScheduleFile {
    pub name: Option<Spanned<String>>,
    pub cron: Option<Spanned<String>>,
    pub open_days_of_month: Option<Spanned<Vec<Spanned<i64>>>>,
    pub at: Option<Spanned<String>>,
    pub time_zone: Option<Spanned<String>>,
    pub params: Option<Spanned<BTreeMap<Spanned<String>, Spanned<String>>>>,
    pub calendar: Option<Spanned<String>>,
    pub on_closed_day: Option<Spanned<String>>,
    pub max_shift_days: Option<Spanned<i64>>,
    pub on_gap: Option<Spanned<String>>,
    pub on_fold: Option<Spanned<String>>,
    pub overlap: Option<Spanned<String>>,
    pub catch_up: Option<Spanned<String>>,
    pub catch_up_window: Option<Spanned<String>>,
    pub max_catch_up: Option<Spanned<i64>>,
    pub suspended: Option<Spanned<bool>>,
}

/// A calendar file (`calendars/NAME.toml`). Dates are TOML dates or strings, so both
/// `2026-01-01` and `"2026-01-01"` read.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CalendarFile {
    pub open_weekdays: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    pub closed: Vec<Spanned<toml::Value>>,
    #[serde(default)]
    pub open: Vec<Spanned<toml::Value>>,
    #[serde(default)]
    pub closed_from: Vec<Spanned<String>>,
    #[serde(default)]
    pub include: Vec<Spanned<String>>,
}
