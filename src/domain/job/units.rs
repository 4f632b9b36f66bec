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
}
