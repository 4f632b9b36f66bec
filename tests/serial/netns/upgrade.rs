//! A rolling upgrade across two builds: the cluster starts on the previous build (the
//! commit `tests/previous-build` names, built by `tests/setup.sh`'s
//! `ensure_previous_build`; `TASUKI_PREVIOUS_BIN` names the binary) and each replica and
//! worker is replaced in turn by this build while runs flow, interleaved so that every
//! pairing of old and new serve and worker carries runs: replica cp1, worker w1,
//! replica cp2, worker w2.

use super::*;

/// The previous build's binary.
fn previous_build() -> PathBuf {
    let path = std::env::var_os("TASUKI_PREVIOUS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            panic!(
                "TASUKI_PREVIOUS_BIN is not set: run the suite through tests/run.sh, or \
                 `source tests/setup.sh; ensure_previous_build` first"
            )
        });
    assert!(
        path.is_file(),
        "{}: no such file (tests/setup.sh ensure_previous_build builds it)",
        path.display()
    );
    path
}

fn version_of(bin: &Path) -> String {
    run(&bin.display().to_string(), &["--version"])
        .trim()
        .to_owned()
}

/// The newest migration applied to the test's database.
async fn schema_version(pg: &Pg) -> i64 {
    let (version,): (i64,) =
        sqlx::query_as("SELECT MAX(version) FROM _sqlx_migrations WHERE success")
            .fetch_one(&mut pg.connect().await)
            .await
            .expect("the schema version");
    version
}

/// A previous build's `serve` started on the store after this build migrated it past
/// the previous build's schema: refused at once (exit 1), naming the version.
async fn previous_build_is_refused(previous: &Path, pg: &Pg, dir: &Path, newest: i64) {
    let data = dir.join("refused");
    let out = tokio::process::Command::new(previous)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .args(["--database-url", &pg.url(), "--amqp-url", &amqp_url()])
        .args(["--queue", &unique("tasuki-refused"), "--insecure-no-auth"])
        .args(["--jobs-dir"])
        .arg(crate::common::test_jobs_dir())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .expect("the previous build neither started nor exited in 60 s")
        .expect("run the previous build");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("schema is at version {newest}")),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netns_rolling_upgrade_from_the_previous_build_loses_nothing_and_starts_nothing_twice() {
    bounded(netns_rolling_upgrade_case()).await;
}

