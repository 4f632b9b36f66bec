//! A catalog that can be swapped while the process runs (SIGHUP, `POST /v1/jobs/reload`).
//!
//! The running set sits in an `Arc` behind a std `RwLock`: readers hold the lock only
//! to clone the `Arc` (no I/O, no await under it), so contention is nil and no extra
//! crate (arc-swap) is needed. A reload reads and validates every file outside the
//! lock and swaps only a complete, valid set; a refused one leaves the running set as
//! it was. Reloads are serialized so each summary compares against the set it replaced.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use super::{Catalog, CatalogDirs, CatalogErrors};
use crate::domain::job::{ContainerPolicy, JobSpec};
use crate::domain::job_lookup::{JobLookup, ReloadJobs, ReloadSummary};

pub struct Reloadable {
    dirs: CatalogDirs,
    /// The server's, fixed for the life of the process: a reload reads job files only.
    policy: ContainerPolicy,
    current: RwLock<Arc<Catalog>>,
    generation: AtomicU64,
    reloading: Mutex<()>,
}

impl Reloadable {
    /// Load the first set; an invalid one is an error (the process should not start).
    pub fn load(dirs: CatalogDirs, policy: ContainerPolicy) -> Result<Reloadable, CatalogErrors> {
        let catalog = Catalog::load(&dirs, &policy)?;
        Ok(Self::with(dirs, policy, catalog))
    }

    /// Start from an already loaded set (which `reload` replaces from `dirs`).
    pub fn with(dirs: CatalogDirs, policy: ContainerPolicy, catalog: Catalog) -> Reloadable {
        Reloadable {
            dirs,
            policy,
            current: RwLock::new(Arc::new(catalog)),
            generation: AtomicU64::new(0),
            reloading: Mutex::new(()),
        }
    }

    pub fn dirs(&self) -> &CatalogDirs {
        &self.dirs
    }

    /// The running set.
    pub fn current(&self) -> Arc<Catalog> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Read every job and calendar file again; swap the new set in if it is valid.
    pub fn reload(&self) -> Result<ReloadSummary, CatalogErrors> {
        let _one_at_a_time = self
            .reloading
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let newer = Catalog::load(&self.dirs, &self.policy)?;
        let older = self.current();
        let mut summary = ReloadSummary {
            jobs: newer.len(),
            calendars: newer.calendars().len(),
            ..ReloadSummary::default()
        };
        for name in newer.names() {
            if older.get(name.as_str()).is_none() {
                summary.added.push(name.to_string());
            } else if older.changed(&newer, name) {
                summary.changed.push(name.to_string());
            }
        }
        summary.removed = older
            .names()
            .filter(|n| newer.get(n.as_str()).is_none())
            .map(ToString::to_string)
            .collect();
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(newer);
        summary.generation = if summary.is_unchanged() {
            self.generation.load(Ordering::SeqCst)
        } else {
            self.generation.fetch_add(1, Ordering::SeqCst) + 1
        };
        Ok(summary)
    }
}

impl JobLookup for Reloadable {
    fn job(&self, name: &str) -> Option<Arc<JobSpec>> {
        self.current().get(name)
    }

    fn jobs(&self) -> Vec<Arc<JobSpec>> {
        self.current().iter().cloned().collect()
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }
}

