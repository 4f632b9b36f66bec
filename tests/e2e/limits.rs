//! `[limits]` against hostile clients, over raw sockets where a well-behaved client
//! cannot misbehave enough: oversized and too many headers (431 from hyper), a client
//! that dribbles its head (closed after `header_timeout`, no answer), a stalled body
//! (408), a burst over the rate (429 with `Retry-After`), holds over the cap (429), and
//! params over their caps on both doors, HTTP and the request queue.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use lapin::options::BasicGetOptions;
use lapin::types::AMQPValue;
use serde_json::{Value, json};

use crate::common::{
    QueueGuard, ServeOptions, Server, TOKEN, amqp_url, publish_raw, unique, wait_for_queue,
};

fn server_with(dir: &std::path::Path, limits: &[(&str, &str)]) -> Server {
    Server::start(
        dir,
        ServeOptions {
            env: env(limits),
            ..ServeOptions::default()
        },
    )
}

fn env(limits: &[(&str, &str)]) -> Vec<(String, String)> {
    limits
        .iter()
        .map(|(k, v)| (format!("TASUKI_LIMITS_{k}"), (*v).to_owned()))
        .collect()
}

/// A raw connection; a read that waits 30 s fails the test instead of hanging it.
fn connect(server: &Server) -> TcpStream {
    let stream = TcpStream::connect(server.addr()).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream
}

/// Everything the server sends until it closes the connection. A reset after the
/// answer counts as a close; a read that times out is a failure.
fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return got,
            Err(e) => panic!(
                "connection not closed ({e}); got so far: {:?}",
                String::from_utf8_lossy(&got)
            ),
        }
    }
}

/// Send `request` whole, half-close, and read the answer to its end.
fn exchange(server: &Server, request: &[u8]) -> String {
    let mut stream = connect(server);
    stream.write_all(request).expect("send request");
    stream.shutdown(Shutdown::Write).expect("half-close");
    String::from_utf8_lossy(&read_until_closed(&mut stream)).into_owned()
}

