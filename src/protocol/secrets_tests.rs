//! The formats secrets touch: the stored spec keeps references only, the claim answer
//! carries the values (and old readers and writers on either side still understand
//! each other), and no body's `Debug` prints a value.

use std::collections::BTreeMap;
use std::time::Duration;

use super::*;
use crate::domain::job::{PullPolicy, ResolvedSpec, Resources};
use crate::domain::ports::{Claim, ClaimResult, Lease};
use crate::domain::secret::{ClaimSecrets, RegistryCredentials};

fn spec_with_secrets() -> ResolvedSpec {
    ResolvedSpec {
        logs: Default::default(),
        image: "reg.example:5000/app:1".into(),
        command: vec![],
        workdir: None,
        user: None,
        env: BTreeMap::from([("PLAIN".to_owned(), "x".to_owned())]),
        secret_env: BTreeMap::from([
            ("DB".to_owned(), SecretRef::Env("DB_PASSWORD".into())),
            ("KEY".to_owned(), SecretRef::File("/run/secrets/key".into())),
        ]),
        pull: PullPolicy::Always,
        resources: Resources::default(),
        timeout: None,
        stop_grace: Duration::from_secs(1),
        network: "none".into(),
        hardening: Default::default(),
    }
}

#[test]
fn the_stored_spec_keeps_references() {
    let spec = spec_with_secrets();
    let json = serde_json::to_string(&SpecV1::from(&spec)).unwrap();
    assert!(
        json.contains(
            r#""secret_env":{"DB":{"from_env":"DB_PASSWORD"},"KEY":{"from_file":"/run/secrets/key"}}"#
        ),
        "{json}"
    );
    let back: SpecV1 = serde_json::from_str(&json).unwrap();
    assert_eq!(ResolvedSpec::try_from(back).unwrap(), spec);
    // A spec stored before secrets existed reads, and one without any writes no field.
    let old = r#"{"image":"img:1","command":[],"env":{},"pull":"never","stop_grace_ms":1000,"network":"none"}"#;
    let old: SpecV1 = serde_json::from_str(old).unwrap();
    assert!(old.secret_env.is_empty());
    assert!(!serde_json::to_string(&old).unwrap().contains("secret_env"));
    // A reference is one thing or the other.
    for bad in [
        r#"{"from_env":"A","from_file":"/b"}"#,
        r#"{"from_vault":"a"}"#,
        r#""plain""#,
    ] {
        assert!(serde_json::from_str::<SecretRefV1>(bad).is_err(), "{bad}");
    }
}

fn claimed(secrets: ClaimSecrets) -> ClaimResult {
    ClaimResult::Claimed(Box::new(Claim {
        lease: Lease {
            run_id: "01jd0000000000000000000000".parse().unwrap(),
            attempt: 1,
            epoch: 2,
        },
        job: "hello".into(),
        spec: spec_with_secrets(),
        lease_ttl: Duration::from_secs(30),
        secrets,
    }))
}

#[test]
fn the_claim_answer_carries_the_values_both_ways() {
    let secrets = ClaimSecrets {
        env: BTreeMap::from([
            ("DB".to_owned(), Secret::new("hunter2")),
            ("KEY".to_owned(), Secret::new("k3y")),
        ]),
        registry: Some(RegistryCredentials {
            registry: "reg.example:5000".into(),
            username: "ci".into(),
            password: Secret::new("s3cr3t-pw"),
        }),
    };
    let sent = ClaimResponseV1::from(&claimed(secrets.clone()));
    let printed = format!("{sent:?}");
    for value in ["hunter2", "k3y", "s3cr3t-pw"] {
        assert!(!printed.contains(value), "{printed}");
    }
    let json = serde_json::to_value(&sent).unwrap();
    assert_eq!(
        json["secrets"],
        serde_json::json!({
            "env": {"DB": "hunter2", "KEY": "k3y"},
            "registry": {"registry": "reg.example:5000", "username": "ci", "password": "s3cr3t-pw"}
        })
    );
    let back: ClaimResponseV1 = serde_json::from_value(json).unwrap();
    match ClaimResult::try_from(back).unwrap() {
        ClaimResult::Claimed(claim) => assert_eq!(claim.secrets, secrets),
        other => panic!("{other:?}"),
    }
    // Nothing to hand over: no field at all.
    let none =
        serde_json::to_value(ClaimResponseV1::from(&claimed(ClaimSecrets::default()))).unwrap();
    assert!(none.get("secrets").is_none(), "{none}");
}

#[test]
fn an_answer_from_a_server_before_secrets_still_reads() {
    let old = r#"{"result":"claimed","lease":{"run_id":"01jd0000000000000000000000","attempt":1,"epoch":3},
        "job":"hello","spec":{"image":"img:1","command":[],"env":{},"pull":"never",
        "stop_grace_ms":1000,"network":"none"},"lease_ttl_ms":30000}"#;
    let answer: ClaimResponseV1 = serde_json::from_str(old).unwrap();
    match ClaimResult::try_from(answer).unwrap() {
        ClaimResult::Claimed(claim) => assert!(claim.secrets.is_empty()),
        other => panic!("{other:?}"),
    }
}

#[test]
fn outcomes_with_the_new_kinds_round_trip_and_old_ones_read() {
    for outcome in [
        Outcome::ImagePullFailed {
            image: "r.example/x:1".into(),
            message: "unauthorized: authentication required".into(),
            unauthorized: true,
        },
        Outcome::ImagePullFailed {
            image: "r.example/x:1".into(),
            message: "connection refused".into(),
            unauthorized: false,
        },
        Outcome::SecretUnavailable {
            message: "env.DB: environment variable DB_PASSWORD is not set".into(),
        },
    ] {
        let json = serde_json::to_string(&OutcomeV1::from(&outcome)).unwrap();
        let back: OutcomeV1 = serde_json::from_str(&json).unwrap();
        assert_eq!(Outcome::from(back), outcome, "{json}");
    }
    // A worker from before the flag: not unauthorized; and a plain pull failure is
    // written as before.
    let old = r#"{"kind":"image_pull_failed","image":"x","message":"m"}"#;
    let back: OutcomeV1 = serde_json::from_str(old).unwrap();
    assert!(matches!(
        Outcome::from(back),
        Outcome::ImagePullFailed {
            unauthorized: false,
            ..
        }
    ));
    let plain = OutcomeV1::from(&Outcome::ImagePullFailed {
        image: "x".into(),
        message: "m".into(),
        unauthorized: false,
    });
    assert_eq!(serde_json::to_string(&plain).unwrap(), old);
}
