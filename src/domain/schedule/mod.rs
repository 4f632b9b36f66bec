//! Schedules: when a job fires, in which time zone and calendar, and what a firing does
//! when it is late (catch-up) or when a run of the job is still active (overlap).
//!
//! A firing is a *slot*: (job, schedule name, nominal instant). The nominal instant is
//! the slot's identity, whatever moves its fire time (a DST gap, a closed day); the
//! store keeps each slot under a unique key, so a slot fires at most once however many
//! schedulers look at it. Everything here is pure: the scheduler service feeds it the
//! time, and the store applies what it decides.

mod calendar;
mod catch_up;
mod dst;
mod names;
mod slots;
#[cfg(test)]
mod slots_tests;

pub use calendar::Calendar;
pub use catch_up::{DuePlan, plan_due};
pub use slots::{ITERATION_BUDGET, SHIFT_DAYS_CAP, SlotPage, UPCOMING_HORIZON_DAYS};

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, NaiveTime, Utc};

use super::job::Schedule as CronSchedule;

/// The name of the one-schedule shorthand (`schedule = "..."` in a job file).
pub const DEFAULT_SCHEDULE_NAME: &str = "default";

/// What a schedule's wall-clock times come from.
// One per schedule, and few schedules: boxing the cron variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Rule {
    /// A cron expression (crontab syntax, 5 or 6 fields), read in the schedule's zone.
    Cron(CronSchedule),
    /// The n-th open day of each month (1 = first, -1 = last) at a wall-clock time, in
    /// the schedule's calendar and zone.
    OpenDaysOfMonth { days: Vec<i32>, at: NaiveTime },
}

/// What a slot on a closed day does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnClosedDay {
    #[default]
    Skip,
    PreviousOpen,
    NextOpen,
    Run,
}

/// A wall-clock time that does not exist (clocks spring forward).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnGap {
    /// Fire once, at the first instant after the gap.
    #[default]
    Shift,
    /// Do not fire; the slot is recorded as skipped (`dst_gap`).
    Skip,
}

/// A wall-clock time that occurs twice (clocks fall back).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnFold {
    /// Fire once, at the first occurrence.
    #[default]
    First,
    /// Fire at both occurrences (two slots).
    Both,
}

/// What a firing does while a run of the job is active (queued or running).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overlap {
    /// Do not start; the slot is recorded as skipped (`overlap`).
    #[default]
    Skip,
    /// Start after the active runs end; at most one such run waits, later ones skip.
    BufferOne,
    /// Start after the active runs end, every one of them, in order.
    BufferAll,
    /// Cancel the active runs, then start.
    CancelOther,
    /// Start anyway (still subject to the job's `max_concurrent`).
    Allow,
}

/// What happens to slots whose fire time passed while no scheduler was running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CatchUp {
    /// Missed slots are recorded as skipped.
    None,
    /// The most recent missed slot fires, the others are skipped.
    #[default]
    Latest,
    /// Missed slots fire oldest first, at most `max_catch_up` of them.
    All,
}

/// Why a slot did not fire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SkipReason {
    Overlap,
    ClosedDay,
    Suspended,
    OutsideCatchUpWindow,
    CatchUpLimit,
    /// The wall-clock time does not exist that day and the schedule says `on_gap = "skip"`.
    DstGap,
}

impl SkipReason {
    pub const ALL: [SkipReason; 6] = [
        SkipReason::Overlap,
        SkipReason::ClosedDay,
        SkipReason::Suspended,
        SkipReason::OutsideCatchUpWindow,
        SkipReason::CatchUpLimit,
        SkipReason::DstGap,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::Overlap => "overlap",
            SkipReason::ClosedDay => "closed_day",
            SkipReason::Suspended => "suspended",
            SkipReason::OutsideCatchUpWindow => "outside_catch_up_window",
            SkipReason::CatchUpLimit => "catch_up_limit",
            SkipReason::DstGap => "dst_gap",
        }
    }

    pub fn parse(s: &str) -> Option<SkipReason> {
        SkipReason::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One schedule of a job, as loaded from its file.
#[derive(Debug, Clone)]
pub struct ScheduleSpec {
    /// Unique within the job; the shorthand's is [`DEFAULT_SCHEDULE_NAME`].
    pub name: String,
    pub rule: Rule,
    pub time_zone: chrono_tz::Tz,
    /// Fixed parameter values for the runs it starts (validated against the job's).
    pub params: BTreeMap<String, String>,
    pub calendar: Option<Arc<Calendar>>,
    pub on_closed_day: OnClosedDay,
    /// How many days a closed-day shift may move a slot; further is `closed_day`.
    pub max_shift_days: u32,
    pub on_gap: OnGap,
    pub on_fold: OnFold,
    pub overlap: Overlap,
    pub catch_up: CatchUp,
    pub catch_up_window: Duration,
    pub max_catch_up: u32,
    /// Paused from the job file (`suspended = true`).
    pub suspended: bool,
}

impl ScheduleSpec {
    pub const DEFAULT_MAX_SHIFT_DAYS: u32 = 7;
    pub const DEFAULT_CATCH_UP_WINDOW: Duration = Duration::from_secs(24 * 3600);
    pub const DEFAULT_MAX_CATCH_UP: u32 = 100;

    /// A schedule with every policy at its default.
    pub fn new(name: impl Into<String>, rule: Rule, time_zone: chrono_tz::Tz) -> ScheduleSpec {
        ScheduleSpec {
            name: name.into(),
            rule,
            time_zone,
            params: BTreeMap::new(),
            calendar: None,
            on_closed_day: OnClosedDay::default(),
            max_shift_days: Self::DEFAULT_MAX_SHIFT_DAYS,
            on_gap: OnGap::default(),
            on_fold: OnFold::default(),
            overlap: Overlap::default(),
            catch_up: CatchUp::default(),
            catch_up_window: Self::DEFAULT_CATCH_UP_WINDOW,
            max_catch_up: Self::DEFAULT_MAX_CATCH_UP,
            suspended: false,
        }
    }
}

/// Why a slot's fire time is not its rule's plain wall-clock time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Moved {
    /// The wall-clock time fell in a DST gap and fires at the first instant after it.
    DstGap,
    /// The wall-clock time occurs twice; this is its second occurrence (`on_fold = "both"`).
    DstFoldSecond,
    /// The day was closed in the calendar; the slot fires on another (open) day.
    ClosedDay { from: NaiveDate },
}

