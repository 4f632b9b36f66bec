//! The CLI with and without `TASUKI_TOKEN`.

use std::process::Command;

use super::Tokens;
use crate::common::{BIN, Server};

/// The CLI against a server, as `TASUKI_TOKEN` (if given) says.
fn cli(server: &Server, token: Option<&str>, args: &[&str]) -> (Option<i32>, String, String) {
    let mut command = Command::new(BIN);
    command
        .args(args)
        .env("TASUKI_SERVER", &server.url)
        .env_remove("TASUKI_TOKEN");
    if let Some(t) = token {
        command.env("TASUKI_TOKEN", t);
    }
    let out = command.output().expect("run tasuki");
    let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
    (out.status.code(), text(out.stdout), text(out.stderr))
}

#[tokio::test]
async fn auth_the_cli_sends_tasuki_token_and_says_when_it_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let tokens = Tokens::create(d.path(), "");
    let server = Server::start(d.path(), tokens.options(d.path()));
    let runner = Some(tokens.runner.as_str());

    let (code, out, err) = cli(
        &server,
        runner,
        &["run", "authz-main", "-p", "code=7", "--wait"],
    );
    assert_eq!(code, Some(7), "{err}");
    assert_eq!(out, "hello from authz-main\n");
    let (code, out, err) = cli(&server, runner, &["run", "authz-main"]);
    assert_eq!(code, Some(0), "{err}");
    let id = out.trim().to_owned();
    let (code, out, _) = cli(&server, runner, &["status", &id]);
    assert_eq!(code, Some(0));
    assert!(out.contains("\"requested_by\": \"runner\""), "{out}");

    // Without a token, or with one that may not: exit 77 and a message that says why.
    let refusals: [(Option<&str>, &[&str], &str); 7] = [
        (
            None,
            &["run", "authz-main", "--wait"],
            "not authenticated (401)",
        ),
        (None, &["status", &id], "set TASUKI_TOKEN"),
        (Some("tsk_wrong"), &["logs", &id], "not authenticated (401)"),
        (
            Some(&tokens.reader),
            &["run", "authz-main", "--wait"],
            "not allowed (403)",
        ),
        (Some(&tokens.reader), &["cancel", &id], "not allowed (403)"),
        (runner, &["jobs", "reload"], "not allowed (403)"),
        (
            runner,
            &["schedules", "pause", "authz-main"],
            "not allowed (403)",
        ),
    ];
    for (token, args, needle) in refusals {
        let (code, _, err) = cli(&server, token, args);
        assert_eq!(code, Some(77), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {needle:?} missing: {err}");
    }
    // A run the token may not see is an unknown run to it.
    let (code, _, err) = cli(&server, Some(&tokens.stranger), &["status", &id]);
    assert_eq!(code, Some(125), "{err}");
    assert!(err.contains("no run"), "{err}");
    // With the right token each of these works.
    let admin = Some(tokens.admin.as_str());
    for (token, args) in [
        (runner, vec!["logs", id.as_str()]),
        (admin, vec!["jobs", "reload"]),
        (admin, vec!["schedules", "pause", "authz-main"]),
        (admin, vec!["schedules", "resume", "authz-main"]),
        (runner, vec!["schedules", "next", "authz-main"]),
    ] {
        let (code, _, err) = cli(&server, token, &args);
        assert_eq!(code, Some(0), "{args:?}: {err}");
    }
}
