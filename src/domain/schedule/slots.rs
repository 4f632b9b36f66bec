//! Slot enumeration: a schedule's rule, calendar and DST policies turned into the slots
//! that fall in a time range.
//!
//! The rule is read in naive wall-clock time of the schedule's zone, one local date at a
//! time. A date's plan says where its slots fire (itself, another open day, or nowhere:
//! closed); each wall time then becomes instants by the gap and fold rules ([`dst`]).
//! Slots are kept by nominal instant (one slot per instant: a gap-shifted slot merges
//! into a regular one at the same instant), collisions of moved slots are settled, and
//! the range is cut by fire time.
//!
//! Bounds: a call looks at no more than [`ITERATION_BUDGET`] wall times, and stops early
//! once the first `max` slots are known for certain. What is certain is everything that
//! fires before the *lower bound* of what is still to enumerate: the earliest instant a
//! later wall time, or a later date moved back (`previous_open`), could fire at.

use std::collections::BTreeMap;

use chrono::{
    DateTime, Datelike, Days, Months, NaiveDate, NaiveDateTime, NaiveTime, TimeDelta, Timelike, Utc,
};

use super::dst::{self, Local};
use super::{
    Calendar, Moved, OnClosedDay, OnFold, OnGap, PlannedSlot, Rule, ScheduleSpec, SkipReason,
};

/// Wall times one enumeration looks at, at most. A call that runs out returns the slots
/// known so far (a prefix, `complete_until` saying how far it reaches) and
/// [`ScheduleSpec::slots_page`] narrows the range until a call makes progress, so even a
/// per-second cron over years ends, in pages.
pub const ITERATION_BUDGET: usize = 50_000;

/// How far ahead [`ScheduleSpec::upcoming`] looks for firing slots.
pub const UPCOMING_HORIZON_DAYS: u64 = 5 * 366;

/// A closed-day shift never looks further than this, whatever `max_shift_days` says.
pub const SHIFT_DAYS_CAP: u32 = 366;

/// Slots of a range, earliest first, and how far they cover it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotPage {
    pub slots: Vec<PlannedSlot>,
    /// Every slot with fire_at in `(after, complete_until]` is in `slots`: `until` when
    /// the range is complete, else the fire time of the last slot listed (or an earlier
    /// bound when a call ran out of budget). The next page starts after it.
    pub complete_until: DateTime<Utc>,
}

impl ScheduleSpec {
    /// Every slot with fire_at in `(after, until]`, ordered by (fire_at, nominal), the
    /// earliest `max` of them; slots that will not fire are included with `skip` set.
    ///
    /// More than `max` are returned only when slots share the fire time of the `max`-th
    /// (moved slots landing on one instant): a fire time's slots are never split. Fewer
    /// may be returned when the [`ITERATION_BUDGET`] runs out; see [`Self::slots_page`]
    /// to learn how far the list reaches.
    pub fn slots_between(
        &self,
        after: DateTime<Utc>,
        until: DateTime<Utc>,
        max: usize,
    ) -> Vec<PlannedSlot> {
        self.slots_page(after, until, max).slots
    }

    /// [`Self::slots_between`], and how far the returned slots cover the range.
    /// `complete_until > after` unless the range is empty or `max` is 0.
    pub fn slots_page(&self, after: DateTime<Utc>, until: DateTime<Utc>, max: usize) -> SlotPage {
        let (after, until) = (clamp(after), clamp(until));
        if until <= after || max == 0 {
            return SlotPage {
                slots: Vec::new(),
                complete_until: after,
            };
        }
        page(self, after, until, max, false)
    }

    /// The next `n` slots that will fire (skip unset) after `after`, for previews. Looks
    /// [`UPCOMING_HORIZON_DAYS`] ahead at most, so a schedule that never fires (a closed
    /// calendar, `0 0 30 2 *`) returns fewer.
    pub fn upcoming(&self, after: DateTime<Utc>, n: usize) -> Vec<PlannedSlot> {
        let after = clamp(after);
        let until = clamp(after + Days::new(UPCOMING_HORIZON_DAYS));
        let mut out = Vec::new();
        let mut from = after;
        // Each page makes progress; the bound only guards against a pathological rule.
        for _ in 0..64 {
            if out.len() >= n || from >= until {
                break;
            }
            let page = page(self, from, until, n - out.len(), true);
            if page.complete_until <= from {
                break;
            }
            out.extend(page.slots);
            from = page.complete_until;
        }
        out.truncate(n);
        out
    }

