//! Request parameters: their declaration, validation and substitution into a
//! job's command and environment, plus the naming rules for parameters and
//! environment variables.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::LazyLock;

use regex::Regex;

use super::{JobSpec, ResolvedSpec};

/// A declared request parameter.
#[derive(Debug, Clone)]
pub struct ParamSpec {
    pub required: bool,
    pub default: Option<String>,
    /// Anchored: the whole value must match. Build it with [`ParamSpec::anchored_pattern`].
    pub pattern: Option<regex::Regex>,
    /// Maximum value length in characters (Unicode scalar values).
    pub max_length: usize,
    pub description: Option<String>,
}

impl ParamSpec {
    /// Default for `max_length`.
    pub const DEFAULT_MAX_LENGTH: usize = 1024;

    /// Compile `pattern` so that it must match the whole value, whether or not the
    /// author wrote `^...$` (`^(?:pattern)$`; without the `m` flag `$` only matches at
    /// the very end of the value). The pattern must be a regex on its own first: one
    /// that closes more groups than it opens (`[a-z]+)|(.*`) would close the anchoring
    /// group and leave alternatives unanchored.
    pub fn anchored_pattern(pattern: &str) -> Result<Regex, regex::Error> {
        regex::Regex::new(pattern)?;
        Regex::new(&format!("^(?:{pattern})$"))
    }

    /// Check one value against `max_length` and `pattern`.
    pub fn check_value(&self, name: &str, value: &str) -> Result<(), ParamError> {
        if value.contains('\0') {
            return Err(ParamError::ContainsNul {
                name: name.to_owned(),
            });
        }
        if value.chars().count() > self.max_length {
            return Err(ParamError::TooLong {
                name: name.to_owned(),
                max: self.max_length,
            });
        }
        if let Some(re) = &self.pattern
            && !re.is_match(value)
        {
            return Err(ParamError::PatternMismatch {
                name: name.to_owned(),
                pattern: re.as_str().to_owned(),
            });
        }
        Ok(())
    }
}

/// One problem with the parameters of a run request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamError {
    #[error("unknown parameter `{name}` ({})", declared_list(.declared))]
    Unknown { name: String, declared: Vec<String> },
    #[error("missing required parameter `{name}`")]
    Missing { name: String },
    #[error("parameter `{name}` is too long (at most {max} characters)")]
    TooLong { name: String, max: usize },
    #[error("parameter `{name}` does not match the pattern `{pattern}`")]
    PatternMismatch { name: String, pattern: String },
    #[error("parameter `{name}` contains a NUL character")]
    ContainsNul { name: String },
}

fn declared_list(declared: &[String]) -> String {
    if declared.is_empty() {
        "this job declares no parameters".to_owned()
    } else {
        format!("declared: {}", declared.join(", "))
    }
}

impl ParamError {
    /// The parameter this error is about.
    pub fn param(&self) -> &str {
        match self {
            ParamError::Unknown { name, .. }
            | ParamError::Missing { name }
            | ParamError::TooLong { name, .. }
            | ParamError::PatternMismatch { name, .. }
            | ParamError::ContainsNul { name } => name,
        }
    }
}

/// All parameter problems of one request, sorted by parameter name. Never empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamErrors(Vec<ParamError>);

impl ParamErrors {
    pub fn errors(&self) -> &[ParamError] {
        &self.0
    }
    pub fn iter(&self) -> std::slice::Iter<'_, ParamError> {
        self.0.iter()
    }
    pub fn into_vec(self) -> Vec<ParamError> {
        self.0
    }
}

impl fmt::Display for ParamErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ParamErrors {}

impl<'a> IntoIterator for &'a ParamErrors {
    type Item = &'a ParamError;
    type IntoIter = std::slice::Iter<'a, ParamError>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// `{{params.NAME}}`, optionally with spaces/tabs inside the braces.
static PARAM_REF: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"\{\{[ \t]*params\.([a-z_][a-z0-9_]*)[ \t]*\}\}").expect("constant regex is valid")
});

