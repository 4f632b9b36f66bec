//! Schedule slots, scheduler cursors and pauses. A slot is kept under its identity
//! (job, schedule, nominal instant), and `fire_slot` decides and writes inside one
//! SERIALIZABLE transaction, so however many schedulers share the database a slot fires
//! at most once; the overlap rule is `domain::schedule::decide_overlap`'s.

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, Utc};
use sqlx::PgConnection;
use sqlx::postgres::PgRow;

use super::admission::ACTIVE_STATUSES;
use super::runs::{cancel_run, insert_new_run};
use super::{PgStore, Tx, TxError, admission_col, col, db, run_id_col, store_db, time_col, write};
use crate::domain::ports::{
    Cursor, FireResult, Firing, NewRun, Pause, Schedules, SlotKey, SlotOutcome, SlotRecord,
    StoreError,
};
use crate::domain::run::RunId;
use crate::domain::schedule::{
    Activity, Admission, Overlap, OverlapDecision, SkipReason, decide_overlap,
};
use crate::protocol::{StoredSlotOutcome, date_text, parse_date, parse_slot_outcome};
use crate::store::common::{corrupt, ms};

const SLOT_COLUMNS: &str =
    "job, schedule, nominal, fire_at, business_date, outcome, run_id, reason, detail, recorded_at";

