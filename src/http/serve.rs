//! Accepting connections and serving the router on them (HTTP/1 and HTTP/2), with two
//! things `axum::serve` cannot be told:
//!
//! - A client that shuts down its sending side after its request (raw sockets, some
//!   proxies, scripted clients) still gets its answer: hyper's http1 `half_close`.
//! - A connection closed while request bytes are still arriving (a body refused with 413
//!   before it was read) is drained for a bounded time and size before it is closed,
//!   like nginx's lingering close. Closing a socket with unread data makes the kernel
//!   send a reset, which destroys the answer in the client's receive buffer.

use std::future::Future;
use std::io;
use std::pin::{Pin, pin};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::time::Sleep;

/// The longest a closing connection is drained of request bytes nobody will read.
const LINGER_TIME: Duration = Duration::from_secs(5);
/// The most it is drained of; a client still sending after this is cut off.
const LINGER_BYTES: u64 = 64 * 1024 * 1024;
/// Reads per poll while draining, so one fast sender cannot hog a runtime thread.
const LINGER_READS_PER_POLL: usize = 16;

/// Serve `router` on `listener` until `shutdown` completes; then stop accepting, let
/// every open connection finish its request in flight, and return.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().half_close(true);
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
        let io = TokioIo::new(LingeringClose::new(stream));
        let service = TowerToHyperService::new(router.clone());
        let conn = builder
            .serve_connection_with_upgrades(io, service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(error) = conn.await {
                tracing::debug!(message = "connection ended with an error", %error);
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
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
