//! The hot path in isolation: encapsulate + decapsulate of 1420-byte packets through meshd's
//! PeerTable (cryptokey routing, peer lookup by index, source check, counters) next to a bare
//! boringtun `Tunn` pair doing only the crypto. Run: `cargo bench --bench hot_path`.

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::StaticSecret;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use meshd::dataplane::{Identity, Inbound, Outbound, Peer, PeerTable};
use meshd::keys::PrivateKey;
use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;

const PACKET: usize = 1420;
const BUF: usize = 65536 + 256;

/// An IPv4/UDP packet of `PACKET` bytes from 10.244.1.10 to 10.245.1.10.
fn packet() -> Vec<u8> {
    let mut p = vec![0u8; PACKET];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(PACKET as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&[10, 244, 1, 10]);
    p[16..20].copy_from_slice(&[10, 245, 1, 10]);
    p
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Two peer tables that have completed a handshake with each other.
fn connected_tables() -> (PeerTable, PeerTable) {
    let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());
    let ia = Arc::new(Identity::new(StaticSecret::from(*ka.as_bytes())));
    let ib = Arc::new(Identity::new(StaticSecret::from(*kb.as_bytes())));
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

    // Pump the handshake: A's first packet triggers it; messages bounce until data flows.
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

fn connected_tunns() -> (Tunn, Tunn) {
    let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());
    let mut a = Tunn::new(
        StaticSecret::from(*ka.as_bytes()),
        boringtun::x25519::PublicKey::from(*kb.public_key().as_bytes()),
        None,
        None,
        1,
        None,
    );
    let mut b = Tunn::new(
        StaticSecret::from(*kb.as_bytes()),
        boringtun::x25519::PublicKey::from(*ka.public_key().as_bytes()),
        None,
        None,
        2,
        None,
    );
    let (mut out_a, mut out_b) = (vec![0u8; BUF], vec![0u8; BUF]);
    let TunnResult::WriteToNetwork(init) = a.format_handshake_initiation(&mut out_a, false) else {
        panic!("no initiation");
    };
    let init = init.to_vec();
    let TunnResult::WriteToNetwork(resp) = b.decapsulate(None, &init, &mut out_b) else {
        panic!("no response");
    };
    let resp = resp.to_vec();
    let TunnResult::WriteToNetwork(keepalive) = a.decapsulate(None, &resp, &mut out_a) else {
        panic!("no keepalive");
    };
    let keepalive = keepalive.to_vec();
    let _ = b.decapsulate(None, &keepalive, &mut out_b);
    (a, b)
}

fn hot_path(c: &mut Criterion) {
    let pkt = packet();
    let mut group = c.benchmark_group("encap+decap 1420B");
    group.throughput(Throughput::Bytes(PACKET as u64));

    let (a, b) = connected_tables();
    let (mut out_a, mut out_b) = (vec![0u8; BUF], vec![0u8; BUF]);
    let src = addr("192.0.2.1:51820");
    group.bench_function("meshd PeerTable", |bench| {
        bench.iter(|| {
            let Outbound::Send(datagram, _) = a.encapsulate(black_box(&pkt), &mut out_a) else {
                panic!("encapsulate failed");
            };
            match b.decapsulate(datagram, src, &mut out_b) {
                Inbound::ToTun(p) => black_box(p.len()),
                _ => panic!("decapsulate failed"),
            }
        })
    });

    let (mut ta, mut tb) = connected_tunns();
    group.bench_function("bare boringtun Tunn", |bench| {
        bench.iter(|| {
            let TunnResult::WriteToNetwork(datagram) = ta.encapsulate(black_box(&pkt), &mut out_a)
            else {
                panic!("encapsulate failed");
            };
            match tb.decapsulate(None, datagram, &mut out_b) {
                TunnResult::WriteToTunnelV4(p, _) => black_box(p.len()),
                _ => panic!("decapsulate failed"),
            }
        })
    });
    group.finish();
}

criterion_group!(benches, hot_path);
criterion_main!(benches);
