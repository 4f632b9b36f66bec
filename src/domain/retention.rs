//! What may be forgotten, and when: finished runs past the retention period (with their
//! attempts, keys and logs), schedule slot records as old, idempotency keys past their
//! window, and sent outbox rows that nothing reads any more. The rules are here; the
//! store applies them.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::ports::{IDEMPOTENCY_WINDOW, StoreError};
use super::run::{RunId, RunStatus};

/// How long finished runs are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retention {
    Forever,
    For(Duration),
}

impl Retention {
    /// The `--retention` setting: zero means keep forever.
    pub fn from_setting(keep: Duration) -> Self {
        if keep.is_zero() {
            Retention::Forever
        } else {
            Retention::For(keep)
        }
    }

    /// Runs that finished before this instant may go; `None` keeps everything.
    pub fn cutoff(self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Retention::Forever => None,
            Retention::For(keep) => Some(before(now, keep)),
        }
    }
}

/// `now - d`, saturating at the earliest representable instant.
fn before(now: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(d)
        .ok()
        .and_then(|d| now.checked_sub_signed(d))
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// Keys created before this instant are past their window: `insert_run` would treat
/// them as unused already, so deleting them changes no answer.
pub fn keys_expired_before(now: DateTime<Utc>) -> DateTime<Utc> {
    before(now, IDEMPOTENCY_WINDOW)
}

/// The statuses a run never leaves by itself: only these are ever deleted. (`retry`
/// can take a failed run back to `queued`; deleting it is the retention's promise
/// that nobody will, past the cutoff.)
pub fn prunable_statuses() -> impl Iterator<Item = RunStatus> {
    RunStatus::ALL.into_iter().filter(|s| s.is_final())
}

/// A run may be deleted once it is final and finished before the cutoff.
pub fn run_is_prunable(
    status: RunStatus,
    finished_at: Option<DateTime<Utc>>,
    cutoff: DateTime<Utc>,
) -> bool {
    status.is_final() && finished_at.is_some_and(|t| t < cutoff)
}

/// A sent outbox row is still read only while it is its run's publish of the attempt
/// the run waits for: a volatile queue's restart (`requeue_unclaimed`) and the
/// lost-message sweep (`republish_unclaimed`) publish exactly those rows again, and
/// cancel only touches rows not yet sent. Every way back into `queued` (retry rules,
/// a person's retry, a release) writes a fresh row, so a row that stopped being needed
/// is never needed again. `run` is the run's status and current attempt, `None` when
/// the run is gone.
pub fn sent_outbox_row_is_needed(row_attempt: u32, run: Option<(RunStatus, u32)>) -> bool {
    matches!(run, Some((RunStatus::Queued, attempt)) if attempt.checked_add(1) == Some(row_attempt))
}

/// What retention needs to know of a schedule slot record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotRecordAge {
    pub recorded_at: DateTime<Utc>,
    pub fire_at: DateTime<Utc>,
    /// The status of the run the slot fired, while that run exists; `None` for a
    /// skipped slot or a run already deleted.
    pub run: Option<RunStatus>,
    /// Its schedule's cursor (how far slots have been looked at), if any.
    pub cursor: Option<DateTime<Utc>>,
}

/// A slot record may be deleted once it was recorded before the runs' cutoff, unless
/// its run is still waiting or running (a fired slot keeps its record while its run
/// lives), or the slot lies ahead of its schedule's cursor (a scheduler that has not
/// moved past it yet would plan it again and, its record gone, fire it twice). Behind
/// the cursor nothing plans a slot again; only a person's backfill can.
pub fn slot_record_is_prunable(slot: &SlotRecordAge, cutoff: DateTime<Utc>) -> bool {
    slot.recorded_at < cutoff
        && slot.run.is_none_or(RunStatus::is_final)
        && slot.cursor.is_none_or(|c| slot.fire_at <= c)
}

/// One batch of sent outbox rows looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OutboxPurge {
    pub deleted: u64,
    /// The highest row id looked at; `None` when there were no more rows to look at.
    pub scanned_to: Option<i64>,
    /// The highest row id this pass looks at: the one given, or the newest row's when
    /// none was. Rows written after a pass began wait for the next pass, so a pass
    /// ends however fast new rows arrive.
    pub until: i64,
}

/// A run retention deleted: its attempts' logs are the caller's to delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PrunedRun {
    pub id: RunId,
    /// Attempts it was claimed for (0: never), numbered from 1.
    pub attempts: u32,
}

