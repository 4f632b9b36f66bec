//! What tasuki asks the engine for: a container's create body from a `ContainerSpec`
//! (with the hardening every container gets), stop grace in Docker's units, and image
//! references split the way the CLI splits them.

use std::collections::HashMap;
use std::time::Duration;

use bollard::models::{ContainerCreateBody, HostConfig, HostConfigLogConfig, Mount, MountType};

use crate::domain::job::{LogMode, READ_ONLY_TMP, check_network};
use crate::domain::ports::{ContainerSpec, RuntimeError};

/// Mount options of the tmpfs a read-only root gets; Docker adds `noexec`. Its pages
/// count against the container's memory limit.
const TMPFS_OPTIONS: &str = "rw,nosuid,nodev,mode=1777";

/// The create body: the spec's settings inside the hardening every container gets (no
/// capabilities but those listed, `no-new-privileges`, pids and memory limits, never
/// privileged, private PID and IPC namespaces). A spec asking for the host's network
/// is refused here too, whatever the catalog let through.
pub(super) fn container_body(spec: &ContainerSpec) -> Result<ContainerCreateBody, RuntimeError> {
    check_network(&spec.network)
        .map_err(|refusal| RuntimeError::Docker(format!("network: {refusal}")))?;
    let env: Vec<String> = spec
        .env
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .chain(
            spec.secret_env
                .iter()
                .map(|(k, v)| format!("{k}={}", v.expose())),
        )
        .collect();
    let labels: HashMap<String, String> = spec
        .labels
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let memory = i64::try_from(spec.memory_bytes).unwrap_or(i64::MAX);
    let mounts: Vec<Mount> = spec
        .mounts
        .iter()
        .map(|m| Mount {
            typ: Some(MountType::BIND),
            source: Some(m.source.clone()),
            target: Some(m.target.clone()),
            read_only: Some(m.read_only),
            ..Default::default()
        })
        .collect();
    let host_config = HostConfig {
        cpu_shares: spec.cpu_shares.map(i64::from),
        nano_cpus: spec.cpu_limit.map(|cores| (cores * 1e9) as i64),
        memory: Some(memory),
        memory_swap: Some(memory),
        pids_limit: Some(i64::from(spec.pids_limit)),
        network_mode: (!spec.network.is_empty()).then(|| spec.network.clone()),
        cap_drop: Some(vec!["ALL".to_owned()]),
        cap_add: Some(spec.capabilities.iter().map(|c| c.kernel_name()).collect()),
        security_opt: Some(vec!["no-new-privileges".to_owned()]),
        privileged: Some(false),
        // Docker's documented private modes: "" for PID, "private" for IPC.
        pid_mode: Some(String::new()),
        ipc_mode: Some("private".to_owned()),
        readonly_rootfs: Some(spec.read_only_root),
        tmpfs: spec
            .read_only_root
            .then(|| HashMap::from([(READ_ONLY_TMP.to_owned(), TMPFS_OPTIONS.to_owned())])),
        mounts: (!mounts.is_empty()).then_some(mounts),
        init: Some(true),
        auto_remove: Some(false),
        log_config: Some(HostConfigLogConfig {
            typ: Some(log_driver(spec.logs).to_owned()),
            config: None,
        }),
        ..Default::default()
    };
    Ok(ContainerCreateBody {
        image: Some(spec.image.clone()),
        cmd: (!spec.command.is_empty()).then(|| spec.command.clone()),
        working_dir: spec.workdir.clone(),
        user: spec.user.clone(),
        env: Some(env),
        labels: Some(labels),
        attach_stdin: Some(false),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        tty: Some(false),
        open_stdin: Some(false),
        stdin_once: Some(false),
        host_config: Some(host_config),
        ..Default::default()
    })
}

/// The engine's log driver for a log mode: `local` keeps a copy a restarted worker
/// catches up from; `none` keeps nothing, so the attach stream is the only copy (and
/// the logs endpoint must never be read: on 20.10 an attach with `logs=true` to such a
/// container wedges it).
fn log_driver(mode: LogMode) -> &'static str {
    match mode {
        LogMode::Durable => "local",
        LogMode::Fast => "none",
    }
}

/// Docker's `t` for stop: whole seconds, rounded up, at least 1.
pub(super) fn grace_seconds(grace: Duration) -> i32 {
    let secs = grace
        .as_secs()
        .saturating_add(u64::from(grace.subsec_nanos() > 0))
        .max(1);
    i32::try_from(secs).unwrap_or(i32::MAX)
}

/// Splits an image reference into the `fromImage` and `tag` query
/// parameters of `POST /images/create`, the way the docker CLI does:
/// a digest goes into `tag`, a registry port is not a tag, default `latest`.
pub(crate) fn split_image_ref(image: &str) -> (String, String) {
    if let Some((name, digest)) = image.split_once('@') {
        let (repo, _tag) = split_tag(name);
        return (repo.to_owned(), digest.to_owned());
    }
    let (repo, tag) = split_tag(image);
    (repo.to_owned(), tag.unwrap_or("latest").to_owned())
}

