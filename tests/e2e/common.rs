//! Fixtures: a real `tasuki serve` / `tasuki worker` process in its own temp dir, with
//! its own port, queue and worker id, and cleanup of every container it started.
//! Shared by the parallel `e2e` binary and the serial `serial` binary; each uses part.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_tasuki");

pub fn amqp_url() -> String {
    std::env::var("TASUKI_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

pub fn docker_cli() -> String {
    std::env::var("DOCKER").unwrap_or_else(|_| {
        if Path::new("/usr/bin/docker").exists() {
            "/usr/bin/docker".to_owned()
        } else {
            "docker".to_owned()
        }
    })
}

/// A name no other test (in this or a parallel process) uses.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}-{}-{}-{nanos:x}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn test_jobs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/jobs")
}

/// Containers labelled with this worker id; `None` if docker could not be asked.
fn list_containers(worker_id: &str) -> Option<Vec<String>> {
    let filter = format!("label=tasuki.worker-id={worker_id}");
    let out = Command::new(docker_cli())
        .args(["ps", "-aq", "--filter", &filter])
        .output()
        .ok()?;
    Some(
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_owned)
            .collect(),
    )
}

/// Remove every container labelled with this worker id.
pub fn remove_containers(worker_id: &str) {
    let ids = list_containers(worker_id).unwrap_or_default();
    if !ids.is_empty() {
        let _ = Command::new(docker_cli())
            .arg("rm")
            .arg("-f")
            .args(&ids)
            .output();
    }
}

pub fn containers_of(worker_id: &str) -> Vec<String> {
    list_containers(worker_id).unwrap_or_else(|| panic!("docker ps failed"))
}

/// The worker removes a container right after the final state is stored, so a test
/// that has just seen the final state gives it a moment.
pub async fn assert_no_containers_left(worker_id: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let left = containers_of(worker_id);
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "containers left behind: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A running tasuki process whose stderr goes to a file in its directory.
pub struct Process {
    child: Child,
    pub log: PathBuf,
    pub worker_id: String,
}

/// Variables of the outer environment that must not leak into a test's processes.
const SCRUBBED_ENV: &[&str] = &[
    "TASUKI_AMQP_URL",
    "TASUKI_SERVER",
    "TASUKI_CRASH_AT",
    "TASUKI_RECONCILE_INTERVAL",
    "TASUKI_LEASE_TTL",
    "TASUKI_WORKER_ID",
    "TASUKI_DRAIN_TIMEOUT",
    "TASUKI_SCHEDULER",
    "TASUKI_SCHEDULE_GRACE",
    "TASUKI_CALENDARS_DIR",
    "TASUKI_TOKEN",
    "TASUKI_CONFIG",
    "TASUKI_TOKENS",
    "TASUKI_WORKER_TOKEN",
    "TASUKI_WORKER_TOKENS",
    "TASUKI_INSECURE_NO_AUTH",
    "TASUKI_METRICS_LISTEN",
    "TASUKI_QUEUE_TYPE",
    "TASUKI_DELIVERY_LIMIT",
];

impl Process {
    pub fn spawn_with_env(
        args: &[String],
        dir: &Path,
        worker_id: &str,
        name: &str,
        env: &[(String, String)],
    ) -> Process {
        let log = dir.join(format!("{name}-{}.log", unique("p")));
        let file = std::fs::File::create(&log).expect("log file");
        let mut command = Command::new(BIN);
        command.args(args).env("TASUKI_LOG", "info,tasuki=debug");
        for key in SCRUBBED_ENV {
            command.env_remove(key);
        }
        command.envs(env.iter().map(|(k, v)| (k, v)));
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn tasuki");
        Process {
            child,
            log,
            worker_id: worker_id.to_owned(),
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: the process gets no chance to clean up.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the process has ended (reaps it).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// Send a signal (`TERM`, `STOP`, `CONT`, ...) to this process only, by its PID.
    /// Nothing is sent once the process has been reaped, so the PID cannot be reused.
    pub fn signal(&mut self, signal: &str) {
        assert!(
            self.exited().is_none(),
            "process {} already exited; not sending SIG{signal}",
            self.pid()
        );
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{signal} {} failed", self.pid());
    }

    /// Wait for the process to end by itself.
    pub async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.exited() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "process {} still running after {within:?}",
                self.pid()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Peak resident memory (VmHWM) of the running process, in bytes.
    pub fn peak_rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc/PID/status");
        let line = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .expect("VmHWM in /proc/PID/status");
        let kib: u64 = line
            .split_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .expect("VmHWM value");
        kib * 1024
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        remove_containers(&self.worker_id);
        if std::thread::panicking() {
            eprintln!("----- {} -----\n{}", self.log.display(), self.log_text());
        }
    }
}

pub struct ServeOptions {
    pub amqp_queue: Option<String>,
    pub embedded_worker: bool,
    pub worker_token: Option<String>,
    pub concurrency: u32,
    pub jobs_dir: PathBuf,
    /// `--lease-ttl`, e.g. `3s`; the binary's default when `None`.
    pub lease_ttl: Option<String>,
    /// `--worker-id` of the embedded worker; a unique one when `None`.
    pub worker_id: Option<String>,
    /// Extra environment for the process.
    pub env: Vec<(String, String)>,
    /// Extra command line arguments, after the ones above.
    pub extra_args: Vec<String>,
    /// The address `--listen` binds (its port is a free one); `127.0.0.1` when `None`.
    pub listen_host: Option<String>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            amqp_queue: None,
            embedded_worker: false,
            worker_token: None,
            concurrency: 2,
            jobs_dir: test_jobs_dir(),
            lease_ttl: None,
            worker_id: None,
            env: Vec::new(),
            extra_args: Vec::new(),
            listen_host: None,
        }
    }
}

