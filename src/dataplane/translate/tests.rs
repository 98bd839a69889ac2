//! Properties of the translation over generated packets: checksums verify (recomputed from
//! scratch) after translating, and translating back gives the original bytes.

use super::*;
use proptest::prelude::*;
use proptest::strategy::ValueTree;

/// M1's mapping (pods and services, IPv6 pods), and M2's: both clusters use the same local
/// ranges, as a kind cluster left at its defaults does.
fn m1() -> Translation {
    translation(&[
        ("10.244.0.0/16", "100.81.0.0/16"),
        ("10.96.0.0/16", "100.91.0.0/16"),
        ("fd00:244::/64", "fd00:f1::/64"),
    ])
}

fn m2() -> Translation {
    translation(&[
        ("10.244.0.0/16", "100.82.0.0/16"),
        ("10.96.0.0/16", "100.92.0.0/16"),
        ("fd00:244::/64", "fd00:f2::/64"),
    ])
}

fn translation(pairs: &[(&str, &str)]) -> Translation {
    Translation::new(
        pairs
            .iter()
            .map(|(l, g)| GlobalCidr::new(l.parse().unwrap(), g.parse().unwrap()).unwrap())
            .collect(),
    )
    .unwrap()
}

/// The same mapping the other way round: its `inbound` undoes the original's `inbound`, its
/// `outbound` the original's `outbound`.
fn reversed(t: &Translation) -> Translation {
    Translation::new(
        t.cidrs()
            .iter()
            .map(|c| GlobalCidr {
                local: c.global,
                global: c.local,
            })
            .collect(),
    )
    .unwrap()
}

fn sum(data: &[u8], acc: u32) -> u32 {
    crate::dataplane::mss::sum16(data, acc)
}

/// The value a checksum field holds over `data` (with `acc` summed in first).
fn checksum(data: &[u8], acc: u32) -> u16 {
    crate::dataplane::mss::fold(sum(data, acc))
}

fn pseudo(src: &[u8], dst: &[u8], proto: u8, len: usize) -> u32 {
    sum(dst, sum(src, u32::from(proto) + len as u32))
}

/// What a generated packet carries.
#[derive(Debug, Clone)]
enum Body {
    Tcp {
        ports: (u16, u16),
        data: Vec<u8>,
    },
    Udp {
        ports: (u16, u16),
        data: Vec<u8>,
        no_checksum: bool,
    },
    Echo {
        data: Vec<u8>,
    },
    /// An ICMP error quoting `inner` (cut to `keep` bytes when shorter).
    Error {
        inner: Box<Packet>,
        keep: usize,
    },
}

#[derive(Debug, Clone)]
struct Packet {
    v6: bool,
    src: Vec<u8>,
    dst: Vec<u8>,
    body: Body,
}

impl Packet {
    fn proto(&self) -> u8 {
        match (&self.body, self.v6) {
            (Body::Tcp { .. }, _) => TCP,
            (Body::Udp { .. }, _) => UDP,
            (Body::Echo { .. } | Body::Error { .. }, false) => ICMP,
            (Body::Echo { .. } | Body::Error { .. }, true) => ICMPV6,
        }
    }

    /// The transport header and data with a right checksum.
    fn transport(&self) -> Vec<u8> {
        let proto = self.proto();
        let (mut l4, at) = match &self.body {
            Body::Tcp { ports, data } => {
                let mut h = vec![0u8; 20];
                h[0..2].copy_from_slice(&ports.0.to_be_bytes());
                h[2..4].copy_from_slice(&ports.1.to_be_bytes());
                h[4..8].copy_from_slice(&[1, 2, 3, 4]);
                h[12] = 5 << 4;
                h[13] = 0x18;
                h[14] = 0xff;
                h.extend_from_slice(data);
                (h, 16)
            }
            Body::Udp { ports, data, .. } => {
                let mut h = vec![0u8; 8];
                h[0..2].copy_from_slice(&ports.0.to_be_bytes());
                h[2..4].copy_from_slice(&ports.1.to_be_bytes());
                h[4..6].copy_from_slice(&((8 + data.len()) as u16).to_be_bytes());
                h.extend_from_slice(data);
                (h, 6)
            }
            Body::Echo { data } => {
                let mut h = vec![if self.v6 { 128 } else { 8 }, 0, 0, 0, 0, 7, 0, 1];
                h.extend_from_slice(data);
                (h, 2)
            }
            Body::Error { inner, keep } => {
                let mut h = if self.v6 {
                    vec![1, 4, 0, 0, 0, 0, 0, 0]
                } else {
                    vec![3, 3, 0, 0, 0, 0, 0, 0]
                };
                let quoted = inner.bytes();
                h.extend_from_slice(&quoted[..quoted.len().min(*keep)]);
                (h, 2)
            }
        };
        let covers_pseudo = proto != ICMP;
        let start = if covers_pseudo {
            pseudo(&self.src, &self.dst, proto, l4.len())
        } else {
            0
        };
        let mut c = checksum(&l4, start);
        if proto == UDP && c == 0 {
            c = 0xffff;
        }
        if let Body::Udp {
            no_checksum: true, ..
        } = self.body
        {
            if !self.v6 {
                c = 0;
            }
        }
        l4[at..at + 2].copy_from_slice(&c.to_be_bytes());
        l4
    }

