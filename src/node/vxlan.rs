//! The VXLAN path from a route agent to the gateway node, for nodes that do not reach the
//! gateway directly (another subnet) or whose network drops foreign source addresses.
//!
//! Kernel VXLAN (`meshd-vx`, VNI [`VNI`], UDP [`PORT`]), created over rtnetlink. Each node's
//! end has an overlay address, `240.b.c.d` for node address `a.b.c.d` (240.0.0.0/4 is reserved
//! and routed nowhere, so it collides with no real network). An agent's end points at the
//! gateway (`remote`), and the remote CIDRs go `via 240.<gateway> dev meshd-vx onlink`; the
//! gateway's end learns the agents from what they send. The kernel sizes `meshd-vx`'s MTU to the
//! underlay's less VXLAN's 50 bytes.
//!
//! The answers take the CNI's way back (the gateway routes pod CIDRs to their nodes as usual),
//! so they arrive on the underlay interface while the route back to the remote CIDRs is
//! `meshd-vx`: reverse-path filtering is loosened (`rp_filter = 2`) on exactly those two
//! interfaces, `meshd-vx` on the gateway and the underlay on the agent, and the agent's old
//! value is put back when meshd exits.

use futures::TryStreamExt;
use rtnetlink::{Handle, LinkUnspec, LinkVxlan};
use std::net::{IpAddr, Ipv4Addr};

/// The interface's name on every node.
pub const NAME: &str = "meshd-vx";
/// The VXLAN network identifier.
pub const VNI: u32 = 77;
/// The UDP port (not 4789, which Calico, Cilium and flannel may use, nor Submariner's 4800).
pub const PORT: u16 = 4877;
/// What VXLAN adds to each packet over IPv4: outer IPv4 (20), UDP (8), VXLAN (8), Ethernet (14).
pub const OVERHEAD: u32 = 50;

/// A VXLAN interface that could not be made or removed.
#[derive(Debug, thiserror::Error)]
pub enum VxlanError {
    #[error("cannot {action} the VXLAN interface {NAME}: {source}; the kernel needs the vxlan module (modprobe vxlan), and UDP {PORT} must be free")]
    Kernel {
        action: &'static str,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("cannot set rp_filter on {interface} ({path}): {source}")]
    Sysctl {
        interface: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("VXLAN needs IPv4 node addresses; {0} is not one: use route_mode = \"direct\"")]
    NotIpv4(IpAddr),
    #[error("no interface of this node carries {0}: cannot tell which interface VXLAN goes over")]
    NoUnderlay(IpAddr),
    #[error("the VXLAN interface {NAME} was gone right after meshd made it: is another program removing interfaces of that name?")]
    Vanished,
}

/// A node's overlay address.
pub fn overlay_address(node: Ipv4Addr) -> Ipv4Addr {
    let [_, b, c, d] = node.octets();
    Ipv4Addr::new(240, b, c, d)
}

fn kernel(action: &'static str) -> impl FnOnce(rtnetlink::Error) -> VxlanError {
    move |source| VxlanError::Kernel { action, source }
}

fn rp_filter_path(interface: &str) -> String {
    format!("/proc/sys/net/ipv4/conf/{interface}/rp_filter")
}

fn set_rp_filter(interface: &str, value: &str) -> Result<String, VxlanError> {
    let path = rp_filter_path(interface);
    let err = |source| VxlanError::Sysctl {
        interface: interface.to_string(),
        path: path.clone(),
        source,
    };
    let old = std::fs::read_to_string(&path).map_err(err)?;
    std::fs::write(&path, value).map_err(err)?;
    Ok(old.trim().to_string())
}

async fn index_of(handle: &Handle, name: &str) -> Result<Option<u32>, rtnetlink::Error> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(link) => Ok(link.map(|l| l.header.index)),
        Err(rtnetlink::Error::NetlinkError(m)) if m.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(e),
    }
}

/// Deletes a `meshd-vx` an earlier meshd left (it was killed); returns whether there was one.
pub async fn clear(handle: &Handle) -> Result<bool, VxlanError> {
    match index_of(handle, NAME).await.map_err(kernel("look up"))? {
        Some(index) => {
            handle
                .link()
                .del(index)
                .execute()
                .await
                .map_err(kernel("delete"))?;
            Ok(true)
        }
        None => Ok(false),
    }
}

