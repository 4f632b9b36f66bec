//! Resource usage per attempt: the worker reads its container's stats while it runs,
//! and the run JSON shows peak memory and CPU next to the limits the job set. In
//! embedded mode, and through a remote worker's finish report over HTTP.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::common::{
    QueueGuard, ServeOptions, Server, TOKEN, assert_no_containers_left, start_worker, tasuki_cli,
    unique,
};

/// Bytes the holding job keeps in a shell variable (resident: busybox sh holds a
/// variable's value on its heap).
const HELD: u64 = 24_000_000;
const MIB: u64 = 1024 * 1024;

/// Builds a 24 MB variable (the command substitution's buffer briefly doubles it),
/// burns CPU in a shell loop, and holds the memory for two seconds of readings.
const HOLD_JOB: &str = r#"
image = "tasuki-example:latest"
pull = "never"
network = "none"
command = ["sh", "-c", "x=$(head -c 24000000 /dev/zero | tr '\\0' a); i=0; while [ $i -lt 100000 ]; do i=$((i+1)); done; sleep 2; echo held ${#x} bytes"]
[resources]
memory = "96MiB"
cpu_limit = 1.5
"#;

/// Holds 10 MB for three seconds of readings, then asks for 40 MB more than its
/// 32 MiB allow.
const OOM_JOB: &str = r#"
image = "tasuki-example:latest"
pull = "never"
network = "none"
command = ["sh", "-c", "x=$(head -c 10000000 /dev/zero | tr '\\0' a); echo holding ${#x}; sleep 3; y=$x$x$x$x; echo survived ${#y}"]
[resources]
memory = "32MiB"
"#;

fn jobs_dir(dir: &Path) -> PathBuf {
    let jobs = dir.join("jobs");
    std::fs::create_dir(&jobs).expect("jobs dir");
    std::fs::write(jobs.join("hold.toml"), HOLD_JOB).expect("hold job");
    std::fs::write(jobs.join("hog.toml"), OOM_JOB).expect("oom job");
    jobs
}

/// The usage of the run's only attempt, checked for shape.
fn usage_of(run: &Value) -> &Value {
    let attempts = run["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 1, "{run}");
    let usage = &attempts[0]["usage"];
    assert!(usage.is_object(), "attempt without usage: {run}");
    usage
}

fn u64_of(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

/// What the holding job's run must show, wherever it ran.
fn assert_hold_usage(run: &Value) {
    assert_eq!(run["status"], "succeeded", "{run}");
    let usage = usage_of(run);
    eprintln!("hold job usage: {usage}");
    let peak = u64_of(&usage["peak_memory_bytes"]);
    let limit = u64_of(&usage["memory_limit_bytes"]);
    assert_eq!(limit, 96 * MIB, "the job's memory: {usage}");
    assert!(
        peak >= HELD,
        "peak {peak} below the {HELD} bytes held: {usage}"
    );
    assert!(
        peak <= limit,
        "peak {peak} above the limit {limit}: {usage}"
    );
    assert_eq!(usage["cpu_limit"], 1.5, "the job's cpu_limit: {usage}");
    let cpu = usage["cpu_seconds"].as_f64().expect("cpu_seconds");
    assert!(cpu > 0.0, "no CPU time: {usage}");
    // Two seconds of holding alone are several readings.
    assert!(u64_of(&usage["samples"]) >= 2, "{usage}");
}

#[tokio::test]
async fn a_runs_json_shows_the_peak_memory_and_cpu_its_container_used() {
    let d = tempfile::tempdir().unwrap();
    let options = ServeOptions {
        jobs_dir: jobs_dir(d.path()),
        ..ServeOptions::default()
    };
    let server = Server::start(d.path(), options);
    let api = server.client();
    let run = api.run_and_wait("hold", json!({})).await;
    let id = run["id"].as_str().expect("id").to_owned();
    assert_eq!(
        String::from_utf8_lossy(&api.logs(&id).await),
        format!("held {HELD} bytes\n")
    );
    assert_hold_usage(&run);

    // `tasuki status` keeps the JSON on stdout and says it for people on stderr.
    let out = tasuki_cli(&server.url, &["status", &id]);
    assert_eq!(out.status.code(), Some(0));
    let printed: Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!(printed["attempts"][0]["usage"], run["attempts"][0]["usage"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stderr}");
    assert!(
        stderr.contains("tasuki: attempt 1: peak memory ")
            && stderr.contains(" of 96 MiB, CPU ")
            && stderr.contains("(limit 1.5 cores)"),
        "{stderr}"
    );
    assert_no_containers_left(&server.process.worker_id).await;
}

#[tokio::test]
async fn an_oom_killed_attempt_shows_its_peak_next_to_its_limit() {
    let d = tempfile::tempdir().unwrap();
    let options = ServeOptions {
        jobs_dir: jobs_dir(d.path()),
        ..ServeOptions::default()
    };
    let server = Server::start(d.path(), options);
    let api = server.client();
    let run = api.run_and_wait("hog", json!({})).await;
    assert_eq!(run["status"], "failed", "{run}");
    assert_eq!(run["reason_code"], "oom_killed", "{run}");
    let id = run["id"].as_str().expect("id");
    assert_eq!(
        String::from_utf8_lossy(&api.logs(id).await),
        "holding 10000000\n"
    );
    let usage = usage_of(&run);
    eprintln!("oom job usage: {usage}");
    let peak = u64_of(&usage["peak_memory_bytes"]);
    let limit = u64_of(&usage["memory_limit_bytes"]);
    assert_eq!(limit, 32 * MIB);
    // The last reading comes before the fatal allocation, so the peak shown is the
    // hold's: 10 MB held, its build briefly twice that (about 68% of the limit here).
    assert!(
        peak >= limit / 2 && peak <= limit,
        "peak {peak} outside half the limit to the limit {limit}: {usage}"
    );
    assert_eq!(usage["cpu_limit"], Value::Null, "the job sets no cpu_limit");
    assert!(u64_of(&usage["samples"]) >= 2, "{usage}");
}

#[tokio::test]
async fn a_remote_workers_finish_report_carries_the_usage() {
    let d = tempfile::tempdir().unwrap();
    let queue = unique("tasuki-test");
    let _guard = QueueGuard(queue.clone());
    let options = ServeOptions {
        jobs_dir: jobs_dir(d.path()),
        amqp_queue: Some(queue.clone()),
        worker_token: Some(TOKEN.to_owned()),
        ..ServeOptions::default()
    };
    let server = Server::start(d.path(), options);
    let worker = start_worker(d.path(), &server, &queue, TOKEN, 1);
    let run = server.client().run_and_wait("hold", json!({})).await;
    assert_eq!(run["attempts"][0]["worker_id"], worker.worker_id.as_str());
    assert_hold_usage(&run);
    assert_no_containers_left(&worker.worker_id).await;
}
