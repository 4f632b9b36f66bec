//! Request parameters against a job: `JobSpec::resolve`, checked against a model.
//!
//! The job is one of a few real job files (references with and without spaces, side by
//! side, inside more braces, beside shell `${...}` that must stay verbatim) or one the
//! fuzzer builds: declarations and templates of literal text, references and near
//! misses. The model says which parameters are refused and why, and what each template
//! becomes (a plain left-to-right scan, no regex); `resolve` must agree exactly. When
//! it succeeds, no `{{params.NAME}}` of the job is left in what runs unless a given
//! value brought it in (values are inserted verbatim, never scanned again), and nothing
//! but `command` and `env` changed.
#![no_main]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::LazyLock;
use std::time::Duration;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tasuki::catalog::parse_job_str;
use tasuki::domain::job::ContainerPolicy;
use tasuki::domain::job::{
    JobName, JobSpec, ParamError, ParamSpec, PullPolicy, Resources, param_references,
};

/// Job files the model is held to, beside generated jobs.
const JOBS: &[&str] = &[
    include_str!("../../jobs/greet.toml"),
    include_str!("../../jobs/fail.toml"),
    r#"
image = "alpine"
command = ["sh", "-c", "echo ${HOME} $${x} ${params.a} {{params.a}}{{ params.b }}{{	params.c	}}", "{{{{params.a}}}}", "{{params.a}}}}{{params}}"]
[env]
A = "{{params.a}}"
B = "pre-{{ params.b }}-post ${B:-{{params.c}}}"
EMPTY = ""
[params.a]
required = true
max_length = 8
[params.b]
default = "bee"
pattern = "[a-z]*"
[params.c]
"#,
    r#"
image = "alpine"
command = ["{{params.x_1}}", "{{params._}}", "{{params.x_1}}{{params.x_1}}"]
[params.x_1]
pattern = "a|b"
[params._]
max_length = 1
default = "é"
"#,
];

static FIXED: LazyLock<Vec<JobSpec>> = LazyLock::new(|| {
    JOBS.iter()
        .map(|text| {
            parse_job_str("fuzz", text, &[], &ContainerPolicy::default())
                .expect("a seed job is valid")
        })
        .collect()
});

/// Names drawn from a small pool, so declarations, references and given values meet.
const NAMES: &[&str] = &["a", "b", "c", "name", "x_1", "_", "Bad", "a b", ""];
const PATTERNS: &[&str] = &["[a-z]+", "[0-9]{1,3}", "daily|month-end", "", ".*", "a|b"];

/// Compiled once: building a regex per input would be most of the time spent.
static COMPILED: LazyLock<Vec<regex::Regex>> = LazyLock::new(|| {
    PATTERNS
        .iter()
        .map(|p| ParamSpec::anchored_pattern(p).expect("constant pattern"))
        .collect()
});

#[derive(Arbitrary, Debug)]
enum Name {
    Pool(u8),
    Any(String),
}

