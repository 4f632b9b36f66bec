//! Standard Webhooks signatures: `whsec_` secrets and the `webhook-signature` header.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// One signing key, from its `whsec_<base64>` form.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BadSecret {
    #[error("a callback secret must start with whsec_")]
    Prefix,
    #[error("a callback secret's part after whsec_ must be base64: {0}")]
    Base64(String),
    #[error("a callback secret's key is empty")]
    Empty,
}

impl std::str::FromStr for Secret {
    type Err = BadSecret;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let encoded = s.trim().strip_prefix("whsec_").ok_or(BadSecret::Prefix)?;
        let key = STANDARD
            .decode(encoded)
            .map_err(|e| BadSecret::Base64(e.to_string()))?;
        if key.is_empty() {
            return Err(BadSecret::Empty);
        }
        Ok(Secret(key))
    }
}

/// The `webhook-signature` header value: `v1,<base64 HMAC-SHA256>` of
/// `"{id}.{timestamp}.{body}"` for each secret, separated by spaces (a receiver holding
/// any one of them accepts it, so secrets can be rotated).
pub fn signature(secrets: &[Secret], id: &str, timestamp: i64, body: &[u8]) -> String {
    secrets
        .iter()
        .map(|secret| {
            // HMAC takes a key of any length; this cannot fail.
            let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&secret.0)
                .unwrap_or_else(|_| unreachable!("HMAC accepts every key length"));
            mac.update(id.as_bytes());
            mac.update(b".");
            mac.update(timestamp.to_string().as_bytes());
            mac.update(b".");
            mac.update(body);
            format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Computed independently with
    /// `printf '%s' 'msg_p5jXN8AQM9LWM0D4loKWxJek.1614265330.{"test": 2432232314}' |
    ///  openssl dgst -sha256 -mac HMAC -macopt hexkey:<hex of the base64-decoded key> -binary | base64`
    /// (and it is the example in the Standard Webhooks specification).
    #[test]
    fn signs_like_an_independent_implementation() {
        let secret: Secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".parse().unwrap();
        let sig = signature(
            &[secret],
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn each_secret_signs_for_rotation() {
        let a: Secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".parse().unwrap();
        let b: Secret = "whsec_c2Vjb25k".parse().unwrap();
        let both = signature(&[a.clone(), b.clone()], "msg_1", 1, b"{}");
        let parts: Vec<&str> = both.split(' ').collect();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0], signature(&[a], "msg_1", 1, b"{}"));
        assert_eq!(parts[1], signature(&[b], "msg_1", 1, b"{}"));
    }

    #[test]
    fn secrets_must_be_whsec_base64() {
        assert_eq!("abc".parse::<Secret>().err(), Some(BadSecret::Prefix));
        assert!(matches!(
            "whsec_not*base64".parse::<Secret>(),
            Err(BadSecret::Base64(_))
        ));
        assert_eq!("whsec_".parse::<Secret>().err(), Some(BadSecret::Empty));
    }
}
