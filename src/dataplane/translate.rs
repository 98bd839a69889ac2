//! Stateless 1:1 address translation for clusters whose ranges overlap (`global_cidrs`).
//!
//! A cluster may stand for each of its local ranges with a global range of the same size: the
//! clusterset sees its pods and services only at their global addresses. The mapping is a prefix
//! swap (as NETMAP and NPTv6 do): the host bits stay, the network bits change. The gateway keeps
//! no state per flow:
//! - on the way out (TUN → peer) a local **source** becomes its global address;
//! - on the way in (peer → TUN) a global **destination** becomes the local one.
//!
//! The far side's addresses are never touched here: they are the far cluster's global ones and it
//! translates them itself. Every checksum that covers a changed address is updated incrementally
//! (RFC 1624): the IPv4 header's, TCP's and UDP's (pseudo-header), ICMPv6's (pseudo-header). An
//! ICMP error quotes the packet that caused it, so its quoted header is translated too, the other
//! way round (an error leaving this cluster quotes a packet that came in: its quoted destination
//! is local), with the quoted checksums and the ICMP checksum over them: path MTU discovery and
//! traceroute work across. Non-first fragments carry no transport header: only the IP header
//! changes. Nothing here allocates.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

const ICMP: u8 = 1;
const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMPV6: u8 = 58;

/// One local range and the global range that stands for it (same family, same prefix length).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct GlobalCidr {
    pub local: IpNet,
    pub global: IpNet,
}

impl GlobalCidr {
    /// A mapping of `local` to `global`: both network addresses (no host bits), same family,
    /// same prefix length. Says what is wrong otherwise.
    pub fn new(local: IpNet, global: IpNet) -> Result<Self, String> {
        if matches!(local, IpNet::V4(_)) != matches!(global, IpNet::V4(_)) {
            return Err(format!(
                "{local} and {global} are of different IP families; map IPv4 to IPv4 and IPv6 to IPv6"
            ));
        }
        if local.prefix_len() != global.prefix_len() {
            return Err(format!(
                "{local} and {global} differ in size (/{} and /{}); a global range must have the local range's prefix length, e.g. {}/{}",
                local.prefix_len(),
                global.prefix_len(),
                global.network(),
                local.prefix_len()
            ));
        }
        for net in [local, global] {
            if net.network() != net.addr() {
                return Err(format!(
                    "{net} has host bits set; write {}/{}",
                    net.network(),
                    net.prefix_len()
                ));
            }
        }
        Ok(GlobalCidr { local, global })
    }
}

impl fmt::Display for GlobalCidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.local, self.global)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pair4 {
    mask: u32,
    local: u32,
    global: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pair6 {
    mask: u128,
    local: u128,
    global: u128,
}

/// Packets translated, each way (`meshd_translated_packets_total`). The two counters are
/// written by different threads: each has a cache line of its own.
#[derive(Debug, Default)]
pub struct TranslationStats {
    outbound: Counter,
    inbound: Counter,
}

#[derive(Debug, Default)]
#[repr(align(64))]
struct Counter(AtomicU64);

impl TranslationStats {
    pub fn outbound(&self) -> u64 {
        self.outbound.0.load(Ordering::Relaxed)
    }

    pub fn inbound(&self) -> u64 {
        self.inbound.0.load(Ordering::Relaxed)
    }

