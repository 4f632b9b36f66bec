//! `tasuki serve --database-url postgres://…`: runs, logs and waits in PostgreSQL, one
//! replica or several sharing one database. Each test has a database of its own on the
//! server `tests/setup.sh` started (`TASUKI_TEST_POSTGRES`).

use std::path::Path;
use std::time::Duration;

use serde_json::json;
use sqlx::Connection;
use sqlx::postgres::PgConnection;

use crate::common::{
    QueueGuard, ServeOptions, Server, TOKEN, assert_no_containers_left, start_worker_with, unique,
};

fn admin_url() -> String {
    std::env::var("TASUKI_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A database of the test's own, dropped (with its connections) at the end.
pub struct Database {
    name: String,
    pub url: String,
}

impl Database {
    pub async fn create() -> Database {
        let name = unique("tasuki_e2e").replace('-', "_").to_lowercase();
        let admin = admin_url();
        let mut conn = PgConnection::connect(&admin)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL at {admin} (tests/setup.sh): {e}"));
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .unwrap();
        let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
        let url = format!("{base}/{name}");
        Database { name, url }
    }

    pub async fn connect(&self) -> PgConnection {
        PgConnection::connect(&self.url).await.unwrap()
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                if let Ok(mut conn) = PgConnection::connect(&admin_url()).await {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                    )))
                    .execute(&mut conn)
                    .await;
                }
            });
        })
        .join();
    }
}

/// `serve` on the database, with more options.
pub fn pg_server(dir: &Path, db: &Database, mut options: ServeOptions) -> Server {
    options
        .extra_args
        .extend(["--database-url".to_owned(), db.url.clone()]);
    Server::start(dir, options)
}

#[tokio::test]
async fn serve_keeps_runs_and_logs_in_postgresql_across_a_restart() {
    let d = tempfile::tempdir().unwrap();
    let db = Database::create().await;
    let mut server = pg_server(d.path(), &db, ServeOptions::default());
    let api = server.client();
    let failed = api.run_and_wait("exit", json!({"code": 3})).await;
    assert_eq!(failed["status"], "failed");
    assert_eq!(failed["exit_code"], 3);
    let id = failed["id"].as_str().unwrap().to_owned();
    assert_eq!(api.logs(&id).await, b"exiting with 3\n");
    let both = api.run_and_wait("echo-both", json!({})).await;
    let both_id = both["id"].as_str().unwrap().to_owned();
    // Nothing of the run is in the data dir: no SQLite file, no log files.
    let data = d.path().join("data");
    assert!(!data.join("tasuki.db").exists());
    assert!(!data.join("logs").exists());

    server.process.signal("TERM");
    server.process.wait_exit(Duration::from_secs(30)).await;
    std::fs::remove_dir_all(&data).ok();
    server.restart(d.path());
    let api = server.client();
    let again = api.run(&id).await;
    assert_eq!(again["status"], "failed");
    assert_eq!(again["exit_code"], 3);
    assert_eq!(api.logs(&id).await, b"exiting with 3\n");
    assert_eq!(api.logs(&both_id).await, b"out-1\nerr-1\nout-2\nerr-2\n");
    let runs: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM runs")
        .fetch_one(&mut db.connect().await)
        .await
        .unwrap();
    assert_eq!(runs, 2);
    assert_no_containers_left(&server.process.worker_id).await;
}

#[tokio::test]
async fn serve_refuses_a_postgresql_store_that_a_newer_build_migrated() {
    let d = tempfile::tempdir().unwrap();
    let db = Database::create().await;
    let mut server = pg_server(d.path(), &db, ServeOptions::default());
    let run = server
        .client()
        .run_and_wait("exit", json!({"code": "0"}))
        .await;
    server.process.signal("TERM");
    server.process.wait_exit(Duration::from_secs(30)).await;
    let mut conn = db.connect().await;
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (9999, 'from a newer build', TRUE, '\\x00', 0)",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let mut refused = server.spawn_again(d.path());
    let status = refused.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(1), "{}", refused.log_text());
    let log = refused.log_text();
    assert!(
        log.contains("opening the run store postgres://")
            && log.contains("schema is at version 9999")
            && !log.contains("tasuki_test:tasuki_test@"),
        "{log}"
    );
    sqlx::query("DELETE FROM _sqlx_migrations WHERE version = 9999")
        .execute(&mut conn)
        .await
        .unwrap();
    server.restart(d.path());
    let again = server.client().run(run["id"].as_str().unwrap()).await;
    assert_eq!(again["status"], "succeeded");
}

