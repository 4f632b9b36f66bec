//! `capabilities`, `pids_limit`, `read_only` and `[[mounts]]`: what a job loosens of
//! the hardening every container gets, within the server's `ContainerPolicy`.

use std::collections::BTreeMap;

use super::Ctx;
use crate::catalog::file::JobFile;
use crate::domain::job::{BindMount, Capability, ContainerPolicy, Hardening, check_mount_target};

pub(super) fn hardening(ctx: &mut Ctx<'_>, raw: &JobFile, policy: &ContainerPolicy) -> Hardening {
    let mut capabilities = Vec::new();
    if let Some(list) = &raw.capabilities {
        for name in list.get_ref() {
            let checked = Capability::parse(name.get_ref())
                .map_err(|e| e.to_string())
                .and_then(|c| policy.check_capability(c).map(|()| c).map_err(|e| e.0));
            match checked {
                Ok(c) if !capabilities.contains(&c) => capabilities.push(c),
                Ok(_) => {}
                Err(message) => ctx.at(&name.span(), "capabilities", message),
            }
        }
    }
    let asked = raw.pids_limit.as_ref().map(|p| *p.get_ref());
    let pids_limit = match policy.pids_limit_for(asked) {
        Ok(n) => Some(n),
        Err(refusal) => {
            if let Some(p) = &raw.pids_limit {
                ctx.at(&p.span(), "pids_limit", refusal.0);
            }
            None
        }
    };
    let read_only = raw.read_only.as_ref().is_some_and(|r| *r.get_ref());
    let mounts = mounts(ctx, raw, policy, read_only);
    Hardening {
        capabilities,
        pids_limit,
        read_only,
        mounts,
    }
}

/// `[[mounts]]`: each source under an allowed path, each target once.
fn mounts(
    ctx: &mut Ctx<'_>,
    raw: &JobFile,
    policy: &ContainerPolicy,
    read_only_root: bool,
) -> Vec<BindMount> {
    let mut mounts = Vec::new();
    let mut targets: BTreeMap<String, usize> = BTreeMap::new();
    for (i, entry) in raw.mounts.iter().enumerate() {
        let m = entry.get_ref();
        let fields = |name: &str| format!("mounts[{i}].{name}");
        let source = match &m.source {
            None => {
                ctx.at(&entry.span(), fields("source"), "missing required field");
                None
            }
            Some(s) => {
                ctx.no_refs(s, &fields("source"));
                match policy.check_mount_source(s.get_ref(), host_path) {
                    Ok(path) => Some(path),
                    Err(refusal) => {
                        ctx.at(&s.span(), fields("source"), refusal.0);
                        None
                    }
                }
            }
        };
        let target = match &m.target {
            None => {
                ctx.at(&entry.span(), fields("target"), "missing required field");
                None
            }
            Some(t) => {
                ctx.no_refs(t, &fields("target"));
                match check_mount_target(t.get_ref(), read_only_root) {
                    Ok(path) => match targets.get(&path) {
                        Some(first) => {
                            ctx.at(
                                &t.span(),
                                fields("target"),
                                format!("{path} is already the target of mounts[{first}]"),
                            );
                            None
                        }
                        None => {
                            targets.insert(path.clone(), i);
                            Some(path)
                        }
                    },
                    Err(refusal) => {
                        ctx.at(&t.span(), fields("target"), refusal.0);
                        None
                    }
                }
            }
        };
        if let (Some(source), Some(target)) = (source, target) {
            mounts.push(BindMount {
                source,
                target,
                // Read-only unless the file says otherwise.
                read_only: m.read_only.as_ref().is_none_or(|r| *r.get_ref()),
            });
        }
    }
    mounts
}