/// `tasuki serve` on a free loopback port with its own data dir.
pub struct Server {
    pub process: Process,
    pub url: String,
    port: u16,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

impl Server {
    pub fn start(dir: &Path, options: ServeOptions) -> Server {
        let worker_id = options
            .worker_id
            .clone()
            .unwrap_or_else(|| unique("test-serve"));
        let data_dir = dir.join("data");
        let port = free_port();
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--listen".into(),
            format!(
                "{}:{port}",
                options.listen_host.as_deref().unwrap_or("127.0.0.1")
            ),
            "--jobs-dir".into(),
            options.jobs_dir.display().to_string(),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--worker-id".into(),
            worker_id.clone(),
            "--concurrency".into(),
            options.concurrency.to_string(),
            "--drain-timeout".into(),
            "20s".into(),
        ];
        if let Some(queue) = &options.amqp_queue {
            args.extend([
                "--amqp-url".into(),
                amqp_url(),
                "--queue".into(),
                queue.clone(),
            ]);
        }
        if options.embedded_worker {
            args.push("--embedded-worker".into());
        }
        if let Some(token) = &options.worker_token {
            args.extend(["--worker-token".into(), token.clone()]);
        }
        if let Some(ttl) = &options.lease_ttl {
            args.extend(["--lease-ttl".into(), ttl.clone()]);
        }
        args.extend(options.extra_args.iter().cloned());
        let process = Process::spawn_with_env(&args, dir, &worker_id, "serve", &options.env);
        // `--tls-cert` among the extra arguments: the server speaks HTTPS only.
        let scheme = if options.extra_args.iter().any(|a| a == "--tls-cert") {
            "https"
        } else {
            "http"
        };
        let mut server = Server {
            process,
            url: format!("{scheme}://127.0.0.1:{port}"),
            port,
            args,
            env: options.env,
        };
        server.wait_healthy();
        server
    }

