//! The store's part for schedules: slots (each fired or skipped once), the scheduler's
//! cursors and the pauses.

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, Utc};

use super::{NewRun, StoreError};
use crate::domain::run::RunId;
use crate::domain::schedule::{Overlap, SkipReason};

/// A slot as the scheduler hands it to the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotKey {
    pub job: String,
    pub schedule: String,
    /// The slot's identity within the schedule (see `domain::schedule::PlannedSlot`).
    pub nominal: DateTime<Utc>,
}

/// How a slot ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotOutcome {
    Fired(RunId),
    Skipped(SkipReason),
}

/// A slot the store has accounted for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotRecord {
    pub key: SlotKey,
    pub fire_at: DateTime<Utc>,
    pub business_date: NaiveDate,
    pub outcome: SlotOutcome,
    /// Words for a person, e.g. which run was active for an overlap skip.
    pub detail: Option<String>,
    pub recorded_at: DateTime<Utc>,
}

/// What `fire_slot` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FireResult {
    /// The run is stored with its outbox row (or waiting for admission) and the slot.
    Fired(RunId),
    /// The overlap policy said no: the slot is recorded as skipped (`overlap`).
    SkippedOverlap,
    /// The slot was accounted for already (another scheduler, an earlier try, a backfill).
    AlreadyAccounted(SlotOutcome),
}

/// What `Schedules::fire_slot` did, with the runs a `cancel_other` firing cancelled or
/// asked to stop (so whoever watches them can be told).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Firing {
    pub result: FireResult,
    pub cancelled: Vec<RunId>,
}

/// A schedule paused at run time (kept across restarts and reloads).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pause {
    pub note: Option<String>,
    pub at: DateTime<Utc>,
}

/// How far a schedule's slots have been looked at, and under which definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    /// Slots with fire times up to here are accounted for (or, after a change of
    /// definition, were never the schedule's).
    pub evaluated_until: DateTime<Utc>,
    /// The fingerprint of the schedule's definition (its rule, zone, calendar...) the
    /// cursor was set under, as the scheduler wrote it; `None` for a cursor kept from
    /// before definitions were recorded.
    pub definition: Option<String>,
}

/// Schedule slots, scheduler cursors and pauses.
#[async_trait]
pub trait Schedules: Send + Sync + 'static {
    /// In one transaction: unless the slot is accounted for already, read the job's
    /// active runs, decide by `overlap` (`domain::schedule::decide_overlap`), and store
    /// the slot as fired with the run and its outbox row (cancelling the other runs for
    /// `cancel_other`), or as skipped (`overlap`). A buffered firing's run waits with
    /// `Admission::Alone`; otherwise the run keeps its own admission rule.
    async fn fire_slot(
        &self,
        slot: &SlotKey,
        fire_at: DateTime<Utc>,
        business_date: NaiveDate,
        run: &NewRun,
        overlap: Overlap,
        now: DateTime<Utc>,
    ) -> Result<Firing, StoreError>;
    /// A backfill's firing, in one transaction: unless the slot fired already, store the
    /// run (its admission as given: the job's `max_concurrent`, no overlap rule) with its
    /// outbox row and the slot as fired, replacing a record of it as skipped. A slot
    /// that fired is `AlreadyAccounted(Fired(run))` and nothing is written.
    async fn backfill_slot(
        &self,
        slot: &SlotKey,
        fire_at: DateTime<Utc>,
        business_date: NaiveDate,
        run: &NewRun,
        now: DateTime<Utc>,
    ) -> Result<FireResult, StoreError>;
    /// Record a slot as skipped, unless it is accounted for already (then `false`).
    async fn skip_slot(
        &self,
        slot: &SlotKey,
        fire_at: DateTime<Utc>,
        business_date: NaiveDate,
        reason: SkipReason,
        detail: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError>;
    /// The job's slots (of one schedule, or all), newest nominal instant first.
    async fn slots(
        &self,
        job: &str,
        schedule: Option<&str>,
        limit: u32,
    ) -> Result<Vec<SlotRecord>, StoreError>;
    /// Slots of a schedule with nominal instants in `[from, to]`, oldest first.
    async fn slots_between(
        &self,
        job: &str,
        schedule: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<SlotRecord>, StoreError>;
    /// Up to when the schedule's slots have been looked at, and under which definition
    /// (`None`: never).
    async fn cursor(&self, job: &str, schedule: &str) -> Result<Option<Cursor>, StoreError>;
    /// Move the cursor forward to `to` (never back: several schedulers may share a
    /// store), keeping its definition. A cursor it creates has none.
    async fn advance_cursor(
        &self,
        job: &str,
        schedule: &str,
        to: DateTime<Utc>,
    ) -> Result<(), StoreError>;
    /// Record `definition` as the one the schedule's cursor is under, and move the
    /// cursor to `to` unless it is further already (creating it when there is none).
    /// The scheduler calls it on a schedule's first sight and when its definition
    /// changed (`to` = now: slots before the change are not planned), and to adopt a
    /// cursor without a definition (`to` = the cursor: nothing skipped).
    async fn rebase_cursor(
        &self,
        job: &str,
        schedule: &str,
        definition: &str,
        to: DateTime<Utc>,
    ) -> Result<(), StoreError>;
    async fn pause(&self, job: &str, schedule: &str) -> Result<Option<Pause>, StoreError>;
    /// Pause (`Some`) or resume (`None`) a schedule.
    async fn set_pause(
        &self,
        job: &str,
        schedule: &str,
        pause: Option<&Pause>,
    ) -> Result<(), StoreError>;
}
