//! What the other clusters' exports mean for this one: the `Conflict` condition of a local export,
//! and the ServiceImports this cluster should hold. Pure functions over this cluster's fresh
//! exports and the clusterset view.
//!
//! The MCS API's rule: when clusters export the same namespace/name with different ports or
//! types, the oldest export wins (its `exported_at`; an undated export, from an exports file,
//! counts as younger than any dated one; ties go to the cluster name that sorts first). The
//! losers are marked `Conflict=True`; the ServiceImport takes the winner's type and ports.
//! Every cluster in the view counts, whether its tunnel is up or not: an export does not end when
//! a tunnel goes down, only when its cluster withdraws it from its catalog.

use super::status::Verdict;
use crate::discovery::catalog::{ClustersetView, ExportedService, ServicePort, ServiceType};
use k8s_openapi::jiff::Timestamp;
use std::cmp::Ordering;
use std::collections::BTreeMap;

/// One cluster's export of a service.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Exporter<'a> {
    pub cluster: &'a str,
    pub service: &'a ExportedService,
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
}

/// Every service exported anywhere: this cluster's exports (fresh, not the view's possibly older
/// copy) and every other cluster's in the view, grouped by (namespace, name).
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
            })
        });
    let local = local.iter().map(|s| Exporter {
        cluster,
        service: s,
    });
    for exporter in local.chain(remote) {
        all.entry((&exporter.service.namespace, &exporter.service.name))
            .or_default()
            .push(exporter);
    }
    all
}

/// The export whose definition the clusterset uses.
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

/// The `Conflict` condition of this cluster's export `ours`, among all `exporters` of it.
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
    if winner.cluster == cluster {
        let differing: Vec<&str> = exporters
            .iter()
            .filter(|e| e.cluster != cluster && differences(ours, e.service).is_some())
            .map(|e| e.cluster)
            .collect();
        let message = if others.is_empty() {
            "exported by this cluster only".to_string()
        } else if differing.is_empty() {
            format!("agrees with the exports of {}", others.join(", "))
        } else {
            format!(
                "this cluster's export is the oldest, so its ports and type win over those of {}",
                differing.join(", ")
            )
        };
        return Verdict::no("NoConflicts", message);
    }
    match differences(ours, winner.service) {
        None => Verdict::no(
            "NoConflicts",
            format!("agrees with the exports of {}", others.join(", ")),
        ),
        Some((reason, what)) => Verdict::yes(
            reason,
            format!(
                "{what} differ from cluster {}'s export{}, the oldest, which the clusterset uses; make this Service match it or unexport one of them",
                winner.cluster,
                winner
                    .service
                    .exported_at
                    .as_deref()
                    .map(|t| format!(" (exported at {t})"))
                    .unwrap_or_default(),
            ),
        ),
    }
}

/// How two exports of one service disagree: the MCS reason and the fields, or `None`.
fn differences(a: &ExportedService, b: &ExportedService) -> Option<(&'static str, &'static str)> {
    let types = a.service_type != b.service_type;
    let ports = sorted_ports(&a.ports) != sorted_ports(&b.ports);
    match (types, ports) {
        (true, true) => Some(("TypeConflict,PortConflict", "type and ports")),
        (true, false) => Some(("TypeConflict", "type")),
        (false, true) => Some(("PortConflict", "ports")),
        (false, false) => None,
    }
}

/// A ServiceImport this cluster should hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WantedImport {
    pub namespace: String,
    pub name: String,
    pub service_type: ServiceType,
    pub ports: Vec<ServicePort>,
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
            Some(WantedImport {
                namespace: namespace.to_string(),
                name: name.to_string(),
                service_type: winner.service.service_type,
                ports: winner.service.ports.clone(),
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
            }],
            endpoints: Vec::new(),
            exported_at: exported_at.map(str::to_string),
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
    fn the_oldest_export_is_not_in_conflict_and_agreement_is_no_conflict() {
        let ours = web(8080, Some("2026-01-01T00:00:00Z"));
        let v = view(vec![(
            "m2",
            false,
            vec![web(80, Some("2026-02-01T00:00:00Z"))],
        )]);
        let c = conflict_of(&ours, &v);
        assert!(!c.status);
        assert_eq!(c.reason, "NoConflicts");
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
        // Same age: the first cluster name wins (m1 < m2).
        let tie = web(8080, Some("2026-02-01T00:00:00Z"));
        assert!(!conflict_of(&tie, &v).status);
        // An undated (exports file) remote loses to any dated export.
        let v = view(vec![("m0", true, vec![web(80, None)])]);
        assert!(!conflict_of(&web(8080, Some("2026-03-01T00:00:00Z")), &v).status);
        // Timestamps are compared as times, not as text: 00:00+01:00 is before 23:30Z.
        let v = view(vec![(
            "m2",
            true,
            vec![web(80, Some("2026-02-01T00:00:00+01:00"))],
        )]);
        assert!(conflict_of(&web(8080, Some("2026-01-31T23:30:00Z")), &v).status);
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
}
