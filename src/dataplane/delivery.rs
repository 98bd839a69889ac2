//! Where a decrypted packet may go: the destination check after the source check.
//!
//! A peer proves who it is by decrypting; cryptokey routing then checks that the inner source is
//! one of its addresses. The destination needs its own check: without it, a peer (or any pod of a
//! peer cluster) could send through the tunnel to the gateway node's own addresses (kubelet, sshd,
//! meshd's metrics) or, with forwarding on, into the node's LAN. A packet is delivered only to this
//! cluster's prefixes (`local_cidrs`, plus `deliver_cidrs`), or to this gateway's tunnel address
//! for ICMP and the services peers use there (catalog sync on TCP, the health probe on UDP).
//!
//! This gateway is also a client of its peers' catalog sync, from an ephemeral port: TCP segments
//! *from* a service port are delivered too, unless they open a connection (SYN without ACK). Such
//! a segment can only belong to a connection this gateway opened to that port (the kernel answers
//! anything else with a reset), so it opens nothing new on the node.

use super::routing::CryptokeyRouter;
use ipnet::IpNet;
use std::net::IpAddr;

const ICMP: u8 = 1;
const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMPV6: u8 = 58;

/// What the control plane allows decrypted packets to reach.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delivery {
    /// This cluster's prefixes. Empty: no check at all (a bare WireGuard device configured only
    /// with `wg set`, which knows nothing of clusters; meshd says so when it starts).
    pub cidrs: Vec<IpNet>,
    /// This gateway's own address inside the tunnel, and the ports served there.
    pub gateway: Option<GatewayServices>,
}

/// The services on the gateway's tunnel address that peers may reach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayServices {
    pub address: IpAddr,
    pub tcp_ports: Vec<u16>,
    pub udp_ports: Vec<u16>,
}

impl Delivery {
    /// True when every destination is delivered (nothing configured to check against).
    pub fn is_open(&self) -> bool {
        self.cidrs.is_empty()
    }
}

/// [`Delivery`] compiled for the receive path: lookups allocate nothing.
#[derive(Debug)]
pub struct DestinationFilter {
    open: bool,
    cidrs: CryptokeyRouter<()>,
    gateway: Option<GatewayServices>,
}

impl Default for DestinationFilter {
    /// The filter of [`Delivery::default`]: open.
    fn default() -> Self {
        DestinationFilter::new(&Delivery::default())
    }
}

impl DestinationFilter {
    pub fn new(delivery: &Delivery) -> Self {
        let mut cidrs = CryptokeyRouter::default();
        for net in &delivery.cidrs {
            cidrs.insert(*net, ());
        }
        DestinationFilter {
            open: delivery.is_open(),
            cidrs,
            gateway: delivery.gateway.clone(),
        }
    }

    /// True when the decrypted `packet` (a valid IPv4 or IPv6 header, as boringtun checked) may
    /// be written to the TUN device.
    pub fn allows(&self, packet: &[u8]) -> bool {
        if self.open {
            return true;
        }
        let Some((dst, transport)) = destination(packet) else {
            return false;
        };
        if self.cidrs.lookup(dst).is_some() {
            return true;
        }
        let Some(gateway) = &self.gateway else {
            return false;
        };
        if dst != gateway.address {
            return false;
        }
        match transport {
            Transport::Icmp => true,
            Transport::Tcp { src, dst, opens } => {
                gateway.tcp_ports.contains(&dst) || (!opens && gateway.tcp_ports.contains(&src))
            }
            Transport::Udp { dst } => gateway.udp_ports.contains(&dst),
            Transport::Other => false,
        }
    }
}

/// What a packet carries, as far as the gateway's services care.
enum Transport {
    Icmp,
    /// `opens`: SYN set and ACK clear, the first segment of a connection.
    Tcp {
        src: u16,
        dst: u16,
        opens: bool,
    },
    Udp {
        dst: u16,
    },
    /// Another protocol, an IPv6 extension header, a non-first fragment, or a truncated header.
    Other,
}

fn transport(protocol: u8, payload: Option<&[u8]>) -> Transport {
    const SYN: u8 = 0x02;
    const ACK: u8 = 0x10;
    let port = |at: usize| {
        payload
            .and_then(|p| p.get(at..at + 2))
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
    };
    match (protocol, port(0), port(2)) {
        (ICMP | ICMPV6, _, _) => Transport::Icmp,
        (TCP, Some(src), Some(dst)) => match payload.and_then(|p| p.get(13)) {
            Some(flags) => Transport::Tcp {
                src,
                dst,
                opens: flags & (SYN | ACK) == SYN,
            },
            None => Transport::Other,
        },
        (UDP, _, Some(dst)) => Transport::Udp { dst },
        _ => Transport::Other,
    }
}

