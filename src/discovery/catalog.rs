//! The catalog model: what one cluster exports ([`ExportCatalog`]) and what the whole clusterset
//! exports as this gateway sees it ([`ClustersetView`]).
//!
//! These are plain data with serde (JSON) so that the catalog sync between peers can send them as
//! they are. They know nothing of Kubernetes or of DNS: a catalog enters from the static exports
//! file ([`super::exports`]) or, later, from the ServiceExport watcher and from peers;
//! [`ClustersetView::build`] merges the local catalog with the remote ones into the snapshot the
//! DNS responder answers from.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

/// One cluster's exported services.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportCatalog {
    /// The exporting cluster's name (`cluster` in its configuration).
    pub cluster: String,
    /// Grows with every change of this catalog, so a receiver can tell newer from older.
    pub generation: u64,
    pub services: Vec<ExportedService>,
}

/// How a service is reached: through its service IPs or directly at its endpoints.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServiceType {
    /// Answers carry the service IPs (the MCS API's `ClusterSetIP`).
    #[default]
    ClusterSetIP,
    /// Answers carry the ready endpoints' IPs.
    Headless,
}

/// A port's transport protocol, spelled as Kubernetes spells it.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub enum PortProtocol {
    #[serde(rename = "TCP")]
    #[default]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    #[serde(rename = "SCTP")]
    Sctp,
}

impl PortProtocol {
    /// The SRV label's protocol part, without the underscore: `tcp`, `udp` or `sctp`.
    pub fn srv_label(self) -> &'static str {
        match self {
            PortProtocol::Tcp => "tcp",
            PortProtocol::Udp => "udp",
            PortProtocol::Sctp => "sctp",
        }
    }
}

impl fmt::Display for PortProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PortProtocol::Tcp => "TCP",
            PortProtocol::Udp => "UDP",
            PortProtocol::Sctp => "SCTP",
        })
    }
}

/// A Service's `sessionAffinity`, as Kubernetes spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SessionAffinity {
    #[serde(rename = "ClientIP")]
    ClientIp,
    #[serde(rename = "None")]
    NoAffinity,
}

/// A Service's `internalTrafficPolicy`, as Kubernetes spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TrafficPolicy {
    Cluster,
    Local,
}

/// The longest `trafficDistribution` or `appProtocol` value taken from a peer (Kubernetes'
/// own are short names such as `PreferClose` or `kubernetes.io/h2c`).
pub const MAX_PROTOCOL_NAME: usize = 128;

/// A `trafficDistribution` or `appProtocol` value: short, of the characters Kubernetes allows in
/// label-style names.
fn is_protocol_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_PROTOCOL_NAME
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'/'))
}

/// The most exported labels or annotations one service may carry.
pub const MAX_EXPORTED_METADATA: usize = 64;
/// The most bytes of exported annotations (keys and values) one service may carry.
pub const MAX_ANNOTATION_BYTES: usize = 16 * 1024;

/// A Kubernetes label or annotation key: an optional DNS-subdomain prefix and `/`, then a name of
/// at most 63 characters, alphanumeric at both ends, `-`, `_` and `.` inside.
pub fn is_metadata_key(key: &str) -> bool {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            })
    });
    prefix_ok && !name.is_empty() && is_label_value(name)
}

/// A Kubernetes label value: empty, or at most 63 characters, alphanumeric at both ends, `-`,
/// `_` and `.` inside.
pub fn is_label_value(value: &str) -> bool {
    let b = value.as_bytes();
    value.is_empty()
        || (b.len() <= 63
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.')))
}

/// One exported service of one cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportedService {
    pub namespace: String,
    pub name: String,
    #[serde(rename = "type")]
    pub service_type: ServiceType,
    /// The service IPs (ClusterSetIP); empty for headless services.
    pub ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    pub endpoints: Vec<Endpoint>,
    /// When this cluster exported the service (RFC 3339: the ServiceExport's creationTimestamp).
    /// The oldest export wins a conflict between clusters, as the MCS API says. `None` when the
    /// exports file is the source: such an export is younger than any dated one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exported_at: Option<String>,
    /// The Service's `sessionAffinity`, and with `ClientIP` its `timeoutSeconds`; copied to the
    /// ServiceImport (absent from a catalog of an exports file or an older meshd).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_affinity: Option<SessionAffinity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_affinity_timeout: Option<u32>,
    /// The Service's `internalTrafficPolicy`, copied to the ServiceImport.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub internal_traffic_policy: Option<TrafficPolicy>,
    /// The Service's `trafficDistribution` (e.g. `PreferClose`), copied to the ServiceImport.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_distribution: Option<String>,
    /// The ServiceExport's `spec.exportedLabels` and `spec.exportedAnnotations`: what the
    /// ServiceImport carries in its metadata (never the Service's or the ServiceExport's own).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub exported_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub exported_annotations: BTreeMap<String, String>,
}

