//! Section `accepts`: durable accepts (POST → 202: stored with `synchronous=FULL` and,
//! in AMQP mode, published with confirms by the relay) at 64 clients, embedded and AMQP,
//! beside a RabbitMQ producer publishing persistent messages with confirms at 64.
//!
//! "The relay keeps up" is read from `/metrics` `tasuki_outbox_backlog` (publishes
//! stored and not yet confirmed) at the start and at the end of the load. Embedded mode
//! runs the in-process worker on the no-op runtime, so the runs accepted are also
//! claimed and finished at control-plane speed (the in-process queue is bounded; with
//! nothing draining it the backlog would grow by design). AMQP mode has no consumer on
//! the run queue: the relay publishes into a unique queue, deleted after.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use hdrhistogram::Histogram;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};

use crate::common::{Bench, Serve, ServeConfig, delete_queues, unique};
use crate::load::{LoadResult, MakeRequest, closed_loop};
use crate::report::{Report, Row, Target};

const SECTION: &str = "accepts";
const CLIENTS: usize = 64;
const TARGET_PER_SECOND: f64 = 10_000.0;
const TARGET_P99_MS: f64 = 20.0;

pub async fn run(bench: &Bench, report: &mut Report) -> anyhow::Result<()> {
    let duration = bench.phase(Duration::from_secs(60), Duration::from_secs(10));

    let producer = rabbit_producer(bench, CLIENTS, duration).await?;
    eprintln!("accepts: rabbitmq producer {}", producer.summary());

    for mode in [Mode::Embedded, Mode::Amqp] {
        let measured = accepts(bench, mode, duration).await?;
        let name = mode.name();
        report.add(
            Row::new(
                SECTION,
                format!("{name}: accepts/s at {CLIENTS} clients"),
                measured.load.per_second(),
                "/s",
            )
            .baseline("RabbitMQ producer, confirms", producer.per_second())
            .target(Target::AtLeast(TARGET_PER_SECOND)),
        );
        report.add(
            Row::new(
                SECTION,
                format!("{name}: accept p99 at {CLIENTS} clients"),
                measured.load.ms(99.0),
                "ms",
            )
            .baseline("RabbitMQ producer, confirms", producer.ms(99.0))
            .target(Target::AtMost(TARGET_P99_MS)),
        );
        report.add(Row::new(
            SECTION,
            format!("{name}: accept p50 at {CLIENTS} clients"),
            measured.load.ms(50.0),
            "ms",
        ));
        report.add(
            Row::new(
                SECTION,
                format!(
                    "{name}: outbox backlog at the end (start {})",
                    measured.backlog_start
                ),
                measured.backlog_end as f64,
                "msgs",
            )
            // Keeping up: the backlog at the end is no more than a second's worth of
            // publishes in flight (batches out, confirms pending).
            .target(Target::AtMost(
                measured.backlog_start as f64 + measured.load.per_second(),
            )),
        );
    }
    Ok(())
}

#[derive(Clone, Copy)]
enum Mode {
    Embedded,
    Amqp,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Embedded => "embedded",
            Mode::Amqp => "amqp",
        }
    }
}

struct Measured {
    load: LoadResult,
    backlog_start: u64,
    backlog_end: u64,
}

async fn accepts(bench: &Bench, mode: Mode, duration: Duration) -> anyhow::Result<Measured> {
    let queue = unique("perf-accepts");
    // The per-caller rate limit (50/s for anonymous by default) is off: this measures
    // what the service sustains, not the limit.
    let env = vec![("TASUKI_LIMITS_RATE_PER_SECOND", "0".to_owned())];
    let mut config = match mode {
        Mode::Embedded => ServeConfig {
            concurrency: 64,
            extra_args: vec![
                "--runtime".into(),
                "noop".into(),
                "--noop-run-for".into(),
                "0s".into(),
                "--noop-output-bytes".into(),
                "64".into(),
            ],
            ..ServeConfig::default()
        },
        Mode::Amqp => ServeConfig {
            amqp_queue: Some(queue.clone()),
            concurrency: 1,
            ..ServeConfig::default()
        },
    };
    config.env = env;
    let serve = Serve::start(bench, config).await?;
    let result = measure(&serve, mode, duration).await;
    serve.stop(&bench.docker);
    if matches!(mode, Mode::Amqp) {
        delete_queues(&queue);
    }
    result
}

