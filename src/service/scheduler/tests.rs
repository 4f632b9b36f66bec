//! The scheduler on a fake clock and a real (temporary) SQLite store: the store's slot
//! key is what keeps a slot from firing twice, so these tests use the real one. Months
//! of slots, DST changes and downtime pass without sleeping.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::domain::job::{JobName, PullPolicy, Resources, Schedule};
use crate::domain::ports::{Outbox, RunRecords, Schedules, SlotOutcome};
use crate::domain::run::RunStatus;
use crate::domain::schedule::{CatchUp, Overlap, Rule, SkipReason};
use crate::logsink::FileLogSink;
use crate::service::events::RunEvents;
use crate::store::SqliteStore;

mod changes;

struct FakeClock(Mutex<DateTime<Utc>>);

impl FakeClock {
    fn set(&self, t: DateTime<Utc>) {
        *self.0.lock().unwrap() = t;
    }
}

impl Clock for FakeClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock().unwrap()
    }
}

/// The catalog; `set` stands for a reload (SIGHUP) with changed job files.
struct Jobs(Mutex<Vec<Arc<JobSpec>>>);

impl Jobs {
    fn new(jobs: Vec<Arc<JobSpec>>) -> Arc<Jobs> {
        Arc::new(Jobs(Mutex::new(jobs)))
    }

    fn set(&self, jobs: Vec<Arc<JobSpec>>) {
        *self.0.lock().unwrap() = jobs;
    }
}

impl JobLookup for Jobs {
    fn job(&self, name: &str) -> Option<Arc<JobSpec>> {
        let jobs = self.0.lock().unwrap();
        jobs.iter().find(|j| j.name.as_str() == name).cloned()
    }
    fn jobs(&self) -> Vec<Arc<JobSpec>> {
        self.0.lock().unwrap().clone()
    }
}

fn cron(name: &str, expr: &str, zone: &str) -> ScheduleSpec {
    let tz: chrono_tz::Tz = zone.parse().unwrap();
    ScheduleSpec::new(
        name,
        Rule::Cron(Schedule::parse(expr, Some(zone)).unwrap()),
        tz,
    )
}

fn job(name: &str, schedules: Vec<ScheduleSpec>, max_concurrent: Option<u32>) -> Arc<JobSpec> {
    Arc::new(JobSpec {
        logs: Default::default(),
        name: JobName::parse(name).unwrap(),
        description: None,
        image: "img:1".to_owned(),
        command: vec!["true".into()],
        workdir: None,
        user: None,
        env: BTreeMap::new(),
        secret_env: BTreeMap::new(),
        pull: PullPolicy::Never,
        resources: Resources::default(),
        timeout: None,
        stop_grace: Duration::from_secs(1),
        network: "none".into(),
        hardening: Default::default(),
        params: BTreeMap::new(),
        schedules,
        max_concurrent,
        retry: Default::default(),
        webhook: None,
        callback: None,
    })
}

struct Fixture {
    scheduler: Scheduler,
    jobs: Arc<Jobs>,
    clock: Arc<FakeClock>,
    store: Arc<SqliteStore>,
    _dir: tempfile::TempDir,
}

async fn fixture_on(
    dir: tempfile::TempDir,
    jobs: Vec<Arc<JobSpec>>,
    start: DateTime<Utc>,
) -> Fixture {
    let store = Arc::new(SqliteStore::open(dir.path()).await.unwrap());
    let catalog = Jobs::new(jobs);
    let jobs: Arc<dyn JobLookup> = catalog.clone();
    let runs = Runs::new(
        jobs.clone(),
        store.clone(),
        Arc::new(FileLogSink::new(dir.path().join("logs"))),
        RunEvents::new(),
        Arc::new(Notify::new()),
        CancellationToken::new(),
    );
    let clock = Arc::new(FakeClock(Mutex::new(start)));
    let scheduler = Scheduler::new(
        jobs,
        store.clone(),
        runs,
        clock.clone(),
        Duration::from_secs(30),
    );
    Fixture {
        scheduler,
        jobs: catalog,
        clock,
        store,
        _dir: dir,
    }
}

