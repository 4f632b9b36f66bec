//! The registry as a scrape sees it: the observers' events moved into counters and
//! histograms with the right labels, the store's gauges read at render, the job label
//! capped, and engine errors counted by operation.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};

use super::*;
use crate::domain::job::{ContainerPolicy, JobSpec};
use crate::domain::job_lookup::JobLookup;
use crate::domain::observe::{ActiveRuns, Backlogs, RunObserver, StoreGauges, WorkerObserver};
use crate::domain::ports::{ContainerRuntime, RuntimeError, StoreError};
use crate::domain::run::{Attempt, ReasonCode, ResourceUsage, Run, RunId, RunStatus, Trigger};

struct Jobs(Vec<Arc<JobSpec>>);

impl JobLookup for Jobs {
    fn job(&self, name: &str) -> Option<Arc<JobSpec>> {
        self.0.iter().find(|j| j.name.as_str() == name).cloned()
    }
    fn jobs(&self) -> Vec<Arc<JobSpec>> {
        self.0.clone()
    }
}

fn jobs(names: &[&str]) -> Arc<dyn JobLookup> {
    let text = "image = \"img:1\"\ncommand = [\"true\"]\n";
    Arc::new(Jobs(
        names
            .iter()
            .map(|n| {
                Arc::new(
                    crate::catalog::parse_job_str(n, text, &[], &ContainerPolicy::default())
                        .unwrap(),
                )
            })
            .collect(),
    ))
}

#[derive(Default)]
struct Gauges {
    active: Mutex<Vec<ActiveRuns>>,
    backlogs: Mutex<Backlogs>,
    successes: Vec<(String, DateTime<Utc>)>,
}

#[async_trait]
impl StoreGauges for Gauges {
    async fn active_runs(&self) -> Result<Vec<ActiveRuns>, StoreError> {
        Ok(self.active.lock().unwrap().clone())
    }
    async fn backlogs(&self, _now: DateTime<Utc>) -> Result<Backlogs, StoreError> {
        Ok(*self.backlogs.lock().unwrap())
    }
    async fn last_successes(&self) -> Result<Vec<(String, DateTime<Utc>)>, StoreError> {
        Ok(self.successes.clone())
    }
}

fn at(s: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_800_000_000 + s, 0).unwrap()
}

fn attempt(number: u32, status: RunStatus, usage: Option<ResourceUsage>) -> Attempt {
    Attempt {
        output_gap: false,
        number,
        status,
        worker_id: "w1".into(),
        worker_build: None,
        container_id: Some("c".into()),
        exit_code: None,
        reason: None,
        reason_code: (status == RunStatus::Failed).then_some(ReasonCode::OomKilled),
        claimed_at: at(10),
        started_at: Some(at(11)),
        finished_at: Some(at(70)),
        log_dropped_bytes: 0,
        usage,
    }
}

fn run(job: &str, status: RunStatus, attempts: Vec<Attempt>) -> Run {
    Run {
        output_gap: false,
        id: RunId::new(),
        job: job.into(),
        params: BTreeMap::new(),
        status,
        trigger: Trigger::Api,
        attempt: attempts.len() as u32,
        exit_code: None,
        reason: None,
        reason_code: None,
        created_at: at(0),
        started_at: Some(at(11)),
        finished_at: status.is_final().then(|| at(70)),
        cancel_requested: false,
        not_before: None,
        log_dropped_bytes: 0,
        attempts,
        callbacks: Vec::new(),
        requested_by: None,
        replies: Vec::new(),
    }
}

/// The value of the sample `name{labels}` (labels as written, in order), if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn setup(names: &[&str], cap: usize) -> (Arc<Metrics>, Arc<RunMetrics>, Arc<Gauges>) {
    let metrics = Metrics::new().unwrap();
    let gauges = Arc::new(Gauges {
        successes: vec![("nightly".into(), at(-500))],
        ..Gauges::default()
    });
    let runs = RunMetrics::register(&metrics, jobs(names), gauges.clone(), cap).unwrap();
    (metrics, runs, gauges)
}

