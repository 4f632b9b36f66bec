//! Group commit: what sharing a transaction may and may not change for one operation.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::super::SqliteStore;
use crate::domain::ports::StoreError;

async fn open() -> (SqliteStore, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path()).await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE t (x INTEGER PRIMARY KEY); \
         CREATE TABLE child (p INTEGER REFERENCES t (x) DEFERRABLE INITIALLY DEFERRED);",
    )
    .execute(store.writer())
    .await
    .unwrap();
    (store, dir)
}

/// One write operation: insert `x` into `t`, commit unless told to fail.
async fn put(store: &SqliteStore, x: i64, fail: bool) -> Result<(), StoreError> {
    let mut tx = store.begin_write().await?;
    sqlx::query("INSERT INTO t (x) VALUES (?)")
        .bind(x)
        .execute(&mut *tx)
        .await
        .map_err(super::db)?;
    if fail {
        return Err(StoreError::Unavailable("this operation gives up".into()));
    }
    tx.commit().await
}

async fn stored(store: &SqliteStore) -> Vec<i64> {
    sqlx::query_scalar("SELECT x FROM t ORDER BY x")
        .fetch_all(&store.reader)
        .await
        .unwrap()
}

/// Hold the connection with a first operation until `n` more have asked for a turn, so
/// they all land in its group.
async fn queued_behind_first(store: &SqliteStore, n: u64) {
    let asked = || store.group().counts().asked.load(Ordering::Relaxed);
    tokio::time::timeout(Duration::from_secs(10), async {
        while asked() < n {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("the operations queue");
}

#[tokio::test]
async fn concurrent_operations_share_one_commit() {
    let (store, _dir) = open().await;
    let before = store.group().counts().commits.load(Ordering::Relaxed);
    let asked = store.group().counts().asked.load(Ordering::Relaxed);
    let mut first = store.begin_write().await.unwrap();
    sqlx::query("INSERT INTO t (x) VALUES (0)")
        .execute(&mut *first)
        .await
        .unwrap();
    let others: Vec<_> = (1..=10)
        .map(|x| {
            let store = store.clone();
            tokio::spawn(async move { put(&store, x, false).await })
        })
        .collect();
    queued_behind_first(&store, asked + 11).await;
    first.commit().await.unwrap();
    for other in others {
        other.await.unwrap().unwrap();
    }
    let commits = store.group().counts().commits.load(Ordering::Relaxed) - before;
    assert_eq!(commits, 1, "eleven operations, one commit");
    assert_eq!(stored(&store).await, (0..=10).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_failing_operation_undoes_only_itself() {
    let (store, _dir) = open().await;
    let asked = store.group().counts().asked.load(Ordering::Relaxed);
    let first = store.begin_write().await.unwrap();
    let ops: Vec<_> = [(1, false), (2, true), (3, false)]
        .into_iter()
        .map(|(x, fail)| {
            let store = store.clone();
            tokio::spawn(async move { put(&store, x, fail).await })
        })
        .collect();
    queued_behind_first(&store, asked + 4).await;
    first.commit().await.unwrap();
    let results: Vec<bool> = futures::future::join_all(ops)
        .await
        .into_iter()
        .map(|r| r.unwrap().is_ok())
        .collect();
    assert_eq!(results, [true, false, true]);
    assert_eq!(stored(&store).await, [1, 3]);
}

#[tokio::test]
async fn a_failed_commit_fails_every_operation_in_it() {
    let (store, _dir) = open().await;
    let asked = store.group().counts().asked.load(Ordering::Relaxed);
    let first = store.begin_write().await.unwrap();
    let good = {
        let store = store.clone();
        tokio::spawn(async move { put(&store, 1, false).await })
    };
    // A deferred foreign key: the statement passes, the COMMIT fails.
    let bad = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut tx = store.begin_write().await?;
            sqlx::query("INSERT INTO child (p) VALUES (99)")
                .execute(&mut *tx)
                .await
                .map_err(super::db)?;
            tx.commit().await
        })
    };
    queued_behind_first(&store, asked + 3).await;
    assert!(first.commit().await.is_err());
    assert!(good.await.unwrap().is_err());
    assert!(bad.await.unwrap().is_err());
    assert!(stored(&store).await.is_empty());
    // The next group commits as usual.
    put(&store, 5, false).await.unwrap();
    assert_eq!(stored(&store).await, [5]);
}

#[tokio::test]
async fn operations_see_earlier_ones_in_order_and_readers_see_them_once_durable() {
    let (store, _dir) = open().await;
    let asked = store.group().counts().asked.load(Ordering::Relaxed);
    let first = store.begin_write().await.unwrap();
    let ops: Vec<_> = (1..=5)
        .map(|x| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut tx = store.begin_write().await.unwrap();
                // Each operation of the group sees the ones before it.
                let seen: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM t")
                    .fetch_one(&mut *tx)
                    .await
                    .unwrap();
                sqlx::query("INSERT INTO t (x) VALUES (?)")
                    .bind(x)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                tx.commit().await.unwrap();
                // Durable, so visible to every reader.
                let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM t WHERE x = ?")
                    .bind(x)
                    .fetch_one(&store.reader)
                    .await
                    .unwrap();
                assert_eq!(count, 1);
                seen
            })
        })
        .collect();
    // Queued one by one, so arrival order is known.
    for (i, _) in ops.iter().enumerate() {
        queued_behind_first(&store, asked + 2 + i as u64).await;
    }
    assert!(
        stored(&store).await.is_empty(),
        "nothing visible before the commit"
    );
    first.commit().await.unwrap();
    let mut seen = Vec::new();
    for op in ops {
        seen.push(op.await.unwrap());
    }
    // In arrival order: the n-th sees the n-1 before it.
    assert_eq!(seen, [0, 1, 2, 3, 4]);
}