    fn bytes(&self) -> Vec<u8> {
        let l4 = self.transport();
        if self.v6 {
            let mut p = vec![0x60, 0, 0, 0];
            p.extend_from_slice(&(l4.len() as u16).to_be_bytes());
            p.extend_from_slice(&[self.proto(), 64]);
            p.extend_from_slice(&self.src);
            p.extend_from_slice(&self.dst);
            p.extend_from_slice(&l4);
            p
        } else {
            let mut p = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, self.proto(), 0, 0];
            p[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
            p.extend_from_slice(&self.src);
            p.extend_from_slice(&self.dst);
            let c = checksum(&p, 0);
            p[10..12].copy_from_slice(&c.to_be_bytes());
            p.extend_from_slice(&l4);
            p
        }
    }
}

/// Checks every checksum of a whole packet from scratch, and those of the packet an ICMP error
/// quotes as far as the quote reaches.
fn verify(p: &[u8]) -> Result<(), String> {
    let v6 = p[0] >> 4 == 6;
    let (start, proto, src, dst) = if v6 {
        (40, p[6], &p[8..24], &p[24..40])
    } else {
        if checksum(&p[..20], 0) != 0 {
            return Err("IPv4 header checksum".into());
        }
        (20, p[9], &p[12..16], &p[16..20])
    };
    let l4 = &p[start..];
    let ok = match proto {
        ICMP => checksum(l4, 0) == 0,
        UDP if !v6 && l4[6..8] == [0, 0] => true,
        _ => checksum(l4, pseudo(src, dst, proto, l4.len())) == 0,
    };
    if !ok {
        return Err(format!("protocol {proto} checksum"));
    }
    let is_error = match proto {
        ICMP => l4[0] == 3,
        ICMPV6 => l4[0] < 128,
        _ => false,
    };
    if is_error {
        verify_quoted(&l4[8..])?;
    }
    Ok(())
}

fn verify_quoted(q: &[u8]) -> Result<(), String> {
    let v6 = q[0] >> 4 == 6;
    let whole = if v6 {
        q.len() >= 40 && usize::from(u16::from_be_bytes([q[4], q[5]])) + 40 == q.len()
    } else {
        if q.len() < 20 {
            return Ok(());
        }
        if checksum(&q[..20], 0) != 0 {
            return Err("quoted IPv4 header checksum".into());
        }
        usize::from(u16::from_be_bytes([q[2], q[3]])) == q.len()
    };
    if whole {
        verify(q).map_err(|e| format!("quoted {e}"))
    } else {
        Ok(())
    }
}

fn address(v6: bool, net: &str) -> impl Strategy<Value = Vec<u8>> {
    let net: IpNet = net.parse().unwrap();
    let len = if v6 { 16 } else { 4 };
    proptest::collection::vec(any::<u8>(), len).prop_map(move |host| {
        let base = match net.network() {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        };
        let prefix = usize::from(net.prefix_len());
        base.iter()
            .zip(&host)
            .enumerate()
            .map(|(i, (b, h))| {
                let bits = prefix.saturating_sub(i * 8).min(8);
                let mask = if bits == 0 { 0 } else { 0xffu8 << (8 - bits) };
                (b & mask) | (h & !mask)
            })
            .collect()
    })
}

fn data() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..300)
}

