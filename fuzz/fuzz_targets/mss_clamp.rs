//! TCP MSS clamping of packets in both directions (any bytes a pod or a peer sends).
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshd::dataplane::mss;

fuzz_target!(|data: &[u8]| {
    let Some((&mtu, packet)) = data.split_first() else {
        return;
    };
    let mut packet = packet.to_vec();
    let before = mss::tcp_checksum_ok(&packet);
    let clamped = mss::clamp_with(&mut packet, |_| 1280 + u16::from(mtu));
    // A clamped segment whose checksum was right still has a right one.
    if clamped && before {
        assert!(mss::tcp_checksum_ok(&packet));
    }
});
