//! Docker adapter for [`ContainerRuntime`], built on bollard.
//!
//! The client is created and its API version negotiated lazily, on the first
//! call that needs the engine, so a worker can be constructed before dockerd
//! is up; until the engine answers, calls return [`RuntimeError::Unavailable`]
//! and the next call tries again.

use std::collections::HashMap;
use std::error::Error as StdError;
use std::time::Duration;

use async_trait::async_trait;
use bollard::container::{AttachContainerResults, LogOutput};
use bollard::errors::Error as BollardError;
use bollard::models::{ContainerCreateBody, HostConfig, HostConfigLogConfig};
use bollard::query_parameters::{
    AttachContainerOptions, CreateContainerOptions, CreateImageOptions, InspectContainerOptions,
    ListContainersOptions, LogsOptions, RemoveContainerOptions, StartContainerOptions,
    StopContainerOptions, WaitContainerOptions,
};
use bollard::{API_DEFAULT_VERSION, ClientVersion, Docker};
use futures::StreamExt;
use tokio::sync::Mutex;

use crate::domain::job::PullPolicy;
use crate::domain::ports::{
    ContainerExit, ContainerInfo, ContainerRuntime, ContainerSpec, ContainerState, OutputChunk,
    OutputStream, RuntimeError, Stream,
};

/// Per-request timeout handed to bollard, in seconds. bollard only applies it
/// until the response headers arrive, but `stop` and a few other endpoints
/// answer only when the work is done, so keep it generous: one day.
const REQUEST_TIMEOUT_SECS: u64 = 24 * 60 * 60;

/// Upper bound for the version handshake and for `ping`, so a wedged engine
/// does not hang a health check for a day.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Where bollard would connect by default on unix.
const DEFAULT_UNIX_HOST: &str = "unix:///var/run/docker.sock";

#[derive(Debug, Clone, PartialEq, Eq)]
enum Endpoint {
    /// `unix:///path/to/docker.sock`
    Unix(String),
    /// `tcp://host:port` or `http://host:port`
    Http(String),
}

impl Endpoint {
    fn parse(host: &str) -> Result<Self, RuntimeError> {
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

    fn as_str(&self) -> &str {
        match self {
            Endpoint::Unix(h) | Endpoint::Http(h) => h,
        }
    }

    /// Builds a client; performs no I/O except the socket-exists check bollard
    /// does for unix sockets.
    fn client(&self, version: &ClientVersion) -> Result<Docker, BollardError> {
        match self {
            Endpoint::Unix(h) => Docker::connect_with_unix(h, REQUEST_TIMEOUT_SECS, version),
            Endpoint::Http(h) => Docker::connect_with_http(h, REQUEST_TIMEOUT_SECS, version),
        }
    }
}

/// [`ContainerRuntime`] talking to a Docker engine through bollard.
pub struct DockerRuntime {
    endpoint: Endpoint,
    /// `Some` once a client has been built and its API version negotiated.
    client: Mutex<Option<Docker>>,
}

impl std::fmt::Debug for DockerRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DockerRuntime")
            .field("endpoint", &self.endpoint.as_str())
            .finish_non_exhaustive()
    }
}

impl DockerRuntime {
    /// `None` uses `DOCKER_HOST` if set, else the local unix socket.
    /// `Some("unix:///...")`, `Some("tcp://host:port")` and `Some("http://host:port")`
    /// are accepted explicitly.
    ///
    /// No connection is made here: the engine is contacted (and the API
    /// version negotiated) on first use, and again on later calls for as long
    /// as it cannot be reached. Only a malformed host is an error.
    pub fn connect(host: Option<&str>) -> Result<Self, RuntimeError> {
        let host = match host {
            Some(h) => h.to_owned(),
            None => std::env::var("DOCKER_HOST")
                .ok()
                .filter(|h| !h.trim().is_empty())
                .unwrap_or_else(|| DEFAULT_UNIX_HOST.to_owned()),
        };
        let endpoint = Endpoint::parse(host.trim())?;
        Ok(DockerRuntime {
            endpoint,
            client: Mutex::new(None),
        })
    }