#[tokio::test]
async fn a_lone_write_commits_at_once() {
    let (store, _dir) = open().await;
    let before = store.group().counts().commits.load(Ordering::Relaxed);
    put(&store, 1, false).await.unwrap();
    put(&store, 2, false).await.unwrap();
    assert_eq!(
        store.group().counts().commits.load(Ordering::Relaxed) - before,
        2
    );
}

#[tokio::test]
async fn a_caller_that_stops_waiting_leaves_the_group_intact() {
    let (store, _dir) = open().await;
    let asked = store.group().counts().asked.load(Ordering::Relaxed);
    let first = store.begin_write().await.unwrap();
    let gone = {
        let store = store.clone();
        tokio::spawn(async move { put(&store, 1, false).await })
    };
    let kept = {
        let store = store.clone();
        tokio::spawn(async move { put(&store, 2, false).await })
    };
    queued_behind_first(&store, asked + 3).await;
    gone.abort();
    first.commit().await.unwrap();
    kept.await.unwrap().unwrap();
    assert_eq!(stored(&store).await, [2]);
}

/// A synchronous operation: insert `x`, fail after the insert when told to.
async fn put_now(store: &SqliteStore, x: i64, fail: bool) -> Result<i64, StoreError> {
    store
        .group()
        .run(move |c| {
            let seen: i64 = c
                .query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0))
                .map_err(super::super::sync::sync_db)?;
            c.execute("INSERT INTO t (x) VALUES (?)", [x])
                .map_err(super::super::sync::sync_db)?;
            if fail {
                return Err(StoreError::Unavailable("this operation gives up".into()));
            }
            Ok(seen)
        })
        .await
}

