//! Section `waiters`: what clients that wait cost `serve`. An idle `serve` first; then
//! one `serve` holding 1000 `?wait` requests and 1000 log follows (fewer with
//! `--quick`, said in each figure's name), each on a run of its own that stays queued
//! (its job runs one at a time and a first run holds the slot on the no-op runtime).
//! The resident memory with all of them held, then every run is cancelled and each
//! hold's answer (the wait's 200, the follow stream's end) is timed from the moment
//! its run's cancel was answered.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;

use crate::common::{Bench, Serve, ServeConfig, cpu_seconds};
use crate::load::{Conn, percentile_ms};
use crate::report::{Row, Target};

const SECTION: &str = "waiters";
const MIB: f64 = 1024.0 * 1024.0;
/// Clients cancelling the runs at the end, at once.
const CANCELLERS: usize = 8;

/// The job whose runs wait: one at a time, so all but the first stay queued.
const HOLD_JOB: &str = r#"description = "One at a time: the rest wait their turn"
image = "tasuki-example:latest"
pull = "never"
network = "none"
command = ["true"]
timeout = "2h"
max_concurrent = 1
"#;

pub async fn run(bench: &Bench, report: &mut crate::report::Report) -> anyhow::Result<()> {
    let holds = bench.count(1000, 200);
    raise_open_files(2 * holds as u64 + 256)?;
    idle(bench, report).await?;
    held(bench, report, holds).await
}

/// Resident memory of a `serve` as a user starts it (embedded worker, Docker runtime),
/// once it has settled with nothing to do.
async fn idle(bench: &Bench, report: &mut crate::report::Report) -> anyhow::Result<()> {
    let serve = Serve::start(bench, ServeConfig::default()).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss = settled_rss(&serve).await;
    eprintln!("perf:   idle serve: {}", smaps_rollup(serve.proc.pid()));
    serve.stop(&bench.docker);
    report.add(
        Row::new(
            SECTION,
            "idle serve RSS (embedded, Docker runtime)",
            rss,
            "MiB",
        )
        .target(Target::AtMost(30.0)),
    );
    Ok(())
}

async fn held(
    bench: &Bench,
    report: &mut crate::report::Report,
    holds: usize,
) -> anyhow::Result<()> {
    let jobs = bench.dir("waiters-jobs")?;
    std::fs::write(jobs.join("hold.toml"), HOLD_JOB).context("writing the job")?;
    let serve = Serve::start(
        bench,
        ServeConfig {
            concurrency: 1,
            jobs_dir: Some(jobs),
            extra_args: ["--runtime", "noop", "--noop-run-for", "1h"]
                .map(String::from)
                .to_vec(),
            env: vec![
                // Exactly the holds the section opens: one more is refused (429), which
                // is how the section knows they are all in place.
                ("TASUKI_LIMITS_MAX_HOLDS_PER_TOKEN", (2 * holds).to_string()),
                ("TASUKI_LIMITS_RATE_PER_SECOND", "0".into()),
            ],
            ..ServeConfig::default()
        },
    )
    .await?;
    let result = held_on(&serve, report, holds).await;
    serve.stop(&bench.docker);
    result
}

