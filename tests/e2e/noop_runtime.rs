//! The benchmark's no-op runtime (feature `bench`): a worker on it takes a run through
//! claim, output, heartbeats and finish like any other, and no container is made.

use serde_json::json;

use crate::common::{ServeOptions, Server, assert_no_containers_left};

#[tokio::test]
async fn a_run_on_the_noop_runtime_goes_through_the_whole_control_plane() {
    let d = tempfile::tempdir().expect("temp dir");
    let server = Server::start(
        d.path(),
        ServeOptions {
            lease_ttl: Some("1s".into()),
            extra_args: vec![
                "--runtime".into(),
                "noop".into(),
                "--noop-run-for".into(),
                "1500ms".into(),
                "--noop-output-bytes".into(),
                "100".into(),
            ],
            ..ServeOptions::default()
        },
    );
    let api = server.client();
    let run = api.run_and_wait("exit", json!({"code": "7"})).await;
    // The job asked for exit 7; the no-op runtime runs nothing and exits 0.
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["attempt"], 1);
    let id = run["id"].as_str().expect("run id");
    let log = api.logs(id).await;
    assert_eq!(log.len(), 100, "the no-op container's output is stored");
    assert!(log.ends_with(b"\n"));
    // It outlived its lease's TTL, so the lease was renewed (or it would be lost).
    assert_eq!(run["reason_code"], serde_json::Value::Null, "{run}");
    assert_no_containers_left(&server.process.worker_id).await;
}
