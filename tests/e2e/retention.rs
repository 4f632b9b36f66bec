//! Retention against the real binary: `tasuki runs prune` beside a running `serve`, and
//! `serve --retention` pruning when it starts.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::{Api, BIN, ServeOptions, Server, log_file, tasuki_cli};

/// Poll until `GET /v1/runs/{id}` says 404.
async fn wait_gone(api: &Api, id: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let (status, body) = api.get(&format!("/v1/runs/{id}")).await;
        if status == 404 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "run {id} still there after {within:?}: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn runs_prune_deletes_finished_runs_and_their_logs_beside_a_running_serve() {
    let d = tempfile::tempdir().unwrap();
    let server = Server::start(d.path(), ServeOptions::default());
    let api = server.client();
    let data = d.path().join("data");

    let done = api.run_and_wait("exit", json!({"code": "0"})).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let id = done["id"].as_str().unwrap().to_owned();
    let log = log_file(&data, &id, 1);
    assert!(log.exists(), "no log at {}", log.display());
    // Still running when the prune comes: not touched.
    let running = api.accept("sleep", json!({"seconds": "30"})).await;
    api.wait_log_contains(&running, "sleeping 30", Duration::from_secs(60))
        .await;

    let out = Command::new(BIN)
        .args(["runs", "prune", "--older-than", "0s", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.starts_with("deleted 1 run(s) finished before ")
            && stdout.contains(" (with the logs of 1);"),
        "{stdout}"
    );

    assert!(!log.exists(), "log {} left", log.display());
    let (status, body) = api.get(&format!("/v1/runs/{id}")).await;
    assert_eq!(status, 404, "{body}");
    let out = tasuki_cli(&server.url, &["status", &id]);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("(404)"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let run = api.run(&running).await;
    assert_eq!(run["status"], "running", "{run}");
    assert!(log_file(&data, &running, 1).exists());
    api.post(&format!("/v1/runs/{running}/cancel")).await;
    api.wait_final(&running, Duration::from_secs(30)).await;

    // A second pass finds nothing more; a data dir that holds no store is refused.
    let out = Command::new(BIN)
        .args(["runs", "prune", "--older-than", "1h", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("deleted 0 run(s)"),
        "{out:?}"
    );
    let out = Command::new(BIN)
        .args(["runs", "prune", "--older-than", "0s", "--data-dir"])
        .arg(d.path().join("nowhere"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no run store at"));
    assert!(!d.path().join("nowhere").exists());
}

#[tokio::test]
async fn serve_prunes_runs_past_its_retention_when_it_starts() {
    let d = tempfile::tempdir().unwrap();
    let mut server = Server::start(
        d.path(),
        ServeOptions {
            env: vec![("TASUKI_RETENTION".into(), "1ms".into())],
            ..ServeOptions::default()
        },
    );
    let api = server.client();
    let done = api.run_and_wait("exit", json!({"code": "3"})).await;
    let id = done["id"].as_str().unwrap().to_owned();
    let log = log_file(&d.path().join("data"), &id, 1);
    assert!(log.exists(), "no log at {}", log.display());

    server.process.signal("TERM");
    let exit = server.process.wait_exit(Duration::from_secs(60)).await;
    assert!(exit.success(), "serve exited with {exit}");
    server.restart(d.path());
    let api = server.client();
    wait_gone(&api, &id, Duration::from_secs(30)).await;
    assert!(!log.exists(), "log {} left", log.display());
}