/// One slot of a schedule, planned: when it fires and which business date it is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedSlot {
    /// The slot's identity: the instant its rule names (for a DST gap, the instant it
    /// was shifted to, since the named wall time has none).
    pub nominal: DateTime<Utc>,
    /// When it fires: the nominal instant, or another day's for a closed-day shift.
    pub fire_at: DateTime<Utc>,
    /// The calendar date (in the schedule's zone) the slot belongs to, after any shift.
    pub business_date: NaiveDate,
    pub moved: Option<Moved>,
    /// Known when planned: it will not fire (closed day, DST gap skipped).
    pub skip: Option<SkipReason>,
}

/// What the scheduler does with a due slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotAction {
    Fire,
    Skip(SkipReason),
}

/// Runs of a job that a firing has to take into account, read inside the firing's
/// transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Activity {
    /// Runs of the job not final yet (queued, waiting or running).
    pub active: u32,
    /// Of those, runs started by a buffering overlap policy that still wait.
    pub buffered_waiting: u32,
}

/// What a firing does given the job's active runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverlapDecision {
    /// Accept the run now; it starts when the job's `max_concurrent` has room.
    Start,
    /// Accept the run as buffered: it starts only once no other run of the job is active.
    Buffer,
    /// Cancel every active run of the job, then accept this one.
    CancelOthersThenStart,
    Skip,
}

/// The overlap rule, decided from the job's active runs.
pub fn decide_overlap(policy: Overlap, activity: Activity) -> OverlapDecision {
    if activity.active == 0 {
        return OverlapDecision::Start;
    }
    match policy {
        Overlap::Skip => OverlapDecision::Skip,
        Overlap::BufferOne if activity.buffered_waiting > 0 => OverlapDecision::Skip,
        Overlap::BufferOne | Overlap::BufferAll => OverlapDecision::Buffer,
        Overlap::CancelOther => OverlapDecision::CancelOthersThenStart,
        Overlap::Allow => OverlapDecision::Start,
    }
}

/// How many runs of a job may be admitted (handed to workers) at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// No limit: published at once.
    Unlimited,
    /// At most this many admitted and not final (the job's `max_concurrent`).
    AtMost(u32),
    /// Only when no other run of the job is admitted and not final (buffered firings).
    Alone,
}

impl Admission {
    /// May a run waiting under this rule be admitted while `admitted` runs of its job are
    /// admitted and not final?
    pub fn allows(self, admitted: u32) -> bool {
        match self {
            Admission::Unlimited => true,
            Admission::AtMost(n) => admitted < n,
            Admission::Alone => admitted == 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlap_decisions() {
        let idle = Activity::default();
        let busy = Activity {
            active: 1,
            buffered_waiting: 0,
        };
        let buffered = Activity {
            active: 2,
            buffered_waiting: 1,
        };
        use Overlap::*;
        for p in [Skip, BufferOne, BufferAll, CancelOther, Allow] {
            assert_eq!(decide_overlap(p, idle), OverlapDecision::Start, "{p:?}");
        }
        assert_eq!(decide_overlap(Skip, busy), OverlapDecision::Skip);
        assert_eq!(decide_overlap(BufferOne, busy), OverlapDecision::Buffer);
        assert_eq!(decide_overlap(BufferOne, buffered), OverlapDecision::Skip);
        assert_eq!(decide_overlap(BufferAll, buffered), OverlapDecision::Buffer);
        assert_eq!(
            decide_overlap(CancelOther, busy),
            OverlapDecision::CancelOthersThenStart
        );
        assert_eq!(decide_overlap(Allow, busy), OverlapDecision::Start);
    }

    #[test]
    fn admission() {
        assert!(Admission::Unlimited.allows(1000));
        assert!(Admission::AtMost(2).allows(1));
        assert!(!Admission::AtMost(2).allows(2));
        assert!(Admission::Alone.allows(0));
        assert!(!Admission::Alone.allows(1));
    }

    #[test]
    fn skip_reasons_round_trip() {
        for r in SkipReason::ALL {
            assert_eq!(SkipReason::parse(r.as_str()), Some(r));
        }
        assert_eq!(SkipReason::parse("nope"), None);
    }
}