/// The store as retention needs it. Every call is one short transaction of at most
/// `limit` rows, so the single writer is never held for long.
#[async_trait]
pub trait RetentionStore: Send + Sync + 'static {
    /// Delete up to `limit` idempotency keys created before `created_before`.
    async fn delete_expired_keys(
        &self,
        created_before: DateTime<Utc>,
        limit: u32,
    ) -> Result<u64, StoreError>;
    /// Look at up to `limit` sent outbox rows with ids above `after` and up to `until`
    /// (the newest row's when `None`) and delete those [`sent_outbox_row_is_needed`]
    /// says nothing needs.
    async fn purge_sent_outbox(
        &self,
        after: i64,
        until: Option<i64>,
        limit: u32,
    ) -> Result<OutboxPurge, StoreError>;
    /// Delete up to `limit` runs that are prunable at `finished_before`, with their
    /// attempts, outbox rows and idempotency keys. Returns the deleted runs.
    async fn delete_finished_runs(
        &self,
        finished_before: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<PrunedRun>, StoreError>;
    /// Delete up to `limit` schedule slot records that [`slot_record_is_prunable`] at
    /// `recorded_before`, oldest first. Returns how many went.
    async fn delete_old_slots(
        &self,
        recorded_before: DateTime<Utc>,
        limit: u32,
    ) -> Result<u64, StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(secs, 0).single().unwrap()
    }

    #[test]
    fn zero_retention_keeps_forever_and_others_cut_at_now_minus_it() {
        let now = at(1_000_000);
        assert_eq!(Retention::from_setting(Duration::ZERO), Retention::Forever);
        assert_eq!(Retention::Forever.cutoff(now), None);
        assert_eq!(
            Retention::from_setting(Duration::from_secs(3600)).cutoff(now),
            Some(at(1_000_000 - 3600))
        );
        // Longer than the calendar reaches back: everything finished is old enough.
        assert_eq!(
            Retention::For(Duration::MAX).cutoff(now),
            Some(DateTime::<Utc>::MIN_UTC)
        );
    }

    #[test]
    fn keys_expire_after_the_idempotency_window() {
        assert_eq!(keys_expired_before(at(200_000)), at(200_000 - 24 * 3600));
    }

    #[test]
    fn only_final_runs_finished_before_the_cutoff_are_prunable() {
        let cutoff = at(100);
        for status in RunStatus::ALL {
            let prunable = run_is_prunable(status, Some(at(99)), cutoff);
            assert_eq!(prunable, status.is_final(), "{status:?}");
            assert!(!run_is_prunable(status, Some(at(100)), cutoff));
            assert!(!run_is_prunable(status, None, cutoff));
        }
        let listed: Vec<_> = prunable_statuses().collect();
        assert!(!listed.contains(&RunStatus::Queued) && !listed.contains(&RunStatus::Running));
        assert_eq!(listed.len(), RunStatus::ALL.len() - 2);
    }

    #[test]
    fn a_slot_record_goes_when_old_unless_its_run_lives_or_the_cursor_is_behind_it() {
        let cutoff = at(100);
        let old = SlotRecordAge {
            recorded_at: at(99),
            fire_at: at(50),
            run: None,
            cursor: Some(at(60)),
        };
        assert!(
            slot_record_is_prunable(&old, cutoff),
            "skipped, or run gone"
        );
        assert!(!slot_record_is_prunable(
            &SlotRecordAge {
                recorded_at: cutoff,
                ..old
            },
            cutoff
        ));
        for status in RunStatus::ALL {
            let fired = SlotRecordAge {
                run: Some(status),
                ..old
            };
            assert_eq!(
                slot_record_is_prunable(&fired, cutoff),
                status.is_final(),
                "{status:?}"
            );
        }
        // Ahead of the cursor: a scheduler would plan it again.
        let ahead = SlotRecordAge {
            cursor: Some(at(49)),
            ..old
        };
        assert!(!slot_record_is_prunable(&ahead, cutoff));
        let at_cursor = SlotRecordAge {
            cursor: Some(at(50)),
            ..old
        };
        assert!(slot_record_is_prunable(&at_cursor, cutoff));
        // No cursor: a scheduler seeing the schedule starts from its own now.
        let no_cursor = SlotRecordAge {
            cursor: None,
            ..old
        };
        assert!(slot_record_is_prunable(&no_cursor, cutoff));
    }

    #[test]
    fn a_sent_row_is_needed_only_as_the_waiting_attempts_publish() {
        use RunStatus::*;
        assert!(sent_outbox_row_is_needed(1, Some((Queued, 0))));
        assert!(sent_outbox_row_is_needed(3, Some((Queued, 2))));
        // The attempt moved on, or the run is no longer waiting.
        assert!(!sent_outbox_row_is_needed(1, Some((Queued, 1))));
        assert!(!sent_outbox_row_is_needed(1, Some((Running, 1))));
        assert!(!sent_outbox_row_is_needed(2, Some((Running, 1))));
        for status in [Succeeded, Failed, TimedOut, Cancelled, Lost] {
            assert!(!sent_outbox_row_is_needed(1, Some((status, 0))));
            assert!(!sent_outbox_row_is_needed(1, Some((status, 1))));
        }
        assert!(!sent_outbox_row_is_needed(1, None));
        assert!(!sent_outbox_row_is_needed(0, Some((Queued, u32::MAX))));
    }
}
