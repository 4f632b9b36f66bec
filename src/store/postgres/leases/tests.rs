use super::*;
use crate::store::postgres::testdb;

const TTL: Duration = Duration::from_secs(30);

/// A queued run that was never claimed, written straight into the table (the
/// runs part has its own tests).
pub(in crate::store::postgres) async fn queued_run(store: &PgStore) -> RunId {
    let id = RunId::new();
    let spec = crate::protocol::SpecV1::from(&crate::store::suite::new_run().spec);
    sqlx::query(
        "INSERT INTO runs (id, job, params, spec, status, created_at) \
         VALUES ($1, 'hello', '{}', $2, 'queued', $3)",
    )
    .bind(id.to_string())
    .bind(serde_json::to_string(&spec).unwrap())
    .bind(ms(Utc::now()))
    .execute(store.pool())
    .await
    .unwrap();
    id
}

pub(in crate::store::postgres) async fn claimed(store: &PgStore, id: RunId, w: &str) -> Lease {
    let message = RunMessage {
        run_id: id,
        attempt: 1,
    };
    match store.claim(message, w, TTL, Utc::now()).await.unwrap() {
        ClaimResult::Claimed(c) => c.lease,
        other => panic!("claim refused: {other:?}"),
    }
}

async fn dropped(store: &PgStore, lease: Lease) -> (i64, i64, i64) {
    let row = sqlx::query(
        "SELECT a.log_dropped_bytes AS attempt, a.log_undelivered_bytes AS undelivered, \
         r.log_dropped_bytes AS run FROM attempts a JOIN runs r ON r.id = a.run_id \
         WHERE a.run_id = $1 AND a.attempt = $2",
    )
    .bind(lease.run_id.to_string())
    .bind(i64::from(lease.attempt))
    .fetch_one(store.pool())
    .await
    .unwrap();
    let get = |name| col::<i64>(&row, name).unwrap();
    (get("attempt"), get("undelivered"), get("run"))
}

#[tokio::test]
async fn two_replicas_claiming_one_attempt_give_it_to_one_worker() {
    let (store, db) = testdb::open().await;
    let other = PgStore::open(&db.url, 4).await.unwrap();
    let id = queued_run(&store).await;
    let message = RunMessage {
        run_id: id,
        attempt: 1,
    };
    let now = Utc::now();
    let (a, b) = tokio::join!(
        store.claim(message, "w1", TTL, now),
        other.claim(message, "w2", TTL, now)
    );
    let results = [a.unwrap(), b.unwrap()];
    let claimed = results
        .iter()
        .filter(|r| matches!(r, ClaimResult::Claimed(c) if c.lease.epoch == 1))
        .count();
    assert_eq!(claimed, 1, "{results:?}");
    assert!(results.iter().any(|r| matches!(
        r,
        ClaimResult::NotClaimable {
            status: crate::domain::run::RunStatus::Running,
            attempt: 1
        }
    )));
}

#[tokio::test]
async fn leases_are_renewed_in_one_write_and_answered_in_order() {
    let (store, _db) = testdb::open().await;
    let a = claimed(&store, queued_run(&store).await, "w1").await;
    let b = claimed(&store, queued_run(&store).await, "w1").await;
    let now = Utc::now();
    let started = store.mark_started(a, "c1", TTL, now).await.unwrap();
    assert_eq!(started, LeaseStatus::Held { cancel: false });
    let stale = Lease { epoch: 7, ..b };
    let later = now + chrono::Duration::seconds(10);
    let answers = store.renew_leases(&[a, stale, b], TTL, later).await;
    let held = LeaseStatus::Held { cancel: false };
    assert_eq!(answers.unwrap(), [held, LeaseStatus::Lost, held]);
    let expires: i64 =
        sqlx::query_scalar("SELECT lease_expires_at FROM attempts WHERE run_id = $1")
            .bind(a.run_id.to_string())
            .fetch_one(store.pool())
            .await
            .unwrap();
    assert_eq!(expires, ms(later) + ttl_ms(TTL));
    assert!(store.lease_is_current(a).await.unwrap());
    assert!(!store.lease_is_current(stale).await.unwrap());
    let again = store.mark_started(stale, "c2", TTL, now).await.unwrap();
    assert_eq!(again, LeaseStatus::Lost);
    // Started: it cannot be given back; a stale lease cannot give back anything.
    assert_eq!(store.release(a, now).await.unwrap(), LeaseStatus::Lost);
    assert_eq!(store.release(stale, now).await.unwrap(), LeaseStatus::Lost);
}

#[tokio::test]
async fn output_is_counted_only_under_the_attempts_epoch_and_undelivered_only_rises() {
    let (store, _db) = testdb::open().await;
    let lease = claimed(&store, queued_run(&store).await, "w1").await;
    let stale = Lease { epoch: 9, ..lease };
    store.add_log_dropped(lease, 7).await.unwrap();
    store.add_log_dropped(stale, 100).await.unwrap();
    assert_eq!(dropped(&store, lease).await, (7, 0, 7));
    store.record_undelivered(lease, 10).await.unwrap();
    store.record_undelivered(lease, 5).await.unwrap();
    store.record_undelivered(stale, 50).await.unwrap();
    assert_eq!(dropped(&store, lease).await, (17, 10, 17));
    store.record_undelivered(lease, 15).await.unwrap();
    assert_eq!(dropped(&store, lease).await, (22, 15, 22));
}

#[tokio::test]
async fn replicas_expiring_together_end_an_attempt_once() {
    let (store, db) = testdb::open().await;
    let other = PgStore::open(&db.url, 4).await.unwrap();
    let lease = claimed(&store, queued_run(&store).await, "w1").await;
    // The run moved on (as after a person's retry): only the attempt ends, so no
    // other part of the store is needed here.
    sqlx::query("UPDATE runs SET status = 'queued' WHERE id = $1")
        .bind(lease.run_id.to_string())
        .execute(store.pool())
        .await
        .unwrap();
    let later = Utc::now() + chrono::Duration::hours(1);
    assert!(store.expire_leases(Utc::now()).await.unwrap().is_empty());
    let (a, b) = tokio::join!(store.expire_leases(later), other.expire_leases(later));
    assert!(a.unwrap().is_empty() && b.unwrap().is_empty());
    let row = sqlx::query("SELECT status, finished_at FROM attempts WHERE run_id = $1")
        .bind(lease.run_id.to_string())
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(col::<String>(&row, "status").unwrap(), "lost");
    assert_eq!(
        col::<Option<i64>>(&row, "finished_at").unwrap(),
        Some(ms(later))
    );
    assert!(
        !store
            .lease_is_current(Lease { epoch: 2, ..lease })
            .await
            .unwrap()
    );
    assert!(store.lease_is_current(lease).await.unwrap());
    let renewed = store.renew_leases(&[lease], TTL, later).await.unwrap();
    assert_eq!(renewed, [LeaseStatus::Lost]);
}
