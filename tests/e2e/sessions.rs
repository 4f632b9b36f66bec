//! One worker id, one live worker: a second process presenting a live id is refused at
//! start (exit 78) and never touches the first one's containers; a clean exit or a crash
//! frees the id for the next process.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::{
    Invariants, Process, QueueGuard, TOKEN, WorkerSpec, amqp_server, attempts_of,
    start_worker_with, unique, worker,
};

const EXIT_WORKER_ID_IN_USE: i32 = 78;

fn dir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

async fn wait_log(process: &Process, needle: &str, within: Duration) {
    let deadline = Instant::now() + within;
    while !process.log_text().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "`{needle}` not in the log after {within:?}:\n{}",
            process.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_second_process_with_a_live_worker_id_is_refused_and_the_first_keeps_its_run() {
    let d = dir();
    let queue = unique("tasuki-sessions");
    let _queue = QueueGuard(queue.clone());
    let worker_id = unique("test-worker");
    let mut inv = Invariants::start(&[&worker_id]);
    let server = amqp_server(d.path(), &queue, "15s");
    let api = server.client();
    let spec = |env: Vec<(String, String)>| WorkerSpec {
        drain_timeout: "30s".into(),
        env,
        ..worker(&worker_id, 1)
    };
    let mut first = start_worker_with(d.path(), &server, &queue, TOKEN, spec(vec![]));
    let run = api.accept("sleep", json!({"seconds": "6"})).await;
    inv.accepted(&run);
    api.wait_log_contains(&run, "sleeping 6", Duration::from_secs(60))
        .await;

    // The first worker drains: its job still runs, and its session is still live.
    first.signal("TERM");
    wait_log(&first, "draining", Duration::from_secs(10)).await;

    // A second process on this host: the host lock refuses it.
    let mut second = start_worker_with(d.path(), &server, &queue, TOKEN, spec(vec![]));
    let status = second.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(
        status.code(),
        Some(EXIT_WORKER_ID_IN_USE),
        "{}",
        second.log_text()
    );
    let text = second.log_text();
    assert!(text.contains(&format!("`{worker_id}` is in use")), "{text}");
    assert!(text.contains(&format!("pid {}", first.pid())), "{text}");

    // A process that cannot see this host's lock (as on another host): the control
    // plane refuses it and names the live session's host, pid and start.
    let elsewhere = tempfile::tempdir().expect("lock dir");
    let mut third = start_worker_with(
        d.path(),
        &server,
        &queue,
        TOKEN,
        spec(vec![(
            "TASUKI_LOCK_DIR".into(),
            elsewhere.path().display().to_string(),
        )]),
    );
    let status = third.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(
        status.code(),
        Some(EXIT_WORKER_ID_IN_USE),
        "{}",
        third.log_text()
    );
    let text = third.log_text();
    let host = gethostname::gethostname().to_string_lossy().into_owned();
    assert!(text.contains(&format!("host {host}")), "{text}");
    assert!(text.contains(&format!("pid {}", first.pid())), "{text}");
    assert!(text.contains("since "), "{text}");

    // The first worker's job ran to its own end, untouched.
    let status = first.wait_exit(Duration::from_secs(40)).await;
    assert!(status.success(), "drained worker exited with {status}");
    let done = api.wait_final(&run, Duration::from_secs(30)).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["exit_code"], 0, "{done}");
    assert_eq!(attempts_of(&done).len(), 1, "{done}");

    // It said goodbye: the id is free at once, on this host and on any other.
    let fourth = start_worker_with(
        d.path(),
        &server,
        &queue,
        TOKEN,
        spec(vec![(
            "TASUKI_LOCK_DIR".into(),
            elsewhere.path().display().to_string(),
        )]),
    );
    wait_log(&fourth, "worker started", Duration::from_secs(20)).await;

    inv.expect_log(&run, 1, "sleeping 6\nwoke\n");
    inv.check(&api).await;
    assert_eq!(inv.containers_created(&run), 1);
}

#[tokio::test]
async fn a_worker_killed_with_sigkill_is_replaced_at_once_on_its_host() {
    let d = dir();
    let queue = unique("tasuki-sessions");
    let _queue = QueueGuard(queue.clone());
    let worker_id = unique("test-worker");
    // A long lease and session TTL: only the host lock can tell that the old process is
    // dead before a minute has passed.
    let server = amqp_server(d.path(), &queue, "60s");
    let mut first = start_worker_with(d.path(), &server, &queue, TOKEN, worker(&worker_id, 1));
    wait_log(&first, "worker started", Duration::from_secs(20)).await;
    first.kill9();

    let second = start_worker_with(d.path(), &server, &queue, TOKEN, worker(&worker_id, 1));
    wait_log(&second, "worker started", Duration::from_secs(20)).await;
    let api = server.client();
    let run = api.run_and_wait("exit", json!({"code": "0"})).await;
    assert_eq!(run["status"], "succeeded", "{run}");
}
