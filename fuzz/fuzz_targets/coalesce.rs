//! meshd's own coalescing of the TCP segments and UDP datagrams the receive thread writes to
//! the TUN device in one batch (`dataplane::coalesce`): whatever a peer encrypts reaches it
//! once decrypted. Input: a byte choosing the offloads, then length-prefixed packets. Checked:
//! every TCP or UDP packet taken is written exactly once (alone, or as one of a super-packet's
//! segments), every other packet is left in order, and no write is larger than an IP packet
//! can be.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshd::dataplane::coalesce::{Coalescer, Offloads};
use tun_rs::VIRTIO_NET_HDR_LEN;

fn protocol(p: &[u8]) -> Option<u8> {
    match p.first().map(|b| b >> 4) {
        Some(4) if p.len() >= 20 => Some(p[9]),
        Some(6) if p.len() >= 40 => Some(p[6]),
        _ => None,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&choice, mut rest)) = data.split_first() else {
        return;
    };
    let offloads = Offloads {
        tcp: choice & 1 != 0,
        udp: choice & 2 != 0,
    };
    let taken = |p: &[u8]| match protocol(p) {
        Some(6) => offloads.tcp,
        Some(17) => offloads.udp,
        _ => false,
    };
    let mut bufs: Vec<Vec<u8>> = Vec::new();
    while let Some((len, tail)) = rest.split_first_chunk::<2>() {
        let len = usize::from(u16::from_be_bytes(*len)) % 1500;
        let take = len.min(tail.len());
        // Room to coalesce into, as the dataplane's slots have.
        let mut buf = Vec::with_capacity(2 * VIRTIO_NET_HDR_LEN + 65536);
        buf.resize(VIRTIO_NET_HDR_LEN, 0);
        buf.extend_from_slice(&tail[..take]);
        bufs.push(buf);
        rest = &tail[take..];
        if bufs.len() == 128 {
            break;
        }
    }
    let ours = bufs.iter().filter(|b| taken(&b[VIRTIO_NET_HDR_LEN..])).count();
    let others: Vec<Vec<u8>> = bufs
        .iter()
        .filter(|b| !taken(&b[VIRTIO_NET_HDR_LEN..]))
        .cloned()
        .collect();
    let mut written = 0;
    let (left, failed) = Coalescer::new(bufs.len()).write(&mut bufs, offloads, |w| {
        assert!(w.len() <= VIRTIO_NET_HDR_LEN + 65535, "a write of {} bytes", w.len());
        let (hdr, packet) = w.split_at(VIRTIO_NET_HDR_LEN);
        written += if hdr[1] == 0 {
            1
        } else {
            let at = |i: usize| usize::from(u16::from_ne_bytes([hdr[i], hdr[i + 1]]));
            let (hdr_len, gso_size) = (at(2), at(4));
            assert!(gso_size > 0 && hdr_len <= packet.len());
            (packet.len() - hdr_len).div_ceil(gso_size)
        };
        Ok(w.len())
    });
    assert_eq!(failed, 0);
    assert_eq!(written, ours, "TCP and UDP packets in, packets written");
    assert_eq!(bufs[..left], others[..], "the rest, in order");
});
