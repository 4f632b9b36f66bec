//! Schedule slots, scheduler cursors and pauses. A slot is kept under its identity
//! (job, schedule, nominal instant), and `fire_slot` decides and writes inside one
//! write-locked transaction, so however many schedulers share the file a slot fires
//! at most once; the overlap rule is `domain::schedule::decide_overlap`'s.

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, Utc};
use sqlx::sqlite::SqliteRow;

use super::admission::ACTIVE_STATUSES;
use super::runs::{cancel_run, insert_new_run};
use super::sync::{exec, sync_on};
use super::{SqliteStore, admission_col, col, corrupt, db, ms, run_id_col, time_col};
use crate::domain::ports::{
    Cursor, FireResult, Firing, NewRun, Pause, Schedules, SlotKey, SlotOutcome, SlotRecord,
    StoreError,
};
use crate::domain::run::RunId;
use crate::domain::schedule::{
    Activity, Admission, Overlap, OverlapDecision, SkipReason, decide_overlap,
};
use crate::protocol::{StoredSlotOutcome, date_text, parse_date, parse_slot_outcome};

const SLOT_COLUMNS: &str =
    "job, schedule, nominal, fire_at, business_date, outcome, run_id, reason, detail, recorded_at";

fn slot_from_row(row: &SqliteRow) -> Result<SlotRecord, StoreError> {
    let outcome: String = col(row, "outcome")?;
    let run_id: Option<String> = col(row, "run_id")?;
    let reason: Option<String> = col(row, "reason")?;
    let business_date: String = col(row, "business_date")?;
    Ok(SlotRecord {
        key: SlotKey {
            job: col(row, "job")?,
            schedule: col(row, "schedule")?,
            nominal: time_col(row, "nominal")?,
        },
        fire_at: time_col(row, "fire_at")?,
        business_date: parse_date(&business_date).map_err(|e| corrupt("business_date", e))?,
        outcome: parse_slot_outcome(&outcome, run_id.as_deref(), reason.as_deref())
            .map_err(|e| corrupt("slot outcome", e))?,
        detail: col(row, "detail")?,
        recorded_at: time_col(row, "recorded_at")?,
    })
}

/// A slot to record, as `fire_slot` and `skip_slot` write it.
struct NewSlot<'a> {
    key: &'a SlotKey,
    fire_at: DateTime<Utc>,
    business_date: NaiveDate,
    outcome: SlotOutcome,
    detail: Option<&'a str>,
    now: DateTime<Utc>,
}

/// Record the slot unless it is accounted for already; `true` when it was written.
async fn insert_slot(
    conn: &mut sqlx::SqliteConnection,
    slot: NewSlot<'_>,
) -> Result<bool, StoreError> {
    let stored = StoredSlotOutcome::from(&slot.outcome);
    let done = sqlx::query(
        "INSERT INTO schedule_slots (job, schedule, nominal, fire_at, business_date, outcome, run_id, \
         reason, detail, recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
         ON CONFLICT (job, schedule, nominal) DO NOTHING",
    )
    .bind(&slot.key.job)
    .bind(&slot.key.schedule)
    .bind(ms(slot.key.nominal))
    .bind(ms(slot.fire_at))
    .bind(date_text(slot.business_date))
    .bind(stored.outcome)
    .bind(stored.run_id)
    .bind(stored.reason)
    .bind(slot.detail)
    .bind(ms(slot.now))
    .execute(&mut *conn)
    .await
    .map_err(db)?;
    Ok(done.rows_affected() == 1)
}

/// A slot's run (with its outbox row when admitted) and the slot recorded as fired by it,
/// inside the caller's transaction.
async fn insert_fired(
    conn: &mut sqlx::SqliteConnection,
    run: &NewRun,
    slot: NewSlot<'_>,
) -> Result<(), StoreError> {
    sync_on(&mut *conn, |c| insert_new_run(c, run)).await?;
    insert_slot(conn, slot).await?;
    Ok(())
}

