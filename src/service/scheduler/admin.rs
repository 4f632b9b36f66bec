//! What people ask of schedules at run time: slots, next fire times, pause, resume and
//! backfill.

use chrono::{DateTime, Utc};

use super::{Scheduler, trigger_for};
use crate::domain::job::JobSpec;
use crate::domain::ports::{FireResult, Pause, SlotKey, SlotOutcome, SlotRecord, StoreError};
use crate::domain::run::RunId;
use crate::domain::schedule::{PlannedSlot, ScheduleSpec};
use crate::service::runs::AcceptError;
use std::sync::Arc;

/// The most slots one backfill may cover.
pub const MAX_BACKFILL_SLOTS: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    #[error("no job named `{0}`")]
    UnknownJob(String),
    #[error("job `{job}` has no schedule named `{schedule}` (it has: {known})")]
    UnknownSchedule {
        job: String,
        schedule: String,
        known: String,
    },
    #[error("job `{0}` has no schedules")]
    NoSchedules(String),
    #[error("{0}")]
    BadRange(String),
    #[error(transparent)]
    Accept(#[from] AcceptError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A schedule as it stands: its definition's name, whether it is paused (at run time
/// or by `suspended = true` in the file), and its next slots.
#[derive(Debug, Clone)]
pub struct ScheduleState {
    pub schedule: ScheduleSpec,
    pub pause: Option<Pause>,
    pub next: Vec<PlannedSlot>,
}

impl ScheduleState {
    pub fn paused(&self) -> bool {
        self.pause.is_some() || self.schedule.suspended
    }
}

/// What a backfill did, slot by slot, oldest first.
#[derive(Debug, Clone, Default)]
pub struct BackfillReport {
    pub fired: Vec<(PlannedSlot, RunId)>,
    /// Fired before (by the scheduler or an earlier backfill): left alone.
    pub already_fired: Vec<(PlannedSlot, RunId)>,
    /// Slots that do not fire at all (a closed day, a DST gap the schedule skips).
    pub not_firing: Vec<PlannedSlot>,
}

impl Scheduler {
    fn job_spec(&self, job: &str) -> Result<Arc<JobSpec>, ScheduleError> {
        self.jobs
            .job(job)
            .ok_or_else(|| ScheduleError::UnknownJob(job.to_owned()))
    }

    /// The named schedules of a job (`None`: all of them; a job without schedules is an
    /// error either way).
    fn pick<'a>(
        job: &'a JobSpec,
        name: Option<&str>,
    ) -> Result<Vec<&'a ScheduleSpec>, ScheduleError> {
        if job.schedules.is_empty() {
            return Err(ScheduleError::NoSchedules(job.name.to_string()));
        }
        match name {
            None => Ok(job.schedules.iter().collect()),
            Some(name) => job
                .schedules
                .iter()
                .find(|s| s.name == name)
                .map(|s| vec![s])
                .ok_or_else(|| ScheduleError::UnknownSchedule {
                    job: job.name.to_string(),
                    schedule: name.to_owned(),
                    known: job
                        .schedules
                        .iter()
                        .map(|s| s.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                }),
        }
    }

    /// Each schedule of the job with its pause and its next `n` fire times.
    pub async fn states(&self, job: &str, n: usize) -> Result<Vec<ScheduleState>, ScheduleError> {
        let spec = self.job_spec(job)?;
        let now = self.clock.now();
        let mut out = Vec::with_capacity(spec.schedules.len());
        for schedule in &spec.schedules {
            out.push(ScheduleState {
                pause: self.store.pause(job, &schedule.name).await?,
                next: schedule.upcoming(now, n),
                schedule: schedule.clone(),
            });
        }
        Ok(out)
    }

    /// Past slots of the job (one schedule or all), newest first.
    pub async fn slots(
        &self,
        job: &str,
        schedule: Option<&str>,
        limit: u32,
    ) -> Result<Vec<SlotRecord>, ScheduleError> {
        let spec = self.job_spec(job)?;
        if let Some(name) = schedule {
            Self::pick(&spec, Some(name))?;
        }
        Ok(self.store.slots(job, schedule, limit).await?)
    }

    /// Pause (`note` kept) the named schedule, or every schedule of the job.
    pub async fn pause(
        &self,
        job: &str,
        schedule: Option<&str>,
        note: Option<String>,
    ) -> Result<Vec<String>, ScheduleError> {
        let spec = self.job_spec(job)?;
        let pause = Pause {
            note,
            at: self.clock.now(),
        };
        let mut names = Vec::new();
        for s in Self::pick(&spec, schedule)? {
            self.store.set_pause(job, &s.name, Some(&pause)).await?;
            tracing::info!(
                message = "schedule paused",
                job,
                schedule = s.name,
                note = pause.note.as_deref()
            );
            names.push(s.name.clone());
        }
        Ok(names)
    }

    pub async fn resume(
        &self,
        job: &str,
        schedule: Option<&str>,
    ) -> Result<Vec<String>, ScheduleError> {
        let spec = self.job_spec(job)?;
        let mut names = Vec::new();
        for s in Self::pick(&spec, schedule)? {
            self.store.set_pause(job, &s.name, None).await?;
            tracing::info!(message = "schedule resumed", job, schedule = s.name);
            names.push(s.name.clone());
        }
        Ok(names)
    }

    /// One run for every slot of the schedule whose fire time is in `[from, to]` and
    /// that has not fired (never seen, or skipped), oldest first. Runs obey the job's
    /// `max_concurrent`, not the overlap policy (a backfill asks for all of them); the
    /// slot key keeps a fired slot from firing again.
    pub async fn backfill(
        &self,
        job: &str,
        schedule: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<BackfillReport, ScheduleError> {
        let spec = self.job_spec(job)?;
        let schedule = Self::pick(&spec, Some(schedule))?[0];
        let now = self.clock.now();
        if from > to {
            return Err(ScheduleError::BadRange(format!(
                "`from` ({from}) is after `to` ({to})"
            )));
        }
        if to > now {
            return Err(ScheduleError::BadRange(format!(
                "`to` ({to}) is in the future; a backfill covers slots that are due"
            )));
        }
        let after = from - chrono::Duration::nanoseconds(1);
        let slots = schedule.slots_between(after, to, MAX_BACKFILL_SLOTS + 1);
        if slots.len() > MAX_BACKFILL_SLOTS {
            return Err(ScheduleError::BadRange(format!(
                "the range holds more than {MAX_BACKFILL_SLOTS} slots; backfill it in parts"
            )));
        }
        let mut report = BackfillReport::default();
        for slot in slots {
            if slot.skip.is_some() {
                report.not_firing.push(slot);
                continue;
            }
            let key = SlotKey {
                job: job.to_owned(),
                schedule: schedule.name.clone(),
                nominal: slot.nominal,
            };
            let new =
                self.runs
                    .prepare(job, schedule.params.clone(), trigger_for(schedule, &slot))?;
            match self
                .runs
                .backfill_slot(&key, slot.fire_at, slot.business_date, new)
                .await?
            {
                FireResult::Fired(id) => report.fired.push((slot, id)),
                FireResult::AlreadyAccounted(SlotOutcome::Fired(id)) => {
                    report.already_fired.push((slot, id))
                }
                other => {
                    return Err(ScheduleError::Store(StoreError::Corrupt(format!(
                        "backfill of slot {} answered {other:?}",
                        slot.nominal
                    ))));
                }
            }
        }
        tracing::info!(
            message = "backfill done",
            job,
            schedule = schedule.name,
            fired = report.fired.len(),
            already_fired = report.already_fired.len()
        );
        Ok(report)
    }
}
