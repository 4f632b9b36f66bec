//! Where runs are stored, as `serve`, `tasuki runs prune` and `tasuki store copy` name
//! it: a database URL, or nothing for SQLite in the data dir.

use std::path::{Path, PathBuf};

use clap::Args;

/// The run store's database.
#[derive(Debug, Clone, Args)]
pub struct StoreOptions {
    /// The run store: `postgres://user:password@host:5432/database` (PostgreSQL, which
    /// any number of `serve` replicas may share; libpq's `sslmode`, `sslrootcert` and
    /// friends as query parameters), or `sqlite://PATH` (a SQLite file). Without it:
    /// SQLite in `{data-dir}/tasuki.db`.
    #[arg(long, env = "TASUKI_DATABASE_URL", value_parser = DatabaseUrlParser, hide_env_values = true)]
    pub database_url: Option<DatabaseUrl>,

    /// PostgreSQL only: the most connections this process opens.
    #[arg(
        long,
        env = "TASUKI_DATABASE_POOL",
        default_value_t = 16,
        value_parser = clap::value_parser!(u32).range(2..=1000)
    )]
    pub database_pool: u32,
}

impl StoreOptions {
    /// The database the options name, given the data dir for the default.
    pub fn database(&self, data_dir: &Path) -> DatabaseUrl {
        self.database_url
            .clone()
            .unwrap_or_else(|| DatabaseUrl::Sqlite(data_dir.join("tasuki.db")))
    }
}

/// Parses `--database-url` without clap's echo of a refused value (it would print the
/// password); `DatabaseUrl::parse` says what is wrong with the password hidden.
#[derive(Clone, Copy)]
pub(super) struct DatabaseUrlParser;

impl clap::builder::TypedValueParser for DatabaseUrlParser {
    type Value = DatabaseUrl;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<DatabaseUrl, clap::Error> {
        let arg = arg.map_or_else(|| "--database-url".into(), ToString::to_string);
        let refused = |message: String| {
            clap::Error::raw(
                clap::error::ErrorKind::ValueValidation,
                format!("invalid value for '{arg}': {message}\n"),
            )
            .with_cmd(cmd)
        };
        let text = value
            .to_str()
            .ok_or_else(|| refused("not UTF-8".to_owned()))?;
        DatabaseUrl::parse(text).map_err(refused)
    }
}

/// A database for the run store.
#[derive(Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    /// A SQLite file (made with its directory if missing).
    Sqlite(PathBuf),
    /// A PostgreSQL URL, password and all: never printed whole (see `Display`).
    Postgres(String),
}

impl DatabaseUrl {
    /// `postgres://…` or `postgresql://…`, or `sqlite://PATH` (`sqlite:PATH` too).
    pub fn parse(text: &str) -> Result<DatabaseUrl, String> {
        let text = text.trim();
        if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            let url = url::Url::parse(text)
                .map_err(|e| format!("not a PostgreSQL URL ({e}): {}", redact(text)))?;
            // A unix socket directory comes as `?host=/path` (libpq's form, which sqlx
            // reads too), with no host in the authority.
            let socket_dir = url.query_pairs().any(|(k, v)| k == "host" && !v.is_empty());
            if url.host_str().is_none_or(str::is_empty) && !socket_dir {
                return Err(format!(
                    "the PostgreSQL URL names no host: {}",
                    redact(text)
                ));
            }
            return Ok(DatabaseUrl::Postgres(text.to_owned()));
        }
        if let Some(path) = text
            .strip_prefix("sqlite://")
            .or_else(|| text.strip_prefix("sqlite:"))
        {
            if path.is_empty() {
                return Err("the SQLite URL names no file: give sqlite://PATH (e.g. \
                            sqlite://./data/tasuki.db), or no URL for {data-dir}/tasuki.db"
                    .to_owned());
            }
            return Ok(DatabaseUrl::Sqlite(PathBuf::from(path)));
        }
        Err(format!(
            "unknown database URL {}: give postgres://… or sqlite://PATH",
            redact(text)
        ))
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self, DatabaseUrl::Postgres(_))
    }
}

/// A URL with its password replaced, for messages and logs.
pub(super) fn redact(text: &str) -> String {
    match url::Url::parse(text) {
        Ok(mut url) if url.password().is_some() => {
            let _ = url.set_password(Some("***"));
            url.to_string()
        }
        Ok(url) => url.to_string(),
        Err(_) => match text.split_once('@') {
            Some((_, rest)) => format!("***@{rest}"),
            None => text.to_owned(),
        },
    }
}

impl std::fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DatabaseUrl::Sqlite(path) => write!(f, "sqlite://{}", path.display()),
            DatabaseUrl::Postgres(url) => f.write_str(&redact(url)),
        }
    }
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_their_database_and_never_print_a_password() {
        let pg = DatabaseUrl::parse("postgres://tasuki:s3cret@db.internal:5432/tasuki").unwrap();
        assert!(pg.is_postgres());
        let shown = format!("{pg} {pg:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(
            shown.contains("postgres://tasuki:***@db.internal:5432/tasuki"),
            "{shown}"
        );
        // A unix socket directory as libpq names it.
        let socket = "postgres:///tasuki?host=/run/postgresql&port=5433&user=tasuki";
        assert_eq!(
            DatabaseUrl::parse(socket).unwrap(),
            DatabaseUrl::Postgres(socket.to_owned())
        );
        assert_eq!(
            DatabaseUrl::parse("sqlite:///var/lib/tasuki/tasuki.db").unwrap(),
            DatabaseUrl::Sqlite(PathBuf::from("/var/lib/tasuki/tasuki.db"))
        );
        assert_eq!(
            DatabaseUrl::parse("sqlite://./data/t.db").unwrap(),
            DatabaseUrl::Sqlite(PathBuf::from("./data/t.db"))
        );
        for bad in [
            "mysql://root@h/db",
            "sqlite://",
            "postgres:///db",
            "postgres:///db?host=",
            "data/tasuki.db",
        ] {
            let e = DatabaseUrl::parse(bad).unwrap_err();
            assert!(!e.is_empty(), "{bad}");
        }
        let e = DatabaseUrl::parse("mysql://root:pw@h/db").unwrap_err();
        assert!(!e.contains("pw@"), "{e}");
    }
}
