//! How the store keeps a run's trigger and admission rule (`runs.trigger`,
//! `runs.admission`). Formats, not rules: the domain types stay free of serde, and any
//! store (SQLite today, PostgreSQL later) writes the same text.

use chrono::{DateTime, NaiveDate, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

use crate::domain::ports::SlotOutcome;
use crate::domain::run::{RunId, Trigger};
use crate::domain::schedule::{Admission, SkipReason};

/// A run's trigger as stored: `{"type":"api"}`, `{"type":"webhook"}` or
/// `{"type":"schedule","schedule":"nightly","slot":"2026-01-01T01:00:00Z",
///   "business_date":"2026-01-01","local_time":"2026-01-01T02:00:00+01:00"}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StoredTriggerV1 {
    Api,
    Schedule {
        schedule: String,
        /// The slot's nominal instant, RFC 3339 UTC.
        slot: String,
        /// `YYYY-MM-DD`.
        business_date: String,
        /// The nominal instant in the schedule's zone (`TASUKI_SCHEDULED_TIME`).
        local_time: String,
    },
    Webhook,
}

/// The slot instant as text, to the millisecond (a slot's identity is kept in ms).
pub fn utc_text(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// A business date as text: `YYYY-MM-DD`.
pub fn date_text(d: NaiveDate) -> String {
    d.format("%Y-%m-%d").to_string()
}

pub fn parse_date(text: &str) -> Result<NaiveDate, String> {
    NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .map_err(|e| format!("`{text}` is no YYYY-MM-DD date: {e}"))
}

impl From<&Trigger> for StoredTriggerV1 {
    fn from(t: &Trigger) -> Self {
        match t {
            Trigger::Api => StoredTriggerV1::Api,
            Trigger::Schedule {
                schedule,
                slot,
                business_date,
                local_time,
            } => StoredTriggerV1::Schedule {
                schedule: schedule.clone(),
                slot: utc_text(*slot),
                business_date: date_text(*business_date),
                local_time: local_time.clone(),
            },
            Trigger::Webhook => StoredTriggerV1::Webhook,
        }
    }
}

impl TryFrom<StoredTriggerV1> for Trigger {
    type Error = String;
    fn try_from(t: StoredTriggerV1) -> Result<Self, String> {
        Ok(match t {
            StoredTriggerV1::Api => Trigger::Api,
            StoredTriggerV1::Schedule {
                schedule,
                slot,
                business_date,
                local_time,
            } => Trigger::Schedule {
                schedule,
                slot: DateTime::parse_from_rfc3339(&slot)
                    .map_err(|e| format!("slot `{slot}`: {e}"))?
                    .with_timezone(&Utc),
                business_date: parse_date(&business_date)?,
                local_time,
            },
            StoredTriggerV1::Webhook => Trigger::Webhook,
        })
    }
}

/// The trigger column's text: `None` (NULL) for the API, as rows from before triggers.
pub fn trigger_text(t: &Trigger) -> Result<Option<String>, serde_json::Error> {
    match t {
        Trigger::Api => Ok(None),
        other => serde_json::to_string(&StoredTriggerV1::from(other)).map(Some),
    }
}

/// Read the trigger column back (NULL is the API).
pub fn parse_trigger(text: Option<&str>) -> Result<Trigger, String> {
    match text {
        None => Ok(Trigger::Api),
        Some(text) => serde_json::from_str::<StoredTriggerV1>(text)
            .map_err(|e| e.to_string())
            .and_then(Trigger::try_from),
    }
}

const AT_MOST: &str = "at_most:";
const ALONE: &str = "alone";

/// The admission column's text: NULL for unlimited, `at_most:N`, `alone`.
pub fn admission_text(a: Admission) -> Option<String> {
    match a {
        Admission::Unlimited => None,
        Admission::AtMost(n) => Some(format!("{AT_MOST}{n}")),
        Admission::Alone => Some(ALONE.to_owned()),
    }
}

/// Read the admission column back.
pub fn parse_admission(text: Option<&str>) -> Result<Admission, String> {
    match text {
        None => Ok(Admission::Unlimited),
        Some(ALONE) => Ok(Admission::Alone),
        Some(t) => t
            .strip_prefix(AT_MOST)
            .and_then(|n| n.parse::<u32>().ok())
            .map(Admission::AtMost)
            .ok_or_else(|| format!("unknown admission `{t}` (expected at_most:N or alone)")),
    }
}

/// A slot's outcome as stored: the `outcome` column (`fired` | `skipped`), the run it
/// started, or why it was skipped (the domain's `SkipReason` text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSlotOutcome {
    pub outcome: &'static str,
    pub run_id: Option<String>,
    pub reason: Option<&'static str>,
}

