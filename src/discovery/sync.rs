//! Catalog sync between gateways, with no broker: each meshd serves its local catalog on its
//! tunnel address and long-polls every peer's.
//!
//! `GET /v1/catalog` on `tunnel_address:discovery_port` (TCP, HTTP/1) answers with the local
//! catalog as JSON and an `ETag` naming its version: this meshd's instance (random at start) and
//! the catalog's generation. A request with `If-None-Match` carrying the current tag is held
//! until the catalog changes or [`HOLD`] passes (then `304 Not Modified`): an unchanged catalog
//! costs one small exchange every 20 s, and a restarted peer (new instance, generations counted
//! from 1 again) is always fetched anew. Only a configured peer's `tunnel_address` may ask (403 for
//! anyone else); since the request arrives through WireGuard, whose cryptokey routing only lets
//! a peer send from its allowed CIDRs, the address proves which peer is asking.
//!
//! The client side ([`follow_peer`]) connects from our own tunnel address, at most once a second
//! per peer. A catalog is taken only when it is at most [`MAX_CATALOG_BYTES`], parses, names the
//! peer's cluster and passes [`ExportCatalog::check_outline`]; a refused catalog is logged,
//! counted in `meshd_catalog_sync_errors_total{peer,reason}`, and the last good one stays. Inside
//! a taken catalog, a service that fails [`ExportedService::check`](super::catalog::ExportedService::check)
//! or hands out an address outside the peer's allowed CIDRs (it would route nowhere, or into
//! another cluster) is quarantined: left out, logged and counted, and the others are taken.

use super::catalog::ExportCatalog;
use super::clusterset::Clusterset;
use super::probe::Prober;
use crate::dataplane::Translation;
use crate::http::client::HttpError;
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use ipnet::IpNet;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// How long the server holds a request for an unchanged catalog.
pub const HOLD: Duration = Duration::from_secs(20);
/// How long the client waits for an answer (the hold plus slack for a slow peer).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// The largest catalog accepted from a peer: room for tens of thousands of services.
pub const MAX_CATALOG_BYTES: usize = 8 << 20;
/// Least time between two requests to one peer, however often its catalog changes.
const MIN_FETCH_INTERVAL: Duration = Duration::from_secs(1);
/// Pause before asking again after a failure or a refused catalog.
const RETRY_AFTER: Duration = Duration::from_secs(1);
const RETRY_AFTER_REFUSAL: Duration = Duration::from_secs(5);

/// Why a sync attempt failed; the label of `meshd_catalog_sync_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SyncFailure {
    /// No connection or no complete answer (the peer is down, or its meshd is not listening).
    Unreachable,
    /// The peer answered with an HTTP error (e.g. 403: it does not list us as a peer).
    Refused,
    Oversized,
    Malformed,
    Inconsistent,
    /// One service of an otherwise good catalog was left out (counted once per service).
    Quarantined,
}

impl SyncFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            SyncFailure::Unreachable => "unreachable",
            SyncFailure::Refused => "refused",
            SyncFailure::Oversized => "oversized",
            SyncFailure::Malformed => "malformed",
            SyncFailure::Inconsistent => "inconsistent",
            SyncFailure::Quarantined => "quarantined",
        }
    }
}

/// A failed attempt: the kind and the whole story.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SyncError {
    pub kind: SyncFailure,
    pub message: String,
}

fn fail(kind: SyncFailure, message: impl Into<String>) -> SyncError {
    SyncError {
        kind,
        message: message.into(),
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    peer: String,
    reason: String,
}

/// `meshd_catalog_sync_errors_total{peer,reason}`.
#[derive(Debug, Clone, Default)]
pub struct SyncErrors(Family<ErrorLabels, Counter>);

impl SyncErrors {
    pub fn count(&self, peer: &str, kind: SyncFailure) {
        self.0
            .get_or_create(&ErrorLabels {
                peer: peer.to_string(),
                reason: kind.as_str().to_string(),
            })
            .inc();
    }

    #[cfg(test)]
    fn get(&self, peer: &str, kind: SyncFailure) -> u64 {
        self.0
            .get_or_create(&ErrorLabels {
                peer: peer.to_string(),
                reason: kind.as_str().to_string(),
            })
            .get()
    }

    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "meshd_catalog_sync_errors",
            "Failed catalog syncs with a peer, by reason.",
            self.0.clone(),
        );
    }
}

