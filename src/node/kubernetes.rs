//! Which node is the gateway, from the Kubernetes API: the node labelled
//! `meshd.io/gateway=true`, at its InternalIP. Every node's meshd asks the same question and
//! compares the answer with its own addresses ([`super::role`]).

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams};
use std::net::IpAddr;

/// The label that marks the gateway node.
pub const GATEWAY_LABEL: &str = "meshd.io/gateway";

/// Why the gateway node could not be found.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("cannot list the nodes to find the gateway (label {GATEWAY_LABEL}=true): {0}; meshd's ClusterRole needs get/list on nodes (deploy/base/rbac.yaml)")]
    List(#[source] kube::Error),
    #[error("no node is labelled {GATEWAY_LABEL}=true: label the gateway node (kubectl label node NODE {GATEWAY_LABEL}=true), or set gateway_address")]
    NoneLabelled,
    #[error("the gateway node {node} has no InternalIP address in its status: set gateway_address to its address instead")]
    NoAddress { node: String },
}

/// The gateway node's name and InternalIP. Several labelled nodes: the first by name, with a
/// warning (one gateway per cluster until gateway HA).
pub async fn gateway_node(client: kube::Client) -> Result<(String, IpAddr), GatewayError> {
    let nodes = Api::<Node>::all(client)
        .list(&ListParams::default())
        .await
        .map_err(GatewayError::List)?;
    let mut labelled: Vec<Node> = nodes
        .items
        .into_iter()
        .filter(|n| {
            n.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(GATEWAY_LABEL))
                .is_some_and(|v| v == "true")
        })
        .collect();
    labelled.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let names: Vec<String> = labelled
        .iter()
        .filter_map(|n| n.metadata.name.clone())
        .collect();
    let node = labelled
        .into_iter()
        .next()
        .ok_or(GatewayError::NoneLabelled)?;
    let name = node.metadata.name.clone().unwrap_or_default();
    if names.len() > 1 {
        tracing::warn!(gateway = %name, labelled = ?names,
            "several nodes are labelled {GATEWAY_LABEL}=true: the first by name is the gateway; remove the label from the others");
    }
    let address = node
        .status
        .and_then(|s| s.addresses)
        .unwrap_or_default()
        .into_iter()
        .filter(|a| a.type_ == "InternalIP")
        .find_map(|a| a.address.parse::<IpAddr>().ok())
        .ok_or_else(|| GatewayError::NoAddress { node: name.clone() })?;
    Ok((name, address))
}

/// The Service CoreDNS forwards `clusterset.local` to (deploy/base/dns-service.yaml). It has no
/// selector: meshd runs on every node but answers DNS on the gateway only, so the gateway
/// publishes the Service's one endpoint itself, in [`DNS_SLICE`].
pub const DNS_SERVICE: &str = "meshd-dns";
/// The EndpointSlice the gateway writes for [`DNS_SERVICE`], in meshd's own namespace.
pub const DNS_SLICE: &str = "meshd-dns-gateway";

/// Writes (creates, or merge-patches) [`DNS_SLICE`]: `address:port`, UDP and TCP, in the
/// client's namespace (meshd's, from its service account).
pub async fn publish_dns(
    client: kube::Client,
    address: IpAddr,
    port: u16,
) -> Result<(), kube::Error> {
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use kube::api::{Patch, PatchParams, PostParams};
    let namespace = client.default_namespace().to_string();
    let api = Api::<EndpointSlice>::namespaced(client, &namespace);
    let body = serde_json::json!({
        "addressType": if address.is_ipv6() { "IPv6" } else { "IPv4" },
        "endpoints": [{ "addresses": [address.to_string()], "conditions": { "ready": true } }],
        "ports": [
            { "name": "dns-udp", "port": port, "protocol": "UDP" },
            { "name": "dns-tcp", "port": port, "protocol": "TCP" }
        ],
    });
    let mut slice = body.clone();
    slice["apiVersion"] = "discovery.k8s.io/v1".into();
    slice["kind"] = "EndpointSlice".into();
    slice["metadata"] = serde_json::json!({
        "name": DNS_SLICE,
        "namespace": namespace,
        "labels": {
            "kubernetes.io/service-name": DNS_SERVICE,
            "endpointslice.kubernetes.io/managed-by": "meshd.io",
            "app.kubernetes.io/managed-by": "meshd",
        },
    });
    let slice: EndpointSlice = serde_json::from_value(slice).map_err(kube::Error::SerdeError)?;
    match api.create(&PostParams::default(), &slice).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => api
            .patch(DNS_SLICE, &PatchParams::default(), &Patch::Merge(body))
            .await
            .map(|_| ()),
        Err(e) => Err(e),
    }
}
