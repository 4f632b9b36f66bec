//! Inbound webhooks end to end: the real `tasuki serve` taking signed deliveries and
//! running their jobs on real Docker. Signatures are made by independent
//! implementations (`openssl dgst -hmac` for GitHub, the Python `standardwebhooks`
//! package for Standard Webhooks), never by our own code.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{Value, json};

use crate::common::*;

const IMAGE_LINES: &str = "image = \"tasuki-example:latest\"\npull = \"never\"\nnetwork = \"none\"\nstop_grace = \"1s\"\n";

fn jobs_dir(dir: &Path, files: &[(&str, &str)]) -> PathBuf {
    let jobs = dir.join("jobs");
    std::fs::create_dir_all(&jobs).unwrap();
    for (name, body) in files {
        std::fs::write(
            jobs.join(format!("{name}.toml")),
            format!("{IMAGE_LINES}{body}"),
        )
        .unwrap();
    }
    jobs
}

/// `sha256=<hex>` as `openssl dgst -sha256 -hmac KEY` computes it.
fn openssl_github_signature(key: &str, body: &str) -> String {
    let mut child = Command::new("openssl")
        .args(["dgst", "-sha256", "-hmac", key])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("openssl");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let hex = text.trim().rsplit(' ').next().unwrap();
    assert_eq!(hex.len(), 64, "{text}");
    format!("sha256={hex}")
}