    /// Where a date's slots fire.
    fn day_plan(&self, date: NaiveDate) -> DayPlan {
        let (Rule::Cron(_), Some(cal)) = (&self.rule, self.calendar.as_deref()) else {
            return DayPlan::FireOn(date);
        };
        if cal.is_open(date) {
            return DayPlan::FireOn(date);
        }
        let within = self.max_shift_days.min(SHIFT_DAYS_CAP);
        let target = match self.on_closed_day {
            OnClosedDay::Run => Some(date),
            OnClosedDay::Skip => None,
            OnClosedDay::PreviousOpen => cal.previous_open(date, within),
            OnClosedDay::NextOpen => cal.next_open(date, within),
        };
        target.map_or(DayPlan::Closed, DayPlan::FireOn)
    }

    /// The calendar that moves slots between days, if any (with its shift direction).
    fn shifting_calendar(&self) -> Option<(&Calendar, OnClosedDay)> {
        match (&self.rule, self.calendar.as_deref(), self.on_closed_day) {
            (Rule::Cron(_), Some(cal), p @ (OnClosedDay::PreviousOpen | OnClosedDay::NextOpen)) => {
                Some((cal, p))
            }
            _ => None,
        }
    }

    /// Days a slot can move back (fire before its date) and forward.
    fn shift_reach(&self) -> (u64, u64) {
        let days = u64::from(self.max_shift_days.min(SHIFT_DAYS_CAP));
        match self.shifting_calendar() {
            Some((_, OnClosedDay::PreviousOpen)) => (days, 0),
            Some(_) => (0, days),
            None => (0, 0),
        }
    }

    /// The earliest date that a date after `date` can fire on.
    fn first_fire_day_after(&self, date: NaiveDate) -> NaiveDate {
        let next = date + Days::new(1);
        match self.shifting_calendar() {
            // A closed date moves back to the nearest open day before it, so no later
            // than `next`'s, and no earlier than the last open day up to `date`.
            Some((cal, OnClosedDay::PreviousOpen)) if !cal.is_open(next) => {
                let within = self.max_shift_days.min(SHIFT_DAYS_CAP);
                cal.previous_open(next, within).unwrap_or(next)
            }
            _ => next,
        }
    }

    /// The rule's wall times from `from` on (inclusive, to the second), none after `last`.
    fn wall_times_from(
        &self,
        from: NaiveDateTime,
        last: NaiveDate,
    ) -> Box<dyn Iterator<Item = NaiveDateTime> + '_> {
        let from = from - TimeDelta::nanoseconds(i64::from(from.nanosecond()));
        match &self.rule {
            Rule::Cron(cron) => Box::new(
                cron.wall_times_after(from - TimeDelta::seconds(1))
                    .take_while(move |w| w.date() <= last),
            ),
            Rule::OpenDaysOfMonth { days, at } => {
                let cal = self
                    .calendar
                    .as_deref()
                    .cloned()
                    .unwrap_or_else(|| Calendar::weekdays("weekdays"));
                Box::new(open_days_wall_times(cal, days.clone(), *at, from, last))
            }
        }
    }
}

/// One enumeration; when it runs out of budget before anything is certain, the range is
/// halved until something is (a narrower range reads fewer wall times on every date).
fn page(
    spec: &ScheduleSpec,
    after: DateTime<Utc>,
    mut until: DateTime<Utc>,
    max: usize,
    firing_only: bool,
) -> SlotPage {
    loop {
        let page = Walk::new(spec, after, until, max, firing_only).run();
        let span = until - after;
        if page.complete_until > after || span <= TimeDelta::seconds(1) {
            return page;
        }
        until = after + span / 2;
    }
}

