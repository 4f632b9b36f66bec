//! `tasuki store copy`: the two stores opened, each side's log sink chosen (files
//! beside a SQLite store, the database's own for PostgreSQL), the copy run, and what
//! both sides read afterwards printed.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};

use crate::config::{CopyArgs, DatabaseUrl, LogPlace};
use crate::domain::ports::LogSink;
use crate::logsink::{FileLogSink, PgLogSink};
use crate::store::copy::{self, CopyStore, Endpoint, Report, Side};

pub async fn store_copy(args: CopyArgs) -> anyhow::Result<ExitCode> {
    let from_logs = args.from_logs().map_err(anyhow::Error::msg)?;
    let to_logs = args.to_logs().map_err(anyhow::Error::msg)?;
    if let DatabaseUrl::Sqlite(file) = &args.from
        && !file.is_file()
    {
        bail!("no run store at {}", file.display());
    }
    refuse_one_place(&args, &from_logs, &to_logs)?;
    if let LogPlace::Dir(dir) = &from_logs
        && !dir.is_dir()
    {
        eprintln!(
            "warning: the source has no log directory at {} (give --from-logs if its logs \
             are elsewhere): no logs will be copied",
            dir.display()
        );
    }
    let from = open(&args.from, Side::Source).await?;
    let to = open(&args.to, Side::Target).await?;
    let from_sink = sink(&from, &from_logs)?;
    let to_sink = sink(&to, &to_logs)?;
    let report = copy::copy(
        Endpoint {
            store: &from,
            logs: from_sink.as_ref(),
        },
        Endpoint {
            store: &to,
            logs: to_sink.as_ref(),
        },
        args.batch,
    )
    .await
    .with_context(|| format!("copying {} to {}", args.from, args.to))?;
    print!("{}", render(&args.from, &args.to, &report));
    Ok(ExitCode::SUCCESS)
}

async fn open(url: &DatabaseUrl, side: Side) -> anyhow::Result<CopyStore> {
    let opened = match url {
        DatabaseUrl::Sqlite(file) => CopyStore::open_sqlite(file, side).await,
        DatabaseUrl::Postgres(url) => CopyStore::open_postgres(url, side).await,
    };
    opened.with_context(|| format!("{side} {url}"))
}

fn sink(store: &CopyStore, place: &LogPlace) -> anyhow::Result<Arc<dyn LogSink>> {
    Ok(match place {
        LogPlace::Dir(dir) => Arc::new(FileLogSink::new(dir.clone())),
        LogPlace::Database => match store.postgres_pool() {
            Some(pool) => Arc::new(PgLogSink::new(pool)),
            None => bail!("a SQLite store keeps its logs in files: name their directory"),
        },
    })
}

/// Refuse a copy of a store onto itself, or between two stores that would share one
/// log directory (the target's logs would be the source's files).
fn refuse_one_place(
    args: &CopyArgs,
    from_logs: &LogPlace,
    to_logs: &LogPlace,
) -> anyhow::Result<()> {
    let same = match (&args.from, &args.to) {
        (DatabaseUrl::Sqlite(a), DatabaseUrl::Sqlite(b)) => same_path(a, b),
        (DatabaseUrl::Postgres(a), DatabaseUrl::Postgres(b)) => a == b,
        _ => false,
    };
    if same {
        bail!("--from and --to name the same store ({})", args.from);
    }
    if let (LogPlace::Dir(a), LogPlace::Dir(b)) = (from_logs, to_logs)
        && same_path(a, b)
    {
        bail!(
            "the source and the target would share the log directory {}: give the target \
             its own with --to-logs",
            a.display()
        );
    }
    Ok(())
}

/// The same file or directory, by its canonical path when both exist.
fn same_path(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// The report: per table its rows and checksum prefix, then the logs; the same on
/// both sides, or the copy would have failed.
fn render(from: &DatabaseUrl, to: &DatabaseUrl, report: &Report) -> String {
    let mut out = format!("copied {from} to {to}; both read back the same:\n");
    out.push_str(&format!("{:<20} {:>10}  {}\n", "table", "rows", "sha256"));
    for (table, summary) in &report.tables {
        out.push_str(&format!(
            "{:<20} {:>10}  {}\n",
            table,
            summary.rows,
            summary.prefix(12)
        ));
    }
    let logs = &report.logs;
    out.push_str(&format!(
        "{:<20} {:>10}  {}  ({} bytes)\n",
        "attempt logs",
        logs.logs,
        logs.prefix(12),
        logs.bytes
    ));
    out
}
