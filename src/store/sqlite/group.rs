//! Group commit: concurrent write operations share one `BEGIN IMMEDIATE` transaction and
//! one fsync. A committer task owns the write connection while a group is open; each
//! operation borrows it in turn inside its own SAVEPOINT (an operation that fails or is
//! dropped without `commit` undoes only itself), and `commit` answers once the group's
//! COMMIT has reached the disk. A lone write commits at once: the group closes as soon
//! as no other operation is waiting, so batching only happens under load.
//!
//! An operation comes in one of two shapes. A *lent* one (`begin`) borrows the sqlx
//! connection and may await between its statements; every statement is a round trip to
//! sqlx's connection thread. A *synchronous* one (`run`) is a closure over a
//! `rusqlite::Connection` on the same SQLite handle: the committer locks the handle once
//! for a run of such operations and calls them one after another on its own thread, each
//! in its SAVEPOINT, with their statements prepared once per group. The hot writes
//! (accepts, claims, heartbeats, log appends, finishes) take that shape; a lent operation
//! can still call the synchronous helpers through `sync_on`.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use sqlx::pool::PoolConnection;
use sqlx::sqlite::SqliteConnection;
use sqlx::{Sqlite, SqlitePool};
use tokio::sync::{mpsc, oneshot};

use super::db;
use super::sync::sync_db;
use crate::domain::ports::StoreError;

/// At most this many operations share one commit, so one caller's wait for the disk is
/// bounded however many others keep arriving.
pub(super) const GROUP_CAP: usize = 512;

/// A caller asking for a turn on the write connection: to borrow it, or to have a
/// closure run on it.
enum Turn {
    Lend(oneshot::Sender<WriteTx>),
    Run(SyncOp),
}

/// A synchronous operation, boxed: runs once on the handle inside its SAVEPOINT.
type SyncOp = Box<dyn FnOnce(&rusqlite::Connection) -> SyncDone + Send>;

/// What a synchronous operation left: whether its writes are kept, and how to answer
/// its caller once the group's commit is known (an undone one is answered at once).
struct SyncDone {
    keep: bool,
    answer: Answer,
}

type Answer = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

/// The connection given back: `done` is `Some` when the operation committed (and waits
/// to hear whether the group's commit reached the disk), `None` when it is undone.
struct Returned {
    conn: PoolConnection<Sqlite>,
    done: Option<Done>,
}

type Done = oneshot::Sender<Result<(), StoreError>>;

/// Someone waiting to hear whether the group's commit reached the disk.
enum Waiter {
    Lent(Done),
    Ran(Answer),
}