impl ExportedService {
    /// The endpoints that may receive traffic.
    pub fn ready_endpoints(&self) -> impl Iterator<Item = &Endpoint> {
        self.endpoints.iter().filter(|e| e.ready)
    }

    /// True when at least one endpoint is ready.
    pub fn has_ready_endpoints(&self) -> bool {
        self.ready_endpoints().next().is_some()
    }
}

/// One port of a service. Only named ports get SRV records.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServicePort {
    pub name: Option<String>,
    pub protocol: PortProtocol,
    pub port: u16,
    /// The port's `appProtocol` (e.g. `kubernetes.io/h2c`), copied to the ServiceImport.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
}

/// One backend of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    pub ip: IpAddr,
    /// The pod's hostname (StatefulSet pods have one); names the endpoint in DNS.
    pub hostname: Option<String>,
    pub ready: bool,
}

impl Endpoint {
    /// The endpoint's DNS label: its hostname, or its IP with dots and colons as dashes.
    pub fn dns_label(&self) -> String {
        match &self.hostname {
            Some(h) => h.clone(),
            None => self.ip.to_string().replace(['.', ':'], "-"),
        }
    }
}

/// A Kubernetes DNS-1123 label: what namespaces, service names and hostnames must be so that
/// they can appear in a DNS name.
pub fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// The most services one cluster's catalog may hold.
pub const MAX_SERVICES: usize = 10_000;
/// The most ports one exported service may have.
pub const MAX_PORTS: usize = 1_000;
/// The most endpoints one exported service may have (ten full EndpointSlices).
pub const MAX_ENDPOINTS: usize = 10_000;

impl ExportedService {
    /// Checks what the types cannot: names that fit in DNS, service IPs exactly for ClusterSetIP
    /// services, ports above 0, no more than [`MAX_PORTS`] ports and [`MAX_ENDPOINTS`]
    /// endpoints. Names in the message are escaped (they may come from a peer).
    pub fn check(&self) -> Result<(), String> {
        let at = format!("service {:?}/{:?}", self.namespace, self.name);
        if !is_dns_label(&self.namespace) || !is_dns_label(&self.name) {
            return Err(format!("{at}: namespace and name must be DNS labels"));
        }
        match self.service_type {
            ServiceType::ClusterSetIP if self.ips.is_empty() => {
                return Err(format!("{at}: a ClusterSetIP service without service IPs"))
            }
            ServiceType::Headless if !self.ips.is_empty() => {
                return Err(format!("{at}: a Headless service with service IPs"))
            }
            _ => {}
        }
        if self.ports.len() > MAX_PORTS || self.endpoints.len() > MAX_ENDPOINTS {
            return Err(format!(
                "{at}: {} ports and {} endpoints, over the limits of {MAX_PORTS} and {MAX_ENDPOINTS}",
                self.ports.len(),
                self.endpoints.len()
            ));
        }
        for p in &self.ports {
            if p.port == 0
                || p.name.as_deref().is_some_and(|n| !is_dns_label(n))
                || p.app_protocol
                    .as_deref()
                    .is_some_and(|a| !is_protocol_name(a))
            {
                return Err(format!(
                    "{at}: port {:?} {} has a bad number, name or appProtocol",
                    p.name, p.port
                ));
            }
        }
        if self
            .session_affinity_timeout
            .is_some_and(|t| !(1..=86_400).contains(&t))
        {
            return Err(format!(
                "{at}: a session affinity timeout outside 1-86400 seconds"
            ));
        }
        if self
            .traffic_distribution
            .as_deref()
            .is_some_and(|t| !is_protocol_name(t))
        {
            return Err(format!(
                "{at}: a trafficDistribution that is not a short name"
            ));
        }
        let labels_ok = self.exported_labels.len() <= MAX_EXPORTED_METADATA
            && self
                .exported_labels
                .iter()
                .all(|(k, v)| is_metadata_key(k) && is_label_value(v));
        let annotation_bytes: usize = self
            .exported_annotations
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum();
        let annotations_ok = self.exported_annotations.len() <= MAX_EXPORTED_METADATA
            && annotation_bytes <= MAX_ANNOTATION_BYTES
            && self.exported_annotations.keys().all(|k| is_metadata_key(k));
        if !labels_ok || !annotations_ok {
            return Err(format!(
                "{at}: exported labels or annotations that are not valid Kubernetes metadata, or over {MAX_EXPORTED_METADATA} entries ({MAX_ANNOTATION_BYTES} bytes of annotations)"
            ));
        }
        for e in &self.endpoints {
            if e.hostname.as_deref().is_some_and(|h| !is_dns_label(h)) {
                return Err(format!(
                    "{at}: endpoint {} has a hostname that is not a DNS label",
                    e.ip
                ));
            }
        }
        Ok(())
    }

