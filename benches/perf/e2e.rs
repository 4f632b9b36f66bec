//! Section `e2e`: tasuki end to end against the raw engine. The baseline is what a
//! program does with the Docker API alone for one `true` container (create, start, wait,
//! remove), sequentially and with 4 callers; tasuki runs the same container as a job
//! (`noop`) and is timed from the request to the final state, with 4 callers in a
//! closed loop: `POST ...?wait` in embedded mode and in AMQP mode, and `tasuki run
//! --wait` (a process per run, as a scheduler would start it). The raw engine is
//! measured before and after tasuki and the mean taken, so drift does not favour either.

use std::collections::HashMap;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bollard::Docker;
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptions, RemoveContainerOptions, StartContainerOptions, WaitContainerOptions,
};
use futures::StreamExt;

use crate::common::{
    BIN, Bench, Serve, ServeConfig, cpu_seconds, delete_queues, machine_busy_seconds,
    remove_containers, unique,
};
use crate::load::{Conn, percentile_ms};
use crate::report::{Report, Row, Target};

const CALLERS: usize = 4;
const SECTION: &str = "e2e";

/// One way of running jobs, measured: every job's latency and the whole span, and the
/// CPU the machine (and `serve`, for tasuki) spent on them.
struct Measured {
    latencies: Vec<Duration>,
    elapsed: Duration,
    machine_cpu: f64,
    serve_cpu: f64,
}

impl Measured {
    /// CPU milliseconds per job of the whole machine, and of `serve`.
    fn cpu_per_job_ms(&self) -> (f64, f64) {
        let n = self.latencies.len().max(1) as f64;
        (self.machine_cpu / n * 1000.0, self.serve_cpu / n * 1000.0)
    }
    fn jobs_per_second(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64()
    }
    fn p50_ms(&mut self) -> f64 {
        percentile_ms(&mut self.latencies, 50.0)
    }
    fn line(&mut self) -> String {
        let (p50, p99) = (self.p50_ms(), percentile_ms(&mut self.latencies, 99.0));
        format!(
            "{} jobs in {:.1?}: {:.2} jobs/s, p50 {p50:.0} ms, p99 {p99:.0} ms",
            self.latencies.len(),
            self.elapsed,
            self.jobs_per_second(),
        )
    }
}

/// Run `jobs` jobs with `callers` concurrent callers, each taking the next job when
/// its last one ended; `run_one` is told which caller it runs for.
/// `serve`: the pid whose CPU is counted apart (none for the raw engine).
async fn closed_loop<F, Fut>(
    callers: usize,
    jobs: usize,
    serve: Option<u32>,
    run_one: F,
) -> anyhow::Result<Measured>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let run_one = Arc::new(run_one);
    let serve_cpu = move || serve.map(cpu_seconds).unwrap_or(0.0);
    let (machine_before, serve_before) = (machine_busy_seconds(), serve_cpu());
    let start = Instant::now();
    let mut tasks = Vec::new();
    for caller in 0..callers {
        let (next, run_one) = (next.clone(), run_one.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= jobs {
                    return Ok::<_, anyhow::Error>(latencies);
                }
                let t = Instant::now();
                run_one(caller).await?;
                latencies.push(t.elapsed());
            }
        }));
    }
    let mut latencies = Vec::with_capacity(jobs);
    for task in tasks {
        latencies.extend(task.await??);
    }
    Ok(Measured {
        latencies,
        elapsed: start.elapsed(),
        machine_cpu: machine_busy_seconds() - machine_before,
        serve_cpu: serve_cpu() - serve_before,
    })
}

/// The engine at the API version it speaks (Docker 20.10 refuses bollard's newer one).
fn engine(bench: &Bench) -> anyhow::Result<Docker> {
    let out = Command::new(&bench.docker)
        .args(["version", "--format", "{{.Server.APIVersion}}"])
        .output()
        .context("docker version")?;
    let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let (major, minor) = version
        .split_once('.')
        .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
        .with_context(|| format!("engine API version {version:?}"))?;
    let client = bollard::ClientVersion {
        major_version: major,
        minor_version: minor,
    };
    Ok(Docker::connect_with_unix(
        "unix:///var/run/docker.sock",
        120,
        &client,
    )?)
}

