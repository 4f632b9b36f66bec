use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::Extension;
use axum::http::{Request, StatusCode};
use axum::routing::{get, post};
use tower::ServiceExt;

use super::*;
use crate::domain::auth::{Scope, TokenDigest};
use crate::testlog::Captured;

fn principal(name: &str, scopes: &[&str]) -> Principal {
    let scopes: Vec<Scope> = scopes.iter().map(|s| s.parse().unwrap()).collect();
    Principal::new(name, scopes)
}

fn tokens(api: bool, workers: bool) -> TokenSet {
    let api = if api {
        vec![
            (
                TokenDigest::of("tsk_ci"),
                principal("ci", &["run:nightly-*", "read:*"]),
            ),
            (TokenDigest::of("tsk_ops"), principal("ops", &["admin"])),
        ]
    } else {
        Vec::new()
    };
    let workers = if workers {
        vec![
            (TokenDigest::of("tskw_old"), Arc::from("hosts-2025")),
            (TokenDigest::of("tskw_new"), Arc::from("hosts-2026")),
        ]
    } else {
        Vec::new()
    };
    TokenSet::new(api, workers)
}

/// Each route answers with the caller it was given (`name` or `name+worker`).
async fn who(
    Extension(p): Extension<Principal>,
    worker: Option<Extension<WorkerCaller>>,
) -> String {
    tracing::info!("handler reached");
    match worker {
        Some(Extension(WorkerCaller(w))) => format!("{}+worker:{w}", p.name()),
        None if p.is_admin() => format!("{}+admin", p.name()),
        None => p.name().to_owned(),
    }
}

fn app(auth: Auth) -> Router {
    Router::new()
        .route("/healthz", get(who))
        .route("/readyz", get(who))
        .route("/metrics", get(who))
        .route("/v1/runs", get(who))
        .route("/v1/hooks/{job}", post(who))
        .route("/v1/worker/claim", post(who))
        .layer(axum::middleware::from_fn_with_state(auth, authenticate))
}

struct Answer {
    status: StatusCode,
    body: String,
    challenge: Option<String>,
}

async fn call(app: &Router, method: &str, path: &str, token: Option<&str>) -> Answer {
    let mut request = Request::builder().method(method).uri(path);
    if let Some(t) = token {
        request = request.header("authorization", t);
    }
    let response = app
        .clone()
        .oneshot(request.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let challenge = response
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned());
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 16)
        .await
        .unwrap();
    Answer {
        status,
        body: String::from_utf8_lossy(&bytes).into_owned(),
        challenge,
    }
}

