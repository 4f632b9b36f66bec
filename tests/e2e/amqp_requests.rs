//! Producers on the request queue: runs asked for over AMQP, with replies to
//! `reply_to`, dead-lettered refusals, idempotency by `message_id`, and replies that
//! survive a restart of `serve`.

use std::time::Duration;

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use serde_json::{Value, json};

use crate::common::{
    QueueGuard, ServeOptions, Server, TOKEN, amqp_url, queue_counts, start_worker, unique,
    wait_for_queue,
};

/// A server with an embedded worker, its run queue and a request queue of its own.
struct Setup {
    server: Server,
    requests: String,
    _guards: (QueueGuard, QueueGuard),
}

fn setup(dir: &std::path::Path, embedded_worker: bool) -> Setup {
    let queue = unique("tasuki-test");
    let requests = unique("tasuki-req");
    let guards = (QueueGuard(queue.clone()), QueueGuard(requests.clone()));
    let server = Server::start(
        dir,
        ServeOptions {
            amqp_queue: Some(queue),
            embedded_worker,
            worker_token: Some(TOKEN.to_owned()),
            env: vec![("TASUKI_REQUEST_QUEUE".into(), requests.clone())],
            ..ServeOptions::default()
        },
    );
    Setup {
        server,
        requests,
        _guards: guards,
    }
}

/// A producer: a confirm channel and an exclusive reply queue it consumes.
struct Producer {
    _conn: Connection,
    channel: Channel,
    _reply_channel: Channel,
    reply_queue: String,
    replies: Consumer,
}

fn user() -> String {
    let url = amqp_url();
    let rest = url.split("//").nth(1).unwrap_or_default();
    rest.split([':', '@']).next().unwrap_or("guest").to_owned()
}

fn header(d: &Delivery, name: &str) -> Option<AMQPValue> {
    d.properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(name).cloned())
}

fn text_header(d: &Delivery, name: &str) -> Option<String> {
    match header(d, name)? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        other => panic!("header {name} is {other:?}"),
    }
}