/// The `webhook-signature` header the Python `standardwebhooks` package makes.
fn python_standard_signature(secret: &str, id: &str, timestamp: i64, body: &str) -> String {
    let script = "import sys, datetime\n\
from standardwebhooks.webhooks import Webhook\n\
ts = datetime.datetime.fromtimestamp(int(sys.argv[3]), tz=datetime.timezone.utc)\n\
print(Webhook(sys.argv[1]).sign(sys.argv[2], ts, sys.argv[4]))\n";
    let out = Command::new("python3")
        .args(["-c", script, secret, id, &timestamp.to_string(), body])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "standardwebhooks (pip install standardwebhooks): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

async fn deliver(api: &Api, job: &str, body: &str, headers: &[(&str, &str)]) -> Answer {
    let mut request = api
        .http
        .post(format!("{}/v1/hooks/{job}?wait=60", api.base))
        .header("content-type", "application/json")
        .body(body.to_owned());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.expect("POST hook");
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Answer { status, body }
}

async fn run_ids(api: &Api, job: &str) -> Vec<String> {
    let (status, body) = api.get(&format!("/v1/runs?job={job}&limit=1000")).await;
    assert_eq!(status, 200, "{body}");
    body["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect()
}

fn unauthorized() -> Value {
    json!({"error": {"code": "unauthorized", "message": "webhook signature missing or invalid"}})
}

#[tokio::test(flavor = "multi_thread")]
async fn github_push_runs_the_job_with_its_ref_and_replays_return_the_same_run() {
    let dir = tempfile::tempdir().unwrap();
    let jobs = jobs_dir(
        dir.path(),
        &[
            (
                "push",
                "command = [\"sh\", \"-c\", \"echo ref=[$1] trigger=$TASUKI_TRIGGER\", \"sh\", \"{{params.ref}}\"]\n\
                 [params.ref]\nrequired = true\npattern = \"refs/[a-z/]+\"\n\
                 [webhook]\nsignature = \"github\"\nsecrets_from_env = [\"E2E_HOOK_NEW\", \"E2E_HOOK_OLD\"]\n\
                 params_from = { ref = \"/ref\" }\n",
            ),
            ("plain", "command = [\"true\"]\n"),
        ],
    );
    let server = Server::start(
        dir.path(),
        ServeOptions {
            jobs_dir: jobs,
            env: vec![
                ("E2E_HOOK_NEW".into(), "rotated-in".into()),
                ("E2E_HOOK_OLD".into(), "It's a Secret to Everybody".into()),
            ],
            ..Default::default()
        },
    );
    let api = server.client();
    let body = r#"{"ref":"refs/heads/main","repository":{"full_name":"o/r"}}"#;
    // Signed with the older of the two secrets, as during a rotation.
    let signature = openssl_github_signature("It's a Secret to Everybody", body);
    let delivery = unique("gh-delivery");
    let headers = [
        ("x-github-event", "push"),
        ("x-github-delivery", delivery.as_str()),
        ("x-hub-signature-256", signature.as_str()),
    ];

    let first = deliver(&api, "push", body, &headers).await;
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(first.body["status"], "succeeded", "{}", first.body);
    assert_eq!(first.body["trigger"], json!({"type": "webhook"}));
    assert_eq!(first.body["params"], json!({"ref": "refs/heads/main"}));
    let id = first.body["id"].as_str().unwrap().to_owned();
    let log = String::from_utf8(api.logs(&id).await).unwrap();
    assert_eq!(log, "ref=[refs/heads/main] trigger=webhook\n");

    // GitHub redelivers with the same id: the first run, not a second.
    let again = deliver(&api, "push", body, &headers).await;
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(again.body["id"], id.as_str());
    assert_eq!(run_ids(&api, "push").await, vec![id.clone()]);

    // The same id with another (validly signed) body is refused.
    let other = r#"{"ref":"refs/heads/other"}"#;
    let other_sig = openssl_github_signature("rotated-in", other);
    let reused = deliver(
        &api,
        "push",
        other,
        &[
            ("x-github-delivery", delivery.as_str()),
            ("x-hub-signature-256", other_sig.as_str()),
        ],
    )
    .await;
    assert_eq!(reused.status, 422, "{}", reused.body);
    assert_eq!(reused.body["error"]["code"], "idempotency_key_reused");

    // A wrong or missing signature: 401, the same generic answer, and no run.
    let before = run_ids(&api, "push").await;
    let forged = openssl_github_signature("guessed", body);
    for headers in [
        vec![("x-hub-signature-256", forged.as_str())],
        vec![("x-hub-signature-256", "sha256=00")],
        vec![],
    ] {
        let refused = deliver(&api, "push", body, &headers).await;
        assert_eq!(refused.status, 401, "{}", refused.body);
        assert_eq!(refused.body, unauthorized());
    }
    assert_eq!(run_ids(&api, "push").await, before);
    assert!(
        server
            .process
            .log_text()
            .contains("no signature matches any configured secret"),
        "the reason is logged"
    );
    // The run it started is in the audit log, by the webhook, not by a token.
    let audit = server.process.log_text();
    let started = audit
        .lines()
        .find(|l| l.contains("tasuki::audit") && l.contains(&id) && l.contains("run.start"))
        .unwrap_or_else(|| panic!("no audit line for run {id}:\n{audit}"));
    assert!(started.contains("actor=webhook"), "{started}");
    assert!(started.contains("signed webhook delivery"), "{started}");

    // A value the job's pattern refuses is 422, like any run param.
    let bad = r#"{"ref":"tags/v1"}"#;
    let bad_sig = openssl_github_signature("rotated-in", bad);
    let invalid = deliver(
        &api,
        "push",
        bad,
        &[("x-hub-signature-256", bad_sig.as_str())],
    )
    .await;
    assert_eq!(invalid.status, 422, "{}", invalid.body);
    assert_eq!(run_ids(&api, "push").await, before);

    // Jobs without [webhook], and unknown jobs, are not there.
    for job in ["plain", "nope"] {
        let missing = deliver(&api, job, body, &headers).await;
        assert_eq!(missing.status, 404, "{job}: {}", missing.body);
    }
    // And the secrets never show in the job list.
    let (_, listed) = api.get("/v1/jobs").await;
    assert!(!listed.to_string().contains("Secret to Everybody"));
}

#[tokio::test(flavor = "multi_thread")]
async fn standard_webhooks_delivery_runs_and_a_stale_one_is_refused() {
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let dir = tempfile::tempdir().unwrap();
    let jobs = jobs_dir(
        dir.path(),
        &[(
            "alert",
            "command = [\"sh\", \"-c\", \"echo alert=$ALERT\"]\n\
             [env]\nALERT = \"{{params.alert}}\"\n\
             [params.alert]\nrequired = true\n\
             [webhook]\nsignature = \"standard\"\nsecrets_from_env = [\"E2E_STD_SECRET\"]\n\
             tolerance = \"2m\"\n\
             params_from = { alert = \"/alerts/0/labels/alertname\" }\n",
        )],
    );
    let server = Server::start(
        dir.path(),
        ServeOptions {
            jobs_dir: jobs,
            env: vec![("E2E_STD_SECRET".into(), SECRET.into())],
            ..Default::default()
        },
    );
    let api = server.client();
    let body = r#"{"status":"firing","alerts":[{"labels":{"alertname":"DiskFull"}}]}"#;
    let id = unique("msg");
    let now = unix_now();
    let signature = python_standard_signature(SECRET, &id, now, body);
    let ts = now.to_string();
    let answer = deliver(
        &api,
        "alert",
        body,
        &[
            ("webhook-id", id.as_str()),
            ("webhook-timestamp", ts.as_str()),
            ("webhook-signature", signature.as_str()),
        ],
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.body["status"], "succeeded", "{}", answer.body);
    let run = answer.body["id"].as_str().unwrap().to_owned();
    assert_eq!(
        String::from_utf8(api.logs(&run).await).unwrap(),
        "alert=DiskFull\n"
    );

    // Correctly signed, but from beyond the 2 minute tolerance.
    let before = run_ids(&api, "alert").await;
    let stale_id = unique("msg");
    let stale_ts = now - 600;
    let stale_sig = python_standard_signature(SECRET, &stale_id, stale_ts, body);
    let stale_ts = stale_ts.to_string();
    let refused = deliver(
        &api,
        "alert",
        body,
        &[
            ("webhook-id", stale_id.as_str()),
            ("webhook-timestamp", stale_ts.as_str()),
            ("webhook-signature", stale_sig.as_str()),
        ],
    )
    .await;
    assert_eq!(refused.status, 401, "{}", refused.body);
    assert_eq!(refused.body, unauthorized());
    assert_eq!(run_ids(&api, "alert").await, before);
}