/// A transport body (no ICMP error).
fn simple_body() -> impl Strategy<Value = Body> {
    prop_oneof![
        (any::<(u16, u16)>(), data()).prop_map(|(ports, data)| Body::Tcp { ports, data }),
        (any::<(u16, u16)>(), data(), any::<bool>()).prop_map(|(ports, data, no_checksum)| {
            Body::Udp {
                ports,
                data,
                no_checksum,
            }
        }),
        data().prop_map(|data| Body::Echo { data }),
    ]
}

/// A packet from `src_net` to `dst_net` that is not an ICMP error.
fn plain_packet(v6: bool, src_net: &'static str, dst_net: &'static str) -> BoxedStrategy<Packet> {
    (address(v6, src_net), address(v6, dst_net), simple_body())
        .prop_map(move |(src, dst, body)| Packet { v6, src, dst, body })
        .boxed()
}

/// A packet from `src_net` to `dst_net`: a plain one, or an ICMP error about a packet that went
/// the other way (from `dst_net` to `src_net`), quoted whole or cut short.
fn packet(v6: bool, src_net: &'static str, dst_net: &'static str) -> BoxedStrategy<Packet> {
    let plain = plain_packet(v6, src_net, dst_net);
    let error = (
        address(v6, src_net),
        address(v6, dst_net),
        simple_body(),
        prop_oneof![Just(usize::MAX), Just(if v6 { 48 } else { 28 }), 1usize..80],
    )
        .prop_map(move |(src, dst, body, keep)| Packet {
            v6,
            src: src.clone(),
            dst: dst.clone(),
            body: Body::Error {
                inner: Box::new(Packet {
                    v6,
                    src: dst,
                    dst: src,
                    body,
                }),
                keep,
            },
        });
    prop_oneof![3 => plain, 1 => error].boxed()
}

/// Cuts an IPv4 packet into two fragments, the first carrying `first` 8-byte units of payload.
fn fragments_v4(p: &[u8], first: usize) -> (Vec<u8>, Vec<u8>) {
    let cut = 20 + (first * 8).min((p.len() - 20) / 8 * 8);
    let mut a = p[..cut].to_vec();
    let mut b = p[..20].to_vec();
    b.extend_from_slice(&p[cut..]);
    a[6] = 0x20;
    a[7] = 0;
    let offset = ((cut - 20) / 8) as u16;
    b[6..8].copy_from_slice(&offset.to_be_bytes());
    for f in [&mut a, &mut b] {
        let len = f.len() as u16;
        f[2..4].copy_from_slice(&len.to_be_bytes());
        f[10..12].fill(0);
        let c = checksum(&f[..20], 0);
        f[10..12].copy_from_slice(&c.to_be_bytes());
    }
    (a, b)
}

/// Puts two IPv4 fragments back together (as the receiver would).
fn reassemble_v4(a: &[u8], b: &[u8]) -> Vec<u8> {
    let mut p = a.to_vec();
    p.extend_from_slice(&b[20..]);
    p[6] = 0x40;
    p[7] = 0;
    let len = p.len() as u16;
    p[2..4].copy_from_slice(&len.to_be_bytes());
    p[10..12].fill(0);
    let c = checksum(&p[..20], 0);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p
}

