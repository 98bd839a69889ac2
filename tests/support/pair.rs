//! Two meshd peer tables that have completed a WireGuard handshake with each other, in memory:
//! for the hot-path benchmark and the allocation test.

use meshd::dataplane::{Identity, Inbound, Outbound, Peer, PeerTable};
use meshd::keys::PrivateKey;
use std::net::SocketAddr;
use std::sync::Arc;

/// Size of the test packets.
pub const PACKET: usize = 1420;
/// Buffer size for encapsulate/decapsulate output.
pub const BUF: usize = 65536 + 256;

/// An IPv4/UDP packet of `PACKET` bytes from 10.244.1.10 to 10.245.1.10.
pub fn packet() -> Vec<u8> {
    let mut p = vec![0u8; PACKET];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(PACKET as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&[10, 244, 1, 10]);
    p[16..20].copy_from_slice(&[10, 245, 1, 10]);
    p
}

pub fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Tables A (cluster 10.244/16) and B (10.245/16), each holding the other as its peer.
pub fn connected_tables() -> (PeerTable, PeerTable) {
    let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());
    let secret = |k: &PrivateKey| boringtun::x25519::StaticSecret::from(*k.as_bytes());
    let ia = Arc::new(Identity::new(secret(&ka)));
    let ib = Arc::new(Identity::new(secret(&kb)));
    let mut a = PeerTable::new(Some(ia.clone()));
    let mut b = PeerTable::new(Some(ib.clone()));
    let b_on_a = Peer::new(
        kb.public_key(),
        1,
        ia.tunn(&kb.public_key(), None, None, 1),
        Some(addr("192.0.2.2:51820")),
    );
    let a_on_b = Peer::new(
        ka.public_key(),
        2,
        ib.tunn(&ka.public_key(), None, None, 2),
        Some(addr("192.0.2.1:51820")),
    );
    a.insert(Arc::new(b_on_a), &["10.245.0.0/16".parse().unwrap()]);
    b.insert(Arc::new(a_on_b), &["10.244.0.0/16".parse().unwrap()]);

    // A's first packet starts the handshake; messages bounce until data flows.
    let (mut out_a, mut out_b) = (vec![0u8; BUF], vec![0u8; BUF]);
    let pkt = packet();
    for _ in 0..10 {
        let Outbound::Send(msg, _) = a.encapsulate(&pkt, &mut out_a) else {
            panic!("A produced nothing to send");
        };
        if msg.len() == PACKET + 32 {
            return (a, b);
        }
        let msg = msg.to_vec();
        if let Inbound::Reply(reply, _) = b.decapsulate(&msg, addr("192.0.2.1:51820"), &mut out_b) {
            let reply = reply.to_vec();
            let _ = a.decapsulate(&reply, addr("192.0.2.2:51820"), &mut out_a);
        }
    }
    panic!("handshake did not complete");
}
