//! What an attempt's container used: kept with the attempt's final state, read back with
//! the run, absent where nothing was read.

use std::time::Duration;

use chrono::Utc;

use super::lifecycle::{claimed, new_run};
use crate::domain::ports::{Lease, LeaseStatus, RunFilter, RunStore};
use crate::domain::run::{Outcome, ResourceUsage, RunStatus};

pub(crate) async fn an_attempts_usage_is_kept_with_its_final_state(store: &dyn RunStore) {
    let ttl = Duration::from_secs(30);
    let now = Utc::now();
    let usage = ResourceUsage {
        peak_memory_bytes: 67_108_864,
        cpu_seconds: 0.83,
        memory_limit_bytes: Some(67_108_864),
        cpu_limit: Some(0.5),
        samples: 4,
    };
    let run = new_run();
    store.insert_run(&run, None).await.unwrap();
    let lease = claimed(store, &run, 1, ttl).await.lease;
    store.mark_started(lease, "c1", ttl, now).await.unwrap();
    // Running: nothing read back yet.
    let stored = store.get_run(run.id).await.unwrap().unwrap();
    assert_eq!(stored.attempts[0].usage, None);

    // A stale lease's report is refused, usage and all.
    let stale = Lease {
        epoch: lease.epoch - 1,
        ..lease
    };
    let other = ResourceUsage {
        samples: 99,
        ..usage
    };
    let refused = store
        .finish(stale, &Outcome::Exited { code: 0 }, 0, Some(other), now)
        .await
        .unwrap();
    assert_eq!(refused, LeaseStatus::Lost);
    let oom = Outcome::OomKilled { code: 137 };
    store
        .finish(lease, &oom, 0, Some(usage), now)
        .await
        .unwrap();
    let stored = store.get_run(run.id).await.unwrap().unwrap();
    assert_eq!(stored.status, RunStatus::Failed);
    assert_eq!(stored.attempts[0].usage, Some(usage));
    let filter = RunFilter {
        limit: 100,
        ..RunFilter::default()
    };
    let listed = store.list_runs(&filter).await.unwrap();
    let found = listed.iter().find(|r| r.id == run.id).expect("listed");
    assert_eq!(found.attempts[0].usage, Some(usage));

    // Nothing read (no CPU limit, no reading): nothing kept.
    let bare = new_run();
    store.insert_run(&bare, None).await.unwrap();
    let lease = claimed(store, &bare, 1, ttl).await.lease;
    store
        .finish(lease, &Outcome::Exited { code: 0 }, 0, None, now)
        .await
        .unwrap();
    let stored = store.get_run(bare.id).await.unwrap().unwrap();
    assert_eq!(stored.attempts[0].usage, None);

    // An attempt the reaper ends as lost has none either.
    let lost = new_run();
    store.insert_run(&lost, None).await.unwrap();
    claimed(store, &lost, 1, Duration::from_millis(1)).await;
    store
        .expire_leases(now + chrono::Duration::seconds(5))
        .await
        .unwrap();
    let stored = store.get_run(lost.id).await.unwrap().unwrap();
    assert_eq!(stored.attempts[0].status, RunStatus::Lost);
    assert_eq!(stored.attempts[0].usage, None);
}