/// An IPv6 packet with a fragment header in front of its payload, offset `offset` units.
fn fragment_v6(p: &[u8], payload: &[u8], offset: u16, more: bool) -> Vec<u8> {
    let mut f = p[..40].to_vec();
    let next = p[6];
    f[6] = 44;
    f[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    let flags = (offset << 3) | u16::from(more);
    f.extend_from_slice(&[next, 0]);
    f.extend_from_slice(&flags.to_be_bytes());
    f.extend_from_slice(&[0, 0, 0, 9]);
    f.extend_from_slice(payload);
    f
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// A packet leaving M2 (local source; to M1's global range) gets M2's global source, its
    /// checksums verify, and undoing it gives back the original bytes.
    #[test]
    fn outbound_verifies_and_undoes(v6 in any::<bool>(), seed in any::<u64>()) {
        let (src, dst) = if v6 { ("fd00:244::/64", "fd00:f1::/64") } else { ("10.244.0.0/16", "100.81.0.0/16") };
        let p = sample(packet(v6, src, dst), seed);
        let original = p.bytes();
        prop_assert!(verify(&original).is_ok());
        let mut out = original.clone();
        prop_assert!(m2().outbound(&mut out));
        prop_assert_eq!(verify(&out), Ok(()));
        let at = if v6 { 8..24 } else { 12..16 };
        let global = m2().global(ip(&original[at.clone()]));
        prop_assert_eq!(ip(&out[at]), global);
        prop_assert!(reversed(&m2()).outbound(&mut out));
        prop_assert_eq!(out, original);
    }

    /// A packet entering M2 (to its global range) gets its local destination, checksums verify,
    /// and the reverse mapping gives back the original bytes.
    #[test]
    fn inbound_verifies_and_reverses(v6 in any::<bool>(), seed in any::<u64>()) {
        let (src, dst) = if v6 { ("fd00:f1::/64", "fd00:f2::/64") } else { ("100.81.0.0/16", "100.82.0.0/16") };
        let p = sample(packet(v6, src, dst), seed);
        let original = p.bytes();
        let mut inside = original.clone();
        prop_assert!(m2().inbound(&mut inside));
        prop_assert_eq!(verify(&inside), Ok(()));
        let dst_at = if v6 { 24..40 } else { 16..20 };
        let local = ip(&inside[dst_at.clone()]);
        prop_assert!(m2().cidrs().iter().any(|c| c.local.contains(&local)));
        prop_assert!(reversed(&m2()).inbound(&mut inside));
        prop_assert_eq!(inside, original);
    }

    /// From a pod in M1 to a pod in M2 with the very same local address ranges: M1's outbound and
    /// M2's inbound leave a packet whose checksums verify, from M1's global address to M2's local.
    #[test]
    fn across_two_overlapping_clusters(v6 in any::<bool>(), seed in any::<u64>()) {
        let (src, dst) = if v6 { ("fd00:244::/64", "fd00:f2::/64") } else { ("10.244.0.0/16", "100.82.0.0/16") };
        let original = sample(packet(v6, src, dst), seed).bytes();
        let mut p = original.clone();
        prop_assert!(m1().outbound(&mut p));
        prop_assert!(m2().inbound(&mut p));
        prop_assert_eq!(verify(&p), Ok(()));
        let (s, d) = if v6 { (8..24, 24..40) } else { (12..16, 16..20) };
        prop_assert_eq!(ip(&p[s.clone()]), m1().global(ip(&original[s])));
        prop_assert_eq!(m2().global(ip(&p[d.clone()])), ip(&original[d]));
    }

    /// IPv4 fragments translated one by one reassemble into a packet whose checksums verify (the
    /// first fragment holds the transport header, as every real stack sends it; ICMP errors are
    /// never fragmented: they fit the minimum MTU).
    #[test]
    fn ipv4_fragments_translate_alone(seed in any::<u64>(), first in 3usize..40) {
        let p = sample(plain_packet(false, "10.244.0.0/16", "100.81.0.0/16"), seed).bytes();
        prop_assume!(p.len() > 28);
        let (mut a, mut b) = fragments_v4(&p, first);
        prop_assume!(b.len() > 20 && a.len() >= 20 + 24);
        prop_assert!(m2().outbound(&mut a));
        prop_assert!(m2().outbound(&mut b));
        prop_assert_eq!(checksum(&b[..20], 0), 0);
        let whole = reassemble_v4(&a, &b);
        prop_assert_eq!(verify(&whole), Ok(()));
    }

    /// IPv6: a first fragment's transport checksum (over the whole datagram) is adjusted; a later
    /// fragment's payload is left alone.
    #[test]
    fn ipv6_fragments_translate_alone(seed in any::<u64>(), first in 3usize..40) {
        let p = sample(plain_packet(true, "fd00:244::/64", "fd00:f1::/64"), seed).bytes();
        let payload = &p[40..];
        let cut = (first * 8).min(payload.len() / 8 * 8);
        prop_assume!(cut >= 24 && cut < payload.len());
        let mut a = fragment_v6(&p, &payload[..cut], 0, true);
        let mut b = fragment_v6(&p, &payload[cut..], (cut / 8) as u16, false);
        prop_assert!(m2().outbound(&mut a));
        prop_assert!(m2().outbound(&mut b));
        prop_assert_eq!(&b[48..], &payload[cut..]);
        let mut whole = a[..40].to_vec();
        whole[6] = p[6];
        whole[4..6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
        whole.extend_from_slice(&a[48..]);
        whole.extend_from_slice(&b[48..]);
        prop_assert_eq!(verify(&whole), Ok(()));
    }

    /// Whatever bytes arrive, translation neither panics nor reads past the packet.
    #[test]
    fn garbage_never_panics(mut bytes in proptest::collection::vec(any::<u8>(), 0..200), v6 in any::<bool>()) {
        if let Some(first) = bytes.first_mut() {
            *first = if v6 { 0x60 | (*first & 0x0f) } else { 0x40 | (*first & 0x0f) };
        }
        let t = m2();
        let mut b = bytes.clone();
        t.outbound(&mut b);
        t.inbound(&mut b);
        reversed(&t).outbound(&mut b);
        prop_assert_eq!(b.len(), bytes.len());
    }
}

/// One value of `strategy`, picked by `seed` (keeps the properties' inputs small to state).
fn sample<T: std::fmt::Debug>(strategy: impl Strategy<Value = T>, seed: u64) -> T {
    use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &bytes);
    let mut runner = TestRunner::new_with_rng(Config::default(), rng);
    strategy.new_tree(&mut runner).unwrap().current()
}

fn ip(b: &[u8]) -> IpAddr {
    match b.len() {
        4 => IpAddr::from(<[u8; 4]>::try_from(b).unwrap()),
        _ => IpAddr::from(<[u8; 16]>::try_from(b).unwrap()),
    }
}

#[test]
fn addresses_outside_every_range_are_left_alone() {
    let mut p = Packet {
        v6: false,
        src: vec![172, 18, 2, 1],
        dst: vec![100, 81, 3, 10],
        body: Body::Echo { data: vec![1; 10] },
    }
    .bytes();
    let before = p.clone();
    assert!(!m2().outbound(&mut p));
    assert!(!m2().inbound(&mut p));
    assert_eq!(p, before);
    assert!(!Translation::default().outbound(&mut p));
}

#[test]
fn an_icmp_error_from_a_node_address_has_only_its_quote_translated() {
    // M2's gateway answers a packet from M1 (100.81.3.10 -> M2's local 10.244.2.10) with
    // frag-needed from its tunnel address: the quote's destination becomes M2's global.
    let inner = Packet {
        v6: false,
        src: vec![100, 81, 3, 10],
        dst: vec![10, 244, 2, 10],
        body: Body::Udp {
            ports: (4000, 53),
            data: vec![7; 40],
            no_checksum: false,
        },
    };
    let mut p = Packet {
        v6: false,
        src: vec![100, 64, 0, 2],
        dst: vec![100, 81, 3, 10],
        body: Body::Error {
            inner: Box::new(inner),
            keep: 28,
        },
    }
    .bytes();
    assert!(m2().outbound(&mut p));
    assert_eq!(&p[12..16], &[100, 64, 0, 2]);
    assert_eq!(&p[28 + 16..28 + 20], &[100, 82, 2, 10]);
    assert_eq!(verify(&p), Ok(()));
    // At M1 the quote's source (its own global) becomes local again.
    assert!(m1().inbound(&mut p));
    assert_eq!(&p[16..20], &[10, 244, 3, 10]);
    assert_eq!(&p[28 + 12..28 + 16], &[10, 244, 3, 10]);
    assert_eq!(verify(&p), Ok(()));
}

#[test]
fn mappings_are_checked() {
    let n = |s: &str| s.parse::<IpNet>().unwrap();
    assert!(GlobalCidr::new(n("10.244.0.0/16"), n("100.82.0.0/24"))
        .unwrap_err()
        .contains("prefix length"));
    assert!(GlobalCidr::new(n("10.244.0.0/16"), n("fd00::/16"))
        .unwrap_err()
        .contains("families"));
    assert!(GlobalCidr::new(n("10.244.1.0/16"), n("100.82.0.0/16"))
        .unwrap_err()
        .contains("write 10.244.0.0/16"));
    let a = GlobalCidr::new(n("10.244.0.0/16"), n("100.82.0.0/16")).unwrap();
    let b = GlobalCidr::new(n("10.96.0.0/16"), n("100.82.0.0/16")).unwrap();
    assert!(Translation::new(vec![a, b])
        .unwrap_err()
        .contains("overlap"));
    let t = Translation::new(vec![a]).unwrap();
    assert_eq!(t.global_net(n("10.244.0.0/16")), n("100.82.0.0/16"));
    assert_eq!(t.global_net(n("10.244.7.0/24")), n("100.82.7.0/24"));
    assert_eq!(t.global_net(n("10.0.0.0/8")), n("10.0.0.0/8"));
    assert_eq!(
        t.global("10.244.1.2".parse().unwrap()),
        "100.82.1.2".parse::<IpAddr>().unwrap()
    );
}
