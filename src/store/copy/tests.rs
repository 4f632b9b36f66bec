//! An installation written through the store ports (runs in every state, keys,
//! schedules, a session, a callback, replies, logs of several attempts) copied
//! SQLite → PostgreSQL → SQLite: every run and log reads the same through the ports on
//! all three, and both copies verify with the same checksums. A target that holds runs
//! is refused untouched; a target changed after the copy fails the verification.

mod schema_check;

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, NaiveDate, Utc};

use super::*;
use crate::domain::callback::{CallbackTarget, NextStep, TryResult};
use crate::domain::ports::{
    ClaimResult, IdempotencyKey, NewRun, OutputChunk, RunMessage, RunStore, Stream,
};
use crate::domain::reply::{ReplyAddress, ReplyKind, Requester};
use crate::domain::retry::RetryPolicy;
use crate::domain::run::{Outcome, ResourceUsage, RunStatus};
use crate::domain::schedule::{Admission, Overlap, SkipReason};
use crate::domain::session::SessionRequest;
use crate::domain::store::{Pause, Replies, RunRecords, Schedules};
use crate::logsink::{FileLogSink, PgLogSink};
use crate::store::suite::{claimed, hour, new_run, publish_all, slot, slot_run};
use crate::store::testdb;

const TTL: Duration = Duration::from_secs(30);

/// Now, to the millisecond both stores keep.
fn now_ms() -> DateTime<Utc> {
    DateTime::from_timestamp_millis(Utc::now().timestamp_millis()).unwrap_or_default()
}

fn chunk(bytes: impl Into<Bytes>) -> OutputChunk {
    OutputChunk {
        stream: Stream::Stdout,
        bytes: bytes.into(),
    }
}

/// What `populate` wrote: every run, and every attempt's log as it must read.
struct Written {
    runs: Vec<RunId>,
    logs: BTreeMap<(RunId, u32), Vec<u8>>,
}

async fn log(sink: &dyn LogSink, written: &mut Written, run: RunId, attempt: u32, bytes: Vec<u8>) {
    // In two appends, as output arrives.
    let half = bytes.len() / 2;
    sink.append(run, attempt, 0, &[chunk(bytes[..half].to_vec())])
        .await
        .unwrap();
    sink.append(run, attempt, half as u64, &[chunk(bytes[half..].to_vec())])
        .await
        .unwrap();
    written.logs.insert((run, attempt), bytes);
}

/// Claim, start and finish `run`'s attempt `attempt` at `at` with `outcome`.
async fn run_attempt<S: RunStore>(
    store: &S,
    run: RunId,
    attempt: u32,
    at: DateTime<Utc>,
    outcome: Outcome,
    usage: Option<ResourceUsage>,
) {
    let message = RunMessage {
        run_id: run,
        attempt,
    };
    let ClaimResult::Claimed(claim) = store.claim(message, "w1", TTL, at).await.unwrap() else {
        panic!("claim of {run}/{attempt} refused")
    };
    store
        .mark_started(claim.lease, &format!("c-{attempt}"), TTL, at)
        .await
        .unwrap();
    store
        .finish(claim.lease, &outcome, 0, usage, at)
        .await
        .unwrap();
}

