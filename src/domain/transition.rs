//! Which state changes a run and its attempts may make, decided from their current state.
//! A store reads the rows inside its write transaction, asks here, and applies the
//! answer: the rules live in one place, not in the `WHERE` clauses of each backend.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::retry::RetryPolicy;
use super::run::{Outcome, ReasonCode, RunStatus};
use super::store::{CancelResult, Lease, RetryResult};

/// A run as the rules need to see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunState {
    pub status: RunStatus,
    /// The current attempt; 0 while the first has not been claimed.
    pub attempt: u32,
    pub cancel_requested: bool,
    /// A retry's backoff.
    pub not_before: Option<DateTime<Utc>>,
}

impl RunState {
    /// A worker may claim attempt `attempt`: the run waits for exactly that attempt, no
    /// cancel came, and its backoff is over.
    pub fn may_claim(&self, attempt: u32, now: DateTime<Utc>) -> bool {
        self.status.can_become(RunStatus::Running)
            && self.attempt.checked_add(1) == Some(attempt)
            && !self.cancel_requested
            && self.not_before.is_none_or(|t| t <= now)
    }

    /// The run is running attempt `attempt` (not an earlier or later one).
    pub fn runs_attempt(&self, attempt: u32) -> bool {
        self.status == RunStatus::Running && self.attempt == attempt
    }

    /// What a cancel does: a run that has not started ends at once (`Cancelled`, and
    /// its pending publish is dropped); a running one is flagged for its worker
    /// (`Requested`); a final one stays as it is.
    pub fn cancel(&self) -> CancelResult {
        match self.status {
            _ if self.status.is_final() => CancelResult::AlreadyFinal(self.status),
            RunStatus::Queued => CancelResult::Cancelled,
            _ => CancelResult::Requested,
        }
    }

    /// What a person's retry does: only a run that ended without success and without a
    /// cancel gets a new attempt.
    pub fn retry(&self) -> RetryResult {
        if self.status.is_final() && self.status.can_become(RunStatus::Queued) {
            RetryResult::Queued {
                attempt: self.attempt.saturating_add(1),
            }
        } else {
            RetryResult::NotRetryable(self.status)
        }
    }

    /// What giving back attempt `attempt` (never started) does to the run: queued again
    /// under the same number, or ended when a cancel came meanwhile. `None` when the
    /// run has moved on and is left alone.
    pub fn release(&self, attempt: u32) -> Option<Released> {
        if !self.runs_attempt(attempt) {
            return None;
        }
        Some(if self.cancel_requested {
            Released::Cancelled(Ending::cancelled_before_start())
        } else {
            Released::Requeued
        })
    }
}

/// What a released attempt leaves the run as.
#[derive(Debug, Clone, PartialEq)]
pub enum Released {
    /// Queued again under the same attempt number, as if never claimed.
    Requeued,
    Cancelled(Ending),
}

/// An attempt as the rules need to see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptState {
    pub worker_id: String,
    pub epoch: i64,
    pub status: RunStatus,
    /// A container was started for it.
    pub started: bool,
    pub lease_expires_at: DateTime<Utc>,
}

impl AttemptState {
    /// Writes under `lease` (start, heartbeat, finish) are accepted: its epoch is the
    /// attempt's and the attempt still runs.
    pub fn held_under(&self, lease: Lease) -> bool {
        self.epoch == lease.epoch && self.status == RunStatus::Running
    }

    /// The same worker claiming again an attempt it holds but has not started (its
    /// first answer got lost on the way) gets the same lease back.
    pub fn reclaimable_by(&self, worker_id: &str) -> bool {
        self.worker_id == worker_id && self.status == RunStatus::Running && !self.started
    }

    /// Only an attempt that never started a container can be given back.
    pub fn releasable_under(&self, lease: Lease) -> bool {
        self.held_under(lease) && !self.started
    }

    /// A worker that found this attempt's container may carry on with it while the
    /// attempt is still its own and running.
    pub fn adoptable_by(&self, worker_id: &str) -> bool {
        self.worker_id == worker_id && self.status == RunStatus::Running
    }

    /// The attempt runs under `worker_id` (its container is not an orphan yet).
    pub fn running_under(&self, worker_id: &str) -> bool {
        self.adoptable_by(worker_id)
    }

