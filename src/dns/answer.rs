//! The answer logic: a pure function from (clusterset view, query name, query type) to an
//! [`Answer`] that says which response code, which records and whether the zone's SOA goes in
//! the authority section. No sockets, no wire format, no TTLs: the handler
//! ([`super::handler`]) turns an [`Answer`] into a DNS message.
//!
//! The view is read through a [`Snapshot`], which indexes its services by namespace and name
//! once per view, so a query costs two hash lookups however many services the clusterset
//! exports (a scan of every catalog was half of the responder's CPU time with 1,000 services).
//!
//! Names answered (all under `clusterset.local.`, matched case-insensitively):
//!
//! | name | answer |
//! |---|---|
//! | `<svc>.<ns>.svc` | A/AAAA: ClusterSetIP → service IPs of each exporting cluster that is up and has a ready endpoint, local cluster first; Headless → every ready endpoint IP of those clusters. SRV: one record per (port, target) of every port, as the MCS conformance suite asks |
//! | `<hostname>.<cluster>.<svc>.<ns>.svc` | A/AAAA of one ready headless endpoint (hostname, or its IP with dots/colons as dashes) |
//! | `_<port>._<proto>.<svc>.<ns>.svc` | SRV for a named port, de-duplicated; headless targets are the per-endpoint names |
//!
//! `<cluster>.<svc>.<ns>.svc` does not exist (NXDOMAIN): the MCS DNS specification says it must
//! not be answered.
//! | `dns-version` | TXT `1.0.0` |
//!
//! A name that exists with no data of the asked type is NODATA (NOERROR, no answer, SOA); a
//! service exported only by clusters that are down or have no ready endpoint exists and is
//! NODATA, so resolvers do not cache a denial during a short outage. Unknown names in the zone
//! are NXDOMAIN with SOA, and names outside it REFUSED. Until the view is loaded (this cluster's
//! catalog read and every peer asked once; a standby gateway never asks) only what is known is
//! answered: a name with records gets them, and what would be a denial (NXDOMAIN, NODATA) is
//! SERVFAIL instead, so that no resolver caches the denial of a name that may yet appear.

use crate::discovery::catalog::{ClusterEntry, ExportedService, ServicePort, ServiceType};
use crate::discovery::ClustersetView;
use hickory_proto::rr::{Name, RecordType};
use std::borrow::Cow;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

/// The zone we are authoritative for.
pub const ZONE: &str = "clusterset.local.";
/// The MCS DNS specification version answered at `dns-version.clusterset.local` TXT.
pub const DNS_VERSION: &str = "1.0.0";

/// The response codes the answer logic gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rcode {
    NoError,
    NxDomain,
    Refused,
    ServFail,
}

/// One answer record's data; the owner is the query name, except for [`RecordData::Soa`] (the
/// zone apex).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordData {
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    Srv {
        priority: u16,
        weight: u16,
        port: u16,
        /// A fully qualified name, ending in `clusterset.local.`.
        target: String,
    },
    Txt(String),
    Soa,
}

/// What to reply to one question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub rcode: Rcode,
    pub records: Vec<RecordData>,
    /// The zone's SOA in the authority section (negative answers).
    pub soa: bool,
}

impl Answer {
    fn records(records: Vec<RecordData>) -> Self {
        if records.is_empty() {
            return Self::no_data();
        }
        Answer {
            rcode: Rcode::NoError,
            records,
            soa: false,
        }
    }

    /// The name exists but has no record of the asked type.
    pub fn no_data() -> Self {
        Answer {
            rcode: Rcode::NoError,
            records: Vec::new(),
            soa: true,
        }
    }

    pub fn nx_domain() -> Self {
        Answer {
            rcode: Rcode::NxDomain,
            records: Vec::new(),
            soa: true,
        }
    }

    fn bare(rcode: Rcode) -> Self {
        Answer {
            rcode,
            records: Vec::new(),
            soa: false,
        }
    }
}

/// Which record types of an address or SRV name the question asks for.
fn wants(qtype: RecordType, t: RecordType) -> bool {
    qtype == t || qtype == RecordType::ANY
}

