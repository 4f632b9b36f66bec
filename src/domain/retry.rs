//! Retry rules: the one mechanism that starts a new attempt of a run without a person.

use std::collections::BTreeSet;
use std::time::Duration;

use super::run::ReasonCode;

/// Per job `[retry]`. The default retries nothing: many batch jobs are not idempotent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1 = never retried).
    pub max_attempts: u32,
    /// Delay before the second attempt; doubled for each later one.
    pub backoff: Duration,
    pub backoff_max: Duration,
    /// Exit codes (reason `exit_code`) that are worth another attempt.
    pub on_exit_codes: BTreeSet<i64>,
    /// Other reasons worth another attempt.
    pub on: BTreeSet<ReasonCode>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 1,
            backoff: Self::DEFAULT_BACKOFF,
            backoff_max: Self::DEFAULT_BACKOFF_MAX,
            on_exit_codes: BTreeSet::new(),
            on: BTreeSet::new(),
        }
    }
}

/// How much the backoff is spread: each delay lands within ±20 % of its nominal value,
/// so runs that failed together do not all come back at the same instant.
const JITTER: f64 = 0.2;

impl RetryPolicy {
    pub const DEFAULT_BACKOFF: Duration = Duration::from_secs(10);
    pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(300);
    pub const MAX_ATTEMPTS: u32 = 100;

    /// Reasons a job may name in `on`: `exit_code` is named through `on_exit_codes`,
    /// and a cancel or a missing image is never worth another attempt. A secret that
    /// could not be read may be (a file an agent writes a little later).
    pub const RETRYABLE: [ReasonCode; 6] = [
        ReasonCode::OomKilled,
        ReasonCode::TimedOut,
        ReasonCode::Lost,
        ReasonCode::DockerError,
        ReasonCode::ImagePullFailed,
        ReasonCode::SecretUnavailable,
    ];

    /// Whether attempt `attempt`, which ended for `reason` with `exit_code`, gets
    /// another one; if so, after how long. `jitter` is a number in [0, 1).
    pub fn next_delay(
        &self,
        attempt: u32,
        reason: Option<ReasonCode>,
        exit_code: Option<i64>,
        jitter: f64,
    ) -> Option<Duration> {
        if attempt >= self.max_attempts {
            return None;
        }
        let retryable = match reason? {
            ReasonCode::ExitCode => exit_code.is_some_and(|c| self.on_exit_codes.contains(&c)),
            other => self.on.contains(&other),
        };
        if !retryable {
            return None;
        }
        let doublings = attempt.saturating_sub(1).min(30);
        let nominal = self
            .backoff
            .saturating_mul(1u32 << doublings)
            .min(self.backoff_max);
        let factor = 1.0 - JITTER + 2.0 * JITTER * jitter.clamp(0.0, 1.0);
        Some(nominal.mul_f64(factor))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 4,
            backoff: Duration::from_secs(10),
            backoff_max: Duration::from_secs(25),
            on_exit_codes: BTreeSet::from([1, 75]),
            on: BTreeSet::from([ReasonCode::Lost, ReasonCode::OomKilled]),
        }
    }

    #[test]
    fn nothing_is_retried_by_default() {
        let p = RetryPolicy::default();
        for reason in ReasonCode::ALL {
            assert_eq!(p.next_delay(1, Some(reason), Some(1), 0.5), None);
        }
    }

    #[test]
    fn only_named_exit_codes_and_reasons_are_retried() {
        let p = policy();
        assert!(
            p.next_delay(1, Some(ReasonCode::ExitCode), Some(75), 0.5)
                .is_some()
        );
        assert_eq!(
            p.next_delay(1, Some(ReasonCode::ExitCode), Some(2), 0.5),
            None
        );
        assert!(p.next_delay(1, Some(ReasonCode::Lost), None, 0.5).is_some());
        assert_eq!(
            p.next_delay(1, Some(ReasonCode::TimedOut), Some(143), 0.5),
            None
        );
        assert_eq!(
            p.next_delay(1, Some(ReasonCode::Cancelled), None, 0.5),
            None
        );
        // Success is never retried.
        assert_eq!(p.next_delay(1, None, Some(0), 0.5), None);
    }

    #[test]
    fn backoff_doubles_up_to_its_cap_and_attempts_run_out() {
        let p = policy();
        let at = |n| p.next_delay(n, Some(ReasonCode::ExitCode), Some(1), 0.5);
        assert_eq!(at(1), Some(Duration::from_secs(10)));
        assert_eq!(at(2), Some(Duration::from_secs(20)));
        assert_eq!(at(3), Some(Duration::from_secs(25)));
        assert_eq!(at(4), None);
    }

    #[test]
    fn jitter_spreads_within_twenty_percent() {
        let p = policy();
        let low = p.next_delay(1, Some(ReasonCode::Lost), None, 0.0).unwrap();
        let high = p
            .next_delay(1, Some(ReasonCode::Lost), None, 0.999)
            .unwrap();
        assert_eq!(low, Duration::from_secs(8));
        assert!(high > Duration::from_millis(11_900) && high <= Duration::from_secs(12));
    }
}
