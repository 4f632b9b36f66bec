//! The UI's door in the auth middleware: the cookie opens `/ui/*` and nothing else, a
//! bearer token does not open `/ui/*`, cross-site POSTs are refused, an open server
//! needs no login.

use axum::Router;
use axum::body::Body;
use axum::extract::Extension;
use axum::http::{Request, StatusCode, header};
use axum::routing::{get, post};
use tower::ServiceExt;

use crate::domain::auth::{Principal, Scope, TokenDigest, TokenSet};
use crate::http::auth::{Auth, authenticate};

fn auth(with_tokens: bool) -> Auth {
    let api = if with_tokens {
        let scopes: Vec<Scope> = vec!["read:*".parse().unwrap()];
        vec![(TokenDigest::of("tsk_ci"), Principal::new("ci", scopes))]
    } else {
        Vec::new()
    };
    Auth::new(TokenSet::new(api, Vec::new()), false, false)
}

async fn who(Extension(p): Extension<Principal>) -> String {
    p.name().to_owned()
}

async fn csrf_of(Extension(s): Extension<super::UiSession>) -> String {
    s.csrf
}

async fn form_taker(form: super::session::CsrfForm) -> String {
    form.get("x").unwrap_or("").to_owned()
}

fn app(auth: Auth) -> Router {
    Router::new()
        .route("/ui/runs", get(who))
        .route("/ui/csrf", get(csrf_of))
        .route("/ui/form", post(form_taker))
        .route("/ui/login", get(who))
        .route("/ui/runs/bulk", post(who))
        .route("/v1/runs", get(who))
        .layer(axum::middleware::from_fn_with_state(auth, authenticate))
}

async fn call(
    app: &Router,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, String, String) {
    let mut request = Request::builder().method(method).uri(path);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = app
        .clone()
        .oneshot(request.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let location = response
        .headers()
        .get(header::LOCATION)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = axum::body::to_bytes(response.into_body(), 1 << 16)
        .await
        .unwrap();
    (
        status,
        String::from_utf8_lossy(&body).into_owned(),
        location,
    )
}

#[tokio::test]
async fn the_session_cookie_opens_the_ui_only_and_a_bearer_token_does_not() {
    let auth = auth(true);
    let id = auth
        .ui_sessions()
        .create(Principal::new("ci", vec!["read:*".parse().unwrap()]));
    let cookie = format!("tasuki_ui={id}");
    let app = app(auth);

    let (status, body, _) = call(&app, "GET", "/ui/runs", &[("cookie", &cookie)]).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "ci"));
    // No cookie, or an unknown one: to the login page, coming back here after.
    for headers in [vec![], vec![("cookie", "tasuki_ui=forged")]] {
        let (status, _, location) = call(&app, "GET", "/ui/runs", &headers).await;
        assert_eq!(status, StatusCode::SEE_OTHER);
        assert_eq!(location, "/ui/login?next=/ui/runs");
    }
    // A bearer token is the API's credential, not the UI's.
    let (status, _, location) = call(
        &app,
        "GET",
        "/ui/runs",
        &[("authorization", "Bearer tsk_ci")],
    )
    .await;
    assert_eq!(
        (status, location.as_str()),
        (StatusCode::SEE_OTHER, "/ui/login?next=/ui/runs")
    );
    // The cookie does not open the JSON API.
    let (status, _, _) = call(&app, "GET", "/v1/runs", &[("cookie", &cookie)]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // The login page needs no login.
    let (status, _, _) = call(&app, "GET", "/ui/login", &[]).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn a_cross_site_post_is_refused_even_with_the_cookie() {
    let auth = auth(true);
    let id = auth.ui_sessions().create(Principal::new("ci", Vec::new()));
    let cookie = format!("tasuki_ui={id}");
    let app = app(auth);
    let (status, _, _) = call(
        &app,
        "POST",
        "/ui/runs/bulk",
        &[("cookie", &cookie), ("sec-fetch-site", "cross-site")],
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _, _) = call(
        &app,
        "POST",
        "/ui/runs/bulk",
        &[
            ("cookie", &cookie),
            ("origin", "http://evil.example"),
            ("host", "127.0.0.1:1"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _, _) = call(
        &app,
        "POST",
        "/ui/runs/bulk",
        &[("cookie", &cookie), ("sec-fetch-site", "same-origin")],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn an_open_server_needs_no_login() {
    let app = app(auth(false));
    let (status, body, _) = call(&app, "GET", "/ui/runs", &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, Principal::open().name());
}

#[tokio::test]
async fn a_form_without_the_sessions_csrf_token_is_refused() {
    let auth = auth(true);
    let id = auth.ui_sessions().create(Principal::new("ci", Vec::new()));
    let cookie = format!("tasuki_ui={id}");
    let app = app(auth);
    let (_, csrf, _) = call(&app, "GET", "/ui/csrf", &[("cookie", &cookie)]).await;
    assert_eq!(csrf.len(), 64);
    let post = |body: String| {
        let app = app.clone();
        let cookie = cookie.clone();
        async move {
            let request = Request::post("/ui/form")
                .header("cookie", cookie)
                .header("content-type", "application/x-www-form-urlencoded")
                .body(Body::from(body))
                .unwrap();
            let response = app.oneshot(request).await.unwrap();
            let status = response.status();
            let body = axum::body::to_bytes(response.into_body(), 1 << 16)
                .await
                .unwrap();
            (status, String::from_utf8_lossy(&body).into_owned())
        }
    };
    assert_eq!(post("x=1".into()).await.0, StatusCode::FORBIDDEN);
    assert_eq!(
        post(format!("x=1&csrf={}", "0".repeat(64))).await.0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        post(format!("x=1&csrf={csrf}")).await,
        (StatusCode::OK, "1".to_owned())
    );
}
