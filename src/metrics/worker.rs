//! A worker's metrics: its slots, the containers it started, and the container
//! engine's errors by operation. `ObservedRuntime` counts the engine's side by wrapping
//! the `ContainerRuntime` port, so neither the worker nor the Docker adapter knows.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use prometheus::{IntCounter, IntCounterVec, IntGaugeVec, Opts};

use super::{Metrics, MetricsError};
use crate::domain::job::PullPolicy;
use crate::domain::observe::WorkerObserver;
use crate::domain::ports::{
    ContainerExit, ContainerInfo, ContainerRuntime, ContainerSpec, OutputStream, RuntimeError,
    StatsStream,
};
use crate::domain::secret::RegistryCredentials;

pub struct WorkerMetrics {
    slots: IntGaugeVec,
    started: IntCounter,
    errors: IntCounterVec,
}

impl WorkerMetrics {
    pub fn register(metrics: &Metrics) -> Result<Arc<WorkerMetrics>, MetricsError> {
        let this = WorkerMetrics {
            slots: IntGaugeVec::new(
                Opts::new(
                    "tasuki_worker_slots",
                    "The worker's slots: busy (holding an attempt) or free.",
                ),
                &["state"],
            )?,
            started: IntCounter::new(
                "tasuki_worker_containers_started_total",
                "Containers the worker started.",
            )?,
            errors: IntCounterVec::new(
                Opts::new(
                    "tasuki_docker_errors_total",
                    "Container engine calls that failed, by operation and kind of error.",
                ),
                &["operation", "kind"],
            )?,
        };
        let r = metrics.registry();
        r.register(Box::new(this.slots.clone()))?;
        r.register(Box::new(this.started.clone()))?;
        r.register(Box::new(this.errors.clone()))?;
        Ok(Arc::new(this))
    }

    fn failed(&self, operation: &str, error: &RuntimeError) {
        self.errors
            .with_label_values(&[operation, error_kind(error)])
            .inc();
    }
}

impl WorkerObserver for WorkerMetrics {
    fn slots(&self, busy: usize, capacity: usize) {
        let free = capacity.saturating_sub(busy);
        let n = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
        self.slots.with_label_values(&["busy"]).set(n(busy));
        self.slots.with_label_values(&["free"]).set(n(free));
    }
}

/// A fixed word for each kind of engine error (never its text).
fn error_kind(error: &RuntimeError) -> &'static str {
    match error {
        RuntimeError::ImageNotFound { .. } => "image_not_found",
        RuntimeError::PullUnauthorized { .. } => "pull_unauthorized",
        RuntimeError::PullFailed { .. } => "pull_failed",
        RuntimeError::NoSuchContainer(_) => "no_such_container",
        RuntimeError::NameConflict(_) => "name_conflict",
        RuntimeError::Unavailable(_) => "unavailable",
        RuntimeError::Docker(_) => "engine",
    }
}

/// A `ContainerRuntime` that counts what the one inside it does.
pub struct ObservedRuntime {
    inner: Arc<dyn ContainerRuntime>,
    metrics: Arc<WorkerMetrics>,
}

impl ObservedRuntime {
    pub fn new(inner: Arc<dyn ContainerRuntime>, metrics: Arc<WorkerMetrics>) -> ObservedRuntime {
        ObservedRuntime { inner, metrics }
    }

    fn count<T>(
        &self,
        operation: &str,
        result: Result<T, RuntimeError>,
    ) -> Result<T, RuntimeError> {
        if let Err(error) = &result {
            self.metrics.failed(operation, error);
        }
        result
    }
}

#[async_trait]
impl ContainerRuntime for ObservedRuntime {
    async fn ping(&self) -> Result<(), RuntimeError> {
        self.count("ping", self.inner.ping().await)
    }

    async fn ensure_image(
        &self,
        image: &str,
        policy: PullPolicy,
        credentials: Option<&RegistryCredentials>,
    ) -> Result<(), RuntimeError> {
        let result = self.inner.ensure_image(image, policy, credentials).await;
        self.count("ensure_image", result)
    }

    async fn create(&self, spec: &ContainerSpec) -> Result<String, RuntimeError> {
        self.count("create", self.inner.create(spec).await)
    }

    async fn attach(&self, id: &str) -> Result<OutputStream, RuntimeError> {
        self.count("attach", self.inner.attach(id).await)
    }

    async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        let result = self.count("start", self.inner.start(id).await);
        if result.is_ok() {
            self.metrics.started.inc();
        }
        result
    }

    async fn wait(&self, id: &str) -> Result<ContainerExit, RuntimeError> {
        self.count("wait", self.inner.wait(id).await)
    }

    async fn stop(&self, id: &str, grace: Duration) -> Result<(), RuntimeError> {
        self.count("stop", self.inner.stop(id, grace).await)
    }

    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        self.count("remove", self.inner.remove(id).await)
    }

    async fn list_labelled(
        &self,
        key: &str,
        value: &str,
    ) -> Result<Vec<ContainerInfo>, RuntimeError> {
        self.count("list", self.inner.list_labelled(key, value).await)
    }

    async fn list_with_label(&self, key: &str) -> Result<Vec<ContainerInfo>, RuntimeError> {
        self.count("list", self.inner.list_with_label(key).await)
    }

    async fn inspect(&self, id: &str) -> Result<ContainerInfo, RuntimeError> {
        self.count("inspect", self.inner.inspect(id).await)
    }

    async fn logs(&self, id: &str, follow: bool) -> Result<OutputStream, RuntimeError> {
        self.count("logs", self.inner.logs(id, follow).await)
    }

    async fn stats(&self, id: &str) -> Result<StatsStream, RuntimeError> {
        self.count("stats", self.inner.stats(id).await)
    }
}