/// A clusterset view with its services indexed by namespace and name (ASCII-lowercased): what
/// [`answer`] reads. Built once per view; the handler keeps the last one and rebuilds it when
/// the view it is given changes.
#[derive(Debug)]
pub struct Snapshot {
    view: Arc<ClustersetView>,
    serial: u32,
    /// namespace -> service name -> (cluster, service) positions in the view, in view order.
    by_namespace: HashMap<String, HashMap<String, Vec<(usize, usize)>>>,
}

impl Snapshot {
    pub fn new(view: Arc<ClustersetView>) -> Self {
        let mut by_namespace: HashMap<String, HashMap<String, Vec<(usize, usize)>>> =
            HashMap::new();
        for (c, cluster) in view.clusters.iter().enumerate() {
            for (s, service) in cluster.catalog.services.iter().enumerate() {
                by_namespace
                    .entry(service.namespace.to_ascii_lowercase())
                    .or_default()
                    .entry(service.name.to_ascii_lowercase())
                    .or_default()
                    .push((c, s));
            }
        }
        Snapshot {
            serial: view.serial(),
            view,
            by_namespace,
        }
    }

    /// The view this snapshot indexes.
    pub fn view(&self) -> &Arc<ClustersetView> {
        &self.view
    }

    /// The SOA serial of the view ([`ClustersetView::serial`]).
    pub fn serial(&self) -> u32 {
        self.serial
    }

    fn has_namespace(&self, ns: &str) -> bool {
        self.by_namespace.contains_key(lowercase(ns).as_ref())
    }

    /// The clusters exporting `ns`/`svc`, in view order.
    fn services<'v>(
        &'v self,
        ns: &str,
        svc: &str,
    ) -> impl Iterator<Item = (&'v ClusterEntry, &'v ExportedService)> + 'v {
        let positions = self
            .by_namespace
            .get(lowercase(ns).as_ref())
            .and_then(|services| services.get(lowercase(svc).as_ref()))
            .map_or(&[][..], Vec::as_slice);
        positions.iter().map(|&(c, s)| {
            let cluster = &self.view.clusters[c];
            (cluster, &cluster.catalog.services[s])
        })
    }
}

/// `s` in ASCII lowercase, copied only when it has an uppercase letter.
fn lowercase(s: &str) -> Cow<'_, str> {
    if s.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(s.to_ascii_lowercase())
    } else {
        Cow::Borrowed(s)
    }
}

/// Answers one question from the view.
pub fn answer(view: &Snapshot, name: &Name, qtype: RecordType) -> Answer {
    let labels: Vec<&[u8]> = name.iter().collect();
    let n = labels.len();
    let in_zone = n >= 2
        && labels[n - 2].eq_ignore_ascii_case(b"clusterset")
        && labels[n - 1].eq_ignore_ascii_case(b"local");
    if !in_zone {
        return Answer::bare(Rcode::Refused);
    }
    let found = in_zone_answer(view, &labels[..n - 2], qtype);
    if !view.view.loaded && found.records.is_empty() {
        return Answer::bare(Rcode::ServFail);
    }
    found
}

