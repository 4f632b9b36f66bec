//! Admission: a job's `max_concurrent` (and a buffered firing's "alone") applied. A run
//! goes to workers (gets its outbox row) only once admitted; until then it waits
//! `queued` with `admitted = 0`, in arrival (id) order. The rows are read here and
//! `Admission::allows` decides; nothing here is spelled in SQL beyond picking rows.

use chrono::{DateTime, Utc};

use super::corrupt;
use super::outbox::enqueue;
use super::sync::{admission_get, attempt_get, exec, first, get, run_id_get};
use crate::domain::ports::StoreError;
use crate::domain::run::{RunId, RunStatus};
use crate::domain::schedule::Admission;

/// The statuses of runs that are not final, as a JSON list for `json_each`.
pub(super) fn not_final_json() -> Result<String, StoreError> {
    let statuses: Vec<&str> = RunStatus::ALL
        .into_iter()
        .filter(|s| !s.is_final())
        .map(RunStatus::as_str)
        .collect();
    serde_json::to_string(&statuses).map_err(|e| corrupt("statuses", e))
}

/// A run waiting for admission.
struct Waiting {
    id: RunId,
    attempt: u32,
    admission: Admission,
}

/// The statuses of runs that are not final, as the partial index `runs_active` spells
/// them (migrations/0012): SQLite uses a partial index only for a query that repeats
/// its condition, so this is a literal, checked against the domain by a test.
pub(super) const ACTIVE_STATUSES: &str = "status IN ('queued', 'running')";

/// How many runs of `job` are admitted and not final: an accept asks this every time,
/// so it reads `runs_active` (the job's runs in flight), never the job's history.
fn admitted_count(conn: &rusqlite::Connection, job: &str) -> Result<u32, StoreError> {
    let sql = format!(
        "SELECT COUNT(*) AS n FROM runs WHERE job = ? AND admitted = 1 AND {ACTIVE_STATUSES}"
    );
    let n: i64 = first(conn, &sql, [job], |row| get(row, "n"))?.unwrap_or(0);
    Ok(u32::try_from(n).unwrap_or(u32::MAX))
}

/// The first of the job's runs that wait for admission, in arrival order.
fn first_waiting(conn: &rusqlite::Connection, job: &str) -> Result<Option<Waiting>, StoreError> {
    first(
        conn,
        "SELECT id, attempt, admission FROM runs WHERE job = ? AND admitted = 0 \
         AND status IN (SELECT value FROM json_each(?)) ORDER BY id LIMIT 1",
        rusqlite::params![job, not_final_json()?],
        |row| {
            Ok(Waiting {
                id: run_id_get(row, "id")?,
                attempt: attempt_get(row, "attempt")?,
                admission: admission_get(row)?,
            })
        },
    )
}

/// Whether a run of `job` arriving now is admitted at once: nothing of the job waits
/// before it and its rule allows one more.
pub(super) fn admits_arrival(
    conn: &rusqlite::Connection,
    job: &str,
    admission: Admission,
) -> Result<bool, StoreError> {
    if first_waiting(conn, job)?.is_some() {
        return Ok(false);
    }
    // No rule, no count: the COUNT grows with the job's backlog and would be paid by
    // every accept.
    if admission == Admission::Unlimited {
        return Ok(true);
    }
    Ok(admission.allows(admitted_count(conn, job)?))
}

/// Mark the run admitted (or waiting) and, when admitted, queue the publish of its next
/// attempt. Inside the caller's transaction.
pub(super) fn set_admitted(
    conn: &rusqlite::Connection,
    id: RunId,
    next_attempt: u32,
    admitted: bool,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    exec(
        conn,
        "UPDATE runs SET admitted = ? WHERE id = ?",
        rusqlite::params![i64::from(admitted), id.to_string()],
    )?;
    if admitted {
        enqueue(conn, id, next_attempt, now, None)?;
    }
    Ok(())
}

/// A run of `job` became final: admit the job's waiting runs, oldest first, while the
/// first one's rule allows (a run never overtakes an earlier one). Inside the
/// transaction that made the run final. Returns the runs admitted.
pub(super) fn admit_waiting(
    conn: &rusqlite::Connection,
    job: &str,
    now: DateTime<Utc>,
) -> Result<Vec<RunId>, StoreError> {
    let mut admitted = Vec::new();
    while let Some(head) = first_waiting(conn, job)? {
        if !head.admission.allows(admitted_count(conn, job)?) {
            break;
        }
        set_admitted(conn, head.id, head.attempt.saturating_add(1), true, now)?;
        admitted.push(head.id);
    }
    Ok(admitted)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The literal in `admitted_count` names exactly the statuses the domain calls not
    /// final (else the count would be wrong, not only slow).
    #[test]
    fn the_active_statuses_are_the_domains_not_final_ones() {
        let listed: Vec<String> = serde_json::from_str(&not_final_json().unwrap()).unwrap();
        let quoted: Vec<String> = listed.iter().map(|s| format!("'{s}'")).collect();
        assert_eq!(
            ACTIVE_STATUSES,
            format!("status IN ({})", quoted.join(", "))
        );
    }

    /// An accept's count reads the partial index, never the job's every run.
    #[tokio::test]
    async fn the_admitted_count_reads_only_the_runs_in_flight() {
        let dir = tempfile::tempdir().unwrap();
        let store = super::super::SqliteStore::open(dir.path()).await.unwrap();
        let sql = format!(
            "EXPLAIN QUERY PLAN SELECT COUNT(*) FROM runs WHERE job = 'a' AND admitted = 1 \
             AND {ACTIVE_STATUSES}"
        );
        let plan: Vec<(i64, i64, i64, String)> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .fetch_all(store.writer())
            .await
            .unwrap();
        assert!(
            plan.iter().any(|(_, _, _, d)| d.contains("runs_active")),
            "{plan:?}"
        );
    }
}
