//! Signatures here were made by independent implementations: `openssl dgst -sha256
//! -hmac` for GitHub, and the Python `standardwebhooks` package (whose output matches
//! the example in the Standard Webhooks spec) for Standard Webhooks.

use super::*;

const BODY: &str = r#"{"ref":"refs/heads/main"}"#;
const GH_SECRET: &str = "It's a Secret to Everybody";
/// `openssl dgst -sha256 -hmac "It's a Secret to Everybody"` of BODY.
const GH_SIG: &str = "sha256=6a42699496d8c4fb346af1c930df527931a321e28ada69dbc5ee82f438517fd2";

const STD_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const STD_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
const STD_TS: i64 = 1_614_265_330;
const STD_BODY: &str = r#"{"test": 2432232314}"#;
const STD_SIG: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

fn spec(scheme: SignatureScheme, secrets: &[&str]) -> WebhookSpec {
    WebhookSpec {
        scheme,
        secrets: secrets
            .iter()
            .map(|s| Secret::parse(scheme, s).unwrap())
            .collect(),
        params_from: BTreeMap::new(),
    }
}

fn standard() -> SignatureScheme {
    SignatureScheme::Standard {
        tolerance: DEFAULT_TOLERANCE,
    }
}

fn headers<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<&'a str> {
    move |name| pairs.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
}

#[test]
fn github_good_signature_with_delivery_id() {
    let s = spec(SignatureScheme::GitHub, &[GH_SECRET]);
    let h = [
        ("x-hub-signature-256", GH_SIG),
        ("x-github-delivery", "d-1"),
    ];
    let v = s.verify(headers(&h), BODY.as_bytes(), 0).unwrap();
    assert_eq!(v.delivery_id.as_deref(), Some("d-1"));
    let h = [("x-hub-signature-256", GH_SIG)];
    let v = s.verify(headers(&h), BODY.as_bytes(), 0).unwrap();
    assert_eq!(v.delivery_id, None);
}

#[test]
fn github_upper_case_hex_is_accepted() {
    let s = spec(SignatureScheme::GitHub, &[GH_SECRET]);
    let upper = format!("sha256={}", GH_SIG["sha256=".len()..].to_uppercase());
    let h = [("x-hub-signature-256", upper.as_str())];
    assert!(s.verify(headers(&h), BODY.as_bytes(), 0).is_ok());
}