/// The host's own view of a path: symlinks followed, so what is checked is what Docker
/// will mount.
fn host_path(path: &str) -> Result<String, String> {
    let resolved = std::fs::canonicalize(path).map_err(|e| e.to_string())?;
    resolved
        .into_os_string()
        .into_string()
        .map_err(|p| format!("resolves to {p:?}, which is not UTF-8"))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;
    use crate::catalog::CatalogError;
    use crate::catalog::testing::*;
    use crate::domain::job::{DEFAULT_MEMORY, DEFAULT_PIDS_LIMIT};

    fn policy(caps: &[&str], mounts: &[&str]) -> ContainerPolicy {
        let caps: Vec<String> = caps.iter().map(|c| (*c).to_owned()).collect();
        let mounts: Vec<String> = mounts.iter().map(|m| (*m).to_owned()).collect();
        ContainerPolicy::new("256MiB", 100, &caps, &mounts).unwrap()
    }

    fn refused(text: &str, policy: &ContainerPolicy) -> Vec<CatalogError> {
        parse_under(text, policy).unwrap_err()
    }

    #[test]
    fn defaults_are_filled_in_at_load() {
        let s = parse("image = \"a\"\n").unwrap();
        assert_eq!(s.resources.memory_bytes, Some(DEFAULT_MEMORY));
        assert_eq!(
            s.hardening,
            Hardening {
                capabilities: vec![],
                pids_limit: Some(DEFAULT_PIDS_LIMIT),
                read_only: false,
                mounts: vec![],
            }
        );
        let s = parse_under("image = \"a\"\n", &policy(&[], &[])).unwrap();
        assert_eq!(s.resources.memory_bytes, Some(256 << 20));
        assert_eq!(s.hardening.pids_limit, Some(100));
        let s = parse_under(
            "image = \"a\"\n[resources]\nmemory = \"1GiB\"\n",
            &policy(&[], &[]),
        )
        .unwrap();
        assert_eq!(
            s.resources.memory_bytes,
            Some(1 << 30),
            "the job's own wins"
        );
    }

    #[test]
    fn what_the_policy_allows_is_taken() {
        let s = parse_under(
            "image = \"a\"\ncapabilities = [\"net_raw\", \"CAP_NET_BIND_SERVICE\", \"NET_RAW\"]\n\
             pids_limit = 64\nread_only = true\n",
            &policy(&["NET_RAW", "NET_BIND_SERVICE"], &[]),
        )
        .unwrap();
        let caps: Vec<&str> = s
            .hardening
            .capabilities
            .iter()
            .map(|c| c.as_str())
            .collect();
        assert_eq!(caps, ["NET_RAW", "NET_BIND_SERVICE"]);
        assert_eq!(s.hardening.pids_limit, Some(64));
        assert!(s.hardening.read_only);
    }

    #[test]
    fn what_the_policy_forbids_is_refused_naming_field_and_rule() {
        let p = policy(&["NET_BIND_SERVICE"], &[]);
        let errs = refused(
            "image = \"a\"\nnetwork = \"host\"\ncapabilities = [\"NET_BIND_SERVICE\", \"SYS_ADMIN\", \"ALL\", \"FLY\"]\npids_limit = 1000\n",
            &p,
        );
        let lines: Vec<String> = errs.iter().map(ToString::to_string).collect();
        assert_eq!(lines.len(), 5, "{lines:#?}");
        assert!(
            lines[0].starts_with("jobs/hello.toml:2: network: \"host\" is never allowed"),
            "{lines:#?}"
        );
        assert_eq!(
            lines[1],
            "jobs/hello.toml:3: capabilities: SYS_ADMIN is not in [containers] \
             allowed_capabilities (allowed: NET_BIND_SERVICE)"
        );
        assert!(lines[2].contains("capabilities: \"ALL\" cannot be added back"));
        assert!(lines[3].contains("capabilities: \"FLY\" is not a Linux capability"));
        assert_eq!(
            lines[4],
            "jobs/hello.toml:4: pids_limit: 1000 is above [containers] pids_limit (100); \
             a job may only ask for fewer"
        );
        let e = one_error("image = \"a\"\nnetwork = \"container:db\"\n");
        assert_eq!(e.field.as_deref(), Some("network"));
    }

    #[test]
    fn mounts_must_stay_under_the_allowed_paths() {
        let root = tempfile::tempdir().unwrap();
        let base = root.path().canonicalize().unwrap();
        let allowed = base.join("allowed");
        std::fs::create_dir_all(allowed.join("data")).unwrap();
        std::fs::create_dir_all(base.join("secret")).unwrap();
        symlink(base.join("secret"), allowed.join("escape")).unwrap();
        let allowed = allowed.to_str().unwrap().to_owned();
        let p = policy(&[], &[&allowed]);
        let job = |mounts: &str| format!("image = \"a\"\nread_only = true\n{mounts}");

        let s = parse_under(
            &job(&format!(
                "[[mounts]]\nsource = \"{allowed}/data/\"\ntarget = \"/data\"\n\
                 [[mounts]]\nsource = \"{allowed}//data\"\ntarget = \"/scratch\"\nread_only = false\n"
            )),
            &p,
        )
        .unwrap();
        assert_eq!(
            s.hardening.mounts,
            [
                BindMount {
                    source: format!("{allowed}/data"),
                    target: "/data".into(),
                    read_only: true,
                },
                BindMount {
                    source: format!("{allowed}/data"),
                    target: "/scratch".into(),
                    read_only: false,
                },
            ]
        );

        let secret = base.join("secret");
        let secret = secret.to_str().unwrap();
        let errs = refused(
            &job(&format!(
                "[[mounts]]\nsource = \"/etc\"\ntarget = \"/etc2\"\n\
                 [[mounts]]\nsource = \"{allowed}/../secret\"\ntarget = \"/a\"\n\
                 [[mounts]]\nsource = \"{allowed}/escape\"\ntarget = \"/b\"\n\
                 [[mounts]]\nsource = \"{allowed}/nothing\"\ntarget = \"/c\"\n\
                 [[mounts]]\nsource = \"{allowed}/data\"\ntarget = \"/tmp\"\n\
                 [[mounts]]\nsource = \"{allowed}/data\"\ntarget = \"/proc/x\"\n\
                 [[mounts]]\nsource = \"{allowed}/data\"\ntarget = \"/c/\"\n\
                 [[mounts]]\ntarget = \"/d\"\n"
            )),
            &p,
        );
        let lines: Vec<String> = errs.iter().map(ToString::to_string).collect();
        let want = [
            "jobs/hello.toml:4: mounts[0].source: /etc is not under an allowed mount path ([containers] allowed_mounts: ".to_owned(),
            "jobs/hello.toml:7: mounts[1].source: ".to_owned(),
            format!("jobs/hello.toml:10: mounts[2].source: {allowed}/escape resolves to {secret} (through a symlink), which is not under an allowed mount path"),
            format!("jobs/hello.toml:13: mounts[3].source: {allowed}/nothing: No such file or directory"),
            "jobs/hello.toml:17: mounts[4].target: /tmp is where a read-only root gets its tmpfs".to_owned(),
            "jobs/hello.toml:20: mounts[5].target: /proc/x is under /proc".to_owned(),
            "jobs/hello.toml:23: mounts[6].target: /c is already the target of mounts[3]".to_owned(),
            "jobs/hello.toml:24: mounts[7].source: missing required field".to_owned(),
        ];
        assert_eq!(lines.len(), want.len(), "{lines:#?}");
        for (line, want) in lines.iter().zip(&want) {
            assert!(line.starts_with(want.as_str()), "{line}\nwant {want}");
        }
        assert!(lines[1].contains("contains \"..\""), "{}", lines[1]);

        // No allowed paths at all: every mount is refused.
        let e = parse_under(
            &job(&format!(
                "[[mounts]]\nsource = \"{allowed}/data\"\ntarget = \"/data\"\n"
            )),
            &ContainerPolicy::default(),
        )
        .unwrap_err();
        assert!(
            e[0].to_string().ends_with("allowed_mounts: none)"),
            "{}",
            e[0]
        );
    }
}
