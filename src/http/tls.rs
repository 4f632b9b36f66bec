//! `serve --tls-cert/--tls-key`: the PEM certificate chain and private key read into a
//! rustls acceptor, each failure naming the file and what is wrong with it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read TLS {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("TLS certificate {path}: {message}")]
    Cert { path: PathBuf, message: String },
    #[error("TLS key {path}: {message}")]
    Key { path: PathBuf, message: String },
    #[error("TLS certificate {cert} and key {key} cannot be used together: {message}")]
    Pair {
        cert: PathBuf,
        key: PathBuf,
        message: String,
    },
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

/// The certificates of a PEM file, leaf first.
fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |message: String| TlsError::Cert {
        path: path.to_owned(),
        message,
    };
    let pem = read("certificate", path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not a PEM certificate chain ({e})")))?;
    if certs.is_empty() {
        return Err(bad(
            "holds no certificate (no `-----BEGIN CERTIFICATE-----` section)".to_owned(),
        ));
    }
    Ok(certs)
}

/// The one private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bad = |message: String| TlsError::Key {
        path: path.to_owned(),
        message,
    };
    let pem = read("key", path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => bad(
            "holds no private key (no `-----BEGIN PRIVATE KEY-----`, `RSA PRIVATE KEY` or `EC PRIVATE KEY` section)"
                .to_owned(),
        ),
        other => bad(format!("not a PEM private key ({other})")),
    })
}

/// An acceptor for `cert` (PEM chain, leaf first) and `key`, speaking HTTP/1.1 only.
pub fn load_tls(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsError> {
    let chain = certificates(cert)?;
    let private = private_key(key)?;
    let pair = |message: String| TlsError::Pair {
        cert: cert.to_owned(),
        key: key.to_owned(),
        message,
    };
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| pair(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, private)
        .map_err(|e| pair(e.to_string()))?;
    // The server speaks HTTP/1.1 only (see `serve`): say so, so no client tries h2.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(cert: &Path, key: &Path) -> String {
        match load_tls(cert, key) {
            Ok(_) => panic!("{} and {} were taken", cert.display(), key.display()),
            Err(e) => e.to_string(),
        }
    }

    fn file(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn each_bad_file_is_named_with_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let missing = d.join("missing.pem");
        let empty = file(d, "empty.pem", "");
        let garbage = file(
            d,
            "garbage.pem",
            "-----BEGIN CERTIFICATE-----\n!!!not base64!!!\n-----END CERTIFICATE-----\n",
        );
        let key_only = file(
            d,
            "key-only.pem",
            "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIGRpZmZlcmVudGtleWRpZmZlcmVudGtleWRpZmZlcg==\n-----END PRIVATE KEY-----\n",
        );

        let e = refused(&missing, &key_only);
        assert!(
            e.contains("missing.pem") && e.contains("cannot read"),
            "{e}"
        );

        let e = refused(&empty, &key_only);
        assert!(
            e.contains("empty.pem") && e.contains("no certificate"),
            "{e}"
        );

        let e = refused(&garbage, &key_only);
        assert!(e.contains("garbage.pem") && e.contains("not a PEM"), "{e}");

        // A key file given as the certificate holds no certificate.
        let e = refused(&key_only, &key_only);
        assert!(
            e.contains("key-only.pem") && e.contains("no certificate"),
            "{e}"
        );
    }

    #[test]
    fn a_certificate_file_given_as_the_key_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // Not a real certificate: the key is looked at only once the chain parsed.
        let cert = file(
            d,
            "cert.pem",
            "-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n",
        );
        let e = refused(&cert, &cert);
        assert!(
            e.contains("TLS key") && e.contains("cert.pem") && e.contains("no private key"),
            "{e}"
        );
    }
}
