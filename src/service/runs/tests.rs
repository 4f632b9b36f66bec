//! `Runs::prepare` and `Runs::fire_slot` on a real (temporary) SQLite store.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{NaiveDate, TimeZone, Utc};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::domain::job::{JobName, PullPolicy, Resources};
use crate::domain::ports::Schedules;
use crate::logsink::FileLogSink;
use crate::store::SqliteStore;

struct Jobs(Vec<Arc<JobSpec>>);

impl JobLookup for Jobs {
    fn job(&self, name: &str) -> Option<Arc<JobSpec>> {
        self.0.iter().find(|j| j.name.as_str() == name).cloned()
    }
    fn jobs(&self) -> Vec<Arc<JobSpec>> {
        self.0.clone()
    }
}

fn job(name: &str, max_concurrent: Option<u32>) -> Arc<JobSpec> {
    Arc::new(JobSpec {
        logs: Default::default(),
        name: JobName::parse(name).unwrap(),
        description: None,
        image: "img:1".to_owned(),
        command: vec!["true".into()],
        workdir: None,
        user: None,
        env: BTreeMap::from([("PLAIN".to_owned(), "x".to_owned())]),
        secret_env: BTreeMap::new(),
        pull: PullPolicy::Never,
        resources: Resources::default(),
        timeout: None,
        stop_grace: Duration::from_secs(1),
        network: "none".into(),
        hardening: Default::default(),
        params: BTreeMap::new(),
        schedules: Vec::new(),
        max_concurrent,
        retry: Default::default(),
        webhook: None,
        callback: None,
    })
}

async fn runs() -> (Runs, Arc<SqliteStore>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(dir.path()).await.unwrap());
    let jobs = Jobs(vec![job("plain", None), job("single", Some(1))]);
    let runs = Runs::new(
        Arc::new(jobs),
        store.clone(),
        Arc::new(FileLogSink::new(dir.path().join("logs"))),
        RunEvents::new(),
        Arc::new(Notify::new()),
        CancellationToken::new(),
    );
    (runs, store, dir)
}

fn nightly() -> Trigger {
    Trigger::Schedule {
        schedule: "nightly".to_owned(),
        slot: Utc.with_ymd_and_hms(2026, 3, 1, 1, 0, 0).unwrap(),
        business_date: NaiveDate::from_ymd_opt(2026, 2, 27).unwrap(),
        local_time: "2026-03-01T02:00:00+01:00".to_owned(),
    }
}

#[tokio::test]
async fn prepare_sets_the_trigger_env_and_the_admission_rule() {
    let (runs, _store, _dir) = runs().await;
    let api = runs
        .prepare("plain", BTreeMap::new(), Trigger::Api)
        .unwrap();
    assert_eq!(api.admission, Admission::Unlimited);
    assert_eq!(api.trigger, Trigger::Api);
    let tasuki: Vec<_> = api
        .spec
        .env
        .keys()
        .filter(|k| k.starts_with("TASUKI_"))
        .collect();
    assert_eq!(tasuki, ["TASUKI_TRIGGER"]);
    assert_eq!(api.spec.env["TASUKI_TRIGGER"], "api");
    assert_eq!(api.spec.env["PLAIN"], "x");

    let scheduled = runs.prepare("single", BTreeMap::new(), nightly()).unwrap();
    assert_eq!(scheduled.admission, Admission::AtMost(1));
    assert_eq!(scheduled.trigger, nightly());
    let env = &scheduled.spec.env;
    assert_eq!(env["TASUKI_TRIGGER"], "schedule");
    assert_eq!(env["TASUKI_SCHEDULE"], "nightly");
    assert_eq!(env["TASUKI_SCHEDULED_TIME"], "2026-03-01T02:00:00+01:00");
    assert_eq!(env["TASUKI_BUSINESS_DATE"], "2026-02-27");

    assert!(matches!(
        runs.prepare("nope", BTreeMap::new(), Trigger::Api),
        Err(AcceptError::UnknownJob(_))
    ));
}

#[tokio::test]
async fn a_fired_slot_is_a_run_with_its_trigger_and_cancelled_others_are_announced() {
    let (runs, store, _dir) = runs().await;
    let earlier = runs
        .accept("plain", BTreeMap::new(), None, None)
        .await
        .unwrap()
        .into_run();
    assert_eq!(earlier.trigger, Trigger::Api);
    let mut events = runs.events().subscribe();
    let key = SlotKey {
        job: "plain".to_owned(),
        schedule: "nightly".to_owned(),
        nominal: Utc.with_ymd_and_hms(2026, 3, 1, 1, 0, 0).unwrap(),
    };
    let day = NaiveDate::from_ymd_opt(2026, 2, 27).unwrap();
    let new = runs.prepare("plain", BTreeMap::new(), nightly()).unwrap();
    let id = new.id;
    let fired = runs
        .fire_slot(&key, key.nominal, day, new, Overlap::CancelOther)
        .await
        .unwrap();
    assert_eq!(fired, FireResult::Fired(id));
    let event = events.recv().await.unwrap();
    assert_eq!(event.run_id, earlier.id);
    assert_eq!(event.kind, RunEventKind::Status);
    let earlier = runs.get(earlier.id).await.unwrap().unwrap();
    assert_eq!(earlier.status, RunStatus::Cancelled);
    let run = runs.get(id).await.unwrap().unwrap();
    assert_eq!(run.trigger, nightly());
    assert_eq!(run.status, RunStatus::Queued);

    // The same slot again is already accounted for, and stores nothing.
    let again = runs.prepare("plain", BTreeMap::new(), nightly()).unwrap();
    let again_id = again.id;
    let result = runs
        .fire_slot(&key, key.nominal, day, again, Overlap::Allow)
        .await
        .unwrap();
    assert_eq!(
        result,
        FireResult::AlreadyAccounted(crate::domain::ports::SlotOutcome::Fired(id))
    );
    assert!(runs.get(again_id).await.unwrap().is_none());
    let slots = store.slots("plain", None, 10).await.unwrap();
    assert_eq!(slots.len(), 1);
    assert_eq!(slots[0].business_date, day);
}

#[tokio::test]
async fn params_over_the_limits_are_refused_before_the_jobs_rules_and_store_nothing() {
    let (runs, _store, _dir) = runs().await;
    let runs = runs.with_param_limits(ParamLimits {
        max_params: 1,
        max_param_bytes: 8,
    });
    // "plain" declares no params: within the limits, the job's own rule refuses them.
    let one = BTreeMap::from([("a".to_owned(), "x".to_owned())]);
    assert!(matches!(
        runs.accept("plain", one, None, None).await,
        Err(AcceptError::Params(_))
    ));
    let two = BTreeMap::from([
        ("a".to_owned(), "x".to_owned()),
        ("b".to_owned(), "y".to_owned()),
    ]);
    assert!(matches!(
        runs.accept("plain", two, None, None).await,
        Err(AcceptError::Limit(ParamLimitError::TooMany {
            count: 2,
            max: 1
        }))
    ));
    let large = BTreeMap::from([("a".to_owned(), "123456789".to_owned())]);
    let e = runs
        .accept_with(
            "plain",
            large,
            None,
            Trigger::Webhook,
            None,
            Requester::default(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(e, AcceptError::Limit(ParamLimitError::ValueTooLarge { .. })),
        "{e:?}"
    );
    let filter = RunFilter {
        job: None,
        status: None,
        jobs: crate::domain::auth::JobFilter::All,
        limit: 10,
        ..RunFilter::default()
    };
    assert!(runs.list(&filter).await.unwrap().is_empty());
}
