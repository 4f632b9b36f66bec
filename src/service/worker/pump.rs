//! The output pump: forwards a container's output to the control plane in batches,
//! without copying the bytes, and keeps two positions apart: how far the container's
//! output has been read and how long the stored log is.

use std::sync::Arc;

use futures::{FutureExt, StreamExt};
use tracing::Instrument;

use super::Backoff;
use crate::domain::ports::{ControlError, ControlPlane, Lease, OutputPosition, OutputStream};

/// Largest batch of output sent to the control plane in one call.
pub(super) const LOG_BATCH_BYTES: usize = 256 * 1024;

/// Where a pump stands: in the container's output and in the stored log.
///
/// The two differ once a batch is dropped. The log sink refuses a write that starts past
/// its end (`LogError::Gap`), so writing the next batch at its position in the container's
/// output would get that batch, and every one after it, dropped too. The next batch is
/// therefore written where the stored log ends (`stored`), the log closes up over the
/// hole, and the hole is counted in `log_dropped_bytes` (by the worker when the control
/// plane was unreachable, by the control plane when its sink failed). `read` keeps the
/// position in the container's output, so a later read of the same output from its
/// start (the final catch-up of an adopted container) skips exactly what was already
/// stored or dropped, never re-storing bytes that followed the hole.
///
/// Across a restart of the worker the same holds: every batch carries `undelivered`,
/// which the control plane records before it writes the batch, and the sink counts its
/// own drops; `adopt` hands back all three positions, so the next life of the worker
/// starts where this one stood (`read = stored + dropped by the sink + undelivered`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct Pumped {
    /// Bytes of the container's output handled: stored, dropped or skipped.
    pub read: u64,
    /// The stored log's length as the control plane last said: where the next write goes.
    pub stored: u64,
    /// Bytes the control plane never got because it could not be reached, all told:
    /// over every life of the worker that carried the attempt.
    pub undelivered: u64,
}

impl From<OutputPosition> for Pumped {
    fn from(p: OutputPosition) -> Self {
        Self {
            read: p.read,
            stored: p.stored,
            undelivered: p.undelivered,
        }
    }
}

/// Chunks read ahead of the batch being stored: the container's output keeps flowing
/// while a batch is on its way (as `docker run` keeps copying), and a control plane
/// slower than the container still holds it back once this many wait. At the engine's
/// 32 KiB a frame at most, about 2 MiB.
const READ_AHEAD_CHUNKS: usize = 64;

/// Stops the reading-ahead task when the pump is done with (or dropped).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `output`, read in a task of its own into a bounded buffer, and the guard of that task.
/// The stream ends after the first error, as the pump does.
fn read_ahead(mut output: OutputStream) -> (OutputStream, AbortOnDrop) {
    let (tx, rx) = tokio::sync::mpsc::channel(READ_AHEAD_CHUNKS);
    let task = tokio::spawn(
        async move {
            while let Some(item) = output.next().await {
                let failed = item.is_err();
                if tx.send(item).await.is_err() || failed {
                    break;
                }
            }
        }
        .in_current_span(),
    );
    let buffered = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
    .boxed();
    (buffered, AbortOnDrop(task))
}

