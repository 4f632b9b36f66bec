use std::collections::HashMap;
use std::io::SeekFrom;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::Mutex;

use crate::domain::ports::{LogError, LogSink, OutputChunk};
use crate::domain::run::RunId;

/// Files at `{dir}/{run_id}/{attempt}.log`. Appends to one attempt's file are serialised
/// by a per-file lock so the offset check and the write are one step.
/// One lock per attempt's file.
type FileLocks = HashMap<(RunId, u32), Arc<Mutex<()>>>;

pub struct FileLogSink {
    dir: PathBuf,
    locks: std::sync::Mutex<FileLocks>,
}

fn io(path: &Path, e: std::io::Error) -> LogError {
    LogError::Io(format!("{}: {e}", path.display()))
}

impl FileLogSink {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            locks: std::sync::Mutex::new(HashMap::new()),
        }
    }

    pub fn path(&self, run_id: RunId, attempt: u32) -> PathBuf {
        self.dir
            .join(run_id.to_string())
            .join(format!("{attempt}.log"))
    }

    fn lock(&self, run_id: RunId, attempt: u32) -> Arc<Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        // Drop locks nobody holds any more, so the map stays as small as the set of
        // attempts currently writing.
        if locks.len() > 1024 {
            locks.retain(|_, l| Arc::strong_count(l) > 1);
        }
        locks.entry((run_id, attempt)).or_default().clone()
    }
}

#[async_trait]
impl LogSink for FileLogSink {
    async fn append(
        &self,
        run_id: RunId,
        attempt: u32,
        offset: u64,
        chunks: &[OutputChunk],
    ) -> Result<u64, LogError> {
        let path = self.path(run_id, attempt);
        let lock = self.lock(run_id, attempt);
        let _guard = lock.lock().await;
        // The whole batch in one blocking call: through tokio::fs every open, stat and
        // chunk written is a hop to the blocking pool and back, and at tens of MiB/s
        // those hops (not the copying) were most of `serve`'s CPU.
        let pieces: Vec<Bytes> = chunks.iter().map(|c| c.bytes.clone()).collect();
        tokio::task::spawn_blocking(move || append_blocking(&path, offset, &pieces))
            .await
            .map_err(|e| LogError::Io(format!("log write task: {e}")))?
    }

    async fn sync(&self, run_id: RunId, attempt: u32) -> Result<(), LogError> {
        let path = self.path(run_id, attempt);
        let file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            // No output, no log: nothing to make durable.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io(&path, e)),
        };
        file.sync_all().await.map_err(|e| io(&path, e))?;
        // The file's directory entry too: the run's directory and its log were created
        // for this run, and a file nobody can find after a power cut is no log at all.
        if let Some(parent) = path.parent() {
            let dir = tokio::fs::File::open(parent)
                .await
                .map_err(|e| io(parent, e))?;
            dir.sync_all().await.map_err(|e| io(parent, e))?;
        }
        Ok(())
    }

    async fn len(&self, run_id: RunId, attempt: u32) -> Result<u64, LogError> {
        let path = self.path(run_id, attempt);
        match tokio::fs::metadata(&path).await {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(io(&path, e)),
        }
    }

    async fn delete_run(&self, run_id: RunId) -> Result<bool, LogError> {
        let dir = self.dir.join(run_id.to_string());
        match tokio::fs::remove_dir_all(&dir).await {
            Ok(()) => Ok(true),
            // Never written (a run cancelled before it started), or deleted by an
            // earlier pass that did not get to delete the run's rows.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io(&dir, e)),
        }
    }

    async fn read(
        &self,
        run_id: RunId,
        attempt: u32,
        offset: u64,
        max: usize,
    ) -> Result<Bytes, LogError> {
        let path = self.path(run_id, attempt);
        let mut file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Bytes::new()),
            Err(e) => return Err(io(&path, e)),
        };
        // Nothing lies past the end; and an offset past i64::MAX is one the kernel's seek
        // refuses (EINVAL), which must read as "nothing yet", not as a broken log.
        let len = file.metadata().await.map_err(|e| io(&path, e))?.len();
        if offset >= len {
            return Ok(Bytes::new());
        }
        file.seek(SeekFrom::Start(offset))
            .await
            .map_err(|e| io(&path, e))?;
        // Sized by what is there, not by `max`: a follower reads each small piece of
        // output as it comes, and the chunk keeps its buffer until the client has it.
        let there = usize::try_from(len - offset).unwrap_or(usize::MAX);
        let mut buf = Vec::with_capacity(there.min(max).min(1 << 20));
        (&mut file)
            .take(max as u64)
            .read_to_end(&mut buf)
            .await
            .map_err(|e| io(&path, e))?;
        Ok(Bytes::from(buf))
    }
}

