//! tasuki runs batch jobs as one-shot containers when something asks for them.
//!
//! A tour: `domain` holds the pure types (jobs, runs, outcomes) and the ports the
//! services need; `service` holds the use cases (accept a run, relay the outbox, run a
//! worker, answer workers as the control plane); the adapters implement the ports:
//! `store` (SQLite or PostgreSQL, and `store::copy` between them), `amqp` (RabbitMQ),
//! `memqueue` (in-process queue), `docker` (bollard), `logsink` (files), `secrets`
//! (`serve`'s environment and files), `client` (HTTP to a remote control plane), `http`
//! (the axum API), `metrics` (Prometheus, the observers' side). This file (the
//! commands) and `process/` (one module per long-running process, and `store copy`)
//! are the one place where concrete adapters meet.

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
pub mod keyed_lock;
pub mod logsink;
pub mod memqueue;
pub mod metrics;
#[cfg(feature = "bench")]
pub mod noop_runtime;
pub mod pgnotify;
mod process;
pub mod protocol;
pub mod secrets;
pub mod service;
pub mod shutdown;
pub mod store;
#[cfg(test)]
mod testlog;

pub use process::{serve, store_copy, worker};

use std::process::ExitCode;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::catalog::CatalogDirs;
use crate::config::{Command, JobsCommand, PruneArgs, RunsCommand, StoreCommand};
use crate::domain::retention::Retention;
use crate::service::retention::Pruner;
use crate::service::session::SessionError;

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
        Command::Store(StoreCommand::Copy(args)) => store_copy(args).await,
        Command::Schedules(cmd) => Ok(cli::schedules::command(cmd).await),
        Command::Token(cmd) => Ok(cli::token::command(cmd)),
    }
}

/// The commit this binary was built from (12 hex digits), or `unknown` (build.rs).
pub const COMMIT: &str = env!("TASUKI_COMMIT");

/// This build, as `--version` and the start-up log name it: the crate's version and
/// the commit, which tells apart two builds of one version.
pub const BUILD: &str = concat!(env!("CARGO_PKG_VERSION"), " (", env!("TASUKI_COMMIT"), ")");

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

/// `tasuki runs prune`: one pass against the data dir, as `serve` makes them. WAL and
/// the busy timeout let it share the database with a running `serve`.
pub async fn prune(args: PruneArgs, shutdown: CancellationToken) -> anyhow::Result<ExitCode> {
    if let config::DatabaseUrl::Sqlite(db) = args.store.database(&args.data_dir)
        && !db.exists()
    {
        anyhow::bail!("no run store at {}", db.display());
    }
    let store = process::open_store(&args.store, &args.data_dir)
        .await?
        .retention;
    let logs = logsink::FileLogSink::new(args.data_dir.join("logs"));
    let retention = Retention::For(args.older_than);
    let now = chrono::Utc::now();
    let pruner = Pruner::new(store, Arc::new(logs), retention);
    let report = pruner.prune(now, &shutdown).await?;
    let cutoff = retention.cutoff(now).map_or_else(String::new, |t| {
        t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    });
    println!(
        "deleted {} run(s) finished before {cutoff} (with the logs of {}); {} schedule slot record(s), {} expired idempotency key(s), {} spent outbox row(s)",
        report.runs, report.logs, report.slots, report.keys, report.outbox_rows
    );
    Ok(ExitCode::SUCCESS)
}
