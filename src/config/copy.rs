//! `tasuki store copy`: the two stores and where a SQLite side keeps its logs.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};

use super::DatabaseUrl;

#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Copy every run, attempt, log and schedule record of one store into another,
    /// empty one (SQLite → PostgreSQL above all; any direction works), then read both
    /// again and compare them (row counts and SHA-256 per table, and the logs). Stop
    /// every `serve` and `worker` on the source first: the copy is of one moment, and
    /// whatever they do after it is not in the target.
    Copy(CopyArgs),
}

#[derive(Debug, Args)]
pub struct CopyArgs {
    /// The store to copy from, not in use: `sqlite://PATH` (e.g.
    /// sqlite://data/tasuki.db) or `postgres://user:password@host:5432/database`.
    #[arg(long, env = "TASUKI_COPY_FROM", value_parser = super::store::DatabaseUrlParser, hide_env_values = true)]
    pub from: DatabaseUrl,

    /// The store to copy into: made and migrated if need be, and refused unless it
    /// holds no runs (nor any other row).
    #[arg(long, env = "TASUKI_COPY_TO", value_parser = super::store::DatabaseUrlParser, hide_env_values = true)]
    pub to: DatabaseUrl,

    /// A SQLite source's log directory [default: `logs` beside its database file].
    #[arg(long, env = "TASUKI_COPY_FROM_LOGS", value_name = "DIR")]
    pub from_logs: Option<PathBuf>,

    /// A SQLite target's log directory [default: `logs` beside its database file].
    #[arg(long, env = "TASUKI_COPY_TO_LOGS", value_name = "DIR")]
    pub to_logs: Option<PathBuf>,

    /// Rows per read and per insert.
    #[arg(
        long,
        env = "TASUKI_COPY_BATCH",
        default_value_t = 1000,
        value_parser = clap::value_parser!(u32).range(1..=100_000)
    )]
    pub batch: u32,
}

/// Where a side's logs are: a SQLite store's directory (given, or `logs` beside its
/// file), or PostgreSQL's own tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogPlace {
    Dir(PathBuf),
    Database,
}

impl CopyArgs {
    /// The source's logs; an error when a directory is given for PostgreSQL.
    pub fn from_logs(&self) -> Result<LogPlace, String> {
        log_place(&self.from, self.from_logs.as_deref(), "--from-logs")
    }

    /// The target's logs; an error when a directory is given for PostgreSQL.
    pub fn to_logs(&self) -> Result<LogPlace, String> {
        log_place(&self.to, self.to_logs.as_deref(), "--to-logs")
    }
}

fn log_place(db: &DatabaseUrl, dir: Option<&Path>, option: &str) -> Result<LogPlace, String> {
    match (db, dir) {
        (DatabaseUrl::Sqlite(_), Some(dir)) => Ok(LogPlace::Dir(dir.to_owned())),
        (DatabaseUrl::Sqlite(file), None) => Ok(LogPlace::Dir(
            file.parent().unwrap_or(Path::new("")).join("logs"),
        )),
        (DatabaseUrl::Postgres(_), Some(_)) => Err(format!(
            "{option} is for a SQLite store's log files; PostgreSQL keeps the logs in the database"
        )),
        (DatabaseUrl::Postgres(_), None) => Ok(LogPlace::Database),
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Cli, Command};
    use super::*;
    use clap::Parser;

    fn copy(args: &[&str]) -> Result<CopyArgs, clap::Error> {
        let mut all = vec!["tasuki", "store", "copy"];
        all.extend_from_slice(args);
        match Cli::try_parse_from(all)?.command {
            Command::Store(StoreCommand::Copy(args)) => Ok(args),
            other => panic!("not store copy: {other:?}"),
        }
    }

    #[test]
    fn logs_default_beside_a_sqlite_file_and_belong_to_postgresql_otherwise() {
        let args = copy(&[
            "--from",
            "sqlite:///var/lib/tasuki/tasuki.db",
            "--to",
            "postgres://tasuki:pw@db:5432/tasuki",
        ])
        .unwrap();
        assert_eq!(args.batch, 1000);
        assert_eq!(
            args.from_logs(),
            Ok(LogPlace::Dir(PathBuf::from("/var/lib/tasuki/logs")))
        );
        assert_eq!(args.to_logs(), Ok(LogPlace::Database));

        let args = copy(&[
            "--from",
            "postgres://h/a",
            "--to",
            "sqlite://t.db",
            "--to-logs",
            "/srv/logs",
            "--batch",
            "5",
        ])
        .unwrap();
        assert_eq!(args.batch, 5);
        assert_eq!(
            args.to_logs(),
            Ok(LogPlace::Dir(PathBuf::from("/srv/logs")))
        );
        assert_eq!(args.from_logs(), Ok(LogPlace::Database));

        let args = copy(&[
            "--from",
            "postgres://h/a",
            "--from-logs",
            "x",
            "--to",
            "sqlite://t.db",
        ])
        .unwrap();
        assert!(args.from_logs().unwrap_err().contains("--from-logs"));
        // A bare file name's logs sit in the working directory.
        let args = copy(&["--from", "sqlite:t.db", "--to", "postgres://h/b"]).unwrap();
        assert_eq!(args.from_logs(), Ok(LogPlace::Dir(PathBuf::from("logs"))));
        for bad in [
            &["--from", "t.db", "--to", "postgres://h/b"][..],
            &[
                "--from",
                "sqlite://a.db",
                "--to",
                "postgres://h/b",
                "--batch",
                "0",
            ],
            &["--to", "postgres://h/b"],
        ] {
            assert!(copy(bad).is_err(), "{bad:?}");
        }
    }
}