impl Name {
    fn text(&self) -> String {
        match self {
            Name::Pool(i) => NAMES[*i as usize % NAMES.len()].to_owned(),
            Name::Any(s) => s.clone(),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Piece {
    Text(String),
    /// `{{params.NAME}}` with spaces or tabs around the name.
    Ref {
        name: Name,
        before: u8,
        after: u8,
    },
    /// `${NAME}`: the shell's, never tasuki's.
    Dollar(Name),
    Open,
    Close,
}

fn padding(n: u8) -> &'static str {
    ["", " ", "\t", "  ", " \t"][n as usize % 5]
}

fn template(pieces: &[Piece]) -> String {
    pieces
        .iter()
        .map(|p| match p {
            Piece::Text(s) => s.clone(),
            Piece::Ref {
                name,
                before,
                after,
            } => format!(
                "{{{{{}params.{}{}}}}}",
                padding(*before),
                name.text(),
                padding(*after)
            ),
            Piece::Dollar(name) => format!("${{{}}}", name.text()),
            Piece::Open => "{{".to_owned(),
            Piece::Close => "}}".to_owned(),
        })
        .collect()
}

#[derive(Arbitrary, Debug)]
struct Declared {
    name: Name,
    required: bool,
    default: Option<String>,
    pattern: Option<u8>,
    max_length: u8,
}

#[derive(Arbitrary, Debug)]
enum Job {
    Fixed(u8),
    Built {
        params: Vec<Declared>,
        command: Vec<Vec<Piece>>,
        env: Vec<(String, Vec<Piece>)>,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    job: Job,
    given: Vec<(Name, String)>,
}

fn build(job: &Job) -> JobSpec {
    let (params, command, env) = match job {
        Job::Fixed(i) => return FIXED[*i as usize % FIXED.len()].clone(),
        Job::Built {
            params,
            command,
            env,
        } => (params, command, env),
    };
    JobSpec {
        name: JobName::parse("fuzz").expect("constant name"),
        description: None,
        image: "img:{{params.a}}".to_owned(),
        command: command.iter().map(|t| template(t)).collect(),
        workdir: Some("/{{params.a}}".to_owned()),
        user: None,
        env: env.iter().map(|(k, t)| (k.clone(), template(t))).collect(),
        pull: PullPolicy::Never,
        resources: Resources::default(),
        timeout: Some(Duration::from_secs(1)),
        stop_grace: Duration::from_secs(1),
        network: "none".to_owned(),
        logs: Default::default(),
        secret_env: Default::default(),
        hardening: Default::default(),
        params: params
            .iter()
            .map(|d| {
                let pattern = d
                    .pattern
                    .map(|i| COMPILED[i as usize % COMPILED.len()].clone());
                let spec = ParamSpec {
                    required: d.required,
                    default: d.default.clone(),
                    pattern,
                    max_length: 1 + d.max_length as usize % 16,
                    description: None,
                };
                (d.name.text(), spec)
            })
            .collect(),
        schedules: Vec::new(),
        max_concurrent: None,
        retry: Default::default(),
        webhook: None,
        callback: None,
    }
}

fuzz_target!(|input: Input| {
    let spec = build(&input.job);
    let given: BTreeMap<String, String> = input
        .given
        .iter()
        .map(|(k, v)| (k.text(), v.clone()))
        .collect();
    let expected = model_errors(&spec, &given);
    match spec.resolve(&given) {
        Err(errors) => {
            let got: Vec<(String, &'static str)> = errors
                .iter()
                .map(|e| (e.param().to_owned(), kind(e)))
                .collect();
            assert_eq!(got, expected, "errors differ from the model's");
            assert!(!errors.to_string().is_empty());
        }
        Ok(resolved) => {
            assert!(
                expected.is_empty(),
                "accepted, but the model refuses: {expected:?}"
            );
            let values = model_values(&spec, &given);
            let brought_refs = values.values().any(|v| v.contains("{{"));
            let outputs = spec
                .command
                .iter()
                .zip(&resolved.command)
                .chain(spec.env.values().zip(resolved.env.values()));
            for (template, out) in outputs {
                assert_eq!(*out, model_substitute(template, &values), "{template:?}");
                if !brought_refs {
                    let left: Vec<&str> = param_references(out)
                        .into_iter()
                        .filter(|n| spec.params.contains_key(*n))
                        .collect();
                    assert!(left.is_empty(), "{out:?} still refers to {left:?}");
                }
            }
            assert_eq!(resolved.command.len(), spec.command.len());
            assert_eq!(
                resolved.env.keys().collect::<Vec<_>>(),
                spec.env.keys().collect::<Vec<_>>()
            );
            assert_eq!(resolved.image, spec.image);
            assert_eq!(resolved.workdir, spec.workdir);
            assert_eq!(resolved.user, spec.user);
            assert_eq!(resolved.network, spec.network);
            assert_eq!(resolved.pull, spec.pull);
            assert_eq!(resolved.timeout, spec.timeout);
            assert_eq!(resolved.stop_grace, spec.stop_grace);
            assert_eq!(resolved.resources, spec.resources);
        }
    }
});

fn kind(e: &ParamError) -> &'static str {
    match e {
        ParamError::Unknown { .. } => "unknown",
        ParamError::Missing { .. } => "missing",
        ParamError::TooLong { .. } => "too long",
        ParamError::PatternMismatch { .. } => "pattern",
        ParamError::ContainsNul { .. } => "nul",
    }
}

/// Every refused parameter, by name, with why: one reason each, checked in the order
/// NUL, length, pattern.
fn model_errors(spec: &JobSpec, given: &BTreeMap<String, String>) -> Vec<(String, &'static str)> {
    let names: BTreeSet<&String> = given.keys().chain(spec.params.keys()).collect();
    let mut errors = Vec::new();
    for name in names {
        let Some(p) = spec.params.get(name) else {
            errors.push((name.clone(), "unknown"));
            continue;
        };
        let Some(value) = given.get(name).or(p.default.as_ref()) else {
            if p.required {
                errors.push((name.clone(), "missing"));
            }
            continue;
        };
        if value.contains('\0') {
            errors.push((name.clone(), "nul"));
        } else if value.chars().count() > p.max_length {
            errors.push((name.clone(), "too long"));
        } else if p.pattern.as_ref().is_some_and(|re| !re.is_match(value)) {
            errors.push((name.clone(), "pattern"));
        }
    }
    errors
}

/// What each declared parameter stands for: given, else its default, else "".
fn model_values(spec: &JobSpec, given: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    spec.params
        .iter()
        .map(|(name, p)| {
            let v = given.get(name).or(p.default.as_ref()).cloned();
            (name.clone(), v.unwrap_or_default())
        })
        .collect()
}

/// A reference starting at `i`: `{{`, spaces or tabs, `params.`, a name
/// `[a-z_][a-z0-9_]*`, spaces or tabs, `}}`. Its end and its name.
fn reference_at(s: &str, i: usize) -> Option<(usize, &str)> {
    let b = s.as_bytes();
    let blanks = |mut j: usize| {
        while j < b.len() && (b[j] == b' ' || b[j] == b'\t') {
            j += 1;
        }
        j
    };
    let mut j = i;
    if !b[j..].starts_with(b"{{") {
        return None;
    }
    j = blanks(j + 2);
    if !b[j..].starts_with(b"params.") {
        return None;
    }
    j += "params.".len();
    let start = j;
    if j >= b.len() || !(b[j].is_ascii_lowercase() || b[j] == b'_') {
        return None;
    }
    while j < b.len() && (b[j].is_ascii_lowercase() || b[j].is_ascii_digit() || b[j] == b'_') {
        j += 1;
    }
    let name = &s[start..j];
    j = blanks(j);
    b[j..].starts_with(b"}}").then_some((j + 2, name))
}

/// Leftmost references first, each replaced once, values never scanned again; a
/// reference to an undeclared name stays as written.
fn model_substitute(template: &str, values: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < template.len() {
        if let Some((end, name)) = reference_at(template, i) {
            match values.get(name) {
                Some(v) => out.push_str(v),
                None => out.push_str(&template[i..end]),
            }
            i = end;
        } else {
            let c = template[i..].chars().next().expect("i is inside the text");
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}
