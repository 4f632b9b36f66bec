//! `tasuki token create`: a new random token, printed once with the config lines that
//! name it by its SHA-256.

use std::process::ExitCode;

use crate::config::TokenCommand;
use crate::domain::auth::{Scope, TokenDigest, check_token_name};

/// Bytes of randomness in a token (256 bits).
const TOKEN_BYTES: usize = 32;

pub fn command(cmd: TokenCommand) -> ExitCode {
    match cmd {
        TokenCommand::Create {
            name,
            scopes,
            worker,
        } => match create(&name, &scopes, worker) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(message) => {
                eprintln!("tasuki: {message}");
                ExitCode::from(2)
            }
        },
    }
}

/// The text to print: the token, then the TOML to paste.
fn create(name: &str, scopes: &[String], worker: bool) -> Result<String, String> {
    check_token_name(name).map_err(|e| e.to_string())?;
    if !worker && scopes.is_empty() {
        return Err(
            "an API token needs at least one --scope (run:GLOB, read:GLOB, cancel:GLOB or admin)"
                .to_owned(),
        );
    }
    let parsed: Vec<Scope> = scopes
        .iter()
        .map(|s| s.parse::<Scope>().map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    let value = new_token(if worker { "tskw_" } else { "tsk_" });
    let digest = TokenDigest::of(&value).to_hex();
    let section = if worker { "worker_tokens" } else { "tokens" };
    let mut out = format!(
        "{value}\n\n# The token is shown only now. Add this to the server's config file:\n[[{section}]]\nname = {name:?}\nsha256 = \"{digest}\"\n"
    );
    if !worker {
        let list: Vec<String> = parsed
            .iter()
            .map(|s| format!("{:?}", s.to_string()))
            .collect();
        out.push_str(&format!("scopes = [{}]\n", list.join(", ")));
    }
    Ok(out)
}

fn new_token(prefix: &str) -> String {
    let bytes: [u8; TOKEN_BYTES] = rand::random();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{prefix}{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::server::ServerConfig;

    #[test]
    fn created_lines_load_and_match_the_token() {
        let text = create("ci", &["run:nightly-*".into(), "read:*".into()], false).unwrap();
        let value = text.lines().next().unwrap();
        assert!(value.starts_with("tsk_") && value.len() == 4 + 64);
        let toml_part: String = text.lines().skip(3).collect::<Vec<_>>().join("\n");
        let config: ServerConfig = toml::from_str(&toml_part).unwrap();
        assert_eq!(config.tokens[0].name, "ci");
        assert_eq!(config.tokens[0].scopes, ["run:nightly-*", "read:*"]);
        assert_eq!(config.tokens[0].sha256, TokenDigest::of(value).to_hex());
    }

    #[test]
    fn worker_tokens_have_no_scopes() {
        let text = create("hosts", &[], true).unwrap();
        let toml_part: String = text.lines().skip(3).collect::<Vec<_>>().join("\n");
        let config: ServerConfig = toml::from_str(&toml_part).unwrap();
        assert_eq!(config.worker_tokens[0].name, "hosts");
        assert!(text.lines().next().unwrap().starts_with("tskw_"));
    }

    #[test]
    fn bad_names_and_scopes_are_refused() {
        assert!(create("", &["admin".into()], false).is_err());
        assert!(create("a b", &["admin".into()], false).is_err());
        assert!(
            create("anonymous", &["admin".into()], false)
                .unwrap_err()
                .contains("reserved")
        );
        assert!(create("ci", &[], false).unwrap_err().contains("--scope"));
        assert!(
            create("ci", &["write:*".into()], false)
                .unwrap_err()
                .contains("write:*")
        );
    }

    #[test]
    fn two_tokens_differ() {
        assert_ne!(new_token("tsk_"), new_token("tsk_"));
    }
}
