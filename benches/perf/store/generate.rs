//! A store of many runs, generated rather than executed: the real schema (opened through
//! `SqliteStore`, so every migration has run), then rows written in bulk, in one
//! transaction, the way tasuki would have written them over weeks of work. Specs are
//! the jobs' real resolved specs, triggers and admission as the store writes them.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use sqlx::Connection;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqliteSynchronous};

use tasuki::catalog::Catalog;
use tasuki::protocol::{RetryV1, SpecV1};

/// The jobs of the generated store, with their share of the runs (out of 1000), their
/// parameters, and how often they fail (out of 1000). Skewed as real fleets are: one
/// busy job, a few regular ones, one rare.
pub const JOBS: [(&str, u32); 8] = [
    ("thumbnail", 400),
    ("sync-crm", 200),
    ("etl-orders", 150),
    ("send-invoices", 100),
    ("reindex", 80),
    ("nightly-report", 40),
    ("backup-db", 29),
    ("month-end", 1),
];

/// The job file each generated job gets (the serve under test loads them).
pub fn job_file(name: &str) -> String {
    let schedule = match name {
        "nightly-report" | "backup-db" | "month-end" => "schedule = \"30 2 * * *\"\n",
        _ => "",
    };
    format!(
        "description = \"generated for the store benchmark\"\n\
         image = \"tasuki-example:latest\"\npull = \"never\"\nnetwork = \"none\"\n\
         command = [\"sh\", \"-c\", \"echo $TARGET {{{{params.target}}}}\"]\n\
         timeout = \"10m\"\n{schedule}\
         [env]\nTARGET = \"{{{{params.target}}}}\"\n\
         [params.target]\ndefault = \"all\"\nmax_length = 64\n\
         [params.batch]\ndefault = \"100\"\npattern = \"[0-9]+\"\n\
         [retry]\nmax_attempts = 3\nbackoff = \"10s\"\non_exit_codes = [1]\n\
         [resources]\nmemory = \"64MiB\"\n"
    )
}

/// What was generated.
pub struct Generated {
    pub runs: u64,
    pub attempts: u64,
    /// Runs that ended before `now - old_after`: what a retention of that long deletes.
    pub old: u64,
    pub took: Duration,
    pub db_bytes: u64,
}

