//! `tasuki serve` replicas and `tasuki worker`s, each in its namespace.

use super::*;

/// The status of a plain `GET` (HTTP/1.0, blocking), or `None` without an answer.
pub(super) fn http_status(host: &str, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(host).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").ok()?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

pub(super) struct Replica {
    pub(super) name: &'static str,
    /// The build it runs: this one, or the previous build of the upgrade test.
    pub(super) bin: PathBuf,
    pub(super) process: Process,
    pub(super) args: Vec<String>,
    pub(super) dir: PathBuf,
    pub(super) ns: String,
    /// `http://ADDR:PORT` on the bridge, for the workers.
    pub(super) url: String,
    /// `http://127.0.0.1:HOSTPORT`, for the test.
    pub(super) host_url: String,
}

impl Replica {
    pub(super) fn start(
        bin: &Path,
        net: &mut Net,
        name: &'static str,
        dir: &Path,
        pg: &Pg,
        queue: &str,
    ) -> Replica {
        let dir = dir.join(name);
        std::fs::create_dir_all(&dir).expect("replica dir");
        let port = free_port();
        let addr = net.addr(name).to_owned();
        let ns = net.ns(name).to_owned();
        let args: Vec<String> = [
            "serve",
            "--listen",
            &format!("{addr}:{port}"),
            "--jobs-dir",
            &crate::common::test_jobs_dir().display().to_string(),
            "--data-dir",
            &dir.join("data").display().to_string(),
            "--amqp-url",
            &amqp_url(),
            "--queue",
            queue,
            "--worker-token",
            TOKEN,
            "--lease-ttl",
            LEASE_TTL,
            "--database-url",
            &pg.url(),
            "--drain-timeout",
            "20s",
            // The API listens on the namespace's address, which only the test reaches.
            "--insecure-no-auth",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        // A worker id no container has: the process's drop then removes none.
        let dummy = unique("tsk-no-worker");
        let process = Process::spawn_in_netns(bin, &ns, &args, &dir, &dummy, name, &Self::env());
        let host_url = net.expose(name, port);
        let mut replica = Replica {
            name,
            bin: bin.to_owned(),
            process,
            args,
            dir,
            ns,
            url: format!("http://{addr}:{port}"),
            host_url,
        };
        replica.wait_ready();
        replica
    }

    /// Until `/readyz` answers 200 (store and broker up).
    pub(super) fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let host = self.host_url.trim_start_matches("http://").to_owned();
        loop {
            if http_status(&host, "/readyz") == Some(200) {
                return;
            }
            if let Some(status) = self.process.exited() {
                panic!(
                    "replica {} exited with {status}:\n{}",
                    self.name,
                    self.process.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "replica {} not ready in 60 s:\n{}",
                self.name,
                self.process.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// No per-caller rate limit: the test is the one caller of every replica (the load,
    /// its polling, and at the end a read of every run and log at once, well past the
    /// default burst of 100), standing in for many.
    pub(super) fn env() -> Vec<(String, String)> {
        vec![("TASUKI_LIMITS_RATE_PER_SECOND".into(), "0".into())]
    }

    /// Start the same command again (same address, port, data dir) and wait for it.
    pub(super) fn restart(&mut self) {
        self.spawn();
        self.wait_ready();
    }

    /// Start the same command again with `bin` (an upgrade) and wait for it.
    pub(super) fn restart_with(&mut self, bin: &Path) {
        self.bin = bin.to_owned();
        self.restart();
    }

    /// Start the command again, in place of the process that was there.
    pub(super) fn spawn(&mut self) {
        let dummy = self.process.worker_id.clone();
        let fresh = Process::spawn_in_netns(
            &self.bin,
            &self.ns,
            &self.args,
            &self.dir,
            &dummy,
            self.name,
            &Self::env(),
        );
        let old = std::mem::replace(&mut self.process, fresh);
        drop(old);
    }
}

pub(super) struct Worker {
    pub(super) id: String,
    pub(super) bin: PathBuf,
    pub(super) process: Process,
    pub(super) args: Vec<String>,
    pub(super) dir: PathBuf,
    pub(super) ns: String,
}

impl Worker {
    pub(super) fn start(
        bin: &Path,
        net: &Net,
        name: &str,
        id: &str,
        dir: &Path,
        replicas: &[&Replica],
        queue: &str,
    ) -> Worker {
        let id = id.to_owned();
        let dir = dir.join(name);
        std::fs::create_dir_all(&dir).expect("worker dir");
        let mut args: Vec<String> = vec!["worker".into()];
        for r in replicas {
            args.extend(["--server".into(), r.url.clone()]);
        }
        args.extend(
            [
                "--worker-token",
                TOKEN,
                "--amqp-url",
                &amqp_url(),
                "--queue",
                queue,
                "--worker-id",
                &id,
                "--concurrency",
                "2",
                "--drain-timeout",
                "20s",
            ]
            .iter()
            .map(|s| (*s).to_owned()),
        );
        let ns = net.ns(name).to_owned();
        let process = Process::spawn_in_netns(bin, &ns, &args, &dir, &id, name, &Self::env());
        Worker {
            id,
            bin: bin.to_owned(),
            process,
            args,
            dir,
            ns,
        }
    }

    pub(super) fn env() -> Vec<(String, String)> {
        vec![("TASUKI_RECONCILE_INTERVAL".into(), "3s".into())]
    }

    /// Start the same command again with `bin` (an upgrade), after a drain.
    pub(super) fn restart_with(&mut self, bin: &Path) {
        self.bin = bin.to_owned();
        self.restart();
    }

    pub(super) fn restart(&mut self) {
        let fresh = Process::spawn_in_netns(
            &self.bin,
            &self.ns,
            &self.args,
            &self.dir,
            &self.id,
            "worker",
            &Self::env(),
        );
        // The old process has exited (drained); its containers, if any, are the new
        // one's to adopt: don't let its drop remove them.
        let old = std::mem::replace(&mut self.process, fresh);
        std::mem::forget(old);
    }
}

// ---------------------------------------------------------------------------------
// The load, through whichever replica answers
