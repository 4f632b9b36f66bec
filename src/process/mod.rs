//! One module per long-running process of the binary, where `lib.rs` hands over the
//! choosing and wiring of concrete adapters: `serve` (the control plane, embedded worker
//! included) and `worker` (a remote worker); and `copy`, `tasuki store copy`, which
//! wires two stores and their log sinks.

mod copy;
mod files;
mod serve;
mod worker;

pub use copy::store_copy;
pub use serve::serve;
pub use worker::worker;

/// The kind of queue the options name, as the broker adapter declares it.
fn queue_kind(options: &crate::config::QueueOptions) -> crate::amqp::QueueKind {
    match options.queue_type {
        crate::config::QueueType::Classic => crate::amqp::QueueKind::Classic,
        crate::config::QueueType::Quorum => crate::amqp::QueueKind::Quorum {
            delivery_limit: options.delivery_limit,
        },
    }
}

/// The run store the options name (SQLite in the data dir without a URL), with the
/// error naming which one could not be opened.
pub(crate) async fn open_store(
    options: &crate::config::StoreOptions,
    data_dir: &std::path::Path,
) -> anyhow::Result<crate::store::Stores> {
    use anyhow::Context;
    use std::sync::Arc;

    use crate::config::DatabaseUrl;
    use crate::store::{PgStore, SqliteStore, Stores};

    let opened = match options.database(data_dir) {
        DatabaseUrl::Sqlite(path) => SqliteStore::open_file(&path)
            .await
            .map(|s| Stores::of(Arc::new(s))),
        DatabaseUrl::Postgres(url) => PgStore::open(&url, options.database_pool).await.map(|s| {
            let pool = s.shared_pool();
            Stores::of(Arc::new(s)).sharing(pool)
        }),
    };
    opened.with_context(|| match &options.database_url {
        None => format!("opening the run store in {}", data_dir.display()),
        Some(url) => format!("opening the run store {url}"),
    })
}