    /// The API version in use after negotiation (connects if needed), e.g. `1.41`.
    pub async fn api_version(&self) -> Result<String, RuntimeError> {
        Ok(self.docker().await?.client_version().to_string())
    }

    /// The negotiated client, connecting first if needed.
    async fn docker(&self) -> Result<Docker, RuntimeError> {
        let mut slot = self.client.lock().await;
        if let Some(docker) = slot.as_ref() {
            return Ok(docker.clone());
        }
        let docker = negotiate(&self.endpoint).await?;
        tracing::debug!(
            endpoint = self.endpoint.as_str(),
            api_version = %docker.client_version(),
            "connected to docker engine"
        );
        *slot = Some(docker.clone());
        Ok(docker)
    }

    async fn image_present(&self, docker: &Docker, image: &str) -> Result<bool, RuntimeError> {
        match docker.inspect_image(image).await {
            Ok(_) => Ok(true),
            Err(e) if status_of(&e) == Some(404) => Ok(false),
            Err(e) => Err(map_error(e)),
        }
    }

    async fn pull(&self, docker: &Docker, image: &str) -> Result<(), RuntimeError> {
        let (from_image, tag) = split_image_ref(image);
        tracing::info!(image, from_image, tag, "pulling image");
        let options = CreateImageOptions {
            from_image: Some(from_image),
            tag: Some(tag),
            ..Default::default()
        };
        let progress = docker.create_image(Some(options), None, None);
        let mut progress = std::pin::pin!(progress);
        while let Some(item) = progress.next().await {
            match item {
                Ok(info) => {
                    tracing::trace!(image, status = ?info.status, id = ?info.id, "pull progress");
                }
                Err(e) => return Err(classify_pull_error(image, e)),
            }
        }
        // A pull can "succeed" without producing the reference we asked for
        // (e.g. platform mismatch); make sure the image is really there.
        if self.image_present(docker, image).await? {
            Ok(())
        } else {
            Err(RuntimeError::PullFailed {
                image: image.to_owned(),
                message: "pull finished but the image is not present locally".to_owned(),
            })
        }
    }
}

impl DockerRuntime {
    /// Every container (any state) matching a Docker `label=` filter (`key` or
    /// `key=value`), inspected.
    async fn list_by_label_filter(
        &self,
        filter: String,
    ) -> Result<Vec<ContainerInfo>, RuntimeError> {
        let docker = self.docker().await?;
        let options = ListContainersOptions {
            all: true,
            filters: Some(HashMap::from([("label".to_owned(), vec![filter])])),
            ..Default::default()
        };
        let listed = docker
            .list_containers(Some(options))
            .await
            .map_err(map_error)?;
        let mut found = Vec::with_capacity(listed.len());
        for summary in listed {
            let Some(id) = summary.id else { continue };
            // The summary has no exit code or OOM flag: inspect each one.
            match self.inspect(&id).await {
                Ok(info) => found.push(info),
                Err(RuntimeError::NoSuchContainer(_)) => {} // removed meanwhile
                Err(e) => return Err(e),
            }
        }
        Ok(found)
    }
}

