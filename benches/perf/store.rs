//! Section `store`: a store of 1,000,000 runs (100,000 with `--quick`), generated, not
//! executed (`store/generate.rs`): `serve`'s start-up on it, reads of one run and of the
//! lists the API and the web UI ask for, and accepts while retention deletes the runs
//! older than 30 days.

mod generate;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;

use crate::common::{Bench, Serve, ServeConfig, delete_queues, unique};
use crate::load::{Conn, LoadResult, MakeRequest, closed_loop};
use crate::report::{Report, Row, Target};

const SECTION: &str = "store";
/// The generated runs were created over this span before now ...
const SPAN: Duration = Duration::from_secs(42 * 24 * 3600);
/// ... and those ended before this long ago are what `serve`'s default retention deletes.
const RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

/// The load generators are one caller: no request rate limit.
fn unlimited() -> (&'static str, String) {
    ("TASUKI_LIMITS_RATE_PER_SECOND", "0".into())
}

pub async fn run(bench: &Bench, report: &mut Report) -> anyhow::Result<()> {
    let n = bench.count(1_000_000, 100_000) as u64;
    let size = if bench.quick { "100k runs" } else { "1M runs" };
    // `TASUKI_PERF_STORE_DIR` keeps the generated store (for EXPLAIN, sqlite3 .timer).
    let dir = match std::env::var_os("TASUKI_PERF_STORE_DIR") {
        Some(d) => std::path::PathBuf::from(d),
        None => bench.dir("store")?,
    };
    let data = dir.join("data");
    let jobs = dir.join("jobs");
    std::fs::create_dir_all(&jobs)?;
    let now = chrono::Utc::now().timestamp_millis();
    let made = generate::generate(&data, &jobs, n, now, SPAN, RETENTION).await?;
    eprintln!(
        "perf:   generated {} runs, {} attempts ({} ended over 30 days ago), {} MiB, in {:.1?}",
        made.runs,
        made.attempts,
        made.old,
        made.db_bytes >> 20,
        made.took
    );
    report.add(Row::new(
        SECTION,
        format!("generate a store of {size} (context)"),
        made.took.as_secs_f64(),
        "s",
    ));
    let ids = sample_ids(&data).await?;

    reads(bench, report, size, &data, &jobs, &ids, now).await?;
    prune(bench, report, size, &data, &jobs, made.old).await
}

