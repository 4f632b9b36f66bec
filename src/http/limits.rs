//! What one caller may take of the API, per token (the request's `Principal`, or
//! `anonymous` without one): requests per second (a keyed GCRA limiter, 429 with
//! `Retry-After`) and `?wait` holds and log follows open at once (429). Also tells a
//! request body that missed its deadline from other body errors (408).

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{Extensions, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};

use super::ApiError;
use crate::domain::auth::Principal;
use crate::protocol::api::ErrorCodeV1;

/// The key of a request that carries no `Principal` (no auth in front, or none given).
pub const ANONYMOUS: &str = "anonymous";

/// The caller's name, the key of every per-token limit.
pub fn caller_name(extensions: &Extensions) -> Arc<str> {
    extensions
        .get::<Principal>()
        .map_or_else(|| Arc::from(ANONYMOUS), |p| Arc::from(p.name()))
}

/// The per-caller limits of one server, shared by every connection.
pub struct Limits {
    rate: Option<RateLimit>,
    holds: Holds,
    /// How long a request's body may take to arrive, whole.
    pub body_timeout: Duration,
}

impl Limits {
    /// `rate_per_second = 0` (or a zero burst) means no rate limit.
    pub fn new(rate_per_second: u32, burst: u32, max_holds: u32, body_timeout: Duration) -> Limits {
        let rate = NonZeroU32::new(rate_per_second)
            .zip(NonZeroU32::new(burst))
            .map(|(rate, burst)| RateLimit::new(rate, burst, DefaultClock::default()));
        Limits {
            rate,
            holds: Holds::new(max_holds),
            body_timeout,
        }
    }

    pub fn holds(&self) -> &Holds {
        &self.holds
    }
}

/// A GCRA limiter with one bucket per caller name.
type KeyedLimiter<C> =
    RateLimiter<Arc<str>, DashMapStateStore<Arc<str>>, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// Requests per second per caller: `rate` sustained, `burst` at once.
pub struct RateLimit<C: Clock = DefaultClock> {
    limiter: KeyedLimiter<C>,
    rate: NonZeroU32,
    burst: NonZeroU32,
}

impl<C: Clock> RateLimit<C> {
    pub fn new(rate: NonZeroU32, burst: NonZeroU32, clock: C) -> Self {
        let quota = Quota::per_second(rate).allow_burst(burst);
        RateLimit {
            limiter: RateLimiter::dashmap_with_clock(quota, clock),
            rate,
            burst,
        }
    }

    /// Counts one request of `who`; over the limit, how long until one would pass.
    pub fn check(&self, who: &Arc<str>) -> Result<(), Duration> {
        self.limiter
            .check_key(who)
            .map_err(|not_until| not_until.wait_time_from(self.limiter.clock().now()))
    }
}

/// `Retry-After` in whole seconds, rounded up, at least 1: a client that waits that
/// long is let through.
pub fn retry_after_secs(wait: Duration) -> u64 {
    let whole = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    whole.max(1)
}

/// Paths no rate limit applies to: liveness and readiness probes (a load balancer's
/// probe must not fail because anonymous callers used up the anonymous budget), and
/// the worker protocol, whose rate grows with a worker's running containers and which
/// has its own token.
pub(super) fn exempt(path: &str) -> bool {
    path == "/healthz" || path == "/readyz" || path.starts_with("/v1/worker/")
}

/// Axum middleware: counts the request against its caller's rate; 429 over it.
pub async fn rate_limit(
    State(limits): State<Arc<Limits>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(rate) = limits.rate.as_ref() else {
        return next.run(request).await;
    };
    if exempt(request.uri().path()) {
        return next.run(request).await;
    }
    let who = caller_name(request.extensions());
    match rate.check(&who) {
        Ok(()) => next.run(request).await,
        Err(wait) => {
            let secs = retry_after_secs(wait);
            tracing::debug!(message = "request over its caller's rate", caller = %who, retry_after = secs);
            let mut response = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                ErrorCodeV1::RateLimited,
                format!(
                    "`{who}` is over its request rate ({} per second, bursts of {}; limits.rate_per_second, limits.burst); retry in {secs} s",
                    rate.rate, rate.burst
                ),
            )
            .into_response();
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            response
        }
    }
}

/// `?wait` holds and log follows open now, per caller.
#[derive(Clone)]
pub struct Holds {
    max: u32,
    open: Arc<Mutex<HashMap<Arc<str>, u32>>>,
}

/// One open hold; dropping it (the answer was sent, or the client went away and hyper
/// dropped the handler or the body stream) gives it back.
#[derive(Debug)]
pub struct HoldGuard {
    open: Arc<Mutex<HashMap<Arc<str>, u32>>>,
    who: Arc<str>,
}

