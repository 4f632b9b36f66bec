//! `tasuki serve` with no AMQP URL: API, in-process queue, embedded worker, SQLite.

use std::time::Duration;

use serde_json::json;

use crate::common::{ServeOptions, Server, assert_no_containers_left};

fn dir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

#[tokio::test]
async fn exit_zero_and_non_zero_are_reported() {
    let d = dir();
    let server = Server::start(d.path(), ServeOptions::default());
    let api = server.client();

    let ok = api.run_and_wait("exit", json!({"code": "0"})).await;
    assert_eq!(ok["status"], "succeeded");
    assert_eq!(ok["exit_code"], 0);
    assert_eq!(ok["reason"], serde_json::Value::Null);
    assert_eq!(ok["attempt"], 1);

    let failed = api.run_and_wait("exit", json!({"code": 3})).await;
    assert_eq!(failed["status"], "failed");
    assert_eq!(failed["exit_code"], 3);
    assert_eq!(failed["reason"], "exit_code 3");
    assert_eq!(failed["reason_code"], "exit_code");
    for key in [
        "id",
        "job",
        "params",
        "created_at",
        "started_at",
        "finished_at",
    ] {
        assert!(
            failed.get(key).is_some(),
            "run object lacks {key}: {failed}"
        );
    }
    let logs = api.logs(failed["id"].as_str().unwrap()).await;
    assert_eq!(String::from_utf8_lossy(&logs), "exiting with 3\n");
    // Containers are removed once the final state is stored.
    assert_no_containers_left(&server.process.worker_id).await;
}

#[tokio::test]
async fn stdout_and_stderr_are_captured_in_order() {
    let d = dir();
    let server = Server::start(d.path(), ServeOptions::default());
    let api = server.client();
    let run = api.run_and_wait("echo-both", json!({})).await;
    assert_eq!(run["status"], "succeeded");
    let logs = api.logs(run["id"].as_str().unwrap()).await;
    assert_eq!(
        String::from_utf8_lossy(&logs),
        "out-1\nerr-1\nout-2\nerr-2\n"
    );
}

#[tokio::test]
async fn a_job_over_its_memory_limit_is_oom_killed() {
    let d = dir();
    let server = Server::start(d.path(), ServeOptions::default());
    let run = server.client().run_and_wait("oom", json!({})).await;
    assert_eq!(run["status"], "failed", "{run}");
    assert_eq!(run["reason_code"], "oom_killed");
    assert_eq!(run["reason"], "oom_killed");
    assert_eq!(run["exit_code"], 137);
}

#[tokio::test]
async fn a_missing_image_is_a_platform_failure_without_exit_code() {
    let d = dir();
    let server = Server::start(d.path(), ServeOptions::default());
    let api = server.client();
    let run = api.run_and_wait("missing-image", json!({})).await;
    assert_eq!(run["status"], "failed");
    assert_eq!(run["reason_code"], "image_not_found");
    assert_eq!(
        run["reason"],
        "image_not_found: tasuki-test/does-not-exist:never"
    );
    assert_eq!(run["exit_code"], serde_json::Value::Null);

    let run = api.run_and_wait("unreachable-registry", json!({})).await;
    assert_eq!(run["status"], "failed");
    assert_eq!(run["reason_code"], "image_pull_failed", "{run}");
    assert_eq!(run["exit_code"], serde_json::Value::Null);
}

#[tokio::test]
async fn params_reach_the_container_verbatim_without_a_shell() {
    let d = dir();
    let server = Server::start(d.path(), ServeOptions::default());
    let api = server.client();
    for value in [
        "$(id)",
        "; rm -rf /",
        "`uname`",
        "a b  c",
        "'\"quoted\"'",
        "{{params.tag}}",
        "日本語",
    ] {
        let run = api.run_and_wait("args", json!({ "value": value })).await;
        assert_eq!(run["status"], "succeeded", "{run}");
        assert_eq!(run["params"]["value"], value);
        let logs = String::from_utf8(api.logs(run["id"].as_str().unwrap()).await).unwrap();
        assert_eq!(logs, format!("[{value}]\n<{value}>\n"), "value {value:?}");
    }
}