#[test]
fn github_wrong_secret_tampered_body_and_rotation() {
    let h = [("x-hub-signature-256", GH_SIG)];
    let wrong = spec(SignatureScheme::GitHub, &["not it"]);
    assert_eq!(
        wrong.verify(headers(&h), BODY.as_bytes(), 0),
        Err(SignatureError::Mismatch)
    );
    let right = spec(SignatureScheme::GitHub, &[GH_SECRET]);
    assert_eq!(
        right.verify(headers(&h), br#"{"ref":"refs/heads/evil"}"#, 0),
        Err(SignatureError::Mismatch)
    );
    // The signing secret is the second (old) one while a rotation is under way.
    let rotated = spec(SignatureScheme::GitHub, &["new secret", GH_SECRET]);
    assert!(rotated.verify(headers(&h), BODY.as_bytes(), 0).is_ok());
}

#[test]
fn github_missing_and_malformed_headers() {
    let s = spec(SignatureScheme::GitHub, &[GH_SECRET]);
    assert_eq!(
        s.verify(headers(&[]), BODY.as_bytes(), 0),
        Err(SignatureError::MissingHeader("x-hub-signature-256"))
    );
    for bad in [
        "6a42699496d8c4fb346af1c930df527931a321e28ada69dbc5ee82f438517fd2",
        "sha1=6a42699496d8c4fb346af1c930df527931a321e28ada69dbc5ee82f438517fd2",
        "sha256=6a42",
        "sha256=zz42699496d8c4fb346af1c930df527931a321e28ada69dbc5ee82f438517fd2",
        "sha256=é42699496d8c4fb346af1c930df527931a321e28ada69dbc5ee82f438517fd",
    ] {
        let h = [("x-hub-signature-256", bad)];
        assert!(
            matches!(
                s.verify(headers(&h), BODY.as_bytes(), 0),
                Err(SignatureError::Malformed { .. })
            ),
            "{bad}"
        );
    }
}

fn std_headers(ts: &str, sig: &str) -> Vec<(&'static str, String)> {
    vec![
        ("webhook-id", STD_ID.to_owned()),
        ("webhook-timestamp", ts.to_owned()),
        ("webhook-signature", sig.to_owned()),
    ]
}

fn verify_std(
    s: &WebhookSpec,
    h: &[(&'static str, String)],
    body: &str,
    now: i64,
) -> Result<Verified, SignatureError> {
    s.verify(
        |name| h.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str()),
        body.as_bytes(),
        now,
    )
}

#[test]
fn standard_good_signature_among_several() {
    let s = spec(standard(), &[STD_SECRET]);
    let ts = STD_TS.to_string();
    let v = verify_std(&s, &std_headers(&ts, STD_SIG), STD_BODY, STD_TS).unwrap();
    assert_eq!(v.delivery_id.as_deref(), Some(STD_ID));
    // Other versions and other signatures in the list are skipped.
    let many = format!("v1a,abcd v1,AAAA {STD_SIG}");
    assert!(verify_std(&s, &std_headers(&ts, &many), STD_BODY, STD_TS + 60).is_ok());
    // A secret given without the `whsec_` prefix is the same key.
    let bare = spec(standard(), &[&STD_SECRET["whsec_".len()..]]);
    assert!(verify_std(&bare, &std_headers(&ts, STD_SIG), STD_BODY, STD_TS).is_ok());
}

#[test]
fn standard_wrong_secret_tampered_body_and_rotation() {
    let ts = STD_TS.to_string();
    let h = std_headers(&ts, STD_SIG);
    let other = "whsec_c2VjcmV0LW51bWJlci10d28=";
    let wrong = spec(standard(), &[other]);
    assert_eq!(
        verify_std(&wrong, &h, STD_BODY, STD_TS),
        Err(SignatureError::Mismatch)
    );
    let right = spec(standard(), &[STD_SECRET]);
    assert_eq!(
        verify_std(&right, &h, r#"{"test": 2432232315}"#, STD_TS),
        Err(SignatureError::Mismatch)
    );
    let rotated = spec(standard(), &[other, STD_SECRET]);
    assert!(verify_std(&rotated, &h, STD_BODY, STD_TS).is_ok());
    // The id and timestamp are signed too.
    let mut moved = h.clone();
    moved[0].1 = "msg_other".to_owned();
    assert_eq!(
        verify_std(&right, &moved, STD_BODY, STD_TS),
        Err(SignatureError::Mismatch)
    );
}

#[test]
fn standard_stale_and_future_timestamps_are_refused() {
    let s = spec(standard(), &[STD_SECRET]);
    let ts = STD_TS.to_string();
    let h = std_headers(&ts, STD_SIG);
    assert!(verify_std(&s, &h, STD_BODY, STD_TS + 300).is_ok());
    assert!(verify_std(&s, &h, STD_BODY, STD_TS - 300).is_ok());
    assert_eq!(
        verify_std(&s, &h, STD_BODY, STD_TS + 301),
        Err(SignatureError::OutsideTolerance {
            timestamp: STD_TS,
            skew_secs: 301,
            tolerance_secs: 300
        })
    );
    assert!(matches!(
        verify_std(&s, &h, STD_BODY, STD_TS - 301),
        Err(SignatureError::OutsideTolerance {
            skew_secs: -301,
            ..
        })
    ));
    let tight = WebhookSpec {
        scheme: SignatureScheme::Standard {
            tolerance: Duration::from_secs(10),
        },
        ..s
    };
    assert!(verify_std(&tight, &h, STD_BODY, STD_TS + 11).is_err());
}

#[test]
fn standard_missing_and_malformed_headers() {
    let s = spec(standard(), &[STD_SECRET]);
    let ts = STD_TS.to_string();
    for (i, name) in ["webhook-id", "webhook-timestamp", "webhook-signature"]
        .into_iter()
        .enumerate()
    {
        let mut h = std_headers(&ts, STD_SIG);
        h.remove(i);
        assert_eq!(
            verify_std(&s, &h, STD_BODY, STD_TS),
            Err(SignatureError::MissingHeader(name))
        );
    }
    let h = std_headers("yesterday", STD_SIG);
    assert!(matches!(
        verify_std(&s, &h, STD_BODY, STD_TS),
        Err(SignatureError::Malformed {
            header: "webhook-timestamp",
            ..
        })
    ));
    for bad in [
        "g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
        "v1,***",
        "v2,abc",
    ] {
        let h = std_headers(&ts, bad);
        assert!(
            matches!(
                verify_std(&s, &h, STD_BODY, STD_TS),
                Err(SignatureError::Malformed {
                    header: "webhook-signature",
                    ..
                })
            ),
            "{bad}"
        );
    }
}

#[test]
fn secrets_parse_and_never_print() {
    assert_eq!(
        Secret::parse(SignatureScheme::GitHub, ""),
        Err(SecretError::Empty)
    );
    assert!(matches!(
        Secret::parse(standard(), "whsec_not base64!"),
        Err(SecretError::NotBase64(_))
    ));
    assert_eq!(Secret::parse(standard(), "whsec_"), Err(SecretError::Empty));
    let s = spec(SignatureScheme::GitHub, &[GH_SECRET]);
    let shown = format!("{s:?}");
    assert!(!shown.contains("Secret to"), "{shown}");
    assert!(shown.contains("<redacted>"));
}
