//! The admin API on a root-only Unix socket, and liveness/readiness probes on TCP.
//!
//! `GET /v1/peers` and `GET /v1/status` answer JSON (types in [`super::api`]) built at request
//! time from the [`PeerMonitor`] and the dataplane; anything else gets a JSON 404 or 405. The
//! socket is created mode 0600 (its directory 0700 when meshd creates it), so only root reads
//! meshd's state. `/healthz` and `/readyz` serve kubelet's probes from a [`Health`].

use super::api::{
    ErrorBody, ExportsResponse, HealthView, PeersResponse, StatusView, TranslationView,
};
use super::monitor::PeerMonitor;
use crate::discovery::clusterset::Clusterset;
use crate::node::NodeState;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Whether the daemon is live and ready, for the probes and `/v1/status`.
#[derive(Debug)]
pub struct Health {
    dataplane_running: AtomicBool,
    routes_programmed: AtomicBool,
}

impl Health {
    /// Live (the dataplane just started), not yet ready.
    pub fn new() -> Arc<Self> {
        Arc::new(Health {
            dataplane_running: AtomicBool::new(true),
            routes_programmed: AtomicBool::new(false),
        })
    }

    /// The routes for every peer's allowed CIDRs are in place: traffic can flow.
    pub fn routes_programmed(&self) {
        self.routes_programmed.store(true, Ordering::Relaxed);
    }

    /// A dataplane thread stopped: packets no longer move.
    pub fn dataplane_stopped(&self) {
        self.dataplane_running.store(false, Ordering::Relaxed);
    }

    pub fn view(&self) -> HealthView {
        let live = self.dataplane_running.load(Ordering::Relaxed);
        HealthView {
            live,
            ready: live && self.routes_programmed.load(Ordering::Relaxed),
        }
    }

    /// Chains a panic hook that marks the dataplane stopped when one of its threads (named
    /// `meshd-*`) panics; the default hook still prints the message.
    pub fn watch_dataplane_threads(self: &Arc<Self>) {
        let health = self.clone();
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current()
                .name()
                .is_some_and(|n| n.starts_with("meshd-"))
            {
                health.dataplane_stopped();
            }
            previous(info);
        }));
    }
}

/// Facts about the daemon that `/v1/status` reports besides the dataplane's.
#[derive(Debug, Clone)]
pub struct Identity {
    pub cluster: String,
    pub interface: String,
    pub local_cidrs: Vec<ipnet::IpNet>,
    pub mtu: u16,
    pub dns_listen: Option<std::net::SocketAddr>,
    pub metrics_listen: Option<std::net::SocketAddr>,
}

#[derive(Debug, Clone)]
struct AdminState {
    monitor: Arc<PeerMonitor>,
    health: Arc<Health>,
    clusterset: Arc<Clusterset>,
    identity: Identity,
    node: NodeState,
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (
        status,
        Json(ErrorBody {
            error: message.into(),
        }),
    )
        .into_response()
}

async fn peers(State(state): State<AdminState>) -> Json<PeersResponse> {
    let dataplane = state.monitor.dataplane();
    let translation = dataplane.spec().translation;
    Json(PeersResponse {
        peers: state.monitor.peers(),
        node: Some(state.node.read().clone()),
        translation: (!translation.is_empty()).then(|| TranslationView {
            global_cidrs: translation.cidrs().to_vec(),
            outbound_packets: dataplane.translated.outbound(),
            inbound_packets: dataplane.translated.inbound(),
        }),
    })
}

async fn status(State(state): State<AdminState>) -> Json<StatusView> {
    let dataplane = state.monitor.dataplane();
    let (underlay_mtu, underlay) = crate::netlink::underlay_mtu(&state.identity.interface).await;
    Json(StatusView {
        cluster: state.identity.cluster.clone(),
        interface: state.identity.interface.clone(),
        listen_port: dataplane.listen_port(),
        public_key: dataplane
            .spec()
            .private_key
            .map(|k| k.public_key().to_base64()),
        version: env!("CARGO_PKG_VERSION").to_string(),
        health: state.health.view(),
        local_cidrs: state.identity.local_cidrs.clone(),
        mtu: state.identity.mtu,
        underlay_mtu,
        underlay,
        dns_listen: state.identity.dns_listen.map(|a| a.to_string()),
        metrics_listen: state.identity.metrics_listen.map(|a| a.to_string()),
    })
}

async fn exports(State(state): State<AdminState>) -> Json<ExportsResponse> {
    let view = (**state.clusterset.snapshot().load()).clone();
    Json(ExportsResponse {
        conflicts: crate::discovery::kubernetes::conflicts(&view),
        view,
        sync: state.clusterset.sync_status(),
    })
}

