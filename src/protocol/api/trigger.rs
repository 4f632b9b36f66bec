//! A run's `trigger` in the API's run JSON.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::time;
use crate::domain::run::Trigger;

/// A run's `trigger`: `{"type":"api"}`, `{"type":"webhook"}`, or
/// `{"type":"schedule","schedule":"nightly","slot":"<RFC 3339 UTC>","business_date":"YYYY-MM-DD"}`.
/// A type this build does not know (from a newer server) reads as `Unknown`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TriggerV1 {
    #[default]
    Api,
    Schedule {
        schedule: String,
        /// The slot's nominal instant.
        slot: String,
        business_date: String,
    },
    Webhook,
    #[serde(other)]
    Unknown,
}

impl From<&Trigger> for TriggerV1 {
    fn from(t: &Trigger) -> Self {
        match t {
            Trigger::Api => TriggerV1::Api,
            Trigger::Schedule {
                schedule,
                slot,
                business_date,
                ..
            } => TriggerV1::Schedule {
                schedule: schedule.clone(),
                slot: time(*slot),
                business_date: business_date.format("%Y-%m-%d").to_string(),
            },
            Trigger::Webhook => TriggerV1::Webhook,
        }
    }
}
