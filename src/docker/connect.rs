//! Reaching the engine: where it listens, and the API version both sides speak (older
//! engines refuse bollard's default version and say which one they support).

use std::time::Duration;

use bollard::errors::Error as BollardError;
use bollard::{API_DEFAULT_VERSION, ClientVersion, Docker};

use super::errors::{map_error, message_of, status_of};
use crate::domain::ports::RuntimeError;

/// Per-request timeout handed to bollard, in seconds. bollard only applies it
/// until the response headers arrive, but `stop` and a few other endpoints
/// answer only when the work is done, so keep it generous: one day.
const REQUEST_TIMEOUT_SECS: u64 = 24 * 60 * 60;

/// Upper bound for the version handshake and for `ping`, so a wedged engine
/// does not hang a health check for a day.
pub(super) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Where bollard would connect by default on unix.
pub(super) const DEFAULT_UNIX_HOST: &str = "unix:///var/run/docker.sock";

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Endpoint {
    /// `unix:///path/to/docker.sock`
    Unix(String),
    /// `tcp://host:port` or `http://host:port`
    Http(String),
}

impl Endpoint {
    pub(super) fn parse(host: &str) -> Result<Self, RuntimeError> {
        if host.starts_with("unix://") {
            Ok(Endpoint::Unix(host.to_owned()))
        } else if host.starts_with("tcp://") || host.starts_with("http://") {
            Ok(Endpoint::Http(host.to_owned()))
        } else {
            Err(RuntimeError::Docker(format!(
                "unsupported docker host {host:?}: expected unix://, tcp:// or http://"
            )))
        }
    }

    pub(super) fn as_str(&self) -> &str {
        match self {
            Endpoint::Unix(h) | Endpoint::Http(h) => h,
        }
    }

    /// Builds a client; performs no I/O except the socket-exists check bollard
    /// does for unix sockets.
    pub(super) fn client(&self, version: &ClientVersion) -> Result<Docker, BollardError> {
        match self {
            Endpoint::Unix(h) => Docker::connect_with_unix(h, REQUEST_TIMEOUT_SECS, version),
            Endpoint::Http(h) => Docker::connect_with_http(h, REQUEST_TIMEOUT_SECS, version),
        }
    }
}

/// Builds a client for `endpoint` and negotiates the API version.
///
/// bollard's `negotiate_version` asks `/v{default}/version`, and engines
/// older than bollard's default (e.g. 20.10 / API 1.41) reject that with a
/// 400 "client version 1.53 is too new. Maximum supported API version is
/// 1.41". In that case retry with the version the engine says it supports.
pub(super) async fn negotiate(endpoint: &Endpoint) -> Result<Docker, RuntimeError> {
    let docker = endpoint.client(API_DEFAULT_VERSION).map_err(map_error)?;
    match handshake(endpoint, docker).await? {
        Ok(docker) => Ok(docker),
        Err(e) => {
            let Some(max) = status_of(&e)
                .filter(|s| *s == 400)
                .and_then(|_| parse_max_api_version(message_of(&e)))
            else {
                return Err(map_error(e));
            };
            tracing::debug!(
                endpoint = endpoint.as_str(),
                api_version = %max,
                "engine is older than bollard's default API version; retrying"
            );
            let docker = endpoint.client(&max).map_err(map_error)?;
            handshake(endpoint, docker).await?.map_err(map_error)
        }
    }
}

/// `negotiate_version` under [`HANDSHAKE_TIMEOUT`]; the outer error is a timeout.
async fn handshake(
    endpoint: &Endpoint,
    docker: Docker,
) -> Result<Result<Docker, BollardError>, RuntimeError> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, docker.negotiate_version())
        .await
        .map_err(|_| {
            RuntimeError::Unavailable(format!(
                "no answer from {} within {HANDSHAKE_TIMEOUT:?}",
                endpoint.as_str()
            ))
        })
}

/// Extracts `X.Y` from "... Maximum supported API version is X.Y".
fn parse_max_api_version(message: &str) -> Option<ClientVersion> {
    const MARKER: &str = "maximum supported api version is ";
    let lower = message.to_ascii_lowercase();
    let start = lower.find(MARKER)? + MARKER.len();
    let token: String = lower[start..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let (major, minor) = token.trim_end_matches('.').split_once('.')?;
    Some(ClientVersion {
        major_version: major.parse().ok()?,
        minor_version: minor.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_api_version() {
        let v = parse_max_api_version(
            "client version 1.53 is too new. Maximum supported API version is 1.41",
        );
        assert_eq!(
            v,
            Some(ClientVersion {
                major_version: 1,
                minor_version: 41
            })
        );
        assert_eq!(parse_max_api_version("something else"), None);
    }
}
