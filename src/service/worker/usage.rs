//! An attempt's resource usage: readings of its container's counters, taken in a task
//! of their own while it runs, folded into the figures reported with the outcome.
//!
//! Sampling never holds up the attempt: the task is stopped (not awaited) once the
//! container is done with, and a failed reading ends the readings, keeping what was
//! read. The engine takes a reading about once a second and has nothing to read once a
//! container has exited, so the figures are those of the last reading before the exit,
//! and a container that lives less than a second may have none (no usage, then).

use std::sync::Arc;

use futures::StreamExt;
use tokio::sync::watch;
use tracing::Instrument;

use crate::domain::ports::{ContainerRuntime, ContainerSpec, RuntimeError, StatsSample};
use crate::domain::run::ResourceUsage;

/// What the readings so far add up to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Tally {
    peak_memory_bytes: u64,
    cpu_nanos: u64,
    samples: u32,
}

impl Tally {
    fn add(&mut self, sample: StatsSample) {
        let peak = sample
            .memory_peak_bytes
            .unwrap_or(0)
            .max(sample.memory_bytes);
        self.peak_memory_bytes = self.peak_memory_bytes.max(peak);
        // A running total: the latest is the largest, unless the engine restarted.
        self.cpu_nanos = self.cpu_nanos.max(sample.cpu_nanos);
        self.samples = self.samples.saturating_add(1);
    }

    /// The figures with the limits the container was created with; `None` without a
    /// reading, since a peak nobody read is not a peak of 0.
    fn usage(&self, memory_limit_bytes: u64, cpu_limit: Option<f64>) -> Option<ResourceUsage> {
        (self.samples > 0).then(|| ResourceUsage {
            peak_memory_bytes: self.peak_memory_bytes,
            cpu_seconds: self.cpu_nanos as f64 / 1e9,
            memory_limit_bytes: Some(memory_limit_bytes),
            cpu_limit,
            samples: self.samples,
        })
    }
}

/// Readings of one running container, until stopped or it exits.
pub(super) struct Sampler {
    task: tokio::task::JoinHandle<()>,
    tally: watch::Receiver<Tally>,
    memory_limit_bytes: u64,
    cpu_limit: Option<f64>,
}

impl Sampler {
    /// Start reading container `id`, created from `spec`, which runs now.
    pub(super) fn start(
        runtime: Arc<dyn ContainerRuntime>,
        id: &str,
        spec: &ContainerSpec,
    ) -> Self {
        let (tx, tally) = watch::channel(Tally::default());
        let task = tokio::spawn(read_until_exit(runtime, id.to_owned(), tx).in_current_span());
        Self {
            task,
            tally,
            memory_limit_bytes: spec.memory_bytes,
            cpu_limit: spec.cpu_limit,
        }
    }

