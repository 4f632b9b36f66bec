//! The web UI at `/ui`: server-rendered HTML (askama templates in `templates/ui/`), one
//! small script and stylesheet of our own embedded in the binary. Handlers call the
//! same services as the JSON API with the caller's `Principal` and the same
//! `authorize` rules; the caller comes from a session cookie (`session.rs`), which
//! opens `/ui/*` only. Pages work without the script; it adds the live log, the runs
//! table's refresh while something runs, and bulk selection.

mod assets;
mod jobs;
mod log;
mod login;
mod run;
mod runs;
pub(super) mod session;
mod view;

use askama::Template;
use axum::Router;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};

use super::{ApiError, AppState};
use session::UiSession;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/ui", get(|| async { Redirect::to("/ui/runs") }))
        .route("/ui/", get(|| async { Redirect::to("/ui/runs") }))
        .route("/ui/login", get(login::form).post(login::login))
        .route("/ui/logout", post(login::logout))
        .route("/ui/assets/{name}", get(assets::asset))
        .route("/ui/runs", get(runs::list))
        .route("/ui/runs/bulk", post(runs::bulk))
        .route("/ui/runs/{id}", get(run::page))
        .route("/ui/runs/{id}/cancel", post(run::cancel))
        .route("/ui/runs/{id}/retry", post(run::retry))
        .route("/ui/runs/{id}/again", post(run::again))
        .route("/ui/runs/{id}/attempts/{n}/log", get(log::download))
        .route("/ui/runs/{id}/attempts/{n}/log/stream", get(log::stream))
        .route("/ui/jobs", get(jobs::list))
        .route("/ui/jobs/{job}", get(jobs::page))
        .route("/ui/jobs/{job}/runs", post(jobs::start))
}

/// What every page's header needs: who is logged in and the token for its forms.
pub struct Nav {
    pub who: Option<String>,
    pub csrf: String,
}

impl Nav {
    fn of(session: &UiSession) -> Nav {
        Nav {
            who: session
                .logged_in
                .then(|| session.principal.name().to_owned()),
            csrf: session.csrf.clone(),
        }
    }
}

/// A page's failure, shown as a page (with the API's status and message).
pub struct UiError(ApiError);

impl<E: Into<ApiError>> From<E> for UiError {
    fn from(e: E) -> Self {
        UiError(e.into())
    }
}

#[derive(Template)]
#[template(path = "ui/error.html")]
struct ErrorPage {
    nav: Option<Nav>,
    status: u16,
    title: String,
    message: String,
}

impl IntoResponse for UiError {
    fn into_response(self) -> Response {
        let page = ErrorPage {
            nav: None,
            status: self.0.status.as_u16(),
            title: self
                .0
                .status
                .canonical_reason()
                .unwrap_or("Error")
                .to_owned(),
            message: self.0.message,
        };
        let mut response = render(&page);
        *response.status_mut() = self.0.status;
        response
    }
}

/// A template as an HTML answer; a template that cannot render is a 500 (logged).
fn render(page: &impl Template) -> Response {
    match page.render() {
        Ok(html) => {
            let mut response = Html(html).into_response();
            // Pages show live state: never from a cache, and never framed elsewhere.
            let headers = response.headers_mut();
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            headers.insert("x-frame-options", HeaderValue::from_static("DENY"));
            headers.insert(
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(
                    "default-src 'self'; script-src 'self'; style-src 'self'; \
                     img-src 'self' data:; frame-ancestors 'none'; form-action 'self'",
                ),
            );
            response
        }
        Err(e) => {
            tracing::error!(message = "page failed to render", error = %e);
            (StatusCode::INTERNAL_SERVER_ERROR, "page failed to render").into_response()
        }
    }
}

/// The session a page handler runs in: put there by `session::admit` for every
/// `/ui/*` request that reaches a handler needing it.
pub struct Session(pub UiSession);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Session {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<UiSession>()
            .cloned()
            .map(Session)
            .ok_or_else(|| Redirect::to("/ui/login").into_response())
    }
}

#[cfg(test)]
mod tests;
