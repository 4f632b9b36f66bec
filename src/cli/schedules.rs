//! `tasuki schedules next|slots|pause|resume|backfill`: a running server's schedules.

use std::process::ExitCode;

use super::{client, client_failure};
use crate::client::{ApiClient, ClientError};
use crate::config::{ScheduleTarget, SchedulesCommand, ServerOption};
use crate::protocol::schedules::PlannedSlotV1;

pub async fn command(cmd: SchedulesCommand) -> ExitCode {
    let result = match cmd {
        SchedulesCommand::Next {
            target,
            count,
            server,
        } => with_client(&server, |c| next(c, target, count)).await,
        SchedulesCommand::Slots {
            target,
            limit,
            server,
        } => with_client(&server, |c| slots(c, target, limit)).await,
        SchedulesCommand::Pause {
            target,
            note,
            server,
        } => with_client(&server, |c| pause_resume(c, target, "pause", note)).await,
        SchedulesCommand::Resume { target, server } => {
            with_client(&server, |c| pause_resume(c, target, "resume", None)).await
        }
        SchedulesCommand::Backfill {
            target,
            from,
            to,
            server,
        } => with_client(&server, |c| backfill(c, target, from, to)).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is_auth() => client_failure(&e),
        // The server said no (unknown job or schedule, bad range): the request was wrong.
        Err(
            e @ ClientError::Refused {
                status: 400..=499, ..
            },
        ) => {
            eprintln!("tasuki: {e}");
            ExitCode::from(1)
        }
        Err(e) => client_failure(&e),
    }
}

async fn with_client<F, Fut>(server: &ServerOption, f: F) -> Result<(), ClientError>
where
    F: FnOnce(ApiClient) -> Fut,
    Fut: std::future::Future<Output = Result<(), ClientError>>,
{
    f(client(server)?).await
}

fn mark(slot: &PlannedSlotV1) -> String {
    let mut notes = Vec::new();
    match (slot.moved.as_deref(), slot.moved_from.as_deref()) {
        (Some("closed_day"), Some(from)) => notes.push(format!("moved from closed day {from}")),
        (Some("dst_gap"), _) => notes.push("moved by DST gap".to_owned()),
        (Some("dst_fold_second"), _) => notes.push("second occurrence (DST fold)".to_owned()),
        (Some(other), _) => notes.push(format!("moved: {other}")),
        (None, _) => {}
    }
    if let Some(skip) = &slot.skip {
        notes.push(format!("will not fire: {skip}"));
    }
    if notes.is_empty() {
        String::new()
    } else {
        format!("  ({})", notes.join("; "))
    }
}

async fn next(client: ApiClient, target: ScheduleTarget, count: usize) -> Result<(), ClientError> {
    let answer = client.schedules(&target.job, count).await?;
    let mut shown = 0;
    for s in &answer.schedules {
        if target.schedule.as_ref().is_some_and(|n| *n != s.name) {
            continue;
        }
        shown += 1;
        let paused = if s.paused {
            format!(
                "  PAUSED{}",
                s.pause_note
                    .as_ref()
                    .map(|n| format!(": {n}"))
                    .unwrap_or_default()
            )
        } else {
            String::new()
        };
        let calendar = s
            .calendar
            .as_ref()
            .map(|c| format!(", calendar {c}"))
            .unwrap_or_default();
        println!(
            "{}/{}  {}  ({}{calendar}){paused}",
            answer.job, s.name, s.rule, s.time_zone
        );
        for slot in &s.next {
            println!(
                "  {}  {}  business date {}{}",
                slot.fire_at_local,
                slot.fire_at,
                slot.business_date,
                mark(slot)
            );
        }
        if s.next.is_empty() {
            println!("  (no fire time in the next 5 years)");
        }
    }
    if let Some(name) = target.schedule.filter(|_| shown == 0) {
        eprintln!(
            "tasuki: job `{}` has no schedule named `{name}`",
            target.job
        );
        return Err(ClientError::Refused {
            status: 404,
            code: None,
            message: format!("no schedule `{name}`"),
        });
    }
    Ok(())
}

async fn slots(client: ApiClient, target: ScheduleTarget, limit: u32) -> Result<(), ClientError> {
    let answer = client
        .slots(&target.job, target.schedule.as_deref(), limit)
        .await?;
    for s in &answer.slots {
        let what = match (&s.run_id, &s.reason) {
            (Some(run), _) => format!("fired    run {run}"),
            (None, Some(reason)) => format!("skipped  {reason}"),
            _ => s.outcome.clone(),
        };
        let detail = s
            .detail
            .as_ref()
            .map(|d| format!("  ({d})"))
            .unwrap_or_default();
        println!(
            "{}/{}  slot {}  business date {}  {what}{detail}",
            answer.job, s.schedule, s.slot, s.business_date
        );
    }
    Ok(())
}

/// The schedules a target names: the one given, or every one of the job.
async fn names(client: &ApiClient, target: &ScheduleTarget) -> Result<Vec<String>, ClientError> {
    match &target.schedule {
        Some(name) => Ok(vec![name.clone()]),
        None => Ok(client
            .schedules(&target.job, 0)
            .await?
            .schedules
            .into_iter()
            .map(|s| s.name)
            .collect()),
    }
}

async fn pause_resume(
    client: ApiClient,
    target: ScheduleTarget,
    action: &str,
    note: Option<String>,
) -> Result<(), ClientError> {
    for name in names(&client, &target).await? {
        let state = client
            .schedule_action(&target.job, &name, action, note.as_deref())
            .await?;
        let how = if state.paused { "paused" } else { "active" };
        let next = state
            .next
            .first()
            .map(|s| format!(", next slot {}", s.fire_at_local))
            .unwrap_or_default();
        println!("{}/{}  {how}{next}", target.job, state.name);
    }
    Ok(())
}

async fn backfill(
    client: ApiClient,
    target: ScheduleTarget,
    from: String,
    to: String,
) -> Result<(), ClientError> {
    let name = match target.schedule.clone() {
        Some(name) => name,
        None => {
            let all = names(&client, &target).await?;
            match <[String; 1]>::try_from(all) {
                Ok([one]) => one,
                Err(all) => {
                    eprintln!(
                        "tasuki: job `{}` has {} schedules ({}); name one as JOB/SCHEDULE",
                        target.job,
                        all.len(),
                        all.join(", ")
                    );
                    return Err(ClientError::Refused {
                        status: 400,
                        code: None,
                        message: "schedule not named".to_owned(),
                    });
                }
            }
        }
    };
    let report = client.backfill(&target.job, &name, &from, &to).await?;
    for s in &report.fired {
        println!("fired          slot {}  run {}", s.slot, s.run_id);
    }
    for s in &report.already_fired {
        println!("already fired  slot {}  run {}", s.slot, s.run_id);
    }
    for s in &report.not_firing {
        println!(
            "not firing     slot {}  {}",
            s.slot,
            s.skip.as_deref().unwrap_or("")
        );
    }
    println!(
        "{}/{}: {} fired, {} already fired, {} not firing",
        report.job,
        report.schedule,
        report.fired.len(),
        report.already_fired.len(),
        report.not_firing.len()
    );
    Ok(())
}