    /// Stop reading; the figures so far.
    pub(super) fn stop(self) -> Option<ResourceUsage> {
        self.task.abort();
        self.tally
            .borrow()
            .usage(self.memory_limit_bytes, self.cpu_limit)
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn read_until_exit(
    runtime: Arc<dyn ContainerRuntime>,
    id: String,
    tally: watch::Sender<Tally>,
) {
    let failed = |error: RuntimeError| {
        // Gone already: it exited and was removed, nothing more to read.
        if !matches!(error, RuntimeError::NoSuchContainer(_)) {
            tracing::warn!(message = "reading the container's stats failed; its usage is what was read so far", container_id = %id, %error);
        }
    };
    let mut readings = match runtime.stats(&id).await {
        Ok(readings) => readings,
        Err(error) => return failed(error),
    };
    while let Some(reading) = readings.next().await {
        match reading {
            Ok(sample) => tally.send_modify(|t| t.add(sample)),
            Err(error) => return failed(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(memory: u64, peak: Option<u64>, cpu_ms: u64) -> StatsSample {
        StatsSample {
            memory_bytes: memory,
            memory_peak_bytes: peak,
            cpu_nanos: cpu_ms * 1_000_000,
        }
    }

    #[test]
    fn the_peak_is_the_highest_figure_read_and_cpu_the_last_total() {
        let mut tally = Tally::default();
        tally.add(sample(10, None, 100));
        // A high-water mark above every reading: the kernel saw a peak in between.
        tally.add(sample(30, Some(45), 400));
        tally.add(sample(20, Some(45), 900));
        assert_eq!(
            tally.usage(64, Some(0.5)),
            Some(ResourceUsage {
                peak_memory_bytes: 45,
                cpu_seconds: 0.9,
                memory_limit_bytes: Some(64),
                cpu_limit: Some(0.5),
                samples: 3,
            })
        );
    }

    #[test]
    fn without_a_high_water_mark_the_peak_is_the_highest_reading() {
        let mut tally = Tally::default();
        tally.add(sample(10, None, 1));
        tally.add(sample(50, None, 2));
        tally.add(sample(30, Some(0), 3));
        let usage = tally.usage(64, None).expect("readings");
        assert_eq!(usage.peak_memory_bytes, 50);
        assert_eq!(usage.samples, 3);
        assert_eq!(usage.cpu_limit, None);
    }

    #[test]
    fn no_reading_is_no_usage() {
        assert_eq!(Tally::default().usage(64, Some(1.0)), None);
    }

    mod worker {
        use std::sync::Arc;

        use super::super::super::fakes::{Call, FakeControl, FakeRuntime, claim, until, worker};
        use super::*;
        use crate::domain::run::Outcome;

        const MIB: u64 = 1024 * 1024;

        fn started(runtime: &FakeRuntime) -> Option<String> {
            runtime.calls().into_iter().find_map(|c| match c {
                Call::Start(id) => Some(id),
                _ => None,
            })
        }

        #[tokio::test(start_paused = true)]
        async fn the_worker_reports_what_it_read_with_the_limits_it_created() {
            let (control, runtime) = (
                Arc::new(FakeControl::default()),
                Arc::new(FakeRuntime::default()),
            );
            runtime.set_readings(vec![
                sample(10 * MIB, None, 100),
                sample(30 * MIB, Some(45 * MIB), 400),
                sample(20 * MIB, Some(45 * MIB), 900),
            ]);
            let mut claim = claim(None);
            claim.spec.resources.memory_bytes = Some(64 * MIB);
            claim.spec.resources.cpu_limit = Some(0.5);
            let w = worker(&control, &runtime);
            let task = tokio::spawn(async move { w.execute(claim, None).await });
            until(|| runtime.readings_taken() >= 3).await;
            let id = started(&runtime).expect("a container was started");
            runtime.exit(&id, 0);
            task.await.expect("attempt task");
            let finished = control.finished();
            assert_eq!(finished.len(), 1, "{finished:?}");
            assert_eq!(finished[0].outcome, Outcome::Exited { code: 0 });
            assert_eq!(
                finished[0].usage,
                Some(ResourceUsage {
                    peak_memory_bytes: 45 * MIB,
                    cpu_seconds: 0.9,
                    memory_limit_bytes: Some(64 * MIB),
                    cpu_limit: Some(0.5),
                    samples: runtime.readings_taken(),
                })
            );
        }

        #[tokio::test(start_paused = true)]
        async fn a_failed_reading_keeps_what_was_read_and_the_outcome() {
            let (control, runtime) = (
                Arc::new(FakeControl::default()),
                Arc::new(FakeRuntime::default()),
            );
            runtime.set_readings(vec![sample(8 * MIB, Some(12 * MIB), 50)]);
            runtime.fail_stats_after(1);
            let w = worker(&control, &runtime);
            let task = tokio::spawn(async move { w.execute(claim(None), None).await });
            // The second reading fails: the sampler stops there.
            until(|| runtime.stats_failed()).await;
            let id = started(&runtime).expect("a container was started");
            runtime.exit(&id, 4);
            task.await.expect("attempt task");
            let finished = control.finished();
            assert_eq!(finished[0].outcome, Outcome::Exited { code: 4 });
            let usage = finished[0].usage.expect("the reading before the failure");
            assert_eq!(usage.samples, 1);
            assert_eq!(usage.peak_memory_bytes, 12 * MIB);
            assert_eq!(usage.cpu_seconds, 0.05);
        }

        #[tokio::test(start_paused = true)]
        async fn a_container_nobody_could_read_has_no_usage() {
            let (control, runtime) = (
                Arc::new(FakeControl::default()),
                Arc::new(FakeRuntime::default()),
            );
            let w = worker(&control, &runtime);
            let task = tokio::spawn(async move { w.execute(claim(None), None).await });
            until(|| started(&runtime).is_some()).await;
            let id = started(&runtime).expect("a container was started");
            runtime.exit(&id, 0);
            task.await.expect("attempt task");
            let finished = control.finished();
            assert_eq!(finished[0].outcome, Outcome::Exited { code: 0 });
            assert_eq!(finished[0].usage, None);
        }
    }
}
