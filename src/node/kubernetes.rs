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
