//! Hardened containers through the real `tasuki serve` and Docker: a probe image tries
//! every escape it can think of and finds each blocked; `docker inspect` shows the
//! hardening; the server's `[containers]` policy refuses what it does not allow, at
//! `jobs check` and at start-up, and lets through what it does.
//!
//! The probe image (tests/hardening-probe/) is built here from Debian's static busybox
//! with a unique tag and removed when the test ends.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::{BIN, ServeOptions, Server, docker_cli, unique};

/// A FROM-scratch image with busybox, a setuid-root copy of it and `probe.sh`.
struct ProbeImage {
    tag: String,
}

impl ProbeImage {
    fn build() -> ProbeImage {
        let busybox = PathBuf::from(std::env::var("BUSYBOX").unwrap_or("/bin/busybox".into()));
        let ldd = Command::new("ldd").arg(&busybox).output();
        assert!(
            busybox.exists() && !ldd.is_ok_and(|o| o.status.success()),
            "{} must be a static busybox (Debian's busybox-static)",
            busybox.display()
        );
        let context = tempfile::tempdir().expect("build context");
        let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/hardening-probe");
        for file in ["Dockerfile", "probe.sh"] {
            std::fs::copy(here.join(file), context.path().join(file)).expect("copy probe file");
        }
        std::fs::copy(&busybox, context.path().join("busybox")).expect("copy busybox");
        let tag = format!("tasuki-probe:{}", unique("t"));
        let out = Command::new(docker_cli())
            .args(["build", "-q", "-t", &tag])
            .arg(context.path())
            .env("DOCKER_BUILDKIT", "0")
            .output()
            .expect("docker build");
        assert!(
            out.status.success(),
            "docker build failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        ProbeImage { tag }
    }
}

impl Drop for ProbeImage {
    fn drop(&mut self) {
        let _ = Command::new(docker_cli())
            .args(["rmi", "-f", &self.tag])
            .output();
    }
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// A `tasuki.toml` with this `[containers]` section.
fn server_config(dir: &Path, containers: &str) -> PathBuf {
    let path = dir.join("tasuki.toml");
    write(&path, &format!("[containers]\n{containers}"));
    path
}

fn serve(dir: &Path, jobs: &Path, config: &Path) -> Server {
    Server::start(
        dir,
        ServeOptions {
            jobs_dir: jobs.to_owned(),
            env: vec![("TASUKI_CONFIG".into(), config.display().to_string())],
            ..ServeOptions::default()
        },
    )
}

/// `HostConfig` and `Mounts` of a run's first container, while it runs.
fn inspect(run_id: &str) -> Value {
    let name = format!("tasuki-{run_id}-1");
    let out = Command::new(docker_cli())
        .args(["inspect", &name])
        .output()
        .expect("docker inspect");
    assert!(
        out.status.success(),
        "docker inspect {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let all: Value = serde_json::from_slice(&out.stdout).expect("inspect JSON");
    all[0].clone()
}

/// The run's spec as the store froze it.
async fn frozen_spec(data_dir: &Path, run_id: &str) -> Value {
    use sqlx::sqlite::SqliteConnectOptions;
    let options = SqliteConnectOptions::new()
        .filename(data_dir.join("tasuki.db"))
        .read_only(true);
    let pool = sqlx::SqlitePool::connect_with(options)
        .await
        .expect("open the run store");
    let spec: String = sqlx::query_scalar("SELECT spec FROM runs WHERE id = ?")
        .bind(run_id)
        .fetch_one(&pool)
        .await
        .expect("the run's spec");
    pool.close().await;
    serde_json::from_str(&spec).expect("spec JSON")
}

/// Checks the hardening every container gets, whatever its job asks.
fn assert_hardened(host: &Value) {
    assert_eq!(host["CapDrop"], json!(["ALL"]), "{host}");
    assert_eq!(host["SecurityOpt"], json!(["no-new-privileges"]), "{host}");
    assert_eq!(host["Privileged"], false, "{host}");
    assert_eq!(host["IpcMode"], "private", "{host}");
    assert_eq!(host["PidMode"], "", "{host}");
    assert_eq!(host["NetworkMode"], "none", "{host}");
    assert_eq!(host["Memory"], host["MemorySwap"], "{host}");
}

/// The `PROBE name: ...` lines of a log, by name.
fn probe_lines(log: &str) -> Vec<(String, String)> {
    log.lines()
        .filter_map(|l| l.strip_prefix("PROBE "))
        .filter_map(|l| l.split_once(": "))
        .map(|(name, verdict)| (name.to_owned(), verdict.to_owned()))
        .collect()
}

fn assert_all_blocked(log: &str, checks: &[&str]) {
    let lines = probe_lines(log);
    for check in checks {
        let verdict = lines
            .iter()
            .find(|(name, _)| name == check)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("no PROBE line for {check}:\n{log}"));
        assert!(
            verdict.starts_with("blocked ("),
            "{check}: {verdict}\n{log}"
        );
    }
    assert!(!log.contains("ALLOWED"), "{log}");
    assert!(log.contains("PROBE done: 0 allowed"), "{log}");
}

const ROOT_CHECKS: &[&str] = &[
    "caps",
    "mount",
    "chown",
    "procsys",
    "rawsock",
    "dockersock",
    "forkbomb",
];
const USER_CHECKS: &[&str] = &[
    "caps",
    "mount",
    "chown",
    "procsys",
    "rawsock",
    "dockersock",
    "rootfs",
    "setuid",
    "forkbomb",
];

fn probe_job(image: &str, extra: &str, checks: &[&str]) -> String {
    let command: Vec<String> = std::iter::once("/probe/probe.sh".to_owned())
        .chain(checks.iter().map(|c| (*c).to_owned()))
        .collect();
    format!(
        "image = \"{image}\"\npull = \"never\"\nnetwork = \"none\"\ntimeout = \"60s\"\n\
         command = {}\n{extra}\n[env]\nFORK_CAP = \"256\"\n",
        json!(command)
    )
}

/// The probe without tasuki's hardening (plain `docker run`, Docker's defaults) must
/// catch what is not blocked there, or its "blocked" would prove nothing.
fn unhardened_probe_finds_escapes(image: &str) {
    for (user, checks, escapes) in [
        (
            "0:0",
            &["caps", "chown", "rawsock", "forkbomb"][..],
            &["caps", "chown", "rawsock", "forkbomb"][..],
        ),
        ("1000:1000", &["setuid"][..], &["setuid"][..]),
    ] {
        let out = Command::new(docker_cli())
            .args(["run", "--rm", "--init", "--network", "none", "-u", user])
            .args(["-e", "FORK_CAP=64", image, "/probe/probe.sh"])
            .args(checks)
            .output()
            .expect("docker run");
        let log = String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success(), "{log}");
        for escape in escapes {
            assert!(
                log.contains(&format!("PROBE {escape}: ALLOWED")),
                "the probe does not catch {escape} without hardening:\n{log}"
            );
        }
    }
}

#[tokio::test]
async fn hardening_probe_finds_every_escape_blocked() {
    let d = tempfile::tempdir().expect("temp dir");
    let image = ProbeImage::build();
    unhardened_probe_finds_escapes(&image.tag);

    let jobs = d.path().join("jobs");
    std::fs::create_dir(&jobs).expect("jobs dir");
    write(
        &jobs.join("probe-root.toml"),
        &probe_job(&image.tag, "pids_limit = 64", ROOT_CHECKS),
    );
    write(
        &jobs.join("probe-user.toml"),
        &probe_job(
            &image.tag,
            "user = \"1000:1000\"\nread_only = true\npids_limit = 64",
            USER_CHECKS,
        ),
    );
    write(
        &jobs.join("idle.toml"),
        &format!(
            "image = \"{}\"\npull = \"never\"\nnetwork = \"none\"\nstop_grace = \"1s\"\n\
             command = [\"sh\", \"-c\", \"echo ready; sleep 60\"]\n",
            image.tag
        ),
    );
    let config = server_config(d.path(), "default_memory = \"256MiB\"\npids_limit = 128\n");
    let server = serve(d.path(), &jobs, &config);
    let api = server.client();

    for (job, checks) in [("probe-root", ROOT_CHECKS), ("probe-user", USER_CHECKS)] {
        let run = api.run_and_wait(job, json!({})).await;
        let id = run["id"].as_str().expect("run id").to_owned();
        let log = String::from_utf8_lossy(&api.logs(&id).await).into_owned();
        eprintln!("{job}:\n{log}");
        assert_eq!(run["status"], "succeeded", "{job}: {run}\n{log}");
        assert_eq!(run["exit_code"], 0, "{job}: {run}\n{log}");
        assert_all_blocked(&log, checks);
        // The pids limit, not the probe's own cap, stopped the fork bomb.
        let started: u32 = log
            .split("a fork failed after ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{job}: no fork failure count in:\n{log}"));
        assert!(
            started < 64,
            "{job}: {started} processes under a limit of 64"
        );
        let spec = frozen_spec(&d.path().join("data"), &id).await;
        assert_eq!(spec["pids_limit"], 64, "{spec}");
        assert_eq!(spec["memory_bytes"], 256 << 20, "{spec}");
    }