async fn fixture(jobs: Vec<Arc<JobSpec>>, start: DateTime<Utc>) -> Fixture {
    fixture_on(tempfile::tempdir().unwrap(), jobs, start).await
}

impl Fixture {
    /// Tick at `t` (the clock is set there first).
    async fn tick_at(&self, t: DateTime<Utc>) -> Vec<SlotHandled> {
        self.clock.set(t);
        self.scheduler.tick(t).await.unwrap()
    }

    /// Tick every `step` from the clock's time to `until`.
    async fn run_until(&self, until: DateTime<Utc>, step: chrono::Duration) -> Vec<SlotHandled> {
        let mut all = Vec::new();
        let mut t = self.clock.now();
        while t < until {
            t = (t + step).min(until);
            all.extend(self.tick_at(t).await);
        }
        all
    }

    /// Every slot of the job, oldest first.
    async fn slots(&self, job: &str) -> Vec<crate::domain::ports::SlotRecord> {
        let mut s = self.store.slots(job, None, 10_000).await.unwrap();
        s.reverse();
        s
    }

    /// Finish every queued run, as a worker would (so overlap has nothing to see).
    async fn finish_all(&self, job: &str) {
        let filter = crate::domain::ports::RunFilter {
            job: Some(job.to_owned()),
            status: Some(RunStatus::Queued),
            limit: 1000,
            ..Default::default()
        };
        for run in self.store.list_runs(&filter).await.unwrap() {
            self.store.cancel(run.id, self.clock.now()).await.unwrap();
        }
    }
}

fn utc(y: i32, m: u32, d: u32, h: u32, min: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, m, d, h, min, 0).unwrap()
}

fn fired(slots: &[crate::domain::ports::SlotRecord]) -> Vec<DateTime<Utc>> {
    slots
        .iter()
        .filter(|s| matches!(s.outcome, SlotOutcome::Fired(_)))
        .map(|s| s.key.nominal)
        .collect()
}

fn skipped(slots: &[crate::domain::ports::SlotRecord], why: SkipReason) -> Vec<DateTime<Utc>> {
    slots
        .iter()
        .filter(|s| s.outcome == SlotOutcome::Skipped(why))
        .map(|s| s.key.nominal)
        .collect()
}

#[tokio::test]
async fn a_new_schedule_starts_from_now_and_each_slot_fires_once() {
    let mut s = cron("default", "*/10 * * * *", "UTC");
    s.overlap = Overlap::Allow;
    let f = fixture(vec![job("tick", vec![s], None)], utc(2026, 1, 5, 9, 3)).await;
    assert!(
        f.tick_at(utc(2026, 1, 5, 9, 3)).await.is_empty(),
        "first sight registers only"
    );
    f.run_until(utc(2026, 1, 5, 10, 0), chrono::Duration::seconds(20))
        .await;
    // The same instant again: nothing new.
    assert!(f.tick_at(utc(2026, 1, 5, 10, 0)).await.is_empty());
    let slots = f.slots("tick").await;
    let expected: Vec<_> = [10, 20, 30, 40, 50]
        .map(|m| utc(2026, 1, 5, 9, m))
        .into_iter()
        .chain([utc(2026, 1, 5, 10, 0)])
        .collect();
    assert_eq!(fired(&slots), expected);
    let filter = crate::domain::ports::RunFilter {
        job: Some("tick".into()),
        status: None,
        limit: 100,
        ..Default::default()
    };
    let mut slots_of_runs: Vec<_> = f
        .store
        .list_runs(&filter)
        .await
        .unwrap()
        .into_iter()
        .map(|r| match r.trigger {
            crate::domain::run::Trigger::Schedule { slot, .. } => slot,
            other => panic!("not a scheduled run: {other:?}"),
        })
        .collect();
    slots_of_runs.sort();
    assert_eq!(
        slots_of_runs, expected,
        "one run per slot, each knowing its slot"
    );
    let published = f
        .store
        .pending_outbox(100, utc(2026, 1, 5, 10, 1))
        .await
        .unwrap();
    assert_eq!(published.len(), 6, "one run (one publish) per slot");
}

