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