impl Producer {
    async fn new() -> Producer {
        let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .unwrap();
        let channel = conn.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let q = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let reply_queue = q.name().to_string();
        // Replies on a channel of their own: a reply may arrive while a publish on the
        // other channel waits for its confirm.
        let reply_channel = conn.create_channel().await.unwrap();
        let replies = reply_channel
            .basic_consume(
                reply_queue.as_str().into(),
                "replies".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        Producer {
            _conn: conn,
            channel,
            _reply_channel: reply_channel,
            reply_queue,
            replies,
        }
    }

    /// Publish a request with `reply_to` this producer's queue (unless `reply_to` says
    /// otherwise) and the given correlation and message ids.
    async fn request(
        &self,
        queue: &str,
        body: &Value,
        correlation_id: &str,
        message_id: Option<&str>,
        reply_to: Option<&str>,
    ) {
        let mut props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_user_id(ShortString::from(user()))
            .with_correlation_id(correlation_id.into())
            .with_reply_to(reply_to.unwrap_or(&self.reply_queue).into());
        if let Some(id) = message_id {
            props = props.with_message_id(id.into());
        }
        self.publish(queue, body.to_string().as_bytes(), props)
            .await;
    }

    async fn publish(&self, queue: &str, body: &[u8], props: BasicProperties) {
        self.channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }

    async fn reply(&mut self, within: Duration) -> (Delivery, Value) {
        let d = tokio::time::timeout(within, self.replies.next())
            .await
            .expect("a reply in time")
            .unwrap()
            .unwrap();
        let body = serde_json::from_slice(&d.data).unwrap();
        (d, body)
    }

    async fn no_reply(&mut self, within: Duration) {
        if let Ok(Some(d)) = tokio::time::timeout(within, self.replies.next()).await {
            panic!(
                "unexpected reply: {}",
                String::from_utf8_lossy(&d.unwrap().data)
            );
        }
    }
}

fn correlation(d: &Delivery) -> String {
    d.properties
        .correlation_id()
        .as_ref()
        .map(|c| c.to_string())
        .unwrap_or_default()
}

#[tokio::test]
async fn a_request_with_reply_to_gets_the_finished_run() {
    let d = tempfile::tempdir().unwrap();
    let s = setup(d.path(), true);
    wait_for_queue(&s.requests).await;
    let mut producer = Producer::new().await;
    producer
        .request(
            &s.requests,
            &json!({"v": 1, "job": "exit", "params": {"code": 3}}),
            "corr-1",
            None,
            None,
        )
        .await;
    let (reply, run) = producer.reply(Duration::from_secs(60)).await;
    assert_eq!(correlation(&reply), "corr-1");
    assert_eq!(run["status"], "failed", "{run}");
    assert_eq!(run["exit_code"], 3);
    assert_eq!(run["requested_by"], user());
    assert_eq!(
        text_header(&reply, "x-tasuki-status").as_deref(),
        Some("failed")
    );
    assert_eq!(
        header(&reply, "x-tasuki-exit-code"),
        Some(AMQPValue::LongLongInt(3))
    );
    // The run as the API tells it records the reply as sent.
    let api = s.server.client();
    let stored = api
        .wait_until(
            run["id"].as_str().unwrap(),
            Duration::from_secs(10),
            "reply sent",
            |r: &Value| r["replies"][0]["state"] == "sent",
        )
        .await;
    assert_eq!(stored["replies"][0]["kind"], "finished");
    assert_eq!(queue_counts(&s.requests), (0, 0));
}

#[tokio::test]
async fn accepted_and_finished_replies_are_two() {
    let d = tempfile::tempdir().unwrap();
    let s = setup(d.path(), true);
    wait_for_queue(&s.requests).await;
    let mut producer = Producer::new().await;
    producer
        .request(
            &s.requests,
            &json!({"v": 1, "job": "sleep", "params": {"seconds": "1"},
                    "reply": ["accepted", "finished"]}),
            "corr-2",
            None,
            None,
        )
        .await;
    let (first, accepted) = producer.reply(Duration::from_secs(30)).await;
    assert_eq!(correlation(&first), "corr-2");
    assert_eq!(
        text_header(&first, "x-tasuki-reply").as_deref(),
        Some("accepted")
    );
    assert!(accepted["finished_at"].is_null(), "{accepted}");
    let (second, finished) = producer.reply(Duration::from_secs(60)).await;
    assert_eq!(correlation(&second), "corr-2");
    assert_eq!(
        text_header(&second, "x-tasuki-reply").as_deref(),
        Some("finished")
    );
    assert_eq!(finished["id"], accepted["id"]);
    assert_eq!(finished["status"], "succeeded");
    assert_eq!(
        header(&second, "x-tasuki-exit-code"),
        Some(AMQPValue::LongLongInt(0))
    );
    producer.no_reply(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn the_same_message_id_twice_is_one_run() {
    let d = tempfile::tempdir().unwrap();
    let s = setup(d.path(), true);
    wait_for_queue(&s.requests).await;
    let mut producer = Producer::new().await;
    let key = unique("order");
    for corr in ["first", "second"] {
        producer
            .request(
                &s.requests,
                &json!({"v": 1, "job": "exit", "params": {"code": 0}}),
                corr,
                Some(&key),
                None,
            )
            .await;
    }
    // One run; the repeat (another correlation id: a producer's retry) gets its own
    // reply about the same run.
    let (a, first) = producer.reply(Duration::from_secs(60)).await;
    let (b, second) = producer.reply(Duration::from_secs(30)).await;
    let mut correlations = [correlation(&a), correlation(&b)];
    correlations.sort();
    assert_eq!(correlations, ["first", "second"]);
    assert_eq!(first["id"], second["id"]);
    assert_eq!(first["status"], "succeeded");
    producer.no_reply(Duration::from_secs(2)).await;
    let (_, runs) = s.server.client().get("/v1/runs?job=exit").await;
    assert_eq!(runs["runs"].as_array().map(Vec::len), Some(1), "{runs}");
    assert_eq!(queue_counts(&s.requests), (0, 0));
}

#[tokio::test]
async fn a_refused_request_is_answered_and_dead_lettered_with_the_error() {
    let d = tempfile::tempdir().unwrap();
    let s = setup(d.path(), true);
    wait_for_queue(&s.requests).await;
    let mut producer = Producer::new().await;
    producer
        .request(
            &s.requests,
            &json!({"v": 1, "job": "no-such-job"}),
            "corr-bad",
            None,
            None,
        )
        .await;
    let (reply, body) = producer.reply(Duration::from_secs(30)).await;
    assert_eq!(correlation(&reply), "corr-bad");
    assert_eq!(body["error"]["code"], "unknown_job", "{body}");
    assert_eq!(body["error"]["message"], "no job named `no-such-job`");
    // Not JSON, without reply_to: dead-lettered only.
    producer
        .publish(&s.requests, b"not json", BasicProperties::default())
        .await;

    let dead = format!("{}.dead", s.requests);
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while got.len() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "dead-lettered: {got:?}"
        );
        match producer
            .channel
            .basic_get(dead.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            Some(m) => got.push((
                text_header(&m.delivery, "x-tasuki-error-code").unwrap_or_default(),
                text_header(&m.delivery, "x-tasuki-error-message").unwrap_or_default(),
                String::from_utf8_lossy(&m.delivery.data).into_owned(),
            )),
            None => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    assert_eq!(got[0].0, "unknown_job");
    assert_eq!(got[0].1, "no job named `no-such-job`");
    assert!(got[0].2.contains("no-such-job"));
    assert_eq!(got[1].0, "bad_request");
    assert!(got[1].1.contains("not valid JSON"), "{}", got[1].1);
    assert_eq!(got[1].2, "not json");
    producer.no_reply(Duration::from_secs(1)).await;
    assert_eq!(queue_counts(&s.requests), (0, 0));
}

#[tokio::test]
async fn a_reply_to_a_missing_queue_is_recorded_unroutable() {
    let d = tempfile::tempdir().unwrap();
    let s = setup(d.path(), true);
    wait_for_queue(&s.requests).await;
    let producer = Producer::new().await;
    let gone = unique("tasuki-gone");
    producer
        .request(
            &s.requests,
            &json!({"v": 1, "job": "exit", "params": {"code": 0}}),
            "corr-gone",
            Some(&unique("k")),
            Some(&gone),
        )
        .await;
    let api = s.server.client();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let run = loop {
        let (_, runs) = api.get("/v1/runs?job=exit").await;
        if let Some(run) = runs["runs"].as_array().and_then(|r| r.first())
            && run["replies"][0]["state"] == "unroutable"
        {
            break run.clone();
        }
        assert!(tokio::time::Instant::now() < deadline, "{runs}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let reply = &run["replies"][0];
    assert_eq!(reply["to"], gone.as_str());
    assert_eq!(reply["tries"], 1);
    assert!(
        reply["last_error"].as_str().unwrap().contains("NO_ROUTE"),
        "{reply}"
    );
    // Not retried.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = api.run(run["id"].as_str().unwrap()).await;
    assert_eq!(after["replies"][0]["tries"], 1);
}

#[tokio::test]
async fn a_finished_reply_owed_across_a_restart_of_serve_is_sent() {
    let d = tempfile::tempdir().unwrap();
    let mut s = setup(d.path(), false);
    let queue = s._guards.0.0.clone();
    let _worker = start_worker(d.path(), &s.server, &queue, TOKEN, 1);
    wait_for_queue(&s.requests).await;
    let mut producer = Producer::new().await;
    producer
        .request(
            &s.requests,
            &json!({"v": 1, "job": "sleep", "params": {"seconds": "3"}}),
            "corr-restart",
            None,
            None,
        )
        .await;
    let api = s.server.client();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let id = loop {
        let (_, runs) = api.get("/v1/runs?job=sleep").await;
        if let Some(run) = runs["runs"].as_array().and_then(|r| r.first())
            && run["status"] == "running"
        {
            break run["id"].as_str().unwrap().to_owned();
        }
        assert!(tokio::time::Instant::now() < deadline, "{runs}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // serve dies while the container sleeps: only the stored obligation remembers the
    // reply. The worker keeps the container and reports once serve is back.
    s.server.process.kill9();
    tokio::time::sleep(Duration::from_secs(4)).await;
    s.server.restart(d.path());
    let (reply, run) = producer.reply(Duration::from_secs(90)).await;
    assert_eq!(correlation(&reply), "corr-restart");
    assert_eq!(run["id"], id.as_str());
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(
        text_header(&reply, "x-tasuki-status").as_deref(),
        Some("succeeded")
    );
}

#[tokio::test]
async fn a_queue_request_carries_a_callback_and_a_refused_one_is_dead_lettered() {
    let d = tempfile::tempdir().unwrap();
    let queue = unique("tasuki-test");
    let requests = unique("tasuki-req");
    let _guards = (QueueGuard(queue.clone()), QueueGuard(requests.clone()));
    let server = Server::start(
        d.path(),
        ServeOptions {
            amqp_queue: Some(queue),
            embedded_worker: true,
            worker_token: Some(TOKEN.to_owned()),
            env: vec![
                ("TASUKI_REQUEST_QUEUE".into(), requests.clone()),
                ("TASUKI_CALLBACK_ALLOW".into(), "127.0.0.1/32".into()),
            ],
            ..ServeOptions::default()
        },
    );
    wait_for_queue(&requests).await;
    let (receiver, port) = crate::callbacks::receiver(&[]).await;
    let mut producer = Producer::new().await;
    // Allowed (127.0.0.1 is on the allow-list): the run announces its end there.
    producer
        .request(
            &requests,
            &json!({"v": 1, "job": "exit", "params": {"code": 0},
                    "callback": {"url": format!("http://127.0.0.1:{port}/hook"), "events": ["finished"]}}),
            "corr-cb",
            None,
            None,
        )
        .await;
    let (_, run) = producer.reply(Duration::from_secs(60)).await;
    let id = run["id"].as_str().unwrap().to_owned();
    let api = server.client();
    let stored = api
        .wait_until(
            &id,
            Duration::from_secs(30),
            "callback delivered",
            |r: &Value| !r["callbacks"][0]["delivered_at"].is_null(),
        )
        .await;
    assert_eq!(
        stored["callbacks"][0]["url"],
        format!("http://127.0.0.1:{port}/hook")
    );
    let got = receiver.got.lock().unwrap().clone();
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(got[0].body.contains(&id), "{got:?}");

    // Refused (link-local metadata address): answered and dead-lettered, never called.
    producer
        .request(
            &requests,
            &json!({"v": 1, "job": "exit", "callback": {"url": "http://169.254.169.254/latest"}}),
            "corr-refused",
            None,
            None,
        )
        .await;
    let (reply, body) = producer.reply(Duration::from_secs(30)).await;
    assert_eq!(correlation(&reply), "corr-refused");
    assert_eq!(body["error"]["code"], "invalid_callback", "{body}");
    let dead = format!("{requests}.dead");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let message = loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing dead-lettered"
        );
        match producer
            .channel
            .basic_get(dead.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            Some(m) => break m,
            None => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    assert_eq!(
        text_header(&message.delivery, "x-tasuki-error-code").as_deref(),
        Some("invalid_callback")
    );
    let (_, listed) = api.get("/v1/runs?job=exit&limit=100").await;
    assert_eq!(listed["runs"].as_array().unwrap().len(), 1, "{listed}");
}