async fn netns_rolling_upgrade_case() {
    let previous = previous_build();
    let current = PathBuf::from(crate::common::BIN);
    let (old_version, new_version) = (version_of(&previous), version_of(&current));
    eprintln!("[upgrade] from {old_version} to {new_version}");
    assert!(
        std::fs::read(&previous).expect("previous build")
            != std::fs::read(&current).expect("this build"),
        "the previous build is this build: {}",
        previous.display()
    );

    let mut c = Cluster::start_with(&previous);
    let old_schema = schema_version(&c.pg).await;
    let load = start_load(&c.front);
    progress(&c.front, 0, 8, "on the previous build").await;
    let probe = c.front.accepted()[0].0.clone();

    // Replica cp1: its new build migrates the store while cp2 still runs the old one.
    replace_replica(&mut c.a, &current).await;
    let new_schema = schema_version(&c.pg).await;
    eprintln!("[upgrade] schema {old_schema} (previous build) → {new_schema} (this build)");
    assert!(new_schema >= old_schema);
    if new_schema > old_schema {
        // The old replica serves on the migrated store...
        let (status, _) = api(&c.b.host_url).get(&format!("/v1/runs/{probe}")).await;
        assert_eq!(status, 200, "the old replica after the migration");
        // ... but a previous build that starts now is refused: the roll only goes on.
        previous_build_is_refused(&previous, &c.pg, c.a.dir.as_path(), new_schema).await;
    } else {
        eprintln!("[upgrade] the two builds share one schema: no migration in flight");
    }
    let n = c.front.accepted().len();
    progress(&c.front, n, 6, "new cp1, old cp2, old workers").await;

    replace_worker(&c.front, &mut c.w1, &current).await;
    let n = c.front.accepted().len();
    progress(&c.front, n, 6, "new cp1 and w1, old cp2 and w2").await;

    replace_replica(&mut c.b, &current).await;
    let n = c.front.accepted().len();
    progress(&c.front, n, 6, "new replicas, old w2").await;

    replace_worker(&c.front, &mut c.w2, &current).await;
    let all_new = c.front.accepted().len();
    progress(&c.front, all_new, 8, "all on this build").await;
    drained(&c.front, "after the upgrade").await;
    stop_load(load).await;
    let gap = c.front.report("rolling upgrade");
    let api = api(&c.b.host_url);
    let finals = settle(&c.front, &mut c.inv, &api, &|_| false).await;
    // Each attempt names the build of the worker that claimed it, when both that worker
    // and the replica it claimed through know builds: none before the upgrade, this
    // build's on every run accepted once all were replaced, never anything else.
    let build = new_version.trim_start_matches("tasuki ").to_owned();
    let build_of = |run: &Value| {
        attempts_of(run)[0]["worker_build"]
            .as_str()
            .map(str::to_owned)
    };
    assert_eq!(build_of(&finals[0]), None, "{}", finals[0]);
    for run in &finals {
        let named = build_of(run);
        assert!(
            named.is_none() || named.as_deref() == Some(build.as_str()),
            "{run}"
        );
    }
    for run in &finals[all_new..] {
        assert_eq!(build_of(run).as_deref(), Some(build.as_str()), "{run}");
    }
    let named = finals.iter().filter(|r| build_of(r).is_some()).count();
    eprintln!(
        "[upgrade] {named} of {} attempts name this build",
        finals.len()
    );
    let per_worker = |id: &str| finals.iter().filter(|r| worker_of(r) == id).count();
    eprintln!(
        "[upgrade] {} runs: {} on w1, {} on w2",
        finals.len(),
        per_worker(&c.w1.id),
        per_worker(&c.w2.id)
    );
    assert!(gap < GAP_BOUND, "the API did not answer for {gap:?}");
    for r in [&mut c.a, &mut c.b] {
        assert!(r.process.exited().is_none(), "{}", r.process.log_text());
        assert!(
            r.process
                .log_text()
                .contains(&new_version.replace("tasuki ", "")),
            "{} does not log this build ({new_version})",
            r.name
        );
    }
    for w in [&mut c.w1, &mut c.w2] {
        assert!(w.process.exited().is_none(), "{}", w.process.log_text());
    }
}

/// SIGTERM (a clean exit), then the same command on `bin`.
async fn replace_replica(r: &mut Replica, bin: &Path) {
    let t = Instant::now();
    r.process.signal("TERM");
    let status = r.process.wait_exit(Duration::from_secs(40)).await;
    assert!(
        status.success(),
        "{} exited with {status}:\n{}",
        r.name,
        r.process.log_text()
    );
    tokio::task::block_in_place(|| r.restart_with(bin));
    eprintln!(
        "[upgrade] replica {} replaced in {:.2?}",
        r.name,
        t.elapsed()
    );
}

/// A long run running on worker `id`: long runs are asked for until one lands there
/// (the other worker may take some). The worker's replacement then drains it, and its
/// old build reports the end of a run to whichever replica answers.
async fn busy(front: &Front, id: &str) -> String {
    for _ in 0..10 {
        let run_id = front
            .submit("sleep", json!({"seconds": "6"}), Duration::from_secs(30))
            .await
            .expect("accepted");
        let deadline = Instant::now() + Duration::from_secs(30);
        let run = loop {
            let run = front.run(&run_id).await.expect("run");
            if run["status"] == "running" && !worker_of(&run).is_empty() {
                break run;
            }
            assert!(Instant::now() < deadline, "not running in 30 s: {run}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        if worker_of(&run) == id {
            return run_id;
        }
    }
    panic!("none of 10 long runs went to {id}");
}

/// SIGTERM while the worker runs a long run (it drains: the run finishes and is
/// reported), then the same command and worker id on `bin`.
async fn replace_worker(front: &Front, w: &mut Worker, bin: &Path) {
    let running = busy(front, &w.id).await;
    let t = Instant::now();
    w.process.signal("TERM");
    let status = w.process.wait_exit(Duration::from_secs(40)).await;
    assert!(
        status.success(),
        "{} exited with {status}:\n{}",
        w.id,
        w.process.log_text()
    );
    w.restart_with(bin);
    let drained = front.run(&running).await.expect("the drained run");
    assert_eq!(drained["status"], "succeeded", "{drained}");
    eprintln!(
        "[upgrade] worker {} drained run {running} and was replaced in {:.2?}",
        w.id,
        t.elapsed()
    );
}
