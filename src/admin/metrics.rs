//! Prometheus metrics, read from the dataplane's atomic counters at scrape time.
//!
//! The dataplane counts with relaxed atomics and never formats anything; a [`DataplaneCollector`]
//! turns those counters into `meshd_*` metric families when `/metrics` is scraped, so a scrape
//! costs the hot path nothing. The DNS responder's [`QueryCounters`] are read the same way by a
//! [`DnsCollector`]. A [`StatusCollector`] adds each peer's up/down state (the status rule of
//! [`super::api::classify`], via the [`PeerMonitor`]) and the build info. docs/metrics.md lists
//! every metric.

use super::api::PeerState;
use super::monitor::PeerMonitor;
use crate::dataplane::{Dataplane, DropReason};
use crate::discovery::ClustersetView;
use crate::dns::{QueryCounters, QueryRcode, QueryType};
use arc_swap::ArcSwap;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

/// Encodes the dataplane's counters on every scrape.
#[derive(Debug)]
pub struct DataplaneCollector {
    dataplane: Arc<Dataplane>,
}

fn counter_family<'a>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl Iterator<Item = (&'a str, String, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut family =
        encoder.encode_descriptor(name, help, None, ConstCounter::new(0u64).metric_type())?;
    for (label, value, count) in rows {
        let labels = [(label, value)];
        ConstCounter::new(count).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for DataplaneCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let drops = &self.dataplane.drops;
        counter_family(
            &mut encoder,
            "meshd_dropped_packets",
            "Packets dropped by the dataplane, by reason.",
            DropReason::ALL
                .iter()
                .map(|r| ("reason", r.as_str().to_string(), drops.get(*r))),
        )?;
        let translated = &self.dataplane.translated;
        counter_family(
            &mut encoder,
            "meshd_translated_packets",
            "Packets whose addresses the dataplane translated to or from this cluster's global ranges (global_cidrs), by direction.",
            [
                ("outbound", translated.outbound()),
                ("inbound", translated.inbound()),
            ]
            .into_iter()
            .map(|(direction, n)| ("direction", direction.to_string(), n)),
        )?;

        let spec = self.dataplane.spec();
        let table = self.dataplane.table();
        let peers: Vec<(String, Arc<crate::dataplane::Peer>)> = spec
            .peers
            .iter()
            .filter_map(|p| {
                table
                    .peer(&p.public_key)
                    .map(|peer| (p.name.clone(), peer.clone()))
            })
            .collect();
        let stat = |pick: fn(&crate::dataplane::PeerStats) -> &std::sync::atomic::AtomicU64| {
            peers.iter().map(move |(name, peer)| {
                (
                    "peer",
                    name.clone(),
                    pick(&peer.stats).load(Ordering::Relaxed),
                )
            })
        };
        counter_family(
            &mut encoder,
            "meshd_peer_rx_bytes",
            "WireGuard bytes received from the peer.",
            stat(|s| &s.rx_bytes),
        )?;
        counter_family(
            &mut encoder,
            "meshd_peer_tx_bytes",
            "WireGuard bytes sent to the peer.",
            stat(|s| &s.tx_bytes),
        )?;
        counter_family(
            &mut encoder,
            "meshd_peer_rx_packets",
            "WireGuard datagrams received from the peer.",
            stat(|s| &s.rx_packets),
        )?;
        counter_family(
            &mut encoder,
            "meshd_peer_tx_packets",
            "WireGuard datagrams sent to the peer.",
            stat(|s| &s.tx_packets),
        )?;

        let mut family = encoder.encode_descriptor(
            "meshd_peer_last_handshake_timestamp_seconds",
            "Unix time of the peer's last completed handshake (0: never).",
            None,
            ConstGauge::new(0i64).metric_type(),
        )?;
        for (name, peer) in &peers {
            let at = peer
                .status()
                .last_handshake
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_secs() as i64);
            let labels = [("peer", name.clone())];
            ConstGauge::new(at).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// Encodes the DNS responder's query counters on every scrape.
#[derive(Debug)]
pub struct DnsCollector {
    counters: Arc<QueryCounters>,
}

impl Collector for DnsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(
            "meshd_dns_queries",
            "clusterset.local DNS queries answered, by query type and response code.",
            None,
            ConstCounter::new(0u64).metric_type(),
        )?;
        for qtype in QueryType::ALL {
            for rcode in QueryRcode::ALL {
                let count = self.counters.get(qtype, rcode);
                if count == 0 {
                    continue;
                }
                let labels = [("qtype", qtype.as_str()), ("rcode", rcode.as_str())];
                ConstCounter::new(count).encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "meshd_dns_rate_limited",
            "UDP answers held back by response-rate limiting: sent truncated (slip) or not sent (drop).",
            None,
            ConstCounter::new(0u64).metric_type(),
        )?;
        let (slipped, dropped) = self.counters.limited();
        for (action, count) in [("slip", slipped), ("drop", dropped)] {
            ConstCounter::new(count).encode(family.encode_family(&[("action", action)])?)?;
        }
        Ok(())
    }
}

