//! The store suite on PostgreSQL, and what is PostgreSQL's own: the schema check,
//! corrupt rows, and writes from two stores (two replicas) on one database at once.

use chrono::Utc;
use futures::future::join_all;

use super::*;
use crate::domain::ports::{ClaimResult, Leases, Outbox, RunMessage, RunRecords};
use crate::store::suite;

suite::store_suite!(testdb::open);

/// A database a newer build migrated is refused at open, untouched; one at this build's
/// own version opens again.
#[tokio::test]
async fn a_schema_newer_than_this_build_is_refused_at_open() {
    let (store, db) = testdb::open().await;
    let known = known_schema();
    assert!(known >= 1);
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES ($1, 'from a newer build', TRUE, '\\x00', 0)",
    )
    .bind(known + 1)
    .execute(store.pool())
    .await
    .unwrap();
    match PgStore::open(&db.url, 2).await {
        Err(e @ StoreError::SchemaTooNew { .. }) => {
            let text = e.to_string();
            assert!(
                text.contains(&format!("version {}", known + 1))
                    && text.contains(&format!("up to {known}")),
                "{text}"
            );
        }
        Err(other) => panic!("refused for another reason: {other}"),
        Ok(_) => panic!("a newer schema was opened"),
    }
    sqlx::query("DELETE FROM _sqlx_migrations WHERE version = $1")
        .bind(known + 1)
        .execute(store.pool())
        .await
        .unwrap();
    PgStore::open(&db.url, 2).await.unwrap();
}

/// A row the store could never have written is corrupt data (500), never
/// `Unavailable` (503, which clients and workers retry forever).
#[tokio::test]
async fn a_row_that_does_not_decode_is_corrupt_not_unavailable() {
    let (store, _db) = testdb::open().await;
    let run = suite::new_run();
    store.insert_run(&run, None).await.unwrap();
    sqlx::query("UPDATE runs SET status = 'exploded' WHERE id = $1")
        .bind(run.id.to_string())
        .execute(store.pool())
        .await
        .unwrap();
    assert!(matches!(
        store.get_run(run.id).await,
        Err(StoreError::Corrupt(_))
    ));
    assert!(matches!(
        store.cancel(run.id, Utc::now()).await,
        Err(StoreError::Corrupt(_))
    ));
}

/// Eight replicas claim the same attempt at the same moment: serializable
/// transactions, run again on conflict, hand it to exactly one of them.
#[tokio::test]
async fn one_claim_wins_among_replicas_racing_for_an_attempt() {
    let (first, db) = testdb::open().await;
    let mut replicas = vec![first];
    for _ in 0..7 {
        replicas.push(PgStore::open(&db.url, 2).await.unwrap());
    }
    for _ in 0..5 {
        let run = suite::new_run();
        replicas[0].insert_run(&run, None).await.unwrap();
        let message = RunMessage {
            run_id: run.id,
            attempt: 1,
        };
        let now = Utc::now();
        // A worker each (a worker's own repeated claim is answered as claimed again).
        let workers: Vec<String> = (0..replicas.len()).map(|i| format!("w{i}")).collect();
        let claims = join_all(
            replicas
                .iter()
                .zip(&workers)
                .map(|(r, w)| r.claim(message, w, Duration::from_secs(30), now)),
        )
        .await;
        let won = claims
            .iter()
            .filter(|c| matches!(c, Ok(ClaimResult::Claimed(_))))
            .count();
        assert_eq!(won, 1, "{claims:?}");
        assert!(
            claims.iter().all(|c| matches!(
                c,
                Ok(ClaimResult::Claimed(_) | ClaimResult::NotClaimable { .. })
            )),
            "{claims:?}"
        );
    }
    // The outbox rows were written once each.
    let pending = replicas[0].pending_outbox(100, Utc::now()).await.unwrap();
    assert_eq!(pending.len(), 5);
}

/// A duty is one replica's until its lease expires or it gives it up.
#[tokio::test]
async fn a_duty_is_held_by_one_replica_until_it_expires_or_is_given_up() {
    use crate::domain::store::Duties;
    let (a, db) = testdb::open().await;
    let b = PgStore::open(&db.url, 2).await.unwrap();
    let ttl = Duration::from_secs(10);
    let t0 = Utc::now();
    let held = join_all([
        a.hold_duty("scheduler", "a", ttl, t0),
        b.hold_duty("scheduler", "b", ttl, t0),
    ])
    .await;
    let held: Vec<bool> = held.into_iter().map(Result::unwrap).collect();
    assert_eq!(held.iter().filter(|h| **h).count(), 1, "{held:?}");
    let (owner, other, other_name) = if held[0] {
        (&a, &b, "b")
    } else {
        (&b, &a, "a")
    };
    let owner_name = if held[0] { "a" } else { "b" };
    let later = t0 + chrono::Duration::seconds(5);
    assert!(
        owner
            .hold_duty("scheduler", owner_name, ttl, later)
            .await
            .unwrap(),
        "renewed"
    );
    assert!(
        !other
            .hold_duty("scheduler", other_name, ttl, later)
            .await
            .unwrap()
    );
    assert!(
        other
            .hold_duty("retention", other_name, ttl, later)
            .await
            .unwrap(),
        "another duty"
    );
    // Renewed at +5 s for 10 s: still the owner's at +14 s, free at +15 s.
    let at = |s| t0 + chrono::Duration::seconds(s);
    assert!(
        !other
            .hold_duty("scheduler", other_name, ttl, at(14))
            .await
            .unwrap()
    );
    assert!(
        other
            .hold_duty("scheduler", other_name, ttl, at(15))
            .await
            .unwrap(),
        "expired"
    );
    assert!(
        !owner
            .hold_duty("scheduler", owner_name, ttl, at(16))
            .await
            .unwrap()
    );
    other.release_duty("scheduler", owner_name).await.unwrap();
    assert!(
        !owner
            .hold_duty("scheduler", owner_name, ttl, at(16))
            .await
            .unwrap(),
        "not the holder's to give"
    );
    other.release_duty("scheduler", other_name).await.unwrap();
    assert!(
        owner
            .hold_duty("scheduler", owner_name, ttl, at(16))
            .await
            .unwrap(),
        "given up"
    );
}