fn destination(packet: &[u8]) -> Option<(IpAddr, Transport)> {
    match packet.first()? >> 4 {
        4 => {
            let dst = <[u8; 4]>::try_from(packet.get(16..20)?).ok()?;
            let header = usize::from(packet[0] & 0x0f) * 4;
            let fragment_offset = u16::from_be_bytes([packet[6], packet[7]]) & 0x1fff;
            // A later fragment shows no ports, and a header shorter than IPv4's 20 bytes would
            // have its "ports" read from the IP header itself: neither reaches a service.
            let whole = fragment_offset == 0 && header >= 20;
            let payload = whole.then(|| packet.get(header..)).flatten();
            let protocol = if whole { packet[9] } else { 0 };
            Some((IpAddr::from(dst), transport(protocol, payload)))
        }
        6 => {
            let dst = <[u8; 16]>::try_from(packet.get(24..40)?).ok()?;
            Some((IpAddr::from(dst), transport(packet[6], packet.get(40..))))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SYN: u8 = 0x02;
    const SYN_ACK: u8 = 0x12;
    const ACK: u8 = 0x10;

    fn v4(dst: [u8; 4], protocol: u8, port: u16, fragment_offset: u16) -> Vec<u8> {
        segment(dst, protocol, 40000, port, SYN, fragment_offset)
    }

    fn segment(
        dst: [u8; 4],
        protocol: u8,
        src_port: u16,
        port: u16,
        flags: u8,
        fragment_offset: u16,
    ) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&40u16.to_be_bytes());
        p[6..8].copy_from_slice(&fragment_offset.to_be_bytes());
        p[9] = protocol;
        p[12..16].copy_from_slice(&[10, 245, 1, 10]);
        p[16..20].copy_from_slice(&dst);
        p[20..22].copy_from_slice(&src_port.to_be_bytes());
        p[22..24].copy_from_slice(&port.to_be_bytes());
        p[33] = flags;
        p
    }

    fn v6(dst: &str, next: u8, port: u16) -> Vec<u8> {
        let mut p = vec![0u8; 60];
        p[0] = 0x60;
        p[6] = next;
        let dst: std::net::Ipv6Addr = dst.parse().unwrap();
        p[24..40].copy_from_slice(&dst.octets());
        p[42..44].copy_from_slice(&port.to_be_bytes());
        p
    }

    fn filter() -> DestinationFilter {
        DestinationFilter::new(&Delivery {
            cidrs: vec![
                "10.244.0.0/16".parse().unwrap(),
                "10.96.0.0/16".parse().unwrap(),
                "fd00:244::/64".parse().unwrap(),
            ],
            gateway: Some(GatewayServices {
                address: "100.64.0.1".parse().unwrap(),
                tcp_ports: vec![51821],
                udp_ports: vec![51821],
            }),
        })
    }

    #[test]
    fn this_clusters_prefixes_are_delivered() {
        let f = filter();
        assert!(f.allows(&v4([10, 244, 1, 10], TCP, 80, 0)));
        assert!(f.allows(&v4([10, 96, 0, 20], UDP, 53, 0)));
        assert!(f.allows(&v6("fd00:244::10", TCP, 443)));
        // Fragments and other protocols too: inside the cluster, the port does not matter.
        assert!(f.allows(&v4([10, 244, 1, 10], 47, 0, 100)));
    }

    #[test]
    fn the_node_its_lan_and_other_ports_of_the_gateway_are_not() {
        let f = filter();
        assert!(!f.allows(&v4([192, 0, 2, 1], TCP, 22, 0)));
        assert!(!f.allows(&v4([192, 168, 1, 1], TCP, 443, 0)));
        assert!(!f.allows(&v4([127, 0, 0, 1], TCP, 9090, 0)));
        assert!(!f.allows(&v4([100, 64, 0, 1], TCP, 9090, 0)));
        assert!(!f.allows(&v4([100, 64, 0, 1], UDP, 53, 0)));
        assert!(!f.allows(&v4([100, 64, 0, 1], 47, 0, 0)));
        // A later fragment shows no port: not for the gateway's services.
        assert!(!f.allows(&v4([100, 64, 0, 1], TCP, 51821, 8)));
        assert!(!f.allows(&v6("fd00:245::10", TCP, 80)));
        assert!(!f.allows(&[0x45, 0, 0]));
        // A header length below 5 words: the "ports" would be the IP header's own bytes.
        let mut short = v4([100, 64, 0, 1], ICMP, 51821, 0);
        short[0] = 0x40;
        assert!(!f.allows(&short));
    }

    #[test]
    fn the_gateways_own_services_are_delivered() {
        let f = filter();
        assert!(f.allows(&v4([100, 64, 0, 1], TCP, 51821, 0)));
        assert!(f.allows(&v4([100, 64, 0, 1], UDP, 51821, 0)));
        assert!(f.allows(&v4([100, 64, 0, 1], ICMP, 0, 0)));
    }

    /// Replies to this gateway's own connections to a peer's catalog sync come from the service
    /// port to an ephemeral one; a segment from that port that opens a connection does not pass.
    #[test]
    fn replies_from_a_peers_service_port_are_delivered_but_open_nothing() {
        let f = filter();
        let gw = [100, 64, 0, 1];
        assert!(f.allows(&segment(gw, TCP, 51821, 45678, SYN_ACK, 0)));
        assert!(f.allows(&segment(gw, TCP, 51821, 45678, ACK, 0)));
        assert!(!f.allows(&segment(gw, TCP, 51821, 9090, SYN, 0)));
        assert!(!f.allows(&segment(gw, UDP, 51821, 9090, 0, 0)));
        assert!(!f.allows(&segment(gw, TCP, 51822, 45678, ACK, 0)));
    }

    #[test]
    fn without_local_cidrs_every_destination_passes() {
        let f = DestinationFilter::new(&Delivery::default());
        assert!(f.allows(&v4([192, 0, 2, 1], TCP, 22, 0)));
    }
}
