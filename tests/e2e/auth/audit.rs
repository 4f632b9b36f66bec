//! What belongs to a token: its idempotency keys, the runs it asked for, and its lines
//! in the audit log.

use std::time::{Duration, Instant};

use super::{Tokens, call};
use crate::common::Server;

#[tokio::test]
async fn auth_keys_runs_and_audit_lines_belong_to_the_token() {
    let d = tempfile::tempdir().unwrap();
    let tokens = Tokens::create(d.path(), "");
    let server = Server::start(d.path(), tokens.options(d.path()));
    let post = |token: String| {
        let server = &server;
        async move {
            let key = [("Idempotency-Key", "nightly-2026-11-26")];
            let path = "/v1/jobs/authz-main/runs";
            // Long enough to be cancelled below while it runs.
            let body = Some(r#"{"params":{"seconds":"30"}}"#);
            let (status, run, _) = call(server, Some(&token), "POST", path, body, &key).await;
            assert_eq!(status, 202, "{run}");
            run
        }
    };
    // One key, two tokens: two runs; the same token again: its own first run.
    let by_runner = post(tokens.runner.clone()).await;
    let by_admin = post(tokens.admin.clone()).await;
    assert_ne!(by_runner["id"], by_admin["id"]);
    assert_eq!(post(tokens.runner.clone()).await["id"], by_runner["id"]);
    assert_eq!(post(tokens.admin.clone()).await["id"], by_admin["id"]);
    // Who asked is stored with the run.
    assert_eq!(by_runner["requested_by"], "runner", "{by_runner}");
    assert_eq!(by_admin["requested_by"], "admin", "{by_admin}");
    let id = by_runner["id"].as_str().unwrap();
    let (_, run, _) = call(
        &server,
        Some(&tokens.reader),
        "GET",
        &format!("/v1/runs/{id}"),
        None,
        &[],
    )
    .await;
    assert_eq!(run["requested_by"], "runner", "{run}");

    // Actions and refusals reach the audit log, with the token's name.
    let cancel = format!("/v1/runs/{id}/cancel");
    assert_eq!(
        call(&server, Some(&tokens.reader), "POST", &cancel, None, &[])
            .await
            .0,
        403
    );
    assert_eq!(
        call(&server, Some(&tokens.runner), "POST", &cancel, None, &[])
            .await
            .0,
        202
    );
    let other = format!("/v1/runs/{}/cancel", by_admin["id"].as_str().unwrap());
    assert_eq!(
        call(&server, Some(&tokens.admin), "POST", &other, None, &[])
            .await
            .0,
        202
    );
    assert_eq!(
        call(&server, None, "GET", "/v1/runs", None, &[]).await.0,
        401
    );
    let pause = "/v1/jobs/authz-main/schedules/default/pause";
    let note = Some(r#"{"note":"db maintenance"}"#);
    assert_eq!(
        call(&server, Some(&tokens.admin), "POST", pause, note, &[])
            .await
            .0,
        200
    );
    assert_eq!(
        call(
            &server,
            Some(&tokens.admin),
            "POST",
            "/v1/jobs/reload",
            None,
            &[]
        )
        .await
        .0,
        200
    );
    let id_field = format!("run_id={id}");
    let expected: [&[&str]; 7] = [
        &[
            "actor=runner",
            "action=run.start",
            "outcome=\"done\"",
            "job=authz-main",
            &id_field,
        ],
        &[
            "actor=runner",
            "action=run.start",
            "detail=idempotent repeat",
        ],
        &[
            "actor=reader",
            "action=run.cancel",
            "outcome=\"refused\"",
            "status=403",
            &id_field,
        ],
        &[
            "actor=runner",
            "action=run.cancel",
            "outcome=\"done\"",
            &id_field,
        ],
        &[
            "actor=-",
            "action=request",
            "status=401",
            "request=GET /v1/runs",
        ],
        &[
            "actor=admin",
            "action=schedule.pause",
            "schedule=default",
            "detail=note: db maintenance",
        ],
        &["actor=admin", "action=jobs.reload", "outcome=\"done\""],
    ];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = server.process.log_text();
        let audit: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("tasuki::audit"))
            .collect();
        let missing: Vec<&&[&str]> = expected
            .iter()
            .filter(|fields| !audit.iter().any(|l| fields.iter().all(|f| l.contains(f))))
            .collect();
        // Every line the request logs, not only the audit's, names the token.
        let spanned = log
            .lines()
            .any(|l| l.contains("token=runner") && l.contains("run accepted"));
        if missing.is_empty() && spanned {
            assert!(
                !log.contains(&tokens.runner) && !log.contains(&tokens.admin),
                "a token's value was logged"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "audit lines missing: {missing:?} (spanned: {spanned})\n{}",
            audit.join("\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
