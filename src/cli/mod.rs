//! The client commands: `run`, `status`, `logs`, `jobs check`, `jobs reload`. `run --wait` exits with
//! the job's exit code, or with a documented code saying which side failed. `status`
//! prints the run's JSON, and each attempt's resource usage as a line on stderr.

pub mod schedules;
pub mod token;
mod usage;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use futures::StreamExt;

use crate::catalog::{Catalog, CatalogDirs};
use crate::client::{ApiClient, ClientError, ReloadOutcome};
use crate::config::{LogsArgs, RunArgs, ServerOption, StatusArgs};
use crate::domain::job::JobSpec;
use crate::domain::schedule::{Rule, ScheduleSpec};
use crate::protocol::api::{ErrorCodeV1, ReasonCodeV1, RunStatusV1, RunV1};

/// Exit codes for outcomes the job itself did not choose (as `timeout(1)` and
/// `docker run` use them).
pub mod exit {
    /// The job ran past its timeout.
    pub const TIMED_OUT: u8 = 124;
    /// tasuki or Docker could not run the job, or the server refused or was unreachable.
    pub const PLATFORM: u8 = 125;
    /// The worker running the job vanished; the job's outcome is unknown.
    pub const LOST: u8 = 129;
    /// The run was cancelled.
    pub const CANCELLED: u8 = 130;
    /// Killed for going over its memory limit (128 + SIGKILL).
    pub const OOM_KILLED: u8 = 137;
    /// The server wants an API token (401) or the token may not do this (403); as
    /// sysexits' EX_NOPERM.
    pub const AUTH: u8 = 77;
}

/// The exit code that stands for a finished run.
pub fn exit_code_for(run: &RunV1) -> u8 {
    match (&run.status, &run.reason_code) {
        (RunStatusV1::Succeeded, _) => 0,
        (RunStatusV1::TimedOut, _) => exit::TIMED_OUT,
        (RunStatusV1::Cancelled, _) => exit::CANCELLED,
        (RunStatusV1::Lost, _) => exit::LOST,
        (_, Some(ReasonCodeV1::OomKilled)) => exit::OOM_KILLED,
        (_, Some(ReasonCodeV1::ExitCode)) => match run.exit_code {
            // A job that exited non-zero must never read as success.
            Some(code) => u8::try_from(code).ok().filter(|c| *c != 0).unwrap_or(1),
            None => exit::PLATFORM,
        },
        _ => exit::PLATFORM,
    }
}

fn summary(run: &RunV1) -> String {
    let exit_code = run
        .exit_code
        .map_or_else(|| "none".to_owned(), |c| c.to_string());
    let mut line = format!(
        "tasuki: run {} job={} status={} exit_code={} attempt={}",
        run.id, run.job, run.status, exit_code, run.attempt
    );
    if let Some(reason) = &run.reason {
        line.push_str(&format!(" reason={reason:?}"));
    }
    line
}

/// The client for `--server`, with `--token` / `TASUKI_TOKEN` when given.
pub(crate) fn client(server: &ServerOption) -> Result<ApiClient, ClientError> {
    ApiClient::new(
        &server.server,
        server.token.as_deref(),
        server.ca_cert.as_deref(),
    )
}

/// Print why a request failed; exit 77 when the server refused the caller (401, 403),
/// else 125.
pub(crate) fn client_failure(error: &ClientError) -> ExitCode {
    if let ClientError::Refused {
        status: status @ (401 | 403),
        message,
        ..
    } = error
    {
        let (what, hint) = if *status == 401 {
            (
                "not authenticated",
                "set TASUKI_TOKEN (or --token) to an API token of this server",
            )
        } else {
            (
                "not allowed",
                "the token's scopes do not cover this; use a token that has the scope",
            )
        };
        eprintln!("tasuki: {what} ({status}): {message}; {hint}");
        return ExitCode::from(exit::AUTH);
    }
    eprintln!("tasuki: {error}");
    ExitCode::from(exit::PLATFORM)
}

