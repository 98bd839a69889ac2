//! The coalescer over generated batches, checked against a model of the kernel's split
//! (`tcp_gso_segment`, `__udp_gso_segment` and the checksum completion of a `CHECKSUM_PARTIAL`
//! packet): every TCP segment and UDP datagram comes back byte for byte (but for the IPv4
//! identification of a joined one), in order within its flow; everything else is left, in
//! order, to tun-rs.

use super::*;
use proptest::prelude::*;

/// Room for a whole super-packet, as the receive loop's buffers have.
const CAPACITY: usize = 2 * VIRTIO_NET_HDR_LEN + 65536;
const BOTH: Offloads = Offloads {
    tcp: true,
    udp: true,
};

/// Packets, each its bytes.
type Packets = Vec<Vec<u8>>;

/// What a generated packet is. Flows 0 and 1 are IPv4, flow 2 IPv6 (UDP); TCP flow 0 is IPv4,
/// flow 1 IPv6.
#[derive(Debug, Clone)]
enum Kind {
    /// A UDP datagram with `len` payload bytes.
    Udp { flow: u8, len: usize },
    /// The same, with a broken checksum.
    BadChecksum { flow: u8, len: usize },
    /// IPv4 UDP without a checksum (0), which may not join.
    NoChecksum { len: usize },
    /// The first fragment of a fragmented IPv4 UDP datagram.
    Fragment { len: usize },
    /// The next TCP segment of a flow, PSH or not.
    Tcp { flow: u8, len: usize, push: bool },
    /// A TCP segment that may not join: 0 a bare ACK, 1 SYN, 2 after a gap in the sequence,
    /// 3 a new acknowledgement number, 5 a new window (either may then join what follows), 4 a
    /// broken checksum.
    TcpOdd { flow: u8, len: usize, odd: u8 },
    /// ICMP, left to tun-rs.
    Icmp { len: usize },
}

fn checksum_of(data: &[u8], pseudo: u64) -> u16 {
    fold_wide(pseudo + sum_wide(data))
}

