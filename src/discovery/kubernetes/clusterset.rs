//! What the other clusters' exports mean for this one: the `Conflict` condition of a local export,
//! and the ServiceImports this cluster should hold. Pure functions over this cluster's fresh
//! exports and the clusterset view.
//!
//! The MCS API's rules, as its conformance suite checks them: when clusters export the same
//! namespace/name with different types or port sets, **every** exporting cluster's export is
//! marked `Conflict=True` (the oldest included); the oldest export wins the type (its
//! `exported_at`; an undated export, from an exports file, counts as younger than any dated one;
//! ties go to the cluster name that sorts first); the ports are the union, merged oldest first by
//! name and then by (protocol, port): a port whose name or number a older export already took is
//! left out. Every cluster in the view counts, whether its tunnel is up or not: an export does
//! not end when a tunnel goes down, only when its cluster withdraws it from its catalog.
//!
//! A ServiceImport's `ips` are what `clusterset.local` DNS answers for the name, one address per
//! IP family (the first of that family: this cluster's own service IP when it exports the
//! service, else the first exporting cluster that is up and has a ready endpoint), and its
//! `ipFamilies` name their families in the same order; a headless import has no `ips` and takes
//! its families from the endpoints DNS would answer with.

use super::status::Verdict;
use crate::discovery::catalog::{
    ClustersetView, ExportedService, ServicePort, ServiceType, SessionAffinity, TrafficPolicy,
};
use k8s_openapi::jiff::Timestamp;
use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::net::IpAddr;

/// One cluster's export of a service.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Exporter<'a> {
    pub cluster: &'a str,
    pub service: &'a ExportedService,
    /// Whether DNS answers with this export now: this cluster's own, or a peer's whose tunnel is
    /// up (the health probe).
    pub up: bool,
}

impl Exporter<'_> {
    /// Older exports sort first.
    fn age_order(&self, other: &Exporter<'_>) -> Ordering {
        let at = |e: &Exporter<'_>| {
            e.service
                .exported_at
                .as_deref()
                .and_then(|t| t.parse::<Timestamp>().ok())
        };
        match (at(self), at(other)) {
            (Some(a), Some(b)) => a.cmp(&b),
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (None, None) => Ordering::Equal,
        }
        .then_with(|| self.cluster.cmp(other.cluster))
    }

    /// The addresses DNS answers with for this export (none while it is down or has no ready
    /// endpoint), in the catalog's order.
    fn answered(&self) -> Vec<IpAddr> {
        if !self.up || !self.service.has_ready_endpoints() {
            return Vec::new();
        }
        match self.service.service_type {
            ServiceType::ClusterSetIP => self.service.ips.clone(),
            ServiceType::Headless => self.service.ready_endpoints().map(|e| e.ip).collect(),
        }
    }
}

/// Every service exported anywhere: this cluster's exports (fresh, not the view's possibly older
/// copy) first, then every other cluster's in view order, grouped by (namespace, name).
pub(crate) fn exporters<'a>(
    cluster: &'a str,
    local: &'a [ExportedService],
    view: &'a ClustersetView,
) -> BTreeMap<(&'a str, &'a str), Vec<Exporter<'a>>> {
    let mut all: BTreeMap<(&str, &str), Vec<Exporter<'_>>> = BTreeMap::new();
    let remote = view
        .clusters
        .iter()
        .filter(|c| c.catalog.cluster != cluster)
        .flat_map(|c| {
            c.catalog.services.iter().map(|s| Exporter {
                cluster: &c.catalog.cluster,
                service: s,
                up: c.up,
            })
        });
    let local = local.iter().map(|s| Exporter {
        cluster,
        service: s,
        up: true,
    });
    for exporter in local.chain(remote) {
        all.entry((&exporter.service.namespace, &exporter.service.name))
            .or_default()
            .push(exporter);
    }
    all
}

