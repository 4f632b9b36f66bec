//! `--queue-type quorum`: the run queue and its dead-letter queue as quorum queues on
//! the real broker, jobs run through them end to end, a message handed back more often
//! than `--delivery-limit` is dead-lettered, and a queue declared as another kind is
//! named as such.

use std::process::Command;
use std::time::{Duration, Instant};

use lapin::options::{BasicGetOptions, BasicNackOptions};
use lapin::{Connection, ConnectionProperties};
use serde_json::json;

use crate::common::{
    Process, QueueGuard, ServeOptions, Server, TOKEN, WorkerSpec, amqp_server, amqp_url,
    assert_no_containers_left, publish_raw, queue_counts, start_worker_with, unique,
};

fn quorum_env(limit: u32) -> Vec<(String, String)> {
    vec![
        ("TASUKI_QUEUE_TYPE".into(), "quorum".into()),
        ("TASUKI_DELIVERY_LIMIT".into(), limit.to_string()),
    ]
}

fn quorum_server(dir: &std::path::Path, queue: &str, limit: u32) -> Server {
    Server::start(
        dir,
        ServeOptions {
            amqp_queue: Some(queue.to_owned()),
            worker_token: Some(TOKEN.to_owned()),
            env: quorum_env(limit),
            ..ServeOptions::default()
        },
    )
}

fn quorum_worker(dir: &std::path::Path, server: &Server, queue: &str, limit: u32) -> Process {
    start_worker_with(
        dir,
        server,
        queue,
        TOKEN,
        WorkerSpec {
            env: quorum_env(limit),
            ..WorkerSpec::default()
        },
    )
}

/// The broker's `type` of a queue (`classic`, `quorum`).
fn queue_type(queue: &str) -> String {
    let out = Command::new("rabbitmqctl")
        .args(["list_queues", "-q", "--no-table-headers", "name", "type"])
        .output()
        .expect("rabbitmqctl");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|cols| cols.len() == 2 && cols[0] == queue)
        .map(|cols| cols[1].to_owned())
        .unwrap_or_else(|| panic!("queue {queue} not listed: {text}"))
}

#[tokio::test]
async fn jobs_run_through_quorum_queues_and_a_message_handed_back_too_often_is_dead_lettered() {
    let d = tempfile::tempdir().unwrap();
    let queue = unique("tasuki-test");
    let _guard = QueueGuard(queue.clone());
    let server = quorum_server(d.path(), &queue, 2);
    let worker = quorum_worker(d.path(), &server, &queue, 2);
    let api = server.client();
    let run = api.run_and_wait("exit", json!({"code": "4"})).await;
    assert_eq!(run["status"], "failed", "{run}");
    assert_eq!(run["exit_code"], 4);
    assert_eq!(queue_type(&queue), "quorum");
    assert_eq!(queue_type(&format!("{queue}.dead")), "quorum");
    drop(worker);
    assert_no_containers_left(&server.process.worker_id).await;

    // A message nobody can take, handed back again and again: delivered three times
    // (the limit is 2 redeliveries), then dead-lettered, never delivered a fourth time.
    publish_raw(&queue, b"handed back each time").await;
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("connect");
    let channel = conn.create_channel().await.expect("channel");
    let mut deliveries = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while queue_counts(&format!("{queue}.dead")).0 == 0 {
        assert!(Instant::now() < deadline, "never dead-lettered");
        let got = channel
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
            .await
            .expect("basic.get");
        match got {
            Some(message) => {
                deliveries += 1;
                message
                    .delivery
                    .acker
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..BasicNackOptions::default()
                    })
                    .await
                    .expect("nack");
            }
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    assert_eq!(deliveries, 3);
    assert_eq!(queue_counts(&queue), (0, 0));
    assert_eq!(queue_counts(&format!("{queue}.dead")), (1, 0));
    let _ = conn.close(200, "bye".into()).await;
}

#[tokio::test]
async fn a_queue_declared_as_another_kind_is_named_as_such() {
    let d = tempfile::tempdir().unwrap();
    let queue = unique("tasuki-test");
    let _guard = QueueGuard(queue.clone());
    // A classic installation's queue, then a worker told it is a quorum queue.
    let server = amqp_server(d.path(), &queue, "30s");
    // The relay declares the queue with its first publish.
    server.client().accept("exit", json!({"code": "0"})).await;
    crate::common::wait_for_queue(&queue).await;
    let worker = quorum_worker(d.path(), &server, &queue, 20);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = worker.log_text();
        if log.contains("as a quorum queue: it exists with other arguments")
            && log.contains("cannot change a queue's type or arguments in place")
        {
            break;
        }
        assert!(Instant::now() < deadline, "{log}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(queue_type(&queue), "classic");
}
