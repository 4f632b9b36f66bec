//! The log sink port's behaviour, as any sink must show it: each test is a function of
//! a fresh, empty sink, and `log_sink_suite!(open)` turns them all into
//! `#[tokio::test]`s for one sink (`open` makes the sink and whatever keeps it alive).
//! Contents are checked against the bytes the test sent, not against the sink's length.

use bytes::Bytes;

use crate::domain::ports::{LogError, LogSink, OutputChunk, Stream};
use crate::domain::run::RunId;

/// A piece of output; the stream is not stored, so it alternates to show it plays no part.
fn chunk(bytes: &[u8]) -> OutputChunk {
    let stream = if bytes.len().is_multiple_of(2) {
        Stream::Stdout
    } else {
        Stream::Stderr
    };
    OutputChunk {
        stream,
        bytes: Bytes::copy_from_slice(bytes),
    }
}

fn chunks(pieces: &[&[u8]]) -> Vec<OutputChunk> {
    pieces.iter().map(|p| chunk(p)).collect()
}

/// The whole log of the attempt.
async fn whole(sink: &dyn LogSink, id: RunId, attempt: u32) -> Vec<u8> {
    sink.read(id, attempt, 0, usize::MAX)
        .await
        .unwrap()
        .to_vec()
}

/// Bytes that repeat nowhere within MiBs, so a piece read from the wrong place shows.
fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

pub(crate) async fn appends_are_idempotent_by_offset(sink: &dyn LogSink) {
    let id = RunId::new();
    let append = |offset, pieces: &[&[u8]]| {
        let batch = chunks(pieces);
        async move { sink.append(id, 1, offset, &batch).await }
    };
    assert_eq!(append(0, &[b"hello ", b"wor"]).await.unwrap(), 9);
    // The same batch again (a retried upload) adds nothing.
    assert_eq!(append(0, &[b"hello ", b"wor"]).await.unwrap(), 9);
    // A batch overlapping the end adds only the new bytes.
    assert_eq!(append(6, &[b"world\n"]).await.unwrap(), 12);
    assert_eq!(whole(sink, id, 1).await, b"hello world\n");
    // Overlapping across stored appends and across the batch's own pieces: the first
    // 10 bytes it brings are there (from three earlier appends), the rest is new.
    assert_eq!(append(12, &[b"ab"]).await.unwrap(), 14);
    assert_eq!(
        append(4, &[b"o w", b"orld", b"\nab", b"cd"]).await.unwrap(),
        16
    );
    assert_eq!(whole(sink, id, 1).await, b"hello world\nabcd");
    // Wholly inside what is stored: nothing changes, whatever the batch claims.
    assert_eq!(append(2, &[b"XX"]).await.unwrap(), 16);
    assert_eq!(whole(sink, id, 1).await, b"hello world\nabcd");
    // Empty pieces count for nothing; an empty batch at the end is answered.
    assert_eq!(append(16, &[b"", b"e", b""]).await.unwrap(), 17);
    assert_eq!(append(17, &[]).await.unwrap(), 17);
    assert_eq!(append(17, &[b""]).await.unwrap(), 17);

    // Past the end is a gap, refused and naming both lengths; nothing is stored.
    assert!(matches!(
        append(20, &[b"x"]).await,
        Err(LogError::Gap {
            offset: 20,
            len: 17
        })
    ));
    assert!(matches!(
        append(18, &[]).await,
        Err(LogError::Gap {
            offset: 18,
            len: 17
        })
    ));
    assert!(matches!(
        append(u64::MAX, &[b"x"]).await,
        Err(LogError::Gap {
            offset: u64::MAX,
            len: 17
        })
    ));
    assert_eq!(sink.len(id, 1).await.unwrap(), 17);
    assert_eq!(whole(sink, id, 1).await, b"hello world\nabcde");

    // A log begins only at 0.
    assert!(matches!(
        sink.append(id, 2, 3, &chunks(&[b"late"])).await,
        Err(LogError::Gap { offset: 3, len: 0 })
    ));
    assert_eq!(sink.len(id, 2).await.unwrap(), 0);
    assert!(whole(sink, id, 2).await.is_empty());
}

