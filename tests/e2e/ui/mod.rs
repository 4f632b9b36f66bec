//! The web UI in a real headless Chromium against the real `tasuki serve` (API tokens
//! configured, embedded worker, real Docker): log in with a token, start a run with
//! params from a job's Run form, watch its log arrive while it runs, cancel a running
//! run, cancel two from the list at once, filter the list, and no console errors.
//! Screenshots go to `$TASUKI_UI_SCREENSHOTS` when it is set (README's images).

mod browser;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use fantoccini::Locator;
use serde_json::Value;

use crate::common::{BIN, ServeOptions, Server, is_final};
use browser::{CHROMEDRIVER, Driver, click, console, eval, fill, screenshot, text_of, wait_true};

/// Prints a green line every 0.3 s: the live log.
const TICKER: &str = r#"image = "tasuki-example:latest"
pull = "never"
network = "none"
description = "Greets someone, one coloured line every 0.3 s"
command = ["sh", "-c", "i=0; while [ $i -lt $N ]; do i=$((i+1)); printf '\\033[32mline %s\\033[0m of %s for %s\\n' $i $N \"$WHO\"; sleep 0.3; done"]
[env]
N = "{{params.lines}}"
WHO = "{{params.who}}"
[params.lines]
default = "12"
pattern = "[0-9]{1,3}"
description = "how many lines"
[params.who]
required = true
pattern = "[a-z]+"
description = "who to greet (lower-case letters)"
"#;

/// Runs until stopped.
const SLEEPER: &str = r#"image = "tasuki-example:latest"
pull = "never"
network = "none"
stop_grace = "1s"
description = "Sleeps for a long time"
schedule = "0 3 * * *"
command = ["sh", "-c", "echo going to sleep; sleep 300"]
"#;

fn jobs_dir(dir: &Path) -> std::path::PathBuf {
    let jobs = dir.join("jobs");
    std::fs::create_dir_all(&jobs).unwrap();
    std::fs::write(jobs.join("ui-ticker.toml"), TICKER).unwrap();
    std::fs::write(jobs.join("ui-sleeper.toml"), SLEEPER).unwrap();
    jobs
}

/// `tasuki token create`: (value, config lines).
fn create_token(name: &str, scopes: &[&str]) -> (String, String) {
    let mut command = Command::new(BIN);
    command.args(["token", "create", "--name", name]);
    for scope in scopes {
        command.args(["--scope", scope]);
    }
    let out = command.output().expect("tasuki token create");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let (value, config) = text.split_once('\n').unwrap();
    (value.to_owned(), config.to_owned())
}

/// The API as `token` (the test's independent view of what the UI did).
fn api(server: &Server, token: &str) -> (reqwest::Client, String, String) {
    (reqwest::Client::new(), server.url.clone(), token.to_owned())
}

