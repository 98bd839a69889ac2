//! The MCS EndpointSlices of imported services: for every service exported anywhere in the view
//! (this cluster included), one EndpointSlice per exporting cluster and IP family, in the
//! service's namespace, with the endpoints that cluster exports. They carry the MCS labels
//! (`multicluster.kubernetes.io/service-name`, `multicluster.kubernetes.io/source-cluster`), a
//! `endpointslice.kubernetes.io/managed-by` that is not the Kubernetes controller's, and meshd's
//! own mark; never `kubernetes.io/service-name`, so that kube-proxy does not take them for a
//! local Service's. This is what the CoreDNS `multicluster` plugin reads for headless names.
//!
//! An endpoint is ready when its export says so and its cluster is up (its tunnel answers the
//! health probe): the slices agree with what `clusterset.local` DNS answers.

use super::clusterset::exporters;
use crate::discovery::catalog::{ClustersetView, ExportedService};
use k8s_openapi::api::discovery::v1::{
    Endpoint as SliceEndpoint, EndpointConditions, EndpointPort, EndpointSlice,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use std::collections::BTreeMap;
use std::net::IpAddr;

/// The MCS labels.
pub(crate) const SERVICE_NAME: &str = "multicluster.kubernetes.io/service-name";
pub(crate) const SOURCE_CLUSTER: &str = "multicluster.kubernetes.io/source-cluster";
/// Who manages an EndpointSlice (the Kubernetes controller's value is
/// `endpointslice-controller.k8s.io`).
pub(crate) const SLICE_MANAGED_BY: (&str, &str) =
    ("endpointslice.kubernetes.io/managed-by", "meshd.io");
/// The most endpoints one EndpointSlice holds (the Kubernetes API's limit).
const ENDPOINTS_PER_SLICE: usize = 1000;

/// Every MCS EndpointSlice this cluster should hold, keyed by (namespace, name).
pub(crate) fn wanted_slices(
    cluster: &str,
    local: &[ExportedService],
    view: &ClustersetView,
) -> BTreeMap<(String, String), EndpointSlice> {
    let mut wanted = BTreeMap::new();
    for ((namespace, name), exporters) in exporters(cluster, local, view) {
        for exporter in exporters {
            for (family, suffix) in [("IPv4", "ipv4"), ("IPv6", "ipv6")] {
                let endpoints: Vec<SliceEndpoint> = exporter
                    .service
                    .endpoints
                    .iter()
                    .filter(|e| {
                        matches!(
                            (family, e.ip),
                            ("IPv4", IpAddr::V4(_)) | ("IPv6", IpAddr::V6(_))
                        )
                    })
                    .map(|e| SliceEndpoint {
                        addresses: vec![e.ip.to_string()],
                        hostname: e.hostname.clone(),
                        conditions: Some(EndpointConditions {
                            ready: Some(e.ready && exporter.up),
                            ..Default::default()
                        }),
                        ..Default::default()
                    })
                    .collect();
                for (k, chunk) in endpoints.chunks(ENDPOINTS_PER_SLICE).enumerate() {
                    let slice_name = match k {
                        0 => format!("meshd-{}-{name}-{suffix}", exporter.cluster),
                        k => format!("meshd-{}-{name}-{suffix}-{k}", exporter.cluster),
                    };
                    let slice = EndpointSlice {
                        metadata: ObjectMeta {
                            name: Some(slice_name.clone()),
                            namespace: Some(namespace.to_string()),
                            labels: Some(slice_labels(name, exporter.cluster)),
                            ..Default::default()
                        },
                        address_type: family.to_string(),
                        endpoints: Some(chunk.to_vec()),
                        ports: Some(
                            exporter
                                .service
                                .ports
                                .iter()
                                .map(|p| EndpointPort {
                                    name: p.name.clone(),
                                    protocol: Some(p.protocol.to_string()),
                                    port: Some(i32::from(p.port)),
                                    app_protocol: p.app_protocol.clone(),
                                })
                                .collect(),
                        ),
                    };
                    wanted.insert((namespace.to_string(), slice_name), slice);
                }
            }
        }
    }
    wanted
}

/// The labels of the slice of `service` from `cluster`.
fn slice_labels(service: &str, cluster: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (SERVICE_NAME.to_string(), service.to_string()),
        (SOURCE_CLUSTER.to_string(), cluster.to_string()),
        (
            SLICE_MANAGED_BY.0.to_string(),
            SLICE_MANAGED_BY.1.to_string(),
        ),
        (
            super::MANAGED_BY.0.to_string(),
            super::MANAGED_BY.1.to_string(),
        ),
    ])
}

