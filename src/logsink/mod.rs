//! Log sinks: where run output ends up. Each attempt's log is the bytes of its output,
//! stdout and stderr interleaved in arrival order, as written. The file sink keeps one
//! file per run attempt under the data dir; the PostgreSQL sink keeps them in the
//! database the control plane replicas share.

mod export;
mod file;
mod postgres;
#[cfg(test)]
mod suite;

pub use export::ExportingSink;
pub use file::FileLogSink;
pub use postgres::PgLogSink;