async fn run_json(api: &(reqwest::Client, String, String), id: &str) -> Value {
    let (http, base, token) = api;
    http.get(format!("{base}/v1/runs/{id}"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn start_via_api(api: &(reqwest::Client, String, String), job: &str) -> String {
    let (http, base, token) = api;
    let run: Value = http
        .post(format!("{base}/v1/jobs/{job}/runs"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    run["id"].as_str().unwrap().to_owned()
}

async fn wait_status(api: &(reqwest::Client, String, String), id: &str, want: &str) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let run = run_json(api, id).await;
        if run["status"] == want {
            return run;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "run {id} never became {want}: {run}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The run id of a `/ui/runs/{id}` URL.
fn run_id_of(url: &str) -> String {
    let path = url.split('?').next().unwrap_or(url);
    path.rsplit('/').next().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn ui_in_chromium_starts_follows_cancels_and_filters_runs() {
    if !Path::new(CHROMEDRIVER).exists() {
        panic!("{CHROMEDRIVER} is missing: tests/run.sh installs chromium and chromium-driver");
    }
    let dir = tempfile::tempdir().unwrap();
    let (token, config) = create_token("ui-operator", &["run:ui-*", "read:ui-*", "cancel:ui-*"]);
    let config_path = dir.path().join("tasuki.toml");
    std::fs::write(&config_path, config).unwrap();
    let server = Server::start(
        dir.path(),
        ServeOptions {
            jobs_dir: jobs_dir(dir.path()),
            embedded_worker: true,
            concurrency: 4,
            env: vec![("TASUKI_CONFIG".into(), config_path.display().to_string())],
            ..ServeOptions::default()
        },
    );
    let api = api(&server, &token);
    let driver = Driver::start();
    let b = driver.browser().await;
    let base = &server.url;

    // Log in: the login page first, then a cookie that works on http://127.0.0.1
    // although it is `Secure` (Chromium counts loopback as a secure context).
    b.goto(&format!("{base}/ui/runs")).await.unwrap();
    wait_true(
        &b,
        "!!document.getElementById('token')",
        Duration::from_secs(10),
        "login form",
    )
    .await;
    fill(&b, "#token", &token).await;
    click(&b, "#login").await;
    wait_true(
        &b,
        "location.pathname === '/ui/runs'",
        Duration::from_secs(10),
        "back to the runs",
    )
    .await;
    assert_eq!(text_of(&b, "#who").await, "ui-operator");
    // The cookie is not readable by scripts.
    assert_eq!(
        eval(&b, "document.cookie").await,
        Value::String(String::new())
    );

    // The job page and its Run form, built from the declared params.
    b.goto(&format!("{base}/ui/jobs/ui-ticker")).await.unwrap();
    wait_true(
        &b,
        "!!document.getElementById('run-form')",
        Duration::from_secs(10),
        "run form",
    )
    .await;
    assert_eq!(
        eval(&b, "document.getElementById('param-lines').value").await,
        "12"
    );
    assert_eq!(
        eval(&b, "document.getElementById('param-who').required").await,
        true
    );
    // The pattern is checked in the browser: the page script set it from the job file.
    wait_true(
        &b,
        "document.getElementById('param-who').pattern === '[a-z]+'",
        Duration::from_secs(5),
        "pattern set",
    )
    .await;
    fill(&b, "#param-who", "Not Valid").await;
    assert_eq!(
        eval(&b, "document.getElementById('param-who').checkValidity()").await,
        false
    );
    // ... and on the server: a form sent without the browser's check gets its message.
    let refused = eval(
        &b,
        "(function(){ var f = document.getElementById('run-form'); f.noValidate = true; f.submit(); return true; })()",
    )
    .await;
    assert_eq!(refused, true);
    wait_true(
        &b,
        "!!document.getElementById('form-error')",
        Duration::from_secs(10),
        "server refusal shown",
    )
    .await;
    let error = text_of(&b, "#form-error").await;
    assert!(
        error.contains("who") && error.contains("pattern"),
        "{error}"
    );
    // The refused value is kept on the form.
    assert_eq!(
        eval(&b, "document.getElementById('param-who').value").await,
        "Not Valid"
    );
    fill(&b, "#param-who", "alice").await;
    fill(&b, "#param-lines", "20").await;
    screenshot(&b, "job").await;
    click(&b, "#start-run").await;
    wait_true(
        &b,
        "location.pathname.startsWith('/ui/runs/')",
        Duration::from_secs(10),
        "run page",
    )
    .await;
    let ticker = run_id_of(b.current_url().await.unwrap().as_str());

    // The log appears live, coloured, while the run is still running.
    wait_true(
        &b,
        "document.getElementById('log').textContent.includes('line 2 of 20 for alice')",
        Duration::from_secs(30),
        "live log",
    )
    .await;
    let while_logging = run_json(&api, &ticker).await;
    assert_eq!(while_logging["status"], "running", "{while_logging}");
    assert_eq!(while_logging["params"]["who"], "alice");
    assert_eq!(while_logging["params"]["lines"], "20");
    let live_text = eval(&b, "document.getElementById('log').textContent").await;
    let live_text = live_text.as_str().unwrap_or("").to_owned();
    assert!(
        !live_text.contains("line 20 of 20"),
        "whole log already: {live_text}"
    );
    assert_eq!(
        eval(&b, "!!document.querySelector('#log span.a-f2')").await,
        true,
        "green spans"
    );
    assert_eq!(
        eval(
            &b,
            "document.getElementById('log').textContent.includes('\\u001b')"
        )
        .await,
        false,
        "escape codes rendered, not shown"
    );
    // The page's status follows the run without a reload.
    wait_true(
        &b,
        "document.getElementById('run-status').textContent === 'running'",
        Duration::from_secs(10),
        "status drawn again while live",
    )
    .await;
    screenshot(&b, "run-live").await;
    // The run ends; the page draws itself again with the final state and the whole log.
    wait_status(&api, &ticker, "succeeded").await;
    wait_true(
        &b,
        "document.getElementById('run-status') && document.getElementById('run-status').textContent === 'succeeded' \
         && document.getElementById('log').textContent.includes('line 20 of 20 for alice')",
        Duration::from_secs(20),
        "final page",
    )
    .await;
    let final_text = eval(&b, "document.getElementById('log').textContent").await;
    let lines: Vec<&str> = final_text.as_str().unwrap().lines().collect();
    assert_eq!(lines.len(), 20, "each line once: {lines:?}");

    // Cancel a running run from its page.
    b.goto(&format!("{base}/ui/jobs/ui-sleeper")).await.unwrap();
    wait_true(
        &b,
        "!!document.getElementById('start-run')",
        Duration::from_secs(10),
        "sleeper form",
    )
    .await;
    click(&b, "#start-run").await;
    wait_true(
        &b,
        "location.pathname.startsWith('/ui/runs/')",
        Duration::from_secs(10),
        "sleeper page",
    )
    .await;
    let sleeper = run_id_of(b.current_url().await.unwrap().as_str());
    wait_true(
        &b,
        "document.getElementById('log').textContent.includes('going to sleep')",
        Duration::from_secs(30),
        "sleeper running",
    )
    .await;
    assert_eq!(run_json(&api, &sleeper).await["status"], "running");
    click(&b, "#cancel").await;
    wait_true(
        &b,
        "!!document.getElementById('note')",
        Duration::from_secs(10),
        "cancel note",
    )
    .await;
    let cancelled = wait_status(&api, &sleeper, "cancelled").await;
    assert!(is_final(&cancelled));
    wait_true(
        &b,
        "document.getElementById('run-status').textContent === 'cancelled'",
        Duration::from_secs(20),
        "page shows cancelled",
    )
    .await;

    // Two more sleepers, cancelled together from the list (the list refreshes itself
    // while they run).
    let a = start_via_api(&api, "ui-sleeper").await;
    let c = start_via_api(&api, "ui-sleeper").await;
    b.goto(&format!("{base}/ui/runs")).await.unwrap();
    for id in [&a, &c] {
        let pick = format!("input.pick[value='{id}']");
        wait_true(
            &b,
            &format!("!!document.querySelector(\"{pick}\")"),
            Duration::from_secs(10),
            "row",
        )
        .await;
    }
    wait_true(
        &b,
        &format!(
            "['{a}','{c}'].every(function(id){{ var r = document.querySelector(\"tr[data-run='\" + id + \"']\"); return r && r.getAttribute('data-status') === 'running'; }})"
        ),
        Duration::from_secs(30),
        "both running, seen by the list's refresh",
    )
    .await;
    screenshot(&b, "runs").await;
    click(&b, &format!("input.pick[value='{a}']")).await;
    click(&b, &format!("input.pick[value='{c}']")).await;
    click(&b, "#bulk-cancel").await;
    wait_true(
        &b,
        "!!document.getElementById('note')",
        Duration::from_secs(10),
        "bulk note",
    )
    .await;
    assert!(text_of(&b, "#note").await.starts_with("2 run(s) cancelled"));
    wait_status(&api, &a, "cancelled").await;
    wait_status(&api, &c, "cancelled").await;

    // Filter: job and status, kept in the URL; only the matching rows.
    b.goto(&format!("{base}/ui/runs")).await.unwrap();
    let select = |css: &'static str, value: &'static str| {
        let b = &b;
        async move {
            let element = b.find(Locator::Css(css)).await.expect(css);
            element.select_by_value(value).await.expect("select");
        }
    };
    select("#filter-job", "ui-sleeper").await;
    select("#filter-status", "cancelled").await;
    click(&b, "#apply-filters").await;
    wait_true(
        &b,
        "location.search.includes('status=cancelled')",
        Duration::from_secs(10),
        "filtered",
    )
    .await;
    let url = b.current_url().await.unwrap();
    let query = url.query().unwrap_or("");
    assert!(
        query.contains("job=ui-sleeper") && query.contains("status=cancelled"),
        "{query}"
    );
    let rows = eval(
        &b,
        "Array.from(document.querySelectorAll('#runs-body tr[data-run]')).map(function(r){ return [r.getAttribute('data-run'), r.getAttribute('data-status'), r.children[2].textContent]; })",
    )
    .await;
    let rows = rows.as_array().unwrap().clone();
    let mut ids: Vec<String> = rows
        .iter()
        .map(|r| r[0].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    let mut want = vec![sleeper.clone(), a.clone(), c.clone()];
    want.sort();
    assert_eq!(ids, want, "{rows:?}");
    assert!(
        rows.iter()
            .all(|r| r[1] == "cancelled" && r[2] == "ui-sleeper")
    );
    // The ticker's run is in the unfiltered list, with its params shown.
    b.goto(&format!("{base}/ui/runs?job=ui-ticker"))
        .await
        .unwrap();
    let params = text_of(&b, &format!("tr[data-run='{ticker}'] td.params")).await;
    assert_eq!(params, "lines=20 who=alice");

    // Whatever the pages did, the browser logged no error.
    let logged = console(&b).await;
    let severe: Vec<_> = logged
        .iter()
        .filter(|(level, _)| level == "SEVERE")
        .collect();
    assert!(severe.is_empty(), "console errors: {severe:?}");

    b.close().await.unwrap();
    drop(driver);
}
