//! Start-up: the loopback rule without API tokens, bad token entries, and worker tokens
//! (two of a rotation, with real workers; an API token is none).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;

use super::{Tokens, call, jobs_dir, start_run};
use crate::common::{BIN, QueueGuard, ServeOptions, Server, WorkerSpec, start_worker_with, unique};

/// `tasuki serve` that must exit by itself: its status and stderr.
async fn serve_exits(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let log = dir.join(format!("{}.log", unique("serve-exit")));
    let mut child = Command::new(BIN)
        .arg("serve")
        .args(args)
        .args(["--data-dir", &dir.join("data").display().to_string()])
        .args(["--jobs-dir", &jobs_dir(dir).display().to_string()])
        .env_remove("TASUKI_CONFIG")
        .env_remove("TASUKI_TOKENS")
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawn tasuki serve");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "tasuki serve {args:?} kept running:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    (
        status.code(),
        std::fs::read_to_string(&log).unwrap_or_default(),
    )
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

#[tokio::test]
async fn auth_without_tokens_serve_stays_on_loopback_unless_told_otherwise() {
    let d = tempfile::tempdir().unwrap();
    // Everyone on the network could run every job: refused, saying what to do instead.
    let listen = format!("0.0.0.0:{}", free_port());
    let (code, stderr) = serve_exits(d.path(), &["--listen", &listen], &[]).await;
    assert_ne!(code, Some(0), "{stderr}");
    for needle in [
        &format!("refusing to listen on {listen} without API tokens"),
        "[[tokens]]",
        "--insecure-no-auth",
    ] {
        assert!(stderr.contains(needle), "{needle:?} missing:\n{stderr}");
    }
    // A bad token entry stops start-up, naming the token and the key.
    let config = d.path().join("bad.toml");
    std::fs::write(
        &config,
        "[[tokens]]\nname = \"ci\"\nsha256 = \"abc\"\nscopes = [\"read:*\"]\n",
    )
    .unwrap();
    let path = config.display().to_string();
    let (code, stderr) = serve_exits(
        d.path(),
        &["--listen", "127.0.0.1:0"],
        &[("TASUKI_CONFIG", &path)],
    )
    .await;
    assert_ne!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains(r#"[[tokens]] "ci": `sha256`: invalid sha256"#),
        "{stderr}"
    );
    let (code, stderr) = serve_exits(
        d.path(),
        &["--listen", "127.0.0.1:0"],
        &[(
            "TASUKI_TOKENS",
            &format!(
                r#"[{{name = "ci", sha256 = "{}", scopes = ["write:*"]}}]"#,
                "0".repeat(64)
            ),
        )],
    )
    .await;
    assert_ne!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains(r#"[[tokens]] "ci": `scopes`: invalid scope "write:*""#),
        "{stderr}"
    );

    // On loopback it is open, and says so.
    let open = Server::start(
        d.path(),
        ServeOptions {
            jobs_dir: jobs_dir(d.path()),
            ..ServeOptions::default()
        },
    );
    assert_eq!(call(&open, None, "GET", "/v1/runs", None, &[]).await.0, 200);
    assert!(
        open.process
            .log_text()
            .contains("open to every caller, so it listens on loopback only")
    );
    drop(open);
    // Told so, it serves every address openly.
    let d2 = tempfile::tempdir().unwrap();
    let insecure = Server::start(
        d2.path(),
        ServeOptions {
            jobs_dir: jobs_dir(d2.path()),
            listen_host: Some("0.0.0.0".to_owned()),
            extra_args: vec!["--insecure-no-auth".to_owned()],
            ..ServeOptions::default()
        },
    );
    assert_eq!(
        call(&insecure, None, "GET", "/v1/runs", None, &[]).await.0,
        200
    );
    assert!(
        insecure
            .process
            .log_text()
            .contains("--insecure-no-auth: anyone who can reach this address")
    );
    // With tokens, any address is fine: it is the tokens that guard it.
    let d3 = tempfile::tempdir().unwrap();
    let tokens = Tokens::create(d3.path(), "");
    let guarded = Server::start(
        d3.path(),
        ServeOptions {
            listen_host: Some("0.0.0.0".to_owned()),
            ..tokens.options(d3.path())
        },
    );
    assert_eq!(
        call(&guarded, None, "GET", "/v1/runs", None, &[]).await.0,
        401
    );
    assert_eq!(
        call(&guarded, Some(&tokens.reader), "GET", "/v1/runs", None, &[])
            .await
            .0,
        200
    );
}

#[tokio::test]
async fn auth_two_worker_tokens_both_run_jobs_and_an_api_token_is_no_worker_token() {
    let d = tempfile::tempdir().unwrap();
    let queue = unique("tasuki-auth");
    let _guard = QueueGuard(queue.clone());
    let tokens = Tokens::create(d.path(), "");
    let server = Server::start(
        d.path(),
        ServeOptions {
            amqp_queue: Some(queue.clone()),
            ..tokens.options(d.path())
        },
    );
    // The tokens of a rotation, one after the other: each worker runs a job.
    for (token, code) in [(&tokens.worker_old, "4"), (&tokens.worker_new, "5")] {
        let id = unique("auth-worker");
        let spec = WorkerSpec {
            worker_id: Some(id.clone()),
            concurrency: 1,
            ..WorkerSpec::default()
        };
        let mut worker = start_worker_with(d.path(), &server, &queue, token, spec);
        let run = start_run(
            &server,
            &tokens.runner,
            "authz-main",
            json!({"code": code}),
            60,
        )
        .await;
        assert_eq!(run["status"], "failed", "{run}");
        assert_eq!(run["exit_code"], code.parse::<i64>().unwrap(), "{run}");
        assert_eq!(run["attempts"][0]["worker_id"], id.as_str(), "{run}");
        worker.signal("TERM");
        let status = worker.wait_exit(Duration::from_secs(30)).await;
        assert!(status.success(), "{status}: {}", worker.log_text());
    }
    // An API token (even admin) does not make a worker; nor does a wrong token.
    for (token, status) in [(&tokens.admin, "403"), (&"tskw_wrong".to_owned(), "401")] {
        let spec = WorkerSpec {
            concurrency: 1,
            ..WorkerSpec::default()
        };
        let mut worker = start_worker_with(d.path(), &server, &queue, token, spec);
        let exit = worker.wait_exit(Duration::from_secs(30)).await;
        assert!(
            !exit.success(),
            "a worker ran with {status}: {}",
            worker.log_text()
        );
        assert!(worker.log_text().contains(status), "{}", worker.log_text());
    }
}
