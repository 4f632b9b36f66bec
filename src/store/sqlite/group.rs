//! Group commit: concurrent write operations share one `BEGIN IMMEDIATE` transaction and
//! one fsync. A committer task owns the write connection while a group is open; each
//! operation borrows it in turn inside its own SAVEPOINT (an operation that fails or is
//! dropped without `commit` undoes only itself), and `commit` answers once the group's
//! COMMIT has reached the disk. A lone write commits at once: the group closes as soon
//! as no other operation is waiting, so batching only happens under load.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use sqlx::pool::PoolConnection;
use sqlx::sqlite::SqliteConnection;
use sqlx::{Sqlite, SqlitePool};
use tokio::sync::{mpsc, oneshot};

use super::db;
use crate::domain::ports::StoreError;

/// At most this many operations share one commit, so one caller's wait for the disk is
/// bounded however many others keep arriving.
pub(super) const GROUP_CAP: usize = 512;

/// A caller asking for a turn on the write connection.
struct Turn {
    lend: oneshot::Sender<WriteTx>,
}

/// The connection given back: `done` is `Some` when the operation committed (and waits
/// to hear whether the group's commit reached the disk), `None` when it is undone.
struct Returned {
    conn: PoolConnection<Sqlite>,
    done: Option<Done>,
}

type Done = oneshot::Sender<Result<(), StoreError>>;

/// The queue of write operations; cloned with the store.
#[derive(Clone)]
pub(super) struct GroupCommit {
    turns: mpsc::UnboundedSender<Turn>,
    counts: Arc<Counts>,
}

/// How the writes grouped, for tests and the benchmark's statement counts.
#[derive(Default)]
pub(super) struct Counts {
    /// Turns asked for.
    pub asked: AtomicU64,
    /// Groups committed (each one fsync).
    pub commits: AtomicU64,
}

impl GroupCommit {
    /// Start the committer task on `pool` (the single write connection). It ends when
    /// the last handle is dropped.
    pub(super) fn start(pool: SqlitePool) -> Self {
        let (turns, rx) = mpsc::unbounded_channel();
        let counts = Arc::new(Counts::default());
        tokio::spawn(committer(pool, rx, counts.clone()));
        Self { turns, counts }
    }

    #[cfg(test)]
    pub(super) fn counts(&self) -> &Counts {
        &self.counts
    }

    /// Wait for a turn on the write connection, inside a group transaction.
    pub(super) async fn begin(&self) -> Result<WriteTx, StoreError> {
        let (lend, lent) = oneshot::channel();
        self.counts.asked.fetch_add(1, Ordering::Relaxed);
        self.turns
            .send(Turn { lend })
            .map_err(|_| StoreError::Unavailable("the store's writer has stopped".into()))?;
        lent.await.map_err(|_| {
            StoreError::Unavailable("the store could not begin a write transaction".into())
        })
    }
}

/// One operation's share of a group transaction. Derefs to the connection; `commit`
/// keeps its writes and waits until they are durable; dropped (or `rollback`) without
/// `commit`, its writes are undone and the rest of the group is untouched.
pub(super) struct WriteTx {
    conn: Option<PoolConnection<Sqlite>>,
    back: Option<oneshot::Sender<Returned>>,
}

impl WriteTx {
    /// Keep this operation's writes; returns once the group's commit reached the disk
    /// (or fails if that commit failed, undoing this operation with the rest).
    pub(super) async fn commit(mut self) -> Result<(), StoreError> {
        let (done, durable) = oneshot::channel();
        self.give_back(Some(done));
        durable.await.map_err(|_| {
            StoreError::Unavailable("the store's writer stopped before the commit".into())
        })?
    }

    /// Undo this operation's writes (the same as dropping it; spelled out where a
    /// caller decides to). A `WriteTx` dropped anywhere, even unsent in the channel to a
    /// caller that stopped waiting, gives the connection back the same way.
    pub(super) fn rollback(self) {}

