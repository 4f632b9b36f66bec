//! Container hardening: what a job's containers may loosen (`Hardening`), and the
//! server's `ContainerPolicy` that says how far, with the rules no policy can lift.
//!
//! Every container is created with all capabilities dropped, `no-new-privileges`, a
//! pids and a memory limit, unprivileged, in its own PID and IPC namespaces. A job adds
//! back only what its file lists and the policy allows; the catalog checks it at load,
//! so a run's frozen spec already holds the limits it runs with.

use std::collections::BTreeSet;
use std::fmt;

use super::units::{InvalidSize, parse_size};

/// Processes (and threads) one container may have when the server sets no other limit.
pub const DEFAULT_PIDS_LIMIT: u32 = 512;
/// Memory limit of a job that sets none, when the server sets no other default.
pub const DEFAULT_MEMORY: u64 = 512 << 20;
/// The fewest processes a container can run with: its init and the command.
pub const MIN_PIDS_LIMIT: u32 = 2;

/// Every Linux capability (kernel 5.9 and later), by its name without `CAP_`.
const CAPABILITIES: &[&str] = &[
    "AUDIT_CONTROL",
    "AUDIT_READ",
    "AUDIT_WRITE",
    "BLOCK_SUSPEND",
    "BPF",
    "CHECKPOINT_RESTORE",
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "IPC_LOCK",
    "IPC_OWNER",
    "KILL",
    "LEASE",
    "LINUX_IMMUTABLE",
    "MAC_ADMIN",
    "MAC_OVERRIDE",
    "MKNOD",
    "NET_ADMIN",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_RAW",
    "PERFMON",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYSLOG",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_CHROOT",
    "SYS_MODULE",
    "SYS_NICE",
    "SYS_PACCT",
    "SYS_PTRACE",
    "SYS_RAWIO",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "WAKE_ALARM",
];

/// Where the Docker socket lives on a host; a mount that holds it hands out the engine.
const DOCKER_SOCKETS: &[&str] = &["/run/docker.sock", "/var/run/docker.sock"];

/// Container paths that belong to the kernel and the runtime; nothing is mounted there.
const KERNEL_PATHS: &[&str] = &["/proc", "/sys", "/dev"];

/// Where a read-only root gets its writable tmpfs.
pub const READ_ONLY_TMP: &str = "/tmp";

/// A Linux capability, named as in `capabilities(7)` without the `CAP_` prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Capability(&'static str);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidCapability {
    #[error("\"ALL\" cannot be added back; list each capability the job needs")]
    All,
    #[error("{0:?} is not a Linux capability (e.g. \"NET_BIND_SERVICE\", \"CHOWN\")")]
    Unknown(String),
}

impl Capability {
    /// `NET_RAW`, `net_raw` and `CAP_NET_RAW` are the same capability.
    pub fn parse(name: &str) -> Result<Capability, InvalidCapability> {
        let upper = name.trim().to_ascii_uppercase();
        let bare = upper.strip_prefix("CAP_").unwrap_or(&upper);
        if bare == "ALL" {
            return Err(InvalidCapability::All);
        }
        CAPABILITIES
            .iter()
            .find(|c| **c == bare)
            .map(|c| Capability(c))
            .ok_or_else(|| InvalidCapability::Unknown(name.to_owned()))
    }

    pub fn as_str(self) -> &'static str {
        self.0
    }

    /// The kernel's name, as Docker's `CapAdd` takes it.
    pub fn kernel_name(self) -> String {
        format!("CAP_{}", self.0)
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

/// A host directory or file bind-mounted into the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindMount {
    /// Normalised, symlinks resolved at load: the path that was checked.
    pub source: String,
    pub target: String,
    pub read_only: bool,
}

/// What a job's containers get beyond the defaults every container has.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Hardening {
    /// Added back after every capability is dropped.
    pub capabilities: Vec<Capability>,
    /// Set for every job loaded from a file; `None` only in a spec stored before tasuki
    /// set one, which then runs with [`DEFAULT_PIDS_LIMIT`].
    pub pids_limit: Option<u32>,
    /// Read-only root file system, with a tmpfs on [`READ_ONLY_TMP`].
    pub read_only: bool,
    pub mounts: Vec<BindMount>,
}