async fn slot_outcome(
    conn: &mut sqlx::SqliteConnection,
    key: &SlotKey,
) -> Result<Option<SlotOutcome>, StoreError> {
    let sql = sqlx::AssertSqlSafe(format!(
        "SELECT {SLOT_COLUMNS} FROM schedule_slots WHERE job = ? AND schedule = ? AND nominal = ?"
    ));
    let row = sqlx::query(sql)
        .bind(&key.job)
        .bind(&key.schedule)
        .bind(ms(key.nominal))
        .fetch_optional(&mut *conn)
        .await
        .map_err(db)?;
    row.map(|row| slot_from_row(&row).map(|s| s.outcome))
        .transpose()
}

/// A run of the job that is not final, as the overlap rule needs to see it.
struct ActiveRun {
    id: RunId,
    admitted: bool,
    admission: Admission,
}

/// The job's runs that are not final, oldest first.
async fn active_runs(
    conn: &mut sqlx::SqliteConnection,
    job: &str,
) -> Result<Vec<ActiveRun>, StoreError> {
    // Through `runs_active`, as an accept's count: the job's runs in flight, never its
    // history (each firing holds the writer).
    let sql = sqlx::AssertSqlSafe(format!(
        "SELECT id, admitted, admission FROM runs WHERE job = ? AND {ACTIVE_STATUSES} ORDER BY id"
    ));
    let rows = sqlx::query(sql)
        .bind(job)
        .fetch_all(&mut *conn)
        .await
        .map_err(db)?;
    rows.iter()
        .map(|row| {
            Ok(ActiveRun {
                id: run_id_col(row, "id")?,
                admitted: col::<i64>(row, "admitted")? != 0,
                admission: admission_col(row)?,
            })
        })
        .collect()
}

fn activity(runs: &[ActiveRun]) -> Activity {
    let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    Activity {
        active: count(runs.len()),
        buffered_waiting: count(
            runs.iter()
                .filter(|r| !r.admitted && r.admission == Admission::Alone)
                .count(),
        ),
    }
}

#[async_trait]
impl Schedules for SqliteStore {
    async fn fire_slot(
        &self,
        slot: &SlotKey,
        fire_at: DateTime<Utc>,
        business_date: NaiveDate,
        run: &NewRun,
        overlap: Overlap,
        now: DateTime<Utc>,
    ) -> Result<Firing, StoreError> {
        let mut tx = self.begin_write().await?;
        if let Some(outcome) = slot_outcome(&mut tx, slot).await? {
            return Ok(Firing {
                result: FireResult::AlreadyAccounted(outcome),
                cancelled: Vec::new(),
            });
        }
        let active = active_runs(&mut tx, &slot.job).await?;
        let mut cancelled = Vec::new();
        let admission = match decide_overlap(overlap, activity(&active)) {
            OverlapDecision::Skip => {
                let detail = active
                    .first()
                    .map(|r| format!("run {} of the job was active", r.id));
                let new = NewSlot {
                    key: slot,
                    fire_at,
                    business_date,
                    outcome: SlotOutcome::Skipped(SkipReason::Overlap),
                    detail: detail.as_deref(),
                    now,
                };
                insert_slot(&mut tx, new).await?;
                tx.commit().await?;
                return Ok(Firing {
                    result: FireResult::SkippedOverlap,
                    cancelled,
                });
            }
            OverlapDecision::Start => run.admission,
            OverlapDecision::Buffer => Admission::Alone,
            OverlapDecision::CancelOthersThenStart => {
                // Every active run ends (queued) or is asked to stop (running). None is
                // left waiting, so there is nothing to admit until the new run arrives.
                for other in &active {
                    let id = other.id;
                    sync_on(&mut tx, |c| cancel_run(c, id, false, now)).await?;
                    cancelled.push(other.id);
                }
                run.admission
            }
        };
        let new_run = NewRun {
            admission,
            ..run.clone()
        };
        let fired = NewSlot {
            key: slot,
            fire_at,
            business_date,
            outcome: SlotOutcome::Fired(run.id),
            detail: None,
            now,
        };
        insert_fired(&mut tx, &new_run, fired).await?;
        tx.commit().await?;
        Ok(Firing {
            result: FireResult::Fired(run.id),
            cancelled,
        })
    }

