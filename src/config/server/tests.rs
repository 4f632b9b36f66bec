//! The config file and its variables: defaults, the file, the variables over it, and
//! every bad input named.

use super::*;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

#[test]
fn no_file_and_no_env_is_the_default() {
    let c = ServerConfig::load(None, env(&[("TASUKI_LISTEN", "0.0.0.0:1")])).unwrap();
    assert_eq!(c, ServerConfig::default());
    assert!(c.auth.open_readyz && !c.auth.open_metrics);
}

#[test]
fn a_file_is_read_and_env_wins() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tasuki.toml");
    std::fs::write(
        &path,
        r#"
[[tokens]]
name = "ci"
sha256 = "ab"
scopes = ["run:nightly-*", "read:*"]

[limits]
rate_per_second = 5
header_timeout = "3s"

[containers]
allowed_capabilities = ["NET_BIND_SERVICE"]

[registries."127.0.0.1:5000"]
username = "ci"
password = { from_env = "REG_PASSWORD" }
"#,
    )
    .unwrap();
    let c = ServerConfig::load(
        Some(&path),
        env(&[
            ("TASUKI_LIMITS_BURST", "7"),
            ("TASUKI_AUTH_OPEN_METRICS", "true"),
            ("TASUKI_CONTAINERS_DEFAULT_MEMORY", "1GiB"),
            (
                "TASUKI_WORKER_TOKENS",
                r#"[{name = "w1", sha256 = "cd"}, {name = "w2", sha256 = "ef"}]"#,
            ),
        ]),
    )
    .unwrap();
    assert_eq!(c.tokens[0].scopes, ["run:nightly-*", "read:*"]);
    assert_eq!(c.limits.rate_per_second, 5);
    assert_eq!(c.limits.burst, 7);
    assert_eq!(c.limits.header_timeout, Duration::from_secs(3));
    assert!(c.auth.open_metrics);
    assert_eq!(c.containers.default_memory, "1GiB");
    assert_eq!(c.containers.allowed_capabilities, ["NET_BIND_SERVICE"]);
    assert_eq!(c.worker_tokens.len(), 2);
    assert_eq!(
        c.registries["127.0.0.1:5000"].password,
        SecretSource::FromEnv {
            from_env: "REG_PASSWORD".into()
        }
    );
}

#[test]
fn registry_logins_keep_the_password_a_reference() {
    let c = ServerConfig::load(
        None,
        env(&[(
            "TASUKI_REGISTRIES",
            r#"{ "127.0.0.1:5000" = { username = "ci", password = { from_file = "/run/secrets/reg" } } }"#,
        )]),
    )
    .unwrap();
    let logins = c.registry_logins().unwrap();
    assert_eq!(
        logins["127.0.0.1:5000"],
        RegistryLogin {
            username: "ci".into(),
            password: SecretRef::File("/run/secrets/reg".into()),
        }
    );
    for bad in ["https://reg.example", "reg.example/v2", "Reg.Example", ""] {
        let c = ServerConfig {
            registries: BTreeMap::from([(
                bad.to_owned(),
                RegistryEntry {
                    username: "ci".into(),
                    password: SecretSource::FromEnv {
                        from_env: "P".into(),
                    },
                },
            )]),
            ..ServerConfig::default()
        };
        let e = c.registry_logins().unwrap_err().to_string();
        assert!(e.contains("registry host"), "{bad}: {e}");
    }
    // A password written in the file itself is not a reference: refused at load.
    let e = ServerConfig::load(
        None,
        env(&[(
            "TASUKI_REGISTRIES",
            r#"{ "r.example" = { username = "ci", password = "plain" } }"#,
        )]),
    )
    .unwrap_err();
    assert!(e.to_string().contains("TASUKI_REGISTRIES"), "{e}");
}

#[test]
fn every_key_has_a_variable() {
    let keys = env_keys();
    for var in [
        "TASUKI_TOKENS",
        "TASUKI_WORKER_TOKENS",
        "TASUKI_REGISTRIES",
        "TASUKI_AUTH_OPEN_READYZ",
        "TASUKI_AUTH_OPEN_METRICS",
        "TASUKI_LIMITS_RATE_PER_SECOND",
        "TASUKI_LIMITS_BODY_TIMEOUT",
        "TASUKI_CONTAINERS_PIDS_LIMIT",
        "TASUKI_CONTAINERS_ALLOWED_MOUNTS",
    ] {
        assert!(keys.contains_key(var), "{var} missing from {keys:?}");
    }
}

