//! Pulls from a private registry with `[registries]` credentials: Debian's
//! `docker-registry` with htpasswd auth on a free loopback port (plain HTTP: Docker
//! treats 127.0.0.0/8 as insecure), holding a copy of `tasuki-example:latest` pushed
//! with a throwaway `DOCKER_CONFIG`. The right login pulls and runs; a wrong one, or
//! none, fails the run with `image_pull_failed: unauthorized`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::{
    QueueGuard, ServeOptions, Server, TOKEN, WorkerSpec, assert_no_containers_left, docker_cli,
    start_worker_with, unique,
};

const USER: &str = "tasuki-ci";

fn run(command: &mut Command, what: &str) -> String {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A `docker-registry serve` of this test's own, killed (by its PID) when dropped,
/// with the image tags the test made on the engine.
struct Registry {
    child: Child,
    /// `127.0.0.1:PORT`
    host: String,
    port: u16,
    log: PathBuf,
    /// Local tags to remove at the end.
    tags: Vec<String>,
}

impl Registry {
    fn start(dir: &Path, password: &str) -> Registry {
        for tool in ["docker-registry", "htpasswd"] {
            assert!(
                Command::new("sh")
                    .args(["-c", &format!("command -v {tool}")])
                    .output()
                    .is_ok_and(|o| o.status.success()),
                "{tool} is missing: tests/run.sh installs docker-registry and apache2-utils"
            );
        }
        let root = dir.join("registry");
        std::fs::create_dir_all(root.join("data")).unwrap();
        let htpasswd = run(
            Command::new("htpasswd").args(["-Bbn", USER, password]),
            "htpasswd",
        );
        std::fs::write(root.join("htpasswd"), htpasswd).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let config = format!(
            "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {data}\n\
             http:\n  addr: 127.0.0.1:{port}\n  secret: {secret}\n\
             auth:\n  htpasswd:\n    realm: tasuki-test\n    path: {htpasswd}\n",
            data = root.join("data").display(),
            secret = unique("http-secret"),
            htpasswd = root.join("htpasswd").display(),
        );
        let config_path = root.join("config.yml");
        std::fs::write(&config_path, config).unwrap();
        let log = root.join("registry.log");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(root.join("registry.err")).unwrap())
            .spawn()
            .expect("start docker-registry");
        let mut registry = Registry {
            child,
            host: format!("127.0.0.1:{port}"),
            port,
            log,
            tags: Vec::new(),
        };
        registry.wait_listening(&root);
        registry
    }

    fn wait_listening(&mut self, root: &Path) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "docker-registry exited with {status}: {}",
                    std::fs::read_to_string(root.join("registry.err")).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "docker-registry did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Push a copy of `tasuki-example:latest` as `repo:1`, logged in through a
    /// temporary Docker config (the user's is never touched); the local tag goes again,
    /// so a job's pull is what brings it back. Returns the reference.
    fn push_example(&mut self, dir: &Path, repo: &str, password: &str) -> String {
        let reference = format!("{}/{repo}:1", self.host);
        let config = dir.join("docker-config");
        std::fs::create_dir_all(&config).unwrap();
        let docker = || {
            let mut c = Command::new(docker_cli());
            c.env("DOCKER_CONFIG", &config);
            c
        };
        let mut login = docker()
            .args(["login", "-u", USER, "--password-stdin", &self.host])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("docker login");
        {
            use std::io::Write;
            let mut stdin = login.stdin.take().expect("stdin");
            stdin.write_all(password.as_bytes()).unwrap();
        }
        let out = login.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "docker login: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.tags.push(reference.clone());
        run(
            docker().args(["tag", "tasuki-example:latest", &reference]),
            "docker tag",
        );
        run(docker().args(["push", &reference]), "docker push");
        run(docker().args(["logout", &self.host]), "docker logout");
        untag(&reference);
        reference
    }
}

fn untag(reference: &str) {
    let _ = Command::new(docker_cli()).args(["rmi", reference]).output();
}

