//! Sizes and durations as written in job files ("256MiB", "1h 30m").

use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid size {input:?}: {reason} (expected e.g. \"256MiB\", \"1GiB\", \"512MB\" or a number of bytes)"
)]
pub struct InvalidSize {
    pub input: String,
    pub reason: &'static str,
}

/// Largest accepted size: Docker's API carries sizes as int64.
pub const MAX_SIZE: u64 = i64::MAX as u64;

/// Parse a memory size: an integer, optional whitespace, optional unit
/// (case-insensitive).
///
/// - binary: `KiB`/`Ki` = 1024, `MiB`/`Mi` = 1024², `GiB`/`Gi`, `TiB`/`Ti`;
/// - decimal (SI, like Kubernetes): `KB`/`K` = 1000, `MB`/`M` = 1000², `GB`/`G`, `TB`/`T`;
/// - `B` or no unit: bytes.
///
/// Note `512M` is 512,000,000 bytes, not 512 MiB as `docker run -m 512m` would take it;
/// write `512MiB` when you mean that. Fractions are not accepted. Zero and values above
/// `i64::MAX` are rejected.
pub fn parse_size(input: &str) -> Result<u64, InvalidSize> {
    let err = |reason| InvalidSize {
        input: input.to_owned(),
        reason,
    };
    let s = input.trim();
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(digits_end);
    if number.is_empty() {
        return Err(err("no number"));
    }
    let unit = unit.trim_start();
    let multiplier: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "t" | "tb" => 1_000_000_000_000,
        "ki" | "kib" => 1 << 10,
        "mi" | "mib" => 1 << 20,
        "gi" | "gib" => 1 << 30,
        "ti" | "tib" => 1 << 40,
        _ if unit.starts_with('.') => return Err(err("fractions are not supported")),
        _ => return Err(err("unknown unit")),
    };
    let n: u64 = number.parse().map_err(|_| err("number too large"))?;
    let bytes = n
        .checked_mul(multiplier)
        .filter(|b| *b <= MAX_SIZE)
        .ok_or_else(|| err("number too large"))?;
    if bytes == 0 {
        return Err(err("must be greater than zero"));
    }
    Ok(bytes)
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {input:?}: {reason} (expected e.g. \"90s\", \"30m\" or \"1h 30m\")")]
pub struct InvalidDuration {
    pub input: String,
    pub reason: String,
}

/// Parse a human duration ("30m", "1h 30m", "90s") with `humantime`; zero is rejected.
pub fn parse_duration(input: &str) -> Result<Duration, InvalidDuration> {
    let d = humantime::parse_duration(input.trim()).map_err(|e| InvalidDuration {
        input: input.to_owned(),
        reason: e.to_string(),
    })?;
    if d.is_zero() {
        return Err(InvalidDuration {
            input: input.to_owned(),
            reason: "must be greater than zero".to_owned(),
        });
    }
    Ok(d)
}

/// The longest duration a run can keep: its frozen spec and retry rules hold
/// durations as whole milliseconds in a `u64` (about 584 million years).
pub const MAX_KEPT_DURATION: Duration = Duration::from_millis(u64::MAX);

/// [`parse_duration`] for what a run keeps in milliseconds (`timeout`, `stop_grace`,
/// retry backoffs): whole milliseconds, at most [`MAX_KEPT_DURATION`]. Anything else
/// would be stored as another duration (`"999us"` as 0, a timeout that fires at once).
pub fn parse_kept_duration(input: &str) -> Result<Duration, InvalidDuration> {
    let d = parse_duration(input)?;
    let reason = if d.subsec_nanos() % 1_000_000 != 0 {
        "give whole milliseconds"
    } else if d > MAX_KEPT_DURATION {
        "longer than a run can keep (at most 18446744073709551615ms)"
    } else {
        return Ok(d);
    };
    Err(InvalidDuration {
        input: input.to_owned(),
        reason: reason.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        let cases: &[(&str, u64)] = &[
            ("1", 1),
            ("100B", 100),
            ("256MiB", 256 << 20),
            ("256 mib", 256 << 20),
            ("256Mi", 256 << 20),
            ("1GiB", 1 << 30),
            ("1gib", 1 << 30),
            ("4KiB", 4096),
            ("2TiB", 2 << 40),
            ("512M", 512_000_000),
            ("512MB", 512_000_000),
            ("512 mb", 512_000_000),
            ("1k", 1000),
            ("1G", 1_000_000_000),
            (" 7 GB ", 7_000_000_000),
        ];
        for (input, want) in cases {
            assert_eq!(parse_size(input).unwrap(), *want, "{input}");
        }
    }

    #[test]
    fn bad_sizes() {
        for bad in [
            "",
            "MiB",
            "0",
            "0MiB",
            "-1",
            "1.5GiB",
            "12 parsecs",
            "1 PiB",
            "99999999999999999999",
            "9000000TiB",
            "9223372036854775808",
        ] {
            let e = parse_size(bad).unwrap_err();
            assert!(e.to_string().contains("256MiB"), "{e}");
        }
        assert_eq!(parse_size("9223372036854775807").unwrap(), MAX_SIZE);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_duration("1h 30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        for bad in ["", "0s", "0", "soon", "10", "-5s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    /// Found by `fuzz/fuzz_targets/job_file.rs`: `stop_grace = "18446744073709551615s"`
    /// was accepted, then stored as `as_millis() as u64`, a wrapped, other duration.
    #[test]
    fn fuzz_stop_grace_beyond_u64_millis_wrapped_when_stored() {
        let e = parse_kept_duration("18446744073709551615s").unwrap_err();
        assert!(e.to_string().contains("longer than a run can keep"), "{e}");
        assert!(parse_kept_duration("18446744073709552s").is_err());
        // The longest whole number of seconds that fits.
        assert_eq!(
            parse_kept_duration("18446744073709551s").unwrap(),
            Duration::from_secs(18_446_744_073_709_551)
        );
    }

    /// A duration below a millisecond was stored as 0 ms: `timeout = "999us"` would
    /// time every run out at once.
    #[test]
    fn fuzz_sub_millisecond_durations_are_refused() {
        for bad in ["999us", "1ns", "1500us", "1s 1ns"] {
            let e = parse_kept_duration(bad).unwrap_err();
            assert!(e.to_string().contains("whole milliseconds"), "{e}");
        }
        assert_eq!(
            parse_kept_duration("1s 500ms").unwrap(),
            Duration::from_millis(1500)
        );
        assert_eq!(
            parse_kept_duration("1000us").unwrap(),
            Duration::from_millis(1)
        );
    }
}
