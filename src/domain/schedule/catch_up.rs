//! Catch-up planning: which due slots fire, and which are skipped and why, given when
//! the scheduler last looked (the cursor) and what time it is now.

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};

use super::{CatchUp, PlannedSlot, ScheduleSpec, SkipReason, SlotAction};

/// The due slots of one look, each with what to do, and how far they reach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DuePlan {
    pub slots: Vec<(PlannedSlot, SlotAction)>,
    /// `now` when every slot in `(cursor, now]` is in `slots`, else the fire time of the
    /// last one: the caller moves its cursor here and asks again on its next tick.
    pub complete_until: DateTime<Utc>,
}

/// Slots counted per page while looking past a truncated plan.
const LOOK_AHEAD_PAGE: usize = 1024;
/// Pages looked at past a truncated plan, at most; beyond, "more slots follow" is
/// assumed (so the plan's missed slots are skipped rather than fired).
const LOOK_AHEAD_PAGES: usize = 64;

/// Plan the slots with fire_at in `(cursor, now]`, the earliest `max` of them (see
/// [`ScheduleSpec::slots_between`] for when a plan holds a few more).
///
/// Each slot's action, the first rule that applies:
/// 1. `skip` already set when planned (closed day, DST gap): skipped for that reason;
/// 2. `paused` or `spec.suspended`: `suspended`;
/// 3. fire_at before `now - catch_up_window`: `outside_catch_up_window`;
/// 4. fire_at at or after `now - late_after`: on time, it fires;
/// 5. otherwise it was *missed* (no scheduler ran when it was due), and `catch_up` says:
///    - `none`: every missed slot is skipped (`catch_up_limit`);
///    - `latest`: the newest missed slot fires and the older ones are skipped, unless an
///      on-time slot is due too (in `(cursor, now]`): then every missed one is skipped;
///    - `all`: the newest `max_catch_up` missed slots fire (they are the closest to
///      now; after a long outage the oldest matter least), the older ones are skipped.
///
/// "Newest" is judged over the whole range, not the page: when the plan is truncated,
/// the slots past it are counted (up to `max_catch_up`, and whether an on-time one
/// follows), so a decision made now is not contradicted by the next page. The next page
/// is planned at its own `now`, which may find a slot that was on time at this one late.
pub fn plan_due(
    spec: &ScheduleSpec,
    cursor: DateTime<Utc>,
    now: DateTime<Utc>,
    late_after: Duration,
    paused: bool,
    max: usize,
) -> DuePlan {
    let page = spec.slots_page(cursor, now, max);
    let window_start = before(now, spec.catch_up_window);
    let late_from = before(now, late_after);
    let mut planned: Vec<(PlannedSlot, Option<SlotAction>)> = page
        .slots
        .into_iter()
        .map(|slot| {
            let action = if let Some(reason) = slot.skip {
                Some(SlotAction::Skip(reason))
            } else if paused || spec.suspended {
                Some(SlotAction::Skip(SkipReason::Suspended))
            } else if slot.fire_at < window_start {
                Some(SlotAction::Skip(SkipReason::OutsideCatchUpWindow))
            } else if slot.fire_at >= late_from {
                Some(SlotAction::Fire)
            } else {
                None // missed
            };
            (slot, action)
        })
        .collect();

    let missed: Vec<usize> = (0..planned.len())
        .filter(|i| planned[*i].1.is_none())
        .collect();
    if !missed.is_empty() {
        let last_missed = late_from
            .checked_sub_signed(TimeDelta::nanoseconds(1))
            .unwrap_or(late_from);
        let end = page.complete_until;
        // How many missed slots are newer than each of this page's: those in the page
        // after it, and those past the page (counted up to what can matter).
        let keep = match spec.catch_up {
            CatchUp::None => 0,
            CatchUp::Latest => {
                let on_time_due = planned.iter().any(|(_, a)| *a == Some(SlotAction::Fire))
                    || firing_slots(spec, end.max(last_missed), now, 1) > 0;
                if on_time_due { 0 } else { 1 }
            }
            CatchUp::All => usize::try_from(spec.max_catch_up).unwrap_or(usize::MAX),
        };
        let past_page = if keep > 0 {
            firing_slots(spec, end, last_missed, keep)
        } else {
            0
        };
        for (newer_in_page, i) in missed.iter().rev().enumerate() {
            let newer = newer_in_page.saturating_add(past_page);
            planned[*i].1 = Some(if newer < keep {
                SlotAction::Fire
            } else {
                SlotAction::Skip(SkipReason::CatchUpLimit)
            });
        }
    }
    DuePlan {
        slots: planned
            .into_iter()
            .map(|(slot, action)| {
                (
                    slot,
                    action.unwrap_or(SlotAction::Skip(SkipReason::CatchUpLimit)),
                )
            })
            .collect(),
        complete_until: page.complete_until,
    }
}