/// Start-up, the first scrape, one run, and the lists; on an embedded `serve` (no-op
/// runtime) that keeps everything.
async fn reads(
    bench: &Bench,
    report: &mut Report,
    size: &str,
    data: &std::path::Path,
    jobs: &std::path::Path,
    ids: &Arc<Vec<String>>,
    now: i64,
) -> anyhow::Result<()> {
    let serve = Serve::start(
        bench,
        ServeConfig {
            jobs_dir: Some(jobs.to_owned()),
            data_dir: Some(data.to_owned()),
            extra_args: [
                "--runtime",
                "noop",
                "--noop-run-for",
                "0s",
                "--noop-output-bytes",
                "64",
                "--retention",
                "0",
            ]
            .map(String::from)
            .to_vec(),
            env: vec![unlimited()],
            ..ServeConfig::default()
        },
    )
    .await?;
    report.add(
        Row::new(
            SECTION,
            format!("serve start-up on {size} (spawn → /healthz)"),
            serve.started_in.as_secs_f64(),
            "s",
        )
        .target(Target::AtMost(2.0)),
    );
    let mut conn = Conn::open(serve.addr).await?;
    let t = Instant::now();
    let scrape = conn.request("GET", "/metrics", &[], Bytes::new()).await?;
    anyhow::ensure!(scrape.status == 200, "/metrics answered {}", scrape.status);
    report.add(
        Row::new(
            SECTION,
            format!("first /metrics scrape on {size} (last success per job)"),
            t.elapsed().as_secs_f64() * 1000.0,
            "ms",
        )
        .target(Target::AtMost(500.0)),
    );
    // The generated queued runs go through the no-op worker first: reads are measured
    // on a quiet store.
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_secs(30) {
        let a = conn
            .request("GET", "/v1/runs?status=queued&limit=1", &[], Bytes::new())
            .await?;
        if a.status == 200 && a.body.as_ref() == br#"{"runs":[]}"# {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let phase = bench.phase(Duration::from_secs(10), Duration::from_secs(3));
    let get_ids = ids.clone();
    let get: MakeRequest = Arc::new(move |client, n| {
        let i = (client as u64 * 7919 + n * 104_729) as usize % get_ids.len();
        (
            "GET".into(),
            format!("/v1/runs/{}", get_ids[i]),
            Vec::new(),
            Bytes::new(),
        )
    });
    // One client: what a read costs on this store. Sixteen: the same under load, where
    // two cores shared by the clients and the server make the wait mostly queueing.
    for clients in [1, 16] {
        let r = closed_loop(serve.addr, clients, phase, get.clone(), |s| s == 200).await?;
        eprintln!(
            "perf:   GET /v1/runs/{{id}}, {clients} client(s): {}",
            r.summary()
        );
        let row = Row::new(
            SECTION,
            format!("GET /v1/runs/{{id}} p99, {clients} client(s), {size}"),
            r.ms(99.0),
            "ms",
        );
        report.add(if clients == 1 {
            row.target(Target::AtMost(5.0))
        } else {
            row
        });
    }

    let day = |ago: i64| {
        chrono::DateTime::from_timestamp_millis(now - ago * 86_400_000)
            .unwrap_or_default()
            .format("%Y-%m-%d")
            .to_string()
    };
    let lists: Vec<(&str, String)> = vec![
        ("newest 50", "/v1/runs?limit=50".into()),
        (
            "job (busy) newest 50",
            "/v1/runs?job=thumbnail&limit=50".into(),
        ),
        (
            "job (rare, 0.1%) newest 50",
            "/v1/runs?job=month-end&limit=50".into(),
        ),
        (
            "job + status=failed newest 50",
            "/v1/runs?job=etl-orders&status=failed&limit=50".into(),
        ),
        ("status=running", "/v1/runs?status=running&limit=50".into()),
        (
            "status=lost, the largest page, 1000",
            "/v1/runs?status=lost&limit=1000".into(),
        ),
        ("web UI page, no filter", "/ui/runs".into()),
        (
            "web UI: trigger=schedule, status=failed",
            "/ui/runs?trigger=schedule&status=failed".into(),
        ),
        (
            "web UI: job + trigger + one day, 3 weeks ago",
            format!(
                "/ui/runs?job=sync-crm&trigger=webhook&from={}&to={}",
                day(21),
                day(21)
            ),
        ),
        ("web UI: jobs page (every job's record)", "/ui/jobs".into()),
    ];
    let phase = bench.phase(Duration::from_secs(5), Duration::from_secs(2));
    for (what, path) in lists {
        let p = path.clone();
        let make: MakeRequest =
            Arc::new(move |_, _| ("GET".into(), p.clone(), Vec::new(), Bytes::new()));
        let r = closed_loop(serve.addr, 4, phase, make, |s| s == 200).await?;
        eprintln!("perf:   {path}: {}", r.summary());
        anyhow::ensure!(r.ok > 0, "{path}: {}", r.summary());
        let row = Row::new(
            SECTION,
            format!("list {what} p99, 4 clients, {size}"),
            r.ms(99.0),
            "ms",
        );
        // The API's largest page is judged by nothing: its cost is the answer's size.
        report.add(if what.ends_with("1000") {
            row
        } else {
            row.target(Target::AtMost(20.0))
        });
    }
    serve.stop(&bench.docker);
    Ok(())
}

/// Accepts at 16 clients on an AMQP `serve` (nothing executing), first with nothing to
/// prune, then while its start-up pass deletes every run ended over 30 days ago.
async fn prune(
    bench: &Bench,
    report: &mut Report,
    size: &str,
    data: &std::path::Path,
    jobs: &std::path::Path,
    old: u64,
) -> anyhow::Result<()> {
    let queue = unique("perf-store");
    let result = prune_on(bench, report, size, data, jobs, old, &queue).await;
    delete_queues(&queue);
    result
}

async fn prune_on(
    bench: &Bench,
    report: &mut Report,
    size: &str,
    data: &std::path::Path,
    jobs: &std::path::Path,
    old: u64,
    queue: &str,
) -> anyhow::Result<()> {
    let config = |retention: &str| ServeConfig {
        amqp_queue: Some(queue.to_owned()),
        jobs_dir: Some(jobs.to_owned()),
        data_dir: Some(data.to_owned()),
        extra_args: vec!["--retention".into(), retention.into()],
        env: vec![
            unlimited(),
            ("TASUKI_LOG", "warn,tasuki::service::retention=info".into()),
        ],
        ..ServeConfig::default()
    };
    let accept: MakeRequest = Arc::new(|_, _| {
        (
            "POST".into(),
            "/v1/jobs/thumbnail/runs".into(),
            Vec::new(),
            Bytes::new(),
        )
    });
    let accepted = |s: u16| s == 202;

    let serve = Serve::start(bench, config("0")).await?;
    let phase = bench.phase(Duration::from_secs(10), Duration::from_secs(3));
    let quiet = closed_loop(serve.addr, 16, phase, accept.clone(), accepted).await?;
    eprintln!("perf:   accepts, nothing to prune: {}", quiet.summary());
    serve.stop(&bench.docker);

    // The pass `serve` makes at start: load begins as soon as it answers, and lasts
    // until the pass has logged what it deleted.
    let serve = Serve::start(bench, config("30days")).await?;
    let spawned = Instant::now() - serve.started_in;
    let log = serve.proc.log.clone();
    let watcher = tokio::spawn(async move {
        loop {
            let text = tokio::fs::read_to_string(&log).await.unwrap_or_default();
            if let Some(line) = text.lines().find(|l| l.contains("pruned")) {
                return Some((Instant::now(), line.to_owned()));
            }
            if spawned.elapsed() > Duration::from_secs(600) {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let mut during = LoadResult {
        ok: 0,
        errors: 0,
        elapsed: Duration::ZERO,
        latency: Histogram::new(3)?,
        first_error: None,
    };
    while !watcher.is_finished() {
        let r = closed_loop(
            serve.addr,
            16,
            Duration::from_secs(1),
            accept.clone(),
            accepted,
        )
        .await?;
        during.ok += r.ok;
        during.errors += r.errors;
        during.elapsed += r.elapsed;
        during.latency.add(r.latency)?;
        during.first_error = during.first_error.or(r.first_error);
    }
    let (done_at, line) = watcher
        .await?
        .ok_or_else(|| anyhow::anyhow!("the start-up prune did not finish in 10 minutes"))?;
    serve.stop(&bench.docker);
    let pruned: u64 = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("runs="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    eprintln!(
        "perf:   accepts during the prune of {pruned} runs ({old} generated old): {}",
        during.summary()
    );
    anyhow::ensure!(
        pruned >= old,
        "the prune deleted {pruned} runs, {old} were old"
    );
    let took = done_at.duration_since(spawned);
    report.add(
        Row::new(
            SECTION,
            format!("accept p99 during a prune of {pruned} runs, 16 clients, {size}"),
            during.ms(99.0),
            "ms",
        )
        .baseline("accept p99 with nothing to prune", quiet.ms(99.0))
        .target(Target::AtMost(50.0)),
    );
    report.add(
        Row::new(
            SECTION,
            format!("accepts/s during the prune, {size} (context)"),
            during.per_second(),
            "/s",
        )
        .baseline("nothing to prune", quiet.per_second()),
    );
    report.add(Row::new(
        SECTION,
        format!("prune rate under that load, {size} (context)"),
        pruned as f64 / took.as_secs_f64(),
        "runs/s",
    ));
    Ok(())
}

/// Run ids spread over the whole store, for the reads.
async fn sample_ids(data: &std::path::Path) -> anyhow::Result<Arc<Vec<String>>> {
    use sqlx::Connection;
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(data.join("tasuki.db"))
        .read_only(true);
    let mut conn = sqlx::sqlite::SqliteConnection::connect_with(&options).await?;
    let ids: Vec<(String,)> =
        sqlx::query_as("SELECT id FROM runs WHERE (rowid % 97) = 0 ORDER BY rowid")
            .fetch_all(&mut conn)
            .await?;
    conn.close().await?;
    anyhow::ensure!(!ids.is_empty(), "no runs generated");
    Ok(Arc::new(ids.into_iter().map(|(id,)| id).collect()))
}
