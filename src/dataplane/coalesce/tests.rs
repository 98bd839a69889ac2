//! The coalescer over generated batches, checked against a model of the kernel's split
//! (`__udp_gso_segment` and the checksum completion of a `CHECKSUM_PARTIAL` packet): every UDP
//! datagram comes back byte for byte (but for the IPv4 identification of a joined one), in
//! order within its flow; everything else is left, in order, to tun-rs.

use super::*;
use proptest::prelude::*;

/// Room for a whole super-packet, as the receive loop's buffers have.
const CAPACITY: usize = 2 * VIRTIO_NET_HDR_LEN + 65536;

/// What a generated packet is.
#[derive(Debug, Clone)]
enum Kind {
    /// A UDP datagram of flow `flow` (0..3: two IPv4, one IPv6) with `len` payload bytes.
    Udp { flow: u8, len: usize },
    /// The same, with a broken checksum.
    BadChecksum { flow: u8, len: usize },
    /// IPv4 UDP without a checksum (0), which may not join.
    NoChecksum { len: usize },
    /// The first fragment of a fragmented IPv4 UDP datagram.
    Fragment { len: usize },
    /// A TCP segment, left to tun-rs.
    Tcp { len: usize },
}

fn checksum_of(data: &[u8], pseudo: u64) -> u16 {
    fold64(pseudo + sum(data))
}

/// A datagram (IPv4 for flows 0 and 1, IPv6 for flow 2) with a valid checksum; `id` numbers it.
fn udp(flow: u8, len: usize, id: u16) -> Vec<u8> {
    let payload: Vec<u8> = (0..len).map(|i| (i as u16 ^ id) as u8).collect();
    let ports = [0x30, 0x39, 0x1f, 0x90 + flow];
    let mut p = if flow < 2 {
        let mut h = vec![
            0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, UDP, 0, 0, 10, 244, 1, 10, 10, 245, 1, 10,
        ];
        let total = (20 + UDP_HEADER + len) as u16;
        h[2..4].copy_from_slice(&total.to_be_bytes());
        h[4..6].copy_from_slice(&id.to_be_bytes());
        let c = checksum_of(&h, 0);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h
    } else {
        let mut h = vec![0x60, 0, 0, 0, 0, 0, UDP, 64];
        h[4..6].copy_from_slice(&((UDP_HEADER + len) as u16).to_be_bytes());
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
    };
    let ip = p.len();
    p.extend_from_slice(&ports);
    p.extend_from_slice(&((UDP_HEADER + len) as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(&payload);
    let pseudo = if flow < 2 {
        sum(&p[12..20])
    } else {
        sum(&p[8..40])
    };
    let c = checksum_of(
        &p[ip..],
        pseudo + u64::from(UDP) + (UDP_HEADER + len) as u64,
    );
    p[ip + 6..ip + 8].copy_from_slice(&c.to_be_bytes());
    p
}

fn packet(kind: &Kind, id: u16) -> Vec<u8> {
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
            let mut p = udp(1, len, id);
            p[6] |= 0x20;
            p
        }
        Kind::Tcp { len } => {
            let mut p = udp(0, len.max(12), id);
            p[9] = 6;
            p
        }
    }
}