async fn held_on(
    serve: &Serve,
    report: &mut crate::report::Report,
    holds: usize,
) -> anyhow::Result<()> {
    // The first run takes the job's one slot and "runs" for an hour; the others wait.
    let mut conn = Conn::open(serve.addr).await?;
    let blocker = create_run(&mut conn).await?;
    let runs = create_runs(serve, 2 * holds).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = settled_rss(serve).await;
    eprintln!(
        "perf:   before the holds: {}",
        smaps_rollup(serve.proc.pid())
    );

    // One connection per hold, opened one after another (a burst of connects would
    // overflow the listen backlog and time SYN retries instead of tasuki).
    let mut conns = Vec::with_capacity(runs.len());
    for _ in 0..runs.len() {
        conns.push(Conn::open(serve.addr).await?);
    }
    let mut tasks = Vec::with_capacity(runs.len());
    for (i, (id, mut c)) in runs.iter().cloned().zip(conns).enumerate() {
        let path = if i < holds {
            format!("/v1/runs/{id}?wait=3600")
        } else {
            format!("/v1/runs/{id}/logs?follow=true")
        };
        tasks.push(tokio::spawn(async move {
            let answer = c.request("GET", &path, &[], Bytes::new()).await;
            (Instant::now(), answer)
        }));
    }
    wait_all_held(serve, &mut conn, &blocker).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let with_holds = settled_rss(serve).await;
    eprintln!("perf:   with the holds: {}", smaps_rollup(serve.proc.pid()));
    let cpu_from = cpu_seconds(serve.proc.pid());
    let idle_for = Duration::from_secs(5);
    tokio::time::sleep(idle_for).await;
    let idle_cpu = (cpu_seconds(serve.proc.pid()) - cpu_from) / idle_for.as_secs_f64();

    let cancelled = cancel_all(serve, &runs).await?;
    // From the cancel's answer (a hold answered before it counts as 0), and from its
    // request (an upper bound: it includes the cancel's own commit).
    let (mut waits, mut waits_sent) = (Vec::with_capacity(holds), Vec::with_capacity(holds));
    let (mut follows, mut follows_sent) = (Vec::with_capacity(holds), Vec::with_capacity(holds));
    let mut failures = Vec::new();
    for (i, task) in tasks.into_iter().enumerate() {
        let (answered, answer) = tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .with_context(|| format!("hold {i} not answered 60 s after its run was cancelled"))?
            .context("hold task")?;
        match answer {
            Ok(a) if a.status == 200 && (i >= holds || is_cancelled(&a.body)) => {
                let (sent, done) = cancelled[i];
                let (latency, from_sent) = (
                    answered.saturating_duration_since(done),
                    answered.saturating_duration_since(sent),
                );
                if i < holds {
                    waits.push(latency);
                    waits_sent.push(from_sent);
                } else {
                    follows.push(latency);
                    follows_sent.push(from_sent);
                }
            }
            Ok(a) => failures.push(format!("{} {}", a.status, String::from_utf8_lossy(&a.body))),
            Err(e) => failures.push(format!("{e:#}")),
        }
    }
    if !failures.is_empty() {
        bail!("{} holds failed, first: {}", failures.len(), failures[0]);
    }

    let n = holds;
    report.add(
        Row::new(
            SECTION,
            format!("serve RSS with {n} ?wait + {n} log follows held"),
            with_holds,
            "MiB",
        )
        .baseline(
            format!("same serve, {} runs queued, no holds", 2 * n),
            before,
        )
        .target(Target::AtMost(100.0)),
    );
    report.add(Row::new(
        SECTION,
        format!("serve RSS per hold ({} holds)", 2 * n),
        (with_holds - before) * 1024.0 / (2 * n) as f64,
        "KiB",
    ));
    report.add(Row::new(
        SECTION,
        format!("serve CPU while {} holds wait", 2 * n),
        idle_cpu * 100.0,
        "% of a core",
    ));
    for (what, samples, from_sent) in [
        ("?wait answer", &mut waits, &mut waits_sent),
        ("follow end", &mut follows, &mut follows_sent),
    ] {
        let (p50, max) = (percentile_ms(samples, 50.0), percentile_ms(samples, 100.0));
        let sent_p99 = percentile_ms(from_sent, 99.0);
        report.add(
            Row::new(
                SECTION,
                format!(
                    "{what} after its run's cancel answered, {n} at once: p99 (p50 {p50:.1} ms, max {max:.1} ms; from the cancel's request p99 {sent_p99:.1} ms)"
                ),
                percentile_ms(samples, 99.0),
                "ms",
            )
            .target(Target::AtMost(50.0)),
        );
    }
    Ok(())
}