/// Encodes each peer's state and the build info on every scrape.
#[derive(Debug)]
pub struct StatusCollector {
    monitor: Arc<PeerMonitor>,
}

impl Collector for StatusCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(
            "meshd_peer_up",
            "1 when the peer is up (recent handshake, traffic answered), else 0; see docs/meshctl.md.",
            None,
            ConstGauge::new(0i64).metric_type(),
        )?;
        let peers = self.monitor.peers();
        for peer in &peers {
            let labels = [("peer", peer.name.as_str())];
            let up = i64::from(peer.status == PeerState::Up);
            ConstGauge::new(up).encode(family.encode_family(&labels)?)?;
        }
        let mut family = encoder.encode_descriptor(
            "meshd_peer_handshakes",
            "Handshakes completed with the peer since meshd added it (sampled once a second).",
            None,
            ConstCounter::new(0u64).metric_type(),
        )?;
        for peer in &peers {
            let labels = [("peer", peer.name.as_str())];
            ConstCounter::new(peer.handshakes).encode(family.encode_family(&labels)?)?;
        }
        let mut family = encoder.encode_descriptor(
            "meshd_build_info",
            "Always 1; the version label is meshd's.",
            None,
            ConstGauge::new(0i64).metric_type(),
        )?;
        let labels = [("version", env!("CARGO_PKG_VERSION"))];
        ConstGauge::new(1i64).encode(family.encode_family(&labels)?)?;
        Ok(())
    }
}

/// Encodes the clusterset's size on every scrape: services exported here and imported from
/// each peer.
#[derive(Debug)]
pub struct ClustersetCollector {
    view: Arc<ArcSwap<ClustersetView>>,
}

impl ClustersetCollector {
    pub fn new(view: Arc<ArcSwap<ClustersetView>>) -> Self {
        ClustersetCollector { view }
    }
}

impl Collector for ClustersetCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let view = self.view.load();
        let family = encoder.encode_descriptor(
            "meshd_exported_services",
            "Services this cluster exports (its local catalog).",
            None,
            ConstGauge::new(0i64).metric_type(),
        )?;
        let local = view
            .clusters
            .first()
            .map_or(0, |c| c.catalog.services.len());
        ConstGauge::new(local as i64).encode(family)?;
        let mut family = encoder.encode_descriptor(
            "meshd_imported_services",
            "Services in each peer's last good catalog (label peer: the peer's cluster name), whether or not the peer is reachable now.",
            None,
            ConstGauge::new(0i64).metric_type(),
        )?;
        for entry in view.clusters.iter().skip(1) {
            let labels = [("peer", entry.catalog.cluster.as_str())];
            ConstGauge::new(entry.catalog.services.len() as i64)
                .encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// A registry with meshd's collectors.
pub fn registry(
    dataplane: Arc<Dataplane>,
    dns: Arc<QueryCounters>,
    monitor: Arc<PeerMonitor>,
) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(DataplaneCollector { dataplane }));
    registry.register_collector(Box::new(DnsCollector { counters: dns }));
    registry.register_collector(Box::new(StatusCollector { monitor }));
    registry
}

/// Serves `/metrics` on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, registry: Registry) -> std::io::Result<()> {
    use axum::response::IntoResponse;
    use axum::routing::get;
    let registry = Arc::new(registry);
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let registry = registry.clone();
            async move {
                let mut body = String::new();
                match prometheus_client::encoding::text::encode(&mut body, &registry) {
                    Ok(()) => (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        body,
                    )
                        .into_response(),
                    Err(_) => (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; charset=utf-8",
                        )],
                        "metrics encoding failed".to_string(),
                    )
                        .into_response(),
                }
            }
        }),
    );
    crate::http::serve(listener, app, crate::listener::Limits::PROBES, "metrics").await
}
