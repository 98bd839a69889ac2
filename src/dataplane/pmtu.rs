//! Path MTU in the dataplane: how large an inner packet the path to a peer carries, and what
//! happens to a packet that is larger.
//!
//! The TUN device's MTU is the configured tunnel MTU, but the underlay on the way to a peer may
//! carry less (a PPPoE uplink, a cloud network at 1450, an MTU lowered after start). meshd's UDP
//! socket sets DF, so a datagram larger than the route to the peer would be refused by the kernel
//! and the packet lost for good: TCP stalls after its handshake. Instead, the timer thread reads
//! the route's MTU to each peer's endpoint once a second ([`route_mtu`]), and the transmit path
//! answers a packet above `route MTU − tunnel overhead` the way a router would:
//! - IPv6, or IPv4 with DF: an ICMP "packet too big" / "fragmentation needed" carrying the MTU
//!   that fits ([`too_big_reply`]) goes back into the TUN device, so the sender's path MTU
//!   discovery lowers its packet size (the pods' kernels do this for TCP and for `ping -M do`);
//! - IPv4 without DF: the packet is cut into fragments that fit ([`fragment_v4`]), which the
//!   receiver reassembles.
//!
//! All functions here except [`route_mtu`] are pure functions over packet bytes.

use super::mss::{fold, sum16};
use socket2::{Domain, Socket, Type};
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

/// Outer IPv4 (20) + UDP (8) + WireGuard data header (16) + Poly1305 tag (16).
pub const V4_OVERHEAD: u16 = 60;
/// Outer IPv6 (40) + UDP (8) + WireGuard data header (16) + Poly1305 tag (16).
pub const V6_OVERHEAD: u16 = 80;
/// The smallest MTU an IPv4 host must accept (RFC 791); no packet is cut below it.
const V4_MIN_MTU: u16 = 68;
/// An ICMPv4 error carries at most this much in all (RFC 1812 §4.3.2.3).
const V4_ICMP_MAX: usize = 576;
/// An ICMPv6 error carries as much of the packet as fits IPv6's minimum MTU (RFC 4443 §2.4).
const V6_ICMP_MAX: usize = 1280;
/// The largest answer [`too_big_reply`] writes.
pub const REPLY_MAX: usize = V6_ICMP_MAX;
const ICMP: u8 = 1;
const ICMPV6: u8 = 58;
const DF: u16 = 0x4000;
const MF: u16 = 0x2000;
const OFFSET_MASK: u16 = 0x1fff;

/// The tunnel overhead for an endpoint of this address family.
pub fn overhead(endpoint: SocketAddr) -> u16 {
    match unmapped(endpoint) {
        SocketAddr::V4(_) => V4_OVERHEAD,
        SocketAddr::V6(_) => V6_OVERHEAD,
    }
}

fn unmapped(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::from((v4, v6.port())),
            None => addr,
        },
        v4 => v4,
    }
}

/// The MTU of the kernel's route to `endpoint`, including what it has learned from ICMP on the
/// way (a connected UDP socket's `IP_MTU`/`IPV6_MTU`; nothing is sent).
pub fn route_mtu(endpoint: SocketAddr) -> io::Result<u16> {
    let endpoint = unmapped(endpoint);
    let socket = Socket::new(Domain::for_address(endpoint), Type::DGRAM, None)?;
    socket.connect(&endpoint.into())?;
    let (level, name) = match endpoint {
        SocketAddr::V4(_) => (libc::IPPROTO_IP, libc::IP_MTU),
        SocketAddr::V6(_) => (libc::IPPROTO_IPV6, libc::IPV6_MTU),
    };
    let mut mtu: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: a valid socket, and `mtu`/`len` point at an int and its size for the kernel to fill.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&mut mtu as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u16::try_from(mtu).unwrap_or(u16::MAX))
}

/// The largest inner packet the route to `endpoint` carries, never more than the tunnel's `mtu`.
pub fn inner_limit(route_mtu: u16, endpoint: SocketAddr, mtu: u16) -> u16 {
    route_mtu.saturating_sub(overhead(endpoint)).min(mtu)
}

