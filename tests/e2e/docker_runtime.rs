//! Integration tests against the real Docker engine on this machine.
//!
//! Every test creates containers with unique names and removes them by name
//! afterwards, also when the test body fails or panics.

use std::collections::BTreeMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use tasuki::docker::DockerRuntime;
use tasuki::domain::job::{DEFAULT_MEMORY, DEFAULT_PIDS_LIMIT, PullPolicy};
use tasuki::domain::ports::{
    ContainerExit, ContainerRuntime, ContainerSpec, OutputChunk, RuntimeError, Stream,
};

const IMAGE: &str = "tasuki-example:latest";

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

fn unique_name(test: &str) -> String {
    crate::common::unique(&format!("tasuki-test-{test}"))
}

fn spec(name: &str, command: &[&str]) -> ContainerSpec {
    ContainerSpec {
        logs: Default::default(),
        name: name.to_owned(),
        image: IMAGE.to_owned(),
        command: command.iter().map(|s| (*s).to_owned()).collect(),
        workdir: None,
        user: None,
        env: BTreeMap::new(),
        secret_env: BTreeMap::new(),
        labels: BTreeMap::from([("tasuki.test".to_owned(), "true".to_owned())]),
        cpu_shares: None,
        cpu_limit: None,
        memory_bytes: DEFAULT_MEMORY,
        network: "none".to_owned(),
        pids_limit: DEFAULT_PIDS_LIMIT,
        capabilities: Vec::new(),
        read_only_root: false,
        mounts: Vec::new(),
    }
}

fn runtime() -> DockerRuntime {
    match DockerRuntime::connect(None) {
        Ok(rt) => rt,
        Err(e) => panic!("cannot build docker runtime: {e}"),
    }
}

