//! A RabbitMQ cluster of three nodes of the test's own on this machine (own node names,
//! ports, data and cookie; the system node is left alone), and a node of it stopped
//! under load while `serve` and two workers, each given the three nodes' URLs, carry on.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::{BIN, Invariants, Process, ServeOptions, Server, TOKEN, unique};

/// The scripts themselves: Debian's `/usr/sbin` wrappers would `su rabbitmq` (and so
/// take that user's cookie and home).
fn rabbit_script(name: &str) -> String {
    let debian = format!("/usr/lib/rabbitmq/bin/{name}");
    if Path::new(&debian).exists() {
        debian
    } else {
        name.to_owned()
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

struct Node {
    name: String,
    port: u16,
    dir: PathBuf,
    server: Option<Child>,
}

/// Three `rabbitmq-server` nodes joined into one cluster; every node is stopped on drop.
pub struct RabbitCluster {
    /// HOME of the nodes and of `rabbitmqctl`: it holds their cookie.
    home: tempfile::TempDir,
    nodes: Vec<Node>,
}

impl RabbitCluster {
    /// Start three nodes and join the second and third to the first; returns once
    /// `cluster_status` lists three running nodes.
    pub fn start() -> RabbitCluster {
        // Named after this test process, so that tests/setup.sh's sweep can tell the
        // nodes of a test the runner killed (their VMs' pid files are in here).
        let home = tempfile::Builder::new()
            .prefix(&format!("tsk-rabbit-{}-", std::process::id()))
            .tempdir()
            .expect("temp dir");
        let cookie = home.path().join(".erlang.cookie");
        std::fs::write(&cookie, unique("tskcookie").replace('-', "")).expect("cookie");
        set_mode(&cookie, 0o400);
        std::fs::write(home.path().join("rabbitmq-env.conf"), "").expect("env conf");
        let tag = std::process::id();
        let mut cluster = RabbitCluster {
            nodes: ["a", "b", "c"]
                .iter()
                .map(|n| Node {
                    name: format!("tsk-{n}-{tag}@localhost"),
                    port: free_port(),
                    dir: home.path().join(n),
                    server: None,
                })
                .collect(),
            home,
        };
        for i in 0..cluster.nodes.len() {
            cluster.spawn_node(i);
        }
        for i in 0..cluster.nodes.len() {
            cluster.wait_listening(i, Duration::from_secs(60));
        }
        let first = cluster.nodes[0].name.clone();
        for i in 1..cluster.nodes.len() {
            cluster.ctl(i, &["stop_app"]);
            cluster.ctl(i, &["join_cluster", &first]);
            cluster.ctl(i, &["start_app"]);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let running = cluster.running_nodes(0);
            if running.len() == 3 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster did not form: running {running:?}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        for i in 0..cluster.nodes.len() {
            cluster.wait_listening(i, Duration::from_secs(60));
        }
        cluster
    }

    fn spawn_node(&mut self, i: usize) {
        let home = self.home.path().to_owned();
        let node = &mut self.nodes[i];
        for sub in ["mnesia", "log"] {
            std::fs::create_dir_all(node.dir.join(sub)).expect("node dir");
        }
        // No plugins: no management listener, no port besides AMQP and distribution.
        std::fs::write(node.dir.join("enabled_plugins"), "[].\n").expect("plugins");
        std::fs::write(
            node.dir.join("rabbitmq.conf"),
            format!(
                "listeners.tcp.local = 127.0.0.1:{}\nloopback_users = none\n",
                node.port
            ),
        )
        .expect("rabbitmq.conf");
        let out = std::fs::File::create(node.dir.join("server.out")).expect("server.out");
        let err = out.try_clone().expect("server.out");
        let dir = |sub: &str| node.dir.join(sub).display().to_string();
        let child = Command::new(rabbit_script("rabbitmq-server"))
            .envs(ctl_env(&home))
            .env("RABBITMQ_NODENAME", &node.name)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", node.port.to_string())
            .env("RABBITMQ_DIST_PORT", free_port().to_string())
            .env("RABBITMQ_MNESIA_BASE", dir("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir("log"))
            .env("RABBITMQ_PID_FILE", dir("pid"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir("enabled_plugins"))
            .env("RABBITMQ_CONFIG_FILE", dir("rabbitmq.conf"))
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}",
            )
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn rabbitmq-server (Debian package rabbitmq-server: tests/setup.sh ensure_rabbitmq)");
        node.server = Some(child);
    }

    fn wait_listening(&mut self, i: usize, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.listening(i) {
            if let Some(child) = self.nodes[i].server.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "{} exited with {status}:\n{}",
                    self.nodes[i].name,
                    std::fs::read_to_string(self.nodes[i].dir.join("server.out"))
                        .unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} does not take connections after {within:?}",
                self.nodes[i].name
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Whether node `i` takes AMQP connections.
    pub fn listening(&self, i: usize) -> bool {
        std::net::TcpStream::connect_timeout(
            &std::net::SocketAddr::from(([127, 0, 0, 1], self.nodes[i].port)),
            Duration::from_secs(1),
        )
        .is_ok()
    }

    pub fn url(&self, i: usize) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.nodes[i].port)
    }

    pub fn name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// `rabbitmqctl -n NODE args...`, which must succeed; its output.
    pub fn ctl(&self, i: usize, args: &[&str]) -> String {
        let out = self
            .ctl_command(i, args)
            .output()
            .expect("spawn rabbitmqctl");
        assert!(
            out.status.success(),
            "rabbitmqctl -n {} {args:?}: {}{}",
            self.nodes[i].name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn ctl_command(&self, i: usize, args: &[&str]) -> Command {
        let mut command = Command::new(rabbit_script("rabbitmqctl"));
        command
            .envs(ctl_env(self.home.path()))
            .args(["-n", &self.nodes[i].name])
            .args(args)
            .stdin(Stdio::null());
        command
    }

    /// The running nodes, as node `i` sees them.
    pub fn running_nodes(&self, i: usize) -> Vec<String> {
        let out = self
            .ctl_command(i, &["cluster_status", "--formatter", "json"])
            .output()
            .expect("spawn rabbitmqctl");
        let status: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        status["running_nodes"]
            .as_array()
            .map(|nodes| {
                nodes
                    .iter()
                    .filter_map(|n| n.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// `stop_app` on node `i`: the Erlang node stays up, the broker on it goes (it
    /// closes its clients' connections and stops listening).
    pub fn stop_app(&self, i: usize) {
        self.ctl(i, &["stop_app"]);
    }

    /// `start_app` on node `i`, and wait until it takes connections again.
    pub fn start_app(&mut self, i: usize) {
        self.ctl(i, &["start_app"]);
        self.wait_listening(i, Duration::from_secs(60));
    }
}

/// What every node and `rabbitmqctl` call is given: the temp HOME (its cookie) and an
/// empty env file instead of the system's `/etc/rabbitmq/rabbitmq-env.conf`, which
/// names the system node.
fn ctl_env(home: &Path) -> Vec<(String, String)> {
    vec![
        ("HOME".into(), home.display().to_string()),
        (
            "RABBITMQ_CONF_ENV_FILE".into(),
            home.join("rabbitmq-env.conf").display().to_string(),
        ),
        ("ERL_EPMD_ADDRESS".into(), "127.0.0.1".into()),
    ]
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

impl Drop for RabbitCluster {
    fn drop(&mut self) {
        for i in (0..self.nodes.len()).rev() {
            let pid: Option<u32> = std::fs::read_to_string(self.nodes[i].dir.join("pid"))
                .ok()
                .and_then(|p| p.trim().parse().ok());
            let stopped = self
                .ctl_command(i, &["stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            // The VM by the PID in its pid file, if `stop` could not reach it.
            if let Some(pid) = pid {
                let deadline = Instant::now() + Duration::from_secs(if stopped { 15 } else { 0 });
                while pid_alive(pid) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(100));
                }
                if pid_alive(pid) {
                    eprintln!("{}: killing its VM ({pid})", self.nodes[i].name);
                    let _ = Command::new("kill")
                        .args(["-KILL", &pid.to_string()])
                        .status();
                }
            }
            if let Some(mut child) = self.nodes[i].server.take() {
                if !matches!(child.try_wait(), Ok(Some(_))) {
                    std::thread::sleep(Duration::from_millis(500));
                }
                if matches!(child.try_wait(), Ok(None)) {
                    let _ = child.kill();
                }
                let _ = child.wait();
            }
            if std::thread::panicking() {
                let log = self.nodes[i].dir.join("server.out");
                eprintln!(
                    "----- {} -----\n{}",
                    log.display(),
                    tail(&std::fs::read_to_string(&log).unwrap_or_default(), 3000)
                );
            }
        }
    }
}

fn tail(text: &str, bytes: usize) -> &str {
    let mut start = text.len().saturating_sub(bytes);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

// ---------------------------------------------------------------------------------

/// What the load saw: the runs accepted (with the log each must have) and when the
/// API answered.
#[derive(Default)]
struct Load {
    accepted: Vec<(String, Vec<u8>)>,
    /// When each accepted POST returned.
    answered: Vec<Instant>,
    refused: Vec<String>,
}

/// Submit runs through the API until `stop`: mostly `exit` 0 or 3, and every seventh
/// a `sleep` of 3 to 5 s.
async fn submit(api: reqwest::Client, base: String, stop: Arc<AtomicBool>) -> Load {
    let mut load = Load::default();
    let mut n = 0u32;
    while !stop.load(Ordering::SeqCst) {
        n += 1;
        let (job, params, log) = if n.is_multiple_of(7) {
            let s = 3 + n % 3;
            (
                "sleep",
                json!({"seconds": s.to_string()}),
                format!("sleeping {s}\nwoke\n"),
            )
        } else {
            let code = if n.is_multiple_of(2) { 0 } else { 3 };
            (
                "exit",
                json!({"code": code.to_string()}),
                format!("exiting with {code}\n"),
            )
        };
        let sent = api
            .post(format!("{base}/v1/jobs/{job}/runs"))
            .timeout(Duration::from_secs(30))
            .body(json!({ "params": params }).to_string())
            .send()
            .await;
        match sent {
            Ok(response) if response.status().as_u16() == 202 => {
                let body: Value = response.json().await.expect("JSON");
                let id = body["id"].as_str().expect("id").to_owned();
                load.accepted.push((id, log.into_bytes()));
                load.answered.push(Instant::now());
            }
            Ok(response) => load.refused.push(format!(
                "{}: {}",
                response.status(),
                response.text().await.unwrap_or_default()
            )),
            Err(e) => load.refused.push(e.to_string()),
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    load
}

/// The longest time between two answers, counting from `from` up to `to`.
fn longest_gap(answered: &[Instant], from: Instant, to: Instant) -> Duration {
    let mut last = from;
    let mut longest = Duration::ZERO;
    for &t in answered.iter().filter(|t| **t > from && **t <= to) {
        longest = longest.max(t - last);
        last = t;
    }
    longest.max(to.saturating_duration_since(last))
}

fn worker_process(dir: &Path, server: &Server, queue: &str, id: &str, urls: &[String]) -> Process {
    let mut args: Vec<String> = vec![
        "worker".into(),
        "--server".into(),
        server.url.clone(),
        "--worker-token".into(),
        TOKEN.into(),
        "--queue".into(),
        queue.into(),
        "--queue-type".into(),
        "quorum".into(),
        "--worker-id".into(),
        id.into(),
        "--concurrency".into(),
        "3".into(),
        "--drain-timeout".into(),
        "20s".into(),
    ];
    for url in urls {
        args.extend(["--amqp-url".into(), url.clone()]);
    }
    Process::spawn_with_env(&args, dir, id, "worker", &[])
}

/// Wait until `process`'s log, past its first `skip` bytes, has `needle`; how long,
/// and the line.
async fn wait_log(
    process: &Process,
    skip: usize,
    needle: &str,
    within: Duration,
) -> (Duration, String) {
    let start = Instant::now();
    loop {
        let text = process.log_text();
        if let Some(line) = text
            .get(skip..)
            .and_then(|t| t.lines().find(|l| l.contains(needle)))
        {
            return (start.elapsed(), line.to_owned());
        }
        assert!(
            start.elapsed() < within,
            "{} has no {needle:?} after {within:?}:\n{}",
            process.log.display(),
            tail(&text, 4000)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbit_cluster_node_stopped_under_load_every_accepted_run_finishes() {
    assert!(Path::new(BIN).exists());
    let formed = Instant::now();
    let cluster = tokio::task::spawn_blocking(RabbitCluster::start)
        .await
        .expect("cluster");
    eprintln!(
        "cluster of {}, {}, {} formed in {:.1?}",
        cluster.name(0),
        cluster.name(1),
        cluster.name(2),
        formed.elapsed()
    );
    let urls = |order: [usize; 3]| order.map(|i| cluster.url(i)).to_vec();

    let d = tempfile::tempdir().expect("temp dir");
    let queue = unique("tasuki-cluster");
    let w1 = unique("test-worker-c1");
    let w2 = unique("test-worker-c2");
    let mut inv = Invariants::start(&[&w1, &w2]);
    let mut extra_args: Vec<String> = vec![
        "--queue".into(),
        queue.clone(),
        "--request-queue".into(),
        format!("{queue}.requests"),
        "--queue-type".into(),
        "quorum".into(),
    ];
    for url in urls([0, 1, 2]) {
        extra_args.extend(["--amqp-url".into(), url]);
    }
    let server = Server::start(
        d.path(),
        ServeOptions {
            worker_token: Some(TOKEN.into()),
            lease_ttl: Some("10s".into()),
            extra_args,
            ..ServeOptions::default()
        },
    );
    let api = server.client();
    // Node a: serve and the first worker; node b: the second worker.
    let mut worker1 = worker_process(d.path(), &server, &queue, &w1, &urls([0, 2, 1]));
    let mut worker2 = worker_process(d.path(), &server, &queue, &w2, &urls([1, 2, 0]));
    for p in [&server.process, &worker1, &worker2] {
        wait_log(p, 0, "connected to the broker", Duration::from_secs(30)).await;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(submit(api.http.clone(), api.base.clone(), stop.clone()));
    // Runs in flight when the node goes: a long one has started.
    let busy = api.accept("sleep", json!({"seconds": "5"})).await;
    inv.accepted(&busy);
    inv.expect_log(&busy, 1, "sleeping 5\nwoke\n");
    api.wait_log_contains(&busy, "sleeping 5", Duration::from_secs(60))
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let skip = [&server.process, &worker1, &worker2].map(|p| p.log_text().len());
    let stopped_at = Instant::now();
    let stopping = tokio::task::spawn_blocking(move || {
        cluster.stop_app(0);
        cluster
    });
    // serve's publisher reconnects at its next publish, its request consumer after a
    // pause; the worker on node a when it next takes a delivery. Each starts at the
    // node after a: "connected to the broker", or "... to the next broker" past a
    // node that did not answer. Timed from the start of `stop_app`.
    let within = Duration::from_secs(30);
    let (serve_back, worker_back) = tokio::join!(
        wait_log(&server.process, skip[0], "connected to the ", within),
        wait_log(&worker1, skip[1], "connected to the ", within),
    );
    let ((serve_back, serve_line), (worker_back, worker_line)) = (serve_back, worker_back);
    let mut cluster = stopping.await.expect("stop_app");
    eprintln!(
        "stop_app {} took {:.1?}; serve reconnected after {serve_back:.1?} ({serve_line}), worker {w1} after {worker_back:.1?} ({worker_line})",
        cluster.name(0),
        stopped_at.elapsed(),
    );
    while stopped_at.elapsed() < Duration::from_secs(15) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let restart = Instant::now();
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.start_app(0);
        cluster
    })
    .await
    .expect("start_app");
    let restarted_at = Instant::now();
    eprintln!("{} back in {:.1?}", cluster.name(0), restart.elapsed());
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, Ordering::SeqCst);
    let load = load.await.expect("load");

    let gap = longest_gap(&load.answered, stopped_at, restarted_at);
    let sleeps = load
        .accepted
        .iter()
        .filter(|(_, log)| log.starts_with(b"sleeping"))
        .count();
    eprintln!(
        "accepted {} runs ({} sleeps), {} refused; longest gap between API answers while {} was down: {gap:.2?}",
        load.accepted.len(),
        sleeps,
        load.refused.len(),
        cluster.name(0)
    );
    assert!(load.refused.is_empty(), "refused: {:?}", load.refused);
    assert!(
        gap < Duration::from_secs(30),
        "the API did not answer for {gap:?}"
    );
    let during = load
        .answered
        .iter()
        .filter(|t| **t > stopped_at && **t <= restarted_at)
        .count();
    assert!(during > 0, "no run accepted while the node was down");
    for (id, log) in &load.accepted {
        inv.accepted(id);
        inv.expect_log(id, 1, log.clone());
    }
    let finals = inv.check(&api).await;
    for (id, log) in &load.accepted {
        let run = &finals[id];
        let want = if log.starts_with(b"exiting with 3") {
            "failed"
        } else {
            "succeeded"
        };
        assert_eq!(run["status"], want, "{run}");
        assert_eq!(run["attempts"].as_array().map(Vec::len), Some(1), "{run}");
    }
    // Every process is still up, and the cluster has its three nodes again.
    for p in [&mut worker1, &mut worker2] {
        assert!(p.exited().is_none(), "a worker exited:\n{}", p.log_text());
    }
    let running = tokio::task::spawn_blocking(move || {
        let running = cluster.running_nodes(1);
        (cluster, running)
    })
    .await
    .expect("cluster status");
    assert_eq!(running.1.len(), 3, "{:?}", running.1);
    drop((worker1, worker2, server));
    drop(running.0);
}
