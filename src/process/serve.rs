//! The `tasuki serve` process: the control plane (store, relay, reaper, scheduler,
//! callback and reply relays, retention, HTTP), with a worker in-process in embedded mode.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::worker::{docker, open_worker_session, run_worker, worker_config};

use crate::catalog::{CatalogDirs, Reloadable};
use crate::config::ServeArgs;
use crate::domain::ports::{ControlPlane, DeliverySource, RunQueue, RunStore};
use crate::domain::retention::Retention;
use crate::service::control::LocalControlPlane;
use crate::service::duty::Duty;
use crate::service::events::RunEvents;
use crate::service::relay::Relay;
use crate::service::retention::Pruner;
use crate::service::runs::Runs;
use crate::service::worker::Worker;
use crate::{amqp, callback, config, http, logsink, memqueue, metrics, secrets, service};

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
    match super::files::raise_open_files_limit() {
        Ok(limit) => tracing::debug!(message = "open files limit", limit = ?limit),
        Err(error) => {
            tracing::warn!(message = "could not raise the open files limit", %error)
        }
    }
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
    let stores = super::open_store(&args.store, &args.data_dir).await?;
    if let Some(url) = &args.store.database_url {
        tracing::info!(message = "run store", database = %url);
    }
    let gauges = stores.gauges.clone();
    let retained = stores.retention.clone();
    let replies = stores.replies.clone();
    let shared = stores.shared.clone();
    let store: Arc<dyn RunStore> = stores.runs;
    // Replicas on one PostgreSQL keep the logs there too, so any of them serves any
    // run's log; otherwise they are files in the data dir.
    let logs: Arc<dyn crate::domain::ports::LogSink> = match &shared {
        Some(pool) => Arc::new(logsink::PgLogSink::new(pool.clone())),
        None => Arc::new(logsink::FileLogSink::new(args.data_dir.join("logs"))),
    };
    let pruner = Pruner::new(
        retained,
        logs.clone(),
        Retention::from_setting(args.retention),
    );
    let events = RunEvents::new();
    // Run events cross replicas through PostgreSQL: a `?wait` or a log follow on this
    // replica wakes for a run another replica's worker reports.
    let bridge = match &shared {
        Some(pool) => {
            crate::pgnotify::Bridge::new(pool.clone(), events.clone())
                .start(shutdown.clone())
                .await
        }
        None => None,
    };
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
    // Output comes in through the control plane; with an export, it is also copied
    // there, line by line, for a collector.
    let stored: Arc<dyn crate::domain::ports::LogSink> = match &args.log_export {
        Some(dir) => {
            tracing::info!(message = "exporting run output as JSON lines", dir = %dir.display());
            Arc::new(logsink::ExportingSink::new(
                logs.clone(),
                store.clone(),
                dir,
                args.log_export_keep,
            ))
        }
        None => logs.clone(),
    };
    let control = Arc::new(
        LocalControlPlane::new(
            store.clone(),
            stored,
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
    let amqp_urls = (!args.amqp_url.is_empty()).then_some(args.amqp_url.as_slice());
    let (queue, source): (Arc<dyn RunQueue>, Option<Box<dyn DeliverySource>>) = match amqp_urls {
        Some(url) => {
            let source = args.embedded_worker.then(|| {
                Box::new(
                    amqp::AmqpSource::new(url, &args.queue.queue, &args.worker.worker_id())
                        .with_queue_kind(super::queue_kind(&args.queue)),
                ) as Box<dyn DeliverySource>
            });
            (
                Arc::new(
                    amqp::AmqpPublisher::new(url, &args.queue.queue)
                        .with_queue_kind(super::queue_kind(&args.queue)),
                ),
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
    if let Some(url) = amqp_urls {
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
            brokers: amqp::Brokers::new(url),
            queue: args.request_queue.clone(),
            kind: super::queue_kind(&args.queue),
            runs: runs.clone(),
            replier,
            replies,
            replies_wake,
            callbacks: callback_sender.clone(),
        };
        tasks.spawn(consumer.run(shutdown.clone()));
    }
    // Duties one replica at a time does, when replicas share the store: this process
    // is named by host, PID and a random part (a restart is a new holder).
    let replica = format!(
        "{}/{}/{}",
        gethostname::gethostname().to_string_lossy(),
        std::process::id(),
        crate::domain::run::RunId::new()
    );
    let duty = |name, ttl| Duty::new(store.clone(), name, replica.clone(), ttl);
    let reaper_duty = duty(
        "lease-reaper",
        (args.lease_ttl / 2).clamp(Duration::from_secs(5), Duration::from_secs(30)),
    );
    tasks.spawn(
        control
            .as_ref()
            .clone()
            .reap_expired_leases(reaper_duty, shutdown.clone()),
    );
    let pruner = pruner.with_duty(duty(
        "retention",
        service::retention::EVERY + Duration::from_secs(60),
    ));
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
        let ticking = scheduler
            .clone()
            .with_duty(duty("scheduler", Duration::from_secs(10)));
        tasks.spawn(ticking.run(shutdown.clone()));
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
    tracing::info!(message = "listening", %addr, tls = tls.is_some(), build = crate::BUILD);
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
    if let Some(bridge) = bridge {
        let _ = bridge.await;
    }
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
