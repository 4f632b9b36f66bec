//! Who is using the web UI: a server-side session per login, named by a random id in a
//! cookie (`HttpOnly; Secure; SameSite=Strict; Path=/ui`), so the API token itself never
//! sits in the browser. The cookie opens `/ui/*` only: [`admit`] is called by the auth
//! middleware for those paths and nowhere else, so the JSON API stays bearer-only.
//! Every state-changing form carries the session's CSRF token ([`CsrfForm`]), and a
//! cross-site `Origin` or `Sec-Fetch-Site` refuses the request before that.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{FromRequest, Request};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Form, RequestExt};
use sha2::{Digest, Sha256};

use crate::domain::auth::{OPEN_PRINCIPAL, Principal};

/// The cookie's name.
pub const COOKIE: &str = "tasuki_ui";
/// How long a login lasts (the cookie's `Max-Age` too).
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Logins kept at once; the oldest goes when a new one would pass this.
const MAX_SESSIONS: usize = 10_000;

/// What a UI request's handler knows of its session: the caller and the CSRF token its
/// forms must carry.
#[derive(Debug, Clone)]
pub struct UiSession {
    pub principal: Principal,
    pub csrf: String,
    /// False on an open server (nobody to log out).
    pub logged_in: bool,
}

struct Stored {
    session: UiSession,
    expires: Instant,
}

/// The logins of one server process (a restart logs everybody out).
pub struct Sessions {
    /// Keyed by the SHA-256 of the cookie's value, so the map holds no usable secret.
    by_digest: Mutex<HashMap<[u8; 32], Stored>>,
    /// The CSRF token of an open server's forms: there is no login to hang one on.
    open_csrf: String,
}

impl Default for Sessions {
    fn default() -> Self {
        Sessions {
            by_digest: Mutex::new(HashMap::new()),
            open_csrf: random_hex(),
        }
    }
}

fn random_hex() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn digest(id: &str) -> [u8; 32] {
    Sha256::digest(id.as_bytes()).into()
}

impl Sessions {
    /// A new login for `principal`: the cookie value naming it.
    pub fn create(&self, principal: Principal) -> String {
        let id = random_hex();
        let now = Instant::now();
        let mut map = self.by_digest.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, s| s.expires > now);
        if map.len() >= MAX_SESSIONS
            && let Some(oldest) = map.iter().min_by_key(|(_, s)| s.expires).map(|(k, _)| *k)
        {
            map.remove(&oldest);
        }
        map.insert(
            digest(&id),
            Stored {
                session: UiSession {
                    principal,
                    csrf: random_hex(),
                    logged_in: true,
                },
                expires: now + SESSION_TTL,
            },
        );
        id
    }

    fn get(&self, id: &str) -> Option<UiSession> {
        let mut map = self.by_digest.lock().unwrap_or_else(|p| p.into_inner());
        let key = digest(id);
        match map.get(&key) {
            Some(s) if s.expires > Instant::now() => Some(s.session.clone()),
            Some(_) => {
                map.remove(&key);
                None
            }
            None => None,
        }
    }

    pub fn remove(&self, id: &str) {
        let mut map = self.by_digest.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(&digest(id));
    }

    fn open_session(&self) -> UiSession {
        UiSession {
            principal: Principal::open(),
            csrf: self.open_csrf.clone(),
            logged_in: false,
        }
    }
}

/// The session id the request's cookie names, if any.
pub fn cookie_value(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value)
        .filter(|v| !v.is_empty())
}

/// `Set-Cookie` for a new login.
pub fn set_cookie(id: &str) -> String {
    format!(
        "{COOKIE}={id}; HttpOnly; Secure; SameSite=Strict; Path=/ui; Max-Age={}",
        SESSION_TTL.as_secs()
    )
}

/// `Set-Cookie` that ends a login in the browser.
pub fn clear_cookie() -> String {
    format!("{COOKIE}=; HttpOnly; Secure; SameSite=Strict; Path=/ui; Max-Age=0")
}

/// Paths under `/ui` that need no login: the login form and the static assets.
fn public(path: &str) -> bool {
    path == "/ui/login" || path.starts_with("/ui/assets/")
}

/// Is a state-changing request from a page of this very server? Browsers send
/// `Sec-Fetch-Site` (Chromium, Firefox, Safari) and `Origin` on POSTs; either one
/// naming another site refuses it. A request with neither (curl) must still carry the
/// session's CSRF token, which only a page of ours could have read.
fn same_origin(headers: &HeaderMap) -> bool {
    if let Some(site) = headers.get("sec-fetch-site")
        && site.as_bytes() != b"same-origin"
    {
        return false;
    }
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let origin_host = origin
        .to_str()
        .ok()
        .and_then(|o| o.split_once("://"))
        .map(|(_, rest)| rest);
    matches!((origin_host, host), (Some(o), Some(h)) if o.eq_ignore_ascii_case(h))
}

/// Why a `/ui/*` request does not reach its page.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// A state-changing request from another site: 403.
    CrossSite,
    /// No valid login: to the login page (and back to `next` after it).
    Login { next: Option<String> },
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Refusal::CrossSite => (
                StatusCode::FORBIDDEN,
                "cross-site request refused: this form must be sent from a tasuki page",
            )
                .into_response(),
            Refusal::Login { next: None } => Redirect::to("/ui/login").into_response(),
            Refusal::Login { next: Some(next) } => {
                Redirect::to(&format!("/ui/login?next={}", encode(&next))).into_response()
            }
        }
    }
}

