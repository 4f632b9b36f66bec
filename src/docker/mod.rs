//! Docker adapter for [`ContainerRuntime`], built on bollard.
//!
//! The client is created and its API version negotiated lazily, on the first
//! call that needs the engine, so a worker can be constructed before dockerd
//! is up; until the engine answers, calls return [`RuntimeError::Unavailable`]
//! and the next call tries again.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use bollard::Docker;
use bollard::auth::DockerCredentials;
use bollard::container::{AttachContainerResults, LogOutput};
use bollard::errors::Error as BollardError;
use bollard::query_parameters::{
    AttachContainerOptions, CreateContainerOptions, CreateImageOptions, InspectContainerOptions,
    ListContainersOptions, LogsOptions, RemoveContainerOptions, StartContainerOptions,
    StatsOptions, StopContainerOptions, WaitContainerOptions,
};
use futures::StreamExt;
use tokio::sync::Mutex;

mod connect;
mod errors;
mod spec;
mod stats;

use connect::{DEFAULT_UNIX_HOST, Endpoint, HANDSHAKE_TIMEOUT, negotiate};
use errors::{classify_pull_error, container_error, map_error, message_of, status_of};
pub(crate) use spec::split_image_ref;
use spec::{container_body, grace_seconds};

use crate::domain::job::PullPolicy;
use crate::domain::ports::{
    ContainerExit, ContainerInfo, ContainerRuntime, ContainerSpec, ContainerState, OutputChunk,
    OutputStream, RuntimeError, StatsStream, Stream,
};
use crate::domain::secret::RegistryCredentials;

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

    async fn pull(
        &self,
        docker: &Docker,
        image: &str,
        credentials: Option<&RegistryCredentials>,
    ) -> Result<(), RuntimeError> {
        let (from_image, tag) = split_image_ref(image);
        tracing::info!(
            image,
            from_image,
            tag,
            login = credentials.map(|c| c.username.as_str()),
            "pulling image"
        );
        let options = CreateImageOptions {
            from_image: Some(from_image),
            tag: Some(tag),
            ..Default::default()
        };
        // The engine gets the login in the request's X-Registry-Auth header, for this
        // pull only: nothing is written to a Docker config file.
        let auth = credentials.map(|c| DockerCredentials {
            username: Some(c.username.clone()),
            password: Some(c.password.expose().to_owned()),
            serveraddress: Some(c.registry.clone()),
            ..Default::default()
        });
        let progress = docker.create_image(Some(options), None, auth);
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

    async fn ensure_image(
        &self,
        image: &str,
        policy: PullPolicy,
        credentials: Option<&RegistryCredentials>,
    ) -> Result<(), RuntimeError> {
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
                    self.pull(&docker, image, credentials).await
                }
            }
            PullPolicy::Always => self.pull(&docker, image, credentials).await,
        }
    }

    async fn create(&self, spec: &ContainerSpec) -> Result<String, RuntimeError> {
        let docker = self.docker().await?;
        let options = CreateContainerOptions {
            name: (!spec.name.is_empty()).then(|| spec.name.clone()),
            ..Default::default()
        };
        let body = container_body(spec)?;
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

    async fn stats(&self, id: &str) -> Result<StatsStream, RuntimeError> {
        let docker = self.docker().await?;
        // The engine's own stream: its stats collector reads every container's cgroup
        // once a second and hands each reading to every subscriber. (A `one-shot`
        // request also waits for that tick, unless the collector was idle.)
        let options = StatsOptions {
            stream: true,
            one_shot: false,
        };
        let owned = id.to_owned();
        let readings = docker
            .stats(id, Some(options))
            .map(move |item| match item {
                Ok(stats) => Ok(stats::sample_of(&stats)),
                Err(e) => Err(container_error(&owned, e)),
            })
            // An empty answer: the container stopped. The engine keeps sending those.
            .take_while(|item| futures::future::ready(!matches!(item, Ok(None))))
            .filter_map(|item| futures::future::ready(item.transpose()));
        Ok(readings.boxed())
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
        // Exit 0 is a success whatever else happened (an OOM kill inside a container
        // whose main process still exits 0 counts as success), so the engine's record
        // has nothing to add: one request less per run, and the engine is the floor.
        if waited_code == Some(0) {
            tracing::debug!(id, exit_code = 0, "container exited");
            return Ok(ContainerExit {
                exit_code: 0,
                oom_killed: false,
            });
        }

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