/// Why a job (or a server setting) asks for more than may be given; says which rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refusal(pub String);

fn refuse(message: impl Into<String>) -> Refusal {
    Refusal(message.into())
}

/// A `[containers]` setting of the server config that cannot be used; names the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("default_memory: {0}")]
    DefaultMemory(InvalidSize),
    #[error("pids_limit: {0} is below {MIN_PIDS_LIMIT} (the init process and the command)")]
    PidsLimit(u32),
    #[error("allowed_capabilities: {0}")]
    Capability(InvalidCapability),
    #[error("allowed_mounts: {0}")]
    Mount(Refusal),
}

/// The server's `[containers]` policy: defaults, and how far a job may loosen them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerPolicy {
    default_memory: u64,
    pids_limit: u32,
    allowed_capabilities: BTreeSet<Capability>,
    allowed_mounts: Vec<String>,
}

impl Default for ContainerPolicy {
    fn default() -> Self {
        ContainerPolicy {
            default_memory: DEFAULT_MEMORY,
            pids_limit: DEFAULT_PIDS_LIMIT,
            allowed_capabilities: BTreeSet::new(),
            allowed_mounts: Vec::new(),
        }
    }
}

impl ContainerPolicy {
    pub fn new(
        default_memory: &str,
        pids_limit: u32,
        allowed_capabilities: &[String],
        allowed_mounts: &[String],
    ) -> Result<ContainerPolicy, PolicyError> {
        let default_memory = parse_size(default_memory).map_err(PolicyError::DefaultMemory)?;
        if pids_limit < MIN_PIDS_LIMIT {
            return Err(PolicyError::PidsLimit(pids_limit));
        }
        let allowed_capabilities = allowed_capabilities
            .iter()
            .map(|c| Capability::parse(c))
            .collect::<Result<_, _>>()
            .map_err(PolicyError::Capability)?;
        let mut mounts = Vec::new();
        for root in allowed_mounts {
            let path = normalize_path(root).map_err(PolicyError::Mount)?;
            if path == "/" {
                return Err(PolicyError::Mount(refuse(
                    "\"/\" would allow every host path; name the directories jobs may mount",
                )));
            }
            mounts.push(path);
        }
        Ok(ContainerPolicy {
            default_memory,
            pids_limit,
            allowed_capabilities,
            allowed_mounts: mounts,
        })
    }

    pub fn default_memory(&self) -> u64 {
        self.default_memory
    }

    pub fn pids_limit(&self) -> u32 {
        self.pids_limit
    }

    pub fn allowed_mounts(&self) -> &[String] {
        &self.allowed_mounts
    }

    /// A job's pids limit: what it asks for, if not above the server's; else the server's.
    pub fn pids_limit_for(&self, asked: Option<i64>) -> Result<u32, Refusal> {
        let Some(asked) = asked else {
            return Ok(self.pids_limit);
        };
        if asked < i64::from(MIN_PIDS_LIMIT) {
            return Err(refuse(format!(
                "{asked} is below {MIN_PIDS_LIMIT} (the init process and the command)"
            )));
        }
        match u32::try_from(asked) {
            Ok(n) if n <= self.pids_limit => Ok(n),
            _ => Err(refuse(format!(
                "{asked} is above [containers] pids_limit ({}); a job may only ask for fewer",
                self.pids_limit
            ))),
        }
    }

    pub fn check_capability(&self, capability: Capability) -> Result<(), Refusal> {
        if self.allowed_capabilities.contains(&capability) {
            return Ok(());
        }
        let allowed: Vec<&str> = self.allowed_capabilities.iter().map(|c| c.0).collect();
        let allowed = if allowed.is_empty() {
            "none".to_owned()
        } else {
            allowed.join(", ")
        };
        Err(refuse(format!(
            "{capability} is not in [containers] allowed_capabilities (allowed: {allowed})"
        )))
    }

