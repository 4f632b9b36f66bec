//! Job secrets (`{ from_env }`, `{ from_file }`) against the real binary: the container
//! gets the values, and nothing else does: not the store's files, not an API answer,
//! not a log line of `serve` or the worker (both at `trace`). A secret that cannot be
//! read fails the run, naming the variable.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::common::{
    Api, QueueGuard, ServeOptions, Server, TOKEN, WorkerSpec, assert_no_containers_left,
    start_worker_with, unique,
};

/// Two secrets no test output could contain by chance.
struct Values {
    from_env: String,
    from_file: String,
}

impl Values {
    fn new() -> Self {
        Values {
            from_env: unique("env-secret-zq7"),
            from_file: unique("file-secret-xk4"),
        }
    }

    fn all(&self) -> [&str; 2] {
        [&self.from_env, &self.from_file]
    }
}

fn sha256_hex(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The jobs: `secret-check` exits 0 only when both variables hold the expected values
/// (compared by digest, so the values are in no job file and no stored spec), and
/// `secret-missing` names a variable `serve` does not have.
fn write_jobs(dir: &Path, values: &Values) -> (PathBuf, String) {
    let jobs = dir.join("jobs");
    std::fs::create_dir_all(&jobs).unwrap();
    let file = dir.join("api-key");
    // A trailing newline, as `echo value > file` leaves it: not part of the value.
    std::fs::write(&file, format!("{}\n", values.from_file)).unwrap();
    let check = format!(
        r#"image = "tasuki-example:latest"
pull = "never"
network = "none"
command = ["sh", "-c", "test \"$(printf %s \"$DB_PASSWORD\" | sha256sum)\" = \"{db}  -\" && test \"$(printf %s \"$API_KEY\" | sha256sum)\" = \"{key}  -\" && test \"$PLAIN\" = plain && echo secrets-ok"]
[env]
PLAIN = "plain"
DB_PASSWORD = {{ from_env = "E2E_DB_PASSWORD" }}
API_KEY = {{ from_file = "{file}" }}
"#,
        db = sha256_hex(&values.from_env),
        key = sha256_hex(&values.from_file),
        file = file.display(),
    );
    std::fs::write(jobs.join("secret-check.toml"), check).unwrap();
    let missing_var = unique("E2E_NOT_SET").replace('-', "_").to_ascii_uppercase();
    let missing = format!(
        r#"image = "tasuki-example:latest"
pull = "never"
network = "none"
command = ["sh", "-c", "echo should-not-run"]
[env]
TOKEN = {{ from_env = "{missing_var}" }}
"#
    );
    std::fs::write(jobs.join("secret-missing.toml"), missing).unwrap();
    (jobs, missing_var)
}

/// Fail if any of `values` occurs in `bytes`.
fn assert_absent(bytes: &[u8], values: &[&str], what: &str) {
    for value in values {
        let found = bytes.windows(value.len()).any(|w| w == value.as_bytes());
        assert!(!found, "a secret value was found in {what}");
    }
}

/// Every file under `dir` (the SQLite database, its WAL and shared memory, the logs).
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files
}