/// An IP packet (`v6` or IPv4 with identification `id`) around transport bytes `l4` of
/// protocol `proto`, the transport checksum (at `check`, if any) filled in.
fn ip_packet(v6: bool, proto: u8, mut l4: Vec<u8>, check: Option<usize>, id: u16) -> Vec<u8> {
    let mut p = if v6 {
        let mut h = vec![0x60, 0, 0, 0, 0, 0, proto, 64];
        h[4..6].copy_from_slice(&(l4.len() as u16).to_be_bytes());
        h.extend_from_slice(
            &"fd00:244::1:10"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        h.extend_from_slice(
            &"fd00:245::1:10"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        h
    } else {
        let mut h = vec![
            0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, proto, 0, 0, 10, 244, 1, 10, 10, 245, 1, 10,
        ];
        h[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
        h[4..6].copy_from_slice(&id.to_be_bytes());
        let c = checksum_of(&h, 0);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h
    };
    if let Some(at) = check {
        let pseudo = if v6 {
            sum_wide(&p[8..40])
        } else {
            sum_wide(&p[12..20])
        };
        let c = checksum_of(&l4, pseudo + u64::from(proto) + l4.len() as u64);
        l4[at..at + 2].copy_from_slice(&c.to_be_bytes());
    }
    p.extend_from_slice(&l4);
    p
}

fn payload(len: usize, id: u16) -> impl Iterator<Item = u8> {
    (0..len).map(move |i| (i as u16 ^ id.wrapping_mul(31)) as u8)
}

fn udp(flow: u8, len: usize, id: u16) -> Vec<u8> {
    let mut l4 = vec![0x30, 0x39, 0x1f, 0x90 + flow];
    l4.extend_from_slice(&((UDP_HEADER + len) as u16).to_be_bytes());
    l4.extend_from_slice(&[0, 0]);
    l4.extend(payload(len, id));
    ip_packet(flow == 2, UDP, l4, Some(6), id)
}

/// A TCP segment of flow `flow` with sequence number `seq`, acknowledgement and window
/// `ack_window`, `flags` and 12 bytes of options (timestamps, as Linux sends).
fn tcp(flow: u8, seq: u32, ack_window: (u32, u16), flags: u8, len: usize, id: u16) -> Vec<u8> {
    let mut l4 = vec![0x9c, 0x40, 0x14, 0x51 + flow];
    l4.extend_from_slice(&seq.to_be_bytes());
    l4.extend_from_slice(&ack_window.0.to_be_bytes());
    l4.extend_from_slice(&[0x80, flags]);
    l4.extend_from_slice(&ack_window.1.to_be_bytes());
    l4.extend_from_slice(&[0, 0, 0, 0]);
    l4.extend_from_slice(&[1, 1, 8, 10, 0, 1, 2, 3, 4, 5, 6, 7]);
    l4.extend(payload(len, id));
    ip_packet(flow == 1, TCP, l4, Some(16), id)
}

/// The packets of `kinds`, with each TCP flow's sequence and acknowledgement numbers as the
/// kinds say (sequence numbers start just below the wrap).
fn packets(kinds: &[Kind]) -> Packets {
    let mut seq = [0xffff_f000u32; 2];
    let mut ack = [(7u32, 501u16); 2];
    kinds
        .iter()
        .enumerate()
        .map(|(i, kind)| {
            let id = i as u16;
            match *kind {
                Kind::Udp { flow, len } => udp(flow, len, id),
                Kind::BadChecksum { flow, len } => {
                    let mut p = udp(flow, len, id);
                    let at = if flow < 2 { 26 } else { 46 };
                    p[at] ^= 0x55;
                    p
                }
                Kind::NoChecksum { len } => {
                    let mut p = udp(0, len, id);
                    p[26..28].fill(0);
                    p
                }
                Kind::Fragment { len } => {
                    let mut p = udp(0, len, id);
                    p[6] |= 0x20;
                    p
                }
                Kind::Tcp { flow, len, push } => {
                    let f = usize::from(flow);
                    let flags = if push { ACK | PSH } else { ACK };
                    let p = tcp(flow, seq[f], ack[f], flags, len, id);
                    seq[f] = seq[f].wrapping_add(len as u32);
                    p
                }
                Kind::TcpOdd { flow, len, odd } => {
                    let f = usize::from(flow);
                    let (flags, len) = match odd {
                        0 => (ACK, 0),
                        1 => (0x02 | ACK, len),
                        _ => (ACK, len),
                    };
                    if odd == 2 {
                        seq[f] = seq[f].wrapping_add(1000);
                    }
                    if odd == 3 {
                        ack[f].0 = ack[f].0.wrapping_add(1);
                    }
                    if odd == 5 {
                        ack[f].1 = ack[f].1.wrapping_add(1);
                    }
                    let mut p = tcp(flow, seq[f], ack[f], flags, len, id);
                    if odd == 4 {
                        let at = if flow == 0 { 40 } else { 60 };
                        p[at] ^= 0x55;
                    }
                    seq[f] = seq[f].wrapping_add(len as u32);
                    p
                }
                Kind::Icmp { len } => {
                    let mut l4 = vec![8, 0, 0, 0, 0, 1, 0, 1];
                    l4.extend(payload(len, id));
                    ip_packet(false, 1, l4, Some(2), id)
                }
            }
        })
        .collect()
}

/// Adds `b` to the 16-bit one's-complement value `a`, with end-around carry.
fn add16(a: u16, b: u16) -> u16 {
    let s = u32::from(a) + u32::from(b);
    let s = (s & 0xffff) + (s >> 16);
    ((s & 0xffff) + (s >> 16)) as u16
}

/// The kernel's split of one write, modelled: each packet's headers are the first's with its
/// lengths, an IPv4 identification counted up and a fresh header checksum, TCP's sequence
/// number counted on and PSH on the last segment only; the transport checksum is the partial
/// value adjusted to the packet's length (as the GSO code does), then completed over it.
fn split(write: &[u8]) -> Packets {
    let (hdr, packet) = write.split_at(VIRTIO_NET_HDR_LEN);
    if hdr[1] == 0 {
        assert!(
            hdr.iter().all(|&b| b == 0),
            "a lone packet's header is all zero"
        );
        return vec![packet.to_vec()];
    }
    let field = |i: usize| usize::from(u16::from_ne_bytes([hdr[2 + 2 * i], hdr[3 + 2 * i]]));
    let (hdr_len, gso_size, csum_start, csum_offset) = (field(0), field(1), field(2), field(3));
    assert_eq!(hdr[0], VIRTIO_NET_HDR_F_NEEDS_CSUM);
    let v4 = packet[0] >> 4 == 4;
    let udp = match hdr[1] {
        VIRTIO_NET_HDR_GSO_UDP_L4 => true,
        VIRTIO_NET_HDR_GSO_TCPV4 => {
            assert!(v4);
            false
        }
        VIRTIO_NET_HDR_GSO_TCPV6 => {
            assert!(!v4);
            false
        }
        other => panic!("GSO type {other}"),
    };
    assert_eq!(csum_offset, if udp { 6 } else { 16 });
    if udp {
        assert_eq!(hdr_len, csum_start + UDP_HEADER);
    }
    let (headers, data) = packet.split_at(hdr_len);
    let whole = (packet.len() - csum_start) as u16;
    if udp {
        assert_eq!(
            u16::from_be_bytes([headers[csum_start + 4], headers[csum_start + 5]]),
            whole
        );
    }
    let partial = u16::from_be_bytes([
        headers[csum_start + csum_offset],
        headers[csum_start + csum_offset + 1],
    ]);
    let chunks: Vec<&[u8]> = data.chunks(gso_size).collect();
    assert!(chunks.len() <= MAX_SEGMENTS && chunks.len() >= 2);
    let seq = u32::from_be_bytes(headers[csum_start + 4..csum_start + 8].try_into().unwrap());
    let mut out = Vec::new();
    for (k, chunk) in chunks.iter().enumerate() {
        let mut d = headers.to_vec();
        d.extend_from_slice(chunk);
        let l4_len = (d.len() - csum_start) as u16;
        if v4 {
            let total = d.len() as u16;
            d[2..4].copy_from_slice(&total.to_be_bytes());
            let id = u16::from_be_bytes([d[4], d[5]]).wrapping_add(k as u16);
            d[4..6].copy_from_slice(&id.to_be_bytes());
            d[10..12].fill(0);
            let c = checksum_of(&d[..20], 0);
            d[10..12].copy_from_slice(&c.to_be_bytes());
        } else {
            d[4..6].copy_from_slice(&l4_len.to_be_bytes());
        }
        if udp {
            d[csum_start + 4..csum_start + 6].copy_from_slice(&l4_len.to_be_bytes());
        } else {
            let s = seq.wrapping_add((k * gso_size) as u32);
            d[csum_start + 4..csum_start + 8].copy_from_slice(&s.to_be_bytes());
            if k + 1 < chunks.len() {
                d[csum_start + 13] &= !PSH;
            }
        }
        let at = csum_start + csum_offset;
        let adjusted = add16(add16(partial, !whole), l4_len);
        d[at..at + 2].copy_from_slice(&adjusted.to_be_bytes());
        let c = checksum_of(&d[csum_start..], 0);
        d[at..at + 2].copy_from_slice(&c.to_be_bytes());
        out.push(d);
    }
    out
}

/// A packet's flow, for order: protocol, addresses and ports.
fn flow_of(p: &[u8]) -> Vec<u8> {
    if p[0] >> 4 == 4 {
        [&p[9..10], &p[12..24]].concat()
    } else {
        p[6..44].to_vec()
    }
}

/// Without the IPv4 identification, which the split renumbers.
fn sans_id(p: &[u8]) -> Vec<u8> {
    let mut p = p.to_vec();
    if p[0] >> 4 == 4 {
        p[4..6].fill(0);
        p[10..12].fill(0);
    }
    p
}

/// Runs the coalescer over `packets`; returns the writes and the packets left to tun-rs.
fn run(packets: &Packets, offloads: Offloads) -> (Packets, Packets) {
    let mut bufs: Vec<Vec<u8>> = packets
        .iter()
        .map(|p| {
            let mut b = Vec::with_capacity(CAPACITY);
            b.resize(VIRTIO_NET_HDR_LEN, 0xee);
            b.extend_from_slice(p);
            b
        })
        .collect();
    let mut before: Vec<*const u8> = bufs.iter().map(|b| b.as_ptr()).collect();
    let mut writes = Vec::new();
    let mut coalescer = Coalescer::new(bufs.len());
    let (others, failed) = coalescer.write(&mut bufs, offloads, |w| {
        writes.push(w.to_vec());
        Ok(w.len())
    });
    assert_eq!(failed, 0);
    let mut after: Vec<*const u8> = bufs.iter().map(|b| b.as_ptr()).collect();
    before.sort();
    after.sort();
    assert_eq!(before, after, "no buffer was reallocated");
    let left = bufs[..others]
        .iter()
        .map(|b| b[VIRTIO_NET_HDR_LEN..].to_vec())
        .collect();
    (writes, left)
}

fn kind() -> impl Strategy<Value = Kind> {
    let len = prop_oneof![Just(1300usize), Just(64), 1usize..1400];
    prop_oneof![
        6 => (0u8..3, len.clone()).prop_map(|(flow, len)| Kind::Udp { flow, len }),
        1 => (0u8..3, 1usize..200).prop_map(|(flow, len)| Kind::BadChecksum { flow, len }),
        1 => (1usize..200).prop_map(|len| Kind::NoChecksum { len }),
        1 => (1usize..200).prop_map(|len| Kind::Fragment { len }),
        8 => (0u8..2, len, prop::bool::weighted(0.1))
            .prop_map(|(flow, len, push)| Kind::Tcp { flow, len, push }),
        2 => (0u8..2, 1usize..200, 0u8..6)
            .prop_map(|(flow, len, odd)| Kind::TcpOdd { flow, len, odd }),
        1 => (0usize..200).prop_map(|len| Kind::Icmp { len }),
    ]
}

/// Checks one run: what the kernel splits the writes into is exactly the batch's TCP and UDP
/// packets `offloads` names, each flow in its order; the rest is left in its order.
fn check(kinds: &[Kind], offloads: Offloads) -> Result<(), TestCaseError> {
    let originals = packets(kinds);
    let (writes, left) = run(&originals, offloads);
    let taken = |p: &[u8]| match protocol(p) {
        Some(TCP) => offloads.tcp,
        Some(UDP) => offloads.udp,
        _ => false,
    };
    let split: Packets = writes.iter().flat_map(|w| split(w)).collect();
    let (ours, rest): (Packets, Packets) = originals.iter().cloned().partition(|p| taken(p));
    prop_assert_eq!(left, rest);
    prop_assert_eq!(split.len(), ours.len());
    let mut flows: std::collections::BTreeMap<Vec<u8>, (Packets, Packets)> = Default::default();
    for p in &ours {
        flows.entry(flow_of(p)).or_default().0.push(sans_id(p));
    }
    for p in &split {
        flows.entry(flow_of(p)).or_default().1.push(sans_id(p));
    }
    for (flow, (sent, got)) in flows {
        prop_assert_eq!(sent, got, "flow {:?}", flow);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn the_split_gives_back_every_packet_in_flow_order(kinds in prop::collection::vec(kind(), 0..128)) {
        check(&kinds, BOTH)?;
    }

    /// Without USO (Linux before 6.2) UDP is left to tun-rs, with TCP still coalesced.
    #[test]
    fn without_uso_udp_is_left_alone(kinds in prop::collection::vec(kind(), 0..64)) {
        check(&kinds, Offloads { tcp: true, udp: false })?;
    }
}

/// How many packets each write carries.
fn counts(kinds: &[Kind]) -> Vec<usize> {
    let (writes, _) = run(&packets(kinds), BOTH);
    writes.iter().map(|w| split(w).len()).collect()
}

#[test]
fn bulk_flows_leave_in_few_writes_and_odd_packets_alone() {
    // 100 datagrams of 1300 bytes: as many as fit 65,535 bytes a write (50).
    assert_eq!(
        counts(&vec![Kind::Udp { flow: 0, len: 1300 }; 100]),
        [50, 50]
    );
    // 100 TCP segments of 1368 bytes (IPv4, timestamps): 47 fit; PSH ends a write.
    let mut kinds = vec![
        Kind::Tcp {
            flow: 0,
            len: 1368,
            push: false
        };
        100
    ];
    kinds[9] = Kind::Tcp {
        flow: 0,
        len: 1368,
        push: true,
    };
    assert_eq!(counts(&kinds), [10, 47, 43]);
    // Flows interleaved still coalesce, each into its own write.
    let mut kinds = Vec::new();
    for _ in 0..10 {
        kinds.push(Kind::Udp { flow: 0, len: 500 });
        kinds.push(Kind::Tcp {
            flow: 0,
            len: 500,
            push: false,
        });
        kinds.push(Kind::Udp { flow: 2, len: 500 });
        kinds.push(Kind::Tcp {
            flow: 1,
            len: 500,
            push: false,
        });
    }
    assert_eq!(counts(&kinds), [10, 10, 10, 10]);
    // A shorter packet ends its write; one that may not join goes alone, unchanged, and ends
    // the open write of its flow.
    // Flow 0 of UDP or TCP, `len` payload bytes.
    let segment = |udp: bool, len: usize| {
        if udp {
            Kind::Udp { flow: 0, len }
        } else {
            Kind::Tcp {
                flow: 0,
                len,
                push: false,
            }
        }
    };
    let full = |udp: bool| segment(udp, 500);
    let short = |udp: bool| segment(udp, 400);
    for (udp, odd) in [
        (true, Kind::BadChecksum { flow: 0, len: 500 }),
        (true, Kind::NoChecksum { len: 500 }),
        (true, Kind::Fragment { len: 500 }),
        (
            false,
            Kind::TcpOdd {
                flow: 0,
                len: 500,
                odd: 0,
            },
        ),
        (
            false,
            Kind::TcpOdd {
                flow: 0,
                len: 500,
                odd: 1,
            },
        ),
        (
            false,
            Kind::TcpOdd {
                flow: 0,
                len: 500,
                odd: 4,
            },
        ),
    ] {
        let kinds = [
            full(udp),
            full(udp),
            odd.clone(),
            full(udp),
            short(udp),
            full(udp),
        ];
        let originals = packets(&kinds);
        let (writes, _) = run(&originals, BOTH);
        let n: Vec<usize> = writes.iter().map(|w| split(w).len()).collect();
        assert_eq!(n, [2, 1, 2, 1], "{odd:?}");
        assert_eq!(writes[1][VIRTIO_NET_HDR_LEN..], originals[2][..], "{odd:?}");
    }
    // A gap in the sequence, a new acknowledgement number or window starts a new write (which
    // the segments after it join).
    for odd in [2, 3, 5] {
        let kinds = [
            full(false),
            full(false),
            Kind::TcpOdd {
                flow: 0,
                len: 500,
                odd,
            },
            full(false),
        ];
        assert_eq!(counts(&kinds), [2, 2], "odd {odd}");
    }
}
