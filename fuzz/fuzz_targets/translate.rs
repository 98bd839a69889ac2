//! Stateless address translation (global_cidrs) of any bytes a pod or a peer sends, both ways.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshd::dataplane::mss;
use meshd::dataplane::{GlobalCidr, Translation};

/// A whole, unfragmented TCP segment right after the IP header, as `tcp_checksum_ok` reads it.
fn whole_tcp_segment(p: &[u8]) -> bool {
    match p.first().map(|b| b >> 4) {
        Some(4) => {
            let ihl = usize::from(p[0] & 0x0f) * 4;
            p.len() >= ihl + 20 && ihl >= 20 && p[9] == 6 && p[6] & 0x3f == 0 && p[7] == 0
        }
        Some(6) => p.len() >= 60 && p[6] == 6,
        _ => false,
    }
}

fn right_tcp_checksum(p: &[u8]) -> bool {
    whole_tcp_segment(p) && mss::tcp_checksum_ok(p)
}

fuzz_target!(|data: &[u8]| {
    let map = |l: &str, g: &str| GlobalCidr::new(l.parse().unwrap(), g.parse().unwrap()).unwrap();
    let translation = Translation::new(vec![
        map("10.244.0.0/16", "100.82.0.0/16"),
        map("10.96.0.0/12", "100.96.0.0/12"),
        map("fd00:244::/64", "fd00:f2::/64"),
    ])
    .unwrap();
    let mut packet = data.to_vec();
    // A TCP segment whose checksum was right still has a right one, each way.
    let before = right_tcp_checksum(&packet);
    translation.outbound(&mut packet);
    assert!(!before || mss::tcp_checksum_ok(&packet));
    let before = right_tcp_checksum(&packet);
    translation.inbound(&mut packet);
    assert!(!before || mss::tcp_checksum_ok(&packet));
    assert_eq!(packet.len(), data.len());
});
