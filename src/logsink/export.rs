//! Output exported for a log collector (Fluentd, Vector, Promtail): every line a run
//! writes, as one JSON object per line, in a file per UTC day beside the stored logs.
//! The stored log stays the record; the export is a copy for the collector, written as
//! bytes are stored, never fsynced and never read back.
//!
//! `ExportingSink` wraps the sink that stores. It exports only the bytes an append
//! really stored (a resent range is skipped there, so it is not exported twice), split
//! into lines per attempt and stream. A line still open when the attempt's log is
//! synced (its end), or idle for `IDLE`, goes out marked `"partial": true`, and so does
//! a piece of a line longer than `MAX_LINE`. Open lines live in memory only: after a restart of `serve`
//! the rest of a line begun before it goes out as a line of its own.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, NaiveDate, Utc};
use serde::Serialize;

use crate::domain::ports::{LogError, LogSink, OutputChunk, Stream};
use crate::domain::run::RunId;
use crate::domain::store::RunRecords;

/// A line longer than this goes out in pieces, each marked partial but the last.
pub const MAX_LINE: usize = 64 * 1024;
const PREFIX: &str = "tasuki-output-";
const SUFFIX: &str = ".jsonl";

/// One exported line.
#[derive(Debug, Serialize)]
struct Line<'a> {
    time: String,
    run_id: RunId,
    job: &'a str,
    attempt: u32,
    stream: &'static str,
    line: String,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    partial: bool,
}

/// An attempt's lines not yet ended, per stream, and its job's name.
struct Open {
    job: String,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    /// When output last came: an attempt that ends without its log being synced (its
    /// worker vanished) is closed after `IDLE` with nothing new.
    touched: std::time::Instant,
}

impl Default for Open {
    fn default() -> Self {
        Self {
            job: String::new(),
            stdout: Vec::new(),
            stderr: Vec::new(),
            touched: std::time::Instant::now(),
        }
    }
}

/// An attempt with no output for this long whose log was never synced is closed (its
/// open lines go out partial), so attempts that ended elsewhere do not pile up.
const IDLE: Duration = Duration::from_secs(3600);

impl Open {
    fn of(&mut self, stream: Stream) -> &mut Vec<u8> {
        match stream {
            Stream::Stdout => &mut self.stdout,
            Stream::Stderr => &mut self.stderr,
        }
    }
}

/// The day's file, opened for appending.
struct DayFile {
    day: NaiveDate,
    file: std::fs::File,
}

pub struct ExportingSink {
    inner: Arc<dyn LogSink>,
    runs: Arc<dyn RunRecords>,
    dir: PathBuf,
    /// Files of days older than this are deleted when a new day's file is opened.
    keep: Duration,
    /// See `IDLE`.
    idle: Duration,
    /// When idle attempts were last looked for.
    swept: Mutex<std::time::Instant>,
    open: Mutex<HashMap<(RunId, u32), Open>>,
    out: Mutex<Option<DayFile>>,
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn io(what: &str, path: &Path, e: std::io::Error) -> LogError {
    LogError::Io(format!("{what} {}: {e}", path.display()))
}

impl ExportingSink {
    /// `runs` names each attempt's job (read once per attempt).
    pub fn new(
        inner: Arc<dyn LogSink>,
        runs: Arc<dyn RunRecords>,
        dir: impl Into<PathBuf>,
        keep: Duration,
    ) -> Self {
        Self {
            inner,
            runs,
            dir: dir.into(),
            keep,
            idle: IDLE,
            swept: Mutex::new(std::time::Instant::now()),
            open: Mutex::new(HashMap::new()),
            out: Mutex::new(None),
        }
    }

    fn path_of(&self, day: NaiveDate) -> PathBuf {
        self.dir
            .join(format!("{PREFIX}{}{SUFFIX}", day.format("%Y-%m-%d")))
    }

