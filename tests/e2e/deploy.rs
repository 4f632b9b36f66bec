//! The deployment files in `deploy/`, checked with the real tools: `systemd-analyze verify`
//! on the units, `docker-compose config` on compose.yaml, `kubernetes-validate` (the
//! Kubernetes OpenAPI schemas, offline) on the manifests, the Dockerfile's runtime stage
//! built by the real engine; and, so the files cannot rot, every `tasuki` command line in
//! them parsed by the real binary, and the systemd, compose and Kubernetes set-ups started
//! as written (`deploy/launch.rs`). tests/run.sh installs the tools; under `CI=true` a
//! missing one fails the test instead of skipping it.

mod launch;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

use crate::common::{BIN, docker_cli, unique};

/// Where tests/run.sh puts its Python tools (kubernetes-validate, PyYAML).
const VENV: &str = "/opt/tasuki-venv-deploy";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn deploy_dir() -> PathBuf {
    repo().join("deploy")
}

/// A validator, from the variable `var` or at `default` (where tests/run.sh installs it).
/// Missing: `None` (the test says so and stops), or a failure under `CI=true`.
fn tool(var: &str, default: &str) -> Option<PathBuf> {
    let path = std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(default));
    if path.is_file() {
        return Some(path);
    }
    let why = format!(
        "{} is missing (set {var}, or run tests/run.sh, which installs it)",
        path.display()
    );
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{why}");
    eprintln!("not checked: {why}");
    None
}

fn python() -> Option<PathBuf> {
    tool("TASUKI_DEPLOY_PYTHON", &format!("{VENV}/bin/python"))
}

fn run(program: &Path, args: &[&str], dir: &Path) -> Output {
    Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Every YAML document in `files`, as JSON, read by PyYAML (an independent parser).
fn yaml_documents(python: &Path, files: &[PathBuf]) -> Vec<Value> {
    let script = "import json, sys, yaml\n\
                  docs = [d for f in sys.argv[1:] for d in yaml.safe_load_all(open(f)) if d is not None]\n\
                  json.dump(docs, sys.stdout)";
    let mut args = vec!["-c".to_owned(), script.to_owned()];
    args.extend(files.iter().map(|f| f.display().to_string()));
    let out = Command::new(python).args(&args).output().expect("python");
    assert!(out.status.success(), "PyYAML: {}", text(&out.stderr));
    match serde_json::from_slice::<Value>(&out.stdout) {
        Ok(Value::Array(docs)) => docs,
        other => panic!("PyYAML printed no list: {other:?}"),
    }
}

fn kubernetes_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir().join("kubernetes"))
        .expect("deploy/kubernetes")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

/// The `tasuki` arguments of a unit's `ExecStart=` (the words after the binary).
fn exec_start_args(unit: &str) -> Vec<String> {
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart= in the unit");
    let mut words = line.split_whitespace().map(str::to_owned);
    assert_eq!(words.next().as_deref(), Some("/usr/local/bin/tasuki"));
    words.collect()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The units as they would be installed, but with ExecStart naming the binary under test
/// (verify refuses a unit whose binary does not exist).
fn units_in(dir: &Path) {
    for name in ["tasuki-serve.service", "tasuki-worker@.service"] {
        let unit = read(&deploy_dir().join("systemd").join(name));
        let unit = unit.replace(
            "ExecStart=/usr/local/bin/tasuki",
            &format!("ExecStart={BIN}"),
        );
        std::fs::write(dir.join(name), unit).expect("write unit");
    }
}

#[test]
fn systemd_units_pass_systemd_analyze_verify_and_security() {
    let Some(analyze) = tool("TASUKI_SYSTEMD_ANALYZE", "/usr/bin/systemd-analyze") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    units_in(dir.path());
    // `verify` loads the units offline (systemd need not be PID 1): every key and value is
    // parsed, the template is instantiated, the binaries must exist. Problems it only
    // warns about still exit 0, so stderr must be empty too.
    let units = ["./tasuki-serve.service", "./tasuki-worker@1.service"];
    let mut args = vec!["verify", "--man=no"];
    args.extend(units);
    let out = run(&analyze, &args, dir.path());
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}\n{}",
        out.status,
        text(&out.stderr)
    );
    // The same check on a broken copy does complain, so the check above can fail.
    let worker = dir.path().join("tasuki-worker@.service");
    let broken = read(&worker).replace("UMask=0077", "UMask=bad");
    std::fs::write(&worker, broken).expect("write");
    let out = run(&analyze, &args, dir.path());
    assert!(
        text(&out.stderr).contains("Failed to parse mode value"),
        "systemd-analyze did not notice a bad value: {}",
        text(&out.stderr)
    );
    units_in(dir.path());
    // Hardening, as systemd scores it offline (shown 0 best to 10 worst; the threshold is
    // in tenths of that): both must be "OK", at most 2.0 (a unit with none of the settings
    // scores 9.6).
    for unit in units {
        let out = run(
            &analyze,
            &["security", "--offline=yes", "--threshold=20", unit],
            dir.path(),
        );
        let report = text(&out.stdout);
        assert!(
            out.status.success(),
            "{unit} is less hardened than required:\n{report}{}",
            text(&out.stderr)
        );
        let summary = report.lines().last().unwrap_or_default().to_owned();
        eprintln!("{summary}");
        assert!(summary.contains("Overall exposure level"), "{report}");
    }
    let worker = read(&deploy_dir().join("systemd/tasuki-worker@.service"));
    assert!(worker.contains("SupplementaryGroups=docker"));
    assert!(worker.contains("root-equivalent"));
    assert!(
        exec_start_args(&worker)
            .join(" ")
            .contains("--worker-id %H-%i")
    );
}

