//! Chaos tests on test hosts made of network namespaces: two `serve` replicas and two
//! workers, each in a namespace of its own on a private bridge, on a PostgreSQL of the
//! test's own, with one fault per test (a replica killed, a worker cut off from the
//! control plane, PostgreSQL restarted) under a steady load, and a rolling upgrade from
//! the previous build (`upgrade.rs`).
//!
//! The harness (`Net`) makes a "switch" namespace holding a Linux bridge and one
//! namespace per host, each joined to the bridge by a veth pair created straight into
//! the two namespaces (nothing appears in the host's own namespace), with an address
//! in 10.231.7.0/24 that exists only inside these namespaces. The system RabbitMQ
//! (127.0.0.1:5672 of the host) is bridged into each namespace's loopback by `socat`
//! over a unix socket, and each replica's API is bridged back to a loopback port of the
//! host the same way, for the test's own client. Docker and PostgreSQL are reached
//! through their unix sockets, which every namespace sees. Everything is torn down in
//! `Drop`: processes by PID first, then the namespaces.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sqlx::Connection;
use sqlx::postgres::PgConnection;

use crate::common::{Invariants, Process, QueueGuard, TOKEN, amqp_url, attempts_of, unique};

mod hosts;
mod load;
mod net;
mod pg;
mod upgrade;

use hosts::*;
use load::*;
use net::*;
use pg::*;

/// The private /24 of the test hosts; its addresses exist only inside the namespaces.
const SUBNET: &str = "10.231.7";
const LEASE_TTL: &str = "3s";

// ---------------------------------------------------------------------------------
// Commands