/// Fill `data_dir` with `n` runs created over the `span` before `now`; runs ended more
/// than `old_after` ago are counted as `old`. `jobs_dir` holds the jobs' files.
pub async fn generate(
    data_dir: &Path,
    jobs_dir: &Path,
    n: u64,
    now_ms: i64,
    span: Duration,
    old_after: Duration,
) -> anyhow::Result<Generated> {
    let started = Instant::now();
    for (job, _) in JOBS {
        std::fs::write(jobs_dir.join(format!("{job}.toml")), job_file(job))?;
    }
    let catalog = Catalog::load_dir(jobs_dir).map_err(|e| anyhow::anyhow!("{e}"))?;
    // The schema as tasuki makes it, then closed: the bulk load uses its own connection.
    drop(
        tasuki::store::SqliteStore::open(data_dir)
            .await
            .context("opening the store")?,
    );
    let options = SqliteConnectOptions::new()
        .filename(data_dir.join("tasuki.db"))
        // Nothing here needs to survive a power cut: it is generated again.
        .synchronous(SqliteSynchronous::Off)
        .pragma("cache_size", "-1000000")
        .pragma("temp_store", "memory");
    let mut conn = SqliteConnection::connect_with(&options).await?;
    let mut tx = conn.begin().await?;

    let mut rng = StdRng::seed_from_u64(12);
    let span_ms = span.as_millis() as i64;
    let old_before = now_ms - old_after.as_millis() as i64;
    let mut specs: BTreeMap<&str, (String, Option<String>)> = BTreeMap::new();
    for (job, _) in JOBS {
        let spec = catalog
            .get(job)
            .with_context(|| format!("generated job {job}"))?;
        let params = BTreeMap::from([("target".to_owned(), "all".to_owned())]);
        let resolved = spec.resolve(&params).map_err(|e| anyhow::anyhow!("{e}"))?;
        let retry = serde_json::to_string(&RetryV1::from(&spec.retry))?;
        specs.insert(
            job,
            (
                serde_json::to_string(&SpecV1::from(&resolved))?,
                Some(retry),
            ),
        );
    }
    let (mut runs, mut attempts, mut old) = (0u64, 0u64, 0u64);
    let chunk = 5_000u64;
    let mut start = 0;
    while start < n {
        let end = (start + chunk).min(n);
        let mut run_rows = Vec::with_capacity(chunk as usize);
        let mut attempt_rows = Vec::new();
        let mut outbox_rows = Vec::new();
        let mut key_rows = Vec::new();
        let mut callback_rows = Vec::new();
        let mut reply_rows = Vec::new();
        for i in start..end {
            // Evenly over the span, oldest first, so ids rise with time as ULIDs do.
            let created = now_ms - span_ms + (span_ms * i as i64) / n as i64;
            let id = ulid::Ulid::from_parts(created as u64, rng.random())
                .to_string()
                .to_lowercase();
            let pick = rng.random_range(0..1000u32);
            let mut acc = 0;
            let job = JOBS
                .iter()
                .find(|(_, share)| {
                    acc += share;
                    pick < acc
                })
                .map_or(JOBS[0].0, |(j, _)| j);
            let (spec, retry) = &specs[job];
            let age_ms = now_ms - created;
            // The last minutes hold what is still queued or running.
            let status = if age_ms < 60_000 {
                if rng.random_bool(0.5) {
                    "queued"
                } else {
                    "running"
                }
            } else {
                match rng.random_range(0..1000u32) {
                    0..900 => "succeeded",
                    900..960 => "failed",
                    960..975 => "timed_out",
                    975..995 => "cancelled",
                    _ => "lost",
                }
            };
            // A failure retried once or twice before its end, by the job's rule.
            let n_attempts: u32 = match status {
                "queued" => 0,
                "cancelled" if rng.random_bool(0.5) => 0,
                "failed" | "lost" => rng.random_range(1..=3),
                _ if rng.random_bool(0.03) => 2,
                _ => 1,
            };
            let trigger: Option<String> = match job {
                "nightly-report" | "backup-db" | "month-end" => {
                    let slot = chrono::DateTime::from_timestamp_millis(created)
                        .unwrap_or_default()
                        .format("%Y-%m-%dT%H:%M:%S%.3fZ")
                        .to_string();
                    Some(
                        json!({"type": "schedule", "schedule": "daily", "slot": slot,
                               "business_date": &slot[..10], "local_time": slot})
                        .to_string(),
                    )
                }
                "sync-crm" => Some(json!({"type": "webhook"}).to_string()),
                _ => None,
            };
            let params = json!({"target": format!("t-{}", rng.random_range(0..5000)),
                                "batch": "100"})
            .to_string();
            let mut t = created + rng.random_range(5..500);
            let mut started = None;
            let mut run_exit = Value::Null;
            let (mut reason, mut reason_code) = (Value::Null, Value::Null);
            for a in 1..=n_attempts {
                let claimed = t;
                let began = claimed + rng.random_range(100..400);
                let last = a == n_attempts;
                let (a_status, exit, code) = if !last {
                    ("failed", json!(1), "exit_code")
                } else {
                    match status {
                        "succeeded" => ("succeeded", json!(0), ""),
                        "failed" => ("failed", json!(1), "exit_code"),
                        "timed_out" => ("timed_out", Value::Null, "timed_out"),
                        "cancelled" => ("cancelled", json!(137), "cancelled"),
                        "lost" => ("lost", Value::Null, "lost"),
                        _ => ("running", Value::Null, ""),
                    }
                };
                let finished =
                    (a_status != "running").then(|| began + rng.random_range(200..120_000));
                let (a_reason, a_code) = if code.is_empty() {
                    (Value::Null, Value::Null)
                } else {
                    (json!(format!("{a_status} ({code})")), json!(code))
                };
                started.get_or_insert(began);
                if last {
                    run_exit = exit.clone();
                    reason = a_reason.clone();
                    reason_code = a_code.clone();
                }
                attempt_rows.push(json!([
                    &id,
                    a,
                    "worker-a",
                    a,
                    if a_status == "running" {
                        now_ms + 86_400_000
                    } else {
                        finished.unwrap_or(began)
                    },
                    format!("{:064x}", rng.random::<u128>()),
                    a_status,
                    exit,
                    a_reason,
                    a_code,
                    claimed,
                    began,
                    finished,
                    rng.random_range(1..60),
                    rng.random_range(1_000_000..60_000_000i64),
                    rng.random_range(0.01..20.0f64),
                ]));
                attempts += 1;
                t = finished.unwrap_or(began) + rng.random_range(1000..5000);
            }
            let finished_at = match status {
                "queued" | "running" => None,
                _ if n_attempts == 0 => Some(created + rng.random_range(1000..60_000)),
                _ => Some(t),
            };
            if status == "cancelled" && n_attempts == 0 {
                reason = json!("cancelled before it started");
                reason_code = json!("cancelled");
            }
            if finished_at.is_some_and(|f| f < old_before) {
                old += 1;
            }
            match status {
                "queued" => outbox_rows.push(json!([&id, 1, created, Value::Null])),
                "running" => outbox_rows.push(json!([&id, n_attempts, created, t])),
                _ => {}
            }
            if age_ms < 86_400_000 && rng.random_bool(0.2) {
                key_rows.push(json!([format!("key-{i}"), job, &params, &id, created]));
            }
            let callback =
                (job == "send-invoices").then_some("https://billing.example/hooks/tasuki");
            if let (Some(url), Some(f)) = (callback, finished_at) {
                callback_rows.push(json!([
                    &id,
                    url,
                    format!("msg_{}", ulid::Ulid::from_parts(f as u64, rng.random())),
                    f,
                    f + 150
                ]));
            }
            let requested_by = (job == "etl-orders").then_some("erp");
            if requested_by.is_some() {
                reply_rows.push(json!([&id, "accepted", created, created + 20]));
                if let Some(f) = finished_at {
                    reply_rows.push(json!([&id, "finished", created, f + 20]));
                }
            }
            run_rows.push(json!([
                &id,
                job,
                params,
                spec,
                status,
                n_attempts,
                n_attempts,
                run_exit,
                reason,
                reason_code,
                i64::from(status == "cancelled"),
                created,
                started,
                finished_at,
                retry,
                trigger,
                callback,
                requested_by,
            ]));
            runs += 1;
        }
        insert(&mut tx, INSERT_RUNS, &run_rows).await?;
        insert(&mut tx, INSERT_ATTEMPTS, &attempt_rows).await?;
        insert(&mut tx, INSERT_OUTBOX, &outbox_rows).await?;
        insert(&mut tx, INSERT_KEYS, &key_rows).await?;
        insert(&mut tx, INSERT_CALLBACKS, &callback_rows).await?;
        insert(&mut tx, INSERT_REPLIES, &reply_rows).await?;
        start = end;
    }
    tx.commit().await?;
    sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
        .execute(&mut conn)
        .await?;
    conn.close().await?;
    let db_bytes = std::fs::metadata(data_dir.join("tasuki.db"))
        .map(|m| m.len())
        .unwrap_or(0);
    Ok(Generated {
        runs,
        attempts,
        old,
        took: started.elapsed(),
        db_bytes,
    })
}

