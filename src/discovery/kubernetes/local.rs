//! This cluster's exports, decided from ServiceExport, Service and EndpointSlice objects: a pure
//! function over snapshots of the three reflector stores, no I/O.
//!
//! For each ServiceExport it says whether the export is valid (a Service of the same namespace and
//! name exists and is not ExternalName), whether it is ready (in the catalog), and, when it is,
//! the [`ExportedService`] the catalog carries: its type (Headless for `clusterIP: None`, else
//! ClusterSetIP with the `clusterIPs`), its ports, and its ready endpoints from the EndpointSlices
//! labelled `kubernetes.io/service-name` (every endpoint when the Service sets
//! `publishNotReadyAddresses`). The result is sorted so that an unchanged cluster always yields
//! an equal catalog.

use super::status::Verdict;
use crate::discovery::catalog::{
    is_dns_label, is_label_value, is_metadata_key, Endpoint, ExportedService, PortProtocol,
    ServicePort, ServiceType, SessionAffinity, TrafficPolicy, MAX_ANNOTATION_BYTES,
    MAX_EXPORTED_METADATA,
};
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::DynamicObject;
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

/// The label that ties an EndpointSlice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// What became of one ServiceExport.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ExportVerdict {
    pub namespace: String,
    pub name: String,
    /// `Some` when the export is in this cluster's catalog.
    pub service: Option<ExportedService>,
    pub valid: Verdict,
    pub ready: Verdict,
}

/// RFC 3339 in the form the Kubernetes API writes (UTC, whole seconds).
pub(crate) fn rfc3339(time: &Time) -> String {
    time.0.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// Decides every ServiceExport; the verdicts come sorted by namespace and name. With
/// `local_cidrs`, an export that hands out an address outside them is not valid.
pub(crate) fn decide(
    exports: &[Arc<DynamicObject>],
    services: &[Arc<Service>],
    slices: &[Arc<EndpointSlice>],
    local_cidrs: &[IpNet],
) -> Vec<ExportVerdict> {
    let services: HashMap<(&str, &str), &Service> = services
        .iter()
        .filter_map(|s| {
            Some((
                (
                    s.metadata.namespace.as_deref()?,
                    s.metadata.name.as_deref()?,
                ),
                &**s,
            ))
        })
        .collect();
    let mut slices_of: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
    for slice in slices {
        let (Some(namespace), Some(service)) = (
            slice.metadata.namespace.as_deref(),
            slice
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL)),
        ) else {
            continue;
        };
        slices_of
            .entry((namespace, service.as_str()))
            .or_default()
            .push(slice);
    }
    let mut verdicts: Vec<ExportVerdict> = exports
        .iter()
        .filter_map(|export| {
            let namespace = export.metadata.namespace.as_deref()?;
            let name = export.metadata.name.as_deref()?;
            let exported_at = export.metadata.creation_timestamp.as_ref().map(rfc3339);
            let service = services.get(&(namespace, name)).copied();
            let slices = slices_of
                .get(&(namespace, name))
                .map(Vec::as_slice)
                .unwrap_or_default();
            let mut verdict = decide_one(namespace, name, exported_at, service, slices);
            if let Some(service) = verdict.service.as_mut() {
                let spec = export.data.get("spec");
                let (labels, bad_labels) = exported_metadata(spec, "exportedLabels", true);
                let (annotations, bad_annotations) =
                    exported_metadata(spec, "exportedAnnotations", false);
                service.exported_labels = labels;
                service.exported_annotations = annotations;
                let left_out: Vec<String> = bad_labels.into_iter().chain(bad_annotations).collect();
                if !left_out.is_empty() {
                    verdict.valid.message.push_str(&format!(
                        "; left out of the ServiceImport, not valid Kubernetes metadata (or over {MAX_EXPORTED_METADATA} entries): {}",
                        left_out.join(", ")
                    ));
                }
            }
            Some(inside(verdict, local_cidrs))
        })
        .collect();
    verdicts.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    verdicts
}

/// A ServiceExport's `spec.exportedLabels` (`labels`: values must be label values too) or
/// `spec.exportedAnnotations`: the valid entries, and the keys of those left out (quoted).
fn exported_metadata(
    spec: Option<&serde_json::Value>,
    field: &str,
    labels: bool,
) -> (BTreeMap<String, String>, Vec<String>) {
    let mut taken = BTreeMap::new();
    let mut left_out = Vec::new();
    let mut bytes = 0;
    let entries = spec
        .and_then(|s| s.get(field))
        .and_then(|m| m.as_object())
        .into_iter()
        .flatten();
    for (key, value) in entries {
        let value = value.as_str().unwrap_or_default();
        bytes += key.len() + value.len();
        let fits = taken.len() < MAX_EXPORTED_METADATA && (labels || bytes <= MAX_ANNOTATION_BYTES);
        if fits && is_metadata_key(key) && (!labels || is_label_value(value)) {
            taken.insert(key.clone(), value.to_string());
        } else {
            left_out.push(format!("{field} {key:?}"));
        }
    }
    (taken, left_out)
}