    /// The job of an attempt whose lines are not all out yet, read from the store the
    /// first time.
    async fn job_of(&self, run_id: RunId, attempt: u32) -> String {
        if let Some(open) = locked(&self.open).get(&(run_id, attempt)) {
            return open.job.clone();
        }
        let job = match self.runs.get_run(run_id).await {
            Ok(Some(run)) => run.job,
            Ok(None) => String::new(),
            Err(error) => {
                tracing::warn!(message = "exporting output without its job name", %run_id, %error);
                String::new()
            }
        };
        locked(&self.open)
            .entry((run_id, attempt))
            .or_insert_with(|| Open {
                job: job.clone(),
                ..Open::default()
            });
        job
    }

    /// The lines the newly stored `bytes` end, with what they leave open kept.
    fn lines(&self, run_id: RunId, attempt: u32, stored: &[OutputChunk]) -> Vec<String> {
        let now = Utc::now();
        let mut open = locked(&self.open);
        let mut out = Vec::new();
        {
            // Looked for at most once a minute (or once per `idle`, if shorter).
            let mut swept = locked(&self.swept);
            if swept.elapsed() >= self.idle.min(Duration::from_secs(60)) {
                *swept = std::time::Instant::now();
                out = close_idle(&mut open, now, self.idle);
            }
        }
        let entry = open.entry((run_id, attempt)).or_default();
        entry.touched = std::time::Instant::now();
        let job = entry.job.clone();
        for chunk in stored {
            let pending = entry.of(chunk.stream);
            for piece in chunk.bytes.split_inclusive(|b| *b == b'\n') {
                let mut rest = piece;
                while !rest.is_empty() {
                    let take = rest.len().min(MAX_LINE - pending.len());
                    pending.extend_from_slice(&rest[..take]);
                    rest = &rest[take..];
                    let ended = pending.last() == Some(&b'\n');
                    if ended || pending.len() >= MAX_LINE {
                        let text = take_line(pending, ended);
                        out.push(render(
                            now,
                            run_id,
                            &job,
                            attempt,
                            chunk.stream,
                            text,
                            !ended,
                        ));
                    }
                }
            }
        }
        out
    }

    /// What the attempt leaves open, now that its log is complete.
    fn close(&self, run_id: RunId, attempt: u32) -> Vec<String> {
        match locked(&self.open).remove(&(run_id, attempt)) {
            Some(open) => open_lines(open, run_id, attempt, Utc::now()),
            None => Vec::new(),
        }
    }

    /// Append rendered lines to today's file (opening it, and pruning old days, when
    /// the day changed).
    fn write(&self, lines: &[String]) -> Result<(), LogError> {
        if lines.is_empty() {
            return Ok(());
        }
        let today = Utc::now().date_naive();
        let mut out = locked(&self.out);
        if out.as_ref().is_none_or(|f| f.day != today) {
            std::fs::create_dir_all(&self.dir)
                .map_err(|e| io("creating the export directory", &self.dir, e))?;
            let path = self.path_of(today);
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| io("opening", &path, e))?;
            *out = Some(DayFile { day: today, file });
            self.prune(today);
        }
        let Some(day) = out.as_mut() else {
            return Ok(());
        };
        let mut text = lines.join("\n");
        text.push('\n');
        day.file
            .write_all(text.as_bytes())
            .map_err(|e| io("writing", &self.path_of(today), e))
    }

    /// Delete the files of days more than `keep` before `today`.
    fn prune(&self, today: NaiveDate) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let keep_days = i64::try_from(self.keep.as_secs() / 86_400).unwrap_or(i64::MAX);
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(day) = name
                .to_str()
                .and_then(|n| n.strip_prefix(PREFIX)?.strip_suffix(SUFFIX))
                .and_then(|d| NaiveDate::parse_from_str(d, "%Y-%m-%d").ok())
            else {
                continue;
            };
            if (today - day).num_days() > keep_days
                && let Err(error) = std::fs::remove_file(entry.path())
            {
                tracing::warn!(message = "removing an old export file failed", path = %entry.path().display(), %error);
            }
        }
    }

    /// Export, and say so if it failed: the stored log is what counts, so a failed
    /// export never fails the append.
    fn export(&self, lines: &[String]) {
        if let Err(error) = self.write(lines) {
            tracing::warn!(message = "exporting output for the collector failed", %error);
        }
    }
}

