//! Accepting connections, over TLS when configured, and serving the router on them
//! (HTTP/1.1), with what `axum::serve` cannot be told:
//!
//! - A client that shuts down its sending side after its request (raw sockets, some
//!   proxies, scripted clients) still gets its answer: hyper's http1 `half_close`.
//! - A connection closed while request bytes are still arriving (a body refused with 413
//!   before it was read) is drained for a bounded time and size before it is closed,
//!   like nginx's lingering close. Closing a socket with unread data makes the kernel
//!   send a reset, which destroys the answer in the client's receive buffer. Under TLS
//!   the drain reads the raw socket, below the TLS session.
//! - Limits on what a client may send before the router sees a request: the header
//!   block's size and line count (431, written by hyper, then the connection closes),
//!   and the time it has to send the whole head (`header_timeout`; then the connection
//!   is closed without an answer). The same timeout bounds the TLS handshake and a
//!   keep-alive connection waiting idle for its next request.
//!
//! HTTP/1.1 only: hyper's header limits and header timeout are HTTP/1 settings, and
//! hyper-util's HTTP/1-or-2 detection reads the first bytes with no timer at all, so a
//! client that connected and sent nothing would hold its connection forever. No tasuki
//! client speaks HTTP/2 to the server; TLS offers only `http/1.1` by ALPN.

use std::future::Future;
use std::io;
use std::pin::{Pin, pin};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;
use tokio_rustls::TlsAcceptor;

/// The longest a closing connection is drained of request bytes nobody will read.
const LINGER_TIME: Duration = Duration::from_secs(5);
/// The most it is drained of; a client still sending after this is cut off.
const LINGER_BYTES: u64 = 64 * 1024 * 1024;
/// Reads per poll while draining, so one fast sender cannot hog a runtime thread.
const LINGER_READS_PER_POLL: usize = 16;

/// What a client may send before its request reaches the router.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Bytes of the request line and headers together.
    pub max_header_bytes: usize,
    /// Header lines.
    pub max_headers: usize,
    /// Time for the whole request head (also: the TLS handshake, an idle keep-alive).
    pub header_timeout: Duration,
}

/// Serve `router` on `listener` (HTTPS with `tls`) until `shutdown` completes; then
/// stop accepting, let every open connection finish its request in flight, and return.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    tls: Option<TlsAcceptor>,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let mut builder = http1::Builder::new();
    builder
        .half_close(true)
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_headers(limits.max_headers)
        .max_header_size(limits.max_header_bytes);
    let graceful = GracefulShutdown::new();
    let mut shutdown = pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of file descriptors, or a connection aborted before it was
                    // accepted: neither ends the server.
                    tracing::warn!(message = "accepting a connection failed", %error);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Answers are small and a caller (a worker's claim, heartbeat, finish) waits for
        // each before its next request: never hold a segment back for Nagle.
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(message = "setting TCP_NODELAY failed", %error);
        }
        let connection = Connection {
            builder: builder.clone(),
            service: TowerToHyperService::new(router.clone()),
            watcher: graceful.watcher(),
        };
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => connection.serve(LingeringClose::new(stream)).await,
                Some(acceptor) => connection.serve_tls(stream, acceptor, limits).await,
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// One accepted connection, before its (TLS and) HTTP session starts.
struct Connection {
    builder: http1::Builder,
    service: TowerToHyperService<Router>,
    /// Held from accept on, so a shutdown also waits for a handshake in progress.
    watcher: Watcher,
}

impl Connection {
    async fn serve<I>(self, io: I)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let conn = self
            .builder
            .serve_connection(TokioIo::new(io), self.service);
        if let Err(error) = self.watcher.watch(conn).await {
            tracing::debug!(message = "connection ended with an error", %error);
        }
    }

    async fn serve_tls(self, stream: TcpStream, acceptor: TlsAcceptor, limits: ConnectionLimits) {
        let peer = stream.peer_addr().ok();
        let handshake = acceptor.accept(LingeringClose::new(stream));
        match tokio::time::timeout(limits.header_timeout, handshake).await {
            Ok(Ok(tls)) => self.serve(tls).await,
            // Plain HTTP to the TLS port, an unknown CA on the client's side, a scanner:
            // the client's problem, said at debug level only.
            Ok(Err(error)) => {
                tracing::debug!(message = "TLS handshake failed", peer = ?peer, %error)
            }
            Err(_) => tracing::debug!(message = "TLS handshake timed out", peer = ?peer),
        }
    }
}

/// A connection whose shutdown first sends FIN (so the client sees the whole answer
/// followed by end of stream), then reads and discards what the client still sends,
/// until it closes or `LINGER_TIME` / `LINGER_BYTES` is reached.
struct LingeringClose<I> {
    io: I,
    linger: Option<Linger>,
}

struct Linger {
    until: Pin<Box<Sleep>>,
    drained: u64,
}

impl<I> LingeringClose<I> {
    fn new(io: I) -> Self {
        Self { io, linger: None }
    }
}

impl Linger {
    /// `Ready` once the drain is over, however it ended: the connection closes either way.
    fn poll_drain<I: AsyncRead + Unpin>(&mut self, io: &mut I, cx: &mut Context<'_>) -> Poll<()> {
        let mut buf = [0u8; 8192];
        for _ in 0..LINGER_READS_PER_POLL {
            if self.drained >= LINGER_BYTES {
                return Poll::Ready(());
            }
            let mut read = ReadBuf::new(&mut buf);
            match Pin::new(&mut *io).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) if read.filled().is_empty() => return Poll::Ready(()),
                Poll::Ready(Ok(())) => self.drained += read.filled().len() as u64,
                Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Pending => return self.until.as_mut().poll(cx),
            }
        }
        if self.until.as_mut().poll(cx).is_ready() {
            return Poll::Ready(());
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for LingeringClose<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin> AsyncWrite for LingeringClose<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let linger = match &mut this.linger {
            Some(linger) => linger,
            None => {
                ready!(Pin::new(&mut this.io).poll_shutdown(cx))?;
                this.linger.insert(Linger {
                    until: Box::pin(tokio::time::sleep(LINGER_TIME)),
                    drained: 0,
                })
            }
        };
        ready!(linger.poll_drain(&mut this.io, cx));
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn shutdown_sends_end_of_stream_then_drains_until_the_peer_closes() {
        let (near, mut far) = tokio::io::duplex(64);
        let mut conn = LingeringClose::new(near);
        conn.write_all(b"answer").await.unwrap();
        let closing = tokio::spawn(async move {
            conn.shutdown().await.unwrap();
        });
        let mut answer = Vec::new();
        far.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"answer");
        // Far more than the pipe holds: the drain keeps reading it.
        far.write_all(&[7u8; 4096]).await.unwrap();
        drop(far);
        closing.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_neither_sends_nor_closes_is_given_up_on() {
        let (near, _far) = tokio::io::duplex(64);
        let mut conn = LingeringClose::new(near);
        // Paused time auto-advances to the drain's deadline once nothing else can run.
        conn.shutdown().await.unwrap();
    }
}
