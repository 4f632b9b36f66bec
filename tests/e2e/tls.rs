//! `serve --tls-cert/--tls-key` with a private CA made by `openssl` in the test's temp
//! dir: a remote worker and the CLI trust it through `--ca-cert`; without it the CLI
//! refuses the certificate; plain HTTP gets nothing; and the connection guarantees
//! (half-close, the 413 that arrives) hold under TLS too.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls_pki_types::pem::PemObject;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls;

use crate::common::{
    Api, BIN, QueueGuard, ServeOptions, Server, TOKEN, WorkerSpec, assert_no_containers_left,
    start_worker_with, unique,
};

/// A private CA and a certificate it signed for IP 127.0.0.1.
pub struct Pki {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl (tests/run.sh installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The README's commands, with short lifetimes.
pub fn make_pki(dir: &Path) -> Pki {
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
    let mut ca = vec!["req", "-x509", "-nodes", "-days", "2"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-subj",
        "/CN=tasuki test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    openssl(dir, &ca);
    let mut csr = vec!["req", "-nodes"];
    csr.extend(ec);
    csr.extend([
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    openssl(dir, &csr);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "server.ext",
            "-out",
            "server.pem",
        ],
    );
    Pki {
        ca: dir.join("ca.pem"),
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
    }
}

pub fn tls_args(pki: &Pki) -> Vec<String> {
    vec![
        "--tls-cert".into(),
        pki.cert.display().to_string(),
        "--tls-key".into(),
        pki.key.display().to_string(),
    ]
}

/// An API client that trusts the test CA.
pub fn https_api(server: &Server, pki: &Pki) -> Api {
    let pem = std::fs::read(&pki.ca).unwrap();
    let ca = reqwest::Certificate::from_pem(&pem).unwrap();
    Api {
        http: reqwest::Client::builder()
            .tls_certs_merge([ca])
            .build()
            .unwrap(),
        base: server.url.clone(),
    }
}

fn cli(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .env_remove("TASUKI_CA_CERT")
        .env_remove("TASUKI_SERVER")
        .output()
        .expect("run tasuki")
}

#[tokio::test]
async fn tls_a_remote_worker_and_the_cli_use_a_private_ca() {
    let d = tempfile::tempdir().unwrap();
    let pki = make_pki(d.path());
    let queue = unique("tasuki-test");
    let _guard = QueueGuard(queue.clone());
    let server = Server::start(
        d.path(),
        ServeOptions {
            amqp_queue: Some(queue.clone()),
            worker_token: Some(TOKEN.to_owned()),
            extra_args: tls_args(&pki),
            ..ServeOptions::default()
        },
    );
    assert!(server.url.starts_with("https://"), "{}", server.url);
    let worker = start_worker_with(
        d.path(),
        &server,
        &queue,
        TOKEN,
        WorkerSpec {
            env: vec![("TASUKI_CA_CERT".into(), pki.ca.display().to_string())],
            ..WorkerSpec::default()
        },
    );
    let api = https_api(&server, &pki);

    let run = api.run_and_wait("exit", json!({"code": 3})).await;
    assert_eq!(run["status"], "failed", "{run}");
    assert_eq!(run["exit_code"], 3);
    let id = run["id"].as_str().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&api.logs(id).await),
        "exiting with 3\n"
    );
    assert_no_containers_left(&worker.worker_id).await;

    // The CLI with the CA.
    let ca = pki.ca.display().to_string();
    let out = cli(&["status", id, "--server", &server.url, "--ca-cert", &ca]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(id), "{stdout}");

    // Without it: the server's certificate is not trusted, and the error says so.
    let out = cli(&["status", id, "--server", &server.url]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("certificate"), "{stderr}");

    // An unusable CA file: named, before any request.
    let out = cli(&[
        "status",
        id,
        "--server",
        &server.url,
        "--ca-cert",
        &pki.key.display().to_string(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("server.key") && stderr.contains("no certificate"),
        "{stderr}"
    );

    // Plain HTTP to the TLS port gets no answer.
    let plain = reqwest::Client::new()
        .get(format!("http://{}/healthz", server.addr()))
        .timeout(Duration::from_secs(20))
        .send()
        .await;
    assert!(plain.is_err(), "plain HTTP was answered: {plain:?}");
    assert!(worker.log_text().contains("run finished"));
}

/// Start `serve` with these arguments, expecting it to stop at once; its stderr.
fn refused_start(dir: &Path, args: &[&str]) -> String {
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--jobs-dir"])
        .arg(crate::common::test_jobs_dir())
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(args)
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn tasuki");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(!status.success(), "serve started with {args:?}");
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
            return err;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("serve with {args:?} did not stop");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn tls_a_bad_certificate_or_key_stops_start_up_naming_the_file() {
    let d = tempfile::tempdir().unwrap();
    let pki = make_pki(d.path());
    let cert = pki.cert.display().to_string();
    let key = pki.key.display().to_string();
    let missing = d.path().join("nope.pem").display().to_string();
    let ca_key = d.path().join("ca.key").display().to_string();

    let err = refused_start(d.path(), &["--tls-cert", &missing, "--tls-key", &key]);
    assert!(
        err.contains("nope.pem") && err.contains("cannot read"),
        "{err}"
    );
    let err = refused_start(d.path(), &["--tls-cert", &key, "--tls-key", &key]);
    assert!(
        err.contains("server.key") && err.contains("no certificate"),
        "{err}"
    );
    let err = refused_start(d.path(), &["--tls-cert", &cert, "--tls-key", &cert]);
    assert!(
        err.contains("server.pem") && err.contains("no private key"),
        "{err}"
    );
    // Another key than the certificate's.
    let err = refused_start(d.path(), &["--tls-cert", &cert, "--tls-key", &ca_key]);
    assert!(
        err.contains("server.pem") && err.contains("ca.key") && err.contains("together"),
        "{err}"
    );
}

/// A TLS connection to the server that trusts the test CA.
async fn tls_connect(
    server: &Server,
    pki: &Pki,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(&pki.ca).unwrap();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(&pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("TLS handshake")
}

/// Send `request` whole, close the sending side (close_notify, then FIN), and read the
/// answer to its end.
async fn send_half_closed(server: &Server, pki: &Pki, request: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut stream = tls_connect(server, pki).await;
    stream.write_all(request).await?;
    stream.shutdown().await?;
    let mut answer = Vec::new();
    match tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut answer)).await {
        Ok(Ok(_)) => Ok(answer),
        // A server that closes without close_notify after a whole answer still answered.
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(answer),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(std::io::Error::other("no end of answer in 30 s")),
    }
}

#[tokio::test]
async fn tls_a_half_closing_client_gets_its_answer_and_a_refused_body_its_413() {
    let d = tempfile::tempdir().unwrap();
    let pki = make_pki(d.path());
    let server = Server::start(
        d.path(),
        ServeOptions {
            extra_args: tls_args(&pki),
            ..ServeOptions::default()
        },
    );
    let request = b"GET /v1/jobs/echo-both HTTP/1.1\r\nHost: tasuki\r\nConnection: close\r\n\r\n";
    for _ in 0..3 {
        let answer = send_half_closed(&server, &pki, request).await.unwrap();
        let text = String::from_utf8_lossy(&answer);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(text.contains("echo-both"), "{text}");
    }
    let body = format!(
        r#"{{"params":{{"value":"{}"}}}}"#,
        "x".repeat(2 * 1024 * 1024)
    );
    let mut request = format!(
        "POST /v1/jobs/args/runs HTTP/1.1\r\nHost: tasuki\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body.as_bytes());
    for i in 0..5 {
        let answer = send_half_closed(&server, &pki, &request)
            .await
            .unwrap_or_else(|e| panic!("try {i}: {e}"));
        let text = String::from_utf8_lossy(&answer);
        assert!(text.starts_with("HTTP/1.1 413"), "try {i}: {text}");
        assert!(text.contains("body_too_large"), "try {i}: {text}");
    }
}
