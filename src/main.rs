use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::prelude::*;

use tasuki::config::{Cli, Command, LogFormat};

/// bollard logs every request body at debug (a container's environment, its secrets
/// included): nothing of it below info is ever written, whatever `--log` asks for.
fn not_bollard_detail(meta: &tracing::Metadata<'_>) -> bool {
    !(meta.target().starts_with("bollard") && *meta.level() > tracing::Level::INFO)
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_new(&cli.log).unwrap_or_else(|_| EnvFilter::new("info"));
    let output = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let registry = tracing_subscriber::registry().with(filter);
    match cli.log_format {
        LogFormat::Json => registry
            .with(output.json().with_filter(filter_fn(not_bollard_detail)))
            .init(),
        LogFormat::Text => registry
            .with(output.with_filter(filter_fn(not_bollard_detail)))
            .init(),
    }
    let shutdown = CancellationToken::new();
    // Long-running commands drain on SIGINT/SIGTERM; client commands just exit.
    if matches!(cli.command, Command::Serve(_) | Command::Worker(_)) {
        tasuki::shutdown::on_signal(shutdown.clone());
    }
    match tasuki::run(cli.command, shutdown).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("tasuki: {error:#}");
            ExitCode::from(1)
        }
    }
}