    fn wait_healthy(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            if let Ok(Some(status)) = self.process.child.try_wait() {
                panic!(
                    "tasuki serve exited with {status}:\n{}",
                    self.process.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "tasuki serve did not listen in 30 s:\n{}",
                self.process.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Start the same server again (same port, data dir and worker id).
    pub fn restart(&mut self, dir: &Path) {
        let worker_id = self.process.worker_id.clone();
        let fresh = Process::spawn_with_env(&self.args, dir, &worker_id, "serve", &self.env);
        let old = std::mem::replace(&mut self.process, fresh);
        // The old process is gone already; don't let its drop remove the new one's
        // containers.
        std::mem::forget(old);
        self.wait_healthy();
    }

    /// Start the same command line again without waiting for it to listen (for a start
    /// that is expected to fail).
    pub fn spawn_again(&self, dir: &Path) -> Process {
        Process::spawn_with_env(&self.args, dir, &self.process.worker_id, "serve", &self.env)
    }

    /// `127.0.0.1:PORT`, for raw sockets and for a URL of the other scheme.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn client(&self) -> Api {
        Api {
            http: reqwest::Client::new(),
            base: self.url.clone(),
        }
    }
}

/// `tasuki worker` against a server and a queue.
pub fn start_worker(
    dir: &Path,
    server: &Server,
    queue: &str,
    token: &str,
    concurrency: u32,
) -> Process {
    start_worker_with(
        dir,
        server,
        queue,
        token,
        WorkerSpec {
            concurrency,
            ..WorkerSpec::default()
        },
    )
}

/// How to start a `tasuki worker`.
pub struct WorkerSpec {
    /// A fixed `--worker-id` (to start "the same" worker again); unique when `None`.
    pub worker_id: Option<String>,
    pub concurrency: u32,
    pub drain_timeout: String,
    /// Extra environment: `TASUKI_CRASH_AT`, `TASUKI_RECONCILE_INTERVAL`, ...
    pub env: Vec<(String, String)>,
    /// The `--server`s to give, in order, instead of the server's own URL.
    pub servers: Option<Vec<String>>,
}

impl Default for WorkerSpec {
    fn default() -> Self {
        Self {
            worker_id: None,
            concurrency: 2,
            drain_timeout: "20s".into(),
            env: Vec::new(),
            servers: None,
        }
    }
}

pub fn start_worker_with(
    dir: &Path,
    server: &Server,
    queue: &str,
    token: &str,
    spec: WorkerSpec,
) -> Process {
    let worker_id = spec.worker_id.unwrap_or_else(|| unique("test-worker"));
    let concurrency = spec.concurrency;
    let servers = spec.servers.unwrap_or_else(|| vec![server.url.clone()]);
    let mut args: Vec<String> = vec!["worker".into()];
    for url in servers {
        args.extend(["--server".into(), url]);
    }
    args.extend([
        "--worker-token".into(),
        token.into(),
        "--amqp-url".into(),
        amqp_url(),
        "--queue".into(),
        queue.into(),
        "--worker-id".into(),
        worker_id.clone(),
        "--concurrency".into(),
        concurrency.to_string(),
        "--drain-timeout".into(),
        spec.drain_timeout,
    ]);
    Process::spawn_with_env(&args, dir, &worker_id, "worker", &spec.env)
}

/// The `tasuki` CLI against a server (given as `--server`).
pub fn tasuki_cli(server_url: &str, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .args(["--server", server_url])
        .output()
        .expect("run tasuki")
}

pub struct Api {
    pub http: reqwest::Client,
    pub base: String,
}

pub struct Answer {
    pub status: u16,
    pub body: Value,
}

impl Api {
    pub async fn post_run(&self, job: &str, body: &str, query: &str) -> Answer {
        let response = self
            .http
            .post(format!("{}/v1/jobs/{job}/runs{query}", self.base))
            .body(body.to_owned())
            .send()
            .await
            .expect("POST run");
        let status = response.status().as_u16();
        let text = response.text().await.expect("body");
        let body = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
        Answer { status, body }
    }

    /// POST with params and wait up to 60 s for the finished run.
    pub async fn run_and_wait(&self, job: &str, params: Value) -> Value {
        let answer = self
            .post_run(
                job,
                &serde_json::json!({ "params": params }).to_string(),
                "?wait=60",
            )
            .await;
        assert_eq!(
            answer.status, 200,
            "run of {job} did not finish: {}",
            answer.body
        );
        answer.body
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .expect("GET");
        let status = response.status().as_u16();
        let text = response.text().await.expect("body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub async fn logs(&self, id: &str) -> Vec<u8> {
        let response = self
            .http
            .get(format!("{}/v1/runs/{id}/logs", self.base))
            .send()
            .await
            .expect("GET logs");
        assert_eq!(response.status().as_u16(), 200);
        response.bytes().await.expect("log bytes").to_vec()
    }

    /// Poll until the run is final (for runs started without `?wait`).
    pub async fn wait_final(&self, id: &str, within: Duration) -> Value {
        let (status, run) = self
            .get(&format!("/v1/runs/{id}?wait={}", within.as_secs().max(1)))
            .await;
        assert!(
            status == 200 && !matches!(run["status"].as_str(), Some("queued" | "running")),
            "run {id} not final after {within:?}: {run}"
        );
        run
    }
}

impl Api {
    pub fn new(base: &str) -> Api {
        Api {
            http: reqwest::Client::new(),
            base: base.to_owned(),
        }
    }

    /// POST a run with extra request headers (e.g. `Idempotency-Key`).
    pub async fn post_run_with_headers(
        &self,
        job: &str,
        body: &str,
        query: &str,
        headers: &[(&str, &str)],
    ) -> Answer {
        let mut request = self
            .http
            .post(format!("{}/v1/jobs/{job}/runs{query}", self.base))
            .body(body.to_owned());
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.expect("POST run");
        let status = response.status().as_u16();
        let text = response.text().await.expect("body");
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Answer { status, body }
    }

    /// POST without a body (cancel, retry).
    pub async fn post(&self, path: &str) -> Answer {
        let response = self
            .http
            .post(format!("{}{path}", self.base))
            .send()
            .await
            .expect("POST");
        let status = response.status().as_u16();
        let text = response.text().await.expect("body");
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Answer { status, body }
    }

    /// POST a run that must be accepted (202); its id.
    pub async fn accept(&self, job: &str, params: Value) -> String {
        let answer = self
            .post_run(
                job,
                &serde_json::json!({ "params": params }).to_string(),
                "",
            )
            .await;
        assert_eq!(
            answer.status, 202,
            "run of {job} not accepted: {}",
            answer.body
        );
        answer.body["id"]
            .as_str()
            .unwrap_or_else(|| panic!("no id in {}", answer.body))
            .to_owned()
    }

    pub async fn run(&self, id: &str) -> Value {
        let (status, run) = self.get(&format!("/v1/runs/{id}")).await;
        assert_eq!(status, 200, "GET run {id}: {run}");
        run
    }

    /// Poll the run until `done` holds for it.
    pub async fn wait_until(
        &self,
        id: &str,
        within: Duration,
        what: &str,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let run = self.run(id).await;
            if done(&run) {
                return run;
            }
            assert!(
                Instant::now() < deadline,
                "run {id}: not {what} after {within:?}: {run}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Poll the run's log (latest attempt) until it contains `needle`: the container
    /// runs and its output reaches the store.
    pub async fn wait_log_contains(&self, id: &str, needle: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let (status, bytes) = self.attempt_log(id, None).await;
            if status == 200 && String::from_utf8_lossy(&bytes).contains(needle) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "run {id}: log has no {needle:?} after {within:?}: status {status}, {:?}; run {}",
                String::from_utf8_lossy(&bytes),
                self.run(id).await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The stored log of one attempt (the latest with `None`), without following.
    pub async fn attempt_log(&self, id: &str, attempt: Option<u64>) -> (u16, Vec<u8>) {
        let query = attempt.map(|a| format!("?attempt={a}")).unwrap_or_default();
        let response = self
            .http
            .get(format!("{}/v1/runs/{id}/logs{query}", self.base))
            .send()
            .await
            .expect("GET logs");
        let status = response.status().as_u16();
        (status, response.bytes().await.expect("log bytes").to_vec())
    }

    /// Length of one attempt's stored log, counted while streaming it.
    pub async fn attempt_log_len(&self, id: &str, attempt: u64) -> u64 {
        let mut response = self
            .http
            .get(format!("{}/v1/runs/{id}/logs?attempt={attempt}", self.base))
            .send()
            .await
            .expect("GET logs");
        assert_eq!(response.status().as_u16(), 200, "logs of {id}/{attempt}");
        let mut len = 0u64;
        while let Some(chunk) = response.chunk().await.expect("log chunk") {
            len += chunk.len() as u64;
        }
        len
    }
}

/// The attempts of a run: its `attempts` array, or one made of the run's own fields
/// for a server that does not list attempts.
pub fn attempts_of(run: &Value) -> Vec<Value> {
    match run["attempts"].as_array() {
        Some(list) => list.clone(),
        None => vec![serde_json::json!({
            "attempt": run["attempt"],
            "status": run["status"],
            "exit_code": run["exit_code"],
            "reason_code": run["reason_code"],
        })],
    }
}

pub fn is_final(run: &Value) -> bool {
    !matches!(run["status"].as_str(), Some("queued" | "running") | None)
}

// ---------------------------------------------------------------------------------
// RabbitMQ

/// (ready, unacked) for a queue, from the broker itself.
pub fn queue_counts(queue: &str) -> (u64, u64) {
    let out = Command::new("rabbitmqctl")
        .args([
            "list_queues",
            "-q",
            "--no-table-headers",
            "name",
            "messages_ready",
            "messages_unacknowledged",
        ])
        .output()
        .expect("rabbitmqctl");
    let text = String::from_utf8_lossy(&out.stdout);
    for line in text.lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() == 3 && cols[0] == queue {
            return (cols[1].parse().unwrap_or(0), cols[2].parse().unwrap_or(0));
        }
    }
    panic!("queue {queue} not listed by rabbitmqctl: {text}");
}

pub fn delete_queues(queue: &str) {
    for q in [queue.to_owned(), format!("{queue}.dead")] {
        let _ = Command::new("rabbitmqctl")
            .args(["delete_queue", &q])
            .output();
    }
}

/// Deletes a test's run queue and its dead-letter queue when dropped.
pub struct QueueGuard(pub String);
impl Drop for QueueGuard {
    fn drop(&mut self) {
        delete_queues(&self.0);
    }
}

/// Publish raw bytes straight to a queue (default exchange), confirmed.
pub async fn publish_raw(queue: &str, body: &[u8]) {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    let conn = lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
        .await
        .expect("connect to RabbitMQ");
    let channel = conn.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");
    channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body,
            lapin::BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .expect("publish")
        .await
        .expect("publish confirm");
    let _ = conn.close(200, "bye".into()).await;
}

// ---------------------------------------------------------------------------------
// Docker's view: container events, recorded while the test runs

/// Where `serve` with data dir `data` keeps a run attempt's log: in the directory named by
/// the run id's first six characters (its time, to about 17 minutes).
pub fn log_file(data: &Path, run_id: &str, attempt: u32) -> PathBuf {
    data.join("logs")
        .join(&run_id[..6])
        .join(format!("{run_id}.{attempt}.log"))
}

pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// One container event (`create`, `start`, `die`, `destroy`, ...).
#[derive(Debug, Clone)]
pub struct ContainerEvent {
    pub action: String,
    pub container: String,
    pub run_id: String,
    pub attempt: Option<u64>,
    pub exit_code: Option<i64>,
    pub time_nano: i64,
}

/// `docker events` for the containers of some worker ids, streamed into a file from
/// the test's start. A stream, not a `--since/--until` query afterwards: the engine
/// keeps only its last few hundred events, which a parallel suite overruns.
struct EventWatcher {
    since: i64,
    worker_ids: Vec<String>,
    filters: Vec<String>,
    file: PathBuf,
    child: Option<Child>,
}

impl EventWatcher {
    fn start(since: i64, worker_ids: &[String]) -> Self {
        // Several label filters must all match, so filter on the label's presence here
        // and on its value when reading.
        let filters = vec![
            "type=container".to_owned(),
            "label=tasuki.worker-id".to_owned(),
        ];
        let file = std::env::temp_dir().join(format!("{}.jsonl", unique("tasuki-events")));
        let mut watcher = EventWatcher {
            since,
            worker_ids: worker_ids.to_vec(),
            filters,
            file,
            child: None,
        };
        watcher.spawn();
        watcher
    }

    fn spawn(&mut self) {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.file)
            .expect("events file");
        let mut command = Command::new(docker_cli());
        command
            .args(["events", "--format", "{{json .}}", "--since"])
            .arg(self.since.to_string());
        for f in &self.filters {
            command.args(["--filter", f]);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(Stdio::null())
            .spawn()
            .expect("docker events");
        self.child = Some(child);
    }

    /// Start the stream again if it ended (the engine restarted).
    fn resume(&mut self) {
        if let Some(child) = &mut self.child
            && let Ok(None) = child.try_wait()
        {
            return;
        }
        self.spawn();
    }

    fn events(&self) -> Vec<ContainerEvent> {
        let text = std::fs::read_to_string(&self.file).unwrap_or_default();
        let mut seen = HashSet::new();
        let mut events = Vec::new();
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            let attrs = &v["Actor"]["Attributes"];
            let worker = attrs["tasuki.worker-id"].as_str().unwrap_or_default();
            if !self.worker_ids.iter().any(|w| w == worker) {
                continue;
            }
            let action = v["Action"]
                .as_str()
                .or(v["status"].as_str())
                .unwrap_or_default()
                .to_owned();
            let container = v["id"].as_str().unwrap_or_default().to_owned();
            let time_nano = v["timeNano"].as_i64().unwrap_or_default();
            if !seen.insert((container.clone(), action.clone(), time_nano)) {
                continue;
            }
            events.push(ContainerEvent {
                action,
                container,
                run_id: attrs["tasuki.run-id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                attempt: attrs["tasuki.attempt"]
                    .as_str()
                    .and_then(|a| a.parse().ok()),
                exit_code: attrs["exitCode"].as_str().and_then(|c| c.parse().ok()),
                time_nano,
            });
        }
        events
    }
}

impl Drop for EventWatcher {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.file);
    }
}

// ---------------------------------------------------------------------------------
// The invariants every fault test asserts afterwards

/// Where two logs part, readable also for large or binary ones.
fn log_difference(got: &[u8], want: &[u8]) -> String {
    let at = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    let around = |bytes: &[u8]| {
        let start = at.saturating_sub(40);
        let end = (at + 40).min(bytes.len());
        String::from_utf8_lossy(&bytes[start.min(end)..end]).into_owned()
    };
    format!(
        "got {} bytes, want {}; first difference at byte {at}:\n got  ...{:?}...\n want ...{:?}...",
        got.len(),
        want.len(),
        around(got),
        around(want)
    )
}

/// What a run attempt's stored log must be, when the test knows it.
pub enum LogExpect {
    Exact(Vec<u8>),
    Len(u64),
}

/// Records what a fault test accepted and what Docker did, and checks afterwards:
/// every accepted run is final; no run has more containers than attempts (nor an
/// attempt more than one); each attempt's stored exit code is the one Docker reported;
/// each log is complete or flagged (`log_dropped_bytes`, `logs_truncated`); no
/// container of the test's workers is left.
pub struct Invariants {
    worker_ids: Vec<String>,
    events: EventWatcher,
    runs: Vec<String>,
    logs: BTreeMap<(String, u64), LogExpect>,
    /// How long `check` waits for each accepted run to become final.
    final_within: Duration,
}

impl Invariants {
    /// Start recording before any of these workers starts a container.
    pub fn start(worker_ids: &[&str]) -> Self {
        let worker_ids: Vec<String> = worker_ids.iter().map(|w| (*w).to_owned()).collect();
        let events = EventWatcher::start(unix_now() - 1, &worker_ids);
        Invariants {
            worker_ids,
            events,
            runs: Vec::new(),
            logs: BTreeMap::new(),
            final_within: Duration::from_secs(120),
        }
    }

    /// A run the service accepted (a 2xx with its id).
    pub fn accepted(&mut self, id: &str) {
        if !self.runs.iter().any(|r| r == id) {
            self.runs.push(id.to_owned());
        }
    }

    pub fn expect_log(&mut self, id: &str, attempt: u64, bytes: impl Into<Vec<u8>>) {
        self.logs
            .insert((id.to_owned(), attempt), LogExpect::Exact(bytes.into()));
    }

    pub fn expect_log_len(&mut self, id: &str, attempt: u64, len: u64) {
        self.logs
            .insert((id.to_owned(), attempt), LogExpect::Len(len));
    }

    /// After the Docker engine restarted: record its events again.
    pub fn resume_events(&mut self) {
        self.events.resume();
    }

    pub fn events(&self) -> Vec<ContainerEvent> {
        self.events.events()
    }

    /// Containers created for a run, per Docker.
    pub fn containers_created(&self, run_id: &str) -> usize {
        self.events()
            .iter()
            .filter(|e| e.action == "create" && e.run_id == run_id)
            .count()
    }

    /// Check every invariant; returns the final runs by id.
    pub async fn check(&mut self, api: &Api) -> BTreeMap<String, Value> {
        // Every accepted run reaches a final state.
        let mut finals = BTreeMap::new();
        for id in &self.runs {
            let run = api.wait_final(id, self.final_within).await;
            finals.insert(id.clone(), run);
        }
        // No container of the test's workers is left.
        for worker in &self.worker_ids {
            assert_no_containers_left(worker).await;
        }
        self.events.resume();
        // Every container created was also destroyed, as Docker reports it.
        let deadline = Instant::now() + Duration::from_secs(20);
        let events = loop {
            let events = self.events();
            let created: HashSet<&str> = events
                .iter()
                .filter(|e| e.action == "create")
                .map(|e| e.container.as_str())
                .collect();
            let destroyed: HashSet<&str> = events
                .iter()
                .filter(|e| e.action == "destroy")
                .map(|e| e.container.as_str())
                .collect();
            let pending: Vec<&&str> = created.difference(&destroyed).collect();
            if pending.is_empty() {
                break events;
            }
            assert!(
                Instant::now() < deadline,
                "docker reported no destroy for containers {pending:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        for e in events.iter().filter(|e| e.action == "create") {
            assert!(
                finals.contains_key(&e.run_id),
                "container {} was created for run {:?}, which the test never saw accepted",
                e.container,
                e.run_id
            );
        }
        for (id, run) in &finals {
            let attempts = attempts_of(run);
            let creates: Vec<&ContainerEvent> = events
                .iter()
                .filter(|e| e.action == "create" && &e.run_id == id)
                .collect();
            assert!(
                creates.len() <= attempts.len(),
                "run {id}: {} containers for {} attempts: {run}",
                creates.len(),
                attempts.len()
            );
            let mut dropped_sum = 0u64;
            for attempt in &attempts {
                let n = attempt["attempt"].as_u64().expect("attempt number");
                let created = creates.iter().filter(|e| e.attempt == Some(n)).count();
                assert!(
                    created <= 1,
                    "run {id} attempt {n}: {created} containers: {run}"
                );
                if let Some(code) = attempt["exit_code"].as_i64() {
                    let died: Vec<i64> = events
                        .iter()
                        .filter(|e| e.action == "die" && &e.run_id == id && e.attempt == Some(n))
                        .filter_map(|e| e.exit_code)
                        .collect();
                    assert_eq!(
                        died.last(),
                        Some(&code),
                        "run {id} attempt {n}: stored exit code {code}, docker reported {died:?}: {run}"
                    );
                }
                let dropped = attempt["log_dropped_bytes"].as_u64().unwrap_or(0);
                dropped_sum += dropped;
                if dropped > 0 {
                    assert_eq!(
                        run["logs_truncated"], true,
                        "run {id}: attempt {n} dropped {dropped} bytes but the run is not flagged: {run}"
                    );
                    continue;
                }
                if run["logs_truncated"] == true && run["attempts"].is_null() {
                    continue;
                }
                match self.logs.get(&(id.clone(), n)) {
                    Some(LogExpect::Exact(want)) => {
                        let (status, got) = api.attempt_log(id, Some(n)).await;
                        assert_eq!(status, 200, "logs of {id} attempt {n}");
                        assert!(
                            got == *want,
                            "run {id} attempt {n}: log not complete and not flagged: {}\n{run}",
                            log_difference(&got, want)
                        );
                    }
                    Some(LogExpect::Len(want)) => {
                        let got = api.attempt_log_len(id, n).await;
                        assert_eq!(
                            got, *want,
                            "run {id} attempt {n}: log length, not flagged: {run}"
                        );
                    }
                    None => {}
                }
            }
            for (run_id, n) in self.logs.keys() {
                assert!(
                    run_id != id || attempts.iter().any(|a| a["attempt"] == *n),
                    "run {id}: the test expects a log for attempt {n}, which the run does not list: {run}"
                );
            }
            if let Some(total) = run["log_dropped_bytes"].as_u64() {
                assert_eq!(total, dropped_sum, "run {id}: dropped bytes sum: {run}");
            }
            // A run that ended with its last attempt (not, say, cancelled while it
            // waited for the next one) shows that attempt's exit code.
            if let Some(last) = attempts.last()
                && !run["attempts"].is_null()
                && last["status"] == run["status"]
            {
                assert_eq!(
                    run["exit_code"], last["exit_code"],
                    "run {id}: run exit code is not its last attempt's: {run}"
                );
            }
        }
        finals
    }
}

// ---------------------------------------------------------------------------------
// RabbitMQ mode

/// The worker token every test server and worker shares.
pub const TOKEN: &str = "test-worker-token";

/// `serve` on RabbitMQ (its own queue), with the worker API on and the given lease.
pub fn amqp_server(dir: &Path, queue: &str, lease_ttl: &str) -> Server {
    Server::start(
        dir,
        ServeOptions {
            amqp_queue: Some(queue.to_owned()),
            worker_token: Some(TOKEN.to_owned()),
            lease_ttl: Some(lease_ttl.to_owned()),
            ..ServeOptions::default()
        },
    )
}

/// A `tasuki worker` with a fixed id.
pub fn worker(id: &str, concurrency: u32) -> WorkerSpec {
    WorkerSpec {
        worker_id: Some(id.to_owned()),
        concurrency,
        ..WorkerSpec::default()
    }
}

/// Wait until `serve` declared queue `name`: a publish to a queue that does not
/// exist yet is dropped by the broker.
pub async fn wait_for_queue(name: &str) {
    let conn = lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        // A passive declare of a missing queue closes its channel: a new one each try.
        let channel = conn.create_channel().await.unwrap();
        let passive = lapin::options::QueueDeclareOptions {
            passive: true,
            ..lapin::options::QueueDeclareOptions::default()
        };
        if channel
            .queue_declare(name.into(), passive, lapin::types::FieldTable::default())
            .await
            .is_ok()
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "serve never declared {name}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = conn.close(200, "bye".into()).await;
}

// ---------------------------------------------------------------------------------
// Network namespaces (tests/serial/netns.rs)

impl Process {
    /// Like `spawn_with_env`, in network namespace `netns` (`ip netns exec NETNS tasuki
    /// ...`; `ip` execs the binary, so the PID is tasuki's own), with `bin`: this build
    /// (`BIN`) or another (the rolling upgrade test's previous build).
    pub fn spawn_in_netns(
        bin: &Path,
        netns: &str,
        args: &[String],
        dir: &Path,
        worker_id: &str,
        name: &str,
        env: &[(String, String)],
    ) -> Process {
        let log = dir.join(format!("{name}-{}.log", unique("p")));
        let file = std::fs::File::create(&log).expect("log file");
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", netns])
            .arg(bin)
            .args(args)
            .env("TASUKI_LOG", "info,tasuki=debug");
        for key in SCRUBBED_ENV {
            command.env_remove(key);
        }
        command.envs(env.iter().map(|(k, v)| (k, v)));
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn ip netns exec tasuki");
        Process {
            child,
            log,
            worker_id: worker_id.to_owned(),
        }
    }
}