/// The kernel's split of one write, modelled: each datagram's headers are the first's with
/// its lengths, an IPv4 identification counted up and a fresh header checksum; its UDP
/// checksum is the partial value adjusted to its length (as `__udp_gso_segment` does), then
/// completed over the datagram.
fn split(write: &[u8]) -> Vec<Vec<u8>> {
    let (hdr, packet) = write.split_at(VIRTIO_NET_HDR_LEN);
    if hdr[1] == 0 {
        assert!(
            hdr.iter().all(|&b| b == 0),
            "a lone datagram's header is all zero"
        );
        return vec![packet.to_vec()];
    }
    let field = |i: usize| usize::from(u16::from_ne_bytes([hdr[2 + 2 * i], hdr[3 + 2 * i]]));
    let (hdr_len, gso_size, csum_start, csum_offset) = (field(0), field(1), field(2), field(3));
    assert_eq!(
        (hdr[0], hdr[1]),
        (VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_UDP_L4)
    );
    assert_eq!((hdr_len, csum_offset), (csum_start + UDP_HEADER, 6));
    let v4 = packet[0] >> 4 == 4;
    let (headers, payload) = packet.split_at(hdr_len);
    let whole_udp = u16::from_be_bytes([headers[csum_start + 4], headers[csum_start + 5]]);
    assert_eq!(usize::from(whole_udp), packet.len() - csum_start);
    let partial = u16::from_be_bytes([headers[csum_start + 6], headers[csum_start + 7]]);
    let chunks: Vec<&[u8]> = payload.chunks(gso_size).collect();
    assert!(chunks.len() <= MAX_SEGMENTS);
    let mut out = Vec::new();
    for (k, chunk) in chunks.iter().enumerate() {
        let mut d = headers.to_vec();
        d.extend_from_slice(chunk);
        let udp_len = (UDP_HEADER + chunk.len()) as u16;
        if v4 {
            let total = d.len() as u16;
            d[2..4].copy_from_slice(&total.to_be_bytes());
            let id = u16::from_be_bytes([d[4], d[5]]).wrapping_add(k as u16);
            d[4..6].copy_from_slice(&id.to_be_bytes());
            d[10..12].fill(0);
            let c = checksum_of(&d[..20], 0);
            d[10..12].copy_from_slice(&c.to_be_bytes());
        } else {
            d[4..6].copy_from_slice(&udp_len.to_be_bytes());
        }
        d[csum_start + 4..csum_start + 6].copy_from_slice(&udp_len.to_be_bytes());
        // csum16_add(csum16_sub(check, whole_len), segment_len), end-around carry.
        let adjusted = {
            let s = u32::from(partial) + u32::from(!whole_udp) + u32::from(udp_len);
            let s = (s & 0xffff) + (s >> 16);
            ((s & 0xffff) + (s >> 16)) as u16
        };
        d[csum_start + 6..csum_start + 8].copy_from_slice(&adjusted.to_be_bytes());
        let c = checksum_of(&d[csum_start..], 0);
        d[csum_start + 6..csum_start + 8].copy_from_slice(&c.to_be_bytes());
        out.push(d);
    }
    out
}

/// A packet's flow, for order: addresses and ports (the fragment and TCP kinds have their own).
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

/// Packets, each its bytes.
type Packets = Vec<Vec<u8>>;

/// Runs the coalescer over `kinds`; returns the packets made, the writes and the packets left
/// to tun-rs.
fn run(kinds: &[Kind]) -> (Packets, Packets, Packets) {
    let originals: Vec<Vec<u8>> = kinds
        .iter()
        .enumerate()
        .map(|(i, k)| packet(k, i as u16))
        .collect();
    let mut bufs: Vec<Vec<u8>> = originals
        .iter()
        .map(|p| {
            let mut b = Vec::with_capacity(CAPACITY);
            b.resize(VIRTIO_NET_HDR_LEN, 0xee);
            b.extend_from_slice(p);
            b
        })
        .collect();
    let before: Vec<*const u8> = bufs.iter().map(|b| b.as_ptr()).collect();
    let mut writes = Vec::new();
    let mut coalescer = UdpCoalescer::new(bufs.len());
    let (others, failed) = coalescer.write_udp(&mut bufs, |w| {
        writes.push(w.to_vec());
        Ok(w.len())
    });
    assert_eq!(failed, 0);
    let mut after: Vec<*const u8> = bufs.iter().map(|b| b.as_ptr()).collect();
    let mut sorted = before.clone();
    sorted.sort();
    after.sort();
    assert_eq!(sorted, after, "no buffer was reallocated");
    let left = bufs[..others]
        .iter()
        .map(|b| b[VIRTIO_NET_HDR_LEN..].to_vec())
        .collect();
    (originals, writes, left)
}