/// An expected answer: a status with the caller the handler saw, or a refusal with its
/// error code.
enum Want {
    Ok(&'static str),
    Refused(u16, &'static str),
}

async fn check_table(app: &Router, table: &[(&str, &str, Option<&str>, Want)]) {
    for (method, path, token, want) in table {
        let got = call(app, method, path, *token).await;
        let what = format!("{method} {path} with {token:?}");
        match want {
            Want::Ok(caller) => {
                assert_eq!(got.status, StatusCode::OK, "{what}: {}", got.body);
                assert_eq!(got.body, *caller, "{what}");
            }
            Want::Refused(status, code) => {
                assert_eq!(got.status.as_u16(), *status, "{what}: {}", got.body);
                let body: serde_json::Value = serde_json::from_str(&got.body)
                    .unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {}", got.body));
                assert_eq!(body["error"]["code"], *code, "{what}: {}", got.body);
                assert!(body["error"]["message"].is_string(), "{what}");
                if *status == 401 {
                    let challenge = got.challenge.unwrap_or_default();
                    assert!(challenge.starts_with("Bearer"), "{what}: {challenge:?}");
                } else {
                    assert_eq!(got.challenge, None, "{what}");
                }
            }
        }
    }
}

#[tokio::test]
async fn with_tokens_every_door_wants_its_own_kind_of_token() {
    let app = app(Auth::new(tokens(true, true), true, false));
    use Want::*;
    check_table(
        &app,
        &[
            // Always open, whatever is presented.
            ("GET", "/healthz", None, Ok("anonymous")),
            ("GET", "/healthz", Some("Bearer wrong"), Ok("anonymous")),
            // Open by [auth] (open_readyz = true, open_metrics = false).
            ("GET", "/readyz", None, Ok("anonymous")),
            ("GET", "/metrics", None, Refused(401, "unauthorized")),
            ("GET", "/metrics", Some("Bearer tsk_ci"), Ok("ci")),
            (
                "GET",
                "/metrics",
                Some("Bearer tskw_old"),
                Refused(403, "forbidden"),
            ),
            // Webhooks carry their own signature.
            ("POST", "/v1/hooks/deploy", None, Ok("anonymous")),
            // The API.
            ("GET", "/v1/runs", None, Refused(401, "unauthorized")),
            (
                "GET",
                "/v1/runs",
                Some("Bearer wrong"),
                Refused(401, "unauthorized"),
            ),
            (
                "GET",
                "/v1/runs",
                Some("Basic dXNlcjpwdw=="),
                Refused(401, "unauthorized"),
            ),
            (
                "GET",
                "/v1/runs",
                Some("Bearer "),
                Refused(401, "unauthorized"),
            ),
            ("GET", "/v1/runs", Some("Bearer tsk_ci"), Ok("ci")),
            ("GET", "/v1/runs", Some("bearer tsk_ops"), Ok("ops+admin")),
            (
                "GET",
                "/v1/runs",
                Some("Bearer tskw_old"),
                Refused(403, "forbidden"),
            ),
            // Unknown paths are behind the API door too.
            ("GET", "/v1/nothing", None, Refused(401, "unauthorized")),
            // The worker API: worker tokens only, both of a rotation.
            (
                "POST",
                "/v1/worker/claim",
                None,
                Refused(401, "unauthorized"),
            ),
            (
                "POST",
                "/v1/worker/claim",
                Some("Bearer wrong"),
                Refused(401, "unauthorized"),
            ),
            (
                "POST",
                "/v1/worker/claim",
                Some("Bearer tsk_ops"),
                Refused(403, "forbidden"),
            ),
            (
                "POST",
                "/v1/worker/claim",
                Some("Bearer tskw_old"),
                Ok("hosts-2025+worker:hosts-2025"),
            ),
            (
                "POST",
                "/v1/worker/claim",
                Some("Bearer tskw_new"),
                Ok("hosts-2026+worker:hosts-2026"),
            ),
        ],
    )
    .await;
    // A missing token and a wrong one are told apart in the challenge only.
    let missing = call(&app, "GET", "/v1/runs", None).await;
    assert_eq!(
        missing.challenge.as_deref(),
        Some(r#"Bearer realm="tasuki""#)
    );
    let wrong = call(&app, "GET", "/v1/runs", Some("Bearer x")).await;
    assert_eq!(
        wrong.challenge.as_deref(),
        Some(r#"Bearer realm="tasuki", error="invalid_token""#)
    );
}

#[tokio::test]
async fn without_api_tokens_the_api_is_open_and_without_worker_tokens_the_worker_api_is_off() {
    let app = app(Auth::new(tokens(false, false), false, false));
    use Want::*;
    check_table(
        &app,
        &[
            ("GET", "/v1/runs", None, Ok("anonymous+admin")),
            (
                "GET",
                "/v1/runs",
                Some("Bearer anything"),
                Ok("anonymous+admin"),
            ),
            ("GET", "/readyz", None, Ok("anonymous+admin")),
            ("GET", "/metrics", None, Ok("anonymous+admin")),
            (
                "POST",
                "/v1/worker/claim",
                None,
                Refused(403, "worker_api_disabled"),
            ),
            (
                "POST",
                "/v1/worker/claim",
                Some("Bearer tskw_old"),
                Refused(403, "worker_api_disabled"),
            ),
        ],
    )
    .await;
    // Worker tokens alone: the API stays open, the worker API wants its token.
    let app = self::app(Auth::new(tokens(false, true), true, false));
    check_table(
        &app,
        &[
            ("GET", "/v1/runs", None, Ok("anonymous+admin")),
            (
                "POST",
                "/v1/worker/claim",
                None,
                Refused(401, "unauthorized"),
            ),
            (
                "POST",
                "/v1/worker/claim",
                Some("Bearer tskw_new"),
                Ok("hosts-2026+worker:hosts-2026"),
            ),
        ],
    )
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn every_log_line_of_a_request_names_its_token_and_refusals_are_audited() {
    let (captured, _guard) = Captured::start();
    let app = app(Auth::new(tokens(true, true), true, false));
    call(&app, "GET", "/v1/runs", Some("Bearer tsk_ci")).await;
    call(&app, "GET", "/v1/runs", Some("Bearer nope")).await;
    call(&app, "POST", "/v1/worker/claim", Some("Bearer tsk_ci")).await;
    let text = captured.text();
    let line = |needle: &str| {
        text.lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle:?} in:\n{text}"))
            .to_owned()
    };
    assert!(line("handler reached").contains("auth{token=ci}"), "{text}");
    let unknown = line("reason=unknown token");
    for field in [
        "tasuki::audit",
        "actor=-",
        "action=request",
        "outcome=\"refused\"",
        "status=401",
        "request=GET /v1/runs",
    ] {
        assert!(unknown.contains(field), "{field} missing: {unknown}");
    }
    let wrong_kind = line("reason=API token on the worker API");
    assert!(wrong_kind.contains("actor=ci") && wrong_kind.contains("status=403"));
    // The token's value is never logged.
    assert!(!text.contains("tsk_ci") && !text.contains("nope"), "{text}");
}

#[test]
fn out_of_scope_is_403_when_readable_and_the_unknown_answer_when_not() {
    let hidden = || ApiError::not_found(ErrorCodeV1::UnknownJob, "no job named `payroll`");
    let ci = principal("ci", &["run:nightly-*", "read:pay*"]);
    let stranger = principal("stranger", &["read:other-*"]);
    let ops = principal("ops", &["admin"]);
    let target = Target::job("payroll");
    let check = |p: &Principal, action| {
        authorize(p, action, AuditAction::RunStart, target, hidden).map_err(|e| (e.status, e.code))
    };
    assert_eq!(check(&ci, Action::Read), Result::Ok(()));
    assert_eq!(
        check(&ci, Action::Run),
        Err((StatusCode::FORBIDDEN, ErrorCodeV1::Forbidden))
    );
    assert_eq!(
        check(&ci, Action::Admin),
        Err((StatusCode::FORBIDDEN, ErrorCodeV1::Forbidden))
    );
    assert_eq!(
        check(&stranger, Action::Run),
        Err((StatusCode::NOT_FOUND, ErrorCodeV1::UnknownJob))
    );
    assert_eq!(
        check(&stranger, Action::Read),
        Err((StatusCode::NOT_FOUND, ErrorCodeV1::UnknownJob))
    );
    for action in [Action::Run, Action::Read, Action::Cancel, Action::Admin] {
        assert_eq!(check(&ops, action), Result::Ok(()));
        assert_eq!(check(&Principal::open(), action), Result::Ok(()));
    }
    // A run-only token may start runs of a job it cannot read.
    let runner = principal("runner", &["run:payroll"]);
    assert_eq!(check(&runner, Action::Run), Result::Ok(()));
    assert!(require_admin(&ci, AuditAction::JobsReload).is_err());
    assert!(require_admin(&ops, AuditAction::JobsReload).is_ok());
}

#[test]
fn idempotency_scopes_and_requesters_follow_the_token_unless_open() {
    let ci = principal("ci", &["read:*"]);
    let closed = Auth::new(tokens(true, false), true, false);
    assert_eq!(closed.key_scope(&ci), "token:ci");
    assert_eq!(closed.requested_by(&ci).as_deref(), Some("ci"));
    let open = Auth::new(tokens(false, false), true, false);
    assert_eq!(open.key_scope(&Principal::open()), "");
    assert_eq!(open.requested_by(&Principal::open()), None);
}