/// `tasuki run JOB [--param k=v]... [--wait [--cancel-on-interrupt]]`
pub async fn run(args: RunArgs) -> ExitCode {
    let client = match client(&args.server) {
        Ok(c) => c,
        Err(e) => return client_failure(&e),
    };
    let params: BTreeMap<String, String> = args.params.into_iter().collect();
    // One key for every try of this request: a retry after a lost answer gets the run
    // the first try started, never a second one.
    let key = format!("tasuki-cli-{}", ulid::Ulid::new());
    let run = match create_with_retries(&client, &args.job, &params, &key).await {
        Ok(r) => r,
        Err(e) => return client_failure(&e),
    };
    if !args.wait {
        println!("{}", run.id);
        return ExitCode::SUCCESS;
    }
    let interrupted = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let waited = tokio::select! {
        w = wait_streaming(&client, &run.id) => w,
        _ = interrupted => {
            if !args.cancel_on_interrupt {
                eprintln!(
                    "tasuki: detached; run {} goes on (`tasuki status {}` to check, `tasuki cancel {}` to stop it)",
                    run.id, run.id, run.id
                );
                return ExitCode::from(exit::CANCELLED);
            }
            eprintln!("tasuki: interrupted; cancelling run {} (Ctrl-C again to detach)", run.id);
            if let Err(e) = client.run_action(&run.id, "cancel").await {
                eprintln!("tasuki: cancelling run {} failed: {e}", run.id);
            }
            tokio::select! {
                w = wait_streaming(&client, &run.id) => w,
                _ = tokio::signal::ctrl_c() => {
                    eprintln!("tasuki: detached from run {}", run.id);
                    return ExitCode::from(exit::CANCELLED);
                }
            }
        }
    };
    match waited {
        Ok(run) => {
            eprintln!("{}", summary(&run));
            ExitCode::from(exit_code_for(&run))
        }
        Err(e) if e.is_auth() => client_failure(&e),
        Err(e) => {
            eprintln!("tasuki: lost contact while waiting for run {}: {e}", run.id);
            ExitCode::from(exit::PLATFORM)
        }
    }
}

/// Create the run, trying again on transient failures (unreachable, 5xx, or the same
/// key still in flight) for about a minute.
async fn create_with_retries(
    client: &ApiClient,
    job: &str,
    params: &BTreeMap<String, String>,
    key: &str,
) -> Result<RunV1, ClientError> {
    let mut pause = Duration::from_millis(250);
    let mut tries = 0;
    loop {
        tries += 1;
        match client.create_run(job, params, Some(key)).await {
            Err(e) if tries < 8 && worth_another_create(&e) => {
                eprintln!("tasuki: {e}; trying again in {} ms", pause.as_millis());
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(15));
            }
            other => return other,
        }
    }
}

/// A failed create is worth repeating with the same key when it was transient, or when
/// an earlier try with that key is still being accepted (the repeat then gets its run).
fn worth_another_create(e: &ClientError) -> bool {
    e.is_transient() || e.code() == Some(&ErrorCodeV1::IdempotencyKeyInFlight)
}

/// `tasuki cancel RUN`, `tasuki retry RUN`: print the run; exit 1 when the server
/// refuses because of the run's state.
pub async fn run_action(args: StatusArgs, action: &str) -> ExitCode {
    let client = match client(&args.server) {
        Ok(c) => c,
        Err(e) => return client_failure(&e),
    };
    match client.run_action(&args.run, action).await {
        Ok(run) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&run).unwrap_or_else(|_| run.to_string())
            );
            ExitCode::SUCCESS
        }
        Err(e @ ClientError::Refused { status: 409, .. }) => {
            eprintln!("tasuki: {e}");
            ExitCode::from(1)
        }
        Err(e) => client_failure(&e),
    }
}