/// Two replicas on one database and one queue, and a worker that reports to the first
/// only: a `?wait` and a log read on the second see the run the worker ran, and both
/// list what either accepted.
#[tokio::test]
async fn replicas_share_runs_logs_and_waits() {
    let d = tempfile::tempdir().unwrap();
    let db = Database::create().await;
    let queue = unique("tasuki-test");
    let _guard = QueueGuard(queue.clone());
    let options = || ServeOptions {
        amqp_queue: Some(queue.clone()),
        worker_token: Some(TOKEN.to_owned()),
        ..ServeOptions::default()
    };
    let (da, db_dir) = (d.path().join("a"), d.path().join("b"));
    std::fs::create_dir_all(&da).unwrap();
    std::fs::create_dir_all(&db_dir).unwrap();
    let a = pg_server(&da, &db, options());
    let b = pg_server(&db_dir, &db, options());
    let worker = start_worker_with(
        d.path(),
        &a,
        &queue,
        TOKEN,
        crate::common::WorkerSpec::default(),
    );
    let (api_a, api_b) = (a.client(), b.client());

    // Accepted and waited for on b; claimed, reported and finished through a.
    let run = api_b.run_and_wait("sleep", json!({"seconds": "1"})).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let id = run["id"].as_str().unwrap().to_owned();
    assert_eq!(api_b.logs(&id).await, b"sleeping 1\nwoke\n");
    assert_eq!(api_a.logs(&id).await, b"sleeping 1\nwoke\n");

    // A run accepted on a, followed on b while its output comes.
    let drip = api_a
        .accept("drip", json!({"chunks": "20", "pause": "0.1"}))
        .await;
    let done = api_b.wait_final(&drip, Duration::from_secs(60)).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(api_b.logs(&drip).await, vec![0xff; 20_000]);

    let (_, listed) = api_a.get("/v1/runs?limit=10").await;
    let ids: Vec<&str> = listed["runs"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["id"].as_str())
        .collect();
    assert!(
        ids.contains(&id.as_str()) && ids.contains(&drip.as_str()),
        "{listed}"
    );
    assert_no_containers_left(&worker.worker_id).await;
}

