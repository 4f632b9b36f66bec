//! What services tell an observer (the metrics) as runs and workers move, and what the
//! store counts for it when asked. Ports only: services call them without knowing what
//! listens, and every method has a no-op default so [`NoObserver`] is the whole of a
//! process that does not count.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::run::{Run, RunStatus, Trigger};
use super::store::StoreError;

/// The control plane's events, each called once per event in this process (after the
/// store committed it), with the run as the store had it right after.
pub trait RunObserver: Send + Sync + 'static {
    /// A new run was stored (an idempotent repeat is not one), by any door.
    fn run_accepted(&self, _job: &str, _trigger: &Trigger) {}
    /// Attempt `attempt` of `run` was claimed by a worker.
    fn attempt_claimed(&self, _run: &Run, _attempt: u32) {}
    /// Attempt `attempt` of `run` ended (its worker reported, or its lease expired).
    /// The run may have become final with it: see [`ended_run`].
    fn attempt_ended(&self, _run: &Run, _attempt: u32) {}
    /// The run became final with no attempt ending: cancelled while it waited.
    fn run_ended(&self, _run: &Run) {}
}

/// A worker process's events.
pub trait WorkerObserver: Send + Sync + 'static {
    /// How many of its slots hold an attempt now, of how many.
    fn slots(&self, _busy: usize, _capacity: usize) {}
}

/// Observes nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoObserver;

impl RunObserver for NoObserver {}
impl WorkerObserver for NoObserver {}

/// The run, if attempt `attempt`'s end made it final (a retry by rule leaves it queued;
/// a person's retry since makes it another attempt's business).
pub fn ended_run(run: &Run, attempt: u32) -> Option<&Run> {
    (run.status.is_final() && run.attempt == attempt).then_some(run)
}

/// Whether a run a schedule's `cancel_other` named was cancelled while it waited: a
/// running one is asked to stop and ends through its attempt (whose status is then
/// `cancelled`), and no attempt before a cancel ends `cancelled`, since a cancelled run
/// is never retried.
pub fn cancelled_waiting(run: &Run) -> bool {
    run.status == RunStatus::Cancelled
        && run
            .attempts
            .last()
            .is_none_or(|a| a.status != RunStatus::Cancelled)
}

/// From acceptance to the first claim: admission and queue together. `None` before
/// the first claim.
pub fn queue_wait(run: &Run) -> Option<Duration> {
    let first = run.attempts.first()?;
    (first.claimed_at - run.created_at).to_std().ok()
}

/// From the first claim to the final state, over every attempt and backoff. `None`
/// for a run not final or never claimed (so queue wait plus duration is the whole).
pub fn run_duration(run: &Run) -> Option<Duration> {
    let first = run.attempts.first()?;
    let end = run.finished_at.filter(|_| run.status.is_final())?;
    (end - first.claimed_at).to_std().ok()
}

/// Runs of one job in one not-final state, as the store counts them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveRuns {
    pub job: String,
    pub status: RunStatus,
    pub count: u64,
}

/// Work the store holds for relays: due publishes, callbacks, replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Backlogs {
    /// Outbox rows due and not confirmed by the queue.
    pub outbox: u64,
    /// Of those, the ones a publish already failed for.
    pub outbox_failed: u64,
    /// Callback deliveries neither delivered nor given up.
    pub callbacks: u64,
    /// Replies to queue producers due and not confirmed.
    pub replies: u64,
}

/// What the store counts for a scrape: indexed reads, cheap enough for every scrape.
#[async_trait]
pub trait StoreGauges: Send + Sync + 'static {
    /// Runs `queued` or `running`, by job and status.
    async fn active_runs(&self) -> Result<Vec<ActiveRuns>, StoreError>;
    async fn backlogs(&self, now: DateTime<Utc>) -> Result<Backlogs, StoreError>;
    /// Each job's latest success still kept. Heavier (it reads every kept success), so
    /// read once, after which the observer keeps it.
    async fn last_successes(&self) -> Result<Vec<(String, DateTime<Utc>)>, StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::run::{Attempt, RunId};
    use chrono::TimeZone;

    fn at(s: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + s, 0).unwrap()
    }

    fn attempt(number: u32, status: RunStatus, claimed: i64) -> Attempt {
        Attempt {
            output_gap: false,
            number,
            status,
            worker_id: "w".into(),
            worker_build: None,
            container_id: None,
            exit_code: None,
            reason: None,
            reason_code: None,
            claimed_at: at(claimed),
            started_at: None,
            finished_at: None,
            log_dropped_bytes: 0,
            usage: None,
        }
    }

    fn run(status: RunStatus, attempts: Vec<Attempt>, finished: Option<i64>) -> Run {
        Run {
            output_gap: false,
            id: RunId::new(),
            job: "j".into(),
            params: Default::default(),
            status,
            trigger: Trigger::Api,
            attempt: attempts.len() as u32,
            exit_code: None,
            reason: None,
            reason_code: None,
            created_at: at(0),
            started_at: None,
            finished_at: finished.map(at),
            cancel_requested: false,
            not_before: None,
            log_dropped_bytes: 0,
            attempts,
            callbacks: Vec::new(),
            requested_by: None,
            replies: Vec::new(),
        }
    }

    #[test]
    fn wait_and_duration_split_a_run_at_its_first_claim() {
        let r = run(
            RunStatus::Succeeded,
            vec![
                attempt(1, RunStatus::Failed, 7),
                attempt(2, RunStatus::Succeeded, 40),
            ],
            Some(100),
        );
        assert_eq!(queue_wait(&r), Some(Duration::from_secs(7)));
        assert_eq!(run_duration(&r), Some(Duration::from_secs(93)));
        let waiting = run(RunStatus::Queued, vec![], None);
        assert_eq!((queue_wait(&waiting), run_duration(&waiting)), (None, None));
        let cancelled = run(RunStatus::Cancelled, vec![], Some(5));
        assert_eq!(run_duration(&cancelled), None);
    }

    #[test]
    fn an_attempt_ends_its_run_only_when_it_is_the_runs_last_and_final() {
        let retried = run(
            RunStatus::Queued,
            vec![attempt(1, RunStatus::Failed, 1)],
            None,
        );
        assert!(ended_run(&retried, 1).is_none());
        let done = run(
            RunStatus::Failed,
            vec![attempt(1, RunStatus::Failed, 1)],
            Some(9),
        );
        assert!(ended_run(&done, 1).is_some());
        assert!(ended_run(&done, 2).is_none());
    }

    #[test]
    fn cancelled_waiting_tells_a_queued_cancel_from_a_stopped_attempt() {
        let queued = run(RunStatus::Cancelled, vec![], Some(3));
        assert!(cancelled_waiting(&queued));
        let after_failure = run(
            RunStatus::Cancelled,
            vec![attempt(1, RunStatus::Failed, 1)],
            Some(3),
        );
        assert!(cancelled_waiting(&after_failure));
        let stopped = run(
            RunStatus::Cancelled,
            vec![attempt(1, RunStatus::Cancelled, 1)],
            Some(3),
        );
        assert!(!cancelled_waiting(&stopped));
        let running = run(
            RunStatus::Running,
            vec![attempt(1, RunStatus::Running, 1)],
            None,
        );
        assert!(!cancelled_waiting(&running));
    }
}
