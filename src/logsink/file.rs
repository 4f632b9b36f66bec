use std::io::SeekFrom;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::domain::ports::{LogError, LogSink, OutputChunk};
use crate::domain::run::RunId;
use crate::keyed_lock::KeyedLocks;

/// Characters of a run id that name its log's directory. Run ids are ULIDs, whose first
/// ten characters are the creation time in milliseconds: six of them change every 2^20
/// ms, so one directory holds the runs of about 17.5 minutes.
const BUCKET_CHARS: usize = 6;
/// A run id's length: the earlier layout's directories are named by it.
const RUN_ID_CHARS: usize = 26;

/// Files at `{dir}/{bucket}/{run_id}.{attempt}.log`, the bucket being the run id's
/// first [`BUCKET_CHARS`] characters: a new attempt's log is one new file, not a
/// directory and a file (at hundreds of runs a second, creating inodes was a sixth of
/// `serve`'s CPU). Logs an earlier version left at `{dir}/{run_id}/{attempt}.log` are
/// still found, appended to and deleted.
///
/// Appends to one attempt's file are serialised by a per-file lock so the offset check
/// and the write are one step.
pub struct FileLogSink {
    dir: PathBuf,
    /// One per attempt's file.
    locks: KeyedLocks<(RunId, u32)>,
    /// The dir held logs in the earlier layout when the sink was made (this sink never
    /// writes any): only then is a missing file looked for there as well.
    legacy: bool,
}

fn io(path: &Path, e: std::io::Error) -> LogError {
    LogError::Io(format!("{}: {e}", path.display()))
}

fn not_found(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::NotFound
}

/// Whether `dir` holds a directory named like a run id: logs in the earlier layout.
fn holds_legacy_logs(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries
        .flatten()
        .any(|e| e.file_name().len() == RUN_ID_CHARS && e.file_type().is_ok_and(|t| t.is_dir()))
}