/// The answer for a name in the zone, from its labels left of `clusterset.local`.
fn in_zone_answer(view: &Snapshot, labels: &[&[u8]], qtype: RecordType) -> Answer {
    // Inside the zone, from the right: svc, ns, service, ...
    let mut rel = Vec::with_capacity(labels.len());
    for label in labels.iter().rev() {
        match std::str::from_utf8(label) {
            Ok(text) => rel.push(text),
            Err(_) => return Answer::nx_domain(),
        }
    }
    let is = |label: &str, text: &str| label.eq_ignore_ascii_case(text);
    match rel.as_slice() {
        [] => match qtype {
            RecordType::SOA | RecordType::ANY => Answer::records(vec![RecordData::Soa]),
            _ => Answer::no_data(),
        },
        [v] if is(v, "dns-version") => {
            if wants(qtype, RecordType::TXT) {
                Answer::records(vec![RecordData::Txt(DNS_VERSION.to_string())])
            } else {
                Answer::no_data()
            }
        }
        [s] if is(s, "svc") => Answer::no_data(),
        [s, ns] if is(s, "svc") => {
            if view.has_namespace(ns) {
                Answer::no_data()
            } else {
                Answer::nx_domain()
            }
        }
        [s, ns, svc] if is(s, "svc") => service_answer(view, ns, svc, qtype),
        [s, ns, svc, proto] if is(s, "svc") && proto.starts_with('_') => {
            let exists = view.services(ns, svc).any(|(_, service)| {
                service
                    .ports
                    .iter()
                    .any(|p| p.name.is_some() && is(&proto[1..], p.protocol.srv_label()))
            });
            if exists {
                Answer::no_data()
            } else {
                Answer::nx_domain()
            }
        }
        [s, ns, svc, proto, port]
            if is(s, "svc") && proto.starts_with('_') && port.starts_with('_') =>
        {
            srv(view, ns, svc, &proto[1..], &port[1..], qtype)
        }
        [s, ns, svc, cluster, host] if is(s, "svc") => {
            endpoint_address(view, ns, svc, cluster, host, qtype)
        }
        _ => Answer::nx_domain(),
    }
}

/// The addresses one cluster's export of a service contributes.
fn addresses<'s>(
    cluster: &ClusterEntry,
    service: &'s ExportedService,
) -> Box<dyn Iterator<Item = IpAddr> + 's> {
    if !cluster.up || !service.has_ready_endpoints() {
        return Box::new(std::iter::empty());
    }
    match service.service_type {
        ServiceType::ClusterSetIP => Box::new(service.ips.iter().copied()),
        ServiceType::Headless => Box::new(service.ready_endpoints().map(|e| e.ip)),
    }
}

/// A/AAAA records for `ips` that the question asks for, without duplicates, in first-seen
/// order (linear: a headless service may have thousands of endpoints in several clusters).
fn address_records(ips: impl Iterator<Item = IpAddr>, qtype: RecordType) -> Answer {
    let mut seen = std::collections::HashSet::new();
    let records = ips
        .filter(|ip| seen.insert(*ip))
        .filter_map(|ip| match ip {
            IpAddr::V4(v4) if wants(qtype, RecordType::A) => Some(RecordData::A(v4)),
            IpAddr::V6(v6) if wants(qtype, RecordType::AAAA) => Some(RecordData::Aaaa(v6)),
            _ => None,
        })
        .collect();
    Answer::records(records)
}

/// `<svc>.<ns>.svc`: its addresses, and for SRV every port's records.
fn service_answer(view: &Snapshot, ns: &str, svc: &str, qtype: RecordType) -> Answer {
    if view.services(ns, svc).next().is_none() {
        return Answer::nx_domain();
    }
    let mut records = address_records(
        view.services(ns, svc).flat_map(|(c, s)| addresses(c, s)),
        qtype,
    )
    .records;
    if wants(qtype, RecordType::SRV) {
        records.extend(srv_records(view, ns, svc, |_| true));
    }
    Answer::records(records)
}

fn endpoint_address(
    view: &Snapshot,
    ns: &str,
    svc: &str,
    cluster: &str,
    host: &str,
    qtype: RecordType,
) -> Answer {
    let found = view
        .services(ns, svc)
        .filter(|(c, s)| {
            s.service_type == ServiceType::Headless
                && c.catalog.cluster.eq_ignore_ascii_case(cluster)
        })
        .find_map(|(c, s)| {
            s.ready_endpoints()
                .find(|e| e.dns_label().eq_ignore_ascii_case(host))
                .map(|e| (c.up, e.ip))
        });
    match found {
        None => Answer::nx_domain(),
        Some((false, _)) => Answer::no_data(),
        Some((true, ip)) => address_records(std::iter::once(ip), qtype),
    }
}

