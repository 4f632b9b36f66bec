//! `HttpSender`: one delivery try over HTTP, behind the SSRF guard: the host is
//! resolved and every address checked at each try, and the request goes to the checked
//! address (so DNS cannot change between check and connect); no redirects, a 10 s
//! timeout, at most 64 KiB of the answer read.

use std::net::SocketAddr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, Utc};
use futures::StreamExt;
use reqwest::Url;
use serde::Serialize;

use super::sign::{Secret, signature};
use crate::domain::callback::guard::{Cidr, Refusal, check_all, check_scheme};
use crate::domain::callback::{CallbackSender, DueCallback, TryResult};
use crate::domain::run::Run;
use crate::protocol::api::RunV1;

const TIMEOUT: Duration = Duration::from_secs(10);
const MAX_ANSWER: usize = 64 * 1024;

pub struct HttpSender {
    pub secrets: Vec<Secret>,
    pub allow: Vec<Cidr>,
}

/// The body of every delivery.
#[derive(Serialize)]
struct EventBody<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    timestamp: String,
    data: RunV1,
}

impl HttpSender {
    /// The URL and the one checked address to connect to.
    async fn target(&self, url: &str) -> Result<(Url, SocketAddr), Refusal> {
        let parsed = Url::parse(url).map_err(|e| Refusal::Url(e.to_string()))?;
        check_scheme(parsed.scheme())?;
        let host = parsed
            .host_str()
            .ok_or_else(|| Refusal::Url("no host".to_owned()))?
            .to_owned();
        let port = parsed
            .port_or_known_default()
            .ok_or_else(|| Refusal::Url("no port".to_owned()))?;
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((trim_brackets(&host), port))
            .await
            .map_err(|_| Refusal::NoAddress { host: host.clone() })?
            .collect();
        let ips: Vec<_> = addrs.iter().map(SocketAddr::ip).collect();
        check_all(&host, &ips, &self.allow)?;
        let first = addrs.first().copied().ok_or(Refusal::NoAddress { host })?;
        Ok((parsed, first))
    }
}

/// An IPv6 literal's host is written `[::1]`; the resolver wants `::1`.
fn trim_brackets(host: &str) -> &str {
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

#[async_trait]
impl CallbackSender for HttpSender {
    async fn check(&self, url: &str) -> Result<(), Refusal> {
        self.target(url).await.map(|_| ())
    }

    async fn send(&self, delivery: &DueCallback, run: &Run, now: DateTime<Utc>) -> TryResult {
        let (url, addr) = match self.target(&delivery.url).await {
            Ok(t) => t,
            Err(refused) => return TryResult::Failed(format!("refused: {refused}")),
        };
        let body = EventBody {
            kind: &delivery.event,
            timestamp: now.to_rfc3339_opts(SecondsFormat::Secs, true),
            data: RunV1::from(run.clone()),
        };
        let body = match serde_json::to_vec(&body) {
            Ok(b) => b,
            Err(e) => return TryResult::Failed(format!("encoding the body: {e}")),
        };
        let timestamp = now.timestamp();
        let mut client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(TIMEOUT)
            .no_proxy();
        if let Some(host) = url.host_str() {
            client = client.resolve(trim_brackets(host), addr);
        }
        let client = match client.build() {
            Ok(c) => c,
            Err(e) => return TryResult::Failed(format!("http client: {e}")),
        };
        let mut request = client
            .post(url)
            .header("content-type", "application/json")
            .header("webhook-id", &delivery.event_id)
            .header("webhook-timestamp", timestamp.to_string());
        if !self.secrets.is_empty() {
            request = request.header(
                "webhook-signature",
                signature(&self.secrets, &delivery.event_id, timestamp, &body),
            );
        }
        let answer = match request.body(body).send().await {
            Ok(a) => a,
            Err(e) => return TryResult::Failed(e.to_string()),
        };
        let status = answer.status().as_u16();
        // Read (a bounded part of) the answer, so the connection ends cleanly; its
        // content means nothing to us.
        let mut stream = answer.bytes_stream();
        let mut read = 0usize;
        while read < MAX_ANSWER {
            match stream.next().await {
                Some(Ok(chunk)) => read += chunk.len(),
                _ => break,
            }
        }
        TryResult::Status(status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sender(allow: &[&str]) -> HttpSender {
        HttpSender {
            secrets: Vec::new(),
            allow: allow.iter().map(|s| s.parse().unwrap()).collect(),
        }
    }

    /// Only the refusal is tested: nothing is ever sent to these addresses.
    #[tokio::test]
    async fn refused_targets_are_refused_before_any_request() {
        let s = sender(&[]);
        for url in [
            "http://localhost:9/",
            "http://127.0.0.1:9/",
            "http://169.254.169.254/",
            "http://10.0.0.1/",
            "http://[::1]:9/",
            "http://[::ffff:127.0.0.1]:9/",
            "ftp://example.com/",
            "not a url",
        ] {
            assert!(s.check(url).await.is_err(), "{url}");
        }
        // Allowed when listed.
        assert_eq!(
            sender(&["127.0.0.1/32"]).check("http://127.0.0.1:9/").await,
            Ok(())
        );
    }
}
