//! This node's part in its cluster. The DaemonSet runs meshd on every node: on the gateway node
//! it ends the tunnel; on every other node it is the route agent ([`agent`]), which routes the
//! remote clusters' CIDRs to the gateway. On every node it keeps the CNI from masquerading
//! traffic between this cluster and the others ([`bypass`]): a rewritten source would be
//! dropped by the other cluster's gateway (`bad_source`) and leave no way back.

pub mod agent;
pub mod bypass;
pub mod election;
pub mod keeper;
pub mod kubernetes;
pub mod lease;
pub mod vxlan;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::net::IpAddr;
use std::sync::Arc;

/// How often the route agent's routes and the masquerade bypass are checked, and put back if
/// something (an operator, a CNI restart, `iptables-restore`) removed them.
pub const CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(3);

/// What this node does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// The tunnel ends here: this node runs the WireGuard dataplane, the catalog sync and DNS.
    Gateway,
    /// Routes the remote clusters' CIDRs to the gateway node; no tunnel of its own.
    RouteAgent,
}

/// Decides this node's role: the gateway when no `gateway_address` is configured (a
/// single-node set-up) or when it is one of this node's own addresses; a route agent otherwise.
pub fn role(gateway: Option<IpAddr>, own: &[IpAddr]) -> Role {
    match gateway {
        Some(address) if !own.contains(&address) => Role::RouteAgent,
        _ => Role::Gateway,
    }
}

/// One remote prefix a route agent routes to the gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteView {
    pub prefix: IpNet,
    pub via: IpAddr,
    /// The route is in the kernel's main table now.
    pub in_place: bool,
}

/// The masquerade bypass on this node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BypassView {
    /// `masquerade_bypass` is on (the default).
    pub enabled: bool,
    /// The nftables table is in the kernel as meshd wrote it.
    pub in_place: bool,
    /// How often meshd found it changed or gone and wrote it again.
    pub restored: u64,
    /// The last error writing or reading it, with what to do.
    pub error: Option<String>,
}

/// This node's state, as the admin API (`meshctl peers`, `meshctl diagnose`) shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    pub role: Role,
    /// The gateway node's address (`gateway_address`); `null`: not configured, this node is
    /// the cluster's only gateway.
    pub gateway: Option<IpAddr>,
    /// How a route agent reaches the gateway: `direct (via GATEWAY on IFACE)` or
    /// `vxlan (meshd-vx over IFACE)`; on a gateway, whether it has a VXLAN end for the agents.
    #[serde(default)]
    pub path: Option<String>,
    /// The interface a route agent's routes leave by (the underlay, or `meshd-vx`).
    #[serde(default)]
    pub route_interface: Option<String>,
    /// A route agent's routes to the gateway (none on the gateway).
    #[serde(default)]
    pub routes: Vec<RouteView>,
    pub masquerade_bypass: BypassView,
    /// IPv4 forwarding is on (the node routes pod traffic).
    pub forwarding: bool,
    /// What is missing on this node, each with its fix; empty when all is in place.
    #[serde(default)]
    pub problems: Vec<String>,
    /// The gateway election, when the gateway is elected through the Lease (`kubernetes =
    /// true` without `gateway_address`); `null` for a configured gateway.
    #[serde(default)]
    pub election: Option<election::ElectionView>,
}

impl NodeView {
    pub fn new(role: Role, gateway: Option<IpAddr>, bypass_enabled: bool) -> Self {
        NodeView {
            role,
            gateway,
            path: None,
            route_interface: None,
            routes: Vec::new(),
            masquerade_bypass: BypassView {
                enabled: bypass_enabled,
                ..BypassView::default()
            },
            forwarding: forwarding_enabled(),
            problems: Vec::new(),
            election: None,
        }
    }

    /// Recomputes [`NodeView::problems`] from the rest.
    pub fn find_problems(&mut self) {
        let mut problems = Vec::new();
        if !self.forwarding {
            problems.push("IPv4 forwarding is off, so this node does not route pod traffic: sysctl -w net.ipv4.ip_forward=1 (Kubernetes nodes need it anyway)".to_string());
        }
        let bypass = &self.masquerade_bypass;
        if bypass.enabled && !bypass.in_place {
            problems.push(match &bypass.error {
                Some(e) => format!("the masquerade bypass is not in place: {e}"),
                None => "the masquerade bypass is not in place yet (nft list table inet meshd)"
                    .to_string(),
            });
        }
        if self.election.as_ref().is_some_and(|e| e.holder.is_none()) {
            problems.push(format!(
                "no active gateway: no candidate holds the Lease {} (kubectl -n meshd-system get lease {}; the candidates' meshd logs say why); traffic to the other clusters waits",
                lease::LEASE_NAME,
                lease::LEASE_NAME
            ));
        }
        for route in self.routes.iter().filter(|r| !r.in_place) {
            problems.push(format!(
                "no route for {} via the gateway {}: meshd puts it back within {} s; if it does not, see its log",
                route.prefix,
                route.via,
                CHECK_EVERY.as_secs()
            ));
        }
        self.problems = problems;
    }
}

/// The node state shared by the task that keeps it and the admin API that shows it.
pub type NodeState = Arc<parking_lot::RwLock<NodeView>>;

/// Whether this network namespace forwards IPv4.
pub fn forwarding_enabled() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").is_ok_and(|v| v.trim() == "1")
}

/// Every peer's allowed CIDRs: the remote clusters' ranges, and each peer gateway's tunnel
/// address (its ICMP errors, frag-needed and time-exceeded, come from that address: a node with
/// strict reverse-path filtering drops them unless the address routes back the same way).
pub fn remote_prefixes(peers: &[crate::config::PeerConfig]) -> Vec<IpNet> {
    let mut all: Vec<IpNet> = peers
        .iter()
        .flat_map(|p| p.allowed_cidrs.iter().copied())
        .collect();
    all.sort();
    all.dedup();
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gateway_is_the_node_that_has_its_address() {
        let gw: IpAddr = "172.18.1.1".parse().unwrap();
        let own: Vec<IpAddr> = vec!["127.0.0.1".parse().unwrap(), gw];
        assert_eq!(role(Some(gw), &own), Role::Gateway);
        assert_eq!(role(Some(gw), &own[..1]), Role::RouteAgent);
        assert_eq!(role(None, &own[..1]), Role::Gateway);
    }

    #[test]
    fn problems_name_what_is_missing() {
        let mut view = NodeView::new(Role::RouteAgent, Some("172.18.1.1".parse().unwrap()), true);
        view.forwarding = true;
        view.masquerade_bypass.in_place = true;
        view.routes.push(RouteView {
            prefix: "10.245.0.0/16".parse().unwrap(),
            via: "172.18.1.1".parse().unwrap(),
            in_place: true,
        });
        view.find_problems();
        assert!(view.problems.is_empty(), "{:?}", view.problems);
        view.routes[0].in_place = false;
        view.masquerade_bypass.in_place = false;
        view.masquerade_bypass.error = Some("nft: not found".into());
        view.forwarding = false;
        view.find_problems();
        assert_eq!(view.problems.len(), 3, "{:?}", view.problems);
        assert!(view.problems[0].contains("net.ipv4.ip_forward=1"));
        assert!(view.problems[1].contains("nft: not found"));
        assert!(view.problems[2].contains("10.245.0.0/16 via the gateway 172.18.1.1"));
    }
}