/// A run of the hold job; its id.
async fn create_run(conn: &mut Conn) -> anyhow::Result<String> {
    let a = conn
        .request("POST", "/v1/jobs/hold/runs", &[], Bytes::new())
        .await?;
    if a.status != 202 {
        bail!(
            "creating a run: {} {}",
            a.status,
            String::from_utf8_lossy(&a.body)
        );
    }
    let run: serde_json::Value = serde_json::from_slice(&a.body).context("a run's JSON")?;
    run["id"]
        .as_str()
        .map(str::to_owned)
        .context("a run without an id")
}

/// `count` runs, created by a few clients at once; their ids in creation order.
async fn create_runs(serve: &Serve, count: usize) -> anyhow::Result<Vec<String>> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..CANCELLERS {
        let (next, addr) = (next.clone(), serve.addr);
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::open(addr).await?;
            let mut made = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < count {
                made.push(create_run(&mut conn).await?);
            }
            anyhow::Ok(made)
        }));
    }
    let mut ids = Vec::with_capacity(count);
    for t in tasks {
        ids.extend(t.await??);
    }
    Ok(ids)
}

/// Until every hold the section opened is in place: `serve` has gone quiet (all the
/// requests are read and waiting), and then one more hold is refused.
async fn wait_all_held(serve: &Serve, conn: &mut Conn, blocker: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let pid = serve.proc.pid();
    let mut cpu = cpu_seconds(pid);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = cpu_seconds(pid);
        if now - cpu <= 0.02 || Instant::now() > deadline {
            break;
        }
        cpu = now;
    }
    let path = format!("/v1/runs/{blocker}?wait=1");
    loop {
        let a = conn.request("GET", &path, &[], Bytes::new()).await?;
        if a.status == 429 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the holds were not all in place within 60 s (probe: {})",
                a.status
            );
        }
    }
}

/// Cancel every run, a few at once; when each cancel was sent and answered, in `runs`
/// order.
async fn cancel_all(serve: &Serve, runs: &[String]) -> anyhow::Result<Vec<(Instant, Instant)>> {
    let runs: Arc<[String]> = runs.into();
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..CANCELLERS {
        let (next, runs, addr) = (next.clone(), runs.clone(), serve.addr);
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::open(addr).await?;
            let mut done = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(id) = runs.get(i) else { break };
                let path = format!("/v1/runs/{id}/cancel");
                let sent = Instant::now();
                let a = conn.request("POST", &path, &[], Bytes::new()).await?;
                if a.status != 202 && a.status != 200 {
                    bail!("cancel: {} {}", a.status, String::from_utf8_lossy(&a.body));
                }
                done.push((i, (sent, Instant::now())));
            }
            anyhow::Ok(done)
        }));
    }
    let mut at = vec![(Instant::now(), Instant::now()); runs.len()];
    for t in tasks {
        for (i, when) in t.await?? {
            at[i] = when;
        }
    }
    Ok(at)
}

fn is_cancelled(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body)
        .is_ok_and(|v| v["status"].as_str() == Some("cancelled"))
}

/// The highest of a few readings a fifth of a second apart, in MiB.
async fn settled_rss(serve: &Serve) -> f64 {
    let mut most = 0;
    for _ in 0..5 {
        most = most.max(serve.proc.rss_bytes());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    most as f64 / MIB
}

/// /proc/PID/smaps_rollup's main lines on one line, for the log.
fn smaps_rollup(pid: u32) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    text.lines()
        .filter(|l| {
            ["Rss:", "Anonymous:", "Shared_Clean:", "Private_Clean:"]
                .iter()
                .any(|k| l.starts_with(k))
        })
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Enough open files for one connection per hold, here and in the `serve` it starts
/// (which inherits the limit): the soft limit raised, up to the hard one.
fn raise_open_files(needed: u64) -> anyhow::Result<()> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current.is_some_and(|c| c >= needed) || limit.current.is_none() {
        return Ok(());
    }
    if limit.maximum.is_some_and(|m| m < needed) {
        bail!(
            "{needed} open files needed, the hard limit is {:?}: raise it (ulimit -Hn)",
            limit.maximum
        );
    }
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(needed),
            maximum: limit.maximum,
        },
    )
    .context("raising RLIMIT_NOFILE")
}
