//! Replies owed to producers: the `accepted` one is written with the run, the
//! `finished` one becomes due in the transaction that makes the run final, and each is
//! recorded on the run as it is sent, returned or retried.

use std::time::Duration;

use chrono::Utc;

use super::new_run;
use crate::domain::ports::{ClaimResult, LeaseStatus, NewRun, RunMessage, RunStore};
use crate::domain::reply::{ReplyAddress, ReplyKind, ReplyState, Requester};
use crate::domain::run::{Outcome, RunStatus};
use crate::domain::store::Replies;

fn requested(kinds: Vec<ReplyKind>) -> NewRun {
    NewRun {
        requester: Requester {
            requested_by: Some("billing".into()),
            reply_to: Some(ReplyAddress {
                to: "reply-q".into(),
                correlation_id: Some("c-1".into()),
            }),
            replies: kinds,
        },
        ..new_run()
    }
}

fn states(run: &crate::domain::run::Run) -> Vec<(ReplyKind, ReplyState)> {
    run.replies.iter().map(|r| (r.kind, r.state)).collect()
}

pub(crate) async fn the_finished_reply_becomes_due_with_the_final_state<S: RunStore + Replies>(
    store: &S,
) {
    let run = requested(vec![ReplyKind::Accepted, ReplyKind::Finished]);
    store.insert_run(&run, None).await.unwrap();
    // Only the accepted reply is due while the run is not final.
    let due = store.due_replies(10, Utc::now()).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].kind, ReplyKind::Accepted);
    assert_eq!(due[0].address.correlation_id.as_deref(), Some("c-1"));
    store.reply_sent(due[0].id, Utc::now()).await.unwrap();
    let stored = store.get_run(run.id).await.unwrap().unwrap();
    assert_eq!(stored.requested_by.as_deref(), Some("billing"));
    assert_eq!(
        states(&stored),
        [
            (ReplyKind::Accepted, ReplyState::Sent),
            (ReplyKind::Finished, ReplyState::Waiting)
        ]
    );
    assert!(store.due_replies(10, Utc::now()).await.unwrap().is_empty());

    let ttl = Duration::from_secs(30);
    let message = RunMessage {
        run_id: run.id,
        attempt: 1,
    };
    let ClaimResult::Claimed(claim) = store.claim(message, "w1", ttl, Utc::now()).await.unwrap()
    else {
        panic!("claim refused")
    };
    store
        .mark_started(claim.lease, "c1", ttl, Utc::now())
        .await
        .unwrap();
    assert!(store.due_replies(10, Utc::now()).await.unwrap().is_empty());
    assert_eq!(
        store
            .finish(
                claim.lease,
                &Outcome::Exited { code: 0 },
                0,
                None,
                Utc::now()
            )
            .await
            .unwrap(),
        LeaseStatus::Held { cancel: false }
    );
    let due = store.due_replies(10, Utc::now()).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].kind, ReplyKind::Finished);
    let stored = store.get_run(run.id).await.unwrap().unwrap();
    assert_eq!(stored.status, RunStatus::Succeeded);
    assert_eq!(stored.replies[1].state, ReplyState::Pending);

    // A failed publish waits for its retry time, then is due again with its try counted.
    let later = Utc::now() + chrono::Duration::seconds(5);
    store
        .reply_failed(due[0].id, "broker down", later)
        .await
        .unwrap();
    assert!(store.due_replies(10, Utc::now()).await.unwrap().is_empty());
    let again = store.due_replies(10, later).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].tries, 1);
    // Returned as unroutable: recorded, never due again.
    store
        .reply_unroutable(again[0].id, "unroutable: 312 NO_ROUTE", Utc::now())
        .await
        .unwrap();
    assert!(store.due_replies(10, later).await.unwrap().is_empty());
    let stored = store.get_run(run.id).await.unwrap().unwrap();
    let finished = &stored.replies[1];
    assert_eq!(finished.state, ReplyState::Unroutable);
    assert_eq!(finished.tries, 2);
    assert_eq!(
        finished.last_error.as_deref(),
        Some("unroutable: 312 NO_ROUTE")
    );
}

pub(crate) async fn a_run_cancelled_before_it_started_owes_its_finished_reply<
    S: RunStore + Replies,
>(
    store: &S,
) {
    let run = requested(vec![ReplyKind::Finished]);
    store.insert_run(&run, None).await.unwrap();
    assert!(store.due_replies(10, Utc::now()).await.unwrap().is_empty());
    store.cancel(run.id, Utc::now()).await.unwrap();
    let due = store.due_replies(10, Utc::now()).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].kind, ReplyKind::Finished);
    assert_eq!(due[0].run_id, run.id);
}

pub(crate) async fn a_run_without_reply_to_owes_no_reply<S: RunStore + Replies>(store: &S) {
    let mut run = requested(vec![ReplyKind::Accepted, ReplyKind::Finished]);
    run.requester.reply_to = None;
    store.insert_run(&run, None).await.unwrap();
    assert!(store.due_replies(10, Utc::now()).await.unwrap().is_empty());
    let stored = store.get_run(run.id).await.unwrap().unwrap();
    assert!(stored.replies.is_empty());
    assert_eq!(stored.requested_by.as_deref(), Some("billing"));
}

pub(crate) async fn a_repeated_request_adds_its_replies_once<S: RunStore + Replies>(store: &S) {
    let run = requested(vec![ReplyKind::Finished]);
    store.insert_run(&run, None).await.unwrap();
    // A redelivery of the same request owes nothing new.
    store
        .add_replies(run.id, &run.requester, Utc::now())
        .await
        .unwrap();
    assert_eq!(
        store.get_run(run.id).await.unwrap().unwrap().replies.len(),
        1
    );
    // A retry from another reply queue, after the run ended: due at once.
    store.cancel(run.id, Utc::now()).await.unwrap();
    let mut retry = run.requester.clone();
    retry.reply_to = Some(ReplyAddress {
        to: "other-q".into(),
        correlation_id: None,
    });
    store.add_replies(run.id, &retry, Utc::now()).await.unwrap();
    store.add_replies(run.id, &retry, Utc::now()).await.unwrap();
    let due = store.due_replies(10, Utc::now()).await.unwrap();
    let to: Vec<&str> = due.iter().map(|d| d.address.to.as_str()).collect();
    assert_eq!(to, ["reply-q", "other-q"]);
}