/// `host:5000/a/b:1.0` -> (`host:5000/a/b`, Some(`1.0`)); a colon before the
/// last slash belongs to the registry host.
fn split_tag(name: &str) -> (&str, Option<&str>) {
    let last_slash = name.rfind('/');
    match name.rfind(':') {
        Some(colon) if last_slash.is_none_or(|slash| colon > slash) => {
            (&name[..colon], Some(&name[colon + 1..]))
        }
        _ => (name, None),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::domain::job::{BindMount, Capability};

    fn spec() -> ContainerSpec {
        ContainerSpec {
            logs: Default::default(),
            name: "tasuki-x-1".into(),
            image: "img:1".into(),
            command: vec![],
            workdir: None,
            user: None,
            env: BTreeMap::new(),
            secret_env: BTreeMap::new(),
            labels: BTreeMap::new(),
            cpu_shares: None,
            cpu_limit: None,
            memory_bytes: 64 << 20,
            network: "none".into(),
            pids_limit: 100,
            capabilities: vec![],
            read_only_root: false,
            mounts: vec![],
        }
    }

    #[test]
    fn every_container_is_hardened() {
        let host = container_body(&spec()).unwrap().host_config.unwrap();
        assert_eq!(host.cap_drop, Some(vec!["ALL".to_owned()]));
        assert_eq!(host.cap_add, Some(vec![]));
        assert_eq!(
            host.security_opt,
            Some(vec!["no-new-privileges".to_owned()])
        );
        assert_eq!(host.privileged, Some(false));
        assert_eq!(host.pids_limit, Some(100));
        assert_eq!(host.memory, Some(64 << 20));
        assert_eq!(host.memory_swap, Some(64 << 20));
        assert_eq!(host.ipc_mode.as_deref(), Some("private"));
        assert_eq!(host.pid_mode.as_deref(), Some(""));
        assert_eq!(host.readonly_rootfs, Some(false));
        assert_eq!(host.tmpfs, None);
        assert_eq!(host.mounts, None);
        // The JSON Docker gets says so explicitly.
        let json = serde_json::to_value(container_body(&spec()).unwrap()).unwrap();
        assert_eq!(json["HostConfig"]["PidMode"], "");
        assert_eq!(json["HostConfig"]["Privileged"], false);
    }

    #[test]
    fn what_a_job_loosens_reaches_the_body() {
        let mut s = spec();
        s.capabilities = vec![Capability::parse("NET_RAW").unwrap()];
        s.read_only_root = true;
        s.mounts = vec![BindMount {
            source: "/srv/data".into(),
            target: "/data".into(),
            read_only: true,
        }];
        let host = container_body(&s).unwrap().host_config.unwrap();
        assert_eq!(host.cap_drop, Some(vec!["ALL".to_owned()]));
        assert_eq!(host.cap_add, Some(vec!["CAP_NET_RAW".to_owned()]));
        assert_eq!(host.readonly_rootfs, Some(true));
        assert_eq!(
            host.tmpfs,
            Some(HashMap::from([(
                "/tmp".to_owned(),
                "rw,nosuid,nodev,mode=1777".to_owned()
            )]))
        );
        let mounts = host.mounts.unwrap();
        assert_eq!(mounts.len(), 1);
        assert_eq!(mounts[0].typ, Some(MountType::BIND));
        assert_eq!(mounts[0].source.as_deref(), Some("/srv/data"));
        assert_eq!(mounts[0].target.as_deref(), Some("/data"));
        assert_eq!(mounts[0].read_only, Some(true));
    }

    #[test]
    fn the_hosts_network_is_refused_even_from_a_stored_spec() {
        for mode in ["host", "container:other"] {
            let mut s = spec();
            s.network = mode.into();
            let e = container_body(&s).unwrap_err().to_string();
            assert!(e.starts_with("network: "), "{e}");
            assert!(e.contains("is never allowed"), "{e}");
        }
    }

    #[test]
    fn image_refs() {
        let cases = [
            ("busybox", ("busybox", "latest")),
            ("busybox:1.36", ("busybox", "1.36")),
            ("library/busybox", ("library/busybox", "latest")),
            ("127.0.0.1:5000/foo", ("127.0.0.1:5000/foo", "latest")),
            ("127.0.0.1:5000/foo:1.0", ("127.0.0.1:5000/foo", "1.0")),
            ("reg.example:443/a/b/c:v2", ("reg.example:443/a/b/c", "v2")),
            ("foo@sha256:abcd", ("foo", "sha256:abcd")),
            (
                "127.0.0.1:5000/foo:1.0@sha256:abcd",
                ("127.0.0.1:5000/foo", "sha256:abcd"),
            ),
        ];
        for (input, (repo, tag)) in cases {
            assert_eq!(
                split_image_ref(input),
                (repo.to_owned(), tag.to_owned()),
                "{input}"
            );
        }
    }

    #[test]
    fn grace_rounding() {
        assert_eq!(grace_seconds(Duration::ZERO), 1);
        assert_eq!(grace_seconds(Duration::from_millis(200)), 1);
        assert_eq!(grace_seconds(Duration::from_secs(1)), 1);
        assert_eq!(grace_seconds(Duration::from_millis(1500)), 2);
        assert_eq!(grace_seconds(Duration::from_secs(10)), 10);
    }
}
