//! Completion callbacks end to end: the real `tasuki serve` and Docker, a receiver on
//! 127.0.0.1 (allowed with `--callback-allow`), and every signature verified by an
//! independent Standard Webhooks implementation (the Python `standardwebhooks` package),
//! not by the project's own signer. Refused targets are only checked for the refusal:
//! nothing is ever sent to them.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use serde_json::{Value, json};

use crate::common::*;

const SECRET_A: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const SECRET_B: &str = "whsec_c2Vjb25kLXNlY3JldC1mb3Itcm90YXRpb24=";

#[derive(Clone, Debug)]
pub(crate) struct Delivery {
    pub(crate) id: String,
    timestamp: String,
    signature: String,
    pub(crate) body: String,
}

#[derive(Clone, Default)]
pub(crate) struct Receiver {
    /// Statuses to answer, in order; 200 once they run out.
    answers: Arc<Mutex<VecDeque<u16>>>,
    pub(crate) got: Arc<Mutex<Vec<Delivery>>>,
}

async fn hook(State(r): State<Receiver>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let h = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    r.got.lock().unwrap().push(Delivery {
        id: h("webhook-id"),
        timestamp: h("webhook-timestamp"),
        signature: h("webhook-signature"),
        body: String::from_utf8_lossy(&body).into_owned(),
    });
    let status = r.answers.lock().unwrap().pop_front().unwrap_or(200);
    StatusCode::from_u16(status).unwrap()
}

impl Receiver {
    /// Serve on `listener` until the test ends.
    fn serve(&self, listener: tokio::net::TcpListener) {
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(hook))
            .with_state(self.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
    }

    fn deliveries(&self) -> Vec<Delivery> {
        self.got.lock().unwrap().clone()
    }

