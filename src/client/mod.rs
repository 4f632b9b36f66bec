//! HTTP clients of `tasuki serve`: the worker protocol for remote workers
//! (`ControlPlane` over HTTP) and the API client the CLI uses.

mod api;
pub mod connect;
mod control;

pub use api::{ApiClient, ClientError, ReloadOutcome};
pub use control::HttpControlPlane;
