//! A container runtime that runs nothing (feature `bench` only): each "container" writes
//! a fixed amount of output, stays "running" for a fixed time and exits 0. With it a
//! worker exercises everything tasuki does around a container (claim, lease heartbeats,
//! log upload, finish, reconciliation) at the speed of the control plane alone, which is
//! what the benchmark's capacity figures measure. Never in a production build.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::watch;

use crate::domain::job::PullPolicy;
use crate::domain::ports::{
    ContainerExit, ContainerInfo, ContainerRuntime, ContainerSpec, ContainerState, OutputChunk,
    OutputStream, RuntimeError, StatsStream, Stream,
};
use crate::domain::secret::RegistryCredentials;

const EXIT_OK: ContainerExit = ContainerExit {
    exit_code: 0,
    oom_killed: false,
};

struct Container {
    name: String,
    labels: BTreeMap<String, String>,
    started_at: Option<chrono::DateTime<chrono::Utc>>,
    /// `None` while it has not exited.
    exited: watch::Sender<Option<ContainerExit>>,
}

/// Containers that exist only in memory.
pub struct NoopRuntime {
    /// How long each one "runs".
    run_for: Duration,
    /// Bytes of output each one writes (on stdout, in one chunk, at start).
    output: Bytes,
    containers: Mutex<HashMap<String, Container>>,
    next: AtomicU64,
}

impl NoopRuntime {
    pub fn new(run_for: Duration, output_bytes: usize) -> Self {
        let mut line = vec![b'.'; output_bytes];
        if let Some(last) = line.last_mut() {
            *last = b'\n';
        }
        NoopRuntime {
            run_for,
            output: Bytes::from(line),
            containers: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
        }
    }

    fn locked(&self) -> std::sync::MutexGuard<'_, HashMap<String, Container>> {
        self.containers.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn exit_of(&self, id: &str) -> Result<watch::Receiver<Option<ContainerExit>>, RuntimeError> {
        let containers = self.locked();
        let c = find(&containers, id)?;
        Ok(c.exited.subscribe())
    }

    fn info(id: &str, c: &Container) -> ContainerInfo {
        let state = match *c.exited.borrow() {
            Some(exit) => ContainerState::Exited(exit),
            None if c.started_at.is_some() => ContainerState::Running,
            None => ContainerState::Created,
        };
        ContainerInfo {
            id: id.to_owned(),
            name: c.name.clone(),
            labels: c.labels.clone(),
            state,
            started_at: c.started_at,
        }
    }
}

/// A container by id or by name.
fn find<'a>(
    containers: &'a HashMap<String, Container>,
    id: &str,
) -> Result<&'a Container, RuntimeError> {
    containers
        .get(id)
        .or_else(|| containers.values().find(|c| c.name == id))
        .ok_or_else(|| RuntimeError::NoSuchContainer(id.to_owned()))
}

#[async_trait]
impl ContainerRuntime for NoopRuntime {
    async fn ping(&self) -> Result<(), RuntimeError> {
        Ok(())
    }

    async fn ensure_image(
        &self,
        _image: &str,
        _policy: PullPolicy,
        _credentials: Option<&RegistryCredentials>,
    ) -> Result<(), RuntimeError> {
        Ok(())
    }

    async fn create(&self, spec: &ContainerSpec) -> Result<String, RuntimeError> {
        let mut containers = self.locked();
        if containers.values().any(|c| c.name == spec.name) {
            return Err(RuntimeError::NameConflict(spec.name.clone()));
        }
        let id = format!("noop{:016x}", self.next.fetch_add(1, Ordering::Relaxed));
        containers.insert(
            id.clone(),
            Container {
                name: spec.name.clone(),
                labels: spec.labels.clone(),
                started_at: None,
                exited: watch::Sender::new(None),
            },
        );
        Ok(id)
    }

    async fn attach(&self, id: &str) -> Result<OutputStream, RuntimeError> {
        let mut exited = self.exit_of(id)?;
        let chunk = OutputChunk {
            stream: Stream::Stdout,
            bytes: self.output.clone(),
        };
        let output = futures::stream::once(async move { Ok(chunk) });
        // The stream ends when the container exits, as an attach does.
        let end = futures::stream::once(async move {
            let _ = exited.wait_for(Option::is_some).await;
        })
        .filter_map(|()| async { None });
        Ok(output.chain(end).boxed())
    }