    /// Every address the service hands out: its service IPs and its endpoints' IPs.
    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.ips
            .iter()
            .copied()
            .chain(self.endpoints.iter().map(|e| e.ip))
    }
}

impl ExportCatalog {
    /// Checks the catalog as a whole: a cluster name that is a DNS label, at most
    /// [`MAX_SERVICES`] services. Says what is wrong.
    pub fn check_outline(&self) -> Result<(), String> {
        if !is_dns_label(&self.cluster) {
            return Err(format!("cluster {:?} is not a DNS label", self.cluster));
        }
        if self.services.len() > MAX_SERVICES {
            return Err(format!(
                "{} services, over the limit of {MAX_SERVICES}",
                self.services.len()
            ));
        }
        Ok(())
    }

    /// Takes out each service that fails [`ExportedService::check`] or `also`, or repeats an
    /// earlier one, and says why each went: one bad service does not cost the others.
    pub fn quarantine(
        &mut self,
        also: impl Fn(&ExportedService) -> Result<(), String>,
    ) -> Vec<String> {
        let mut seen = std::collections::HashSet::new();
        let mut reasons = Vec::new();
        self.services.retain(|s| {
            let verdict = s.check().and_then(|()| also(s)).and_then(|()| {
                if seen.insert((s.namespace.clone(), s.name.clone())) {
                    Ok(())
                } else {
                    Err(format!(
                        "service {:?}/{:?}: listed twice",
                        s.namespace, s.name
                    ))
                }
            });
            match verdict {
                Ok(()) => true,
                Err(reason) => {
                    reasons.push(reason);
                    false
                }
            }
        });
        reasons
    }

    /// Every address the catalog hands out: service IPs and endpoint IPs.
    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.services.iter().flat_map(ExportedService::addresses)
    }

    /// Replaces every address the catalog hands out with `f` of it (service IPs and endpoint
    /// IPs, in place, order kept).
    pub fn map_addresses(&mut self, f: impl Fn(IpAddr) -> IpAddr) {
        for service in &mut self.services {
            for ip in &mut service.ips {
                *ip = f(*ip);
            }
            for endpoint in &mut service.endpoints {
                endpoint.ip = f(endpoint.ip);
            }
        }
    }
}

/// The MCS `Conflict` condition of one of this cluster's exports, as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportConflict {
    pub namespace: String,
    pub name: String,
    pub conflict: bool,
    /// CamelCase, as on the ServiceExport: `NoConflicts`, `PortConflict`, `TypeConflict`.
    pub reason: String,
    pub message: String,
}

/// One cluster's catalog in the view, with whether its tunnel is up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterEntry {
    pub up: bool,
    /// Shared between the views built from it: a rebuild (a probe result, an RTT re-ranking)
    /// copies no catalog.
    pub catalog: Arc<ExportCatalog>,
}

/// Every cluster's catalog as this gateway sees it: the snapshot the DNS responder answers from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClustersetView {
    /// False until the local catalog has been read once: the responder answers SERVFAIL until
    /// then rather than denying names it may soon know.
    pub loaded: bool,
    /// The local cluster first, then the remote clusters: by name from [`ClustersetView::build`],
    /// re-ranked nearest first by the clusterset hub (`super::clusterset::order_by_rtt`).
    pub clusters: Vec<ClusterEntry>,
}

impl ClustersetView {
    /// The view before any catalog is known.
    pub fn unloaded() -> Self {
        ClustersetView {
            loaded: false,
            clusters: Vec::new(),
        }
    }