fn slot_from_row(row: &PgRow) -> Result<SlotRecord, StoreError> {
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
/// (Under SERIALIZABLE, a slot a concurrent transaction recorded but this one cannot
/// see is a conflict, not a silent no-op: the operation runs again and sees it.)
async fn insert_slot(c: &mut PgConnection, slot: NewSlot<'_>) -> Tx<bool> {
    let stored = StoredSlotOutcome::from(&slot.outcome);
    let done = sqlx::query(
        "INSERT INTO schedule_slots (job, schedule, nominal, fire_at, business_date, outcome, run_id, \
         reason, detail, recorded_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
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
    .execute(&mut *c)
    .await
    .map_err(db)?;
    Ok(done.rows_affected() == 1)
}

/// A slot's run (with its outbox row when admitted) and the slot recorded as fired by it,
/// inside the caller's transaction.
async fn insert_fired(c: &mut PgConnection, run: &NewRun, slot: NewSlot<'_>) -> Tx<()> {
    insert_new_run(&mut *c, run).await?;
    if !insert_slot(&mut *c, slot).await? {
        // The caller read the slot as absent in this transaction; recorded since, it is
        // a concurrent firing's: never keep a run beside a slot another run holds.
        return Err(TxError::Conflict(
            "the slot was recorded by a concurrent firing".to_owned(),
        ));
    }
    Ok(())
}

async fn slot_outcome(c: &mut PgConnection, key: &SlotKey) -> Tx<Option<SlotOutcome>> {
    let sql = sqlx::AssertSqlSafe(format!(
        "SELECT {SLOT_COLUMNS} FROM schedule_slots WHERE job = $1 AND schedule = $2 AND nominal = $3"
    ));
    let row = sqlx::query(sql)
        .bind(&key.job)
        .bind(&key.schedule)
        .bind(ms(key.nominal))
        .fetch_optional(&mut *c)
        .await
        .map_err(db)?;
    Ok(row
        .map(|row| slot_from_row(&row).map(|s| s.outcome))
        .transpose()?)
}

/// A run of the job that is not final, as the overlap rule needs to see it.
struct ActiveRun {
    id: RunId,
    admitted: bool,
    admission: Admission,
}

/// The job's runs that are not final, oldest first.
async fn active_runs(c: &mut PgConnection, job: &str) -> Tx<Vec<ActiveRun>> {
    // Through `runs_active`, as an accept's count: the job's runs in flight, never its
    // history (the SERIALIZABLE read also makes a concurrent accept or firing of the job
    // conflict with this one).
    let sql = sqlx::AssertSqlSafe(format!(
        "SELECT id, admitted, admission FROM runs WHERE job = $1 AND {ACTIVE_STATUSES} ORDER BY id"
    ));
    let rows = sqlx::query(sql)
        .bind(job)
        .fetch_all(&mut *c)
        .await
        .map_err(db)?;
    let runs = rows
        .iter()
        .map(|row| {
            Ok(ActiveRun {
                id: run_id_col(row, "id")?,
                admitted: col(row, "admitted")?,
                admission: admission_col(row)?,
            })
        })
        .collect::<Result<_, StoreError>>()?;
    Ok(runs)
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

/// `fire_slot`'s transaction.
async fn fire(
    c: &mut PgConnection,
    slot: &SlotKey,
    fire_at: DateTime<Utc>,
    business_date: NaiveDate,
    run: &NewRun,
    overlap: Overlap,
    now: DateTime<Utc>,
) -> Tx<Firing> {
    if let Some(outcome) = slot_outcome(&mut *c, slot).await? {
        return Ok(Firing {
            result: FireResult::AlreadyAccounted(outcome),
            cancelled: Vec::new(),
        });
    }
    let active = active_runs(&mut *c, &slot.job).await?;
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
            insert_slot(&mut *c, new).await?;
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
                cancel_run(&mut *c, other.id, false, now).await?;
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
    insert_fired(&mut *c, &new_run, fired).await?;
    Ok(Firing {
        result: FireResult::Fired(run.id),
        cancelled,
    })
}

/// `backfill_slot`'s transaction.
async fn backfill(
    c: &mut PgConnection,
    slot: &SlotKey,
    fire_at: DateTime<Utc>,
    business_date: NaiveDate,
    run: &NewRun,
    now: DateTime<Utc>,
) -> Tx<FireResult> {
    match slot_outcome(&mut *c, slot).await? {
        Some(SlotOutcome::Fired(id)) => {
            return Ok(FireResult::AlreadyAccounted(SlotOutcome::Fired(id)));
        }
        Some(SlotOutcome::Skipped(_)) => {
            sqlx::query(
                "DELETE FROM schedule_slots WHERE job = $1 AND schedule = $2 AND nominal = $3",
            )
            .bind(&slot.job)
            .bind(&slot.schedule)
            .bind(ms(slot.nominal))
            .execute(&mut *c)
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
    insert_fired(&mut *c, run, fired).await?;
    Ok(FireResult::Fired(run.id))
}

/// The cursor's `evaluated_until`, inside the caller's transaction.
async fn evaluated_until(
    c: &mut PgConnection,
    job: &str,
    schedule: &str,
) -> Tx<Option<DateTime<Utc>>> {
    let row = sqlx::query(
        "SELECT evaluated_until FROM schedule_cursors WHERE job = $1 AND schedule = $2",
    )
    .bind(job)
    .bind(schedule)
    .fetch_optional(&mut *c)
    .await
    .map_err(db)?;
    Ok(row
        .map(|row| time_col(&row, "evaluated_until"))
        .transpose()?)
}

/// `advance_cursor`'s transaction.
async fn advance(c: &mut PgConnection, job: &str, schedule: &str, to: DateTime<Utc>) -> Tx<()> {
    let current = evaluated_until(&mut *c, job, schedule).await?;
    // Another scheduler may have looked further already: never go back.
    if current.is_none_or(|cur| to > cur) {
        sqlx::query(
            "INSERT INTO schedule_cursors (job, schedule, evaluated_until) VALUES ($1, $2, $3) \
             ON CONFLICT (job, schedule) DO UPDATE SET evaluated_until = excluded.evaluated_until",
        )
        .bind(job)
        .bind(schedule)
        .bind(ms(to))
        .execute(&mut *c)
        .await
        .map_err(db)?;
    }
    Ok(())
}

/// `rebase_cursor`'s transaction.
async fn rebase(
    c: &mut PgConnection,
    job: &str,
    schedule: &str,
    definition: &str,
    to: DateTime<Utc>,
) -> Tx<()> {
    let current = evaluated_until(&mut *c, job, schedule).await?;
    // The definition changes; the cursor still never goes back.
    let until = current.map_or(to, |cur| cur.max(to));
    sqlx::query(
        "INSERT INTO schedule_cursors (job, schedule, evaluated_until, definition) \
         VALUES ($1, $2, $3, $4) ON CONFLICT (job, schedule) DO UPDATE \
         SET evaluated_until = excluded.evaluated_until, definition = excluded.definition",
    )
    .bind(job)
    .bind(schedule)
    .bind(ms(until))
    .bind(definition)
    .execute(&mut *c)
    .await
    .map_err(db)?;
    Ok(())
}

/// `set_pause`'s transaction.
async fn store_pause(
    c: &mut PgConnection,
    job: &str,
    schedule: &str,
    pause: Option<&Pause>,
) -> Tx<()> {
    let query = match pause {
        Some(p) => sqlx::query(
            "INSERT INTO schedule_pauses (job, schedule, note, at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (job, schedule) DO UPDATE SET note = excluded.note, at = excluded.at",
        )
        .bind(job)
        .bind(schedule)
        .bind(p.note.as_deref())
        .bind(ms(p.at)),
        None => sqlx::query("DELETE FROM schedule_pauses WHERE job = $1 AND schedule = $2")
            .bind(job)
            .bind(schedule),
    };
    query.execute(&mut *c).await.map_err(db)?;
    Ok(())
}

#[async_trait]
impl Schedules for PgStore {
    async fn fire_slot(
        &self,
        slot: &SlotKey,
        fire_at: DateTime<Utc>,
        business_date: NaiveDate,
        run: &NewRun,
        overlap: Overlap,
        now: DateTime<Utc>,
    ) -> Result<Firing, StoreError> {
        write!(self, |c| fire(
            c,
            slot,
            fire_at,
            business_date,
            run,
            overlap,
            now
        ))
    }

    async fn backfill_slot(
        &self,
        slot: &SlotKey,
        fire_at: DateTime<Utc>,
        business_date: NaiveDate,
        run: &NewRun,
        now: DateTime<Utc>,
    ) -> Result<FireResult, StoreError> {
        write!(self, |c| backfill(
            c,
            slot,
            fire_at,
            business_date,
            run,
            now
        ))
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
        write!(self, |c| insert_slot(
            c,
            NewSlot {
                key: slot,
                fire_at,
                business_date,
                outcome: SlotOutcome::Skipped(reason),
                detail,
                now,
            }
        ))
    }

    async fn slots(
        &self,
        job: &str,
        schedule: Option<&str>,
        limit: u32,
    ) -> Result<Vec<SlotRecord>, StoreError> {
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {SLOT_COLUMNS} FROM schedule_slots WHERE job = $1 \
             AND ($2::TEXT IS NULL OR schedule = $2) ORDER BY nominal DESC, schedule LIMIT $3"
        ));
        let rows = sqlx::query(sql)
            .bind(job)
            .bind(schedule)
            .bind(i64::from(limit))
            .fetch_all(self.pool())
            .await
            .map_err(store_db)?;
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
            "SELECT {SLOT_COLUMNS} FROM schedule_slots WHERE job = $1 AND schedule = $2 \
             AND nominal >= $3 AND nominal <= $4 ORDER BY nominal"
        ));
        let rows = sqlx::query(sql)
            .bind(job)
            .bind(schedule)
            .bind(ms(from))
            .bind(ms(to))
            .fetch_all(self.pool())
            .await
            .map_err(store_db)?;
        rows.iter().map(slot_from_row).collect()
    }

    async fn cursor(&self, job: &str, schedule: &str) -> Result<Option<Cursor>, StoreError> {
        let row = sqlx::query(
            "SELECT evaluated_until, definition FROM schedule_cursors \
             WHERE job = $1 AND schedule = $2",
        )
        .bind(job)
        .bind(schedule)
        .fetch_optional(self.pool())
        .await
        .map_err(store_db)?;
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
        write!(self, |c| advance(c, job, schedule, to))
    }

    async fn rebase_cursor(
        &self,
        job: &str,
        schedule: &str,
        definition: &str,
        to: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        write!(self, |c| rebase(c, job, schedule, definition, to))
    }

    async fn pause(&self, job: &str, schedule: &str) -> Result<Option<Pause>, StoreError> {
        let row =
            sqlx::query("SELECT note, at FROM schedule_pauses WHERE job = $1 AND schedule = $2")
                .bind(job)
                .bind(schedule)
                .fetch_optional(self.pool())
                .await
                .map_err(store_db)?;
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
        write!(self, |c| store_pause(c, job, schedule, pause))
    }
}

#[cfg(test)]
mod tests;