/// The door of every `/ui/*` request, called by the auth middleware: the caller (and a
/// [`UiSession`] in the request's extensions), or why the request is answered instead.
pub fn admit(sessions: &Sessions, open: bool, request: &mut Request) -> Result<Principal, Refusal> {
    let changes = !matches!(*request.method(), Method::GET | Method::HEAD);
    if changes && !same_origin(request.headers()) {
        return Err(Refusal::CrossSite);
    }
    let session = if open {
        Some(sessions.open_session())
    } else {
        cookie_value(request.headers()).and_then(|id| sessions.get(id))
    };
    match session {
        Some(session) => {
            let principal = session.principal.clone();
            request.extensions_mut().insert(session);
            Ok(principal)
        }
        None if public(request.uri().path()) => Ok(Principal::new(OPEN_PRINCIPAL, Vec::new())),
        None => {
            let back = request
                .uri()
                .path_and_query()
                .map_or("/ui/runs", |p| p.as_str());
            let next = (!changes && back.starts_with("/ui/")).then(|| back.to_owned());
            Err(Refusal::Login { next })
        }
    }
}

/// Percent-encoding for a query value (RFC 3986 unreserved characters pass).
pub fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Constant-time equality, so the CSRF check does not tell how much of a guess was right.
fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// A form POSTed from one of our pages: its fields in order (a name may repeat, like
/// the bulk form's `id`), after checking its `csrf` field against the session's.
pub struct CsrfForm {
    pub session: UiSession,
    pub fields: Vec<(String, String)>,
}

impl CsrfForm {
    /// The first value of a field.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

impl<S: Send + Sync> FromRequest<S> for CsrfForm {
    type Rejection = Response;

    async fn from_request(mut request: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let refused = |why: &'static str| (StatusCode::FORBIDDEN, why).into_response();
        let session = request
            .extensions_mut()
            .remove::<UiSession>()
            .ok_or_else(|| refused("no session: log in again"))?;
        let Form(fields): Form<Vec<(String, String)>> =
            request
                .extract()
                .await
                .map_err(|e: axum::extract::rejection::FormRejection| {
                    (StatusCode::BAD_REQUEST, e.body_text()).into_response()
                })?;
        let sent = fields
            .iter()
            .find(|(k, _)| k == "csrf")
            .map(|(_, v)| v.as_str())
            .unwrap_or("");
        if !same_secret(sent, &session.csrf) {
            return Err(refused(
                "the form's CSRF token is missing or stale: reload the page and try again",
            ));
        }
        Ok(CsrfForm { session, fields })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn the_cookie_is_found_among_others() {
        let h = headers(&[("cookie", "a=1; tasuki_ui=abc; b=2")]);
        assert_eq!(cookie_value(&h), Some("abc"));
        let h = headers(&[("cookie", "a=1"), ("cookie", "tasuki_ui=xyz")]);
        assert_eq!(cookie_value(&h), Some("xyz"));
        assert_eq!(cookie_value(&headers(&[("cookie", "tasuki_ui=")])), None);
        assert_eq!(cookie_value(&headers(&[])), None);
    }

    #[test]
    fn the_cookie_is_strict_and_hidden_from_scripts() {
        let c = set_cookie("id");
        for part in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/ui"] {
            assert!(c.contains(part), "{c}");
        }
        assert!(clear_cookie().contains("Max-Age=0"));
    }

    #[test]
    fn cross_site_posts_are_refused() {
        assert!(same_origin(&headers(&[
            ("sec-fetch-site", "same-origin"),
            ("origin", "http://127.0.0.1:8080"),
            ("host", "127.0.0.1:8080"),
        ])));
        assert!(!same_origin(&headers(&[("sec-fetch-site", "cross-site")])));
        assert!(!same_origin(&headers(&[("sec-fetch-site", "same-site")])));
        assert!(!same_origin(&headers(&[
            ("origin", "http://evil.example"),
            ("host", "127.0.0.1:8080"),
        ])));
        assert!(!same_origin(&headers(&[("origin", "null"), ("host", "h")])));
        // No browser headers at all: left to the CSRF token.
        assert!(same_origin(&headers(&[])));
    }

    #[test]
    fn a_session_is_found_by_its_id_only_until_removed() {
        let sessions = Sessions::default();
        let id = sessions.create(Principal::new("alice", Vec::new()));
        let found = sessions.get(&id).unwrap();
        assert_eq!(found.principal.name(), "alice");
        assert!(found.logged_in);
        assert_ne!(found.csrf, sessions.open_csrf);
        assert!(sessions.get("not-an-id").is_none());
        sessions.remove(&id);
        assert!(sessions.get(&id).is_none());
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", "ab"));
        assert!(!same_secret("", "a"));
    }

    #[test]
    fn encode_keeps_paths_readable() {
        assert_eq!(encode("/ui/runs?job=a b&x"), "/ui/runs%3Fjob%3Da%20b%26x");
    }
}
