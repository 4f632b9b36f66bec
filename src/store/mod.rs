//! The run store, the source of truth for runs, attempts, leases, the outbox and worker
//! sessions: `SqliteStore` (one process; the embedded default) or `PgStore` (PostgreSQL,
//! shared by any number of `serve` replicas), chosen by `open` from `--database-url`.
//! Both have the same columns, so `tasuki store copy` moves rows between them.

mod common;
pub mod copy;
mod postgres;
mod sqlite;
#[cfg(test)]
pub(crate) mod suite;

pub use postgres::PgStore;
#[cfg(test)]
pub(crate) use postgres::testdb;
pub use sqlite::SqliteStore;

use std::sync::Arc;

use crate::domain::observe::StoreGauges;
use crate::domain::ports::RunStore;
use crate::domain::retention::RetentionStore;
use crate::domain::store::Replies;

/// One store, as each part of a process holds it.
#[derive(Clone)]
pub struct Stores {
    pub runs: Arc<dyn RunStore>,
    pub gauges: Arc<dyn StoreGauges>,
    pub retention: Arc<dyn RetentionStore>,
    pub replies: Arc<dyn Replies>,
    /// The PostgreSQL store's pool, for what replicas share beside it (logs, run
    /// events); `None` for SQLite.
    pub shared: Option<sqlx::PgPool>,
}

impl Stores {
    pub fn of<S>(store: Arc<S>) -> Stores
    where
        S: RunStore + StoreGauges + RetentionStore + Replies,
    {
        Stores {
            runs: store.clone(),
            gauges: store.clone(),
            retention: store.clone(),
            replies: store,
            shared: None,
        }
    }

    /// With the pool replicas share.
    pub fn sharing(self, pool: sqlx::PgPool) -> Stores {
        Stores {
            shared: Some(pool),
            ..self
        }
    }
}