impl Drop for Registry {
    fn drop(&mut self) {
        for tag in &self.tags {
            untag(tag);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "----- {} -----\n{}",
                self.log.display(),
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

/// `[registries."HOST"]` with the password read from `file`.
fn write_config(dir: &Path, host: &str, file: &Path) -> PathBuf {
    let config = dir.join("tasuki.toml");
    std::fs::write(
        &config,
        format!(
            "[registries.\"{host}\"]\nusername = \"{USER}\"\npassword = {{ from_file = \"{}\" }}\n",
            file.display()
        ),
    )
    .unwrap();
    config
}

fn write_job(jobs: &Path, name: &str, image: &str) {
    std::fs::create_dir_all(jobs).unwrap();
    std::fs::write(
        jobs.join(format!("{name}.toml")),
        format!(
            "image = \"{image}\"\npull = \"always\"\nnetwork = \"none\"\n\
             command = [\"sh\", \"-c\", \"echo pulled-and-ran\"]\n"
        ),
    )
    .unwrap();
}

fn assert_unauthorized(run: &serde_json::Value, image: &str) {
    assert_eq!(run["status"], "failed", "{run}");
    assert_eq!(run["reason_code"], "image_pull_failed", "{run}");
    let reason = run["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with(&format!("image_pull_failed: unauthorized: {image}: ")),
        "{run}"
    );
}

#[tokio::test]
async fn a_private_registry_pull_uses_the_configured_login() {
    let d = tempfile::tempdir().unwrap();
    let password = unique("registry-pw");
    let mut registry = Registry::start(d.path(), &password);
    let image = registry.push_example(d.path(), &unique("tasuki-test/private"), &password);
    // The same registry by another name, with no login configured for it.
    let unnamed = image.replacen("127.0.0.1", "localhost", 1);
    registry.tags.push(unnamed.clone());

    let password_file = d.path().join("registry-password");
    std::fs::write(&password_file, format!("{password}\n")).unwrap();
    let config = write_config(d.path(), &registry.host, &password_file);
    let jobs = d.path().join("jobs");
    write_job(&jobs, "private", &image);
    write_job(&jobs, "private-unnamed", &unnamed);
    let server = Server::start(
        d.path(),
        ServeOptions {
            jobs_dir: jobs,
            env: vec![
                ("TASUKI_CONFIG".into(), config.display().to_string()),
                ("TASUKI_LOG".into(), "trace".into()),
            ],
            ..ServeOptions::default()
        },
    );
    let api = server.client();

    let ok = api.run_and_wait("private", json!({})).await;
    assert_eq!(ok["status"], "succeeded", "{ok}");
    assert_eq!(
        String::from_utf8_lossy(&api.logs(ok["id"].as_str().unwrap()).await),
        "pulled-and-ran\n"
    );

    // Read at every claim: a wrong password from now on is refused by the registry.
    std::fs::write(&password_file, "not-the-password\n").unwrap();
    let refused = api.run_and_wait("private", json!({})).await;
    assert_unauthorized(&refused, &image);

    let anonymous = api.run_and_wait("private-unnamed", json!({})).await;
    assert_unauthorized(&anonymous, &unnamed);

    assert!(
        !server.process.log_text().contains(&password),
        "the registry password is in serve's log"
    );
    assert_no_containers_left(&server.process.worker_id).await;
}

#[tokio::test]
async fn a_remote_worker_pulls_with_the_login_from_its_claim() {
    let d = tempfile::tempdir().unwrap();
    let queue = unique("tasuki-test");
    let _guard = QueueGuard(queue.clone());
    let password = unique("registry-pw");
    let mut registry = Registry::start(d.path(), &password);
    let image = registry.push_example(d.path(), &unique("tasuki-test/remote"), &password);
    let password_file = d.path().join("registry-password");
    std::fs::write(&password_file, &password).unwrap();
    let config = write_config(d.path(), &registry.host, &password_file);
    let jobs = d.path().join("jobs");
    write_job(&jobs, "private", &image);
    let server = Server::start(
        d.path(),
        ServeOptions {
            jobs_dir: jobs,
            amqp_queue: Some(queue.clone()),
            worker_token: Some(TOKEN.to_owned()),
            env: vec![("TASUKI_CONFIG".into(), config.display().to_string())],
            ..ServeOptions::default()
        },
    );
    // The worker has no config file: the login comes with the claim.
    let worker = start_worker_with(
        d.path(),
        &server,
        &queue,
        TOKEN,
        WorkerSpec {
            env: vec![("TASUKI_LOG".into(), "trace".into())],
            ..WorkerSpec::default()
        },
    );
    let api = server.client();
    let ok = api.run_and_wait("private", json!({})).await;
    assert_eq!(ok["status"], "succeeded", "{ok}");
    std::fs::write(&password_file, "not-the-password").unwrap();
    let refused = api.run_and_wait("private", json!({})).await;
    assert_unauthorized(&refused, &image);
    assert!(
        !worker.log_text().contains(&password),
        "the registry password is in the worker's log"
    );
    assert_no_containers_left(&worker.worker_id).await;
}
