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
