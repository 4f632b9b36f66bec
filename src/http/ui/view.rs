//! What the pages show of runs and attempts, in words: times, durations, reasons,
//! resource usage. Pure functions of the domain types, tested here.

use chrono::{DateTime, Utc};

use crate::domain::run::{Attempt, ReasonCode, ResourceUsage, Run, RunStatus, Trigger};

/// An instant as the pages show it (UTC, to the second).
pub fn time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S").to_string()
}

/// A span of time, short: `850 ms`, `4.2 s`, `3 min 05 s`, `2 h 07 min`.
pub fn span(from: DateTime<Utc>, to: DateTime<Utc>) -> String {
    let ms = (to - from).num_milliseconds().max(0);
    if ms < 1000 {
        format!("{ms} ms")
    } else if ms < 60_000 {
        format!("{:.1} s", ms as f64 / 1000.0)
    } else if ms < 3_600_000 {
        format!("{} min {:02} s", ms / 60_000, (ms / 1000) % 60)
    } else {
        format!("{} h {:02} min", ms / 3_600_000, (ms / 60_000) % 60)
    }
}

/// Bytes in binary units: `512 B`, `41 MiB`, `1.5 GiB`.
pub fn bytes(n: u64) -> String {
    const KIB: f64 = 1024.0;
    let f = n as f64;
    if f < KIB {
        format!("{n} B")
    } else if f < KIB * KIB {
        format!("{:.0} KiB", f / KIB)
    } else if f < KIB * KIB * KIB {
        format!("{:.0} MiB", f / (KIB * KIB))
    } else {
        format!("{:.1} GiB", f / (KIB * KIB * KIB))
    }
}

/// An attempt's resources: `peak 41 MiB of 64 MiB · CPU 0.8 s`, or `—` when nothing
/// was sampled.
pub fn usage(u: Option<&ResourceUsage>) -> String {
    let Some(u) = u else {
        return "—".to_owned();
    };
    let memory = match u.memory_limit_bytes {
        Some(limit) => format!("peak {} of {}", bytes(u.peak_memory_bytes), bytes(limit)),
        None => format!("peak {}", bytes(u.peak_memory_bytes)),
    };
    let cpu = match u.cpu_limit {
        Some(limit) => format!("CPU {:.1} s (limit {limit} CPUs)", u.cpu_seconds),
        None => format!("CPU {:.1} s", u.cpu_seconds),
    };
    format!("{memory} · {cpu}")
}

/// Why a run or attempt ended as it did, in a sentence; `None` for a success or one
/// that has not ended.
pub fn reason_words(
    code: Option<ReasonCode>,
    exit_code: Option<i64>,
    reason: Option<&str>,
) -> Option<String> {
    let detail = reason.unwrap_or("");
    // The stored reason starts with its code; the rest is the engine's or tasuki's words.
    let tail = detail
        .split_once(": ")
        .map(|(_, rest)| rest)
        .filter(|r| !r.is_empty());
    Some(match code? {
        ReasonCode::ExitCode => match exit_code {
            Some(c) => format!("The command exited with code {c}."),
            None => "The command exited with a non-zero code.".to_owned(),
        },
        ReasonCode::OomKilled => {
            "Killed by the kernel: the container went over its memory limit.".to_owned()
        }
        ReasonCode::TimedOut => format!("Stopped by tasuki: {detail}."),
        ReasonCode::ImageNotFound => {
            format!("The image was not found: {}.", tail.unwrap_or(detail))
        }
        ReasonCode::ImagePullFailed => {
            format!("The image could not be pulled: {}.", tail.unwrap_or(detail))
        }
        ReasonCode::DockerError => format!(
            "Docker refused or failed; the container may never have run: {}.",
            tail.unwrap_or(detail)
        ),
        ReasonCode::Cancelled => "Cancelled on request.".to_owned(),
        ReasonCode::Lost => {
            "Lost: its worker stopped reporting and the lease expired; the outcome is unknown."
                .to_owned()
        }
        ReasonCode::SecretUnavailable => format!(
            "A secret could not be read when the attempt was claimed: {}.",
            tail.unwrap_or(detail)
        ),
    })
}

/// What started a run, in words.
pub fn trigger(t: &Trigger) -> String {
    match t {
        Trigger::Api => "API".to_owned(),
        Trigger::Webhook => "webhook".to_owned(),
        Trigger::Schedule {
            schedule,
            local_time,
            ..
        } => format!("schedule {schedule} ({local_time})"),
    }
}

/// One row of the runs table.
pub struct RunRow {
    pub id: String,
    pub job: String,
    pub status: &'static str,
    pub params: String,
    pub trigger: &'static str,
    pub created: String,
    pub took: String,
    pub exit_code: String,
    pub reason: String,
    /// Offered as a bulk action target.
    pub cancellable: bool,
    pub retryable: bool,
}

