//! The `[retry]` table.

use std::time::Duration;

use toml::Spanned;

use super::Ctx;
use crate::catalog::file::RetryFile;
use crate::domain::job::parse_kept_duration;
use crate::domain::retry::RetryPolicy;

/// A `[retry]` table must say how many attempts, and what to retry once there is more
/// than one.
pub(super) fn retry(ctx: &mut Ctx<'_>, raw: &RetryFile) -> RetryPolicy {
    let mut policy = RetryPolicy {
        max_attempts: max_attempts(ctx, raw.max_attempts.as_ref()),
        ..RetryPolicy::default()
    };
    policy.backoff = backoff(
        ctx,
        raw.backoff.as_ref(),
        "retry.backoff",
        RetryPolicy::DEFAULT_BACKOFF,
    );
    policy.backoff_max = backoff(
        ctx,
        raw.backoff_max.as_ref(),
        "retry.backoff_max",
        RetryPolicy::DEFAULT_BACKOFF_MAX.max(policy.backoff),
    );
    if policy.backoff_max < policy.backoff {
        let span = raw
            .backoff_max
            .as_ref()
            .map(|b| b.span())
            .unwrap_or_default();
        ctx.at(
            &span,
            "retry.backoff_max",
            "must not be less than retry.backoff",
        );
    }
    for (i, code) in raw.on_exit_codes.iter().enumerate() {
        if (1..=255).contains(code.get_ref()) {
            policy.on_exit_codes.insert(*code.get_ref());
        } else {
            ctx.at(
                &code.span(),
                format!("retry.on_exit_codes[{i}]"),
                "must be an exit code from 1 to 255 (0 is success)",
            );
        }
    }
    for (i, name) in raw.on.iter().enumerate() {
        match RetryPolicy::RETRYABLE
            .into_iter()
            .find(|c| c.as_str() == name.get_ref())
        {
            Some(code) => {
                policy.on.insert(code);
            }
            None => {
                let names: Vec<&str> = RetryPolicy::RETRYABLE.iter().map(|c| c.as_str()).collect();
                ctx.at(
                    &name.span(),
                    format!("retry.on[{i}]"),
                    format!(
                        "`{}` can't be retried; name any of {} (exit codes go in on_exit_codes)",
                        name.get_ref(),
                        names.join(", ")
                    ),
                );
            }
        }
    }
    if policy.max_attempts > 1 && raw.on.is_empty() && raw.on_exit_codes.is_empty() {
        ctx.push(
            None,
            "retry",
            "max_attempts > 1 but nothing is named to retry: add on_exit_codes and/or on",
        );
    }
    policy
}

fn max_attempts(ctx: &mut Ctx<'_>, raw: Option<&Spanned<i64>>) -> u32 {
    let default = RetryPolicy::default().max_attempts;
    match raw {
        Some(n) => match u32::try_from(*n.get_ref()) {
            Ok(v) if (1..=RetryPolicy::MAX_ATTEMPTS).contains(&v) => v,
            _ => {
                ctx.at(
                    &n.span(),
                    "retry.max_attempts",
                    format!(
                        "must be between 1 and {} (attempts in all, the first included)",
                        RetryPolicy::MAX_ATTEMPTS
                    ),
                );
                default
            }
        },
        None => {
            ctx.push(
                None,
                "retry.max_attempts",
                "missing: a [retry] table must say how many attempts in all (e.g. 3)",
            );
            default
        }
    }
}