    /// A bind mount's host path: normalised, `..` refused, then resolved by `resolve`
    /// (the host's view, symlinks followed), which must lie under an allowed mount path
    /// (itself resolved the same way) and must not hold the Docker socket. Returns the
    /// resolved path, which is what gets mounted.
    pub fn check_mount_source(
        &self,
        source: &str,
        resolve: impl Fn(&str) -> Result<String, String>,
    ) -> Result<String, Refusal> {
        let written = normalize_path(source)?;
        let allowed = if self.allowed_mounts.is_empty() {
            "none".to_owned()
        } else {
            self.allowed_mounts.join(", ")
        };
        let not_under = |path: &str| {
            refuse(format!(
                "{path} is not under an allowed mount path ([containers] allowed_mounts: {allowed})"
            ))
        };
        let roots: Vec<String> = self
            .allowed_mounts
            .iter()
            .map(|root| resolve(root).unwrap_or_else(|_| root.clone()))
            .collect();
        let under_a_root = |path: &str| roots.iter().any(|r| is_under(path, r));
        if !under_a_root(&written) && !self.allowed_mounts.iter().any(|r| is_under(&written, r)) {
            return Err(not_under(&written));
        }
        let resolved = resolve(&written).map_err(|e| refuse(format!("{written}: {e}")))?;
        if !under_a_root(&resolved) {
            return Err(refuse(format!(
                "{written} resolves to {resolved} (through a symlink), which is not under an \
                 allowed mount path ([containers] allowed_mounts: {allowed})"
            )));
        }
        for path in [&written, &resolved] {
            if DOCKER_SOCKETS.iter().any(|s| is_under(s, path)) {
                return Err(refuse(format!(
                    "{path} is or holds the Docker socket, which is never mounted"
                )));
            }
        }
        Ok(resolved)
    }
}

/// The network modes no policy allows: they share a namespace the container must not.
pub fn check_network(mode: &str) -> Result<(), Refusal> {
    if mode == "host" {
        Err(refuse(
            "\"host\" is never allowed (the container would share the host's network)",
        ))
    } else if mode.starts_with("container:") {
        Err(refuse(format!(
            "{mode:?} is never allowed (the container would share another container's network)"
        )))
    } else {
        Ok(())
    }
}

/// A bind mount's path in the container: absolute, normalised, not the root nor the
/// kernel's file systems, nor the tmpfs of a read-only root.
pub fn check_mount_target(target: &str, read_only_root: bool) -> Result<String, Refusal> {
    let path = normalize_path(target)?;
    if path == "/" {
        return Err(refuse("\"/\" is the container's root; mount below it"));
    }
    if let Some(kernel) = KERNEL_PATHS.iter().find(|k| is_under(&path, k)) {
        return Err(refuse(format!(
            "{path} is under {kernel}, which belongs to the kernel; nothing is mounted there"
        )));
    }
    if read_only_root && path == READ_ONLY_TMP {
        return Err(refuse(format!(
            "{path} is where a read-only root gets its tmpfs; mount elsewhere"
        )));
    }
    Ok(path)
}

/// An absolute path with `.`, empty parts and a trailing `/` removed; `..` is refused
/// rather than collapsed, so no path means something other than it reads.
pub fn normalize_path(path: &str) -> Result<String, Refusal> {
    if !path.starts_with('/') {
        return Err(refuse(format!("{path:?} must be an absolute path")));
    }
    if path.contains('\0') {
        return Err(refuse(format!("{path:?} contains a NUL character")));
    }
    let mut parts = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                return Err(refuse(format!(
                    "{path:?} contains \"..\"; write the path without it"
                )));
            }
            part => parts.push(part),
        }
    }
    Ok(format!("/{}", parts.join("/")))
}