/// One peer the catalog is synced with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncPeer {
    /// The peer's name, which is its cluster's name.
    pub name: String,
    pub tunnel_address: IpAddr,
    pub allowed_cidrs: Vec<IpNet>,
}

/// A peer's catalog as taken: the services that passed, and why each of the others was left
/// out.
#[derive(Debug, PartialEq, Eq)]
pub struct Accepted {
    pub catalog: ExportCatalog,
    pub quarantined: Vec<String>,
}

/// Parses and checks a peer's answer body. A catalog that is too large, not JSON, for another
/// cluster or with too many services is refused whole; a service that fails its own checks or
/// hands out an address outside the peer's allowed CIDRs is quarantined (left out, with the
/// reason) and the rest is taken.
pub fn accept_catalog(peer: &SyncPeer, body: &[u8]) -> Result<Accepted, SyncError> {
    if body.len() > MAX_CATALOG_BYTES {
        return Err(fail(
            SyncFailure::Oversized,
            format!(
                "catalog of {} bytes is over the {MAX_CATALOG_BYTES}-byte limit",
                body.len()
            ),
        ));
    }
    let mut catalog: ExportCatalog = serde_json::from_slice(body)
        .map_err(|e| fail(SyncFailure::Malformed, format!("catalog is not valid: {e}")))?;
    let inconsistent = |m: String| fail(SyncFailure::Inconsistent, m);
    if catalog.cluster != peer.name {
        return Err(inconsistent(format!(
            "catalog is for cluster {:?} but this peer is '{}' (a peer's name must be its cluster name)",
            catalog.cluster, peer.name
        )));
    }
    if catalog.generation == 0 {
        return Err(inconsistent("catalog has generation 0".into()));
    }
    catalog.check_outline().map_err(inconsistent)?;
    let quarantined = catalog.quarantine(|s| {
        match s
            .addresses()
            .find(|ip| !peer.allowed_cidrs.iter().any(|net| net.contains(ip)))
        {
            Some(stray) => Err(format!(
                "service {:?}/{:?} hands out {stray}, which is outside the peer's allowed_cidrs; add the peer's service CIDR to its allowed_cidrs",
                s.namespace, s.name
            )),
            None => Ok(()),
        }
    });
    Ok(Accepted {
        catalog,
        quarantined,
    })
}

/// What one request to a peer brought back.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// A new catalog, with its version tag.
    Changed(Accepted, String),
    Unchanged,
}

/// Asks `peer` once for its catalog, from `local` (our tunnel address); with `known`, the tag
/// of the catalog we have, the peer holds the request while that is still current.
pub async fn fetch(
    local: IpAddr,
    peer: &SyncPeer,
    port: u16,
    known: Option<&str>,
) -> Result<Answer, SyncError> {
    let to = SocketAddr::new(peer.tunnel_address, port);
    let unreachable = |e: std::io::Error| {
        fail(
            SyncFailure::Unreachable,
            format!("cannot reach {to} through the tunnel: {e}"),
        )
    };
    let socket = match to {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .map_err(unreachable)?;
    socket
        .bind(SocketAddr::new(local, 0))
        .map_err(unreachable)?;
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(to))
        .await
        .map_err(|_| {
            unreachable(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connect timed out",
            ))
        })?
        .map_err(unreachable)?;
    let condition = known.map(|tag| [("if-none-match", tag)]);
    let answer = crate::http::client::get(
        stream,
        &to.to_string(),
        "/v1/catalog",
        condition.as_ref().map_or(&[][..], |c| &c[..]),
        MAX_CATALOG_BYTES,
        ANSWER_TIMEOUT,
    )
    .await
    .map_err(|e| match e {
        HttpError::Timeout(_) => unreachable(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "no answer",
        )),
        HttpError::TooLarge(_) => fail(
            SyncFailure::Oversized,
            format!("{to} sent a catalog over the {MAX_CATALOG_BYTES}-byte limit"),
        ),
        HttpError::Protocol(_) | HttpError::Header { .. } => fail(
            SyncFailure::Malformed,
            format!("{to} did not answer HTTP (is something else on discovery_port?): {e}"),
        ),
    })?;
    let (status, body) = (answer.status, &answer.body[..]);
    match status {
        200 => {
            // The tag goes back in our next request: printable ASCII only.
            let tag = answer
                .header("etag")
                .filter(|t| t.bytes().all(|b| b.is_ascii_graphic()))
                .ok_or_else(|| {
                    fail(
                        SyncFailure::Malformed,
                        format!("{to} sent a catalog without a valid ETag"),
                    )
                })?;
            let tag = tag.to_string();
            // Parsing and checking up to 8 MiB takes a while: off the runtime.
            let (peer, body) = (peer.clone(), answer.body.clone());
            let accepted = tokio::task::spawn_blocking(move || accept_catalog(&peer, &body))
                .await
                .map_err(|e| {
                    fail(
                        SyncFailure::Malformed,
                        format!("checking the catalog of {to} failed: {e}"),
                    )
                })??;
            Ok(Answer::Changed(accepted, tag))
        }
        304 => Ok(Answer::Unchanged),
        other => Err(fail(
            SyncFailure::Refused,
            format!(
                "{to} answered {other}: {:?}",
                String::from_utf8_lossy(&body[..body.len().min(200)]).trim()
            ),
        )),
    }
}

