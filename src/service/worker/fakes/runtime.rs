//! A fake container engine: containers run until a test (or `stop`) ends them, keep
//! their output as the engine's log does, and every call is recorded in order.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use futures::channel::mpsc;
use tokio::sync::watch;

use super::{STOPPED_CODE, chunk, locked};
use crate::domain::job::PullPolicy;
use crate::domain::ports::{
    Claim, ContainerExit, ContainerInfo, ContainerRuntime, ContainerSpec, ContainerState,
    OutputChunk, OutputStream, RuntimeError, StatsSample, StatsStream,
};
use crate::domain::secret::RegistryCredentials;

struct FakeContainer {
    info: ContainerInfo,
    /// Everything it wrote, as the engine's log keeps it.
    history: Vec<OutputChunk>,
    /// Live readers (attach, following logs); dropped when it exits.
    readers: Vec<mpsc::UnboundedSender<Result<OutputChunk, RuntimeError>>>,
    exit: watch::Sender<Option<ContainerExit>>,
}

/// What the fake engine was asked to do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Call {
    Create(String),
    Start(String),
    Stop(String),
    Remove(String),
}

#[derive(Default)]
pub(crate) struct FakeRuntime {
    containers: Mutex<HashMap<String, FakeContainer>>,
    calls: Mutex<Vec<Call>>,
    next_id: Mutex<u32>,
    /// Every `ensure_image`: the image, and the login it came with.
    pulls: Mutex<Vec<(String, Option<RegistryCredentials>)>>,
    /// Every create request, as asked.
    created: Mutex<Vec<ContainerSpec>>,
    /// The registry refuses every pull's login.
    refuse_logins: Mutex<bool>,
    /// What `stats` reads from a running container, one a second, in order; the last
    /// one again once they run out (its counters stay put). None at all: the engine
    /// has no counters, and the readings end at once.
    readings: Arc<Mutex<Vec<StatsSample>>>,
    /// Readings handed out so far.
    readings_taken: Arc<Mutex<u32>>,
    /// A reading fails once this many were handed out.
    stats_fail_after: Arc<Mutex<Option<u32>>>,
    stats_failed: Arc<Mutex<bool>>,
}

impl FakeRuntime {
    pub fn pulls(&self) -> Vec<(String, Option<RegistryCredentials>)> {
        locked(&self.pulls).clone()
    }

    pub fn created_specs(&self) -> Vec<ContainerSpec> {
        locked(&self.created).clone()
    }

    pub fn refuse_logins(&self) {
        *locked(&self.refuse_logins) = true;
    }

    /// Running containers' counters read as `readings`, one per `stats` call.
    pub fn set_readings(&self, readings: Vec<StatsSample>) {
        *locked(&self.readings) = readings;
    }

    /// `stats` fails (engine unreachable) after `n` readings.
    pub fn fail_stats_after(&self, n: u32) {
        *locked(&self.stats_fail_after) = Some(n);
    }

    /// Readings `stats` handed out.
    pub fn readings_taken(&self) -> u32 {
        *locked(&self.readings_taken)
    }

    /// A reading failed.
    pub fn stats_failed(&self) -> bool {
        *locked(&self.stats_failed)
    }

    pub fn calls(&self) -> Vec<Call> {
        locked(&self.calls).clone()
    }

    /// Did the engine stop or remove container `id`?
    pub fn touched(&self, id: &str) -> bool {
        self.calls().iter().any(|c| match c {
            Call::Stop(x) | Call::Remove(x) => x == id,
            _ => false,
        })
    }

    pub fn exists(&self, id: &str) -> bool {
        locked(&self.containers).contains_key(id)
    }

    /// A container left by an earlier life of the worker, running since `started_at`.
    pub fn put_running(
        &self,
        claim: &Claim,
        worker_id: &str,
        started_at: chrono::DateTime<chrono::Utc>,
    ) -> String {
        let spec = crate::service::worker::attempt::container_spec(claim, worker_id);
        let id = self.add(&spec);
        let mut containers = locked(&self.containers);
        if let Some(c) = containers.get_mut(&id) {
            c.info.state = ContainerState::Running;
            c.info.started_at = Some(started_at);
        }
        id
    }

