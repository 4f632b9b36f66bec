//! A run's completion callback deliveries in the run JSON (`callbacks`).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::time;
use crate::domain::callback::CallbackState;

/// One event's delivery to a callback URL, as far as it went.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct CallbackV1 {
    pub url: String,
    /// The event type (`run.finished`).
    pub event: String,
    /// The `webhook-id` header, the same across retries.
    pub id: String,
    pub tries: u32,
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
    pub delivered_at: Option<String>,
    pub next_try_at: Option<String>,
    pub gave_up: bool,
}

impl From<CallbackState> for CallbackV1 {
    fn from(c: CallbackState) -> Self {
        Self {
            url: c.url,
            event: c.event,
            id: c.event_id,
            tries: c.tries,
            last_status: c.last_status,
            last_error: c.last_error,
            delivered_at: c.delivered_at.map(time),
            next_try_at: c.next_try_at.map(time),
            gave_up: c.gave_up,
        }
    }
}
