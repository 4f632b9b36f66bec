//! `tasuki status`'s usage lines: what each attempt's container used, next to its
//! limits, in units a person sizes `memory` and `cpu_limit` in.

use crate::protocol::api::UsageV1;

/// One line per attempt that has usage, from the run's JSON as the server sent it
/// (attempts or fields this build does not know are passed over).
pub(super) fn attempt_lines(run: &serde_json::Value) -> Vec<String> {
    let Some(attempts) = run.get("attempts").and_then(|a| a.as_array()) else {
        return Vec::new();
    };
    attempts
        .iter()
        .filter_map(|a| {
            let number = a.get("attempt")?.as_u64()?;
            let usage: UsageV1 = serde_json::from_value(a.get("usage")?.clone()).ok()?;
            Some(format!("tasuki: attempt {number}: {}", usage_text(&usage)))
        })
        .collect()
}

/// `peak memory 41.2 MiB of 64 MiB, CPU 0.83 s (limit 0.5 cores), 4 readings`.
pub(super) fn usage_text(u: &UsageV1) -> String {
    let mut text = format!("peak memory {}", human_size(u.peak_memory_bytes));
    if let Some(limit) = u.memory_limit_bytes {
        text.push_str(&format!(" of {}", human_size(limit)));
    }
    text.push_str(&format!(", CPU {:.2} s", u.cpu_seconds));
    if let Some(cores) = u.cpu_limit {
        text.push_str(&format!(" (limit {cores} cores)"));
    }
    let readings = if u.samples == 1 {
        "reading"
    } else {
        "readings"
    };
    text.push_str(&format!(", {} {readings}", u.samples));
    text
}

/// Bytes in the largest binary unit they reach, one decimal unless whole: `41.2 MiB`.
fn human_size(bytes: u64) -> String {
    for (unit, shift) in [("GiB", 30), ("MiB", 20), ("KiB", 10)] {
        if bytes >= 1 << shift {
            let value = bytes as f64 / (1u64 << shift) as f64;
            let tenths = (value * 10.0).round() / 10.0;
            return if tenths.fract() == 0.0 {
                format!("{tenths:.0} {unit}")
            } else {
                format!("{tenths:.1} {unit}")
            };
        }
    }
    format!("{bytes} B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_a_person_writes_them() {
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(64 << 20), "64 MiB");
        assert_eq!(human_size(43_201_331), "41.2 MiB");
        assert_eq!(human_size(3 << 29), "1.5 GiB");
        assert_eq!(human_size(2047), "2 KiB");
    }

    #[test]
    fn each_attempt_with_usage_gets_a_line() {
        let run = serde_json::json!({
            "attempts": [
                {"attempt": 1, "status": "failed", "usage": {
                    "peak_memory_bytes": 43_201_331u64, "cpu_seconds": 0.834,
                    "memory_limit_bytes": 67_108_864u64, "samples": 4}},
                {"attempt": 2, "status": "lost"},
                {"attempt": 3, "status": "succeeded", "usage": {
                    "peak_memory_bytes": 1024, "cpu_seconds": 0.0, "cpu_limit": 0.5,
                    "samples": 1}}
            ]
        });
        assert_eq!(
            attempt_lines(&run),
            vec![
                "tasuki: attempt 1: peak memory 41.2 MiB of 64 MiB, CPU 0.83 s, 4 readings",
                "tasuki: attempt 3: peak memory 1 KiB, CPU 0.00 s (limit 0.5 cores), 1 reading",
            ]
        );
        assert!(attempt_lines(&serde_json::json!({"id": "r"})).is_empty());
    }
}
