//! The public API's schedule JSON: slots a schedule accounted for, the slots it plans,
//! its state (paused or not), pause and backfill bodies. One definition each for the
//! server that writes them and the CLI that reads them.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::domain::ports::{SlotOutcome, SlotRecord};
use crate::domain::schedule::{Moved, PlannedSlot, Rule, ScheduleSpec};

fn time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

/// A slot the store accounted for (`GET /v1/jobs/{job}/slots`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct SlotV1 {
    pub schedule: String,
    /// The nominal instant: the slot's identity.
    pub slot: String,
    pub fire_at: String,
    pub business_date: String,
    /// `fired` or `skipped`.
    pub outcome: String,
    pub run_id: Option<String>,
    /// Why it was skipped: `overlap`, `closed_day`, `suspended`,
    /// `outside_catch_up_window`, `catch_up_limit`, `dst_gap`.
    pub reason: Option<String>,
    pub detail: Option<String>,
    pub recorded_at: String,
}

impl From<&SlotRecord> for SlotV1 {
    fn from(r: &SlotRecord) -> Self {
        let (outcome, run_id, reason) = match &r.outcome {
            SlotOutcome::Fired(id) => ("fired", Some(id.to_string()), None),
            SlotOutcome::Skipped(why) => ("skipped", None, Some(why.as_str().to_owned())),
        };
        SlotV1 {
            schedule: r.key.schedule.clone(),
            slot: time(r.key.nominal),
            fire_at: time(r.fire_at),
            business_date: r.business_date.to_string(),
            outcome: outcome.to_owned(),
            run_id,
            reason,
            detail: r.detail.clone(),
            recorded_at: time(r.recorded_at),
        }
    }
}

/// A slot planned ahead (or covered by a backfill), in UTC and in the schedule's zone.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct PlannedSlotV1 {
    pub schedule: String,
    pub slot: String,
    pub fire_at: String,
    /// `fire_at` in the schedule's zone, with its offset.
    pub fire_at_local: String,
    pub business_date: String,
    /// Why the fire time is not the rule's plain wall time: `dst_gap`,
    /// `dst_fold_second`, `closed_day`.
    pub moved: Option<String>,
    /// For `closed_day`: the (closed) date the slot was moved from.
    pub moved_from: Option<String>,
    /// Set when the slot will not fire (`closed_day`, `dst_gap`).
    pub skip: Option<String>,
}

impl PlannedSlotV1 {
    pub fn new(schedule: &ScheduleSpec, slot: &PlannedSlot) -> Self {
        let zone = schedule.time_zone;
        let (moved, moved_from) = match slot.moved {
            None => (None, None),
            Some(Moved::DstGap) => (Some("dst_gap"), None),
            Some(Moved::DstFoldSecond) => (Some("dst_fold_second"), None),
            Some(Moved::ClosedDay { from }) => (Some("closed_day"), Some(from.to_string())),
        };
        PlannedSlotV1 {
            schedule: schedule.name.clone(),
            slot: time(slot.nominal),
            fire_at: time(slot.fire_at),
            fire_at_local: slot
                .fire_at
                .with_timezone(&zone)
                .to_rfc3339_opts(SecondsFormat::AutoSi, false),
            business_date: slot.business_date.to_string(),
            moved: moved.map(str::to_owned),
            moved_from,
            skip: slot.skip.map(|r| r.as_str().to_owned()),
        }
    }
}

/// A schedule as it stands (`GET /v1/jobs/{job}/schedules`, pause and resume answers).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct ScheduleStateV1 {
    pub name: String,
    /// The cron expression, or `open_days_of_month [1, -1] at 02:30`.
    pub rule: String,
    pub time_zone: String,
    pub calendar: Option<String>,
    pub overlap: String,
    pub catch_up: String,
    /// Paused at run time or by `suspended = true` in the job file.
    pub paused: bool,
    pub suspended: bool,
    pub pause_note: Option<String>,
    pub paused_at: Option<String>,
    pub next: Vec<PlannedSlotV1>,
}

/// The words for a schedule's rule, as the API and CLI show it.
pub fn rule_text(spec: &ScheduleSpec) -> String {
    match &spec.rule {
        Rule::Cron(cron) => cron.expression.clone(),
        Rule::OpenDaysOfMonth { days, at } => {
            format!("open_days_of_month {days:?} at {}", at.format("%H:%M:%S"))
        }
    }
}

pub fn overlap_text(o: crate::domain::schedule::Overlap) -> &'static str {
    use crate::domain::schedule::Overlap::*;
    match o {
        Skip => "skip",
        BufferOne => "buffer_one",
        BufferAll => "buffer_all",
        CancelOther => "cancel_other",
        Allow => "allow",
    }
}

pub fn catch_up_text(c: crate::domain::schedule::CatchUp) -> &'static str {
    use crate::domain::schedule::CatchUp::*;
    match c {
        None => "none",
        Latest => "latest",
        All => "all",
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct SchedulesV1 {
    pub job: String,
    pub schedules: Vec<ScheduleStateV1>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct SlotsV1 {
    pub job: String,
    /// Newest first.
    pub slots: Vec<SlotV1>,
    /// The next slots of each schedule (or of the one asked for), soonest first.
    #[serde(default)]
    pub planned: Vec<PlannedSlotV1>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PauseRequestV1 {
    #[serde(default)]
    pub note: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BackfillRequestV1 {
    /// RFC 3339; slots whose fire time is in `[from, to]`.
    #[schema(format = DateTime)]
    pub from: String,
    #[schema(format = DateTime)]
    pub to: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct BackfilledSlotV1 {
    pub slot: String,
    pub fire_at: String,
    pub business_date: String,
    pub run_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct BackfillV1 {
    pub job: String,
    pub schedule: String,
    pub fired: Vec<BackfilledSlotV1>,
    pub already_fired: Vec<BackfilledSlotV1>,
    pub not_firing: Vec<PlannedSlotV1>,
}

impl BackfilledSlotV1 {
    pub fn new(slot: &PlannedSlot, run_id: &crate::domain::run::RunId) -> Self {
        BackfilledSlotV1 {
            slot: time(slot.nominal),
            fire_at: time(slot.fire_at),
            business_date: slot.business_date.to_string(),
            run_id: run_id.to_string(),
        }
    }
}