#[tokio::test]
async fn overlap_skip_records_the_slot_while_a_run_is_active() {
    let s = cron("default", "0 * * * *", "UTC"); // overlap = skip by default
    let f = fixture(vec![job("busy", vec![s], None)], utc(2026, 1, 5, 0, 30)).await;
    f.tick_at(utc(2026, 1, 5, 0, 30)).await;
    f.run_until(utc(2026, 1, 5, 3, 0), chrono::Duration::minutes(1))
        .await;
    let slots = f.slots("busy").await;
    assert_eq!(fired(&slots), [utc(2026, 1, 5, 1, 0)]);
    assert_eq!(
        skipped(&slots, SkipReason::Overlap),
        [utc(2026, 1, 5, 2, 0), utc(2026, 1, 5, 3, 0)]
    );
    f.finish_all("busy").await;
    f.run_until(utc(2026, 1, 5, 4, 0), chrono::Duration::minutes(1))
        .await;
    assert_eq!(fired(&f.slots("busy").await).len(), 2);
}

#[tokio::test]
async fn downtime_is_caught_up_by_policy_and_every_missed_slot_is_recorded() {
    let mk = |name: &str, catch_up: CatchUp| {
        let mut s = cron(name, "0 * * * *", "UTC");
        s.catch_up = catch_up;
        s.overlap = Overlap::Allow;
        s.catch_up_window = Duration::from_secs(5 * 3600);
        s.max_catch_up = 2;
        s
    };
    let schedules = vec![
        mk("none", CatchUp::None),
        mk("latest", CatchUp::Latest),
        mk("all", CatchUp::All),
    ];
    let f = fixture(vec![job("down", schedules, None)], utc(2026, 1, 5, 0, 30)).await;
    f.tick_at(utc(2026, 1, 5, 0, 30)).await;
    // Down from 00:30 to 08:10: slots 01:00 .. 08:00 were missed; the window (5 h)
    // reaches back to 03:10.
    f.tick_at(utc(2026, 1, 5, 8, 10)).await;
    let slots = f.slots("down").await;
    let of = |name: &str| -> Vec<_> {
        slots
            .iter()
            .filter(|s| s.key.schedule == name)
            .cloned()
            .collect()
    };
    let h = |hours: &[u32]| -> Vec<DateTime<Utc>> {
        hours.iter().map(|h| utc(2026, 1, 5, *h, 0)).collect()
    };
    for name in ["none", "latest", "all"] {
        let mine = of(name);
        assert_eq!(mine.len(), 8, "{name}: every slot accounted for: {mine:#?}");
        assert_eq!(
            skipped(&mine, SkipReason::OutsideCatchUpWindow),
            h(&[1, 2, 3]),
            "{name}"
        );
    }
    assert_eq!(
        skipped(&of("none"), SkipReason::CatchUpLimit),
        h(&[4, 5, 6, 7, 8])
    );
    assert_eq!(fired(&of("latest")), h(&[8]));
    assert_eq!(
        skipped(&of("latest"), SkipReason::CatchUpLimit),
        h(&[4, 5, 6, 7])
    );
    assert_eq!(
        fired(&of("all")),
        h(&[7, 8]),
        "the newest max_catch_up fire"
    );
    assert_eq!(skipped(&of("all"), SkipReason::CatchUpLimit), h(&[4, 5, 6]));
}

