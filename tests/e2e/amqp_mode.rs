//! `tasuki serve` with RabbitMQ and a separate `tasuki worker` process.

use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::json;

use crate::common::{
    QueueGuard, ServeOptions, Server, TOKEN, amqp_url, assert_no_containers_left, queue_counts,
    start_worker, unique,
};

fn amqp_server(dir: &std::path::Path, queue: &str) -> Server {
    Server::start(
        dir,
        ServeOptions {
            amqp_queue: Some(queue.to_owned()),
            worker_token: Some(TOKEN.to_owned()),
            ..ServeOptions::default()
        },
    )
}

#[tokio::test]
async fn a_separate_worker_runs_jobs_end_to_end() {
    let d = tempfile::tempdir().unwrap();
    let queue = unique("tasuki-test");
    let _guard = QueueGuard(queue.clone());
    let server = amqp_server(d.path(), &queue);
    let worker = start_worker(d.path(), &server, &queue, TOKEN, 2);
    let api = server.client();

    let run = api.run_and_wait("exit", json!({"code": 5})).await;
    assert_eq!(run["status"], "failed", "{run}");
    assert_eq!(run["exit_code"], 5);
    assert_eq!(
        String::from_utf8_lossy(&api.logs(run["id"].as_str().unwrap()).await),
        "exiting with 5\n"
    );

    let run = api.run_and_wait("echo-both", json!({})).await;
    assert_eq!(run["status"], "succeeded");
    assert_eq!(
        String::from_utf8_lossy(&api.logs(run["id"].as_str().unwrap()).await),
        "out-1\nerr-1\nout-2\nerr-2\n"
    );

    // Output of a remote worker arrives byte-exact through the upload protocol.
    let run = api.run_and_wait("binary", json!({})).await;
    let logs = api.logs(run["id"].as_str().unwrap()).await;
    assert_eq!(logs.len(), 300_000 + "no newline at end".len());
    assert!(logs[..300_000].iter().all(|b| *b == 0xff));

    assert_no_containers_left(&worker.worker_id).await;
    let (ready, unacked) = queue_counts(&queue);
    assert_eq!((ready, unacked), (0, 0));
    assert!(worker.log_text().contains("run finished"));
}

