//! Prometheus metrics: one registry per process, rendered in the classic text format
//! (0.0.4) for `GET /metrics`. `RunMetrics` is the control plane's
//! `domain::observe::RunObserver` (and reads the store's gauges at each scrape);
//! `WorkerMetrics` is a worker's `WorkerObserver`, and `ObservedRuntime` wraps its
//! `ContainerRuntime` to count engine errors by operation. Label values are only ever
//! bounded sets: job names the catalog knows (capped, see `jobs`), statuses, reason
//! codes, triggers, route templates; never a run id, exit code or error text.

mod jobs;
mod runs;
mod worker;

#[cfg(test)]
mod tests;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, IntGaugeVec, Opts, Registry, TextEncoder};

pub use jobs::{JobNames, MAX_JOB_NAMES, OTHER_JOBS};
pub use runs::RunMetrics;
pub use worker::{ObservedRuntime, WorkerMetrics};

/// The `Content-Type` of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A metric that could not be registered (a name or label set given twice): a bug,
/// found at start-up.
#[derive(Debug, thiserror::Error)]
#[error("registering a metric: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

/// Buckets for batch work: one second to six hours.
pub(crate) const BATCH_SECONDS: [f64; 15] = [
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0, 7200.0, 10800.0,
    14400.0, 21600.0,
];

/// Buckets for HTTP requests, from the worker protocol's millisecond calls (20 ms is
/// the claim latency a fleet is judged by) up to the long polls (`?wait=`) of minutes.
const HTTP_SECONDS: [f64; 17] = [
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0,
];

/// The label of requests no route matched: never the raw path.
pub const UNMATCHED_ROUTE: &str = "unmatched";

/// A process's registry, and what every process has: build info and HTTP timings.
pub struct Metrics {
    registry: Registry,
    http: HistogramVec,
    runs: OnceLock<Arc<RunMetrics>>,
    /// One scrape at a time: a refresh zeroes and refills gauges.
    scrape: tokio::sync::Mutex<()>,
}

impl Metrics {
    pub fn new() -> Result<Arc<Metrics>, MetricsError> {
        let registry = Registry::new();
        let build = IntGaugeVec::new(
            Opts::new(
                "tasuki_build_info",
                "The running tasuki's version and the commit it was built from; always 1.",
            ),
            &["version", "commit"],
        )?;
        build
            .with_label_values(&[env!("CARGO_PKG_VERSION"), crate::COMMIT])
            .set(1);
        registry.register(Box::new(build))?;
        let http = HistogramVec::new(
            HistogramOpts::new(
                "tasuki_http_request_duration_seconds",
                "HTTP requests by method, route template and status, until the response head.",
            )
            .buckets(HTTP_SECONDS.to_vec()),
            &["method", "route", "status"],
        )?;
        registry.register(Box::new(http.clone()))?;
        Ok(Arc::new(Metrics {
            registry,
            http,
            runs: OnceLock::new(),
            scrape: tokio::sync::Mutex::new(()),
        }))
    }

    pub(crate) fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The run metrics whose store gauges each scrape refreshes (`serve` only).
    pub(crate) fn set_runs(&self, runs: Arc<RunMetrics>) {
        let _ = self.runs.set(runs);
    }

    /// One request: `method` one of a fixed set, `route` a template or
    /// [`UNMATCHED_ROUTE`].
    pub fn observe_request(&self, method: &str, route: &str, status: u16, took: Duration) {
        self.http
            .with_label_values(&[method, route, &status.to_string()])
            .observe(took.as_secs_f64());
    }

    /// The exposition: the store's gauges read now (in `serve`), then every metric.
    pub async fn render(&self) -> String {
        let _one = self.scrape.lock().await;
        if let Some(runs) = self.runs.get() {
            runs.refresh().await;
        }
        let mut text = String::new();
        if let Err(error) = TextEncoder::new().encode_utf8(&self.registry.gather(), &mut text) {
            tracing::error!(message = "encoding metrics failed", %error);
        }
        text
    }
}

/// Seconds since the epoch, as Prometheus timestamps go.
pub(crate) fn epoch_seconds(t: chrono::DateTime<chrono::Utc>) -> f64 {
    t.timestamp_millis() as f64 / 1000.0
}