    async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        let exited = {
            let mut containers = self.locked();
            let key = match containers.get(id) {
                Some(_) => id.to_owned(),
                None => containers
                    .iter()
                    .find(|(_, c)| c.name == id)
                    .map(|(k, _)| k.clone())
                    .ok_or_else(|| RuntimeError::NoSuchContainer(id.to_owned()))?,
            };
            let Some(c) = containers.get_mut(&key) else {
                return Err(RuntimeError::NoSuchContainer(id.to_owned()));
            };
            c.started_at = Some(chrono::Utc::now());
            c.exited.clone()
        };
        let run_for = self.run_for;
        tokio::spawn(async move {
            if !run_for.is_zero() {
                tokio::time::sleep(run_for).await;
            }
            exited.send_if_modified(|e| e.replace(EXIT_OK).is_none());
        });
        Ok(())
    }

    async fn wait(&self, id: &str) -> Result<ContainerExit, RuntimeError> {
        let mut exited = self.exit_of(id)?;
        let exit = exited
            .wait_for(Option::is_some)
            .await
            .map_err(|_| RuntimeError::NoSuchContainer(id.to_owned()))?;
        Ok((*exit).unwrap_or(EXIT_OK))
    }

    async fn stop(&self, id: &str, _grace: Duration) -> Result<(), RuntimeError> {
        let containers = self.locked();
        let c = find(&containers, id)?;
        c.exited.send_if_modified(|e| {
            e.replace(ContainerExit {
                exit_code: 143,
                oom_killed: false,
            })
            .is_none()
        });
        Ok(())
    }

    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        let mut containers = self.locked();
        let key = containers
            .iter()
            .find(|(k, c)| k.as_str() == id || c.name == id)
            .map(|(k, _)| k.clone());
        if let Some(key) = key
            && let Some(c) = containers.remove(&key)
        {
            // Anyone waiting on it learns it is gone.
            c.exited.send_if_modified(|e| e.replace(EXIT_OK).is_none());
        }
        Ok(())
    }

    async fn list_labelled(
        &self,
        key: &str,
        value: &str,
    ) -> Result<Vec<ContainerInfo>, RuntimeError> {
        let containers = self.locked();
        Ok(containers
            .iter()
            .filter(|(_, c)| c.labels.get(key).is_some_and(|v| v == value))
            .map(|(id, c)| Self::info(id, c))
            .collect())
    }

    async fn list_with_label(&self, key: &str) -> Result<Vec<ContainerInfo>, RuntimeError> {
        let containers = self.locked();
        Ok(containers
            .iter()
            .filter(|(_, c)| c.labels.contains_key(key))
            .map(|(id, c)| Self::info(id, c))
            .collect())
    }

    async fn inspect(&self, id: &str) -> Result<ContainerInfo, RuntimeError> {
        let containers = self.locked();
        let c = find(&containers, id)?;
        let key = containers
            .iter()
            .find(|(_, v)| std::ptr::eq(*v, c))
            .map(|(k, _)| k.clone())
            .unwrap_or_else(|| id.to_owned());
        Ok(Self::info(&key, c))
    }

    async fn logs(&self, id: &str, _follow: bool) -> Result<OutputStream, RuntimeError> {
        // Nothing is kept: an adopted no-op container has no output to catch up on.
        self.exit_of(id)?;
        Ok(futures::stream::empty().boxed())
    }

    async fn stats(&self, _id: &str) -> Result<StatsStream, RuntimeError> {
        Ok(futures::stream::empty().boxed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str) -> ContainerSpec {
        ContainerSpec {
            logs: Default::default(),
            name: name.into(),
            image: "none".into(),
            command: vec![],
            workdir: None,
            user: None,
            env: BTreeMap::new(),
            secret_env: BTreeMap::new(),
            labels: BTreeMap::from([("tasuki.run-id".to_owned(), "r".to_owned())]),
            cpu_shares: None,
            cpu_limit: None,
            memory_bytes: 0,
            network: "none".into(),
            pids_limit: 1,
            capabilities: vec![],
            read_only_root: false,
            mounts: vec![],
        }
    }

    #[tokio::test]
    async fn a_container_writes_its_output_and_exits_zero() {
        let rt = NoopRuntime::new(Duration::from_millis(10), 8);
        let id = rt.create(&spec("c1")).await.unwrap();
        let out = rt.attach(&id).await.unwrap();
        rt.start(&id).await.unwrap();
        let chunks: Vec<_> = out.collect().await;
        assert_eq!(chunks.len(), 1);
        assert_eq!(
            chunks[0].as_ref().unwrap().bytes,
            Bytes::from_static(b".......\n")
        );
        assert_eq!(rt.wait(&id).await.unwrap(), EXIT_OK);
        assert_eq!(
            rt.inspect("c1").await.unwrap().state,
            ContainerState::Exited(EXIT_OK)
        );
        assert!(matches!(
            rt.create(&spec("c1")).await,
            Err(RuntimeError::NameConflict(_))
        ));
        assert_eq!(rt.list_with_label("tasuki.run-id").await.unwrap().len(), 1);
        rt.remove(&id).await.unwrap();
        assert!(
            rt.list_with_label("tasuki.run-id")
                .await
                .unwrap()
                .is_empty()
        );
    }
}