#[tokio::test]
async fn a_busy_worker_holds_no_unacked_deliveries() {
    let d = tempfile::tempdir().unwrap();
    let queue = unique("tasuki-test");
    let _guard = QueueGuard(queue.clone());
    let server = amqp_server(d.path(), &queue);
    let _worker = start_worker(d.path(), &server, &queue, TOKEN, 1);
    let api = server.client();

    // Long enough that the busy slot outlasts the checks below on a loaded machine.
    let busy = api
        .post_run("sleep", r#"{"params":{"seconds":"15"}}"#, "")
        .await;
    let busy_id = busy.body["id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, run) = api.get(&format!("/v1/runs/{busy_id}")).await;
        if run["status"] == "running" {
            break;
        }
        assert!(Instant::now() < deadline, "first run never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut others = Vec::new();
    for code in ["0", "0"] {
        let a = api
            .post_run("exit", &json!({"params": {"code": code}}).to_string(), "")
            .await;
        others.push(a.body["id"].as_str().unwrap().to_owned());
    }
    // Give the relay time to publish; then the two wait in the broker, not unacked in
    // the busy worker.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (ready, unacked) = queue_counts(&queue);
        if ready == 2 {
            assert_eq!(unacked, 0, "a busy worker holds deliveries");
            let (_, busy_run) = api.get(&format!("/v1/runs/{busy_id}")).await;
            assert_eq!(
                busy_run["status"], "running",
                "checked after the busy run ended"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "messages never reached the queue: ready={ready} unacked={unacked}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for id in others.iter().chain([&busy_id]) {
        let run = api.wait_final(id, Duration::from_secs(60)).await;
        assert_eq!(run["status"], "succeeded", "{run}");
    }
}

#[tokio::test]
async fn a_poison_message_is_dead_lettered_and_work_goes_on() {
    let d = tempfile::tempdir().unwrap();
    let queue = unique("tasuki-test");
    let _guard = QueueGuard(queue.clone());
    let server = amqp_server(d.path(), &queue);
    let worker = start_worker(d.path(), &server, &queue, TOKEN, 1);
    let api = server.client();
    // Let the server declare the topology first.
    let first = api.run_and_wait("exit", json!({"code": "0"})).await;
    assert_eq!(first["status"], "succeeded");

    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    for body in [
        &b"not json at all"[..],
        br#"{"v":99,"run_id":"x","attempt":1}"#,
    ] {
        channel
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let dead = format!("{queue}.dead");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let q = channel
            .queue_declare(
                dead.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        if q.message_count() == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "poison messages not dead-lettered: {}",
            q.message_count()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = api.run_and_wait("exit", json!({"code": "0"})).await;
    assert_eq!(after["status"], "succeeded");
    assert!(worker.log_text().contains("poison message dead-lettered"));
}

#[tokio::test]
async fn the_worker_api_needs_the_token() {
    let d = tempfile::tempdir().unwrap();
    let queue = unique("tasuki-test");
    let _guard = QueueGuard(queue.clone());
    let server = amqp_server(d.path(), &queue);
    let api = server.client();
    let body = json!({"run_id": "01jd0000000000000000000000", "attempt": 1, "worker_id": "w"});
    for auth in [None, Some("Bearer wrong")] {
        let mut request = api
            .http
            .post(format!("{}/v1/worker/claim", api.base))
            .json(&body);
        if let Some(a) = auth {
            request = request.header("authorization", a);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status().as_u16(), 401);
    }
    let response = api
        .http
        .post(format!("{}/v1/worker/claim", api.base))
        .bearer_auth(TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let answer: serde_json::Value = response.json().await.unwrap();
    assert_eq!(answer["result"], "unknown_run");
    // No worker runs inside serve in AMQP mode unless asked: the run stays queued.
    let accepted = api
        .post_run("exit", r#"{"params":{"code":"0"}}"#, "?wait=2")
        .await;
    assert_eq!(accepted.status, 202);
    assert_eq!(accepted.body["status"], "queued");
}

#[tokio::test]
async fn serve_runs_an_embedded_worker_on_the_queue_when_asked() {
    let d = tempfile::tempdir().unwrap();
    let queue = unique("tasuki-test");
    let _guard = QueueGuard(queue.clone());
    let server = Server::start(
        d.path(),
        ServeOptions {
            amqp_queue: Some(queue.clone()),
            embedded_worker: true,
            ..ServeOptions::default()
        },
    );
    let run = server
        .client()
        .run_and_wait("exit", json!({"code": "9"}))
        .await;
    assert_eq!(run["status"], "failed");
    assert_eq!(run["exit_code"], 9);
    let (ready, unacked) = queue_counts(&queue);
    assert_eq!((ready, unacked), (0, 0));
}

#[tokio::test]
async fn with_the_broker_unreachable_runs_are_still_accepted_and_readyz_names_it() {
    let d = tempfile::tempdir().unwrap();
    // Nothing listens on port 1: the broker is "down" for this server only.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let data = d.path().join("data");
    let mut child = std::process::Command::new(crate::common::BIN)
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--amqp-url",
            "amqp://guest:guest@127.0.0.1:1/%2f",
        ])
        .arg("--jobs-dir")
        .arg(crate::common::test_jobs_dir())
        .arg("--data-dir")
        .arg(&data)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let api = crate::common::Api {
        http: reqwest::Client::new(),
        base: format!("http://127.0.0.1:{port}"),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "serve did not listen");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let accepted = api.post_run("exit", r#"{"params":{"code":"0"}}"#, "").await;
    assert_eq!(accepted.status, 202, "{}", accepted.body);
    let (status, ready) = api.get("/readyz").await;
    assert_eq!(status, 503);
    assert_eq!(ready["checks"]["store"], "ok");
    assert!(
        ready["error"]["message"]
            .as_str()
            .unwrap()
            .contains("broker"),
        "{ready}"
    );
    let (_, run) = api
        .get(&format!(
            "/v1/runs/{}",
            accepted.body["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(run["status"], "queued");
    let _ = child.kill();
    let _ = child.wait();
}

/// A worker renews all the leases it holds in one call (`/v1/worker/heartbeats`): four
/// runs of a worker with four slots outlive a 1 s lease several times over and each ends
/// on its first attempt, and the server saw only batched renewals.
#[tokio::test]
async fn a_worker_renews_the_leases_of_its_runs_together() {
    let d = tempfile::tempdir().unwrap();
    let queue = unique("tasuki-test");
    let _guard = QueueGuard(queue.clone());
    let server = crate::common::amqp_server(d.path(), &queue, "1s");
    let worker = start_worker(d.path(), &server, &queue, TOKEN, 4);
    let api = server.client();

    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(api.accept("sleep", json!({"seconds": "3"})).await);
    }
    for id in &ids {
        let run = api.wait_final(id, Duration::from_secs(60)).await;
        assert_eq!(run["status"], "succeeded", "{run}");
        assert_eq!(run["attempt"], 1, "{run}");
    }
    let text = reqwest::get(format!("{}/metrics", server.url))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics text");
    let calls = |route: &str| -> f64 {
        let series = format!(
            r#"tasuki_http_request_duration_seconds_count{{method="POST",route="{route}",status="200"}} "#
        );
        text.lines()
            .find_map(|l| l.strip_prefix(&series)?.parse().ok())
            .unwrap_or(0.0)
    };
    assert!(calls("/v1/worker/heartbeats") >= 1.0, "{text}");
    assert_eq!(calls("/v1/worker/heartbeat"), 0.0, "{text}");
    assert_no_containers_left(&worker.worker_id).await;
}

/// A worker given two control plane URLs, the first of which nothing answers, takes
/// the second and runs jobs as usual (and says once which replica it passed over).
#[tokio::test]
async fn a_worker_passes_over_a_control_plane_replica_that_is_down() {
    let d = tempfile::tempdir().unwrap();
    let queue = unique("tasuki-test");
    let _guard = QueueGuard(queue.clone());
    let server = amqp_server(d.path(), &queue);
    let down = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let worker = crate::common::start_worker_with(
        d.path(),
        &server,
        &queue,
        TOKEN,
        crate::common::WorkerSpec {
            servers: Some(vec![down.clone(), server.url.clone()]),
            ..crate::common::WorkerSpec::default()
        },
    );
    let api = server.client();
    for code in ["0", "3"] {
        let run = api.run_and_wait("exit", json!({ "code": code })).await;
        assert_eq!(run["exit_code"].to_string(), code, "{run}");
        let id = run["id"].as_str().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&api.logs(id).await),
            format!("exiting with {code}\n")
        );
    }
    let log = worker.log_text();
    assert!(
        log.contains("control plane replica unusable") && log.contains(&down),
        "{log}"
    );
    assert_no_containers_left(&worker.worker_id).await;
}
