//! Section `control`: control-plane capacity, the figure a fleet operator asks for (how
//! many Docker hosts one `tasuki serve` can feed). One `serve` in AMQP mode with no
//! worker of its own; 32 real `tasuki worker` processes on the no-op runtime (each
//! "container" writes 1 KiB and runs 1 s, with a 3 s lease renewed every second; each
//! worker renews all the leases it holds in one call) claim, heartbeat, upload output and finish over HTTP, as
//! remote workers do; a driver keeps the queue fed with real accepts over HTTP. Counts
//! come from the server's own `/metrics` (runs finished, requests by route) and the log
//! files on disk, taken at the start and end of the measured window; claim latency is
//! the server's request timing of `POST /v1/worker/claim` (its histogram buckets,
//! interpolated), so it includes neither the worker's nor the network's time.
//!
//! The driver keeps the queue fed, not flooded: it holds its next accept while the runs
//! accepted and not yet finished are more than twice what the fleet holds in flight, as
//! a site's steady state has runs arriving about as fast as they end. (Unbounded, the
//! driver's accepts would take the CPU the fleet's runs need, and the measure would be
//! of a backlog growing without end.)
//!
//! At full load every request waits behind the others, so a second phase holds the
//! accepts to a steady rate below what the fleet finishes, and reads claim latency there.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;

use crate::common::{self, Bench, Proc, Serve, ServeConfig};
use crate::load;
use crate::report::{Report, Row, Target};

const SECTION: &str = "control";
/// What each no-op container writes and how long it "runs".
const OUTPUT_BYTES: usize = 1024;
const RUN_FOR: &str = "1s";
const LEASE_TTL: &str = "3s";
/// Slots per worker: at 1 s a run, 32 × 80 slots hold 2,560 runs in flight.
const CONCURRENCY: usize = 80;
/// What one Docker host of this machine starts and removes per second (issue #12).
const HOST_CONTAINERS_PER_SECOND: f64 = 8.0;
const CLAIM_ROUTE: &str = "/v1/worker/claim";
const HEARTBEATS_ROUTE: &str = "/v1/worker/heartbeats";
/// Accepts a second for the steady phase: about half what the fleet finishes at full
/// load here, so claim latency is read without a queue of requests in front of it.
const STEADY_PER_SECOND: f64 = 300.0;

pub async fn run(bench: &Bench, report: &mut Report) -> anyhow::Result<()> {
    let fleet = scenario(bench, 32, 48, None).await?;
    let label = format!(
        "32 workers × {CONCURRENCY} slots, no-op runtime ({OUTPUT_BYTES} B output, runs {RUN_FOR}, lease {LEASE_TTL})"
    );
    report.add(
        Row::new(
            SECTION,
            format!("runs finished/s, {label}"),
            fleet.runs_per_second(),
            "runs/s",
        )
        .target(Target::AtLeast(2000.0)),
    );
    report.add(
        Row::new(
            SECTION,
            "claim p99, server side (POST /v1/worker/claim, /metrics histogram)",
            fleet.claim_p99_ms,
            "ms",
        )
        .target(Target::AtMost(20.0)),
    );
    report.add(Row::new(
        SECTION,
        "Docker hosts fed at 8 containers/s each",
        fleet.runs_per_second() / HOST_CONTAINERS_PER_SECOND,
        "hosts",
    ));
    report.add(Row::new(
        SECTION,
        "heartbeat calls/s during the same load (each renews every lease its worker holds)",
        fleet.per_second(fleet.heartbeats),
        "req/s",
    ));
    report.add(Row::new(
        SECTION,
        "log bytes stored/s during the same load",
        fleet.per_second(fleet.log_bytes) / 1024.0,
        "KiB/s",
    ));
    report.add(Row::new(
        SECTION,
        "serve CPU per 1,000 runs (accept + relay + claim + heartbeat + log + finish)",
        fleet.per_thousand_runs(fleet.serve_cpu),
        "CPU s",
    ));
    report.add(Row::new(
        SECTION,
        "the 32 workers' CPU per 1,000 runs (claim, start, renew, upload, finish, AMQP)",
        fleet.per_thousand_runs(fleet.workers_cpu),
        "CPU s",
    ));
    let steady = scenario(bench, 32, 16, Some(STEADY_PER_SECOND)).await?;
    report.add(Row::new(
        SECTION,
        format!("runs finished/s, 32 workers, accepts held to {STEADY_PER_SECOND:.0}/s"),
        steady.runs_per_second(),
        "runs/s",
    ));
    report.add(Row::new(
        SECTION,
        format!("claim p99 at {STEADY_PER_SECOND:.0} accepts/s, server side"),
        steady.claim_p99_ms,
        "ms",
    ));
    let one = scenario(bench, 1, 16, None).await?;
    report.add(Row::new(
        SECTION,
        format!("runs finished/s, 1 worker × {CONCURRENCY} slots (for scale)"),
        one.runs_per_second(),
        "runs/s",
    ));
    Ok(())
}