#[tokio::test]
async fn bad_requests_get_clear_errors() {
    let d = dir();
    let server = Server::start(d.path(), ServeOptions::default());
    let api = server.client();

    let a = api
        .post_run("args", r#"{"params":{"value":"x","extra":"y"}}"#, "")
        .await;
    assert_eq!(a.status, 422);
    assert_eq!(a.body["error"]["code"], "invalid_params");
    assert!(
        a.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`extra`"),
        "{}",
        a.body
    );

    let a = api.post_run("args", r#"{"params":{}}"#, "").await;
    assert_eq!(a.status, 422);
    assert!(
        a.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`value`"),
        "{}",
        a.body
    );

    let a = api
        .post_run("args", r#"{"params":{"value":"x","tag":"NOT-LOWER"}}"#, "")
        .await;
    assert_eq!(a.status, 422);
    assert!(
        a.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`tag`"),
        "{}",
        a.body
    );

    let a = api.post_run("args", r#"{"params":{"value":"x""#, "").await;
    assert_eq!(a.status, 400);
    assert_eq!(a.body["error"]["code"], "bad_request");

    let a = api.post_run("no-such-job", "", "").await;
    assert_eq!(a.status, 404);
    assert_eq!(a.body["error"]["code"], "unknown_job");

    let big = format!(
        r#"{{"params":{{"value":"{}"}}}}"#,
        "x".repeat(2 * 1024 * 1024)
    );
    // Its own client: a connection whose request body was refused half-read is closed.
    let once = crate::common::Api {
        http: reqwest::Client::new(),
        base: api.base.clone(),
    };
    let a = once.post_run("args", &big, "").await;
    assert_eq!(a.status, 413);
    assert_eq!(a.body["error"]["code"], "body_too_large");

    let (status, body) = api.get("/v1/runs/not-a-run-id").await;
    assert_eq!(status, 404);
    assert!(body["error"]["message"].is_string());
    let (status, body) = api.get("/v1/nothing-here").await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "not_found");
    let (status, body) = api.get("/v1/runs?status=done").await;
    assert_eq!(status, 400);
    assert!(body["error"]["message"].as_str().unwrap().contains("done"));
}

#[tokio::test]
async fn accepted_runs_answer_202_with_location_and_can_be_listed() {
    let d = dir();
    let server = Server::start(d.path(), ServeOptions::default());
    let api = server.client();
    // No body and a form content type, as `curl -X POST -d ''` sends.
    let response = api
        .http
        .post(format!("{}/v1/jobs/echo-both/runs", api.base))
        .header("content-type", "application/x-www-form-urlencoded")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 202);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["status"], "queued");
    assert_eq!(
        location,
        format!("/v1/runs/{}", body["id"].as_str().unwrap())
    );

    let run = api
        .wait_final(body["id"].as_str().unwrap(), Duration::from_secs(60))
        .await;
    assert_eq!(run["status"], "succeeded");

    let (status, list) = api
        .get("/v1/runs?job=echo-both&status=succeeded&limit=5")
        .await;
    assert_eq!(status, 200);
    assert_eq!(list["runs"][0]["id"], body["id"]);

    let (status, jobs) = api.get("/v1/jobs").await;
    assert_eq!(status, 200);
    assert!(
        jobs["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|j| j["name"] == "args")
    );
    let (status, job) = api.get("/v1/jobs/args").await;
    assert_eq!(status, 200);
    assert_eq!(job["params"]["value"]["required"], true);

    let (status, health) = api.get("/healthz").await;
    assert_eq!((status, health["status"].as_str()), (200, Some("ok")));
    let (status, ready) = api.get("/readyz").await;
    assert_eq!(status, 200, "{ready}");
}

#[tokio::test]
async fn a_job_past_its_timeout_is_stopped_and_timed_out() {
    let d = dir();
    let server = Server::start(d.path(), ServeOptions::default());
    let api = server.client();
    let run = api.run_and_wait("slow", json!({})).await;
    assert_eq!(run["status"], "timed_out", "{run}");
    assert_eq!(run["reason_code"], "timed_out");
    assert_eq!(run["reason"], "timeout after 1s");
    let logs = api.logs(run["id"].as_str().unwrap()).await;
    assert_eq!(String::from_utf8_lossy(&logs), "started\n");
}

#[tokio::test]
async fn binary_output_and_a_last_line_without_newline_are_kept_byte_for_byte() {
    let d = dir();
    let server = Server::start(d.path(), ServeOptions::default());
    let api = server.client();
    let run = api.run_and_wait("binary", json!({})).await;
    assert_eq!(run["status"], "succeeded");
    let logs = api.logs(run["id"].as_str().unwrap()).await;
    let mut expected = vec![0xffu8; 300_000];
    expected.extend_from_slice(b"no newline at end");
    assert_eq!(logs.len(), expected.len());
    assert!(logs == expected, "log bytes differ");
}

#[tokio::test]
async fn following_logs_streams_until_the_run_ends() {
    let d = dir();
    let server = Server::start(d.path(), ServeOptions::default());
    let api = server.client();
    let accepted = api.post_run("echo-both", "", "").await;
    assert_eq!(accepted.status, 202);
    let id = accepted.body["id"].as_str().unwrap().to_owned();
    let response = api
        .http
        .get(format!("{}/v1/runs/{id}/logs?follow=true", api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.headers()["content-type"],
        "text/plain; charset=utf-8"
    );
    let body = tokio::time::timeout(Duration::from_secs(60), response.bytes())
        .await
        .expect("follow ended")
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&body),
        "out-1\nerr-1\nout-2\nerr-2\n"
    );
}

#[tokio::test]
async fn queued_runs_survive_a_crash_of_serve_and_run_after_restart() {
    let d = dir();
    let mut server = Server::start(
        d.path(),
        ServeOptions {
            concurrency: 1,
            ..ServeOptions::default()
        },
    );
    let api = server.client();
    // One slot, busy for a while; the next two runs wait in the queue.
    let busy = api
        .post_run("sleep", r#"{"params":{"seconds":"30"}}"#, "")
        .await;
    assert_eq!(busy.status, 202);
    let busy_id = busy.body["id"].as_str().unwrap().to_owned();
    let mut waiting = Vec::new();
    for code in ["0", "4"] {
        let a = api
            .post_run("exit", &json!({"params": {"code": code}}).to_string(), "")
            .await;
        assert_eq!(a.status, 202);
        waiting.push(a.body["id"].as_str().unwrap().to_owned());
    }
    // Wait until the long run holds the slot, so the other two are certainly queued.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, run) = api.get(&format!("/v1/runs/{busy_id}")).await;
        if run["status"] == "running" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "long run never started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for id in &waiting {
        let (_, run) = api.get(&format!("/v1/runs/{id}")).await;
        assert_eq!(run["status"], "queued");
    }

    server.process.kill9();
    server.restart(d.path());
    let api = server.client();
    let first = api.wait_final(&waiting[0], Duration::from_secs(60)).await;
    assert_eq!(first["status"], "succeeded");
    let second = api.wait_final(&waiting[1], Duration::from_secs(60)).await;
    assert_eq!(second["status"], "failed");
    assert_eq!(second["exit_code"], 4);
}

/// A data dir a newer tasuki migrated is refused before anything touches it, with a
/// message naming both versions; at this build's own version it starts again, every
/// run in place.
#[tokio::test]
async fn serve_refuses_a_store_that_a_newer_build_migrated() {
    let d = tempfile::tempdir().unwrap();
    let mut server = Server::start(d.path(), ServeOptions::default());
    let api = server.client();
    let run = api.run_and_wait("exit", json!({"code": "0"})).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    server.process.signal("TERM");
    server.process.wait_exit(Duration::from_secs(30)).await;

    let db = format!("sqlite://{}", d.path().join("data/tasuki.db").display());
    let pool = sqlx::SqlitePool::connect(&db).await.unwrap();
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (999999, 'from a newer build', 1, x'00', 0)",
    )
    .execute(&pool)
    .await
    .unwrap();
    let mut refused = server.spawn_again(d.path());
    let status = refused.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(1));
    let log = refused.log_text();
    assert!(
        log.contains("schema is at version 999999, newer than this build of tasuki knows"),
        "{log}"
    );

    sqlx::query("DELETE FROM _sqlx_migrations WHERE version = 999999")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    server.restart(d.path());
    let id = run["id"].as_str().unwrap();
    assert_eq!(server.client().run(id).await["status"], "succeeded");
}

