//! Fault tests (issue 3) that leave the shared RabbitMQ and Docker engine running: each
//! has its own queue, port, data dir and worker ids, kills only the processes it
//! started, removes its containers, and ends by checking the invariants
//! ([`Invariants::check`]). Tests that stop or reconfigure the broker or the engine are
//! in `tests/serial`.

use std::time::Duration;

use serde_json::{Value, json};

use crate::common::{
    Invariants, QueueGuard, ServeOptions, Server, TOKEN, WorkerSpec, amqp_server, attempts_of,
    containers_of, docker_cli, is_final, log_file, publish_raw, queue_counts, start_worker_with,
    tasuki_cli, unique, worker,
};

fn dir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

/// Crash points exist only in builds with the `fault-injection` feature (tests/run.sh).
#[cfg(feature = "fault-injection")]
fn crashing_worker(id: &str, at: &str) -> WorkerSpec {
    WorkerSpec {
        env: vec![("TASUKI_CRASH_AT".into(), at.into())],
        ..worker(id, 1)
    }
}

/// What `count` prints for `lines` lines.
fn count_output(lines: u32) -> String {
    (1..=lines).map(|i| format!("line {i}\n")).collect()
}

fn id_of(run: &Value) -> String {
    run["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no id in {run}"))
        .to_owned()
}

fn container_running(id: &str) -> bool {
    let out = std::process::Command::new(docker_cli())
        .args(["inspect", "--format", "{{.State.Running}}", id])
        .output()
        .expect("docker inspect");
    String::from_utf8_lossy(&out.stdout).trim() == "true"
}

// 2 ---------------------------------------------------------------------------------