/// What one measured window saw.
struct Measured {
    elapsed: Duration,
    finished: f64,
    succeeded: f64,
    accepted: f64,
    claims: f64,
    heartbeats: f64,
    log_bytes: f64,
    claim_p99_ms: f64,
    serve_cpu: f64,
    workers_cpu: f64,
}

impl Measured {
    fn per_second(&self, n: f64) -> f64 {
        n / self.elapsed.as_secs_f64()
    }
    fn runs_per_second(&self) -> f64 {
        self.per_second(self.finished)
    }
    fn per_thousand_runs(&self, cpu: f64) -> f64 {
        if self.finished == 0.0 {
            return 0.0;
        }
        cpu / self.finished * 1000.0
    }
}

/// `pace`: accepts a second the driver holds to (as many as the fleet takes if `None`).
async fn scenario(
    bench: &Bench,
    workers: usize,
    clients: usize,
    pace: Option<f64>,
) -> anyhow::Result<Measured> {
    let queue = common::unique("perf-control");
    let result = measure(bench, &queue, workers, clients, pace).await;
    common::delete_queues(&queue);
    result
}

async fn measure(
    bench: &Bench,
    queue: &str,
    workers: usize,
    clients: usize,
    pace: Option<f64>,
) -> anyhow::Result<Measured> {
    let token = common::unique("perf-worker-token");
    let serve = Serve::start(
        bench,
        ServeConfig {
            amqp_queue: Some(queue.to_owned()),
            embedded_worker: false,
            worker_token: Some(token.clone()),
            extra_args: vec!["--lease-ttl".into(), LEASE_TTL.into()],
            // The driver is one anonymous caller on an open server: no rate limit.
            env: vec![
                ("TASUKI_LIMITS_RATE_PER_SECOND", "0".into()),
                ("TASUKI_AUTH_OPEN_METRICS", "true".into()),
            ],
            ..ServeConfig::default()
        },
    )
    .await?;
    let dir = bench.dir("control-workers")?;
    let mut procs = Vec::with_capacity(workers);
    for i in 0..workers {
        let id = common::unique("perf-noop");
        let args: Vec<String> = [
            "worker",
            "--server",
            &serve.url(),
            "--worker-token",
            &token,
            "--amqp-url",
            &bench.amqp_url,
            "--queue",
            queue,
            "--worker-id",
            &id,
            "--concurrency",
            &CONCURRENCY.to_string(),
            "--drain-timeout",
            "5s",
            "--lock-dir",
            &dir.display().to_string(),
            "--runtime",
            "noop",
            "--noop-run-for",
            RUN_FOR,
            "--noop-output-bytes",
            &OUTPUT_BYTES.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        procs.push(Proc::spawn(
            &args,
            &[],
            dir.join(format!("worker-{i}.log")),
        )?);
    }

    // The driver accepts for the warm-up and the window, then stops.
    let warm_up = bench.phase(Duration::from_secs(5), Duration::from_secs(3));
    let window = if workers == 1 {
        bench.phase(Duration::from_secs(15), Duration::from_secs(5))
    } else {
        bench.phase(Duration::from_secs(30), Duration::from_secs(8))
    };
    let make: load::MakeRequest = Arc::new(|_, _| {
        (
            "POST".into(),
            "/v1/jobs/noop/runs".into(),
            Vec::new(),
            Bytes::from_static(b"{}"),
        )
    });
    let in_flight = (workers * CONCURRENCY) as u64;
    let sent = Arc::new(AtomicU64::new(0));
    let finished = Arc::new(AtomicU64::new(0));
    let gate: load::Gate = {
        let (sent, finished) = (sent.clone(), finished.clone());
        let began = Instant::now();
        Arc::new(move || {
            let sent_now = sent.load(Ordering::Relaxed);
            let ahead = sent_now.saturating_sub(finished.load(Ordering::Relaxed));
            if ahead >= 2 * in_flight {
                return false;
            }
            if let Some(pace) = pace
                && sent_now as f64 >= began.elapsed().as_secs_f64() * pace
            {
                return false;
            }
            sent.fetch_add(1, Ordering::Relaxed);
            true
        })
    };
    let watcher = {
        let (finished, addr) = (finished.clone(), serve.addr);
        tokio::spawn(async move {
            loop {
                if let Ok(n) = finished_total(addr).await {
                    finished.store(n, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let driver = tokio::spawn(load::closed_loop_gated(
        serve.addr,
        clients,
        warm_up + window + Duration::from_secs(1),
        make,
        |s| s == 202,
        gate,
    ));
    tokio::time::sleep(warm_up).await;
    for p in &mut procs {
        if let Ok(Some(status)) = p.child.try_wait() {
            bail!("a worker exited with {status}:\n{}", p.log_tail());
        }
    }
    let fleet_cpu = || -> f64 { procs.iter().map(|p| common::cpu_seconds(p.pid())).sum() };
    let before = Snapshot::take(&serve).await?;
    let fleet_before = fleet_cpu();
    let started = Instant::now();
    tokio::time::sleep(window).await;
    let after = Snapshot::take(&serve).await?;
    let fleet_after = fleet_cpu();
    let elapsed = started.elapsed();
    let accepts = driver.await.context("driver")??;
    watcher.abort();
    eprintln!(
        "perf:   control driver ({clients} clients): {}",
        accepts.summary()
    );

    let counter = |name: &str, filter: &str| after.sum(name, filter) - before.sum(name, filter);
    let route = |r: &str| format!("route=\"{r}\"");
    let claims = counter(
        "tasuki_http_request_duration_seconds_count",
        &route(CLAIM_ROUTE),
    );
    let measured = Measured {
        elapsed,
        finished: counter("tasuki_runs_finished_total", ""),
        succeeded: counter("tasuki_runs_finished_total", "status=\"succeeded\""),
        accepted: counter("tasuki_runs_accepted_total", ""),
        claims,
        heartbeats: counter(
            "tasuki_http_request_duration_seconds_count",
            &route(HEARTBEATS_ROUTE),
        ),
        log_bytes: (after.log_bytes - before.log_bytes) as f64,
        claim_p99_ms: bucket_quantile(
            &before.buckets(&route(CLAIM_ROUTE)),
            &after.buckets(&route(CLAIM_ROUTE)),
            0.99,
        ) * 1000.0,
        serve_cpu: after.serve_cpu - before.serve_cpu,
        workers_cpu: fleet_after - fleet_before,
    };
    eprintln!(
        "perf:   control {workers} workers over {:.1?}: {:.0} accepted, {:.0} claims, {:.0} finished ({:.0} succeeded), {:.0} heartbeat calls, {:.0} KiB of log; serve {:.1} CPU s, RSS {} MiB; workers {:.1} CPU s",
        measured.elapsed,
        measured.accepted,
        measured.claims,
        measured.finished,
        measured.succeeded,
        measured.heartbeats,
        measured.log_bytes / 1024.0,
        measured.serve_cpu,
        serve.proc.rss_bytes() >> 20,
        measured.workers_cpu,
    );
    if measured.finished == 0.0 {
        let tail = procs.first().map(|p| p.log_tail()).unwrap_or_default();
        bail!(
            "no run finished; serve:\n{}\nworker:\n{tail}",
            serve.proc.log_tail()
        );
    }
    for mut p in procs {
        p.stop(Duration::from_secs(10));
    }
    serve.stop(&bench.docker);
    Ok(measured)
}

/// `tasuki_runs_finished_total` summed over its series, as the server counts it now.
async fn finished_total(addr: std::net::SocketAddr) -> anyhow::Result<u64> {
    let mut conn = load::Conn::open(addr).await?;
    let answer = conn.request("GET", "/metrics", &[], Bytes::new()).await?;
    let text = String::from_utf8_lossy(&answer.body);
    let total: f64 = text
        .lines()
        .filter(|l| l.starts_with("tasuki_runs_finished_total"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum();
    Ok(total as u64)
}

/// The server's metrics and the stored log bytes at one moment.
struct Snapshot {
    /// Sample lines: `name{labels}` → value.
    samples: Vec<(String, f64)>,
    log_bytes: u64,
    serve_cpu: f64,
}

impl Snapshot {
    /// A connection of its own each time: serve closes one idle past its header
    /// timeout (10 s), shorter than the measured window.
    async fn take(serve: &Serve) -> anyhow::Result<Snapshot> {
        let serve_cpu = common::cpu_seconds(serve.proc.pid());
        let mut conn = load::Conn::open(serve.addr).await?;
        let answer = conn.request("GET", "/metrics", &[], Bytes::new()).await?;
        if answer.status != 200 {
            bail!("GET /metrics answered {}", answer.status);
        }
        let text = String::from_utf8_lossy(&answer.body);
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                Some((series.to_owned(), value.parse().ok()?))
            })
            .collect();
        Ok(Snapshot {
            samples,
            log_bytes: match &serve.database_url {
                Some(url) => common::postgres_log_bytes(url)?,
                None => dir_bytes(&serve.data_dir.join("logs")),
            },
            serve_cpu,
        })
    }

    /// The sum of every series of `name` whose labels contain `filter`.
    fn sum(&self, name: &str, filter: &str) -> f64 {
        self.samples
            .iter()
            .filter(|(s, _)| {
                let metric = s.split('{').next().unwrap_or_default();
                metric == name && s.contains(filter)
            })
            .map(|(_, v)| v)
            .sum()
    }

    /// The request-duration histogram of the requests whose labels contain `filter`,
    /// summed over statuses: upper bound (seconds) → cumulative count.
    fn buckets(&self, filter: &str) -> BTreeMap<u64, f64> {
        let mut out = BTreeMap::new();
        for (series, value) in &self.samples {
            if !series.starts_with("tasuki_http_request_duration_seconds_bucket{")
                || !series.contains(filter)
            {
                continue;
            }
            let Some(le) = series
                .split("le=\"")
                .nth(1)
                .and_then(|rest| rest.split('"').next())
            else {
                continue;
            };
            // Keyed in nanoseconds so the map orders the bounds; +Inf last.
            let key = if le == "+Inf" {
                u64::MAX
            } else {
                match le.parse::<f64>() {
                    Ok(s) => (s * 1e9) as u64,
                    Err(_) => continue,
                }
            };
            *out.entry(key).or_insert(0.0) += value;
        }
        out
    }
}

/// The `q` quantile (seconds) of the requests observed between two readings of a
/// cumulative histogram, interpolated linearly inside its bucket as Prometheus'
/// `histogram_quantile` does. 0 when nothing was observed.
fn bucket_quantile(before: &BTreeMap<u64, f64>, after: &BTreeMap<u64, f64>, q: f64) -> f64 {
    let diff: Vec<(u64, f64)> = after
        .iter()
        .map(|(le, n)| (*le, n - before.get(le).copied().unwrap_or(0.0)))
        .collect();
    let Some(&(_, total)) = diff.last() else {
        return 0.0;
    };
    if total <= 0.0 {
        return 0.0;
    }
    let rank = q * total;
    let (mut lower, mut below) = (0u64, 0.0);
    for (le, cumulative) in diff {
        if cumulative >= rank {
            if le == u64::MAX {
                // Past the last finite bound: that bound is all that is known.
                return lower as f64 / 1e9;
            }
            let inside = cumulative - below;
            let fraction = if inside > 0.0 {
                (rank - below) / inside
            } else {
                1.0
            };
            return (lower as f64 + (le - lower) as f64 * fraction) / 1e9;
        }
        lower = le;
        below = cumulative;
    }
    lower as f64 / 1e9
}

/// Bytes of the files under `dir`, all levels.
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(_) => e.metadata().map(|m| m.len()).unwrap_or(0),
            Err(_) => 0,
        })
        .sum()
}
