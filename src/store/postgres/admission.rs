//! Admission: a job's `max_concurrent` (and a buffered firing's "alone") applied. A run
//! goes to workers (gets its outbox row) only once admitted; until then it waits
//! `queued` with `admitted` false, in arrival (id) order. The rows are read here and
//! `Admission::allows` decides; nothing here is spelled in SQL beyond picking rows.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::outbox::enqueue;
use super::{Tx, admission_col, attempt_col, col, db, not_final, run_id_col};
use crate::domain::run::RunId;
use crate::domain::schedule::Admission;

/// A run waiting for admission.
struct Waiting {
    id: RunId,
    attempt: u32,
    admission: Admission,
}

/// The statuses of runs that are not final, as the partial index `runs_active` spells
/// them (migrations/postgres/0001): PostgreSQL uses a partial index only for a query
/// whose condition it can prove implies the index's, which a bound array (in a prepared
/// statement's generic plan) is not, so this is a literal, checked against the domain
/// by a test.
pub(super) const ACTIVE_STATUSES: &str = "status IN ('queued', 'running')";

/// How many runs of `job` are admitted and not final: an accept asks this every time,
/// so it reads `runs_active` (the job's runs in flight), never the job's history.
async fn admitted_count(c: &mut PgConnection, job: &str) -> Tx<u32> {
    let sql =
        format!("SELECT COUNT(*) AS n FROM runs WHERE job = $1 AND admitted AND {ACTIVE_STATUSES}");
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(job)
        .fetch_one(&mut *c)
        .await
        .map_err(db)?;
    let n: i64 = col(&row, "n")?;
    Ok(u32::try_from(n).unwrap_or(u32::MAX))
}

/// The first of the job's runs that wait for admission, in arrival order.
async fn first_waiting(c: &mut PgConnection, job: &str) -> Tx<Option<Waiting>> {
    let row = sqlx::query(
        "SELECT id, attempt, admission FROM runs WHERE job = $1 AND NOT admitted \
         AND status = ANY($2) ORDER BY id LIMIT 1",
    )
    .bind(job)
    .bind(not_final())
    .fetch_optional(&mut *c)
    .await
    .map_err(db)?;
    let Some(row) = row else {
        return Ok(None);
    };
    Ok(Some(Waiting {
        id: run_id_col(&row, "id")?,
        attempt: attempt_col(&row, "attempt")?,
        admission: admission_col(&row)?,
    }))
}

/// Whether a run of `job` arriving now is admitted at once: nothing of the job waits
/// before it and its rule allows one more.
pub(super) async fn admits_arrival(
    c: &mut PgConnection,
    job: &str,
    admission: Admission,
) -> Tx<bool> {
    if first_waiting(&mut *c, job).await?.is_some() {
        return Ok(false);
    }
    // No rule, no count: the COUNT grows with the job's backlog and would be paid by
    // every accept.
    if admission == Admission::Unlimited {
        return Ok(true);
    }
    Ok(admission.allows(admitted_count(&mut *c, job).await?))
}

/// Mark the run admitted (or waiting) and, when admitted, queue the publish of its next
/// attempt. Inside the caller's transaction.
pub(super) async fn set_admitted(
    c: &mut PgConnection,
    id: RunId,
    next_attempt: u32,
    admitted: bool,
    now: DateTime<Utc>,
) -> Tx<()> {
    sqlx::query("UPDATE runs SET admitted = $1 WHERE id = $2")
        .bind(admitted)
        .bind(id.to_string())
        .execute(&mut *c)
        .await
        .map_err(db)?;
    if admitted {
        enqueue(&mut *c, id, next_attempt, now, None).await?;
    }
    Ok(())
}

/// A run of `job` became final: admit the job's waiting runs, oldest first, while the
/// first one's rule allows (a run never overtakes an earlier one). Inside the
/// transaction that made the run final. Returns the runs admitted.
pub(super) async fn admit_waiting(
    c: &mut PgConnection,
    job: &str,
    now: DateTime<Utc>,
) -> Tx<Vec<RunId>> {
    let mut admitted = Vec::new();
    while let Some(head) = first_waiting(&mut *c, job).await? {
        if !head.admission.allows(admitted_count(&mut *c, job).await?) {
            break;
        }
        set_admitted(&mut *c, head.id, head.attempt.saturating_add(1), true, now).await?;
        admitted.push(head.id);
    }
    Ok(admitted)
}

#[cfg(test)]
mod tests {
    use sqlx::Connection;

    use super::*;
    use crate::domain::ports::StoreError;
    use crate::store::postgres::{testdb, write};

    /// The literal in `admitted_count` names exactly the statuses the domain calls not
    /// final (else the count would be wrong, not only slow).
    #[test]
    fn the_active_statuses_are_the_domains_not_final_ones() {
        let quoted: Vec<String> = not_final().iter().map(|s| format!("'{s}'")).collect();
        assert_eq!(
            ACTIVE_STATUSES,
            format!("status IN ({})", quoted.join(", "))
        );
    }

    /// An accept's count can read the partial index, never the job's every run. (With
    /// sequential scans off: on a table this small the planner would rightly scan it.)
    #[tokio::test]
    async fn the_admitted_count_reads_only_the_runs_in_flight() {
        let (_store, db) = testdb::open().await;
        let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
        sqlx::query("SET enable_seqscan = off")
            .execute(&mut conn)
            .await
            .unwrap();
        let sql = format!(
            "EXPLAIN SELECT COUNT(*) FROM runs WHERE job = 'a' AND admitted AND {ACTIVE_STATUSES}"
        );
        let plan: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .fetch_all(&mut conn)
            .await
            .unwrap();
        assert!(plan.iter().any(|l| l.contains("runs_active")), "{plan:?}");
    }

    /// With room for one run, an arrival waits behind a waiting run; when a run ends,
    /// the waiting ones are admitted oldest first, as far as there is room.
    #[tokio::test]
    async fn waiting_runs_are_admitted_in_arrival_order() -> Result<(), StoreError> {
        let (store, _db) = testdb::open().await;
        let one = Admission::AtMost(1);
        // Ids made in one millisecond are in no particular order.
        let mut ids = [RunId::new(), RunId::new(), RunId::new()];
        ids.sort();
        let [first, second, third] = ids;
        for (id, admitted) in [(first, true), (second, false), (third, false)] {
            sqlx::query(
                "INSERT INTO runs (id, job, params, spec, status, created_at, admission, admitted) \
                 VALUES ($1, 'j', '{}', '{}', 'queued', 0, $2, $3)",
            )
            .bind(id.to_string())
            .bind(crate::protocol::admission_text(one))
            .bind(admitted)
            .execute(store.pool())
            .await
            .unwrap();
        }
        let now = Utc::now();
        assert!(!write!(store, |c| admits_arrival(
            c,
            "j",
            Admission::Unlimited
        ))?);
        assert!(write!(store, |c| admits_arrival(c, "k", one))?);
        assert_eq!(write!(store, |c| admit_waiting(c, "j", now))?, []);

        sqlx::query("UPDATE runs SET status = 'succeeded' WHERE id = $1")
            .bind(first.to_string())
            .execute(store.pool())
            .await
            .unwrap();
        assert_eq!(write!(store, |c| admit_waiting(c, "j", now))?, [second]);
        let outbox: Vec<(String, i64)> = sqlx::query_as("SELECT run_id, attempt FROM outbox")
            .fetch_all(store.pool())
            .await
            .unwrap();
        assert_eq!(outbox, [(second.to_string(), 1)]);
        Ok(())
    }
}
