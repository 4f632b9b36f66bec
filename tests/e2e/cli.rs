//! The CLI as a scheduler (JP1, cron) calls it.

use std::process::Command;

use crate::common::{BIN, ServeOptions, Server};

fn tasuki(server: &Server, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .env("TASUKI_SERVER", &server.url)
        .output()
        .expect("run tasuki")
}

#[tokio::test]
async fn run_wait_exits_with_the_container_exit_code_and_prints_its_output() {
    let d = tempfile::tempdir().unwrap();
    let server = Server::start(d.path(), ServeOptions::default());

    let out = tasuki(&server, &["run", "exit", "--param", "code=42", "--wait"]);
    assert_eq!(out.status.code(), Some(42));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "exiting with 42\n");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("status=failed exit_code=42"), "{stderr}");

    let out = tasuki(&server, &["run", "echo-both", "--wait"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "out-1\nerr-1\nout-2\nerr-2\n"
    );

    // Platform-side outcomes use the documented codes.
    let out = tasuki(&server, &["run", "missing-image", "--wait"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("image_not_found"));
    let out = tasuki(&server, &["run", "slow", "--wait"]);
    assert_eq!(out.status.code(), Some(124));
    let out = tasuki(&server, &["run", "oom", "--wait"]);
    assert_eq!(out.status.code(), Some(137));

    // Refused requests are 125 too, with the server's message.
    let out = tasuki(&server, &["run", "exit", "--wait"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("`code`"));
}

#[tokio::test]
async fn run_without_wait_prints_the_id_and_status_and_logs_read_it() {
    let d = tempfile::tempdir().unwrap();
    let server = Server::start(d.path(), ServeOptions::default());
    let out = tasuki(&server, &["run", "exit", "-p", "code=0"]);
    assert_eq!(out.status.code(), Some(0));
    let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_eq!(id.len(), 26, "{id}");

    let out = tasuki(&server, &["logs", &id, "--follow"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "exiting with 0\n");
    let out = tasuki(&server, &["status", &id]);
    assert_eq!(out.status.code(), Some(0));
    let run: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(run["status"], "succeeded");
}

#[test]
fn an_unreachable_server_is_a_platform_failure() {
    let out = Command::new(BIN)
        .args(["run", "hello", "--wait", "--server", "http://127.0.0.1:9"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach tasuki"));
}

#[test]
fn jobs_check_names_file_line_and_field() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("good.toml"), "image = \"x:1\"\n").unwrap();
    std::fs::write(
        d.path().join("bad.toml"),
        "image = \"x:1\"\n\n[resources]\nmemory = \"12 parsecs\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["jobs", "check"])
        .arg(d.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bad.toml:4: resources.memory"), "{stderr}");

    // serve refuses to start on it, saying which file and why.
    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--jobs-dir"])
        .arg(d.path())
        .arg("--data-dir")
        .arg(d.path().join("data"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad.toml:4"));

    // The shipped examples are valid.
    let jobs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("jobs");
    let out = Command::new(BIN)
        .args(["jobs", "check"])
        .arg(jobs)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
