//! The control plane's metrics: runs accepted, attempts claimed and ended, runs ended
//! with their durations, resource usage, and, read from the store at each scrape, the
//! runs waiting or running and the relays' backlogs. Counters count events in this
//! process (retention deletes rows, so no counter is ever a row count).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use prometheus::{
    CounterVec, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
};

use super::jobs::JobNames;
use super::{BATCH_SECONDS, Metrics, MetricsError, epoch_seconds};
use crate::domain::job_lookup::JobLookup;
use crate::domain::observe::{self, RunObserver, StoreGauges};
use crate::domain::run::{Run, RunStatus, Trigger};

/// Peak memory buckets: powers of two from 4 MiB to 64 GiB.
fn memory_buckets() -> Vec<f64> {
    (22..=36)
        .map(|p| f64::from(1u32 << (p - 20)) * 1024.0 * 1024.0)
        .collect()
}

pub struct RunMetrics {
    names: JobNames,
    store: Arc<dyn StoreGauges>,
    accepted: IntCounterVec,
    claimed: IntCounterVec,
    attempts_ended: IntCounterVec,
    runs_ended: IntCounterVec,
    duration: HistogramVec,
    queue_wait: HistogramVec,
    peak_memory: HistogramVec,
    cpu: CounterVec,
    active: IntGaugeVec,
    last_success: GaugeVec,
    outbox: IntGauge,
    outbox_failed: IntGauge,
    callbacks: IntGauge,
    replies: IntGauge,
    /// Label pairs of `active` set before: zeroed at each refresh, so a job whose runs
    /// all ended reads 0 instead of its last count.
    active_seen: Mutex<Vec<(String, &'static str)>>,
    /// Serialises read-compare-set of `last_success`.
    success_lock: Mutex<()>,
    /// The last successes were read from the store once (they are kept from then on).
    seeded: AtomicBool,
}

fn counter(name: &str, help: &str, labels: &[&str]) -> Result<IntCounterVec, MetricsError> {
    Ok(IntCounterVec::new(Opts::new(name, help), labels)?)
}

fn histogram(
    name: &str,
    help: &str,
    buckets: Vec<f64>,
    labels: &[&str],
) -> Result<HistogramVec, MetricsError> {
    Ok(HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets),
        labels,
    )?)
}

fn gauge(name: &str, help: &str) -> Result<IntGauge, MetricsError> {
    Ok(IntGauge::new(name, help)?)
}

impl RunMetrics {
    /// Registers the run metrics in `metrics`, whose scrapes then refresh the store's
    /// gauges through `store`.
    pub fn register(
        metrics: &Metrics,
        jobs: Arc<dyn JobLookup>,
        store: Arc<dyn StoreGauges>,
        max_job_names: usize,
    ) -> Result<Arc<RunMetrics>, MetricsError> {
        let job = "job_name";
        let this = Arc::new(RunMetrics {
            names: JobNames::new(jobs, max_job_names),
            store,
            accepted: counter(
                "tasuki_runs_accepted_total",
                "Runs accepted, by job and trigger (api, schedule, webhook).",
                &[job, "trigger"],
            )?,
            claimed: counter(
                "tasuki_attempts_claimed_total",
                "Attempts claimed by a worker, by job.",
                &[job],
            )?,
            attempts_ended: counter(
                "tasuki_attempts_finished_total",
                "Attempts ended, by job, status and reason code (none when it succeeded).",
                &[job, "status", "reason"],
            )?,
            runs_ended: counter(
                "tasuki_runs_finished_total",
                "Runs that reached a final state, by job and status.",
                &[job, "status"],
            )?,
            duration: histogram(
                "tasuki_run_duration_seconds",
                "From a run's first claim to its final state (every attempt and backoff), by job and status.",
                BATCH_SECONDS.to_vec(),
                &[job, "status"],
            )?,
            queue_wait: histogram(
                "tasuki_run_queue_wait_seconds",
                "From a run's acceptance to its first claim (admission included), by job.",
                BATCH_SECONDS.to_vec(),
                &[job],
            )?,
            peak_memory: histogram(
                "tasuki_attempt_peak_memory_bytes",
                "The highest memory use of an ended attempt's container, by job.",
                memory_buckets(),
                &[job],
            )?,
            cpu: CounterVec::new(
                Opts::new(
                    "tasuki_attempt_cpu_seconds_total",
                    "CPU time (user and system) used by ended attempts' containers, by job.",
                ),
                &[job],
            )?,
            active: IntGaugeVec::new(
                Opts::new(
                    "tasuki_runs_active",
                    "Runs waiting (queued) or in a worker's hands (running) now, by job.",
                ),
                &[job, "status"],
            )?,
            last_success: GaugeVec::new(
                Opts::new(
                    "tasuki_job_last_success_timestamp_seconds",
                    "When the job's latest successful run ended (seconds since the epoch).",
                ),
                &[job],
            )?,
            outbox: gauge(
                "tasuki_outbox_backlog",
                "Runs due for the queue whose publish the broker has not confirmed.",
            )?,
            outbox_failed: gauge(
                "tasuki_outbox_backlog_failed",
                "Of the outbox backlog, publishes that failed at least once.",
            )?,
            callbacks: gauge(
                "tasuki_callback_backlog",
                "Completion callbacks neither delivered nor given up.",
            )?,
            replies: gauge(
                "tasuki_reply_backlog",
                "Replies to queue producers due and not confirmed by the broker.",
            )?,
            active_seen: Mutex::default(),
            success_lock: Mutex::default(),
            seeded: AtomicBool::new(false),
        });
        let r = metrics.registry();
        r.register(Box::new(this.accepted.clone()))?;
        r.register(Box::new(this.claimed.clone()))?;
        r.register(Box::new(this.attempts_ended.clone()))?;
        r.register(Box::new(this.runs_ended.clone()))?;
        r.register(Box::new(this.duration.clone()))?;
        r.register(Box::new(this.queue_wait.clone()))?;
        r.register(Box::new(this.peak_memory.clone()))?;
        r.register(Box::new(this.cpu.clone()))?;
        r.register(Box::new(this.active.clone()))?;
        r.register(Box::new(this.last_success.clone()))?;
        r.register(Box::new(this.outbox.clone()))?;
        r.register(Box::new(this.outbox_failed.clone()))?;
        r.register(Box::new(this.callbacks.clone()))?;
        r.register(Box::new(this.replies.clone()))?;
        metrics.set_runs(this.clone());
        Ok(this)
    }

