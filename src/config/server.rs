//! The server config file (`tasuki serve --config tasuki.toml`): API and worker tokens,
//! what is open without one, limits, the container policy and registry credentials.
//!
//! Every key is also an environment variable: `TASUKI_` and the key's path, upper case,
//! joined by `_` (`[limits] rate_per_second` is `TASUKI_LIMITS_RATE_PER_SECOND`; the
//! arrays and tables `tokens`, `worker_tokens` and `registries` are `TASUKI_TOKENS` and
//! so on, written as a TOML inline value). An environment variable wins over the file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::domain::job::{ContainerPolicy, PolicyError, Refusal};
use crate::domain::secret::{RegistryLogin, SecretRef};

/// The prefix of every environment variable that sets a config key.
pub const ENV_PREFIX: &str = "TASUKI_";

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// API tokens: what a caller may do, by job name glob.
    #[serde(default)]
    pub tokens: Vec<TokenEntry>,
    /// Tokens that open only the worker protocol (`/v1/worker/*`); several may be live.
    #[serde(default)]
    pub worker_tokens: Vec<WorkerTokenEntry>,
    #[serde(default)]
    pub auth: AuthSection,
    #[serde(default)]
    pub limits: LimitsSection,
    #[serde(default)]
    pub containers: ContainersSection,
    /// Credentials for pulls, by registry host (`"registry.example:5000"`).
    #[serde(default)]
    pub registries: BTreeMap<String, RegistryEntry>,
}

/// `[[tokens]]`: an API token. Only the SHA-256 of its value is kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    pub name: String,
    /// Hex SHA-256 of the token's value.
    pub sha256: String,
    /// `run:GLOB`, `read:GLOB`, `cancel:GLOB` or `admin`.
    #[serde(default)]
    pub scopes: Vec<String>,
}

/// `[[worker_tokens]]`: a token for `tasuki worker` processes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerTokenEntry {
    pub name: String,
    pub sha256: String,
}

/// `[auth]`: which read-only endpoints answer without a token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSection {
    /// `/readyz` without a token (load balancers); `/healthz` is always open.
    pub open_readyz: bool,
    /// `/metrics` without a token (Prometheus scrapers).
    pub open_metrics: bool,
}

impl Default for AuthSection {
    fn default() -> Self {
        AuthSection {
            open_readyz: true,
            open_metrics: false,
        }
    }
}

/// `[limits]`: what one caller, one request or one connection may take.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    /// Requests per second per token (sustained); over it, 429 with `Retry-After`.
    pub rate_per_second: u32,
    /// Requests a token may make at once above the sustained rate.
    pub burst: u32,
    /// `?wait` holds and log follows open at once per token.
    pub max_holds_per_token: u32,
    /// Parameters in one run request.
    pub max_params: u32,
    /// Bytes of one parameter value.
    pub max_param_bytes: u32,
    /// Bytes of a request's headers, all together.
    pub max_header_bytes: u32,
    /// Header lines in one request.
    pub max_headers: u32,
    /// Time a client has to send its request's headers.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// Time a client has to send its request's body.
    #[serde(with = "humantime_serde")]
    pub body_timeout: Duration,
}

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection {
            rate_per_second: 50,
            burst: 100,
            max_holds_per_token: 64,
            max_params: 64,
            max_param_bytes: 8 * 1024,
            max_header_bytes: 16 * 1024,
            max_headers: 64,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
        }
    }
}

