//! The hot path in isolation: encapsulate + decapsulate of 1420-byte packets through meshd's
//! PeerTable (cryptokey routing, peer lookup by index, source check, counters) next to a bare
//! boringtun `Tunn` pair (WireGuard framing and crypto only) and the bare AEAD beneath it.
//! Run: `cargo bench --bench hot_path`.

#[path = "../tests/support/pair.rs"]
mod pair;

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::StaticSecret;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use meshd::dataplane::{Inbound, Outbound};
use meshd::keys::PrivateKey;
use pair::{addr, connected_tables, packet, BUF, PACKET};
use std::hint::black_box;

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

    // The ceiling: ring's ChaCha20-Poly1305 (the AEAD boringtun uses) sealing and opening the
    // same 1420 bytes in place, with no WireGuard framing at all.
    use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};
    let key = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &[7u8; 32]).unwrap());
    let mut buf = pkt.clone();
    let mut counter = 0u64;
    group.bench_function("ring AEAD seal+open", |bench| {
        bench.iter(|| {
            counter += 1;
            let mut nonce = [0u8; 12];
            nonce[4..].copy_from_slice(&counter.to_le_bytes());
            buf.truncate(PACKET);
            key.seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::empty(),
                &mut buf,
            )
            .unwrap();
            let opened = key
                .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut buf)
                .unwrap();
            black_box(opened.len())
        })
    });
    group.finish();
}

criterion_group!(benches, hot_path);
criterion_main!(benches);
