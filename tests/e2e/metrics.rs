//! `GET /metrics` of the real binary against real Docker (and RabbitMQ): runs of each
//! ending move the counters and histograms by exactly what happened, with the job and
//! status labels; who may scrape; a remote worker's own listener; and the exposition
//! and the example alert rules as Prometheus' own `promtool` reads them.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::auth::create_token;
use crate::common::{
    QueueGuard, ServeOptions, Server, TOKEN, WorkerSpec, amqp_server, assert_no_containers_left,
    start_worker_with, unique,
};

/// `promtool`, installed by tests/run.sh (`ensure_promtool`).
fn promtool() -> &'static str {
    let path = "/usr/bin/promtool";
    assert!(
        Path::new(path).exists(),
        "promtool is missing: tests/run.sh installs it (Debian package prometheus)"
    );
    path
}

/// `promtool check metrics` on an exposition: it must parse and pass the lint.
fn assert_promtool_accepts(text: &str) {
    let mut child = Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics refused the exposition: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One scrape: status, `Content-Type`, body.
async fn scrape(base: &str, token: Option<&str>) -> (u16, String, String) {
    let mut request = reqwest::Client::new().get(format!("{base}/metrics"));
    if let Some(t) = token {
        request = request.bearer_auth(t);
    }
    let response = request.send().await.expect("GET /metrics");
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, content_type, response.text().await.unwrap())
}

/// The value of the series `name{labels}` (labels in the exposition's order).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Scrape until `series` reads `want` (the counting of a run's end may trail the
/// answer that showed it by a moment), then return that scrape.
async fn scrape_until(base: &str, series: &str, want: f64) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, _, text) = scrape(base, None).await;
        assert_eq!(status, 200, "{text}");
        if sample(&text, series) == Some(want) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{series} never became {want}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn epoch_seconds(run: &Value) -> f64 {
    let at = run["finished_at"].as_str().expect("finished_at");
    let at = chrono::DateTime::parse_from_rfc3339(at).expect("an RFC 3339 time");
    at.timestamp_millis() as f64 / 1000.0
}