fn srv(
    view: &Snapshot,
    ns: &str,
    svc: &str,
    proto: &str,
    port_name: &str,
    qtype: RecordType,
) -> Answer {
    let named = |p: &ServicePort| {
        p.protocol.srv_label().eq_ignore_ascii_case(proto)
            && p.name
                .as_deref()
                .is_some_and(|n| n.eq_ignore_ascii_case(port_name))
    };
    let exists = view
        .services(ns, svc)
        .any(|(_, service)| service.ports.iter().any(named));
    if !exists {
        return Answer::nx_domain();
    }
    if !wants(qtype, RecordType::SRV) {
        return Answer::no_data();
    }
    Answer::records(srv_records(view, ns, svc, named))
}

/// SRV records of the ports `wanted` picks, from every exporting cluster that is up and has a
/// ready endpoint: one per (port, target), in view order (a TCP and a UDP port of one number
/// are one record); headless targets are the per-endpoint names.
fn srv_records(
    view: &Snapshot,
    ns: &str,
    svc: &str,
    wanted: impl Fn(&ServicePort) -> bool,
) -> Vec<RecordData> {
    let mut found: Vec<(u16, String)> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (cluster, service) in view.services(ns, svc) {
        if !cluster.up || !service.has_ready_endpoints() {
            continue;
        }
        let base = format!("{}.{}.svc.{ZONE}", service.name, service.namespace);
        let targets: Vec<String> = match service.service_type {
            ServiceType::ClusterSetIP => vec![base],
            ServiceType::Headless => service
                .ready_endpoints()
                .map(|e| format!("{}.{}.{base}", e.dns_label(), cluster.catalog.cluster))
                .collect(),
        };
        for port in service.ports.iter().filter(|p| wanted(p)) {
            for target in &targets {
                if seen.insert((port.port, target.clone())) {
                    found.push((port.port, target.clone()));
                }
            }
        }
    }
    let weight = u16::try_from(100 / found.len().max(1)).unwrap_or(1).max(1);
    found
        .into_iter()
        .map(|(port, target)| RecordData::Srv {
            priority: 0,
            weight,
            port,
            target,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::catalog::{
        Endpoint, ExportCatalog, ExportedService, PortProtocol, ServicePort,
    };
    use crate::discovery::ClusterEntry;
    use std::collections::BTreeMap;

    fn port(name: Option<&str>, protocol: PortProtocol, port: u16) -> ServicePort {
        ServicePort {
            name: name.map(str::to_string),
            protocol,
            port,
            ..Default::default()
        }
    }

    fn ep(ip: &str, hostname: Option<&str>, ready: bool) -> Endpoint {
        Endpoint {
            ip: ip.parse().unwrap(),
            hostname: hostname.map(str::to_string),
            ready,
        }
    }

    fn clusterset_ip(
        name: &str,
        ips: &[&str],
        ports: Vec<ServicePort>,
        ready: bool,
    ) -> ExportedService {
        ExportedService {
            namespace: "demo".into(),
            name: name.into(),
            service_type: ServiceType::ClusterSetIP,
            ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
            ports,
            endpoints: vec![ep("10.0.0.1", None, ready)],
            exported_at: None,
            ..Default::default()
        }
    }

    fn headless(name: &str, ports: Vec<ServicePort>, endpoints: Vec<Endpoint>) -> ExportedService {
        ExportedService {
            namespace: "demo".into(),
            name: name.into(),
            service_type: ServiceType::Headless,
            ips: Vec::new(),
            ports,
            endpoints,
            exported_at: None,
            ..Default::default()
        }
    }

    /// m1 (local), m2 (up), m3 (down).
    fn view() -> ClustersetView {
        let http = || port(Some("http"), PortProtocol::Tcp, 80);
        let local = ExportCatalog {
            cluster: "m1".into(),
            generation: 1,
            services: vec![
                clusterset_ip("web", &["10.96.0.10", "fd00:96::10"], vec![http()], true),
                clusterset_ip("idle", &["10.96.0.20"], vec![http()], false),
                headless(
                    "db",
                    vec![port(Some("pg"), PortProtocol::Tcp, 5432)],
                    vec![
                        ep("10.244.1.20", Some("db-0"), true),
                        ep("10.244.1.21", None, true),
                        ep("10.244.1.22", Some("db-2"), false),
                    ],
                ),
            ],
        };
        let remote = |cluster: &str, up, services| {
            (
                cluster.to_string(),
                ClusterEntry {
                    up,
                    catalog: Arc::new(ExportCatalog {
                        cluster: cluster.into(),
                        generation: 1,
                        services,
                    }),
                },
            )
        };
        let remotes = BTreeMap::from([
            remote(
                "m2",
                true,
                vec![
                    clusterset_ip(
                        "web",
                        &["10.97.0.10"],
                        vec![
                            http(),
                            port(Some("dns"), PortProtocol::Udp, 53),
                            port(None, PortProtocol::Tcp, 8080),
                        ],
                        true,
                    ),
                    headless(
                        "db",
                        vec![port(Some("pg"), PortProtocol::Tcp, 5432)],
                        vec![ep("fd00:245::20", None, true)],
                    ),
                ],
            ),
            remote(
                "m3",
                false,
                vec![
                    clusterset_ip("web", &["10.98.0.10"], vec![http()], true),
                    clusterset_ip("only3", &["10.98.0.30"], vec![], true),
                ],
            ),
        ]);
        ClustersetView::build(Arc::new(local), &remotes)
    }

    fn a(ip: &str) -> RecordData {
        RecordData::A(ip.parse().unwrap())
    }

    fn aaaa(ip: &str) -> RecordData {
        RecordData::Aaaa(ip.parse().unwrap())
    }

    fn srv(weight: u16, port: u16, target: &str) -> RecordData {
        RecordData::Srv {
            priority: 0,
            weight,
            port,
            target: target.into(),
        }
    }

    fn ok(records: Vec<RecordData>) -> Answer {
        Answer {
            rcode: Rcode::NoError,
            records,
            soa: false,
        }
    }

    fn ask(view: &Snapshot, name: &str, qtype: RecordType) -> Answer {
        answer(view, &Name::from_ascii(name).unwrap(), qtype)
    }

    #[test]
    fn every_name_form_and_negative_answer() {
        use RecordType::*;
        let view = Snapshot::new(Arc::new(view()));
        let nodata = Answer::no_data();
        let nx = Answer::nx_domain();
        let refused = Answer::bare(Rcode::Refused);
        let cases: Vec<(&str, RecordType, Answer)> = vec![
            // ClusterSetIP: local first, then up remotes; m3 is down.
            (
                "web.demo.svc.clusterset.local.",
                A,
                ok(vec![a("10.96.0.10"), a("10.97.0.10")]),
            ),
            (
                "web.demo.svc.clusterset.local.",
                AAAA,
                ok(vec![aaaa("fd00:96::10")]),
            ),
            (
                "web.demo.svc.clusterset.local.",
                ANY,
                ok(vec![
                    a("10.96.0.10"),
                    aaaa("fd00:96::10"),
                    a("10.97.0.10"),
                    srv(33, 80, "web.demo.svc.clusterset.local."),
                    srv(33, 53, "web.demo.svc.clusterset.local."),
                    srv(33, 8080, "web.demo.svc.clusterset.local."),
                ]),
            ),
            (
                "WEB.Demo.SVC.ClusterSet.Local.",
                A,
                ok(vec![a("10.96.0.10"), a("10.97.0.10")]),
            ),
            ("web.demo.svc.clusterset.local.", TXT, nodata.clone()),
            ("web.demo.svc.clusterset.local.", MX, nodata.clone()),
            // No ready endpoint, or exported only by a cluster that is down: exists, no data.
            ("idle.demo.svc.clusterset.local.", A, nodata.clone()),
            ("only3.demo.svc.clusterset.local.", A, nodata.clone()),
            ("nope.demo.svc.clusterset.local.", A, nx.clone()),
            // <cluster>.<svc>.<ns>.svc must not be answered (MCS DNS specification).
            ("m2.web.demo.svc.clusterset.local.", A, nx.clone()),
            ("m1.web.demo.svc.clusterset.local.", A, nx.clone()),
            ("m9.web.demo.svc.clusterset.local.", A, nx.clone()),
            ("m2.db.demo.svc.clusterset.local.", AAAA, nx.clone()),
            // SRV of the bare name: every port, one record per (port, target), as the
            // conformance suite asks ("should return valid SRV records").
            (
                "web.demo.svc.clusterset.local.",
                SRV,
                ok(vec![
                    srv(33, 80, "web.demo.svc.clusterset.local."),
                    srv(33, 53, "web.demo.svc.clusterset.local."),
                    srv(33, 8080, "web.demo.svc.clusterset.local."),
                ]),
            ),
            (
                "db.demo.svc.clusterset.local.",
                SRV,
                ok(vec![
                    srv(33, 5432, "db-0.m1.db.demo.svc.clusterset.local."),
                    srv(33, 5432, "10-244-1-21.m1.db.demo.svc.clusterset.local."),
                    srv(33, 5432, "fd00-245--20.m2.db.demo.svc.clusterset.local."),
                ]),
            ),
            ("idle.demo.svc.clusterset.local.", SRV, nodata.clone()),
            // Headless: every ready endpoint of every up cluster.
            (
                "db.demo.svc.clusterset.local.",
                A,
                ok(vec![a("10.244.1.20"), a("10.244.1.21")]),
            ),
            (
                "db.demo.svc.clusterset.local.",
                AAAA,
                ok(vec![aaaa("fd00:245::20")]),
            ),
            // One headless endpoint: hostname, or the IP with dashes.
            (
                "db-0.m1.db.demo.svc.clusterset.local.",
                A,
                ok(vec![a("10.244.1.20")]),
            ),
            (
                "10-244-1-21.m1.db.demo.svc.clusterset.local.",
                A,
                ok(vec![a("10.244.1.21")]),
            ),
            (
                "fd00-245--20.m2.db.demo.svc.clusterset.local.",
                AAAA,
                ok(vec![aaaa("fd00:245::20")]),
            ),
            (
                "fd00-245--20.m2.db.demo.svc.clusterset.local.",
                A,
                nodata.clone(),
            ),
            ("db-2.m1.db.demo.svc.clusterset.local.", A, nx.clone()),
            ("db-0.m2.db.demo.svc.clusterset.local.", A, nx.clone()),
            ("x.m1.web.demo.svc.clusterset.local.", A, nx.clone()),
            // SRV for named ports; ClusterSetIP targets the service name once (de-duplicated).
            (
                "_http._tcp.web.demo.svc.clusterset.local.",
                SRV,
                ok(vec![srv(100, 80, "web.demo.svc.clusterset.local.")]),
            ),
            (
                "_dns._udp.web.demo.svc.clusterset.local.",
                SRV,
                ok(vec![srv(100, 53, "web.demo.svc.clusterset.local.")]),
            ),
            (
                "_http._tcp.web.demo.svc.clusterset.local.",
                A,
                nodata.clone(),
            ),
            ("_dns._tcp.web.demo.svc.clusterset.local.", SRV, nx.clone()),
            ("_ftp._tcp.web.demo.svc.clusterset.local.", SRV, nx.clone()),
            ("_tcp.web.demo.svc.clusterset.local.", SRV, nodata.clone()),
            ("_sctp.web.demo.svc.clusterset.local.", SRV, nx.clone()),
            // Headless SRV targets the per-endpoint names.
            (
                "_pg._tcp.db.demo.svc.clusterset.local.",
                SRV,
                ok(vec![
                    srv(33, 5432, "db-0.m1.db.demo.svc.clusterset.local."),
                    srv(33, 5432, "10-244-1-21.m1.db.demo.svc.clusterset.local."),
                    srv(33, 5432, "fd00-245--20.m2.db.demo.svc.clusterset.local."),
                ]),
            ),
            // The zone's own names.
            (
                "dns-version.clusterset.local.",
                TXT,
                ok(vec![RecordData::Txt("1.0.0".into())]),
            ),
            ("dns-version.clusterset.local.", A, nodata.clone()),
            ("clusterset.local.", SOA, ok(vec![RecordData::Soa])),
            ("clusterset.local.", A, nodata.clone()),
            ("svc.clusterset.local.", A, nodata.clone()),
            ("demo.svc.clusterset.local.", A, nodata.clone()),
            ("other.svc.clusterset.local.", A, nx.clone()),
            ("web.demo.clusterset.local.", A, nx.clone()),
            ("a.b.c.d.e.f.g.clusterset.local.", A, nx.clone()),
            // Outside the zone: never an open resolver.
            ("example.com.", A, refused.clone()),
            ("local.", A, refused.clone()),
            (".", NS, refused.clone()),
            ("clusterset.local.evil.com.", A, refused.clone()),
            ("web.demo.svc.cluster.local.", A, refused.clone()),
        ];
        for (name, qtype, expected) in cases {
            assert_eq!(ask(&view, name, qtype), expected, "{name} {qtype}");
        }
    }

    #[test]
    fn until_loaded_known_names_answer_and_denials_are_servfail_but_refused_stays_refused() {
        let empty = Snapshot::new(Arc::new(ClustersetView::unloaded()));
        assert_eq!(
            ask(&empty, "web.demo.svc.clusterset.local.", RecordType::A).rcode,
            Rcode::ServFail
        );
        assert_eq!(
            ask(&empty, "example.com.", RecordType::A).rcode,
            Rcode::Refused
        );
        // This cluster's catalog is in, a peer not asked yet (a standby, or a gateway starting):
        // what is known answers, what is not is no denial yet.
        let mut partial = view();
        partial.loaded = false;
        let partial = Snapshot::new(Arc::new(partial));
        assert_eq!(
            ask(&partial, "web.demo.svc.clusterset.local.", RecordType::A),
            ok(vec![a("10.96.0.10"), a("10.97.0.10")])
        );
        for (name, qtype) in [
            ("nothere.demo.svc.clusterset.local.", RecordType::A),
            ("web.demo.svc.clusterset.local.", RecordType::MX),
        ] {
            assert_eq!(
                ask(&partial, name, qtype).rcode,
                Rcode::ServFail,
                "{name} {qtype}"
            );
        }
    }

    /// The conformance suite's `hello`: ports tcp/TCP/42 and udp/UDP/42, exported by m1 (two
    /// ready pods, StatefulSet hostnames) and m2 (one), ClusterSetIP or headless.
    fn hello(service_type: ServiceType) -> Snapshot {
        let ports = || {
            vec![
                port(Some("tcp"), PortProtocol::Tcp, 42),
                port(Some("udp"), PortProtocol::Udp, 42),
            ]
        };
        let export = |cluster: &str, ip: &str, endpoints: Vec<Endpoint>| ExportCatalog {
            cluster: cluster.into(),
            generation: 1,
            services: vec![ExportedService {
                namespace: "demo".into(),
                name: "hello".into(),
                service_type,
                ips: match service_type {
                    ServiceType::ClusterSetIP => vec![ip.parse().unwrap()],
                    ServiceType::Headless => Vec::new(),
                },
                ports: ports(),
                endpoints,
                exported_at: None,
                ..Default::default()
            }],
        };
        let local = export(
            "m1",
            "10.96.0.42",
            vec![
                ep("10.244.1.5", Some("hello-ss-0"), true),
                ep("10.244.1.6", Some("hello-ss-1"), true),
                ep("10.244.1.7", Some("hello-ss-2"), false),
            ],
        );
        let remote = ClusterEntry {
            up: true,
            catalog: Arc::new(export(
                "m2",
                "10.97.0.42",
                vec![ep("10.245.1.5", None, true)],
            )),
        };
        Snapshot::new(Arc::new(ClustersetView::build(
            Arc::new(local),
            &BTreeMap::from([("m2".to_string(), remote)]),
        )))
    }

    /// Conformance: "A DNS SRV query of the <service>.<ns>.svc.clusterset.local domain for a
    /// ClusterIP service should return valid SRV records": exactly one, port 42, the service name
    /// (TCP and UDP 42 of both clusters are one record).
    #[test]
    fn mcs_srv_of_a_cluster_ip_service_is_one_record_per_port_number() {
        let view = hello(ServiceType::ClusterSetIP);
        assert_eq!(
            ask(&view, "hello.demo.svc.clusterset.local.", RecordType::SRV),
            ok(vec![srv(100, 42, "hello.demo.svc.clusterset.local.")])
        );
        // "...should resolve to the clusterset IP": every exporting cluster's service IP.
        assert_eq!(
            ask(&view, "hello.demo.svc.clusterset.local.", RecordType::A),
            ok(vec![a("10.96.0.42"), a("10.97.0.42")])
        );
    }

    /// Conformance: "A DNS query of the <service>.<ns>.svc.clusterset.local domain for a headless
    /// service should return the ready endpoint addresses of all the backing pods" (exactly
    /// those), "A DNS SRV query ... for a headless service should return valid SRV records" (one
    /// per endpoint, port 42, targets starting with the hostname or the dashed IP), and "A DNS
    /// query of the <hostname>.<clusterid>.<service>.<ns>.svc.clusterset.local domain for a
    /// headless StatefulSet service should return the requested pod's endpoint address".
    #[test]
    fn mcs_headless_names_answer_exactly_the_ready_endpoints() {
        let view = hello(ServiceType::Headless);
        assert_eq!(
            ask(&view, "hello.demo.svc.clusterset.local.", RecordType::A),
            ok(vec![a("10.244.1.5"), a("10.244.1.6"), a("10.245.1.5")])
        );
        assert_eq!(
            ask(&view, "hello.demo.svc.clusterset.local.", RecordType::SRV),
            ok(vec![
                srv(33, 42, "hello-ss-0.m1.hello.demo.svc.clusterset.local."),
                srv(33, 42, "hello-ss-1.m1.hello.demo.svc.clusterset.local."),
                srv(33, 42, "10-245-1-5.m2.hello.demo.svc.clusterset.local."),
            ])
        );
        assert_eq!(
            ask(
                &view,
                "hello-ss-1.m1.hello.demo.svc.clusterset.local.",
                RecordType::A
            ),
            ok(vec![a("10.244.1.6")])
        );
        // Not ready: no per-endpoint name.
        assert_eq!(
            ask(
                &view,
                "hello-ss-2.m1.hello.demo.svc.clusterset.local.",
                RecordType::A
            ),
            Answer::nx_domain()
        );
    }

    /// The MCS DNS specification: `<clusterid>.<svc>.<ns>.svc.clusterset.local` must not be
    /// answered; and the conformance case "Connectivity to a service that is not exported should
    /// be inaccessible": an unexported name does not resolve.
    #[test]
    fn mcs_cluster_id_names_and_unexported_services_do_not_resolve() {
        let view = hello(ServiceType::ClusterSetIP);
        for name in [
            "m1.hello.demo.svc.clusterset.local.",
            "m2.hello.demo.svc.clusterset.local.",
            "unexported.demo.svc.clusterset.local.",
        ] {
            assert_eq!(
                ask(&view, name, RecordType::A),
                Answer::nx_domain(),
                "{name}"
            );
        }
    }

    #[test]
    fn the_index_matches_names_in_any_case_and_keeps_view_order() {
        let mut local = view();
        // A catalog may spell names in capitals (a peer's, say): matched like the query's.
        Arc::make_mut(&mut local.clusters[1].catalog).services[0].namespace = "DEMO".into();
        Arc::make_mut(&mut local.clusters[1].catalog).services[0].name = "Web".into();
        let view = Snapshot::new(Arc::new(local));
        assert_eq!(
            ask(&view, "web.demo.svc.clusterset.local.", RecordType::A),
            ok(vec![a("10.96.0.10"), a("10.97.0.10")])
        );
        assert_eq!(
            ask(
                &view,
                "_DNS._udp.WEB.demo.svc.clusterset.local.",
                RecordType::SRV
            ),
            ok(vec![srv(100, 53, "Web.DEMO.svc.clusterset.local.")])
        );
        assert_eq!(view.serial(), 3);
    }

    #[test]
    fn binary_labels_are_unknown_names() {
        let name = Name::from_labels(vec![
            &b"\xff\xfe"[..],
            b"demo",
            b"svc",
            b"clusterset",
            b"local",
        ])
        .unwrap();
        let view = Snapshot::new(Arc::new(view()));
        assert_eq!(answer(&view, &name, RecordType::A), Answer::nx_domain());
    }
}
