//! How the clients (CLI and remote worker) connect to `serve`: what they trust for the
//! server's certificate (the system's roots, plus the private CA of `--ca-cert`), how
//! long they keep idle connections, and a transport error spelled out with its causes
//! (reqwest's own message leaves out the certificate problem).

use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot read the CA certificate {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("CA certificate {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// The certificates of a PEM file, each to be trusted as a root.
pub fn ca_roots(path: &Path) -> Result<Vec<reqwest::Certificate>, CaError> {
    let invalid = |message: String| CaError::Invalid {
        path: path.to_owned(),
        message,
    };
    let pem = std::fs::read(path).map_err(|source| CaError::Read {
        path: path.to_owned(),
        source,
    })?;
    let ders = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("not a PEM certificate ({e})")))?;
    if ders.is_empty() {
        return Err(invalid(
            "holds no certificate (no `-----BEGIN CERTIFICATE-----` section)".to_owned(),
        ));
    }
    ders.iter()
        .map(|der| {
            reqwest::Certificate::from_der(der)
                .map_err(|e| invalid(format!("not a usable certificate: {}", chain(&e))))
        })
        .collect()
}

/// How long a client keeps an idle connection. `serve` closes one idle for its
/// `header_timeout` (10 s by default); letting go first keeps a request from being sent
/// on a connection the server is closing at that moment.
pub const POOL_IDLE: Duration = Duration::from_secs(5);

/// A client builder that trusts the system's roots and, with `ca_cert`, that CA too.
pub fn builder(ca_cert: Option<&Path>) -> Result<reqwest::ClientBuilder, CaError> {
    let builder = reqwest::Client::builder().pool_idle_timeout(POOL_IDLE);
    Ok(match ca_cert {
        Some(path) => builder.tls_certs_merge(ca_roots(path)?),
        None => builder,
    })
}

/// An error and its causes, `a: b: c`, each said once (many wrappers repeat their
/// source's text).
pub fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        let part = e.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        cause = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_ca_file_is_named_with_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let e = ca_roots(&missing).unwrap_err().to_string();
        assert!(
            e.contains("missing.pem") && e.contains("cannot read"),
            "{e}"
        );

        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not pem at all\n").unwrap();
        let e = ca_roots(&empty).unwrap_err().to_string();
        assert!(
            e.contains("empty.pem") && e.contains("no certificate"),
            "{e}"
        );

        let garbage = dir.path().join("garbage.pem");
        std::fs::write(
            &garbage,
            "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = ca_roots(&garbage).unwrap_err().to_string();
        assert!(e.contains("garbage.pem") && e.contains("not a PEM"), "{e}");
        assert!(builder(Some(&garbage)).is_err());
        assert!(builder(None).is_ok());
    }

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] Middle);
    #[derive(Debug, thiserror::Error)]
    #[error("middle: inner")]
    struct Middle(#[source] std::io::Error);

    #[test]
    fn the_chain_names_every_cause_once() {
        let e = Outer(Middle(std::io::Error::other("inner")));
        assert_eq!(chain(&e), "outer: middle: inner");
    }
}
