//! `tasuki store copy`: an installation moved from SQLite to PostgreSQL. A real `serve`
//! on SQLite runs jobs and is stopped; its store is copied into a database of the test's
//! own; `serve` on that database then answers for the same runs and logs, and numbers
//! new runs on.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::{Api, BIN, ServeOptions, Server, attempts_of};
use crate::postgres::{Database, pg_server};

fn store_copy(from: &str, to: &str) -> Output {
    let mut command = Command::new(BIN);
    command.args(["store", "copy", "--from", from, "--to", to]);
    for key in [
        "TASUKI_COPY_FROM_LOGS",
        "TASUKI_COPY_TO_LOGS",
        "TASUKI_COPY_BATCH",
    ] {
        command.env_remove(key);
    }
    command.output().expect("run tasuki store copy")
}

/// Each run as the API shows it, and every attempt's log.
async fn snapshot(api: &Api, ids: &[String]) -> Vec<(Value, Vec<Vec<u8>>)> {
    let mut out = Vec::new();
    for id in ids {
        let run = api.run(id).await;
        let mut logs = Vec::new();
        for attempt in attempts_of(&run) {
            let n = attempt["attempt"].as_u64().unwrap_or_default();
            let (status, bytes) = api.attempt_log(id, Some(n)).await;
            assert_eq!(status, 200, "log of {id}/{n}");
            logs.push(bytes);
        }
        out.push((run, logs));
    }
    out
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn store_copy_moves_a_sqlite_installation_to_postgresql_with_its_runs_and_logs() {
    let d = tempfile::tempdir().unwrap();
    let mut server = Server::start(d.path(), ServeOptions::default());
    let api = server.client();
    let failed = api.run_and_wait("exit", json!({"code": 3})).await;
    assert_eq!(failed["status"], "failed");
    // Fails once (exit 1, retried after 1 s), then succeeds: two attempts, two logs.
    let retried = api.run_and_wait("retry", json!({"ok_at": "2"})).await;
    assert_eq!(retried["status"], "succeeded", "{retried}");
    assert_eq!(retried["attempt"], 2);
    let ids: Vec<String> = [&failed, &retried]
        .iter()
        .map(|r| r["id"].as_str().unwrap_or_default().to_owned())
        .collect();
    let before = snapshot(&api, &ids).await;
    assert_eq!(before[0].1, [b"exiting with 3\n".to_vec()]);
    assert_eq!(
        before[1].1,
        [b"attempt 1\n".to_vec(), b"attempt 2\n".to_vec()]
    );
    server.process.signal("TERM");
    server.process.wait_exit(Duration::from_secs(30)).await;

    let db = Database::create().await;
    let sqlite = format!("sqlite://{}", d.path().join("data/tasuki.db").display());
    let copied = store_copy(&sqlite, &db.url);
    let (stdout, stderr) = (text(&copied.stdout), text(&copied.stderr));
    assert!(copied.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("both read back the same"), "{stdout}");
    // The report's count for a table (or the logs): the word after its name.
    let count = |label: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{label} ")))
            .and_then(|rest| rest.split_whitespace().next())
            .map(str::to_owned)
    };
    assert_eq!(count("runs").as_deref(), Some("2"), "{stdout}");
    assert_eq!(count("attempts").as_deref(), Some("3"), "{stdout}");
    assert_eq!(count("attempt logs").as_deref(), Some("3"), "{stdout}");
    // The password is never printed.
    assert!(!stdout.contains(":tasuki_test@"), "{stdout}");

    // Again into the database that now holds them: refused, naming what it holds.
    let again = store_copy(&sqlite, &db.url);
    assert_eq!(again.status.code(), Some(1));
    let refusal = text(&again.stderr);
    assert!(
        refusal.contains("the target already holds 2 run(s)")
            && refusal.contains("nothing was written"),
        "{refusal}"
    );

    // `serve` on PostgreSQL, in a data dir of its own: the same runs and logs.
    let d2 = tempfile::tempdir().unwrap();
    let pg = pg_server(d2.path(), &db, ServeOptions::default());
    let api = pg.client();
    let after = snapshot(&api, &ids).await;
    assert_eq!(after, before);
    let (status, list) = api.get("/v1/runs").await;
    assert_eq!(status, 200, "{list}");
    assert!(
        ids.iter().all(|id| list.to_string().contains(id.as_str())),
        "{list}"
    );
    // A new run gets an outbox row past the copied ones and goes through.
    let next = api.run_and_wait("exit", json!({"code": "0"})).await;
    assert_eq!(next["status"], "succeeded", "{next}");
    assert!(!Path::new(&d2.path().join("data/tasuki.db")).exists());
}
