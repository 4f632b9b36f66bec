//! The scheduler inside `serve`: turns due schedule slots into runs, and answers what a
//! schedule did and will do (slots, next fire times, pause, resume, backfill).
//!
//! Timing never decides whether a slot fires twice: every slot goes to the store under
//! its unique key (`Schedules::fire_slot`, `skip_slot`), so two schedulers on one store,
//! a restart half-way through a tick, or a backfill over fired slots each account for a
//! slot once. Time comes from a [`Clock`], so tests drive months of slots without
//! sleeping.
//!
//! Each schedule's cursor carries the fingerprint of the definition it was set under
//! (`definition`): a schedule whose rule, zone, calendar or closed-day/DST rules
//! changed (a reload, or a restart with edited files) starts again from now, so it
//! takes effect from its next slot instead of catching up slots it never had.

mod admin;
mod definition;
#[cfg(test)]
mod tests;

pub use admin::{BackfillReport, ScheduleError, ScheduleState};

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use crate::domain::job::JobSpec;
use crate::domain::job_lookup::JobLookup;
use crate::domain::ports::{Clock, FireResult, RunStore, SlotKey, StoreError};
use crate::domain::run::Trigger;
use crate::domain::schedule::{PlannedSlot, ScheduleSpec, SlotAction, plan_due};
use crate::service::duty::Duty;
use crate::service::runs::Runs;

/// At most this many slots of one schedule are handled in one tick; the rest wait for
/// the next tick (the cursor stops at the last one handled), so a long outage of a
/// per-second schedule is worked off in steps instead of in one long transaction burst.
const SLOTS_PER_TICK: usize = 1000;

/// The longest the loop sleeps: pauses, resumes and reloads are seen within this.
const MAX_SLEEP: Duration = Duration::from_secs(2);

/// What one tick did with one slot (for logs and tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotHandled {
    pub job: String,
    pub schedule: String,
    pub slot: PlannedSlot,
    pub result: Handled,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handled {
    Fired(crate::domain::run::RunId),
    Skipped(crate::domain::schedule::SkipReason),
    /// Another scheduler (or an earlier try of this one) accounted for it already.
    AlreadyAccounted,
}

#[derive(Clone)]
pub struct Scheduler {
    jobs: Arc<dyn JobLookup>,
    store: Arc<dyn RunStore>,
    runs: Runs,
    clock: Arc<dyn Clock>,
    /// A slot this late when the scheduler first sees it was missed (the scheduler was
    /// not running): the schedule's catch-up policy decides. Earlier ones are on time.
    grace: Duration,
    /// With replicas sharing the store, the one holding this duty ticks.
    duty: Option<Arc<Duty>>,
}

impl Scheduler {
    pub fn new(
        jobs: Arc<dyn JobLookup>,
        store: Arc<dyn RunStore>,
        runs: Runs,
        clock: Arc<dyn Clock>,
        grace: Duration,
    ) -> Self {
        Self {
            jobs,
            store,
            runs,
            clock,
            grace,
            duty: None,
        }
    }

    /// Tick only while this process holds `duty` (replicas sharing the store).
    pub fn with_duty(self, duty: Duty) -> Self {
        Self {
            duty: Some(Arc::new(duty)),
            ..self
        }
    }

