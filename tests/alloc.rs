//! Zero heap allocations per packet in steady state: a counting global allocator watches the
//! hot path (MSS check, translation to and from global ranges, encapsulate, decapsulate with
//! routing and source check) and the coalescing of UDP datagrams for the TUN device.

#[path = "support/pair.rs"]
mod pair;

use meshd::dataplane::coalesce::UdpCoalescer;
use meshd::dataplane::{mss, GlobalCidr, Inbound, Outbound, Translation};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: delegates every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The count is the whole process's: the tests take turns, so that one's set-up is not counted
/// in the other's steady state.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn steady_state_hot_path_allocates_nothing() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
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
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    round(10_000);
    let allocated = ALLOCATIONS.load(Ordering::Relaxed) - before;
    assert_eq!(allocated, 0, "{allocated} allocations in 10,000 packets");
}

/// An IPv4 UDP datagram of `len` payload bytes with a right checksum (so that it may be
/// coalesced).
fn udp_datagram(len: usize) -> Vec<u8> {
    let mut p = pair::packet();
    p.resize(28 + len, 0x5a);
    p[2..4].copy_from_slice(&((28 + len) as u16).to_be_bytes());
    p[20..24].copy_from_slice(&[0x30, 0x39, 0x1f, 0x90]);
    p[24..26].copy_from_slice(&((8 + len) as u16).to_be_bytes());
    let words = |data: &[u8]| -> u32 {
        data.chunks(2)
            .map(|w| u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
            .sum()
    };
    let mut sum = words(&p[12..20]) + 17 + (8 + len) as u32 + words(&p[20..]);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    p[26..28].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    p
}

#[test]
fn coalescing_udp_for_the_tun_device_allocates_nothing() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    const HDR: usize = tun_rs::VIRTIO_NET_HDR_LEN;
    let datagram = udp_datagram(1300);
    let mut bufs: Vec<Vec<u8>> = (0..128)
        .map(|_| Vec::with_capacity(2 * HDR + 65536))
        .collect();
    let mut coalescer = UdpCoalescer::new(bufs.len());
    let mut batch = |count: usize| {
        let mut writes = 0;
        for _ in 0..count {
            for buf in &mut bufs {
                buf.clear();
                buf.resize(HDR, 0);
                buf.extend_from_slice(&datagram);
            }
            let (others, failed) = coalescer.write_udp(&mut bufs, |w| {
                writes += 1;
                Ok(w.len())
            });
            assert_eq!((others, failed), (0, 0));
        }
        writes
    };
    // 128 datagrams of 1300 bytes: three writes (50, 50 and 28 datagrams).
    assert_eq!(batch(1), 3);
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    batch(1_000);
    let allocated = ALLOCATIONS.load(Ordering::Relaxed) - before;
    assert_eq!(allocated, 0, "{allocated} allocations in 128,000 datagrams");
}
