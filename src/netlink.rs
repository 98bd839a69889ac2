//! The kernel's routing state, read over rtnetlink: the routes of the main table (both families)
//! and the MTU of the underlay. No text from `/proc/net/route` (IPv4 only, host byte order).

use futures::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage};
use rtnetlink::{Handle, RouteMessageBuilder};
use std::net::{Ipv4Addr, Ipv6Addr};

/// One route of the main table: its prefix, output interface (none for blackhole,
/// unreachable and multipath routes) and next hop (none for a directly connected prefix).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub prefix: IpNet,
    pub oif: Option<u32>,
    pub via: Option<std::net::IpAddr>,
}

/// Every route message of the main table, IPv4 then IPv6. A family the host does not have
/// (IPv6 disabled) has no routes.
pub async fn main_route_messages(handle: &Handle) -> Result<Vec<RouteMessage>, rtnetlink::Error> {
    let mut found = Vec::new();
    for family in [
        RouteMessageBuilder::<Ipv4Addr>::new().build(),
        RouteMessageBuilder::<Ipv6Addr>::new().build(),
    ] {
        let mut routes = handle.route().get(family).execute();
        loop {
            match routes.try_next().await {
                Ok(Some(route)) if route.header.table == RouteHeader::RT_TABLE_MAIN => {
                    found.push(route)
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) if is_family_missing(&e) => break,
                Err(e) => return Err(e),
            }
        }
    }
    Ok(found)
}

/// A route message's destination prefix (a default route carries no destination attribute).
pub fn prefix_of(route: &RouteMessage) -> Option<IpNet> {
    let len = route.header.destination_prefix_length;
    let destination = route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(ip)) => IpNet::new((*ip).into(), len).ok(),
        RouteAttribute::Destination(RouteAddress::Inet6(ip)) => IpNet::new((*ip).into(), len).ok(),
        _ => None,
    });
    match (destination, route.header.address_family) {
        (Some(net), _) => Some(net),
        (None, rtnetlink::packet_route::AddressFamily::Inet) if len == 0 => {
            Some(IpNet::V4(Default::default()))
        }
        (None, rtnetlink::packet_route::AddressFamily::Inet6) if len == 0 => {
            Some(IpNet::V6(Default::default()))
        }
        _ => None,
    }
}

/// A route message's next hop (none for a directly connected prefix).
pub fn next_hop_of(route: &RouteMessage) -> Option<std::net::IpAddr> {
    route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Gateway(RouteAddress::Inet(ip)) => Some((*ip).into()),
        RouteAttribute::Gateway(RouteAddress::Inet6(ip)) => Some((*ip).into()),
        _ => None,
    })
}

/// Every route of the main table, IPv4 then IPv6.
pub async fn main_routes(handle: &Handle) -> Result<Vec<Route>, rtnetlink::Error> {
    Ok(main_route_messages(handle)
        .await?
        .iter()
        .filter_map(|route| {
            let oif = route.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                _ => None,
            });
            prefix_of(route).map(|prefix| Route {
                prefix,
                oif,
                via: next_hop_of(route),
            })
        })
        .collect())
}

/// A dump of a family the kernel does not have (booted with `ipv6.disable=1`).
fn is_family_missing(err: &rtnetlink::Error) -> bool {
    matches!(err, rtnetlink::Error::NetlinkError(m)
        if m.raw_code() == -libc::EAFNOSUPPORT || m.raw_code() == -libc::EOPNOTSUPP)
}

/// Whether this network namespace has IPv6: not when the kernel was booted without it
/// (`ipv6.disable=1`: no `/proc/sys/net/ipv6`) or it is turned off (`disable_ipv6`).
pub fn ipv6_enabled() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/disable_ipv6")
        .is_ok_and(|v| v.trim() == "0")
}

/// Opens a netlink connection driven on the current tokio runtime.
pub fn connect() -> std::io::Result<Handle> {
    let (connection, handle, _) = rtnetlink::new_connection()?;
    tokio::spawn(connection);
    Ok(handle)
}

/// The main table's routes with their interfaces' names, on a runtime of its own (for callers
/// that are not async: `meshctl diagnose`).
pub fn main_routes_blocking() -> std::io::Result<Vec<(String, IpNet)>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let handle = connect()?;
        let routes = main_routes(&handle)
            .await
            .map_err(|e| std::io::Error::other(format!("reading the routes over netlink: {e}")))?;
        Ok(routes
            .into_iter()
            .map(|r| (r.oif.map(interface_name).unwrap_or_default(), r.prefix))
            .collect())
    })
}

