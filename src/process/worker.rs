//! The `tasuki worker` process, and the worker half `serve` runs in embedded mode: the
//! host lock and session for a worker id, the Docker runtime, the dispatch loop.

use std::sync::Arc;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::config::{WorkerArgs, WorkerOptions};
use crate::domain::ports::{ContainerRuntime, ControlPlane, DeliverySource};
use crate::domain::session::SessionRequest;
use crate::service::session::Session;
#[cfg(feature = "fault-injection")]
use crate::service::worker::CrashPoint;
use crate::service::worker::{Worker, WorkerConfig};
use crate::{amqp, client, docker, hostlock, http, metrics};

/// `tasuki worker`: RabbitMQ in, Docker to run, the control plane over HTTP.
pub async fn worker(args: WorkerArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    if args.worker_token.is_empty() {
        anyhow::bail!("--worker-token / TASUKI_WORKER_TOKEN must not be empty");
    }
    let control =
        client::HttpControlPlane::new(&args.server, &args.worker_token, args.ca_cert.as_deref())
            .context("configuring the control plane client")?;
    let control: Arc<dyn ControlPlane> = Arc::new(control);
    let registry = metrics::Metrics::new()?;
    let worker_metrics = metrics::WorkerMetrics::register(&registry)?;
    let runtime = docker(&args.worker, &worker_metrics)?;
    let config = worker_config(&args.worker);
    if let Some(addr) = args.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening for metrics on {addr}"))?;
        let addr = listener
            .local_addr()
            .context("reading the metrics address")?;
        tracing::info!(message = "serving metrics", %addr, path = "/metrics");
        let stop = shutdown.clone();
        tokio::spawn(async move {
            if let Err(error) = http::metrics::serve_worker_metrics(listener, registry, stop).await
            {
                tracing::error!(message = "metrics listener stopped", %error);
            }
        });
    }
    let identity =
        open_worker_session(control.clone(), &args.worker, &config.worker_id, &shutdown).await?;
    let source = Box::new(
        amqp::AmqpSource::new(&args.amqp_url, &args.queue.queue, &config.worker_id)
            .with_queue_kind(super::queue_kind(&args.queue)),
    );
    run_worker(
        Worker::new(control, runtime, config).with_observer(worker_metrics),
        source,
        identity,
        shutdown,
    )
    .await
}

/// The host lock and the control plane session for a worker id: both must be had
/// before the worker looks at a single container.
pub(super) async fn open_worker_session(
    control: Arc<dyn ControlPlane>,
    options: &WorkerOptions,
    worker_id: &str,
    shutdown: &CancellationToken,
) -> anyhow::Result<(hostlock::HostLock, Session)> {
    let instance = ulid::Ulid::new().to_string().to_ascii_lowercase();
    let lock_dir = options
        .lock_dir
        .clone()
        .unwrap_or_else(hostlock::default_lock_dir);
    let lock = hostlock::HostLock::acquire(&lock_dir, worker_id, &instance)?;
    let request = SessionRequest {
        worker_id: worker_id.to_owned(),
        instance,
        host: gethostname::gethostname().to_string_lossy().into_owned(),
        pid: std::process::id(),
        lock_released_by: lock.released_by().map(str::to_owned),
        build: Some(crate::BUILD.to_owned()),
    };
    let session = Session::open(control, request, shutdown).await?;
    Ok((lock, session))
}

/// Run the worker under its session: heartbeats while it runs (drain included), then
/// goodbye. Another process taking the id stops the worker.
pub(super) async fn run_worker(
    worker: Worker,
    source: Box<dyn DeliverySource>,
    identity: (hostlock::HostLock, Session),
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let (lock, session) = identity;
    let superseded = CancellationToken::new();
    let worker_stop = CancellationToken::new();
    let keeper_stop = CancellationToken::new();
    let relay_stop = {
        let (shutdown, superseded, worker_stop) =
            (shutdown.clone(), superseded.clone(), worker_stop.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = superseded.cancelled() => {}
            }
            worker_stop.cancel();
        })
    };
    let work = async {
        worker.run(source, worker_stop.clone()).await;
        keeper_stop.cancel();
    };
    tokio::join!(
        work,
        session.keep_alive(keeper_stop.clone(), superseded.clone())
    );
    relay_stop.abort();
    let result = if superseded.is_cancelled() {
        Err(anyhow::anyhow!(
            "another process took this worker id while this one was out of touch; stopped"
        ))
    } else {
        session.end().await;
        Ok(())
    };
    drop(lock);
    result
}

pub(super) fn worker_config(options: &WorkerOptions) -> WorkerConfig {
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

/// The Docker runtime, its errors counted in `metrics`.
pub(super) fn docker(
    options: &WorkerOptions,
    metrics: &Arc<metrics::WorkerMetrics>,
) -> anyhow::Result<Arc<dyn ContainerRuntime>> {
    #[cfg(feature = "bench")]
    if options.runtime == "noop" {
        return Ok(Arc::new(metrics::ObservedRuntime::new(
            Arc::new(crate::noop_runtime::NoopRuntime::new(
                options.noop_run_for,
                options.noop_output_bytes,
            )),
            metrics.clone(),
        )));
    }
    let runtime = docker::DockerRuntime::connect(options.docker_host.as_deref())
        .context("configuring the Docker client")?;
    Ok(Arc::new(metrics::ObservedRuntime::new(
        Arc::new(runtime),
        metrics.clone(),
    )))
}