    // A job that asks for nothing runs with the server's limits.
    let id = api.accept("idle", json!({})).await;
    api.wait_log_contains(&id, "ready", Duration::from_secs(30))
        .await;
    let container = inspect(&id);
    let host = &container["HostConfig"];
    assert_hardened(host);
    assert_eq!(host["PidsLimit"], 128, "{host}");
    assert_eq!(host["Memory"], 256 << 20, "{host}");
    assert_eq!(host["ReadonlyRootfs"], false, "{host}");
    assert!(
        host["CapAdd"].as_array().is_none_or(Vec::is_empty),
        "{host}"
    );
    let spec = frozen_spec(&d.path().join("data"), &id).await;
    assert_eq!(
        (&spec["pids_limit"], &spec["memory_bytes"]),
        (&json!(128), &json!(256 << 20)),
        "{spec}"
    );
    let cancel = api.post(&format!("/v1/runs/{id}/cancel")).await;
    assert!(cancel.status < 300, "{}", cancel.body);
    api.wait_final(&id, Duration::from_secs(30)).await;
    crate::common::assert_no_containers_left(&server.process.worker_id).await;
}

/// `serve` with this config and jobs: it must refuse to start; its stderr.
fn serve_refuses(dir: &Path, jobs: &Path, config: &Path) -> String {
    let log = dir.join(format!("{}.log", unique("refused-serve")));
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--jobs-dir"])
        .arg(jobs)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(["--worker-id", &unique("refused")])
        .env("TASUKI_CONFIG", config)
        .env_remove("TASUKI_AMQP_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("spawn serve");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "serve started on a forbidden job:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!status.success(), "{stderr}");
    stderr
}