/// create + start + wait + remove of one `true` container, as a program would.
async fn raw_once(docker: &Docker, image: &str, label: &str) -> anyhow::Result<()> {
    let body = ContainerCreateBody {
        image: Some(image.to_owned()),
        cmd: Some(vec!["true".to_owned()]),
        labels: Some(HashMap::from([(
            "tasuki.worker-id".to_owned(),
            label.to_owned(),
        )])),
        host_config: Some(HostConfig {
            network_mode: Some("none".to_owned()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let id = docker
        .create_container(None::<CreateContainerOptions>, body)
        .await?
        .id;
    docker
        .start_container(&id, None::<StartContainerOptions>)
        .await?;
    let mut wait = docker.wait_container(
        &id,
        Some(WaitContainerOptions {
            condition: "not-running".to_owned(),
        }),
    );
    match wait.next().await {
        Some(Ok(r)) if r.status_code == 0 => {}
        other => bail!("raw container {id} ended as {other:?}"),
    }
    docker
        .remove_container(
            &id,
            Some(RemoveContainerOptions {
                force: true,
                ..Default::default()
            }),
        )
        .await?;
    Ok(())
}

async fn raw(bench: &Bench, callers: usize, jobs: usize) -> anyhow::Result<Measured> {
    let docker = engine(bench)?;
    let image = bench.image.clone();
    let label = unique("perf-raw");
    let cleanup = label.clone();
    let measured = closed_loop(callers, jobs, None, move |_| {
        let (docker, image, label) = (docker.clone(), image.clone(), label.clone());
        async move { raw_once(&docker, &image, &label).await }
    })
    .await;
    remove_containers(&bench.docker, &cleanup);
    measured
}

/// `POST /v1/jobs/noop/runs?wait=120` per job, each caller on its own connection.
async fn http_wait(serve: &Serve, callers: usize, jobs: usize) -> anyhow::Result<Measured> {
    let addr = serve.addr;
    let conns: Vec<_> = futures::future::try_join_all((0..callers).map(|_| Conn::open(addr)))
        .await?
        .into_iter()
        .map(tokio::sync::Mutex::new)
        .collect();
    let conns = Arc::new(conns);
    closed_loop(callers, jobs, Some(serve.proc.pid()), move |caller| {
        let conns = conns.clone();
        async move {
            // Each caller has a connection of its own (the lock is never contended).
            let mut conn = conns[caller].lock().await;
            let a = conn
                .request(
                    "POST",
                    "/v1/jobs/noop/runs?wait=120",
                    &[],
                    bytes::Bytes::from_static(b"{}"),
                )
                .await?;
            let body: serde_json::Value = serde_json::from_slice(&a.body)?;
            if a.status != 200 || body["status"] != "succeeded" {
                bail!("run ended as {} {body}", a.status);
            }
            Ok(())
        }
    })
    .await
}

/// `tasuki run noop --wait` per job: a process start, the request, the output followed
/// to the end, the exit code.
async fn cli_wait(serve: &Serve, callers: usize, jobs: usize) -> anyhow::Result<Measured> {
    let url = serve.url();
    closed_loop(callers, jobs, Some(serve.proc.pid()), move |_| {
        let url = url.clone();
        async move {
            let out = tokio::process::Command::new(BIN)
                .args(["run", "noop", "--wait", "--server", &url])
                .env("TASUKI_LOG", "warn")
                .output()
                .await?;
            if !out.status.success() {
                bail!(
                    "tasuki run --wait exited {}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            Ok(())
        }
    })
    .await
}

pub async fn run(bench: &Bench, report: &mut Report) -> anyhow::Result<()> {
    let jobs = bench.count(120, 24);
    let seq_jobs = bench.count(30, 8);
    let warm = 8;

    raw(bench, CALLERS, warm).await?;
    let mut raw_seq = raw(bench, 1, seq_jobs).await?;
    eprintln!("perf:   raw engine, sequential: {}", raw_seq.line());
    let mut raw_before = raw(bench, CALLERS, jobs).await?;
    eprintln!("perf:   raw engine, 4 callers: {}", raw_before.line());

    let embedded = Serve::start(
        bench,
        ServeConfig {
            concurrency: CALLERS,
            ..Default::default()
        },
    )
    .await?;
    http_wait(&embedded, CALLERS, warm).await?;
    let mut seq = http_wait(&embedded, 1, seq_jobs).await?;
    eprintln!("perf:   embedded ?wait, sequential: {}", seq.line());
    let mut wait = http_wait(&embedded, CALLERS, jobs).await?;
    eprintln!("perf:   embedded ?wait, 4 callers: {}", wait.line());
    let mut cli = cli_wait(&embedded, CALLERS, jobs).await?;
    eprintln!("perf:   tasuki run --wait, 4 callers: {}", cli.line());
    embedded.stop(&bench.docker);

    let queue = unique("perf-e2e");
    let amqp = Serve::start(
        bench,
        ServeConfig {
            amqp_queue: Some(queue.clone()),
            embedded_worker: true,
            concurrency: CALLERS,
            ..Default::default()
        },
    )
    .await;
    let amqp_measured = match amqp {
        Ok(amqp) => {
            let r = async {
                http_wait(&amqp, CALLERS, warm).await?;
                http_wait(&amqp, CALLERS, jobs).await
            }
            .await;
            amqp.stop(&bench.docker);
            r
        }
        Err(e) => Err(e),
    };
    delete_queues(&queue);
    let mut amqp_wait = amqp_measured?;
    eprintln!("perf:   AMQP ?wait, 4 callers: {}", amqp_wait.line());

    let mut raw_after = raw(bench, CALLERS, jobs).await?;
    eprintln!(
        "perf:   raw engine, 4 callers (again): {}",
        raw_after.line()
    );

    let raw_rate = (raw_before.jobs_per_second() + raw_after.jobs_per_second()) / 2.0;
    let raw_p50 = (raw_before.p50_ms() + raw_after.p50_ms()) / 2.0;
    let base = "raw engine, 4 callers";
    report.add(Row::new(
        SECTION,
        "raw engine, sequential",
        raw_seq.jobs_per_second(),
        "jobs/s",
    ));
    report.add(Row::new(
        SECTION,
        "raw engine, sequential, p50",
        raw_seq.p50_ms(),
        "ms",
    ));
    report.add(Row::new(
        SECTION,
        "raw engine, 4 callers",
        raw_rate,
        "jobs/s",
    ));
    report.add(Row::new(
        SECTION,
        "raw engine, 4 callers, p50",
        raw_p50,
        "ms",
    ));
    report.add(
        Row::new(
            SECTION,
            "?wait (embedded), sequential",
            seq.jobs_per_second(),
            "jobs/s",
        )
        .baseline("raw engine, sequential", raw_seq.jobs_per_second())
        .target(Target::RatioAtLeast(1.0 / 1.05)),
    );
    report.add(
        Row::new(
            SECTION,
            "?wait (embedded), sequential, p50",
            seq.p50_ms(),
            "ms",
        )
        .baseline("raw engine, sequential", raw_seq.p50_ms())
        .target(Target::RatioAtMost(1.05)),
    );
    for (name, m) in [
        ("?wait (embedded)", &mut wait),
        ("tasuki run --wait (embedded)", &mut cli),
        ("?wait (AMQP mode)", &mut amqp_wait),
    ] {
        report.add(
            Row::new(
                SECTION,
                format!("{name}, 4 callers"),
                m.jobs_per_second(),
                "jobs/s",
            )
            .baseline(base, raw_rate)
            .target(Target::RatioAtLeast(1.0 / 1.05)),
        );
        report.add(
            Row::new(SECTION, format!("{name}, 4 callers, p50"), m.p50_ms(), "ms")
                .baseline(base, raw_p50)
                .target(Target::RatioAtMost(1.05)),
        );
    }
    // Where the CPU goes: with 4 callers the engine keeps both cores busy, so what tasuki
    // spends per job is taken from the engine's jobs.
    let raw_machine = (raw_before.cpu_per_job_ms().0 + raw_after.cpu_per_job_ms().0) / 2.0;
    report.add(Row::new(
        SECTION,
        "machine CPU per job, raw engine, 4 callers",
        raw_machine,
        "ms",
    ));
    for (name, m) in [
        ("?wait (embedded)", &wait),
        ("tasuki run --wait (embedded)", &cli),
        ("?wait (AMQP mode)", &amqp_wait),
    ] {
        let (machine, serve) = m.cpu_per_job_ms();
        report.add(
            Row::new(
                SECTION,
                format!("machine CPU per job, {name}, 4 callers"),
                machine,
                "ms",
            )
            .baseline("raw engine", raw_machine),
        );
        report.add(Row::new(
            SECTION,
            format!("serve CPU per job, {name}, 4 callers"),
            serve,
            "ms",
        ));
    }
    Ok(())
}
