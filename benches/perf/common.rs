//! What every section shares: the run's context (the release binary, a scratch
//! directory, the Docker CLI, the broker), `tasuki` processes started and stopped by
//! PID, their memory, and unique names so nothing collides with another run.

#![allow(dead_code)] // shared by every section; not each uses all of it

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// The release binary cargo built beside this benchmark.
pub const BIN: &str = env!("CARGO_BIN_EXE_tasuki");

pub struct Bench {
    pub quick: bool,
    /// Scratch space for data dirs and logs, removed at exit.
    pub scratch: tempfile::TempDir,
    pub docker: String,
    pub amqp_url: String,
    /// The image every container job runs (`deploy/example-image`, static busybox).
    pub image: String,
}

impl Bench {
    pub fn new(quick: bool) -> anyhow::Result<Self> {
        let docker = std::env::var("DOCKER").unwrap_or_else(|_| {
            if Path::new("/usr/bin/docker").exists() {
                "/usr/bin/docker".into()
            } else {
                "docker".into()
            }
        });
        let scratch = tempfile::Builder::new()
            .prefix("tasuki-perf-")
            .tempdir_in(std::env::var_os("TASUKI_BENCH_DIR").unwrap_or_else(|| "/var/tmp".into()))
            .context("scratch directory")?;
        Ok(Bench {
            quick,
            scratch,
            docker,
            amqp_url: std::env::var("TASUKI_TEST_AMQP_URL")
                .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into()),
            image: "tasuki-example:latest".into(),
        })
    }

    /// How long a measured load phase lasts: `full`, or `quick` with `--quick`.
    pub fn phase(&self, full: Duration, quick: Duration) -> Duration {
        if self.quick { quick } else { full }
    }

    /// A count scaled down under `--quick`.
    pub fn count(&self, full: usize, quick: usize) -> usize {
        if self.quick { quick } else { full }
    }

    /// A fresh directory under the scratch space.
    pub fn dir(&self, prefix: &str) -> anyhow::Result<PathBuf> {
        let dir = self.scratch.path().join(unique(prefix));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(dir)
    }

    /// The machine the figures come from, one line.
    pub fn machine(&self) -> String {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split(':').nth(1))
                    .map(|m| m.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown CPU".into());
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let mem = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|kb| kb.parse::<u64>().ok())
            })
            .map(|kb| format!("{:.0} GiB", kb as f64 / 1024.0 / 1024.0))
            .unwrap_or_default();
        let engine = Command::new(&self.docker)
            .args([
                "version",
                "--format",
                "{{.Server.Version}} (API {{.Server.APIVersion}})",
            ])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_else(|| "no engine".into());
        format!(
            "{cores} cores ({cpu}), {mem}, Docker {engine}, {}",
            if self.quick { "--quick" } else { "full run" }
        )
    }

    /// The jobs directory of the benchmark (`benches/perf/jobs`).
    pub fn jobs_dir(&self) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/perf/jobs")
    }
}

/// A name no other run or section uses.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A free loopback port.
pub fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("binding a port")?;
    Ok(l.local_addr()?.port())
}

/// A `tasuki` process this run started; stopped (SIGTERM, then SIGKILL) by its PID when
/// dropped. Its stderr goes to a file beside its data.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(args: &[String], env: &[(&str, String)], log: PathBuf) -> anyhow::Result<Proc> {
        let file = std::fs::File::create(&log).with_context(|| format!("{}", log.display()))?;
        let mut command = Command::new(BIN);
        command
            .args(args)
            .env("TASUKI_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file);
        for (k, v) in env {
            command.env(k, v);
        }
        let child = command.spawn().context("starting tasuki")?;
        Ok(Proc { child, log })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory now, from /proc.
    pub fn rss_bytes(&self) -> u64 {
        proc_status_kib(self.pid(), "VmRSS:") * 1024
    }

    /// The most resident memory the process has had.
    pub fn peak_rss_bytes(&self) -> u64 {
        proc_status_kib(self.pid(), "VmHWM:") * 1024
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// SIGTERM, and SIGKILL if it has not exited within `grace`.
    pub fn stop(&mut self, grace: Duration) {
        let _ = Command::new("kill").arg(self.pid().to_string()).status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop(Duration::from_secs(10));
        }
    }
}

/// A line of /proc/PID/status in KiB (0 when unreadable).
pub fn proc_status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU seconds (user + system) a process has used, from /proc/PID/stat.
/// CPU seconds the whole machine spent busy since boot (`/proc/stat`: user, nice,
/// system, irq, softirq and steal, every core), 0 if it cannot be read.
pub fn machine_busy_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return 0.0;
    };
    let Some(cpu) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return 0.0;
    };
    let fields: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let ticks: u64 = [0, 1, 2, 5, 6, 7]
        .iter()
        .filter_map(|&i| fields.get(i))
        .sum();
    ticks as f64 / 100.0
}

pub fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name, which is in parentheses and may hold spaces.
    let Some(rest) = stat.rsplit(')').next() else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|v| v.parse::<u64>().ok()))
        .sum();
    ticks as f64 / 100.0
}

/// How `tasuki serve` is started.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// `--amqp-url` with this `--queue` (and `--request-queue` beside it); embedded
    /// mode when `None`.
    pub amqp_queue: Option<String>,
    /// With AMQP: also run a worker in the process.
    pub embedded_worker: bool,
    pub concurrency: usize,
    /// `--worker-token` for remote workers.
    pub worker_token: Option<String>,
    pub jobs_dir: Option<PathBuf>,
    /// An existing data dir (a prepared store); a fresh one when `None`.
    pub data_dir: Option<PathBuf>,
    pub extra_args: Vec<String>,
    pub env: Vec<(&'static str, String)>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            amqp_queue: None,
            embedded_worker: false,
            concurrency: 4,
            worker_token: None,
            jobs_dir: None,
            data_dir: None,
            extra_args: Vec::new(),
            env: Vec::new(),
        }
    }
}

