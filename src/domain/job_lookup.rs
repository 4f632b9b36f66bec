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

/// One error a line, whatever the file held: `file:line: field: message`, control
/// characters (a `\r` in a key, a newline in a quoted name) written as escapes.
impl fmt::Display for CatalogError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        one_line(f, &self.file.display().to_string())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        f.write_str(": ")?;
        if let Some(field) = &self.field {
            one_line(f, field)?;
            f.write_str(": ")?;
        }
        one_line(f, &self.message)
    }
}

fn one_line(f: &mut fmt::Formatter<'_>, text: &str) -> fmt::Result {
    for c in text.chars() {
        if c.is_control() {
            write!(f, "{}", c.escape_default())?;
        } else {
            fmt::Write::write_char(f, c)?;
        }
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by `fuzz/fuzz_targets/job_file.rs`: the line `netwo\rk` gave the field
    /// `netwo\rk`, and `jobs check` printed the error over two lines.
    #[test]
    fn fuzz_a_carriage_return_in_a_key_split_the_error_line() {
        let e = CatalogError {
            file: PathBuf::from("jobs/job.toml"),
            line: Some(4),
            field: Some("netwo\rk".to_owned()),
            message: "key with no value, expected `=`".to_owned(),
        };
        assert_eq!(
            e.to_string(),
            "jobs/job.toml:4: netwo\\rk: key with no value, expected `=`"
        );
        let e = CatalogError {
            file: PathBuf::from("jobs/a\nb.toml"),
            line: None,
            field: Some("env.A\nB".to_owned()),
            message: "declared: a\tb, c".to_owned(),
        };
        assert_eq!(
            e.to_string(),
            "jobs/a\\nb.toml: env.A\\nB: declared: a\\tb, c"
        );
    }
}