    pub fn lease_expired(&self, now: DateTime<Utc>) -> bool {
        self.status == RunStatus::Running && self.lease_expires_at < now
    }

    /// How an attempt whose lease ran out ends: `cancelled` if a cancel was asked for
    /// (the worker was told to stop it), else `lost` (the outcome is unknown).
    pub fn expired_ending(&self, cancel_requested: bool) -> Ending {
        let (worker, expired) = (&self.worker_id, self.lease_expires_at.to_rfc3339());
        if cancel_requested {
            Ending {
                status: RunStatus::Cancelled,
                exit_code: None,
                reason: Some(format!(
                    "cancelled; worker {worker} stopped renewing its lease (expired {expired}) before reporting the container stopped"
                )),
                reason_code: Some(ReasonCode::Cancelled),
            }
        } else {
            Ending {
                status: RunStatus::Lost,
                exit_code: None,
                reason: Some(format!(
                    "lost: worker {worker} stopped renewing its lease (expired {expired}); the container's outcome is unknown"
                )),
                reason_code: Some(ReasonCode::Lost),
            }
        }
    }
}

/// How an attempt (or a run that never started) ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Ending {
    pub status: RunStatus,
    pub exit_code: Option<i64>,
    pub reason: Option<String>,
    pub reason_code: Option<ReasonCode>,
}

impl Ending {
    pub fn of(outcome: &Outcome) -> Self {
        Self {
            status: outcome.status(),
            exit_code: outcome.exit_code(),
            reason: outcome.reason(),
            reason_code: outcome.reason_code(),
        }
    }

    pub fn cancelled_before_start() -> Self {
        Self {
            status: RunStatus::Cancelled,
            exit_code: None,
            reason: Some("cancelled before it started".to_owned()),
            reason_code: Some(ReasonCode::Cancelled),
        }
    }
}

/// What an ended attempt makes of its run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    /// The run takes the attempt's ending as its final state.
    Final,
    /// The retry rules ask for another attempt, published from `not_before` on.
    Next {
        attempt: u32,
        not_before: DateTime<Utc>,
    },
}

/// The one rule for an ended attempt: a success or a run a person asked to cancel is
/// final; otherwise the run's retry rules decide. `jitter` is a number in [0, 1).
pub fn settle(
    policy: &RetryPolicy,
    cancel_requested: bool,
    attempt: u32,
    ending: &Ending,
    jitter: f64,
    now: DateTime<Utc>,
) -> Settlement {
    if cancel_requested || ending.status == RunStatus::Succeeded {
        return Settlement::Final;
    }
    match policy.next_delay(attempt, ending.reason_code, ending.exit_code, jitter) {
        None => Settlement::Final,
        Some(delay) => Settlement::Next {
            attempt: attempt.saturating_add(1),
            not_before: after(now, delay),
        },
    }
}

