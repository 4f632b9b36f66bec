//! The config's `[[tokens]]` and `[[worker_tokens]]` (and `serve --worker-token`) as the
//! `TokenSet` requests are checked against; any bad entry stops start-up, named.

use std::collections::HashSet;
use std::sync::Arc;

use super::server::ServerConfig;
use crate::domain::auth::{Principal, Scope, TokenDigest, TokenSet, check_token_name};

/// The worker token given with `serve --worker-token` is known by this name.
pub const FLAG_WORKER_TOKEN: &str = "worker-token";

/// A token entry that cannot be used: which one, which key, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{section} {name:?}: `{key}`: {message}")]
pub struct TokenConfigError {
    /// `[[tokens]]` or `[[worker_tokens]]` (or `--worker-token`).
    pub section: &'static str,
    pub name: String,
    pub key: &'static str,
    pub message: String,
}

/// Every token of the configuration. Names must be unique within their kind (they stand
/// for the caller in logs and on runs), and no two entries may share a value.
pub fn token_set(
    config: &ServerConfig,
    flag_worker_token: Option<&str>,
) -> Result<TokenSet, TokenConfigError> {
    let mut seen: Vec<TokenDigest> = Vec::new();
    let mut unique_digest = |section, name: &str, digest: TokenDigest| {
        if seen.contains(&digest) {
            return Err(TokenConfigError {
                section,
                name: name.to_owned(),
                key: "sha256",
                message: "another token has the same value; give each its own".to_owned(),
            });
        }
        seen.push(digest);
        Ok(())
    };

    let mut api = Vec::new();
    let mut names = HashSet::new();
    for entry in &config.tokens {
        let bad = |key, message: String| TokenConfigError {
            section: "[[tokens]]",
            name: entry.name.clone(),
            key,
            message,
        };
        check_token_name(&entry.name).map_err(|e| bad("name", e.to_string()))?;
        if !names.insert(entry.name.as_str()) {
            return Err(bad(
                "name",
                "two API tokens have this name; it must say which caller it is".to_owned(),
            ));
        }
        let digest =
            TokenDigest::parse_hex(&entry.sha256).map_err(|e| bad("sha256", e.to_string()))?;
        if entry.scopes.is_empty() {
            return Err(bad(
                "scopes",
                "no scopes: give run:GLOB, read:GLOB, cancel:GLOB or admin".to_owned(),
            ));
        }
        let scopes = entry
            .scopes
            .iter()
            .map(|s| s.parse::<Scope>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad("scopes", e.to_string()))?;
        unique_digest("[[tokens]]", &entry.name, digest)?;
        api.push((digest, Principal::new(&entry.name, scopes)));
    }

    let mut workers = Vec::new();
    for entry in &config.worker_tokens {
        let bad = |key, message: String| TokenConfigError {
            section: "[[worker_tokens]]",
            name: entry.name.clone(),
            key,
            message,
        };
        check_token_name(&entry.name).map_err(|e| bad("name", e.to_string()))?;
        let digest =
            TokenDigest::parse_hex(&entry.sha256).map_err(|e| bad("sha256", e.to_string()))?;
        unique_digest("[[worker_tokens]]", &entry.name, digest)?;
        workers.push((digest, Arc::from(entry.name.as_str())));
    }
    if let Some(value) = flag_worker_token.filter(|t| !t.is_empty()) {
        let digest = TokenDigest::of(value);
        unique_digest("--worker-token", FLAG_WORKER_TOKEN, digest)?;
        workers.push((digest, Arc::from(FLAG_WORKER_TOKEN)));
    }
    Ok(TokenSet::new(api, workers))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::server::{TokenEntry, WorkerTokenEntry};
    use crate::domain::auth::Credential;

    fn api(name: &str, value: &str, scopes: &[&str]) -> TokenEntry {
        TokenEntry {
            name: name.to_owned(),
            sha256: TokenDigest::of(value).to_hex(),
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    fn worker(name: &str, value: &str) -> WorkerTokenEntry {
        WorkerTokenEntry {
            name: name.to_owned(),
            sha256: TokenDigest::of(value).to_hex(),
        }
    }

    #[test]
    fn api_and_worker_tokens_and_the_flag_are_all_known() {
        let config = ServerConfig {
            tokens: vec![api("ci", "tsk_ci", &["run:nightly-*", "read:*"])],
            worker_tokens: vec![worker("hosts-2025", "w-old"), worker("hosts-2026", "w-new")],
            ..ServerConfig::default()
        };
        let set = token_set(&config, Some("w-flag")).unwrap();
        assert!(set.has_api_tokens() && set.has_worker_tokens());
        let Some(Credential::Api(ci)) = set.identify("tsk_ci") else {
            panic!("the API token is not known")
        };
        assert_eq!(ci.name(), "ci");
        assert_eq!(ci.scopes().len(), 2);
        for (value, name) in [
            ("w-old", "hosts-2025"),
            ("w-new", "hosts-2026"),
            ("w-flag", FLAG_WORKER_TOKEN),
        ] {
            assert_eq!(
                set.identify(value),
                Some(Credential::Worker(Arc::from(name)))
            );
        }
        assert_eq!(set.identify("tsk_other"), None);
    }

    #[test]
    fn no_tokens_is_an_open_server_and_an_empty_flag_is_no_token() {
        let set = token_set(&ServerConfig::default(), Some("")).unwrap();
        assert!(!set.has_api_tokens() && !set.has_worker_tokens());
    }

    #[test]
    fn a_bad_entry_names_its_token_and_key() {
        let with = |tokens, workers| ServerConfig {
            tokens,
            worker_tokens: workers,
            ..ServerConfig::default()
        };
        let cases = [
            (
                with(
                    vec![TokenEntry {
                        sha256: "abc".into(),
                        ..api("ci", "v", &["admin"])
                    }],
                    vec![],
                ),
                "[[tokens]] \"ci\": `sha256`: invalid sha256",
            ),
            (
                with(vec![api("ci", "v", &["read:*", "write:*"])], vec![]),
                "[[tokens]] \"ci\": `scopes`: invalid scope \"write:*\"",
            ),
            (
                with(vec![api("ci", "v", &[])], vec![]),
                "[[tokens]] \"ci\": `scopes`: no scopes",
            ),
            (
                with(vec![api("c i", "v", &["admin"])], vec![]),
                "[[tokens]] \"c i\": `name`: invalid token name",
            ),
            (
                with(vec![api("anonymous", "v", &["admin"])], vec![]),
                "`name`: the token name \"anonymous\" is reserved",
            ),
            (
                with(
                    vec![api("ci", "v1", &["admin"]), api("ci", "v2", &["admin"])],
                    vec![],
                ),
                "[[tokens]] \"ci\": `name`: two API tokens have this name",
            ),
            (
                with(
                    vec![api("ci", "same", &["admin"])],
                    vec![worker("w", "same")],
                ),
                "[[worker_tokens]] \"w\": `sha256`: another token has the same value",
            ),
            (
                with(
                    vec![],
                    vec![WorkerTokenEntry {
                        sha256: "z".repeat(64),
                        ..worker("hosts", "v")
                    }],
                ),
                "[[worker_tokens]] \"hosts\": `sha256`: invalid sha256",
            ),
        ];
        for (config, want) in cases {
            let e = token_set(&config, None).unwrap_err().to_string();
            assert!(e.contains(want), "{e:?} does not contain {want:?}");
        }
        let config = with(vec![], vec![worker("w", "flag-value")]);
        let e = token_set(&config, Some("flag-value"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("--worker-token \"worker-token\": `sha256`"),
            "{e}"
        );
    }
}
