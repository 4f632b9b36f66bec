//! Fault tests that stop or reconfigure the services every other test shares
//! (RabbitMQ, the Docker engine). `tests/run.sh` runs this binary in a second pass,
//! one test at a time, after the rest of the suite; each test restores the service in
//! a guard's `Drop`, so it is restored also when the test fails.

#[path = "../e2e/common.rs"]
mod common;
mod netns;
mod rabbit_cluster;

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use common::{
    Invariants, QueueGuard, TOKEN, WorkerSpec, amqp_server, attempts_of, docker_cli, queue_counts,
    start_worker_with, unique, worker,
};

fn rabbitmqctl(args: &[&str]) -> String {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn amqp_reachable() -> bool {
    std::net::TcpStream::connect_timeout(
        &"127.0.0.1:5672".parse().expect("address"),
        Duration::from_secs(1),
    )
    .is_ok()
}

// ---------------------------------------------------------------------------------
// Guards

/// RabbitMQ's application stopped (`stop_app`); started again on drop.
struct BrokerStopped {
    stopped: bool,
}

impl BrokerStopped {
    fn stop() -> Self {
        rabbitmqctl(&["stop_app"]);
        BrokerStopped { stopped: true }
    }

    /// `start_app`, and wait until the broker takes connections again.
    fn start(&mut self) {
        if !self.stopped {
            return;
        }
        self.stopped = false;
        let out = Command::new("rabbitmqctl").arg("start_app").output();
        if let Err(e) = &out {
            eprintln!("rabbitmqctl start_app: {e}");
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while !amqp_reachable() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for BrokerStopped {
    fn drop(&mut self) {
        self.start();
    }
}

/// A `rabbit` application setting changed at run time, put back on drop.
struct RabbitEnv {
    key: &'static str,
    /// What `application:get_env` answered before: `{ok,Value}` or `undefined`.
    previous: String,
}

impl RabbitEnv {
    fn set(key: &'static str, value: &str) -> Self {
        let previous = rabbitmqctl(&["eval", &format!("application:get_env(rabbit, {key}).")]);
        assert!(
            previous == "undefined" || (previous.starts_with("{ok,") && previous.ends_with('}')),
            "unexpected answer for {key}: {previous}"
        );
        let guard = RabbitEnv { key, previous };
        rabbitmqctl(&[
            "eval",
            &format!("application:set_env(rabbit, {key}, {value})."),
        ]);
        guard
    }
}

impl Drop for RabbitEnv {
    fn drop(&mut self) {
        let expr = match self
            .previous
            .strip_prefix("{ok,")
            .and_then(|v| v.strip_suffix('}'))
        {
            Some(value) => format!("application:set_env(rabbit, {}, {value}).", self.key),
            None => format!("application:unset_env(rabbit, {}).", self.key),
        };
        let out = Command::new("rabbitmqctl").args(["eval", &expr]).output();
        match out {
            Ok(o) if o.status.success() => {}
            other => eprintln!("restoring rabbit {}: {other:?}", self.key),
        }
    }
}

const DOCKER_PID_FILE: &str = "/var/run/docker.pid";

fn docker_up() -> bool {
    Command::new(docker_cli())
        .arg("info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn dockerd_pid() -> Option<u32> {
    std::fs::read_to_string(DOCKER_PID_FILE)
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses; a zombie has ended.
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Start dockerd the way `tests/run.sh` does, and wait for `docker info`.
fn start_dockerd() {
    let status = Command::new("sh")
        .arg("-c")
        .arg(r#"setsid -f nohup "$(command -v dockerd || echo /usr/sbin/dockerd)" >>/var/log/tasuki-dockerd.log 2>&1 </dev/null"#)
        .status();
    if let Err(e) = status {
        eprintln!("starting dockerd: {e}");
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while !docker_up() {
        if Instant::now() > deadline {
            eprintln!("dockerd did not come back in 60 s; see /var/log/tasuki-dockerd.log");
            return;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The local dockerd, stopped by its PID (SIGTERM) and started again on drop.
struct DockerdStopped {
    stopped: bool,
}

impl DockerdStopped {
    /// `None` when the engine is not a local dockerd this test can restart.
    fn stop() -> Option<Self> {
        let pid = dockerd_pid().filter(|pid| process_alive(*pid))?;
        let status = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .ok()?;
        if !status.success() {
            return None;
        }
        let guard = DockerdStopped { stopped: true };
        let deadline = Instant::now() + Duration::from_secs(60);
        while process_alive(pid) {
            assert!(
                Instant::now() < deadline,
                "dockerd ({pid}) still running 60 s after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(guard)
    }

    fn start(&mut self) {
        if self.stopped {
            self.stopped = false;
            start_dockerd();
        }
    }
}

impl Drop for DockerdStopped {
    fn drop(&mut self) {
        self.start();
    }
}

// 1 ---------------------------------------------------------------------------------

#[tokio::test]
async fn rabbitmq_outage_30s_every_accepted_run_finishes() {
    let d = tempfile::tempdir().expect("temp dir");
    let queue = unique("tasuki-serial");
    let _queue = QueueGuard(queue.clone());
    let worker_id = unique("test-worker");
    let mut inv = Invariants::start(&[&worker_id]);
    let server = amqp_server(d.path(), &queue, "10s");
    let api = server.client();
    let worker = start_worker_with(d.path(), &server, &queue, TOKEN, worker(&worker_id, 2));

    let first = api.run_and_wait("exit", json!({"code": "0"})).await;
    inv.accepted(first["id"].as_str().expect("id"));
    // A run in flight when the broker goes: it was acked already.
    let busy = api.accept("sleep", json!({"seconds": "5"})).await;
    inv.accepted(&busy);
    api.wait_log_contains(&busy, "sleeping 5", Duration::from_secs(60))
        .await;

    let mut broker = BrokerStopped::stop();
    let stopped_at = Instant::now();
    let mut during = Vec::new();
    let mut saw_not_ready = false;
    while stopped_at.elapsed() < Duration::from_secs(30) {
        let id = api.accept("exit", json!({"code": "0"})).await;
        inv.accepted(&id);
        inv.expect_log(&id, 1, "exiting with 0\n");
        during.push(id);
        let (status, ready) = api.get("/readyz").await;
        if status == 503 {
            assert!(ready.to_string().contains("broker"), "{ready}");
            saw_not_ready = true;
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    assert!(saw_not_ready, "/readyz never said the broker was down");
    broker.start();
    assert!(amqp_reachable(), "RabbitMQ did not come back");

    // Every run accepted while the broker was away runs once it is back.
    for id in during.iter().chain([&busy]) {
        let run = api.wait_final(id, Duration::from_secs(120)).await;
        assert_eq!(run["status"], "succeeded", "{run}");
        assert_eq!(attempts_of(&run).len(), 1, "{run}");
    }
    let after = api.run_and_wait("exit", json!({"code": "0"})).await;
    inv.accepted(after["id"].as_str().expect("id"));
    inv.expect_log(&busy, 1, "sleeping 5\nwoke\n");
    inv.check(&api).await;
    assert_eq!(queue_counts(&queue), (0, 0));
    drop(worker);
}

// 5 ---------------------------------------------------------------------------------

/// The broker closes a channel that holds a delivery unacked past the timeout.
async fn broker_enforces_consumer_timeout(scratch: &str, within: Duration) {
    use futures::StreamExt;
    use lapin::options::{BasicConsumeOptions, QueueDeclareOptions};
    use lapin::types::FieldTable;
    let conn =
        lapin::Connection::connect(&common::amqp_url(), lapin::ConnectionProperties::default())
            .await
            .expect("connect");
    let channel = conn.create_channel().await.expect("channel");
    channel
        .queue_declare(
            scratch.into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("declare scratch queue");
    common::publish_raw(scratch, b"hold me").await;
    let mut consumer = channel
        .basic_consume(
            scratch.into(),
            "holder".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let delivery = consumer.next().await.expect("a delivery").expect("ok");
    let deadline = Instant::now() + within;
    while channel.status().connected() {
        assert!(
            Instant::now() < deadline,
            "the broker did not enforce the lowered consumer timeout"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(delivery);
    let _ = conn.close(200, "bye".into()).await;
}

#[tokio::test]
async fn job_longer_than_consumer_timeout_is_not_redelivered() {
    // Lowered before any connection of this test opens: a channel reads both at start.
    let _timeout = RabbitEnv::set("consumer_timeout", "5000");
    let _tick = RabbitEnv::set("channel_tick_interval", "1000");
    let scratch = unique("tasuki-serial-hold");
    let _scratch = QueueGuard(scratch.clone());
    broker_enforces_consumer_timeout(&scratch, Duration::from_secs(30)).await;

    let d = tempfile::tempdir().expect("temp dir");
    let queue = unique("tasuki-serial");
    let _queue = QueueGuard(queue.clone());
    let worker_id = unique("test-worker");
    let mut inv = Invariants::start(&[&worker_id]);
    let server = amqp_server(d.path(), &queue, "5s");
    let api = server.client();
    let worker = start_worker_with(d.path(), &server, &queue, TOKEN, worker(&worker_id, 2));

    // Three times the consumer timeout.
    let long = api.accept("sleep", json!({"seconds": "15"})).await;
    inv.accepted(&long);
    api.wait_log_contains(&long, "sleeping 15", Duration::from_secs(60))
        .await;
    // Other deliveries keep flowing through the free slot meanwhile.
    let mut short = Vec::new();
    for _ in 0..4 {
        let run = api.run_and_wait("exit", json!({"code": "0"})).await;
        let id = run["id"].as_str().expect("id").to_owned();
        inv.accepted(&id);
        inv.expect_log(&id, 1, "exiting with 0\n");
        short.push(id);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let run = api.run(&long).await;
    assert_eq!(run["status"], "running", "{run}");

    let run = api.wait_final(&long, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["attempt"], 1, "{run}");
    assert_eq!(attempts_of(&run).len(), 1, "{run}");
    let log = worker.log_text();
    assert!(
        !log.contains("duplicate delivery dropped"),
        "redelivered:\n{log}"
    );
    assert!(
        !log.contains("acknowledgement"),
        "the broker closed the worker's channel:\n{log}"
    );
    inv.expect_log(&long, 1, "sleeping 15\nwoke\n");
    inv.check(&api).await;
    assert_eq!(inv.containers_created(&long), 1);
    assert_eq!(queue_counts(&queue), (0, 0));
}

// 10 --------------------------------------------------------------------------------

#[tokio::test]
async fn docker_daemon_restart_mid_run_ends_with_true_status() {
    if dockerd_pid().is_none_or(|pid| !process_alive(pid)) {
        eprintln!(
            "skipped: no local dockerd in {DOCKER_PID_FILE} to restart (the engine is not the one tests/run.sh starts)"
        );
        return;
    }
    let d = tempfile::tempdir().expect("temp dir");
    let queue = unique("tasuki-serial");
    let _queue = QueueGuard(queue.clone());
    let worker_id = unique("test-worker");
    let mut inv = Invariants::start(&[&worker_id]);
    let server = amqp_server(d.path(), &queue, "10s");
    let api = server.client();
    let mut worker = start_worker_with(
        d.path(),
        &server,
        &queue,
        TOKEN,
        WorkerSpec {
            env: vec![("TASUKI_RECONCILE_INTERVAL".into(), "5s".into())],
            ..worker(&worker_id, 2)
        },
    );

    let id = api.accept("sleep", json!({"seconds": "120"})).await;
    inv.accepted(&id);
    api.wait_log_contains(&id, "sleeping 120", Duration::from_secs(60))
        .await;

    {
        let mut engine = DockerdStopped::stop().expect("stop dockerd");
        // The worker keeps going while the engine is away.
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(
            worker.exited().is_none(),
            "worker died:\n{}",
            worker.log_text()
        );
        engine.start();
    }
    assert!(docker_up(), "dockerd did not come back");
    inv.resume_events();

    // Without live-restore the engine stopped the container; the run ends with the
    // exit code Docker recorded, not hanging and not made up.
    let run = api.wait_final(&id, Duration::from_secs(180)).await;
    let died: Vec<i64> = inv
        .events()
        .iter()
        .filter(|e| e.action == "die" && e.run_id == id)
        .filter_map(|e| e.exit_code)
        .collect();
    let docker_says = *died.last().expect("docker reported the container's death");
    eprintln!("docker: exit code {docker_says}; run: {run}");
    assert_eq!(run["exit_code"], docker_says, "{run}");
    let expected_status = if docker_says == 0 {
        "succeeded"
    } else {
        "failed"
    };
    assert_eq!(run["status"], expected_status, "{run}");
    assert_eq!(attempts_of(&run).len(), 1, "{run}");

    // The worker talks to the new engine.
    let after = api.run_and_wait("exit", json!({"code": "0"})).await;
    assert_eq!(after["status"], "succeeded", "{after}");
    let after_id: Value = after["id"].clone();
    inv.accepted(after_id.as_str().expect("id"));
    inv.expect_log(&id, 1, "sleeping 120\n");
    inv.check(&api).await;
    assert_eq!(inv.containers_created(&id), 1);
    assert!(
        worker.exited().is_none(),
        "worker died:\n{}",
        worker.log_text()
    );
}
