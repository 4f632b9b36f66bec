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

/// Parses `--amqp-url` values with [`amqp_url`]; unlike a plain value parser, whose
/// error clap prints after the value as given, it never echoes the URL (its password).
#[derive(Debug, Clone, Copy)]
pub(super) struct AmqpUrlParser;

impl clap::builder::TypedValueParser for AmqpUrlParser {
    type Value = String;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<String, clap::Error> {
        let arg = arg
            .map(ToString::to_string)
            .unwrap_or_else(|| "--amqp-url".into());
        let refused = |message: String| {
            clap::Error::raw(
                clap::error::ErrorKind::ValueValidation,
                format!("invalid value for '{arg}': {message}\n"),
            )
            .with_cmd(cmd)
        };
        let text = value
            .to_str()
            .ok_or_else(|| refused("not UTF-8".to_owned()))?;
        amqp_url(text).map_err(refused)
    }
}

/// One broker URL of `--amqp-url`: `amqp://` or `amqps://` with a host. Refused
/// with its password hidden; a comma splits the list, so one inside a URL (a
/// password's) is written `%2C`.
pub(super) fn amqp_url(text: &str) -> Result<String, String> {
    let text = text.trim();
    // Not shown at all: what does not parse may be a piece of a password that held
    // a comma.
    let url = url::Url::parse(text).map_err(|e| {
        format!(
            "one URL is not an AMQP URL ({e}; not shown, as it may hold a password); \
             a comma inside a URL is written %2C"
        )
    })?;
    if !matches!(url.scheme(), "amqp" | "amqps") || url.host_str().is_none_or(str::is_empty) {
        return Err(format!(
            "not an AMQP URL: {}; give amqp://user:password@host:5672/%2f",
            super::store::redact(text)
        ));
    }
    Ok(text.to_owned())
}