/// With `--log-export DIR`, every line a run prints is also written there as a JSON
/// line for a collector, with the run, its job, attempt and stream; the stored log is
/// the same bytes as without.
#[tokio::test]
async fn output_is_exported_as_json_lines_for_a_collector() {
    let d = dir();
    let export = d.path().join("export");
    let server = Server::start(
        d.path(),
        ServeOptions {
            extra_args: vec!["--log-export".into(), export.display().to_string()],
            ..ServeOptions::default()
        },
    );
    let api = server.client();
    let run = api.run_and_wait("echo-both", json!({})).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let id = run["id"].as_str().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&api.logs(id).await),
        "out-1\nerr-1\nout-2\nerr-2\n"
    );
    let day = chrono::Utc::now().date_naive().format("%Y-%m-%d");
    let text = std::fs::read_to_string(export.join(format!("tasuki-output-{day}.jsonl")))
        .expect("the day's export file");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    let seen: Vec<(&str, &str)> = lines
        .iter()
        .map(|l| (l["stream"].as_str().unwrap(), l["line"].as_str().unwrap()))
        .collect();
    let stdout: Vec<_> = seen.iter().filter(|(s, _)| *s == "stdout").collect();
    let stderr: Vec<_> = seen.iter().filter(|(s, _)| *s == "stderr").collect();
    assert_eq!(
        stdout,
        [&("stdout", "out-1"), &("stdout", "out-2")],
        "{text}"
    );
    assert_eq!(
        stderr,
        [&("stderr", "err-1"), &("stderr", "err-2")],
        "{text}"
    );
    for line in &lines {
        assert_eq!(line["run_id"], id);
        assert_eq!(line["job"], "echo-both");
        assert_eq!(line["attempt"], 1);
        assert!(line.get("partial").is_none(), "{line}");
    }
}
