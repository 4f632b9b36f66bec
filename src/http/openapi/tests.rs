use std::collections::BTreeSet;

use serde_json::{Value, json};

use super::document;
use crate::protocol::api::{ErrorBodyV1, ErrorCodeV1, RunV1};

fn doc() -> Value {
    serde_json::to_value(document()).expect("the document serialises")
}

/// Every `$ref` in `value`, with where it was found.
fn refs<'a>(value: &'a Value, at: String, out: &mut Vec<(String, &'a str)>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                if k == "$ref"
                    && let Some(target) = v.as_str()
                {
                    out.push((at.clone(), target));
                }
                refs(v, format!("{at}/{k}"), out);
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                refs(v, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

#[test]
fn every_ref_resolves() {
    let doc = doc();
    let mut found = Vec::new();
    refs(&doc, String::new(), &mut found);
    assert!(
        found.len() > 20,
        "too few refs to be the whole API: {found:?}"
    );
    for (at, target) in found {
        let pointer = target
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("{at}: `{target}` points outside the document"));
        assert!(
            doc.pointer(pointer).is_some(),
            "{at}: `{target}` resolves to nothing"
        );
    }
}

/// The operations, frozen: a route added, removed or renamed shows as a diff here. The
/// document is built from the routers themselves (`routes!`), so what is listed is
/// routed; the e2e test `openapi::` asks the real server for each one.
#[test]
fn the_operations_are_the_routes() {
    let doc = doc();
    assert_eq!(doc["openapi"], "3.1.0");
    let mut ops = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("path item").keys() {
            ops.insert(format!("{} {path}", method.to_uppercase()));
        }
    }
    let expected: BTreeSet<String> = [
        "GET /healthz",
        "GET /readyz",
        "GET /v1/openapi.json",
        "GET /v1/jobs",
        "GET /v1/jobs/reload",
        "POST /v1/jobs/reload",
        "GET /v1/jobs/{job}",
        "POST /v1/jobs/{job}/runs",
        "GET /v1/jobs/{job}/slots",
        "GET /v1/jobs/{job}/schedules",
        "POST /v1/jobs/{job}/schedules/{name}/pause",
        "POST /v1/jobs/{job}/schedules/{name}/resume",
        "POST /v1/jobs/{job}/schedules/{name}/backfill",
        "POST /v1/hooks/{job}",
        "GET /v1/runs",
        "GET /v1/runs/{id}",
        "POST /v1/runs/{id}/cancel",
        "POST /v1/runs/{id}/retry",
        "POST /v1/runs/{id}/callbacks/redeliver",
        "GET /v1/runs/{id}/logs",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    assert_eq!(ops, expected);
    assert!(
        ops.iter().all(|op| !op.contains("/v1/worker/")),
        "the worker protocol is not public"
    );
}

/// The doors in the document are the doors `auth.rs` keeps: open operations declare
/// `security: [{}]`, `/readyz` either, the rest the bearer token; and every operation
/// that takes a token documents the 401 and 403 it can give.
#[test]
fn security_matches_the_auth_middleware() {
    let doc = doc();
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"],
        json!({"type": "http", "scheme": "bearer",
               "description": doc["components"]["securitySchemes"]["bearer"]["description"]})
    );
    assert_eq!(doc["security"], json!([{"bearer": []}]));
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("path item") {
            let open = matches!(path.as_str(), "/healthz" | "/v1/openapi.json")
                || path.starts_with("/v1/hooks/");
            let security = &op["security"];
            if open {
                assert_eq!(security, &json!([{}]), "{method} {path}");
            } else if path == "/readyz" {
                assert_eq!(security, &json!([{}, {"bearer": []}]), "{method} {path}");
            } else {
                assert!(security.is_null(), "{method} {path}: the global bearer");
                for status in ["401", "403", "429"] {
                    assert!(
                        op["responses"][status]["content"]["application/json"].is_object(),
                        "{method} {path} documents no {status}"
                    );
                }
            }
        }
    }
}

/// A validator for one component schema, its `$ref`s resolved in the document.
fn validator(doc: &Value, name: &str) -> jsonschema::Validator {
    let schema = json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "components": doc["components"],
        "$ref": format!("#/components/schemas/{name}"),
    });
    jsonschema::validator_for(&schema).expect("a valid JSON Schema")
}

fn assert_valid(validator: &jsonschema::Validator, instance: &Value) {
    let errors: Vec<String> = validator
        .iter_errors(instance)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(errors.is_empty(), "{instance}: {errors:?}");
}

/// The frozen wire samples are what the schema describes: the run with every field set
/// and the error body; and what the schema says a field is not, the samples are not.
#[test]
fn the_frozen_fixtures_match_their_schemas() {
    let doc = doc();
    let run: Value =
        serde_json::from_str(include_str!("../../protocol/fixtures/run_v1.json")).unwrap();
    let error: Value =
        serde_json::from_str(include_str!("../../protocol/fixtures/error_v1.json")).unwrap();
    let runs = validator(&doc, "RunV1");
    assert_valid(&runs, &run);
    let errors = validator(&doc, "ErrorBodyV1");
    assert_valid(&errors, &error);
    // The schema is not just `{}`: a status the server never writes is refused.
    let mut odd = run.clone();
    odd["status"] = json!("paused");
    assert!(!runs.is_valid(&odd));
    let mut no_id = run;
    no_id.as_object_mut().unwrap().remove("id");
    assert!(!runs.is_valid(&no_id));
    assert!(!errors.is_valid(&json!({"error": {"code": "nope", "message": "m"}})));
}

/// Every value of the hand-written enums is what serde writes: each known error code, a
/// run of every trigger kind, and an error with details.
#[test]
fn serialised_values_match_their_schemas() {
    let doc = doc();
    let errors = validator(&doc, "ErrorBodyV1");
    for code in ErrorCodeV1::KNOWN {
        let body = serde_json::to_value(ErrorBodyV1::new(code, "m")).unwrap();
        assert_valid(&errors, &body);
    }
    let mut with_details = ErrorBodyV1::new(ErrorCodeV1::InvalidJobFiles, "m");
    with_details.error.details = vec![crate::protocol::api::ErrorDetailV1 {
        file: "jobs/a.toml".into(),
        line: None,
        field: Some("image".into()),
        message: "missing".into(),
    }];
    assert_valid(&errors, &serde_json::to_value(with_details).unwrap());
    let runs = validator(&doc, "RunV1");
    let fixture: RunV1 =
        serde_json::from_str(include_str!("../../protocol/fixtures/run_v1.json")).unwrap();
    for trigger in [
        crate::protocol::api::TriggerV1::Api,
        crate::protocol::api::TriggerV1::Webhook,
    ] {
        let mut run = fixture.clone();
        run.trigger = trigger;
        run.requested_by = None;
        run.replies.clear();
        run.attempts.clear();
        assert_valid(&runs, &serde_json::to_value(run).unwrap());
    }
}