/// The verdict, or a refusal when the service hands out an address outside `local_cidrs` (a
/// misconfigured `local_cidrs`, or an endpoint on the host network of a node outside them): the
/// peers would quarantine it anyway, and the export's owner should see why here.
fn inside(verdict: ExportVerdict, local_cidrs: &[IpNet]) -> ExportVerdict {
    let Some(stray) = verdict.service.as_ref().and_then(|s| {
        s.addresses()
            .find(|ip| !local_cidrs.is_empty() && !local_cidrs.iter().any(|n| n.contains(ip)))
    }) else {
        return verdict;
    };
    let (namespace, name) = (&verdict.namespace, &verdict.name);
    let valid = Verdict::no(
        "AddressOutsideCluster",
        format!("Service {namespace}/{name} hands out {stray}, which is outside this cluster's local_cidrs: add the range to local_cidrs in meshd's configuration, or export a Service whose IPs and endpoints are inside it"),
    );
    ExportVerdict {
        service: None,
        ready: Verdict::no("Failed", format!("not exported: {}", valid.message)),
        valid,
        ..verdict
    }
}

fn decide_one(
    namespace: &str,
    name: &str,
    exported_at: Option<String>,
    service: Option<&Service>,
    slices: &[&EndpointSlice],
) -> ExportVerdict {
    let refuse = |valid: Verdict| ExportVerdict {
        namespace: namespace.to_string(),
        name: name.to_string(),
        service: None,
        ready: Verdict::no("Failed", format!("not exported: {}", valid.message)),
        valid,
    };
    let Some(service) = service else {
        return refuse(Verdict::no(
            "NoService",
            format!("no Service {namespace}/{name} in this cluster: create it, or delete this ServiceExport"),
        ));
    };
    let spec = service.spec.clone().unwrap_or_default();
    if spec.type_.as_deref() == Some("ExternalName") {
        return refuse(Verdict::no(
            "InvalidServiceType",
            format!("Service {namespace}/{name} is of type ExternalName, which the MCS API cannot export; export a ClusterIP or headless Service instead"),
        ));
    }
    let valid = Verdict::yes("Valid", format!("Service {namespace}/{name} is exportable"));
    let headless = spec.cluster_ip.as_deref() == Some("None");
    let ips: Vec<IpAddr> = if headless {
        Vec::new()
    } else {
        let texts = match &spec.cluster_ips {
            Some(ips) if !ips.is_empty() => ips.clone(),
            _ => spec.cluster_ip.iter().cloned().collect(),
        };
        texts.iter().filter_map(|t| t.parse().ok()).collect()
    };
    if !headless && ips.is_empty() {
        return ExportVerdict {
            namespace: namespace.to_string(),
            name: name.to_string(),
            service: None,
            valid,
            ready: Verdict::no(
                "Pending",
                format!("Service {namespace}/{name} has no cluster IP yet; it is exported once Kubernetes assigns one"),
            ),
        };
    }
    let ports = spec
        .ports
        .iter()
        .flatten()
        .filter_map(|p| {
            let protocol = match p.protocol.as_deref() {
                None | Some("TCP") => PortProtocol::Tcp,
                Some("UDP") => PortProtocol::Udp,
                Some("SCTP") => PortProtocol::Sctp,
                Some(_) => return None,
            };
            Some(ServicePort {
                name: p.name.clone().filter(|n| !n.is_empty()),
                protocol,
                port: u16::try_from(p.port).ok().filter(|p| *p > 0)?,
                app_protocol: p.app_protocol.clone().filter(|a| !a.is_empty()),
            })
        })
        .collect();
    let publish_not_ready = spec.publish_not_ready_addresses == Some(true);
    let mut endpoints: BTreeMap<IpAddr, Endpoint> = BTreeMap::new();
    for slice in slices {
        if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
            continue;
        }
        for endpoint in slice.endpoints.iter().flatten() {
            // An unknown readiness (nil) counts as ready, as the EndpointSlice API says.
            let ready = endpoint
                .conditions
                .as_ref()
                .and_then(|c| c.ready)
                .unwrap_or(true);
            if !(ready || publish_not_ready) {
                continue;
            }
            let hostname = endpoint.hostname.clone().filter(|h| is_dns_label(h));
            for address in &endpoint.addresses {
                if let Ok(ip) = address.parse::<IpAddr>() {
                    endpoints.entry(ip).or_insert_with(|| Endpoint {
                        ip,
                        hostname: hostname.clone(),
                        ready: true,
                    });
                }
            }
        }
    }
    let service_type = if headless {
        ServiceType::Headless
    } else {
        ServiceType::ClusterSetIP
    };
    ExportVerdict {
        namespace: namespace.to_string(),
        name: name.to_string(),
        service: Some(ExportedService {
            namespace: namespace.to_string(),
            name: name.to_string(),
            service_type,
            ips,
            ports,
            endpoints: endpoints.into_values().collect(),
            exported_at,
            session_affinity: match spec.session_affinity.as_deref() {
                Some("ClientIP") => Some(SessionAffinity::ClientIp),
                Some("None") => Some(SessionAffinity::NoAffinity),
                _ => None,
            },
            session_affinity_timeout: spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .and_then(|t| u32::try_from(t).ok())
                .filter(|_| spec.session_affinity.as_deref() == Some("ClientIP")),
            internal_traffic_policy: match spec.internal_traffic_policy.as_deref() {
                Some("Cluster") => Some(TrafficPolicy::Cluster),
                Some("Local") => Some(TrafficPolicy::Local),
                _ => None,
            },
            traffic_distribution: spec.traffic_distribution.clone().filter(|t| !t.is_empty()),
            exported_labels: BTreeMap::new(),
            exported_annotations: BTreeMap::new(),
        }),
        valid,
        ready: Verdict::yes(
            "Exported",
            format!("in the clusterset catalog as a {service_type:?} service"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`decide`] with no `local_cidrs` to check against.
    fn decide_all(
        exports: &[Arc<DynamicObject>],
        services: &[Arc<Service>],
        slices: &[Arc<EndpointSlice>],
    ) -> Vec<ExportVerdict> {
        decide(exports, services, slices, &[])
    }
    use serde_json::json;

    fn export(ns: &str, name: &str) -> Arc<DynamicObject> {
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "multicluster.x-k8s.io/v1alpha1",
                "kind": "ServiceExport",
                "metadata": {"namespace": ns, "name": name, "creationTimestamp": "2026-01-02T03:04:05Z"},
            }))
            .unwrap(),
        )
    }

    fn service(ns: &str, name: &str, spec: serde_json::Value) -> Arc<Service> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"namespace": ns, "name": name},
                "spec": spec,
            }))
            .unwrap(),
        )
    }

    fn slice(
        ns: &str,
        service: &str,
        family: &str,
        endpoints: serde_json::Value,
    ) -> Arc<EndpointSlice> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"namespace": ns, "name": format!("{service}-{family}"),
                             "labels": {SERVICE_NAME_LABEL: service}},
                "addressType": family,
                "endpoints": endpoints,
            }))
            .unwrap(),
        )
    }

    /// An endpoint outside `local_cidrs` (a host-network pod on a node outside them): the export
    /// is not valid here, with the fix, and stays out of the catalog the peers get.
    #[test]
    fn an_export_handing_out_addresses_outside_the_cluster_is_not_valid() {
        let cidrs: Vec<IpNet> = vec![
            "10.244.0.0/16".parse().unwrap(),
            "10.96.0.0/16".parse().unwrap(),
        ];
        let decided = |endpoint: &str| {
            decide(
                &[export("demo", "web")],
                &[service(
                    "demo",
                    "web",
                    json!({"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}),
                )],
                &[slice(
                    "demo",
                    "web",
                    "IPv4",
                    json!([{"addresses": [endpoint]}]),
                )],
                &cidrs,
            )
            .remove(0)
        };
        let inside = decided("10.244.1.10");
        assert!(inside.valid.status && inside.service.is_some());
        let outside = decided("192.168.1.20");
        assert!(!outside.valid.status);
        assert_eq!(outside.valid.reason, "AddressOutsideCluster");
        assert!(
            outside.valid.message.contains("192.168.1.20"),
            "{}",
            outside.valid.message
        );
        assert!(outside.service.is_none());
    }

    #[test]
    fn a_cluster_ip_service_exports_its_ips_ports_and_ready_endpoints() {
        let v = decide_all(
            &[export("demo", "web")],
            &[service(
                "demo",
                "web",
                json!({"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00:96::10"],
                       "ports": [{"name": "http", "port": 80}, {"port": 53, "protocol": "UDP"}]}),
            )],
            &[
                slice(
                    "demo",
                    "web",
                    "IPv4",
                    json!([{"addresses": ["10.244.1.11"], "conditions": {"ready": true}},
                           {"addresses": ["10.244.1.10"]},
                           {"addresses": ["10.244.1.12"], "conditions": {"ready": false}}]),
                ),
                slice(
                    "demo",
                    "other",
                    "IPv4",
                    json!([{"addresses": ["10.244.9.9"]}]),
                ),
                slice(
                    "demo",
                    "web",
                    "FQDN",
                    json!([{"addresses": ["web.example.com"]}]),
                ),
            ],
        );
        assert_eq!(v.len(), 1);
        assert!(v[0].valid.status && v[0].ready.status);
        let s = v[0].service.as_ref().unwrap();
        assert_eq!(s.service_type, ServiceType::ClusterSetIP);
        assert_eq!(
            s.ips,
            [
                "10.96.0.10".parse::<IpAddr>().unwrap(),
                "fd00:96::10".parse().unwrap()
            ]
        );
        assert_eq!(
            s.ports,
            [
                ServicePort {
                    name: Some("http".into()),
                    protocol: PortProtocol::Tcp,
                    port: 80,
                    ..Default::default()
                },
                ServicePort {
                    name: None,
                    protocol: PortProtocol::Udp,
                    port: 53,
                    ..Default::default()
                },
            ]
        );
        let ips: Vec<String> = s.endpoints.iter().map(|e| e.ip.to_string()).collect();
        assert_eq!(ips, ["10.244.1.10", "10.244.1.11"]);
        assert_eq!(s.exported_at.as_deref(), Some("2026-01-02T03:04:05Z"));
    }

    #[test]
    fn headless_services_keep_hostnames_and_may_publish_not_ready_endpoints() {
        let eps = json!([{"addresses": ["10.244.1.20"], "hostname": "db-0", "conditions": {"ready": true}},
                         {"addresses": ["10.244.1.21"], "hostname": "db-1", "conditions": {"ready": false}},
                         {"addresses": ["10.244.1.22"], "hostname": "Not_A_Label"}]);
        let decide_with = |publish: bool| {
            decide_all(
                &[export("demo", "db")],
                &[service("demo", "db", json!({"clusterIP": "None", "publishNotReadyAddresses": publish, "ports": [{"name": "pg", "port": 5432}]}))],
                &[slice("demo", "db", "IPv4", eps.clone())],
            )
            .remove(0)
            .service
            .unwrap()
        };
        let s = decide_with(false);
        assert_eq!(s.service_type, ServiceType::Headless);
        assert!(s.ips.is_empty());
        let got: Vec<(String, Option<&str>)> = s
            .endpoints
            .iter()
            .map(|e| (e.ip.to_string(), e.hostname.as_deref()))
            .collect();
        assert_eq!(
            got,
            [
                ("10.244.1.20".into(), Some("db-0")),
                ("10.244.1.22".into(), None)
            ]
        );
        let s = decide_with(true);
        assert_eq!(s.endpoints.len(), 3);
        assert!(s.endpoints.iter().all(|e| e.ready));
    }

    #[test]
    fn missing_and_external_name_services_are_not_valid() {
        let v = decide_all(
            &[export("demo", "gone"), export("demo", "ext")],
            &[service(
                "demo",
                "ext",
                json!({"type": "ExternalName", "externalName": "example.com"}),
            )],
            &[],
        );
        assert_eq!(v[0].name, "ext");
        assert_eq!(v[0].valid.reason, "InvalidServiceType");
        assert!(!v[0].valid.status && !v[0].ready.status && v[0].service.is_none());
        assert_eq!(v[1].name, "gone");
        assert_eq!(v[1].valid.reason, "NoService");
        assert!(
            v[1].valid.message.contains("demo/gone"),
            "{}",
            v[1].valid.message
        );
        assert!(v[1].ready.message.starts_with("not exported: "));
    }

    #[test]
    fn a_service_without_a_cluster_ip_yet_is_valid_but_pending() {
        let v = decide_all(
            &[export("demo", "web")],
            &[service("demo", "web", json!({"ports": [{"port": 80}]}))],
            &[],
        );
        assert!(v[0].valid.status);
        assert_eq!(v[0].ready.reason, "Pending");
        assert!(v[0].service.is_none());
    }
}