impl LimitsSection {
    /// Refuses limits that would make the server refuse everything (or panic deep in
    /// the HTTP stack): zero sizes and timeouts, a burst of zero. `rate_per_second = 0`
    /// turns the rate limit off.
    pub fn check(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            origin: format!(
                "[limits] {key} (TASUKI_LIMITS_{})",
                key.to_ascii_uppercase()
            ),
            message,
        };
        if self.rate_per_second > 0 && self.burst == 0 {
            return Err(invalid(
                "burst",
                "must be at least 1 while rate_per_second is set".to_owned(),
            ));
        }
        let counts = [
            ("max_holds_per_token", self.max_holds_per_token),
            ("max_params", self.max_params),
            ("max_param_bytes", self.max_param_bytes),
            ("max_headers", self.max_headers),
        ];
        for (key, value) in counts {
            if value == 0 {
                return Err(invalid(key, "must be at least 1".to_owned()));
            }
        }
        if self.max_header_bytes < MIN_HEADER_BYTES {
            return Err(invalid(
                "max_header_bytes",
                format!(
                    "{} is too small to hold a request line and a token; at least {MIN_HEADER_BYTES}",
                    self.max_header_bytes
                ),
            ));
        }
        for (key, value) in [
            ("header_timeout", self.header_timeout),
            ("body_timeout", self.body_timeout),
        ] {
            if value.is_zero() {
                return Err(invalid(key, "must be longer than 0s".to_owned()));
            }
        }
        Ok(())
    }
}

/// The smallest `max_header_bytes` taken.
pub const MIN_HEADER_BYTES: u32 = 1024;

/// `[containers]`: the hardening every container gets, and how far a job may loosen it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ContainersSection {
    /// Memory limit of a job that sets none (`512MiB`).
    pub default_memory: String,
    /// Processes (and threads) one container may have; a job may ask for fewer.
    pub pids_limit: u32,
    /// Linux capabilities a job may add back (`NET_BIND_SERVICE`); all are dropped
    /// otherwise.
    pub allowed_capabilities: Vec<String>,
    /// Host directories under which a job may bind-mount; none by default.
    pub allowed_mounts: Vec<PathBuf>,
}

impl Default for ContainersSection {
    fn default() -> Self {
        ContainersSection {
            default_memory: "512MiB".to_owned(),
            pids_limit: 512,
            allowed_capabilities: Vec::new(),
            allowed_mounts: Vec::new(),
        }
    }
}

impl ContainersSection {
    /// The domain's policy from these settings; a bad value names its key.
    pub fn policy(&self) -> Result<ContainerPolicy, ConfigError> {
        let mounts = self
            .allowed_mounts
            .iter()
            .map(|p| {
                p.to_str().map(str::to_owned).ok_or_else(|| {
                    ConfigError::Containers(PolicyError::Mount(Refusal(format!(
                        "{p:?} is not UTF-8"
                    ))))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        ContainerPolicy::new(
            &self.default_memory,
            self.pids_limit,
            &self.allowed_capabilities,
            &mounts,
        )
        .map_err(ConfigError::Containers)
    }
}

/// A value read from the server's environment or a file instead of being written here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged, deny_unknown_fields)]
pub enum SecretSource {
    FromEnv { from_env: String },
    FromFile { from_file: PathBuf },
}

/// `[registries."host"]`: credentials for pulls from one registry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryEntry {
    pub username: String,
    pub password: SecretSource,
}

/// The config file could not be used; each names the file or variable and the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error("{origin}: {message}")]
    Invalid { origin: String, message: String },
    #[error("[containers] {0}")]
    Containers(PolicyError),
}

impl ServerConfig {
    /// Reads `path` (if given), then lays the `TASUKI_*` variables of `env` over it.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<ServerConfig, ConfigError> {
        let (mut table, origin) = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                let table: toml::Table = toml::from_str(&text).map_err(|e| ConfigError::Parse {
                    path: path.to_owned(),
                    message: e.to_string(),
                })?;
                (table, path.display().to_string())
            }
            None => (toml::Table::new(), "the configuration".to_owned()),
        };
        let keys = env_keys();
        let mut used = Vec::new();
        for (var, value) in env {
            let Some(path) = keys.get(&var) else { continue };
            let value = env_value(&value).map_err(|message| ConfigError::Env {
                var: var.clone(),
                message,
            })?;
            set_path(&mut table, path, value);
            used.push(var);
        }
        let origin = if used.is_empty() {
            origin
        } else {
            format!("{origin} (with {})", used.join(", "))
        };
        ServerConfig::deserialize(toml::Value::Table(table)).map_err(|e| ConfigError::Invalid {
            origin,
            message: e.to_string(),
        })
    }
}

