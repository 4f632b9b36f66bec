//! What tasuki asks the engine for: a container's create body from a `ContainerSpec`,
//! stop grace in Docker's units, and image references split the way the CLI splits them.

use std::collections::HashMap;
use std::time::Duration;

use bollard::models::{ContainerCreateBody, HostConfig, HostConfigLogConfig};

use crate::domain::ports::ContainerSpec;

pub(super) fn container_body(spec: &ContainerSpec) -> ContainerCreateBody {
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
    let memory = spec
        .memory_bytes
        .map(|m| i64::try_from(m).unwrap_or(i64::MAX));
    let host_config = HostConfig {
        cpu_shares: spec.cpu_shares.map(i64::from),
        nano_cpus: spec.cpu_limit.map(|cores| (cores * 1e9) as i64),
        memory,
        memory_swap: memory,
        network_mode: (!spec.network.is_empty()).then(|| spec.network.clone()),
        init: Some(true),
        auto_remove: Some(false),
        log_config: Some(HostConfigLogConfig {
            typ: Some("local".to_owned()),
            config: None,
        }),
        ..Default::default()
    };
    ContainerCreateBody {
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
    use super::*;

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
