//! tasuki runs batch jobs as one-shot containers when something asks for them.
//!
//! A tour: `domain` holds the pure types (jobs, runs, outcomes) and the ports the
//! services need; `service` holds the use cases (accept a run, relay the outbox, run a
//! worker, answer workers as the control plane); the adapters implement the ports:
//! `store` (SQLite), `amqp` (RabbitMQ), `memqueue` (in-process queue), `docker`
//! (bollard), `logsink` (files), `client` (HTTP to a remote control plane), `http`
//! (the axum API). This file is the one place where concrete adapters meet.

pub mod amqp;
pub mod catalog;
pub mod cli;
pub mod client;
pub mod config;
pub mod docker;
pub mod domain;
pub mod http;
pub mod logsink;
pub mod memqueue;
pub mod protocol;
pub mod service;
pub mod shutdown;
pub mod store;

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::catalog::Catalog;
use crate::config::{
    Command, JobsCommand, PruneArgs, RunsCommand, ServeArgs, WorkerArgs, WorkerOptions,
};
use crate::domain::ports::{ContainerRuntime, ControlPlane, DeliverySource, RunQueue, RunStore};
use crate::domain::retention::{Retention, RetentionStore};
use crate::service::control::LocalControlPlane;
use crate::service::events::RunEvents;
use crate::service::relay::Relay;
use crate::service::retention::Pruner;
use crate::service::runs::Runs;
#[cfg(feature = "fault-injection")]
use crate::service::worker::CrashPoint;
use crate::service::worker::{Worker, WorkerConfig};

/// Run one command of the binary; the exit code is the command's (for `run --wait`,
/// the job's).
pub async fn run(command: Command, shutdown: CancellationToken) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve(args) => serve(args, shutdown).await.map(|()| ExitCode::SUCCESS),
        Command::Worker(args) => worker(args, shutdown).await.map(|()| ExitCode::SUCCESS),
        Command::Run(args) => Ok(cli::run(args).await),
        Command::Status(args) => Ok(cli::status(args).await),
        Command::Logs(args) => Ok(cli::logs(args).await),
        Command::Cancel(args) => Ok(cli::run_action(args, "cancel").await),
        Command::Retry(args) => Ok(cli::run_action(args, "retry").await),
        Command::Jobs(JobsCommand::Check { dir }) => Ok(cli::check_jobs(&dir)),
        Command::Runs(RunsCommand::Prune(args)) => prune(args, shutdown).await,
    }
}

fn worker_config(options: &WorkerOptions) -> WorkerConfig {
    WorkerConfig {
        worker_id: options.worker_id(),
        concurrency: options.concurrency(),
        drain_timeout: options.drain_timeout,
        reconcile_interval: options.reconcile_interval,
        // Fault-test builds only; see README "Testing".
        #[cfg(feature = "fault-injection")]
        crash_at: std::env::var("TASUKI_CRASH_AT")
            .ok()
            .and_then(|v| CrashPoint::parse(&v)),
    }
}

fn docker(options: &WorkerOptions) -> anyhow::Result<Arc<dyn ContainerRuntime>> {
    let runtime = docker::DockerRuntime::connect(options.docker_host.as_deref())
        .context("configuring the Docker client")?;
    Ok(Arc::new(runtime))
}