/// Stream the run's output to stdout until it is final. The server ends a follow
/// stream only when the run is final; a stream that breaks earlier (server restart,
/// network) is resumed at the byte where it stopped, so nothing is printed twice.
async fn wait_streaming(client: &ApiClient, id: &str) -> Result<RunV1, ClientError> {
    let mut stdout = std::io::stdout();
    let mut written = 0u64;
    let mut failures = 0u32;
    loop {
        match client.logs(id, true, written).await {
            Ok(stream) => {
                let mut stream = std::pin::pin!(stream);
                while let Some(Ok(bytes)) = stream.next().await {
                    // A closed stdout (e.g. `| head`) must not end the wait.
                    let _ = stdout.write_all(&bytes).and_then(|()| stdout.flush());
                    written += bytes.len() as u64;
                    failures = 0;
                }
            }
            Err(e) if !e.is_transient() => return Err(e),
            Err(_) => {}
        }
        match client.get_run(id, None).await {
            Ok(run) if !run.status.is_pending() => return Ok(run),
            Ok(_) => {}
            Err(e) if !e.is_transient() => return Err(e),
            Err(e) => {
                failures += 1;
                if failures > 60 {
                    return Err(e);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `tasuki status RUN`
pub async fn status(args: StatusArgs) -> ExitCode {
    let client = match client(&args.server) {
        Ok(c) => c,
        Err(e) => return client_failure(&e),
    };
    match client.get_run_json(&args.run).await {
        Ok(run) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&run).unwrap_or_else(|_| run.to_string())
            );
            // For people, beside the JSON on stdout: what each attempt used.
            for line in usage::attempt_lines(&run) {
                eprintln!("{line}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => client_failure(&e),
    }
}

/// `tasuki logs RUN [--follow]`
pub async fn logs(args: LogsArgs) -> ExitCode {
    let client = match client(&args.server) {
        Ok(c) => c,
        Err(e) => return client_failure(&e),
    };
    let stream = match client.logs(&args.run, args.follow, 0).await {
        Ok(s) => s,
        Err(e) => return client_failure(&e),
    };
    let mut stream = std::pin::pin!(stream);
    let mut stdout = std::io::stdout();
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(bytes) => {
                if stdout
                    .write_all(&bytes)
                    .and_then(|()| stdout.flush())
                    .is_err()
                {
                    return ExitCode::SUCCESS;
                }
            }
            Err(e) => return client_failure(&e),
        }
    }
    ExitCode::SUCCESS
}

/// `tasuki jobs check [DIR] [--calendars-dir DIR] [--config FILE]`: every calendar
/// (used or not) and every job, within the container policy of the server config (the
/// built-in one without); exit 1 with every error when any file is invalid.
pub fn check_jobs(dirs: &CatalogDirs, config: Option<&Path>) -> ExitCode {
    let dir = dirs.jobs.display();
    let policy = match crate::config::server::ServerConfig::load(config, std::env::vars())
        .and_then(|c| c.containers.policy())
    {
        Ok(policy) => policy,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(1);
        }
    };
    match Catalog::load(dirs, &policy) {
        Ok(catalog) => {
            for c in catalog.calendars().values() {
                println!(
                    "ok  calendar {}: {} open weekdays, {} closed dates, {} open dates",
                    c.name,
                    c.open_weekdays.len(),
                    c.closed.len(),
                    c.open.len()
                );
            }
            for job in catalog.iter() {
                let params = job.params.len();
                let mut line = format!("ok  {}  image {}, {params} param(s)", job.name, job.image);
                for s in &job.schedules {
                    line.push_str(&format!(", schedule {}", schedule_summary(s)));
                }
                if let Some(n) = job.max_concurrent {
                    line.push_str(&format!(", max_concurrent {n}"));
                }
                line.push_str(&hardening_summary(job));
                println!("{line}");
            }
            println!(
                "{} job(s) and {} calendar(s) valid in {dir} and {}",
                catalog.len(),
                catalog.calendars().len(),
                dirs.calendars.path().display()
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("{e}");
            }
            eprintln!("{} error(s) in {dir}", errors.0.len());
            ExitCode::from(1)
        }
    }
}

/// `, memory 512MiB, pids 512, capabilities NET_RAW, read-only root, mounts
/// /srv/data:/data:ro`, for `jobs check`: the limits its containers will run with.
fn hardening_summary(job: &JobSpec) -> String {
    let h = &job.hardening;
    let mut text = String::new();
    if let Some(m) = job.resources.memory_bytes {
        text.push_str(&format!(", memory {}", size_text(m)));
    }
    if let Some(p) = h.pids_limit {
        text.push_str(&format!(", pids {p}"));
    }
    if !h.capabilities.is_empty() {
        let caps: Vec<&str> = h.capabilities.iter().map(|c| c.as_str()).collect();
        text.push_str(&format!(", capabilities {}", caps.join(" ")));
    }
    if h.read_only {
        text.push_str(", read-only root");
    }
    if !h.mounts.is_empty() {
        let mounts: Vec<String> = h
            .mounts
            .iter()
            .map(|m| {
                let mode = if m.read_only { "ro" } else { "rw" };
                format!("{}:{}:{mode}", m.source, m.target)
            })
            .collect();
        text.push_str(&format!(", mounts {}", mounts.join(" ")));
    }
    text
}

/// Bytes in the largest binary unit that divides them (`512MiB`), else bytes.
fn size_text(bytes: u64) -> String {
    for (unit, shift) in [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)] {
        if bytes.trailing_zeros() >= shift {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    format!("{bytes}B")
}

/// `nightly "30 2 * * 1-5" Asia/Tokyo calendar jp-business`, for `jobs check`.
fn schedule_summary(s: &ScheduleSpec) -> String {
    let rule = match &s.rule {
        Rule::Cron(c) => format!("{:?}", c.expression),
        Rule::OpenDaysOfMonth { days, at } => {
            let days: Vec<String> = days.iter().map(ToString::to_string).collect();
            format!("open days [{}] at {}", days.join(", "), at.format("%H:%M"))
        }
    };
    let mut line = format!("{} {rule} {}", s.name, s.time_zone.name());
    if let Some(c) = &s.calendar {
        line.push_str(&format!(" calendar {}", c.name));
    }
    if s.suspended {
        line.push_str(" (suspended)");
    }
    line
}

/// `tasuki jobs reload [--server URL]`: exit 0 with the summary, 1 when the server
/// refused the files (every problem printed), 125 when it could not be asked.
pub async fn reload_jobs(server: ServerOption) -> ExitCode {
    let client = match client(&server) {
        Ok(c) => c,
        Err(e) => return client_failure(&e),
    };
    match client.reload_jobs().await {
        Ok(ReloadOutcome::Reloaded(s)) => {
            let list = |names: &[String]| {
                if names.is_empty() {
                    "-".to_owned()
                } else {
                    names.join(", ")
                }
            };
            println!(
                "reloaded: {} job(s), {} calendar(s), generation {}",
                s.jobs, s.calendars, s.generation
            );
            println!("added:   {}", list(&s.added));
            println!("changed: {}", list(&s.changed));
            println!("removed: {}", list(&s.removed));
            ExitCode::SUCCESS
        }
        Ok(ReloadOutcome::Refused { message, details }) => {
            for d in &details {
                eprintln!("{d}");
            }
            eprintln!("tasuki: {message}");
            ExitCode::from(1)
        }
        Err(e) => client_failure(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_create_is_repeated_for_an_in_flight_key_but_not_for_other_refusals() {
        let refused = |status, code: Option<&str>| ClientError::Refused {
            status,
            code: code.map(|c| ErrorCodeV1::from(c.to_owned())),
            message: String::new(),
        };
        assert!(worth_another_create(&refused(
            409,
            Some("idempotency_key_in_flight")
        )));
        assert!(worth_another_create(&refused(503, Some("unavailable"))));
        assert!(!worth_another_create(&refused(
            422,
            Some("idempotency_key_reused")
        )));
        assert!(!worth_another_create(&refused(409, Some("rejected"))));
        assert!(!worth_another_create(&refused(409, None)));
    }

    #[test]
    fn a_refused_caller_exits_77_and_other_failures_125() {
        let refused = |status| ClientError::Refused {
            status,
            code: None,
            message: "m".into(),
        };
        assert_eq!(client_failure(&refused(401)), ExitCode::from(exit::AUTH));
        assert_eq!(client_failure(&refused(403)), ExitCode::from(exit::AUTH));
        assert_eq!(
            client_failure(&refused(404)),
            ExitCode::from(exit::PLATFORM)
        );
        let down = ClientError::Unreachable {
            url: "u".into(),
            message: "m".into(),
        };
        assert_eq!(client_failure(&down), ExitCode::from(exit::PLATFORM));
    }

    fn run(status: &str, code: Option<i64>, reason: Option<&str>) -> RunV1 {
        RunV1 {
            output_gap: false,
            id: "r".into(),
            job: "j".into(),
            status: RunStatusV1::from(status.to_owned()),
            params: BTreeMap::new(),
            trigger: Default::default(),
            exit_code: code,
            reason: None,
            reason_code: reason.map(|r| ReasonCodeV1::from(r.to_owned())),
            created_at: "2026-01-01T00:00:00.000Z".into(),
            started_at: None,
            finished_at: None,
            attempt: 1,
            attempts: Vec::new(),
            cancel_requested: false,
            not_before: None,
            logs_truncated: false,
            log_dropped_bytes: 0,
            callbacks: Vec::new(),
            requested_by: None,
            replies: Vec::new(),
        }
    }

    #[test]
    fn exit_codes_tell_job_failures_from_platform_failures() {
        assert_eq!(exit_code_for(&run("succeeded", Some(0), None)), 0);
        assert_eq!(exit_code_for(&run("failed", Some(3), Some("exit_code"))), 3);
        assert_eq!(
            exit_code_for(&run("failed", Some(256), Some("exit_code"))),
            1
        );
        assert_eq!(
            exit_code_for(&run("failed", Some(137), Some("oom_killed"))),
            137
        );
        assert_eq!(
            exit_code_for(&run("timed_out", Some(143), Some("timed_out"))),
            124
        );
        assert_eq!(
            exit_code_for(&run("failed", None, Some("image_not_found"))),
            125
        );
        assert_eq!(
            exit_code_for(&run("failed", None, Some("docker_error"))),
            125
        );
        assert_eq!(
            exit_code_for(&run("cancelled", None, Some("cancelled"))),
            130
        );
        assert_eq!(exit_code_for(&run("lost", None, Some("lost"))), 129);
        // Text from a newer server: not a job's own outcome, so the platform's code.
        assert_eq!(exit_code_for(&run("paused", Some(0), None)), 125);
        assert_eq!(exit_code_for(&run("failed", Some(3), Some("gone"))), 125);
    }
}
