//! tasuki runs batch jobs as one-shot containers when something asks for them.
//!
//! A tour: `domain` holds the pure types (jobs, runs, outcomes) and the ports the
//! services need; `service` holds the use cases (accept a run, relay the outbox, run a
//! worker, answer workers as the control plane); the adapters implement the ports:
//! `store` (SQLite), `amqp` (RabbitMQ), `memqueue` (in-process queue), `docker`
//! (bollard), `logsink` (files), `secrets` (`serve`'s environment and files), `client`
//! (HTTP to a remote control plane), `http` (the axum API), `metrics` (Prometheus, the
//! observers' side). This file is the one place where concrete adapters meet.

pub mod amqp;
pub mod callback;
pub mod catalog;
pub mod cli;
pub mod client;
pub mod config;
pub mod docker;
pub mod domain;
pub mod hostlock;
pub mod http;
pub mod logsink;
pub mod memqueue;
pub mod metrics;
pub mod protocol;
pub mod secrets;
pub mod service;
pub mod shutdown;
pub mod store;

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::catalog::{CatalogDirs, Reloadable};
use crate::config::{
    Command, JobsCommand, PruneArgs, RunsCommand, ServeArgs, WorkerArgs, WorkerOptions,
};
use crate::domain::ports::{ContainerRuntime, ControlPlane, DeliverySource, RunQueue, RunStore};
use crate::domain::retention::{Retention, RetentionStore};
use crate::domain::session::SessionRequest;
use crate::service::control::LocalControlPlane;
use crate::service::events::RunEvents;
use crate::service::relay::Relay;
use crate::service::retention::Pruner;
use crate::service::runs::Runs;
use crate::service::session::{Session, SessionError};
#[cfg(feature = "fault-injection")]
use crate::service::worker::CrashPoint;
use crate::service::worker::{Worker, WorkerConfig};

/// Run one command of the binary; the exit code is the command's (for `run --wait`,
/// the job's).
pub async fn run(command: Command, shutdown: CancellationToken) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve(args) => exit_code_of(serve(*args, shutdown).await),
        Command::Worker(args) => exit_code_of(worker(args, shutdown).await),
        Command::Run(args) => Ok(cli::run(args).await),
        Command::Status(args) => Ok(cli::status(args).await),
        Command::Logs(args) => Ok(cli::logs(args).await),
        Command::Cancel(args) => Ok(cli::run_action(args, "cancel").await),
        Command::Retry(args) => Ok(cli::run_action(args, "retry").await),
        Command::Jobs(JobsCommand::Check {
            dir,
            calendars_dir,
            config,
        }) => Ok(cli::check_jobs(
            &CatalogDirs::new(dir, calendars_dir),
            config.as_deref(),
        )),
        Command::Jobs(JobsCommand::Reload { server }) => Ok(cli::reload_jobs(server).await),
        Command::Runs(RunsCommand::Prune(args)) => prune(args, shutdown).await,
        Command::Schedules(cmd) => Ok(cli::schedules::command(cmd).await),
        Command::Token(cmd) => Ok(cli::token::command(cmd)),
    }
}

/// Exit code of `serve` and `worker` when their worker id belongs to another live
/// process (EX_CONFIG: starting again will not help until the configuration changes).
pub const EXIT_WORKER_ID_IN_USE: u8 = 78;

fn exit_code_of(result: anyhow::Result<()>) -> anyhow::Result<ExitCode> {
    match result {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(error) if worker_id_in_use(&error) => {
            eprintln!("tasuki: {error:#}");
            Ok(ExitCode::from(EXIT_WORKER_ID_IN_USE))
        }
        Err(error) => Err(error),
    }
}

fn worker_id_in_use(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<hostlock::HostLockError>(),
            Some(hostlock::HostLockError::Held { .. })
        ) || matches!(
            cause.downcast_ref::<SessionError>(),
            Some(SessionError::InUse { .. })
        )
    })
}

/// The host lock and the control plane session for a worker id: both must be had
/// before the worker looks at a single container.
async fn open_worker_session(
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
    };
    let session = Session::open(control, request, shutdown).await?;
    Ok((lock, session))
}

