//! Listing runs: filters by job, status and the caller's job globs, newest first.

use super::new_run;
use crate::domain::auth::{JobFilter, Scope};
use crate::domain::ports::{NewRun, RunFilter, RunStore};
use crate::domain::run::RunId;

fn run_of(job: &str) -> NewRun {
    NewRun {
        id: RunId::new(),
        job: job.to_owned(),
        ..new_run()
    }
}

fn globs(list: &[&str]) -> JobFilter {
    JobFilter::Globs(
        list.iter()
            .map(|g| {
                format!("read:{g}")
                    .parse::<Scope>()
                    .expect("a valid scope")
                    .jobs
            })
            .collect(),
    )
}

pub(crate) async fn runs_are_listed_only_for_the_jobs_the_globs_match(store: &dyn RunStore) {
    let jobs = [
        "nightly-etl",
        "nightly-report",
        "payroll",
        "pay",
        "a-b",
        "axb",
    ];
    for job in jobs {
        store.insert_run(&run_of(job), None).await.unwrap();
    }
    let listed = |jobs: JobFilter, job: Option<&str>| {
        let filter = RunFilter {
            job: job.map(str::to_owned),
            jobs,
            limit: 100,
            ..RunFilter::default()
        };
        async move {
            let mut names: Vec<String> = store
                .list_runs(&filter)
                .await
                .unwrap()
                .into_iter()
                .map(|r| r.job)
                .collect();
            names.sort();
            names
        }
    };
    assert_eq!(listed(JobFilter::All, None).await.len(), jobs.len());
    assert_eq!(
        listed(globs(&["nightly-*"]), None).await,
        ["nightly-etl", "nightly-report"]
    );
    // Several globs: a run matched by any of them, once.
    assert_eq!(
        listed(globs(&["nightly-*", "pay*", "*-etl"]), None).await,
        ["nightly-etl", "nightly-report", "pay", "payroll"]
    );
    // `?` is one character; anything else stands for itself (`-` included).
    assert_eq!(listed(globs(&["a?b"]), None).await, ["a-b", "axb"]);
    assert_eq!(listed(globs(&["pay"]), None).await, ["pay"]);
    // No glob: nothing, not everything.
    assert!(listed(JobFilter::Globs(Vec::new()), None).await.is_empty());
    // The job asked for must also be readable.
    assert_eq!(
        listed(globs(&["nightly-*"]), Some("nightly-etl")).await,
        ["nightly-etl"]
    );
    assert!(
        listed(globs(&["nightly-*"]), Some("payroll"))
            .await
            .is_empty()
    );
    // The filter agrees with the domain's own matching.
    for pattern in ["*", "n*t", "*-*", "?ay", "*ll"] {
        let filter = globs(&[pattern]);
        let want: Vec<&str> = {
            let mut w: Vec<&str> = jobs.iter().copied().filter(|j| filter.matches(j)).collect();
            w.sort();
            w
        };
        assert_eq!(listed(filter, None).await, want, "glob {pattern}");
    }
}

pub(crate) async fn runs_are_filtered_by_trigger_and_creation_time(store: &dyn RunStore) {
    use chrono::{TimeZone, Utc};

    use crate::domain::run::Trigger;

    let at = |day: u32| Utc.with_ymd_and_hms(2026, 3, day, 12, 0, 0).unwrap();
    let made = [
        ("api", Trigger::Api, at(1)),
        ("hook", Trigger::Webhook, at(2)),
        (
            "sched",
            Trigger::Schedule {
                schedule: "daily".into(),
                slot: at(3),
                business_date: at(3).date_naive(),
                local_time: "2026-03-03T12:00:00+00:00".into(),
            },
            at(3),
        ),
    ];
    for (job, trigger, created_at) in made {
        let run = NewRun {
            trigger,
            created_at,
            ..run_of(job)
        };
        store.insert_run(&run, None).await.unwrap();
    }
    let listed = |filter: RunFilter| async move {
        let mut names: Vec<String> = store
            .list_runs(&RunFilter {
                limit: 100,
                ..filter
            })
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.job)
            .collect();
        names.sort();
        names
    };
    let by_trigger = |kind| RunFilter {
        trigger: Some(kind),
        ..RunFilter::default()
    };
    assert_eq!(listed(by_trigger("api")).await, ["api"]);
    assert_eq!(listed(by_trigger("webhook")).await, ["hook"]);
    assert_eq!(listed(by_trigger("schedule")).await, ["sched"]);
    // From is inclusive, before is not.
    let range = RunFilter {
        created_from: Some(at(2)),
        created_before: Some(at(3)),
        ..RunFilter::default()
    };
    assert_eq!(listed(range).await, ["hook"]);
    let from = RunFilter {
        created_from: Some(at(2)),
        ..RunFilter::default()
    };
    assert_eq!(listed(from).await, ["hook", "sched"]);
}