impl FileLogSink {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        let dir = dir.into();
        Self {
            legacy: holds_legacy_logs(&dir),
            dir,
            locks: KeyedLocks::default(),
        }
    }

    fn bucket(&self, id: &str) -> PathBuf {
        self.dir.join(id.get(..BUCKET_CHARS).unwrap_or(id))
    }

    /// Where the attempt's log is written.
    pub fn path(&self, run_id: RunId, attempt: u32) -> PathBuf {
        let id = run_id.to_string();
        self.bucket(&id).join(format!("{id}.{attempt}.log"))
    }

    fn legacy_path(&self, run_id: RunId, attempt: u32) -> PathBuf {
        self.dir
            .join(run_id.to_string())
            .join(format!("{attempt}.log"))
    }

    /// The attempt's log: at [`Self::path`], or where an earlier version wrote it (looked
    /// for off the runtime's threads, and only when the dir holds the earlier layout).
    async fn find(&self, run_id: RunId, attempt: u32) -> PathBuf {
        if !self.legacy {
            return self.path(run_id, attempt);
        }
        let (path, old) = (
            self.path(run_id, attempt),
            self.legacy_path(run_id, attempt),
        );
        tokio::task::spawn_blocking(move || {
            if !path.exists() && old.exists() {
                old
            } else {
                path
            }
        })
        .await
        .unwrap_or_else(|_| self.path(run_id, attempt))
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
        let old = self.legacy.then(|| self.legacy_path(run_id, attempt));
        let lock = self.locks.of((run_id, attempt));
        let _guard = lock.lock().await;
        // The whole batch in one blocking call: through tokio::fs every open, stat and
        // chunk written is a hop to the blocking pool and back, and at tens of MiB/s
        // those hops (not the copying) were most of `serve`'s CPU.
        let pieces: Vec<Bytes> = chunks.iter().map(|c| c.bytes.clone()).collect();
        tokio::task::spawn_blocking(move || {
            // An attempt an earlier version began writing goes on where it is.
            let path = match old {
                Some(old) if !path.exists() && old.exists() => old,
                _ => path,
            };
            append_blocking(&path, offset, &pieces)
        })
        .await
        .map_err(|e| LogError::Io(format!("log write task: {e}")))?
    }

    async fn sync(&self, run_id: RunId, attempt: u32) -> Result<(), LogError> {
        let path = self.find(run_id, attempt).await;
        let file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            // No output, no log: nothing to make durable.
            Err(e) if not_found(&e) => return Ok(()),
            Err(e) => return Err(io(&path, e)),
        };
        file.sync_all().await.map_err(|e| io(&path, e))?;
        // The file's directory entry too: a file nobody can find after a power cut is
        // no log at all.
        if let Some(parent) = path.parent() {
            let dir = tokio::fs::File::open(parent)
                .await
                .map_err(|e| io(parent, e))?;
            dir.sync_all().await.map_err(|e| io(parent, e))?;
        }
        Ok(())
    }

    async fn len(&self, run_id: RunId, attempt: u32) -> Result<u64, LogError> {
        let path = self.find(run_id, attempt).await;
        match tokio::fs::metadata(&path).await {
            Ok(m) => Ok(m.len()),
            Err(e) if not_found(&e) => Ok(0),
            Err(e) => Err(io(&path, e)),
        }
    }

    async fn delete_run(&self, run_id: RunId, attempts: u32) -> Result<bool, LogError> {
        let id = run_id.to_string();
        let bucket = self.bucket(&id);
        let old = self.legacy.then(|| self.dir.join(&id));
        tokio::task::spawn_blocking(move || {
            let mut deleted = false;
            // Attempts that wrote nothing have no file; a file is removed once, so a pass
            // that stopped half way leaves nothing it cannot finish.
            for attempt in 1..=attempts {
                let path = bucket.join(format!("{id}.{attempt}.log"));
                match std::fs::remove_file(&path) {
                    Ok(()) => deleted = true,
                    Err(e) if not_found(&e) => {}
                    Err(e) => return Err(io(&path, e)),
                }
            }
            if let Some(old) = old {
                match std::fs::remove_dir_all(&old) {
                    Ok(()) => deleted = true,
                    Err(e) if not_found(&e) => {}
                    Err(e) => return Err(io(&old, e)),
                }
            }
            // The bucket goes with its last log (a run of its time still kept, or retried
            // meanwhile, keeps it). An append that finds it gone makes it again.
            if deleted
                && let Err(e) = std::fs::remove_dir(&bucket)
                && !not_found(&e)
                && e.kind() != std::io::ErrorKind::DirectoryNotEmpty
            {
                tracing::debug!(message = "removing an emptied log directory failed", path = %bucket.display(), error = %e);
            }
            Ok(deleted)
        })
        .await
        .map_err(|e| LogError::Io(format!("log delete task: {e}")))?
    }

    async fn read(
        &self,
        run_id: RunId,
        attempt: u32,
        offset: u64,
        max: usize,
    ) -> Result<Bytes, LogError> {
        let path = self.find(run_id, attempt).await;
        let mut file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if not_found(&e) => return Ok(Bytes::new()),
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

/// The file opened for appending, made (with its directory) when it is not there yet.
fn open_for_append(path: &Path) -> Result<std::fs::File, LogError> {
    let open = || {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
    };
    // The directory is made only when the open says it is missing: one call for every
    // append but a bucket's first. Retention may remove a bucket it found empty between
    // the two, so that is tried again (a bucket is emptied once).
    let mut made = 0;
    loop {
        match open() {
            Ok(file) => return Ok(file),
            Err(e) if not_found(&e) && made < 3 => {
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
                }
                made += 1;
            }
            Err(e) => return Err(io(path, e)),
        }
    }
}