    pub(super) fn count_outbound(&self) {
        self.outbound.0.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn count_inbound(&self) {
        self.inbound.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// Which way an address is mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Way {
    ToGlobal,
    ToLocal,
}

/// Which address of a packet is mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Source,
    Destination,
}

impl Field {
    fn other(self) -> Field {
        match self {
            Field::Source => Field::Destination,
            Field::Destination => Field::Source,
        }
    }
}

/// This cluster's mappings, compiled for the packet path. Empty: no translation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Translation {
    cidrs: Vec<GlobalCidr>,
    v4: Vec<Pair4>,
    v6: Vec<Pair6>,
}

impl Translation {
    /// The translation of `cidrs` (each checked by [`GlobalCidr::new`]). Local ranges must not
    /// overlap each other, nor global ranges each other: each address maps to exactly one.
    pub fn new(cidrs: Vec<GlobalCidr>) -> Result<Self, String> {
        for (i, a) in cidrs.iter().enumerate() {
            for b in &cidrs[i + 1..] {
                for (x, y) in [(a.local, b.local), (a.global, b.global)] {
                    if x.contains(&y.network()) || y.contains(&x.network()) {
                        return Err(format!(
                            "{a} and {b} overlap: each address must map to exactly one"
                        ));
                    }
                }
            }
        }
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for c in &cidrs {
            match (c.local, c.global) {
                (IpNet::V4(l), IpNet::V4(g)) => v4.push(Pair4 {
                    mask: u32::from(l.netmask()),
                    local: u32::from(l.network()),
                    global: u32::from(g.network()),
                }),
                (IpNet::V6(l), IpNet::V6(g)) => v6.push(Pair6 {
                    mask: u128::from(l.netmask()),
                    local: u128::from(l.network()),
                    global: u128::from(g.network()),
                }),
                _ => return Err(format!("{c}: map IPv4 to IPv4 and IPv6 to IPv6")),
            }
        }
        Ok(Translation { cidrs, v4, v6 })
    }

    pub fn is_empty(&self) -> bool {
        self.cidrs.is_empty()
    }

    /// The mappings, as configured.
    pub fn cidrs(&self) -> &[GlobalCidr] {
        &self.cidrs
    }

    /// The address the clusterset knows a local address by (itself when no range maps it).
    pub fn global(&self, ip: IpAddr) -> IpAddr {
        self.map(ip, Way::ToGlobal).unwrap_or(ip)
    }

    /// The range the clusterset knows a local range by: its global range when a mapping covers it
    /// whole, else the range itself.
    pub fn global_net(&self, net: IpNet) -> IpNet {
        let covered = self.cidrs.iter().any(|c| c.local.contains(&net));
        match self.map(net.network(), Way::ToGlobal) {
            Some(ip) if covered => IpNet::new(ip, net.prefix_len()).unwrap_or(net),
            _ => net,
        }
    }

    fn map(&self, ip: IpAddr, way: Way) -> Option<IpAddr> {
        match ip {
            IpAddr::V4(a) => self
                .map4(u32::from(a), way)
                .map(|a| IpAddr::from(a.to_be_bytes())),
            IpAddr::V6(a) => self
                .map6(u128::from(a), way)
                .map(|a| IpAddr::from(a.to_be_bytes())),
        }
    }

    fn map4(&self, a: u32, way: Way) -> Option<u32> {
        self.v4.iter().find_map(|p| {
            let (from, to) = match way {
                Way::ToGlobal => (p.local, p.global),
                Way::ToLocal => (p.global, p.local),
            };
            (a & p.mask == from).then_some(to | (a & !p.mask))
        })
    }

    fn map6(&self, a: u128, way: Way) -> Option<u128> {
        self.v6.iter().find_map(|p| {
            let (from, to) = match way {
                Way::ToGlobal => (p.local, p.global),
                Way::ToLocal => (p.global, p.local),
            };
            (a & p.mask == from).then_some(to | (a & !p.mask))
        })
    }

    /// A packet leaving this cluster for a peer: a local source becomes global (and, in an ICMP
    /// error, the quoted packet's local destination). True when anything changed.
    pub fn outbound(&self, packet: &mut [u8]) -> bool {
        !self.is_empty() && self.rewrite(packet, Field::Source, Way::ToGlobal)
    }

    /// A packet from a peer entering this cluster: a global destination becomes local (and, in an
    /// ICMP error, the quoted packet's global source). True when anything changed.
    pub fn inbound(&self, packet: &mut [u8]) -> bool {
        !self.is_empty() && self.rewrite(packet, Field::Destination, Way::ToLocal)
    }

    fn rewrite(&self, packet: &mut [u8], field: Field, way: Way) -> bool {
        match packet.first().map(|b| b >> 4) {
            Some(4) => self.rewrite_v4(packet, field, way),
            Some(6) => self.rewrite_v6(packet, field, way),
            _ => false,
        }
    }