/// An installation of every kind of row, through the store's ports.
async fn populate<S: RunStore + Replies>(store: &S, sink: &dyn LogSink) -> Written {
    let now = now_ms();
    let mut written = Written {
        runs: Vec::new(),
        logs: BTreeMap::new(),
    };
    // The worker's session, first: its build goes onto the attempts it claims.
    let request = SessionRequest {
        worker_id: "w1".into(),
        instance: "i-1".into(),
        host: "host-1".into(),
        pid: 4242,
        lock_released_by: None,
        build: Some("0.1.0 (abc)".to_owned()),
    };
    store.open_session(&request, TTL, now).await.unwrap();
    // Queued, under idempotency keys of two clients whose names sort differently
    // byte-wise ("B" < "a") and in most locales ("a" < "B").
    for scope in ["B", "a"] {
        let run = new_run();
        let key = IdempotencyKey {
            scope: scope.into(),
            key: "nightly-2026-03-01".into(),
            job: run.job.clone(),
            fingerprint: r#"{"who":"x"}"#.into(),
        };
        store.insert_run(&run, Some(&key)).await.unwrap();
        written.runs.push(run.id);
    }
    // Running, with a log of several pieces (and bytes that are not UTF-8).
    let running = new_run();
    store.insert_run(&running, None).await.unwrap();
    publish_all(store, now).await;
    let claim = claimed(store, &running, 1, TTL).await;
    store
        .mark_started(claim.lease, "c-run", TTL, now)
        .await
        .unwrap();
    let big: Vec<u8> = (0..(2 * logs::PIECE + 12_345))
        .map(|i| (i % 251) as u8)
        .collect();
    log(sink, &mut written, running.id, 1, big).await;
    written.runs.push(running.id);
    // Failed once, retried after its backoff, then succeeded: two attempts, two logs,
    // the first with its usage (floats that print long).
    let mut retried = new_run();
    retried.retry = RetryPolicy {
        max_attempts: 2,
        backoff: Duration::from_secs(60),
        on_exit_codes: [1].into(),
        ..RetryPolicy::default()
    };
    store.insert_run(&retried, None).await.unwrap();
    let usage = ResourceUsage {
        peak_memory_bytes: 123_456_789,
        cpu_seconds: 0.1 + 0.2,
        memory_limit_bytes: Some(256 << 20),
        cpu_limit: Some(1.5),
        samples: 3,
    };
    run_attempt(
        store,
        retried.id,
        1,
        now,
        Outcome::Exited { code: 1 },
        Some(usage),
    )
    .await;
    log(
        sink,
        &mut written,
        retried.id,
        1,
        b"attempt 1\nfailed\n".to_vec(),
    )
    .await;
    let later = now + chrono::Duration::seconds(80);
    run_attempt(
        store,
        retried.id,
        2,
        later,
        Outcome::Exited { code: 0 },
        None,
    )
    .await;
    log(
        sink,
        &mut written,
        retried.id,
        2,
        b"attempt 2\n\xff\xfe\x00ok\n".to_vec(),
    )
    .await;
    written.runs.push(retried.id);
    // Cancelled while queued.
    let cancelled = new_run();
    store.insert_run(&cancelled, None).await.unwrap();
    store.cancel(cancelled.id, now).await.unwrap();
    written.runs.push(cancelled.id);
    // Failed, with its callback tried once.
    let called = NewRun {
        callback: Some(CallbackTarget {
            url: "https://hooks.example.com/done".into(),
        }),
        ..new_run()
    };
    store.insert_run(&called, None).await.unwrap();
    run_attempt(store, called.id, 1, now, Outcome::Exited { code: 3 }, None).await;
    log(
        sink,
        &mut written,
        called.id,
        1,
        b"exiting with 3\n".to_vec(),
    )
    .await;
    let due = store.due_callbacks(now, 10).await.unwrap();
    assert_eq!(due.len(), 1);
    let retry_at = now + chrono::Duration::seconds(5);
    store
        .record_callback_try(
            due[0].id,
            &TryResult::Status(500),
            NextStep::RetryAt(retry_at),
            now,
        )
        .await
        .unwrap();
    written.runs.push(called.id);
    // Asked for over the request queue, its `accepted` reply sent.
    let replied = NewRun {
        requester: Requester {
            requested_by: Some("billing".into()),
            reply_to: Some(ReplyAddress {
                to: "reply-q".into(),
                correlation_id: Some("c-1".into()),
            }),
            replies: vec![ReplyKind::Accepted, ReplyKind::Finished],
        },
        ..new_run()
    };
    store.insert_run(&replied, None).await.unwrap();
    let due = store.due_replies(10, now).await.unwrap();
    store.reply_sent(due[0].id, now).await.unwrap();
    written.runs.push(replied.id);
    // A schedule: one slot fired, one skipped, its cursor and a pause.
    let day = NaiveDate::from_ymd_opt(2026, 3, 1).unwrap_or_default();
    let fired = slot("daily", 1);
    let slot_run = slot_run(&fired, Admission::Unlimited);
    store
        .fire_slot(&fired, hour(1), day, &slot_run, Overlap::Skip, now)
        .await
        .unwrap();
    written.runs.push(slot_run.id);
    let skipped = slot("daily", 2);
    let reason = SkipReason::ClosedDay;
    let detail = Some("holiday \"tab\"\there");
    store
        .skip_slot(&skipped, hour(2), day, reason, detail, now)
        .await
        .unwrap();
    store
        .rebase_cursor(&fired.job, "daily", "def-1", hour(2))
        .await
        .unwrap();
    let pause = Pause {
        note: Some("maintenance".into()),
        at: now,
    };
    store
        .set_pause(&fired.job, "daily", Some(&pause))
        .await
        .unwrap();
    written
}