/// A positive duration a run can keep (whole milliseconds), or `default` (with an
/// error) when it is not one.
fn backoff(
    ctx: &mut Ctx<'_>,
    raw: Option<&Spanned<String>>,
    field: &str,
    default: Duration,
) -> Duration {
    let Some(v) = raw else {
        return default;
    };
    match parse_kept_duration(v.get_ref()) {
        Ok(d) if !d.is_zero() => d,
        Ok(_) => {
            ctx.at(&v.span(), field, "must be more than 0s");
            default
        }
        Err(e) => {
            ctx.at(&v.span(), field, e.to_string());
            default
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::testing::*;

    #[test]
    fn retry_table() {
        let s = parse(
            "image = \"a\"\n[retry]\nmax_attempts = 3\nbackoff = \"2s\"\non_exit_codes = [1, 75]\non = [\"lost\", \"oom_killed\"]\n",
        )
        .unwrap();
        assert_eq!(s.retry.max_attempts, 3);
        assert_eq!(s.retry.backoff, Duration::from_secs(2));
        assert_eq!(s.retry.on_exit_codes.len(), 2);
        assert!(s.retry.on.contains(&crate::domain::run::ReasonCode::Lost));
        assert_eq!(
            parse("image = \"a\"\n").unwrap().retry,
            RetryPolicy::default()
        );

        let e = one_error("image = \"a\"\n[retry]\nmax_attempts = 2\non = [\"cancelled\"]\n");
        assert_eq!(e.field.as_deref(), Some("retry.on[0]"));
        assert!(e.message.contains("can't be retried"), "{}", e.message);
        let e = one_error("image = \"a\"\n[retry]\nmax_attempts = 0\non = [\"lost\"]\n");
        assert_eq!(e.field.as_deref(), Some("retry.max_attempts"));
        assert_eq!(e.line, Some(3));
        let e = one_error("image = \"a\"\n[retry]\nmax_attempts = 2\non_exit_codes = [0]\n");
        assert_eq!(e.field.as_deref(), Some("retry.on_exit_codes[0]"));
        let e = one_error("image = \"a\"\n[retry]\nmax_attempts = 3\n");
        assert_eq!(e.field.as_deref(), Some("retry"));
    }

    #[test]
    fn backoff_bounds() {
        let s = parse(
            "image = \"a\"\n[retry]\nmax_attempts = 100\nbackoff = \"2h\"\non = [\"lost\"]\n",
        )
        .unwrap();
        // The default cap never sits below the first delay.
        assert_eq!(s.retry.backoff, Duration::from_secs(7200));
        assert_eq!(
            s.retry.backoff_max,
            Duration::from_secs(7200).max(RetryPolicy::DEFAULT_BACKOFF_MAX)
        );

        let e = one_error(
            "image = \"a\"\n[retry]\nmax_attempts = 2\non = [\"lost\"]\nbackoff = \"0s\"\n",
        );
        assert!(
            e.to_string()
                .starts_with("jobs/hello.toml:5: retry.backoff: invalid duration \"0s\""),
            "{e}"
        );
        let e = one_error(
            "image = \"a\"\n[retry]\nmax_attempts = 2\non = [\"lost\"]\nbackoff = \"1m\"\nbackoff_max = \"10s\"\n",
        );
        assert_eq!(
            e.to_string(),
            "jobs/hello.toml:6: retry.backoff_max: must not be less than retry.backoff"
        );
        let e = one_error(
            "image = \"a\"\n[retry]\nmax_attempts = 2\non = [\"lost\"]\nbackoff_max = \"soon\"\n",
        );
        assert_eq!(e.field.as_deref(), Some("retry.backoff_max"));
        assert!(e.message.contains("invalid duration"), "{e}");
    }

    #[test]
    fn attempts_and_exit_codes() {
        let e = one_error("image = \"a\"\n[retry]\nmax_attempts = 101\non = [\"lost\"]\n");
        assert_eq!(
            e.to_string(),
            "jobs/hello.toml:3: retry.max_attempts: must be between 1 and 100 (attempts in all, the first included)"
        );
        let e = one_error("image = \"a\"\n[retry]\non = [\"lost\"]\n");
        assert_eq!(e.line, None);
        assert_eq!(e.field.as_deref(), Some("retry.max_attempts"));
        let errs =
            errors("image = \"a\"\n[retry]\nmax_attempts = 2\non_exit_codes = [1, 256,\n -1]\n");
        assert_eq!(
            errs,
            [
                "jobs/hello.toml:4: retry.on_exit_codes[1]: must be an exit code from 1 to 255 (0 is success)",
                "jobs/hello.toml:5: retry.on_exit_codes[2]: must be an exit code from 1 to 255 (0 is success)",
            ]
        );
        let s = parse("image = \"a\"\n[retry]\nmax_attempts = 1\n").unwrap();
        assert_eq!(s.retry.max_attempts, 1);
    }
}
