//! Finding jobs by name: what the services need of the job catalog, whatever loaded it.

use std::sync::Arc;

use super::job::JobSpec;

pub trait JobLookup: Send + Sync + 'static {
    /// The job named `name`, if there is one.
    fn job(&self, name: &str) -> Option<Arc<JobSpec>>;
    /// Every job, sorted by name.
    fn jobs(&self) -> Vec<Arc<JobSpec>>;
}