fn jobs_check(jobs: &Path, config: Option<&Path>) -> std::process::Output {
    let mut command = Command::new(BIN);
    command.args(["jobs", "check"]).arg(jobs);
    if let Some(config) = config {
        command.arg("--config").arg(config);
    }
    command
        .env_remove("TASUKI_CONFIG")
        .output()
        .expect("tasuki jobs check")
}

#[test]
fn hardening_forbidden_requests_are_refused_by_jobs_check_and_serve() {
    let d = tempfile::tempdir().expect("temp dir");
    let allowed = d.path().join("allowed");
    std::fs::create_dir(&allowed).expect("allowed dir");
    std::os::unix::fs::symlink("/etc", allowed.join("escape")).expect("symlink");
    let config = server_config(
        d.path(),
        &format!(
            "allowed_capabilities = [\"NET_BIND_SERVICE\"]\nallowed_mounts = [{}]\n",
            json!(allowed.display().to_string())
        ),
    );
    let image = "image = \"tasuki-example:latest\"\nnetwork = \"none\"\n";
    let cases = [
        (
            "caps",
            format!("{image}capabilities = [\"SYS_ADMIN\"]\n"),
            "bad.toml:3: capabilities: SYS_ADMIN is not in [containers] allowed_capabilities (allowed: NET_BIND_SERVICE)",
        ),
        (
            "network",
            "image = \"tasuki-example:latest\"\nnetwork = \"host\"\n".to_owned(),
            "bad.toml:2: network: \"host\" is never allowed",
        ),
        (
            "mount",
            format!("{image}[[mounts]]\nsource = \"/etc\"\ntarget = \"/host-etc\"\n"),
            "bad.toml:4: mounts[0].source: /etc is not under an allowed mount path ([containers] allowed_mounts: ",
        ),
        (
            "symlink",
            format!(
                "{image}[[mounts]]\nsource = {}\ntarget = \"/x\"\n",
                json!(allowed.join("escape").display().to_string())
            ),
            "resolves to /etc (through a symlink), which is not under an allowed mount path",
        ),
        (
            "pids",
            format!("{image}pids_limit = 100000\n"),
            "bad.toml:3: pids_limit: 100000 is above [containers] pids_limit (512)",
        ),
    ];
    for (name, text, want) in cases {
        let jobs = d.path().join(format!("jobs-{name}"));
        std::fs::create_dir(&jobs).expect("jobs dir");
        write(&jobs.join("bad.toml"), &text);
        let out = jobs_check(&jobs, Some(&config));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
        assert!(stderr.contains(want), "{name}: jobs check said:\n{stderr}");
        let said = serve_refuses(d.path(), &jobs, &config);
        assert!(said.contains(want), "{name}: serve said:\n{said}");
    }

    // Without --config, the built-in policy: no capability may be added back.
    let jobs = d.path().join("jobs-default");
    std::fs::create_dir(&jobs).expect("jobs dir");
    write(
        &jobs.join("bind.toml"),
        &format!("{image}capabilities = [\"NET_BIND_SERVICE\"]\n"),
    );
    let out = jobs_check(&jobs, Some(&config));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let out = jobs_check(&jobs, None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("capabilities: NET_BIND_SERVICE is not in [containers] allowed_capabilities (allowed: none)"),
        "{stderr}"
    );
}