/// kill -9 the worker once the run's log has `kill_after` bytes, start it again with
/// the same id after a pause, and check the run ends with `code` and the log is
/// exactly `expected`.
async fn kill9_and_reattach(
    job: &str,
    params: Value,
    kill_after: usize,
    code: i64,
    expected: Vec<u8>,
) {
    let d = dir();
    let queue = unique("tasuki-faults");
    let _queue = QueueGuard(queue.clone());
    let worker_id = unique("test-worker");
    let mut inv = Invariants::start(&[&worker_id]);
    let server = amqp_server(d.path(), &queue, "10s");
    let api = server.client();
    let mut first = start_worker_with(d.path(), &server, &queue, TOKEN, worker(&worker_id, 1));

    let id = api.accept(job, params).await;
    inv.accepted(&id);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (_, log) = api.attempt_log(&id, None).await;
        if log.len() >= kill_after {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "only {} bytes of output after 60 s",
            log.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.kill9();
    let left = containers_of(&worker_id);
    assert_eq!(left.len(), 1, "the container runs on without its worker");
    // Output written while nobody is attached must still reach the log.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let second = start_worker_with(d.path(), &server, &queue, TOKEN, worker(&worker_id, 1));
    let run = api.wait_final(&id, Duration::from_secs(120)).await;
    let status = if code == 0 { "succeeded" } else { "failed" };
    assert_eq!(run["status"], status, "{run}");
    assert_eq!(run["exit_code"], code, "{run}");
    assert_eq!(run["attempt"], 1, "{run}");
    assert_eq!(attempts_of(&run).len(), 1, "{run}");
    // Re-attached: no byte lost, none twice.
    inv.expect_log(&id, 1, expected);
    inv.check(&api).await;
    assert_eq!(inv.containers_created(&id), 1);
    drop(second);
}

#[tokio::test]
async fn worker_kill9_while_container_runs_is_reattached() {
    // About 10 s of steady output, then exit 7.
    let params = json!({"lines": "40", "pause": "0.25", "code": "7"});
    kill9_and_reattach("count", params, 3 * 7, 7, count_output(40).into()).await;
}

#[tokio::test]
async fn worker_kill9_during_fast_output_log_has_no_gap_or_duplicate() {
    // Thousands of lines a few milliseconds apart: the worker dies mid-stream.
    let params = json!({"lines": "6000", "pause": "0.002"});
    kill9_and_reattach("count", params, 5000, 0, count_output(6000).into()).await;
}

#[tokio::test]
async fn worker_kill9_during_binary_output_without_newline_log_is_complete() {
    // 1000 blocks of 1000 bytes over 10 s or more, no newline anywhere: the engine
    // keeps such output as 16 KiB partial entries, the last one shorter. The container
    // still runs when the worker comes back.
    let params = json!({"chunks": "1000", "pause": "0.01"});
    kill9_and_reattach("drip", params, 50_000, 0, vec![0xff; 1_000_000]).await;
}

// 3 ---------------------------------------------------------------------------------

#[cfg(feature = "fault-injection")]
#[tokio::test]
async fn worker_crash_after_claim_no_duplicate_container() {
    let d = dir();
    let queue = unique("tasuki-faults");
    let _queue = QueueGuard(queue.clone());
    let worker_id = unique("test-worker");
    let mut inv = Invariants::start(&[&worker_id]);
    let server = amqp_server(d.path(), &queue, "10s");
    let api = server.client();
    let mut crashing = start_worker_with(
        d.path(),
        &server,
        &queue,
        TOKEN,
        crashing_worker(&worker_id, "after-claim"),
    );

    let id = api.accept("exit", json!({"code": "3"})).await;
    inv.accepted(&id);
    let status = crashing.wait_exit(Duration::from_secs(60)).await;
    assert!(!status.success(), "the crash point did not crash: {status}");
    // Claimed and acked, no container yet.
    let run = api.run(&id).await;
    assert_eq!(
        run["status"], "running",
        "claim not stored before the crash: {run}"
    );
    assert!(containers_of(&worker_id).is_empty());
    assert_eq!(
        queue_counts(&queue),
        (0, 0),
        "delivery not acked at the crash"
    );

    // The same worker again: the attempt it holds has no container; it runs once.
    let _again = start_worker_with(d.path(), &server, &queue, TOKEN, worker(&worker_id, 1));
    let run = api.wait_final(&id, Duration::from_secs(90)).await;
    assert_eq!(run["status"], "failed", "{run}");
    assert_eq!(run["exit_code"], 3, "{run}");
    assert_eq!(run["reason_code"], "exit_code", "{run}");
    let attempts = attempts_of(&run);
    let last = attempts.last().expect("an attempt");
    for earlier in &attempts[..attempts.len() - 1] {
        assert_eq!(
            earlier["exit_code"],
            Value::Null,
            "an attempt without container has no exit code: {run}"
        );
    }
    let last_n = last["attempt"].as_u64().expect("attempt number");
    inv.expect_log(&id, last_n, "exiting with 3\n");
    inv.check(&api).await;
    assert_eq!(
        inv.containers_created(&id),
        1,
        "one container in all: {run}"
    );
}

/// The worker crashes after the container exited, before reporting; the same worker
/// id again finishes the run from what the engine kept.
#[cfg(feature = "fault-injection")]
async fn crash_before_finish(job: &str, params: Value, code: i64, expected: Vec<u8>) {
    let d = dir();
    let queue = unique("tasuki-faults");
    let _queue = QueueGuard(queue.clone());
    let worker_id = unique("test-worker");
    let mut inv = Invariants::start(&[&worker_id]);
    // Long enough that the restarted worker finds the run still held.
    let server = amqp_server(d.path(), &queue, "20s");
    let api = server.client();
    let mut crashing = start_worker_with(
        d.path(),
        &server,
        &queue,
        TOKEN,
        crashing_worker(&worker_id, "before-finish"),
    );

    let id = api.accept(job, params).await;
    inv.accepted(&id);
    let status = crashing.wait_exit(Duration::from_secs(60)).await;
    assert!(!status.success(), "the crash point did not crash: {status}");
    // The container exited and is kept; the run has no final state yet.
    assert_eq!(containers_of(&worker_id).len(), 1);
    let run = api.run(&id).await;
    assert_eq!(run["status"], "running", "{run}");

    let _again = start_worker_with(d.path(), &server, &queue, TOKEN, worker(&worker_id, 1));
    let run = api.wait_final(&id, Duration::from_secs(60)).await;
    let status = if code == 0 { "succeeded" } else { "failed" };
    assert_eq!(run["status"], status, "{run}");
    assert_eq!(run["exit_code"], code, "{run}");
    assert_eq!(run["attempt"], 1, "{run}");
    assert_eq!(attempts_of(&run).len(), 1, "{run}");
    inv.expect_log(&id, 1, expected);
    inv.check(&api).await;
    assert_eq!(inv.containers_created(&id), 1);
}

#[cfg(feature = "fault-injection")]
#[tokio::test]
async fn worker_crash_before_finish_outcome_from_inspect() {
    let params = json!({"code": "5"});
    crash_before_finish("exit", params, 5, b"exiting with 5\n".to_vec()).await;
}

#[cfg(feature = "fault-injection")]
#[tokio::test]
async fn worker_crash_before_finish_binary_output_is_complete() {
    let params = json!({"chunks": "40", "pause": "0"});
    crash_before_finish("drip", params, 0, vec![0xff; 40_000]).await;
}

/// A build without the `fault-injection` feature has no crash points: the variable the
/// fault tests use changes nothing, and the worker runs the job and keeps running.
#[cfg(not(feature = "fault-injection"))]
#[tokio::test]
async fn production_build_ignores_tasuki_crash_at() {
    let d = dir();
    let queue = unique("tasuki-faults");
    let _queue = QueueGuard(queue.clone());
    let worker_id = unique("test-worker");
    let mut inv = Invariants::start(&[&worker_id]);
    let server = amqp_server(d.path(), &queue, "10s");
    let api = server.client();
    let spec = WorkerSpec {
        env: vec![("TASUKI_CRASH_AT".into(), "after-claim".into())],
        ..worker(&worker_id, 1)
    };
    let mut w = start_worker_with(d.path(), &server, &queue, TOKEN, spec);

    let id = api.accept("exit", json!({"code": "3"})).await;
    inv.accepted(&id);
    let run = api.wait_final(&id, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "failed", "{run}");
    assert_eq!(run["exit_code"], 3, "{run}");
    assert_eq!(run["attempt"], 1, "one attempt, no crash in between: {run}");
    assert!(w.exited().is_none(), "the worker died: {}", w.log_text());
    inv.expect_log(&id, 1, "exiting with 3\n");
    inv.check(&api).await;
}

// 4 ---------------------------------------------------------------------------------

#[tokio::test]
async fn worker_never_returns_run_becomes_lost_then_retried_once() {
    let d = dir();
    let queue = unique("tasuki-faults");
    let _queue = QueueGuard(queue.clone());
    let gone = unique("test-worker");
    let other = unique("test-worker");
    let mut inv = Invariants::start(&[&gone, &other]);
    let server = amqp_server(d.path(), &queue, "3s");
    let api = server.client();
    let mut vanishing = start_worker_with(d.path(), &server, &queue, TOKEN, worker(&gone, 2));

    let plain = api.accept("sleep", json!({"seconds": "90"})).await;
    let retried = api.accept("lost-retry", json!({"code": "0"})).await;
    inv.accepted(&plain);
    inv.accepted(&retried);
    api.wait_log_contains(&plain, "sleeping 90", Duration::from_secs(60))
        .await;
    api.wait_log_contains(&retried, "attempt 1", Duration::from_secs(60))
        .await;
    vanishing.kill9();

    // No retry rule names `lost`: lost after the lease, and it stays so.
    let run = api.wait_final(&plain, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "lost", "{run}");
    assert_eq!(run["reason_code"], "lost", "{run}");
    assert_eq!(run["exit_code"], Value::Null, "{run}");

    // `lost` in the rules: exactly one more attempt, on the worker still there.
    let _other = start_worker_with(
        d.path(),
        &server,
        &queue,
        TOKEN,
        WorkerSpec {
            env: vec![("TASUKI_RECONCILE_INTERVAL".into(), "1s".into())],
            ..worker(&other, 2)
        },
    );
    let run = api.wait_final(&retried, Duration::from_secs(90)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["attempt"], 2, "{run}");
    let attempts = attempts_of(&run);
    assert_eq!(attempts.len(), 2, "{run}");
    assert_eq!(attempts[0]["status"], "lost", "{run}");
    assert_eq!(attempts[0]["reason_code"], "lost", "{run}");
    assert_eq!(attempts[0]["exit_code"], Value::Null, "{run}");
    assert_eq!(attempts[1]["status"], "succeeded", "{run}");
    assert_eq!(attempts[1]["exit_code"], 0, "{run}");
    assert_eq!(attempts[1]["worker_id"], other.as_str(), "{run}");

    // Exactly once: nothing more happens past another backoff and lease.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let run = api.run(&retried).await;
    assert_eq!(attempts_of(&run).len(), 2, "{run}");
    let run = api.run(&plain).await;
    assert_eq!(run["status"], "lost", "{run}");
    assert_eq!(attempts_of(&run).len(), 1, "{run}");

    // The vanished worker's containers share the engine with the worker still there:
    // once their attempts are over and the vanished worker's session has expired, it
    // removes them. The retried run's first container went before its second was
    // created (Docker's own events say so), so the two never ran side by side.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !containers_of(&gone).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the vanished worker's containers were not removed: {:?}",
            containers_of(&gone)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let events = inv.events();
    let at = |attempt: u64, action: &str| {
        events
            .iter()
            .find(|e| e.run_id == retried && e.attempt == Some(attempt) && e.action == action)
            .map(|e| e.time_nano)
            .unwrap_or_else(|| panic!("no {action} event of attempt {attempt}: {events:?}"))
    };
    assert!(
        at(1, "destroy") <= at(2, "create"),
        "attempt 2 was created before attempt 1's container was gone"
    );
    inv.expect_log(&retried, 2, "attempt 2\n");
    inv.check(&api).await;
    assert_eq!(inv.containers_created(&plain), 1);
    assert_eq!(inv.containers_created(&retried), 2);
}

// 6 ---------------------------------------------------------------------------------

#[tokio::test]
async fn ten_concurrent_posts_one_idempotency_key_one_run() {
    let d = dir();
    let worker_id = unique("test-serve");
    let mut inv = Invariants::start(&[&worker_id]);
    let server = Server::start(
        d.path(),
        ServeOptions {
            worker_id: Some(worker_id.clone()),
            ..ServeOptions::default()
        },
    );
    let api = server.client();
    let key = unique("idem");
    let body = json!({"params": {"code": "0"}}).to_string();
    let headers = [("Idempotency-Key", key.as_str())];

    let answers = futures::future::join_all(
        (0..10).map(|_| api.post_run_with_headers("exit", &body, "", &headers)),
    )
    .await;
    let mut ids = std::collections::BTreeSet::new();
    for a in &answers {
        match a.status {
            200..=202 => {
                ids.insert(id_of(&a.body));
            }
            409 => assert_eq!(
                a.body["error"]["code"], "idempotency_key_in_flight",
                "{}",
                a.body
            ),
            other => panic!("unexpected {other}: {}", a.body),
        }
    }
    assert_eq!(ids.len(), 1, "one key, one run: {ids:?}");
    let id = ids.into_iter().next().expect("a run");
    inv.accepted(&id);

    // A repeat after the first is stored gives the original run, and with `wait` its
    // result.
    let again = api
        .post_run_with_headers("exit", &body, "?wait=60", &headers)
        .await;
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(id_of(&again.body), id);
    assert_eq!(again.body["status"], "succeeded", "{}", again.body);
    let again = api.post_run_with_headers("exit", &body, "", &headers).await;
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(id_of(&again.body), id);

    // The same key for another request is refused.
    let other = json!({"params": {"code": "1"}}).to_string();
    let a = api
        .post_run_with_headers("exit", &other, "", &headers)
        .await;
    assert_eq!(a.status, 422, "{}", a.body);
    assert_eq!(a.body["error"]["code"], "idempotency_key_reused");
    let a = api
        .post_run_with_headers("echo-both", "", "", &headers)
        .await;
    assert_eq!(a.status, 422, "{}", a.body);
    let long = "k".repeat(256);
    let a = api
        .post_run_with_headers("exit", &body, "", &[("Idempotency-Key", long.as_str())])
        .await;
    assert_eq!(a.status, 400, "{}", a.body);

    let (status, list) = api.get("/v1/runs?limit=100").await;
    assert_eq!(status, 200);
    let runs = list["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 1, "{list}");
    assert_eq!(runs[0]["id"], id.as_str());

    inv.expect_log(&id, 1, "exiting with 0\n");

    // Ten clients waiting for the result, one key: each gets the one run's result.
    let key = unique("idem");
    let headers = [("Idempotency-Key", key.as_str())];
    let body = json!({"params": {"seconds": "2"}}).to_string();
    let answers = futures::future::join_all(
        (0..10).map(|_| api.post_run_with_headers("sleep", &body, "?wait=60", &headers)),
    )
    .await;
    let mut ids = std::collections::BTreeSet::new();
    for a in &answers {
        match a.status {
            200 => {
                assert_eq!(a.body["status"], "succeeded", "{}", a.body);
                ids.insert(id_of(&a.body));
            }
            409 => assert_eq!(
                a.body["error"]["code"], "idempotency_key_in_flight",
                "{}",
                a.body
            ),
            other => panic!("unexpected {other}: {}", a.body),
        }
    }
    assert_eq!(ids.len(), 1, "one key, one run: {ids:?}");
    let waited = ids.into_iter().next().expect("a run");
    inv.accepted(&waited);
    inv.expect_log(&waited, 1, "sleeping 2\nwoke\n");

    inv.check(&api).await;
    assert_eq!(inv.containers_created(&id), 1);
    assert_eq!(inv.containers_created(&waited), 1);
}

// 7 ---------------------------------------------------------------------------------

#[tokio::test]
async fn malformed_message_is_dead_lettered_workers_keep_working() {
    let d = dir();
    let queue = unique("tasuki-faults");
    let _queue = QueueGuard(queue.clone());
    let (w1, w2) = (unique("test-worker"), unique("test-worker"));
    let mut inv = Invariants::start(&[&w1, &w2]);
    let server = amqp_server(d.path(), &queue, "5s");
    let api = server.client();
    let mut workers = [
        start_worker_with(d.path(), &server, &queue, TOKEN, worker(&w1, 1)),
        start_worker_with(d.path(), &server, &queue, TOKEN, worker(&w2, 1)),
    ];
    // The server declared the topology; a first run shows the workers consume.
    let first = api.run_and_wait("exit", json!({"code": "0"})).await;
    inv.accepted(&id_of(&first));
    assert_eq!(first["status"], "succeeded");

    let poison: [&[u8]; 5] = [
        b"not json at all",
        b"",
        &[0xff, 0xfe, 0x00, 0x01],
        br#"{"v":99,"run_id":"01jd0000000000000000000000","attempt":1}"#,
        // Well formed, but no such run.
        br#"{"v":1,"run_id":"01jd0000000000000000000000","attempt":1}"#,
    ];
    for body in poison {
        publish_raw(&queue, body).await;
    }
    let dead = format!("{queue}.dead");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (ready, _) = queue_counts(&dead);
        if ready == poison.len() as u64 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{ready} of {} poison messages dead-lettered",
            poison.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(queue_counts(&queue), (0, 0), "poison left in the run queue");
    for w in &mut workers {
        assert!(w.exited().is_none(), "a worker died:\n{}", w.log_text());
    }
    let logs: String = workers.iter().map(|w| w.log_text()).collect();
    assert!(logs.contains("poison message dead-lettered"), "{logs}");
    assert!(logs.contains("unknown run"), "{logs}");

    // Work goes on, on both workers.
    let mut ids = Vec::new();
    for code in ["0", "0", "0", "0"] {
        let id = api.accept("exit", json!({"code": code})).await;
        inv.accepted(&id);
        ids.push(id);
    }
    for id in &ids {
        let run = api.wait_final(id, Duration::from_secs(60)).await;
        assert_eq!(run["status"], "succeeded", "{run}");
        inv.expect_log(id, 1, "exiting with 0\n");
    }
    inv.check(&api).await;
}

// 8 ---------------------------------------------------------------------------------

#[tokio::test]
async fn cancel_queued_and_running_run_on_separate_worker() {
    let d = dir();
    let queue = unique("tasuki-faults");
    let _queue = QueueGuard(queue.clone());
    let worker_id = unique("test-worker");
    let mut inv = Invariants::start(&[&worker_id]);
    let server = amqp_server(d.path(), &queue, "3s");
    let api = server.client();
    let _worker = start_worker_with(d.path(), &server, &queue, TOKEN, worker(&worker_id, 1));

    let running = api.accept("sleep", json!({"seconds": "90"})).await;
    inv.accepted(&running);
    api.wait_log_contains(&running, "sleeping 90", Duration::from_secs(60))
        .await;
    // The only slot is busy: this one waits in the queue.
    let queued = api.accept("exit", json!({"code": "0"})).await;
    inv.accepted(&queued);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while queue_counts(&queue) != (1, 0) {
        assert!(
            std::time::Instant::now() < deadline,
            "queued run's message not in the queue: {:?}",
            queue_counts(&queue)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Queued: cancelled at once, with the CLI.
    let out = tasuki_cli(&server.url, &["cancel", &queued]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: Value = serde_json::from_slice(&out.stdout).expect("cancel prints the run");
    assert_eq!(printed["status"], "cancelled", "{printed}");
    let run = api.run(&queued).await;
    assert_eq!(run["status"], "cancelled", "{run}");
    assert_eq!(run["reason_code"], "cancelled", "{run}");
    assert_eq!(run["exit_code"], Value::Null, "{run}");

    // Running on the worker process: SIGTERM there, then final `cancelled`.
    let a = api.post(&format!("/v1/runs/{running}/cancel")).await;
    assert_eq!(a.status, 202, "{}", a.body);
    assert!(
        a.body["cancel_requested"] == true || a.body["status"] == "cancelled",
        "{}",
        a.body
    );
    let run = api.wait_final(&running, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "cancelled", "{run}");
    assert_eq!(run["reason_code"], "cancelled", "{run}");

    // Already final: 409, and exit 1 from the CLI.
    let a = api.post(&format!("/v1/runs/{running}/cancel")).await;
    assert_eq!(a.status, 409, "{}", a.body);
    assert_eq!(a.body["error"]["code"], "run_finished");
    let out = tasuki_cli(&server.url, &["cancel", &queued]);
    assert_eq!(out.status.code(), Some(1));

    // The cancelled run's delivery is dropped, never started; work goes on.
    let after = api.accept("exit", json!({"code": "0"})).await;
    inv.accepted(&after);
    let run = api.wait_final(&after, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while queue_counts(&queue) != (0, 0) {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}",
            queue_counts(&queue)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let run = api.run(&queued).await;
    assert_eq!(run["status"], "cancelled", "{run}");

    // A job that ignores SIGTERM gets SIGKILL after its stop_grace.
    let stubborn = api.accept("stubborn", json!({})).await;
    inv.accepted(&stubborn);
    api.wait_log_contains(&stubborn, "stubborn", Duration::from_secs(60))
        .await;
    let a = api.post(&format!("/v1/runs/{stubborn}/cancel")).await;
    assert_eq!(a.status, 202, "{}", a.body);
    let run = api.wait_final(&stubborn, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "cancelled", "{run}");
    assert_eq!(run["exit_code"], 137, "not killed: {run}");

    inv.expect_log(&running, 1, "sleeping 90\n");
    inv.expect_log(&after, 1, "exiting with 0\n");
    inv.check(&api).await;
    assert_eq!(
        inv.containers_created(&queued),
        0,
        "a cancelled queued run started"
    );
    assert_eq!(inv.containers_created(&running), 1);
}

// 9 ---------------------------------------------------------------------------------

#[tokio::test]
async fn sigterm_worker_drains_and_restart_adopts() {
    let d = dir();
    let queue = unique("tasuki-faults");
    let _queue = QueueGuard(queue.clone());
    let worker_id = unique("test-worker");
    let mut inv = Invariants::start(&[&worker_id]);
    let server = amqp_server(d.path(), &queue, "15s");
    let api = server.client();
    let spec = || WorkerSpec {
        drain_timeout: "10s".into(),
        ..worker(&worker_id, 2)
    };
    let mut first = start_worker_with(d.path(), &server, &queue, TOKEN, spec());

    // Ends within the drain timeout; long enough that its slot is still busy when
    // the third run is accepted.
    let short = api.accept("sleep", json!({"seconds": "5"})).await;
    // About 25 s of steady output: outlasts the drain.
    let lines = 100;
    let long = api
        .accept(
            "count",
            json!({"lines": lines.to_string(), "pause": "0.25"}),
        )
        .await;
    inv.accepted(&short);
    inv.accepted(&long);
    api.wait_log_contains(&short, "sleeping 5", Duration::from_secs(60))
        .await;
    api.wait_log_contains(&long, "line 2\n", Duration::from_secs(60))
        .await;
    // Both slots busy: the third waits in the broker.
    let third = api.accept("exit", json!({"code": "0"})).await;
    inv.accepted(&third);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while queue_counts(&queue) != (1, 0) {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}",
            queue_counts(&queue)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    first.signal("TERM");
    let status = first.wait_exit(Duration::from_secs(40)).await;
    assert!(status.success(), "drained worker exited with {status}");

    // The short run finished during the drain; the long one is left running.
    let run = api.run(&short).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let run = api.run(&long).await;
    assert_eq!(run["status"], "running", "{run}");
    let left = containers_of(&worker_id);
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(
        container_running(&left[0]),
        "the long run's container stopped"
    );
    // The third was never taken.
    let run = api.run(&third).await;
    assert_eq!(run["status"], "queued", "{run}");
    assert_eq!(queue_counts(&queue), (1, 0));
    let log = first.log_text();
    assert!(log.contains("draining"), "{log}");

    // The same worker id again adopts the container.
    let _second = start_worker_with(d.path(), &server, &queue, TOKEN, spec());
    let run = api.wait_final(&long, Duration::from_secs(90)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["exit_code"], 0, "{run}");
    assert_eq!(attempts_of(&run).len(), 1, "{run}");
    let run = api.wait_final(&third, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "succeeded", "{run}");

    inv.expect_log(&short, 1, "sleeping 5\nwoke\n");
    inv.expect_log(&long, 1, count_output(lines));
    inv.expect_log(&third, 1, "exiting with 0\n");
    inv.check(&api).await;
    assert_eq!(inv.containers_created(&long), 1);
}

// 11 --------------------------------------------------------------------------------

#[tokio::test]
async fn retries_fail_twice_then_succeed_and_non_retryable_stops() {
    let d = dir();
    let queue = unique("tasuki-faults");
    let _queue = QueueGuard(queue.clone());
    let worker_id = unique("test-worker");
    let mut inv = Invariants::start(&[&worker_id]);
    let server = amqp_server(d.path(), &queue, "5s");
    let api = server.client();
    let _worker = start_worker_with(d.path(), &server, &queue, TOKEN, worker(&worker_id, 2));

    // Exit 1 (retried) at attempts 1 and 2, 0 at attempt 3.
    let third_time = api.accept("retry", json!({})).await;
    // Exit 2: not in the job's retry rules.
    let never = api
        .accept("retry", json!({"ok_at": "99", "code": "2"}))
        .await;
    inv.accepted(&third_time);
    inv.accepted(&never);

    // While a backoff runs the run is `queued` with a not-before time.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let run = loop {
        let run = api.run(&third_time).await;
        if is_final(&run) {
            break run;
        }
        if run["status"] == "queued" && run["attempts"].as_array().is_some_and(|a| !a.is_empty()) {
            assert!(
                run["not_before"].is_string(),
                "a retry waiting out its backoff has no not_before: {run}"
            );
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not final after 120 s: {run}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["exit_code"], 0, "{run}");
    assert_eq!(run["attempt"], 3, "{run}");
    let attempts = attempts_of(&run);
    assert_eq!(attempts.len(), 3, "all attempts visible: {run}");
    for (i, a) in attempts.iter().enumerate() {
        assert_eq!(a["attempt"], i as u64 + 1, "{run}");
    }
    for a in &attempts[..2] {
        assert_eq!(a["status"], "failed", "{run}");
        assert_eq!(a["exit_code"], 1, "{run}");
        assert_eq!(a["reason_code"], "exit_code", "{run}");
    }
    assert_eq!(attempts[2]["status"], "succeeded", "{run}");
    assert_eq!(attempts[2]["exit_code"], 0, "{run}");
    for n in 1..=3 {
        inv.expect_log(&third_time, n, format!("attempt {n}\n"));
    }

    let run = api.wait_final(&never, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "failed", "{run}");
    assert_eq!(run["exit_code"], 2, "{run}");
    // Past the longest backoff, still one attempt.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let run = api.run(&never).await;
    assert_eq!(run["status"], "failed", "{run}");
    assert_eq!(run["attempt"], 1, "{run}");
    assert_eq!(attempts_of(&run).len(), 1, "{run}");
    inv.expect_log(&never, 1, "attempt 1\n");

    // A person may start another attempt of a failed run; not of a succeeded one.
    let out = tasuki_cli(&server.url, &["retry", &never]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = api.wait_final(&never, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "failed", "{run}");
    assert_eq!(run["attempt"], 2, "{run}");
    assert_eq!(attempts_of(&run).len(), 2, "{run}");
    inv.expect_log(&never, 2, "attempt 2\n");
    let a = api.post(&format!("/v1/runs/{third_time}/retry")).await;
    assert_eq!(a.status, 409, "{}", a.body);
    assert_eq!(a.body["error"]["code"], "not_retryable");

    inv.check(&api).await;
    assert_eq!(inv.containers_created(&third_time), 3);
    assert_eq!(inv.containers_created(&never), 2);
}

// 12 --------------------------------------------------------------------------------

/// Output the worker hands over but the server cannot store: the run's exit status
/// is still the container's, and the run says how many bytes it lost. As root,
/// permission bits stop no write, so the faults are a full device and a log dir
/// that is not a directory.
#[tokio::test]
async fn log_sink_write_failure_keeps_exit_status_sets_logs_truncated() {
    // Disk full: the attempt's log file is /dev/full (ENOSPC on every write).
    let d = dir();
    let queue = unique("tasuki-faults");
    let _queue = QueueGuard(queue.clone());
    let worker_id = unique("test-worker");
    let mut inv = Invariants::start(&[&worker_id]);
    let server = amqp_server(d.path(), &queue, "5s");
    let api = server.client();
    let _worker = start_worker_with(d.path(), &server, &queue, TOKEN, worker(&worker_id, 1));
    // Prints only after 3 s: the file is in place long before.
    let id = api
        .accept(
            "count",
            json!({"delay": "3", "lines": "5", "pause": "0", "code": "4"}),
        )
        .await;
    inv.accepted(&id);
    let log = log_file(&d.path().join("data"), &id, 1);
    std::fs::create_dir_all(log.parent().expect("bucket")).expect("log dir");
    std::os::unix::fs::symlink("/dev/full", &log).expect("symlink");
    let run = api.wait_final(&id, Duration::from_secs(60)).await;
    std::fs::remove_file(&log).expect("remove symlink");
    let expected_bytes = count_output(5).len() as u64;
    assert_eq!(run["status"], "failed", "{run}");
    assert_eq!(run["exit_code"], 4, "{run}");
    assert_eq!(run["reason_code"], "exit_code", "{run}");
    assert_eq!(run["logs_truncated"], true, "{run}");
    assert_eq!(run["log_dropped_bytes"], expected_bytes, "{run}");
    assert_eq!(
        attempts_of(&run)[0]["log_dropped_bytes"],
        expected_bytes,
        "{run}"
    );
    inv.check(&api).await;

    // The log dir is a file (ENOTDIR), with the embedded worker.
    let d = dir();
    let serve_id = unique("test-serve");
    let mut inv = Invariants::start(&[&serve_id]);
    let server = Server::start(
        d.path(),
        ServeOptions {
            worker_id: Some(serve_id.clone()),
            ..ServeOptions::default()
        },
    );
    let api = server.client();
    let logs_dir = d.path().join("data/logs");
    if logs_dir.exists() {
        std::fs::remove_dir_all(&logs_dir).expect("remove log dir");
    }
    std::fs::write(&logs_dir, b"not a directory").expect("log dir as a file");
    let run = api.run_and_wait("exit", json!({"code": "6"})).await;
    let id = id_of(&run);
    inv.accepted(&id);
    std::fs::remove_file(&logs_dir).expect("restore log dir");
    assert_eq!(run["status"], "failed", "{run}");
    assert_eq!(run["exit_code"], 6, "{run}");
    assert_eq!(run["logs_truncated"], true, "{run}");
    assert_eq!(
        run["log_dropped_bytes"],
        "exiting with 6\n".len() as u64,
        "{run}"
    );
    inv.check(&api).await;
}

// memory ------------------------------------------------------------------------------

#[tokio::test]
async fn hundred_mb_line_without_newline_keeps_worker_memory_bounded() {
    let d = dir();
    let queue = unique("tasuki-faults");
    let _queue = QueueGuard(queue.clone());
    let worker_id = unique("test-worker");
    let mut inv = Invariants::start(&[&worker_id]);
    let server = amqp_server(d.path(), &queue, "10s");
    let api = server.client();
    let worker = start_worker_with(d.path(), &server, &queue, TOKEN, worker(&worker_id, 1));

    let id = api.accept("bigline", json!({})).await;
    inv.accepted(&id);
    let run = api.wait_final(&id, Duration::from_secs(300)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let peak = worker.peak_rss_bytes();
    let serve_peak = server.process.peak_rss_bytes();
    eprintln!(
        "peak RSS: worker {} MiB, serve {} MiB",
        peak >> 20,
        serve_peak >> 20
    );
    assert!(
        peak < 300 << 20,
        "worker peak RSS {} MiB for a 100 MB line",
        peak >> 20
    );
    inv.expect_log_len(&id, 1, 100_000_000);
    inv.check(&api).await;
}

// Ctrl-C in `tasuki run --wait` -------------------------------------------------------

/// A `tasuki run` in the background; killed if the test ends before it does.
struct CliChild(Option<std::process::Child>);

impl CliChild {
    /// SIGINT, as Ctrl-C in a terminal sends it, by PID.
    fn interrupt(&self) {
        let child = self.0.as_ref().expect("running");
        let status = std::process::Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .expect("kill -INT");
        assert!(status.success());
    }

    fn output(mut self) -> std::process::Output {
        self.0
            .take()
            .expect("running")
            .wait_with_output()
            .expect("wait for tasuki run")
    }
}

impl Drop for CliChild {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `tasuki run JOB --wait ...` started in the background, and the run it started once
/// that run's container is running.
async fn cli_run_in_background(api: &crate::common::Api, args: &[&str]) -> (CliChild, String) {
    let child = CliChild(Some(
        std::process::Command::new(crate::common::BIN)
            .args(args)
            .args(["--server", &api.base])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn tasuki run"),
    ));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (_, list) = api.get("/v1/runs?status=running&limit=100").await;
        let mut started = Vec::new();
        for run in list["runs"].as_array().into_iter().flatten() {
            let id = id_of(run);
            let (_, log) = api.attempt_log(&id, None).await;
            if !log.is_empty() {
                started.push(id);
            }
        }
        if let Some(id) = started.pop() {
            return (child, id);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the CLI's run never started"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn run_wait_interrupted_detaches_or_cancels() {
    let d = dir();
    let serve_id = unique("test-serve");
    let mut inv = Invariants::start(&[&serve_id]);
    let server = Server::start(
        d.path(),
        ServeOptions {
            worker_id: Some(serve_id.clone()),
            lease_ttl: Some("3s".into()),
            ..ServeOptions::default()
        },
    );
    let api = server.client();

    // Ctrl-C detaches: the run goes on.
    let (child, detached) =
        cli_run_in_background(&api, &["run", "sleep", "-p", "seconds=60", "--wait"]).await;
    inv.accepted(&detached);
    child.interrupt();
    let out = child.output();
    assert_eq!(out.status.code(), Some(130), "{out:?}");
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(printed.contains(&detached), "run id not printed: {printed}");
    let run = api.run(&detached).await;
    assert_eq!(run["status"], "running", "{run}");

    // With --cancel-on-interrupt the run is cancelled before the CLI exits.
    let a = api.post(&format!("/v1/runs/{detached}/cancel")).await;
    assert_eq!(a.status, 202, "{}", a.body);
    api.wait_final(&detached, Duration::from_secs(30)).await;
    let (child, cancelled) = cli_run_in_background(
        &api,
        &[
            "run",
            "sleep",
            "-p",
            "seconds=60",
            "--wait",
            "--cancel-on-interrupt",
        ],
    )
    .await;
    inv.accepted(&cancelled);
    child.interrupt();
    let out = child.output();
    assert_eq!(out.status.code(), Some(130), "{out:?}");
    let run = api.run(&cancelled).await;
    assert_eq!(run["status"], "cancelled", "{run}");

    let finals = inv.check(&api).await;
    assert_eq!(finals[&detached]["status"], "cancelled");
}

// SIGTERM to serve ---------------------------------------------------------------------

#[tokio::test]
async fn sigterm_serve_answers_waiting_clients_202_and_drains() {
    let d = dir();
    let serve_id = unique("test-serve");
    let mut inv = Invariants::start(&[&serve_id]);
    let mut server = Server::start(
        d.path(),
        ServeOptions {
            worker_id: Some(serve_id.clone()),
            ..ServeOptions::default()
        },
    );
    let api = server.client();

    // A client waiting for the result of a run that takes a few seconds.
    let waiting = {
        let url = format!("{}/v1/jobs/sleep/runs?wait=120", server.url);
        tokio::spawn(async move {
            let response = reqwest::Client::new()
                .post(url)
                .body(r#"{"params":{"seconds":"6"}}"#)
                .send()
                .await
                .expect("POST run");
            let status = response.status().as_u16();
            let location = response
                .headers()
                .get("location")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body: Value = response.json().await.expect("run JSON");
            (status, location, body)
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let id = loop {
        let (_, list) = api.get("/v1/runs?job=sleep").await;
        if let Some(run) = list["runs"].as_array().and_then(|r| r.first()) {
            break id_of(run);
        }
        assert!(std::time::Instant::now() < deadline, "run not accepted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    inv.accepted(&id);
    api.wait_log_contains(&id, "sleeping 6", Duration::from_secs(60))
        .await;

    server.process.signal("TERM");
    // The waiting client is answered at once, not when the run ends.
    let (status, location, body) = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("waiting client not answered within 5 s of SIGTERM")
        .expect("client task");
    assert_eq!(status, 202, "{body}");
    assert_eq!(location.as_deref(), Some(format!("/v1/runs/{id}").as_str()));
    assert_eq!(body["status"], "running", "{body}");

    // The embedded worker drains: the run ends before serve exits.
    let exit = server.process.wait_exit(Duration::from_secs(60)).await;
    assert!(exit.success(), "serve exited with {exit}");
    server.restart(d.path());
    let run = api.run(&id).await;
    assert_eq!(
        run["status"], "succeeded",
        "finished during the drain: {run}"
    );
    inv.expect_log(&id, 1, "sleeping 6\nwoke\n");
    inv.check(&api).await;
}

// Cancel while a retry waits out its backoff ------------------------------------------

#[tokio::test]
async fn cancel_during_retry_backoff_starts_no_further_attempt() {
    let d = dir();
    let queue = unique("tasuki-faults");
    let _queue = QueueGuard(queue.clone());
    let worker_id = unique("test-worker");
    let mut inv = Invariants::start(&[&worker_id]);
    let server = amqp_server(d.path(), &queue, "5s");
    let api = server.client();
    let _worker = start_worker_with(d.path(), &server, &queue, TOKEN, worker(&worker_id, 1));

    let id = api.accept("retry-slow", json!({})).await;
    inv.accepted(&id);
    let run = api
        .wait_until(&id, Duration::from_secs(60), "waiting for a retry", |run| {
            run["status"] == "queued"
                && attempts_of(run).len() == 1
                && run["not_before"].is_string()
        })
        .await;
    assert_eq!(attempts_of(&run)[0]["exit_code"], 1, "{run}");
    let a = api.post(&format!("/v1/runs/{id}/cancel")).await;
    assert_eq!(a.status, 202, "{}", a.body);
    assert_eq!(a.body["status"], "cancelled", "{}", a.body);

    // Past the backoff: no second attempt.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let run = api.run(&id).await;
    assert_eq!(run["status"], "cancelled", "{run}");
    assert_eq!(attempts_of(&run).len(), 1, "{run}");
    inv.expect_log(&id, 1, "attempt 1\n");
    inv.check(&api).await;
    assert_eq!(inv.containers_created(&id), 1);
}

// Outbox -----------------------------------------------------------------------------

/// The run queue vanishes under a connected publisher (an operator deleted it): the
/// broker returns the mandatory publish as unroutable. The run stays pending, is
/// reported, goes out once the publisher has declared the queue again, and runs.
#[tokio::test]
async fn unroutable_publish_stays_pending_and_goes_out_when_the_queue_is_back() {
    let d = dir();
    let queue = unique("tasuki-faults");
    let _queue = QueueGuard(queue.clone());
    let worker_id = unique("test-worker");
    let mut inv = Invariants::start(&[&worker_id]);
    let server = amqp_server(d.path(), &queue, "5s");
    let api = server.client();

    // A first run connects the publisher and shows the path works.
    let mut w = start_worker_with(d.path(), &server, &queue, TOKEN, worker(&worker_id, 1));
    let first = api.run_and_wait("exit", json!({"code": "0"})).await;
    inv.accepted(&id_of(&first));
    assert_eq!(first["status"], "succeeded", "{first}");
    w.signal("TERM");
    w.wait_exit(Duration::from_secs(30)).await;

    crate::common::delete_queues(&queue);
    let id = api.accept("exit", json!({"code": "4"})).await;
    inv.accepted(&id);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !server
        .process
        .log_text()
        .contains("run message unroutable; it stays pending")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no unroutable report in the serve log:\n{}",
            server.process.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(api.run(&id).await["status"], "queued");

    // The publisher declared the queue again and the pending message went out: a
    // worker started now runs it.
    let _w = start_worker_with(d.path(), &server, &queue, TOKEN, worker(&worker_id, 1));
    let run = api.wait_final(&id, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "failed", "{run}");
    assert_eq!(run["exit_code"], 4, "{run}");
    let (status, ready) = api.get("/readyz").await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["checks"]["outbox"]["pending"], 0, "{ready}");
    inv.check(&api).await;
    assert_eq!(inv.containers_created(&id), 1);
}

/// A container named `tasuki-{run_id}-{attempt}` already exists when the worker creates
/// the attempt's container (an earlier life of the worker made it, and reconciliation
/// has not seen it yet: here it carries no worker label, so reconciliation never does).
/// One that ran is adopted, its exit code and output are the run's; one that never
/// started is replaced and the job runs.
#[tokio::test]
async fn create_name_conflict_adopts_the_existing_container() {
    let d = dir();
    let queue = unique("tasuki-faults");
    let _queue = QueueGuard(queue.clone());
    let worker_id = unique("test-worker");
    let server = amqp_server(d.path(), &queue, "5s");
    let api = server.client();
    let docker = |args: &[&str]| {
        let out = std::process::Command::new(docker_cli())
            .args(args)
            .output()
            .expect("docker");
        assert!(
            out.status.success(),
            "docker {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let ran = api.accept("exit", json!({"code": "0"})).await;
    let unstarted = api.accept("exit", json!({"code": "0"})).await;
    let names = [format!("tasuki-{ran}-1"), format!("tasuki-{unstarted}-1")];
    let _cleanup = scopeguard(names.clone());
    for name in &names {
        docker(&[
            "create",
            "--name",
            name,
            "--network",
            "none",
            "--log-driver",
            "local",
            "tasuki-example:latest",
            "sh",
            "-c",
            "echo adopted; exit 5",
        ]);
    }
    docker(&["start", &names[0]]);
    docker(&["wait", &names[0]]);

    let _w = start_worker_with(d.path(), &server, &queue, TOKEN, worker(&worker_id, 2));
    let adopted = api.wait_final(&ran, Duration::from_secs(60)).await;
    assert_eq!(adopted["status"], "failed", "{adopted}");
    assert_eq!(adopted["exit_code"], 5, "{adopted}");
    assert_eq!(api.logs(&ran).await, b"adopted\n");
    let replaced = api.wait_final(&unstarted, Duration::from_secs(60)).await;
    assert_eq!(replaced["status"], "succeeded", "{replaced}");
    assert_eq!(api.logs(&unstarted).await, b"exiting with 0\n");
    for name in &names {
        let out = std::process::Command::new(docker_cli())
            .args(["inspect", name])
            .output()
            .expect("docker inspect");
        assert!(!out.status.success(), "container {name} left behind");
    }
}

/// Removes the named containers when dropped, whatever the test did.
fn scopeguard(names: [String; 2]) -> impl Drop {
    struct Remove([String; 2]);
    impl Drop for Remove {
        fn drop(&mut self) {
            for name in &self.0 {
                let _ = std::process::Command::new(docker_cli())
                    .args(["rm", "-f", name])
                    .output();
            }
        }
    }
    Remove(names)
}

/// The broker confirmed the run's message, then lost it (the queue was purged): the
/// outbox cannot see that, but the run is still queued long after its publish while
/// the queue is empty, so the relay publishes it again and it runs, once.
#[tokio::test]
async fn a_message_lost_after_its_confirm_is_published_again() {
    let d = dir();
    let queue = unique("tasuki-faults");
    let _queue = QueueGuard(queue.clone());
    let worker_id = unique("test-worker");
    let mut inv = Invariants::start(&[&worker_id]);
    let server = Server::start(
        d.path(),
        ServeOptions {
            amqp_queue: Some(queue.clone()),
            worker_token: Some(TOKEN.to_owned()),
            lease_ttl: Some("5s".to_owned()),
            env: vec![("TASUKI_REPUBLISH_AFTER".into(), "2s".into())],
            ..ServeOptions::default()
        },
    );
    let api = server.client();
    let id = api.accept("exit", json!({"code": "0"})).await;
    inv.accepted(&id);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while queue_counts(&queue).0 != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the run's message never reached {queue}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let purged = std::process::Command::new("rabbitmqctl")
        .args(["purge_queue", &queue])
        .output()
        .expect("rabbitmqctl purge_queue");
    assert!(purged.status.success(), "{purged:?}");

    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while queue_counts(&queue).0 != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the lost message was not published again:\n{}",
            server.process.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        server
            .process
            .log_text()
            .contains("message no longer in the queue; published again")
    );
    let _w = start_worker_with(d.path(), &server, &queue, TOKEN, worker(&worker_id, 1));
    let run = api.wait_final(&id, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    inv.expect_log(&id, 1, "exiting with 0\n");
    inv.check(&api).await;
    assert_eq!(inv.containers_created(&id), 1);
}
