//! `[params.NAME]` tables, and the `{{params.NAME}}` references to them in `command`
//! and `env`.

use std::collections::BTreeMap;

use toml::Spanned;

use super::Ctx;
use crate::catalog::file::Params;
use crate::domain::job::{
    ParamSpec, has_malformed_param_reference, is_valid_param_name, param_references,
};

/// Largest accepted `max_length`: Linux caps one argv/env string at 128 KiB.
const MAX_PARAM_LENGTH: i64 = 128 * 1024;

/// Every reference in `value` is well formed and names a declared parameter.
pub(in crate::catalog) fn check_refs(
    ctx: &mut Ctx<'_>,
    value: &Spanned<String>,
    field: &str,
    params: &Params,
) {
    let s = value.get_ref();
    if has_malformed_param_reference(s) {
        ctx.at(
            &value.span(),
            field,
            format!(
                "malformed parameter reference in {s:?} (write `{{{{params.NAME}}}}` with \
                 NAME in lowercase)"
            ),
        );
    }
    for name in param_references(s) {
        if !params.contains_key(name) {
            let declared: Vec<&str> = params.keys().map(|k| k.get_ref().as_str()).collect();
            let hint = if declared.is_empty() {
                "no parameters are declared".to_owned()
            } else {
                format!("declared: {}", declared.join(", "))
            };
            ctx.at(
                &value.span(),
                field,
                format!(
                    "references undeclared parameter `{name}` ({hint}); add a [params.{name}] table"
                ),
            );
        }
    }
}

/// The declared parameters: valid names, a usable pattern and length, and a default
/// that passes both (and is not given for a required parameter).
pub(super) fn params(ctx: &mut Ctx<'_>, raw: &Params) -> BTreeMap<String, ParamSpec> {
    let mut params = BTreeMap::new();
    for (key, p) in raw {
        let pname = key.get_ref();
        let base = format!("params.{pname}");
        let line = Some(ctx.line_of(&key.span()));
        if !is_valid_param_name(pname) {
            ctx.push(
                line,
                &base,
                format!(
                    "invalid parameter name {pname:?} (use 1-64 characters from a-z, 0-9 and '_', not starting with a digit)"
                ),
            );
        }
        let max_length = max_length(ctx, p.max_length.as_ref(), &base);
        let pattern = p.pattern.as_ref().and_then(|pat| {
            ParamSpec::anchored_pattern(pat.get_ref())
                .map_err(|e| {
                    ctx.at(
                        &pat.span(),
                        format!("{base}.pattern"),
                        format!("invalid regex: {}", regex_error_summary(&e)),
                    );
                })
                .ok()
        });
        let required = p.required.unwrap_or(false);
        let spec = ParamSpec {
            required,
            default: p.default.as_ref().map(|d| d.get_ref().clone()),
            pattern,
            max_length,
            description: p.description.clone(),
        };
        if let Some(d) = &p.default {
            let field = format!("{base}.default");
            if required {
                ctx.at(
                    &d.span(),
                    &field,
                    "a required parameter cannot have a default (drop one of them)",
                );
            }
            if let Err(e) = spec.check_value(pname, d.get_ref()) {
                ctx.at(&d.span(), &field, format!("default value is invalid: {e}"));
            }
        }
        params.insert(pname.clone(), spec);
    }
    params
}

fn max_length(ctx: &mut Ctx<'_>, raw: Option<&Spanned<i64>>, base: &str) -> usize {
    let Some(m) = raw else {
        return ParamSpec::DEFAULT_MAX_LENGTH;
    };
    match usize::try_from(*m.get_ref()) {
        Ok(n) if (1..=MAX_PARAM_LENGTH).contains(m.get_ref()) => n,
        _ => {
            ctx.at(
                &m.span(),
                format!("{base}.max_length"),
                format!("{} is out of range (1..={MAX_PARAM_LENGTH})", m.get_ref()),
            );
            ParamSpec::DEFAULT_MAX_LENGTH
        }
    }
}

