//! The `[webhook]` table: how deliveries to `POST /v1/hooks/{job}` are signed, the
//! secrets (read from `serve`'s environment now, never from the file), and which
//! parts of the body become params.

use std::collections::BTreeMap;

use toml::Spanned;

use super::Ctx;
use crate::catalog::file::{Params, WebhookFile};
use crate::domain::webhook::{DEFAULT_TOLERANCE, Secret, SignatureScheme, WebhookSpec};

pub(super) fn webhook(
    ctx: &mut Ctx<'_>,
    raw: &Spanned<WebhookFile>,
    params: &Params,
) -> Option<WebhookSpec> {
    let table = raw.get_ref();
    let scheme = scheme(ctx, raw);
    let secrets = scheme.and_then(|scheme| secrets(ctx, raw, scheme));
    let params_from = params_from(ctx, &table.params_from, params);
    Some(WebhookSpec {
        scheme: scheme?,
        secrets: secrets?,
        params_from: params_from?,
    })
}

/// `signature` (required) and `tolerance` (Standard Webhooks only).
fn scheme(ctx: &mut Ctx<'_>, raw: &Spanned<WebhookFile>) -> Option<SignatureScheme> {
    let table = raw.get_ref();
    let Some(signature) = &table.signature else {
        ctx.at(
            &raw.span(),
            "webhook.signature",
            "missing required field (\"github\" or \"standard\")",
        );
        return None;
    };
    match signature.get_ref().as_str() {
        "github" => {
            if let Some(t) = &table.tolerance {
                ctx.at(
                    &t.span(),
                    "webhook.tolerance",
                    "applies only to signature = \"standard\" (GitHub signatures carry no timestamp)",
                );
                return None;
            }
            Some(SignatureScheme::GitHub)
        }
        "standard" => {
            let tolerance = match &table.tolerance {
                None => DEFAULT_TOLERANCE,
                Some(t) => {
                    let d = ctx.duration(t, "webhook.tolerance")?;
                    if d.is_zero() {
                        ctx.at(&t.span(), "webhook.tolerance", "must be more than 0s");
                        return None;
                    }
                    d
                }
            };
            Some(SignatureScheme::Standard { tolerance })
        }
        other => {
            ctx.at(
                &signature.span(),
                "webhook.signature",
                format!("unknown scheme {other:?} (use \"github\" or \"standard\")"),
            );
            None
        }
    }
}

/// `secrets_from_env`: at least one name; each variable set, non-empty and usable as
/// a key of the scheme. The values are read here, at load.
fn secrets(
    ctx: &mut Ctx<'_>,
    raw: &Spanned<WebhookFile>,
    scheme: SignatureScheme,
) -> Option<Vec<Secret>> {
    const FIELD: &str = "webhook.secrets_from_env";
    let Some(names) = &raw.get_ref().secrets_from_env else {
        ctx.at(
            &raw.span(),
            FIELD,
            "missing required field (the names of environment variables holding the secrets)",
        );
        return None;
    };
    if names.get_ref().is_empty() {
        ctx.at(&names.span(), FIELD, "must name at least one variable");
        return None;
    }
    let mut secrets = Vec::new();
    let mut ok = true;
    for name in names.get_ref() {
        let var = name.get_ref();
        let problem = match (ctx.env)(var) {
            None => format!("environment variable `{var}` is not set"),
            Some(text) => match Secret::parse(scheme, &text) {
                Ok(secret) => {
                    secrets.push(secret);
                    continue;
                }
                Err(e) => format!("environment variable `{var}` {e}"),
            },
        };
        ctx.at(&name.span(), FIELD, problem);
        ok = false;
    }
    ok.then_some(secrets)
}

