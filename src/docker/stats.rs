//! A container's stats reading (`GET /containers/{id}/stats`) as a [`StatsSample`].
//!
//! Which memory figure counts: the cgroup's charge (`memory_stats.usage`, page cache
//! included), because that is what the memory limit is enforced against and what the
//! OOM killer acts on once reclaim cannot bring it under the limit. On cgroup v1 the
//! engine also reports `max_usage`, the kernel's high-water mark of that same charge,
//! which catches a peak between two readings; cgroup v2 engines (Docker 20.10) report
//! none, so there the peak is the highest reading. `docker stats` shows the charge
//! less inactive page cache instead; that figure can sit well below the limit at the
//! moment the OOM killer fires, so it would hide how close a job came.

use bollard::models::ContainerStatsResponse;

use crate::domain::ports::StatsSample;

/// The reading, or `None` when the engine had nothing to read: a container that is
/// not running gets an all-empty answer (no memory figures, CPU 0, read time year 1).
pub(super) fn sample_of(stats: &ContainerStatsResponse) -> Option<StatsSample> {
    let memory = stats.memory_stats.as_ref()?;
    let memory_bytes = memory.usage?;
    let cpu_nanos = stats
        .cpu_stats
        .as_ref()
        .and_then(|c| c.cpu_usage.as_ref())
        .and_then(|u| u.total_usage)
        .unwrap_or(0);
    Some(StatsSample {
        memory_bytes,
        // Some engines send 0 where they have no high-water mark.
        memory_peak_bytes: memory.max_usage.filter(|m| *m > 0),
        cpu_nanos,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> ContainerStatsResponse {
        serde_json::from_str(json).expect("a stats answer")
    }

    /// Abridged from Docker 20.10 on cgroup v1, a running container holding 20 MB.
    #[test]
    fn a_cgroup_v1_reading_has_the_kernels_high_water_mark() {
        let stats = parse(
            r#"{"read":"2026-11-26T20:01:44.043882939Z","preread":"2026-11-26T20:01:43.037078407Z",
            "cpu_stats":{"cpu_usage":{"total_usage":321973376,"usage_in_kernelmode":120000000,
            "usage_in_usermode":190000000},"system_cpu_usage":1540510000000,"online_cpus":2},
            "memory_stats":{"usage":22630400,"max_usage":42610688,
            "stats":{"cache":1953792,"inactive_file":667648,"rss":20197376},"limit":67108864}}"#,
        );
        assert_eq!(
            sample_of(&stats),
            Some(StatsSample {
                memory_bytes: 22_630_400,
                memory_peak_bytes: Some(42_610_688),
                cpu_nanos: 321_973_376,
            })
        );
    }

    /// cgroup v2: no `max_usage`.
    #[test]
    fn a_cgroup_v2_reading_has_no_high_water_mark() {
        let stats = parse(
            r#"{"read":"2026-11-26T20:01:44Z","cpu_stats":{"cpu_usage":{"total_usage":5000}},
            "memory_stats":{"usage":1048576,"stats":{"inactive_file":4096},"limit":67108864}}"#,
        );
        assert_eq!(
            sample_of(&stats),
            Some(StatsSample {
                memory_bytes: 1_048_576,
                memory_peak_bytes: None,
                cpu_nanos: 5000,
            })
        );
    }

    /// What Docker 20.10 answers for a container that is not running (created, or
    /// just exited): nothing to read.
    #[test]
    fn a_stopped_containers_empty_answer_is_no_reading() {
        let stats = parse(
            r#"{"read":"0001-01-01T00:00:00Z","preread":"0001-01-01T00:00:00Z","pids_stats":{},
            "cpu_stats":{"cpu_usage":{"total_usage":0,"usage_in_kernelmode":0,"usage_in_usermode":0},
            "throttling_data":{"periods":0,"throttled_periods":0,"throttled_time":0}},
            "memory_stats":{},"name":"/x","id":"abc"}"#,
        );
        assert_eq!(sample_of(&stats), None);
    }
}