/// A running `tasuki serve` on a free loopback port.
pub struct Serve {
    pub proc: Proc,
    pub addr: std::net::SocketAddr,
    pub data_dir: PathBuf,
    pub worker_id: String,
    /// The PostgreSQL database it stores in (`TASUKI_BENCH_POSTGRES`); `None` on SQLite.
    pub database_url: Option<String>,
    /// How long from spawn until it answered `/healthz`.
    pub started_in: Duration,
}

impl Serve {
    pub async fn start(bench: &Bench, config: ServeConfig) -> anyhow::Result<Serve> {
        let dir = bench.dir("serve")?;
        let data_dir = config.data_dir.clone().unwrap_or_else(|| dir.join("data"));
        let port = free_port()?;
        let worker_id = unique("perf");
        let jobs = config.jobs_dir.clone().unwrap_or_else(|| bench.jobs_dir());
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--jobs-dir".into(),
            jobs.display().to_string(),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--worker-id".into(),
            worker_id.clone(),
            "--concurrency".into(),
            config.concurrency.to_string(),
            "--drain-timeout".into(),
            "5s".into(),
            "--scheduler".into(),
            "false".into(),
        ];
        if let Some(queue) = &config.amqp_queue {
            args.extend([
                "--amqp-url".into(),
                bench.amqp_url.clone(),
                "--queue".into(),
                queue.clone(),
                "--request-queue".into(),
                format!("{queue}.requests"),
            ]);
            if config.embedded_worker {
                args.push("--embedded-worker".into());
            }
        }
        if let Some(token) = &config.worker_token {
            args.extend(["--worker-token".into(), token.clone()]);
        }
        let database_url = match config.data_dir {
            None => postgres_database(&worker_id)?,
            Some(_) => None,
        };
        if let Some(url) = &database_url {
            args.extend(["--database-url".into(), url.clone()]);
        }
        args.extend(config.extra_args.iter().cloned());
        let started = Instant::now();
        let proc = Proc::spawn(&args, &config.env, dir.join("serve.log"))?;
        let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
        let mut serve = Serve {
            proc,
            addr,
            data_dir,
            worker_id,
            database_url,
            started_in: Duration::ZERO,
        };
        serve.wait_healthy(Duration::from_secs(60)).await?;
        serve.started_in = started.elapsed();
        Ok(serve)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    async fn wait_healthy(&mut self, within: Duration) -> anyhow::Result<()> {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + within;
        loop {
            if let Ok(r) = client.get(format!("{}/healthz", self.url())).send().await
                && r.status().is_success()
            {
                return Ok(());
            }
            if let Ok(Some(status)) = self.proc.child.try_wait() {
                bail!(
                    "tasuki serve exited with {status}:\n{}",
                    self.proc.log_tail()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "tasuki serve not healthy in {within:?}:\n{}",
                    self.proc.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Stop it and remove whatever containers its worker left (none, normally).
    pub fn stop(mut self, docker: &str) {
        self.proc.stop(Duration::from_secs(15));
        remove_containers(docker, &self.worker_id);
    }
}

/// Remove the containers labelled with `worker_id` (tasuki labels each container with
/// its worker's id).
pub fn remove_containers(docker: &str, worker_id: &str) {
    let out = Command::new(docker)
        .args([
            "ps",
            "-aq",
            "--filter",
            &format!("label=tasuki.worker-id={worker_id}"),
        ])
        .output();
    if let Ok(out) = out {
        let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        if !ids.is_empty() {
            let _ = Command::new(docker).arg("rm").arg("-f").args(&ids).output();
        }
    }
}

/// Delete a test queue and its companions from RabbitMQ (`rabbitmqctl`).
pub fn delete_queues(queue: &str) {
    for q in [
        queue.to_owned(),
        format!("{queue}.dead"),
        format!("{queue}.requests"),
        format!("{queue}.requests.dead"),
    ] {
        let _ = Command::new("rabbitmqctl")
            .args(["delete_queue", &q])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// With `TASUKI_BENCH_POSTGRES` (a maintenance database URL, e.g.
/// `postgres://tasuki_test:tasuki_test@127.0.0.1:5432/postgres`), a fresh `serve` gets a
/// PostgreSQL database of its own instead of SQLite in its data dir: the URL of a new,
/// empty database made with `psql` (left afterwards, for a look at what the run
/// stored). `None` without the variable.
/// The log bytes stored in a PostgreSQL store (`log_chunks`), read with `psql`.
pub fn postgres_log_bytes(url: &str) -> anyhow::Result<u64> {
    let out = Command::new("psql")
        .args([
            url,
            "-Atqc",
            "SELECT COALESCE(SUM(octet_length(data)), 0) FROM log_chunks",
        ])
        .output()
        .context("running psql to read the stored log bytes")?;
    if !out.status.success() {
        bail!(
            "psql could not read log_chunks: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .parse()
        .with_context(|| format!("psql answered {text:?} for the log bytes"))
}

fn postgres_database(name: &str) -> anyhow::Result<Option<String>> {
    let Ok(admin) = std::env::var("TASUKI_BENCH_POSTGRES") else {
        return Ok(None);
    };
    let db = name.replace('-', "_").to_lowercase();
    let status = Command::new("psql")
        .args([admin.as_str(), "-qc", &format!("CREATE DATABASE {db}")])
        .status()
        .context("running psql to make the bench's database")?;
    if !status.success() {
        bail!("psql could not create database {db} on TASUKI_BENCH_POSTGRES");
    }
    let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
    Ok(Some(format!("{base}/{db}")))
}
