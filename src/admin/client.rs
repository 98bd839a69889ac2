//! A minimal, blocking client for meshd's admin API, for meshctl and the tests.
//!
//! One HTTP/1.0 `GET` per connection over the Unix socket (the server closes it after the
//! answer), so no HTTP library is needed on the client side. Errors say which socket was tried
//! and what to do.

use super::api::{ErrorBody, ExportsResponse, PeersResponse, StatusView};
use serde::de::DeserializeOwned;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a request may take before meshd is presumed stuck.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Why the admin API could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no meshd admin socket at {0}: is meshd running? If its admin_socket is set elsewhere, pass that path with --socket")]
    NotFound(PathBuf),
    #[error("permission denied on meshd's admin socket {0}: it is root-only (mode 0600); are you root? Run meshctl with sudo")]
    Permission(PathBuf),
    #[error("meshd is not running: nothing answers on its admin socket {0} (a stale socket from a meshd that stopped); start meshd")]
    Refused(PathBuf),
    #[error("cannot talk to meshd on {path}: {source}; is meshd running and healthy?")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("meshd on {path} answered {status}: {message}")]
    Status {
        path: PathBuf,
        status: u16,
        message: String,
    },
    #[error("meshd on {path} answered something this meshctl cannot read ({problem}); are meshd and meshctl the same version?")]
    Malformed { path: PathBuf, problem: String },
}

/// The admin API at one socket path.
#[derive(Debug, Clone)]
pub struct AdminClient {
    path: PathBuf,
}

impl AdminClient {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        AdminClient { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn peers(&self) -> Result<PeersResponse, ClientError> {
        self.get("/v1/peers")
    }

    pub fn status(&self) -> Result<StatusView, ClientError> {
        self.get("/v1/status")
    }

    pub fn exports(&self) -> Result<ExportsResponse, ClientError> {
        self.get("/v1/exports")
    }

    fn get<T: DeserializeOwned>(&self, target: &str) -> Result<T, ClientError> {
        let io_err = |source: io::Error| ClientError::Io {
            path: self.path.clone(),
            source,
        };
        let mut stream = UnixStream::connect(&self.path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => ClientError::NotFound(self.path.clone()),
            io::ErrorKind::PermissionDenied => ClientError::Permission(self.path.clone()),
            io::ErrorKind::ConnectionRefused => ClientError::Refused(self.path.clone()),
            _ => io_err(e),
        })?;
        stream.set_read_timeout(Some(TIMEOUT)).map_err(io_err)?;
        stream.set_write_timeout(Some(TIMEOUT)).map_err(io_err)?;
        write!(stream, "GET {target} HTTP/1.0\r\nHost: meshd\r\n\r\n").map_err(io_err)?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).map_err(io_err)?;
        let (status, body) = split_response(&raw).ok_or_else(|| ClientError::Malformed {
            path: self.path.clone(),
            problem: "not an HTTP response".into(),
        })?;
        if status != 200 {
            let message = serde_json::from_slice::<ErrorBody>(body)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(body).into_owned());
            return Err(ClientError::Status {
                path: self.path.clone(),
                status,
                message,
            });
        }
        serde_json::from_slice(body).map_err(|e| ClientError::Malformed {
            path: self.path.clone(),
            problem: e.to_string(),
        })
    }
}

/// The status code and body of a complete HTTP/1.x response.
pub(crate) fn split_response(raw: &[u8]) -> Option<(u16, &[u8])> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let status_line = head.lines().next()?;
    let mut parts = status_line.split_whitespace();
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    let status = parts.next()?.parse().ok()?;
    Some((status, &raw[end + 4..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_split_into_status_and_body() {
        let raw =
            b"HTTP/1.0 404 Not Found\r\ncontent-type: application/json\r\n\r\n{\"error\":\"x\"}";
        assert_eq!(split_response(raw), Some((404, &b"{\"error\":\"x\"}"[..])));
        assert_eq!(split_response(b"garbage"), None);
        assert_eq!(split_response(b"SSH-2.0 x\r\n\r\n"), None);
    }

    #[test]
    fn a_missing_socket_names_the_path_and_the_fix() {
        let err = AdminClient::new("/nonexistent/meshd.sock")
            .peers()
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/meshd.sock"), "{err}");
        assert!(err.contains("is meshd running?"), "{err}");
    }
}