#[tokio::test]
async fn paused_slots_are_recorded_suspended_and_a_backfill_fires_them_once() {
    let mut s = cron("default", "0 * * * *", "UTC");
    s.overlap = Overlap::Allow;
    let f = fixture(vec![job("pausy", vec![s], Some(1))], utc(2026, 1, 5, 0, 30)).await;
    f.tick_at(utc(2026, 1, 5, 0, 30)).await;
    let paused = f
        .scheduler
        .pause("pausy", None, Some("maintenance".into()))
        .await
        .unwrap();
    assert_eq!(paused, ["default"]);
    f.run_until(utc(2026, 1, 5, 3, 0), chrono::Duration::minutes(1))
        .await;
    let states = f.scheduler.states("pausy", 2).await.unwrap();
    assert!(states[0].paused());
    assert_eq!(
        states[0].pause.as_ref().unwrap().note.as_deref(),
        Some("maintenance")
    );
    f.scheduler.resume("pausy", Some("default")).await.unwrap();
    f.run_until(utc(2026, 1, 5, 4, 0), chrono::Duration::minutes(1))
        .await;
    let slots = f.slots("pausy").await;
    assert_eq!(
        skipped(&slots, SkipReason::Suspended),
        [1, 2, 3].map(|h| utc(2026, 1, 5, h, 0))
    );
    assert_eq!(fired(&slots), [utc(2026, 1, 5, 4, 0)]);

    let report = f
        .scheduler
        .backfill(
            "pausy",
            "default",
            utc(2026, 1, 5, 1, 0),
            utc(2026, 1, 5, 4, 0),
        )
        .await
        .unwrap();
    let nominal = |v: &[(PlannedSlot, crate::domain::run::RunId)]| -> Vec<_> {
        v.iter().map(|(s, _)| s.nominal).collect()
    };
    assert_eq!(
        nominal(&report.fired),
        [1, 2, 3].map(|h| utc(2026, 1, 5, h, 0))
    );
    assert_eq!(nominal(&report.already_fired), [utc(2026, 1, 5, 4, 0)]);
    let again = f
        .scheduler
        .backfill(
            "pausy",
            "default",
            utc(2026, 1, 5, 1, 0),
            utc(2026, 1, 5, 4, 0),
        )
        .await
        .unwrap();
    assert!(again.fired.is_empty());
    assert_eq!(again.already_fired.len(), 4);
    // max_concurrent = 1: of the four runs, one is published; the others wait in order.
    let pending = f
        .store
        .pending_outbox(100, utc(2026, 1, 5, 5, 0))
        .await
        .unwrap();
    assert_eq!(pending.len(), 1);
    // A backfill reaching into the future, or backwards, is refused.
    for (from, to) in [
        (utc(2026, 1, 5, 1, 0), utc(2026, 1, 6, 0, 0)),
        (utc(2026, 1, 5, 3, 0), utc(2026, 1, 5, 1, 0)),
    ] {
        assert!(matches!(
            f.scheduler.backfill("pausy", "default", from, to).await,
            Err(ScheduleError::BadRange(_))
        ));
    }
    assert!(matches!(
        f.scheduler
            .backfill(
                "pausy",
                "nope",
                utc(2026, 1, 5, 1, 0),
                utc(2026, 1, 5, 2, 0)
            )
            .await,
        Err(ScheduleError::UnknownSchedule { .. })
    ));
}