#[tokio::test]
async fn run_events_become_counters_and_histograms_by_job() {
    let (metrics, runs, _) = setup(&["nightly", "report"], 10);
    runs.run_accepted("nightly", &Trigger::Api);
    runs.run_accepted("nightly", &Trigger::Webhook);
    runs.run_accepted("report", &Trigger::Api);

    let usage = ResourceUsage {
        peak_memory_bytes: 300 * 1024 * 1024,
        cpu_seconds: 2.5,
        memory_limit_bytes: Some(512 * 1024 * 1024),
        cpu_limit: Some(1.0),
        ..ResourceUsage::default()
    };
    // Attempt 1 fails and is retried by rule (the run is queued again), attempt 2
    // succeeds and ends the run.
    let first = attempt(1, RunStatus::Failed, Some(usage));
    let claimed = run(
        "nightly",
        RunStatus::Running,
        vec![attempt(1, RunStatus::Running, None)],
    );
    runs.attempt_claimed(&claimed, 1);
    let retried = Run {
        status: RunStatus::Queued,
        finished_at: None,
        ..run("nightly", RunStatus::Queued, vec![first.clone()])
    };
    runs.attempt_ended(&retried, 1);
    let done = run(
        "nightly",
        RunStatus::Succeeded,
        vec![first, attempt(2, RunStatus::Succeeded, Some(usage))],
    );
    runs.attempt_claimed(&done, 2);
    runs.attempt_ended(&done, 2);

    let text = metrics.render().await;
    let s = |series: &str| sample(&text, series);
    assert_eq!(
        s(r#"tasuki_runs_accepted_total{job_name="nightly",trigger="api"}"#),
        Some(1.0)
    );
    assert_eq!(
        s(r#"tasuki_runs_accepted_total{job_name="nightly",trigger="webhook"}"#),
        Some(1.0)
    );
    assert_eq!(
        s(r#"tasuki_runs_accepted_total{job_name="report",trigger="api"}"#),
        Some(1.0)
    );
    assert_eq!(
        s(r#"tasuki_attempts_claimed_total{job_name="nightly"}"#),
        Some(2.0)
    );
    assert_eq!(
        s(
            r#"tasuki_attempts_finished_total{job_name="nightly",reason="oom_killed",status="failed"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        s(r#"tasuki_attempts_finished_total{job_name="nightly",reason="none",status="succeeded"}"#),
        Some(1.0)
    );
    // The retry did not end the run; the success did, once.
    assert_eq!(
        s(r#"tasuki_runs_finished_total{job_name="nightly",status="succeeded"}"#),
        Some(1.0)
    );
    assert_eq!(
        s(r#"tasuki_runs_finished_total{job_name="nightly",status="failed"}"#),
        None
    );
    // Queue wait: accepted at 0, first claimed at 10; observed for the first claim only.
    assert_eq!(
        s(r#"tasuki_run_queue_wait_seconds_count{job_name="nightly"}"#),
        Some(1.0)
    );
    assert_eq!(
        s(r#"tasuki_run_queue_wait_seconds_sum{job_name="nightly"}"#),
        Some(10.0)
    );
    assert_eq!(
        s(r#"tasuki_run_queue_wait_seconds_bucket{job_name="nightly",le="5"}"#),
        Some(0.0)
    );
    assert_eq!(
        s(r#"tasuki_run_queue_wait_seconds_bucket{job_name="nightly",le="15"}"#),
        Some(1.0)
    );
    // Duration: first claim (10) to the end (70).
    assert_eq!(
        s(r#"tasuki_run_duration_seconds_sum{job_name="nightly",status="succeeded"}"#),
        Some(60.0)
    );
    assert_eq!(
        s(
            r#"tasuki_run_duration_seconds_bucket{job_name="nightly",status="succeeded",le="21600"}"#
        ),
        Some(1.0)
    );
    // Usage of both ended attempts.
    assert_eq!(
        s(r#"tasuki_attempt_peak_memory_bytes_count{job_name="nightly"}"#),
        Some(2.0)
    );
    assert_eq!(
        s(r#"tasuki_attempt_peak_memory_bytes_bucket{job_name="nightly",le="268435456"}"#),
        Some(0.0)
    );
    assert_eq!(
        s(r#"tasuki_attempt_peak_memory_bytes_bucket{job_name="nightly",le="536870912"}"#),
        Some(2.0)
    );
    assert_eq!(
        s(r#"tasuki_attempt_cpu_seconds_total{job_name="nightly"}"#),
        Some(5.0)
    );
    // The success moved the last success past the store's older one.
    assert_eq!(
        s(r#"tasuki_job_last_success_timestamp_seconds{job_name="nightly"}"#),
        Some(1_800_000_070.0)
    );
    assert_eq!(
        s(&format!(
            r#"tasuki_build_info{{commit="{}",version="{}"}}"#,
            crate::COMMIT,
            env!("CARGO_PKG_VERSION")
        )),
        Some(1.0)
    );
    assert!(
        text.contains("# TYPE tasuki_run_duration_seconds histogram"),
        "{text}"
    );
}

#[tokio::test]
async fn an_attempt_without_usage_counts_but_observes_no_usage() {
    let (metrics, runs, _) = setup(&["nightly"], 10);
    let r = run(
        "nightly",
        RunStatus::Failed,
        vec![attempt(1, RunStatus::Failed, None)],
    );
    runs.attempt_ended(&r, 1);
    let text = metrics.render().await;
    assert_eq!(
        sample(
            &text,
            r#"tasuki_runs_finished_total{job_name="nightly",status="failed"}"#
        ),
        Some(1.0)
    );
    assert!(
        !text.contains("tasuki_attempt_peak_memory_bytes_count"),
        "{text}"
    );
    assert!(
        !text.contains("tasuki_attempt_cpu_seconds_total{"),
        "{text}"
    );
}

#[tokio::test]
async fn a_queued_cancel_ends_the_run_and_a_final_read_again_does_not() {
    let (metrics, runs, _) = setup(&["nightly"], 10);
    let cancelled = run("nightly", RunStatus::Cancelled, vec![]);
    runs.run_ended(&cancelled);
    runs.run_ended(&run("nightly", RunStatus::Queued, vec![]));
    let text = metrics.render().await;
    assert_eq!(
        sample(
            &text,
            r#"tasuki_runs_finished_total{job_name="nightly",status="cancelled"}"#
        ),
        Some(1.0)
    );
    // Never claimed: no duration.
    assert!(
        !text.contains("tasuki_run_duration_seconds_count"),
        "{text}"
    );
}

#[tokio::test]
async fn store_gauges_are_read_at_each_render_and_zeroed_when_gone() {
    let (metrics, _runs, gauges) = setup(&["nightly", "report"], 10);
    *gauges.active.lock().unwrap() = vec![
        ActiveRuns {
            job: "nightly".into(),
            status: RunStatus::Running,
            count: 2,
        },
        ActiveRuns {
            job: "report".into(),
            status: RunStatus::Queued,
            count: 5,
        },
        // Gone from the catalog: both land on the one `_other` series, added up.
        ActiveRuns {
            job: "gone-a".into(),
            status: RunStatus::Queued,
            count: 1,
        },
        ActiveRuns {
            job: "gone-b".into(),
            status: RunStatus::Queued,
            count: 3,
        },
    ];
    *gauges.backlogs.lock().unwrap() = Backlogs {
        outbox: 4,
        outbox_failed: 1,
        callbacks: 2,
        replies: 3,
    };
    let text = metrics.render().await;
    let s = |series: &str| sample(&text, series);
    assert_eq!(
        s(r#"tasuki_runs_active{job_name="nightly",status="running"}"#),
        Some(2.0)
    );
    assert_eq!(
        s(r#"tasuki_runs_active{job_name="report",status="queued"}"#),
        Some(5.0)
    );
    assert_eq!(
        s(r#"tasuki_runs_active{job_name="_other",status="queued"}"#),
        Some(4.0)
    );
    assert_eq!(s("tasuki_outbox_backlog"), Some(4.0));
    assert_eq!(s("tasuki_outbox_backlog_failed"), Some(1.0));
    assert_eq!(s("tasuki_callback_backlog"), Some(2.0));
    assert_eq!(s("tasuki_reply_backlog"), Some(3.0));
    // Seeded from the store at the first scrape.
    assert_eq!(
        s(r#"tasuki_job_last_success_timestamp_seconds{job_name="nightly"}"#),
        Some(1_799_999_500.0)
    );

    *gauges.active.lock().unwrap() = vec![ActiveRuns {
        job: "report".into(),
        status: RunStatus::Running,
        count: 1,
    }];
    let text = metrics.render().await;
    let s = |series: &str| sample(&text, series);
    assert_eq!(
        s(r#"tasuki_runs_active{job_name="nightly",status="running"}"#),
        Some(0.0)
    );
    assert_eq!(
        s(r#"tasuki_runs_active{job_name="report",status="queued"}"#),
        Some(0.0)
    );
    assert_eq!(
        s(r#"tasuki_runs_active{job_name="report",status="running"}"#),
        Some(1.0)
    );
}

#[tokio::test]
async fn job_names_past_the_cap_or_unknown_share_one_label() {
    let (metrics, runs, _) = setup(&["a", "b", "c"], 2);
    for job in ["a", "b", "c", "a", "nope"] {
        runs.run_accepted(
            job,
            &Trigger::Schedule {
                schedule: "default".into(),
                slot: at(0),
                business_date: at(0).date_naive(),
                local_time: "00:00".into(),
            },
        );
    }
    let text = metrics.render().await;
    let s = |job: &str| {
        sample(
            &text,
            &format!(r#"tasuki_runs_accepted_total{{job_name="{job}",trigger="schedule"}}"#),
        )
    };
    assert_eq!((s("a"), s("b"), s("c")), (Some(2.0), Some(1.0), None));
    assert_eq!(s(OTHER_JOBS), Some(2.0));
}

#[tokio::test]
async fn http_requests_are_labelled_by_route_template() {
    let metrics = Metrics::new().unwrap();
    metrics.observe_request("GET", "/v1/runs/{id}", 200, Duration::from_millis(30));
    metrics.observe_request("GET", UNMATCHED_ROUTE, 404, Duration::from_millis(1));
    let text = metrics.render().await;
    assert_eq!(
        sample(
            &text,
            r#"tasuki_http_request_duration_seconds_bucket{method="GET",route="/v1/runs/{id}",status="200",le="0.05"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"tasuki_http_request_duration_seconds_count{method="GET",route="unmatched",status="404"}"#
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn a_worker_counts_slots_starts_and_engine_errors_by_operation() {
    use crate::service::worker::fakes::FakeRuntime;
    let metrics = Metrics::new().unwrap();
    let worker = WorkerMetrics::register(&metrics).unwrap();
    worker.slots(1, 3);
    let fake = Arc::new(FakeRuntime::default());
    let runtime = ObservedRuntime::new(fake.clone(), worker.clone());
    assert!(matches!(
        runtime.inspect("missing").await,
        Err(RuntimeError::NoSuchContainer(_))
    ));
    let text = metrics.render().await;
    let s = |series: &str| sample(&text, series);
    assert_eq!(s(r#"tasuki_worker_slots{state="busy"}"#), Some(1.0));
    assert_eq!(s(r#"tasuki_worker_slots{state="free"}"#), Some(2.0));
    assert_eq!(
        s(r#"tasuki_docker_errors_total{kind="no_such_container",operation="inspect"}"#),
        Some(1.0)
    );
}
