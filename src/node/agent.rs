//! The route agent: on a node that is not the gateway, routes every remote cluster's CIDR to
//! the gateway node, so that pods on every node reach the other clusters.
//!
//! The routes go in the main table with a protocol number of meshd's own ([`PROTOCOL`],
//! `ip route show proto 77`): meshd deletes only routes that carry it, clears the ones a killed
//! meshd left when it starts, and removes all of them when it exits. A route to the gateway's
//! address must already exist and be direct (the gateway on this node's L2 segment, as on
//! kind, flannel host-gw and Calico without overlay): the remote prefixes go `via` it.

use ipnet::IpNet;
use rtnetlink::packet_route::route::{RouteMessage, RouteProtocol};
use rtnetlink::{Handle, RouteMessageBuilder};
use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The routing protocol number on meshd's routes (77, 'M'; not one iproute2 names).
pub const PROTOCOL: u8 = 77;

/// A route the agent could not put in place or take away.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot {action} route {prefix} via the gateway {gateway}: {source}; check that this node reaches {gateway} directly (ip route get {gateway}: no 'via')")]
    Kernel {
        action: &'static str,
        prefix: IpNet,
        gateway: IpAddr,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("cannot read the routes over netlink: {0}")]
    Dump(#[source] rtnetlink::Error),
}

/// The next hop of the agent's routes: the gateway node's address (direct), or its overlay
/// address on `meshd-vx` (`oif`, on-link).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NextHop {
    pub address: IpAddr,
    pub oif: Option<u32>,
}

fn message(prefix: IpNet, hop: NextHop) -> Option<RouteMessage> {
    let protocol = RouteProtocol::Other(PROTOCOL);
    let msg = match (prefix, hop.address) {
        (IpNet::V4(n), IpAddr::V4(gw)) => {
            let b = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(n.network(), n.prefix_len())
                .gateway(gw)
                .protocol(protocol);
            match hop.oif {
                Some(oif) => b.output_interface(oif).onlink().build(),
                None => b.build(),
            }
        }
        (IpNet::V6(n), IpAddr::V6(gw)) => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(n.network(), n.prefix_len())
            .gateway(gw)
            .protocol(protocol)
            .build(),
        _ => return None,
    };
    Some(msg)
}

/// Every route in the main table that carries meshd's protocol, with its prefix.
async fn ours(handle: &Handle) -> Result<Vec<(IpNet, RouteMessage)>, rtnetlink::Error> {
    Ok(crate::netlink::main_route_messages(handle)
        .await?
        .into_iter()
        .filter(|route| route.header.protocol == RouteProtocol::Other(PROTOCOL))
        .filter_map(|route| crate::netlink::prefix_of(&route).map(|prefix| (prefix, route)))
        .collect())
}

/// Deletes every route that carries meshd's protocol; returns how many there were.
pub async fn clear(handle: &Handle) -> Result<usize, AgentError> {
    let routes = ours(handle).await.map_err(AgentError::Dump)?;
    let count = routes.len();
    for (_, route) in routes {
        // Gone already (a link went down) is as good as deleted.
        let _ = handle.route().del(route).execute().await;
    }
    Ok(count)
}

/// The agent's routes to one gateway.
pub struct RouteAgent {
    handle: Handle,
    gateway: IpAddr,
    hop: NextHop,
    wanted: BTreeSet<IpNet>,
}

impl RouteAgent {
    pub fn new(handle: Handle, gateway: IpAddr, hop: NextHop) -> Self {
        RouteAgent {
            handle,
            gateway,
            hop,
            wanted: BTreeSet::new(),
        }
    }

    /// The prefixes of `prefixes` this agent can route: the gateway's family only (an IPv4
    /// gateway address cannot carry IPv6 routes); the others are logged once per change.
    fn routable(&self, prefixes: &[IpNet]) -> BTreeSet<IpNet> {
        prefixes
            .iter()
            .filter(|p| {
                let ok = p.addr().is_ipv6() == self.gateway.is_ipv6() && p.prefix_len() > 0;
                if !ok {
                    tracing::warn!(prefix = %p, gateway = %self.gateway,
                        "not routing this prefix to the gateway: not of the gateway address's family, or a default route");
                }
                ok
            })
            .copied()
            .collect()
    }

    /// Makes meshd's routes exactly `prefixes` via the gateway.
    pub async fn sync(&mut self, prefixes: &[IpNet]) -> Result<(), AgentError> {
        self.wanted = self.routable(prefixes);
        let present = ours(&self.handle).await.map_err(AgentError::Dump)?;
        for (prefix, route) in present {
            if !self.wanted.contains(&prefix) || !via_gateway(&route, self.hop.address) {
                let _ = self.handle.route().del(route).execute().await;
            }
        }
        self.put_back().await.map(|_| ())
    }

    /// A new next hop (the VXLAN interface was made again); [`RouteAgent::put_back`] routes
    /// through it.
    pub fn set_hop(&mut self, hop: NextHop) {
        self.hop = hop;
    }

    /// The prefixes routed now as meshd wants them (its protocol, its next hop).
    async fn present(&self) -> Result<BTreeSet<IpNet>, AgentError> {
        Ok(ours(&self.handle)
            .await
            .map_err(AgentError::Dump)?
            .into_iter()
            .filter(|(_, route)| via_gateway(route, self.hop.address))
            .map(|(prefix, _)| prefix)
            .collect())
    }

    /// Adds (or replaces) every wanted route that is not in the kernel as meshd wants it;
    /// returns how many it had to.
    pub async fn put_back(&mut self) -> Result<usize, AgentError> {
        let present = self.present().await?;
        let mut added = 0;
        for prefix in self.wanted.difference(&present) {
            let Some(msg) = message(*prefix, self.hop) else {
                continue;
            };
            self.handle
                .route()
                .add(msg)
                .replace()
                .execute()
                .await
                .map_err(|source| AgentError::Kernel {
                    action: "add",
                    prefix: *prefix,
                    gateway: self.gateway,
                    source,
                })?;
            added += 1;
        }
        Ok(added)
    }

    /// The wanted routes and whether each is in place now.
    pub async fn view(&self) -> Result<Vec<super::RouteView>, AgentError> {
        let present = self.present().await?;
        Ok(self
            .wanted
            .iter()
            .map(|prefix| super::RouteView {
                prefix: *prefix,
                via: self.hop.address,
                in_place: present.contains(prefix),
            })
            .collect())
    }
}

fn via_gateway(route: &RouteMessage, gateway: IpAddr) -> bool {
    crate::netlink::next_hop_of(route) == Some(gateway)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_carry_our_protocol_and_the_gateway_of_the_same_family() {
        let gw: IpAddr = "172.18.1.1".parse().unwrap();
        let direct = NextHop {
            address: gw,
            oif: None,
        };
        let msg = message("10.245.0.0/16".parse().unwrap(), direct).unwrap();
        assert_eq!(msg.header.protocol, RouteProtocol::Other(PROTOCOL));
        assert!(via_gateway(&msg, gw));
        assert!(!via_gateway(&msg, "172.18.1.2".parse().unwrap()));
        assert!(message("fd00:245::/64".parse().unwrap(), direct).is_none());
        let overlay = NextHop {
            address: "240.18.1.1".parse().unwrap(),
            oif: Some(7),
        };
        let msg = message("10.245.0.0/16".parse().unwrap(), overlay).unwrap();
        assert!(via_gateway(&msg, overlay.address));
        assert!(msg
            .attributes
            .contains(&rtnetlink::packet_route::route::RouteAttribute::Oif(7)));
    }
}