/// `now - d`, or the earliest instant when that is out of range.
fn before(now: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    TimeDelta::from_std(d)
        .ok()
        .and_then(|d| now.checked_sub_signed(d))
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// Slots that will fire with fire_at in `(after, until]`, counted up to `limit`.
fn firing_slots(
    spec: &ScheduleSpec,
    mut after: DateTime<Utc>,
    until: DateTime<Utc>,
    limit: usize,
) -> usize {
    let mut count = 0;
    for _ in 0..LOOK_AHEAD_PAGES {
        if count >= limit || after >= until {
            return count.min(limit);
        }
        let page = spec.slots_page(after, until, LOOK_AHEAD_PAGE);
        count += page.slots.iter().filter(|s| s.skip.is_none()).count();
        if page.complete_until <= after {
            break;
        }
        after = page.complete_until;
    }
    if after >= until {
        count.min(limit)
    } else {
        limit
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use chrono::TimeZone;

    use super::*;
    use crate::domain::job::Schedule;
    use crate::domain::schedule::{Calendar, OnClosedDay, Rule};

    const LATE: Duration = Duration::from_secs(60);

    fn hourly(catch_up: CatchUp) -> ScheduleSpec {
        let rule = Rule::Cron(Schedule::parse("0 * * * *", None).unwrap());
        let mut spec = ScheduleSpec::new("t", rule, chrono_tz::UTC);
        spec.catch_up = catch_up;
        spec
    }

    fn at(h: u32, m: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 5, 1, h, m, 0).unwrap()
    }

    /// (hour of the slot, action) for a plan.
    fn actions(plan: &DuePlan) -> Vec<(u32, SlotAction)> {
        use chrono::Timelike;
        plan.slots
            .iter()
            .map(|(s, a)| (s.fire_at.hour(), *a))
            .collect()
    }

    const FIRE: SlotAction = SlotAction::Fire;
    const LIMIT: SlotAction = SlotAction::Skip(SkipReason::CatchUpLimit);

    /// Plan in pages of `max` until the range is covered, as the scheduler would.
    fn plan_in_pages(
        spec: &ScheduleSpec,
        cursor: DateTime<Utc>,
        now: DateTime<Utc>,
        max: usize,
    ) -> Vec<(u32, SlotAction)> {
        let mut all = Vec::new();
        let mut cursor = cursor;
        while cursor < now {
            let plan = plan_due(spec, cursor, now, LATE, false, max);
            assert!(plan.complete_until > cursor);
            all.extend(actions(&plan));
            cursor = plan.complete_until;
        }
        all
    }

    #[test]
    fn on_time_slot_fires() {
        let now = at(12, 0) + TimeDelta::seconds(30);
        let plan = plan_due(&hourly(CatchUp::None), at(11, 59), now, LATE, false, 10);
        assert_eq!(actions(&plan), [(12, FIRE)]);
        assert_eq!(plan.complete_until, now);
        let idle = plan_due(
            &hourly(CatchUp::None),
            at(12, 1),
            at(12, 2),
            LATE,
            false,
            10,
        );
        assert!(idle.slots.is_empty());
        assert_eq!(idle.complete_until, at(12, 2));
    }

    #[test]
    fn catch_up_none_skips_missed_slots() {
        let now = at(12, 0) + TimeDelta::seconds(30);
        let plan = plan_due(&hourly(CatchUp::None), at(8, 30), now, LATE, false, 10);
        assert_eq!(
            actions(&plan),
            [(9, LIMIT), (10, LIMIT), (11, LIMIT), (12, FIRE)]
        );
    }

    #[test]
    fn catch_up_latest_fires_the_newest_missed_unless_one_is_on_time() {
        let spec = hourly(CatchUp::Latest);
        let now = at(12, 0) + TimeDelta::seconds(30);
        let plan = plan_due(&spec, at(8, 30), now, LATE, false, 10);
        assert_eq!(
            actions(&plan),
            [(9, LIMIT), (10, LIMIT), (11, LIMIT), (12, FIRE)]
        );
        let plan = plan_due(&spec, at(8, 30), at(12, 30), LATE, false, 10);
        assert_eq!(
            actions(&plan),
            [(9, LIMIT), (10, LIMIT), (11, LIMIT), (12, FIRE)]
        );
        let plan = plan_due(&spec, at(8, 30), at(11, 30), LATE, false, 10);
        assert_eq!(actions(&plan), [(9, LIMIT), (10, LIMIT), (11, FIRE)]);
    }

    #[test]
    fn catch_up_all_fires_the_newest_max_catch_up() {
        let mut spec = hourly(CatchUp::All);
        spec.max_catch_up = 2;
        let plan = plan_due(&spec, at(8, 30), at(12, 30), LATE, false, 10);
        assert_eq!(
            actions(&plan),
            [(9, LIMIT), (10, LIMIT), (11, FIRE), (12, FIRE)]
        );
        spec.max_catch_up = 0;
        let plan = plan_due(&spec, at(8, 30), at(12, 30), LATE, false, 10);
        assert!(actions(&plan).iter().all(|(_, a)| *a == LIMIT));
        // An on-time slot does not count against the limit.
        spec.max_catch_up = 1;
        let plan = plan_due(
            &spec,
            at(8, 30),
            at(12, 0) + TimeDelta::seconds(5),
            LATE,
            false,
            10,
        );
        assert_eq!(
            actions(&plan),
            [(9, LIMIT), (10, LIMIT), (11, FIRE), (12, FIRE)]
        );
    }

    #[test]
    fn slots_before_the_window_are_skipped() {
        let mut spec = hourly(CatchUp::Latest);
        spec.catch_up_window = Duration::from_secs(2 * 3600);
        let plan = plan_due(&spec, at(5, 30), at(12, 30), LATE, false, 10);
        let outside = SlotAction::Skip(SkipReason::OutsideCatchUpWindow);
        assert_eq!(
            actions(&plan),
            [
                (6, outside),
                (7, outside),
                (8, outside),
                (9, outside),
                (10, outside),
                (11, LIMIT),
                (12, FIRE)
            ]
        );
    }

    #[test]
    fn paused_and_suspended_skip_everything_and_planned_skips_keep_their_reason() {
        let suspended = SlotAction::Skip(SkipReason::Suspended);
        let now = at(12, 0) + TimeDelta::seconds(30);
        let plan = plan_due(&hourly(CatchUp::All), at(10, 30), now, LATE, true, 10);
        assert_eq!(actions(&plan), [(11, suspended), (12, suspended)]);
        let mut spec = hourly(CatchUp::All);
        spec.suspended = true;
        let plan = plan_due(&spec, at(10, 30), now, LATE, false, 10);
        assert_eq!(actions(&plan), [(11, suspended), (12, suspended)]);

        // 2026-05-01 is a Friday; close it.
        let mut cal = Calendar::weekdays("t");
        cal.closed.insert(at(0, 0).date_naive());
        spec.calendar = Some(Arc::new(cal));
        spec.on_closed_day = OnClosedDay::Skip;
        let plan = plan_due(&spec, at(10, 30), now, LATE, true, 10);
        let closed = SlotAction::Skip(SkipReason::ClosedDay);
        assert_eq!(actions(&plan), [(11, closed), (12, closed)]);
    }

    #[test]
    fn truncated_plans_agree_with_a_whole_one() {
        let now = at(12, 30);
        for catch_up in [CatchUp::None, CatchUp::Latest, CatchUp::All] {
            let mut spec = hourly(catch_up);
            spec.max_catch_up = 2;
            let whole = actions(&plan_due(&spec, at(3, 30), now, LATE, false, 100));
            for max in [1, 2, 3] {
                assert_eq!(
                    plan_in_pages(&spec, at(3, 30), now, max),
                    whole,
                    "{catch_up:?} {max}"
                );
            }
        }
        let plan = plan_due(&hourly(CatchUp::Latest), at(3, 30), now, LATE, false, 2);
        assert_eq!(plan.complete_until, at(5, 0));
        assert_eq!(actions(&plan), [(4, LIMIT), (5, LIMIT)]);
        // The newest missed slot is the page's last, but an on-time one follows it.
        let now = at(12, 0) + TimeDelta::seconds(30);
        let plan = plan_due(&hourly(CatchUp::Latest), at(10, 30), now, LATE, false, 1);
        assert_eq!(actions(&plan), [(11, LIMIT)]);
    }
}