/// This node's end of the VXLAN path.
pub struct Vxlan {
    handle: Handle,
    /// `meshd-vx`'s index.
    pub index: u32,
    local: Ipv4Addr,
    underlay_index: u32,
    /// The underlay interface's name.
    pub underlay: String,
    remote: Option<Ipv4Addr>,
    /// The overlay address of the node at the other end (the gateway, for an agent).
    pub peer_overlay: Option<Ipv4Addr>,
    /// The underlay's rp_filter before meshd loosened it (agents only).
    restore: Option<String>,
}

/// Makes `meshd-vx` (with its overlay address, up, loose rp_filter on itself); its index.
async fn make(
    handle: &Handle,
    local: Ipv4Addr,
    underlay: u32,
    remote: Option<Ipv4Addr>,
) -> Result<u32, VxlanError> {
    // A MAC address from the overlay address, so that a `meshd-vx` made again keeps it and the
    // other ends' neighbour entries stay right.
    let [a, b, c, d] = overlay_address(local).octets();
    let mut link = LinkVxlan::new(NAME, VNI)
        .address(vec![0x02, 0x4d, a, b, c, d])
        .dev(underlay)
        .port(PORT)
        .local(local)
        .learning(remote.is_none());
    if let Some(r) = remote {
        link = link.remote(r);
    }
    handle
        .link()
        .add(link.build())
        .execute()
        .await
        .map_err(kernel("create"))?;
    let index = index_of(handle, NAME)
        .await
        .map_err(kernel("look up"))?
        .ok_or(VxlanError::Vanished)?;
    handle
        .address()
        .add(index, IpAddr::V4(overlay_address(local)), 8)
        .execute()
        .await
        .map_err(kernel("address"))?;
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(kernel("bring up"))?;
    set_rp_filter(NAME, "2")?;
    Ok(index)
}

impl Vxlan {
    /// Creates `meshd-vx` over the interface `underlay` (index), from this node's address
    /// `local`. `remote`: the gateway's address, on an agent; `None` on the gateway.
    pub async fn create(
        handle: &Handle,
        local: IpAddr,
        underlay: u32,
        remote: Option<IpAddr>,
    ) -> Result<Vxlan, VxlanError> {
        let IpAddr::V4(local) = local else {
            return Err(VxlanError::NotIpv4(local));
        };
        let remote = match remote {
            Some(IpAddr::V4(r)) => Some(r),
            Some(other) => return Err(VxlanError::NotIpv4(other)),
            None => None,
        };
        let index = make(handle, local, underlay, remote).await?;
        let underlay_name = crate::netlink::interface_name(underlay);
        let restore = match remote {
            Some(_) => Some(set_rp_filter(&underlay_name, "2")?),
            None => None,
        };
        Ok(Vxlan {
            handle: handle.clone(),
            index,
            local,
            underlay_index: underlay,
            underlay: underlay_name,
            remote,
            peer_overlay: remote.map(overlay_address),
            restore,
        })
    }

    /// Makes `meshd-vx` again when something deleted it (or replaced it); returns whether it
    /// had to. Its routes went with it: the caller puts them back, through the new index.
    pub async fn ensure(&mut self) -> Result<bool, VxlanError> {
        match index_of(&self.handle, NAME)
            .await
            .map_err(kernel("look up"))?
        {
            Some(index) if index == self.index => return Ok(false),
            Some(_) => {
                clear(&self.handle).await?;
            }
            None => {}
        }
        self.index = make(&self.handle, self.local, self.underlay_index, self.remote).await?;
        if self.restore.is_some() {
            set_rp_filter(&self.underlay, "2")?;
        }
        Ok(true)
    }

    /// Deletes `meshd-vx` (its routes go with it) and puts the underlay's rp_filter back.
    pub async fn remove(self) -> Result<(), VxlanError> {
        if let Some(old) = &self.restore {
            set_rp_filter(&self.underlay, old)?;
        }
        self.handle
            .link()
            .del(self.index)
            .execute()
            .await
            .map_err(kernel("delete"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_addresses_keep_the_last_three_octets_in_240_0_0_0_slash_8() {
        assert_eq!(
            overlay_address("172.18.1.3".parse().unwrap()),
            "240.18.1.3".parse::<Ipv4Addr>().unwrap()
        );
        assert_eq!(
            overlay_address("10.0.0.1".parse().unwrap()),
            "240.0.0.1".parse::<Ipv4Addr>().unwrap()
        );
    }
}