/// What to do with a packet larger than the path carries.
#[derive(Debug, PartialEq, Eq)]
pub enum Oversized {
    /// Answer the sender with this many bytes of ICMP (written to the buffer given).
    Reply(usize),
    /// IPv4 without DF: cut it into fragments.
    Fragment,
    /// Neither is allowed (an ICMP error about an ICMP error, a broadcast source, garbage).
    Drop,
}

/// Builds the ICMP "fragmentation needed" (IPv4 with DF) or "packet too big" (IPv6) answer to
/// `packet`, announcing `mtu`, into `out` (at least [`REPLY_MAX`] bytes). The answer comes from the packet's
/// destination, as if the far side's router had sent it: the sender's kernel matches it to the
/// connection by the quoted header, and reverse-path filters accept it on the TUN device.
pub fn too_big_reply(packet: &[u8], mtu: u16, out: &mut [u8]) -> Oversized {
    match packet.first().map(|b| b >> 4) {
        Some(4) if packet.len() >= 20 => reply_v4(packet, mtu, out),
        Some(6) if packet.len() >= 40 => reply_v6(packet, mtu, out),
        _ => Oversized::Drop,
    }
}

fn reply_v4(packet: &[u8], mtu: u16, out: &mut [u8]) -> Oversized {
    let ihl = usize::from(packet[0] & 0x0f) * 4;
    if ihl < 20 || packet.len() < ihl {
        return Oversized::Drop;
    }
    let flags = u16::from_be_bytes([packet[6], packet[7]]);
    if flags & DF == 0 {
        return Oversized::Fragment;
    }
    let src = [packet[12], packet[13], packet[14], packet[15]];
    let is_icmp_error = packet[9] == ICMP
        && flags & OFFSET_MASK == 0
        && packet
            .get(ihl)
            .is_some_and(|t| matches!(t, 3 | 4 | 5 | 11 | 12));
    if is_icmp_error || src == [0; 4] || src[0] >= 224 || src == [255; 4] {
        return Oversized::Drop;
    }
    let quoted = packet.len().min(V4_ICMP_MAX - 28);
    let total = 28 + quoted;
    let out = &mut out[..total];
    out[0] = 0x45;
    out[1] = 0xc0;
    out[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    out[4..10].copy_from_slice(&[0, 0, 0, 0, 64, ICMP]);
    out[10..12].fill(0);
    out[12..16].copy_from_slice(&packet[16..20]);
    out[16..20].copy_from_slice(&src);
    let header = fold(sum16(&out[..20], 0));
    out[10..12].copy_from_slice(&header.to_be_bytes());
    out[20..24].copy_from_slice(&[3, 4, 0, 0]);
    out[24..26].fill(0);
    out[26..28].copy_from_slice(&mtu.to_be_bytes());
    out[28..].copy_from_slice(&packet[..quoted]);
    let icmp = fold(sum16(&out[20..], 0));
    out[22..24].copy_from_slice(&icmp.to_be_bytes());
    Oversized::Reply(total)
}

fn reply_v6(packet: &[u8], mtu: u16, out: &mut [u8]) -> Oversized {
    let src = &packet[8..24];
    let is_icmp_error = packet[6] == ICMPV6 && packet.get(40).is_some_and(|t| *t < 128);
    if is_icmp_error || src.iter().all(|b| *b == 0) || src[0] == 0xff {
        return Oversized::Drop;
    }
    let quoted = packet.len().min(V6_ICMP_MAX - 48);
    let total = 48 + quoted;
    let out = &mut out[..total];
    out[0..4].copy_from_slice(&[0x60, 0, 0, 0]);
    out[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
    out[6] = ICMPV6;
    out[7] = 64;
    out[8..24].copy_from_slice(&packet[24..40]);
    out[24..40].copy_from_slice(src);
    out[40..44].copy_from_slice(&[2, 0, 0, 0]);
    out[44..48].copy_from_slice(&u32::from(mtu).to_be_bytes());
    out[48..].copy_from_slice(&packet[..quoted]);
    let pseudo = sum16(&out[8..40], u32::from(ICMPV6) + (total - 40) as u32);
    let icmp = fold(sum16(&out[40..], pseudo));
    out[42..44].copy_from_slice(&icmp.to_be_bytes());
    Oversized::Reply(total)
}

/// Cuts an IPv4 packet (DF clear) into fragments of at most `mtu` bytes, calling `emit` with
/// each, built in `scratch` (at least `mtu` bytes). Options marked "copied" go into every
/// fragment, the others only into the first (RFC 791). Returns how many fragments were emitted,
/// or `None` (nothing emitted) if the packet is malformed or `mtu` is below IPv4's minimum.
pub fn fragment_v4(
    packet: &[u8],
    mtu: u16,
    scratch: &mut [u8],
    mut emit: impl FnMut(&[u8]),
) -> Option<usize> {
    let ihl = usize::from(*packet.first()? & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([*packet.get(2)?, *packet.get(3)?]));
    if mtu < V4_MIN_MTU || ihl < 20 || total < ihl || total > packet.len() {
        return None;
    }
    let flags = u16::from_be_bytes([packet[6], packet[7]]);
    if flags & DF != 0 {
        return None;
    }
    let mut later_header = [0u8; 60];
    let later_len = copied_header(&packet[..ihl], &mut later_header);
    let payload = &packet[ihl..total];
    let mut at = 0;
    let mut count = 0;
    while at < payload.len() || count == 0 {
        let header: &[u8] = if count == 0 {
            &packet[..ihl]
        } else {
            &later_header[..later_len]
        };
        let room = (usize::from(mtu) - header.len()) & !7;
        if room == 0 {
            return None;
        }
        let end = (at + room).min(payload.len());
        let last = end == payload.len();
        let len = header.len() + end - at;
        let frag = &mut scratch[..len];
        frag[..header.len()].copy_from_slice(header);
        frag[header.len()..].copy_from_slice(&payload[at..end]);
        frag[0] = 0x40 | (header.len() / 4) as u8;
        frag[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        let offset = (flags & OFFSET_MASK) + (at / 8) as u16;
        let more = if last { flags & MF } else { MF };
        frag[6..8].copy_from_slice(&(offset | more).to_be_bytes());
        frag[10..12].fill(0);
        let checksum = fold(sum16(&frag[..header.len()], 0));
        frag[10..12].copy_from_slice(&checksum.to_be_bytes());
        emit(frag);
        count += 1;
        at = end;
    }
    Some(count)
}

/// The header of the second and later fragments: the fixed 20 bytes and the options whose
/// "copied" bit is set, padded with end-of-options to a multiple of four. Returns its length.
fn copied_header(header: &[u8], out: &mut [u8; 60]) -> usize {
    out[..20].copy_from_slice(&header[..20]);
    let mut len = 20;
    let mut at = 20;
    while at < header.len() {
        match header[at] {
            0 => break,
            1 => at += 1,
            kind => {
                let size = header.get(at + 1).map_or(0, |s| usize::from(*s));
                if size < 2 || at + size > header.len() {
                    break;
                }
                if kind & 0x80 != 0 {
                    out[len..len + size].copy_from_slice(&header[at..at + size]);
                    len += size;
                }
                at += size;
            }
        }
    }
    let padded = len.div_ceil(4) * 4;
    out[len..padded].fill(0);
    padded
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn v4(len: usize, df: bool, proto: u8, options: &[u8]) -> Vec<u8> {
        let ihl = 20 + options.len();
        let mut p = vec![0u8; len.max(ihl)];
        p[0] = 0x40 | (ihl / 4) as u8;
        let total = p.len() as u16;
        p[2..4].copy_from_slice(&total.to_be_bytes());
        p[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
        p[6] = if df { 0x40 } else { 0 };
        p[8] = 64;
        p[9] = proto;
        p[12..16].copy_from_slice(&[10, 244, 1, 10]);
        p[16..20].copy_from_slice(&[10, 245, 1, 10]);
        p[20..ihl].copy_from_slice(options);
        let checksum = fold(sum16(&p[..ihl], 0));
        p[10..12].copy_from_slice(&checksum.to_be_bytes());
        for (i, b) in p[ihl..].iter_mut().enumerate() {
            *b = (i * 7 + 3) as u8;
        }
        p
    }

    fn v6(len: usize, next: u8, first_payload_byte: u8) -> Vec<u8> {
        let mut p = vec![0u8; len];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&((len - 40) as u16).to_be_bytes());
        p[6] = next;
        p[7] = 64;
        p[8..24].copy_from_slice(
            &"fd00:244::10"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        p[24..40].copy_from_slice(
            &"fd00:245::10"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        p[40] = first_payload_byte;
        p
    }

    #[test]
    fn ipv4_with_df_gets_fragmentation_needed_with_the_mtu() {
        let packet = v4(1420, true, 6, &[]);
        let mut out = [0u8; 1500];
        let Oversized::Reply(len) = too_big_reply(&packet, 1340, &mut out) else {
            panic!("no reply");
        };
        let reply = &out[..len];
        assert_eq!(len, 576);
        assert_eq!(fold(sum16(&reply[..20], 0)), 0, "IP header checksum");
        assert_eq!(fold(sum16(&reply[20..], 0)), 0, "ICMP checksum");
        assert_eq!(
            &reply[12..16],
            &packet[16..20],
            "from the packet's destination"
        );
        assert_eq!(&reply[16..20], &packet[12..16], "to the packet's source");
        assert_eq!(reply[9], ICMP);
        assert_eq!(&reply[20..22], &[3, 4]);
        assert_eq!(u16::from_be_bytes([reply[26], reply[27]]), 1340);
        assert_eq!(&reply[28..], &packet[..548], "quotes the packet");
    }

    #[test]
    fn ipv6_gets_packet_too_big_with_the_mtu() {
        let packet = v6(1420, 6, 0);
        let mut out = [0u8; 1500];
        let Oversized::Reply(len) = too_big_reply(&packet, 1320, &mut out) else {
            panic!("no reply");
        };
        let reply = &out[..len];
        assert_eq!(len, 1280);
        let pseudo = sum16(&reply[8..40], u32::from(ICMPV6) + (len - 40) as u32);
        assert_eq!(fold(sum16(&reply[40..], pseudo)), 0, "ICMPv6 checksum");
        assert_eq!(&reply[8..24], &packet[24..40]);
        assert_eq!(&reply[24..40], &packet[8..24]);
        assert_eq!(&reply[40..42], &[2, 0]);
        assert_eq!(u32::from_be_bytes(reply[44..48].try_into().unwrap()), 1320);
        assert_eq!(&reply[48..], &packet[..1232]);
    }

    #[test]
    fn no_icmp_error_about_an_icmp_error_or_to_nobody() {
        let mut out = [0u8; 1500];
        let mut unreachable = v4(1420, true, ICMP, &[]);
        unreachable[20] = 3;
        assert_eq!(too_big_reply(&unreachable, 1340, &mut out), Oversized::Drop);
        let mut echo = v4(1420, true, ICMP, &[]);
        echo[20] = 8;
        assert!(matches!(
            too_big_reply(&echo, 1340, &mut out),
            Oversized::Reply(_)
        ));
        let mut multicast_source = v4(1420, true, 17, &[]);
        multicast_source[12] = 239;
        assert_eq!(
            too_big_reply(&multicast_source, 1340, &mut out),
            Oversized::Drop
        );
        assert_eq!(
            too_big_reply(&v6(1420, ICMPV6, 1), 1320, &mut out),
            Oversized::Drop
        );
        assert!(matches!(
            too_big_reply(&v6(1420, ICMPV6, 128), 1320, &mut out),
            Oversized::Reply(_)
        ));
        assert_eq!(too_big_reply(&[0x45, 0], 1340, &mut out), Oversized::Drop);
        assert_eq!(too_big_reply(&[], 1340, &mut out), Oversized::Drop);
    }

    #[test]
    fn ipv4_without_df_is_fragmented_not_answered() {
        let mut out = [0u8; 1500];
        assert_eq!(
            too_big_reply(&v4(1420, false, 17, &[]), 1340, &mut out),
            Oversized::Fragment
        );
    }

    #[test]
    fn fragmenting_refuses_df_malformed_and_tiny_mtus() {
        let mut scratch = [0u8; 1500];
        let never = |_: &[u8]| panic!("emitted");
        assert_eq!(
            fragment_v4(&v4(1420, true, 17, &[]), 1340, &mut scratch, never),
            None
        );
        assert_eq!(
            fragment_v4(&v4(1420, false, 17, &[]), 60, &mut scratch, never),
            None
        );
        let mut short = v4(1420, false, 17, &[]);
        short.truncate(1000);
        assert_eq!(fragment_v4(&short, 1340, &mut scratch, never), None);
    }

    /// Reassembles fragments by offset; checks each fragment's header on the way.
    fn reassemble(fragments: &[Vec<u8>], mtu: u16) -> Vec<u8> {
        let mut payload = Vec::new();
        for (i, f) in fragments.iter().enumerate() {
            assert!(
                f.len() <= usize::from(mtu),
                "fragment {i} is {} bytes",
                f.len()
            );
            let ihl = usize::from(f[0] & 0x0f) * 4;
            assert_eq!(fold(sum16(&f[..ihl], 0)), 0, "fragment {i} header checksum");
            assert_eq!(usize::from(u16::from_be_bytes([f[2], f[3]])), f.len());
            let flags = u16::from_be_bytes([f[6], f[7]]);
            assert_eq!(
                flags & MF != 0,
                i + 1 < fragments.len(),
                "MF of fragment {i}"
            );
            assert_eq!(usize::from(flags & OFFSET_MASK) * 8, payload.len());
            payload.extend_from_slice(&f[ihl..]);
        }
        payload
    }

    proptest! {
        #[test]
        fn fragments_fit_and_reassemble_to_the_payload(
            len in 21usize..9000,
            mtu in 68u16..1500,
            with_options in any::<bool>(),
        ) {
            // Record route (not copied) and a copied option (security, type 130).
            let options: &[u8] = if with_options {
                &[7, 7, 4, 0, 0, 0, 0, 130, 3, 0, 1, 0]
            } else {
                &[]
            };
            let packet = v4(len + options.len(), false, 17, options);
            let ihl = 20 + options.len();
            let mut scratch = [0u8; 1500];
            let mut fragments = Vec::new();
            let count = fragment_v4(&packet, mtu, &mut scratch, |f| fragments.push(f.to_vec()));
            prop_assert_eq!(count, Some(fragments.len()));
            prop_assert_eq!(reassemble(&fragments, mtu), packet[ihl..].to_vec());
            for later in &fragments[1..] {
                let later_ihl = usize::from(later[0] & 0x0f) * 4;
                let expected = if with_options { 24 } else { 20 };
                prop_assert_eq!(later_ihl, expected);
                if with_options {
                    prop_assert_eq!(&later[20..23], &[130, 3, 0]);
                }
            }
        }
    }

    #[test]
    fn a_fragment_is_cut_again_with_its_offset_and_last_mf_kept() {
        let mut packet = v4(1000, false, 17, &[]);
        packet[6..8].copy_from_slice(&(MF | 100).to_be_bytes());
        let mut scratch = [0u8; 1500];
        let mut fragments = Vec::new();
        fragment_v4(&packet, 500, &mut scratch, |f| fragments.push(f.to_vec())).unwrap();
        let offsets: Vec<u16> = fragments
            .iter()
            .map(|f| u16::from_be_bytes([f[6], f[7]]))
            .collect();
        assert_eq!(offsets, vec![MF | 100, MF | 160, MF | 220]);
    }

    #[test]
    fn limit_subtracts_the_overhead_of_the_endpoint_family() {
        let v4: SocketAddr = "192.0.2.2:51820".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:192.0.2.2]:51820".parse().unwrap();
        let v6: SocketAddr = "[2001:db8::2]:51820".parse().unwrap();
        assert_eq!(inner_limit(1400, v4, 1420), 1340);
        assert_eq!(inner_limit(1400, mapped, 1420), 1340);
        assert_eq!(inner_limit(1400, v6, 1420), 1320);
        assert_eq!(inner_limit(1500, v4, 1420), 1420);
        assert_eq!(inner_limit(40, v4, 1420), 0);
    }

    #[test]
    fn route_mtu_reads_loopback() {
        let mtu = route_mtu("127.0.0.1:9".parse().unwrap()).unwrap();
        assert!(mtu >= 1280, "loopback route MTU {mtu}");
    }
}