/// Run both jobs, then look for the values everywhere they must not be.
async fn run_and_search(
    api: &Api,
    dir: &Path,
    values: &Values,
    missing_var: &str,
    process_logs: &dyn Fn() -> Vec<(String, String)>,
) {
    let ok = api.run_and_wait("secret-check", json!({})).await;
    let ok_id = ok["id"].as_str().unwrap().to_owned();
    assert_eq!(ok["status"], "succeeded", "{ok}");
    assert_eq!(
        String::from_utf8_lossy(&api.logs(&ok_id).await),
        "secrets-ok\n"
    );

    let failed = api.run_and_wait("secret-missing", json!({})).await;
    let failed_id = failed["id"].as_str().unwrap().to_owned();
    assert_eq!(failed["status"], "failed", "{failed}");
    assert_eq!(failed["reason_code"], "secret_unavailable", "{failed}");
    assert_eq!(
        failed["reason"],
        format!("secret_unavailable: env.TOKEN: environment variable {missing_var} is not set"),
        "{failed}"
    );
    assert_eq!(failed["exit_code"], Value::Null, "{failed}");
    assert_eq!(failed["attempts"][0]["reason_code"], "secret_unavailable");
    assert!(api.logs(&failed_id).await.is_empty(), "no container ran");

    let secrets = values.all();
    let mut answers = Vec::new();
    for path in [
        format!("/v1/runs/{ok_id}"),
        format!("/v1/runs/{failed_id}"),
        "/v1/runs".to_owned(),
        "/v1/runs?job=secret-check".to_owned(),
        "/v1/jobs".to_owned(),
        "/v1/jobs/secret-check".to_owned(),
    ] {
        let (status, body) = api.get(&path).await;
        assert_eq!(status, 200, "{path}: {body}");
        answers.push((path, body.to_string()));
    }
    answers.push((
        "logs".into(),
        String::from_utf8_lossy(&api.logs(&ok_id).await).into(),
    ));
    for (path, body) in &answers {
        assert_absent(body.as_bytes(), &secrets, &format!("GET {path}"));
    }

    let data = dir.join("data");
    let files = files_under(&data);
    assert!(
        files.iter().any(|f| f.ends_with("tasuki.db")),
        "no database in {files:?}"
    );
    for file in files {
        let bytes = std::fs::read(&file).unwrap();
        assert_absent(&bytes, &secrets, &file.display().to_string());
    }
    // The stored spec keeps the reference.
    let mut db = std::fs::read(data.join("tasuki.db")).unwrap();
    db.extend(std::fs::read(data.join("tasuki.db-wal")).unwrap_or_default());
    let reference = br#""DB_PASSWORD":{"from_env":"E2E_DB_PASSWORD"}"#;
    assert!(
        db.windows(reference.len()).any(|w| w == reference),
        "the stored spec has no reference to the variable"
    );

    for (name, log) in process_logs() {
        assert!(!log.is_empty(), "{name} wrote no log");
        assert_absent(log.as_bytes(), &secrets, &format!("{name}'s log"));
    }
}

#[tokio::test]
async fn secrets_reach_the_container_and_nowhere_else_embedded() {
    let d = tempfile::tempdir().unwrap();
    let values = Values::new();
    let (jobs_dir, missing_var) = write_jobs(d.path(), &values);
    let server = Server::start(
        d.path(),
        ServeOptions {
            jobs_dir,
            env: vec![
                ("E2E_DB_PASSWORD".into(), values.from_env.clone()),
                // Everything that logs, at its most talkative.
                ("TASUKI_LOG".into(), "trace".into()),
            ],
            ..ServeOptions::default()
        },
    );
    let api = server.client();
    run_and_search(&api, d.path(), &values, &missing_var, &|| {
        vec![("serve".to_owned(), server.process.log_text())]
    })
    .await;
    assert!(
        server
            .process
            .log_text()
            .contains("a secret of the run cannot be read")
    );
    assert_no_containers_left(&server.process.worker_id).await;
}

#[tokio::test]
async fn secrets_reach_a_remote_worker_in_the_claim_answer_only() {
    let d = tempfile::tempdir().unwrap();
    let queue = unique("tasuki-test");
    let _guard = QueueGuard(queue.clone());
    let values = Values::new();
    let (jobs_dir, missing_var) = write_jobs(d.path(), &values);
    let server = Server::start(
        d.path(),
        ServeOptions {
            jobs_dir,
            amqp_queue: Some(queue.clone()),
            worker_token: Some(TOKEN.to_owned()),
            env: vec![
                ("E2E_DB_PASSWORD".into(), values.from_env.clone()),
                ("TASUKI_LOG".into(), "trace".into()),
            ],
            ..ServeOptions::default()
        },
    );
    // The worker has neither the variable nor the file's directory in its config: the
    // values come with the claim.
    let worker = start_worker_with(
        d.path(),
        &server,
        &queue,
        TOKEN,
        WorkerSpec {
            env: vec![("TASUKI_LOG".into(), "trace".into())],
            ..WorkerSpec::default()
        },
    );
    let api = server.client();
    run_and_search(&api, d.path(), &values, &missing_var, &|| {
        vec![
            ("serve".to_owned(), server.process.log_text()),
            ("the worker".to_owned(), worker.log_text()),
        ]
    })
    .await;
    // The failed run never reached the worker as a claim: it dropped the delivery.
    assert!(worker.log_text().contains("duplicate delivery dropped"));
    assert_no_containers_left(&worker.worker_id).await;
}
