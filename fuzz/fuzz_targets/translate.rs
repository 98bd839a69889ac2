//! Stateless address translation (global_cidrs) of any bytes a pod or a peer sends, both ways.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshd::dataplane::mss;
use meshd::dataplane::{GlobalCidr, Translation};

fuzz_target!(|data: &[u8]| {
    let map = |l: &str, g: &str| GlobalCidr::new(l.parse().unwrap(), g.parse().unwrap()).unwrap();
    let translation = Translation::new(vec![
        map("10.244.0.0/16", "100.82.0.0/16"),
        map("10.96.0.0/12", "100.80.0.0/12"),
        map("fd00:244::/64", "fd00:f2::/64"),
    ])
    .unwrap();
    let mut packet = data.to_vec();
    let before = mss::tcp_checksum_ok(&packet);
    translation.outbound(&mut packet);
    // A TCP segment whose checksum was right still has a right one, each way.
    if before {
        assert!(mss::tcp_checksum_ok(&packet));
    }
    let before = mss::tcp_checksum_ok(&packet);
    translation.inbound(&mut packet);
    if before {
        assert!(mss::tcp_checksum_ok(&packet));
    }
    translation.undo_outbound(&mut packet);
    assert_eq!(packet.len(), data.len());
});