    /// Raise the job's last success to `at` (never lower it).
    fn succeeded(&self, job: &str, at: DateTime<Utc>) {
        let _serial = self.success_lock.lock().unwrap_or_else(|p| p.into_inner());
        let gauge = self
            .last_success
            .with_label_values(&[&self.names.label(job)]);
        let at = epoch_seconds(at);
        if at > gauge.get() {
            gauge.set(at);
        }
    }

    fn ended(&self, run: &Run) {
        let job = self.names.label(&run.job);
        self.runs_ended
            .with_label_values(&[&job, run.status.as_str()])
            .inc();
        if let Some(took) = observe::run_duration(run) {
            self.duration
                .with_label_values(&[&job, run.status.as_str()])
                .observe(took.as_secs_f64());
        }
        if let (RunStatus::Succeeded, Some(at)) = (run.status, run.finished_at) {
            self.succeeded(&run.job, at);
        }
    }

    /// The store's gauges, read now; a store that fails keeps the last values (logged).
    pub async fn refresh(&self) {
        if !self.seeded.load(Ordering::SeqCst) {
            match self.store.last_successes().await {
                Ok(list) => {
                    for (job, at) in list {
                        self.succeeded(&job, at);
                    }
                    self.seeded.store(true, Ordering::SeqCst);
                }
                Err(error) => {
                    tracing::warn!(message = "metrics: reading last successes failed", %error)
                }
            }
        }
        match self.store.active_runs().await {
            Ok(rows) => {
                // Jobs sharing a label (`_other`) add up.
                let mut counts: BTreeMap<(String, &'static str), i64> = BTreeMap::new();
                for row in rows {
                    let key = (self.names.label(&row.job), row.status.as_str());
                    *counts.entry(key).or_default() += i64::try_from(row.count).unwrap_or(i64::MAX);
                }
                let mut seen = self.active_seen.lock().unwrap_or_else(|p| p.into_inner());
                for (job, status) in seen.iter() {
                    if !counts.contains_key(&(job.clone(), status)) {
                        self.active
                            .with_label_values(&[job.as_str(), status])
                            .set(0);
                    }
                }
                for ((job, status), n) in counts {
                    self.active.with_label_values(&[&job, status]).set(n);
                    if !seen.iter().any(|(j, s)| *j == job && *s == status) {
                        seen.push((job, status));
                    }
                }
            }
            Err(error) => tracing::warn!(message = "metrics: reading active runs failed", %error),
        }
        match self.store.backlogs(Utc::now()).await {
            Ok(b) => {
                let set = |g: &IntGauge, v: u64| g.set(i64::try_from(v).unwrap_or(i64::MAX));
                set(&self.outbox, b.outbox);
                set(&self.outbox_failed, b.outbox_failed);
                set(&self.callbacks, b.callbacks);
                set(&self.replies, b.replies);
            }
            Err(error) => tracing::warn!(message = "metrics: reading backlogs failed", %error),
        }
    }
}

impl RunObserver for RunMetrics {
    fn run_accepted(&self, job: &str, trigger: &Trigger) {
        self.accepted
            .with_label_values(&[&self.names.label(job), trigger.kind()])
            .inc();
    }

    fn attempt_claimed(&self, run: &Run, attempt: u32) {
        let job = self.names.label(&run.job);
        self.claimed.with_label_values(&[&job]).inc();
        if attempt == 1
            && let Some(wait) = observe::queue_wait(run)
        {
            self.queue_wait
                .with_label_values(&[&job])
                .observe(wait.as_secs_f64());
        }
    }

    fn attempt_ended(&self, run: &Run, attempt: u32) {
        let job = self.names.label(&run.job);
        if let Some(a) = run.attempts.iter().find(|a| a.number == attempt) {
            let reason = a.reason_code.map_or("none", |c| c.as_str());
            self.attempts_ended
                .with_label_values(&[&job, a.status.as_str(), reason])
                .inc();
            if let Some(usage) = a.usage {
                self.peak_memory
                    .with_label_values(&[&job])
                    .observe(usage.peak_memory_bytes as f64);
                if usage.cpu_seconds.is_finite() && usage.cpu_seconds > 0.0 {
                    self.cpu
                        .with_label_values(&[&job])
                        .inc_by(usage.cpu_seconds);
                }
            }
        }
        if let Some(run) = observe::ended_run(run, attempt) {
            self.ended(run);
        }
    }

    fn run_ended(&self, run: &Run) {
        if run.status.is_final() {
            self.ended(run);
        }
    }
}
