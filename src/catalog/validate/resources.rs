//! The `[resources]` table: limits within what Docker accepts.

use super::Ctx;
use crate::catalog::file::ResourcesFile;
use crate::domain::job::{Resources, parse_size};

/// Docker's CPU shares range.
const CPU_SHARES: std::ops::RangeInclusive<i64> = 2..=262_144;
/// Docker refuses less than 0.01 CPUs.
const MIN_CPU_LIMIT: f64 = 0.01;
/// Docker's minimum memory limit.
const MIN_MEMORY: u64 = 6 * 1024 * 1024;

/// `[resources]`: within what Docker accepts.
pub(super) fn resources(ctx: &mut Ctx<'_>, raw: &ResourcesFile) -> Resources {
    let mut resources = Resources::default();
    if let Some(cpu) = &raw.cpu {
        let v = *cpu.get_ref();
        match u32::try_from(v) {
            Ok(v32) if CPU_SHARES.contains(&v) => resources.cpu = Some(v32),
            _ => ctx.at(
                &cpu.span(),
                "resources.cpu",
                format!(
                    "{v} is out of range ({}..={} CPU units; 1024 = one core)",
                    CPU_SHARES.start(),
                    CPU_SHARES.end()
                ),
            ),
        }
    }
    if let Some(limit) = &raw.cpu_limit {
        let v = *limit.get_ref();
        // The upper bound only guards the nanosecond conversion against overflow.
        if v.is_finite() && (MIN_CPU_LIMIT..=1_000_000.0).contains(&v) {
            resources.cpu_limit = Some(v);
        } else {
            ctx.at(
                &limit.span(),
                "resources.cpu_limit",
                format!("{v} is out of range (cores, at least {MIN_CPU_LIMIT}, e.g. 0.5)"),
            );
        }
    }
    if let Some(mem) = &raw.memory {
        match parse_size(mem.get_ref()) {
            Ok(b) if b >= MIN_MEMORY => resources.memory_bytes = Some(b),
            Ok(_) => ctx.at(
                &mem.span(),
                "resources.memory",
                format!("{:?} is below Docker's minimum of 6MiB", mem.get_ref()),
            ),
            Err(e) => ctx.at(&mem.span(), "resources.memory", e.to_string()),
        }
    }
    resources
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::testing::*;

    #[test]
    fn integer_cpu_limit_accepted() {
        let s = parse("image = \"a\"\n[resources]\ncpu_limit = 2\n").unwrap();
        assert_eq!(s.resources.cpu_limit, Some(2.0));
    }

    #[test]
    fn bad_size_reports_line_and_field() {
        let e = one_error("image = \"a\"\n\n[resources]\nmemory = \"12 parsecs\"\n");
        assert_eq!(e.line, Some(4));
        assert_eq!(e.field.as_deref(), Some("resources.memory"));
        assert_eq!(
            e.to_string(),
            "jobs/hello.toml:4: resources.memory: invalid size \"12 parsecs\": unknown unit \
             (expected e.g. \"256MiB\", \"1GiB\", \"512MB\" or a number of bytes)"
        );
        let e = one_error("image = \"a\"\n[resources]\nmemory = \"5MiB\"\n");
        assert!(e.message.contains("minimum"), "{e}");
    }

    #[test]
    fn resources_bounds() {
        let s = parse("image = \"a\"\n[resources]\ncpu = 2\ncpu_limit = 0.01\nmemory = \"6MiB\"\n")
            .unwrap();
        assert_eq!(
            s.resources,
            Resources {
                cpu: Some(2),
                cpu_limit: Some(0.01),
                memory_bytes: Some(MIN_MEMORY)
            }
        );
        let e = one_error("image = \"a\"\n[resources]\ncpu = -1\n");
        assert_eq!(
            e.to_string(),
            "jobs/hello.toml:3: resources.cpu: -1 is out of range (2..=262144 CPU units; 1024 = one core)"
        );
        let e = one_error("image = \"a\"\n[resources]\ncpu_limit = 2000000.0\n");
        assert_eq!(e.field.as_deref(), Some("resources.cpu_limit"));
    }
}