/// A SQLite store in a directory of its own, with its file sink (`logs` beside it).
async fn sqlite_side(dir: &Path) -> (SqliteStore, FileLogSink, CopyStore) {
    let file = dir.join("tasuki.db");
    let store = SqliteStore::open_file(&file).await.unwrap();
    let copy = CopyStore::open_sqlite(&file, Side::Source).await.unwrap();
    (store, FileLogSink::new(dir.join("logs")), copy)
}

fn end<'a>(store: &'a CopyStore, logs: &'a dyn LogSink) -> Endpoint<'a> {
    Endpoint { store, logs }
}

/// Every run and log reads on `store` and `sink` as on `reference`'s.
async fn assert_same<A: RunStore, B: RunStore>(
    reference: &A,
    store: &B,
    sink: &dyn LogSink,
    written: &Written,
    what: &str,
) {
    for &id in &written.runs {
        let want = reference.get_run(id).await.unwrap();
        assert!(want.is_some(), "{id} missing from the source");
        assert_eq!(store.get_run(id).await.unwrap(), want, "run {id} on {what}");
    }
    for (&(id, attempt), bytes) in &written.logs {
        let len = sink.len(id, attempt).await.unwrap();
        assert_eq!(len, bytes.len() as u64, "log {id}/{attempt} on {what}");
        let read = sink.read(id, attempt, 0, bytes.len() + 1).await.unwrap();
        assert!(read[..] == bytes[..], "log {id}/{attempt} on {what}");
    }
    let job = "nightly-job";
    assert_eq!(
        store.slots(job, None, 10).await.unwrap(),
        reference.slots(job, None, 10).await.unwrap()
    );
    assert_eq!(
        store.cursor(job, "daily").await.unwrap(),
        reference.cursor(job, "daily").await.unwrap()
    );
    assert_eq!(
        store.pause(job, "daily").await.unwrap(),
        reference.pause(job, "daily").await.unwrap()
    );
    assert_eq!(
        store.session("w1").await.unwrap(),
        reference.session("w1").await.unwrap()
    );
}

