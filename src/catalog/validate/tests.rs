//! The validators of the top-level fields: image, command, container settings,
//! timeouts, env, and the order errors print in.

use super::*;
use crate::catalog::testing::*;

#[test]
fn bad_duration() {
    let e = one_error("image = \"a\"\ntimeout = \"soon\"\n");
    assert_eq!(e.line, Some(2));
    assert_eq!(e.field.as_deref(), Some("timeout"));
    assert!(e.message.contains("invalid duration \"soon\""), "{e}");
    let e = one_error("image = \"a\"\nstop_grace = \"0s\"\n");
    assert_eq!(e.field.as_deref(), Some("stop_grace"));
}

#[test]
fn missing_and_bad_image() {
    let e = one_error("command = [\"x\"]\n");
    assert_eq!(e.field.as_deref(), Some("image"));
    assert!(e.message.contains("missing"));
    assert_eq!(e.line, None);
    assert_eq!(one_error("image = \"\"").field.as_deref(), Some("image"));
    assert!(one_error("image = \"a b\"").message.contains("whitespace"));
}

#[test]
fn references_outside_command_env_rejected() {
    let e = one_error("image = \"img:{{params.tag}}\"\n[params.tag]\n");
    assert_eq!(e.field.as_deref(), Some("image"));
    assert!(e.message.contains("only substituted"));
}

#[test]
fn env_names() {
    let errs = errors("image = \"a\"\n[env]\n\"1BAD\" = \"x\"\nTASUKI_RUN = \"y\"\nOK_1 = \"z\"\n");
    assert_eq!(errs.len(), 2, "{errs:?}");
    assert!(errs[0].starts_with("jobs/hello.toml:3: env.1BAD: invalid environment"));
    assert!(
        errs[1].starts_with("jobs/hello.toml:4: env.TASUKI_RUN: names starting with `TASUKI_`")
    );
}

#[test]
fn schedule_and_time_zone() {
    let e = one_error("image = \"a\"\ntime_zone = \"UTC\"\n");
    assert_eq!(e.field.as_deref(), Some("time_zone"));
    assert_eq!(e.line, Some(2));
    let e = one_error("image = \"a\"\nschedule = \"0 9 * * 8\"\n");
    assert_eq!(e.field.as_deref(), Some("schedule"));
    let e = one_error("image = \"a\"\nschedule = \"0 9 * * *\"\ntime_zone = \"Tokyo\"\n");
    assert_eq!(e.field.as_deref(), Some("time_zone"));
    assert_eq!(e.line, Some(3));
    let s = parse("image = \"a\"\nschedule = \"@daily\"\n").unwrap();
    assert_eq!(s.schedules[0].time_zone, chrono_tz::UTC);
}

#[test]
fn the_log_mode_is_durable_unless_the_file_says_fast() {
    let e = one_error("image = \"a\"\nlogs = \"quick\"\n");
    assert_eq!(e.line, Some(2));
    assert_eq!(e.field.as_deref(), Some("logs"));
    assert!(e.message.contains("invalid log mode \"quick\""), "{e}");
    assert!(e.message.contains("\"durable\" or \"fast\""), "{e}");
    assert_eq!(parse("image = \"a\"\n").unwrap().logs, LogMode::Durable);
    assert_eq!(
        parse("image = \"a\"\nlogs = \"fast\"\n").unwrap().logs,
        LogMode::Fast
    );
}

#[test]
fn misc_field_validation() {
    assert_eq!(
        one_error("image = \"a\"\nworkdir = \"tmp\"")
            .field
            .as_deref(),
        Some("workdir")
    );
    assert_eq!(
        one_error("image = \"a\"\npull = \"sometimes\"")
            .field
            .as_deref(),
        Some("pull")
    );
    assert_eq!(
        one_error("image = \"a\"\ncommand = []").field.as_deref(),
        Some("command")
    );
    assert_eq!(
        one_error("image = \"a\"\nnetwork = \"\"").field.as_deref(),
        Some("network")
    );
    assert_eq!(
        one_error("image = \"a\"\n[resources]\ncpu = 1")
            .field
            .as_deref(),
        Some("resources.cpu")
    );
    assert_eq!(
        one_error("image = \"a\"\n[resources]\ncpu = 262145")
            .field
            .as_deref(),
        Some("resources.cpu")
    );
    assert_eq!(
        one_error("image = \"a\"\n[resources]\ncpu_limit = 0.0")
            .field
            .as_deref(),
        Some("resources.cpu_limit")
    );
    assert_eq!(
        one_error("image = \"a\"\n[resources]\ncpu_limit = nan")
            .field
            .as_deref(),
        Some("resources.cpu_limit")
    );
}

