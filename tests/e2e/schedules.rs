//! Schedules end to end: the real `tasuki serve` firing jobs on real Docker. The slots
//! the server reports are cross-checked against the runs it stored and against what
//! Docker did (container events), so a slot fired twice, a slot lost or a run past
//! `max_concurrent` shows whichever bookkeeping missed it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::common::*;

const IMAGE_LINES: &str = "image = \"tasuki-example:latest\"\npull = \"never\"\nnetwork = \"none\"\nstop_grace = \"1s\"\n";

/// A jobs directory of its own, so no other test's server ever sees these schedules.
fn jobs_dir(dir: &Path, files: &[(&str, &str)]) -> PathBuf {
    let jobs = dir.join("jobs");
    std::fs::create_dir_all(&jobs).unwrap();
    for (name, body) in files {
        std::fs::write(
            jobs.join(format!("{name}.toml")),
            format!("{IMAGE_LINES}{body}"),
        )
        .unwrap();
    }
    jobs
}

fn instant(v: &Value) -> DateTime<Utc> {
    let text = v.as_str().unwrap_or_else(|| panic!("not a time: {v}"));
    DateTime::parse_from_rfc3339(text)
        .unwrap_or_else(|e| panic!("{text}: {e}"))
        .with_timezone(&Utc)
}

/// The job's slots as the server reports them, oldest first.
async fn slots(api: &Api, job: &str) -> Vec<Value> {
    let (status, body) = api.get(&format!("/v1/jobs/{job}/slots?limit=1000")).await;
    assert_eq!(status, 200, "{body}");
    let mut slots = body["slots"].as_array().cloned().unwrap_or_default();
    slots.reverse();
    slots
}

/// Wait until `done` holds for the job's slots (or fail with what they were).
async fn wait_slots(
    api: &Api,
    job: &str,
    within: Duration,
    what: &str,
    done: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + within;
    loop {
        let s = slots(api, job).await;
        if done(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not seen within {within:?}; slots: {s:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn of_schedule<'a>(slots: &'a [Value], schedule: &str) -> Vec<&'a Value> {
    slots.iter().filter(|s| s["schedule"] == schedule).collect()
}

fn fired(slots: &[&Value]) -> usize {
    slots.iter().filter(|s| s["outcome"] == "fired").count()
}

/// Every slot from the first to the last, one `step` apart: none missing, none twice.
fn assert_contiguous(slots: &[&Value], step: i64) {
    let nominals: Vec<DateTime<Utc>> = slots.iter().map(|s| instant(&s["slot"])).collect();
    let unique: BTreeSet<_> = nominals.iter().collect();
    assert_eq!(
        unique.len(),
        nominals.len(),
        "a slot accounted twice: {slots:#?}"
    );
    for pair in nominals.windows(2) {
        assert_eq!(
            (pair[1] - pair[0]).num_seconds(),
            step,
            "slots not contiguous at {} .. {}: {slots:#?}",
            pair[0],
            pair[1]
        );
    }
}

/// Each fired slot has its own run, started by that slot, and the run knows its slot.
async fn check_fired_runs(api: &Api, slots: &[&Value]) -> Vec<Value> {
    let mut runs = Vec::new();
    let mut ids = BTreeSet::new();
    for slot in slots.iter().filter(|s| s["outcome"] == "fired") {
        let id = slot["run_id"].as_str().expect("fired slot names its run");
        assert!(ids.insert(id.to_owned()), "run {id} fired by two slots");
        let run = api.wait_final(id, Duration::from_secs(60)).await;
        assert_eq!(run["trigger"]["type"], "schedule", "{run}");
        assert_eq!(run["trigger"]["schedule"], slot["schedule"], "{run}");
        assert_eq!(
            instant(&run["trigger"]["slot"]),
            instant(&slot["slot"]),
            "{run}"
        );
        assert_eq!(
            run["trigger"]["business_date"], slot["business_date"],
            "{run}"
        );
        runs.push(run);
    }
    runs
}

#[tokio::test]
async fn a_seconds_schedule_fires_every_slot_once_and_the_container_knows_its_slot() {
    let dir = tempfile::tempdir().unwrap();
    let jobs = jobs_dir(
        dir.path(),
        &[(
            "tick",
            "schedule = \"*/2 * * * * *\"\n\
             command = [\"sh\", \"-c\", \"echo trigger=$TASUKI_TRIGGER schedule=$TASUKI_SCHEDULE slot=$TASUKI_SCHEDULED_TIME date=$TASUKI_BUSINESS_DATE\"]\n",
        )],
    );
    let worker_id = unique("sched-tick");
    let mut invariants = Invariants::start(&[&worker_id]);
    let server = Server::start(
        dir.path(),
        ServeOptions {
            jobs_dir: jobs,
            worker_id: Some(worker_id.clone()),
            ..Default::default()
        },
    );
    let api = server.client();
    wait_slots(
        &api,
        "tick",
        Duration::from_secs(60),
        "4 fired slots",
        |s| fired(&s.iter().collect::<Vec<_>>()) >= 4,
    )
    .await;

    let out = tasuki_cli(
        &server.url,
        &["schedules", "pause", "tick", "--note", "test done"],
    );
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("tick/default  paused"), "{text}");
    // Paused slots are recorded, not silently dropped: wait for one.
    let all = wait_slots(
        &api,
        "tick",
        Duration::from_secs(30),
        "a suspended slot",
        |s| s.iter().any(|x| x["reason"] == "suspended"),
    )
    .await;
    let all: Vec<&Value> = all.iter().collect();
    assert_contiguous(&all, 2);
    assert!(
        all.iter()
            .all(|s| s["outcome"] == "fired" || s["reason"] == "suspended"),
        "{all:#?}"
    );

    let runs = check_fired_runs(&api, &all).await;
    let mut lags = Vec::new();
    for run in &runs {
        assert_eq!(run["status"], "succeeded", "{run}");
        let slot = instant(&run["trigger"]["slot"]);
        let created = instant(&run["created_at"]);
        assert!(
            created >= slot,
            "run {} created before its slot: {run}",
            run["id"]
        );
        lags.push((created - slot).num_milliseconds());
        let log =
            String::from_utf8_lossy(&api.logs(run["id"].as_str().unwrap()).await).into_owned();
        let expected = format!(
            "trigger=schedule schedule=default slot={} date={}\n",
            slot.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, false),
            run["trigger"]["business_date"].as_str().unwrap()
        );
        assert_eq!(log, expected);
        invariants.accepted(run["id"].as_str().unwrap());
    }
    eprintln!("slot-to-accept lag (ms) per fired slot: {lags:?}");
    invariants.check(&api).await;
    for run in &runs {
        assert_eq!(
            invariants.containers_created(run["id"].as_str().unwrap()),
            1,
            "one container per fired slot"
        );
    }
}