    fn give_back(&mut self, done: Option<Done>) {
        if let (Some(conn), Some(back)) = (self.conn.take(), self.back.take()) {
            // The committer waits for the connection; if it is gone, so is the group.
            let _ = back.send(Returned { conn, done });
        }
    }
}

impl Drop for WriteTx {
    fn drop(&mut self) {
        self.give_back(None);
    }
}

impl Deref for WriteTx {
    type Target = SqliteConnection;
    fn deref(&self) -> &SqliteConnection {
        // Present from `begin` until `commit`/drop, which consume the value.
        self.conn.as_deref().unwrap_or_else(|| unreachable!())
    }
}

impl DerefMut for WriteTx {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        self.conn.as_deref_mut().unwrap_or_else(|| unreachable!())
    }
}

async fn exec(conn: &mut SqliteConnection, sql: &'static str) -> Result<(), StoreError> {
    sqlx::raw_sql(sql).execute(conn).await.map_err(db)?;
    Ok(())
}

/// Open a group for the first waiting turn, lend the connection to each waiting turn in
/// arrival order (up to `GROUP_CAP`), commit once, answer everyone.
async fn committer(
    pool: SqlitePool,
    mut turns: mpsc::UnboundedReceiver<Turn>,
    counts: Arc<Counts>,
) {
    while let Some(first) = turns.recv().await {
        let mut conn = match pool.acquire().await {
            Ok(conn) => conn,
            // The waiting caller sees its turn dropped: "could not begin".
            Err(e) => {
                tracing::warn!(message = "store write connection unavailable", error = %e);
                continue;
            }
        };
        if let Err(e) = exec(&mut conn, "BEGIN IMMEDIATE").await {
            tracing::warn!(message = "store could not begin a write transaction", error = %e);
            continue;
        }
        let mut waiting: Vec<Done> = Vec::new();
        let mut next = Some(first);
        let mut served = 0;
        let mut result = Ok(());
        while let Some(turn) = next.take() {
            served += 1;
            let (c, lent) = lend(conn, turn).await;
            conn = c;
            match lent {
                Ok(done) => waiting.extend(done),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
            if served < GROUP_CAP {
                next = turns.try_recv().ok();
            }
        }
        if result.is_ok() {
            result = exec(&mut conn, "COMMIT").await;
            if result.is_ok() {
                counts.commits.fetch_add(1, Ordering::Relaxed);
            }
        }
        if result.is_err() {
            // Every operation of the group fails with it; the connection is left
            // usable for the next group.
            let _ = exec(&mut conn, "ROLLBACK").await;
        }
        for done in waiting {
            let _ = done.send(result.clone());
        }
    }
}

/// Lend the connection to one turn inside a SAVEPOINT and take it back: released when
/// the operation committed, rolled back to when it did not. The connection always comes
/// back; an error means the group can no longer commit.
async fn lend(
    mut conn: PoolConnection<Sqlite>,
    turn: Turn,
) -> (PoolConnection<Sqlite>, Result<Option<Done>, StoreError>) {
    if let Err(e) = exec(&mut conn, "SAVEPOINT op").await {
        return (conn, Err(e));
    }
    let (back, returned) = oneshot::channel();
    let tx = WriteTx {
        conn: Some(conn),
        back: Some(back),
    };
    // A caller that stopped waiting drops the value unsent, which gives it back.
    let _ = turn.lend.send(tx);
    let Ok(Returned { mut conn, done }) = returned.await else {
        unreachable!("a WriteTx always gives its connection back")
    };
    let undo = async {
        if done.is_none() {
            exec(&mut conn, "ROLLBACK TO op").await?;
        }
        exec(&mut conn, "RELEASE op").await
    };
    match undo.await {
        Ok(()) => (conn, Ok(done)),
        Err(e) => {
            if let Some(done) = done {
                let _ = done.send(Err(e.clone()));
            }
            (conn, Err(e))
        }
    }
}

#[cfg(test)]
#[path = "group_tests.rs"]
mod tests;
