//! Attempt logs, through the `LogSink` port on both sides (files beside a SQLite
//! store, `log_heads`/`log_chunks` in PostgreSQL): copied in pieces, each append's
//! answer checked, and summed for the verification.

use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::{CopyError, Side};
use crate::domain::ports::{LogSink, OutputChunk, Stream};
use crate::domain::run::RunId;

/// How much of a log is read and appended at once.
pub(super) const PIECE: usize = 1 << 20;

/// Copy one attempt's log from `from` to `to`, returning its length (0: it has none).
/// An append stores only bytes past what the target holds, so a copy run again after
/// a failure (its rows rolled back, its logs not) goes on from there.
pub(super) async fn copy_log(
    from: &dyn LogSink,
    to: &dyn LogSink,
    run_id: RunId,
    attempt: u32,
) -> Result<u64, CopyError> {
    let log = |side: Side, e| CopyError::Log {
        side,
        run_id,
        attempt,
        error: e,
    };
    let len = from
        .len(run_id, attempt)
        .await
        .map_err(|e| log(Side::Source, e))?;
    if len == 0 {
        return Ok(0);
    }
    let mut offset = 0u64;
    while offset < len {
        let want = usize::try_from(len - offset).unwrap_or(PIECE).min(PIECE);
        let bytes = from
            .read(run_id, attempt, offset, want)
            .await
            .map_err(|e| log(Side::Source, e))?;
        if bytes.is_empty() {
            return Err(CopyError::LogLength {
                side: Side::Source,
                run_id,
                attempt,
                why: format!("its log ends at {offset} bytes, short of its length {len}"),
            });
        }
        let end = offset + bytes.len() as u64;
        let chunk = OutputChunk {
            // The stream is not part of a stored log: only the bytes, in order.
            stream: Stream::Stdout,
            bytes,
        };
        let stored = to
            .append(run_id, attempt, offset, &[chunk])
            .await
            .map_err(|e| log(Side::Target, e))?;
        if stored != end {
            return Err(CopyError::LogLength {
                side: Side::Target,
                run_id,
                attempt,
                why: format!("after an append up to {end} bytes its log holds {stored}"),
            });
        }
        offset = end;
    }
    to.sync(run_id, attempt)
        .await
        .map_err(|e| log(Side::Target, e))?;
    let stored = to
        .len(run_id, attempt)
        .await
        .map_err(|e| log(Side::Target, e))?;
    if stored != len {
        return Err(CopyError::LogLength {
            side: Side::Target,
            run_id,
            attempt,
            why: format!("its log holds {stored} bytes, the source's {len}"),
        });
    }
    Ok(len)
}

/// The logs of one side: how many attempts have one, their bytes, and a SHA-256 over
/// each log's run, attempt, length and bytes, in the attempts' key order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogSummary {
    pub logs: u64,
    pub bytes: u64,
    pub sha256: [u8; 32],
}

impl LogSummary {
    pub fn prefix(&self, n: usize) -> String {
        super::schema::hex(&self.sha256).chars().take(n).collect()
    }
}

/// Read every log of `attempts` (in key order) from `sink` and sum them up.
pub(super) async fn summarize(
    sink: &dyn LogSink,
    side: Side,
    attempts: &[(RunId, u32)],
) -> Result<LogSummary, CopyError> {
    let mut hash = Sha256::new();
    let (mut logs, mut bytes) = (0u64, 0u64);
    for &(run_id, attempt) in attempts {
        let failed = |e| CopyError::Log {
            side,
            run_id,
            attempt,
            error: e,
        };
        let len = sink.len(run_id, attempt).await.map_err(failed)?;
        if len == 0 {
            continue;
        }
        hash.update(format!("{run_id} {attempt} {len}\n").as_bytes());
        let mut offset = 0u64;
        while offset < len {
            let want = usize::try_from(len - offset).unwrap_or(PIECE).min(PIECE);
            let piece: Bytes = sink
                .read(run_id, attempt, offset, want)
                .await
                .map_err(failed)?;
            if piece.is_empty() {
                return Err(CopyError::LogLength {
                    side,
                    run_id,
                    attempt,
                    why: format!("its log ends at {offset} bytes, short of its length {len}"),
                });
            }
            hash.update(&piece);
            offset += piece.len() as u64;
        }
        logs += 1;
        bytes += len;
    }
    Ok(LogSummary {
        logs,
        bytes,
        sha256: hash.finalize().into(),
    })
}
