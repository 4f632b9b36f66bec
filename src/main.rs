use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use tasuki::config::{Cli, Command, LogFormat};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_new(&cli.log).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match cli.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
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
