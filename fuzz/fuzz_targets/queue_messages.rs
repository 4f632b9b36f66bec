//! The two AMQP message decoders: the producers' request (`{"v":1,"job":...}`,
//! `protocol::request::parse_request`) and the run message workers take
//! (`{"v":1,"run_id":...,"attempt":N}`, `protocol::parse_run_message`). Every input
//! goes through both.
//!
//! Beyond "no panic": a request read is written back in the frozen `RequestV1` shape
//! and reads the same; its replies are known and unique, and one at least unless it
//! asked for none (`"reply": []`); a callback is read from an object only; a version
//! other than 1 is named as such. A run message read is written back (`RunMessageV1`)
//! and reads the same, with an attempt of at least 1.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use tasuki::protocol::request::{
    CallbackRequestV1, MAX_REQUEST_BYTES, RequestError, RequestV1, parse_request,
};
use tasuki::protocol::{RunMessageV1, parse_run_message};

fuzz_target!(|body: &[u8]| {
    check_request(body);
    check_run_message(body);
});

fn check_request(body: &[u8]) {
    let json: Option<Value> = serde_json::from_slice(body).ok();
    match parse_request(body) {
        Ok(read) => {
            // `"reply": []` asks for no replies; without `reply` the default is one.
            let reply = json.as_ref().and_then(|v| v.get("reply"));
            assert!(reply.is_some() || !read.replies.is_empty());
            let callback = json.as_ref().and_then(|v| v.get("callback"));
            assert!(
                callback.is_none_or(|c| c.is_null() || c.is_object()),
                "{callback:?}"
            );
            for (i, r) in read.replies.iter().enumerate() {
                assert!(!read.replies[..i].contains(r), "{:?}", read.replies);
            }
            let written = RequestV1 {
                v: 1,
                job: read.job.clone(),
                params: read
                    .params
                    .iter()
                    .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
                    .collect(),
                reply: Some(read.replies.iter().map(|r| r.as_str().to_owned()).collect()),
                callback: read.callback.as_ref().map(|c| CallbackRequestV1 {
                    url: c.url.clone(),
                    events: None,
                }),
            };
            let again = serde_json::to_vec(&written).expect("a request serialises");
            assert_eq!(parse_request(&again), Ok(read), "written as {written:?}");
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
            let version = json
                .as_ref()
                .and_then(|v| v.get("v"))
                .and_then(Value::as_u64);
            match &e {
                RequestError::TooLarge(n) => assert!(*n > MAX_REQUEST_BYTES),
                RequestError::UnknownVersion(v) => assert_eq!(Some(*v), version),
                _ if body.len() <= MAX_REQUEST_BYTES => {
                    assert!(version.is_none_or(|v| v == 1), "version {version:?}: {e}");
                }
                _ => {}
            }
        }
    }
}

fn check_run_message(body: &[u8]) {
    match parse_run_message(body) {
        Ok(message) => {
            assert!(message.attempt >= 1);
            let again =
                serde_json::to_vec(&RunMessageV1::from(message)).expect("a run message serialises");
            let read = parse_run_message(&again).expect("a written run message reads");
            assert_eq!(read.run_id, message.run_id);
            assert_eq!(read.attempt, message.attempt);
        }
        Err(e) => assert!(!e.is_empty()),
    }
}