#[tokio::test]
async fn metrics_count_runs_attempts_and_engine_errors_by_job_in_embedded_mode() {
    let d = tempfile::tempdir().unwrap();
    let server = Server::start(d.path(), ServeOptions::default());
    let api = server.client();

    let ok = api.run_and_wait("exit", json!({"code": "0"})).await;
    assert_eq!(ok["status"], "succeeded", "{ok}");
    let failed = api.run_and_wait("exit", json!({"code": "3"})).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    let missing = api.run_and_wait("missing-image", json!({})).await;
    assert_eq!(missing["reason_code"], "image_not_found", "{missing}");
    let (status, _) = api.get("/no/such/path/01hzzzzzzzzzzzzzzzzzzzzzzz").await;
    assert_eq!(status, 404);

    scrape_until(
        &server.url,
        r#"tasuki_runs_finished_total{job_name="missing-image",status="failed"}"#,
        1.0,
    )
    .await;
    // A slot stays busy until its container is removed, after the run's end is stored.
    let text = scrape_until(&server.url, r#"tasuki_worker_slots{state="busy"}"#, 0.0).await;
    let s = |series: &str| sample(&text, series);
    assert_eq!(
        s(r#"tasuki_runs_accepted_total{job_name="exit",trigger="api"}"#),
        Some(2.0)
    );
    assert_eq!(
        s(r#"tasuki_runs_finished_total{job_name="exit",status="succeeded"}"#),
        Some(1.0)
    );
    assert_eq!(
        s(r#"tasuki_runs_finished_total{job_name="exit",status="failed"}"#),
        Some(1.0)
    );
    assert_eq!(
        s(r#"tasuki_attempts_claimed_total{job_name="exit"}"#),
        Some(2.0)
    );
    assert_eq!(
        s(r#"tasuki_attempts_finished_total{job_name="exit",reason="exit_code",status="failed"}"#),
        Some(1.0)
    );
    assert_eq!(
        s(r#"tasuki_attempts_finished_total{job_name="exit",reason="none",status="succeeded"}"#),
        Some(1.0)
    );
    assert_eq!(
        s(
            r#"tasuki_attempts_finished_total{job_name="missing-image",reason="image_not_found",status="failed"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        s(r#"tasuki_run_duration_seconds_count{job_name="exit",status="succeeded"}"#),
        Some(1.0)
    );
    // Batch buckets, up to six hours: a quick run is in every one of them.
    assert_eq!(
        s(r#"tasuki_run_duration_seconds_bucket{job_name="exit",status="failed",le="21600"}"#),
        Some(1.0)
    );
    assert_eq!(
        s(r#"tasuki_run_queue_wait_seconds_count{job_name="exit"}"#),
        Some(2.0)
    );
    assert_eq!(
        s(r#"tasuki_job_last_success_timestamp_seconds{job_name="exit"}"#),
        Some(epoch_seconds(&ok))
    );
    assert_eq!(
        s(r#"tasuki_job_last_success_timestamp_seconds{job_name="missing-image"}"#),
        None
    );
    for status in ["queued", "running"] {
        let active = s(&format!(
            r#"tasuki_runs_active{{job_name="exit",status="{status}"}}"#
        ));
        assert!(matches!(active, None | Some(0.0)), "{status}: {active:?}");
    }
    assert_eq!(s("tasuki_outbox_backlog"), Some(0.0));
    assert_eq!(s("tasuki_callback_backlog"), Some(0.0));
    // The embedded worker's side, in the same registry.
    assert_eq!(s(r#"tasuki_worker_slots{state="busy"}"#), Some(0.0));
    assert_eq!(s(r#"tasuki_worker_slots{state="free"}"#), Some(2.0));
    assert_eq!(s("tasuki_worker_containers_started_total"), Some(2.0));
    assert_eq!(
        s(r#"tasuki_docker_errors_total{kind="image_not_found",operation="ensure_image"}"#),
        Some(1.0)
    );
    // Requests by route template; an unknown path is `unmatched`, never itself.
    assert!(
        text.contains(r#"tasuki_http_request_duration_seconds_count{method="POST",route="/v1/jobs/{job}/runs",status="200"} 3"#),
        "{text}"
    );
    assert_eq!(
        s(
            r#"tasuki_http_request_duration_seconds_count{method="GET",route="unmatched",status="404"}"#
        ),
        Some(1.0)
    );
    assert!(!text.contains("/no/such/path"), "{text}");
    // No run id, exit code or error text anywhere in it.
    for id in [&ok, &failed, &missing].map(|r| r["id"].as_str().unwrap()) {
        assert!(!text.contains(id), "{text}");
    }
    assert!(!text.contains("does-not-exist"), "{text}");
    assert!(
        s(&format!(
            r#"tasuki_build_info{{commit="{}",version="{}"}}"#,
            tasuki::COMMIT,
            env!("CARGO_PKG_VERSION")
        )) == Some(1.0),
        "{text}"
    );

    let (_, content_type, _) = scrape(&server.url, None).await;
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    assert_promtool_accepts(&text);
}

#[tokio::test]
async fn a_cancel_counts_once_whether_the_run_waited_or_ran() {
    let d = tempfile::tempdir().unwrap();
    let server = Server::start(
        d.path(),
        ServeOptions {
            concurrency: 1,
            ..ServeOptions::default()
        },
    );
    let api = server.client();
    // One slot: the first run holds it, the second waits queued.
    let running = api.accept("sleep", json!({"seconds": "60"})).await;
    api.wait_until(&running, Duration::from_secs(30), "started", |r| {
        r["attempts"][0]["started_at"].is_string()
    })
    .await;
    let waiting = api.accept("sleep", json!({"seconds": "60"})).await;
    let text = scrape_until(
        &server.url,
        r#"tasuki_runs_active{job_name="sleep",status="queued"}"#,
        1.0,
    )
    .await;
    assert_eq!(
        sample(
            &text,
            r#"tasuki_runs_active{job_name="sleep",status="running"}"#
        ),
        Some(1.0)
    );

    let answer = api.post(&format!("/v1/runs/{waiting}/cancel")).await;
    assert_eq!(answer.body["status"], "cancelled", "{}", answer.body);
    let answer = api.post(&format!("/v1/runs/{running}/cancel")).await;
    assert_eq!(answer.status, 202, "{}", answer.body);
    let stopped = api.wait_final(&running, Duration::from_secs(30)).await;
    assert_eq!(stopped["status"], "cancelled", "{stopped}");

    let text = scrape_until(
        &server.url,
        r#"tasuki_runs_finished_total{job_name="sleep",status="cancelled"}"#,
        2.0,
    )
    .await;
    let s = |series: &str| sample(&text, series);
    // The waiting one never reached a worker: one claim, one attempt ended (stopped).
    assert_eq!(
        s(r#"tasuki_attempts_claimed_total{job_name="sleep"}"#),
        Some(1.0)
    );
    assert_eq!(
        s(
            r#"tasuki_attempts_finished_total{job_name="sleep",reason="cancelled",status="cancelled"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        s(r#"tasuki_run_duration_seconds_count{job_name="sleep",status="cancelled"}"#),
        Some(1.0)
    );
    assert_eq!(
        s(r#"tasuki_runs_active{job_name="sleep",status="queued"}"#),
        Some(0.0)
    );
    assert_eq!(
        s(r#"tasuki_runs_active{job_name="sleep",status="running"}"#),
        Some(0.0)
    );
    assert_promtool_accepts(&text);
}

#[tokio::test]
async fn metrics_need_read_on_every_job_or_admin_unless_opened() {
    let d = tempfile::tempdir().unwrap();
    let mut config = String::new();
    let mut make = |name: &str, scopes: &[&str]| {
        let (value, lines) = create_token(name, scopes, false);
        config.push_str(&lines);
        value
    };
    let reader = make("metrics-reader", &["read:*"]);
    let admin = make("metrics-admin", &["admin"]);
    let runner = make("metrics-runner", &["run:exit", "read:exit"]);
    let closed = d.path().join("closed.toml");
    std::fs::write(&closed, &config).unwrap();
    let open = d.path().join("open.toml");
    std::fs::write(&open, format!("{config}\n[auth]\nopen_metrics = true\n")).unwrap();
    let with_config = |file: &Path| ServeOptions {
        env: vec![("TASUKI_CONFIG".to_owned(), file.display().to_string())],
        ..ServeOptions::default()
    };

    let dir = d.path().join("closed");
    std::fs::create_dir_all(&dir).unwrap();
    let server = Server::start(&dir, with_config(&closed));
    let (status, _, body) = scrape(&server.url, None).await;
    assert_eq!(status, 401, "{body}");
    let (status, _, body) = scrape(&server.url, Some(&runner)).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("read:*"), "{body}");
    for token in [&reader, &admin] {
        let (status, _, body) = scrape(&server.url, Some(token)).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("tasuki_build_info"), "{body}");
    }
    assert!(
        server
            .process
            .log_text()
            .contains("reason=metrics need read:* or admin"),
        "the refusal is audited"
    );
    drop(server);

    let dir = d.path().join("open");
    std::fs::create_dir_all(&dir).unwrap();
    let server = Server::start(&dir, with_config(&open));
    let (status, _, body) = scrape(&server.url, None).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("tasuki_build_info"), "{body}");
    // Only /metrics opened: the API still wants a token.
    let (status, _) = server.client().get("/v1/runs").await;
    assert_eq!(status, 401);
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

#[tokio::test]
async fn a_remote_worker_serves_its_own_metrics_and_serve_the_runs() {
    let d = tempfile::tempdir().unwrap();
    let queue = unique("tasuki-test");
    let _guard = QueueGuard(queue.clone());
    let server = amqp_server(d.path(), &queue, "10s");
    let port = free_port();
    let worker = start_worker_with(
        d.path(),
        &server,
        &queue,
        TOKEN,
        WorkerSpec {
            concurrency: 3,
            env: vec![(
                "TASUKI_METRICS_LISTEN".to_owned(),
                format!("127.0.0.1:{port}"),
            )],
            ..WorkerSpec::default()
        },
    );
    let api = server.client();
    let ok = api.run_and_wait("exit", json!({"code": "0"})).await;
    assert_eq!(ok["status"], "succeeded", "{ok}");
    let missing = api.run_and_wait("missing-image", json!({})).await;
    assert_eq!(missing["status"], "failed", "{missing}");

    let worker_url = format!("http://127.0.0.1:{port}");
    scrape_until(
        &worker_url,
        r#"tasuki_docker_errors_total{kind="image_not_found",operation="ensure_image"}"#,
        1.0,
    )
    .await;
    let text = scrape_until(&worker_url, r#"tasuki_worker_slots{state="busy"}"#, 0.0).await;
    let s = |series: &str| sample(&text, series);
    assert_eq!(s("tasuki_worker_containers_started_total"), Some(1.0));
    assert_eq!(s(r#"tasuki_worker_slots{state="busy"}"#), Some(0.0));
    assert_eq!(s(r#"tasuki_worker_slots{state="free"}"#), Some(3.0));
    assert!(text.contains("tasuki_build_info"), "{text}");
    // Runs are the control plane's to count.
    assert!(!text.contains("tasuki_runs_finished_total"), "{text}");
    assert_promtool_accepts(&text);
    let health = reqwest::get(format!("{worker_url}/healthz")).await.unwrap();
    assert_eq!(health.status().as_u16(), 200);

    let text = scrape_until(
        &server.url,
        r#"tasuki_runs_finished_total{job_name="exit",status="succeeded"}"#,
        1.0,
    )
    .await;
    let s = |series: &str| sample(&text, series);
    assert_eq!(
        s(r#"tasuki_runs_finished_total{job_name="missing-image",status="failed"}"#),
        Some(1.0)
    );
    assert_eq!(
        s(r#"tasuki_job_last_success_timestamp_seconds{job_name="exit"}"#),
        Some(epoch_seconds(&ok))
    );
    // No worker in this process: no worker series.
    assert!(!text.contains("tasuki_worker_slots"), "{text}");
    assert_promtool_accepts(&text);
    assert_no_containers_left(&worker.worker_id).await;
}

#[test]
fn the_example_alert_rules_pass_promtool() {
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/alerts.yml");
    let out = Command::new(promtool())
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .expect("run promtool");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("SUCCESS: 4 rules found"), "{said}");
}
