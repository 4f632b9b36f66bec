//! Request bodies read as JSON objects.
//!
//! serde's derive also reads a struct from an array, by position (`["a", "b"]` fills the
//! first two fields), and a struct whose fields all default from `[]`. The API's request
//! bodies are objects, so anything else is refused here before serde sees it.

use serde::de::DeserializeOwned;

use super::ApiError;

/// `body` as a `T`, refusing anything but a JSON object. `what` names the body in the
/// error, e.g. "backfill body (expected {\"from\": ..., \"to\": ...})".
pub(super) fn json_object<T: DeserializeOwned>(body: &[u8], what: &str) -> Result<T, ApiError> {
    let value: T = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid {what}: {e}")))?;
    if !body.trim_ascii_start().starts_with(b"{") {
        return Err(ApiError::bad_request(format!(
            "invalid {what}: give a JSON object, {{...}}"
        )));
    }
    Ok(value)
}

/// An optional object body: no body, or JSON `null` (what the document allows besides
/// an object), is `T::default()`. Anything else must be an object: whitespace alone is
/// not JSON and is refused.
pub(super) fn optional_json_object<T: Default + DeserializeOwned>(
    body: &[u8],
    what: &str,
) -> Result<T, ApiError> {
    if asks_for_nothing(body) {
        return Ok(T::default());
    }
    json_object(body, what)
}

/// No body at all, or JSON `null`.
pub(super) fn asks_for_nothing(body: &[u8]) -> bool {
    body.is_empty() || body.trim_ascii() == b"null"
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Default, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Note {
        #[serde(default)]
        note: Option<String>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    struct Range {
        from: String,
        to: String,
    }

    fn message(e: ApiError) -> String {
        e.message
    }

    #[test]
    fn an_array_is_refused_even_where_serde_would_read_it() {
        assert!(serde_json::from_slice::<Note>(b"[]").is_ok());
        assert!(serde_json::from_slice::<Range>(br#"["a","b"]"#).is_ok());
        let e = message(optional_json_object::<Note>(b" [] ", "pause body").unwrap_err());
        assert!(e.contains("invalid pause body: give a JSON object"), "{e}");
        let e = message(json_object::<Range>(br#"["a","b"]"#, "range").unwrap_err());
        assert!(e.contains("give a JSON object"), "{e}");
    }

    #[test]
    fn no_body_is_the_default_only_where_the_body_is_optional() {
        for nothing in [&b""[..], b"null", b" null\n"] {
            assert_eq!(
                optional_json_object::<Note>(nothing, "b").unwrap(),
                Note::default()
            );
        }
        // Something was sent, and it is not JSON: refused, as schemathesis's negative
        // cases expect (it found `\t` answered 200).
        for sent in [&b"\t"[..], b" ", b"\n\n"] {
            let e = message(optional_json_object::<Note>(sent, "pause body").unwrap_err());
            assert!(e.starts_with("invalid pause body"), "{sent:?}: {e}");
        }
        assert!(json_object::<Range>(b"", "range").is_err());
        assert!(json_object::<Range>(b"null", "range").is_err());
    }

    #[test]
    fn an_object_is_read_and_a_bad_one_names_what_was_wrong() {
        let n: Note = optional_json_object(br#"{"note":"x"}"#, "b").unwrap();
        assert_eq!(n.note.as_deref(), Some("x"));
        let e = message(json_object::<Range>(br#"{"from":"a"}"#, "range").unwrap_err());
        assert!(e.contains("invalid range: missing field `to`"), "{e}");
    }
}
