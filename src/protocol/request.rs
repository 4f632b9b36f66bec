//! The request queue's message: a producer asks for a run of a job,
//! `{"v":1,"job":"greet","params":{"name":"world"},"reply":["accepted","finished"]}`.
//! Params are strings, numbers or booleans (they reach the job as text), like the HTTP
//! API's; `reply` says which moments the producer hears about when it sets `reply_to`
//! (default: `["finished"]`). `fixtures/request_v1.json` freezes the shape.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::domain::reply::ReplyKind;

/// The largest request body taken.
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestV1 {
    pub v: u32,
    pub job: String,
    #[serde(default)]
    pub params: BTreeMap<String, serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<Vec<String>>,
    /// Where the run announces its end, as in the HTTP body.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "object"
    )]
    pub callback: Option<CallbackRequestV1>,
}

/// `"callback": {"url": "...", "events": ["finished"]}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CallbackRequestV1 {
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<Vec<String>>,
}

/// A struct-shaped field, from a JSON object only (or `null`): serde's derive would
/// also take an array and fill the fields by position, `["https://..."]`.
pub fn object<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    use serde::de::Error;
    let Some(map) = Option::<serde_json::Map<String, serde_json::Value>>::deserialize(d)? else {
        return Ok(None);
    };
    T::deserialize(serde_json::Value::Object(map))
        .map(Some)
        .map_err(D::Error::custom)
}

/// A request read: the job, its params as text, and the replies wanted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunRequest {
    pub job: String,
    pub params: BTreeMap<String, String>,
    pub replies: Vec<ReplyKind>,
    /// The request's own callback (it replaces the job's `[callback]`).
    pub callback: Option<crate::domain::callback::CallbackTarget>,
}

/// Why a request cannot become a run before its job is even looked up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("request body is {0} bytes; at most {MAX_REQUEST_BYTES} are taken")]
    TooLarge(usize),
    #[error("request body is not valid JSON for a run request: {0}")]
    NotJson(String),
    #[error("request version {0} is not known; this server reads version 1")]
    UnknownVersion(u64),
    #[error("{0}")]
    InvalidParams(String),
    #[error("`reply` lists `{0}`; give `accepted` and/or `finished`")]
    UnknownReply(String),
    #[error("unknown callback event `{0}`; known: finished")]
    UnknownCallbackEvent(String),
}