/// The n-th open days of each month from `from`'s month to `last`'s, at `at`.
fn open_days_wall_times(
    cal: Calendar,
    days: Vec<i32>,
    at: NaiveTime,
    from: NaiveDateTime,
    last: NaiveDate,
) -> impl Iterator<Item = NaiveDateTime> {
    let first_month = from.date() - Days::new(u64::from(from.day0()));
    std::iter::successors(Some(first_month), |m| m.checked_add_months(Months::new(1)))
        .take_while(move |m| *m <= last)
        .flat_map(move |m| {
            let mut dates: Vec<NaiveDate> = days
                .iter()
                .filter_map(|n| cal.nth_open_day(m.year(), m.month(), *n))
                .collect();
            dates.sort();
            dates.dedup();
            dates
        })
        .map(move |d| d.and_time(at))
        .filter(move |w| *w >= from && w.date() <= last)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DayPlan {
    /// The date's slots fire on this date (itself, or an open day it moved to).
    FireOn(NaiveDate),
    /// Closed, and not moved: its slots are skipped (`closed_day`).
    Closed,
}

/// Instants far outside any schedule's life are clamped, so day arithmetic never
/// overflows.
fn clamp(t: DateTime<Utc>) -> DateTime<Utc> {
    let lo = NaiveDate::from_ymd_opt(1000, 1, 1).map(|d| d.and_time(NaiveTime::MIN).and_utc());
    let hi = NaiveDate::from_ymd_opt(9000, 1, 1).map(|d| d.and_time(NaiveTime::MIN).and_utc());
    match (lo, hi) {
        (Some(lo), Some(hi)) => t.clamp(lo, hi),
        _ => t,
    }
}

/// A slot being collected, and whether it came from a wall time that exists (a
/// gap-shifted slot gives way to such a one at the same instant).
struct Candidate {
    slot: PlannedSlot,
    regular: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Occurrence {
    Regular,
    FoldSecond,
    Gap,
}

/// One enumeration over `(after, until]`.
struct Walk<'a> {
    spec: &'a ScheduleSpec,
    after: DateTime<Utc>,
    until: DateTime<Utc>,
    max: usize,
    /// Only slots that fire are wanted (previews): closed dates are not even read.
    firing_only: bool,
    candidates: BTreeMap<DateTime<Utc>, Candidate>,
    /// Candidates counted in range (an over-count: replaced ones are counted twice).
    counted: usize,
    next_check: usize,
    steps: usize,
}

impl<'a> Walk<'a> {
    fn new(
        spec: &'a ScheduleSpec,
        after: DateTime<Utc>,
        until: DateTime<Utc>,
        max: usize,
        firing_only: bool,
    ) -> Walk<'a> {
        Walk {
            spec,
            after,
            until,
            max,
            firing_only,
            candidates: BTreeMap::new(),
            counted: 0,
            next_check: max,
            steps: 0,
        }
    }

    fn run(mut self) -> SlotPage {
        let spec = self.spec;
        let tz = spec.time_zone;
        // Fire wall times that can map into the range: widened by a fold at either end.
        let w_start = dst::wall(tz, self.after) - dst::fold_reach_after(tz, self.after);
        let w_end = dst::wall(tz, self.until) + dst::fold_reach_before(tz, self.until);
        let (back, forward) = spec.shift_reach();
        // A date moved forward fires up to `forward` days after it: start that early.
        let first = w_start.date() - Days::new(forward);
        let last = w_end.date() + Days::new(back);
        let mut date = first;
        'dates: while date <= last {
            self.steps += 1;
            if self.steps > ITERATION_BUDGET {
                let bound = fire_day_start(spec, spec.first_fire_day_after(date - Days::new(1)));
                return self.out_of_budget(bound);
            }
            let plan = spec.day_plan(date);
            let fire_day = match plan {
                DayPlan::FireOn(d) => d,
                DayPlan::Closed if self.firing_only => {
                    date = date + Days::new(1);
                    continue;
                }
                DayPlan::Closed => date,
            };
            // This date's wall times whose fire wall time (same time on `fire_day`)
            // falls in [w_start, w_end].
            let delta = fire_day - date;
            let day_start = date.and_time(NaiveTime::MIN);
            let lo = day_start.max(w_start - delta);
            let hi = w_end - delta;
            let mut next_date = date + Days::new(1);
            if lo <= hi && lo.date() == date {
                let mut walls = spec.wall_times_from(lo, last);
                loop {
                    let Some(w) = walls.next() else { break 'dates };
                    self.steps += 1;
                    if w.date() != date || w > hi {
                        // No wall times at all before `w`: skip the dates in between.
                        next_date = next_date.max(w.date());
                        break;
                    }
                    if self.steps > ITERATION_BUDGET || self.counted >= self.next_check {
                        let here = dst::resolve(tz, fire_day.and_time(w.time())).earliest();
                        let later = fire_day_start(spec, spec.first_fire_day_after(date));
                        let bound = here.min(later);
                        if self.steps > ITERATION_BUDGET {
                            return self.out_of_budget(bound);
                        }
                        if let Some(page) = self.try_finish(bound) {
                            return page;
                        }
                    }
                    self.add(date, w, plan);
                }
            }
            if self.counted >= self.next_check {
                let bound = fire_day_start(spec, spec.first_fire_day_after(date));
                if let Some(page) = self.try_finish(bound) {
                    return page;
                }
            }
            date = next_date;
        }
        let (slots, truncated) = self.settle(None);
        let complete_until = match (truncated, slots.last()) {
            (true, Some(last)) => last.fire_at,
            _ => self.until,
        };
        SlotPage {
            slots,
            complete_until,
        }
    }

    /// Collect the slot(s) of wall time `w` on `date`.
    fn add(&mut self, date: NaiveDate, w: NaiveDateTime, plan: DayPlan) {
        let spec = self.spec;
        let tz = spec.time_zone;
        let mut nominals = [None, None];
        match dst::resolve(tz, w) {
            Local::Single(t) => nominals[0] = Some((t, Occurrence::Regular)),
            Local::Fold(first, second) => {
                nominals[0] = Some((first, Occurrence::Regular));
                if spec.on_fold == OnFold::Both {
                    nominals[1] = Some((second, Occurrence::FoldSecond));
                }
            }
            Local::Gap(t) => nominals[0] = Some((t, Occurrence::Gap)),
        }
        for (nominal, occurrence) in nominals.into_iter().flatten() {
            let (dst_moved, dst_skip) = match occurrence {
                Occurrence::Regular => (None, None),
                Occurrence::FoldSecond => (Some(Moved::DstFoldSecond), None),
                Occurrence::Gap => match spec.on_gap {
                    OnGap::Shift => (Some(Moved::DstGap), None),
                    OnGap::Skip => (None, Some(SkipReason::DstGap)),
                },
            };
            let (fire_at, moved, skip) = match plan {
                DayPlan::FireOn(day) if day == date => (nominal, dst_moved, dst_skip),
                DayPlan::Closed => (nominal, dst_moved, Some(SkipReason::ClosedDay)),
                DayPlan::FireOn(day) => {
                    // Same wall time on the open day, by that day's gap and fold rules;
                    // a moved slot fires once (the second of a fold only if it was one).
                    let (fire_at, skip) = match dst::resolve(tz, day.and_time(w.time())) {
                        Local::Single(t) => (t, None),
                        Local::Fold(first, second) => match occurrence {
                            Occurrence::FoldSecond => (second, None),
                            _ => (first, None),
                        },
                        Local::Gap(t) => match spec.on_gap {
                            OnGap::Shift => (t, None),
                            OnGap::Skip => (t, Some(SkipReason::DstGap)),
                        },
                    };
                    (fire_at, Some(Moved::ClosedDay { from: date }), skip)
                }
            };
            let slot = PlannedSlot {
                nominal,
                fire_at,
                business_date: dst::local_date(tz, fire_at),
                moved,
                skip,
            };
            if fire_at > self.after
                && fire_at <= self.until
                && (!self.firing_only || slot.skip.is_none())
            {
                self.counted += 1;
            }
            let regular = occurrence != Occurrence::Gap;
            match self.candidates.get(&nominal) {
                Some(kept) if kept.regular || !regular => {}
                _ => {
                    self.candidates.insert(nominal, Candidate { slot, regular });
                }
            }
        }
    }

    /// The page, if the first `max` slots are all known: every one fires before `bound`.
    fn try_finish(&mut self, bound: DateTime<Utc>) -> Option<SlotPage> {
        let (slots, truncated) = self.settle(Some(bound));
        if truncated || slots.len() >= self.max {
            let complete_until = slots.last().map_or(self.after, |s| s.fire_at);
            return Some(SlotPage {
                slots,
                complete_until,
            });
        }
        // Not yet: look again once twice as many are collected.
        self.next_check = self.counted.saturating_mul(2).max(self.max);
        None
    }

    /// What is certain when the budget is spent: the slots firing before `bound`.
    fn out_of_budget(self, bound: DateTime<Utc>) -> SlotPage {
        let (slots, truncated) = self.settle(Some(bound));
        let complete_until = match slots.last() {
            Some(last) if truncated || slots.len() >= self.max => last.fire_at,
            _ => (bound - TimeDelta::nanoseconds(1))
                .min(self.until)
                .max(self.after),
        };
        SlotPage {
            slots,
            complete_until,
        }
    }

    /// The collected slots firing before `bound` (all if None), collisions settled, in
    /// range, ordered and cut at `max` (whole fire times); and whether any were cut.
    fn settle(&self, bound: Option<DateTime<Utc>>) -> (Vec<PlannedSlot>, bool) {
        let mut slots: Vec<PlannedSlot> = self
            .candidates
            .values()
            .filter(|c| bound.is_none_or(|b| c.slot.fire_at < b))
            .map(|c| c.slot.clone())
            .collect();
        settle_collisions(&mut slots);
        slots.retain(|s| {
            s.fire_at > self.after
                && s.fire_at <= self.until
                && (!self.firing_only || s.skip.is_none())
        });
        slots.sort_by_key(|s| (s.fire_at, s.nominal));
        let truncated = cut_keeping_fire_times(&mut slots, self.max);
        (slots, truncated)
    }
}

