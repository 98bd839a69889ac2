//! Zero heap allocations per packet in steady state: a counting global allocator watches the
//! hot path (MSS check, translation to and from global ranges, encapsulate, decapsulate with
//! routing and source check).

#[path = "support/pair.rs"]
mod pair;

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
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    round(10_000);
    let allocated = ALLOCATIONS.load(Ordering::Relaxed) - before;
    assert_eq!(allocated, 0, "{allocated} allocations in 10,000 packets");
}