#[tokio::test]
async fn serve_stopped_across_slots_catches_up_by_each_policy_on_restart() {
    let dir = tempfile::tempdir().unwrap();
    let body = "command = [\"sh\", \"-c\", \"exit 0\"]\n\
        [[schedules]]\nname = \"all\"\ncron = \"*/3 * * * * *\"\ncatch_up = \"all\"\noverlap = \"allow\"\n\
        [[schedules]]\nname = \"latest\"\ncron = \"*/3 * * * * *\"\ncatch_up = \"latest\"\noverlap = \"allow\"\n\
        [[schedules]]\nname = \"none\"\ncron = \"*/3 * * * * *\"\ncatch_up = \"none\"\noverlap = \"allow\"\n";
    let jobs = jobs_dir(dir.path(), &[("catchup", body)]);
    let worker_id = unique("sched-catchup");
    let mut server = Server::start(
        dir.path(),
        ServeOptions {
            jobs_dir: jobs,
            worker_id: Some(worker_id),
            env: vec![("TASUKI_SCHEDULE_GRACE".into(), "1s".into())],
            ..Default::default()
        },
    );
    let api = server.client();
    let before = wait_slots(
        &api,
        "catchup",
        Duration::from_secs(60),
        "a fired slot per schedule",
        |s| {
            ["all", "latest", "none"]
                .iter()
                .all(|n| fired(&of_schedule(s, n)) >= 1)
        },
    )
    .await;
    server.process.signal("TERM");
    server.process.wait_exit(Duration::from_secs(60)).await;
    // The newest slot accounted for before the stop (of any schedule: they share a cron).
    let last_before = before.iter().map(|s| instant(&s["slot"])).max().unwrap();
    // Stay down across at least four slots.
    let back_at = last_before + chrono::Duration::seconds(13);
    while Utc::now() < back_at {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let restarted_at = Utc::now();
    server.restart(dir.path());
    let after = wait_slots(
        &api,
        "catchup",
        Duration::from_secs(60),
        "slots after the restart",
        |s| {
            ["all", "latest", "none"].iter().all(|n| {
                of_schedule(s, n)
                    .iter()
                    .any(|x| instant(&x["slot"]) > restarted_at + chrono::Duration::seconds(3))
            })
        },
    )
    .await;

    // Slots certainly missed: due after the last one seen and over the grace before the
    // restart began.
    let missed = |name: &str| -> Vec<&Value> {
        of_schedule(&after, name)
            .into_iter()
            .filter(|s| {
                let t = instant(&s["slot"]);
                t > last_before && t < restarted_at - chrono::Duration::seconds(1)
            })
            .collect()
    };
    for name in ["all", "latest", "none"] {
        assert_contiguous(&of_schedule(&after, name), 3);
        assert!(missed(name).len() >= 3, "{name}: {:#?}", missed(name));
    }
    let all = missed("all");
    assert!(all.iter().all(|s| s["outcome"] == "fired"), "all: {all:#?}");
    let none = missed("none");
    assert!(
        none.iter().all(|s| s["reason"] == "catch_up_limit"),
        "none: {none:#?}"
    );
    let latest = missed("latest");
    let (newest, older) = latest.split_last().unwrap();
    assert!(
        older.iter().all(|s| s["reason"] == "catch_up_limit"),
        "latest: {latest:#?}"
    );
    // The newest missed slot fires, unless a slot on time was due at the same tick.
    assert!(
        newest["outcome"] == "fired" || newest["reason"] == "catch_up_limit",
        "latest: {latest:#?}"
    );
    let fired_latest = of_schedule(&after, "latest")
        .into_iter()
        .filter(|s| instant(&s["slot"]) > last_before && instant(&s["slot"]) < restarted_at)
        .filter(|s| s["outcome"] == "fired")
        .count();
    assert!(
        fired_latest <= 1,
        "latest fired more than one missed slot: {after:#?}"
    );
    check_fired_runs(&api, &of_schedule(&after, "all")).await;
}

#[tokio::test]
async fn max_concurrent_one_runs_five_api_runs_one_at_a_time_in_arrival_order() {
    let dir = tempfile::tempdir().unwrap();
    let jobs = jobs_dir(
        dir.path(),
        &[(
            "one-at-a-time",
            "max_concurrent = 1\ncommand = [\"sh\", \"-c\", \"sleep 0.5; echo done\"]\n",
        )],
    );
    let worker_id = unique("sched-maxconc");
    let mut invariants = Invariants::start(&[&worker_id]);
    let server = Server::start(
        dir.path(),
        ServeOptions {
            jobs_dir: jobs,
            worker_id: Some(worker_id),
            concurrency: 4,
            ..Default::default()
        },
    );
    let api = server.client();
    let accepts = (0..5).map(|_| api.accept("one-at-a-time", serde_json::json!({})));
    let mut ids: Vec<String> = futures::future::join_all(accepts).await;
    ids.sort(); // run ids sort by arrival
    for id in &ids {
        invariants.accepted(id);
        invariants.expect_log(id, 1, "done\n");
    }
    let runs = invariants.check(&api).await;
    for id in &ids {
        assert_eq!(runs[id]["status"], "succeeded", "{}", runs[id]);
    }
    // Docker's own account: each container started after the previous one died.
    let events = invariants.events();
    let time_of = |id: &str, action: &str| {
        events
            .iter()
            .find(|e| e.run_id == *id && e.action == action)
            .unwrap_or_else(|| panic!("no {action} event for {id}: {events:#?}"))
            .time_nano
    };
    let mut by_start = ids.clone();
    by_start.sort_by_key(|id| time_of(id, "start"));
    for pair in by_start.windows(2) {
        let died = time_of(&pair[0], "die");
        let started = time_of(&pair[1], "start");
        assert!(
            started >= died,
            "run {} started before run {} ended: the limit of 1 was broken",
            pair[1],
            pair[0]
        );
    }
    // The first to be stored went at once; the four that waited went in arrival (id)
    // order. (Ids of requests accepted in the same millisecond need not follow the
    // order their transactions committed in, so the first one may be any of them.)
    let waited = &by_start[1..];
    assert!(
        waited.windows(2).all(|p| p[0] < p[1]),
        "waiting runs did not start in arrival order: {by_start:?}"
    );
}

#[tokio::test]
async fn two_schedulers_on_one_store_fire_each_slot_once() {
    let dir = tempfile::tempdir().unwrap();
    let jobs = jobs_dir(
        dir.path(),
        &[(
            "shared",
            "command = [\"sh\", \"-c\", \"exit 0\"]\n\
             [[schedules]]\nname = \"every-second\"\ncron = \"* * * * * *\"\noverlap = \"allow\"\n",
        )],
    );
    let ids = [unique("sched-two-a"), unique("sched-two-b")];
    let mut invariants = Invariants::start(&[&ids[0], &ids[1]]);
    let servers: Vec<Server> = ids
        .iter()
        .map(|id| {
            Server::start(
                dir.path(),
                ServeOptions {
                    jobs_dir: jobs.clone(),
                    worker_id: Some(id.clone()),
                    ..Default::default()
                },
            )
        })
        .collect();
    let api = servers[0].client();
    wait_slots(
        &api,
        "shared",
        Duration::from_secs(60),
        "8 fired slots",
        |s| fired(&s.iter().collect::<Vec<_>>()) >= 8,
    )
    .await;
    let out = tasuki_cli(
        &servers[1].url,
        &["schedules", "pause", "shared/every-second"],
    );
    assert!(out.status.success(), "{out:?}");
    let all = wait_slots(
        &api,
        "shared",
        Duration::from_secs(30),
        "a suspended slot",
        |s| s.iter().any(|x| x["reason"] == "suspended"),
    )
    .await;
    let all: Vec<&Value> = all.iter().collect();
    assert_contiguous(&all, 1);
    let runs = check_fired_runs(&api, &all).await;
    // Every run of the job came from one slot: none was started twice for a slot.
    let (status, listed) = api.get("/v1/runs?job=shared&limit=1000").await;
    assert_eq!(status, 200);
    let listed = listed["runs"].as_array().unwrap();
    assert_eq!(listed.len(), runs.len(), "runs vs fired slots: {listed:#?}");
    // Both schedulers were at work; each slot was fired by exactly one of them.
    let fired_by: Vec<usize> = servers
        .iter()
        .map(|s| s.process.log_text().matches("schedule slot fired").count())
        .collect();
    eprintln!("slots fired by each scheduler: {fired_by:?}");
    assert_eq!(fired_by.iter().sum::<usize>(), runs.len());
    for run in &runs {
        invariants.accepted(run["id"].as_str().unwrap());
    }
    invariants.check(&api).await;
}

#[tokio::test]
async fn the_cli_pauses_backfills_and_previews_and_a_reload_adds_a_schedule() {
    let dir = tempfile::tempdir().unwrap();
    let jobs = jobs_dir(
        dir.path(),
        &[(
            "steer",
            "command = [\"sh\", \"-c\", \"echo $TASUKI_SCHEDULED_TIME\"]\n\
             [[schedules]]\nname = \"every-2s\"\ncron = \"*/2 * * * * *\"\noverlap = \"allow\"\n",
        )],
    );
    let worker_id = unique("sched-cli");
    let mut invariants = Invariants::start(&[&worker_id]);
    let mut server = Server::start(
        dir.path(),
        ServeOptions {
            jobs_dir: jobs.clone(),
            worker_id: Some(worker_id),
            ..Default::default()
        },
    );
    let api = server.client();
    let cli = |args: &[&str]| {
        let out = tasuki_cli(&server.url, args);
        assert!(out.status.success(), "tasuki {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };

    // Preview: ten fire times, two seconds apart, in the zone and in UTC.
    let next = cli(&["schedules", "next", "steer", "-n", "10"]);
    let lines: Vec<&str> = next.lines().collect();
    assert!(
        lines[0].starts_with("steer/every-2s  */2 * * * * *  (UTC)"),
        "{next}"
    );
    assert_eq!(lines.len(), 11, "{next}");

    // Pause with a note, see slots recorded as suspended, resume.
    wait_slots(
        &api,
        "steer",
        Duration::from_secs(30),
        "a fired slot",
        |s| fired(&s.iter().collect::<Vec<_>>()) >= 1,
    )
    .await;
    let paused = cli(&["schedules", "pause", "steer", "--note", "db maintenance"]);
    assert!(paused.starts_with("steer/every-2s  paused"), "{paused}");
    let (_, job) = api.get("/v1/jobs/steer").await;
    assert_eq!(job["schedules"][0]["paused"], true, "{job}");
    assert_eq!(job["schedules"][0]["pause_note"], "db maintenance", "{job}");
    assert_eq!(
        job["schedules"][0]["next"].as_array().unwrap().len(),
        5,
        "{job}"
    );
    let with_suspended = wait_slots(
        &api,
        "steer",
        Duration::from_secs(30),
        "3 suspended slots",
        |s| s.iter().filter(|x| x["reason"] == "suspended").count() >= 3,
    )
    .await;
    let resumed = cli(&["schedules", "resume", "steer/every-2s"]);
    assert!(resumed.starts_with("steer/every-2s  active"), "{resumed}");
    let suspended: Vec<&Value> = with_suspended
        .iter()
        .filter(|x| x["reason"] == "suspended")
        .collect();
    let from = suspended.first().unwrap()["slot"]
        .as_str()
        .unwrap()
        .to_owned();
    let to = suspended.last().unwrap()["slot"]
        .as_str()
        .unwrap()
        .to_owned();

    // Backfill the suspended slots: each fires once; a second backfill starts nothing.
    let report = cli(&[
        "schedules",
        "backfill",
        "steer",
        "--from",
        &from,
        "--to",
        &to,
    ]);
    let n = suspended.len();
    assert!(
        report.ends_with(&format!(
            "steer/every-2s: {n} fired, 0 already fired, 0 not firing\n"
        )),
        "{report}"
    );
    let again = cli(&[
        "schedules",
        "backfill",
        "steer/every-2s",
        "--from",
        &from,
        "--to",
        &to,
    ]);
    assert!(
        again.ends_with(&format!(
            "steer/every-2s: 0 fired, {n} already fired, 0 not firing\n"
        )),
        "{again}"
    );
    let after = slots(&api, "steer").await;
    for s in &suspended {
        let now = after.iter().find(|x| x["slot"] == s["slot"]).unwrap();
        assert_eq!(now["outcome"], "fired", "{now}");
        assert_eq!(now["detail"], "backfill", "{now}");
        let run = api
            .wait_final(now["run_id"].as_str().unwrap(), Duration::from_secs(60))
            .await;
        assert_eq!(run["status"], "succeeded", "{run}");
        // The backfilled run sees its own slot's time, not the time it ran.
        let log =
            String::from_utf8_lossy(&api.logs(run["id"].as_str().unwrap()).await).into_owned();
        let expected = instant(&s["slot"]).to_rfc3339_opts(chrono::SecondsFormat::AutoSi, false);
        assert_eq!(log.trim_end(), expected);
    }
    let out = tasuki_cli(&server.url, &["schedules", "pause", "steer/nope"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no schedule named `nope`"),
        "{out:?}"
    );
    // Bodies are JSON objects: an array, which serde alone would read by position, is
    // refused and changes nothing.
    for (action, body) in [("pause", "[]"), ("backfill", r#"["a","b"]"#)] {
        let answer = api
            .http
            .post(format!(
                "{}/v1/jobs/steer/schedules/every-2s/{action}",
                api.base
            ))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 400, "{action} {body}");
        let error: Value = answer.json().await.unwrap();
        let message = error["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("give a JSON object"), "{error}");
    }

    // Reload: a second schedule added to the file and a SIGHUP; it fires from its next
    // slot. A broken file is refused and the running set stays.
    std::fs::write(
        jobs.join("steer.toml"),
        format!(
            "{IMAGE_LINES}command = [\"sh\", \"-c\", \"echo $TASUKI_SCHEDULED_TIME\"]\n\
             [[schedules]]\nname = \"every-2s\"\ncron = \"*/2 * * * * *\"\noverlap = \"allow\"\nsuspended = true\n\
             [[schedules]]\nname = \"every-3s\"\ncron = \"*/3 * * * * *\"\noverlap = \"allow\"\n"
        ),
    )
    .unwrap();
    let reloaded_at = Utc::now();
    server.process.signal("HUP");
    wait_slots(
        &api,
        "steer",
        Duration::from_secs(30),
        "the added schedule fires",
        |s| {
            s.iter()
                .any(|x| x["schedule"] == "every-3s" && x["outcome"] == "fired")
        },
    )
    .await;
    let added: Vec<Value> = slots(&api, "steer")
        .await
        .into_iter()
        .filter(|x| x["schedule"] == "every-3s")
        .collect();
    assert!(
        added
            .iter()
            .all(|x| instant(&x["slot"]) > reloaded_at - chrono::Duration::seconds(1)),
        "an added schedule starts from its next slot: {added:#?}"
    );
    std::fs::write(jobs.join("broken.toml"), "image = 3\n").unwrap();
    let out = tasuki_cli(&server.url, &["jobs", "reload"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("broken.toml"),
        "{out:?}"
    );
    let (status, _) = api.get("/v1/jobs/steer").await;
    assert_eq!(status, 200);
    std::fs::remove_file(jobs.join("broken.toml")).unwrap();
    cli(&["schedules", "pause", "steer"]);

    for slot in slots(&api, "steer").await {
        if let Some(id) = slot["run_id"].as_str() {
            invariants.accepted(id);
        }
    }
    invariants.check(&api).await;
    server.process.signal("TERM");
    server.process.wait_exit(Duration::from_secs(60)).await;
}