    async fn backfill_slot(
        &self,
        slot: &SlotKey,
        fire_at: DateTime<Utc>,
        business_date: NaiveDate,
        run: &NewRun,
        now: DateTime<Utc>,
    ) -> Result<FireResult, StoreError> {
        let mut tx = self.begin_write().await?;
        match slot_outcome(&mut tx, slot).await? {
            Some(SlotOutcome::Fired(id)) => {
                return Ok(FireResult::AlreadyAccounted(SlotOutcome::Fired(id)));
            }
            Some(SlotOutcome::Skipped(_)) => {
                sqlx::query(
                    "DELETE FROM schedule_slots WHERE job = ? AND schedule = ? AND nominal = ?",
                )
                .bind(&slot.job)
                .bind(&slot.schedule)
                .bind(ms(slot.nominal))
                .execute(&mut *tx)
                .await
                .map_err(db)?;
            }
            None => {}
        }
        let fired = NewSlot {
            key: slot,
            fire_at,
            business_date,
            outcome: SlotOutcome::Fired(run.id),
            detail: Some("backfill"),
            now,
        };
        insert_fired(&mut tx, run, fired).await?;
        tx.commit().await?;
        Ok(FireResult::Fired(run.id))
    }

    async fn skip_slot(
        &self,
        slot: &SlotKey,
        fire_at: DateTime<Utc>,
        business_date: NaiveDate,
        reason: SkipReason,
        detail: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin_write().await?;
        let new = NewSlot {
            key: slot,
            fire_at,
            business_date,
            outcome: SlotOutcome::Skipped(reason),
            detail,
            now,
        };
        let written = insert_slot(&mut tx, new).await?;
        tx.commit().await?;
        Ok(written)
    }