    fn add(&self, spec: &ContainerSpec) -> String {
        let id = {
            let mut n = locked(&self.next_id);
            *n += 1;
            format!("c{n}")
        };
        let info = ContainerInfo {
            id: id.clone(),
            name: spec.name.clone(),
            labels: spec.labels.clone(),
            state: ContainerState::Created,
            started_at: None,
        };
        locked(&self.containers).insert(
            id.clone(),
            FakeContainer {
                info,
                history: Vec::new(),
                readers: Vec::new(),
                exit: watch::channel(None).0,
            },
        );
        id
    }

    /// The container writes `bytes`.
    pub fn emit(&self, id: &str, bytes: &'static [u8]) {
        let mut containers = locked(&self.containers);
        let Some(c) = containers.get_mut(id) else {
            return;
        };
        c.history.push(chunk(bytes));
        c.readers
            .retain(|r| r.unbounded_send(Ok(chunk(bytes))).is_ok());
    }

    /// The connections of the process reading the container's output die with it (a
    /// worker crash): its readers end, the container and its history stay.
    pub fn sever(&self, id: &str) {
        if let Some(c) = locked(&self.containers).get_mut(id) {
            c.readers.clear();
        }
    }

    /// The container's main process exits with `code`.
    pub fn exit(&self, id: &str, code: i64) {
        let mut containers = locked(&self.containers);
        let Some(c) = containers.get_mut(id) else {
            return;
        };
        if matches!(c.info.state, ContainerState::Exited(_)) {
            return;
        }
        let exit = ContainerExit {
            exit_code: code,
            oom_killed: false,
        };
        c.info.state = ContainerState::Exited(exit);
        c.readers.clear();
        c.exit.send_replace(Some(exit));
    }

    fn find(&self, id_or_name: &str) -> Option<String> {
        locked(&self.containers)
            .values()
            .find(|c| c.info.id == id_or_name || c.info.name == id_or_name)
            .map(|c| c.info.id.clone())
    }

    fn reader(&self, id: &str, history: bool) -> Result<OutputStream, RuntimeError> {
        let mut containers = locked(&self.containers);
        let c = containers
            .get_mut(id)
            .ok_or_else(|| RuntimeError::NoSuchContainer(id.to_owned()))?;
        let (tx, rx) = mpsc::unbounded();
        if history {
            for h in &c.history {
                let _ = tx.unbounded_send(Ok(h.clone()));
            }
        }
        if !matches!(c.info.state, ContainerState::Exited(_)) {
            c.readers.push(tx);
        }
        Ok(rx.boxed())
    }
}

#[async_trait]
impl ContainerRuntime for FakeRuntime {
    async fn ping(&self) -> Result<(), RuntimeError> {
        Ok(())
    }

    async fn ensure_image(
        &self,
        image: &str,
        _policy: PullPolicy,
        credentials: Option<&RegistryCredentials>,
    ) -> Result<(), RuntimeError> {
        locked(&self.pulls).push((image.to_owned(), credentials.cloned()));
        if *locked(&self.refuse_logins) {
            return Err(RuntimeError::PullUnauthorized {
                image: image.to_owned(),
                message: "authentication required".to_owned(),
            });
        }
        Ok(())
    }

    async fn create(&self, spec: &ContainerSpec) -> Result<String, RuntimeError> {
        locked(&self.created).push(spec.clone());
        if self.find(&spec.name).is_some() {
            return Err(RuntimeError::NameConflict(spec.name.clone()));
        }
        let id = self.add(spec);
        locked(&self.calls).push(Call::Create(id.clone()));
        Ok(id)
    }

    async fn attach(&self, id: &str) -> Result<OutputStream, RuntimeError> {
        self.reader(id, false)
    }