#[tokio::test]
async fn synchronous_and_lent_operations_share_one_commit_in_arrival_order() {
    let (store, _dir) = open().await;
    let before = store.group().counts().commits.load(Ordering::Relaxed);
    let asked = store.group().counts().asked.load(Ordering::Relaxed);
    let first = store.begin_write().await.unwrap();
    // Queued one by one: synchronous, synchronous, lent, synchronous (failing), synchronous.
    let mut ops = Vec::new();
    for (i, (x, lent, fail)) in [
        (1, false, false),
        (2, false, false),
        (3, true, false),
        (4, false, true),
        (5, false, false),
    ]
    .into_iter()
    .enumerate()
    {
        let s = store.clone();
        ops.push(tokio::spawn(async move {
            if lent {
                put(&s, x, fail).await.map(|()| -1)
            } else {
                put_now(&s, x, fail).await
            }
        }));
        queued_behind_first(&store, asked + 2 + i as u64).await;
    }
    assert!(stored(&store).await.is_empty(), "nothing before the commit");
    first.commit().await.unwrap();
    let mut results = Vec::new();
    for op in ops {
        results.push(op.await.unwrap().ok());
    }
    // Each synchronous one saw the rows kept before it; the failing one undid itself.
    assert_eq!(results, [Some(0), Some(1), Some(-1), None, Some(3)]);
    assert_eq!(stored(&store).await, [1, 2, 3, 5]);
    assert_eq!(
        store.group().counts().commits.load(Ordering::Relaxed) - before,
        1
    );
}

#[tokio::test]
async fn a_failed_commit_fails_the_synchronous_operations_in_it() {
    let (store, _dir) = open().await;
    let asked = store.group().counts().asked.load(Ordering::Relaxed);
    let first = store.begin_write().await.unwrap();
    let good = {
        let s = store.clone();
        tokio::spawn(async move { put_now(&s, 1, false).await })
    };
    queued_behind_first(&store, asked + 2).await;
    // A deferred foreign key: the statement passes, the COMMIT fails.
    let bad = {
        let s = store.clone();
        tokio::spawn(async move {
            s.group()
                .run(|c| {
                    c.execute("INSERT INTO child (p) VALUES (99)", [])
                        .map_err(super::super::sync::sync_db)
                })
                .await
        })
    };
    queued_behind_first(&store, asked + 3).await;
    assert!(first.commit().await.is_err());
    assert!(good.await.unwrap().is_err());
    assert!(bad.await.unwrap().is_err());
    assert!(stored(&store).await.is_empty());
    assert_eq!(put_now(&store, 7, false).await.unwrap(), 0);
    assert_eq!(stored(&store).await, [7]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lent_operation_calls_synchronous_code_in_its_own_savepoint() {
    let (store, _dir) = open().await;
    let mut tx = store.begin_write().await.unwrap();
    sqlx::query("INSERT INTO t (x) VALUES (1)")
        .execute(&mut *tx)
        .await
        .unwrap();
    let seen = super::super::sync::sync_on(&mut tx, |c| {
        c.execute("INSERT INTO t (x) VALUES (2)", [])
            .map_err(super::super::sync::sync_db)?;
        c.query_row("SELECT COUNT(*) FROM t", [], |r| r.get::<_, i64>(0))
            .map_err(super::super::sync::sync_db)
    })
    .await
    .unwrap();
    assert_eq!(
        seen, 2,
        "the synchronous code sees the lent operation's writes"
    );
    tx.rollback();
    assert!(stored(&store).await.is_empty(), "and is undone with it");
    assert_eq!(put_now(&store, 3, false).await.unwrap(), 0);
    assert_eq!(stored(&store).await, [3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operation_that_panics_is_undone_and_the_writer_goes_on() {
    let (store, _dir) = open().await;
    let asked = store.group().counts().asked.load(Ordering::Relaxed);
    let first = store.begin_write().await.unwrap();
    let kept = {
        let s = store.clone();
        tokio::spawn(async move { put_now(&s, 1, false).await })
    };
    queued_behind_first(&store, asked + 2).await;
    let panics = {
        let s = store.clone();
        tokio::spawn(async move {
            s.group()
                .run(|c| -> Result<(), StoreError> {
                    c.execute("INSERT INTO t (x) VALUES (2)", [])
                        .map_err(super::super::sync::sync_db)?;
                    panic!("an operation gone wrong")
                })
                .await
        })
    };
    queued_behind_first(&store, asked + 3).await;
    first.commit().await.unwrap();
    assert_eq!(kept.await.unwrap().unwrap(), 0);
    assert!(panics.await.unwrap().is_err(), "its caller hears it failed");
    assert_eq!(stored(&store).await, [1], "and its write is undone");
    assert_eq!(put_now(&store, 3, false).await.unwrap(), 1);
    assert_eq!(stored(&store).await, [1, 3]);
}