impl Waiter {
    fn answer(self, result: Result<(), StoreError>) {
        match self {
            Self::Lent(done) => {
                let _ = done.send(result);
            }
            Self::Ran(answer) => answer(result),
        }
    }
}

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
            .send(Turn::Lend(lend))
            .map_err(|_| StoreError::Unavailable("the store's writer has stopped".into()))?;
        lent.await.map_err(|_| {
            StoreError::Unavailable("the store could not begin a write transaction".into())
        })
    }

    /// Run `op` on the write connection inside a group transaction: its writes are kept
    /// when it returns `Ok` (and this returns once they are durable), undone when it
    /// returns `Err`. `op` runs on the committer's thread and must not block on anything
    /// but SQLite.
    pub(super) async fn run<T, F>(&self, op: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&rusqlite::Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let op: SyncOp = Box::new(move |conn| match op(conn) {
            Ok(value) => SyncDone {
                keep: true,
                answer: Box::new(move |durable| {
                    let _ = tx.send(durable.map(|()| value));
                }),
            },
            Err(e) => SyncDone {
                keep: false,
                answer: Box::new(move |_| {
                    let _ = tx.send(Err(e));
                }),
            },
        });
        self.counts.asked.fetch_add(1, Ordering::Relaxed);
        self.turns
            .send(Turn::Run(op))
            .map_err(|_| StoreError::Unavailable("the store's writer has stopped".into()))?;
        // Dropped unrun (the group failed before its turn): the sender goes with it.
        rx.await
            .map_err(|_| StoreError::Unavailable("the store's write transaction failed".into()))?
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

/// Run `f` on a `rusqlite::Connection` over the sqlx connection's own handle (a lent
/// operation calling synchronous store code passes its `WriteTx`), locked
/// for the duration so sqlx's thread cannot touch it meanwhile. The rusqlite value does
/// not own the handle, and it is dropped (finalizing the statements it prepared) before
/// the lock is released, so nothing of it outlives the borrow.
pub(super) async fn sync_on<T>(
    conn: &mut SqliteConnection,
    f: impl FnOnce(&rusqlite::Connection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let mut handle = conn.lock_handle().await.map_err(db)?;
    let raw = handle.as_raw_handle();
    // SAFETY: `raw` is the live handle of the connection locked by `handle`, which is
    // held until after `borrowed` is dropped; `from_handle` neither closes it nor keeps
    // it past its own drop.
    let borrowed = unsafe { rusqlite::Connection::from_handle(raw.as_ptr()) }.map_err(sync_db)?;
    let result = f(&borrowed);
    drop(borrowed);
    drop(handle);
    result
}

/// Synchronous work on a runtime thread: moved aside on the multi-threaded runtime so
/// the thread's other tasks are not held up; inline on a current-thread one (tests).
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::current().runtime_flavor() {
        tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// Open a group for the first waiting turn, serve each waiting turn in arrival order (up
/// to `GROUP_CAP`), commit once, answer everyone.
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
        let mut waiting: Vec<Waiter> = Vec::new();
        let mut next = Some(first);
        let mut served = 0;
        let mut result = Ok(());
        while let Some(turn) = next.take() {
            served += 1;
            match turn {
                Turn::Lend(lend) => {
                    let (c, lent) = self::lend(conn, lend).await;
                    conn = c;
                    match lent {
                        Ok(done) => waiting.extend(done.map(Waiter::Lent)),
                        Err(e) => result = Err(e),
                    }
                    if served < GROUP_CAP {
                        next = turns.try_recv().ok();
                    }
                }
                Turn::Run(op) => {
                    // This and every synchronous turn waiting right behind it, on one
                    // lock of the handle; the first lent turn found waits for the next
                    // round of the loop.
                    let mut ops = vec![op];
                    while served < GROUP_CAP {
                        match turns.try_recv() {
                            Ok(Turn::Run(op)) => {
                                served += 1;
                                ops.push(op);
                            }
                            Ok(lent) => {
                                next = Some(lent);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    if let Err(e) = run_ops(&mut conn, ops, &mut waiting).await {
                        result = Err(e);
                    }
                    if next.is_none() && served < GROUP_CAP {
                        next = turns.try_recv().ok();
                    }
                }
            }
            if result.is_err() {
                break;
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
            // usable for the next group. A turn taken but not served is dropped, which
            // tells its caller.
            let _ = exec(&mut conn, "ROLLBACK").await;
        }
        for waiter in waiting {
            waiter.answer(result.clone());
        }
    }
}

/// Run synchronous operations one after another on the locked handle, each in its own
/// SAVEPOINT: released when it kept its writes (its answer waits for the commit),
/// rolled back to when it did not (answered now). An error means the group can no
/// longer commit; the operations not run yet are dropped, which answers them.
async fn run_ops(
    conn: &mut SqliteConnection,
    ops: Vec<SyncOp>,
    waiting: &mut Vec<Waiter>,
) -> Result<(), StoreError> {
    sync_on(conn, |c| {
        blocking(|| {
            for op in ops {
                c.execute_batch("SAVEPOINT op").map_err(sync_db)?;
                // A panic in one operation undoes it and fails its caller (its answer
                // is dropped with the closure), not the committer and every write after.
                let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| op(c)));
                match done {
                    Ok(done) if done.keep => {
                        c.execute_batch("RELEASE op").map_err(sync_db)?;
                        waiting.push(Waiter::Ran(done.answer));
                    }
                    Ok(done) => {
                        c.execute_batch("ROLLBACK TO op; RELEASE op")
                            .map_err(sync_db)?;
                        (done.answer)(Ok(()));
                    }
                    Err(_) => {
                        tracing::error!(message = "a store write operation panicked; it is undone");
                        c.execute_batch("ROLLBACK TO op; RELEASE op")
                            .map_err(sync_db)?;
                    }
                }
            }
            Ok(())
        })
    })
    .await
}

/// Lend the connection to one turn inside a SAVEPOINT and take it back: released when
/// the operation committed, rolled back to when it did not. The connection always comes
/// back; an error means the group can no longer commit.
async fn lend(
    mut conn: PoolConnection<Sqlite>,
    lend: oneshot::Sender<WriteTx>,
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
    let _ = lend.send(tx);
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