/// Streams `output` to the control plane in batches of whatever has arrived. `from`
/// says where `output` starts: its first `from.read` bytes are already handled (a
/// catch-up read of output from the container's start), the log holds `from.stored`
/// bytes, and `from.undelivered` were dropped undelivered before. Returns where the
/// pump stopped, `undelivered` counting on from `from.undelivered`.
pub(super) async fn pump_output(
    control: Arc<dyn ControlPlane>,
    lease: Lease,
    output: OutputStream,
    from: Pumped,
) -> Pumped {
    let (mut output, _reader) = read_ahead(output);
    let mut skip = from.read;
    let mut read = from.read;
    let mut stored = from.stored;
    let mut undelivered = from.undelivered;
    let mut batch = Vec::new();
    let mut ended = false;
    while !ended {
        // Block for the first chunk, then take whatever else is ready right now.
        match output.next().await {
            None => break,
            Some(Err(error)) => {
                tracing::warn!(message = "output stream broke", %error);
                break;
            }
            Some(Ok(chunk)) => batch.push(chunk),
        }
        let mut size: usize = batch.iter().map(|c| c.bytes.len()).sum();
        while size < LOG_BATCH_BYTES {
            match output.next().now_or_never() {
                Some(Some(Ok(chunk))) => {
                    size += chunk.bytes.len();
                    batch.push(chunk);
                }
                Some(Some(Err(_))) | Some(None) => {
                    ended = true;
                    break;
                }
                None => break,
            }
        }
        if skip > 0 {
            batch.retain_mut(|chunk| {
                let n = chunk.bytes.len() as u64;
                if skip >= n {
                    skip -= n;
                    return false;
                }
                let _ = chunk.bytes.split_to(skip as usize);
                skip = 0;
                true
            });
            size = batch.iter().map(|c| c.bytes.len()).sum();
            if batch.is_empty() {
                continue;
            }
        }
        read += size as u64;
        let mut backoff = Backoff::new();
        loop {
            match control.append_log(lease, stored, undelivered, &batch).await {
                Ok(len) => {
                    stored = len;
                    break;
                }
                Err(ControlError::Unavailable(error)) if backoff.next < Backoff::MAX => {
                    let wait = backoff.step();
                    tracing::warn!(message = "storing output failed; retrying", %error, retry_in_ms = wait.as_millis() as u64);
                    tokio::time::sleep(wait).await;
                }
                Err(ControlError::Unavailable(error)) => {
                    undelivered += size as u64;
                    tracing::error!(message = "control plane unreachable; output dropped", bytes = size, %error);
                    break;
                }
                Err(ControlError::Rejected(error)) => {
                    // The control plane counted these itself (a log sink fault) or
                    // refused them (not our lease): not ours to count.
                    tracing::error!(message = "output refused", bytes = size, %error);
                    break;
                }
            }
        }
        batch.clear();
    }
    if undelivered > from.undelivered {
        tracing::warn!(
            message = "output incomplete",
            dropped_bytes = undelivered - from.undelivered
        );
    }
    Pumped {
        read,
        stored,
        undelivered,
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use futures::StreamExt;
    use futures::channel::mpsc;

    use super::*;
    use crate::domain::ports::{OutputChunk, Stream};
    use crate::service::worker::fakes::{AppendMode, FakeControl, chunk, lease};

    fn stream_of(chunks: Vec<OutputChunk>) -> OutputStream {
        futures::stream::iter(chunks.into_iter().map(Ok)).boxed()
    }

    fn pump(
        control: &Arc<FakeControl>,
        output: OutputStream,
        from: Pumped,
    ) -> tokio::task::JoinHandle<Pumped> {
        tokio::spawn(pump_output(control.clone(), lease(), output, from))
    }

    #[tokio::test(start_paused = true)]
    async fn a_catch_up_read_skips_what_the_log_holds() {
        let control = Arc::new(FakeControl::default());
        control.set_log(b"aaabb");
        let output = stream_of(vec![chunk(b"aaa"), chunk(b"bbbb"), chunk(b"cc")]);
        let from = Pumped {
            read: 5,
            stored: 5,
            undelivered: 0,
        };
        let done = pump(&control, output, from).await.expect("pump");
        assert_eq!(control.log(), b"aaabbbbcc");
        assert_eq!(
            done,
            Pumped {
                read: 9,
                stored: 9,
                undelivered: 0
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_read_entirely_below_the_log_length_writes_nothing() {
        let control = Arc::new(FakeControl::default());
        control.set_log(b"aaabbb");
        let output = stream_of(vec![chunk(b"aaa"), chunk(b"bbb")]);
        let from = Pumped {
            read: 6,
            stored: 6,
            undelivered: 0,
        };
        let done = pump(&control, output, from).await.expect("pump");
        assert_eq!(control.append_calls(), 0);
        assert_eq!(done, from);
    }

    #[tokio::test(start_paused = true)]
    async fn ready_chunks_go_in_one_batch_up_to_the_batch_size() {
        let control = Arc::new(FakeControl::default());
        let output = stream_of(vec![chunk(b"a"), chunk(b"b"), chunk(b"c")]);
        pump(&control, output, Pumped::default())
            .await
            .expect("pump");
        assert_eq!(control.append_calls(), 1);
        assert_eq!(control.log(), b"abc");

        let control = Arc::new(FakeControl::default());
        let big = |b: u8| OutputChunk {
            stream: Stream::Stderr,
            bytes: Bytes::from(vec![b; LOG_BATCH_BYTES / 2 + 1]),
        };
        let output = stream_of(vec![big(1), big(2), big(3)]);
        let done = pump(&control, output, Pumped::default())
            .await
            .expect("pump");
        // Two chunks pass the batch size: the third goes in a batch of its own.
        assert_eq!(control.append_calls(), 2);
        assert_eq!(done.stored, 3 * (LOG_BATCH_BYTES as u64 / 2 + 1));
        assert_eq!(done.read, done.stored);
    }

    /// While a batch is on its way to the control plane, the container's output is read
    /// on (up to the read-ahead bound, no further), and none of it is lost or reordered.
    #[tokio::test(start_paused = true)]
    async fn output_is_read_ahead_while_a_batch_is_stored_and_no_further_than_the_bound() {
        let control = Arc::new(FakeControl::default());
        let hold = Arc::new(tokio::sync::Semaphore::new(0));
        control.hold_appends(hold.clone());
        // Chunks of over half a batch: a batch holds two, so what is read past them is
        // read ahead.
        let total = READ_AHEAD_CHUNKS * 2;
        let size = LOG_BATCH_BYTES / 2 + 1;
        let pulled = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = pulled.clone();
        let output = futures::stream::iter(0..total)
            .map(move |i| {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Ok(OutputChunk {
                    stream: Stream::Stdout,
                    bytes: Bytes::from(vec![i as u8; size]),
                })
            })
            .boxed();
        let task = pump(&control, output, Pumped::default());
        control.appended(1).await;
        let read = || pulled.load(std::sync::atomic::Ordering::SeqCst);
        // The first batch waits at the control plane; the reader fills its buffer.
        crate::service::worker::fakes::until(|| read() > READ_AHEAD_CHUNKS).await;
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        assert!(
            read() <= 3 + READ_AHEAD_CHUNKS,
            "read {} chunks with one batch held",
            read()
        );
        hold.add_permits(1_000);
        let done = task.await.expect("pump");
        let log = control.log();
        assert_eq!(log.len(), total * size);
        assert!(
            log.chunks(size)
                .enumerate()
                .all(|(i, c)| c.iter().all(|b| *b == i as u8)),
            "every chunk whole and in order"
        );
        assert_eq!(done.stored, (total * size) as u64);
        assert_eq!(done.read, done.stored);
    }

    /// Sends chunks one batch at a time: each is sent once the previous one was handed
    /// to the control plane.
    async fn batch_by_batch(
        control: &Arc<FakeControl>,
        modes: &[(AppendMode, &'static [u8])],
    ) -> Pumped {
        let (tx, rx) = mpsc::unbounded();
        let task = pump(control, rx.boxed(), Pumped::default());
        for (mode, bytes) in modes {
            control.set_append_mode(*mode);
            let before = control.append_calls();
            tx.unbounded_send(Ok(chunk(bytes))).expect("pump listening");
            control.appended(before + 1).await;
            // Past every retry of an unreachable control plane (the paused clock jumps
            // from timer to timer, so this costs nothing).
            tokio::time::sleep(std::time::Duration::from_secs(120)).await;
        }
        drop(tx);
        task.await.expect("pump")
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_the_sink_refused_is_not_counted_by_the_worker_and_the_next_follows_it() {
        let control = Arc::new(FakeControl::default());
        let done = batch_by_batch(
            &control,
            &[
                (AppendMode::Store, b"aaa"),
                (AppendMode::SinkFault, b"bbb"),
                (AppendMode::Store, b"ccc"),
            ],
        )
        .await;
        // The sink refuses a write past its end, so "ccc" closes up over the hole.
        assert_eq!(control.log(), b"aaaccc");
        assert_eq!(control.sink_dropped(), 3);
        assert_eq!(
            done,
            Pumped {
                read: 9,
                stored: 6,
                undelivered: 0
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_the_control_plane_never_got_is_counted_as_undelivered() {
        let control = Arc::new(FakeControl::default());
        let done = batch_by_batch(
            &control,
            &[
                (AppendMode::Store, b"aaa"),
                (AppendMode::Unavailable, b"bbb"),
                (AppendMode::Store, b"ccc"),
            ],
        )
        .await;
        assert_eq!(control.log(), b"aaaccc");
        assert_eq!(control.sink_dropped(), 0);
        assert_eq!(
            done,
            Pumped {
                read: 9,
                stored: 6,
                undelivered: 3
            }
        );

        // The batch after the hole told the control plane about it.
        assert_eq!(control.undelivered(), 3);

        // A later read of the same output from its start (the final catch-up of an
        // adopted container) carries on after the hole, stores nothing twice, and
        // counts on from what was undelivered before.
        let again = stream_of(vec![
            chunk(b"aaa"),
            chunk(b"bbb"),
            chunk(b"ccc"),
            chunk(b"d"),
        ]);
        let last = pump(&control, again, done).await.expect("pump");
        assert_eq!(control.log(), b"aaacccd");
        assert_eq!(
            last,
            Pumped {
                read: 10,
                stored: 7,
                undelivered: 3
            }
        );
    }
}