#[tokio::test]
async fn hardening_an_allowed_capability_and_read_only_mount_work() {
    let d = tempfile::tempdir().expect("temp dir");
    let allowed = d.path().join("allowed");
    let data = allowed.join("data");
    std::fs::create_dir_all(&data).expect("data dir");
    write(&data.join("hello.txt"), "hello from the host\n");
    let config = server_config(
        d.path(),
        &format!(
            "allowed_capabilities = [\"NET_RAW\"]\nallowed_mounts = [{}]\n",
            json!(allowed.display().to_string())
        ),
    );
    let jobs = d.path().join("jobs");
    std::fs::create_dir(&jobs).expect("jobs dir");
    let script = "cat /data/hello.txt; \
        if touch /data/new 2>/dev/null; then echo 'mount: writable'; else echo 'mount: read-only'; fi; \
        if traceroute -n -m 1 -q 1 -w 1 127.0.0.1 >/dev/null 2>&1; then echo 'raw socket: opened'; \
        else echo 'raw socket: refused'; fi; \
        if : > /tmp/scratch; then echo 'tmp: writable'; fi; \
        echo ready; sleep 60";
    write(
        &jobs.join("loose.toml"),
        &format!(
            "image = \"tasuki-example:latest\"\npull = \"never\"\nnetwork = \"none\"\n\
             stop_grace = \"1s\"\ncommand = [\"sh\", \"-c\", {}]\n\
             capabilities = [\"NET_RAW\"]\nread_only = true\npids_limit = 32\n\
             [[mounts]]\nsource = {}\ntarget = \"/data\"\n\
             [resources]\nmemory = \"64MiB\"\n",
            json!(script),
            json!(data.display().to_string())
        ),
    );
    let out = jobs_check(&jobs, Some(&config));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let source = data.canonicalize().expect("canonical data dir");
    let source = source.display().to_string();
    assert!(
        stdout.contains(&format!(
            "memory 64MiB, pids 32, capabilities NET_RAW, read-only root, mounts {source}:/data:ro"
        )),
        "{stdout}"
    );

    let server = serve(d.path(), &jobs, &config);
    let api = server.client();
    let id = api.accept("loose", json!({})).await;
    api.wait_log_contains(&id, "ready", Duration::from_secs(30))
        .await;
    let container = inspect(&id);
    let host = &container["HostConfig"];
    assert_hardened(host);
    let added: Vec<&str> = host["CapAdd"]
        .as_array()
        .expect("CapAdd")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        added == ["CAP_NET_RAW"] || added == ["NET_RAW"],
        "{added:?}"
    );
    assert_eq!(host["PidsLimit"], 32, "{host}");
    assert_eq!(host["Memory"], 64 << 20, "{host}");
    assert_eq!(host["ReadonlyRootfs"], true, "{host}");
    assert!(host["Tmpfs"]["/tmp"].is_string(), "{host}");
    let mounts = container["Mounts"].as_array().expect("Mounts");
    assert_eq!(mounts.len(), 1, "{mounts:?}");
    assert_eq!(mounts[0]["Type"], "bind");
    assert_eq!(mounts[0]["Source"], source.as_str());
    assert_eq!(mounts[0]["Destination"], "/data");
    assert_eq!(mounts[0]["RW"], false);

    let cancel = api.post(&format!("/v1/runs/{id}/cancel")).await;
    assert!(cancel.status < 300, "{}", cancel.body);
    api.wait_final(&id, Duration::from_secs(30)).await;
    let log = String::from_utf8_lossy(&api.logs(&id).await).into_owned();
    for line in [
        "hello from the host",
        "mount: read-only",
        "raw socket: opened",
        "tmp: writable",
    ] {
        assert!(log.contains(line), "{line:?} missing from:\n{log}");
    }
    assert!(
        !data.join("new").exists(),
        "the container wrote to the host"
    );

    // A reload keeps to the same policy: a job asking for more is refused, naming it.
    write(
        &jobs.join("admin.toml"),
        "image = \"tasuki-example:latest\"\ncapabilities = [\"SYS_ADMIN\"]\n",
    );
    let out = crate::common::tasuki_cli(&server.url, &["jobs", "reload"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("admin.toml:2: capabilities: SYS_ADMIN is not in [containers] allowed_capabilities (allowed: NET_RAW)"),
        "{stderr}"
    );
    let spec = frozen_spec(&d.path().join("data"), &id).await;
    assert_eq!(spec["capabilities"], json!(["NET_RAW"]), "{spec}");
    assert_eq!(spec["read_only"], true, "{spec}");
    assert_eq!(
        spec["mounts"],
        json!([{"source": source, "target": "/data", "read_only": true}]),
        "{spec}"
    );
    crate::common::assert_no_containers_left(&server.process.worker_id).await;
}