pub(crate) async fn len_counts_each_attempts_stored_bytes(sink: &dyn LogSink) {
    let (id, other) = (RunId::new(), RunId::new());
    assert_eq!(sink.len(id, 1).await.unwrap(), 0);
    sink.append(id, 1, 0, &chunks(&[b"one", b"two"]))
        .await
        .unwrap();
    sink.append(id, 2, 0, &chunks(&[b"second attempt"]))
        .await
        .unwrap();
    sink.append(other, 1, 0, &chunks(&[b"x"])).await.unwrap();
    assert_eq!(sink.len(id, 1).await.unwrap(), 6);
    assert_eq!(sink.len(id, 2).await.unwrap(), 14);
    assert_eq!(sink.len(id, 3).await.unwrap(), 0);
    assert_eq!(sink.len(other, 1).await.unwrap(), 1);
    assert_eq!(whole(sink, id, 1).await, b"onetwo");
    assert_eq!(whole(sink, id, 2).await, b"second attempt");
}

pub(crate) async fn sync_succeeds_with_or_without_output(sink: &dyn LogSink) {
    let id = RunId::new();
    // An attempt that wrote nothing has nothing to make durable.
    sink.sync(id, 1).await.unwrap();
    sink.append(id, 1, 0, &chunks(&[b"last words\n"]))
        .await
        .unwrap();
    sink.sync(id, 1).await.unwrap();
    assert_eq!(whole(sink, id, 1).await, b"last words\n");
    assert_eq!(sink.len(id, 1).await.unwrap(), 11);
}

pub(crate) async fn reads_return_exactly_the_range_asked(sink: &dyn LogSink) {
    let id = RunId::new();
    let log = b"0123456789abcdef";
    // Four appends of four bytes, the third a batch of two pieces.
    for (at, pieces) in [
        (0, &[&log[0..4]][..]),
        (4, &[&log[4..8]][..]),
        (8, &[&log[8..9], &log[9..12]][..]),
        (12, &[&log[12..16]][..]),
    ] {
        sink.append(id, 1, at, &chunks(pieces)).await.unwrap();
    }
    // Every offset up to past the end, every length up to past the end: inside one
    // append, across several, ending on a boundary or past the end, and max 0.
    for offset in 0..=log.len() + 2 {
        for max in 0..=log.len() + 2 {
            let start = offset.min(log.len());
            let want = &log[start..(start + max).min(log.len())];
            let got = sink.read(id, 1, offset as u64, max).await.unwrap();
            assert_eq!(&got[..], want, "read({offset}, {max})");
        }
    }
    assert_eq!(
        &sink.read(id, 1, 5, usize::MAX).await.unwrap()[..],
        b"56789abcdef"
    );
    // Far past the end, even past what a file can seek to or a BIGINT holds: nothing
    // yet, not an error.
    for offset in [
        1 << 40,
        i64::MAX as u64,
        16_045_715_068_360_376_320,
        u64::MAX,
    ] {
        assert!(sink.read(id, 1, offset, 10).await.unwrap().is_empty());
        assert!(
            sink.read(id, 1, offset, usize::MAX)
                .await
                .unwrap()
                .is_empty()
        );
    }
    // No log at all.
    assert!(sink.read(id, 2, 0, 10).await.unwrap().is_empty());
    assert!(sink.read(RunId::new(), 1, 0, 10).await.unwrap().is_empty());
}

pub(crate) async fn deleting_a_run_removes_only_the_attempts_named(sink: &dyn LogSink) {
    let (gone, kept) = (RunId::new(), RunId::new());
    // Attempt 1 wrote nothing; 2 and 3 did; 4 lies past what the delete names.
    sink.append(gone, 2, 0, &chunks(&[b"two"])).await.unwrap();
    sink.append(gone, 3, 0, &chunks(&[b"thr", b"ee"]))
        .await
        .unwrap();
    sink.append(gone, 3, 5, &chunks(&[b"!"])).await.unwrap();
    sink.append(gone, 4, 0, &chunks(&[b"four"])).await.unwrap();
    sink.append(kept, 1, 0, &chunks(&[b"stays"])).await.unwrap();

    assert!(!sink.delete_run(gone, 0).await.unwrap());
    assert_eq!(sink.len(gone, 2).await.unwrap(), 3);
    assert!(sink.delete_run(gone, 3).await.unwrap());
    for attempt in 1..=3 {
        assert_eq!(sink.len(gone, attempt).await.unwrap(), 0);
        assert!(whole(sink, gone, attempt).await.is_empty());
    }
    assert_eq!(whole(sink, gone, 4).await, b"four");
    assert_eq!(sink.len(gone, 4).await.unwrap(), 4);
    assert_eq!(whole(sink, kept, 1).await, b"stays");
    // Nothing left to delete is not an error.
    assert!(!sink.delete_run(gone, 3).await.unwrap());
    assert!(!sink.delete_run(RunId::new(), 1).await.unwrap());
    // A deleted log begins again at 0, with nothing of the old one.
    assert!(matches!(
        sink.append(gone, 3, 6, &chunks(&[b"x"])).await,
        Err(LogError::Gap { offset: 6, len: 0 })
    ));
    assert_eq!(
        sink.append(gone, 3, 0, &chunks(&[b"anew"])).await.unwrap(),
        4
    );
    assert_eq!(whole(sink, gone, 3).await, b"anew");
    assert!(sink.delete_run(gone, 4).await.unwrap());
    assert!(whole(sink, gone, 4).await.is_empty());
}

