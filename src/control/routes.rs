//! Host routes for the remote clusters' CIDRs, through the TUN device, over netlink.
//!
//! [`RouteTable::sync`] makes the kernel's routes through our interface match the wanted prefixes:
//! it adds what is missing and deletes only routes it added itself. Default routes (/0) are never
//! installed: taking over a host's default route is a decision for the operator, not a side effect.

use futures::TryStreamExt;
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
        let wanted: BTreeSet<IpNet> = wanted
            .iter()
            .filter(|p| {
                if p.prefix_len() == 0 {
                    tracing::warn!(prefix = %p, interface = %self.interface,
                        "not installing a default route through the tunnel; add it yourself if you mean it");
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
                            other: interface_name(other),
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
        let mut found = Vec::new();
        for family in [
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
            RouteMessageBuilder::<Ipv6Addr>::new().build(),
        ] {
            let mut routes = self.handle.route().get(family).execute();
            while let Some(route) = routes.try_next().await? {
                use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute};
                if route.header.table != rtnetlink::packet_route::route::RouteHeader::RT_TABLE_MAIN
                {
                    continue;
                }
                let oif = route.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Oif(i) => Some(*i),
                    _ => None,
                });
                let len = route.header.destination_prefix_length;
                let net = route.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Destination(RouteAddress::Inet(ip)) => {
                        IpNet::new((*ip).into(), len).ok()
                    }
                    RouteAttribute::Destination(RouteAddress::Inet6(ip)) => {
                        IpNet::new((*ip).into(), len).ok()
                    }
                    _ => None,
                });
                found.extend(net.map(|n| (n, oif)));
            }
        }
        Ok(found)
    }
}

/// An interface's name for messages (its index when it has none, e.g. a blackhole route's 0).
fn interface_name(index: u32) -> String {
    let mut buf = [0u8; libc::IF_NAMESIZE];
    // SAFETY: buf holds IF_NAMESIZE bytes, as if_indextoname requires.
    let name = unsafe { libc::if_indextoname(index, buf.as_mut_ptr().cast()) };
    if name.is_null() {
        return format!("interface #{index} (or no interface: a blackhole or unreachable route)");
    }
    let len = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..len]).into_owned()
}

/// The MTU of the underlay: the interface holding the IPv4 default route, or else the smallest MTU
/// of the other interfaces that are up (never loopback, never `exclude`). Returns it with a note
/// saying where it came from, for the log.
pub fn underlay_mtu(exclude: &str) -> (u16, String) {
    let read_mtu = |ifname: &str| -> Option<u16> {
        std::fs::read_to_string(format!("/sys/class/net/{ifname}/mtu"))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    if let Ok(routes) = std::fs::read_to_string("/proc/net/route") {
        for line in routes.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() > 7
                && cols[1] == "00000000"
                && cols[7] == "00000000"
                && cols[0] != exclude
            {
                if let Some(mtu) = read_mtu(cols[0]) {
                    return (
                        mtu,
                        format!("interface {} holds the default route", cols[0]),
                    );
                }
            }
        }
    }
    let mut best: Option<(u16, String)> = None;
    if let Ok(dir) = std::fs::read_dir("/sys/class/net") {
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if name == "lo" || name == exclude {
                continue;
            }
            let up = std::fs::read_to_string(format!("/sys/class/net/{name}/operstate"))
                .map(|s| s.trim() != "down")
                .unwrap_or(false);
            if let (true, Some(mtu)) = (up, read_mtu(&name)) {
                if best.as_ref().is_none_or(|(m, _)| mtu < *m) {
                    best = Some((mtu, name));
                }
            }
        }
    }
    match best {
        Some((mtu, name)) => (
            mtu,
            format!("no default route; {name} has the smallest MTU of the interfaces that are up"),
        ),
        None => (
            1500,
            "no interface found up; assuming Ethernet's 1500".to_string(),
        ),
    }
}