    /// Merges the local catalog (always up) with the remote ones (keyed by cluster name, each
    /// with its tunnel state). A remote entry named like the local cluster is ignored: the local
    /// catalog is the truth about the local cluster.
    pub fn build(local: Arc<ExportCatalog>, remotes: &BTreeMap<String, ClusterEntry>) -> Self {
        let local_name = local.cluster.clone();
        let mut clusters = Vec::with_capacity(1 + remotes.len());
        clusters.push(ClusterEntry {
            up: true,
            catalog: local,
        });
        clusters.extend(
            remotes
                .iter()
                .filter(|(name, _)| **name != local_name)
                .map(|(_, entry)| entry.clone()),
        );
        ClustersetView {
            loaded: true,
            clusters,
        }
    }

    /// The SOA serial: the sum of the catalogs' generations, so it grows with every change.
    pub fn serial(&self) -> u32 {
        self.clusters
            .iter()
            .fold(0u32, |s, c| s.wrapping_add(c.catalog.generation as u32))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog(cluster: &str, generation: u64) -> ExportCatalog {
        ExportCatalog {
            cluster: cluster.into(),
            generation,
            services: vec![ExportedService {
                namespace: "demo".into(),
                name: "web".into(),
                service_type: ServiceType::ClusterSetIP,
                ips: vec!["10.97.0.10".parse().unwrap()],
                ports: vec![ServicePort {
                    name: Some("http".into()),
                    protocol: PortProtocol::Tcp,
                    port: 80,
                    ..Default::default()
                }],
                endpoints: vec![Endpoint {
                    ip: "10.245.1.10".parse().unwrap(),
                    hostname: None,
                    ready: true,
                }],
                exported_at: None,
                ..Default::default()
            }],
        }
    }

    #[test]
    fn view_lists_local_first_then_remotes_by_name() {
        let remotes: BTreeMap<String, ClusterEntry> = [("m3", false), ("m2", true), ("m1", true)]
            .into_iter()
            .map(|(n, up)| {
                (
                    n.to_string(),
                    ClusterEntry {
                        up,
                        catalog: Arc::new(catalog(n, 7)),
                    },
                )
            })
            .collect();
        let view = ClustersetView::build(Arc::new(catalog("m9", 1)), &remotes);
        assert!(view.loaded);
        let names: Vec<(&str, bool)> = view
            .clusters
            .iter()
            .map(|c| (c.catalog.cluster.as_str(), c.up))
            .collect();
        assert_eq!(
            names,
            [("m9", true), ("m1", true), ("m2", true), ("m3", false)]
        );
        assert_eq!(view.serial(), 22);
        assert!(!ClustersetView::unloaded().loaded);
    }

    #[test]
    fn a_remote_named_like_the_local_cluster_is_ignored() {
        let remotes = BTreeMap::from([(
            "m1".to_string(),
            ClusterEntry {
                up: false,
                catalog: Arc::new(catalog("m1", 99)),
            },
        )]);
        let view = ClustersetView::build(Arc::new(catalog("m1", 1)), &remotes);
        assert_eq!(view.clusters.len(), 1);
        assert!(view.clusters[0].up);
        assert_eq!(view.clusters[0].catalog.generation, 1);
    }

    #[test]
    fn catalogs_and_views_round_trip_through_json() {
        let view = ClustersetView::build(Arc::new(catalog("m1", 3)), &BTreeMap::new());
        let json = serde_json::to_string(&view).unwrap();
        assert!(json.contains("\"type\":\"ClusterSetIP\""), "{json}");
        assert!(json.contains("\"protocol\":\"TCP\""), "{json}");
        assert!(!json.contains("exported_at"), "{json}");
        let back: ClustersetView = serde_json::from_str(&json).unwrap();
        assert_eq!(back, view);
        let mut dated = catalog("m2", 1);
        dated.services[0].exported_at = Some("2026-01-02T03:04:05Z".into());
        let json = serde_json::to_string(&dated).unwrap();
        assert!(
            json.contains("\"exported_at\":\"2026-01-02T03:04:05Z\""),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<ExportCatalog>(&json).unwrap(), dated);
    }

    #[test]
    fn endpoint_labels_fall_back_to_the_dashed_ip() {
        let mut e = Endpoint {
            ip: "10.245.1.10".parse().unwrap(),
            hostname: None,
            ready: true,
        };
        assert_eq!(e.dns_label(), "10-245-1-10");
        e.ip = "fd00::1".parse().unwrap();
        assert_eq!(e.dns_label(), "fd00--1");
        e.hostname = Some("web-0".into());
        assert_eq!(e.dns_label(), "web-0");
    }
}