const FIRED: &str = "fired";
const SKIPPED: &str = "skipped";

impl From<&SlotOutcome> for StoredSlotOutcome {
    fn from(o: &SlotOutcome) -> Self {
        match o {
            SlotOutcome::Fired(id) => Self {
                outcome: FIRED,
                run_id: Some(id.to_string()),
                reason: None,
            },
            SlotOutcome::Skipped(reason) => Self {
                outcome: SKIPPED,
                run_id: None,
                reason: Some(reason.as_str()),
            },
        }
    }
}

/// Read a slot's outcome back from its three columns.
pub fn parse_slot_outcome(
    outcome: &str,
    run_id: Option<&str>,
    reason: Option<&str>,
) -> Result<SlotOutcome, String> {
    match (outcome, run_id, reason) {
        (FIRED, Some(id), _) => id
            .parse::<RunId>()
            .map(SlotOutcome::Fired)
            .map_err(|e| e.to_string()),
        (SKIPPED, _, Some(reason)) => SkipReason::parse(reason)
            .map(SlotOutcome::Skipped)
            .ok_or_else(|| format!("unknown skip reason `{reason}`")),
        _ => Err(format!(
            "slot outcome `{outcome}` with run {run_id:?} and reason {reason:?}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn scheduled() -> Trigger {
        Trigger::Schedule {
            schedule: "nightly".to_owned(),
            slot: Utc.with_ymd_and_hms(2026, 1, 1, 1, 0, 0).unwrap(),
            business_date: NaiveDate::from_ymd_opt(2026, 1, 1).unwrap(),
            local_time: "2026-01-01T02:00:00+01:00".to_owned(),
        }
    }

    /// The stored text is a format: frozen here.
    #[test]
    fn stored_trigger_is_frozen_and_round_trips() {
        assert_eq!(trigger_text(&Trigger::Api).unwrap(), None);
        let text = trigger_text(&scheduled()).unwrap().unwrap();
        assert_eq!(
            text,
            r#"{"type":"schedule","schedule":"nightly","slot":"2026-01-01T01:00:00.000Z","business_date":"2026-01-01","local_time":"2026-01-01T02:00:00+01:00"}"#
        );
        assert_eq!(parse_trigger(Some(&text)).unwrap(), scheduled());
        assert_eq!(parse_trigger(None).unwrap(), Trigger::Api);
        assert_eq!(
            parse_trigger(Some(r#"{"type":"api"}"#)).unwrap(),
            Trigger::Api
        );
        assert_eq!(
            trigger_text(&Trigger::Webhook).unwrap().as_deref(),
            Some(r#"{"type":"webhook"}"#)
        );
        assert_eq!(
            parse_trigger(Some(r#"{"type":"webhook"}"#)).unwrap(),
            Trigger::Webhook
        );
        assert!(parse_trigger(Some(r#"{"type":"cron"}"#)).is_err());
        assert!(
            parse_trigger(Some(
                r#"{"type":"schedule","schedule":"n","slot":"x","business_date":"2026-01-01","local_time":""}"#
            ))
            .is_err()
        );
    }

    #[test]
    fn slot_outcomes_round_trip() {
        let fired = SlotOutcome::Fired(RunId::new());
        for o in [fired, SlotOutcome::Skipped(SkipReason::Overlap)] {
            let s = StoredSlotOutcome::from(&o);
            assert_eq!(
                parse_slot_outcome(s.outcome, s.run_id.as_deref(), s.reason).unwrap(),
                o
            );
        }
        assert!(parse_slot_outcome("fired", None, None).is_err());
        assert!(parse_slot_outcome("skipped", None, Some("bored")).is_err());
        assert!(parse_slot_outcome("maybe", None, None).is_err());
    }

    #[test]
    fn admission_round_trips() {
        for a in [Admission::Unlimited, Admission::AtMost(3), Admission::Alone] {
            assert_eq!(parse_admission(admission_text(a).as_deref()).unwrap(), a);
        }
        assert_eq!(
            admission_text(Admission::AtMost(2)).as_deref(),
            Some("at_most:2")
        );
        assert!(parse_admission(Some("at_most:x")).is_err());
        assert!(parse_admission(Some("sometimes")).is_err());
    }
}
