//! The engine's failures as `RuntimeError`s: unreachable vs. an answer, a container that
//! is gone, and pull failures told apart (image not found, credentials refused, anything
//! else).

use std::error::Error as StdError;

use bollard::errors::Error as BollardError;

use crate::domain::ports::RuntimeError;

pub(super) fn classify_pull_error(image: &str, e: BollardError) -> RuntimeError {
    if is_unreachable(&e) {
        return map_error(e);
    }
    let status = status_of(&e);
    let message = match e {
        BollardError::DockerResponseServerError { message, .. } => message,
        BollardError::DockerStreamError { error } => error,
        other => error_chain(&other),
    };
    let lower = message.to_ascii_lowercase();
    // Problems reaching or talking to the registry: never "not found", even
    // when the text happens to look like it.
    const TRANSPORT: &[&str] = &[
        "dial tcp",
        "dial unix",
        "connection refused",
        "connection reset",
        "no such host",
        "i/o timeout",
        "timeout",
        "network is unreachable",
        "server misbehaving",
        "tls:",
        "x509",
        "certificate",
        "http response to https client",
    ];
    const NOT_FOUND: &[&str] = &[
        "manifest unknown",
        "not found",
        "does not exist",
        "no such image",
        "name unknown",
    ];
    // The registry refused the login, or wanted one and got none (the engine passes
    // the registry's 401 on in its message). Docker Hub's "pull access denied" is left
    // out: it says the same for a repository that does not exist.
    const UNAUTHORIZED: &[&str] = &[
        "unauthorized",
        "authentication required",
        "no basic auth credentials",
        "incorrect username or password",
    ];
    let transport = TRANSPORT.iter().any(|t| lower.contains(t));
    let unauthorized = status == Some(401) || UNAUTHORIZED.iter().any(|t| lower.contains(t));
    let not_found = status == Some(404) || NOT_FOUND.iter().any(|t| lower.contains(t));
    if unauthorized && !transport {
        RuntimeError::PullUnauthorized {
            image: image.to_owned(),
            message,
        }
    } else if not_found && !transport {
        RuntimeError::ImageNotFound {
            image: image.to_owned(),
        }
    } else {
        RuntimeError::PullFailed {
            image: image.to_owned(),
            message,
        }
    }
}

pub(super) fn status_of(e: &BollardError) -> Option<u16> {
    match e {
        BollardError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

pub(super) fn message_of(e: &BollardError) -> &str {
    match e {
        BollardError::DockerResponseServerError { message, .. } => message,
        _ => "",
    }
}

/// Errors on a container endpoint: 404 means the container is gone.
pub(super) fn container_error(id: &str, e: BollardError) -> RuntimeError {
    if status_of(&e) == Some(404) {
        RuntimeError::NoSuchContainer(id.to_owned())
    } else {
        map_error(e)
    }
}

/// Generic mapping: transport failures are `Unavailable`, engine answers are
/// `Docker` with the engine's message.
pub(super) fn map_error(e: BollardError) -> RuntimeError {
    if is_unreachable(&e) {
        return RuntimeError::Unavailable(error_chain(&e));
    }
    match e {
        BollardError::DockerResponseServerError {
            status_code,
            message,
        } => {
            if message.is_empty() {
                RuntimeError::Docker(format!("docker engine answered HTTP {status_code}"))
            } else {
                RuntimeError::Docker(message)
            }
        }
        BollardError::DockerStreamError { error } => RuntimeError::Docker(error),
        other => RuntimeError::Docker(error_chain(&other)),
    }
}

/// True when the engine could not be reached or the connection broke.
fn is_unreachable(e: &BollardError) -> bool {
    match e {
        // hyper errors are all transport-level: connect failures, or the
        // connection dropping mid-request/response.
        BollardError::SocketNotFoundError(_)
        | BollardError::HyperLegacyError { .. }
        | BollardError::HyperResponseError { .. }
        | BollardError::RequestTimeoutError => true,
        BollardError::IOError { .. } => has_connection_io_error(e),
        _ => false,
    }
}

fn has_connection_io_error(e: &(dyn StdError + 'static)) -> bool {
    use std::io::ErrorKind::*;
    let mut current: Option<&(dyn StdError + 'static)> = Some(e);
    while let Some(err) = current {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                ConnectionRefused
                    | ConnectionReset
                    | ConnectionAborted
                    | NotConnected
                    | NotFound
                    | BrokenPipe
                    | TimedOut
                    | AddrNotAvailable
                    | UnexpectedEof
                    | PermissionDenied
            )
        {
            return true;
        }
        current = err.source();
    }
    false
}

/// "outer: inner: innermost" for an error and its sources.
fn error_chain(e: &(dyn StdError + 'static)) -> String {
    let mut text = e.to_string();
    let mut current = e.source();
    while let Some(err) = current {
        let part = err.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        current = err.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pull_error_classification() {
        let server = |code: u16, msg: &str| BollardError::DockerResponseServerError {
            status_code: code,
            message: msg.to_owned(),
        };
        let refused = server(
            500,
            "Get \"http://127.0.0.1:5999/v2/\": dial tcp 127.0.0.1:5999: connect: connection refused",
        );
        assert!(matches!(
            classify_pull_error("x", refused),
            RuntimeError::PullFailed { .. }
        ));
        let denied = server(
            404,
            "pull access denied for nothing, repository does not exist or may require 'docker login'",
        );
        assert!(matches!(
            classify_pull_error("x", denied),
            RuntimeError::ImageNotFound { .. }
        ));
        let manifest = BollardError::DockerStreamError {
            error: "manifest for foo:1 not found: manifest unknown: manifest unknown".to_owned(),
        };
        assert!(matches!(
            classify_pull_error("x", manifest),
            RuntimeError::ImageNotFound { .. }
        ));
        // What Docker 20.10 says for a registry with basic auth: a wrong password, and
        // no login at all.
        for refused in [
            "unauthorized: authentication required",
            "Head \"http://127.0.0.1:5931/v2/probe/example/manifests/1\": no basic auth credentials",
            "unauthorized: incorrect username or password",
        ] {
            let classified = classify_pull_error("x", server(500, refused));
            assert!(
                matches!(classified, RuntimeError::PullUnauthorized { .. }),
                "{refused}: {classified:?}"
            );
        }
        assert!(matches!(
            classify_pull_error("x", server(401, "")),
            RuntimeError::PullUnauthorized { .. }
        ));
        // Docker Hub says "denied" for a repository that does not exist, too: not found.
        let hub = server(
            404,
            "pull access denied for nothing, repository does not exist or may require 'docker login': denied: requested access to the resource is denied",
        );
        assert!(matches!(
            classify_pull_error("x", hub),
            RuntimeError::ImageNotFound { .. }
        ));
        // A broken connection to the registry is never about credentials.
        let tls = server(500, "Get \"https://r.example/v2/\": x509: unauthorized CA");
        assert!(matches!(
            classify_pull_error("x", tls),
            RuntimeError::PullFailed { .. }
        ));
    }
}
