//! Section `logs`: a container writing 100 MiB to stdout, through tasuki embedded in
//! both log modes, against `docker run` in the same run: `> file` (the engine's `local`
//! copy beside the attach, as tasuki's durable mode) and `--log-driver none` (attach
//! only, as the fast mode). Time is from create to exit (the `docker run` CLI without
//! `--rm`; tasuki's `?wait` answer, which comes before the container is removed). Each
//! stored log is checked to hold every byte. Then `serve`'s RSS growth while one run
//! writes 1 GiB (256 MiB with `--quick`) in each mode.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

use crate::common::{Bench, Serve, ServeConfig, unique};
use crate::report::{Report, Row, Target};

const SECTION: &str = "logs";
const MIB: u64 = 1024 * 1024;

pub async fn run(bench: &Bench, report: &mut Report) -> anyhow::Result<()> {
    let size = 100 * MIB;
    let big = bench.count(1024, 256) as u64 * MIB;
    let tries = bench.count(3, 1);
    let dir = bench.dir("logs")?;

    let to_file = median(
        (0..tries)
            .map(|_| docker_run(bench, &dir, &[], size))
            .collect::<anyhow::Result<_>>()?,
    );
    let no_driver = median(
        (0..tries)
            .map(|_| docker_run(bench, &dir, &["--log-driver", "none"], size))
            .collect::<anyhow::Result<_>>()?,
    );

    let serve = Serve::start(bench, ServeConfig::default()).await?;
    let result = measure(&serve, report, size, big, tries, to_file, no_driver).await;
    serve.stop(&bench.docker);
    result
}

async fn measure(
    serve: &Serve,
    report: &mut Report,
    size: u64,
    big: u64,
    tries: usize,
    to_file: f64,
    no_driver: f64,
) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let mibs = |secs: f64| size as f64 / MIB as f64 / secs;
    let mut durable = Vec::new();
    let mut fast = Vec::new();
    for _ in 0..tries {
        durable.push(tasuki_run(&client, serve, "logs-durable", size).await?.secs);
        fast.push(tasuki_run(&client, serve, "logs-fast", size).await?.secs);
    }
    report.add(
        Row::new(
            SECTION,
            "100 MiB stdout, durable (default)",
            mibs(median(durable)),
            "MiB/s",
        )
        .baseline("docker run > file", mibs(to_file))
        .target(Target::RatioAtLeast(1.0)),
    );
    report.add(
        Row::new(
            SECTION,
            "100 MiB stdout, logs = \"fast\"",
            mibs(median(fast)),
            "MiB/s",
        )
        .baseline("docker run --log-driver none", mibs(no_driver))
        .target(Target::RatioAtLeast(0.9)),
    );

    let label = format!("{} MiB", big / MIB);
    for job in ["logs-durable", "logs-fast"] {
        let before = serve.proc.rss_bytes();
        let run = tasuki_run(&client, serve, job, big).await?;
        let growth = run.peak_rss.saturating_sub(before) as f64 / MIB as f64;
        report.add(
            Row::new(
                SECTION,
                format!("serve RSS growth, {label} of output, {job}"),
                growth,
                "MiB",
            )
            .target(Target::AtMost(32.0)),
        );
    }
    Ok(())
}

/// What one tasuki run of a `logs-*` job took.
struct Timed {
    secs: f64,
    /// The most resident memory `serve` had while the run went on (sampled).
    peak_rss: u64,
}

/// Start `job` writing `bytes`, wait for its end, check its stored log holds them all.
async fn tasuki_run(
    client: &reqwest::Client,
    serve: &Serve,
    job: &str,
    bytes: u64,
) -> anyhow::Result<Timed> {
    let url = format!("{}/v1/jobs/{job}/runs?wait=600", serve.url());
    let body = serde_json::json!({"params": {"bytes": bytes.to_string()}});
    let started = Instant::now();
    let request = client.post(&url).json(&body).send();
    let mut request = std::pin::pin!(request);
    let mut peak_rss = serve.proc.rss_bytes();
    let answer = loop {
        tokio::select! {
            answer = &mut request => break answer.context("run request")?,
            _ = tokio::time::sleep(Duration::from_millis(20)) => {
                peak_rss = peak_rss.max(serve.proc.rss_bytes());
            }
        }
    };
    let secs = started.elapsed().as_secs_f64();
    let status = answer.status();
    let run: serde_json::Value = answer.json().await.context("run answer")?;
    ensure!(
        status.as_u16() == 200 && run["status"] == "succeeded",
        "{job}: {status} {run}"
    );
    let id = run["id"].as_str().context("run id")?;
    let log = serve
        .data_dir
        .join("logs")
        .join(id.get(..6).context("run id")?)
        .join(format!("{id}.1.log"));
    let stored = std::fs::metadata(&log)
        .with_context(|| format!("{}", log.display()))?
        .len();
    ensure!(
        stored == bytes && run["log_dropped_bytes"] == 0,
        "{job}: stored {stored} of {bytes} bytes ({run})"
    );
    Ok(Timed { secs, peak_rss })
}

/// Seconds from create to exit of `docker run [extra] IMAGE head -c BYTES /dev/zero >
/// file`, the file checked to hold every byte; the container is removed after.
fn docker_run(bench: &Bench, dir: &Path, extra: &[&str], bytes: u64) -> anyhow::Result<f64> {
    let name = unique("tasuki-perf-logs");
    let out = dir.join(format!("{name}.out"));
    let file = std::fs::File::create(&out)?;
    let started = Instant::now();
    let status = Command::new(&bench.docker)
        .args(["run", "--name", &name, "--network", "none"])
        .args(extra)
        .args([&bench.image, "head", "-c", &bytes.to_string(), "/dev/zero"])
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(Stdio::inherit())
        .status()
        .context("docker run")?;
    let secs = started.elapsed().as_secs_f64();
    let _ = Command::new(&bench.docker)
        .args(["rm", "-f", &name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let written = std::fs::metadata(&out)?.len();
    let _ = std::fs::remove_file(&out);
    if !status.success() {
        bail!("docker run {extra:?} exited with {status}");
    }
    ensure!(
        written == bytes,
        "docker run {extra:?}: {written} of {bytes} bytes"
    );
    Ok(secs)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