#[async_trait]
impl ContainerRuntime for DockerRuntime {
    async fn ping(&self) -> Result<(), RuntimeError> {
        let docker = self.docker().await?;
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, docker.ping()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(map_error(e)),
            Err(_) => Err(RuntimeError::Unavailable(format!(
                "ping to {} timed out after {HANDSHAKE_TIMEOUT:?}",
                self.endpoint.as_str()
            ))),
        }
    }

    async fn ensure_image(&self, image: &str, policy: PullPolicy) -> Result<(), RuntimeError> {
        let docker = self.docker().await?;
        match policy {
            PullPolicy::Never => {
                if self.image_present(&docker, image).await? {
                    Ok(())
                } else {
                    Err(RuntimeError::ImageNotFound {
                        image: image.to_owned(),
                    })
                }
            }
            PullPolicy::IfNotPresent => {
                if self.image_present(&docker, image).await? {
                    Ok(())
                } else {
                    self.pull(&docker, image).await
                }
            }
            PullPolicy::Always => self.pull(&docker, image).await,
        }
    }

    async fn create(&self, spec: &ContainerSpec) -> Result<String, RuntimeError> {
        let docker = self.docker().await?;
        let options = CreateContainerOptions {
            name: (!spec.name.is_empty()).then(|| spec.name.clone()),
            ..Default::default()
        };
        let body = container_body(spec);
        match docker.create_container(Some(options), body).await {
            Ok(created) => {
                for warning in &created.warnings {
                    tracing::warn!(name = %spec.name, warning, "docker create warning");
                }
                tracing::debug!(name = %spec.name, id = %created.id, "container created");
                Ok(created.id)
            }
            Err(e) => match status_of(&e) {
                Some(409) => Err(RuntimeError::NameConflict(spec.name.clone())),
                Some(404) => Err(RuntimeError::ImageNotFound {
                    image: spec.image.clone(),
                }),
                _ => Err(map_error(e)),
            },
        }
    }

    async fn attach(&self, id: &str) -> Result<OutputStream, RuntimeError> {
        let docker = self.docker().await?;
        let options = AttachContainerOptions {
            stream: true,
            stdout: true,
            stderr: true,
            // logs=true replays the log and can wedge containers with some
            // log drivers on 20.10; we attach before start instead.
            logs: false,
            stdin: false,
            detach_keys: None,
        };
        let AttachContainerResults { output, input } = docker
            .attach_container(id, Some(options))
            .await
            .map_err(|e| container_error(id, e))?;
        // stdin is not attached; dropping the write half does not close the
        // connection (the read half keeps it alive).
        drop(input);
        Ok(output_chunks(output))
    }

    async fn list_labelled(
        &self,
        key: &str,
        value: &str,
    ) -> Result<Vec<ContainerInfo>, RuntimeError> {
        self.list_by_label_filter(format!("{key}={value}")).await
    }

    async fn list_with_label(&self, key: &str) -> Result<Vec<ContainerInfo>, RuntimeError> {
        self.list_by_label_filter(key.to_owned()).await
    }

    async fn inspect(&self, id: &str) -> Result<ContainerInfo, RuntimeError> {
        let docker = self.docker().await?;
        let inspected = docker
            .inspect_container(id, None::<InspectContainerOptions>)
            .await
            .map_err(|e| container_error(id, e))?;
        let state = inspected.state.unwrap_or_default();
        let started_at = state
            .started_at
            .as_deref()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&chrono::Utc))
            // A never-started container says 0001-01-01.
            .filter(|t| t.timestamp() > 0);
        let status = state.status.map(|s| s.to_string()).unwrap_or_default();
        let state = match status.as_str() {
            "created" => ContainerState::Created,
            "exited" | "dead" => ContainerState::Exited(ContainerExit {
                exit_code: state.exit_code.unwrap_or(-1),
                oom_killed: state.oom_killed.unwrap_or(false),
            }),
            // running, paused, restarting, removing
            _ => ContainerState::Running,
        };
        Ok(ContainerInfo {
            id: inspected.id.unwrap_or_else(|| id.to_owned()),
            name: inspected
                .name
                .map(|n| n.trim_start_matches('/').to_owned())
                .unwrap_or_default(),
            labels: inspected
                .config
                .and_then(|c| c.labels)
                .map(|l| l.into_iter().collect())
                .unwrap_or_default(),
            state,
            started_at,
        })
    }

    async fn logs(&self, id: &str, follow: bool) -> Result<OutputStream, RuntimeError> {
        let docker = self.docker().await?;
        // Fail early (and typed) on a container that is not there.
        self.inspect(id).await?;
        let options = LogsOptions {
            follow,
            stdout: true,
            stderr: true,
            tail: "all".to_owned(),
            ..Default::default()
        };
        Ok(output_chunks(docker.logs(id, Some(options))))
    }

    async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        let docker = self.docker().await?;
        docker
            .start_container(id, None::<StartContainerOptions>)
            .await
            .map_err(|e| container_error(id, e))
    }

    async fn wait(&self, id: &str) -> Result<ContainerExit, RuntimeError> {
        let docker = self.docker().await?;
        let options = WaitContainerOptions {
            condition: "not-running".to_owned(),
        };
        let waiting = docker.wait_container(id, Some(options));
        let mut waiting = std::pin::pin!(waiting);
        let waited_code = match waiting.next().await {
            Some(Ok(response)) => Some(response.status_code),
            // bollard turns a non-zero exit code into an error; it is data.
            Some(Err(BollardError::DockerContainerWaitError { code, error })) => {
                if !error.is_empty() {
                    tracing::warn!(id, code, error, "docker wait reported an error");
                }
                Some(code)
            }
            Some(Err(e)) => return Err(container_error(id, e)),
            None => None,
        };

        let inspected = docker
            .inspect_container(id, None::<InspectContainerOptions>)
            .await
            .map_err(|e| container_error(id, e))?;
        let state = inspected.state.unwrap_or_default();
        let exit_code = state.exit_code.or(waited_code).ok_or_else(|| {
            RuntimeError::Docker(format!("container {id} exited without an exit code"))
        })?;
        let oom_killed = state.oom_killed.unwrap_or(false);
        tracing::debug!(id, exit_code, oom_killed, "container exited");
        Ok(ContainerExit {
            exit_code,
            oom_killed,
        })
    }

    async fn stop(&self, id: &str, grace: Duration) -> Result<(), RuntimeError> {
        let docker = self.docker().await?;
        let options = StopContainerOptions {
            t: Some(grace_seconds(grace)),
            signal: None,
        };
        // bollard treats 304 (already stopped / never started) as success.
        docker
            .stop_container(id, Some(options))
            .await
            .map_err(|e| container_error(id, e))
    }

    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        let docker = self.docker().await?;
        let options = RemoveContainerOptions {
            force: true,
            v: true,
            link: false,
        };
        match docker.remove_container(id, Some(options)).await {
            Ok(()) => Ok(()),
            Err(e) => match status_of(&e) {
                Some(404) => Ok(()),
                Some(409) if message_of(&e).contains("already in progress") => Ok(()),
                _ => Err(map_error(e)),
            },
        }
    }
}

