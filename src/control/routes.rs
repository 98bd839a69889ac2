//! Host routes for the remote clusters' CIDRs, through the TUN device, over netlink.
//!
//! [`RouteTable::sync`] makes the kernel's routes through our interface match the wanted prefixes:
//! it adds what is missing and deletes only routes it added itself. Default routes (/0) are never
//! installed: taking over a host's default route is a decision for the operator, not a side effect.

use ipnet::IpNet;
use rtnetlink::{Handle, RouteMessageBuilder};
use std::collections::BTreeSet;
use std::net::{Ipv4Addr, Ipv6Addr};

/// A route that could not be put in place.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("cannot {action} route {prefix} via {interface}: {source}")]
    Kernel {
        action: &'static str,
        prefix: IpNet,
        interface: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("route {prefix} already goes through {other}, not {interface}: traffic for it would not enter the tunnel; remove that route (ip route del {prefix} dev {other}) or take {prefix} out of the peer's allowed CIDRs")]
    Conflict {
        prefix: IpNet,
        interface: String,
        other: String,
    },
}

/// The routes meshd installed through its interface.
pub struct RouteTable {
    handle: Handle,
    interface: String,
    ifindex: u32,
    installed: BTreeSet<IpNet>,
}

fn message(prefix: IpNet, ifindex: u32) -> rtnetlink::packet_route::route::RouteMessage {
    match prefix {
        IpNet::V4(n) => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(n.network(), n.prefix_len())
            .output_interface(ifindex)
            .build(),
        IpNet::V6(n) => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(n.network(), n.prefix_len())
            .output_interface(ifindex)
            .build(),
    }
}

fn is_exists(err: &rtnetlink::Error) -> bool {
    matches!(err, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -libc::EEXIST)
}

impl RouteTable {
    /// Opens a netlink connection (driven on the current tokio runtime) for `interface`.
    pub fn new(interface: &str, ifindex: u32) -> std::io::Result<Self> {
        let (connection, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(connection);
        Ok(RouteTable {
            handle,
            interface: interface.to_string(),
            ifindex,
            installed: BTreeSet::new(),
        })
    }

    /// Adds routes for `wanted` prefixes and removes the ones no longer wanted.
    pub async fn sync(&mut self, wanted: &[IpNet]) -> Result<(), RouteError> {
        let ipv6 = crate::netlink::ipv6_enabled();
        let wanted: BTreeSet<IpNet> = wanted
            .iter()
            .filter(|p| {
                if p.prefix_len() == 0 {
                    tracing::warn!(prefix = %p, interface = %self.interface,
                        "not installing a default route through the tunnel; add it yourself if you mean it");
                    false
                } else if p.addr().is_ipv6() && !ipv6 {
                    tracing::warn!(prefix = %p, interface = %self.interface,
                        "IPv6 is off on this host: no route for this prefix (nothing here can send to it)");
                    false
                } else {
                    true
                }
            })
            .copied()
            .collect();
        let stale: Vec<IpNet> = self.installed.difference(&wanted).copied().collect();
        for prefix in stale {
            let result = self
                .handle
                .route()
                .del(message(prefix, self.ifindex))
                .execute()
                .await;
            match result {
                Ok(()) => tracing::info!(prefix = %prefix, "route removed"),
                Err(e) => tracing::warn!(prefix = %prefix, error = %e, "route already gone"),
            }
            self.installed.remove(&prefix);
        }
        let missing: Vec<IpNet> = wanted.difference(&self.installed).copied().collect();
        for prefix in missing {
            let result = self
                .handle
                .route()
                .add(message(prefix, self.ifindex))
                .execute()
                .await;
            match result {
                Ok(()) => {
                    tracing::info!(prefix = %prefix, interface = %self.interface, "route added")
                }
                Err(e) if is_exists(&e) => {
                    let holders =
                        self.holders(prefix)
                            .await
                            .map_err(|source| RouteError::Kernel {
                                action: "look up",
                                prefix,
                                interface: self.interface.clone(),
                                source,
                            })?;
                    if let Some(other) = holders.into_iter().find(|i| *i != self.ifindex) {
                        return Err(RouteError::Conflict {
                            prefix,
                            interface: self.interface.clone(),
                            other: crate::netlink::interface_name(other),
                        });
                    }
                    tracing::info!(prefix = %prefix, "route already present")
                }
                Err(source) => {
                    return Err(RouteError::Kernel {
                        action: "add",
                        prefix,
                        interface: self.interface.clone(),
                        source,
                    })
                }
            }
            self.installed.insert(prefix);
        }
        Ok(())
    }

    /// Lists the prefixes the kernel currently routes through our interface (for checks and tests).
    pub async fn present(&self) -> Result<Vec<IpNet>, rtnetlink::Error> {
        Ok(self
            .routes()
            .await?
            .into_iter()
            .filter(|(_, oif)| *oif == Some(self.ifindex))
            .map(|(net, _)| net)
            .collect())
    }

    /// The interfaces of the main table's routes for exactly `prefix`.
    async fn holders(&self, prefix: IpNet) -> Result<Vec<u32>, rtnetlink::Error> {
        Ok(self
            .routes()
            .await?
            .into_iter()
            .filter(|(net, _)| *net == prefix)
            .map(|(_, oif)| oif.unwrap_or(0))
            .collect())
    }

    /// Every route of the main table, both families: its prefix and output interface.
    async fn routes(&self) -> Result<Vec<(IpNet, Option<u32>)>, rtnetlink::Error> {
        Ok(crate::netlink::main_routes(&self.handle)
            .await?
            .into_iter()
            .map(|r| (r.prefix, r.oif))
            .collect())
    }
}
