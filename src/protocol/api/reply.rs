//! A run's `replies` in the API's run JSON: what became of each reply owed to the
//! producer that asked for the run over the request queue.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::domain::reply::Reply;

/// `{"to":"amq.gen-...","kind":"finished","state":"sent","tries":1,"last_error":null}`;
/// `kind` is `accepted` or `finished`, `state` one of `waiting` (the run is not final
/// yet), `pending`, `sent`, `unroutable` (the reply queue did not exist; not retried).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ReplyV1 {
    pub to: String,
    pub kind: String,
    pub state: String,
    pub tries: u32,
    pub last_error: Option<String>,
}

impl From<Reply> for ReplyV1 {
    fn from(r: Reply) -> Self {
        Self {
            to: r.to,
            kind: r.kind.as_str().to_owned(),
            state: r.state.as_str().to_owned(),
            tries: r.tries,
            last_error: r.last_error,
        }
    }
}
