//! One module per long-running process of the binary, where `lib.rs` hands over the
//! choosing and wiring of concrete adapters: `serve` (the control plane, embedded worker
//! included) and `worker` (a remote worker).

mod files;
mod serve;
mod worker;

pub use serve::serve;
pub use worker::worker;
