//! The broker's queues, as `serve` and `tasuki worker` both name them.

use clap::{Args, ValueEnum};

/// How to reach RabbitMQ.
#[derive(Debug, Clone, Args)]
pub struct QueueOptions {
    /// Run queue name; tests and tenants use their own. The dead-letter queue is
    /// `{queue}.dead`.
    #[arg(long, env = "TASUKI_QUEUE", default_value = "tasuki.runs")]
    pub queue: String,

    /// Kind of queue for the run and request queues and their dead-letter queues:
    /// `classic`, or `quorum` (replicated over a RabbitMQ cluster). Every `serve` and
    /// `worker` on a queue must say the same: RabbitMQ refuses to redeclare a queue
    /// with other arguments.
    #[arg(long, env = "TASUKI_QUEUE_TYPE", value_enum, default_value_t = QueueType::Classic)]
    pub queue_type: QueueType,

    /// Quorum queues only: a message returned to the queue more than this many times
    /// (handed back, or its consumer gone before it acked) is dead-lettered instead of
    /// delivered again. The run itself is not lost: it stays queued in the store and is
    /// published again.
    #[arg(
        long,
        env = "TASUKI_DELIVERY_LIMIT",
        default_value_t = 20,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub delivery_limit: u32,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum QueueType {
    Classic,
    Quorum,
}