/// Keeps `peer`'s catalog in `hub` up to date, until the task is dropped. A new request starts
/// at once whenever the probe sees a peer come or go, so a restarted peer's catalog is fetched
/// as soon as it answers rather than after a stale request times out.
pub async fn follow_peer(
    hub: Arc<Clusterset>,
    prober: Arc<Prober>,
    errors: SyncErrors,
    local: IpAddr,
    port: u16,
    peer: SyncPeer,
) {
    let mut known: Option<String> = None;
    let mut probes = prober.changes();
    // After a new catalog, the next request waits until a second has passed since the last
    // one began; a failure has its own pause, and a probe change (a peer came up) asks at once.
    let mut not_before: Option<tokio::time::Instant> = None;
    loop {
        if let Some(at) = not_before.take() {
            tokio::time::sleep_until(at).await;
        }
        let started = tokio::time::Instant::now();
        let outcome = tokio::select! {
            r = fetch(local, &peer, port, known.as_deref()) => r,
            _ = probes.changed() => continue,
        };
        let pause = match outcome {
            Ok(Answer::Changed(
                Accepted {
                    catalog,
                    quarantined,
                },
                tag,
            )) => {
                tracing::info!(peer = %peer.name, generation = catalog.generation, services = catalog.services.len(), quarantined = quarantined.len(), "catalog received");
                for reason in &quarantined {
                    errors.count(&peer.name, SyncFailure::Quarantined);
                    tracing::warn!(peer = %peer.name, reason = %reason, "service in the peer's catalog left out");
                }
                known = Some(tag);
                hub.remote_answered(&peer.name, Some(catalog));
                not_before = Some(started + MIN_FETCH_INTERVAL);
                continue;
            }
            Ok(Answer::Unchanged) => {
                hub.remote_answered(&peer.name, None);
                continue;
            }
            Err(e) => {
                errors.count(&peer.name, e.kind);
                if e.kind == SyncFailure::Unreachable {
                    tracing::debug!(peer = %peer.name, error = %e, "catalog sync failed");
                    hub.remote_failed(&peer.name, e.message);
                    RETRY_AFTER
                } else {
                    tracing::warn!(peer = %peer.name, reason = e.kind.as_str(), error = %e, "catalog from peer refused; keeping its last good catalog");
                    hub.remote_failed(&peer.name, e.message);
                    RETRY_AFTER_REFUSAL
                }
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = probes.changed() => {}
        }
    }
}

/// One [`follow_peer`] task per syncing peer, reconciled when the configuration changes.
pub struct Followers {
    hub: Arc<Clusterset>,
    prober: Arc<Prober>,
    errors: SyncErrors,
    local: IpAddr,
    port: u16,
    running: Vec<(SyncPeer, tokio::task::JoinHandle<()>)>,
}

impl Followers {
    /// Followers that ask from `local` (our tunnel address) to `port` on each peer.
    pub fn new(
        hub: Arc<Clusterset>,
        prober: Arc<Prober>,
        errors: SyncErrors,
        local: IpAddr,
        port: u16,
    ) -> Self {
        Followers {
            hub,
            prober,
            errors,
            local,
            port,
            running: Vec::new(),
        }
    }

    /// Stops the tasks of peers that went or changed and starts the new ones.
    pub fn set_peers(&mut self, peers: Vec<SyncPeer>) {
        self.running.retain(|(peer, task)| {
            let keep = peers.contains(peer);
            if !keep {
                task.abort();
            }
            keep
        });
        for peer in peers {
            if self.running.iter().any(|(p, _)| *p == peer) {
                continue;
            }
            let task = tokio::spawn(follow_peer(
                self.hub.clone(),
                self.prober.clone(),
                self.errors.clone(),
                self.local,
                self.port,
                peer.clone(),
            ));
            self.running.push((peer, task));
        }
    }
}

impl Drop for Followers {
    fn drop(&mut self) {
        for (_, task) in &self.running {
            task.abort();
        }
    }
}

#[derive(Clone)]
struct ServeState {
    catalog: watch::Receiver<ExportCatalog>,
    /// Peers know this cluster's addresses by their global ones (`global_cidrs`).
    translation: Arc<Translation>,
    prober: Arc<Prober>,
    instance: u64,
}

impl ServeState {
    fn tag(&self, generation: u64) -> String {
        format!("\"{:016x}-{generation}\"", self.instance)
    }
}

async fn serve_catalog(
    State(state): State<ServeState>,
    ConnectInfo(from): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    if !state.prober.is_peer_address(from.ip()) {
        return (
            StatusCode::FORBIDDEN,
            format!(
                "{} is not the tunnel_address of any of this gateway's peers",
                from.ip()
            ),
        )
            .into_response();
    }
    let mut rx = state.catalog.clone();
    let generation = rx.borrow_and_update().generation;
    if generation == 0 {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "the local catalog is not read yet",
        )
            .into_response();
    }
    let known = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok());
    if known == Some(state.tag(generation).as_str()) {
        if let Ok(Ok(())) = tokio::time::timeout(HOLD, rx.changed()).await {
        } else {
            return StatusCode::NOT_MODIFIED.into_response();
        }
    }
    let mut catalog = rx.borrow().clone();
    if !state.translation.is_empty() {
        catalog.map_addresses(|ip| state.translation.global(ip));
    }
    let tag = state.tag(catalog.generation);
    ([(header::ETAG, tag)], axum::Json(catalog)).into_response()
}

