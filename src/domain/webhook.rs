//! Inbound webhooks: a job's `[webhook]` settings and the check of a delivery's
//! signature (GitHub's `X-Hub-Signature-256` or Standard Webhooks). Pure: the caller
//! hands in the headers, the raw body and the current time.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The default `tolerance` of Standard Webhooks timestamps.
pub const DEFAULT_TOLERANCE: Duration = Duration::from_secs(5 * 60);

/// How deliveries are signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureScheme {
    /// `X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the body>`; delivery id in
    /// `X-GitHub-Delivery`.
    GitHub,
    /// Standard Webhooks: `webhook-id`, `webhook-timestamp`, `webhook-signature`
    /// (`v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`, space separated).
    Standard { tolerance: Duration },
}

/// An HMAC key. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("is empty")]
    Empty,
    #[error("is not `whsec_` followed by base64: {0}")]
    NotBase64(String),
}

impl Secret {
    /// A secret for `scheme` from the text of its environment variable: GitHub uses the
    /// text's bytes; Standard Webhooks uses the base64 key after an optional `whsec_`.
    pub fn parse(scheme: SignatureScheme, text: &str) -> Result<Self, SecretError> {
        if text.is_empty() {
            return Err(SecretError::Empty);
        }
        match scheme {
            SignatureScheme::GitHub => Ok(Secret(text.as_bytes().to_vec())),
            SignatureScheme::Standard { .. } => {
                let encoded = text.strip_prefix("whsec_").unwrap_or(text);
                let key = BASE64
                    .decode(encoded)
                    .map_err(|e| SecretError::NotBase64(e.to_string()))?;
                if key.is_empty() {
                    return Err(SecretError::Empty);
                }
                Ok(Secret(key))
            }
        }
    }

    fn mac(&self) -> HmacSha256 {
        // HMAC takes a key of any length, so this never fails.
        <HmacSha256 as Mac>::new_from_slice(&self.0).unwrap_or_else(|_| unreachable!())
    }
}

/// A job's `[webhook]` table, with the secrets read from the environment at load.
#[derive(Debug, Clone, PartialEq)]
pub struct WebhookSpec {
    pub scheme: SignatureScheme,
    /// Any of these verifies a delivery (several while a secret is rotated).
    pub secrets: Vec<Secret>,
    /// Param name → JSON Pointer into the delivery's body.
    pub params_from: BTreeMap<String, String>,
}

/// Why a delivery was refused. Logged; the caller only hears "missing or invalid".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("header `{0}` is missing")]
    MissingHeader(&'static str),
    #[error("header `{header}` is malformed: {why}")]
    Malformed { header: &'static str, why: String },
    #[error("no signature matches any configured secret")]
    Mismatch,
    #[error(
        "timestamp {timestamp} is {skew_secs} s from now, beyond the tolerance of {tolerance_secs} s"
    )]
    OutsideTolerance {
        timestamp: i64,
        skew_secs: i64,
        tolerance_secs: u64,
    },
}

/// A verified delivery: its id (for replay detection), if the sender gave one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub delivery_id: Option<String>,
}

impl WebhookSpec {
    /// Check a delivery's signature. `header` looks a header up by lower-case name
    /// (`None` when absent or not text); `now_unix` is the current time in seconds.
    pub fn verify<'h>(
        &self,
        header: impl Fn(&str) -> Option<&'h str>,
        body: &[u8],
        now_unix: i64,
    ) -> Result<Verified, SignatureError> {
        match self.scheme {
            SignatureScheme::GitHub => verify_github(&self.secrets, &header, body),
            SignatureScheme::Standard { tolerance } => {
                verify_standard(&self.secrets, &header, body, now_unix, tolerance)
            }
        }
    }
}

fn present<'h>(
    header: &impl Fn(&str) -> Option<&'h str>,
    name: &'static str,
) -> Result<&'h str, SignatureError> {
    header(name)
        .filter(|v| !v.trim().is_empty())
        .map(str::trim)
        .ok_or(SignatureError::MissingHeader(name))
}

fn verify_github<'h>(
    secrets: &[Secret],
    header: &impl Fn(&str) -> Option<&'h str>,
    body: &[u8],
) -> Result<Verified, SignatureError> {
    const NAME: &str = "x-hub-signature-256";
    let value = present(header, NAME)?;
    let malformed = |why: &str| SignatureError::Malformed {
        header: NAME,
        why: why.to_owned(),
    };
    let hex = value
        .strip_prefix("sha256=")
        .ok_or_else(|| malformed("it does not start with `sha256=`"))?;
    let expected = decode_hex(hex).ok_or_else(|| malformed("the digest is not 64 hex digits"))?;
    let matches = secrets.iter().any(|secret| {
        let mut mac = secret.mac();
        mac.update(body);
        mac.verify_slice(&expected).is_ok()
    });
    if !matches {
        return Err(SignatureError::Mismatch);
    }
    let delivery_id = header("x-github-delivery")
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_owned);
    Ok(Verified { delivery_id })
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect()
}

fn verify_standard<'h>(
    secrets: &[Secret],
    header: &impl Fn(&str) -> Option<&'h str>,
    body: &[u8],
    now_unix: i64,
    tolerance: Duration,
) -> Result<Verified, SignatureError> {
    let id = present(header, "webhook-id")?;
    let timestamp_text = present(header, "webhook-timestamp")?;
    let signatures = present(header, "webhook-signature")?;
    let timestamp: i64 = timestamp_text
        .parse()
        .map_err(|_| SignatureError::Malformed {
            header: "webhook-timestamp",
            why: format!("{timestamp_text:?} is not whole unix seconds"),
        })?;
    let skew = now_unix.saturating_sub(timestamp);
    let tolerance_secs = tolerance.as_secs();
    if skew.unsigned_abs() > tolerance_secs {
        return Err(SignatureError::OutsideTolerance {
            timestamp,
            skew_secs: skew,
            tolerance_secs,
        });
    }
    // Versions other than v1 (e.g. v1a, asymmetric) are skipped, as the spec says.
    let candidates: Vec<Vec<u8>> = signatures
        .split(' ')
        .filter_map(|s| s.strip_prefix("v1,"))
        .filter_map(|b64| BASE64.decode(b64).ok())
        .collect();
    if candidates.is_empty() {
        return Err(SignatureError::Malformed {
            header: "webhook-signature",
            why: "it holds no `v1,<base64>` signature".to_owned(),
        });
    }
    let matches = secrets.iter().any(|secret| {
        let mut mac = secret.mac();
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp_text.as_bytes());
        mac.update(b".");
        mac.update(body);
        candidates
            .iter()
            .any(|sig| mac.clone().verify_slice(sig).is_ok())
    });
    if !matches {
        return Err(SignatureError::Mismatch);
    }
    Ok(Verified {
        delivery_id: Some(id.to_owned()),
    })
}

#[cfg(test)]
mod tests;
