//! One module per long-running process of the binary, where `lib.rs` hands over the
//! choosing and wiring of concrete adapters: `serve` (the control plane, embedded worker
//! included) and `worker` (a remote worker).

mod files;
mod serve;
mod worker;

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
