//! A PostgreSQL instance of the test's own, and what the tests read from it.

use super::*;

/// `initdb` into a directory of the `postgres` user, `pg_ctl start` on a port and a
/// socket directory of its own, no TCP (`listen_addresses=''`), trust auth; stopped
/// (`-m immediate`) and removed on drop.
pub(super) struct Pg {
    pub(super) root: PathBuf,
    pub(super) data: PathBuf,
    pub(super) sock: PathBuf,
    pub(super) port: u16,
    pub(super) pg_ctl: PathBuf,
}

pub(super) fn pg_bin_dir() -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL in /usr/lib/postgresql (tests/setup.sh ensure_postgres)")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    dirs.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    dirs.pop()
        .expect("an initdb under /usr/lib/postgresql/*/bin")
}

impl Pg {
    pub(super) fn start() -> Pg {
        let bin = pg_bin_dir();
        // Not under a root-only temp dir: the postgres user must reach it.
        let root = std::env::temp_dir().join(unique("tsk-pg"));
        let data = root.join("data");
        let sock = root.join("sock");
        std::fs::create_dir_all(&sock).expect("pg dirs");
        let port = free_port();
        let pg = Pg {
            root: root.clone(),
            data: data.clone(),
            sock: sock.clone(),
            port,
            pg_ctl: bin.join("pg_ctl"),
        };
        run(
            "chown",
            &["-R", "postgres:postgres", &root.display().to_string()],
        );
        run("chmod", &["700", &root.display().to_string()]);
        let initdb = bin.join("initdb").display().to_string();
        let data_s = data.display().to_string();
        run(
            "runuser",
            &[
                "-u",
                "postgres",
                "--",
                &initdb,
                "-D",
                &data_s,
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
            ],
        );
        let options = format!(
            "-p {port} -k {} -c listen_addresses='' -c fsync=off -c max_connections=200",
            sock.display()
        );
        let log = root.join("postgres.log").display().to_string();
        run(
            "runuser",
            &[
                "-u",
                "postgres",
                "--",
                &pg.pg_ctl.display().to_string(),
                "-D",
                &data_s,
                "-l",
                &log,
                "-o",
                &options,
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
        pg
    }

    pub(super) fn url(&self) -> String {
        format!(
            "postgres:///postgres?host={}&port={}&user=postgres",
            self.sock.display(),
            self.port
        )
    }

    /// `pg_ctl restart -m fast` (with the options it was started with), off the
    /// runtime's threads. The postmaster's output goes to its log file (`-l`): with
    /// pipes it would hold them open past pg_ctl's exit.
    pub(super) async fn restart(&self) {
        let mut command = Command::new("runuser");
        command
            .args(["-u", "postgres", "--"])
            .arg(&self.pg_ctl)
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(self.root.join("postgres.log"))
            .args(["-w", "-t", "60", "-m", "fast", "restart"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let status = tokio::task::spawn_blocking(move || command.status())
            .await
            .expect("pg_ctl task")
            .expect("pg_ctl");
        assert!(status.success(), "pg_ctl restart: {status}");
    }

    pub(super) async fn connect(&self) -> PgConnection {
        PgConnection::connect(&self.url())
            .await
            .expect("connect to the test's PostgreSQL")
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        let args = [
            "-u".to_owned(),
            "postgres".to_owned(),
            "--".to_owned(),
            self.pg_ctl.display().to_string(),
            "-D".to_owned(),
            self.data.display().to_string(),
            "-m".to_owned(),
            "immediate".to_owned(),
            "-w".to_owned(),
            "stop".to_owned(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_quiet("runuser", &args);
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.root.join("postgres.log")).unwrap_or_default();
            eprintln!("----- postgres.log -----\n{log}");
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Who holds each duty: (duty, holder).
pub(super) async fn duty_holders(pg: &Pg) -> Vec<(String, String)> {
    sqlx::query_as("SELECT duty, holder FROM duty_leases ORDER BY duty")
        .fetch_all(&mut pg.connect().await)
        .await
        .unwrap_or_default()
}

pub(super) fn holder_pid(holder: &str) -> Option<u32> {
    holder.split('/').nth(1).and_then(|p| p.parse().ok())
}

// ---------------------------------------------------------------------------------
// Replicas and workers