impl Holds {
    pub fn new(max: u32) -> Holds {
        Holds {
            max,
            open: Arc::default(),
        }
    }

    /// Take one of `who`'s holds, or 429 when all are open.
    pub fn take(&self, who: &Arc<str>) -> Result<HoldGuard, ApiError> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let count = open.entry(who.clone()).or_insert(0);
        if *count >= self.max {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                ErrorCodeV1::TooManyHolds,
                format!(
                    "`{who}` already has {} `?wait` requests and log follows open (limits.max_holds_per_token); wait for one to end, or ask without waiting",
                    self.max
                ),
            ));
        }
        *count += 1;
        Ok(HoldGuard {
            open: self.open.clone(),
            who: who.clone(),
        })
    }

    /// Holds `who` has open now.
    pub fn open(&self, who: &str) -> u32 {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.get(who).copied().unwrap_or(0)
    }
}

impl Drop for HoldGuard {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = open.get_mut(&self.who) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.who);
            }
        }
    }
}

/// The caller of a request, as an extractor.
pub struct Caller(pub Arc<str>);

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Caller(caller_name(&parts.extensions)))
    }
}

/// Whether a body read failed because the body deadline (`body_timeout`) passed.
pub fn is_body_timeout(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if e.is::<tower_http::timeout::TimeoutError>() {
            return true;
        }
        cause = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::{Body, Bytes};
    use axum::extract::FromRequest;
    use governor::clock::FakeRelativeClock;

    fn nz(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).unwrap()
    }

    #[test]
    fn a_burst_passes_then_the_sustained_rate_with_a_wait_named() {
        let clock = FakeRelativeClock::default();
        let limit = RateLimit::new(nz(2), nz(3), clock.clone());
        let ci: Arc<str> = Arc::from("ci");
        let other: Arc<str> = Arc::from("other");
        for _ in 0..3 {
            assert_eq!(limit.check(&ci), Ok(()));
        }
        let wait = limit.check(&ci).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        // Each caller has a bucket of its own.
        assert_eq!(limit.check(&other), Ok(()));
        clock.advance(Duration::from_millis(500));
        assert_eq!(limit.check(&ci), Ok(()));
        assert!(limit.check(&ci).is_err());
    }

    #[test]
    fn retry_after_is_whole_seconds_rounded_up_and_never_zero() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
    }

    #[test]
    fn probes_and_the_worker_protocol_are_exempt() {
        assert!(exempt("/healthz") && exempt("/readyz") && exempt("/v1/worker/claim"));
        assert!(!exempt("/v1/runs") && !exempt("/v1/jobs/x/runs") && !exempt("/metrics"));
    }

    #[test]
    fn holds_are_counted_per_caller_and_given_back_on_drop() {
        let holds = Holds::new(2);
        let ci: Arc<str> = Arc::from("ci");
        let a = holds.take(&ci).unwrap();
        let b = holds.take(&ci).unwrap();
        let refused = holds.take(&ci).unwrap_err();
        assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(refused.code, ErrorCodeV1::TooManyHolds);
        assert!(refused.message.contains("max_holds_per_token"));
        let _other = holds.take(&Arc::from("other")).unwrap();
        drop(a);
        assert_eq!(holds.open("ci"), 1);
        let _c = holds.take(&ci).unwrap();
        drop(b);
        drop(_c);
        assert_eq!(holds.open("ci"), 0);
        assert!(!holds.open.lock().unwrap().contains_key("ci"));
    }

    #[test]
    fn a_request_without_a_principal_is_anonymous() {
        let mut ext = Extensions::new();
        assert_eq!(&*caller_name(&ext), ANONYMOUS);
        ext.insert(Principal::new("ci", Vec::new()));
        assert_eq!(&*caller_name(&ext), "ci");
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_past_its_deadline_becomes_a_408() {
        // A body that never sends a byte.
        let stalled =
            Body::from_stream(futures::stream::pending::<Result<Bytes, std::io::Error>>());
        let body = tower_http::timeout::DeadlineBody::new(Duration::from_secs(1), stalled);
        let request = Request::new(Body::new(body));
        let rejection = Bytes::from_request(request, &()).await.unwrap_err();
        assert!(is_body_timeout(&rejection));
        let error = ApiError::from(rejection);
        assert_eq!(error.status, StatusCode::REQUEST_TIMEOUT);
        assert_eq!(error.code, ErrorCodeV1::RequestTimeout);
        let response = error.into_response();
        assert_eq!(response.headers()[header::CONNECTION], "close");
    }
}