/// Docker's multiplexed output as chunks, stdin echoes dropped.
fn output_chunks(
    output: impl futures::Stream<Item = Result<LogOutput, BollardError>> + Send + 'static,
) -> OutputStream {
    output
        .filter_map(|item| {
            let mapped = match item {
                Ok(LogOutput::StdOut { message }) => Some(Ok(OutputChunk {
                    stream: Stream::Stdout,
                    bytes: message,
                })),
                Ok(LogOutput::StdErr { message }) => Some(Ok(OutputChunk {
                    stream: Stream::Stderr,
                    bytes: message,
                })),
                // Only produced for tty containers, which we never create.
                Ok(LogOutput::Console { message }) => Some(Ok(OutputChunk {
                    stream: Stream::Stdout,
                    bytes: message,
                })),
                Ok(LogOutput::StdIn { .. }) => None,
                Err(e) => Some(Err(map_error(e))),
            };
            futures::future::ready(mapped)
        })
        .boxed()
}

/// Builds a client for `endpoint` and negotiates the API version.
///
/// bollard's `negotiate_version` asks `/v{default}/version`, and engines
/// older than bollard's default (e.g. 20.10 / API 1.41) reject that with a
/// 400 "client version 1.53 is too new. Maximum supported API version is
/// 1.41". In that case retry with the version the engine says it supports.
async fn negotiate(endpoint: &Endpoint) -> Result<Docker, RuntimeError> {
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

fn container_body(spec: &ContainerSpec) -> ContainerCreateBody {
    let env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let labels: HashMap<String, String> = spec
        .labels
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let memory = spec
        .memory_bytes
        .map(|m| i64::try_from(m).unwrap_or(i64::MAX));
    let host_config = HostConfig {
        cpu_shares: spec.cpu_shares.map(i64::from),
        nano_cpus: spec.cpu_limit.map(|cores| (cores * 1e9) as i64),
        memory,
        memory_swap: memory,
        network_mode: (!spec.network.is_empty()).then(|| spec.network.clone()),
        init: Some(true),
        auto_remove: Some(false),
        log_config: Some(HostConfigLogConfig {
            typ: Some("local".to_owned()),
            config: None,
        }),
        ..Default::default()
    };
    ContainerCreateBody {
        image: Some(spec.image.clone()),
        cmd: (!spec.command.is_empty()).then(|| spec.command.clone()),
        working_dir: spec.workdir.clone(),
        user: spec.user.clone(),
        env: Some(env),
        labels: Some(labels),
        attach_stdin: Some(false),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        tty: Some(false),
        open_stdin: Some(false),
        stdin_once: Some(false),
        host_config: Some(host_config),
        ..Default::default()
    }
}

/// Docker's `t` for stop: whole seconds, rounded up, at least 1.
fn grace_seconds(grace: Duration) -> i32 {
    let secs = grace
        .as_secs()
        .saturating_add(u64::from(grace.subsec_nanos() > 0))
        .max(1);
    i32::try_from(secs).unwrap_or(i32::MAX)
}

/// Splits an image reference into the `fromImage` and `tag` query
/// parameters of `POST /images/create`, the way the docker CLI does:
/// a digest goes into `tag`, a registry port is not a tag, default `latest`.
pub(crate) fn split_image_ref(image: &str) -> (String, String) {
    if let Some((name, digest)) = image.split_once('@') {
        let (repo, _tag) = split_tag(name);
        return (repo.to_owned(), digest.to_owned());
    }
    let (repo, tag) = split_tag(image);
    (repo.to_owned(), tag.unwrap_or("latest").to_owned())
}

/// `host:5000/a/b:1.0` -> (`host:5000/a/b`, Some(`1.0`)); a colon before the
/// last slash belongs to the registry host.
fn split_tag(name: &str) -> (&str, Option<&str>) {
    let last_slash = name.rfind('/');
    match name.rfind(':') {
        Some(colon) if last_slash.is_none_or(|slash| colon > slash) => {
            (&name[..colon], Some(&name[colon + 1..]))
        }
        _ => (name, None),
    }
}

fn classify_pull_error(image: &str, e: BollardError) -> RuntimeError {
    if is_unreachable(&e) {
        return map_error(e);
    }
    let status = status_of(&e);
    let message = match e {
        BollardError::DockerResponseServerError { message, .. } => message,
        BollardError::DockerStreamError { error } => error,
        other => error_chain(&other),
    };
    let lower = message.to_ascii_lowercase();
    // Problems reaching or talking to the registry: never "not found", even
    // when the text happens to look like it.
    const TRANSPORT: &[&str] = &[
        "dial tcp",
        "dial unix",
        "connection refused",
        "connection reset",
        "no such host",
        "i/o timeout",
        "timeout",
        "network is unreachable",
        "server misbehaving",
        "tls:",
        "x509",
        "certificate",
        "http response to https client",
    ];
    const NOT_FOUND: &[&str] = &[
        "manifest unknown",
        "not found",
        "does not exist",
        "no such image",
        "name unknown",
    ];
    let transport = TRANSPORT.iter().any(|t| lower.contains(t));
    let not_found = status == Some(404) || NOT_FOUND.iter().any(|t| lower.contains(t));
    if not_found && !transport {
        RuntimeError::ImageNotFound {
            image: image.to_owned(),
        }
    } else {
        RuntimeError::PullFailed {
            image: image.to_owned(),
            message,
        }
    }
}

fn status_of(e: &BollardError) -> Option<u16> {
    match e {
        BollardError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

fn message_of(e: &BollardError) -> &str {
    match e {
        BollardError::DockerResponseServerError { message, .. } => message,
        _ => "",
    }
}

/// Errors on a container endpoint: 404 means the container is gone.
fn container_error(id: &str, e: BollardError) -> RuntimeError {
    if status_of(&e) == Some(404) {
        RuntimeError::NoSuchContainer(id.to_owned())
    } else {
        map_error(e)
    }
}

/// Generic mapping: transport failures are `Unavailable`, engine answers are
/// `Docker` with the engine's message.
fn map_error(e: BollardError) -> RuntimeError {
    if is_unreachable(&e) {
        return RuntimeError::Unavailable(error_chain(&e));
    }
    match e {
        BollardError::DockerResponseServerError {
            status_code,
            message,
        } => {
            if message.is_empty() {
                RuntimeError::Docker(format!("docker engine answered HTTP {status_code}"))
            } else {
                RuntimeError::Docker(message)
            }
        }
        BollardError::DockerStreamError { error } => RuntimeError::Docker(error),
        other => RuntimeError::Docker(error_chain(&other)),
    }
}

/// True when the engine could not be reached or the connection broke.
fn is_unreachable(e: &BollardError) -> bool {
    match e {
        // hyper errors are all transport-level: connect failures, or the
        // connection dropping mid-request/response.
        BollardError::SocketNotFoundError(_)
        | BollardError::HyperLegacyError { .. }
        | BollardError::HyperResponseError { .. }
        | BollardError::RequestTimeoutError => true,
        BollardError::IOError { .. } => has_connection_io_error(e),
        _ => false,
    }
}

fn has_connection_io_error(e: &(dyn StdError + 'static)) -> bool {
    use std::io::ErrorKind::*;
    let mut current: Option<&(dyn StdError + 'static)> = Some(e);
    while let Some(err) = current {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                ConnectionRefused
                    | ConnectionReset
                    | ConnectionAborted
                    | NotConnected
                    | NotFound
                    | BrokenPipe
                    | TimedOut
                    | AddrNotAvailable
                    | UnexpectedEof
                    | PermissionDenied
            )
        {
            return true;
        }
        current = err.source();
    }
    false
}

/// "outer: inner: innermost" for an error and its sources.
fn error_chain(e: &(dyn StdError + 'static)) -> String {
    let mut text = e.to_string();
    let mut current = e.source();
    while let Some(err) = current {
        let part = err.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        current = err.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_refs() {
        let cases = [
            ("busybox", ("busybox", "latest")),
            ("busybox:1.36", ("busybox", "1.36")),
            ("library/busybox", ("library/busybox", "latest")),
            ("127.0.0.1:5000/foo", ("127.0.0.1:5000/foo", "latest")),
            ("127.0.0.1:5000/foo:1.0", ("127.0.0.1:5000/foo", "1.0")),
            ("reg.example:443/a/b/c:v2", ("reg.example:443/a/b/c", "v2")),
            ("foo@sha256:abcd", ("foo", "sha256:abcd")),
            (
                "127.0.0.1:5000/foo:1.0@sha256:abcd",
                ("127.0.0.1:5000/foo", "sha256:abcd"),
            ),
        ];
        for (input, (repo, tag)) in cases {
            assert_eq!(
                split_image_ref(input),
                (repo.to_owned(), tag.to_owned()),
                "{input}"
            );
        }
    }

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

    #[test]
    fn grace_rounding() {
        assert_eq!(grace_seconds(Duration::ZERO), 1);
        assert_eq!(grace_seconds(Duration::from_millis(200)), 1);
        assert_eq!(grace_seconds(Duration::from_secs(1)), 1);
        assert_eq!(grace_seconds(Duration::from_millis(1500)), 2);
        assert_eq!(grace_seconds(Duration::from_secs(10)), 10);
    }

    #[test]
    fn pull_error_classification() {
        let server = |code: u16, msg: &str| BollardError::DockerResponseServerError {
            status_code: code,
            message: msg.to_owned(),
        };
        let refused = server(
            500,
            "Get \"http://127.0.0.1:5999/v2/\": dial tcp 127.0.0.1:5999: connect: connection refused",
        );
        assert!(matches!(
            classify_pull_error("x", refused),
            RuntimeError::PullFailed { .. }
        ));
        let denied = server(
            404,
            "pull access denied for nothing, repository does not exist or may require 'docker login'",
        );
        assert!(matches!(
            classify_pull_error("x", denied),
            RuntimeError::ImageNotFound { .. }
        ));
        let manifest = BollardError::DockerStreamError {
            error: "manifest for foo:1 not found: manifest unknown: manifest unknown".to_owned(),
        };
        assert!(matches!(
            classify_pull_error("x", manifest),
            RuntimeError::ImageNotFound { .. }
        ));
        let auth = server(500, "unauthorized: authentication required");
        assert!(matches!(
            classify_pull_error("x", auth),
            RuntimeError::PullFailed { .. }
        ));
    }
}
