//! A closed-loop HTTP load generator: `clients` connections, each sending its next
//! request when the previous answer is in, for a fixed time. One HTTP/1.1 keep-alive
//! connection per client (hyper's client connection, no pool), latencies in a
//! histogram (microseconds).

#![allow(dead_code)] // shared by every section; not each uses all of it

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

/// One keep-alive HTTP/1.1 connection.
pub struct Conn {
    addr: SocketAddr,
    send: SendRequest<Full<Bytes>>,
}

/// An answer: status and the whole body.
pub struct Answer {
    pub status: u16,
    pub body: Bytes,
}

impl Conn {
    pub async fn open(addr: SocketAddr) -> anyhow::Result<Conn> {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Conn { addr, send })
    }

    /// Send one request and read its whole answer. `headers` are (name, value) pairs.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> anyhow::Result<Answer> {
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header("host", self.addr.to_string());
        if !body.is_empty() {
            builder = builder.header("content-type", "application/json");
        }
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        let request = builder.body(Full::new(body))?;
        self.send.ready().await?;
        let response = self.send.send_request(request).await?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        Ok(Answer { status, body })
    }
}

/// What a closed-loop phase measured.
pub struct LoadResult {
    /// Requests answered as `ok` said.
    pub ok: u64,
    /// Requests that failed or were answered otherwise.
    pub errors: u64,
    pub elapsed: Duration,
    /// Latency of the `ok` requests, microseconds.
    pub latency: Histogram<u64>,
    /// The first error seen, for the report.
    pub first_error: Option<String>,
}

impl LoadResult {
    /// Nothing measured yet; each client's share goes in with `add`.
    pub fn empty() -> anyhow::Result<Self> {
        Ok(LoadResult {
            ok: 0,
            errors: 0,
            elapsed: Duration::ZERO,
            latency: Histogram::new(3)?,
            first_error: None,
        })
    }

    /// One client's counts and latencies; the first error seen is kept.
    pub fn add(
        &mut self,
        ok: u64,
        errors: u64,
        first_error: Option<String>,
        latency: Histogram<u64>,
    ) -> anyhow::Result<()> {
        self.ok += ok;
        self.errors += errors;
        if self.first_error.is_none() {
            self.first_error = first_error;
        }
        self.latency.add(latency)?;
        Ok(())
    }

    pub fn per_second(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }
    /// A latency percentile in milliseconds.
    pub fn ms(&self, percentile: f64) -> f64 {
        self.latency.value_at_quantile(percentile / 100.0) as f64 / 1000.0
    }
    pub fn summary(&self) -> String {
        format!(
            "{} ok, {} errors in {:.1?}: {:.0}/s, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms{}",
            self.ok,
            self.errors,
            self.elapsed,
            self.per_second(),
            self.ms(50.0),
            self.ms(99.0),
            self.latency.max() as f64 / 1000.0,
            self.first_error
                .as_ref()
                .map(|e| format!(" (first error: {e})"))
                .unwrap_or_default()
        )
    }
}

/// The request one client sends each time round: method, path, headers, body; the
/// client's index and its running count let each request differ.
pub type MakeRequest =
    Arc<dyn Fn(usize, u64) -> (String, String, Vec<(String, String)>, Bytes) + Send + Sync>;

/// `clients` connections to `addr`, each sending `make(client, n)` in a closed loop for
/// `duration`; an answer counts as ok when `ok(status)` says so.
pub async fn closed_loop(
    addr: SocketAddr,
    clients: usize,
    duration: Duration,
    make: MakeRequest,
    ok: fn(u16) -> bool,
) -> anyhow::Result<LoadResult> {
    closed_loop_gated(addr, clients, duration, make, ok, Arc::new(|| true)).await
}

/// Says whether a client may send its next request now; asked before each one.
pub type Gate = Arc<dyn Fn() -> bool + Send + Sync>;

/// `closed_loop`, each client holding its next request while `gate` says no (looked at
/// again every millisecond); the time held is not counted in the latency.
pub async fn closed_loop_gated(
    addr: SocketAddr,
    clients: usize,
    duration: Duration,
    make: MakeRequest,
    ok: fn(u16) -> bool,
    gate: Gate,
) -> anyhow::Result<LoadResult> {
    let mut conns = Vec::with_capacity(clients);
    for _ in 0..clients {
        conns.push(Conn::open(addr).await?);
    }
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::with_capacity(clients);
    for (i, mut conn) in conns.into_iter().enumerate() {
        let make = make.clone();
        let gate = gate.clone();
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new(3).expect("3 significant figures is valid");
            let (mut okc, mut errors, mut first_error) = (0u64, 0u64, None);
            let mut n = 0u64;
            while Instant::now() < deadline {
                if !gate() {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                }
                let (method, path, headers, body) = make(i, n);
                n += 1;
                let headers: Vec<(&str, &str)> = headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                let sent = Instant::now();
                match conn.request(&method, &path, &headers, body).await {
                    Ok(a) if ok(a.status) => {
                        okc += 1;
                        let _ = hist.record(sent.elapsed().as_micros() as u64);
                    }
                    Ok(a) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| {
                            format!("{} {}", a.status, String::from_utf8_lossy(&a.body))
                        });
                    }
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| format!("{e:#}"));
                        // A broken connection: open another.
                        match Conn::open(conn.addr).await {
                            Ok(c) => conn = c,
                            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                        }
                    }
                }
            }
            (okc, errors, first_error, hist)
        }));
    }
    let mut result = LoadResult::empty()?;
    for task in tasks {
        let (okc, errors, first_error, hist) = task.await?;
        result.add(okc, errors, first_error, hist)?;
    }
    result.elapsed = start.elapsed();
    Ok(result)
}

/// Latency percentile of a list of durations, in milliseconds.
pub fn percentile_ms(samples: &mut [Duration], percentile: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    samples.sort();
    let rank = ((percentile / 100.0) * (samples.len() - 1) as f64).round() as usize;
    samples[rank.min(samples.len() - 1)].as_secs_f64() * 1000.0
}