/// Read a request body, with a stated reason for anything unreadable.
pub fn parse_request(body: &[u8]) -> Result<RunRequest, RequestError> {
    if body.len() > MAX_REQUEST_BYTES {
        return Err(RequestError::TooLarge(body.len()));
    }
    // The version first, so a newer message is named as such and not as bad JSON.
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| RequestError::NotJson(e.to_string()))?;
    match value.get("v").and_then(serde_json::Value::as_u64) {
        Some(1) => {}
        Some(v) => return Err(RequestError::UnknownVersion(v)),
        None => return Err(RequestError::NotJson("`v` (a number) is missing".into())),
    }
    let request: RequestV1 =
        serde_json::from_value(value).map_err(|e| RequestError::NotJson(e.to_string()))?;
    let params = request
        .params
        .into_iter()
        .map(|(k, v)| match v {
            serde_json::Value::String(s) => Ok((k, s)),
            serde_json::Value::Number(n) => Ok((k, n.to_string())),
            serde_json::Value::Bool(b) => Ok((k, b.to_string())),
            other => {
                let kind = match other {
                    serde_json::Value::Null => "null",
                    serde_json::Value::Array(_) => "an array",
                    _ => "an object",
                };
                Err(RequestError::InvalidParams(format!(
                    "parameter `{k}` is {kind}; give a string, number or boolean"
                )))
            }
        })
        .collect::<Result<_, _>>()?;
    let mut replies = Vec::new();
    for r in request.reply.unwrap_or_else(|| vec!["finished".into()]) {
        let kind = ReplyKind::parse(&r).ok_or(RequestError::UnknownReply(r))?;
        if !replies.contains(&kind) {
            replies.push(kind);
        }
    }
    let callback = match request.callback {
        None => None,
        Some(c) => {
            let events = c.events.unwrap_or_default();
            if let Some(unknown) = events
                .iter()
                .find(|e| !crate::domain::callback::EVENTS.contains(&e.as_str()))
            {
                return Err(RequestError::UnknownCallbackEvent(unknown.clone()));
            }
            Some(crate::domain::callback::CallbackTarget { url: c.url })
        }
    };
    Ok(RunRequest {
        job: request.job,
        params,
        replies,
        callback,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &str = include_str!("fixtures/request_v1.json");

    #[test]
    fn the_request_format_is_frozen() {
        let sample = RequestV1 {
            v: 1,
            job: "greet".into(),
            params: BTreeMap::from([
                ("count".to_owned(), serde_json::json!(3)),
                ("loud".to_owned(), serde_json::json!(true)),
                ("name".to_owned(), serde_json::json!("world")),
            ]),
            reply: Some(vec!["accepted".into(), "finished".into()]),
            callback: Some(CallbackRequestV1 {
                url: "https://hooks.example.com/tasuki".into(),
                events: Some(vec!["finished".into()]),
            }),
        };
        assert_eq!(
            serde_json::to_string_pretty(&sample).unwrap(),
            FIXTURE.trim_end(),
            "the request JSON changed; if on purpose, update src/protocol/fixtures/request_v1.json"
        );
        let read = parse_request(FIXTURE.as_bytes()).unwrap();
        assert_eq!(read.job, "greet");
        assert_eq!(read.params["count"], "3");
        assert_eq!(read.params["loud"], "true");
        assert_eq!(read.params["name"], "world");
        assert_eq!(read.replies, [ReplyKind::Accepted, ReplyKind::Finished]);
        assert_eq!(
            read.callback.map(|c| c.url).as_deref(),
            Some("https://hooks.example.com/tasuki")
        );
    }

    #[test]
    fn a_callback_with_an_unknown_event_is_refused() {
        let e = parse_request(
            br#"{"v":1,"job":"greet","callback":{"url":"https://x.example/","events":["started"]}}"#,
        )
        .unwrap_err();
        assert_eq!(e, RequestError::UnknownCallbackEvent("started".into()));
        let none = parse_request(br#"{"v":1,"job":"greet"}"#).unwrap();
        assert_eq!(none.callback, None);
    }

    #[test]
    fn replies_default_to_finished_and_params_to_none() {
        let read = parse_request(br#"{"v":1,"job":"greet"}"#).unwrap();
        assert_eq!(read.replies, [ReplyKind::Finished]);
        assert!(read.params.is_empty());
    }

    #[test]
    fn unreadable_requests_are_refused_with_a_reason() {
        let cases: [(&[u8], &str); 6] = [
            (b"not json", "not valid JSON"),
            (br#"{"v":2,"job":"greet"}"#, "version 2 is not known"),
            (br#"{"job":"greet"}"#, "`v`"),
            (
                br#"{"v":1,"job":"greet","params":{"a":[1]}}"#,
                "is an array",
            ),
            (br#"{"v":1,"job":"greet","reply":["started"]}"#, "`started`"),
            (br#"{"v":1,"job":"greet","extra":1}"#, "unknown field"),
        ];
        for (body, want) in cases {
            let err = parse_request(body).unwrap_err().to_string();
            assert!(err.contains(want), "{err} should mention {want}");
        }
        let big = vec![b' '; MAX_REQUEST_BYTES + 1];
        assert!(matches!(
            parse_request(&big),
            Err(RequestError::TooLarge(_))
        ));
    }

    /// Found by `fuzz/fuzz_targets/create_run_body.rs`: a callback given as an array was
    /// read by position, `["https://x.example/"]` as its `url`.
    #[test]
    fn fuzz_a_callback_given_as_an_array_is_refused() {
        let e = parse_request(br#"{"v":1,"job":"greet","callback":["https://x.example/"]}"#)
            .unwrap_err();
        assert!(matches!(e, RequestError::NotJson(_)), "{e}");
        assert!(e.to_string().contains("expected a map"), "{e}");
        let none = parse_request(br#"{"v":1,"job":"greet","callback":null}"#).unwrap();
        assert_eq!(none.callback, None);
    }
}
