//! Pure types and rules: no tokio, axum, lapin, bollard or sqlx here.

pub mod job;
pub mod ports;
pub mod run;
