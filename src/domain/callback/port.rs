//! The store's part for callbacks: due deliveries, the record of each try, and a
//! person's redelivery. The obligations themselves are written by the store in the
//! transaction that makes a run final, never through this port.

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::{NextStep, TryResult};
use crate::domain::ports::StoreError;
use crate::domain::run::RunId;

/// A run's callback delivery as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallbackState {
    pub url: String,
    /// The event type (`run.finished`).
    pub event: String,
    /// The `webhook-id`, the same across retries.
    pub event_id: String,
    pub tries: u32,
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
    pub delivered_at: Option<DateTime<Utc>>,
    pub next_try_at: Option<DateTime<Utc>>,
    pub gave_up: bool,
}

/// A delivery whose next try is due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueCallback {
    pub id: i64,
    pub run_id: RunId,
    pub url: String,
    pub event: String,
    pub event_id: String,
    /// When the event happened (the run became final).
    pub created_at: DateTime<Utc>,
    /// Tries before this one.
    pub tries: u32,
}

/// What a person's redelivery did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redelivery {
    /// Its deliveries are due now again (`n` of them).
    Queued(u32),
    UnknownRun,
    /// The run has no callback, or is not final yet (nothing to deliver).
    NothingToDeliver,
}

#[async_trait]
pub trait Callbacks: Send + Sync + 'static {
    /// Deliveries due at `now`, oldest first.
    async fn due_callbacks(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<DueCallback>, StoreError>;
    /// The callback relay's read when several replicas share the store: like
    /// `due_callbacks`, and each delivery returned is the caller's for `hold` (due for
    /// nobody else until then, unless its try is recorded sooner), so no event is sent
    /// twice at once. By default nothing is held.
    async fn claim_callbacks(
        &self,
        now: DateTime<Utc>,
        limit: u32,
        hold: std::time::Duration,
    ) -> Result<Vec<DueCallback>, StoreError> {
        let _ = hold;
        self.due_callbacks(now, limit).await
    }
    /// Record one try: `tries` rises by one, the result and what follows it are stored.
    async fn record_callback_try(
        &self,
        id: i64,
        result: &TryResult,
        next: NextStep,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError>;
    /// Make the run's deliveries due now again (given up ones and delivered ones too).
    async fn redeliver_callbacks(
        &self,
        run_id: RunId,
        now: DateTime<Utc>,
    ) -> Result<Redelivery, StoreError>;
}

/// Sends deliveries over the network, behind the SSRF guard.
#[async_trait]
pub trait CallbackSender: Send + Sync + 'static {
    /// Whether `url` may be called now (scheme, and every address its host resolves to).
    async fn check(&self, url: &str) -> Result<(), super::guard::Refusal>;
    /// One try: the guard again (the address may have changed), then the request.
    async fn send(
        &self,
        delivery: &DueCallback,
        run: &crate::domain::run::Run,
        now: DateTime<Utc>,
    ) -> TryResult;
}