/// Run a command that must succeed; its stdout.
fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{program} {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run a command for clean-up: report a failure, never panic (it runs in `Drop`).
fn run_quiet(program: &str, args: &[&str]) {
    match Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
    {
        Ok(out) if out.status.success() => {}
        Ok(out) => eprintln!(
            "clean-up: {program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => eprintln!("clean-up: {program} {args:?}: {e}"),
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

fn wait_for(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------------
// The network

/// The cluster of every test: namespaces cp1, cp2, w1, w2; PostgreSQL; a queue.
struct Cluster {
    // Dropped in this order: processes first, then the network and the database.
    w1: Worker,
    w2: Worker,
    a: Replica,
    b: Replica,
    front: Front,
    inv: Invariants,
    _queue: QueueGuard,
    net: Net,
    pg: Pg,
    _dir: tempfile::TempDir,
}

impl Cluster {
    fn start() -> Cluster {
        Cluster::start_with(Path::new(crate::common::BIN))
    }

    /// Every replica and worker on `bin`: this build, or the previous one.
    fn start_with(bin: &Path) -> Cluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let pg = Pg::start();
        let mut net = Net::create(&["cp1", "cp2", "w1", "w2"]);
        let queue = unique("tasuki-netns");
        let guard = QueueGuard(queue.clone());
        let a = Replica::start(bin, &mut net, "cp1", dir.path(), &pg, &queue);
        let b = Replica::start(bin, &mut net, "cp2", dir.path(), &pg, &queue);
        let (id1, id2) = (unique("tsk-w1"), unique("tsk-w2"));
        // Docker's events recorded from before a worker can start a container.
        let inv = Invariants::start(&[&id1, &id2]);
        let w1 = Worker::start(bin, &net, "w1", &id1, dir.path(), &[&a, &b], &queue);
        let w2 = Worker::start(bin, &net, "w2", &id2, dir.path(), &[&a, &b], &queue);
        let front = Front::new(&[&a, &b]);
        Cluster {
            w1,
            w2,
            a,
            b,
            front,
            inv,
            _queue: guard,
            net,
            pg,
            _dir: dir,
        }
    }
}

/// Until the load has had `n` more runs accepted than `since`.
async fn progress(front: &Front, since: usize, n: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while front.accepted().len() < since + n {
        assert!(
            Instant::now() < deadline,
            "{what}: fewer than {n} runs accepted in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Until every run accepted so far is final (the workers carry them out).
async fn drained(front: &Front, what: &str) {
    let api = api(&front.bases[front.bases.len() - 1]);
    for (id, _, _) in front.accepted() {
        let run = api.wait_final(&id, Duration::from_secs(90)).await;
        assert!(run["status"] != "queued", "{what}: {run}");
    }
}

const GAP_BOUND: Duration = Duration::from_secs(30);

/// A client of one replica, whose calls give up after 100 s (a `?wait` is at most 90).
fn api(base: &str) -> crate::common::Api {
    crate::common::Api {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(100))
            .build()
            .expect("client"),
        base: base.to_owned(),
    }
}

/// The test, given at most 170 s: on time-out it fails with its state dropped (so the
/// guards tear everything down), instead of being killed by the runner with nothing
/// torn down.
async fn bounded(test: impl std::future::Future<Output = ()>) {
    if tokio::time::timeout(Duration::from_secs(170), test)
        .await
        .is_err()
    {
        panic!("the test did not end within 170 s");
    }
}

// a ---------------------------------------------------------------------------------

/// kill -9 the replica holding the duties: the workers fail over to the other, runs
/// keep flowing, the API answers through the survivor, which takes the duties over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netns_replica_killed_workers_fail_over() {
    bounded(netns_replica_killed_workers_fail_over_case()).await;
}

async fn netns_replica_killed_workers_fail_over_case() {
    let mut c = Cluster::start();
    let load = start_load(&c.front);
    progress(&c.front, 0, 8, "warm-up").await;

    let deadline = Instant::now() + Duration::from_secs(30);
    let scheduler = loop {
        let holders = duty_holders(&c.pg).await;
        if let Some((_, h)) = holders.iter().find(|(d, _)| d == "scheduler") {
            break holder_pid(h).expect("holder pid");
        }
        assert!(
            Instant::now() < deadline,
            "no scheduler holder: {holders:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (dead, alive) = if scheduler == c.a.process.pid() {
        (&mut c.a, &c.b)
    } else {
        (&mut c.b, &c.a)
    };
    eprintln!("[netns] killing {} (holds the scheduler)", dead.name);
    let before = c.front.accepted().len();
    let killed_at = Instant::now();
    dead.process.kill9();
    let survivor = alive.process.pid();

    // The survivor holds the scheduler and the reaper within their lease.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let holders = duty_holders(&c.pg).await;
        if holders
            .iter()
            .filter(|(d, _)| d != "retention")
            .all(|(_, h)| holder_pid(h) == Some(survivor))
            && holders.len() >= 2
        {
            break;
        }
        assert!(Instant::now() < deadline, "not taken over: {holders:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let takeover = killed_at.elapsed();
    eprintln!(
        "[netns] duties taken over by {} after {takeover:.2?}",
        alive.name
    );
    // Runs accepted after the kill are carried out (the workers report to the
    // survivor).
    progress(&c.front, before, 20, "after the kill").await;
    drained(&c.front, "after the kill").await;
    stop_load(load).await;
    let gap = c.front.report("replica killed");
    let api = api(&alive.host_url);
    settle(&c.front, &mut c.inv, &api, &|_| false).await;
    assert!(gap < GAP_BOUND, "the API did not answer for {gap:?}");
    assert!(c.w1.process.exited().is_none() && c.w2.process.exited().is_none());
}

// b ---------------------------------------------------------------------------------

/// Cut one worker's host off the control plane (its veth down) for longer than the
/// lease TTL: its running attempt becomes `lost` (no retry rule names `lost`), and when
/// the link is back the worker is told so, stops and removes that container (it never
/// runs beside another), reconciles and takes work again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netns_worker_cut_off_past_its_lease_loses_the_attempt_and_carries_on() {
    bounded(netns_worker_cut_off_past_its_lease_loses_the_attempt_and_carries_on_case()).await;
}

async fn netns_worker_cut_off_past_its_lease_loses_the_attempt_and_carries_on_case() {
    let mut c = Cluster::start();
    let load = start_load(&c.front);
    progress(&c.front, 0, 5, "warm-up").await;

    // A long run on w1.
    let mut victim = None;
    for _ in 0..10 {
        let id = c
            .front
            .submit("sleep", json!({"seconds": "25"}), Duration::from_secs(30))
            .await
            .expect("accepted");
        let deadline = Instant::now() + Duration::from_secs(30);
        let run = loop {
            let run = c.front.run(&id).await.expect("run");
            if run["status"] == "running" && !worker_of(&run).is_empty() {
                break run;
            }
            assert!(Instant::now() < deadline, "not running: {run}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        if worker_of(&run) == c.w1.id {
            victim = Some(id);
            break;
        }
    }
    let victim = victim.expect("none of 10 long runs went to w1");
    let api = api(&c.a.host_url);
    api.wait_log_contains(&victim, "sleeping 25", Duration::from_secs(30))
        .await;

    c.net.link("w1", false);
    let cut_at = Instant::now();
    let lost = api
        .wait_until(&victim, Duration::from_secs(60), "lost", |r| {
            r["status"] != "running"
        })
        .await;
    assert_eq!(lost["status"], "lost", "{lost}");
    let lost_after = cut_at.elapsed();
    // The worker cannot have reported anything: its container still runs.
    let filter = format!("label=tasuki.run-id={victim}");
    let running = Command::new(crate::common::docker_cli())
        .args(["ps", "-q", "--filter", &filter])
        .output()
        .expect("docker ps");
    assert!(
        !running.stdout.is_empty(),
        "the cut-off worker's container ended while it was cut off"
    );
    // Held cut off for two lease TTLs in all, so its session expires too.
    let hold = Duration::from_secs(6);
    if let Some(rest) = hold.checked_sub(cut_at.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    c.net.link("w1", true);
    let back_at = Instant::now();
    eprintln!(
        "[netns] w1 cut off for {:.2?}; victim lost after {lost_after:.2?}",
        back_at - cut_at
    );

    // Back: w1 learns the attempt is over and removes its container.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = Command::new(crate::common::docker_cli())
            .args(["ps", "-aq", "--filter", &filter])
            .output()
            .expect("docker ps");
        if out.stdout.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "w1 did not remove the lost attempt's container in 60 s:\n{}",
            c.w1.process.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "[netns] the lost attempt's container removed {:.2?} after the link came back",
        back_at.elapsed()
    );
    // ... and carries on: a run accepted after its return runs on w1.
    let since = c.front.accepted().len();
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut seen = 0;
    'carry: loop {
        let accepted = c.front.accepted();
        for (id, _, _) in &accepted[since + seen..] {
            let Some(run) = c.front.run(id).await else {
                break;
            };
            if matches!(run["status"].as_str(), Some("queued" | "running")) {
                break;
            }
            if worker_of(&run) == c.w1.id {
                break 'carry;
            }
            seen += 1;
        }
        assert!(
            Instant::now() < deadline,
            "w1 ran nothing in 90 s after it came back:\n{}",
            c.w1.process.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "[netns] w1 ran a new run {:.2?} after the link came back",
        back_at.elapsed()
    );
    assert!(
        c.w1.process.exited().is_none(),
        "w1 exited:\n{}",
        c.w1.process.log_text()
    );
    stop_load(load).await;
    let gap = c.front.report("worker cut off");
    let w1 = c.w1.id.clone();
    let finals = settle(&c.front, &mut c.inv, &api, &|run| worker_of(run) == w1).await;
    let lost: Vec<&Value> = finals.iter().filter(|r| r["status"] == "lost").collect();
    eprintln!("[netns] {} lost run(s), all on w1", lost.len());
    let victim_final = api.run(&victim).await;
    assert_eq!(victim_final["status"], "lost", "{victim_final}");
    assert_eq!(attempts_of(&victim_final).len(), 1, "{victim_final}");
    assert!(gap < GAP_BOUND, "the API did not answer for {gap:?}");
}

// c ---------------------------------------------------------------------------------

/// `pg_ctl restart -m fast` under load: requests fail (503) for a moment, then the API
/// answers again; every accepted run finishes with its job's outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netns_postgres_restart_under_load_loses_nothing() {
    bounded(netns_postgres_restart_under_load_loses_nothing_case()).await;
}

async fn netns_postgres_restart_under_load_loses_nothing_case() {
    let mut c = Cluster::start();
    let load = start_load(&c.front);
    progress(&c.front, 0, 8, "warm-up").await;
    let before = c.front.accepted().len();
    let restart_at = Instant::now();
    c.pg.restart().await;
    eprintln!("[netns] pg_ctl restart took {:.2?}", restart_at.elapsed());
    // Each replica answers again.
    let probe = c.front.accepted()[0].0.clone();
    for r in [&c.a, &c.b] {
        let client = api(&r.host_url);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let answer = tokio::time::timeout(
                Duration::from_secs(5),
                client.get(&format!("/v1/runs/{probe}")),
            )
            .await;
            if let Ok((200, _)) = answer {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} does not answer 30 s after the restart: {answer:?}",
                r.name
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!(
            "[netns] {} answers {:.2?} after the restart began",
            r.name,
            restart_at.elapsed()
        );
    }
    progress(&c.front, before, 20, "after the restart").await;
    eprintln!(
        "[netns] 20 runs accepted {:.2?} after the restart began",
        restart_at.elapsed()
    );
    drained(&c.front, "after the restart").await;
    stop_load(load).await;
    let gap = c.front.report("PostgreSQL restarted");
    let api = api(&c.a.host_url);
    settle(&c.front, &mut c.inv, &api, &|_| false).await;
    for r in [&mut c.a, &mut c.b] {
        assert!(
            r.process.exited().is_none(),
            "{} exited:\n{}",
            r.name,
            r.process.log_text()
        );
    }
    assert!(c.w1.process.exited().is_none() && c.w2.process.exited().is_none());
    assert!(gap < GAP_BOUND, "the API did not answer for {gap:?}");
}
