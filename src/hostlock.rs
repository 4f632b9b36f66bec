//! One live process per worker id on a host: an advisory lock on a file named after the
//! id. The kernel drops the lock when its holder dies, however it dies, so a restart
//! after a crash gets it at once while a second live process does not.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Where lock files go when no directory is given: `/run/lock` (shared by every service
/// on the host, unlike a private /tmp), else the temp directory.
pub fn default_lock_dir() -> PathBuf {
    let run_lock = Path::new("/run/lock");
    if run_lock.is_dir() {
        run_lock.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HostLockError {
    #[error(
        "worker id `{worker_id}` is in use by another live process on this host ({holder}); lock file {}",
        .path.display()
    )]
    Held {
        worker_id: String,
        holder: String,
        path: PathBuf,
    },
    #[error("lock file {}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Held for as long as the value lives (the process, in practice).
#[derive(Debug)]
pub struct HostLock {
    _file: File,
    path: PathBuf,
    released_by: Option<String>,
}

impl HostLock {
    /// Take the lock for `worker_id` in `dir` for process instance `instance`, and write
    /// who holds it into the file (`pid P, instance I, since T`).
    pub fn acquire(dir: &Path, worker_id: &str, instance: &str) -> Result<HostLock, HostLockError> {
        let holder = format!(
            "pid {}, instance {instance}, since {}",
            std::process::id(),
            chrono::Utc::now().to_rfc3339()
        );
        Self::acquire_as(dir, worker_id, &holder)
    }

    fn acquire_as(dir: &Path, worker_id: &str, holder: &str) -> Result<HostLock, HostLockError> {
        let path = dir.join(format!("tasuki-worker-{}.lock", file_safe(worker_id)));
        let io = |source| HostLockError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                let holder = text.trim();
                return Err(HostLockError::Held {
                    worker_id: worker_id.to_owned(),
                    holder: if holder.is_empty() {
                        "holder unknown".to_owned()
                    } else {
                        holder.to_owned()
                    },
                    path,
                });
            }
            Err(TryLockError::Error(source)) => return Err(io(source)),
        }
        // Whoever held it before is dead: the kernel let go of its lock.
        let mut before = String::new();
        let _ = file.read_to_string(&mut before);
        let released_by = instance_of(&before);
        file.set_len(0).map_err(io)?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        file.write_all(format!("{holder}\n").as_bytes())
            .map_err(io)?;
        file.sync_data().map_err(io)?;
        Ok(HostLock {
            _file: file,
            path,
            released_by,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The process instance that held this lock before (and has died since).
    pub fn released_by(&self) -> Option<&str> {
        self.released_by.as_deref()
    }
}

/// The instance named in a lock file's `pid P, instance I, since T`.
fn instance_of(holder: &str) -> Option<String> {
    holder
        .split(", ")
        .find_map(|part| part.trim().strip_prefix("instance "))
        .filter(|i| !i.is_empty())
        .map(str::to_owned)
}

/// A worker id as a file name: anything but `[A-Za-z0-9._-]` becomes `_`, plus a short
/// hash so two ids that differ only in such characters never share a lock.
fn file_safe(id: &str) -> String {
    let clean: String = id
        .chars()
        .enumerate()
        .map(|(i, c)| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '-') || (c == '.' && i > 0) {
                c
            } else {
                '_'
            }
        })
        .collect();
    if clean == id {
        return clean;
    }
    // FNV-1a: stable across builds, unlike std's hasher.
    let hash = id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{clean}-{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_identity_until_it_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let first = HostLock::acquire(dir.path(), "w1", "inst-a").unwrap();
        assert_eq!(first.released_by(), None);
        let err = HostLock::acquire(dir.path(), "w1", "inst-b").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("`w1`"), "{text}");
        assert!(
            text.contains(&format!(
                "pid {}, instance inst-a, since ",
                std::process::id()
            )),
            "{text}"
        );
        // Another id is independent.
        let _other = HostLock::acquire(dir.path(), "w2", "inst-c").unwrap();
        drop(first);
        let again = HostLock::acquire(dir.path(), "w1", "inst-d").unwrap();
        assert_eq!(again.released_by(), Some("inst-a"));
        let written = std::fs::read_to_string(again.path()).unwrap();
        assert!(written.contains("instance inst-d, since "), "{written}");
    }

    #[test]
    fn the_previous_instance_is_read_from_what_the_holder_wrote() {
        assert_eq!(
            instance_of("pid 1, instance 01abc, since 2026-01-01T00:00:00+00:00\n"),
            Some("01abc".to_owned())
        );
        assert_eq!(instance_of(""), None);
        assert_eq!(instance_of("garbage"), None);
    }

    #[test]
    fn ids_become_safe_distinct_file_names() {
        assert_eq!(file_safe("host-1.a_b"), "host-1.a_b");
        assert_ne!(file_safe("a/b"), file_safe("a:b"));
        assert!(!file_safe("../x").contains('/'));
        assert!(!file_safe("..").starts_with(".."));
    }
}