    async fn wait_for(&self, n: usize, within: Duration) -> Vec<Delivery> {
        let deadline = Instant::now() + within;
        loop {
            let got = self.deliveries();
            if got.len() >= n {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "{} deliveries after {within:?}, wanted {n}: {got:?}",
                got.len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Verify a delivery with the Python `standardwebhooks` library and `secret`.
fn verify_independently(d: &Delivery, secret: &str) {
    let (ok, err) = python_verifies(d, secret);
    assert!(ok, "standardwebhooks refused the delivery: {err}");
}

/// Whether the Python `standardwebhooks` library accepts the delivery with `secret`,
/// and what it said if not.
fn python_verifies(d: &Delivery, secret: &str) -> (bool, String) {
    let script = r#"
import json, sys
from standardwebhooks.webhooks import Webhook
req = json.load(sys.stdin)
Webhook(req["secret"]).verify(req["body"], {
    "webhook-id": req["id"],
    "webhook-timestamp": req["timestamp"],
    "webhook-signature": req["signature"],
})
print("verified")
"#;
    let input = json!({
        "secret": secret, "id": d.id, "timestamp": d.timestamp,
        "signature": d.signature, "body": d.body,
    });
    let mut child = std::process::Command::new("python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("verified"),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn jobs_dir(dir: &Path, callback_port: Option<u16>) -> PathBuf {
    let jobs = dir.join("jobs");
    std::fs::create_dir_all(&jobs).unwrap();
    let exit = std::fs::read_to_string(test_jobs_dir().join("exit.toml")).unwrap();
    std::fs::write(jobs.join("exit.toml"), &exit).unwrap();
    if let Some(port) = callback_port {
        std::fs::write(
            jobs.join("announced.toml"),
            format!("{exit}\n[callback]\nurl = \"http://127.0.0.1:{port}/hook\"\n"),
        )
        .unwrap();
    }
    jobs
}

fn options(jobs_dir: PathBuf, allow: bool) -> ServeOptions {
    let mut env = vec![(
        "TASUKI_CALLBACK_SECRETS".to_owned(),
        format!("{SECRET_A},{SECRET_B}"),
    )];
    if allow {
        env.push((
            "TASUKI_CALLBACK_ALLOW".to_owned(),
            "127.0.0.1/32".to_owned(),
        ));
    }
    ServeOptions {
        jobs_dir,
        env,
        ..ServeOptions::default()
    }
}

pub(crate) async fn receiver(answers: &[u16]) -> (Receiver, u16) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let r = Receiver::default();
    r.answers.lock().unwrap().extend(answers.iter().copied());
    r.serve(listener);
    (r, port)
}

fn with_callback(code: &str, port: u16) -> String {
    json!({
        "params": {"code": code},
        "callback": {"url": format!("http://127.0.0.1:{port}/hook"), "events": ["finished"]},
    })
    .to_string()
}

#[tokio::test]
async fn a_finished_run_is_delivered_signed_retried_with_the_same_id_and_redelivered() {
    let dir = tempfile::tempdir().unwrap();
    let (rx, port) = receiver(&[500]).await;
    let server = Server::start(dir.path(), options(jobs_dir(dir.path(), None), true));
    let api = server.client();
    let answer = api.post_run("exit", &with_callback("3", port), "").await;
    assert_eq!(answer.status, 202, "{}", answer.body);
    let id = answer.body["id"].as_str().unwrap().to_owned();
    api.wait_final(&id, Duration::from_secs(60)).await;

    let got = rx.wait_for(2, Duration::from_secs(30)).await;
    assert_eq!(got[0].id, got[1].id, "a retry keeps its webhook-id");
    assert!(got[0].id.starts_with("msg_"));
    for d in &got {
        // Signed with both secrets: a receiver holding either one accepts it.
        assert_eq!(d.signature.split(' ').count(), 2, "{}", d.signature);
        verify_independently(d, SECRET_A);
        verify_independently(d, SECRET_B);
        // The check is not vacuous: another secret, or a changed body, is refused.
        assert!(!python_verifies(d, "whsec_d3Jvbmcta2V5").0);
        let tampered = Delivery {
            body: d.body.replace("failed", "succeeded"),
            ..d.clone()
        };
        assert!(!python_verifies(&tampered, SECRET_A).0);
        let body: Value = serde_json::from_str(&d.body).unwrap();
        assert_eq!(body["type"], "run.finished");
        assert_eq!(body["data"]["id"], id.as_str());
        assert_eq!(body["data"]["status"], "failed");
        assert_eq!(body["data"]["exit_code"], 3);
        assert!(body["timestamp"].as_str().unwrap().ends_with('Z'));
    }
    let run = api
        .wait_until(&id, Duration::from_secs(10), "callback recorded", |r| {
            !r["callbacks"][0]["delivered_at"].is_null()
        })
        .await;
    let cb = &run["callbacks"][0];
    assert_eq!(cb["tries"], 2);
    assert_eq!(cb["last_status"], 200);
    assert_eq!(cb["id"], got[0].id.as_str());
    assert_eq!(cb["gave_up"], false);

    // A person's redelivery: sent again with the same id.
    let again = api
        .post(&format!("/v1/runs/{id}/callbacks/redeliver"))
        .await;
    assert_eq!(again.status, 202, "{}", again.body);
    let got = rx.wait_for(3, Duration::from_secs(10)).await;
    assert_eq!(got[2].id, got[0].id);
    verify_independently(&got[2], SECRET_A);

    // No callback, or not a run at all.
    let plain = api.run_and_wait("exit", json!({"code": "0"})).await;
    let plain_id = plain["id"].as_str().unwrap();
    let none = api
        .post(&format!("/v1/runs/{plain_id}/callbacks/redeliver"))
        .await;
    assert_eq!(none.status, 409, "{}", none.body);
    assert_eq!(none.body["error"]["code"], "no_callback");
    let unknown = api
        .post("/v1/runs/01jd0000000000000000000000/callbacks/redeliver")
        .await;
    assert_eq!(unknown.status, 404, "{}", unknown.body);
}

#[tokio::test]
async fn a_410_stops_the_deliveries() {
    let dir = tempfile::tempdir().unwrap();
    let (rx, port) = receiver(&[410]).await;
    let server = Server::start(dir.path(), options(jobs_dir(dir.path(), None), true));
    let api = server.client();
    let answer = api.post_run("exit", &with_callback("0", port), "").await;
    let id = answer.body["id"].as_str().unwrap().to_owned();
    let run = api
        .wait_until(&id, Duration::from_secs(60), "callback given up", |r| {
            r["callbacks"][0]["gave_up"] == true
        })
        .await;
    assert_eq!(run["callbacks"][0]["tries"], 1);
    assert_eq!(run["callbacks"][0]["last_status"], 410);
    // Past the first backoff (at most 6 s): nothing more came.
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert_eq!(rx.deliveries().len(), 1);
}

#[tokio::test]
async fn a_delivery_owed_when_serve_stops_is_made_after_its_restart() {
    let dir = tempfile::tempdir().unwrap();
    // A port nobody listens on yet: the first tries find no receiver.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut server = Server::start(dir.path(), options(jobs_dir(dir.path(), Some(port)), true));
    let api = server.client();
    // The job file's [callback] is inherited.
    let id = api.accept("announced", json!({"code": "0"})).await;
    api.wait_until(&id, Duration::from_secs(60), "a failed try", |r| {
        r["callbacks"][0]["tries"].as_u64().unwrap_or(0) >= 1
    })
    .await;
    let run = api.run(&id).await;
    assert!(!run["callbacks"][0]["last_error"].is_null(), "{run}");
    assert!(run["callbacks"][0]["delivered_at"].is_null());

    server.process.signal("TERM");
    server.process.wait_exit(Duration::from_secs(30)).await;
    let rx = Receiver::default();
    rx.serve(
        tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap(),
    );
    server.restart(dir.path());
    let got = rx.wait_for(1, Duration::from_secs(40)).await;
    verify_independently(&got[0], SECRET_B);
    let body: Value = serde_json::from_str(&got[0].body).unwrap();
    assert_eq!(body["data"]["id"], id.as_str());
    assert_eq!(body["data"]["status"], "succeeded");
    assert_eq!(got[0].id, run["callbacks"][0]["id"].as_str().unwrap());
}

#[tokio::test]
async fn refused_targets_are_answered_422_and_never_called() {
    let dir = tempfile::tempdir().unwrap();
    // A receiver on loopback, reached by name: refused without --callback-allow.
    let (rx, port) = receiver(&[]).await;
    let server = Server::start(dir.path(), options(jobs_dir(dir.path(), Some(port)), false));
    let api = server.client();
    for url in [
        format!("http://localhost:{port}/hook"),
        format!("http://127.0.0.1:{port}/hook"),
        "http://169.254.169.254/latest/meta-data/".to_owned(),
        "http://10.0.0.1/".to_owned(),
        "ftp://example.com/x".to_owned(),
    ] {
        let body = json!({"params": {"code": "0"}, "callback": {"url": url}}).to_string();
        let answer = api.post_run("exit", &body, "").await;
        assert_eq!(answer.status, 422, "{url}: {}", answer.body);
        assert_eq!(answer.body["error"]["code"], "invalid_callback", "{url}");
    }
    // A job file's callback is held to the same rule.
    let answer = api
        .post_run(
            "announced",
            &json!({"params": {"code": "0"}}).to_string(),
            "",
        )
        .await;
    assert_eq!(answer.status, 422, "{}", answer.body);
    let (_, runs) = api.get("/v1/runs").await;
    assert_eq!(runs["runs"].as_array().map(Vec::len), Some(0), "{runs}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(rx.deliveries().is_empty());
}