    /// Tick until `stopping`, sleeping until the next slot is due (at most [`MAX_SLEEP`]).
    pub async fn run(self, stopping: CancellationToken) {
        tracing::info!(
            message = "scheduler started",
            schedules = self
                .jobs
                .jobs()
                .iter()
                .map(|j| j.schedules.len())
                .sum::<usize>()
        );
        loop {
            let ours = match &self.duty {
                Some(duty) => duty.held().await,
                None => true,
            };
            let wait = if ours {
                let now = self.clock.now();
                if let Err(error) = self.tick(now).await {
                    tracing::warn!(message = "scheduler tick failed; trying again", %error);
                }
                self.sleep_for(self.clock.now())
            } else {
                MAX_SLEEP
            };
            tokio::select! {
                _ = stopping.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        if let Some(duty) = &self.duty {
            duty.release().await;
        }
        tracing::info!(message = "scheduler stopped");
    }

    /// How long until the earliest next slot of any schedule, capped at [`MAX_SLEEP`].
    fn sleep_for(&self, now: DateTime<Utc>) -> Duration {
        let next = self
            .jobs
            .jobs()
            .iter()
            .flat_map(|job| job.schedules.iter())
            .filter_map(|s| s.upcoming(now, 1).into_iter().next())
            .map(|slot| slot.fire_at)
            .min();
        match next {
            Some(at) => (at - now).to_std().unwrap_or(Duration::ZERO).min(MAX_SLEEP),
            None => MAX_SLEEP,
        }
    }

    /// One pass over every schedule of every job at `now`. A schedule whose store call
    /// fails is left at its cursor and tried again next tick; the others go on.
    pub async fn tick(&self, now: DateTime<Utc>) -> Result<Vec<SlotHandled>, StoreError> {
        let mut handled = Vec::new();
        let mut failure = None;
        for job in self.jobs.jobs() {
            for schedule in &job.schedules {
                match self.tick_schedule(&job, schedule, now).await {
                    Ok(mut done) => handled.append(&mut done),
                    Err(error) => {
                        tracing::warn!(
                            message = "schedule not handled this tick",
                            job = %job.name,
                            schedule = schedule.name,
                            %error
                        );
                        failure = Some(error);
                    }
                }
            }
        }
        match failure {
            Some(error) if handled.is_empty() => Err(error),
            _ => Ok(handled),
        }
    }

    async fn tick_schedule(
        &self,
        job: &JobSpec,
        schedule: &ScheduleSpec,
        now: DateTime<Utc>,
    ) -> Result<Vec<SlotHandled>, StoreError> {
        let name = job.name.as_str();
        let definition = definition::fingerprint(schedule);
        let cursor = match self.store.cursor(name, &schedule.name).await? {
            None => {
                // First sight of this schedule: it starts from now; nothing before it
                // existed.
                self.store
                    .rebase_cursor(name, &schedule.name, &definition, now)
                    .await?;
                tracing::info!(
                    message = "schedule registered",
                    job = name,
                    schedule = schedule.name
                );
                return Ok(Vec::new());
            }
            Some(cursor) if cursor.definition.as_deref() == Some(definition.as_str()) => {
                cursor.evaluated_until
            }
            Some(cursor) if cursor.definition.is_none() => {
                // Set before definitions were kept: taken as the current one's, so an
                // upgrade loses no slot.
                self.store
                    .rebase_cursor(name, &schedule.name, &definition, cursor.evaluated_until)
                    .await?;
                cursor.evaluated_until
            }
            Some(cursor) => {
                // Planning the slots since the old cursor under the new definition
                // would fire slots the schedule never had: start from now instead.
                // (Removed and added back unchanged, a schedule keeps its cursor and
                // catches up as after downtime, within its catch_up_window.)
                self.store
                    .rebase_cursor(name, &schedule.name, &definition, now)
                    .await?;
                tracing::info!(
                    message = "schedule changed; it takes effect from its next slot",
                    job = name,
                    schedule = schedule.name,
                    was = cursor.definition.as_deref().unwrap_or_default(),
                    is = definition,
                    evaluated_until = %cursor.evaluated_until
                );
                return Ok(Vec::new());
            }
        };
        if cursor >= now {
            return Ok(Vec::new());
        }
        let paused = self.store.pause(name, &schedule.name).await?.is_some();
        let plan = plan_due(schedule, cursor, now, self.grace, paused, SLOTS_PER_TICK);
        let mut handled = Vec::with_capacity(plan.slots.len());
        for (slot, action) in plan.slots {
            let result = self.apply(job, schedule, &slot, action, now).await?;
            handled.push(SlotHandled {
                job: name.to_owned(),
                schedule: schedule.name.clone(),
                slot,
                result,
            });
        }
        self.store
            .advance_cursor(name, &schedule.name, plan.complete_until)
            .await?;
        Ok(handled)
    }

    /// Fire or skip one slot, through the store's unique slot key.
    async fn apply(
        &self,
        job: &JobSpec,
        schedule: &ScheduleSpec,
        slot: &PlannedSlot,
        action: SlotAction,
        now: DateTime<Utc>,
    ) -> Result<Handled, StoreError> {
        let key = SlotKey {
            job: job.name.as_str().to_owned(),
            schedule: schedule.name.clone(),
            nominal: slot.nominal,
        };
        match action {
            SlotAction::Skip(reason) => {
                let recorded = self
                    .store
                    .skip_slot(&key, slot.fire_at, slot.business_date, reason, None, now)
                    .await?;
                if recorded {
                    tracing::info!(
                        message = "schedule slot skipped",
                        job = %job.name,
                        schedule = schedule.name,
                        slot = %slot.nominal,
                        reason = reason.as_str()
                    );
                    Ok(Handled::Skipped(reason))
                } else {
                    Ok(Handled::AlreadyAccounted)
                }
            }
            SlotAction::Fire => self.fire(job, schedule, key, slot).await,
        }
    }

    /// Start the slot's run (obeying `overlap`), unless the slot is accounted for.
    async fn fire(
        &self,
        job: &JobSpec,
        schedule: &ScheduleSpec,
        key: SlotKey,
        slot: &PlannedSlot,
    ) -> Result<Handled, StoreError> {
        let trigger = trigger_for(schedule, slot);
        let new = match self
            .runs
            .prepare(job.name.as_str(), schedule.params.clone(), trigger)
        {
            Ok(new) => new,
            Err(error) => {
                // Schedule params are checked against the job's at load, from the same
                // catalog snapshot, so this means a bug rather than bad input.
                tracing::error!(
                    message = "schedule slot could not become a run",
                    job = %job.name,
                    schedule = schedule.name,
                    slot = %slot.nominal,
                    %error
                );
                return Err(StoreError::Corrupt(format!(
                    "schedule {}/{}: {error}",
                    job.name, schedule.name
                )));
            }
        };
        let result = self
            .runs
            .fire_slot(
                &key,
                slot.fire_at,
                slot.business_date,
                new,
                schedule.overlap,
            )
            .await
            .map_err(|e| match e {
                crate::service::runs::AcceptError::Store(s) => s,
                other => StoreError::Corrupt(other.to_string()),
            })?;
        Ok(match result {
            FireResult::Fired(run_id) => {
                tracing::info!(
                    message = "schedule slot fired",
                    job = %job.name,
                    schedule = schedule.name,
                    slot = %slot.nominal,
                    %run_id
                );
                Handled::Fired(run_id)
            }
            FireResult::SkippedOverlap => {
                tracing::info!(
                    message = "schedule slot skipped",
                    job = %job.name,
                    schedule = schedule.name,
                    slot = %slot.nominal,
                    reason = "overlap"
                );
                Handled::Skipped(crate::domain::schedule::SkipReason::Overlap)
            }
            FireResult::AlreadyAccounted(_) => Handled::AlreadyAccounted,
        })
    }

    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }
}

/// The run's trigger for a slot: the schedule, the nominal instant (also in the
/// schedule's zone, for `TASUKI_SCHEDULED_TIME`) and the business date.
pub fn trigger_for(schedule: &ScheduleSpec, slot: &PlannedSlot) -> Trigger {
    Trigger::Schedule {
        schedule: schedule.name.clone(),
        slot: slot.nominal,
        business_date: slot.business_date,
        local_time: slot
            .nominal
            .with_timezone(&schedule.time_zone)
            .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, false),
    }
}
