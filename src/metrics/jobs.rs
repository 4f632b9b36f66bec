//! The `job_name` label: only names the catalog knows, and at most [`MAX_JOB_NAMES`]
//! distinct ones per process; anything else is [`OTHER_JOBS`]. A series lives as long
//! as the process, so an unbounded label would grow memory and Prometheus without end.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use crate::domain::job_lookup::JobLookup;

/// Distinct job names a process labels before the rest go to [`OTHER_JOBS`].
pub const MAX_JOB_NAMES: usize = 1000;

/// The label of a job the catalog does not know (removed since, say) or past the cap.
/// Job names start with a letter or digit, so no job is called this.
pub const OTHER_JOBS: &str = "_other";

pub struct JobNames {
    jobs: Arc<dyn JobLookup>,
    cap: usize,
    seen: Mutex<HashSet<String>>,
}

impl JobNames {
    pub fn new(jobs: Arc<dyn JobLookup>, cap: usize) -> JobNames {
        JobNames {
            jobs,
            cap,
            seen: Mutex::default(),
        }
    }

    /// The label for `job`: itself if the catalog knows it and it is labelled already
    /// or there is room, else [`OTHER_JOBS`].
    pub fn label(&self, job: &str) -> String {
        if self.jobs.job(job).is_none() {
            return OTHER_JOBS.to_owned();
        }
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.contains(job) {
            return job.to_owned();
        }
        if seen.len() >= self.cap {
            return OTHER_JOBS.to_owned();
        }
        seen.insert(job.to_owned());
        job.to_owned()
    }
}