/// `params_from`: declared params, each from a JSON Pointer (RFC 6901).
fn params_from(
    ctx: &mut Ctx<'_>,
    raw: &BTreeMap<Spanned<String>, Spanned<String>>,
    params: &Params,
) -> Option<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let mut ok = true;
    for (name, pointer) in raw {
        let pname = name.get_ref();
        let field = format!("webhook.params_from.{pname}");
        if !params.keys().any(|k| k.get_ref() == pname) {
            ctx.at(
                &name.span(),
                &field,
                format!("names undeclared parameter `{pname}`; add a [params.{pname}] table"),
            );
            ok = false;
        }
        let p = pointer.get_ref();
        if !p.starts_with('/') {
            ctx.at(
                &pointer.span(),
                &field,
                format!("{p:?} is not a JSON Pointer (write it like \"/repository/full_name\")"),
            );
            ok = false;
        }
        out.insert(pname.clone(), p.clone());
    }
    ok.then_some(out)
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use super::*;
    use crate::catalog::file::JobFile;
    use crate::catalog::validate::validate;
    use crate::domain::job::JobSpec;

    fn fake_env(name: &str) -> Option<String> {
        match name {
            "HOOK_SECRET" => Some("s3cret".to_owned()),
            "HOOK_SECRET_OLD" => Some("old".to_owned()),
            "STD_SECRET" => Some("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".to_owned()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    fn check(text: &str) -> Result<JobSpec, Vec<String>> {
        let file = Path::new("jobs/hook.toml");
        let mut ctx = Ctx::new(file, text);
        ctx.env = fake_env;
        let raw: JobFile = toml::from_str(text).map_err(|e| vec![e.to_string()])?;
        let name = crate::domain::job::JobName::parse("hook").ok();
        let spec = validate(
            &mut ctx,
            name,
            &raw,
            &Default::default(),
            &Default::default(),
        );
        match spec {
            Some(s) if ctx.errors.is_empty() => Ok(s),
            _ => Err(ctx.errors.iter().map(ToString::to_string).collect()),
        }
    }

    const HEAD: &str = "image = \"alpine\"\n[params.ref]\n[params.repo]\ndefault = \"x\"\n";

    #[test]
    fn github_webhook_reads_secrets_and_params_from() {
        let spec = check(&format!(
            "{HEAD}[webhook]\nsignature = \"github\"\nsecrets_from_env = [\"HOOK_SECRET\", \"HOOK_SECRET_OLD\"]\nparams_from = {{ ref = \"/ref\", repo = \"/repository/full_name\" }}\n"
        ))
        .unwrap();
        let w = spec.webhook.unwrap();
        assert_eq!(w.scheme, SignatureScheme::GitHub);
        assert_eq!(w.secrets.len(), 2);
        assert_eq!(w.params_from["ref"], "/ref");
        assert_eq!(w.params_from["repo"], "/repository/full_name");
        assert!(!format!("{w:?}").contains("s3cret"));
    }

    #[test]
    fn standard_webhook_tolerance() {
        let spec = check(&format!(
            "{HEAD}[webhook]\nsignature = \"standard\"\nsecrets_from_env = [\"STD_SECRET\"]\n"
        ))
        .unwrap();
        assert_eq!(
            spec.webhook.unwrap().scheme,
            SignatureScheme::Standard {
                tolerance: DEFAULT_TOLERANCE
            }
        );
        let spec = check(&format!(
            "{HEAD}[webhook]\nsignature = \"standard\"\nsecrets_from_env = [\"STD_SECRET\"]\ntolerance = \"30s\"\n"
        ))
        .unwrap();
        assert_eq!(
            spec.webhook.unwrap().scheme,
            SignatureScheme::Standard {
                tolerance: Duration::from_secs(30)
            }
        );
        assert!(check(HEAD).unwrap().webhook.is_none());
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let cases = [
            (
                "[webhook]\nsecrets_from_env = [\"HOOK_SECRET\"]\n",
                "jobs/hook.toml:5: webhook.signature: missing required field",
            ),
            (
                "[webhook]\nsignature = \"gitlab\"\nsecrets_from_env = [\"HOOK_SECRET\"]\n",
                "jobs/hook.toml:6: webhook.signature: unknown scheme \"gitlab\"",
            ),
            (
                "[webhook]\nsignature = \"github\"\n",
                "jobs/hook.toml:5: webhook.secrets_from_env: missing required field",
            ),
            (
                "[webhook]\nsignature = \"github\"\nsecrets_from_env = []\n",
                "jobs/hook.toml:7: webhook.secrets_from_env: must name at least one variable",
            ),
            (
                "[webhook]\nsignature = \"github\"\nsecrets_from_env = [\"HOOK_SECRET\", \"NOPE\"]\n",
                "jobs/hook.toml:7: webhook.secrets_from_env: environment variable `NOPE` is not set",
            ),
            (
                "[webhook]\nsignature = \"github\"\nsecrets_from_env = [\"EMPTY\"]\n",
                "jobs/hook.toml:7: webhook.secrets_from_env: environment variable `EMPTY` is empty",
            ),
            (
                "[webhook]\nsignature = \"standard\"\nsecrets_from_env = [\"HOOK_SECRET\"]\n",
                "jobs/hook.toml:7: webhook.secrets_from_env: environment variable `HOOK_SECRET` is not `whsec_` followed by base64",
            ),
            (
                "[webhook]\nsignature = \"github\"\nsecrets_from_env = [\"HOOK_SECRET\"]\ntolerance = \"1m\"\n",
                "jobs/hook.toml:8: webhook.tolerance: applies only to signature = \"standard\"",
            ),
            (
                "[webhook]\nsignature = \"standard\"\nsecrets_from_env = [\"STD_SECRET\"]\ntolerance = \"soon\"\n",
                "jobs/hook.toml:8: webhook.tolerance:",
            ),
            (
                "[webhook]\nsignature = \"github\"\nsecrets_from_env = [\"HOOK_SECRET\"]\n[webhook.params_from]\nbranch = \"/ref\"\n",
                "jobs/hook.toml:9: webhook.params_from.branch: names undeclared parameter `branch`",
            ),
            (
                "[webhook]\nsignature = \"github\"\nsecrets_from_env = [\"HOOK_SECRET\"]\n[webhook.params_from]\nref = \"ref\"\n",
                "jobs/hook.toml:9: webhook.params_from.ref: \"ref\" is not a JSON Pointer",
            ),
        ];
        for (tail, want) in cases {
            let errors = check(&format!("{HEAD}{tail}")).unwrap_err();
            assert_eq!(errors.len(), 1, "{tail}: {errors:?}");
            assert!(errors[0].starts_with(want), "{tail}: {errors:?}");
        }
    }

    #[test]
    fn unknown_keys_in_the_table_are_refused() {
        let errors = check(&format!(
            "{HEAD}[webhook]\nsignature = \"github\"\nsecret = \"inline\"\n"
        ))
        .unwrap_err();
        assert!(errors[0].contains("unknown field `secret`"), "{errors:?}");
    }
}