/// Anything that looks like an attempted reference (used to catch typos).
static PARAM_REF_LOOSE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\{\{\s*params\.").expect("constant regex is valid"));

/// Names referenced as `{{params.NAME}}` in `s`, in order of appearance.
pub fn param_references(s: &str) -> Vec<&str> {
    PARAM_REF
        .captures_iter(s)
        .filter_map(|c| c.get(1).map(|m| m.as_str()))
        .collect()
}

/// True if `s` contains something starting like a parameter reference
/// (`{{params.`) that is not a well-formed `{{params.NAME}}`.
pub fn has_malformed_param_reference(s: &str) -> bool {
    PARAM_REF_LOOSE.find_iter(s).count() != PARAM_REF.find_iter(s).count()
}

/// Replace every `{{params.NAME}}` whose NAME is in `values`. Single pass: inserted
/// values are never re-scanned. References to names not in `values` stay verbatim.
fn substitute(template: &str, values: &BTreeMap<&str, &str>) -> String {
    PARAM_REF
        .replace_all(template, |caps: &regex::Captures<'_>| {
            let whole = caps.get(0).map_or("", |m| m.as_str());
            caps.get(1)
                .and_then(|m| values.get(m.as_str()))
                .map_or_else(|| whole.to_owned(), |v| (*v).to_owned())
        })
        .into_owned()
}

/// Environment variable names a job may set: `^[A-Za-z_][A-Za-z0-9_]*$`.
pub fn is_valid_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Prefix of environment variables reserved for tasuki itself.
pub const RESERVED_ENV_PREFIX: &str = "TASUKI_";

pub fn is_reserved_env_name(name: &str) -> bool {
    name.starts_with(RESERVED_ENV_PREFIX)
}

/// Parameter names: `^[a-z_][a-z0-9_]{0,63}$`.
pub fn is_valid_param_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    name.len() <= 64
        && bytes
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

impl JobSpec {
    /// Every parameter name referenced from `command` elements and `env` values.
    pub fn referenced_params(&self) -> BTreeSet<String> {
        self.command
            .iter()
            .chain(self.env.values())
            .flat_map(|s| param_references(s))
            .map(str::to_owned)
            .collect()
    }

    /// Referenced parameters that are not declared in `params`.
    pub fn undeclared_params(&self) -> BTreeSet<String> {
        let mut refs = self.referenced_params();
        refs.retain(|name| !self.params.contains_key(name));
        refs
    }

    /// Validate request parameters and substitute them into `command` and `env`
    /// values (only there). All problems are reported, sorted by parameter name.
    /// An optional parameter without value or default substitutes as "".
    pub fn resolve(&self, given: &BTreeMap<String, String>) -> Result<ResolvedSpec, ParamErrors> {
        let mut errors = Vec::new();
        let mut values: BTreeMap<&str, &str> = BTreeMap::new();

        let names: BTreeSet<&str> = given
            .keys()
            .chain(self.params.keys())
            .map(String::as_str)
            .collect();
        for name in names {
            let Some(spec) = self.params.get(name) else {
                errors.push(ParamError::Unknown {
                    name: name.to_owned(),
                    declared: self.params.keys().cloned().collect(),
                });
                continue;
            };
            let value = match (given.get(name), &spec.default) {
                (Some(v), _) => v.as_str(),
                (None, Some(d)) => d.as_str(),
                (None, None) if spec.required => {
                    errors.push(ParamError::Missing {
                        name: name.to_owned(),
                    });
                    continue;
                }
                (None, None) => {
                    // Absent and optional: substitutes as empty, no pattern to meet.
                    values.insert(name, "");
                    continue;
                }
            };
            if let Err(e) = spec.check_value(name, value) {
                errors.push(e);
                continue;
            }
            values.insert(name, value);
        }
        if !errors.is_empty() {
            return Err(ParamErrors(errors));
        }

        Ok(ResolvedSpec {
            image: self.image.clone(),
            command: self
                .command
                .iter()
                .map(|s| substitute(s, &values))
                .collect(),
            workdir: self.workdir.clone(),
            user: self.user.clone(),
            env: self
                .env
                .iter()
                .map(|(k, v)| (k.clone(), substitute(v, &values)))
                .collect(),
            secret_env: self.secret_env.clone(),
            pull: self.pull,
            resources: self.resources.clone(),
            timeout: self.timeout,
            stop_grace: self.stop_grace,
            network: self.network.clone(),
            hardening: self.hardening.clone(),
            logs: self.logs,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::domain::job::{JobName, PullPolicy, Resources};

    fn spec(pattern: Option<&str>, required: bool, default: Option<&str>) -> ParamSpec {
        ParamSpec {
            required,
            default: default.map(str::to_owned),
            pattern: pattern.map(|p| ParamSpec::anchored_pattern(p).unwrap()),
            max_length: 16,
            description: None,
        }
    }

    fn job() -> JobSpec {
        JobSpec {
            logs: Default::default(),
            name: JobName::parse("hello").unwrap(),
            description: None,
            image: "img:{{params.who}}".to_owned(),
            command: vec![
                "sh".into(),
                "-c".into(),
                "echo {{params.who}} {{ params.greeting }}!{{params.opt}}".into(),
            ],
            workdir: Some("/{{params.who}}".into()),
            user: None,
            env: BTreeMap::from([
                ("WHO".to_owned(), "{{params.who}}".to_owned()),
                ("PLAIN".to_owned(), "x".to_owned()),
            ]),
            secret_env: BTreeMap::new(),
            pull: PullPolicy::Always,
            resources: Resources::default(),
            timeout: Some(Duration::from_secs(60)),
            stop_grace: Duration::from_secs(10),
            network: "none".into(),
            hardening: Default::default(),
            params: BTreeMap::from([
                ("who".to_owned(), spec(None, true, None)),
                (
                    "greeting".to_owned(),
                    spec(Some("[a-z]+"), false, Some("hi")),
                ),
                ("opt".to_owned(), spec(None, false, None)),
            ]),
            schedules: Vec::new(),
            max_concurrent: None,
            retry: Default::default(),
            webhook: None,
            callback: None,
        }
    }

    fn given(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn resolve_substitutes_command_and_env_only() {
        let r = job().resolve(&given(&[("who", "bob")])).unwrap();
        assert_eq!(r.command, ["sh", "-c", "echo bob hi!"]);
        assert_eq!(r.env["WHO"], "bob");
        assert_eq!(r.env["PLAIN"], "x");
        assert_eq!(r.image, "img:{{params.who}}");
        assert_eq!(r.workdir.as_deref(), Some("/{{params.who}}"));
        assert_eq!(r.pull, PullPolicy::Always);
        assert_eq!(r.network, "none");
        assert_eq!(r.timeout, Some(Duration::from_secs(60)));
    }

    #[test]
    fn resolve_values_are_verbatim_and_not_recursive() {
        let evil = "$(id); rm -rf /";
        let mut j = job();
        j.params.get_mut("who").unwrap().max_length = 100;
        let r = j
            .resolve(&given(&[("who", evil), ("opt", "{{params.who}}")]))
            .unwrap();
        assert_eq!(r.command[2], "echo $(id); rm -rf / hi!{{params.who}}");
        assert_eq!(r.env["WHO"], evil);
    }

    #[test]
    fn resolve_errors_are_sorted_and_complete() {
        let e = job()
            .resolve(&given(&[("zzz", "1"), ("greeting", "Hi"), ("aaa", "2")]))
            .unwrap_err();
        let names: Vec<&str> = e.iter().map(ParamError::param).collect();
        assert_eq!(names, ["aaa", "greeting", "who", "zzz"]);
        assert!(matches!(e.errors()[0], ParamError::Unknown { .. }));
        assert!(matches!(e.errors()[1], ParamError::PatternMismatch { .. }));
        assert!(matches!(e.errors()[2], ParamError::Missing { .. }));
        assert_eq!(
            e.errors()[0].to_string(),
            "unknown parameter `aaa` (declared: greeting, opt, who)"
        );
        assert_eq!(
            e.errors()[2].to_string(),
            "missing required parameter `who`"
        );
        assert!(e.to_string().contains("; "));
    }

    #[test]
    fn resolve_too_long_counts_chars() {
        let ok = "é".repeat(16);
        assert!(job().resolve(&given(&[("who", &ok)])).is_ok());
        let e = job()
            .resolve(&given(&[("who", &"é".repeat(17))]))
            .unwrap_err();
        assert_eq!(
            e.errors(),
            [ParamError::TooLong {
                name: "who".into(),
                max: 16
            }]
        );
        assert_eq!(
            e.to_string(),
            "parameter `who` is too long (at most 16 characters)"
        );
    }

    #[test]
    fn resolve_pattern_is_anchored() {
        // `[a-z]+` would find "hi" inside "hi there" if unanchored.
        let e = job()
            .resolve(&given(&[("who", "x"), ("greeting", "hi there")]))
            .unwrap_err();
        assert_eq!(e.errors()[0].param(), "greeting");
        // Alternation must be anchored as a whole.
        let mut j = job();
        j.params.get_mut("greeting").unwrap().pattern =
            Some(ParamSpec::anchored_pattern("a|b").unwrap());
        assert!(
            j.resolve(&given(&[("who", "x"), ("greeting", "ab")]))
                .is_err()
        );
        assert!(
            j.resolve(&given(&[("who", "x"), ("greeting", "b")]))
                .is_ok()
        );
        // Explicit anchors and a trailing newline.
        let re = ParamSpec::anchored_pattern("^[a-z]+$").unwrap();
        assert!(re.is_match("abc"));
        assert!(!re.is_match("abc\n"));
    }

    #[test]
    fn an_absent_optional_param_substitutes_empty_without_meeting_its_pattern() {
        let mut j = job();
        j.params
            .insert("tag".to_owned(), spec(Some("[a-z]+"), false, None));
        let r = j.resolve(&given(&[("who", "x")])).unwrap();
        assert_eq!(r.command[2], "echo x hi!");
        // Given, it must match.
        assert!(j.resolve(&given(&[("who", "x"), ("tag", "NO")])).is_err());
    }

    #[test]
    fn resolve_rejects_nul() {
        let e = job().resolve(&given(&[("who", "a\0b")])).unwrap_err();
        assert!(matches!(e.errors()[0], ParamError::ContainsNul { .. }));
    }

    #[test]
    fn unknown_param_when_none_declared() {
        let mut j = job();
        j.params.clear();
        j.command.clear();
        j.env.clear();
        let e = j.resolve(&given(&[("x", "1")])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown parameter `x` (this job declares no parameters)"
        );
        assert!(j.resolve(&BTreeMap::new()).is_ok());
    }

    #[test]
    fn references() {
        assert_eq!(
            param_references("{{params.a}} {{ params.b_2 }} {{params.A}} {{param.c}}"),
            ["a", "b_2"]
        );
        let mut j = job();
        j.env.insert("X".into(), "{{params.nope}}".into());
        assert_eq!(
            j.referenced_params(),
            BTreeSet::from(["who", "greeting", "opt", "nope"].map(String::from))
        );
        assert_eq!(j.undeclared_params(), BTreeSet::from(["nope".to_owned()]));
        assert!(has_malformed_param_reference("{{params.Bad}}"));
        assert!(has_malformed_param_reference("{{ params.x }"));
        assert!(!has_malformed_param_reference("{{params.ok}} {{other}}"));
    }

    #[test]
    fn name_rules() {
        assert!(is_valid_env_name("FOO_1"));
        assert!(is_valid_env_name("_x"));
        assert!(!is_valid_env_name("1X"));
        assert!(!is_valid_env_name("A-B"));
        assert!(!is_valid_env_name(""));
        assert!(is_reserved_env_name("TASUKI_RUN_ID"));
        assert!(!is_reserved_env_name("TASUKI"));
        assert!(is_valid_param_name("a"));
        assert!(is_valid_param_name(&format!("_{}", "a".repeat(63))));
        assert!(!is_valid_param_name(&"a".repeat(65)));
        assert!(!is_valid_param_name("A"));
        assert!(!is_valid_param_name("1a"));
        assert!(!is_valid_param_name("a-b"));
    }

    /// Found by `fuzz/fuzz_targets/job_file.rs` (a job written back must read the same):
    /// a pattern closing the anchoring group itself, `[a-z]+)|(.*`, compiled as
    /// `^(?:[a-z]+)|(.*)$`, which takes any value starting with a letter.
    #[test]
    fn fuzz_a_pattern_closing_its_own_group_escaped_the_anchors() {
        for bad in ["[a-z]+)|(.*", "a)|(?:b", "x)"] {
            assert!(ParamSpec::anchored_pattern(bad).is_err(), "{bad}");
        }
        let re = ParamSpec::anchored_pattern("(a|b)(c)").unwrap();
        assert!(re.is_match("ac"));
        assert!(!re.is_match("ac; rm -rf /"));
    }
}
