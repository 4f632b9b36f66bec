//! `logs = "fast"`: output taken by attach only (log driver `none`). A run whose worker
//! stays has its whole output; a run whose worker is killed while its container writes
//! loses what was written while nobody was attached, and says so (`output_gap`,
//! `logs_truncated`), never silently.

use std::time::Duration;

use serde_json::json;

use crate::common::{
    Invariants, QueueGuard, TOKEN, amqp_server, attempts_of, containers_of, docker_cli,
    start_worker_with, unique, worker,
};

fn lines(from: u32, to: u32) -> String {
    (from..=to).map(|i| format!("line {i}\n")).collect()
}

/// The container's log driver, as Docker says.
fn log_driver(container: &str) -> String {
    let out = std::process::Command::new(docker_cli())
        .args([
            "inspect",
            "--format",
            "{{.HostConfig.LogConfig.Type}}",
            container,
        ])
        .output()
        .expect("docker inspect");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test]
async fn a_fast_mode_run_stores_its_whole_output_and_no_gap() {
    let d = tempfile::tempdir().expect("temp dir");
    let queue = unique("tasuki-fastlogs");
    let _queue = QueueGuard(queue.clone());
    let worker_id = unique("test-worker");
    let mut inv = Invariants::start(&[&worker_id]);
    let server = amqp_server(d.path(), &queue, "10s");
    let api = server.client();
    let _worker = start_worker_with(d.path(), &server, &queue, TOKEN, worker(&worker_id, 1));

    let id = api
        .accept("count-fast", json!({"lines": "3000", "pause": "0"}))
        .await;
    inv.accepted(&id);
    let run = api.wait_final(&id, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["logs_truncated"], false, "{run}");
    assert!(run.get("output_gap").is_none(), "{run}");
    inv.expect_log(&id, 1, lines(1, 3000));
    inv.check(&api).await;
}

#[tokio::test]
async fn a_worker_killed_while_a_fast_mode_container_writes_flags_the_gap() {
    let d = tempfile::tempdir().expect("temp dir");
    let queue = unique("tasuki-fastlogs");
    let _queue = QueueGuard(queue.clone());
    let worker_id = unique("test-worker");
    let mut inv = Invariants::start(&[&worker_id]);
    let server = amqp_server(d.path(), &queue, "10s");
    let api = server.client();
    let mut first = start_worker_with(d.path(), &server, &queue, TOKEN, worker(&worker_id, 1));

    // About 8 s of steady output.
    let total = 400;
    let id = api
        .accept(
            "count-fast",
            json!({"lines": total.to_string(), "pause": "0.02"}),
        )
        .await;
    inv.accepted(&id);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while api.attempt_log(&id, None).await.1.len() < 100 {
        assert!(std::time::Instant::now() < deadline, "no output after 60 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.kill9();
    let left = containers_of(&worker_id);
    assert_eq!(left.len(), 1, "the container runs on without its worker");
    // No engine copy: the container's output exists only on an attach.
    assert_eq!(log_driver(&left[0]), "none");
    // Output written now reaches nobody.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let _second = start_worker_with(d.path(), &server, &queue, TOKEN, worker(&worker_id, 1));
    let run = api.wait_final(&id, Duration::from_secs(120)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["attempt"], 1, "{run}");
    assert_eq!(run["output_gap"], true, "{run}");
    assert_eq!(run["logs_truncated"], true, "{run}");
    assert_eq!(attempts_of(&run)[0]["output_gap"], true, "{run}");

    // What was stored is the output's start and, after the gap, its end: nothing
    // made up, nothing twice.
    let (_, log) = api.attempt_log(&id, Some(1)).await;
    let all = lines(1, total);
    assert!(
        log.len() < all.len(),
        "nothing was missed: {} bytes",
        log.len()
    );
    let text = String::from_utf8(log).expect("text");
    let end = format!("line {total}\n");
    let kept = text
        .bytes()
        .zip(all.bytes())
        .take_while(|(a, b)| a == b)
        .count();
    assert!(kept >= 100, "the output before the kill is stored");
    // After the gap the output resumes, maybe mid-line; from its first whole line on,
    // it is the output's end.
    let resumed = text[kept..].split_once('\n').map_or("", |(_, r)| r);
    assert!(
        resumed.ends_with(&end) && all.ends_with(resumed),
        "after the gap: {resumed:?}"
    );
    inv.check(&api).await;
}
