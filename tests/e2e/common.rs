//! Fixtures: a real `tasuki serve` / `tasuki worker` process in its own temp dir, with
//! its own port, queue and worker id, and cleanup of every container it started.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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

impl Process {
    fn spawn(args: &[String], dir: &Path, worker_id: &str, name: &str) -> Process {
        let log = dir.join(format!("{name}-{}.log", unique("p")));
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(BIN)
            .args(args)
            .env("TASUKI_LOG", "info,tasuki=debug")
            .env_remove("TASUKI_AMQP_URL")
            .env_remove("TASUKI_SERVER")
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
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            amqp_queue: None,
            embedded_worker: false,
            worker_token: None,
            concurrency: 2,
            jobs_dir: test_jobs_dir(),
        }
    }
}

/// `tasuki serve` on a free loopback port with its own data dir.
pub struct Server {
    pub process: Process,
    pub url: String,
    port: u16,
    args: Vec<String>,
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

impl Server {
    pub fn start(dir: &Path, options: ServeOptions) -> Server {
        let worker_id = unique("test-serve");
        let data_dir = dir.join("data");
        let port = free_port();
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
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
        let process = Process::spawn(&args, dir, &worker_id, "serve");
        let mut server = Server {
            process,
            url: format!("http://127.0.0.1:{port}"),
            port,
            args,
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
        let fresh = Process::spawn(&self.args, dir, &worker_id, "serve");
        let old = std::mem::replace(&mut self.process, fresh);
        // The old process is gone already; don't let its drop remove the new one's
        // containers.
        std::mem::forget(old);
        self.wait_healthy();
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
    let worker_id = unique("test-worker");
    let args: Vec<String> = vec![
        "worker".into(),
        "--server".into(),
        server.url.clone(),
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
        "20s".into(),
    ];
    Process::spawn(&args, dir, &worker_id, "worker")
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