/// The export whose type the clusterset uses.
pub(crate) fn winner<'a>(exporters: &[Exporter<'a>]) -> Option<Exporter<'a>> {
    exporters.iter().copied().min_by(|a, b| a.age_order(b))
}

fn sorted_ports(ports: &[ServicePort]) -> Vec<(Option<&str>, String, u16)> {
    let mut ports: Vec<_> = ports
        .iter()
        .map(|p| (p.name.as_deref(), p.protocol.to_string(), p.port))
        .collect();
    ports.sort();
    ports
}

/// The `Conflict` condition of this cluster's export `ours`, among all `exporters` of it: true
/// for every exporter as soon as any two exports disagree.
pub(crate) fn conflict(
    cluster: &str,
    ours: &ExportedService,
    exporters: &[Exporter<'_>],
) -> Verdict {
    let others: Vec<&str> = exporters
        .iter()
        .filter(|e| e.cluster != cluster)
        .map(|e| e.cluster)
        .collect();
    let Some(winner) = winner(exporters) else {
        return Verdict::no("NoConflicts", "exported by this cluster only".into());
    };
    if others.is_empty() {
        return Verdict::no("NoConflicts", "exported by this cluster only".into());
    }
    // Every kind of disagreement among the exports, in the MCS API's order.
    let mut kinds: Vec<Disagreement> = Vec::new();
    for (i, a) in exporters.iter().enumerate() {
        for b in &exporters[i + 1..] {
            kinds.extend(disagreements(a.service, b.service));
        }
    }
    kinds.sort();
    kinds.dedup();
    if kinds.is_empty() {
        return Verdict::no(
            "NoConflicts",
            format!("agrees with the exports of {}", others.join(", ")),
        );
    }
    let reason = kinds
        .iter()
        .map(|k| k.reason())
        .collect::<Vec<_>>()
        .join(",");
    let differing: Vec<&str> = exporters
        .iter()
        .filter(|e| e.cluster != cluster && !disagreements(ours, e.service).is_empty())
        .map(|e| e.cluster)
        .collect();
    let message = if winner.cluster == cluster {
        format!(
            "the exports of {} differ from this cluster's, the oldest: the clusterset uses this cluster's type and settings, and the union of the ports (a port whose name or number an older export took is left out)",
            differing.join(", ")
        )
    } else {
        let at = winner
            .service
            .exported_at
            .as_deref()
            .map(|t| format!(" (exported at {t})"))
            .unwrap_or_default();
        match describe(&disagreements(ours, winner.service)) {
            Some(what) => format!(
                "{what} differ from cluster {}'s export{at}, the oldest: the clusterset uses its type and settings and, where names or numbers clash, its ports; make this Service match it or unexport one of them",
                winner.cluster
            ),
            None => format!(
                "this export agrees with cluster {}'s{at}, the oldest, but the exports of {} differ",
                winner.cluster,
                exporters
                    .iter()
                    .filter(|e| !disagreements(winner.service, e.service).is_empty())
                    .map(|e| e.cluster)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    };
    Verdict::yes(reason, message)
}

/// One way two exports of a service can disagree, in the order the MCS API lists the reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Disagreement {
    Type,
    Ports,
    SessionAffinity,
    SessionAffinityConfig,
    Annotations,
    Labels,
    InternalTrafficPolicy,
    TrafficDistribution,
}

impl Disagreement {
    /// The `Conflict` condition's reason.
    fn reason(self) -> &'static str {
        match self {
            Disagreement::Type => "TypeConflict",
            Disagreement::Ports => "PortConflict",
            Disagreement::SessionAffinity => "SessionAffinityConflict",
            Disagreement::SessionAffinityConfig => "SessionAffinityConfigConflict",
            Disagreement::Annotations => "AnnotationsConflict",
            Disagreement::Labels => "LabelsConflict",
            Disagreement::InternalTrafficPolicy => "InternalTrafficPolicyConflict",
            Disagreement::TrafficDistribution => "TrafficDistributionConflict",
        }
    }

    fn what(self) -> &'static str {
        match self {
            Disagreement::Type => "type",
            Disagreement::Ports => "ports",
            Disagreement::SessionAffinity => "session affinity",
            Disagreement::SessionAffinityConfig => "session affinity timeout",
            Disagreement::Annotations => "exported annotations",
            Disagreement::Labels => "exported labels",
            Disagreement::InternalTrafficPolicy => "internal traffic policy",
            Disagreement::TrafficDistribution => "traffic distribution",
        }
    }
}

