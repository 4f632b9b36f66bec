//! Use cases, written against the ports in `domain` only: accepting and querying runs,
//! the control plane a worker talks to, the outbox relay, the worker itself, and pruning what
//! nobody will read again.

pub mod audit;
pub mod callbacks;
pub mod control;
pub mod duty;
pub mod events;
pub mod relay;
pub mod replies;
pub mod retention;
pub mod runs;
pub mod scheduler;
pub mod session;
pub mod worker;
