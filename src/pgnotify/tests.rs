use futures::FutureExt;
use sqlx::postgres::PgPoolOptions;

use super::*;
use crate::store::testdb::TestDb;

fn woke(f: impl std::future::Future<Output = ()>) -> bool {
    f.now_or_never().is_some()
}

fn event(run_id: RunId, kind: RunEventKind) -> RunEvent {
    RunEvent { run_id, kind }
}

#[test]
fn events_go_once_each_in_notifications_that_postgresql_takes() {
    let a = RunId::new();
    let out = payloads(
        "me",
        &[
            event(a, RunEventKind::Log),
            event(a, RunEventKind::Log),
            event(a, RunEventKind::Status),
        ],
        true,
    );
    assert_eq!(out, vec![format!("me\n*\nl {a}\ns {a}")]);
    // Many runs: split, every piece under the limit and naming its sender.
    let many: Vec<RunEvent> = (0..1000)
        .map(|_| event(RunId::new(), RunEventKind::Status))
        .collect();
    let out = payloads("me", &many, false);
    assert!(out.len() > 1);
    assert!(
        out.iter()
            .all(|p| p.len() <= MAX_PAYLOAD && p.starts_with("me\n"))
    );
    let lines: usize = out.iter().map(|p| p.lines().count() - 1).sum();
    assert_eq!(lines, 1000);
    assert!(payloads("me", &[], false).is_empty());
}

#[tokio::test]
async fn a_notification_wakes_its_runs_watchers_unless_it_is_our_own() {
    let events = RunEvents::new();
    let (run, other) = (RunId::new(), RunId::new());
    let mut w = events.watch(run);
    let mut o = events.watch(other);
    deliver(&events, "me", &format!("me\ns {run}"));
    assert!(!woke(w.changed()), "our own notification is skipped");
    deliver(
        &events,
        "me",
        &format!("them\nl {run}\nx {other}\nnonsense\ns not-a-run"),
    );
    assert!(!woke(w.status_changed()), "output is not a status change");
    assert!(woke(w.changed()));
    assert!(!woke(o.changed()), "unknown kinds are skipped");
    deliver(&events, "me", "them\n*");
    assert!(woke(o.status_changed()), "`*` wakes every watcher");
}

async fn pool(db: &TestDb) -> PgPool {
    PgPoolOptions::new()
        .max_connections(3)
        .connect(&db.url)
        .await
        .unwrap()
}

/// Two replicas on one database: what one publishes wakes the other's watcher.
#[tokio::test]
async fn an_event_of_one_replica_wakes_the_watchers_of_another() {
    let db = TestDb::create().await;
    let shutdown = CancellationToken::new();
    let (a, b) = (RunEvents::new(), RunEvents::new());
    let ta = Bridge::new(pool(&db).await, a.clone())
        .start(shutdown.clone())
        .await
        .unwrap();
    let tb = Bridge::new(pool(&db).await, b.clone())
        .start(shutdown.clone())
        .await
        .unwrap();
    let run = RunId::new();
    let mut on_b = b.watch(run);
    let mut all_b = b.subscribe();
    a.publish(run, RunEventKind::Status);
    tokio::time::timeout(Duration::from_secs(10), on_b.status_changed())
        .await
        .expect("replica b's watcher woke for replica a's event");
    let seen = tokio::time::timeout(Duration::from_secs(10), all_b.recv())
        .await
        .expect("the broadcast too")
        .unwrap();
    assert_eq!(seen, event(run, RunEventKind::Status));
    shutdown.cancel();
    ta.await.unwrap();
    tb.await.unwrap();
}

/// A listener whose connection is cut comes back, and wakes every watcher once since
/// it may have missed events meanwhile.
#[tokio::test]
async fn a_lost_listener_reconnects_and_wakes_every_watcher() {
    let db = TestDb::create().await;
    let shutdown = CancellationToken::new();
    let b = RunEvents::new();
    let pool_b = pool(&db).await;
    let task = Bridge::new(pool_b.clone(), b.clone())
        .start(shutdown.clone())
        .await
        .unwrap();
    let mut w = b.watch(RunId::new());
    let killed: i64 = sqlx::query_scalar(
        "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE datname = current_database() AND query ILIKE 'LISTEN%'",
    )
    .fetch_one(&pool_b)
    .await
    .unwrap();
    assert_eq!(killed, 1, "the listener's connection");
    tokio::time::timeout(Duration::from_secs(15), w.changed())
        .await
        .expect("woken after the reconnect");
    // Listening again: another replica's event arrives.
    let a = RunEvents::new();
    let ta = Bridge::new(pool(&db).await, a.clone())
        .start(shutdown.clone())
        .await
        .unwrap();
    let run = RunId::new();
    let mut on_b = b.watch(run);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    // The new listening session may start just after a's first notification: publish
    // until b sees one (each publish is a real notification, none is faked).
    loop {
        a.publish(run, RunEventKind::Status);
        if tokio::time::timeout(Duration::from_millis(200), on_b.status_changed())
            .await
            .is_ok()
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "b never heard a again"
        );
    }
    shutdown.cancel();
    task.await.unwrap();
    ta.await.unwrap();
}