impl ServerConfig {
    /// The `[registries]` logins as the control plane reads them, by registry host. A
    /// key is a host as image references write it (`reg.example:5000`, `docker.io` for
    /// images that name none): a URL would never match an image, so it is refused.
    pub fn registry_logins(&self) -> Result<BTreeMap<String, RegistryLogin>, ConfigError> {
        let mut logins = BTreeMap::new();
        for (host, entry) in &self.registries {
            let malformed = host.is_empty()
                || host.contains("://")
                || host.contains('/')
                || host
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_ascii_uppercase());
            if malformed {
                return Err(ConfigError::Invalid {
                    origin: format!("[registries.{host:?}]"),
                    message: "the key must be a registry host as image references name it, \
                              e.g. \"reg.example:5000\" or \"docker.io\" (no scheme, no path, \
                              lower case)"
                        .to_owned(),
                });
            }
            if entry.username.is_empty() {
                return Err(ConfigError::Invalid {
                    origin: format!("[registries.{host:?}]"),
                    message: "username must not be empty".to_owned(),
                });
            }
            logins.insert(
                host.clone(),
                RegistryLogin {
                    username: entry.username.clone(),
                    password: SecretRef::from(&entry.password),
                },
            );
        }
        Ok(logins)
    }
}

impl From<&SecretSource> for SecretRef {
    fn from(s: &SecretSource) -> Self {
        match s {
            SecretSource::FromEnv { from_env } => SecretRef::Env(from_env.clone()),
            SecretSource::FromFile { from_file } => SecretRef::File(from_file.clone()),
        }
    }
}

/// Every key path of the config, by the environment variable that sets it.
pub fn env_keys() -> BTreeMap<String, Vec<String>> {
    let mut keys = BTreeMap::new();
    let defaults = toml::Table::try_from(ServerConfig::default()).unwrap_or_default();
    // Arrays and maps of tables are set whole; an empty default serializes to nothing.
    for top in ["tokens", "worker_tokens", "registries"] {
        keys.insert(env_name(&[top]), vec![top.to_owned()]);
    }
    for (section, value) in &defaults {
        match value {
            toml::Value::Table(inner) => {
                for key in inner.keys() {
                    keys.insert(
                        env_name(&[section, key]),
                        vec![section.clone(), key.clone()],
                    );
                }
            }
            _ => {
                keys.insert(env_name(&[section]), vec![section.clone()]);
            }
        }
    }
    keys
}

fn env_name(path: &[&str]) -> String {
    format!("{ENV_PREFIX}{}", path.join("_").to_ascii_uppercase())
}

/// A variable's text as a TOML value: `50`, `true`, `["A", "B"]`, `[{name = "ci"}]`;
/// anything that is not a TOML value is a string.
fn env_value(text: &str) -> Result<toml::Value, String> {
    let trimmed = text.trim_start();
    let looks_structured = trimmed.starts_with('[') || trimmed.starts_with('{');
    match toml::from_str::<toml::Table>(&format!("v = {text}")) {
        Ok(mut t) => Ok(t
            .remove("v")
            .unwrap_or(toml::Value::String(text.to_owned()))),
        Err(e) if looks_structured => Err(format!("not a TOML value: {e}")),
        Err(_) => Ok(toml::Value::String(text.to_owned())),
    }
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut at = table;
    for key in parents {
        let entry = at
            .entry(key.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        let toml::Value::Table(inner) = entry else {
            return;
        };
        at = inner;
    }
    at.insert(last.clone(), value);
}

#[cfg(test)]
mod tests;