/// How two exports of one service disagree. A setting one of them does not carry (an exports
/// file's, an older meshd's catalog) agrees with anything.
fn disagreements(a: &ExportedService, b: &ExportedService) -> Vec<Disagreement> {
    fn differ<T: PartialEq>(a: &Option<T>, b: &Option<T>) -> bool {
        matches!((a, b), (Some(x), Some(y)) if x != y)
    }
    let mut found = Vec::new();
    if a.service_type != b.service_type {
        found.push(Disagreement::Type);
    }
    if sorted_ports(&a.ports) != sorted_ports(&b.ports) {
        found.push(Disagreement::Ports);
    }
    if differ(&a.session_affinity, &b.session_affinity) {
        found.push(Disagreement::SessionAffinity);
    }
    if differ(&a.session_affinity_timeout, &b.session_affinity_timeout) {
        found.push(Disagreement::SessionAffinityConfig);
    }
    if a.exported_annotations != b.exported_annotations {
        found.push(Disagreement::Annotations);
    }
    if a.exported_labels != b.exported_labels {
        found.push(Disagreement::Labels);
    }
    if differ(&a.internal_traffic_policy, &b.internal_traffic_policy) {
        found.push(Disagreement::InternalTrafficPolicy);
    }
    if differ(&a.traffic_distribution, &b.traffic_distribution) {
        found.push(Disagreement::TrafficDistribution);
    }
    found
}

/// "type and ports", "session affinity": the fields that differ, for a message; `None` if none.
fn describe(kinds: &[Disagreement]) -> Option<String> {
    let names: Vec<&str> = kinds.iter().map(|k| k.what()).collect();
    match names.as_slice() {
        [] => None,
        [one] => Some(one.to_string()),
        [rest @ .., last] => Some(format!("{} and {last}", rest.join(", "))),
    }
}

/// The union of the exports' ports, oldest export first: a port joins unless its name (unnamed
/// counts as a name) or its (protocol, port) is taken already.
fn merged_ports(exporters: &[Exporter<'_>]) -> Vec<ServicePort> {
    let mut by_age = exporters.to_vec();
    by_age.sort_by(|a, b| a.age_order(b));
    let mut merged: Vec<ServicePort> = Vec::new();
    for exporter in by_age {
        for port in &exporter.service.ports {
            let clash = merged
                .iter()
                .any(|m| m.name == port.name || (m.protocol, m.port) == (port.protocol, port.port));
            if !clash {
                merged.push(port.clone());
            }
        }
    }
    merged
}

/// An IP family, as the MCS API spells it.
fn family(ip: &IpAddr) -> &'static str {
    match ip {
        IpAddr::V4(_) => "IPv4",
        IpAddr::V6(_) => "IPv6",
    }
}

/// A ServiceImport this cluster should hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WantedImport {
    pub namespace: String,
    pub name: String,
    pub service_type: ServiceType,
    pub ports: Vec<ServicePort>,
    /// One address per family, from what DNS answers (ClusterSetIP only).
    pub ips: Vec<IpAddr>,
    /// `IPv4` / `IPv6`, in the order of `ips` (headless: of the answered endpoints).
    pub ip_families: Vec<&'static str>,
    /// The winning export's session affinity (and timeout), internal traffic policy and
    /// traffic distribution.
    pub session_affinity: Option<SessionAffinity>,
    pub session_affinity_timeout: Option<u32>,
    pub internal_traffic_policy: Option<TrafficPolicy>,
    pub traffic_distribution: Option<String>,
    /// The winning export's exported labels and annotations (the ServiceImport's metadata).
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// The exporting clusters, sorted.
    pub clusters: Vec<String>,
}

