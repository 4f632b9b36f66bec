//! Claims and their secrets, against a temporary SQLite store: the values come with the
//! claim only, and a secret that cannot be read ends the attempt through `finish`.

use std::collections::BTreeMap;

use super::*;
use crate::domain::job::Resources;
use crate::domain::ports::{NewRun, RunRecords};
use crate::domain::retry::RetryPolicy;
use crate::domain::run::{ReasonCode, RunStatus};
use crate::domain::secret::{RegistryLogin, Secret, SecretError, SecretRef};
use crate::protocol::ClaimResponseV1;
use crate::store::SqliteStore;

/// Secrets from a fixed table: `DB_PASSWORD` and `REG_PASSWORD` are set, nothing else.
struct FakeSecrets;

#[async_trait]
impl SecretResolver for FakeSecrets {
    async fn resolve(&self, reference: &SecretRef) -> Result<Secret, SecretError> {
        match reference {
            SecretRef::Env(name) if name == "DB_PASSWORD" => Ok(Secret::new("hunter2")),
            SecretRef::Env(name) if name == "REG_PASSWORD" => Ok(Secret::new("s3cr3t-pw")),
            SecretRef::Env(name) => Err(SecretError::EnvUnset(name.clone())),
            SecretRef::File(path) => Err(SecretError::FileUnreadable {
                path: path.clone(),
                reason: "No such file or directory (os error 2)".into(),
            }),
        }
    }

    fn registry_login(&self, registry: &str) -> Option<RegistryLogin> {
        let password = match registry {
            "reg.example:5000" => "REG_PASSWORD",
            "broken.example" => "UNSET_REG_PASSWORD",
            _ => return None,
        };
        Some(RegistryLogin {
            username: "ci".into(),
            password: SecretRef::Env(password.into()),
        })
    }
}

struct Fixture {
    control: LocalControlPlane,
    store: Arc<SqliteStore>,
    _dir: tempfile::TempDir,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(dir.path()).await.unwrap());
    let control = LocalControlPlane::new(
        store.clone(),
        Arc::new(crate::logsink::FileLogSink::new(dir.path().join("logs"))),
        RunEvents::new(),
        Duration::from_secs(30),
        Arc::new(FakeSecrets),
    );
    Fixture {
        control,
        store,
        _dir: dir,
    }
}

fn spec(image: &str, pull: PullPolicy, secret_env: &[(&str, SecretRef)]) -> ResolvedSpec {
    ResolvedSpec {
        logs: Default::default(),
        image: image.into(),
        command: vec![],
        workdir: None,
        user: None,
        env: BTreeMap::from([("PLAIN".to_owned(), "x".to_owned())]),
        secret_env: secret_env
            .iter()
            .map(|(k, r)| ((*k).to_owned(), r.clone()))
            .collect(),
        pull,
        resources: Resources::default(),
        timeout: None,
        stop_grace: Duration::from_secs(1),
        network: "none".into(),
        hardening: Default::default(),
    }
}

/// Accept a run of `spec`; the message a worker would get for it.
async fn accept(f: &Fixture, spec: ResolvedSpec, retry: RetryPolicy) -> RunMessage {
    let run = NewRun {
        id: RunId::new(),
        job: "hello".into(),
        params: BTreeMap::new(),
        spec,
        retry,
        created_at: Utc::now(),
        trigger: crate::domain::run::Trigger::Api,
        admission: crate::domain::schedule::Admission::Unlimited,
        callback: None,
        requester: crate::domain::reply::Requester::default(),
    };
    f.store.insert_run(&run, None).await.unwrap();
    RunMessage {
        run_id: run.id,
        attempt: 1,
    }
}