/// The admin API's routes.
pub fn admin_router(
    monitor: Arc<PeerMonitor>,
    health: Arc<Health>,
    clusterset: Arc<Clusterset>,
    identity: Identity,
    node: NodeState,
) -> Router {
    Router::new()
        .route("/v1/peers", get(peers))
        .route("/v1/status", get(status))
        .route("/v1/exports", get(exports))
        .fallback(|uri: axum::http::Uri| async move {
            error(
                StatusCode::NOT_FOUND,
                format!("no such endpoint {uri}; meshd serves GET /v1/peers, /v1/status and /v1/exports"),
            )
        })
        .method_not_allowed_fallback(|method: axum::http::Method| async move {
            error(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{method} is not allowed; the admin API is read-only (GET)"),
            )
        })
        .with_state(AdminState {
            monitor,
            health,
            clusterset,
            identity,
            node,
        })
}

/// The admin API of a route agent: `GET /v1/peers` with no peers (the tunnel ends on the
/// gateway) and this node's state, which is what `meshctl peers` shows on any node.
pub fn agent_router(node: NodeState) -> Router {
    Router::new()
        .route(
            "/v1/peers",
            get(|State(node): State<NodeState>| async move {
                Json(PeersResponse {
                    peers: Vec::new(),
                    node: Some(node.read().clone()),
                    translation: None,
                })
            }),
        )
        .fallback(|uri: axum::http::Uri| async move {
            error(
                StatusCode::NOT_FOUND,
                format!("no such endpoint {uri} on a route agent: it serves GET /v1/peers (its node state); ask the gateway node's meshd for /v1/status and /v1/exports"),
            )
        })
        .method_not_allowed_fallback(|method: axum::http::Method| async move {
            error(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{method} is not allowed; the admin API is read-only (GET)"),
            )
        })
        .with_state(node)
}

/// Why the admin socket could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum AdminSocketError {
    #[error("cannot create the admin socket's directory {path}: {source}; create it (mode 0700) or choose another path with admin_socket / --admin-socket")]
    Directory {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("another meshd already serves the admin socket {0}: stop it or give this one another admin_socket / --admin-socket")]
    InUse(PathBuf),
    #[error("cannot open the admin socket {path}: {source}; choose a writable path with admin_socket / --admin-socket")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Opens the admin socket at `path`, mode 0600, replacing a stale socket left by a dead meshd.
/// The socket is bound under a temporary name and renamed into place once its mode is set, so
/// it is never reachable with looser permissions.
pub fn bind_admin_socket(path: &Path) -> Result<tokio::net::UnixListener, AdminSocketError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|source| AdminSocketError::Directory {
                    path: dir.to_path_buf(),
                    source,
                })?;
        }
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(AdminSocketError::InUse(path.to_path_buf()));
    }
    let bind_err = |source| AdminSocketError::Bind {
        path: path.to_path_buf(),
        source,
    };
    let mut staging = path.as_os_str().to_owned();
    staging.push(format!(".{}.tmp", std::process::id()));
    let staging = PathBuf::from(staging);
    // A leftover from a crashed start with the same PID; absence is the normal case.
    let _ = std::fs::remove_file(&staging);
    let listener = tokio::net::UnixListener::bind(&staging).map_err(bind_err)?;
    let placed = std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::rename(&staging, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&staging);
        return Err(bind_err(e));
    }
    Ok(listener)
}

/// Serves the admin API on `listener` until the task is dropped.
pub async fn serve_admin(listener: tokio::net::UnixListener, router: Router) -> io::Result<()> {
    axum::serve(listener, router).await
}

/// The probe routes: `/healthz` (live) and `/readyz` (ready), 200 or 503 with the health JSON.
pub fn health_router(health: Arc<Health>) -> Router {
    let probe = |pick: fn(&HealthView) -> bool| {
        move |State(health): State<Arc<Health>>| async move {
            let view = health.view();
            let code = if pick(&view) {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            (code, Json(view))
        }
    };
    Router::new()
        .route("/healthz", get(probe(|v| v.live)))
        .route("/readyz", get(probe(|v| v.ready)))
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "meshd's probe port serves GET /healthz and GET /readyz",
            )
        })
        .with_state(health)
}

/// Serves the probes on `listener` until the task is dropped.
pub async fn serve_health(
    listener: tokio::net::TcpListener,
    health: Arc<Health>,
) -> io::Result<()> {
    crate::http::serve(
        listener,
        health_router(health),
        crate::listener::Limits::PROBES,
        "health",
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_needs_routes_and_a_live_dataplane() {
        let health = Health::new();
        assert_eq!(
            health.view(),
            HealthView {
                live: true,
                ready: false
            }
        );
        health.routes_programmed();
        assert!(health.view().ready);
        health.dataplane_stopped();
        assert_eq!(
            health.view(),
            HealthView {
                live: false,
                ready: false
            }
        );
    }

    #[tokio::test]
    async fn the_socket_is_private_and_a_live_one_is_not_stolen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/meshd.sock");
        let listener = bind_admin_socket(&path).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        let err = bind_admin_socket(&path).unwrap_err().to_string();
        assert!(err.contains("another meshd"), "{err}");
        drop(listener);
        // A stale socket (its meshd gone) is replaced.
        bind_admin_socket(&path).unwrap();
    }
}
