//! End-to-end tests: the real `tasuki` binary against real Docker and RabbitMQ. One
//! test binary, so the suite links once.

mod amqp_mode;
mod amqp_requests;
mod auth;
mod callbacks;
mod cli;
mod common;
mod connections;
mod deploy;
mod docker_runtime;
mod embedded;
mod fast_logs;
mod faults;
mod hardening;
mod hooks;
mod limits;
mod metrics;
#[cfg(feature = "bench")]
mod noop_runtime;
mod openapi;
mod postgres;
mod quorum;
mod registry;
mod retention;
mod schedules;
mod secrets;
mod sessions;
mod store_copy;
mod tls;
mod ui;
mod usage;
