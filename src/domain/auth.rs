//! Who is calling and what they may do: API tokens with scopes on job name globs, worker
//! tokens, and the pure checks (`Principal::may`). Tokens are known by the SHA-256 of
//! their value only.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use sha2::{Digest, Sha256};

/// What a scope lets a caller do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Start runs of the job (and retry them, and redeliver their callbacks).
    Run,
    /// List and read runs of the job, follow their logs, see the job and its schedules.
    Read,
    /// Cancel runs of the job.
    Cancel,
    /// Everything, on every job, plus reload and pause, resume and backfill of schedules.
    Admin,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Run => "run",
            Action::Read => "read",
            Action::Cancel => "cancel",
            Action::Admin => "admin",
        }
    }
}

/// A job name pattern: `*` any run of characters, `?` one character, else literal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobGlob(String);

impl JobGlob {
    pub fn any() -> JobGlob {
        JobGlob("*".to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn matches(&self, name: &str) -> bool {
        glob_match(self.0.as_bytes(), name.as_bytes())
    }
}

/// Iterative wildcard match with one backtrack point: linear in practice, never
/// exponential, whatever the pattern.
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == b'?' || c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// One grant: an action on the jobs a glob matches (`admin` covers all jobs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    pub action: Action,
    pub jobs: JobGlob,
}

/// A scope string that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid scope {0:?}: write run:GLOB, read:GLOB, cancel:GLOB or admin \
     (GLOB uses a-z, 0-9, '_', '-', '*' and '?')"
)]
pub struct InvalidScope(pub String);

impl FromStr for Scope {
    type Err = InvalidScope;
    fn from_str(s: &str) -> Result<Scope, InvalidScope> {
        let bad = || InvalidScope(s.to_owned());
        if s == "admin" {
            return Ok(Scope {
                action: Action::Admin,
                jobs: JobGlob::any(),
            });
        }
        let (action, glob) = s.split_once(':').ok_or_else(bad)?;
        let action = match action {
            "run" => Action::Run,
            "read" => Action::Read,
            "cancel" => Action::Cancel,
            _ => return Err(bad()),
        };
        let glob_ok = !glob.is_empty()
            && glob.len() <= 128
            && glob
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-*?".contains(&b));
        if !glob_ok {
            return Err(bad());
        }
        Ok(Scope {
            action,
            jobs: JobGlob(glob.to_owned()),
        })
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.action {
            Action::Admin => f.write_str("admin"),
            a => write!(f, "{}:{}", a.as_str(), self.jobs.as_str()),
        }
    }
}

/// Which jobs an action is allowed on, for filtering lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobFilter {
    All,
    /// The jobs any of these globs match; empty means none.
    Globs(Vec<JobGlob>),
}

/// No restriction: what internal callers (the scheduler, the CLI's own reads) mean. The
/// HTTP API always sets a caller's filter from its scopes.
impl Default for JobFilter {
    fn default() -> Self {
        JobFilter::All
    }
}

impl JobFilter {
    pub fn matches(&self, job: &str) -> bool {
        match self {
            JobFilter::All => true,
            JobFilter::Globs(globs) => globs.iter().any(|g| g.matches(job)),
        }
    }
}

/// The caller behind a request: a named API token, or everyone when no tokens are
/// configured (loopback only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    name: Arc<str>,
    scopes: Arc<[Scope]>,
}

impl Principal {
    pub fn new(name: &str, scopes: Vec<Scope>) -> Principal {
        Principal {
            name: Arc::from(name),
            scopes: Arc::from(scopes),
        }
    }

    /// The caller of a server with no tokens configured: may do everything.
    pub fn open() -> Principal {
        Principal::new(
            OPEN_PRINCIPAL,
            vec![Scope {
                action: Action::Admin,
                jobs: JobGlob::any(),
            }],
        )
    }

