//! Property tests of TUN offload's segmentation as meshd uses it: a TCP super-packet (as the kernel
//! hands it over with TSO) split into MTU-sized segments must give back the payload byte for byte,
//! with valid IPv4 and TCP checksums, contiguous sequence numbers, TCP options on every segment and
//! PSH/FIN only on the last one.
//!
//! The other half, coalescing, is exercised end to end by tests/offload.rs (byte-exact transfers
//! through the lab with offload on): tun-rs keeps its GRO tables private, so it cannot be driven
//! here without a device.

use meshd::dataplane::mss::tcp_checksum_ok;
use proptest::prelude::*;
use tun_rs::{gso_split, VirtioNetHdr, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6};

const NEEDS_CSUM: u8 = 1;
const ACK: u8 = 0x10;
const PSH: u8 = 0x08;
const FIN: u8 = 0x01;

struct SuperPacket {
    bytes: Vec<u8>,
    hdr: VirtioNetHdr,
    ip_len: usize,
    tcp_len: usize,
}

fn super_packet(v6: bool, options: &[u8], flags: u8, payload: &[u8], mss: u16) -> SuperPacket {
    let ip_len = if v6 { 40 } else { 20 };
    let tcp_len = 20 + options.len();
    let total = ip_len + tcp_len + payload.len();
    let mut p = vec![0u8; total];
    if v6 {
        p[0] = 0x60;
        p[4..6].copy_from_slice(&((tcp_len + payload.len()) as u16).to_be_bytes());
        p[6] = 6;
        p[7] = 64;
        p[8..24].copy_from_slice(&[0xfd, 0, 2, 0x44, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10]);
        p[24..40].copy_from_slice(&[0xfd, 0, 2, 0x45, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10]);
    } else {
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[6] = 0x40; // DF
        p[8] = 64;
        p[9] = 6;
        p[12..16].copy_from_slice(&[10, 244, 1, 10]);
        p[16..20].copy_from_slice(&[10, 245, 1, 10]);
    }
    let t = ip_len;
    p[t..t + 2].copy_from_slice(&40000u16.to_be_bytes());
    p[t + 2..t + 4].copy_from_slice(&5201u16.to_be_bytes());
    p[t + 4..t + 8].copy_from_slice(&0xfffff000u32.to_be_bytes()); // wraps within the test
    p[t + 8..t + 12].copy_from_slice(&77u32.to_be_bytes());
    p[t + 12] = ((tcp_len / 4) as u8) << 4;
    p[t + 13] = flags;
    p[t + 14..t + 16].copy_from_slice(&512u16.to_be_bytes());
    p[t + 20..t + tcp_len].copy_from_slice(options);
    p[t + tcp_len..].copy_from_slice(payload);
    let hdr = VirtioNetHdr {
        flags: NEEDS_CSUM,
        gso_type: if v6 {
            VIRTIO_NET_HDR_GSO_TCPV6
        } else {
            VIRTIO_NET_HDR_GSO_TCPV4
        },
        hdr_len: (ip_len + tcp_len) as u16,
        gso_size: mss,
        csum_start: ip_len as u16,
        csum_offset: 16,
    };
    SuperPacket {
        bytes: p,
        hdr,
        ip_len,
        tcp_len,
    }
}

fn ipv4_header_ok(p: &[u8]) -> bool {
    let mut sum: u32 = p[..20]
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum == 0xffff
}

fn options() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(Vec::new()),
        // NOP NOP timestamps (kind 8, len 10)
        any::<[u8; 8]>().prop_map(|ts| {
            let mut o = vec![1, 1, 8, 10];
            o.extend_from_slice(&ts);
            o
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn split_gives_back_the_payload_with_valid_headers(
        v6 in any::<bool>(),
        opts in options(),
        psh in any::<bool>(),
        fin in any::<bool>(),
        payload in proptest::collection::vec(any::<u8>(), 1..20_000),
        mss in 536u16..1400,
    ) {
        let flags = ACK | if psh { PSH } else { 0 } | if fin { FIN } else { 0 };
        let sp = super_packet(v6, &opts, flags, &payload, mss);
        let headers = sp.ip_len + sp.tcp_len;
        let mut input = sp.bytes.clone();
        let mut out = vec![vec![0u8; headers + usize::from(mss) + 64]; 64];
        let mut sizes = vec![0usize; 64];
        let n = gso_split(&mut input, sp.hdr, &mut out, &mut sizes, 0, v6).unwrap();
        prop_assert_eq!(n, payload.len().div_ceil(usize::from(mss)));

        let mut joined = Vec::with_capacity(payload.len());
        let mut expected_seq = 0xfffff000u32;
        for (i, (seg, size)) in out.iter().zip(&sizes).take(n).enumerate() {
            let seg = &seg[..*size];
            let last = i + 1 == n;
            prop_assert!(seg.len() <= headers + usize::from(mss));
            prop_assert!(tcp_checksum_ok(seg), "bad TCP checksum in segment {}", i);
            if !v6 {
                prop_assert!(ipv4_header_ok(seg), "bad IPv4 checksum in segment {}", i);
                prop_assert_eq!(usize::from(u16::from_be_bytes([seg[2], seg[3]])), seg.len());
            } else {
                prop_assert_eq!(usize::from(u16::from_be_bytes([seg[4], seg[5]])), seg.len() - 40);
            }
            let t = sp.ip_len;
            prop_assert_eq!(&seg[t + 20..t + sp.tcp_len], &opts[..], "options lost");
            let seq = u32::from_be_bytes([seg[t + 4], seg[t + 5], seg[t + 6], seg[t + 7]]);
            prop_assert_eq!(seq, expected_seq);
            let seg_flags = seg[t + 13];
            prop_assert_eq!(seg_flags & (PSH | FIN), if last { flags & (PSH | FIN) } else { 0 });
            prop_assert!(seg_flags & ACK != 0);
            let data = &seg[headers..];
            expected_seq = expected_seq.wrapping_add(data.len() as u32);
            joined.extend_from_slice(data);
        }
        prop_assert_eq!(joined, payload);
    }
}
