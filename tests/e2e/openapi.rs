//! The OpenAPI document against the real server: served without a token, every
//! documented operation routed (none answers as the unknown-endpoint fallback), the
//! worker protocol routed but not documented, and schemathesis (a fuzzer that knows
//! nothing of tasuki) run against a live `serve` with all its checks on.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::common::{BIN, ServeOptions, Server};

/// Fast jobs only, so every run schemathesis starts (and every log follow or `?wait` it
/// holds) ends within a second or two; containers run with network `none`.
const HELLO: &str = "image = \"tasuki-example:latest\"\npull = \"never\"\nnetwork = \"none\"\n\
stop_grace = \"1s\"\ntimeout = \"30s\"\ncommand = [\"sh\", \"-c\", \"echo hello $WHO\"]\n\
[env]\nWHO = \"{{params.who}}\"\n[params.who]\ndefault = \"world\"\nmax_length = 32\n";

/// A schedule that does not fire during the test (1 January), so the schedule
/// endpoints have something to show, pause, resume and backfill. A backfill may fire up
/// to 1000 slots: `max_concurrent` keeps it to one container at a time, and the
/// server's end removes them.
const YEARLY: &str = "image = \"tasuki-example:latest\"\npull = \"never\"\nnetwork = \"none\"\n\
stop_grace = \"1s\"\ntimeout = \"30s\"\ncommand = [\"true\"]\nmax_concurrent = 1\n\
[[schedules]]\nname = \"yearly\"\ncron = \"0 0 1 1 *\"\n";

fn jobs_dir(dir: &Path) -> PathBuf {
    let jobs = dir.join("jobs");
    std::fs::create_dir_all(&jobs).unwrap();
    std::fs::write(jobs.join("hello.toml"), HELLO).unwrap();
    std::fs::write(jobs.join("yearly.toml"), YEARLY).unwrap();
    jobs
}

/// A server with one API token of every scope; no rate limit, so the fuzzer reaches the
/// handlers (the 429 is covered by `tests/e2e/limits.rs`).
fn start(dir: &Path) -> (Server, String) {
    let out = Command::new(BIN)
        .args(["token", "create", "--name", "fuzzer"])
        .args(["--scope", "admin", "--scope", "run:*", "--scope", "read:*"])
        .args(["--scope", "cancel:*"])
        .output()
        .expect("tasuki token create");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let (token, config) = text.split_once('\n').unwrap();
    let config_file = dir.join("tasuki.toml");
    std::fs::write(
        &config_file,
        format!("{config}\n[limits]\nrate_per_second = 0\n"),
    )
    .unwrap();
    let server = Server::start(
        dir,
        ServeOptions {
            jobs_dir: jobs_dir(dir),
            extra_args: vec!["--config".into(), config_file.display().to_string()],
            ..ServeOptions::default()
        },
    );
    (server, token.to_owned())
}

/// The document, fetched without a token.
async fn document(server: &Server) -> Value {
    let response = reqwest::get(format!("{}/v1/openapi.json", server.url))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "application/json"
    );
    response.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_documented_operation_is_routed_and_the_worker_protocol_is_not_documented() {
    let dir = tempfile::tempdir().unwrap();
    let (server, token) = start(dir.path());
    let doc = document(&server).await;
    let http = reqwest::Client::new();
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 18, "{paths:?}");
    for (path, item) in paths {
        for method in item.as_object().unwrap().keys() {
            let url = format!(
                "{}{}",
                server.url,
                path.replace("{job}", "yearly")
                    .replace("{name}", "yearly")
                    .replace("{id}", "01jd0000000000000000000000")
            );
            let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let response = http
                .request(method.clone(), &url)
                .bearer_auth(&token)
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            assert_ne!(status, 405, "{method} {path} is documented but not routed");
            assert_ne!(
                body["error"]["code"], "not_found",
                "{method} {path} answered as an unknown endpoint: {body}"
            );
        }
    }
    // The worker protocol is served (to worker tokens) but is not part of the document.
    assert!(paths.keys().all(|p| !p.starts_with("/v1/worker/")));
    let worker = http
        .post(format!("{}/v1/worker/claim", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(
        worker.status(),
        403,
        "no worker tokens: the worker API is off"
    );
}

/// schemathesis as tests/run.sh installs it (`TASUKI_SCHEMATHESIS`). Missing is a
/// failure under CI; elsewhere the test says so and passes.
fn schemathesis() -> Option<String> {
    match std::env::var("TASUKI_SCHEMATHESIS") {
        Ok(path) if !path.is_empty() => Some(path),
        _ => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "TASUKI_SCHEMATHESIS is not set: tests/run.sh installs schemathesis and sets it"
            );
            eprintln!("TASUKI_SCHEMATHESIS is not set (tests/run.sh sets it): not fuzzing");
            None
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn schemathesis_finds_nothing() {
    let Some(schemathesis) = schemathesis() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (server, token) = start(dir.path());
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openapi/schemathesis.toml");
    let report = dir.path().join("schemathesis.xml");
    let run = tokio::task::spawn_blocking({
        let url = format!("{}/v1/openapi.json", server.url);
        let report = report.clone();
        // Its cache of found crashes goes to the working directory: the test's own.
        let cwd = dir.path().to_owned();
        move || {
            Command::new(schemathesis)
                .current_dir(cwd)
                .arg("--config-file")
                .arg(config)
                .args(["run", &url, "--checks", "all", "--no-color"])
                .args(["--header", &format!("Authorization: Bearer {token}")])
                // Bounded: examples per operation, a time budget for the whole run, and
                // a timeout for each request (a `?wait` holds at most as long as a run
                // of these jobs takes). One worker: hypothesis describes its strategies by
                // parsing source with `ast`, which CPython 3.11 cannot do from two threads
                // at once ("AST constructor recursion depth mismatch", seen here).
                .args(["--max-examples", "25", "--max-time", "60"])
                .args(["--request-timeout", "20", "--workers", "1"])
                .args(["--report", "junit", "--report-junit-path"])
                .arg(&report)
                .output()
        }
    });
    let out = tokio::time::timeout(Duration::from_secs(240), run)
        .await
        .expect("schemathesis ran over its budget")
        .unwrap()
        .expect("schemathesis starts");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('='))
        .unwrap_or("(no summary line)");
    let tested = stdout
        .lines()
        .find(|l| l.contains(" generated, "))
        .unwrap_or_default();
    eprintln!("schemathesis: {} / {summary}", tested.trim());
    assert!(
        out.status.success(),
        "schemathesis found problems:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // It really tested: cases generated, none failed.
    assert!(
        tested.contains(" passed") && !tested.starts_with("  0 generated"),
        "{stdout}"
    );
    assert!(std::fs::metadata(&report).is_ok_and(|m| m.len() > 0));
}