#[tokio::test]
async fn sqlite_to_postgresql_and_back_keeps_every_run_and_log() {
    let a_dir = tempfile::tempdir().unwrap();
    let (a, a_logs, a_copy) = sqlite_side(a_dir.path()).await;
    let written = populate(&a, &a_logs).await;
    assert_eq!(written.logs.len(), 4);
    let mut statuses = Vec::new();
    for &id in &written.runs {
        statuses.push(a.get_run(id).await.unwrap().map(|r| r.status));
    }
    use RunStatus::*;
    let want = [
        Queued, Queued, Running, Succeeded, Cancelled, Failed, Queued, Queued,
    ];
    assert_eq!(statuses, want.map(Some));

    let b_db = testdb::TestDb::create().await;
    let b_copy = CopyStore::open_postgres(&b_db.url, Side::Target)
        .await
        .unwrap();
    let b_pool = b_copy.postgres_pool().unwrap();
    // Keys in a locale's order, as a database made with one would have them: the copy
    // still walks and sums them byte-wise, as SQLite does.
    for (table, column) in [
        ("idempotency_keys", "scope"),
        ("worker_sessions", "worker_id"),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "ALTER TABLE {table} ALTER COLUMN {column} TYPE TEXT COLLATE \"und-x-icu\""
        )))
        .execute(&b_pool)
        .await
        .unwrap();
    }
    let b_logs = PgLogSink::new(b_pool.clone());
    // Two rows a batch: every table is read in several.
    let ab = copy(end(&a_copy, &a_logs), end(&b_copy, &b_logs), 2)
        .await
        .unwrap();
    let b = PgStore::open(&b_db.url, 2).await.unwrap();
    assert_same(&a, &b, &b_logs, &written, "PostgreSQL").await;

    let c_dir = tempfile::tempdir().unwrap();
    let c_file = c_dir.path().join("tasuki.db");
    let c_copy = CopyStore::open_sqlite(&c_file, Side::Target).await.unwrap();
    let c_logs = FileLogSink::new(c_dir.path().join("logs"));
    let bc = copy(end(&b_copy, &b_logs), end(&c_copy, &c_logs), 1000)
        .await
        .unwrap();
    let c = SqliteStore::open_file(&c_file).await.unwrap();
    assert_same(&a, &c, &c_logs, &written, "SQLite again").await;

    // Both copies read the same checksums: the canonical text does not depend on the
    // backend (flags, floats, key order).
    assert_eq!(ab, bc);
    let rows = |name: &str| {
        ab.tables
            .iter()
            .find(|(t, _)| *t == name)
            .map(|(_, s)| s.rows)
    };
    assert_eq!(rows("runs"), Some(written.runs.len() as u64));
    assert_eq!(rows("attempts"), Some(4));
    assert_eq!(rows("idempotency_keys"), Some(2));
    assert_eq!(rows("schedule_slots"), Some(2));
    assert_eq!(rows("callback_deliveries"), Some(1));
    assert_eq!(rows("run_replies"), Some(2));
    assert_eq!(ab.logs.logs, 4);
    let total: usize = written.logs.values().map(Vec::len).sum();
    assert_eq!(ab.logs.bytes, total as u64);

    // New rows number on past the copied ones on both targets.
    let max_outbox: i64 = sqlx::query_scalar("SELECT MAX(id) FROM outbox")
        .fetch_one(&b_pool)
        .await
        .unwrap();
    for store in [&b as &dyn RunStore, &c as &dyn RunStore] {
        let run = new_run();
        store.insert_run(&run, None).await.unwrap();
        let far = now_ms() + chrono::Duration::days(1);
        let pending = store.pending_outbox(100, far).await.unwrap();
        let entry = pending.iter().find(|e| e.message.run_id == run.id).unwrap();
        assert!(entry.id > max_outbox, "{} after {max_outbox}", entry.id);
    }
}