async fn insert(
    conn: &mut SqliteConnection,
    sql: &'static str,
    rows: &[Value],
) -> anyhow::Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    sqlx::query(sql)
        .bind(Value::Array(rows.to_vec()).to_string())
        .execute(&mut *conn)
        .await
        .with_context(|| sql.split('(').next().unwrap_or(sql).to_owned())?;
    Ok(())
}

const INSERT_RUNS: &str = "INSERT INTO runs (id, job, params, spec, status, attempt, epoch, exit_code, \
     reason, reason_code, cancel_requested, created_at, started_at, finished_at, retry, \"trigger\", \
     callback_url, requested_by) \
     SELECT value->>0, value->>1, value->>2, value->>3, value->>4, value->>5, value->>6, value->>7, \
     value->>8, value->>9, value->>10, value->>11, value->>12, value->>13, value->>14, value->>15, \
     value->>16, value->>17 FROM json_each(?)";

const INSERT_ATTEMPTS: &str = "INSERT INTO attempts (run_id, attempt, worker_id, epoch, lease_expires_at, \
     container_id, status, exit_code, reason, reason_code, claimed_at, started_at, finished_at, \
     usage_samples, usage_peak_memory_bytes, usage_cpu_seconds) \
     SELECT value->>0, value->>1, value->>2, value->>3, value->>4, value->>5, value->>6, value->>7, \
     value->>8, value->>9, value->>10, value->>11, value->>12, value->>13, value->>14, value->>15 \
     FROM json_each(?)";

const INSERT_OUTBOX: &str = "INSERT INTO outbox (run_id, attempt, created_at, sent_at, tries) \
     SELECT value->>0, value->>1, value->>2, value->>3, value->>3 IS NOT NULL FROM json_each(?)";

const INSERT_KEYS: &str = "INSERT INTO idempotency_keys (scope, key, job, params, run_id, created_at) \
     SELECT 'token:ci', value->>0, value->>1, value->>2, value->>3, value->>4 FROM json_each(?)";

const INSERT_CALLBACKS: &str = "INSERT INTO callback_deliveries (run_id, url, event, event_id, created_at, \
     tries, last_status, delivered_at) \
     SELECT value->>0, value->>1, 'run.finished', value->>2, value->>3, 1, 200, value->>4 FROM json_each(?)";

const INSERT_REPLIES: &str = "INSERT INTO run_replies (run_id, kind, reply_to, correlation_id, state, tries, \
     created_at, sent_at) \
     SELECT value->>0, value->>1, 'amq.rabbitmq.reply-to', value->>0, 'sent', 1, value->>2, value->>3 \
     FROM json_each(?)";