#[test]
fn compose_file_passes_docker_compose_config() {
    let (Some(compose), Some(python)) = (
        tool("TASUKI_DOCKER_COMPOSE", "/usr/bin/docker-compose"),
        python(),
    ) else {
        return;
    };
    let dir = deploy_dir();
    let out = launch::compose_config(&compose, &dir.join("compose.env.example"));
    assert!(
        out.status.success(),
        "docker-compose config: {}",
        text(&out.stderr)
    );
    let tmp = tempfile::tempdir().expect("tempdir");
    let resolved = tmp.path().join("compose.resolved.yaml");
    std::fs::write(&resolved, &out.stdout).expect("write");
    let doc = yaml_documents(&python, &[resolved]).remove(0);
    let services = doc["services"].as_object().expect("services");
    let rabbitmq = &services["rabbitmq"];
    assert!(rabbitmq["healthcheck"]["test"].is_array(), "{rabbitmq}");
    assert!(
        mounts(rabbitmq)
            .iter()
            .any(|m| m.starts_with("rabbitmq-data:"))
    );
    let serve = &services["serve"];
    assert!(serve["healthcheck"]["test"].to_string().contains("/readyz"));
    assert!(mounts(serve).iter().any(|m| m.starts_with("tasuki-data:")));
    assert_eq!(
        serve["depends_on"]["rabbitmq"]["condition"], "service_healthy",
        "{serve}"
    );
    assert!(!mounts(serve).iter().any(|m| m.contains("docker.sock")));
    let workers: Vec<&Value> = services
        .iter()
        .filter(|(_, s)| s["command"][0] == "worker")
        .map(|(_, s)| s)
        .collect();
    assert!(workers.len() >= 2, "fewer than two workers: {doc}");
    let mut ids: Vec<String> = workers.iter().map(|w| worker_id(w)).collect();
    for worker in &workers {
        assert!(
            mounts(worker)
                .iter()
                .any(|m| m.contains("/var/run/docker.sock"))
        );
        for dependency in ["serve", "rabbitmq"] {
            assert_eq!(
                worker["depends_on"][dependency]["condition"], "service_healthy",
                "{worker}"
            );
        }
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), workers.len(), "worker ids not unique: {ids:?}");
    for volume in ["tasuki-data", "rabbitmq-data"] {
        assert!(doc["volumes"].get(volume).is_some(), "no volume {volume}");
    }
    // Without the filled-in variables compose refuses, naming the first one missing.
    let empty = tmp.path().join("empty.env");
    std::fs::write(&empty, "").expect("write");
    let out = launch::compose_config(&compose, &empty);
    assert!(!out.status.success(), "compose accepted missing variables");
    assert!(
        text(&out.stderr).contains("in deploy/.env"),
        "{}",
        text(&out.stderr)
    );
}