/// [`LogSink::append`] on the calling thread: `pieces` start at `offset` of the file.
fn append_blocking(path: &Path, offset: u64, pieces: &[Bytes]) -> Result<u64, LogError> {
    use std::io::Write;
    let mut file = open_for_append(path)?;
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
    use crate::logsink::suite;

    async fn open() -> (FileLogSink, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        (FileLogSink::new(dir.path().join("logs")), dir)
    }

    suite::log_sink_suite!(open);

    fn chunk(s: &'static [u8]) -> OutputChunk {
        OutputChunk {
            stream: Stream::Stdout,
            bytes: Bytes::from_static(s),
        }
    }

    #[tokio::test]
    async fn a_log_that_cannot_be_opened_fails_to_sync() {
        let dir = tempfile::tempdir().unwrap();
        let id = RunId::new();
        // A log that cannot be opened is an error, not a silent success.
        let blocked = FileLogSink::new(dir.path().join("not-a-dir"));
        std::fs::write(dir.path().join("not-a-dir"), b"").unwrap();
        assert!(matches!(blocked.sync(id, 1).await, Err(LogError::Io(_))));
    }

    /// A run id made at `ms` milliseconds since the epoch.
    fn made_at(ms: u64, n: u128) -> RunId {
        ulid::Ulid::from_parts(ms, n).to_string().parse().unwrap()
    }

    /// Runs `a` and `b` made a minute apart (one directory) and `c` 20 minutes later
    /// (a directory of its own), each with a log for attempt 1.
    async fn three_runs(sink: &FileLogSink) -> (RunId, RunId, RunId) {
        let t = 1_790_000_000_000;
        let runs = (
            made_at(t, 1),
            made_at(t + 60_000, 2),
            made_at(t + 1_200_000, 3),
        );
        for id in [runs.0, runs.1, runs.2] {
            sink.append(id, 1, 0, &[chunk(b"x")]).await.unwrap();
        }
        runs
    }

    #[tokio::test]
    async fn a_log_is_one_file_in_the_directory_of_its_runs_time() {
        let dir = tempfile::tempdir().unwrap();
        let sink = FileLogSink::new(dir.path());
        let (a, b, c) = three_runs(&sink).await;
        sink.append(a, 2, 0, &[chunk(b"second")]).await.unwrap();
        let a_id = a.to_string();
        let bucket = dir.path().join(&a_id[..BUCKET_CHARS]);
        let mut names: Vec<String> = std::fs::read_dir(&bucket)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        let mut want = vec![
            format!("{a_id}.1.log"),
            format!("{a_id}.2.log"),
            format!("{b}.1.log"),
        ];
        want.sort();
        assert_eq!(names, want);
        assert_eq!(sink.path(a, 2), bucket.join(format!("{a_id}.2.log")));
        assert!(sink.path(c, 1).exists());
        assert_ne!(sink.path(c, 1).parent(), Some(bucket.as_path()));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    #[tokio::test]
    async fn logs_in_the_earlier_layout_are_read_appended_to_and_deleted_where_they_are() {
        let dir = tempfile::tempdir().unwrap();
        let old = RunId::new();
        let old_dir = dir.path().join(old.to_string());
        std::fs::create_dir_all(&old_dir).unwrap();
        std::fs::write(old_dir.join("1.log"), b"before the upgrade\n").unwrap();

        let sink = FileLogSink::new(dir.path());
        assert_eq!(sink.len(old, 1).await.unwrap(), 19);
        assert_eq!(
            &sink.read(old, 1, 7, 100).await.unwrap()[..],
            b"the upgrade\n"
        );
        // The attempt goes on in its file; its next attempt is written in the new layout.
        assert_eq!(
            sink.append(old, 1, 19, &[chunk(b"after\n")]).await.unwrap(),
            25
        );
        sink.sync(old, 1).await.unwrap();
        assert_eq!(
            std::fs::read(old_dir.join("1.log")).unwrap(),
            b"before the upgrade\nafter\n"
        );
        sink.append(old, 2, 0, &[chunk(b"retried")]).await.unwrap();
        assert!(sink.path(old, 2).exists());
        assert!(!sink.path(old, 1).exists());

        assert!(sink.delete_run(old, 2).await.unwrap());
        assert!(!old_dir.exists());
        assert!(!sink.path(old, 2).exists());
        assert_eq!(sink.len(old, 1).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_bucket_goes_with_its_last_log() {
        let dir = tempfile::tempdir().unwrap();
        let sink = FileLogSink::new(dir.path());
        let (a, b, c) = three_runs(&sink).await;
        let bucket_of = |id: RunId| sink.path(id, 1).parent().unwrap().to_owned();
        sink.delete_run(a, 1).await.unwrap();
        assert!(!sink.path(a, 1).exists());
        // `b` still has its log: the bucket stays.
        assert!(bucket_of(a).exists());
        sink.delete_run(b, 1).await.unwrap();
        assert!(!bucket_of(a).exists(), "emptied");
        assert!(bucket_of(c).exists(), "another bucket");
        // A retried run of a removed bucket's time writes there again.
        sink.append(a, 2, 0, &[chunk(b"again")]).await.unwrap();
        assert_eq!(&sink.read(a, 2, 0, 10).await.unwrap()[..], b"again");
    }
}
