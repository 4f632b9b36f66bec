//! API and worker tokens against the real binary: tokens made by `tasuki token create`,
//! the scope matrix over every endpoint, lists filtered to what a token may read, hidden
//! runs as 404, idempotency keys and `requested_by` per token, the audit log, the
//! loopback rule without tokens, two worker tokens with real workers, and the CLI.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

mod audit;
mod cli;
mod matrix;
mod startup;

use crate::common::{BIN, ServeOptions, Server};

const JOB: &str = "image = \"tasuki-example:latest\"\npull = \"never\"\nnetwork = \"none\"\n\
stop_grace = \"1s\"\nschedule = \"0 0 1 1 *\"\n\
command = [\"sh\", \"-c\", \"echo hello from $JOB_; sleep \\\"$S\\\"; exit \\\"$CODE\\\"\"]\n\
[env]\nS = \"{{params.seconds}}\"\nCODE = \"{{params.code}}\"\n\
[params.seconds]\ndefault = \"0\"\npattern = \"[0-9]+\"\n\
[params.code]\ndefault = \"0\"\npattern = \"[0-9]{1,3}\"\n";

/// Two jobs: `authz-main`, which the runner token may use, and `authz-other`.
fn jobs_dir(dir: &Path) -> PathBuf {
    let jobs = dir.join("jobs");
    std::fs::create_dir_all(&jobs).unwrap();
    for name in ["authz-main", "authz-other"] {
        let body = JOB.replace("$JOB_", name);
        std::fs::write(jobs.join(format!("{name}.toml")), body).unwrap();
    }
    jobs
}

/// `tasuki token create`: the token's value, and the config lines it says to paste.
pub(crate) fn create_token(name: &str, scopes: &[&str], worker: bool) -> (String, String) {
    let mut command = Command::new(BIN);
    command.args(["token", "create", "--name", name]);
    for scope in scopes {
        command.args(["--scope", scope]);
    }
    if worker {
        command.arg("--worker");
    }
    let out = command.output().expect("tasuki token create");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let (value, config) = text.split_once('\n').unwrap();
    (value.to_owned(), config.to_owned())
}

/// The callers of the matrix, in its column order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    Nobody,
    Wrong,
    /// `read:nothing-*`: may see neither job.
    Stranger,
    /// `read:*`: sees everything, may change nothing.
    Reader,
    /// `run:`, `read:` and `cancel:authz-main`.
    Runner,
    Admin,
    /// A worker token.
    Worker,
}

const CALLERS: [Who; 7] = [
    Who::Nobody,
    Who::Wrong,
    Who::Stranger,
    Who::Reader,
    Who::Runner,
    Who::Admin,
    Who::Worker,
];

/// The tokens of one test's server, and its config file.
struct Tokens {
    stranger: String,
    reader: String,
    runner: String,
    admin: String,
    worker_old: String,
    worker_new: String,
    config: PathBuf,
}

impl Tokens {
    fn create(dir: &Path, extra_config: &str) -> Tokens {
        let mut config = String::new();
        let mut make = |name, scopes: &[&str], worker| {
            let (value, lines) = create_token(name, scopes, worker);
            config.push_str(&lines);
            value
        };
        let tokens = Tokens {
            stranger: make("stranger", &["read:nothing-*"], false),
            reader: make("reader", &["read:*"], false),
            runner: make(
                "runner",
                &["run:authz-main", "read:authz-main", "cancel:authz-main"],
                false,
            ),
            admin: make("admin", &["admin"], false),
            worker_old: make("hosts-old", &[], true),
            worker_new: make("hosts-new", &[], true),
            config: dir.join("tasuki.toml"),
        };
        config.push_str(extra_config);
        std::fs::write(&tokens.config, config).unwrap();
        tokens
    }

    fn of(&self, who: Who) -> Option<&str> {
        match who {
            Who::Nobody => None,
            Who::Wrong => {
                Some("tsk_0000000000000000000000000000000000000000000000000000000000000000")
            }
            Who::Stranger => Some(&self.stranger),
            Who::Reader => Some(&self.reader),
            Who::Runner => Some(&self.runner),
            Who::Admin => Some(&self.admin),
            Who::Worker => Some(&self.worker_old),
        }
    }

    fn options(&self, dir: &Path) -> ServeOptions {
        ServeOptions {
            jobs_dir: jobs_dir(dir),
            env: vec![(
                "TASUKI_CONFIG".to_owned(),
                self.config.display().to_string(),
            )],
            ..ServeOptions::default()
        }
    }
}

/// One HTTP call as some caller: (status, body as JSON or text, WWW-Authenticate).
async fn call(
    server: &Server,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> (u16, Value, Option<String>) {
    let http = reqwest::Client::new();
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut request = http.request(method, format!("{}{path}", server.url));
    if let Some(t) = token {
        request = request.bearer_auth(t);
    }
    if let Some(b) = body {
        request = request.body(b.to_owned());
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    let challenge = response
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned());
    let text = response.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, body, challenge)
}

/// Start a run of `job` as `token`, waiting for it to end unless `wait` is 0: its JSON.
async fn start_run(server: &Server, token: &str, job: &str, params: Value, wait: u32) -> Value {
    let path = format!("/v1/jobs/{job}/runs?wait={wait}");
    let body = json!({ "params": params }).to_string();
    let (status, run, _) = call(server, Some(token), "POST", &path, Some(&body), &[]).await;
    assert!(status == 200 || status == 202, "{status}: {run}");
    run
}