fn after(now: DateTime<Utc>, delay: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(delay)
        .ok()
        .and_then(|d| now.checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::run::RunId;

    fn t(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap_or_default()
    }

    fn run(status: RunStatus, attempt: u32) -> RunState {
        RunState {
            status,
            attempt,
            cancel_requested: false,
            not_before: None,
        }
    }

    fn attempt(epoch: i64, status: RunStatus, started: bool) -> AttemptState {
        AttemptState {
            worker_id: "w1".into(),
            epoch,
            status,
            started,
            lease_expires_at: t(30),
        }
    }

    fn lease(epoch: i64) -> Lease {
        Lease {
            run_id: RunId::new(),
            attempt: 1,
            epoch,
        }
    }

    #[test]
    fn only_the_awaited_attempt_of_a_queued_run_past_its_backoff_is_claimable() {
        assert!(run(RunStatus::Queued, 0).may_claim(1, t(0)));
        assert!(!run(RunStatus::Queued, 0).may_claim(2, t(0)));
        assert!(!run(RunStatus::Queued, 0).may_claim(0, t(0)));
        assert!(!run(RunStatus::Running, 0).may_claim(1, t(0)));
        let waiting = RunState {
            not_before: Some(t(10)),
            ..run(RunStatus::Queued, 1)
        };
        assert!(!waiting.may_claim(2, t(9)));
        assert!(waiting.may_claim(2, t(10)));
        let cancelled = RunState {
            cancel_requested: true,
            ..run(RunStatus::Queued, 0)
        };
        assert!(!cancelled.may_claim(1, t(0)));
    }

    #[test]
    fn cancel_ends_a_queued_run_flags_a_running_one_and_leaves_a_final_one() {
        for status in RunStatus::ALL {
            let result = run(status, 1).cancel();
            match status {
                RunStatus::Queued => assert_eq!(result, CancelResult::Cancelled),
                RunStatus::Running => assert_eq!(result, CancelResult::Requested),
                _ => assert_eq!(result, CancelResult::AlreadyFinal(status)),
            }
            if result != CancelResult::AlreadyFinal(status) {
                assert!(status.can_become(RunStatus::Cancelled));
            }
        }
    }

    #[test]
    fn a_person_may_retry_only_failed_timed_out_and_lost_runs() {
        for status in RunStatus::ALL {
            let result = run(status, 2).retry();
            if matches!(
                status,
                RunStatus::Failed | RunStatus::TimedOut | RunStatus::Lost
            ) {
                assert_eq!(result, RetryResult::Queued { attempt: 3 });
            } else {
                assert_eq!(result, RetryResult::NotRetryable(status));
            }
        }
    }

    #[test]
    fn writes_need_the_current_epoch_of_a_running_attempt() {
        assert!(attempt(3, RunStatus::Running, true).held_under(lease(3)));
        assert!(!attempt(3, RunStatus::Running, true).held_under(lease(2)));
        assert!(!attempt(3, RunStatus::Lost, true).held_under(lease(3)));
        assert!(attempt(3, RunStatus::Running, false).releasable_under(lease(3)));
        assert!(!attempt(3, RunStatus::Running, true).releasable_under(lease(3)));
        assert!(attempt(3, RunStatus::Running, false).reclaimable_by("w1"));
        assert!(!attempt(3, RunStatus::Running, false).reclaimable_by("w2"));
        assert!(!attempt(3, RunStatus::Running, true).reclaimable_by("w1"));
        assert!(attempt(3, RunStatus::Running, true).adoptable_by("w1"));
        assert!(!attempt(3, RunStatus::Failed, true).adoptable_by("w1"));
    }

    #[test]
    fn a_released_attempt_requeues_its_run_unless_a_cancel_came() {
        assert_eq!(
            run(RunStatus::Running, 1).release(1),
            Some(Released::Requeued)
        );
        assert_eq!(run(RunStatus::Running, 2).release(1), None);
        let cancelled = RunState {
            cancel_requested: true,
            ..run(RunStatus::Running, 1)
        };
        assert_eq!(
            cancelled.release(1),
            Some(Released::Cancelled(Ending::cancelled_before_start()))
        );
    }

    #[test]
    fn an_expired_lease_is_lost_unless_a_cancel_was_asked_for() {
        let a = attempt(1, RunStatus::Running, true);
        assert!(!a.lease_expired(t(30)));
        assert!(a.lease_expired(t(31)));
        let lost = a.expired_ending(false);
        assert_eq!(lost.status, RunStatus::Lost);
        assert_eq!(lost.reason_code, Some(ReasonCode::Lost));
        assert!(lost.reason.unwrap_or_default().contains("w1"));
        assert_eq!(a.expired_ending(true).status, RunStatus::Cancelled);
        assert!(RunStatus::Running.can_become(lost.status));
    }

    #[test]
    fn settle_retries_by_the_rules_but_never_a_success_or_a_cancel() {
        let policy = RetryPolicy {
            max_attempts: 3,
            backoff: Duration::from_secs(10),
            on_exit_codes: [1].into(),
            ..RetryPolicy::default()
        };
        let failed = Ending::of(&Outcome::Exited { code: 1 });
        assert_eq!(
            settle(&policy, false, 1, &failed, 0.5, t(0)),
            Settlement::Next {
                attempt: 2,
                not_before: t(10)
            }
        );
        assert_eq!(
            settle(&policy, true, 1, &failed, 0.5, t(0)),
            Settlement::Final
        );
        assert_eq!(
            settle(&policy, false, 3, &failed, 0.5, t(0)),
            Settlement::Final
        );
        let ok = Ending::of(&Outcome::Exited { code: 0 });
        assert_eq!(settle(&policy, false, 1, &ok, 0.5, t(0)), Settlement::Final);
    }
}