#[tokio::test]
async fn a_target_holding_runs_is_refused_and_left_as_it_was() {
    let a_dir = tempfile::tempdir().unwrap();
    let (a, a_logs, a_copy) = sqlite_side(a_dir.path()).await;
    let written = populate(&a, &a_logs).await;

    // The source's worker session is live (the copy warns of it), and not an hour on.
    let mut snapshot = a_copy.snapshot(Side::Source).await.unwrap();
    let now = now_ms().timestamp_millis();
    assert_eq!(snapshot.live_sessions(now).await.unwrap(), ["w1 on host-1"]);
    assert!(
        snapshot
            .live_sessions(now + 3_600_000)
            .await
            .unwrap()
            .is_empty()
    );
    drop(snapshot);

    // A PostgreSQL target that ran one job already.
    let (t, t_db) = testdb::open().await;
    let t_copy = CopyStore::open_postgres(&t_db.url, Side::Target)
        .await
        .unwrap();
    let t_logs = PgLogSink::new(t.shared_pool());
    let own = new_run();
    t.insert_run(&own, None).await.unwrap();
    t_logs
        .append(own.id, 1, 0, &[chunk(&b"mine\n"[..])])
        .await
        .unwrap();
    let before = summarize(
        end(&t_copy, &t_logs),
        t_copy.snapshot(Side::Target).await.unwrap(),
        10,
    )
    .await
    .unwrap();

    let refused = copy(end(&a_copy, &a_logs), end(&t_copy, &t_logs), 10).await;
    match refused {
        Err(e @ CopyError::TargetNotEmpty(_)) => {
            let text = e.to_string();
            assert!(
                text.contains("1 run(s)") && text.contains("outbox"),
                "{text}"
            );
        }
        other => panic!("not refused: {other:?}"),
    }
    let after = summarize(
        end(&t_copy, &t_logs),
        t_copy.snapshot(Side::Target).await.unwrap(),
        10,
    )
    .await
    .unwrap();
    assert_eq!(before, after);
    assert_eq!(after.tables[0].1.rows, 1);
    assert!(t.get_run(own.id).await.unwrap().is_some());
    for &(id, attempt) in written.logs.keys() {
        assert_eq!(t_logs.len(id, attempt).await.unwrap(), 0);
    }

    // A SQLite target with one schedule cursor (a `serve` started on it) is refused
    // too, naming the table.
    let s_dir = tempfile::tempdir().unwrap();
    let (s, s_logs, _) = sqlite_side(s_dir.path()).await;
    s.advance_cursor("job", "daily", hour(1)).await.unwrap();
    let s_copy = CopyStore::open_sqlite(&s_dir.path().join("tasuki.db"), Side::Target)
        .await
        .unwrap();
    match copy(end(&a_copy, &a_logs), end(&s_copy, &s_logs), 10).await {
        Err(CopyError::TargetNotEmpty(held)) => assert_eq!(held, "1 row(s) in schedule_cursors"),
        other => panic!("not refused: {other:?}"),
    }
    assert!(s.get_run(written.runs[0]).await.unwrap().is_none());
}

#[tokio::test]
async fn a_target_that_reads_differently_fails_the_verification_naming_the_table() {
    let a_dir = tempfile::tempdir().unwrap();
    let (a, a_logs, a_copy) = sqlite_side(a_dir.path()).await;
    let written = populate(&a, &a_logs).await;
    let c_dir = tempfile::tempdir().unwrap();
    let (c, c_logs, _) = sqlite_side(c_dir.path()).await;
    let c_copy = CopyStore::open_sqlite(&c_dir.path().join("tasuki.db"), Side::Target)
        .await
        .unwrap();
    copy(end(&a_copy, &a_logs), end(&c_copy, &c_logs), 3)
        .await
        .unwrap();

    // One attempt's exit code changed, one log longer by a byte.
    sqlx::query("UPDATE attempts SET exit_code = 9 WHERE exit_code = 3")
        .execute(c.writer())
        .await
        .unwrap();
    let (&(id, attempt), bytes) = written.logs.iter().next().unwrap();
    c_logs
        .append(id, attempt, bytes.len() as u64, &[chunk(&b"!"[..])])
        .await
        .unwrap();
    match verify(end(&a_copy, &a_logs), end(&c_copy, &c_logs), 100).await {
        Err(e @ CopyError::Differs(_)) => {
            let CopyError::Differs(list) = &e else {
                unreachable!()
            };
            let what: Vec<&str> = list.iter().map(|d| d.what).collect();
            assert_eq!(what, ["attempts", "logs"], "{e}");
            let text = e.to_string();
            assert!(text.contains("attempts: source 4 rows, sha256 "), "{text}");
        }
        other => panic!("verified: {other:?}"),
    }
}

#[test]
fn attempt_keys_must_name_runs() {
    let id = RunId::new();
    let row = vec![Value::Text(Some(id.to_string())), Value::Int(Some(2))];
    assert_eq!(attempt_key(&row).unwrap(), (id, 2));
    for bad in [
        vec![Value::Text(Some("nope".into())), Value::Int(Some(1))],
        vec![Value::Text(Some(id.to_string())), Value::Int(Some(-1))],
        vec![Value::Text(None), Value::Int(Some(1))],
    ] {
        assert!(
            matches!(attempt_key(&bad), Err(CopyError::BadRunId(_))),
            "{bad:?}"
        );
    }
}