/// Two replicas share the background duties: each callback is sent once although both
/// run a callback relay, the scheduler, reaper and retention are each one replica's,
/// and when that replica is killed the other takes its duties over.
#[tokio::test]
async fn replicas_do_each_duty_once_and_take_over_a_dead_ones() {
    let d = tempfile::tempdir().unwrap();
    let db = Database::create().await;
    let queue = unique("tasuki-test");
    let _guard = QueueGuard(queue.clone());
    let (rx, port) = crate::callbacks::receiver(&[]).await;
    let options = || ServeOptions {
        amqp_queue: Some(queue.clone()),
        worker_token: Some(TOKEN.to_owned()),
        // The reaper starts one lease TTL after start-up.
        lease_ttl: Some("4s".to_owned()),
        env: vec![
            (
                "TASUKI_CALLBACK_SECRETS".to_owned(),
                "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".to_owned(),
            ),
            (
                "TASUKI_CALLBACK_ALLOW".to_owned(),
                "127.0.0.1/32".to_owned(),
            ),
        ],
        ..ServeOptions::default()
    };
    let (da, db_dir) = (d.path().join("a"), d.path().join("b"));
    std::fs::create_dir_all(&da).unwrap();
    std::fs::create_dir_all(&db_dir).unwrap();
    let mut a = pg_server(&da, &db, options());
    let mut b = pg_server(&db_dir, &db, options());
    let worker = start_worker_with(
        d.path(),
        &a,
        &queue,
        TOKEN,
        crate::common::WorkerSpec {
            servers: Some(vec![a.url.clone(), b.url.clone()]),
            concurrency: 4,
            ..crate::common::WorkerSpec::default()
        },
    );
    let body = |code: usize| {
        json!({
            "params": {"code": code.to_string()},
            "callback": {"url": format!("http://127.0.0.1:{port}/hook"), "events": ["finished"]},
        })
        .to_string()
    };
    let mut ids = Vec::new();
    for i in 0..12 {
        let api = if i % 2 == 0 { a.client() } else { b.client() };
        let answer = api.post_run("exit", &body(i % 3), "").await;
        assert_eq!(answer.status, 202, "{}", answer.body);
        ids.push(answer.body["id"].as_str().unwrap().to_owned());
    }
    for id in &ids {
        a.client().wait_final(id, Duration::from_secs(60)).await;
    }
    rx_wait(&rx, 12).await;
    // One more after those: by the time its delivery is in, any second delivery of an
    // earlier event from the other replica's relay would have come too.
    let last = a.client().post_run("exit", &body(0), "").await;
    let last = last.body["id"].as_str().unwrap().to_owned();
    a.client().wait_final(&last, Duration::from_secs(60)).await;
    let got = rx_wait(&rx, 13).await;
    let mut event_ids: Vec<String> = got.iter().map(|d| d.id.clone()).collect();
    event_ids.sort();
    event_ids.dedup();
    assert_eq!(
        (got.len(), event_ids.len()),
        (13, 13),
        "each event once: {got:?}"
    );

    // Each duty has one holder, one of the two replicas.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let holders = loop {
        let holders = duty_holders(&db).await;
        if holders.len() == 3 {
            break holders;
        }
        assert!(std::time::Instant::now() < deadline, "{holders:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let names: Vec<&str> = holders.iter().map(|(d, _)| d.as_str()).collect();
    assert_eq!(
        names,
        ["lease-reaper", "retention", "scheduler"],
        "{holders:?}"
    );
    let pid_of = |holder: &str| -> u32 { holder.split('/').nth(1).unwrap().parse().unwrap() };
    let (pa, pb) = (a.process.pid(), b.process.pid());
    assert!(
        holders.iter().all(|(_, h)| [pa, pb].contains(&pid_of(h))),
        "{holders:?}"
    );

    // Kill the scheduler's holder: the other replica has every duty within the lease
    // time (10 s for the scheduler and, at the default lease TTL, the reaper).
    let scheduler_pid = pid_of(&holders.iter().find(|(d, _)| d == "scheduler").unwrap().1);
    let (dead, alive) = if scheduler_pid == pa {
        (&mut a, &b)
    } else {
        (&mut b, &a)
    };
    dead.process.kill9();
    let survivor = alive.process.pid();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let holders = duty_holders(&db).await;
        if holders
            .iter()
            .filter(|(d, _)| d != "retention")
            .all(|(_, h)| pid_of(h) == survivor)
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not taken over: {holders:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // And runs still flow through the survivor (the worker fails over to it).
    let run = alive
        .client()
        .run_and_wait("exit", json!({"code": "0"}))
        .await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_no_containers_left(&worker.worker_id).await;
}

async fn rx_wait(rx: &crate::callbacks::Receiver, n: usize) -> Vec<crate::callbacks::Delivery> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let got = rx.got.lock().unwrap().clone();
        if got.len() >= n {
            return got;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} deliveries, wanted {n}",
            got.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn duty_holders(db: &Database) -> Vec<(String, String)> {
    sqlx::query_as("SELECT duty, holder FROM duty_leases ORDER BY duty")
        .fetch_all(&mut db.connect().await)
        .await
        .unwrap()
}