/// The lines an attempt left open, each marked partial.
fn open_lines(mut open: Open, run_id: RunId, attempt: u32, now: DateTime<Utc>) -> Vec<String> {
    let mut out = Vec::new();
    for stream in [Stream::Stdout, Stream::Stderr] {
        let job = open.job.clone();
        let pending = open.of(stream);
        if !pending.is_empty() {
            let text = take_line(pending, false);
            out.push(render(now, run_id, &job, attempt, stream, text, true));
        }
    }
    out
}

/// Close the attempts idle for longer than `idle`: their open lines, and the entries.
fn close_idle(
    open: &mut HashMap<(RunId, u32), Open>,
    now: DateTime<Utc>,
    idle: Duration,
) -> Vec<String> {
    let stale: Vec<(RunId, u32)> = open
        .iter()
        .filter(|(_, o)| o.touched.elapsed() > idle)
        .map(|(key, _)| *key)
        .collect();
    let mut out = Vec::new();
    for (run_id, attempt) in stale {
        if let Some(entry) = open.remove(&(run_id, attempt)) {
            out.extend(open_lines(entry, run_id, attempt, now));
        }
    }
    out
}

/// The pending bytes as a line's text (without its newline), leaving nothing pending.
fn take_line(pending: &mut Vec<u8>, ended: bool) -> String {
    let bytes = std::mem::take(pending);
    let body = if ended {
        &bytes[..bytes.len() - 1]
    } else {
        &bytes[..]
    };
    String::from_utf8_lossy(body).into_owned()
}

fn render(
    now: DateTime<Utc>,
    run_id: RunId,
    job: &str,
    attempt: u32,
    stream: Stream,
    line: String,
    partial: bool,
) -> String {
    let line = Line {
        time: now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        run_id,
        job,
        attempt,
        stream: match stream {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        },
        line,
        partial,
    };
    // A struct of strings and numbers always serializes.
    serde_json::to_string(&line).unwrap_or_default()
}

/// The part of `chunks` (whose first byte sits at `offset`) from byte `from` of the log
/// to byte `to`: what an append really stored.
fn stored_part(chunks: &[OutputChunk], offset: u64, from: u64, to: u64) -> Vec<OutputChunk> {
    let mut out = Vec::new();
    let mut at = offset;
    for chunk in chunks {
        let len = chunk.bytes.len() as u64;
        let (start, end) = (at.max(from), (at + len).min(to));
        if start < end {
            let bytes = chunk
                .bytes
                .slice((start - at) as usize..(end - at) as usize);
            out.push(OutputChunk {
                stream: chunk.stream,
                bytes,
            });
        }
        at += len;
    }
    out
}

#[async_trait]
impl LogSink for ExportingSink {
    async fn append(
        &self,
        run_id: RunId,
        attempt: u32,
        offset: u64,
        chunks: &[OutputChunk],
    ) -> Result<u64, LogError> {
        // Appends of one attempt come one at a time (the control plane's attempt lock),
        // so nothing changes the length between the two reads.
        let before = self.inner.len(run_id, attempt).await?;
        let after = self.inner.append(run_id, attempt, offset, chunks).await?;
        let stored = stored_part(chunks, offset, before.max(offset), after);
        if !stored.is_empty() {
            self.job_of(run_id, attempt).await;
            let lines = self.lines(run_id, attempt, &stored);
            self.export(&lines);
        }
        Ok(after)
    }

    async fn sync(&self, run_id: RunId, attempt: u32) -> Result<(), LogError> {
        let synced = self.inner.sync(run_id, attempt).await;
        let lines = self.close(run_id, attempt);
        self.export(&lines);
        synced
    }

    async fn len(&self, run_id: RunId, attempt: u32) -> Result<u64, LogError> {
        self.inner.len(run_id, attempt).await
    }

    async fn delete_run(&self, run_id: RunId, attempts: u32) -> Result<bool, LogError> {
        self.inner.delete_run(run_id, attempts).await
    }

    async fn read(
        &self,
        run_id: RunId,
        attempt: u32,
        offset: u64,
        max: usize,
    ) -> Result<Bytes, LogError> {
        self.inner.read(run_id, attempt, offset, max).await
    }
}

#[cfg(test)]
#[path = "export_tests.rs"]
mod tests;
