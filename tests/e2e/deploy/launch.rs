//! The deploy set-ups started as written: the units' ExecStart lines with their example
//! environment files, compose.yaml's serve and workers as `docker-compose config` resolves
//! them, and the Kubernetes Deployment with its ConfigMaps and Secret, each run as the real
//! binary on this host against the real RabbitMQ and Docker, with tokens made by
//! `tasuki token create` in place of the placeholders. Only what cannot be the same on a
//! test machine is changed: paths go under a temp dir, the port is a free one, the broker
//! is the test broker, and the queues are the test's own.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{deploy_dir, exec_start_args, python, read, text, tool, yaml_documents};
use crate::common::{BIN, Process, QueueGuard, amqp_url, unique};

/// `docker-compose config` on deploy/compose.yaml with `env_file` as its `.env`, and none
/// of compose's variables from this process's environment.
pub fn compose_config(compose: &Path, env_file: &Path) -> Output {
    let mut command = Command::new(compose);
    command
        .arg("--env-file")
        .arg(env_file)
        .args(["-f", "compose.yaml", "config"])
        .current_dir(deploy_dir());
    for var in [
        "TASUKI_WORKER_TOKEN",
        "RABBITMQ_USER",
        "RABBITMQ_PASSWORD",
        "DOCKER_GID",
        "TASUKI_WORKER_ID_PREFIX",
        "TASUKI_IMAGE",
        "TASUKI_JOBS",
    ] {
        command.env_remove(var);
    }
    command.output().expect("docker-compose")
}

/// Tokens from `tasuki token create`, as the README tells an operator to make them.
struct Tokens {
    ops: String,
    ops_sha: String,
    ci_sha: String,
    worker: String,
    worker_sha: String,
}

fn create_token(args: &[&str]) -> (String, String) {
    let out = Command::new(BIN)
        .args(["token", "create"])
        .args(args)
        .output()
        .expect("tasuki token create");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let printed = text(&out.stdout);
    let token = printed.lines().next().unwrap_or_default().to_owned();
    let sha = printed
        .lines()
        .find_map(|l| l.strip_prefix("sha256 = \""))
        .and_then(|l| l.strip_suffix('"'))
        .unwrap_or_else(|| panic!("no sha256 line in: {printed}"))
        .to_owned();
    (token, sha)
}

impl Tokens {
    fn create() -> Tokens {
        let (ops, ops_sha) = create_token(&["--name", "ops", "--scope", "admin"]);
        let (_, ci_sha) = create_token(&["--name", "ci", "--scope", "run:*", "--scope", "read:*"]);
        let (worker, worker_sha) = create_token(&["--name", "workers", "--worker"]);
        Tokens {
            ops,
            ops_sha,
            ci_sha,
            worker,
            worker_sha,
        }
    }

    /// The example files with every placeholder filled in; a placeholder left over fails.
    fn fill(&self, example: &str) -> String {
        let filled = example
            .replace("REPLACE-WITH-THE-SHA256-OF-THE-OPS-TOKEN", &self.ops_sha)
            .replace("REPLACE-WITH-THE-SHA256-OF-THE-CI-TOKEN", &self.ci_sha)
            .replace(
                "REPLACE-WITH-THE-SHA256-OF-THE-WORKER-TOKEN",
                &self.worker_sha,
            )
            .replace("REPLACE-WITH-THE-WORKER-TOKEN", &self.worker)
            .replace("REPLACE-WITH-THE-RABBITMQ-PASSWORD", "guest")
            .replace("REPLACE-WITH-A-RABBITMQ-PASSWORD", "guest")
            .replace("REPLACE-WITH-THE-DOCKER-GROUP-ID", "0");
        let rest: Vec<&str> = filled
            .lines()
            .filter(|l| l.contains("REPLACE-") && !l.trim_start().starts_with('#'))
            .collect();
        assert!(rest.is_empty(), "placeholders no test fills in: {rest:?}");
        filled
    }
}

/// Where a set-up's absolute paths and its port land on this machine.
struct Host {
    dir: tempfile::TempDir,
    port: u16,
    queue: String,
    _queues: [QueueGuard; 2],
}

