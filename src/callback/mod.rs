//! Completion callbacks on the wire: Standard Webhooks signatures (`sign.rs`).

pub mod sign;
