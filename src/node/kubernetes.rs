//! The cluster's nodes from the Kubernetes API: which are gateway candidates (labelled
//! `meshd.io/gateway=true`), their InternalIPs, and which node this meshd runs on (the node
//! whose InternalIP is one of its addresses: meshd runs in the host's network). The candidates
//! elect the active gateway ([`super::lease`]); the others route to it.

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
    #[error("no node is labelled {GATEWAY_LABEL}=true: label the gateway node, or two for a standby (kubectl label node NODE {GATEWAY_LABEL}=true), or set gateway_address")]
    NoneLabelled,
    #[error("the gateway candidate {node} (labelled {GATEWAY_LABEL}=true) has no valid InternalIP address in its status: fix the node's address, remove the label, or set gateway_address instead")]
    NoAddress { node: String },
}

/// The cluster's nodes as meshd needs them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Directory {
    /// Node name → its InternalIP (nodes without one are left out).
    pub addresses: std::collections::BTreeMap<String, IpAddr>,
    /// The gateway candidates' names, sorted.
    pub candidates: Vec<String>,
    /// This node's name, when one of its InternalIPs is ours.
    pub me: Option<String>,
}

impl Directory {
    /// Whether this node is a gateway candidate.
    pub fn i_am_candidate(&self) -> bool {
        self.me
            .as_ref()
            .is_some_and(|me| self.candidates.contains(me))
    }
}

/// Lists the nodes: every node's InternalIP, the labelled candidates (at least one, each
/// with an address), and which of them has one of `own` addresses.
pub async fn directory(client: kube::Client, own: &[IpAddr]) -> Result<Directory, GatewayError> {
    let nodes = Api::<Node>::all(client)
        .list(&ListParams::default())
        .await
        .map_err(GatewayError::List)?;
    let mut directory = Directory::default();
    for node in nodes.items {
        let name = node.metadata.name.clone().unwrap_or_default();
        let labelled = node
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(GATEWAY_LABEL))
            .is_some_and(|v| v == "true");
        let addresses: Vec<IpAddr> = node
            .status
            .and_then(|s| s.addresses)
            .unwrap_or_default()
            .into_iter()
            .filter(|a| a.type_ == "InternalIP")
            .filter_map(|a| a.address.parse::<IpAddr>().ok())
            .collect();
        let Some(first) = addresses.first().copied() else {
            if labelled {
                return Err(GatewayError::NoAddress { node: name });
            }
            continue;
        };
        if addresses.iter().any(|a| own.contains(a)) {
            directory.me = Some(name.clone());
        }
        if labelled {
            directory.candidates.push(name.clone());
        }
        directory.addresses.insert(name, first);
    }
    directory.candidates.sort();
    if directory.candidates.is_empty() {
        return Err(GatewayError::NoneLabelled);
    }
    Ok(directory)
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