impl Host {
    fn new() -> Host {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let queue = unique("deploy-runs");
        let requests = format!("{queue}-requests");
        Host {
            dir,
            port,
            _queues: [QueueGuard(queue.clone()), QueueGuard(requests)],
            queue,
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// A path, address or URL of the set-up as it is on this machine.
    fn local(&self, word: &str) -> String {
        let amqp = amqp_url();
        if word.starts_with("amqp://") {
            return amqp;
        }
        word.replace(
            "/etc/tasuki",
            &self.path("etc/tasuki").display().to_string(),
        )
        .replace("/var/lib/tasuki", &self.path("data").display().to_string())
        .replace("/run/lock", &self.path("lock").display().to_string())
        .replace("0.0.0.0:8080", &format!("127.0.0.1:{}", self.port))
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{}", self.port))
        .replace("http://serve:8080", &self.url())
        .replace("http://tasuki.internal:8080", &self.url())
    }

    fn write(&self, rel: &str, contents: &str) {
        let path = self.path(rel);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, contents).expect("write");
    }

    /// `tasuki` with the set-up's arguments and environment, on the test's own queues.
    fn start(&self, args: &[String], env: &[(String, String)], worker_id: &str) -> Process {
        std::fs::create_dir_all(self.path("lock")).expect("mkdir");
        let args: Vec<String> = args.iter().map(|a| self.local(a)).collect();
        let mut env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.clone(), self.local(v)))
            .collect();
        env.push(("TASUKI_QUEUE".into(), self.queue.clone()));
        env.push((
            "TASUKI_REQUEST_QUEUE".into(),
            format!("{}-requests", self.queue),
        ));
        let name = args.first().cloned().unwrap_or_default();
        Process::spawn_with_env(&args, self.dir.path(), worker_id, &name, &env)
    }

    /// Until `GET path` answers 200 without a token (as a probe asks).
    async fn wait_ok(&self, serve: &mut Process, path: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let answer = reqwest::get(format!("{}{path}", self.url())).await;
            if answer.is_ok_and(|r| r.status().as_u16() == 200) {
                return;
            }
            assert!(
                serve.exited().is_none(),
                "serve exited:\n{}",
                serve.log_text()
            );
            assert!(Instant::now() < deadline, "{path} not 200 in 30 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A run of `hello` through the API with the ops token; the finished run.
    async fn run_hello(&self, token: &str) -> Value {
        let response = reqwest::Client::new()
            .post(format!("{}/v1/jobs/hello/runs?wait=60", self.url()))
            .bearer_auth(token)
            .send()
            .await
            .expect("POST run");
        assert_eq!(response.status().as_u16(), 200, "run not finished in 60 s");
        let run: Value = response.json().await.expect("run JSON");
        assert_eq!(run["status"], "succeeded", "{run}");
        run
    }
}

/// `KEY=VALUE` lines of an environment file (comments and blank lines skipped).
fn env_file(contents: &str) -> Vec<(String, String)> {
    contents
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("not KEY=VALUE: {l}"));
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

fn example_job(host: &Host, jobs: &str) {
    let hello = read(&super::repo().join("jobs/hello.toml"));
    host.write(&format!("{jobs}/hello.toml"), &hello);
}

fn worker_from_unit(host: &Host, tokens: &Tokens) -> (Process, String) {
    let unit = read(&deploy_dir().join("systemd/tasuki-worker@.service"));
    let id = unique("deploy-worker");
    let args: Vec<String> = exec_start_args(&unit)
        .into_iter()
        .map(|a| a.replace("%H-%i", &id))
        .collect();
    let env = env_file(&tokens.fill(&read(&deploy_dir().join("systemd/worker.env.example"))));
    (host.start(&args, &env, &id), id)
}

#[tokio::test]
async fn systemd_units_run_as_written() {
    let host = Host::new();
    let tokens = Tokens::create();
    let example = read(&deploy_dir().join("tasuki.example.toml"));
    host.write("etc/tasuki/tasuki.toml", &tokens.fill(&example));
    example_job(&host, "etc/tasuki/jobs");
    let unit = read(&deploy_dir().join("systemd/tasuki-serve.service"));
    let env = env_file(&tokens.fill(&read(&deploy_dir().join("systemd/serve.env.example"))));
    let mut serve = host.start(&exec_start_args(&unit), &env, &unique("deploy-none"));
    host.wait_ok(&mut serve, "/readyz").await;
    let (_worker, id) = worker_from_unit(&host, &tokens);
    let run = host.run_hello(&tokens.ops).await;
    assert_eq!(run["attempts"][0]["worker_id"], id.as_str(), "{run}");
}

#[tokio::test]
async fn compose_services_run_as_written() {
    let (Some(compose), Some(python)) = (
        tool("TASUKI_DOCKER_COMPOSE", "/usr/bin/docker-compose"),
        python(),
    ) else {
        return;
    };
    let host = Host::new();
    let tokens = Tokens::create();
    let env_path = host.path("compose.env");
    let example = read(&deploy_dir().join("compose.env.example"));
    host.write("compose.env", &tokens.fill(&example));
    let out = compose_config(&compose, &env_path);
    assert!(out.status.success(), "{}", text(&out.stderr));
    host.write("compose.resolved.yaml", &text(&out.stdout));
    let doc = yaml_documents(&python, &[host.path("compose.resolved.yaml")]).remove(0);
    let services = &doc["services"];
    // compose mounts ./tasuki.toml (the example, filled in) and the jobs directory.
    let config = read(&deploy_dir().join("tasuki.example.toml"));
    host.write("etc/tasuki/tasuki.toml", &tokens.fill(&config));
    example_job(&host, "etc/tasuki/jobs");
    let serve_spec = &services["serve"];
    let mut serve = host.start(
        &strings(&serve_spec["command"]),
        &environment(serve_spec),
        &unique("deploy-none"),
    );
    // The compose health check, run here: it must pass once serve is ready.
    let check = strings(&serve_spec["healthcheck"]["test"]);
    assert_eq!(check.first().map(String::as_str), Some("CMD"), "{check:?}");
    let check: Vec<String> = check[1..].iter().map(|a| host.local(a)).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !Command::new(&check[0])
        .args(&check[1..])
        .status()
        .expect("health check")
        .success()
    {
        assert!(
            serve.exited().is_none(),
            "serve exited:\n{}",
            serve.log_text()
        );
        assert!(Instant::now() < deadline, "health check {check:?} failing");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut workers = Vec::new();
    let mut ids = Vec::new();
    for (_, spec) in services.as_object().expect("services") {
        if spec["command"][0] != "worker" {
            continue;
        }
        // Compose's ids are fixed names; the test's must not meet another test's.
        let id = unique("deploy-compose");
        let args: Vec<String> = strings(&spec["command"])
            .into_iter()
            .map(|a| {
                if a.starts_with("compose-") {
                    id.clone()
                } else {
                    a
                }
            })
            .collect();
        assert!(args.contains(&id), "no compose-N worker id in {args:?}");
        workers.push(host.start(&args, &environment(spec), &id));
        ids.push(id);
    }
    assert!(workers.len() >= 2);
    let run = host.run_hello(&tokens.ops).await;
    let by = run["attempts"][0]["worker_id"].as_str().unwrap_or_default();
    assert!(ids.iter().any(|id| id == by), "{run}");
}

fn strings(list: &Value) -> Vec<String> {
    list.as_array()
        .unwrap_or_else(|| panic!("not a list: {list}"))
        .iter()
        .map(|v| v.as_str().expect("string").to_owned())
        .collect()
}

fn environment(service: &Value) -> Vec<(String, String)> {
    service["environment"]
        .as_object()
        .map(|env| {
            env.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn kubernetes_serve_runs_as_the_deployment_says() {
    let Some(python) = python() else {
        return;
    };
    let host = Host::new();
    let tokens = Tokens::create();
    let docs = yaml_documents(&python, &super::kubernetes_files());
    let find = |kind: &str, name: &str| -> &Value {
        docs.iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name}"))
    };
    let deployment = docs
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .expect("Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    // Each ConfigMap volume's keys become files under the container's mount path.
    for mount in container["volumeMounts"].as_array().expect("volumeMounts") {
        let volume = pod["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .find(|v| v["name"] == mount["name"])
            .expect("volume of a mount");
        let path = mount["mountPath"].as_str().expect("mountPath");
        std::fs::create_dir_all(host.local(path)).expect("mkdir");
        if let Some(name) = volume["configMap"]["name"].as_str() {
            for (file, contents) in find("ConfigMap", name)["data"].as_object().expect("data") {
                let target = PathBuf::from(host.local(path)).join(file);
                std::fs::write(target, contents.as_str().expect("text")).expect("write");
            }
        }
    }
    let mut env: Vec<(String, String)> = Vec::new();
    for from in container["envFrom"].as_array().expect("envFrom") {
        let secret = find("Secret", from["secretRef"]["name"].as_str().expect("name"));
        for (k, v) in secret["stringData"].as_object().expect("stringData") {
            env.push((k.clone(), tokens.fill(v.as_str().expect("text"))));
        }
    }
    for var in container["env"].as_array().expect("env") {
        let name = var["name"].as_str().expect("name").to_owned();
        env.push((name, var["value"].as_str().expect("value").to_owned()));
    }
    let port = container["ports"][0]["containerPort"].as_u64();
    assert_eq!(port, Some(8080), "the test maps port 8080");
    let mut serve = host.start(&strings(&container["args"]), &env, &unique("deploy-none"));
    for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
        let path = container[probe]["httpGet"]["path"]
            .as_str()
            .expect("probe path");
        host.wait_ok(&mut serve, path).await;
    }
    // The jobs ConfigMap is the catalog, the Secret's tokens are the server's: a worker
    // from the unit file (outside the cluster, as documented) runs a job with them.
    let (_worker, id) = worker_from_unit(&host, &tokens);
    let run = host.run_hello(&tokens.ops).await;
    assert_eq!(run["attempts"][0]["worker_id"], id.as_str(), "{run}");
}