/// Run the worker under its session: heartbeats while it runs (drain included), then
/// goodbye. Another process taking the id stops the worker.
async fn run_worker(
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

/// The Docker runtime, its errors counted in `metrics`.
fn docker(
    options: &WorkerOptions,
    metrics: &Arc<metrics::WorkerMetrics>,
) -> anyhow::Result<Arc<dyn ContainerRuntime>> {
    let runtime = docker::DockerRuntime::connect(options.docker_host.as_deref())
        .context("configuring the Docker client")?;
    Ok(Arc::new(metrics::ObservedRuntime::new(
        Arc::new(runtime),
        metrics.clone(),
    )))
}

/// `tasuki serve`: API, store, outbox relay, and (without AMQP, or when asked) a worker.
pub async fn serve(args: ServeArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let server_config =
        config::server::ServerConfig::load(args.config.as_deref(), std::env::vars())
            .context("loading the server configuration")?;
    let policy = server_config
        .containers
        .policy()
        .context("loading the server configuration")?;
    tracing::debug!(
        message = "server configuration",
        tokens = server_config.tokens.len(),
        worker_tokens = server_config.worker_tokens.len(),
        registries = ?server_config.registries.keys().collect::<Vec<_>>(),
        default_memory = policy.default_memory(),
        pids_limit = policy.pids_limit(),
        allowed_capabilities = ?server_config.containers.allowed_capabilities,
        allowed_mounts = ?policy.allowed_mounts()
    );
    let auth = auth_at_start(&args, &server_config)?;
    let limits = server_config.limits.clone();
    limits.check().context("loading the server configuration")?;
    // Read before anything else starts, so a bad file stops start-up at once.
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(http::load_tls(cert, key)?),
        _ => None,
    };
    if tls.is_none() && !args.listen.ip().is_loopback() {
        tracing::warn!(
            message = "serving plain HTTP on a non-loopback address: tokens, run parameters and logs cross the network readable by anyone on the path; give --tls-cert and --tls-key, or put a TLS proxy in front",
            listen = %args.listen
        );
    }
    let dirs = CatalogDirs::new(args.jobs_dir.clone(), args.calendars_dir.clone());
    let catalog = Reloadable::load(dirs.clone(), policy).map_err(|errors| {
        anyhow::anyhow!(
            "invalid job definitions in {}:\n{errors}",
            args.jobs_dir.display()
        )
    })?;
    let current = catalog.current();
    tracing::info!(
        message = "jobs loaded",
        count = current.len(),
        calendars = current.calendars().len(),
        dir = %dirs.jobs.display(),
        calendars_dir = %dirs.calendars.path().display()
    );
    let catalog = Arc::new(catalog);
    let store = store::SqliteStore::open(&args.data_dir)
        .await
        .with_context(|| format!("opening the run store in {}", args.data_dir.display()))?;
    let store = Arc::new(store);
    let gauges: Arc<dyn crate::domain::observe::StoreGauges> = store.clone();
    let retained: Arc<dyn RetentionStore> = store.clone();
    let replies: Arc<dyn crate::domain::store::Replies> = store.clone();
    let store: Arc<dyn RunStore> = store;
    let logs = Arc::new(logsink::FileLogSink::new(args.data_dir.join("logs")));
    let pruner = Pruner::new(
        retained,
        logs.clone(),
        Retention::from_setting(args.retention),
    );
    let events = RunEvents::new();
    let wake = Arc::new(Notify::new());
    // Job secrets and registry passwords are read from here at each claim, never
    // before: a value exists only in the claim answer and the worker's memory.
    let secrets = Arc::new(secrets::HostSecrets::new(
        server_config
            .registry_logins()
            .context("loading the server configuration")?,
    ));
    let jobs: Arc<dyn crate::domain::job_lookup::JobLookup> = catalog.clone();
    // One registry for the process: the control plane's run metrics and, when this
    // process runs containers, the worker's.
    let registry = metrics::Metrics::new()?;
    let run_metrics =
        metrics::RunMetrics::register(&registry, jobs.clone(), gauges, metrics::MAX_JOB_NAMES)?;
    let control = Arc::new(
        LocalControlPlane::new(
            store.clone(),
            logs.clone(),
            events.clone(),
            args.lease_ttl,
            secrets,
        )
        .with_observer(run_metrics.clone()),
    );
    let runs = Runs::new(
        jobs.clone(),
        store.clone(),
        logs,
        events,
        wake.clone(),
        shutdown.clone(),
    )
    .with_param_limits(service::runs::ParamLimits {
        max_params: limits.max_params as usize,
        max_param_bytes: limits.max_param_bytes as usize,
    })
    .with_observer(run_metrics);

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

    let callback_sender: Arc<dyn crate::domain::callback::CallbackSender> =
        Arc::new(callback::HttpSender {
            secrets: args.callbacks.secrets.clone(),
            allow: args.callbacks.allow.clone(),
        });
    let callback_wake = Arc::new(Notify::new());
    let tasks = tokio_util::task::TaskTracker::new();
    let relay = Relay {
        store: store.clone(),
        queue: queue.clone(),
        wake: wake.clone(),
        republish_after: args.republish_after,
    };
    tasks.spawn(relay.run(shutdown.clone()));
    tasks.spawn(
        service::callbacks::CallbackRelay {
            store: store.clone(),
            sender: callback_sender.clone(),
            max_age: args.callbacks.max_age,
            wake: callback_wake.clone(),
        }
        .run(shutdown.clone()),
    );
    tasks.spawn(service::relay::wake_on_run_changes(
        runs.events().clone(),
        wake,
        shutdown.clone(),
    ));
    // Producers on the request queue, and the replies owed to them.
    if let Some(url) = &args.amqp_url {
        let replier = Arc::new(amqp::AmqpReplier::new(url));
        let replies_wake = Arc::new(tokio::sync::Notify::new());
        let reply_relay = service::replies::ReplyRelay {
            store: store.clone(),
            replies: replies.clone(),
            sink: replier.clone(),
            wake: replies_wake.clone(),
        };
        tasks.spawn(reply_relay.run(shutdown.clone()));
        tasks.spawn(service::relay::wake_on_run_changes(
            runs.events().clone(),
            replies_wake.clone(),
            shutdown.clone(),
        ));
        let consumer = amqp::RequestConsumer {
            url: url.clone(),
            queue: args.request_queue.clone(),
            runs: runs.clone(),
            replier,
            replies,
            replies_wake,
            callbacks: callback_sender.clone(),
        };
        tasks.spawn(consumer.run(shutdown.clone()));
    }
    tasks.spawn(
        control
            .as_ref()
            .clone()
            .reap_expired_leases(shutdown.clone()),
    );
    tasks.spawn(pruner.run(service::retention::EVERY, shutdown.clone()));
    tasks.spawn(reload_on_sighup(catalog.clone(), shutdown.clone()));
    let scheduler = service::scheduler::Scheduler::new(
        jobs,
        store.clone(),
        runs.clone(),
        Arc::new(crate::domain::ports::SystemClock),
        args.schedule_grace,
    );
    if args.scheduler {
        tasks.spawn(scheduler.clone().run(shutdown.clone()));
    }

    let runtime = match source {
        Some(source) => {
            let worker_metrics = metrics::WorkerMetrics::register(&registry)?;
            let runtime = docker(&args.worker, &worker_metrics)?;
            let config = worker_config(&args.worker);
            let identity =
                open_worker_session(control.clone(), &args.worker, &config.worker_id, &shutdown)
                    .await?;
            let worker =
                Worker::new(control.clone(), runtime.clone(), config).with_observer(worker_metrics);
            let stop = shutdown.clone();
            tasks.spawn(async move {
                if let Err(error) = run_worker(worker, source, identity, stop.clone()).await {
                    tracing::error!(message = "embedded worker stopped", error = %format!("{error:#}"));
                    stop.cancel();
                }
            });
            Some(runtime)
        }
        None => None,
    };

    let accepting = Arc::new(AtomicBool::new(true));
    let state = http::AppState {
        runs,
        scheduler,
        control: control as Arc<dyn ControlPlane>,
        store,
        queue,
        runtime,
        reload: catalog,
        auth,
        accepting: accepting.clone(),
        callbacks: callback_sender,
        callback_wake,
        limits: Arc::new(http::limits::Limits::new(
            limits.rate_per_second,
            limits.burst,
            limits.max_holds_per_token,
            limits.body_timeout,
        )),
        metrics: registry,
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let addr = listener
        .local_addr()
        .context("reading the listening address")?;
    tracing::info!(message = "listening", %addr, tls = tls.is_some());
    let stop = shutdown.clone();
    let flag = accepting.clone();
    let connection_limits = http::ConnectionLimits {
        max_header_bytes: limits.max_header_bytes as usize,
        max_headers: limits.max_headers as usize,
        header_timeout: limits.header_timeout,
    };
    http::serve(
        listener,
        http::router(state),
        tls,
        connection_limits,
        async move {
            stop.cancelled().await;
            flag.store(false, Ordering::SeqCst);
        },
    )
    .await
    .context("serving HTTP")?;
    tasks.close();
    tasks.wait().await;
    tracing::info!(message = "stopped");
    Ok(())
}

/// The tokens of the config file (and `--worker-token`), or why `serve` must not start:
/// a bad token entry, or no API tokens on an address beyond loopback (everyone there
/// could run, read and cancel every job) without `--insecure-no-auth`.
fn auth_at_start(
    args: &ServeArgs,
    config: &config::server::ServerConfig,
) -> anyhow::Result<http::auth::Auth> {
    let tokens = config::tokens::token_set(config, args.worker_token.as_deref())
        .context("invalid token in the server configuration")?;
    let loopback = args.listen.ip().is_loopback();
    let api_tokens = config.tokens.len();
    let flag_token = args.worker_token.as_deref().is_some_and(|t| !t.is_empty());
    let worker_tokens = config.worker_tokens.len() + usize::from(flag_token);
    if tokens.has_api_tokens() {
        tracing::info!(
            message = "authentication on: every API request needs a bearer token",
            api_tokens,
            worker_tokens
        );
    } else if loopback {
        tracing::warn!(
            message = "no API tokens configured: the API is open to every caller, so it listens on loopback only",
            listen = %args.listen,
            worker_tokens
        );
    } else if args.insecure_no_auth {
        tracing::warn!(
            message = "no API tokens configured and --insecure-no-auth: anyone who can reach this address may run, read and cancel every job",
            listen = %args.listen,
            worker_tokens
        );
    } else {
        anyhow::bail!(
            "refusing to listen on {} without API tokens: anyone who can reach it could run, read and \
             cancel every job. Add [[tokens]] to the config file (see `tasuki token create`), listen on \
             a loopback address (127.0.0.1), or pass --insecure-no-auth",
            args.listen
        );
    }
    Ok(http::auth::Auth::new(
        tokens,
        config.auth.open_readyz,
        config.auth.open_metrics,
    ))
}

/// SIGHUP: read the job and calendar files again; an invalid set is logged with every
/// error and the running one stays.
async fn reload_on_sighup(catalog: Arc<Reloadable>, shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(error) => {
            tracing::warn!(message = "cannot listen for SIGHUP; reload with `tasuki jobs reload`", %error);
            return;
        }
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            got = hangups.recv() => if got.is_none() { return },
        }
        let reloader = catalog.clone();
        match tokio::task::spawn_blocking(move || reloader.reload()).await {
            Ok(Ok(s)) => tracing::info!(
                message = "SIGHUP: jobs reloaded",
                generation = s.generation,
                jobs = s.jobs,
                calendars = s.calendars,
                added = ?s.added,
                changed = ?s.changed,
                removed = ?s.removed
            ),
            Ok(Err(errors)) => tracing::error!(
                message = "SIGHUP: reload refused, the running jobs stay",
                count = errors.0.len(),
                errors = %errors
            ),
            Err(error) => tracing::error!(message = "SIGHUP: reload failed", %error),
        }
    }
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
        "deleted {} run(s) finished before {cutoff} and {} log dir(s); {} schedule slot record(s), {} expired idempotency key(s), {} spent outbox row(s)",
        report.runs, report.log_dirs, report.slots, report.keys, report.outbox_rows
    );
    Ok(ExitCode::SUCCESS)
}

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
    let source = Box::new(amqp::AmqpSource::new(
        &args.amqp_url,
        &args.queue.queue,
        &config.worker_id,
    ));
    run_worker(
        Worker::new(control, runtime, config).with_observer(worker_metrics),
        source,
        identity,
        shutdown,
    )
    .await
}