/// [`LogSink::append`] on the calling thread: `pieces` start at `offset` of the file.
fn append_blocking(path: &Path, offset: u64, pieces: &[Bytes]) -> Result<u64, LogError> {
    use std::io::Write;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| io(path, e))?;
    let len = file.metadata().map_err(|e| io(path, e))?.len();
    if offset > len {
        return Err(LogError::Gap { offset, len });
    }
    // Skip what an earlier, retried upload already stored.
    let mut skip = len - offset;
    let mut end = len;
    let mut written: std::io::Result<()> = Ok(());
    for piece in pieces {
        let n = piece.len() as u64;
        if skip >= n {
            skip -= n;
            continue;
        }
        let tail = &piece[skip as usize..];
        skip = 0;
        written = file.write_all(tail);
        if written.is_err() {
            break;
        }
        end += tail.len() as u64;
    }
    if let Err(e) = written {
        // A half-written batch (disk full) is cut off again, so the file holds whole
        // batches only and the next append's offset still means what it says.
        if let Err(cut) = file.set_len(len) {
            tracing::warn!(message = "cutting a half-written log batch failed", path = %path.display(), error = %cut);
        }
        return Err(io(path, e));
    }
    Ok(end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ports::Stream;

    fn chunk(s: &'static [u8]) -> OutputChunk {
        OutputChunk {
            stream: Stream::Stdout,
            bytes: Bytes::from_static(s),
        }
    }

    #[tokio::test]
    async fn appends_are_idempotent_by_offset() {
        let dir = tempfile::tempdir().unwrap();
        let sink = FileLogSink::new(dir.path());
        let id = RunId::new();
        assert_eq!(
            sink.append(id, 1, 0, &[chunk(b"hello "), chunk(b"wor")])
                .await
                .unwrap(),
            9
        );
        // A retried upload that overlaps what is stored adds only the new bytes.
        assert_eq!(
            sink.append(id, 1, 6, &[chunk(b"world\n")]).await.unwrap(),
            12
        );
        assert!(matches!(
            sink.append(id, 1, 20, &[chunk(b"x")]).await,
            Err(LogError::Gap {
                offset: 20,
                len: 12
            })
        ));
        assert_eq!(
            &sink.read(id, 1, 0, 100).await.unwrap()[..],
            b"hello world\n"
        );
        assert_eq!(&sink.read(id, 1, 6, 3).await.unwrap()[..], b"wor");
        assert!(sink.read(id, 2, 0, 10).await.unwrap().is_empty());
        // Past the end, even past what the kernel can seek to: nothing yet, not an error.
        assert!(sink.read(id, 1, 12, 10).await.unwrap().is_empty());
        assert!(sink.read(id, 1, u64::MAX, 10).await.unwrap().is_empty());
        assert!(
            sink.read(id, 1, 16_045_715_068_360_376_320, 10)
                .await
                .unwrap()
                .is_empty()
        );
    }

    #[tokio::test]
    async fn sync_makes_a_log_durable_and_is_a_no_op_without_output() {
        let dir = tempfile::tempdir().unwrap();
        let sink = FileLogSink::new(dir.path());
        let id = RunId::new();
        // An attempt that wrote nothing has no file to sync.
        sink.sync(id, 1).await.unwrap();
        sink.append(id, 1, 0, &[chunk(b"last words\n")])
            .await
            .unwrap();
        sink.sync(id, 1).await.unwrap();
        assert_eq!(
            &sink.read(id, 1, 0, 100).await.unwrap()[..],
            b"last words\n"
        );
        // A log that cannot be opened is an error, not a silent success.
        let blocked = FileLogSink::new(dir.path().join("not-a-dir"));
        std::fs::write(dir.path().join("not-a-dir"), b"").unwrap();
        assert!(matches!(blocked.sync(id, 1).await, Err(LogError::Io(_))));
    }

    #[tokio::test]
    async fn deleting_a_run_removes_every_attempts_log_and_only_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let sink = FileLogSink::new(dir.path());
        let (gone, kept) = (RunId::new(), RunId::new());
        sink.append(gone, 1, 0, &[chunk(b"one")]).await.unwrap();
        sink.append(gone, 2, 0, &[chunk(b"two")]).await.unwrap();
        sink.append(kept, 1, 0, &[chunk(b"stays")]).await.unwrap();

        assert!(sink.delete_run(gone).await.unwrap());
        assert!(!dir.path().join(gone.to_string()).exists());
        assert_eq!(sink.len(gone, 1).await.unwrap(), 0);
        assert_eq!(&sink.read(kept, 1, 0, 100).await.unwrap()[..], b"stays");
        // Nothing left to delete is not an error.
        assert!(!sink.delete_run(gone).await.unwrap());
        assert!(!sink.delete_run(RunId::new()).await.unwrap());
    }
}