    fn rewrite_v4(&self, p: &mut [u8], field: Field, way: Way) -> bool {
        let Some(ihl) = v4_header_len(p) else {
            return false;
        };
        let outer = self.swap_v4_address(p, field, way);
        if v4_fragment_offset(p) != 0 {
            return outer.is_some();
        }
        let proto = p[9];
        let l4 = &mut p[ihl..];
        match (proto, outer) {
            (TCP, Some(delta)) => adjust_at(l4, 16, delta),
            (UDP, Some(delta)) => adjust_udp(l4, delta),
            // An error about a packet that crossed: its quote is translated even when the error
            // comes from an address that is not (a node's, the gateway's tunnel address).
            (ICMP, _) if l4.len() >= 8 && is_icmp4_error(l4[0]) => {
                if let Some(quoted) = self.rewrite_quoted_v4(&mut l4[8..], field.other(), way) {
                    adjust_at(l4, 2, quoted);
                    return true;
                }
            }
            _ => {}
        }
        outer.is_some()
    }

    /// Maps one address of an IPv4 header (length checked) and fixes the header checksum.
    /// Returns the change to the address, for the checksums over a pseudo-header.
    fn swap_v4_address(&self, p: &mut [u8], field: Field, way: Way) -> Option<Delta> {
        let at = match field {
            Field::Source => 12,
            Field::Destination => 16,
        };
        let old: [u8; 4] = p[at..at + 4].try_into().ok()?;
        let new = self.map4(u32::from_be_bytes(old), way)?.to_be_bytes();
        p[at..at + 4].copy_from_slice(&new);
        let delta = Delta::of(&old, &new);
        adjust_at(p, 10, delta);
        Some(delta)
    }

    /// Translates the IPv4 packet an ICMP error quotes (possibly cut short) and returns the
    /// change to the quoted bytes as a whole, for the ICMP checksum.
    fn rewrite_quoted_v4(&self, q: &mut [u8], field: Field, way: Way) -> Option<Delta> {
        if q.first().map(|b| b >> 4) != Some(4) {
            return None;
        }
        let ihl = v4_header_len(q)?;
        let checksum_before = word(q, 10);
        let address = self.swap_v4_address(q, field, way)?;
        let mut change = address.plus(Delta::of_word(checksum_before, word(q, 10)));
        if v4_fragment_offset(q) == 0 {
            let proto = q[9];
            let l4 = &mut q[ihl..];
            change = change.plus(match proto {
                TCP => adjust_tracked(l4, 16, address),
                UDP => adjust_udp_tracked(l4, address),
                _ => Delta::default(),
            });
        }
        Some(change)
    }

    fn rewrite_v6(&self, p: &mut [u8], field: Field, way: Way) -> bool {
        let outer = self.swap_v6_address(p, field, way);
        let Some((proto, at)) = v6_transport(p) else {
            return outer.is_some();
        };
        let l4 = &mut p[at..];
        match (proto, outer) {
            (TCP, Some(delta)) => adjust_at(l4, 16, delta),
            (UDP, Some(delta)) => adjust_at(l4, 6, delta),
            (ICMPV6, _) => {
                if let Some(delta) = outer {
                    adjust_at(l4, 2, delta);
                }
                if l4.len() >= 8 && l4[0] < 128 {
                    if let Some(quoted) = self.rewrite_quoted_v6(&mut l4[8..], field.other(), way) {
                        adjust_at(l4, 2, quoted);
                        return true;
                    }
                }
            }
            _ => {}
        }
        outer.is_some()
    }

    fn swap_v6_address(&self, p: &mut [u8], field: Field, way: Way) -> Option<Delta> {
        if p.len() < 40 {
            return None;
        }
        let at = match field {
            Field::Source => 8,
            Field::Destination => 24,
        };
        let old: [u8; 16] = p[at..at + 16].try_into().ok()?;
        let new = self.map6(u128::from_be_bytes(old), way)?.to_be_bytes();
        p[at..at + 16].copy_from_slice(&new);
        Some(Delta::of(&old, &new))
    }