    /// The token's name: logged with every request and stored as a run's
    /// `requested_by`.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn scopes(&self) -> &[Scope] {
        &self.scopes
    }

    pub fn is_admin(&self) -> bool {
        self.scopes.iter().any(|s| s.action == Action::Admin)
    }

    /// May this caller do `action` on `job`? `admin` may do everything.
    pub fn may(&self, action: Action, job: &str) -> bool {
        self.scopes
            .iter()
            .any(|s| s.action == Action::Admin || (s.action == action && s.jobs.matches(job)))
    }

    /// The jobs this caller may do `action` on.
    pub fn jobs_for(&self, action: Action) -> JobFilter {
        if self.is_admin() {
            return JobFilter::All;
        }
        JobFilter::Globs(
            self.scopes
                .iter()
                .filter(|s| s.action == action)
                .map(|s| s.jobs.clone())
                .collect(),
        )
    }
}

/// A token name that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidTokenName {
    #[error("invalid token name {0:?}: use 1-64 characters from A-Z, a-z, 0-9, '_', '-', '.'")]
    Characters(String),
    #[error("the token name {0:?} is reserved for callers of a server without API tokens")]
    Reserved(String),
}

/// The name of every caller when no API tokens are configured.
pub const OPEN_PRINCIPAL: &str = "anonymous";

/// A token's name is logged with every request and stored as `requested_by`, so it is
/// short, plain text, and never the open server's caller.
pub fn check_token_name(name: &str) -> Result<(), InvalidTokenName> {
    let plain = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b));
    if !plain {
        return Err(InvalidTokenName::Characters(name.to_owned()));
    }
    if name == OPEN_PRINCIPAL {
        return Err(InvalidTokenName::Reserved(name.to_owned()));
    }
    Ok(())
}

/// The SHA-256 of a token's value.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TokenDigest([u8; 32]);

impl fmt::Debug for TokenDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenDigest({})", self.to_hex())
    }
}

/// A `sha256` value that is not 64 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid sha256 {0:?}: expected 64 hex digits (the SHA-256 of the token's value)")]
pub struct InvalidDigest(pub String);

impl TokenDigest {
    pub fn of(value: &str) -> TokenDigest {
        TokenDigest(Sha256::digest(value.as_bytes()).into())
    }

