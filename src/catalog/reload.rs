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
use crate::domain::job::JobSpec;
use crate::domain::job_lookup::{JobLookup, ReloadJobs, ReloadSummary};

pub struct Reloadable {
    dirs: CatalogDirs,
    current: RwLock<Arc<Catalog>>,
    generation: AtomicU64,
    reloading: Mutex<()>,
}

impl Reloadable {
    /// Load the first set; an invalid one is an error (the process should not start).
    pub fn load(dirs: CatalogDirs) -> Result<Reloadable, CatalogErrors> {
        let catalog = Catalog::load(&dirs)?;
        Ok(Self::with(dirs, catalog))
    }

    /// Start from an already loaded set (which `reload` replaces from `dirs`).
    pub fn with(dirs: CatalogDirs, catalog: Catalog) -> Reloadable {
        Reloadable {
            dirs,
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
        let newer = Catalog::load(&self.dirs)?;
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