fn mounts(service: &Value) -> Vec<String> {
    service["volumes"]
        .as_array()
        .map(|v| {
            v.iter()
                .filter_map(|m| m.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn worker_id(worker: &Value) -> String {
    let command: Vec<&str> = worker["command"]
        .as_array()
        .expect("worker command")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let at = command
        .iter()
        .position(|a| *a == "--worker-id")
        .expect("--worker-id");
    command[at + 1].to_owned()
}

#[test]
fn kubernetes_manifests_pass_the_schema_checker() {
    let (Some(validate), Some(python)) = (
        tool(
            "TASUKI_KUBERNETES_VALIDATE",
            &format!("{VENV}/bin/kubernetes-validate"),
        ),
        python(),
    ) else {
        return;
    };
    let files = kubernetes_files();
    let mut args = vec!["--strict".to_owned()];
    args.extend(files.iter().map(|f| f.display().to_string()));
    let out = Command::new(&validate)
        .args(&args)
        .output()
        .expect("kubernetes-validate");
    let report = text(&out.stdout) + &text(&out.stderr);
    eprint!("{report}");
    assert!(out.status.success(), "kubernetes-validate:\n{report}");
    let docs = yaml_documents(&python, &files);
    // One "passed" line per resource: nothing was skipped for want of a schema.
    assert_eq!(report.matches(" passed for resource ").count(), docs.len());
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    for kind in [
        "Namespace",
        "ConfigMap",
        "Secret",
        "PersistentVolumeClaim",
        "Deployment",
        "Service",
    ] {
        assert!(kinds.contains(&kind), "no {kind} in {kinds:?}");
    }
    let deployment = docs
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .expect("Deployment");
    assert_eq!(deployment["spec"]["replicas"], 1);
    assert_eq!(deployment["spec"]["strategy"]["type"], "Recreate");
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let container = &pod["containers"][0];
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    let security = &container["securityContext"];
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert!(container["resources"]["limits"]["memory"].is_string());
    // The checker does reject what the schema forbids, so the pass above means something.
    let tmp = tempfile::tempdir().expect("tempdir");
    let bad = tmp.path().join("bad.yaml");
    let serve = read(&deploy_dir().join("kubernetes/40-serve.yaml"));
    std::fs::write(&bad, serve.replace("replicas: 1", "replicas: one")).expect("write");
    let out = Command::new(&validate)
        .args(["--strict", "--quiet"])
        .arg(&bad)
        .output()
        .expect("kubernetes-validate");
    assert!(!out.status.success(), "a string replica count passed");
}

/// Every `tasuki` command line in the unit files, compose.yaml and the manifests, as the
/// real binary parses it: flags that do not exist, or values it refuses, fail here.
#[test]
fn every_tasuki_command_line_in_deploy_is_accepted_by_the_binary() {
    let mut lines: Vec<(String, Vec<String>)> = Vec::new();
    for name in ["tasuki-serve.service", "tasuki-worker@.service"] {
        let unit = read(&deploy_dir().join("systemd").join(name));
        // %H and %i are filled in by systemd; any host and instance name will do.
        let args = exec_start_args(&unit)
            .into_iter()
            .map(|a| a.replace("%H", "host").replace("%i", "1"))
            .collect();
        lines.push((name.to_owned(), args));
    }
    if let Some(python) = python() {
        let compose = yaml_documents(&python, &[deploy_dir().join("compose.yaml")]).remove(0);
        for (name, service) in compose["services"].as_object().expect("services") {
            if let Some(command) = service["command"].as_array() {
                let args = command
                    .iter()
                    .filter_map(Value::as_str)
                    .map(|a| a.replace("${TASUKI_WORKER_ID_PREFIX:-compose}", "compose"))
                    .collect();
                lines.push((format!("compose.yaml {name}"), args));
            }
        }
        for doc in yaml_documents(&python, &kubernetes_files()) {
            if doc["kind"] == "Deployment" {
                let args = doc["spec"]["template"]["spec"]["containers"][0]["args"]
                    .as_array()
                    .expect("args")
                    .iter()
                    .filter_map(|a| a.as_str().map(str::to_owned))
                    .collect();
                lines.push(("kubernetes Deployment".to_owned(), args));
            }
        }
    }
    assert!(lines.len() >= 5, "{lines:?}");
    for (origin, args) in lines {
        // `--help` after the arguments: clap parses each of them first, and stops with
        // an error at the first it does not know.
        let out = Command::new(BIN)
            .args(&args)
            .arg("--help")
            .output()
            .expect("tasuki");
        assert!(
            out.status.success(),
            "{origin}: tasuki {} refused: {}",
            args.join(" "),
            text(&out.stderr)
        );
    }
}

/// The Dockerfile's runtime stage, built by the engine here. Its bases cannot be pulled on
/// this machine, so the stages it names through `RUNTIME_BASE` and `BINARY_FROM` are
/// local images: the binary's shared libraries, and the binary under test. BuildKit
/// builds only the stages the target needs, so the Rust and Debian stages are skipped.
#[test]
fn dockerfile_runtime_stage_runs_tasuki_as_a_non_root_user() {
    let docker = docker_cli();
    let tag = unique("tasuki-deploy-test");
    let images = ImageGuard {
        docker: docker.clone(),
        tags: vec![
            format!("{tag}-base:1"),
            format!("{tag}-binary:1"),
            format!("{tag}-runtime:1"),
        ],
    };
    let ctx = tempfile::tempdir().expect("tempdir");
    let base = ctx.path().join("base");
    let libraries = Command::new("ldd").arg(BIN).output().expect("ldd");
    for library in text(&libraries.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
    {
        let target = base.join(library.trim_start_matches('/'));
        std::fs::create_dir_all(target.parent().expect("parent")).expect("mkdir");
        std::fs::copy(library, &target).unwrap_or_else(|e| panic!("{library}: {e}"));
    }
    let binary = ctx.path().join("binary");
    std::fs::create_dir_all(binary.join("out/usr/local/bin")).expect("mkdir");
    std::fs::create_dir_all(binary.join("out/var/lib/tasuki")).expect("mkdir");
    // Without its debug sections (a fifth of the size): BuildKit keeps a copy of every
    // layer it builds in its cache, which `docker rmi` does not empty.
    let copy = binary.join("out/usr/local/bin/tasuki");
    let stripped = Command::new("strip")
        .arg("-o")
        .arg(&copy)
        .arg(BIN)
        .status()
        .is_ok_and(|s| s.success());
    if !stripped {
        std::fs::copy(BIN, &copy).expect("copy binary");
    }
    for (dir, image) in [(&base, &images.tags[0]), (&binary, &images.tags[1])] {
        std::fs::write(dir.join("Dockerfile"), "FROM scratch\nCOPY . /\n").expect("write");
        let out = Command::new(&docker)
            .args(["build", "-q", "-t", image, "."])
            .env("DOCKER_BUILDKIT", "0")
            .current_dir(dir)
            .output()
            .expect("docker build");
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let out = Command::new(&docker)
        .args(["build", "-f", "deploy/Dockerfile", "--target", "runtime"])
        .args(["--build-arg", &format!("RUNTIME_BASE={}", images.tags[0])])
        .args(["--build-arg", &format!("BINARY_FROM={}", images.tags[1])])
        .args(["-t", &images.tags[2], "."])
        .env("DOCKER_BUILDKIT", "1")
        .current_dir(repo())
        .output()
        .expect("docker build");
    assert!(
        out.status.success(),
        "docker build of the runtime stage: {}",
        text(&out.stderr)
    );
    let runtime = &images.tags[2];
    let out = Command::new(&docker)
        .args(["run", "--rm", "--network", "none", runtime, "--version"])
        .output()
        .expect("docker run");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).trim(),
        format!("tasuki {}", tasuki::BUILD)
    );
    let out = Command::new(&docker)
        .args(["image", "inspect", "-f", "{{.Config.User}}", runtime])
        .output()
        .expect("docker inspect");
    assert_eq!(text(&out.stdout).trim(), "10001:10001");
    // The data directory belongs to that user, so a volume mounted there starts writable.
    let created = Command::new(&docker)
        .args(["create", runtime])
        .output()
        .expect("docker create");
    let container = text(&created.stdout).trim().to_owned();
    let tar = Command::new(&docker)
        .args(["cp", &format!("{container}:/var/lib/tasuki"), "-"])
        .output()
        .expect("docker cp");
    let _ = Command::new(&docker).args(["rm", &container]).output();
    // A tar header: the owner's uid is 8 octal digits at offset 108.
    let uid = tar.stdout.get(108..115).map(text).unwrap_or_default();
    assert_eq!(
        u32::from_str_radix(uid.trim_matches(|c: char| c == '\0' || c == ' '), 8).ok(),
        Some(10001)
    );
}

/// Removes the test's images, however the test ends.
struct ImageGuard {
    docker: String,
    tags: Vec<String>,
}

impl Drop for ImageGuard {
    fn drop(&mut self) {
        let _ = Command::new(&self.docker)
            .args(["rmi", "-f"])
            .args(&self.tags)
            .output();
    }
}
