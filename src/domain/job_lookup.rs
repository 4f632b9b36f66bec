//! Finding jobs by name: what the services need of the job catalog, whatever loaded it;
//! and reloading it, with the problems a refused reload names.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use super::job::JobSpec;

pub trait JobLookup: Send + Sync + 'static {
    /// The job named `name`, if there is one.
    fn job(&self, name: &str) -> Option<Arc<JobSpec>>;
    /// Every job, sorted by name.
    fn jobs(&self) -> Vec<Arc<JobSpec>>;
    /// Goes up by one each time a reload changes the set of jobs (a job added, changed
    /// or removed), so a scheduler can tell cheaply that it must look again. A catalog
    /// that never reloads stays at 0.
    fn generation(&self) -> u64 {
        0
    }
}

/// Re-reading the job (and calendar) files while the process runs.
pub trait ReloadJobs: Send + Sync + 'static {
    /// Read every file again and swap the new set in. An invalid set is refused with
    /// all its problems, and the running set stays.
    fn reload(&self) -> Result<ReloadSummary, CatalogErrors>;
}

/// What a successful reload changed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReloadSummary {
    /// The lookup's generation after the reload (unchanged when nothing changed).
    pub generation: u64,
    /// Jobs and calendars in the new set.
    pub jobs: usize,
    pub calendars: usize,
    /// Job names, sorted.
    pub added: Vec<String>,
    /// Jobs whose file, or a calendar one of its schedules uses, changed.
    pub changed: Vec<String>,
    pub removed: Vec<String>,
}

impl ReloadSummary {
    pub fn is_unchanged(&self) -> bool {
        self.added.is_empty() && self.changed.is_empty() && self.removed.is_empty()
    }
}

/// One problem in one job or calendar file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogError {
    pub file: PathBuf,
    /// 1-based.
    pub line: Option<usize>,
    /// Dotted path, e.g. `resources.memory`, `env.FOO`, `schedules[0].calendar`.
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for CatalogError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        f.write_str(": ")?;
        if let Some(field) = &self.field {
            write!(f, "{field}: ")?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for CatalogError {}

/// Every problem found while loading a catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogErrors(pub Vec<CatalogError>);

impl fmt::Display for CatalogErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for CatalogErrors {}
