//! Log sinks: where run output ends up. The file sink keeps one file per run attempt
//! under the data dir, stdout and stderr interleaved in arrival order, bytes as written.

mod export;
mod file;

pub use export::ExportingSink;
pub use file::FileLogSink;