    pub fn parse_hex(s: &str) -> Result<TokenDigest, InvalidDigest> {
        let bad = || InvalidDigest(s.to_owned());
        if s.len() != 64 {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, pair) in s.as_bytes().chunks(2).enumerate() {
            let hex = std::str::from_utf8(pair).map_err(|_| bad())?;
            out[i] = u8::from_str_radix(hex, 16).map_err(|_| bad())?;
        }
        Ok(TokenDigest(out))
    }

    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Compares without an early exit, so timing says nothing about how much matched.
    pub fn ct_eq(&self, other: &TokenDigest) -> bool {
        self.0
            .iter()
            .zip(other.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

/// What a presented token turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    Api(Principal),
    /// A worker token, by its name.
    Worker(Arc<str>),
}

/// Every configured token, checked by digest.
#[derive(Debug, Clone, Default)]
pub struct TokenSet {
    api: Vec<(TokenDigest, Principal)>,
    workers: Vec<(TokenDigest, Arc<str>)>,
}

impl TokenSet {
    pub fn new(
        api: Vec<(TokenDigest, Principal)>,
        workers: Vec<(TokenDigest, Arc<str>)>,
    ) -> TokenSet {
        TokenSet { api, workers }
    }

    /// No API tokens: the server is open (and must stay on loopback).
    pub fn has_api_tokens(&self) -> bool {
        !self.api.is_empty()
    }

    pub fn has_worker_tokens(&self) -> bool {
        !self.workers.is_empty()
    }

    /// The credential a presented value is, comparing against every digest (no early
    /// exit on a match, so the time taken does not say which or how many matched).
    pub fn identify(&self, presented: &str) -> Option<Credential> {
        let digest = TokenDigest::of(presented);
        let mut found = None;
        for (d, p) in &self.api {
            if d.ct_eq(&digest) && found.is_none() {
                found = Some(Credential::Api(p.clone()));
            }
        }
        for (d, name) in &self.workers {
            if d.ct_eq(&digest) && found.is_none() {
                found = Some(Credential::Worker(name.clone()));
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scopes(list: &[&str]) -> Vec<Scope> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn globs() {
        let g = |p: &str, t: &str| JobGlob(p.to_owned()).matches(t);
        assert!(g("*", "anything"));
        assert!(g("nightly-*", "nightly-report"));
        assert!(g("nightly-*", "nightly-"));
        assert!(!g("nightly-*", "daily-report"));
        assert!(g("a?c", "abc"));
        assert!(!g("a?c", "ac"));
        assert!(g("*-report", "month-end-report"));
        assert!(g("a*b*c", "axxbyyc"));
        assert!(!g("a*b*c", "axxbyy"));
        assert!(g("exact", "exact"));
        assert!(!g("exact", "exactly"));
        // A pathological pattern stays fast.
        let long = "a".repeat(5000);
        assert!(!g("*a*a*a*a*a*a*a*a*b", &long));
    }

    #[test]
    fn scope_parsing() {
        assert_eq!(
            "run:nightly-*".parse::<Scope>().unwrap().to_string(),
            "run:nightly-*"
        );
        assert_eq!("admin".parse::<Scope>().unwrap().action, Action::Admin);
        for bad in ["", "run", "run:", "write:*", "run:A*", "run:a b", "admin:*"] {
            let e = bad.parse::<Scope>().unwrap_err();
            assert!(e.to_string().contains("invalid scope"), "{bad}: {e}");
        }
    }

    #[test]
    fn principals_may_what_their_scopes_say() {
        let ci = Principal::new("ci", scopes(&["run:nightly-*", "read:*"]));
        assert!(ci.may(Action::Run, "nightly-etl"));
        assert!(!ci.may(Action::Run, "payroll"));
        assert!(ci.may(Action::Read, "payroll"));
        assert!(!ci.may(Action::Cancel, "nightly-etl"));
        assert!(!ci.may(Action::Admin, "nightly-etl"));
        assert!(!ci.is_admin());
        assert!(ci.jobs_for(Action::Run).matches("nightly-x"));
        assert!(!ci.jobs_for(Action::Cancel).matches("nightly-x"));
        assert_eq!(ci.jobs_for(Action::Cancel), JobFilter::Globs(vec![]));

        let ops = Principal::new("ops", scopes(&["admin"]));
        assert!(ops.may(Action::Cancel, "payroll"));
        assert_eq!(ops.jobs_for(Action::Read), JobFilter::All);
        assert!(Principal::open().is_admin());
    }

    #[test]
    fn digests() {
        let d = TokenDigest::of("secret");
        assert_eq!(
            d.to_hex(),
            "2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b"
        );
        assert_eq!(TokenDigest::parse_hex(&d.to_hex()).unwrap(), d);
        assert!(TokenDigest::parse_hex("zz").is_err());
        assert!(TokenDigest::parse_hex(&"g".repeat(64)).is_err());
        assert!(d.ct_eq(&TokenDigest::of("secret")));
        assert!(!d.ct_eq(&TokenDigest::of("secreT")));
    }

    #[test]
    fn identify_tells_api_from_worker_tokens() {
        let set = TokenSet::new(
            vec![(
                TokenDigest::of("api-1"),
                Principal::new("ci", scopes(&["read:*"])),
            )],
            vec![
                (TokenDigest::of("w-old"), Arc::from("hosts-2025")),
                (TokenDigest::of("w-new"), Arc::from("hosts-2026")),
            ],
        );
        assert!(matches!(set.identify("api-1"), Some(Credential::Api(p)) if p.name() == "ci"));
        assert!(
            matches!(set.identify("w-old"), Some(Credential::Worker(n)) if &*n == "hosts-2025")
        );
        assert!(
            matches!(set.identify("w-new"), Some(Credential::Worker(n)) if &*n == "hosts-2026")
        );
        assert_eq!(set.identify("nope"), None);
        assert_eq!(set.identify(""), None);
    }
}
