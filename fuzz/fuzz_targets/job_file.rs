//! A job file as `tasuki jobs check` reads it: TOML text → validated `JobSpec`, or
//! errors naming file, line and field.
//!
//! Beyond "no panic, no hang": an accepted job keeps every promise the validator makes
//! (see `check_spec`), its core re-validates when written back as TOML and gives the
//! same spec, and its resolved spec survives the stored form (`SpecV1`, as JSON)
//! unchanged; a refused one has errors that each print on one line of their own, about
//! a line the file has.
#![no_main]

use std::collections::BTreeMap;
use std::sync::LazyLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tasuki::catalog::{CatalogError, parse_job_str};
use tasuki::domain::job::ContainerPolicy;
use tasuki::domain::job::{
    JobSpec, ParamError, ResolvedSpec, has_malformed_param_reference, is_reserved_env_name,
    is_valid_env_name, is_valid_param_name,
};
use tasuki::domain::retry::RetryPolicy;
use tasuki::domain::schedule::Calendar;
use tasuki::protocol::{RetryV1, SpecV1};

const NAME: &str = "job";

/// Calendars a schedule may name: the repo's example, one never open, one always open.
static CALENDARS: LazyLock<Vec<Calendar>> = LazyLock::new(|| {
    let date = |s: &str| s.parse().expect("constant date");
    let mut jp = Calendar::weekdays("jp-business");
    jp.closed = ["2026-01-01", "2026-01-02", "2026-05-05", "2026-12-31"]
        .map(date)
        .into();
    jp.open = ["2026-01-03"].map(date).into();
    let mut never = Calendar::weekdays("never");
    never.open_weekdays.clear();
    let mut always = Calendar::weekdays("always");
    always.open_weekdays = (0..7).collect();
    vec![jp, never, always]
});

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return; // the catalog refuses non-UTF-8 files before parsing
    };
    match parse_job_str(NAME, text, &CALENDARS, &ContainerPolicy::default()) {
        Ok(spec) => {
            check_spec(&spec);
            check_revalidates(&spec);
            check_stored_form(&spec);
        }
        Err(errors) => check_errors(text, &errors),
    }
});

/// What the validator promises about every job it accepts.
fn check_spec(spec: &JobSpec) {
    assert_eq!(spec.name.as_str(), NAME);
    assert!(!spec.image.is_empty());
    assert!(
        !spec
            .image
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
    );
    for value in spec.command.iter().chain(spec.env.values()) {
        assert!(!value.contains('\0'), "NUL in {value:?}");
        assert!(!has_malformed_param_reference(value), "{value:?}");
    }
    assert!(
        spec.undeclared_params().is_empty(),
        "{:?}",
        spec.undeclared_params()
    );
    for name in spec.env.keys() {
        assert!(
            is_valid_env_name(name) && !is_reserved_env_name(name),
            "{name:?}"
        );
    }
    if let Some(w) = &spec.workdir {
        assert!(w.starts_with('/'), "{w:?}");
    }
    assert!(!spec.stop_grace.is_zero());
    assert!(spec.timeout.is_none_or(|t| !t.is_zero()));
    assert!(
        spec.max_concurrent
            .is_none_or(|m| (1..=10_000).contains(&m))
    );
    for (name, p) in &spec.params {
        assert!(is_valid_param_name(name), "{name:?}");
        assert!(!(p.required && p.default.is_some()), "{name}");
        if let Some(d) = &p.default {
            p.check_value(name, d)
                .expect("a default passes its own checks");
        }
    }
    // With nothing given, only the required parameters can be missing.
    match spec.resolve(&BTreeMap::new()) {
        Ok(_) => assert!(spec.params.values().all(|p| !p.required)),
        Err(errors) => {
            for e in errors.iter() {
                assert!(
                    matches!(e, ParamError::Missing { name } if spec.params[name].required),
                    "{e}"
                );
            }
        }
    }
}

/// The core of the job (everything but schedules, retry, webhook and callback), written
/// back as TOML, is accepted again and gives the same spec.
fn check_revalidates(spec: &JobSpec) {
    let text = core_toml(spec);
    let again = match parse_job_str(NAME, &text, &CALENDARS, &ContainerPolicy::default()) {
        Ok(again) => again,
        Err(errors) => panic!("{text}\nis refused: {errors:?}"),
    };
    assert_eq!(again.description, spec.description);
    assert_eq!(again.image, spec.image);
    assert_eq!(again.command, spec.command);
    assert_eq!(again.workdir, spec.workdir);
    assert_eq!(again.user, spec.user);
    assert_eq!(again.env, spec.env);
    assert_eq!(again.pull, spec.pull);
    assert_eq!(again.resources, spec.resources);
    assert_eq!(again.timeout, spec.timeout);
    assert_eq!(again.stop_grace, spec.stop_grace);
    assert_eq!(again.network, spec.network);
    assert_eq!(again.max_concurrent, spec.max_concurrent);
    assert_eq!(
        again.params.keys().collect::<Vec<_>>(),
        spec.params.keys().collect::<Vec<_>>()
    );
    for (name, p) in &spec.params {
        let q = &again.params[name];
        assert_eq!(q.required, p.required, "{name}");
        assert_eq!(q.default, p.default, "{name}");
        assert_eq!(q.max_length, p.max_length, "{name}");
        assert_eq!(q.description, p.description, "{name}");
        // Anchoring an anchored pattern again only wraps it once more.
        let expected = p.pattern.as_ref().map(|re| {
            tasuki::domain::job::ParamSpec::anchored_pattern(re.as_str())
                .expect("an anchored valid pattern compiles")
                .as_str()
                .to_owned()
        });
        assert_eq!(
            q.pattern.as_ref().map(|re| re.as_str().to_owned()),
            expected
        );
    }
}

fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

fn toml_duration(d: Duration) -> String {
    let text = match (d.as_secs(), d.subsec_nanos()) {
        (s, 0) => format!("{s}s"),
        (0, n) => format!("{n}ns"),
        (s, n) => format!("{s}s {n}ns"),
    };
    toml_str(&text)
}

fn core_toml(spec: &JobSpec) -> String {
    let mut t = String::new();
    let mut line = |k: &str, v: String| t.push_str(&format!("{k} = {v}\n"));
    if let Some(d) = &spec.description {
        line("description", toml_str(d));
    }
    line("image", toml_str(&spec.image));
    if !spec.command.is_empty() {
        let args: Vec<String> = spec.command.iter().map(|a| toml_str(a)).collect();
        line("command", format!("[{}]", args.join(", ")));
    }
    if let Some(w) = &spec.workdir {
        line("workdir", toml_str(w));
    }
    if let Some(u) = &spec.user {
        line("user", toml_str(u));
    }
    line("pull", toml_str(spec.pull.as_str()));
    if let Some(d) = spec.timeout {
        line("timeout", toml_duration(d));
    }
    line("stop_grace", toml_duration(spec.stop_grace));
    line("network", toml_str(&spec.network));
    if let Some(m) = spec.max_concurrent {
        line("max_concurrent", m.to_string());
    }
    t.push_str("[env]\n");
    for (k, v) in &spec.env {
        t.push_str(&format!("{} = {}\n", toml_str(k), toml_str(v)));
    }
    t.push_str("[resources]\n");
    if let Some(cpu) = spec.resources.cpu {
        t.push_str(&format!("cpu = {cpu}\n"));
    }
    if let Some(limit) = spec.resources.cpu_limit {
        // `{:?}` keeps a float's every digit (and a `.0`), so TOML reads the same f64.
        t.push_str(&format!("cpu_limit = {limit:?}\n"));
    }
    if let Some(m) = spec.resources.memory_bytes {
        t.push_str(&format!("memory = \"{m}\"\n"));
    }
    for (name, p) in &spec.params {
        t.push_str(&format!("[params.{}]\n", toml_str(name)));
        t.push_str(&format!("required = {}\n", p.required));
        t.push_str(&format!("max_length = {}\n", p.max_length));
        if let Some(d) = &p.default {
            t.push_str(&format!("default = {}\n", toml_str(d)));
        }
        if let Some(re) = &p.pattern {
            t.push_str(&format!("pattern = {}\n", toml_str(re.as_str())));
        }
        if let Some(d) = &p.description {
            t.push_str(&format!("description = {}\n", toml_str(d)));
        }
    }
    t
}

/// A run's spec and retry rules are frozen at acceptance as `SpecV1` and `RetryV1`
/// JSON; reading them back gives what the job said.
fn check_stored_form(spec: &JobSpec) {
    let json = serde_json::to_string(&RetryV1::from(&spec.retry)).expect("rules serialise");
    let read: RetryV1 = serde_json::from_str(&json).expect("stored rules read back");
    let back = RetryPolicy::try_from(read).expect("stored rules convert back");
    assert_eq!(back, spec.retry, "stored as {json}");

    let given: BTreeMap<String, String> = spec
        .params
        .iter()
        .filter(|(_, p)| p.required)
        .map(|(name, _)| (name.clone(), String::new()))
        .collect();
    let Ok(resolved) = spec.resolve(&given) else {
        return; // "" does not meet some required parameter's pattern
    };
    let stored = SpecV1::from(&resolved);
    let json = serde_json::to_string(&stored).expect("a spec serialises");
    let read: SpecV1 = serde_json::from_str(&json).expect("a stored spec reads back");
    let back = ResolvedSpec::try_from(read).expect("a stored spec converts back");
    assert_eq!(back, resolved, "stored as {json}");
}

/// `jobs check` prints one error a line: file, line, field, message.
fn check_errors(text: &str, errors: &[CatalogError]) {
    assert!(!errors.is_empty());
    let lines = text.split('\n').count();
    for e in errors {
        assert_eq!(e.file.to_str(), Some("jobs/job.toml"));
        assert!(!e.message.trim().is_empty(), "{e:?}");
        if let Some(line) = e.line {
            assert!((1..=lines).contains(&line), "line {line} of {lines}: {e:?}");
        }
        let printed = e.to_string();
        assert!(
            !printed.contains(['\n', '\r']),
            "an error prints over several lines: {printed:?}"
        );
    }
}
