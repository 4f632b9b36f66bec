//! The body of `POST /v1/jobs/{job}/runs` (`tasuki::http::parse_create_run`).
//!
//! Beyond "no panic": what it accepts is what the JSON says (every parameter, as the
//! text of its string, number or boolean; the callback's URL); a refusal is 400 for a
//! body that is not a run request and 422 for a parameter or event it cannot take; and
//! the queue's door (`protocol::request::parse_request`) reads the same `params` and
//! `callback` the same way, so a run asked for over HTTP or AMQP gets the same text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use tasuki::http::parse_create_run;
use tasuki::protocol::request::{RequestError, parse_request};

fuzz_target!(|body: &[u8]| {
    let http = parse_create_run(body);
    let json: Option<Value> = serde_json::from_slice(body).ok();
    match &http {
        Ok(read) => {
            // Empty, or JSON `null`: nothing asked for.
            if body.iter().all(u8::is_ascii_whitespace) || body.trim_ascii() == b"null" {
                assert!(read.params.is_empty() && read.callback.is_none());
                return;
            }
            let Some(Value::Object(object)) = &json else {
                panic!("accepted a body that is not a JSON object: {read:?}");
            };
            let params = object.get("params").and_then(Value::as_object);
            assert_eq!(read.params.len(), params.map_or(0, |p| p.len()));
            for (k, v) in params.into_iter().flatten() {
                let text = match v {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    other => panic!("accepted parameter `{k}` = {other}"),
                };
                assert_eq!(read.params.get(k), Some(&text), "parameter `{k}`");
            }
            let callback = object.get("callback").unwrap_or(&Value::Null);
            assert!(
                callback.is_null() || callback.is_object(),
                "a callback read from {callback}"
            );
            let url = object
                .get("callback")
                .and_then(|c| c.get("url"))
                .and_then(Value::as_str);
            assert_eq!(read.callback.as_ref().map(|c| c.url.as_str()), url);
        }
        Err(e) => {
            assert!(
                matches!(e.status.as_u16(), 400 | 422),
                "status {}: {}",
                e.status,
                e.message
            );
            assert!(!e.message.is_empty());
        }
    }

    // The same fields through the queue's door: the body's own text with `v` and `job`
    // put in front, so every number reaches both doors as the same digits.
    let Some(Value::Object(object)) = json else {
        return;
    };
    let keys = serde_json::from_slice::<Keys>(body).map_or(Vec::new(), |k| k.0);
    let unique = keys.len() == object.len();
    let only_http_fields = unique && object.keys().all(|k| k == "params" || k == "callback");
    let Ok(text) = std::str::from_utf8(body) else {
        return;
    };
    let inner = text
        .trim_start()
        .strip_prefix('{')
        .expect("a JSON object's text");
    let comma = if inner.trim_start().starts_with('}') {
        ""
    } else {
        ","
    };
    let message = format!(r#"{{"v":1,"job":"job"{comma}{inner}"#);
    let amqp = parse_request(message.as_bytes());
    match (&http, &amqp) {
        (Ok(read), Ok(request)) => {
            assert_eq!(read.params, request.params);
            assert_eq!(read.callback, request.callback);
        }
        (Ok(read), Err(e)) => panic!("HTTP took {read:?}, the queue refused: {e}"),
        (Err(e), Err(RequestError::InvalidParams(_) | RequestError::UnknownCallbackEvent(_)))
            if only_http_fields =>
        {
            assert_eq!(e.status.as_u16(), 422, "{}", e.message);
        }
        // Fields only the queue knows (`reply`, `v`) are unknown to HTTP, and of a field
        // given twice HTTP reads (and may refuse) the first, the queue the last.
        (Err(_), _) => {}
    }
});

/// A JSON object's top-level keys in order, duplicates kept.
struct Keys(Vec<String>);

impl<'de> serde::Deserialize<'de> for Keys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Keys, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Keys;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Keys, A::Error> {
                let mut keys = Vec::new();
                while let Some((k, _)) = map.next_entry::<String, serde::de::IgnoredAny>()? {
                    keys.push(k);
                }
                Ok(Keys(keys))
            }
        }
        d.deserialize_map(Visitor)
    }
}
