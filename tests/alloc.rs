//! Zero heap allocations per packet in steady state: a counting global allocator watches the
//! hot path (MSS check, translation to and from global ranges, encapsulate, decapsulate with
//! routing and source check) and the coalescing of TCP segments and UDP datagrams for the TUN
//! device.

#[path = "support/pair.rs"]
mod pair;

use meshd::dataplane::coalesce::{Coalescer, Offloads};
use meshd::dataplane::{mss, GlobalCidr, Inbound, Outbound, Translation};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

struct Counting;

thread_local! {
    /// This thread's allocations while it is watched, or `None` when it is not: the test
    /// harness's own threads (they print results while another test runs) never count.
    static ALLOCATIONS: Cell<Option<usize>> = const { Cell::new(None) };
}

fn count() {
    // `try_with`: the allocator also runs while thread-locals are torn down.
    let _ = ALLOCATIONS.try_with(|n| n.set(n.get().map(|n| n + 1)));
}

/// How many allocations this thread makes in `f`.
fn allocations_in(f: impl FnOnce()) -> usize {
    ALLOCATIONS.with(|n| n.set(Some(0)));
    f();
    ALLOCATIONS.with(|n| n.take()).expect("watched")
}

// SAFETY: delegates every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn steady_state_hot_path_allocates_nothing() {
    let (a, b) = pair::connected_tables();
    let mut pkt = pair::packet();
    let (mut out_a, mut out_b) = (vec![0u8; pair::BUF], vec![0u8; pair::BUF]);
    let src = pair::addr("192.0.2.1:51820");
    // A's source range and B's destination range as global ranges (the packet keeps the
    // addresses the tables route by: A translates and takes it back before encrypting).
    let map = |l: &str, g: &str| GlobalCidr::new(l.parse().unwrap(), g.parse().unwrap()).unwrap();
    let a_global = Translation::new(vec![map("10.244.0.0/16", "100.81.0.0/16")]).unwrap();
    let a_back = Translation::new(vec![map("100.81.0.0/16", "10.244.0.0/16")]).unwrap();
    let b_global = Translation::new(vec![map("10.250.0.0/16", "10.245.0.0/16")]).unwrap();
    let mut round = |count: usize| {
        for _ in 0..count {
            mss::clamp_with(&mut pkt, |p| a.mtu_towards(p, 1420));
            assert!(a_global.outbound(&mut pkt) && a_back.outbound(&mut pkt));
            let Outbound::Send(datagram, _) = a.encapsulate(&pkt, &mut out_a) else {
                panic!("encapsulate failed");
            };
            match b.decapsulate(datagram, src, &mut out_b) {
                Inbound::ToTun(p) => {
                    assert_eq!(p.len(), pair::PACKET);
                    assert!(b_global.inbound(p));
                }
                _ => panic!("decapsulate failed"),
            }
        }
    };
    round(100);
    let allocated = allocations_in(|| round(10_000));
    assert_eq!(allocated, 0, "{allocated} allocations in 10,000 packets");
}

/// An IPv4 packet of protocol `proto` whose transport part is `l4` (checksum field at
/// `check`), with right checksums (so that it may be coalesced).
fn ipv4(proto: u8, mut l4: Vec<u8>, check: usize) -> Vec<u8> {
    let mut p = pair::packet();
    p.truncate(20);
    p[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
    p[9] = proto;
    let words = |data: &[u8]| -> u32 {
        data.chunks(2)
            .map(|w| u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
            .sum()
    };
    let fold = |mut sum: u32| {
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    };
    let header = fold(words(&p));
    p[10..12].copy_from_slice(&header.to_be_bytes());
    let sum = words(&p[12..20]) + u32::from(proto) + l4.len() as u32 + words(&l4);
    l4[check..check + 2].copy_from_slice(&fold(sum).to_be_bytes());
    p.extend_from_slice(&l4);
    p
}

/// A UDP datagram of `len` payload bytes.
fn udp_datagram(len: usize) -> Vec<u8> {
    let mut l4 = vec![0x30, 0x39, 0x1f, 0x90, 0, 0, 0, 0];
    l4[4..6].copy_from_slice(&((8 + len) as u16).to_be_bytes());
    l4.resize(8 + len, 0x5a);
    ipv4(17, l4, 6)
}

/// TCP segment `k` of `len` payload bytes of one flow (ACK, consecutive sequence numbers).
fn tcp_segment(k: u32, len: usize) -> Vec<u8> {
    let mut l4 = vec![0x9c, 0x40, 0x14, 0x51];
    l4.extend_from_slice(&(1000 + k * len as u32).to_be_bytes());
    l4.extend_from_slice(&7u32.to_be_bytes());
    l4.extend_from_slice(&[0x50, 0x10, 0x01, 0xf5, 0, 0, 0, 0]);
    l4.resize(20 + len, 0xa5);
    ipv4(6, l4, 16)
}

#[test]
fn coalescing_for_the_tun_device_allocates_nothing() {
    const HDR: usize = tun_rs::VIRTIO_NET_HDR_LEN;
    // Half a batch of 1300-byte datagrams, half of 1368-byte TCP segments of one flow.
    let packets: Vec<Vec<u8>> = (0..128)
        .map(|k| {
            if k < 64 {
                udp_datagram(1300)
            } else {
                tcp_segment(k - 64, 1368)
            }
        })
        .collect();
    let mut bufs: Vec<Vec<u8>> = (0..128)
        .map(|_| Vec::with_capacity(2 * HDR + 65536))
        .collect();
    let mut coalescer = Coalescer::new(bufs.len());
    let offloads = Offloads {
        tcp: true,
        udp: true,
    };
    let mut batch = |count: usize| {
        let mut writes = 0;
        for _ in 0..count {
            for (buf, packet) in bufs.iter_mut().zip(&packets) {
                buf.clear();
                buf.resize(HDR, 0);
                buf.extend_from_slice(packet);
            }
            let (others, failed) = coalescer.write(&mut bufs, offloads, |w| {
                writes += 1;
                Ok(w.len())
            });
            assert_eq!((others, failed), (0, 0));
        }
        writes
    };
    // Four writes: 50 and 14 datagrams, 47 and 17 segments.
    assert_eq!(batch(1), 4);
    let allocated = allocations_in(|| {
        batch(1_000);
    });
    assert_eq!(allocated, 0, "{allocated} allocations in 128,000 packets");
}
