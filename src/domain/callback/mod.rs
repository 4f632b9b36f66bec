//! Completion callbacks: what a run announces when it becomes final, and when a delivery
//! that did not arrive is tried again. `guard.rs` decides which addresses may be called.

use std::time::Duration;

use chrono::{DateTime, Utc};

pub mod guard;
mod port;

pub use port::{CallbackSender, CallbackState, Callbacks, DueCallback, Redelivery};

/// Where a run announces its end (`callback` in a run request, or `[callback]` in its
/// job file). `run.finished` is the only event so far, so there is nothing to choose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallbackTarget {
    pub url: String,
}

/// The events a request may name in `events`.
pub const EVENTS: [&str; 1] = ["finished"];

/// The event type a delivery carries in its body.
pub const RUN_FINISHED: &str = "run.finished";

/// What one try of a delivery came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TryResult {
    /// The receiver answered with this HTTP status.
    Status(u16),
    /// No answer: refused by the guard, no connection, a timeout.
    Failed(String),
}

/// What follows a try.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextStep {
    /// 2xx: done.
    Delivered,
    /// 410 Gone: the receiver wants no more; never tried again (unless a person asks).
    Stopped,
    RetryAt(DateTime<Utc>),
    /// Past the maximum age: recorded as given up.
    GaveUp,
}

/// The first retry's delay; doubled for each later one, up to `BACKOFF_MAX`.
pub const BACKOFF: Duration = Duration::from_secs(5);
pub const BACKOFF_MAX: Duration = Duration::from_secs(3600);
/// How long after its event a delivery is still tried (`--callback-max-age`).
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// Each delay lands within ±20 % of its nominal value, so deliveries that failed
/// together do not all come back at the same instant.
const JITTER: f64 = 0.2;

/// The delay after the `tries`-th failed try (1 = the first). `jitter` is in [0, 1).
pub fn backoff(tries: u32, jitter: f64) -> Duration {
    let doublings = tries.saturating_sub(1).min(30);
    let nominal = BACKOFF.saturating_mul(1u32 << doublings).min(BACKOFF_MAX);
    let factor = 1.0 - JITTER + 2.0 * JITTER * jitter.clamp(0.0, 1.0);
    nominal.mul_f64(factor)
}

/// What follows the `tries`-th try (this one included) of a delivery whose event
/// happened at `event_at`, given its result at `now`.
pub fn after_try(
    result: &TryResult,
    tries: u32,
    event_at: DateTime<Utc>,
    now: DateTime<Utc>,
    max_age: Duration,
    jitter: f64,
) -> NextStep {
    match result {
        TryResult::Status(s) if (200..300).contains(s) => return NextStep::Delivered,
        TryResult::Status(410) => return NextStep::Stopped,
        _ => {}
    }
    let deadline = chrono::Duration::from_std(max_age)
        .ok()
        .and_then(|age| event_at.checked_add_signed(age));
    let next = chrono::Duration::from_std(backoff(tries, jitter))
        .ok()
        .and_then(|d| now.checked_add_signed(d));
    match (next, deadline) {
        (Some(next), Some(deadline)) if next <= deadline => NextStep::RetryAt(next),
        _ => NextStep::GaveUp,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn backoff_doubles_up_to_an_hour_within_twenty_percent() {
        assert_eq!(backoff(1, 0.5), secs(5));
        assert_eq!(backoff(2, 0.5), secs(10));
        assert_eq!(backoff(3, 0.5), secs(20));
        assert_eq!(backoff(10, 0.5), secs(2560));
        assert_eq!(backoff(11, 0.5), secs(3600));
        assert_eq!(backoff(u32::MAX, 0.5), secs(3600));
        assert_eq!(backoff(1, 0.0), secs(4));
        assert_eq!(backoff(1, 1.0), secs(6));
        // Out-of-range jitter is clamped, never a negative or runaway delay.
        assert_eq!(backoff(1, -3.0), secs(4));
        assert_eq!(backoff(1, 7.0), secs(6));
    }

    #[test]
    fn two_hundreds_deliver_410_stops_anything_else_retries() {
        let t0 = Utc::now();
        let max = DEFAULT_MAX_AGE;
        for s in [200, 201, 204, 299] {
            assert_eq!(
                after_try(&TryResult::Status(s), 1, t0, t0, max, 0.5),
                NextStep::Delivered
            );
        }
        assert_eq!(
            after_try(&TryResult::Status(410), 1, t0, t0, max, 0.5),
            NextStep::Stopped
        );
        for result in [
            TryResult::Status(500),
            TryResult::Status(404),
            TryResult::Status(301),
            TryResult::Status(199),
            TryResult::Failed("connection refused".into()),
        ] {
            assert_eq!(
                after_try(&result, 2, t0, t0, max, 0.5),
                NextStep::RetryAt(t0 + chrono::Duration::seconds(10)),
                "{result:?}"
            );
        }
    }

    #[test]
    fn a_retry_past_the_maximum_age_gives_up() {
        let t0 = Utc::now();
        let failed = TryResult::Status(503);
        let max = secs(60);
        let at = |s: i64| t0 + chrono::Duration::seconds(s);
        assert_eq!(
            after_try(&failed, 1, t0, at(55), max, 0.5),
            NextStep::RetryAt(at(60))
        );
        assert_eq!(
            after_try(&failed, 1, t0, at(56), max, 0.5),
            NextStep::GaveUp
        );
        // A success still counts after the maximum age (a person's redelivery).
        assert_eq!(
            after_try(&TryResult::Status(200), 9, t0, at(999), max, 0.5),
            NextStep::Delivered
        );
    }
}