/// Whether meshd manages this EndpointSlice (its mark and the MCS service-name label).
pub(crate) fn managed(slice: &EndpointSlice) -> bool {
    slice.metadata.labels.as_ref().is_some_and(|l| {
        l.get(super::MANAGED_BY.0).map(String::as_str) == Some(super::MANAGED_BY.1)
            && l.contains_key(SERVICE_NAME)
    })
}

/// Whether an existing slice already is what `want` describes (the fields meshd writes).
pub(crate) fn same(existing: &EndpointSlice, want: &EndpointSlice) -> bool {
    existing.address_type == want.address_type
        && existing.endpoints == want.endpoints
        && existing.ports.as_deref().unwrap_or_default()
            == want.ports.as_deref().unwrap_or_default()
        && existing.metadata.labels == want.metadata.labels
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::catalog::{
        ClusterEntry, Endpoint, ExportCatalog, PortProtocol, ServicePort, ServiceType,
    };
    use std::sync::Arc;

    fn hello(ips: &[&str]) -> ExportedService {
        ExportedService {
            namespace: "demo".into(),
            name: "hello".into(),
            service_type: ServiceType::Headless,
            ports: vec![ServicePort {
                name: Some("tcp".into()),
                protocol: PortProtocol::Tcp,
                port: 42,
                ..Default::default()
            }],
            endpoints: ips
                .iter()
                .enumerate()
                .map(|(i, ip)| Endpoint {
                    ip: ip.parse().unwrap(),
                    hostname: Some(format!("hello-ss-{i}")),
                    ready: true,
                })
                .collect(),
            ..Default::default()
        }
    }

    /// One slice per exporting cluster and family, with the MCS labels; a cluster that is down
    /// has its endpoints not ready (DNS leaves it out too).
    #[test]
    fn one_slice_per_cluster_and_family_with_the_mcs_labels() {
        let remote = ClusterEntry {
            up: false,
            catalog: Arc::new(ExportCatalog {
                cluster: "m2".into(),
                generation: 1,
                services: vec![hello(&["10.245.1.5"])],
            }),
        };
        let view = ClustersetView::build(
            Arc::new(ExportCatalog {
                cluster: "m1".into(),
                generation: 1,
                services: Vec::new(),
            }),
            &BTreeMap::from([("m2".to_string(), remote)]),
        );
        let wanted = wanted_slices("m1", &[hello(&["10.244.1.5", "fd00:244::5"])], &view);
        let names: Vec<&str> = wanted.keys().map(|(_, n)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "meshd-m1-hello-ipv4",
                "meshd-m1-hello-ipv6",
                "meshd-m2-hello-ipv4"
            ]
        );
        let m2 = &wanted[&("demo".to_string(), "meshd-m2-hello-ipv4".to_string())];
        let labels = m2.metadata.labels.as_ref().unwrap();
        assert_eq!(labels[SERVICE_NAME], "hello");
        assert_eq!(labels[SOURCE_CLUSTER], "m2");
        assert_ne!(
            labels[SLICE_MANAGED_BY.0],
            "endpointslice-controller.k8s.io"
        );
        assert!(!labels.contains_key("kubernetes.io/service-name"));
        assert_eq!(
            m2.endpoints.as_ref().unwrap()[0]
                .conditions
                .as_ref()
                .unwrap()
                .ready,
            Some(false)
        );
        let m1 = &wanted[&("demo".to_string(), "meshd-m1-hello-ipv6".to_string())];
        assert_eq!(m1.address_type, "IPv6");
        assert_eq!(
            m1.endpoints.as_ref().unwrap()[0].hostname.as_deref(),
            Some("hello-ss-1")
        );
        assert!(managed(m1) && same(m1, m1));
    }

    #[test]
    fn more_than_a_thousand_endpoints_take_several_slices() {
        let ips: Vec<String> = (0..2500)
            .map(|i| format!("10.244.{}.{}", i / 250, i % 250 + 1))
            .collect();
        let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
        let view = ClustersetView::build(
            Arc::new(ExportCatalog {
                cluster: "m1".into(),
                generation: 1,
                services: Vec::new(),
            }),
            &BTreeMap::new(),
        );
        let wanted = wanted_slices("m1", &[hello(&ips)], &view);
        let sizes: Vec<usize> = wanted
            .values()
            .map(|s| s.endpoints.as_ref().map_or(0, Vec::len))
            .collect();
        assert_eq!(sizes, [1000, 1000, 500]);
    }
}
