//! Secrets as `serve` reads them: variables of its own environment, files on its host
//! (regular files of at most [`MAX_SECRET_FILE_BYTES`]), and the registry logins of its
//! config file. Nothing here keeps a value: each claim reads afresh, so a rotated file
//! counts from the next claim on.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::Path;

use async_trait::async_trait;
use tokio::io::AsyncReadExt;

use crate::domain::secret::{
    MAX_SECRET_FILE_BYTES, RegistryLogin, Secret, SecretError, SecretRef, SecretResolver,
};

/// [`SecretResolver`] over the process environment and the local file system.
pub struct HostSecrets {
    registries: BTreeMap<String, RegistryLogin>,
    /// Reads the environment; tests give their own.
    env: fn(&str) -> Option<OsString>,
}

fn process_env(name: &str) -> Option<OsString> {
    std::env::var_os(name)
}

impl HostSecrets {
    /// `registries`: the configured logins by registry host.
    pub fn new(registries: BTreeMap<String, RegistryLogin>) -> Self {
        Self {
            registries,
            env: process_env,
        }
    }
}

#[async_trait]
impl SecretResolver for HostSecrets {
    async fn resolve(&self, reference: &SecretRef) -> Result<Secret, SecretError> {
        match reference {
            SecretRef::Env(name) => {
                let value = (self.env)(name).ok_or_else(|| SecretError::EnvUnset(name.clone()))?;
                let text = value
                    .into_string()
                    .map_err(|_| SecretError::EnvNotUtf8(name.clone()))?;
                Secret::from_text(reference, text)
            }
            SecretRef::File(path) => {
                let bytes = read_capped(path).await?;
                let text =
                    String::from_utf8(bytes).map_err(|_| SecretError::FileNotUtf8(path.clone()))?;
                Secret::from_text(reference, text)
            }
        }
    }

    fn registry_login(&self, registry: &str) -> Option<RegistryLogin> {
        self.registries.get(registry).cloned()
    }
}

/// The file's bytes, if it is a regular file no larger than the cap. A FIFO or a device
/// could block or never end, so only regular files are read.
async fn read_capped(path: &Path) -> Result<Vec<u8>, SecretError> {
    let unreadable = |reason: String| SecretError::FileUnreadable {
        path: path.to_owned(),
        reason,
    };
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|e| unreadable(e.to_string()))?;
    let meta = file
        .metadata()
        .await
        .map_err(|e| unreadable(e.to_string()))?;
    if !meta.is_file() {
        return Err(unreadable("not a regular file".to_owned()));
    }
    let too_large = || SecretError::FileTooLarge {
        path: path.to_owned(),
        max: MAX_SECRET_FILE_BYTES,
    };
    if meta.len() > MAX_SECRET_FILE_BYTES {
        return Err(too_large());
    }
    // The file may grow between the look and the read: read one byte past the cap to
    // tell.
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_SECRET_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .await
        .map_err(|e| unreadable(e.to_string()))?;
    if bytes.len() as u64 > MAX_SECRET_FILE_BYTES {
        return Err(too_large());
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use std::os::unix::ffi::OsStringExt;

    use super::*;

    fn fake_env(name: &str) -> Option<OsString> {
        match name {
            "DB_PASSWORD" => Some("pa55 word\n".into()),
            "EMPTY" => Some(OsString::new()),
            "LATIN1" => Some(OsString::from_vec(vec![0x70, 0xe9])),
            _ => None,
        }
    }

    fn secrets() -> HostSecrets {
        HostSecrets {
            registries: BTreeMap::from([(
                "reg.example:5000".to_owned(),
                RegistryLogin {
                    username: "ci".into(),
                    password: SecretRef::Env("REG_PASSWORD".into()),
                },
            )]),
            env: fake_env,
        }
    }

    async fn error_of(reference: SecretRef) -> String {
        secrets().resolve(&reference).await.unwrap_err().to_string()
    }

    #[tokio::test]
    async fn variables_are_read_and_their_problems_named() {
        let got = secrets()
            .resolve(&SecretRef::Env("DB_PASSWORD".into()))
            .await
            .unwrap();
        assert_eq!(got.expose(), "pa55 word");
        assert_eq!(
            error_of(SecretRef::Env("NOPE".into())).await,
            "environment variable NOPE is not set"
        );
        assert_eq!(
            error_of(SecretRef::Env("EMPTY".into())).await,
            "environment variable EMPTY is empty"
        );
        assert_eq!(
            error_of(SecretRef::Env("LATIN1".into())).await,
            "environment variable LATIN1 is not valid UTF-8"
        );
    }

    #[tokio::test]
    async fn files_are_read_within_the_cap_and_their_problems_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, bytes: &[u8]| {
            let path = dir.path().join(name);
            std::fs::write(&path, bytes).unwrap();
            SecretRef::File(path)
        };
        let ok = file("db", b"s3cret\n");
        assert_eq!(secrets().resolve(&ok).await.unwrap().expose(), "s3cret");
        let at_cap = file("at-cap", &vec![b'a'; MAX_SECRET_FILE_BYTES as usize]);
        assert_eq!(
            secrets().resolve(&at_cap).await.unwrap().expose().len(),
            MAX_SECRET_FILE_BYTES as usize
        );

        let big = file("big", &vec![b'a'; MAX_SECRET_FILE_BYTES as usize + 1]);
        let e = error_of(big).await;
        assert!(e.ends_with("/big is larger than 65536 bytes"), "{e}");
        let e = error_of(file("bin", &[0xff, 0xfe])).await;
        assert!(e.ends_with("/bin is not valid UTF-8"), "{e}");
        let e = error_of(file("empty", b"")).await;
        assert!(e.ends_with("/empty is empty"), "{e}");
        let e = error_of(SecretRef::File(dir.path().join("missing"))).await;
        assert!(e.contains("/missing: No such file"), "{e}");
        let e = error_of(SecretRef::File(dir.path().to_owned())).await;
        assert!(e.ends_with(": not a regular file"), "{e}");
        // The error never carries the content.
        let e = error_of(file("nul", b"zq-content\0zq-more")).await;
        assert!(e.ends_with("/nul contains a NUL byte"), "{e}");
        assert!(!e.contains("zq-"), "{e}");
    }

    #[test]
    fn registry_logins_by_host() {
        let s = secrets();
        assert_eq!(s.registry_login("reg.example:5000").unwrap().username, "ci");
        assert!(s.registry_login("reg.example").is_none());
    }
}
