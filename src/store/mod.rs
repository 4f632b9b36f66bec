//! The run store: SQLite through sqlx, the source of truth for runs, attempts, leases and
//! the outbox. Writes go through one connection so SQLite never has to arbitrate between
//! writers of this process; reads use a small pool (WAL lets them run beside the writer).

mod sqlite;
mod sqlite_retention;

pub use sqlite::SqliteStore;