pub(crate) async fn the_same_bytes_appended_twice_at_once_are_stored_once(sink: &dyn LogSink) {
    let id = RunId::new();
    let data = noise(64 * 1024, 7);
    // Two replicas storing one batch (a worker that failed over and sent it again),
    // cut into pieces differently: on a fresh log, then after what is there.
    let mut end = 0;
    for round in 0..8u32 {
        let at = end;
        let (a, b) = (
            chunks(&[&data[..1000], &data[1000..]]),
            chunks(&[&data[..40_000], &data[40_000..]]),
        );
        let (one, two) = tokio::join!(sink.append(id, 1, at, &a), sink.append(id, 1, at, &b));
        end = at + data.len() as u64;
        assert_eq!(one.unwrap(), end, "round {round}");
        assert_eq!(two.unwrap(), end, "round {round}");
        assert_eq!(sink.len(id, 1).await.unwrap(), end);
    }
    let log = whole(sink, id, 1).await;
    assert_eq!(log.len(), data.len() * 8);
    for (n, copy) in log.chunks(data.len()).enumerate() {
        assert!(copy == &data[..], "copy {n} differs");
    }
}

pub(crate) async fn a_large_append_is_read_back_intact(sink: &dyn LogSink) {
    let id = RunId::new();
    let data = noise(5 << 20, 42);
    let (first, rest) = data.split_at(4 << 20);
    let pieces: Vec<&[u8]> = first.chunks(256 * 1024).collect();
    assert_eq!(
        sink.append(id, 1, 0, &chunks(&pieces)).await.unwrap(),
        first.len() as u64
    );
    // The next batch begins a MiB before the end (resent), and brings a MiB more.
    let resent = &data[(3 << 20)..];
    assert_eq!(
        sink.append(id, 1, 3 << 20, &chunks(&[resent]))
            .await
            .unwrap(),
        data.len() as u64
    );
    assert_eq!(rest.len(), 1 << 20);
    assert!(whole(sink, id, 1).await == data);
    // Read back in windows that do not line up with the appends.
    let mut read = Vec::with_capacity(data.len());
    loop {
        let piece = sink.read(id, 1, read.len() as u64, 700_001).await.unwrap();
        if piece.is_empty() {
            break;
        }
        assert!(piece.len() <= 700_001);
        read.extend_from_slice(&piece);
    }
    assert!(read == data);
    let middle = sink.read(id, 1, (4 << 20) - 3, 10).await.unwrap();
    assert_eq!(&middle[..], &data[(4 << 20) - 3..(4 << 20) + 7]);
}

/// Every test of the suite, for one sink: `open` is an async fn returning
/// `(sink, keep_alive)`.
macro_rules! log_sink_suite {
    ($open:path) => {
        $crate::logsink::suite::log_sink_suite!(@each $open;
            appends_are_idempotent_by_offset,
            len_counts_each_attempts_stored_bytes,
            sync_succeeds_with_or_without_output,
            reads_return_exactly_the_range_asked,
            deleting_a_run_removes_only_the_attempts_named,
            the_same_bytes_appended_twice_at_once_are_stored_once,
            a_large_append_is_read_back_intact,
        );
    };
    (@each $open:path; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $name() {
                let (sink, _keep) = $open().await;
                $crate::logsink::suite::$name(&sink).await;
            }
        )*
    };
}
pub(crate) use log_sink_suite;
