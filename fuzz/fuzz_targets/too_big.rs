//! ICMP too-big answers and IPv4 fragmentation of oversized packets read from the TUN device.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshd::dataplane::pmtu::{fragment_v4, too_big_reply, REPLY_MAX};

fuzz_target!(|data: &[u8]| {
    let Some((&mtu, packet)) = data.split_first() else {
        return;
    };
    let mtu = 548 + u16::from(mtu) * 4;
    let mut out = vec![0u8; REPLY_MAX];
    let _ = too_big_reply(packet, mtu, &mut out);
    let mut scratch = vec![0u8; usize::from(mtu)];
    let mut emitted = 0usize;
    let _ = fragment_v4(packet, mtu, &mut scratch, |fragment| {
        assert!(fragment.len() <= usize::from(mtu));
        emitted += fragment.len();
    });
});