#[test]
fn command_arguments() {
    let e = one_error("image = \"a\"\ncommand = [\"echo\", \"a\\u0000b\"]\n");
    assert_eq!(e.line, Some(2));
    assert_eq!(e.field.as_deref(), Some("command[1]"));
    assert_eq!(e.message, "contains a NUL character");
    let e = one_error("image = \"a\"\n\ncommand = []\n");
    assert_eq!(e.line, Some(3));
    assert!(e.message.contains("omit `command`"), "{e}");
    let s = parse("image = \"a\"\ncommand = [\"a b\", \"\"]\n").unwrap();
    assert_eq!(s.command, ["a b", ""]);
}

#[test]
fn timeouts_default_and_parse() {
    let s = parse("image = \"a\"\ntimeout = \"1h 30m\"\n").unwrap();
    assert_eq!(s.timeout, Some(Duration::from_secs(5400)));
    assert_eq!(s.stop_grace, DEFAULT_STOP_GRACE);
    let errs = errors("image = \"a\"\ntimeout = \"x\"\nstop_grace = \"y\"\n");
    assert_eq!(errs.len(), 2, "{errs:?}");
    assert!(
        errs[0].starts_with("jobs/hello.toml:2: timeout: "),
        "{errs:?}"
    );
    assert!(
        errs[1].starts_with("jobs/hello.toml:3: stop_grace: "),
        "{errs:?}"
    );
}

#[test]
fn env_values() {
    let e = one_error("image = \"a\"\n[env]\nX = \"a\\u0000\"\n");
    assert_eq!(
        e.to_string(),
        "jobs/hello.toml:3: env.X: contains a NUL character"
    );
    let e = one_error("image = \"a\"\n[env]\nX = \"{{params.p}}\"\n");
    assert!(e.message.contains("no parameters are declared"), "{e}");
}

/// Errors print in the order of the file's sections, whatever order the file
/// gives them in.
#[test]
fn errors_come_in_section_order() {
    let errs = parse(
        "[retry]\nmax_attempts = 0\n[params.X]\n[resources]\ncpu = 1\n[env]\n\"1\" = \"v\"\n",
    )
    .unwrap_err();
    let fields: Vec<_> = errs.iter().map(|e| e.field.as_deref()).collect();
    assert_eq!(
        fields,
        [
            Some("image"),
            Some("env.1"),
            Some("resources.cpu"),
            Some("params.X"),
            Some("retry.max_attempts"),
        ]
    );
    let errs = parse(
        "image = \"\"\ncommand = []\nworkdir = \"w\"\npull = \"p\"\ntimeout = \"t\"\nschedule = \"s\"\n",
    )
    .unwrap_err();
    let fields: Vec<_> = errs.iter().map(|e| e.field.as_deref()).collect();
    assert_eq!(
        fields,
        [
            Some("image"),
            Some("command"),
            Some("workdir"),
            Some("pull"),
            Some("timeout"),
            Some("schedule"),
        ]
    );
}

/// Found by `fuzz/fuzz_targets/job_file.rs`: `stop_grace = "18446744073709551615s"`
/// was accepted and then stored, in milliseconds, as another duration; and a
/// sub-millisecond `timeout` was stored as 0 (every run timed out at once).
#[test]
fn fuzz_stop_grace_of_u64_max_seconds_is_refused() {
    let e = one_error("image = \"a\"\nstop_grace = \"18446744073709551615s\"\n");
    assert_eq!(e.line, Some(2));
    assert_eq!(e.field.as_deref(), Some("stop_grace"));
    assert!(e.message.contains("longer than a run can keep"), "{e}");
    let e = one_error("image = \"a\"\ntimeout = \"999us\"\n");
    assert_eq!(e.field.as_deref(), Some("timeout"));
    assert!(e.message.contains("whole milliseconds"), "{e}");
    let e =
        one_error("image = \"a\"\n[retry]\nmax_attempts = 2\non = [\"lost\"]\nbackoff = \"1ns\"\n");
    assert_eq!(e.field.as_deref(), Some("retry.backoff"));
    let s = parse("image = \"a\"\ntimeout = \"1500ms\"\n").unwrap();
    assert_eq!(s.timeout, Some(Duration::from_millis(1500)));
}
