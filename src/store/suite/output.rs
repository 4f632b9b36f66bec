//! Output that never reached an attempt's log: what the sink refused and what the worker
//! could not deliver, each counted once, and what `adopt` says about it.

use std::time::Duration;

use chrono::Utc;

use super::lifecycle::{claimed, new_run};
use crate::domain::ports::{AdoptResult, DroppedOutput, Lease, RunStore};
use crate::domain::run::{Outcome, RunStatus};

async fn adopted_dropped(store: &dyn RunStore, lease: Lease) -> DroppedOutput {
    let ttl = Duration::from_secs(30);
    match store
        .adopt(lease.run_id, lease.attempt, "w1", ttl, Utc::now())
        .await
        .unwrap()
    {
        AdoptResult::Held { claim, dropped } => {
            assert_eq!(claim.lease, lease);
            dropped
        }
        AdoptResult::Stale => panic!("own running attempt not adoptable"),
    }
}

pub(crate) async fn undelivered_output_only_rises_counts_once_and_is_handed_to_adopt(
    store: &dyn RunStore,
) {
    let ttl = Duration::from_secs(30);
    let now = Utc::now();
    let run = new_run();
    store.insert_run(&run, None).await.unwrap();
    let lease = claimed(store, &run, 1, ttl).await.lease;
    store.mark_started(lease, "c1", ttl, now).await.unwrap();
    assert_eq!(
        adopted_dropped(store, lease).await,
        DroppedOutput::default()
    );

    store.add_log_dropped(lease, 4).await.unwrap();
    store.record_undelivered(lease, 3).await.unwrap();
    // A late or repeated report says less, or the same: nothing changes.
    store.record_undelivered(lease, 2).await.unwrap();
    store.record_undelivered(lease, 3).await.unwrap();
    // Under a stale epoch: not this attempt's.
    let stale = Lease {
        epoch: lease.epoch - 1,
        ..lease
    };
    store.record_undelivered(stale, 100).await.unwrap();
    let stored = store.get_run(run.id).await.unwrap().unwrap();
    assert_eq!(stored.log_dropped_bytes, 7);
    assert_eq!(stored.attempts[0].log_dropped_bytes, 7);
    assert!(stored.logs_truncated());
    assert_eq!(
        adopted_dropped(store, lease).await,
        DroppedOutput {
            total: 7,
            undelivered: 3
        }
    );

    // The worker's total goes on rising (a restarted worker counts on from 3); its
    // final report is a total too, of which only the rise counts.
    store.record_undelivered(lease, 5).await.unwrap();
    assert_eq!(
        adopted_dropped(store, lease).await,
        DroppedOutput {
            total: 9,
            undelivered: 5
        }
    );
    store
        .finish(lease, &Outcome::Exited { code: 0 }, 6, None, now)
        .await
        .unwrap();
    let stored = store.get_run(run.id).await.unwrap().unwrap();
    assert_eq!(stored.status, RunStatus::Succeeded);
    assert_eq!(stored.log_dropped_bytes, 4 + 6);
    assert_eq!(stored.attempts[0].log_dropped_bytes, 4 + 6);

    // A final report below what was recorded (reconciliation knows nothing of the
    // output) lowers nothing.
    let other = new_run();
    store.insert_run(&other, None).await.unwrap();
    let lease = claimed(store, &other, 1, ttl).await.lease;
    store.mark_started(lease, "c2", ttl, now).await.unwrap();
    store.record_undelivered(lease, 5).await.unwrap();
    let vanished = Outcome::DockerError {
        message: "gone".into(),
    };
    store.finish(lease, &vanished, 0, None, now).await.unwrap();
    let stored = store.get_run(other.id).await.unwrap().unwrap();
    assert_eq!(stored.log_dropped_bytes, 5);
    assert_eq!(stored.attempts[0].log_dropped_bytes, 5);
}