impl ReloadJobs for Reloadable {
    fn reload(&self) -> Result<ReloadSummary, CatalogErrors> {
        Reloadable::reload(self)
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::path::Path;

    use super::*;

    fn write(root: &Path, name: &str, text: &str) {
        fs::write(root.join(name), text).unwrap();
    }

    fn setup() -> (tempfile::TempDir, Reloadable) {
        let root = tempfile::tempdir().unwrap();
        fs::create_dir(root.path().join("jobs")).unwrap();
        fs::create_dir(root.path().join("calendars")).unwrap();
        write(root.path(), "calendars/jp.toml", "closed = [2026-01-01]\n");
        write(root.path(), "jobs/keep.toml", "image = \"a\"\n");
        write(root.path(), "jobs/edit.toml", "image = \"a\"\n");
        write(root.path(), "jobs/gone.toml", "image = \"a\"\n");
        write(
            root.path(),
            "jobs/cal.toml",
            "image = \"a\"\n[[schedules]]\nname = \"s\"\ncron = \"@daily\"\ncalendar = \"jp\"\n",
        );
        let r = Reloadable::load(
            CatalogDirs::new(root.path().join("jobs"), None),
            ContainerPolicy::default(),
        )
        .unwrap();
        (root, r)
    }

    #[test]
    fn a_reload_reports_added_changed_and_removed_jobs() {
        let (root, r) = setup();
        assert_eq!(r.generation(), 0);
        assert_eq!(r.jobs().len(), 4);

        let same = r.reload().unwrap();
        assert!(same.is_unchanged(), "{same:?}");
        assert_eq!((same.generation, r.generation()), (0, 0));

        write(root.path(), "jobs/edit.toml", "image = \"b\"\n");
        write(root.path(), "jobs/new.toml", "image = \"a\"\n");
        fs::remove_file(root.path().join("jobs/gone.toml")).unwrap();
        // A calendar a job uses counts as a change of that job.
        write(root.path(), "calendars/jp.toml", "closed = [2026-01-02]\n");
        let s = r.reload().unwrap();
        assert_eq!(s.added, ["new"]);
        assert_eq!(s.changed, ["cal", "edit"]);
        assert_eq!(s.removed, ["gone"]);
        assert_eq!((s.jobs, s.calendars, s.generation), (4, 1, 1));
        assert_eq!(r.generation(), 1);
        assert_eq!(r.job("edit").unwrap().image, "b");
        assert!(r.job("gone").is_none());
    }

    #[test]
    fn a_reload_keeps_to_the_servers_container_policy() {
        let root = tempfile::tempdir().unwrap();
        fs::create_dir(root.path().join("jobs")).unwrap();
        write(root.path(), "jobs/a.toml", "image = \"a\"\n");
        let policy = ContainerPolicy::new("64MiB", 32, &["NET_RAW".into()], &[]).unwrap();
        let r = Reloadable::load(CatalogDirs::new(root.path().join("jobs"), None), policy).unwrap();
        assert_eq!(r.job("a").unwrap().hardening.pids_limit, Some(32));

        write(
            root.path(),
            "jobs/a.toml",
            "image = \"a\"\ncapabilities = [\"NET_RAW\"]\n",
        );
        r.reload().unwrap();
        assert_eq!(r.job("a").unwrap().hardening.capabilities.len(), 1);
        write(
            root.path(),
            "jobs/a.toml",
            "image = \"a\"\ncapabilities = [\"SYS_ADMIN\"]\n",
        );
        let text = r.reload().unwrap_err().to_string();
        assert!(
            text.contains(
                "a.toml:2: capabilities: SYS_ADMIN is not in [containers] allowed_capabilities"
            ),
            "{text}"
        );
        assert_eq!(r.job("a").unwrap().hardening.capabilities.len(), 1);
        assert_eq!(r.job("a").unwrap().resources.memory_bytes, Some(64 << 20));
    }

    #[test]
    fn an_invalid_set_is_refused_and_the_running_one_stays() {
        let (root, r) = setup();
        write(root.path(), "jobs/edit.toml", "image = \"b\"\n");
        write(
            root.path(),
            "jobs/bad.toml",
            "image = \"a\"\nmax_concurrent = 0\n",
        );
        write(root.path(), "calendars/jp.toml", "include = [\"jp\"]\n");
        let errors = r.reload().unwrap_err();
        let text = errors.to_string();
        assert_eq!(errors.0.len(), 2, "{text}");
        assert!(
            text.contains("jp.toml:1: include[0]: include cycle: jp -> jp"),
            "{text}"
        );
        assert!(
            text.contains("bad.toml:2: max_concurrent: 0 is out of range"),
            "{text}"
        );
        assert_eq!(r.generation(), 0);
        assert_eq!(r.job("edit").unwrap().image, "a");
        assert!(r.job("bad").is_none());
        assert_eq!(r.current().calendars()["jp"].closed.len(), 1);
    }
}
