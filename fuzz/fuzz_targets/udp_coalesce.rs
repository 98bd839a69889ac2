//! meshd's own coalescing of the UDP datagrams the receive thread writes to the TUN device in
//! one batch (`dataplane::coalesce`): whatever a peer encrypts reaches it once decrypted.
//! Input: length-prefixed packets. Checked: every UDP packet is written exactly once (alone,
//! or as one of a super-packet's segments), every other packet is left in order, and no
//! write is larger than an IP packet can be.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshd::dataplane::coalesce::UdpCoalescer;
use tun_rs::VIRTIO_NET_HDR_LEN;

fn is_udp(p: &[u8]) -> bool {
    match p.first().map(|b| b >> 4) {
        Some(4) => p.len() >= 20 && p[9] == 17,
        Some(6) => p.len() >= 40 && p[6] == 17,
        _ => false,
    }
}

fuzz_target!(|data: &[u8]| {
    let mut bufs: Vec<Vec<u8>> = Vec::new();
    let mut rest = data;
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
    let udp = bufs.iter().filter(|b| is_udp(&b[VIRTIO_NET_HDR_LEN..])).count();
    let others: Vec<Vec<u8>> = bufs
        .iter()
        .filter(|b| !is_udp(&b[VIRTIO_NET_HDR_LEN..]))
        .cloned()
        .collect();
    let mut written = 0;
    let (left, failed) = UdpCoalescer::new(bufs.len()).write_udp(&mut bufs, |w| {
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
    assert_eq!(written, udp, "UDP datagrams in, datagrams written");
    assert_eq!(bufs[..left], others[..], "the rest, in order");
});
