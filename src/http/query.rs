//! Query string numbers that saturate instead of refusing: `?wait=`, `?next=`, `?limit=`
//! of the slots and a log's `?offset=` are each clamped by the server anyway, so a count
//! too large for a `u64` means "as many as allowed", not a 400. Anything but digits is
//! still refused. The OpenAPI document says so: a non-negative integer, no upper bound.

use serde::de::{self, Deserializer, Visitor};
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};

/// An optional count: ASCII digits, saturating at `u64::MAX`.
pub(super) fn saturating<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<u64>,
    T: Bounded,
{
    struct Digits;
    impl Visitor<'_> for Digits {
        type Value = u64;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a non-negative integer")
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
            if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                return Err(E::invalid_value(de::Unexpected::Str(v), &self));
            }
            // Only digits: the one way to fail is overflow.
            Ok(v.parse().unwrap_or(u64::MAX))
        }
    }
    let n = deserializer.deserialize_str(Digits)?;
    Ok(Some(T::try_from(n).unwrap_or(T::MAX)))
}

/// The largest value of a count type, where a larger one saturates.
pub(super) trait Bounded {
    const MAX: Self;
}

impl Bounded for u64 {
    const MAX: u64 = u64::MAX;
}

impl Bounded for u32 {
    const MAX: u32 = u32::MAX;
}

impl Bounded for usize {
    const MAX: usize = usize::MAX;
}

/// The schema of a [`saturating`] count: any non-negative integer.
pub(super) fn count() -> Schema {
    ObjectBuilder::new()
        .schema_type(Type::Integer)
        .minimum(Some(0))
        .into()
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    #[derive(Deserialize)]
    struct Q {
        #[serde(default, deserialize_with = "super::saturating")]
        n: Option<u32>,
    }

    fn parse(query: &str) -> Result<Option<u32>, String> {
        let uri: axum::http::Uri = format!("/x?{query}")
            .parse()
            .map_err(|_| "uri".to_owned())?;
        axum::extract::Query::<Q>::try_from_uri(&uri)
            .map(|q| q.0.n)
            .map_err(|e| e.body_text())
    }

    #[test]
    fn counts_saturate_and_only_digits_pass() {
        assert_eq!(parse(""), Ok(None));
        assert_eq!(parse("n=7"), Ok(Some(7)));
        assert_eq!(parse("n=4294967296"), Ok(Some(u32::MAX)));
        assert_eq!(parse("n=7196059416689795661824"), Ok(Some(u32::MAX)));
        for bad in ["n=", "n=-1", "n=1.5", "n=%2B1", "n=x"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
