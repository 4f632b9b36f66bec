//! Completion callbacks on the wire: Standard Webhooks signatures (`sign.rs`) and the
//! guarded HTTP sender (`send.rs`).

pub mod send;
pub mod sign;

pub use send::HttpSender;