    fn rewrite_quoted_v6(&self, q: &mut [u8], field: Field, way: Way) -> Option<Delta> {
        if q.first().map(|b| b >> 4) != Some(6) {
            return None;
        }
        let address = self.swap_v6_address(q, field, way)?;
        let mut change = address;
        if let Some((proto, at)) = v6_transport(q) {
            let l4 = &mut q[at..];
            change = change.plus(match proto {
                TCP => adjust_tracked(l4, 16, address),
                UDP => adjust_tracked(l4, 6, address),
                ICMPV6 => adjust_tracked(l4, 2, address),
                _ => Delta::default(),
            });
        }
        Some(change)
    }
}

/// The IPv4 header length, if the packet holds a whole header.
fn v4_header_len(p: &[u8]) -> Option<usize> {
    let ihl = usize::from(p.first()? & 0x0f) * 4;
    (ihl >= 20 && p.len() >= ihl).then_some(ihl)
}

fn v4_fragment_offset(p: &[u8]) -> u16 {
    u16::from_be_bytes([p[6] & 0x1f, p[7]])
}

fn is_icmp4_error(kind: u8) -> bool {
    matches!(kind, 3 | 4 | 5 | 11 | 12)
}

/// The transport protocol of an IPv6 packet and where its header starts, past the extension
/// headers that may precede it; `None` for a non-first fragment or a header chain cut short.
fn v6_transport(p: &[u8]) -> Option<(u8, usize)> {
    let mut next = *p.get(6)?;
    let mut at = 40;
    for _ in 0..8 {
        match next {
            // hop-by-hop, routing, destination options
            0 | 43 | 60 => {
                let len = (usize::from(*p.get(at + 1)?) + 1) * 8;
                next = *p.get(at)?;
                at += len;
            }
            44 => {
                let offset = u16::from_be_bytes([*p.get(at + 2)?, *p.get(at + 3)?]) >> 3;
                if offset != 0 {
                    return None;
                }
                next = p[at];
                at += 8;
            }
            proto => return (at <= p.len()).then_some((proto, at)),
        }
    }
    None
}

/// A change to checksummed data: the one's-complement sum of the old words complemented and the
/// new words (RFC 1624, eqn. 3), folded to 16 bits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Delta(u16);

impl Delta {
    /// The change from `old` to `new` (equal, even lengths).
    fn of(old: &[u8], new: &[u8]) -> Delta {
        let mut sum = 0u32;
        for (o, n) in old.chunks_exact(2).zip(new.chunks_exact(2)) {
            sum += u32::from(!u16::from_be_bytes([o[0], o[1]]));
            sum += u32::from(u16::from_be_bytes([n[0], n[1]]));
        }
        Delta(fold(sum))
    }

    fn of_word(old: u16, new: u16) -> Delta {
        Delta(fold(u32::from(!old) + u32::from(new)))
    }

    fn plus(self, other: Delta) -> Delta {
        Delta(fold(u32::from(self.0) + u32::from(other.0)))
    }
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

fn word(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// The checksum `checksum` after the data it covers changed by `delta`: HC' = ~(~HC + delta).
fn adjusted(checksum: u16, delta: Delta) -> u16 {
    !fold(u32::from(!checksum) + u32::from(delta.0))
}

/// Adjusts the checksum at `at` in `b` if `b` holds it.
fn adjust_at(b: &mut [u8], at: usize, delta: Delta) {
    adjust_tracked(b, at, delta);
}

/// Adjusts the checksum at `at` (if `b` holds it) and returns the change to that word.
fn adjust_tracked(b: &mut [u8], at: usize, delta: Delta) -> Delta {
    if b.len() < at + 2 {
        return Delta::default();
    }
    let old = word(b, at);
    let new = adjusted(old, delta);
    b[at..at + 2].copy_from_slice(&new.to_be_bytes());
    Delta::of_word(old, new)
}

/// A UDP checksum over IPv4: zero means none (left so); a result of zero is sent as all ones.
fn adjust_udp(b: &mut [u8], delta: Delta) {
    adjust_udp_tracked(b, delta);
}

fn adjust_udp_tracked(b: &mut [u8], delta: Delta) -> Delta {
    if b.len() < 8 || word(b, 6) == 0 {
        return Delta::default();
    }
    let old = word(b, 6);
    let mut new = adjusted(old, delta);
    if new == 0 {
        new = 0xffff;
    }
    b[6..8].copy_from_slice(&new.to_be_bytes());
    Delta::of_word(old, new)
}

#[cfg(test)]
mod tests;