fn get_with_headers(headers: &[String]) -> Vec<u8> {
    let mut request =
        String::from("GET /healthz HTTP/1.1\r\nHost: tasuki\r\nConnection: close\r\n");
    for h in headers {
        request.push_str(h);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    request.into_bytes()
}

#[tokio::test]
async fn limits_oversized_and_too_many_headers_get_431() {
    let d = tempfile::tempdir().unwrap();
    let server = server_with(
        d.path(),
        &[("MAX_HEADER_BYTES", "4096"), ("MAX_HEADERS", "16")],
    );
    let fine: Vec<String> = (0..10)
        .map(|i| format!("X-Fine-{i}: {}", "a".repeat(100)))
        .collect();
    let answer = exchange(&server, &get_with_headers(&fine));
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // hyper answers 431 itself (no body) and closes the connection, for a header block
    // over the bytes, for one over the line count, and for one far over the bytes that
    // is still arriving when the answer goes out.
    let big = vec![format!("X-Big: {}", "a".repeat(5000))];
    let many: Vec<String> = (0..20).map(|i| format!("X-Many-{i}: 1")).collect();
    let huge = vec![format!("X-Huge: {}", "a".repeat(1024 * 1024))];
    for (what, headers) in [("big", big), ("many", many), ("huge", huge)] {
        let answer = exchange(&server, &get_with_headers(&headers));
        assert!(
            answer.starts_with("HTTP/1.1 431"),
            "{what}: {:?}",
            &answer[..answer.len().min(200)]
        );
    }
}

#[tokio::test]
async fn limits_a_client_slow_with_its_head_is_disconnected_after_the_header_timeout() {
    let d = tempfile::tempdir().unwrap();
    let server = server_with(d.path(), &[("HEADER_TIMEOUT", "1s")]);

    // Part of a head, then nothing.
    let mut partial = connect(&server);
    partial
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: tasuki\r\n")
        .unwrap();
    // Nothing at all.
    let mut silent = connect(&server);
    // A byte at a time, never finishing: a deadline for the whole head, not per read.
    let mut dribbler = connect(&server);
    let mut dribble = dribbler.try_clone().unwrap();
    let dribbling = std::thread::spawn(move || {
        let head = b"GET /healthz HTTP/1.1\r\nHost: tasuki\r\nX-Slow: ";
        let started = Instant::now();
        for byte in head.iter().chain(std::iter::repeat(&b'a')) {
            if dribble.write_all(&[*byte]).is_err() || started.elapsed() > Duration::from_secs(30) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    for (what, stream) in [
        ("partial", &mut partial),
        ("silent", &mut silent),
        ("dribbling", &mut dribbler),
    ] {
        let got = read_until_closed(stream);
        assert!(
            got.is_empty(),
            "{what}: {:?}",
            String::from_utf8_lossy(&got)
        );
    }
    dribbling.join().unwrap();

    // A keep-alive connection idle after its answer is closed the same way.
    let mut idle = connect(&server);
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: tasuki\r\n\r\n")
        .unwrap();
    let answer = String::from_utf8_lossy(&read_until_closed(&mut idle)).into_owned();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // The server still serves everyone else.
    let answer = exchange(
        &server,
        b"GET /healthz HTTP/1.1\r\nHost: tasuki\r\nConnection: close\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test]
async fn limits_a_body_that_stalls_or_dribbles_gets_408() {
    let d = tempfile::tempdir().unwrap();
    let server = server_with(d.path(), &[("BODY_TIMEOUT", "1s")]);
    let head = "POST /v1/jobs/args/runs HTTP/1.1\r\nHost: tasuki\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n";

    let mut stalled = connect(&server);
    stalled.write_all(head.as_bytes()).unwrap();
    stalled.write_all(br#"{"params":"#).unwrap();
    let answer = String::from_utf8_lossy(&read_until_closed(&mut stalled)).into_owned();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );

    let mut dribbler = connect(&server);
    dribbler.write_all(head.as_bytes()).unwrap();
    let mut dribble = dribbler.try_clone().unwrap();
    let dribbling = std::thread::spawn(move || {
        for _ in 0..1000 {
            if dribble.write_all(b" ").is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let answer = String::from_utf8_lossy(&read_until_closed(&mut dribbler)).into_owned();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    drop(dribbler);
    dribbling.join().unwrap();
}

#[tokio::test]
async fn limits_a_burst_over_the_rate_gets_429_with_retry_after_and_later_passes() {
    let d = tempfile::tempdir().unwrap();
    let server = server_with(d.path(), &[("RATE_PER_SECOND", "1"), ("BURST", "3")]);
    let http = reqwest::Client::new();
    let get = |path: &str| http.get(format!("{}{path}", server.url)).send();

    let mut statuses = Vec::new();
    let mut retry_after = None;
    for _ in 0..8 {
        let response = get("/v1/jobs").await.unwrap();
        let status = response.status().as_u16();
        statuses.push(status);
        if status == 429 {
            let secs: u64 = response.headers()["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .expect("Retry-After in whole seconds");
            assert!(secs >= 1);
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["error"]["code"], "rate_limited", "{body}");
            assert!(
                body["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("anonymous"),
                "{body}"
            );
            retry_after = Some(secs);
        }
    }
    assert_eq!(statuses[..3], [200, 200, 200], "{statuses:?}");
    let secs = retry_after.unwrap_or_else(|| panic!("no 429 in {statuses:?}"));
    // Probes are never limited.
    assert_eq!(get("/healthz").await.unwrap().status().as_u16(), 200);
    // Whoever waits as told gets through.
    tokio::time::sleep(Duration::from_secs(secs)).await;
    assert_eq!(get("/v1/jobs").await.unwrap().status().as_u16(), 200);
}

#[tokio::test]
async fn limits_holds_over_the_cap_get_429_and_come_back_when_one_ends() {
    let d = tempfile::tempdir().unwrap();
    let server = Server::start(
        d.path(),
        ServeOptions {
            embedded_worker: true,
            env: env(&[("MAX_HOLDS_PER_TOKEN", "2")]),
            ..ServeOptions::default()
        },
    );
    let api = server.client();
    // Output every 0.1 s for two minutes: follows stay open, and a follow whose client
    // went away learns it at its next write.
    let id = api
        .accept("count", json!({"lines": "1200", "pause": "0.1"}))
        .await;
    let follow = || async {
        let client = reqwest::Client::new();
        client
            .get(format!("{}/v1/runs/{id}/logs?follow=true", server.url))
            .send()
            .await
            .unwrap()
    };
    // A follow's answer starts at once, so its hold is counted once its status is here.
    let first = follow().await;
    assert_eq!(first.status().as_u16(), 200);
    let second = follow().await;
    assert_eq!(second.status().as_u16(), 200);

    let third = follow().await;
    assert_eq!(third.status().as_u16(), 429);
    let body: Value = third.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_many_holds", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_holds_per_token"),
        "{body}"
    );
    let (status, body) = api.get(&format!("/v1/runs/{id}?wait=5")).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (429, Some("too_many_holds"))
    );
    // Refused before the run is accepted: no run is left behind.
    let answer = api
        .post_run("exit", r#"{"params":{"code":"0"}}"#, "?wait=5")
        .await;
    assert_eq!(answer.status, 429, "{}", answer.body);
    let (_, list) = api.get("/v1/runs?job=exit").await;
    assert_eq!(list["runs"], json!([]), "{list}");
    // Without a wait nothing is held.
    let (status, _) = api.get(&format!("/v1/runs/{id}")).await;
    assert_eq!(status, 200);

    // A client that goes away gives its hold back.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = api.get(&format!("/v1/runs/{id}?wait=1")).await;
        if status != 429 {
            assert_eq!(status, 202, "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "the hold was never given back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(second);
    let cancelled = api.post(&format!("/v1/runs/{id}/cancel")).await;
    assert_eq!(cancelled.status, 202, "{}", cancelled.body);
    api.wait_final(&id, Duration::from_secs(60)).await;
}

/// Dead-lettered requests of a request queue: (error code header, body).
async fn dead_letters(requests: &str, want: usize) -> Vec<(String, String)> {
    let conn = lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    let dead = format!("{requests}.dead");
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while got.len() < want {
        assert!(Instant::now() < deadline, "dead-lettered: {got:?}");
        match channel
            .basic_get(dead.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            Some(m) => {
                let code = m
                    .delivery
                    .properties
                    .headers()
                    .as_ref()
                    .and_then(|h| h.inner().get("x-tasuki-error-code").cloned());
                let code = match code {
                    Some(AMQPValue::LongString(s)) => s.to_string(),
                    other => format!("{other:?}"),
                };
                got.push((code, String::from_utf8_lossy(&m.delivery.data).into_owned()));
            }
            None => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    let _ = conn.close(200, "bye".into()).await;
    got
}

#[tokio::test]
async fn limits_too_many_or_too_large_params_are_refused_on_http_and_the_queue() {
    let d = tempfile::tempdir().unwrap();
    let queue = unique("tasuki-test");
    let requests = unique("tasuki-req");
    let _guards = (QueueGuard(queue.clone()), QueueGuard(requests.clone()));
    let mut server_env = env(&[("MAX_PARAMS", "2"), ("MAX_PARAM_BYTES", "16")]);
    server_env.push(("TASUKI_REQUEST_QUEUE".into(), requests.clone()));
    // No worker: accepted runs stay queued, which is all this test needs.
    let server = Server::start(
        d.path(),
        ServeOptions {
            amqp_queue: Some(queue),
            worker_token: Some(TOKEN.to_owned()),
            env: server_env,
            ..ServeOptions::default()
        },
    );
    let api = server.client();

    let three = json!({"params": {"value": "a", "tag": "b", "extra": "c"}}).to_string();
    let answer = api.post_run("args", &three, "").await;
    assert_eq!(answer.status, 422, "{}", answer.body);
    assert_eq!(answer.body["error"]["code"], "invalid_params");
    assert_eq!(
        answer.body["error"]["message"],
        "3 parameters given; at most 2 are allowed (limits.max_params)"
    );

    let large = json!({"params": {"value": "x".repeat(17)}}).to_string();
    let answer = api.post_run("args", &large, "").await;
    assert_eq!(answer.status, 413, "{}", answer.body);
    assert_eq!(answer.body["error"]["code"], "param_too_large");
    assert_eq!(
        answer.body["error"]["message"],
        "parameter `value` is 17 bytes long; at most 16 are allowed (limits.max_param_bytes)"
    );

    let fits = json!({"params": {"value": "x".repeat(16), "tag": "ok"}}).to_string();
    let answer = api.post_run("args", &fits, "").await;
    assert_eq!(answer.status, 202, "{}", answer.body);

    // The request queue obeys the same limits.
    wait_for_queue(&requests).await;
    let request = json!({"v": 1, "job": "args", "params": {"value": "y".repeat(17)}});
    publish_raw(&requests, request.to_string().as_bytes()).await;
    let dead = dead_letters(&requests, 1).await;
    assert_eq!(dead[0].0, "param_too_large", "{dead:?}");
    assert!(dead[0].1.contains(&"y".repeat(17)), "{dead:?}");
}
