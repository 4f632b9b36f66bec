//! The scope matrix: every endpoint by every kind of caller, lists filtered to what a
//! token may read, and a hidden run answered as an unknown one.

use serde_json::json;

use super::{CALLERS, Tokens, Who, call, start_run};
use crate::common::Server;

/// What a cell of the matrix expects.
#[derive(Debug, Clone, Copy)]
enum Want {
    Status(u16),
    /// Let through: anything but 401, 403 and 404 (the answer then depends on state
    /// an earlier cell changed).
    Through,
}

struct Row {
    method: &'static str,
    path: String,
    body: Option<&'static str>,
    /// By caller, in the order of `CALLERS`.
    want: [Want; 7],
}

fn row(method: &'static str, path: &str, body: Option<&'static str>, want: [Want; 7]) -> Row {
    Row {
        method,
        path: path.to_owned(),
        body,
        want,
    }
}

#[tokio::test]
async fn auth_every_endpoint_answers_each_caller_by_its_scopes() {
    let d = tempfile::tempdir().unwrap();
    let tokens = Tokens::create(d.path(), "[auth]\nopen_readyz = false\n");
    let server = Server::start(d.path(), tokens.options(d.path()));
    let log = server.process.log_text();
    assert!(
        log.contains("authentication on") && log.contains("api_tokens=4"),
        "{log}"
    );

    let ok = start_run(&server, &tokens.runner, "authz-main", json!({}), 60).await;
    assert_eq!(ok["status"], "succeeded", "{ok}");
    let failed = start_run(
        &server,
        &tokens.runner,
        "authz-main",
        json!({"code": "3"}),
        60,
    )
    .await;
    assert_eq!(failed["status"], "failed", "{failed}");
    let long = start_run(
        &server,
        &tokens.runner,
        "authz-main",
        json!({"seconds": "60"}),
        0,
    )
    .await;
    let other = start_run(&server, &tokens.admin, "authz-other", json!({}), 60).await;
    let [ok, failed, long, other] =
        [&ok, &failed, &long, &other].map(|r| r["id"].as_str().unwrap().to_owned());

    // One name per cell kind, so the table lines up.
    let [e401, e403, e404] = [401, 403, 404].map(Want::Status);
    let [s200, s202, s409] = [200, 202, 409].map(Want::Status);
    let thru = Want::Through;
    let run = |id: &str, rest: &str| format!("/v1/runs/{id}{rest}");
    let sched = |rest: &str| format!("/v1/jobs/authz-main/schedules/default/{rest}");
    let backfill = Some(r#"{"from":"2020-02-01T00:00:00Z","to":"2020-02-02T00:00:00Z"}"#);
    let held = Some(r#"{"worker_id":"nobody"}"#);
    let session = Some(r#"{"worker_id":"nobody","instance":"i"}"#);
    let renew = Some(r#"{"leases":[]}"#);
    #[rustfmt::skip]
    let matrix = [
        //  method  path                                    body        nobody wrong stranger reader runner admin worker
        row("POST", "/v1/jobs/authz-main/runs",             Some("{}"), [e401, e401, e404, e403, s202, s202, e403]),
        row("POST", "/v1/jobs/authz-other/runs",            Some("{}"), [e401, e401, e404, e403, e404, s202, e403]),
        row("GET",  "/v1/runs",                             None,       [e401, e401, s200, s200, s200, s200, e403]),
        row("GET",  &run(&ok, ""),                          None,       [e401, e401, e404, s200, s200, s200, e403]),
        row("GET",  &run(&other, ""),                       None,       [e401, e401, e404, s200, e404, s200, e403]),
        row("GET",  &run(&ok, "/logs"),                     None,       [e401, e401, e404, s200, s200, s200, e403]),
        row("GET",  &run(&ok, "/logs?follow=true"),         None,       [e401, e401, e404, s200, s200, s200, e403]),
        row("POST", &run(&other, "/cancel"),                None,       [e401, e401, e404, e403, e404, s409, e403]),
        row("POST", &run(&long, "/cancel"),                 None,       [e401, e401, e404, e403, s202, thru, e403]),
        row("POST", &run(&failed, "/retry"),                None,       [e401, e401, e404, e403, s202, thru, e403]),
        row("POST", &run(&ok, "/callbacks/redeliver"),      None,       [e401, e401, e404, e403, s409, s409, e403]),
        row("GET",  "/v1/jobs",                             None,       [e401, e401, s200, s200, s200, s200, e403]),
        row("GET",  "/v1/jobs/authz-main",                  None,       [e401, e401, e404, s200, s200, s200, e403]),
        row("GET",  "/v1/jobs/authz-other",                 None,       [e401, e401, e404, s200, e404, s200, e403]),
        row("GET",  "/v1/jobs/authz-main/schedules",        None,       [e401, e401, e404, s200, s200, s200, e403]),
        row("GET",  "/v1/jobs/authz-main/slots",            None,       [e401, e401, e404, s200, s200, s200, e403]),
        row("POST", &sched("pause"),                        None,       [e401, e401, e404, e403, e403, s200, e403]),
        row("POST", &sched("resume"),                       None,       [e401, e401, e404, e403, e403, s200, e403]),
        row("POST", &sched("backfill"),                     backfill,   [e401, e401, e404, e403, e403, s200, e403]),
        row("POST", "/v1/jobs/reload",                      None,       [e401, e401, e403, e403, e403, s200, e403]),
        row("POST", "/v1/worker/held",                      held,       [e401, e401, e403, e403, e403, e403, s200]),
        row("POST", "/v1/worker/heartbeats",                renew,      [e401, e401, e403, e403, e403, e403, s200]),
        row("POST", "/v1/worker/session/heartbeat",         session,    [e401, e401, e403, e403, e403, e403, thru]),
        row("GET",  "/healthz",                             None,       [s200, s200, s200, s200, s200, s200, s200]),
        // `[auth] open_readyz = false` here; /metrics names every job: `read:*` or admin.
        row("GET",  "/readyz",                              None,       [e401, e401, thru, thru, thru, thru, e403]),
        row("GET",  "/metrics",                             None,       [e401, e401, e403, s200, e403, s200, e403]),
    ];
    let mut failures = Vec::new();
    for row in &matrix {
        for (who, want) in CALLERS.iter().zip(row.want) {
            let (status, body, challenge) = call(
                &server,
                tokens.of(*who),
                row.method,
                &row.path,
                row.body,
                &[],
            )
            .await;
            let fine = match want {
                Want::Status(s) => status == s,
                Want::Through => ![401, 403, 404].contains(&status),
            };
            if !fine {
                failures.push(format!(
                    "{} {} as {who:?}: want {want:?}, got {status} {body}",
                    row.method, row.path
                ));
            }
            // Refusals are API error bodies; a 401 says how to authenticate.
            if [401, 403].contains(&status) {
                let code = body["error"]["code"].as_str().unwrap_or("");
                let expected = if status == 401 {
                    "unauthorized"
                } else {
                    "forbidden"
                };
                if code != expected || challenge.is_some() != (status == 401) {
                    failures.push(format!(
                        "{} {} as {who:?}: {status} {body} challenge {challenge:?}",
                        row.method, row.path
                    ));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} cell(s) wrong:\n{}",
        failures.len(),
        failures.join("\n")
    );

    // Lists hold only what the token may read.
    let listed = |who: Who, path: &'static str, key: &'static str, field: &'static str| {
        let server = &server;
        let token = tokens.of(who);
        async move {
            let (status, body, _) = call(server, token, "GET", path, None, &[]).await;
            assert_eq!(status, 200, "{path} as {who:?}: {body}");
            let mut names: Vec<String> = body[key]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v[field].as_str().unwrap().to_owned())
                .collect();
            names.sort();
            names.dedup();
            names
        }
    };
    let (none, main, both): (&[&str], &[&str], &[&str]) =
        (&[], &["authz-main"], &["authz-main", "authz-other"]);
    #[rustfmt::skip]
    let lists = [
        // who           path                        list    field   jobs seen
        (Who::Stranger, "/v1/runs",                  "runs", "job",  none),
        (Who::Runner,   "/v1/runs",                  "runs", "job",  main),
        (Who::Runner,   "/v1/runs?job=authz-other",  "runs", "job",  none),
        (Who::Reader,   "/v1/runs",                  "runs", "job",  both),
        (Who::Admin,    "/v1/runs",                  "runs", "job",  both),
        (Who::Stranger, "/v1/jobs",                  "jobs", "name", none),
        (Who::Runner,   "/v1/jobs",                  "jobs", "name", main),
        (Who::Reader,   "/v1/jobs",                  "jobs", "name", both),
    ];
    for (who, path, key, field, want) in lists {
        assert_eq!(
            listed(who, path, key, field).await,
            want,
            "{path} as {who:?}"
        );
    }
    let ids = listed(Who::Runner, "/v1/runs?limit=1000", "runs", "id").await;
    assert!(ids.contains(&ok) && !ids.contains(&other), "{ids:?}");

    // A run the token may not read is exactly an unknown one.
    let unknown_id = "01jzzzzzzzzzzzzzzzzzzzzzzz";
    let (s1, hidden, _) = call(
        &server,
        tokens.of(Who::Runner),
        "GET",
        &format!("/v1/runs/{other}"),
        None,
        &[],
    )
    .await;
    let (s2, unknown, _) = call(
        &server,
        tokens.of(Who::Runner),
        "GET",
        &format!("/v1/runs/{unknown_id}"),
        None,
        &[],
    )
    .await;
    assert_eq!((s1, s2), (404, 404));
    assert_eq!(
        hidden.to_string().replace(&other, "ID"),
        unknown.to_string().replace(unknown_id, "ID")
    );
}
