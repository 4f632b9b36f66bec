//! Job secrets and registry credentials: references to values that live outside tasuki
//! (`serve`'s environment, a file), the values once read (a [`Secret`] never prints),
//! and the port that reads them. A value is read when a worker claims the run and goes
//! only to that worker; the run's frozen spec keeps the reference.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use async_trait::async_trait;

/// A secret value. Its `Debug` and `Display` print `[redacted]`, so no log line, error
/// or derived `Debug` of a struct holding one can show it; [`Secret::expose`] is the
/// one way to the text, for the places that must hand it on (the container's
/// environment, a registry login, the claim answer on the wire).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The text of a variable or file as a secret: one trailing newline (`echo pw >
    /// file`) is not part of it; an empty value or a NUL byte (which no environment
    /// variable can hold) refuse it.
    pub fn from_text(reference: &SecretRef, mut text: String) -> Result<Secret, SecretError> {
        if text.ends_with('\n') {
            text.pop();
            if text.ends_with('\r') {
                text.pop();
            }
        }
        if text.is_empty() {
            return Err(SecretError::Empty(reference.clone()));
        }
        if text.contains('\0') {
            return Err(SecretError::ContainsNul(reference.clone()));
        }
        Ok(Secret(text))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Where a secret's value is read from. Fixed in the job file or the server config:
/// never built from a request, so a caller cannot point it elsewhere.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum SecretRef {
    /// A variable of `serve`'s environment.
    Env(String),
    /// A file on `serve`'s host (an absolute path).
    File(PathBuf),
}

impl fmt::Display for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretRef::Env(name) => write!(f, "environment variable {name}"),
            SecretRef::File(path) => write!(f, "file {}", path.display()),
        }
    }
}

/// The most a secret file may hold. An environment variable's value cannot be longer
/// than 128 KiB on Linux anyway; a bigger file is a wrong path, not a secret.
pub const MAX_SECRET_FILE_BYTES: u64 = 64 * 1024;

/// Why a secret could not be read. Names the variable or the file, never a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("environment variable {0} is not set")]
    EnvUnset(String),
    #[error("environment variable {0} is not valid UTF-8")]
    EnvNotUtf8(String),
    #[error("cannot read file {path}: {reason}")]
    FileUnreadable { path: PathBuf, reason: String },
    #[error("file {path} is larger than {max} bytes")]
    FileTooLarge { path: PathBuf, max: u64 },
    #[error("file {0} is not valid UTF-8")]
    FileNotUtf8(PathBuf),
    #[error("{0} is empty")]
    Empty(SecretRef),
    #[error("{0} contains a NUL byte")]
    ContainsNul(SecretRef),
}

/// A secret for one purpose could not be read: `what` says which (`env.DB_PASSWORD`,
/// `the password of registry reg.example:5000`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}: {error}")]
pub struct Unresolved {
    pub what: String,
    pub error: SecretError,
}

/// A registry login as configured: the password is still a reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryLogin {
    pub username: String,
    pub password: SecretRef,
}

/// Credentials for pulls from one registry, read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryCredentials {
    /// The registry host as images name it (`reg.example:5000`, `docker.io`).
    pub registry: String,
    pub username: String,
    pub password: Secret,
}

/// What a claim carries besides the frozen spec: the values its references stand for.
/// Only in the claim answer and the worker's memory; never stored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClaimSecrets {
    /// Environment variables of the container whose values are secrets, by name.
    pub env: BTreeMap<String, Secret>,
    /// For pulling the image, when its registry has credentials configured.
    pub registry: Option<RegistryCredentials>,
}

impl ClaimSecrets {
    pub fn is_empty(&self) -> bool {
        self.env.is_empty() && self.registry.is_none()
    }
}

/// Reads secrets where they live (`serve`'s environment and files) and knows the
/// configured registry logins.
#[async_trait]
pub trait SecretResolver: Send + Sync + 'static {
    async fn resolve(&self, reference: &SecretRef) -> Result<Secret, SecretError>;
    /// The login configured for pulls from `registry` (a host as [`registry_host`]
    /// gives it), if any.
    fn registry_login(&self, registry: &str) -> Option<RegistryLogin>;
}

/// Docker Hub, the registry of an image reference that names none.
pub const DEFAULT_REGISTRY: &str = "docker.io";

/// The registry an image reference names, the way Docker reads it: the part before the
/// first `/` when it looks like a host (has a `.` or a `:`, or is `localhost`),
/// else Docker Hub.
pub fn registry_host(image: &str) -> &str {
    match image.split_once('/') {
        Some((first, _)) if first.contains('.') || first.contains(':') || first == "localhost" => {
            first
        }
        _ => DEFAULT_REGISTRY,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_never_prints() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "[redacted]");
        assert_eq!(format!("{s}"), "[redacted]");
        assert_eq!(s.expose(), "hunter2");
        let secrets = ClaimSecrets {
            env: BTreeMap::from([("DB_PASSWORD".to_owned(), s.clone())]),
            registry: Some(RegistryCredentials {
                registry: "reg.example".into(),
                username: "ci".into(),
                password: Secret::new("s3cr3t-pw"),
            }),
        };
        let printed = format!("{secrets:?} {secrets:#?}");
        assert!(!printed.contains("hunter2") && !printed.contains("s3cr3t-pw"));
        assert!(printed.contains("DB_PASSWORD") && printed.contains("ci"));
    }

    #[test]
    fn values_are_checked() {
        let r = SecretRef::Env("X".into());
        assert_eq!(Secret::from_text(&r, "pw\n".into()).unwrap().expose(), "pw");
        assert_eq!(
            Secret::from_text(&r, "pw\r\n".into()).unwrap().expose(),
            "pw"
        );
        // Only one newline goes: the rest is the value.
        assert_eq!(
            Secret::from_text(&r, "pw\n\n".into()).unwrap().expose(),
            "pw\n"
        );
        assert_eq!(
            Secret::from_text(&r, " a b ".into()).unwrap().expose(),
            " a b "
        );
        assert_eq!(
            Secret::from_text(&r, "\n".into()).unwrap_err().to_string(),
            "environment variable X is empty"
        );
        let f = SecretRef::File("/run/secrets/db".into());
        assert_eq!(
            Secret::from_text(&f, "a\0b".into())
                .unwrap_err()
                .to_string(),
            "file /run/secrets/db contains a NUL byte"
        );
    }

    #[test]
    fn an_unresolved_secret_names_its_place_not_its_value() {
        let e = Unresolved {
            what: "env.DB_PASSWORD".into(),
            error: SecretError::EnvUnset("DB_PASSWORD".into()),
        };
        assert_eq!(
            e.to_string(),
            "env.DB_PASSWORD: environment variable DB_PASSWORD is not set"
        );
    }

    #[test]
    fn registry_hosts_as_docker_reads_them() {
        for (image, host) in [
            ("busybox", "docker.io"),
            ("busybox:1.36", "docker.io"),
            ("library/busybox", "docker.io"),
            ("acme/tool:1", "docker.io"),
            ("127.0.0.1:5000/foo", "127.0.0.1:5000"),
            ("127.0.0.1:5000/foo:1.0@sha256:abcd", "127.0.0.1:5000"),
            ("reg.example/a/b/c:v2", "reg.example"),
            ("localhost/x", "localhost"),
            ("localhost:5000/x", "localhost:5000"),
            ("ghcr.io/acme/tool@sha256:abcd", "ghcr.io"),
        ] {
            assert_eq!(registry_host(image), host, "{image}");
        }
    }
}