/// One ServiceImport per service exported anywhere, shaped like its winning export.
pub(crate) fn wanted_imports(
    cluster: &str,
    local: &[ExportedService],
    view: &ClustersetView,
) -> Vec<WantedImport> {
    exporters(cluster, local, view)
        .into_iter()
        .filter_map(|((namespace, name), exporters)| {
            let winner = winner(&exporters)?;
            let mut clusters: Vec<String> =
                exporters.iter().map(|e| e.cluster.to_string()).collect();
            clusters.sort();
            clusters.dedup();
            // What DNS answers, in its order (this cluster first), from the exports of the
            // winning type.
            let answered: Vec<IpAddr> = exporters
                .iter()
                .filter(|e| e.service.service_type == winner.service.service_type)
                .flat_map(Exporter::answered)
                .collect();
            let mut ips: Vec<IpAddr> = Vec::new();
            for ip in &answered {
                if !ips.iter().any(|i| family(i) == family(ip)) {
                    ips.push(*ip);
                }
            }
            let ip_families = ips.iter().map(family).collect();
            if winner.service.service_type == ServiceType::Headless {
                ips.clear();
            }
            Some(WantedImport {
                namespace: namespace.to_string(),
                name: name.to_string(),
                service_type: winner.service.service_type,
                ports: merged_ports(&exporters),
                ips,
                ip_families,
                session_affinity: winner.service.session_affinity,
                session_affinity_timeout: winner.service.session_affinity_timeout,
                internal_traffic_policy: winner.service.internal_traffic_policy,
                traffic_distribution: winner.service.traffic_distribution.clone(),
                labels: winner.service.exported_labels.clone(),
                annotations: winner.service.exported_annotations.clone(),
                clusters,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::catalog::{ClusterEntry, ExportCatalog, PortProtocol};

    fn web(port: u16, exported_at: Option<&str>) -> ExportedService {
        ExportedService {
            namespace: "demo".into(),
            name: "web".into(),
            service_type: ServiceType::ClusterSetIP,
            ips: vec!["10.96.0.10".parse().unwrap()],
            ports: vec![ServicePort {
                name: Some("http".into()),
                protocol: PortProtocol::Tcp,
                port,
                ..Default::default()
            }],
            endpoints: Vec::new(),
            exported_at: exported_at.map(str::to_string),
            ..Default::default()
        }
    }

    fn view(remotes: Vec<(&str, bool, Vec<ExportedService>)>) -> ClustersetView {
        let remotes = remotes
            .into_iter()
            .map(|(name, up, services)| {
                (
                    name.to_string(),
                    ClusterEntry {
                        up,
                        catalog: std::sync::Arc::new(ExportCatalog {
                            cluster: name.into(),
                            generation: 1,
                            services,
                        }),
                    },
                )
            })
            .collect();
        ClustersetView::build(
            std::sync::Arc::new(ExportCatalog {
                cluster: "m1".into(),
                generation: 1,
                services: Vec::new(),
            }),
            &remotes,
        )
    }

    fn conflict_of(ours: &ExportedService, view: &ClustersetView) -> Verdict {
        let local = [ours.clone()];
        let all = exporters("m1", &local, view);
        conflict("m1", ours, &all[&("demo", "web")])
    }

    #[test]
    fn the_younger_export_with_other_ports_is_in_conflict() {
        let ours = web(8080, Some("2026-03-01T00:00:00Z"));
        let v = view(vec![(
            "m2",
            true,
            vec![web(80, Some("2026-02-01T00:00:00Z"))],
        )]);
        let c = conflict_of(&ours, &v);
        assert!(c.status);
        assert_eq!(c.reason, "PortConflict");
        assert!(c.message.contains("cluster m2's export"), "{}", c.message);
        assert!(c.message.contains("2026-02-01T00:00:00Z"), "{}", c.message);
        let imports = wanted_imports("m1", &[ours], &v);
        assert_eq!(imports.len(), 1);
        assert_eq!(
            imports[0].ports[0].port, 80,
            "the oldest export's ports win"
        );
        assert_eq!(imports[0].clusters, ["m1", "m2"]);
    }

    #[test]
    fn the_oldest_export_is_in_conflict_too_and_agreement_is_no_conflict() {
        let ours = web(8080, Some("2026-01-01T00:00:00Z"));
        let v = view(vec![(
            "m2",
            false,
            vec![web(80, Some("2026-02-01T00:00:00Z"))],
        )]);
        // The MCS conformance suite: Conflict on each ServiceExport, the oldest's included.
        let c = conflict_of(&ours, &v);
        assert!(c.status);
        assert_eq!(c.reason, "PortConflict");
        assert!(c.message.contains("m2"), "{}", c.message);
        assert_eq!(wanted_imports("m1", &[ours], &v)[0].ports[0].port, 8080);
        let same = web(80, Some("2026-03-01T00:00:00Z"));
        assert!(!conflict_of(&same, &v).status);
    }

    #[test]
    fn type_conflicts_ties_and_undated_exports() {
        let mut headless = web(80, Some("2026-03-01T00:00:00Z"));
        headless.service_type = ServiceType::Headless;
        headless.ips.clear();
        let v = view(vec![(
            "m2",
            true,
            vec![web(80, Some("2026-02-01T00:00:00Z"))],
        )]);
        assert_eq!(conflict_of(&headless, &v).reason, "TypeConflict");
        // Same age: the first cluster name wins (m1 < m2): its port takes the name.
        let tie = web(8080, Some("2026-02-01T00:00:00Z"));
        assert!(conflict_of(&tie, &v).status);
        assert_eq!(wanted_imports("m1", &[tie], &v)[0].ports[0].port, 8080);
        // An undated (exports file) remote loses to any dated export.
        let v = view(vec![("m0", true, vec![web(80, None)])]);
        let dated = web(8080, Some("2026-03-01T00:00:00Z"));
        assert_eq!(wanted_imports("m1", &[dated], &v)[0].ports[0].port, 8080);
        // Timestamps are compared as times, not as text: 00:00+01:00 is before 23:30Z.
        let v = view(vec![(
            "m2",
            true,
            vec![web(80, Some("2026-02-01T00:00:00+01:00"))],
        )]);
        let later = web(8080, Some("2026-01-31T23:30:00Z"));
        assert_eq!(wanted_imports("m1", &[later], &v)[0].ports[0].port, 80);
    }

    #[test]
    fn imports_cover_every_exported_service_and_ignore_the_views_copy_of_this_cluster() {
        let mut stale = view(vec![("m2", true, vec![web(80, None)])]);
        std::sync::Arc::make_mut(&mut stale.clusters[0].catalog)
            .services
            .push(ExportedService {
                name: "old".into(),
                ..web(80, None)
            });
        let mut db = web(5432, Some("2026-01-01T00:00:00Z"));
        db.name = "db".into();
        let imports = wanted_imports("m1", &[db], &stale);
        let names: Vec<(&str, &[String])> = imports
            .iter()
            .map(|i| (i.name.as_str(), i.clusters.as_slice()))
            .collect();
        assert_eq!(
            names,
            [
                ("db", &["m1".to_string()][..]),
                ("web", &["m2".to_string()][..])
            ]
        );
    }

    fn port(name: &str, protocol: PortProtocol, port: u16) -> ServicePort {
        ServicePort {
            name: Some(name.into()),
            protocol,
            port,
            ..Default::default()
        }
    }

    /// The conformance case "A ClusterIP service exported on two clusters should expose the union
    /// of the constituent service ports and raise a conflict", and its sibling with clashing
    /// ports ("...should apply the conflict resolution policy"): merged oldest first by name,
    /// then by (protocol, port).
    #[test]
    fn ports_are_the_union_merged_oldest_first_by_name_then_number() {
        let mut ours = web(42, Some("2026-01-01T00:00:00Z"));
        ours.ports = vec![
            port("tcp", PortProtocol::Tcp, 42),
            port("udp", PortProtocol::Udp, 42),
        ];
        let mut theirs = web(42, Some("2026-01-01T00:00:02Z"));
        theirs.ports = vec![
            port("tcp", PortProtocol::Tcp, 42),
            port("stcp", PortProtocol::Sctp, 142),
        ];
        let v = view(vec![("m2", true, vec![theirs.clone()])]);
        let import = &wanted_imports("m1", std::slice::from_ref(&ours), &v)[0];
        assert_eq!(
            import.ports,
            [
                port("tcp", PortProtocol::Tcp, 42),
                port("udp", PortProtocol::Udp, 42),
                port("stcp", PortProtocol::Sctp, 142)
            ]
        );
        assert_eq!(conflict_of(&ours, &v).reason, "PortConflict");
        // Same name, other number: the oldest keeps the name; a taken number is left out too.
        theirs.ports = vec![
            port("tcp", PortProtocol::Tcp, 43),
            port("web", PortProtocol::Udp, 42),
        ];
        let v = view(vec![("m2", true, vec![theirs])]);
        let import = &wanted_imports("m1", std::slice::from_ref(&ours), &v)[0];
        assert_eq!(import.ports, ours.ports);
        assert!(conflict_of(&ours, &v).status);
    }

    /// "An IP should be allocated for a ClusterSetIP ServiceImport for each IP family": one
    /// address per family from what DNS answers (this cluster's first), families in that order;
    /// "No clusterset IP should be allocated for a Headless ServiceImport".
    #[test]
    fn import_ips_are_one_answered_address_per_family() {
        let ready = |ip: &str| crate::discovery::catalog::Endpoint {
            ip: ip.parse().unwrap(),
            hostname: None,
            ready: true,
        };
        let mut ours = web(80, Some("2026-01-01T00:00:00Z"));
        ours.ips = vec!["10.96.0.10".parse().unwrap()];
        ours.endpoints = vec![ready("10.244.1.10")];
        let mut theirs = web(80, Some("2026-01-02T00:00:00Z"));
        theirs.ips = vec![
            "10.97.0.10".parse().unwrap(),
            "fd00:97::10".parse().unwrap(),
        ];
        theirs.endpoints = vec![ready("10.245.1.10")];
        let v = view(vec![("m2", true, vec![theirs.clone()])]);
        let import = &wanted_imports("m1", std::slice::from_ref(&ours), &v)[0];
        let ips: Vec<String> = import.ips.iter().map(|i| i.to_string()).collect();
        assert_eq!(ips, ["10.96.0.10", "fd00:97::10"]);
        assert_eq!(import.ip_families, ["IPv4", "IPv6"]);
        // A cluster that is down, or without a ready endpoint, is not in DNS: nor in the ips.
        let v = view(vec![("m2", false, vec![theirs])]);
        let import = &wanted_imports("m1", std::slice::from_ref(&ours), &v)[0];
        assert_eq!(import.ip_families, ["IPv4"]);
        ours.endpoints.clear();
        assert!(wanted_imports("m1", &[ours.clone()], &v)[0].ips.is_empty());
        // Headless: no ips, the endpoints' families.
        ours.service_type = ServiceType::Headless;
        ours.ips.clear();
        ours.endpoints = vec![ready("fd00:244::10"), ready("10.244.1.10")];
        let import = &wanted_imports("m1", &[ours], &view(vec![]))[0];
        assert!(import.ips.is_empty());
        assert_eq!(import.ip_families, ["IPv6", "IPv4"]);
    }
}
