//! The steady load through whichever replica answers, and the checks after a fault.

use super::*;

#[derive(Default)]
pub(super) struct Stats {
    /// (run id, job, params) of every accepted run.
    pub(super) accepted: Vec<(String, &'static str, String)>,
    pub(super) last_ok: Option<Instant>,
    pub(super) longest_gap: Duration,
    pub(super) failed_calls: u64,
    pub(super) answers_503: u64,
}

/// A client of both replicas: each call goes to the first that answers.
#[derive(Clone)]
pub(super) struct Front {
    pub(super) bases: Vec<String>,
    pub(super) http: reqwest::Client,
    pub(super) stats: Arc<Mutex<Stats>>,
}

impl Front {
    pub(super) fn new(replicas: &[&Replica]) -> Front {
        Front {
            bases: replicas.iter().map(|r| r.host_url.clone()).collect(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .expect("client"),
            stats: Arc::default(),
        }
    }

    pub(super) fn ok(&self) {
        let mut s = self.stats.lock().unwrap();
        let now = Instant::now();
        if let Some(last) = s.last_ok {
            s.longest_gap = s.longest_gap.max(now - last);
        }
        s.last_ok = Some(now);
    }

    /// Submit a run, trying every replica with one idempotency key until one accepts
    /// it (so a run whose answer was lost is the same run when asked again); `None`
    /// after `within`.
    pub(super) async fn submit(
        &self,
        job: &'static str,
        params: Value,
        within: Duration,
    ) -> Option<String> {
        let key = unique("tsk-key");
        let body = json!({ "params": params }).to_string();
        let deadline = Instant::now() + within;
        loop {
            for base in &self.bases {
                let answer = self
                    .http
                    .post(format!("{base}/v1/jobs/{job}/runs"))
                    .header("Idempotency-Key", &key)
                    .body(body.clone())
                    .send()
                    .await;
                let answer = match answer {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        (status, r.json::<Value>().await.ok())
                    }
                    Err(_) => (0, None),
                };
                match answer {
                    (202 | 200, Some(run)) => {
                        self.ok();
                        let id = run["id"].as_str().expect("id").to_owned();
                        self.stats.lock().unwrap().accepted.push((
                            id.clone(),
                            job,
                            params.to_string(),
                        ));
                        return Some(id);
                    }
                    (status, body) => {
                        let mut s = self.stats.lock().unwrap();
                        s.failed_calls += 1;
                        if status == 503 {
                            s.answers_503 += 1;
                        }
                        // No answer, the key's first request still in flight, or the
                        // service unavailable; anything else (a 500 included) is a bug.
                        assert!(
                            matches!(status, 0 | 409 | 502 | 503),
                            "POST {job} to {base}: {status} {body:?}"
                        );
                    }
                }
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A run as the first replica that answers sees it.
    pub(super) async fn run(&self, id: &str) -> Option<Value> {
        for base in &self.bases {
            if let Ok(r) = self.http.get(format!("{base}/v1/runs/{id}")).send().await
                && r.status().as_u16() == 200
                && let Ok(v) = r.json::<Value>().await
            {
                self.ok();
                return Some(v);
            }
        }
        None
    }

    pub(super) fn accepted(&self) -> Vec<(String, &'static str, String)> {
        self.stats.lock().unwrap().accepted.clone()
    }

    pub(super) fn report(&self, what: &str) -> Duration {
        let s = self.stats.lock().unwrap();
        eprintln!(
            "[netns] {what}: {} runs accepted, {} failed calls ({} answered 503), longest gap between successful API calls {:.2?}",
            s.accepted.len(),
            s.failed_calls,
            s.answers_503,
            s.longest_gap
        );
        s.longest_gap
    }
}

/// A steady load until `stop` is set: every 500 ms a trivial run (`exit` 0 or 3), and
/// every tenth a long one (`sleep` 5 to 8 s).
pub(super) fn start_load(
    front: &Front,
) -> (
    Arc<std::sync::atomic::AtomicBool>,
    tokio::task::JoinHandle<()>,
) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = Arc::new(AtomicBool::new(false));
    let (front, flag) = (front.clone(), stop.clone());
    let handle = tokio::spawn(async move {
        let mut i = 0u32;
        while !flag.load(Ordering::Relaxed) {
            let (job, params) = if i % 10 == 9 {
                ("sleep", json!({ "seconds": (5 + i % 4).to_string() }))
            } else {
                (
                    "exit",
                    json!({ "code": if i.is_multiple_of(2) { "0" } else { "3" } }),
                )
            };
            // A submission is given up (and the test fails in `settle`) only if no
            // replica accepted it in a minute.
            let id = front.submit(job, params, Duration::from_secs(60)).await;
            assert!(id.is_some(), "no replica accepted a run for 60 s");
            i += 1;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    (stop, handle)
}

pub(super) async fn stop_load(
    load: (
        Arc<std::sync::atomic::AtomicBool>,
        tokio::task::JoinHandle<()>,
    ),
) {
    load.0.store(true, std::sync::atomic::Ordering::Relaxed);
    load.1.await.expect("the load task");
}

/// Every accepted run final with the outcome its job gives (`lost` allowed only for
/// the runs in `may_be_lost`), one attempt each, and the invariants.
pub(super) async fn settle(
    front: &Front,
    inv: &mut Invariants,
    api: &crate::common::Api,
    may_be_lost: &dyn Fn(&Value) -> bool,
) -> Vec<Value> {
    let mut finals = Vec::new();
    for (id, job, params) in front.accepted() {
        inv.accepted(&id);
        let run = api.wait_final(&id, Duration::from_secs(120)).await;
        assert_eq!(attempts_of(&run).len(), 1, "started more than once: {run}");
        let params: Value = serde_json::from_str(&params).expect("params");
        if run["status"] == "lost" && may_be_lost(&run) {
            finals.push(run);
            continue;
        }
        match job {
            "exit" => {
                let code = params["code"].as_str().expect("code");
                let want = if code == "0" { "succeeded" } else { "failed" };
                assert_eq!(run["status"], want, "{run}");
                assert_eq!(run["exit_code"].to_string(), code, "{run}");
                inv.expect_log(&id, 1, format!("exiting with {code}\n"));
            }
            _ => {
                let seconds = params["seconds"].as_str().expect("seconds");
                assert_eq!(run["status"], "succeeded", "{run}");
                inv.expect_log(&id, 1, format!("sleeping {seconds}\nwoke\n"));
            }
        }
        finals.push(run);
    }
    inv.check(api).await;
    finals
}

pub(super) fn worker_of(run: &Value) -> String {
    attempts_of(run)
        .last()
        .and_then(|a| a["worker_id"].as_str())
        .unwrap_or_default()
        .to_owned()
}