fn kind() -> impl Strategy<Value = Kind> {
    let flow = 0u8..3;
    prop_oneof![
        8 => (flow.clone(), prop_oneof![Just(1300usize), Just(64), 1usize..1400]).prop_map(|(flow, len)| Kind::Udp { flow, len }),
        1 => (flow, 1usize..200).prop_map(|(flow, len)| Kind::BadChecksum { flow, len }),
        1 => (1usize..200).prop_map(|len| Kind::NoChecksum { len }),
        1 => (1usize..200).prop_map(|len| Kind::Fragment { len }),
        1 => (1usize..200).prop_map(|len| Kind::Tcp { len }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    /// What the kernel splits the writes into is exactly the batch's UDP datagrams, each flow in
    /// its order; the rest is left to tun-rs in its order.
    #[test]
    fn the_split_gives_back_every_datagram_in_flow_order(kinds in prop::collection::vec(kind(), 0..128)) {
        let (originals, writes, left) = run(&kinds);
        let split: Vec<Vec<u8>> = writes.iter().flat_map(|w| split(w)).collect();
        let is_tcp = |k: &Kind| matches!(k, Kind::Tcp { .. });
        let udp: Vec<&Vec<u8>> = originals.iter().zip(&kinds).filter(|(_, k)| !is_tcp(k)).map(|(p, _)| p).collect();
        let tcp: Vec<Vec<u8>> = originals.iter().zip(&kinds).filter(|(_, k)| is_tcp(k)).map(|(p, _)| p.clone()).collect();
        prop_assert_eq!(left, tcp);
        prop_assert_eq!(split.len(), udp.len());
        // Per flow, the same datagrams in the same order.
        let mut flows: std::collections::BTreeMap<Vec<u8>, (Packets, Packets)> = Default::default();
        for p in &udp {
            flows.entry(flow_of(p)).or_default().0.push(sans_id(p));
        }
        for p in &split {
            flows.entry(flow_of(p)).or_default().1.push(sans_id(p));
        }
        for (flow, (sent, got)) in flows {
            prop_assert_eq!(sent, got, "flow {:?}", flow);
        }
    }
}

#[test]
fn a_bulk_flow_leaves_in_few_writes_and_odd_ones_alone() {
    // 100 datagrams of 1300 bytes: as many as fit 65,535 bytes a write (50).
    let kinds = vec![Kind::Udp { flow: 0, len: 1300 }; 100];
    let (_, writes, left) = run(&kinds);
    assert!(left.is_empty());
    let counts: Vec<usize> = writes.iter().map(|w| split(w).len()).collect();
    assert_eq!(counts, [50, 50]);
    // Two flows interleaved still coalesce, each into its own write.
    let mut kinds = Vec::new();
    for _ in 0..10 {
        kinds.push(Kind::Udp { flow: 0, len: 500 });
        kinds.push(Kind::Udp { flow: 2, len: 500 });
    }
    let (_, writes, _) = run(&kinds);
    assert_eq!(
        writes.iter().map(|w| split(w).len()).collect::<Vec<_>>(),
        [10, 10]
    );
    // A shorter datagram ends its write; a bad checksum, a missing one and a fragment go alone,
    // unchanged, and end every open write (order).
    for odd in [
        Kind::BadChecksum { flow: 0, len: 500 },
        Kind::NoChecksum { len: 500 },
        Kind::Fragment { len: 500 },
    ] {
        let kinds = vec![
            Kind::Udp { flow: 0, len: 500 },
            Kind::Udp { flow: 0, len: 500 },
            odd.clone(),
            Kind::Udp { flow: 0, len: 500 },
            Kind::Udp { flow: 0, len: 400 },
            Kind::Udp { flow: 0, len: 500 },
        ];
        let (originals, writes, _) = run(&kinds);
        let counts: Vec<usize> = writes.iter().map(|w| split(w).len()).collect();
        assert_eq!(counts, [2, 1, 2, 1], "{odd:?}");
        assert_eq!(writes[1][VIRTIO_NET_HDR_LEN..], originals[2][..], "{odd:?}");
    }
}