async fn measure(serve: &Serve, mode: Mode, duration: Duration) -> anyhow::Result<Measured> {
    let body = Bytes::from_static(b"{}");
    let make: MakeRequest = Arc::new(move |_, _| {
        (
            "POST".into(),
            "/v1/jobs/noop/runs".into(),
            Vec::new(),
            body.clone(),
        )
    });
    // A short warm-up so the first figures are not connection set-up.
    closed_loop(
        serve.addr,
        CLIENTS,
        Duration::from_millis(500),
        make.clone(),
        |s| s == 202,
    )
    .await?;
    let backlog_start = outbox_backlog(serve).await?;
    let load = closed_loop(serve.addr, CLIENTS, duration, make, |s| s == 202).await?;
    let backlog_end = outbox_backlog(serve).await?;
    eprintln!(
        "accepts: {} {} (outbox backlog {backlog_start} -> {backlog_end})",
        mode.name(),
        load.summary()
    );
    if load.ok == 0 {
        anyhow::bail!("no accepts: {}", load.first_error.as_deref().unwrap_or("?"));
    }
    Ok(Measured {
        load,
        backlog_start,
        backlog_end,
    })
}

/// `tasuki_outbox_backlog` from `/metrics`.
async fn outbox_backlog(serve: &Serve) -> anyhow::Result<u64> {
    let text = reqwest::get(format!("{}/metrics", serve.url()))
        .await?
        .error_for_status()?
        .text()
        .await?;
    text.lines()
        .find_map(|l| l.strip_prefix("tasuki_outbox_backlog "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .context("no tasuki_outbox_backlog in /metrics")
}

/// The baseline: `clients` publishers (one channel each, in confirm mode) publishing
/// persistent messages to one durable queue, each waiting for its confirm before the
/// next, for `duration`.
async fn rabbit_producer(
    bench: &Bench,
    clients: usize,
    duration: Duration,
) -> anyhow::Result<LoadResult> {
    let queue = unique("perf-producer");
    let conn = Connection::connect(&bench.amqp_url, ConnectionProperties::default())
        .await
        .context("connecting to RabbitMQ")?;
    let setup = conn.create_channel().await?;
    setup
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    let body = br#"{"v":1,"run_id":"01JBENCHBENCHBENCHBENCHBENC","attempt":1}"#;
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::with_capacity(clients);
    for _ in 0..clients {
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let queue = queue.clone();
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new(3)?;
            let (mut ok, mut errors) = (0u64, 0u64);
            let props = BasicProperties::default().with_delivery_mode(2);
            while Instant::now() < deadline {
                let sent = Instant::now();
                let confirmed = async {
                    channel
                        .basic_publish(
                            "".into(),
                            queue.as_str().into(),
                            BasicPublishOptions::default(),
                            body,
                            props.clone(),
                        )
                        .await?
                        .await
                }
                .await;
                match confirmed {
                    Ok(c) if c.is_ack() => {
                        ok += 1;
                        hist.record(sent.elapsed().as_micros() as u64)?;
                    }
                    _ => errors += 1,
                }
            }
            anyhow::Ok((ok, errors, hist))
        }));
    }
    let mut result = LoadResult::empty()?;
    for task in tasks {
        let (ok, errors, hist) = task.await??;
        result.add(ok, errors, None, hist)?;
    }
    result.elapsed = start.elapsed();
    delete_queues(&queue);
    let _ = conn.close(200, "done".into()).await;
    Ok(result)
}