/// `tasuki serve`: API, store, outbox relay, and (without AMQP, or when asked) a worker.
pub async fn serve(args: ServeArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let catalog = Catalog::load_dir(&args.jobs_dir).map_err(|errors| {
        anyhow::anyhow!(
            "invalid job definitions in {}:\n{errors}",
            args.jobs_dir.display()
        )
    })?;
    tracing::info!(message = "jobs loaded", count = catalog.len(), dir = %args.jobs_dir.display());
    let store = store::SqliteStore::open(&args.data_dir)
        .await
        .with_context(|| format!("opening the run store in {}", args.data_dir.display()))?;
    let store = Arc::new(store);
    let retained: Arc<dyn RetentionStore> = store.clone();
    let store: Arc<dyn RunStore> = store;
    let logs = Arc::new(logsink::FileLogSink::new(args.data_dir.join("logs")));
    let pruner = Pruner::new(
        retained,
        logs.clone(),
        Retention::from_setting(args.retention),
    );
    let events = RunEvents::new();
    let wake = Arc::new(Notify::new());
    let control = Arc::new(LocalControlPlane::new(
        store.clone(),
        logs.clone(),
        events.clone(),
        args.lease_ttl,
    ));
    let runs = Runs::new(
        Arc::new(catalog),
        store.clone(),
        logs,
        events,
        wake.clone(),
        shutdown.clone(),
    );

    // The queue: RabbitMQ, or in-process. The in-process one forgets everything when
    // the process ends, so every run still waiting is published to it again.
    let (queue, source): (Arc<dyn RunQueue>, Option<Box<dyn DeliverySource>>) = match &args.amqp_url
    {
        Some(url) => {
            let source = args.embedded_worker.then(|| {
                Box::new(amqp::AmqpSource::new(
                    url,
                    &args.queue.queue,
                    &args.worker.worker_id(),
                )) as Box<dyn DeliverySource>
            });
            (
                Arc::new(amqp::AmqpPublisher::new(url, &args.queue.queue)),
                source,
            )
        }
        None => {
            let requeued = store
                .requeue_unclaimed()
                .await
                .context("re-queueing waiting runs")?;
            if requeued > 0 {
                tracing::info!(
                    message = "runs still waiting from before the restart re-queued",
                    count = requeued
                );
            }
            let q = memqueue::MemQueue::new();
            let source = Box::new(q.source()) as Box<dyn DeliverySource>;
            (Arc::new(q), Some(source))
        }
    };

    let tasks = tokio_util::task::TaskTracker::new();
    let relay = Relay {
        store: store.clone(),
        queue: queue.clone(),
        wake,
        republish_after: args.republish_after,
    };
    tasks.spawn(relay.run(shutdown.clone()));
    tasks.spawn(
        control
            .as_ref()
            .clone()
            .reap_expired_leases(shutdown.clone()),
    );
    tasks.spawn(pruner.run(service::retention::EVERY, shutdown.clone()));

    let runtime = match source {
        Some(source) => {
            let runtime = docker(&args.worker)?;
            let worker = Worker::new(
                control.clone(),
                runtime.clone(),
                worker_config(&args.worker),
            );
            tasks.spawn(worker.run(source, shutdown.clone()));
            Some(runtime)
        }
        None => None,
    };

    let accepting = Arc::new(AtomicBool::new(true));
    let state = http::AppState {
        runs,
        control: control as Arc<dyn ControlPlane>,
        store,
        queue,
        runtime,
        worker_token: args.worker_token.filter(|t| !t.is_empty()).map(Arc::from),
        accepting: accepting.clone(),
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let addr = listener
        .local_addr()
        .context("reading the listening address")?;
    tracing::info!(message = "listening", %addr);
    let stop = shutdown.clone();
    let flag = accepting.clone();
    http::serve(listener, http::router(state), async move {
        stop.cancelled().await;
        flag.store(false, Ordering::SeqCst);
    })
    .await
    .context("serving HTTP")?;
    tasks.close();
    tasks.wait().await;
    tracing::info!(message = "stopped");
    Ok(())
}

/// `tasuki runs prune`: one pass against the data dir, as `serve` makes them. WAL and
/// the busy timeout let it share the database with a running `serve`.
pub async fn prune(args: PruneArgs, shutdown: CancellationToken) -> anyhow::Result<ExitCode> {
    let db = args.data_dir.join("tasuki.db");
    if !db.exists() {
        anyhow::bail!("no run store at {}", db.display());
    }
    let store = store::SqliteStore::open(&args.data_dir)
        .await
        .with_context(|| format!("opening the run store in {}", args.data_dir.display()))?;
    let logs = logsink::FileLogSink::new(args.data_dir.join("logs"));
    let retention = Retention::For(args.older_than);
    let now = chrono::Utc::now();
    let pruner = Pruner::new(Arc::new(store), Arc::new(logs), retention);
    let report = pruner.prune(now, &shutdown).await?;
    let cutoff = retention.cutoff(now).map_or_else(String::new, |t| {
        t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    });
    println!(
        "deleted {} run(s) finished before {cutoff} and {} log dir(s); {} expired idempotency key(s), {} spent outbox row(s)",
        report.runs, report.log_dirs, report.keys, report.outbox_rows
    );
    Ok(ExitCode::SUCCESS)
}

/// `tasuki worker`: RabbitMQ in, Docker to run, the control plane over HTTP.
pub async fn worker(args: WorkerArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    if args.worker_token.is_empty() {
        anyhow::bail!("--worker-token / TASUKI_WORKER_TOKEN must not be empty");
    }
    let control = client::HttpControlPlane::new(&args.server, &args.worker_token)
        .context("configuring the control plane client")?;
    let runtime = docker(&args.worker)?;
    let config = worker_config(&args.worker);
    let source = Box::new(amqp::AmqpSource::new(
        &args.amqp_url,
        &args.queue.queue,
        &config.worker_id,
    ));
    Worker::new(Arc::new(control), runtime, config)
        .run(source, shutdown)
        .await;
    Ok(())
}