/// Serves the local catalog to peers on `listener` (bound to our tunnel address), with every
/// address a global range stands for in its global form.
pub async fn serve(
    listener: tokio::net::TcpListener,
    catalog: watch::Receiver<ExportCatalog>,
    prober: Arc<Prober>,
    translation: Arc<Translation>,
) -> std::io::Result<()> {
    let app = axum::Router::new()
        .route("/v1/catalog", axum::routing::get(serve_catalog))
        .with_state(ServeState {
            catalog,
            translation,
            prober,
            instance: rand_core::RngCore::next_u64(&mut rand_core::OsRng),
        });
    crate::http::serve(listener, app, SYNC_LIMITS, "catalog sync").await
}

/// The catalog sync port's limits: a few peers, each with one long-poll (held
/// [`HOLD`]) at a time.
const SYNC_LIMITS: crate::listener::Limits = crate::listener::Limits {
    connections: 64,
    per_client: 4,
    request_timeout: Duration::from_secs(5),
    connection_lifetime: Duration::from_secs(60),
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::catalog::{
        Endpoint, ExportedService, PortProtocol, ServicePort, ServiceType,
    };

    fn peer() -> SyncPeer {
        SyncPeer {
            name: "m2".into(),
            tunnel_address: "127.0.0.2".parse().unwrap(),
            allowed_cidrs: vec![
                "10.245.0.0/16".parse().unwrap(),
                "10.97.0.0/16".parse().unwrap(),
            ],
        }
    }

    fn catalog() -> ExportCatalog {
        ExportCatalog {
            cluster: "m2".into(),
            generation: 3,
            services: vec![ExportedService {
                namespace: "demo".into(),
                name: "web".into(),
                service_type: ServiceType::ClusterSetIP,
                ips: vec!["10.97.0.10".parse().unwrap()],
                ports: vec![],
                exported_at: None,
                endpoints: vec![Endpoint {
                    ip: "10.245.1.10".parse().unwrap(),
                    hostname: None,
                    ready: true,
                }],
                ..Default::default()
            }],
        }
    }

    fn refused(c: &ExportCatalog) -> SyncError {
        accept_catalog(&peer(), &serde_json::to_vec(c).unwrap()).unwrap_err()
    }

    /// The services of `c` that are taken, and the reasons of those left out.
    fn taken(c: &ExportCatalog) -> (Vec<String>, Vec<String>) {
        let accepted = accept_catalog(&peer(), &serde_json::to_vec(c).unwrap()).unwrap();
        let names = accepted
            .catalog
            .services
            .iter()
            .map(|s| s.name.clone())
            .collect();
        (names, accepted.quarantined)
    }

    #[test]
    fn a_good_catalog_is_taken() {
        let c = catalog();
        let body = serde_json::to_vec(&c).unwrap();
        assert_eq!(
            accept_catalog(&peer(), &body),
            Ok(Accepted {
                catalog: c,
                quarantined: vec![]
            })
        );
    }

    #[test]
    fn bad_catalogs_are_refused_with_the_reason() {
        let e = accept_catalog(&peer(), b"{\"cluster\":").unwrap_err();
        assert_eq!(e.kind, SyncFailure::Malformed);
        let e = accept_catalog(&peer(), &vec![b' '; MAX_CATALOG_BYTES + 1]).unwrap_err();
        assert_eq!(e.kind, SyncFailure::Oversized);

        let mut c = catalog();
        c.cluster = "m3".into();
        let e = refused(&c);
        assert_eq!(e.kind, SyncFailure::Inconsistent);
        assert!(e.message.contains("\"m3\" but this peer is 'm2'"), "{e}");

        let mut c = catalog();
        c.generation = 0;
        assert_eq!(refused(&c).kind, SyncFailure::Inconsistent);

        let mut c = catalog();
        let one = c.services[0].clone();
        c.services = (0..=crate::discovery::catalog::MAX_SERVICES)
            .map(|i| ExportedService {
                name: format!("s{i}"),
                ..one.clone()
            })
            .collect();
        assert!(refused(&c).message.contains("over the limit of 10000"));
    }

    /// One bad service is left out with its reason (peer strings escaped); the others stay.
    #[test]
    fn a_bad_service_is_quarantined_and_the_rest_taken() {
        let good = catalog().services[0].clone();
        let bad = |edit: fn(&mut ExportedService)| {
            let mut s = good.clone();
            s.name = "bad".into();
            edit(&mut s);
            s
        };
        let cases: [(ExportedService, &str); 11] = [
            (
                bad(|s| {
                    s.exported_labels =
                        std::collections::BTreeMap::from([("bad key!".into(), "x".into())]);
                }),
                "exported labels or annotations",
            ),
            (
                bad(|s| {
                    s.exported_annotations = (0..100)
                        .map(|i| (format!("note-{i}"), "x".repeat(1_000)))
                        .collect();
                }),
                "exported labels or annotations",
            ),
            (
                bad(|s| s.traffic_distribution = Some("Prefer Close\nforged".into())),
                "trafficDistribution",
            ),
            (
                bad(|s| s.session_affinity_timeout = Some(0)),
                "session affinity timeout",
            ),
            (
                bad(|s| {
                    s.ports = vec![ServicePort {
                        port: 80,
                        app_protocol: Some("x".repeat(200)),
                        ..Default::default()
                    }]
                }),
                "appProtocol",
            ),
            (
                bad(|s| s.endpoints[0].ip = "10.244.1.10".parse().unwrap()),
                "10.244.1.10, which is outside",
            ),
            (good.clone(), "listed twice"),
            (
                bad(|s| s.name = "Web\nforged log line".into()),
                "\"Web\\nforged log line\"",
            ),
            (bad(|s| s.ips.clear()), "without service IPs"),
            (
                bad(|s| s.endpoints = vec![s.endpoints[0].clone(); 10_001]),
                "over the limits",
            ),
            (
                bad(|s| {
                    s.ports = vec![
                        ServicePort {
                            name: None,
                            protocol: PortProtocol::Tcp,
                            port: 80,
                            ..Default::default()
                        };
                        1_001
                    ]
                }),
                "over the limits",
            ),
        ];
        for (service, reason) in cases {
            let mut c = catalog();
            c.services.push(service);
            let (names, quarantined) = taken(&c);
            assert_eq!(names, ["web"], "{reason}");
            assert_eq!(quarantined.len(), 1, "{reason}");
            assert!(quarantined[0].contains(reason), "{}", quarantined[0]);
        }
    }

    /// A follower of a fake peer at `ip` (from `ip` + 1) whose catalog server answers its `n`th
    /// request (from 0) with `answer(n)`: the hub, the error counters, the follower's task and
    /// how many requests the server has had.
    async fn follow_fake_peer(
        ip: [u8; 4],
        answer: fn(u64) -> Response,
    ) -> (
        Arc<Clusterset>,
        SyncErrors,
        tokio::task::JoinHandle<()>,
        Arc<std::sync::atomic::AtomicU64>,
    ) {
        use std::sync::atomic::{AtomicU64, Ordering};
        let addr = IpAddr::from(ip);
        let listener = tokio::net::TcpListener::bind((addr, 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let asked = Arc::new(AtomicU64::new(0));
        let counter = asked.clone();
        let app = axum::Router::new().route(
            "/v1/catalog",
            axum::routing::get(move || {
                let n = counter.fetch_add(1, Ordering::SeqCst);
                async move { answer(n) }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        let m2 = crate::discovery::probe::ProbeTarget {
            name: "m2".into(),
            key: crate::keys::PrivateKey::generate().public_key(),
            addr,
        };
        let prober = Prober::new(port, vec![]);
        let hub = Clusterset::new("m1", prober.clone());
        hub.set_peers(&[m2]);
        let errors = SyncErrors::default();
        let peer = SyncPeer {
            tunnel_address: addr,
            ..peer()
        };
        let local = IpAddr::from([ip[0], ip[1], ip[2], ip[3] + 1]);
        let task = tokio::spawn(follow_peer(
            hub.clone(),
            prober,
            errors.clone(),
            local,
            port,
            peer,
        ));
        (hub, errors, task, asked)
    }

    /// A peer that sends a good catalog, then garbage: the garbage is counted and logged, and
    /// the good catalog stays in the view.
    #[tokio::test]
    async fn a_bad_catalog_is_counted_and_the_last_good_one_stays() {
        let (hub, errors, task, _) = follow_fake_peer([127, 0, 0, 5], |n| {
            if n == 0 {
                ([(header::ETAG, "\"a-3\"")], axum::Json(catalog())).into_response()
            } else {
                ([(header::ETAG, "\"a-4\"")], "{\"cluster\": 42}").into_response()
            }
        })
        .await;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while errors.get("m2", SyncFailure::Malformed) == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the bad catalog was never counted"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        task.abort();
        let status = &hub.sync_status()[0];
        assert_eq!(status.generation, Some(3), "{status:?}");
        assert!(
            status
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("not valid")),
            "{status:?}"
        );
        assert_eq!(hub.build().clusters[1].catalog, Arc::new(catalog()));
    }

    /// A peer whose catalog changes on every request (a new generation each time): it is asked
    /// at most once a second, not as fast as it answers.
    #[tokio::test]
    async fn a_peer_that_keeps_changing_is_asked_at_most_once_a_second() {
        let (_, _, task, asked) = follow_fake_peer([127, 0, 0, 7], |n| {
            let c = ExportCatalog {
                generation: n + 1,
                ..catalog()
            };
            ([(header::ETAG, format!("\"a-{}\"", n + 1))], axum::Json(c)).into_response()
        })
        .await;
        tokio::time::sleep(Duration::from_millis(3500)).await;
        task.abort();
        let n = asked.load(std::sync::atomic::Ordering::SeqCst);
        assert!((2..=4).contains(&n), "asked {n} times in 3.5 s");
    }

    /// A listener on loopback for the catalog sync, its port, and a prober that knows "m1" at
    /// 127.0.0.3 (the client the tests play).
    async fn loopback_server() -> (tokio::net::TcpListener, u16, Arc<Prober>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let prober = Prober::new(
            port,
            vec![crate::discovery::probe::ProbeTarget {
                name: "m1".into(),
                key: crate::keys::PrivateKey::generate().public_key(),
                addr: "127.0.0.3".parse().unwrap(),
            }],
        );
        (listener, port, prober)
    }

    /// A real server and client on loopback: the first ask gets the catalog, an unchanged one
    /// is held and answered as soon as it changes, and a stranger is refused.
    #[tokio::test]
    async fn long_poll_over_loopback() {
        let (listener, port, prober) = loopback_server().await;
        let (tx, rx) = watch::channel(catalog());
        tokio::spawn(serve(listener, rx, prober, Arc::default()));
        // The client is "m1" at 127.0.0.3 asking the server, which plays m2.
        let m2 = SyncPeer {
            tunnel_address: "127.0.0.1".parse().unwrap(),
            ..peer()
        };
        let me: IpAddr = "127.0.0.3".parse().unwrap();
        let Answer::Changed(first, tag) = fetch(me, &m2, port, None).await.unwrap() else {
            panic!("no catalog at the first ask");
        };
        assert_eq!(first.catalog, catalog());
        assert!(tag.ends_with("-3\""), "{tag}");

        // Another instance's tag for the same generation is not current: answered at once.
        let other = format!("\"{:016x}-3\"", 7);
        let again = fetch(me, &m2, port, Some(&other)).await.unwrap();
        assert!(matches!(again, Answer::Changed(..)), "{again:?}");

        let held = tokio::spawn(async move { fetch(me, &m2, port, Some(&tag)).await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!held.is_finished(), "an unchanged catalog was not held");
        let mut newer = catalog();
        newer.generation = 4;
        tx.send_replace(newer.clone());
        let Answer::Changed(got, _) = held.await.unwrap().unwrap() else {
            panic!("the held request did not get the new catalog");
        };
        assert_eq!(got.catalog, newer);

        let stranger: IpAddr = "127.0.0.4".parse().unwrap();
        let e = fetch(
            stranger,
            &SyncPeer {
                tunnel_address: "127.0.0.1".parse().unwrap(),
                ..peer()
            },
            port,
            None,
        )
        .await
        .unwrap_err();
        assert_eq!(e.kind, SyncFailure::Refused);
        assert!(e.message.contains("403"), "{e}");
    }

    /// A cluster with global ranges hands its peers the global form of every address (service
    /// IPs and endpoints), which the peer takes as inside its allowed_cidrs; the local catalog
    /// itself keeps the local addresses.
    #[tokio::test]
    async fn a_translated_cluster_serves_global_addresses() {
        let (listener, port, prober) = loopback_server().await;
        let map = |l: &str, g: &str| {
            crate::dataplane::GlobalCidr::new(l.parse().unwrap(), g.parse().unwrap()).unwrap()
        };
        let translation = Translation::new(vec![
            map("10.245.0.0/16", "100.82.0.0/16"),
            map("10.97.0.0/16", "100.92.0.0/16"),
        ])
        .unwrap();
        let (_tx, rx) = watch::channel(catalog());
        tokio::spawn(serve(listener, rx.clone(), prober, Arc::new(translation)));
        let m2 = SyncPeer {
            tunnel_address: "127.0.0.1".parse().unwrap(),
            allowed_cidrs: vec![
                "100.82.0.0/16".parse().unwrap(),
                "100.92.0.0/16".parse().unwrap(),
            ],
            ..peer()
        };
        let me: IpAddr = "127.0.0.3".parse().unwrap();
        let Answer::Changed(got, _) = fetch(me, &m2, port, None).await.unwrap() else {
            panic!("no catalog");
        };
        let web = &got.catalog.services[0];
        assert_eq!(web.ips, ["100.92.0.10".parse::<IpAddr>().unwrap()]);
        assert_eq!(
            web.endpoints[0].ip,
            "100.82.1.10".parse::<IpAddr>().unwrap()
        );
        assert!(got.quarantined.is_empty(), "{:?}", got.quarantined);
        assert_eq!(*rx.borrow(), catalog());
    }
}