/// An interface's name for messages (its index when it has none, e.g. a blackhole route's 0).
pub fn interface_name(index: u32) -> String {
    let mut buf = [0u8; libc::IF_NAMESIZE];
    // SAFETY: buf holds IF_NAMESIZE bytes, as if_indextoname requires.
    let name = unsafe { libc::if_indextoname(index, buf.as_mut_ptr().cast()) };
    if name.is_null() {
        return format!("interface #{index} (or no interface: a blackhole or unreachable route)");
    }
    let len = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..len]).into_owned()
}

/// One network interface: its index, name, MTU and whether it is up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
    pub up: bool,
}

/// Every interface of this network namespace.
pub async fn links(handle: &Handle) -> Result<Vec<Link>, rtnetlink::Error> {
    use rtnetlink::packet_route::link::{LinkAttribute, State};
    let mut found = Vec::new();
    let mut links = handle.link().get().execute();
    while let Some(link) = links.try_next().await? {
        let mut entry = Link {
            index: link.header.index,
            name: String::new(),
            mtu: 0,
            up: false,
        };
        for attribute in &link.attributes {
            match attribute {
                LinkAttribute::IfName(name) => entry.name = name.clone(),
                LinkAttribute::Mtu(mtu) => entry.mtu = *mtu,
                // "unknown" is what drivers without carrier reporting (veth's peer, tun) say when up.
                LinkAttribute::OperState(state) => {
                    entry.up = matches!(state, State::Up | State::Unknown)
                }
                _ => {}
            }
        }
        found.push(entry);
    }
    Ok(found)
}

/// The MTU of the underlay: the interface holding the default route (IPv4's, else IPv6's), or
/// else the smallest MTU of the other interfaces that are up (never loopback, never `exclude`).
/// Returns it with a note saying where it came from, for the log.
pub async fn underlay_mtu(exclude: &str) -> (u16, String) {
    let read = async {
        let handle = connect().map_err(|e| e.to_string())?;
        let routes = main_routes(&handle).await.map_err(|e| e.to_string())?;
        let links = links(&handle).await.map_err(|e| e.to_string())?;
        Ok::<_, String>((routes, links))
    };
    let (routes, links) = match read.await {
        Ok(found) => found,
        Err(e) => {
            return (
                1500,
                format!(
                    "cannot read routes and links over netlink ({e}); assuming Ethernet's 1500"
                ),
            )
        }
    };
    let mtu = |mtu: u32| u16::try_from(mtu).unwrap_or(u16::MAX);
    for default in [IpNet::V4(Default::default()), IpNet::V6(Default::default())] {
        for route in routes.iter().filter(|r| r.prefix == default) {
            let Some(link) = links.iter().find(|l| Some(l.index) == route.oif) else {
                continue;
            };
            if link.name == exclude || link.mtu == 0 {
                continue;
            }
            let family = if default.addr().is_ipv4() {
                "IPv4"
            } else {
                "IPv6"
            };
            return (
                mtu(link.mtu),
                format!("interface {} holds the {family} default route", link.name),
            );
        }
    }
    let smallest = links
        .iter()
        .filter(|l| l.up && l.mtu > 0 && l.name != "lo" && l.name != exclude)
        .min_by_key(|l| l.mtu);
    match smallest {
        Some(link) => (
            mtu(link.mtu),
            format!(
                "no default route; {} has the smallest MTU of the interfaces that are up",
                link.name
            ),
        ),
        None => (
            1500,
            "no interface found up; assuming Ethernet's 1500".to_string(),
        ),
    }
}

/// Every address on this network namespace's interfaces (both families), with its interface's
/// index.
pub async fn addresses(handle: &Handle) -> Result<Vec<(u32, std::net::IpAddr)>, rtnetlink::Error> {
    use rtnetlink::packet_route::address::AddressAttribute;
    let mut found = Vec::new();
    let mut addresses = handle.address().get().execute();
    while let Some(message) = addresses.try_next().await? {
        found.extend(message.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(ip) => Some((message.header.index, *ip)),
            _ => None,
        }));
    }
    Ok(found)
}

/// The main table's longest-prefix route to `ip`.
pub async fn route_to(
    handle: &Handle,
    ip: std::net::IpAddr,
) -> Result<Option<Route>, rtnetlink::Error> {
    Ok(main_routes(handle)
        .await?
        .into_iter()
        .filter(|r| r.prefix.contains(&ip))
        .max_by_key(|r| r.prefix.prefix_len()))
}