    async fn slots(
        &self,
        job: &str,
        schedule: Option<&str>,
        limit: u32,
    ) -> Result<Vec<SlotRecord>, StoreError> {
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {SLOT_COLUMNS} FROM schedule_slots WHERE job = ?1 AND (?2 IS NULL OR schedule = ?2) \
             ORDER BY nominal DESC, schedule LIMIT ?3"
        ));
        let rows = sqlx::query(sql)
            .bind(job)
            .bind(schedule)
            .bind(i64::from(limit))
            .fetch_all(&self.reader)
            .await
            .map_err(db)?;
        rows.iter().map(slot_from_row).collect()
    }

    async fn slots_between(
        &self,
        job: &str,
        schedule: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<SlotRecord>, StoreError> {
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {SLOT_COLUMNS} FROM schedule_slots WHERE job = ? AND schedule = ? \
             AND nominal >= ? AND nominal <= ? ORDER BY nominal"
        ));
        let rows = sqlx::query(sql)
            .bind(job)
            .bind(schedule)
            .bind(ms(from))
            .bind(ms(to))
            .fetch_all(&self.reader)
            .await
            .map_err(db)?;
        rows.iter().map(slot_from_row).collect()
    }

    async fn cursor(&self, job: &str, schedule: &str) -> Result<Option<Cursor>, StoreError> {
        let row = sqlx::query(
            "SELECT evaluated_until, definition FROM schedule_cursors WHERE job = ? AND schedule = ?",
        )
        .bind(job)
        .bind(schedule)
        .fetch_optional(&self.reader)
        .await
        .map_err(db)?;
        row.map(|row| {
            Ok(Cursor {
                evaluated_until: time_col(&row, "evaluated_until")?,
                definition: col(&row, "definition")?,
            })
        })
        .transpose()
    }

    async fn advance_cursor(
        &self,
        job: &str,
        schedule: &str,
        to: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        let row = sqlx::query(
            "SELECT evaluated_until FROM schedule_cursors WHERE job = ? AND schedule = ?",
        )
        .bind(job)
        .bind(schedule)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db)?;
        let current = row
            .map(|row| time_col(&row, "evaluated_until"))
            .transpose()?;
        // Another scheduler may have looked further already: never go back.
        if current.is_none_or(|c| to > c) {
            sqlx::query(
                "INSERT INTO schedule_cursors (job, schedule, evaluated_until) VALUES (?, ?, ?) \
                 ON CONFLICT (job, schedule) DO UPDATE SET evaluated_until = excluded.evaluated_until",
            )
            .bind(job)
            .bind(schedule)
            .bind(ms(to))
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        }
        tx.commit().await
    }

    async fn rebase_cursor(
        &self,
        job: &str,
        schedule: &str,
        definition: &str,
        to: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        let row = sqlx::query(
            "SELECT evaluated_until FROM schedule_cursors WHERE job = ? AND schedule = ?",
        )
        .bind(job)
        .bind(schedule)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db)?;
        let current = row
            .map(|row| time_col(&row, "evaluated_until"))
            .transpose()?;
        // The definition changes; the cursor still never goes back.
        let until = current.map_or(to, |c| c.max(to));
        sqlx::query(
            "INSERT INTO schedule_cursors (job, schedule, evaluated_until, definition) \
             VALUES (?, ?, ?, ?) ON CONFLICT (job, schedule) DO UPDATE \
             SET evaluated_until = excluded.evaluated_until, definition = excluded.definition",
        )
        .bind(job)
        .bind(schedule)
        .bind(ms(until))
        .bind(definition)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        tx.commit().await
    }

    async fn pause(&self, job: &str, schedule: &str) -> Result<Option<Pause>, StoreError> {
        let row =
            sqlx::query("SELECT note, at FROM schedule_pauses WHERE job = ? AND schedule = ?")
                .bind(job)
                .bind(schedule)
                .fetch_optional(&self.reader)
                .await
                .map_err(db)?;
        row.map(|row| {
            Ok(Pause {
                note: col(&row, "note")?,
                at: time_col(&row, "at")?,
            })
        })
        .transpose()
    }

    async fn set_pause(
        &self,
        job: &str,
        schedule: &str,
        pause: Option<&Pause>,
    ) -> Result<(), StoreError> {
        let (job, schedule) = (job.to_owned(), schedule.to_owned());
        let pause = pause.map(|p| (p.note.clone(), ms(p.at)));
        self.group
            .run(move |c| {
                match pause {
                    Some((note, at)) => exec(
                        c,
                        "INSERT INTO schedule_pauses (job, schedule, note, at) VALUES (?, ?, ?, ?) \
                         ON CONFLICT (job, schedule) DO UPDATE SET note = excluded.note, at = excluded.at",
                        rusqlite::params![job, schedule, note, at],
                    ),
                    None => exec(
                        c,
                        "DELETE FROM schedule_pauses WHERE job = ? AND schedule = ?",
                        rusqlite::params![job, schedule],
                    ),
                }
                .map(drop)
            })
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ports::RunRecords;
    use crate::domain::schedule::Overlap;
    use crate::store::suite::{hour, slot, slot_run};

    /// Two stores on one file (two schedulers, or two `serve` processes) race for the
    /// same slots: each slot fires exactly once, and the loser is told which run won.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_stores_on_one_file_never_fire_a_slot_twice() {
        let dir = tempfile::tempdir().unwrap();
        let a = SqliteStore::open(dir.path()).await.unwrap();
        let b = SqliteStore::open(dir.path()).await.unwrap();
        let day = NaiveDate::from_ymd_opt(2026, 3, 1).unwrap();
        for h in 0..20 {
            let key = slot("default", h);
            let (run_a, run_b) = (
                slot_run(&key, Admission::Unlimited),
                slot_run(&key, Admission::Unlimited),
            );
            let now = Utc::now();
            let (fa, fb) = tokio::join!(
                a.fire_slot(&key, hour(h), day, &run_a, Overlap::Allow, now),
                b.fire_slot(&key, hour(h), day, &run_b, Overlap::Allow, now),
            );
            let results = [fa.unwrap().result, fb.unwrap().result];
            let winner = match &results {
                [
                    FireResult::Fired(id),
                    FireResult::AlreadyAccounted(SlotOutcome::Fired(w)),
                ]
                | [
                    FireResult::AlreadyAccounted(SlotOutcome::Fired(w)),
                    FireResult::Fired(id),
                ] if id == w => *id,
                other => panic!("slot {h} fired as {other:?}"),
            };
            let loser = if winner == run_a.id {
                run_b.id
            } else {
                run_a.id
            };
            assert!(a.get_run(winner).await.unwrap().is_some());
            assert!(b.get_run(loser).await.unwrap().is_none());
        }
        let runs: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM runs")
            .fetch_one(a.writer())
            .await
            .unwrap();
        assert_eq!(runs, 20);
    }
}
