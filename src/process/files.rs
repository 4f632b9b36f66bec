//! The open-files limit of `serve`: each held client (`?wait`, a log follow) keeps a
//! connection, so the usual soft limit of 1024 would refuse connections long before
//! memory or CPU run short. The soft limit is raised to the hard one at start, as Go's
//! runtime and many servers do; raising the hard limit stays the operator's choice.

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// The soft open-files limit after raising it to the hard one (`None`: unlimited).
pub fn raise_open_files_limit() -> Result<Option<u64>, rustix::io::Errno> {
    let limit = getrlimit(Resource::Nofile);
    if limit.current == limit.maximum {
        return Ok(limit.current);
    }
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        },
    )?;
    Ok(limit.maximum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_reaches_the_hard_one() {
        let raised = raise_open_files_limit().expect("raising to the hard limit is allowed");
        let now = getrlimit(Resource::Nofile);
        assert_eq!(now.current, raised);
        assert_eq!(now.current, now.maximum);
    }
}