#[tokio::test]
async fn a_claim_carries_the_values_and_the_stored_spec_the_references() {
    let f = fixture().await;
    let db = SecretRef::Env("DB_PASSWORD".into());
    let message = accept(
        &f,
        spec("reg.example:5000/app:1", PullPolicy::Always, &[("DB", db)]),
        RetryPolicy::default(),
    )
    .await;
    let result = f.control.claim(message, "w1").await.unwrap();
    let ClaimResult::Claimed(claim) = &result else {
        panic!("not claimed: {result:?}");
    };
    assert_eq!(claim.secrets.env["DB"].expose(), "hunter2");
    let login = claim
        .secrets
        .registry
        .as_ref()
        .expect("the registry's login");
    assert_eq!(login.registry, "reg.example:5000");
    assert_eq!(login.username, "ci");
    assert_eq!(login.password.expose(), "s3cr3t-pw");
    assert_eq!(
        claim.spec.secret_env["DB"],
        SecretRef::Env("DB_PASSWORD".into())
    );
    let printed = format!("{result:?}");
    assert!(!printed.contains("hunter2") && !printed.contains("s3cr3t-pw"));

    // On the wire: the values in `secrets`, the spec with the references only; and the
    // worker reads back what was sent.
    let wire = serde_json::to_value(ClaimResponseV1::from(&result)).unwrap();
    assert_eq!(wire["spec"]["secret_env"]["DB"]["from_env"], "DB_PASSWORD");
    assert_eq!(wire["spec"]["env"], serde_json::json!({"PLAIN": "x"}));
    assert_eq!(wire["secrets"]["env"]["DB"], "hunter2");
    assert_eq!(wire["secrets"]["registry"]["password"], "s3cr3t-pw");
    let back: ClaimResponseV1 = serde_json::from_value(wire).unwrap();
    assert!(!format!("{back:?}").contains("hunter2"));
    match ClaimResult::try_from(back).unwrap() {
        ClaimResult::Claimed(back) => assert_eq!(back.secrets, claim.secrets),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn no_login_for_a_job_that_never_pulls_or_a_registry_without_one() {
    let f = fixture().await;
    for (image, pull) in [
        ("reg.example:5000/app:1", PullPolicy::Never),
        ("other.example/app:1", PullPolicy::Always),
        ("busybox", PullPolicy::IfNotPresent),
    ] {
        let message = accept(&f, spec(image, pull, &[]), RetryPolicy::default()).await;
        match f.control.claim(message, "w1").await.unwrap() {
            ClaimResult::Claimed(claim) => assert!(claim.secrets.is_empty(), "{image}"),
            other => panic!("{image}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_secret_that_cannot_be_read_fails_the_run_naming_the_variable() {
    let f = fixture().await;
    let message = accept(
        &f,
        spec(
            "img:1",
            PullPolicy::Never,
            &[
                ("DB", SecretRef::Env("DB_PASSWORD".into())),
                ("TOKEN", SecretRef::Env("NOT_SET_ANYWHERE".into())),
            ],
        ),
        RetryPolicy::default(),
    )
    .await;
    let result = f.control.claim(message, "w1").await.unwrap();
    assert!(
        matches!(
            result,
            ClaimResult::NotClaimable {
                status: RunStatus::Failed,
                attempt: 1
            }
        ),
        "{result:?}"
    );
    let run = f.store.get_run(message.run_id).await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Failed);
    assert_eq!(run.reason_code, Some(ReasonCode::SecretUnavailable));
    assert_eq!(
        run.reason.as_deref(),
        Some("secret_unavailable: env.TOKEN: environment variable NOT_SET_ANYWHERE is not set")
    );
    assert_eq!(run.exit_code, None);
    assert_eq!(run.attempts.len(), 1);
    assert_eq!(
        run.attempts[0].reason_code,
        Some(ReasonCode::SecretUnavailable)
    );
    // A redelivery finds it final: dropped, not claimed again.
    let again = f.control.claim(message, "w2").await.unwrap();
    assert!(
        matches!(again, ClaimResult::NotClaimable { .. }),
        "{again:?}"
    );
}

#[tokio::test]
async fn a_registry_password_that_cannot_be_read_fails_the_run_naming_the_registry() {
    let f = fixture().await;
    let message = accept(
        &f,
        spec("broken.example/app:1", PullPolicy::IfNotPresent, &[]),
        RetryPolicy::default(),
    )
    .await;
    f.control.claim(message, "w1").await.unwrap();
    let run = f.store.get_run(message.run_id).await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Failed);
    assert_eq!(
        run.reason.as_deref(),
        Some(
            "secret_unavailable: the password of registry broken.example: \
             environment variable UNSET_REG_PASSWORD is not set"
        )
    );
}

#[tokio::test]
async fn a_job_may_retry_an_unreadable_secret_by_its_rules() {
    let f = fixture().await;
    let retry = RetryPolicy {
        max_attempts: 2,
        on: [ReasonCode::SecretUnavailable].into(),
        ..RetryPolicy::default()
    };
    let file = SecretRef::File("/run/secrets/not-yet".into());
    let message = accept(&f, spec("img:1", PullPolicy::Never, &[("DB", file)]), retry).await;
    let result = f.control.claim(message, "w1").await.unwrap();
    assert!(
        matches!(
            result,
            ClaimResult::NotClaimable {
                status: RunStatus::Queued,
                attempt: 1
            }
        ),
        "{result:?}"
    );
    let run = f.store.get_run(message.run_id).await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Queued);
    assert_eq!(
        run.attempts[0].reason.as_deref(),
        Some(
            "secret_unavailable: env.DB: cannot read file /run/secrets/not-yet: \
             No such file or directory (os error 2)"
        )
    );
}
