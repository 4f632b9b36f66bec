//! `/ui/login` and `/ui/logout`: an API token in, a session cookie out.

use askama::Template;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Extension, Form};
use serde::Deserialize;

use super::session::{CsrfForm, clear_cookie, cookie_value, set_cookie};
use super::{Nav, UiError, UiSession, render};
use crate::domain::auth::Credential;
use crate::http::AppState;
use crate::service::audit::{self, AuditAction, AuditEvent, AuditOutcome};

#[derive(Template)]
#[template(path = "ui/login.html")]
struct LoginPage {
    nav: Option<Nav>,
    next: String,
    error: Option<String>,
}

#[derive(Deserialize)]
pub struct LoginQuery {
    #[serde(default)]
    next: String,
}

/// Where to go after logging in: a page of ours, never another site (`//host`).
fn safe_next(next: &str) -> &str {
    if next.starts_with("/ui/") && !next.starts_with("//") && !next.contains('\\') {
        next
    } else {
        "/ui/runs"
    }
}

/// `GET /ui/login` (an open server, or one already logged in, goes on to the runs).
pub async fn form(
    State(state): State<AppState>,
    session: Option<Extension<UiSession>>,
    query: Result<Query<LoginQuery>, QueryRejection>,
) -> Result<Response, UiError> {
    let Query(q) = query?;
    if state.auth.is_open() || session.is_some() {
        return Ok(Redirect::to(safe_next(&q.next)).into_response());
    }
    Ok(render(&LoginPage {
        nav: None,
        next: safe_next(&q.next).to_owned(),
        error: None,
    }))
}

#[derive(Deserialize)]
pub struct LoginForm {
    token: String,
    #[serde(default)]
    next: String,
}

/// `POST /ui/login`: an API token that the server knows starts a session.
pub async fn login(
    State(state): State<AppState>,
    Form(form): Form<LoginForm>,
) -> Result<Response, UiError> {
    let refused = |message: &str, reason: &'static str| {
        let outcome = AuditOutcome::Refused {
            status: 401,
            reason,
        };
        audit::record(&AuditEvent {
            request: Some("POST /ui/login"),
            ..AuditEvent::new("-", AuditAction::Request, outcome)
        });
        let mut response = render(&LoginPage {
            nav: None,
            next: safe_next(&form.next).to_owned(),
            error: Some(message.to_owned()),
        });
        *response.status_mut() = StatusCode::UNAUTHORIZED;
        Ok(response)
    };
    let principal = match state.auth.identify(form.token.trim()) {
        Some(Credential::Api(principal)) => principal,
        Some(Credential::Worker(_)) => {
            return refused(
                "That is a worker token; the web UI takes an API token.",
                "worker token on the web UI",
            );
        }
        None => return refused("This server does not know that token.", "unknown token"),
    };
    tracing::info!(message = "web UI login", token = %principal.name());
    let id = state.auth.ui_sessions().create(principal);
    let mut response = Redirect::to(safe_next(&form.next)).into_response();
    if let Ok(cookie) = HeaderValue::from_str(&set_cookie(&id)) {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    Ok(response)
}

/// `POST /ui/logout`: the session ends on the server, the cookie in the browser.
pub async fn logout(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    _form: CsrfForm,
) -> Response {
    if let Some(id) = cookie_value(&headers) {
        state.auth.ui_sessions().remove(id);
    }
    let mut response = Redirect::to("/ui/login").into_response();
    if let Ok(cookie) = HeaderValue::from_str(&clear_cookie()) {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::safe_next;

    #[test]
    fn next_stays_on_this_server() {
        assert_eq!(safe_next("/ui/runs/1"), "/ui/runs/1");
        for bad in [
            "//evil.example/ui/",
            "https://evil.example",
            "/v1/runs",
            "/ui\\x",
            "",
        ] {
            assert_eq!(safe_next(bad), "/ui/runs", "{bad}");
        }
    }
}
