//! A blocking client for meshd's admin API, for meshctl and the tests: one `GET` per connection
//! over the Unix socket, with [`crate::http::client`] on a runtime of its own. Errors say which
//! socket was tried and what to do.

use super::api::{ErrorBody, ExportsResponse, PeersResponse, StatusView};
use crate::http::client::HttpError;
use serde::de::DeserializeOwned;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a request may take before meshd is presumed stuck.
const TIMEOUT: Duration = Duration::from_secs(5);
/// The largest answer taken (the exports of a large clusterset fit many times over).
const MAX_ANSWER_BYTES: usize = 64 << 20;

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
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(io_err)?;
        let answer = runtime.block_on(async {
            let stream = tokio::net::UnixStream::connect(&self.path)
                .await
                .map_err(|e| match e.kind() {
                    io::ErrorKind::NotFound => ClientError::NotFound(self.path.clone()),
                    io::ErrorKind::PermissionDenied => ClientError::Permission(self.path.clone()),
                    io::ErrorKind::ConnectionRefused => ClientError::Refused(self.path.clone()),
                    _ => io_err(e),
                })?;
            crate::http::client::get(stream, "meshd", target, &[], MAX_ANSWER_BYTES, TIMEOUT)
                .await
                .map_err(|e| match e {
                    HttpError::Timeout(_) => io_err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no answer within {TIMEOUT:?}"),
                    )),
                    other => ClientError::Malformed {
                        path: self.path.clone(),
                        problem: other.to_string(),
                    },
                })
        })?;
        let (status, body) = (answer.status, &answer.body[..]);
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

#[cfg(test)]
mod tests {
    use super::*;

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
