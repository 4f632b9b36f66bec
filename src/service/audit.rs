//! The audit log: one structured event (target `tasuki::audit`) for each thing a caller
//! did that changes what runs, and for each request refused (401, 403, or a 404 that
//! hides a job or run the caller may not see). Every event goes through [`record`].

use std::fmt;

use crate::domain::run::RunId;

/// The tracing target of every audit event: filter or route on it
/// (`TASUKI_LOG=info,tasuki::audit=info`).
pub const TARGET: &str = "tasuki::audit";

/// What the caller did or tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditAction {
    RunStart,
    RunRead,
    RunCancel,
    RunRetry,
    CallbackRedeliver,
    JobRead,
    JobsReload,
    SchedulePause,
    ScheduleResume,
    ScheduleBackfill,
    /// A request refused before it reached its endpoint (no token, a wrong one, or a
    /// token of the wrong kind).
    Request,
}

impl AuditAction {
    pub fn as_str(self) -> &'static str {
        match self {
            AuditAction::RunStart => "run.start",
            AuditAction::RunRead => "run.read",
            AuditAction::RunCancel => "run.cancel",
            AuditAction::RunRetry => "run.retry",
            AuditAction::CallbackRedeliver => "callback.redeliver",
            AuditAction::JobRead => "job.read",
            AuditAction::JobsReload => "jobs.reload",
            AuditAction::SchedulePause => "schedule.pause",
            AuditAction::ScheduleResume => "schedule.resume",
            AuditAction::ScheduleBackfill => "schedule.backfill",
            AuditAction::Request => "request",
        }
    }
}

impl fmt::Display for AuditAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditOutcome<'a> {
    Done,
    /// Answered with `status`; `reason` is for the log only (the client's answer may
    /// say less, e.g. a hiding 404).
    Refused {
        status: u16,
        reason: &'a str,
    },
}

/// One audit event. `actor` is the token's name (`anonymous` on a server without API
/// tokens, `-` when no valid token was presented).
#[derive(Debug, Clone, Copy)]
pub struct AuditEvent<'a> {
    pub actor: &'a str,
    pub action: AuditAction,
    pub outcome: AuditOutcome<'a>,
    pub job: Option<&'a str>,
    pub run_id: Option<RunId>,
    pub schedule: Option<&'a str>,
    /// `METHOD /path` of a request refused before routing.
    pub request: Option<&'a str>,
    /// What else an operator wants to know (`idempotent repeat`, `3 slot(s) fired`).
    pub detail: Option<&'a str>,
}

impl<'a> AuditEvent<'a> {
    pub fn new(actor: &'a str, action: AuditAction, outcome: AuditOutcome<'a>) -> Self {
        Self {
            actor,
            action,
            outcome,
            job: None,
            run_id: None,
            schedule: None,
            request: None,
            detail: None,
        }
    }
}

/// Write one audit event: `info` when done, `warn` when refused.
pub fn record(event: &AuditEvent<'_>) {
    let job = event.job.map(tracing::field::display);
    let run_id = event.run_id.map(tracing::field::display);
    let schedule = event.schedule.map(tracing::field::display);
    let request = event.request.map(tracing::field::display);
    let detail = event.detail.map(tracing::field::display);
    match event.outcome {
        AuditOutcome::Done => tracing::info!(
            target: TARGET,
            message = "audit",
            actor = %event.actor,
            action = %event.action,
            outcome = "done",
            job,
            run_id,
            schedule,
            request,
            detail,
        ),
        AuditOutcome::Refused { status, reason } => tracing::warn!(
            target: TARGET,
            message = "audit",
            actor = %event.actor,
            action = %event.action,
            outcome = "refused",
            status,
            reason = %reason,
            job,
            run_id,
            schedule,
            request,
            detail,
        ),
    }
}