/// `path` is `root` or inside it, comparing whole components.
fn is_under(path: &str, root: &str) -> bool {
    root == "/"
        || path == root
        || path
            .strip_prefix(root)
            .is_some_and(|rest| rest.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(caps: &[&str], mounts: &[&str]) -> ContainerPolicy {
        let caps: Vec<String> = caps.iter().map(|c| (*c).to_owned()).collect();
        let mounts: Vec<String> = mounts.iter().map(|m| (*m).to_owned()).collect();
        ContainerPolicy::new("256MiB", 100, &caps, &mounts).unwrap()
    }

    /// A host where `/srv/data/link` points at `/etc` and `/data` at `/srv/data`.
    fn host(path: &str) -> Result<String, String> {
        let resolved = if let Some(rest) = path.strip_prefix("/srv/data/link") {
            format!("/etc{rest}")
        } else if let Some(rest) = path.strip_prefix("/data") {
            format!("/srv/data{rest}")
        } else {
            path.to_owned()
        };
        if resolved.contains("missing") {
            Err("No such file or directory".to_owned())
        } else {
            Ok(resolved)
        }
    }

    #[test]
    fn capabilities_parse_in_every_spelling() {
        for name in ["NET_RAW", "net_raw", "CAP_NET_RAW", " cap_net_raw "] {
            let c = Capability::parse(name).unwrap();
            assert_eq!(c.as_str(), "NET_RAW");
            assert_eq!(c.kernel_name(), "CAP_NET_RAW");
        }
        assert_eq!(Capability::parse("ALL"), Err(InvalidCapability::All));
        assert_eq!(Capability::parse("cap_all"), Err(InvalidCapability::All));
        let e = Capability::parse("NET_RAWR").unwrap_err();
        assert!(
            e.to_string()
                .contains("\"NET_RAWR\" is not a Linux capability")
        );
        assert!(
            CAPABILITIES.windows(2).all(|w| w[0] < w[1]),
            "sorted, unique"
        );
    }

    #[test]
    fn the_policy_is_built_from_the_config_values() {
        let d = ContainerPolicy::default();
        assert_eq!(
            ContainerPolicy::new("512MiB", 512, &[], &[]).unwrap(),
            d,
            "the config's defaults are the built-in ones"
        );
        assert_eq!(d.default_memory(), 512 << 20);
        assert_eq!(d.pids_limit(), 512);

        let e = ContainerPolicy::new("lots", 512, &[], &[]).unwrap_err();
        assert!(
            e.to_string().starts_with("default_memory: invalid size"),
            "{e}"
        );
        let e = ContainerPolicy::new("1GiB", 1, &[], &[]).unwrap_err();
        assert!(e.to_string().starts_with("pids_limit: 1 is below 2"), "{e}");
        let e = ContainerPolicy::new("1GiB", 9, &["ALL".into()], &[]).unwrap_err();
        assert!(e.to_string().starts_with("allowed_capabilities: "), "{e}");
        for (root, want) in [
            ("srv", "must be an absolute path"),
            ("/srv/../etc", "contains \"..\""),
            ("//", "would allow every host path"),
        ] {
            let e = ContainerPolicy::new("1GiB", 9, &[], &[root.into()]).unwrap_err();
            assert!(e.to_string().starts_with("allowed_mounts: "), "{e}");
            assert!(e.to_string().contains(want), "{e}");
        }
        let p = policy(&[], &["/srv/data/", "/srv//cache/."]);
        assert_eq!(p.allowed_mounts(), ["/srv/data", "/srv/cache"]);
    }

    #[test]
    fn a_job_gets_only_the_capabilities_the_server_allows() {
        let p = policy(&["net_bind_service"], &[]);
        let bind = Capability::parse("NET_BIND_SERVICE").unwrap();
        let admin = Capability::parse("SYS_ADMIN").unwrap();
        assert_eq!(p.check_capability(bind), Ok(()));
        assert_eq!(
            p.check_capability(admin).unwrap_err().to_string(),
            "SYS_ADMIN is not in [containers] allowed_capabilities (allowed: NET_BIND_SERVICE)"
        );
        let none = ContainerPolicy::default()
            .check_capability(bind)
            .unwrap_err();
        assert!(none.to_string().ends_with("(allowed: none)"), "{none}");
    }

    #[test]
    fn a_job_may_only_lower_the_pids_limit() {
        let p = policy(&[], &[]);
        assert_eq!(p.pids_limit_for(None), Ok(100));
        assert_eq!(p.pids_limit_for(Some(64)), Ok(64));
        assert_eq!(p.pids_limit_for(Some(100)), Ok(100));
        assert_eq!(p.pids_limit_for(Some(2)), Ok(2));
        let e = p.pids_limit_for(Some(101)).unwrap_err().to_string();
        assert_eq!(
            e,
            "101 is above [containers] pids_limit (100); a job may only ask for fewer"
        );
        for low in [1, 0, -1] {
            let e = p.pids_limit_for(Some(low)).unwrap_err().to_string();
            assert!(e.contains("is below 2"), "{e}");
        }
        assert!(p.pids_limit_for(Some(i64::MAX)).is_err());
    }

    #[test]
    fn host_and_container_networks_are_never_allowed() {
        for ok in ["none", "bridge", "my-net", "hostile"] {
            assert_eq!(check_network(ok), Ok(()), "{ok}");
        }
        let e = check_network("host").unwrap_err().to_string();
        assert!(e.starts_with("\"host\" is never allowed"), "{e}");
        let e = check_network("container:db").unwrap_err().to_string();
        assert!(e.starts_with("\"container:db\" is never allowed"), "{e}");
    }

    #[test]
    fn mount_sources_must_stay_under_an_allowed_path() {
        let p = policy(&[], &["/srv/data", "/data"]);
        assert_eq!(
            p.check_mount_source("/srv/data/in", host).as_deref(),
            Ok("/srv/data/in")
        );
        assert_eq!(
            p.check_mount_source("/srv//data/./in/", host).as_deref(),
            Ok("/srv/data/in")
        );
        // An allowed path that is itself a symlink: compared after resolving both.
        assert_eq!(
            p.check_mount_source("/data/x", host).as_deref(),
            Ok("/srv/data/x")
        );
        let only_link = policy(&[], &["/data"]);
        assert_eq!(
            only_link.check_mount_source("/srv/data/x", host).as_deref(),
            Ok("/srv/data/x")
        );
        let cases = [
            (
                "/etc",
                "/etc is not under an allowed mount path ([containers] allowed_mounts: /srv/data, /data)",
            ),
            ("/srv/database", "/srv/database is not under an allowed"),
            (
                "/srv/data/../../etc",
                "\"/srv/data/../../etc\" contains \"..\"",
            ),
            ("srv/data", "\"srv/data\" must be an absolute path"),
            (
                "/srv/data/link/shadow",
                "/srv/data/link/shadow resolves to /etc/shadow (through a symlink), which is not under",
            ),
            ("/srv/data/missing", "/srv/data/missing: No such file"),
        ];
        for (source, want) in cases {
            let e = p.check_mount_source(source, host).unwrap_err().to_string();
            assert!(e.starts_with(want), "{source}: {e}");
        }
        let e = ContainerPolicy::default()
            .check_mount_source("/srv/data", host)
            .unwrap_err();
        assert!(e.to_string().ends_with("allowed_mounts: none)"), "{e}");
    }

    #[test]
    fn the_docker_socket_is_never_mounted() {
        let p = policy(&[], &["/run", "/var/run/docker.sock"]);
        for source in ["/run", "/run/docker.sock", "/var/run/docker.sock"] {
            let e = p.check_mount_source(source, host).unwrap_err().to_string();
            assert!(
                e.contains("the Docker socket, which is never mounted"),
                "{e}"
            );
        }
        assert!(p.check_mount_source("/run/user", host).is_ok());
    }

    #[test]
    fn mount_targets() {
        assert_eq!(check_mount_target("/data/", false).as_deref(), Ok("/data"));
        assert_eq!(check_mount_target("/tmp", false).as_deref(), Ok("/tmp"));
        assert_eq!(check_mount_target("/tmp/x", true).as_deref(), Ok("/tmp/x"));
        for (target, want) in [
            ("/", "is the container's root"),
            ("data", "must be an absolute path"),
            ("/a/../proc", "contains \"..\""),
            ("/proc", "/proc is under /proc"),
            ("/sys/fs", "/sys/fs is under /sys"),
            ("/dev/shm", "/dev/shm is under /dev"),
        ] {
            let e = check_mount_target(target, false).unwrap_err().to_string();
            assert!(e.contains(want), "{target}: {e}");
        }
        let e = check_mount_target("/tmp", true).unwrap_err().to_string();
        assert!(e.contains("read-only root gets its tmpfs"), "{e}");
        assert!(check_mount_target("/device", false).is_ok());
    }

    #[test]
    fn paths_compare_by_whole_components() {
        assert!(is_under("/srv/data", "/srv/data"));
        assert!(is_under("/srv/data/x", "/srv/data"));
        assert!(!is_under("/srv/database", "/srv/data"));
        assert!(is_under("/anything", "/"));
        assert_eq!(normalize_path("/a//b/./c/").unwrap(), "/a/b/c");
        assert_eq!(normalize_path("/").unwrap(), "/");
    }
}