#[test]
fn the_containers_section_becomes_the_policy() {
    let c = ServerConfig::load(
        None,
        env(&[
            ("TASUKI_CONTAINERS_DEFAULT_MEMORY", "1GiB"),
            ("TASUKI_CONTAINERS_PIDS_LIMIT", "64"),
            ("TASUKI_CONTAINERS_ALLOWED_CAPABILITIES", r#"["net_raw"]"#),
            ("TASUKI_CONTAINERS_ALLOWED_MOUNTS", r#"["/srv/data/"]"#),
        ]),
    )
    .unwrap();
    let p = c.containers.policy().unwrap();
    assert_eq!(p.default_memory(), 1 << 30);
    assert_eq!(p.pids_limit(), 64);
    assert_eq!(p.allowed_mounts(), ["/srv/data"]);
    assert_eq!(
        ServerConfig::default().containers.policy().unwrap(),
        ContainerPolicy::default()
    );
    for (var, value, want) in [
        (
            "TASUKI_CONTAINERS_DEFAULT_MEMORY",
            "lots",
            "[containers] default_memory: invalid size \"lots\"",
        ),
        (
            "TASUKI_CONTAINERS_ALLOWED_CAPABILITIES",
            r#"["SYS_ADMINN"]"#,
            "[containers] allowed_capabilities: \"SYS_ADMINN\" is not",
        ),
        (
            "TASUKI_CONTAINERS_ALLOWED_MOUNTS",
            r#"["/"]"#,
            "[containers] allowed_mounts: \"/\" would allow every host path",
        ),
        (
            "TASUKI_CONTAINERS_PIDS_LIMIT",
            "0",
            "[containers] pids_limit: 0 is below 2",
        ),
    ] {
        let c = ServerConfig::load(None, env(&[(var, value)])).unwrap();
        let e = c.containers.policy().unwrap_err().to_string();
        assert!(e.starts_with(want), "{var}: {e}");
    }
}

#[test]
fn limits_that_would_refuse_everything_are_refused() {
    assert!(LimitsSection::default().check().is_ok());
    let off = LimitsSection {
        rate_per_second: 0,
        burst: 0,
        ..LimitsSection::default()
    };
    assert!(off.check().is_ok(), "rate 0 turns the limiter off");
    for (var, value, words) in [
        ("TASUKI_LIMITS_BURST", "0", "burst"),
        ("TASUKI_LIMITS_MAX_PARAMS", "0", "max_params"),
        ("TASUKI_LIMITS_MAX_HEADER_BYTES", "100", "at least 1024"),
        ("TASUKI_LIMITS_HEADER_TIMEOUT", "0s", "header_timeout"),
    ] {
        let c = ServerConfig::load(None, env(&[(var, value)])).unwrap();
        let e = c.limits.check().unwrap_err().to_string();
        assert!(e.contains(words) && e.contains(var), "{var}: {e}");
    }
}

#[test]
fn bad_input_names_where_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tasuki.toml");
    std::fs::write(&path, "[limits]\nrate_per_secnd = 5\n").unwrap();
    let e = ServerConfig::load(Some(&path), env(&[])).unwrap_err();
    assert!(e.to_string().contains("rate_per_secnd"), "{e}");
    assert!(e.to_string().contains("tasuki.toml"), "{e}");

    let e = ServerConfig::load(None, env(&[("TASUKI_LIMITS_BURST", "lots")])).unwrap_err();
    assert!(e.to_string().contains("TASUKI_LIMITS_BURST"), "{e}");

    let e = ServerConfig::load(None, env(&[("TASUKI_TOKENS", "[{name = ")])).unwrap_err();
    assert!(e.to_string().contains("TASUKI_TOKENS"), "{e}");

    let missing = dir.path().join("nope.toml");
    let e = ServerConfig::load(Some(&missing), env(&[])).unwrap_err();
    assert!(e.to_string().contains("nope.toml"), "{e}");
}
