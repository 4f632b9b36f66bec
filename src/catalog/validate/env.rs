//! The `[env]` table: plain values (with `{{params.NAME}}` references), and secrets by
//! reference, `{ from_env = "NAME" }` or `{ from_file = "/path" }`, which are read only
//! when a worker claims a run.

use std::collections::BTreeMap;
use std::path::PathBuf;

use toml::Spanned;

use super::{Ctx, check_refs};
use crate::catalog::file::Params;
use crate::domain::job::{
    RESERVED_ENV_PREFIX, has_malformed_param_reference, is_reserved_env_name, is_valid_env_name,
    param_references,
};
use crate::domain::secret::SecretRef;

/// A job's environment: plain values, and secrets by reference.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Env {
    pub plain: BTreeMap<String, String>,
    pub secrets: BTreeMap<String, SecretRef>,
}

/// `[env]`: names a shell would take, none of tasuki's own; values without NUL.
pub(super) fn env(
    ctx: &mut Ctx<'_>,
    raw: &BTreeMap<Spanned<String>, Spanned<toml::Value>>,
    params: &Params,
) -> Env {
    let mut env = Env::default();
    for (key, value) in raw {
        let k = key.get_ref();
        let field = format!("env.{k}");
        if !is_valid_env_name(k) {
            ctx.at(
                &key.span(),
                &field,
                format!("invalid environment variable name {k:?} (use A-Z, a-z, 0-9 and '_', not starting with a digit)"),
            );
        } else if is_reserved_env_name(k) {
            ctx.at(
                &key.span(),
                &field,
                format!("names starting with `{RESERVED_ENV_PREFIX}` are reserved for tasuki"),
            );
        }
        match value.get_ref() {
            toml::Value::String(text) => {
                let text = Spanned::new(value.span(), text.clone());
                if text.get_ref().contains('\0') {
                    ctx.at(&text.span(), &field, "contains a NUL character");
                }
                check_refs(ctx, &text, &field, params);
                env.plain.insert(k.clone(), text.into_inner());
            }
            toml::Value::Table(table) => {
                if let Some(reference) = secret_ref(ctx, value, table, &field) {
                    env.secrets.insert(k.clone(), reference);
                }
            }
            _ => ctx.at(&value.span(), &field, SHAPE),
        }
    }
    env
}

const SHAPE: &str = "must be a string, `{ from_env = \"NAME\" }` (a variable of the server's \
                     environment) or `{ from_file = \"/path\" }` (a file on the server)";

/// `{ from_env = "NAME" }` or `{ from_file = "/path" }`, exactly one of them.
fn secret_ref(
    ctx: &mut Ctx<'_>,
    value: &Spanned<toml::Value>,
    table: &toml::Table,
    field: &str,
) -> Option<SecretRef> {
    let span = value.span();
    let (key, source) = match table.iter().collect::<Vec<_>>().as_slice() {
        [(key, toml::Value::String(source))] => (key.as_str(), source.as_str()),
        _ => {
            ctx.at(&span, field, SHAPE);
            return None;
        }
    };
    // Fixed in the file: a reference is never filled in from a request, so no caller
    // can point a secret at another variable or file.
    if has_malformed_param_reference(source) || !param_references(source).is_empty() {
        ctx.at(
            &span,
            format!("{field}.{key}"),
            "parameters are not substituted in secret references",
        );
        return None;
    }
    match key {
        "from_env" => {
            if !is_valid_env_name(source) {
                ctx.at(
                    &span,
                    format!("{field}.from_env"),
                    format!("invalid environment variable name {source:?}"),
                );
                None
            } else if is_reserved_env_name(source) {
                // The server's own settings (its tokens among them) are not for jobs.
                ctx.at(
                    &span,
                    format!("{field}.from_env"),
                    format!(
                        "`{RESERVED_ENV_PREFIX}*` variables are tasuki's own settings and are not handed to jobs"
                    ),
                );
                None
            } else {
                Some(SecretRef::Env(source.to_owned()))
            }
        }
        "from_file" => {
            let path = PathBuf::from(source);
            if source.contains('\0') || !path.is_absolute() {
                ctx.at(
                    &span,
                    format!("{field}.from_file"),
                    format!("{source:?} must be an absolute path"),
                );
                None
            } else {
                Some(SecretRef::File(path))
            }
        }
        _ => {
            ctx.at(&span, field, SHAPE);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::catalog::testing::*;
    use crate::domain::secret::SecretRef;

    #[test]
    fn secrets_are_references() {
        let s = parse(
            "image = \"a\"\n[env]\nPLAIN = \"x\"\nDB_PASSWORD = { from_env = \"DB_PASSWORD\" }\n\
             API_KEY = { from_file = \"/run/secrets/api\" }\n",
        )
        .unwrap();
        assert_eq!(s.env.len(), 1);
        assert_eq!(s.env["PLAIN"], "x");
        assert_eq!(
            s.secret_env["DB_PASSWORD"],
            SecretRef::Env("DB_PASSWORD".into())
        );
        assert_eq!(
            s.secret_env["API_KEY"],
            SecretRef::File("/run/secrets/api".into())
        );
        // The references go into the resolved spec untouched.
        let r = s.resolve(&Default::default()).unwrap();
        assert_eq!(r.secret_env, s.secret_env);
    }

    #[test]
    fn bad_secret_references_say_what_is_wrong() {
        let cases = [
            (
                "X = { from_env = \"1BAD\" }",
                "env.X.from_env",
                "invalid environment",
            ),
            (
                "X = { from_env = \"TASUKI_WORKER_TOKEN\" }",
                "env.X.from_env",
                "tasuki's own settings",
            ),
            (
                "X = { from_file = \"secrets/db\" }",
                "env.X.from_file",
                "absolute path",
            ),
            (
                "X = { from_file = \"/run/{{params.p}}\" }\n[params.p]",
                "env.X.from_file",
                "not substituted",
            ),
            (
                "X = { from_env = \"A\", from_file = \"/b\" }",
                "env.X",
                "must be a string",
            ),
            ("X = { from_vault = \"a\" }", "env.X", "must be a string"),
            ("X = { from_env = 1 }", "env.X", "must be a string"),
            ("X = 5", "env.X", "must be a string"),
            ("X = {}", "env.X", "must be a string"),
        ];
        for (line, field, message) in cases {
            let text = format!("image = \"a\"\n[env]\n{line}\n");
            let e = one_error(&text);
            assert_eq!(e.field.as_deref(), Some(field), "{line}: {e}");
            assert_eq!(e.line, Some(3), "{line}: {e}");
            assert!(e.message.contains(message), "{line}: {e}");
        }
    }

    #[test]
    fn a_secret_name_follows_the_env_rules() {
        let e = one_error("image = \"a\"\n[env]\nTASUKI_X = { from_env = \"X\" }\n");
        assert_eq!(e.field.as_deref(), Some("env.TASUKI_X"));
        assert!(e.message.contains("reserved"), "{e}");
    }
}