#[tokio::test]
async fn dst_changes_fire_each_wall_time_once_in_new_york() {
    // 02:30 does not exist on 2026-03-08 and 01:30 happens twice on 2026-11-01.
    let mut spring = cron("spring", "30 2 * * *", "America/New_York");
    spring.overlap = Overlap::Allow;
    let mut fall = cron("fall", "30 1 * * *", "America/New_York");
    fall.overlap = Overlap::Allow;
    let f = fixture(
        vec![job("dst", vec![spring, fall], None)],
        utc(2026, 3, 7, 12, 0),
    )
    .await;
    f.tick_at(utc(2026, 3, 7, 12, 0)).await;
    f.run_until(utc(2026, 3, 9, 12, 0), chrono::Duration::minutes(5))
        .await;
    let spring_fired: Vec<_> = f
        .slots("dst")
        .await
        .into_iter()
        .filter(|s| s.key.schedule == "spring" && matches!(s.outcome, SlotOutcome::Fired(_)))
        .map(|s| s.fire_at)
        .collect();
    // 03-08 02:30 EST does not exist: fired once at 03:00 EDT (07:00 UTC).
    assert_eq!(
        spring_fired,
        [utc(2026, 3, 8, 7, 0), utc(2026, 3, 9, 6, 30)]
    );

    let f = fixture(
        vec![job(
            "dst",
            vec![cron("fall", "30 1 * * *", "America/New_York")],
            None,
        )],
        utc(2026, 10, 31, 12, 0),
    )
    .await;
    f.tick_at(utc(2026, 10, 31, 12, 0)).await;
    f.run_until(utc(2026, 11, 1, 12, 0), chrono::Duration::minutes(5))
        .await;
    // 01:30 EDT (05:30 UTC) fires; 01:30 EST (06:30 UTC) is not a second slot.
    assert_eq!(fired(&f.slots("dst").await), [utc(2026, 11, 1, 5, 30)]);
}

#[tokio::test]
async fn two_schedulers_on_one_store_fire_each_slot_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = cron("default", "* * * * *", "UTC");
    s.overlap = Overlap::Allow;
    let jobs = vec![job("shared", vec![s], None)];
    let start = utc(2026, 1, 5, 0, 0);
    let a = fixture_on(dir, jobs.clone(), start).await;
    // The second scheduler opens the same file.
    let b_store = Arc::new(SqliteStore::open(a._dir.path()).await.unwrap());
    let b_jobs: Arc<dyn JobLookup> = Jobs::new(jobs);
    let b = Scheduler::new(
        b_jobs.clone(),
        b_store.clone(),
        Runs::new(
            b_jobs,
            b_store,
            Arc::new(FileLogSink::new(a._dir.path().join("logs"))),
            RunEvents::new(),
            Arc::new(Notify::new()),
            CancellationToken::new(),
        ),
        a.clock.clone(),
        Duration::from_secs(30),
    );
    a.tick_at(start).await;
    let mut fired_by = [0usize, 0];
    for i in 1..=30 {
        let t = start + chrono::Duration::seconds(60 * i);
        a.clock.set(t);
        let (x, y) = tokio::join!(a.scheduler.tick(t), b.tick(t));
        for (n, handled) in [x.unwrap(), y.unwrap()].into_iter().enumerate() {
            fired_by[n] += handled
                .iter()
                .filter(|h| matches!(h.result, Handled::Fired(_)))
                .count();
        }
    }
    let slots = a.slots("shared").await;
    assert_eq!(fired(&slots).len(), 30);
    assert_eq!(
        fired_by[0] + fired_by[1],
        30,
        "each slot fired by one scheduler: {fired_by:?}"
    );
    let pending = a
        .store
        .pending_outbox(1000, start + chrono::Duration::hours(1))
        .await
        .unwrap();
    assert_eq!(pending.len(), 30, "one run per slot");
}

#[tokio::test]
async fn the_trigger_carries_the_slot_in_the_zone_and_the_business_date() {
    let s = cron("morning", "0 9 * * *", "Asia/Tokyo");
    let f = fixture(vec![job("jp", vec![s], None)], utc(2026, 11, 26, 0, 0)).await;
    f.tick_at(utc(2026, 11, 26, 0, 0)).await;
    let handled = f
        .run_until(utc(2026, 11, 27, 0, 30), chrono::Duration::minutes(10))
        .await;
    let Handled::Fired(id) = handled[0].result else {
        panic!("{handled:?}")
    };
    let run = f.store.get_run(id).await.unwrap().unwrap();
    assert_eq!(
        run.trigger,
        crate::domain::run::Trigger::Schedule {
            schedule: "morning".into(),
            slot: utc(2026, 11, 27, 0, 0),
            business_date: NaiveDate::from_ymd_opt(2026, 11, 27).unwrap(),
            local_time: "2026-11-27T09:00:00+09:00".into(),
        }
    );
}