pub fn retryable(status: RunStatus) -> bool {
    matches!(
        status,
        RunStatus::Failed | RunStatus::TimedOut | RunStatus::Lost
    )
}

/// `a=1 b=two`: the params as one line.
pub fn params_line(run: &Run) -> String {
    run.params
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

impl RunRow {
    pub fn of(run: &Run, now: DateTime<Utc>) -> RunRow {
        let took = match (run.started_at, run.finished_at) {
            (Some(s), Some(f)) => span(s, f),
            (Some(s), None) => format!("{} so far", span(s, now)),
            _ => String::new(),
        };
        RunRow {
            id: run.id.to_string(),
            job: run.job.clone(),
            status: run.status.as_str(),
            params: params_line(run),
            trigger: run.trigger.kind(),
            created: time(run.created_at),
            took,
            exit_code: run.exit_code.map(|c| c.to_string()).unwrap_or_default(),
            reason: run.reason.clone().unwrap_or_default(),
            cancellable: !run.status.is_final(),
            retryable: retryable(run.status),
        }
    }
}

/// One attempt as the run page shows it.
pub struct AttemptView {
    pub number: u32,
    pub status: &'static str,
    pub worker: String,
    /// The worker's build, empty when it did not name one.
    pub build: String,
    pub exit_code: String,
    pub reason: String,
    pub usage: String,
    pub oom: bool,
    /// Waiting for a worker: from the run's creation (or the previous attempt's end)
    /// to the claim.
    pub queued: String,
    /// From the claim to the container's start: the image pull and the create (not
    /// told apart: tasuki records no separate pull time).
    pub starting: String,
    /// From the container's start to its end (or now).
    pub running: String,
}

impl AttemptView {
    pub fn of(a: &Attempt, previous_end: DateTime<Utc>, now: DateTime<Utc>) -> Self {
        let starting = match a.started_at {
            Some(s) => span(a.claimed_at, s),
            None if a.finished_at.is_none() => format!("{} so far", span(a.claimed_at, now)),
            None => "did not start".to_owned(),
        };
        let running = match (a.started_at, a.finished_at) {
            (Some(s), Some(f)) => span(s, f),
            (Some(s), None) => format!("{} so far", span(s, now)),
            _ => "—".to_owned(),
        };
        AttemptView {
            number: a.number,
            status: a.status.as_str(),
            worker: a.worker_id.clone(),
            build: a.worker_build.clone().unwrap_or_default(),
            exit_code: a
                .exit_code
                .map_or_else(|| "—".to_owned(), |c| c.to_string()),
            reason: reason_words(a.reason_code, a.exit_code, a.reason.as_deref())
                .unwrap_or_default(),
            usage: usage(a.usage.as_ref()),
            oom: a.reason_code == Some(ReasonCode::OomKilled),
            queued: span(previous_end, a.claimed_at),
            starting,
            running,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn spans_read_short() {
        let t0 = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let at = |ms: i64| t0 + chrono::Duration::milliseconds(ms);
        assert_eq!(span(t0, at(850)), "850 ms");
        assert_eq!(span(t0, at(4_200)), "4.2 s");
        assert_eq!(span(t0, at(185_000)), "3 min 05 s");
        assert_eq!(span(t0, at(7_620_000)), "2 h 07 min");
        // A clock that went back shows nothing negative.
        assert_eq!(span(at(5), t0), "0 ms");
    }

    #[test]
    fn usage_reads_like_the_issue_says() {
        let u = ResourceUsage {
            peak_memory_bytes: 41 * 1024 * 1024,
            cpu_seconds: 0.8,
            memory_limit_bytes: Some(64 * 1024 * 1024),
            cpu_limit: None,
            samples: 3,
        };
        assert_eq!(usage(Some(&u)), "peak 41 MiB of 64 MiB · CPU 0.8 s");
        assert_eq!(usage(None), "—");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 * 1024 * 1024 * 1024 / 2), "1.5 GiB");
    }

    #[test]
    fn reasons_are_sentences() {
        assert_eq!(
            reason_words(Some(ReasonCode::ExitCode), Some(3), Some("exit_code 3")).unwrap(),
            "The command exited with code 3."
        );
        assert_eq!(
            reason_words(
                Some(ReasonCode::ImageNotFound),
                None,
                Some("image_not_found: nope:1")
            )
            .unwrap(),
            "The image was not found: nope:1."
        );
        assert!(
            reason_words(Some(ReasonCode::OomKilled), Some(137), None)
                .unwrap()
                .contains("memory limit")
        );
        assert_eq!(reason_words(None, Some(0), None), None);
    }
}