/// `regex::Error` renders syntax errors over several lines with a caret diagram;
/// keep just the "error: ..." line.
fn regex_error_summary(e: &regex::Error) -> String {
    let full = e.to_string();
    full.lines()
        .find_map(|l| l.trim().strip_prefix("error: "))
        .unwrap_or_else(|| full.lines().next().unwrap_or("invalid"))
        .to_owned()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::regex_error_summary;
    use crate::catalog::testing::*;
    use crate::domain::job::ParamSpec;

    #[test]
    fn undeclared_param_reference() {
        let e = one_error("image = \"a\"\ncommand = [\"echo\", \"{{params.who}}\"]\n");
        assert_eq!(e.line, Some(2));
        assert_eq!(e.field.as_deref(), Some("command[1]"));
        assert!(e.message.contains("undeclared parameter `who`"), "{e}");

        let e = one_error("image = \"a\"\n[env]\nX = \"{{ params.y }}\"\n[params.z]\n");
        assert_eq!(e.line, Some(3));
        assert_eq!(e.field.as_deref(), Some("env.X"));
        assert!(e.message.contains("(declared: z)"), "{e}");

        let e = one_error("image = \"a\"\ncommand = [\"{{params.Who}}\"]\n");
        assert!(e.message.contains("malformed"), "{e}");
    }

    #[test]
    fn param_validation() {
        let e = one_error("image = \"a\"\n[params.Bad]\n");
        assert_eq!(e.line, Some(2));
        assert_eq!(e.field.as_deref(), Some("params.Bad"));

        let e = one_error("image = \"a\"\n[params.x]\nrequired = true\ndefault = \"v\"\n");
        assert_eq!(e.line, Some(4));
        assert_eq!(e.field.as_deref(), Some("params.x.default"));
        assert!(e.message.contains("cannot have a default"));

        let e = one_error("image = \"a\"\n[params.x]\npattern = \"[a-z]+\"\ndefault = \"abc1\"\n");
        assert_eq!(e.field.as_deref(), Some("params.x.default"));
        assert!(e.message.contains("does not match"), "{e}");

        let e = one_error("image = \"a\"\n[params.x]\nmax_length = 3\ndefault = \"abcd\"\n");
        assert!(e.message.contains("too long"), "{e}");

        let e = one_error("image = \"a\"\n[params.x]\nmax_length = 0\n");
        assert_eq!(e.field.as_deref(), Some("params.x.max_length"));
        assert_eq!(e.line, Some(3));

        let e = one_error("image = \"a\"\n[params.x]\npattern = \"([a-z\"\n");
        assert_eq!(e.field.as_deref(), Some("params.x.pattern"));
        assert!(e.message.starts_with("invalid regex: "), "{e}");
        assert!(!e.message.contains('\n'));
    }

    #[test]
    fn pattern_anchored_even_without_caret_dollar() {
        let s = parse(
            "image = \"a\"\ncommand = [\"{{params.x}}\"]\n[params.x]\npattern = \"[a-z]+\"\n",
        )
        .unwrap();
        let given = |v: &str| BTreeMap::from([("x".to_owned(), v.to_owned())]);
        assert!(s.resolve(&given("abc")).is_ok());
        assert!(s.resolve(&given("abc; rm -rf /")).is_err());
        assert!(s.resolve(&given("1abc")).is_err());
    }

    #[test]
    fn substitution_is_verbatim() {
        let s = parse(
            "image = \"a\"\ncommand = [\"echo\", \"{{params.x}}\"]\n[env]\nV = \"<{{params.x}}>\"\n[params.x]\n",
        )
        .unwrap();
        let evil = "$(id); rm -rf /";
        let r = s
            .resolve(&BTreeMap::from([("x".to_owned(), evil.to_owned())]))
            .unwrap();
        assert_eq!(r.command, ["echo", evil]);
        assert_eq!(r.env["V"], format!("<{evil}>"));
        // optional, no value, no default -> empty string
        let r = s.resolve(&BTreeMap::new()).unwrap();
        assert_eq!(r.command, ["echo", ""]);
        assert_eq!(r.env["V"], "<>");
    }

    #[test]
    fn max_length_bounds() {
        let s = parse("image = \"a\"\n[params.x]\nmax_length = 131072\n").unwrap();
        assert_eq!(s.params["x"].max_length, 131_072);
        let e = one_error("image = \"a\"\n[params.x]\nmax_length = 131073\n");
        assert_eq!(
            e.to_string(),
            "jobs/hello.toml:3: params.x.max_length: 131073 is out of range (1..=131072)"
        );
        let e = one_error("image = \"a\"\n[params.x]\nmax_length = -5\n");
        assert_eq!(e.field.as_deref(), Some("params.x.max_length"));
    }

    #[test]
    fn regex_errors_keep_one_line() {
        let e = ParamSpec::anchored_pattern("(").unwrap_err();
        let summary = regex_error_summary(&e);
        assert!(!summary.contains('\n'), "{summary}");
        assert!(!summary.is_empty());
    }
}