    async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        locked(&self.calls).push(Call::Start(id.to_owned()));
        let mut containers = locked(&self.containers);
        let c = containers
            .get_mut(id)
            .ok_or_else(|| RuntimeError::NoSuchContainer(id.to_owned()))?;
        c.info.state = ContainerState::Running;
        c.info.started_at = Some(chrono::Utc::now());
        Ok(())
    }

    async fn wait(&self, id: &str) -> Result<ContainerExit, RuntimeError> {
        let mut exit = locked(&self.containers)
            .get(id)
            .map(|c| c.exit.subscribe())
            .ok_or_else(|| RuntimeError::NoSuchContainer(id.to_owned()))?;
        let exited = exit
            .wait_for(|e| e.is_some())
            .await
            .map_err(|_| RuntimeError::NoSuchContainer(id.to_owned()))?;
        (*exited).ok_or_else(|| RuntimeError::Docker("fake: no exit".to_owned()))
    }

    async fn stop(&self, id: &str, _grace: Duration) -> Result<(), RuntimeError> {
        locked(&self.calls).push(Call::Stop(id.to_owned()));
        self.exit(id, STOPPED_CODE);
        Ok(())
    }

    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        locked(&self.calls).push(Call::Remove(id.to_owned()));
        self.exit(id, STOPPED_CODE);
        locked(&self.containers).remove(id);
        Ok(())
    }

    async fn list_labelled(
        &self,
        key: &str,
        value: &str,
    ) -> Result<Vec<ContainerInfo>, RuntimeError> {
        Ok(locked(&self.containers)
            .values()
            .filter(|c| c.info.labels.get(key).map(String::as_str) == Some(value))
            .map(|c| c.info.clone())
            .collect())
    }

    async fn list_with_label(&self, key: &str) -> Result<Vec<ContainerInfo>, RuntimeError> {
        Ok(locked(&self.containers)
            .values()
            .filter(|c| c.info.labels.contains_key(key))
            .map(|c| c.info.clone())
            .collect())
    }

    async fn inspect(&self, id: &str) -> Result<ContainerInfo, RuntimeError> {
        let found = self
            .find(id)
            .ok_or_else(|| RuntimeError::NoSuchContainer(id.to_owned()))?;
        locked(&self.containers)
            .get(&found)
            .map(|c| c.info.clone())
            .ok_or_else(|| RuntimeError::NoSuchContainer(id.to_owned()))
    }

    async fn logs(&self, id: &str, follow: bool) -> Result<OutputStream, RuntimeError> {
        if follow {
            return self.reader(id, true);
        }
        let containers = locked(&self.containers);
        let c = containers
            .get(id)
            .ok_or_else(|| RuntimeError::NoSuchContainer(id.to_owned()))?;
        let all: Vec<_> = c.history.iter().cloned().map(Ok).collect();
        Ok(futures::stream::iter(all).boxed())
    }

    async fn stats(&self, id: &str) -> Result<StatsStream, RuntimeError> {
        let exit = locked(&self.containers)
            .get(id)
            .map(|c| c.exit.subscribe())
            .ok_or_else(|| RuntimeError::NoSuchContainer(id.to_owned()))?;
        let readings = self.readings.clone();
        let taken = self.readings_taken.clone();
        let fail_after = self.stats_fail_after.clone();
        let failed = self.stats_failed.clone();
        let stream = futures::stream::unfold(exit, move |exit| {
            let (readings, taken) = (readings.clone(), taken.clone());
            let (fail_after, failed) = (fail_after.clone(), failed.clone());
            async move {
                // As the engine's collector: a reading a second, none once it exited.
                tokio::time::sleep(Duration::from_secs(1)).await;
                if exit.borrow().is_some() {
                    return None;
                }
                let mut n = locked(&taken);
                if locked(&fail_after).is_some_and(|f| *n >= f) {
                    *locked(&failed) = true;
                    let error = RuntimeError::Unavailable("fake: stats refused".to_owned());
                    return Some((Err(error), exit));
                }
                let reading = {
                    let readings = locked(&readings);
                    readings.get(*n as usize).or(readings.last()).copied()
                }?;
                *n += 1;
                Some((Ok(reading), exit))
            }
        });
        Ok(stream.boxed())
    }
}