/// Two relays claiming the outbox at once get disjoint batches that cover it; a claim
/// runs out after its hold, and a failed publish is free again at once.
#[tokio::test]
async fn relays_on_two_replicas_never_take_the_same_publish() {
    let (a, db) = testdb::open().await;
    let b = PgStore::open(&db.url, 2).await.unwrap();
    for _ in 0..40 {
        a.insert_run(&suite::new_run(), None).await.unwrap();
    }
    let hold = Duration::from_secs(60);
    let now = Utc::now();
    let mut taken = Vec::new();
    for _ in 0..4 {
        let (x, y) = tokio::join!(
            a.claim_outbox(0, 7, now, hold),
            b.claim_outbox(0, 7, now, hold)
        );
        let (x, y) = (x.unwrap(), y.unwrap());
        assert!(x.windows(2).all(|w| w[0].id < w[1].id), "in id order");
        taken.extend(x.into_iter().chain(y).map(|e| e.id));
    }
    let rest = a.claim_outbox(0, 100, now, hold).await.unwrap();
    taken.extend(rest.iter().map(|e| e.id));
    let mut unique = taken.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), taken.len(), "a publish was taken twice");
    assert_eq!(unique.len(), 40);
    assert!(
        b.claim_outbox(0, 100, now, hold).await.unwrap().is_empty(),
        "all held"
    );
    // Still pending for the health report.
    assert_eq!(a.outbox_backlog(now).await.unwrap().pending, 40);
    a.mark_outbox_failed(unique[0], "broker down")
        .await
        .unwrap();
    let again = b.claim_outbox(0, 100, now, hold).await.unwrap();
    assert_eq!(
        again.iter().map(|e| e.id).collect::<Vec<_>>(),
        vec![unique[0]]
    );
    let after_hold = now + chrono::Duration::seconds(61);
    assert_eq!(
        b.claim_outbox(0, 100, after_hold, hold)
            .await
            .unwrap()
            .len(),
        40
    );
    a.mark_outbox_sent(&unique, after_hold).await.unwrap();
    let much_later = after_hold + chrono::Duration::seconds(600);
    assert!(
        a.claim_outbox(0, 100, much_later, hold)
            .await
            .unwrap()
            .is_empty()
    );
}

/// Callback deliveries and replies: each claimed by one relay, due again once the hold
/// is over, and at once for nobody while it lasts.
#[tokio::test]
async fn callbacks_and_replies_due_go_to_one_relay_each() {
    use crate::domain::callback::Callbacks;
    use crate::domain::store::Replies;
    let (a, db) = testdb::open().await;
    let b = PgStore::open(&db.url, 2).await.unwrap();
    let run = suite::new_run();
    a.insert_run(&run, None).await.unwrap();
    let now = Utc::now();
    for i in 0..10 {
        sqlx::query(
            "INSERT INTO callback_deliveries (run_id, url, event, event_id, created_at, next_try_at) \
             VALUES ($1, 'https://example.invalid/hook', 'run.finished', $2, $3, $3)",
        )
        .bind(run.id.to_string())
        .bind(format!("evt_{i}"))
        .bind(now.timestamp_millis())
        .execute(a.pool())
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO run_replies (run_id, kind, reply_to, state, created_at) \
             VALUES ($1, 'finished', 'replies', 'pending', $2)",
        )
        .bind(run.id.to_string())
        .bind(now.timestamp_millis())
        .execute(a.pool())
        .await
        .unwrap();
    }
    let hold = Duration::from_secs(120);
    let (x, y) = tokio::join!(
        a.claim_callbacks(now, 6, hold),
        b.claim_callbacks(now, 6, hold)
    );
    let mut ids: Vec<i64> = x.unwrap().iter().chain(&y.unwrap()).map(|d| d.id).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 10, "every delivery once");
    assert!(a.claim_callbacks(now, 100, hold).await.unwrap().is_empty());
    assert!(
        a.due_callbacks(now, 100).await.unwrap().is_empty(),
        "not due while held"
    );
    let over = now + chrono::Duration::seconds(121);
    assert_eq!(b.claim_callbacks(over, 100, hold).await.unwrap().len(), 10);

    let (x, y) = tokio::join!(a.claim_replies(6, now, hold), b.claim_replies(6, now, hold));
    let mut ids: Vec<i64> = x.unwrap().iter().chain(&y.unwrap()).map(|r| r.id).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 10, "every reply once");
    assert!(b.claim_replies(100, now, hold).await.unwrap().is_empty());
    a.reply_sent(ids[0], now).await.unwrap();
    assert_eq!(
        a.claim_replies(100, over, hold).await.unwrap().len(),
        9,
        "a sent reply is done"
    );
}