/// The earliest instant of a date's wall clock.
fn fire_day_start(spec: &ScheduleSpec, day: NaiveDate) -> DateTime<Utc> {
    dst::resolve(spec.time_zone, day.and_time(NaiveTime::MIN)).earliest()
}

/// Slots moved onto the same fire instant: one fires, the one that was not moved there
/// if any, else the earliest nominal; the others are skipped as `closed_day`.
fn settle_collisions(slots: &mut [PlannedSlot]) {
    let mut by_fire: BTreeMap<DateTime<Utc>, Vec<usize>> = BTreeMap::new();
    for (i, s) in slots.iter().enumerate() {
        if s.skip.is_none() {
            by_fire.entry(s.fire_at).or_default().push(i);
        }
    }
    for group in by_fire.into_values().filter(|g| g.len() > 1) {
        let closed_moved = |i: &usize| matches!(slots[*i].moved, Some(Moved::ClosedDay { .. }));
        let winner = group
            .iter()
            .find(|i| !closed_moved(i))
            .or_else(|| group.iter().min_by_key(|i| slots[**i].nominal))
            .copied();
        for i in group {
            if Some(i) != winner {
                slots[i].skip = Some(SkipReason::ClosedDay);
            }
        }
    }
}

/// Keep the first `max` slots, and the rest of the `max`-th's fire time; true if any
/// were dropped.
fn cut_keeping_fire_times(slots: &mut Vec<PlannedSlot>, max: usize) -> bool {
    if slots.len() <= max || max == 0 {
        let cut = max == 0 && !slots.is_empty();
        if cut {
            slots.clear();
        }
        return cut;
    }
    let edge = slots[max - 1].fire_at;
    let keep = max
        + slots[max..]
            .iter()
            .take_while(|s| s.fire_at == edge)
            .count();
    let cut = keep < slots.len();
    slots.truncate(keep);
    cut
}