/// Runs `body`, then force-removes the named containers whatever happened,
/// then reports the body's failure (error or panic).
async fn with_cleanup<F, Fut>(rt: &DockerRuntime, names: &[&str], body: F)
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = TestResult>,
{
    let outcome = AssertUnwindSafe(body()).catch_unwind().await;
    for name in names {
        if let Err(e) = rt.remove(name).await {
            eprintln!("cleanup of {name} failed: {e}");
        }
    }
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("test failed: {e}"),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// create + attach + start + collect output + wait.
async fn run_to_end(
    rt: &DockerRuntime,
    spec: &ContainerSpec,
) -> Result<(Vec<OutputChunk>, ContainerExit), RuntimeError> {
    let id = rt.create(spec).await?;
    let output = rt.attach(&id).await?;
    let collector = tokio::spawn(output.collect::<Vec<_>>());
    rt.start(&id).await?;
    let exit = rt.wait(&id).await?;
    let chunks = tokio::time::timeout(Duration::from_secs(30), collector)
        .await
        .map_err(|_| RuntimeError::Docker("output stream did not end".into()))?
        .map_err(|e| RuntimeError::Docker(format!("collector task failed: {e}")))?;
    let chunks = chunks.into_iter().collect::<Result<Vec<_>, _>>()?;
    Ok((chunks, exit))
}

#[tokio::test]
async fn ping_and_ensure_local_image() {
    let rt = runtime();
    with_cleanup(&rt, &[], || async {
        rt.ping().await?;
        rt.ensure_image(IMAGE, PullPolicy::Never, None).await?;
        rt.ensure_image(IMAGE, PullPolicy::IfNotPresent, None)
            .await?;
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn stdout_and_stderr_arrive_in_order() {
    let rt = runtime();
    let name = unique_name("order");
    with_cleanup(&rt, &[&name], || async {
        let spec = spec(
            &name,
            &[
                "sh",
                "-c",
                "echo out1; sleep 0.1; echo err1 >&2; sleep 0.1; echo out2",
            ],
        );
        let (chunks, exit) = run_to_end(&rt, &spec).await?;
        let got: Vec<(Stream, &[u8])> = chunks
            .iter()
            .map(|c| (c.stream, c.bytes.as_ref()))
            .collect();
        assert_eq!(
            got,
            vec![
                (Stream::Stdout, &b"out1\n"[..]),
                (Stream::Stderr, &b"err1\n"[..]),
                (Stream::Stdout, &b"out2\n"[..]),
            ]
        );
        assert_eq!(
            exit,
            ContainerExit {
                exit_code: 0,
                oom_killed: false
            }
        );
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn non_zero_exit_is_data() {
    let rt = runtime();
    let name = unique_name("exit3");
    with_cleanup(&rt, &[&name], || async {
        let (_, exit) = run_to_end(&rt, &spec(&name, &["sh", "-c", "exit 3"])).await?;
        assert_eq!(exit.exit_code, 3);
        assert!(!exit.oom_killed);
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn oom_kill_is_reported() {
    let rt = runtime();
    let name = unique_name("oom");
    with_cleanup(&rt, &[&name], || async {
        let mut spec = spec(&name, &["sh", "-c", "head -c 200m /dev/zero | tail"]);
        spec.memory_bytes = 16 * 1024 * 1024;
        let (_, exit) = run_to_end(&rt, &spec).await?;
        assert!(exit.oom_killed, "expected OOM kill, got {exit:?}");
        assert_ne!(exit.exit_code, 0);
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn missing_images() {
    let rt = runtime();
    with_cleanup(&rt, &[], || async {
        let never = rt
            .ensure_image("tasuki-definitely-missing:never", PullPolicy::Never, None)
            .await;
        assert!(
            matches!(never, Err(RuntimeError::ImageNotFound { .. })),
            "{never:?}"
        );
        let unreachable = rt
            .ensure_image("127.0.0.1:5999/nothing:1", PullPolicy::IfNotPresent, None)
            .await;
        assert!(
            matches!(unreachable, Err(RuntimeError::PullFailed { .. })),
            "{unreachable:?}"
        );
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn stop_with_grace_ends_container() {
    let rt = runtime();
    let name = unique_name("stop");
    with_cleanup(&rt, &[&name], || async {
        let id = rt.create(&spec(&name, &["sleep", "60"])).await?;
        let output = rt.attach(&id).await?;
        rt.start(&id).await?;
        let started = Instant::now();
        rt.stop(&id, Duration::from_secs(1)).await?;
        let exit = tokio::time::timeout(Duration::from_secs(30), rt.wait(&id)).await??;
        let elapsed = started.elapsed();
        assert!(elapsed < Duration::from_secs(30), "took {elapsed:?}");
        // SIGTERM (143) via docker-init, or SIGKILL (137) after the grace.
        assert!(
            exit.exit_code == 143 || exit.exit_code == 137,
            "unexpected exit {exit:?}"
        );
        // The attach stream ends once the container is gone.
        let rest =
            tokio::time::timeout(Duration::from_secs(10), output.collect::<Vec<_>>()).await?;
        assert!(rest.is_empty(), "{rest:?}");
        // Stopping again is fine (304).
        rt.stop(&id, Duration::from_secs(1)).await?;
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn binary_output_is_byte_exact() {
    let rt = runtime();
    let name = unique_name("binary");
    with_cleanup(&rt, &[&name], || async {
        let (chunks, exit) = run_to_end(
            &rt,
            &spec(&name, &["head", "-c", "1000000", "/dev/urandom"]),
        )
        .await?;
        assert_eq!(exit.exit_code, 0);
        assert!(chunks.iter().all(|c| c.stream == Stream::Stdout));
        let total: usize = chunks.iter().map(|c| c.bytes.len()).sum();
        assert_eq!(total, 1_000_000);
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn second_create_with_same_name_conflicts() {
    let rt = runtime();
    let name = unique_name("conflict");
    with_cleanup(&rt, &[&name], || async {
        let spec = spec(&name, &["true"]);
        rt.create(&spec).await?;
        let second = rt.create(&spec).await;
        assert!(
            matches!(&second, Err(RuntimeError::NameConflict(n)) if *n == name),
            "{second:?}"
        );
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn remove_missing_container_is_ok() {
    let rt = runtime();
    with_cleanup(&rt, &[], || async {
        rt.remove(&unique_name("never-created")).await?;
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn container_ops_on_missing_container() {
    let rt = runtime();
    with_cleanup(&rt, &[], || async {
        let name = unique_name("missing");
        let start = rt.start(&name).await;
        assert!(
            matches!(start, Err(RuntimeError::NoSuchContainer(_))),
            "{start:?}"
        );
        let wait = rt.wait(&name).await;
        assert!(
            matches!(wait, Err(RuntimeError::NoSuchContainer(_))),
            "{wait:?}"
        );
        let stop = rt.stop(&name, Duration::from_secs(1)).await;
        assert!(
            matches!(stop, Err(RuntimeError::NoSuchContainer(_))),
            "{stop:?}"
        );
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn create_passes_env_workdir_user_and_limits() {
    let rt = runtime();
    let name = unique_name("env");
    with_cleanup(&rt, &[&name], || async {
        let mut spec = spec(&name, &["sh", "-c", "echo \"$GREETING $(pwd) $(id -u)\""]);
        spec.env.insert("GREETING".into(), "hello world".into());
        spec.workdir = Some("/tmp".into());
        spec.user = Some("1234".into());
        spec.cpu_shares = Some(512);
        spec.cpu_limit = Some(0.5);
        spec.memory_bytes = 64 * 1024 * 1024;
        let (chunks, exit) = run_to_end(&rt, &spec).await?;
        assert_eq!(exit.exit_code, 0, "{chunks:?}");
        let stdout: Vec<u8> = chunks
            .iter()
            .filter(|c| c.stream == Stream::Stdout)
            .flat_map(|c| c.bytes.iter().copied())
            .collect();
        assert_eq!(String::from_utf8_lossy(&stdout), "hello world /tmp 1234\n");
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn unreachable_engine_is_unavailable_and_construction_does_not_fail() {
    for host in [
        "unix:///tmp/tasuki-no-such-docker.sock",
        "tcp://127.0.0.1:1",
    ] {
        let rt = match DockerRuntime::connect(Some(host)) {
            Ok(rt) => rt,
            Err(e) => panic!("construction must not fail for {host}: {e}"),
        };
        // Twice: the second call retries connecting.
        for _ in 0..2 {
            let ping = rt.ping().await;
            assert!(
                matches!(ping, Err(RuntimeError::Unavailable(_))),
                "{host}: {ping:?}"
            );
        }
        let create = rt.create(&spec("x", &["true"])).await;
        assert!(
            matches!(create, Err(RuntimeError::Unavailable(_))),
            "{host}: {create:?}"
        );
    }
}

#[tokio::test]
async fn explicit_unix_host_works() {
    let rt = match DockerRuntime::connect(Some("unix:///var/run/docker.sock")) {
        Ok(rt) => rt,
        Err(e) => panic!("{e}"),
    };
    with_cleanup(&rt, &[], || async {
        rt.ping().await?;
        // The engine here speaks 1.41, older than bollard's default.
        assert_eq!(rt.api_version().await?, "1.41");
        Ok(())
    })
    .await;
}
