//! tun-rs's coalescing (GRO) of the packets the receive thread writes to the TUN device in one
//! batch: whatever a peer encrypts reaches it once decrypted. Input: length-prefixed packets.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tun_rs::{GROTable, VIRTIO_NET_HDR_LEN};

fuzz_target!(|data: &[u8]| {
    let mut bufs: Vec<Vec<u8>> = Vec::new();
    let mut rest = data;
    while let Some((len, tail)) = rest.split_first_chunk::<2>() {
        let len = usize::from(u16::from_be_bytes(*len)) % 1500;
        let take = len.min(tail.len());
        let mut buf = vec![0u8; VIRTIO_NET_HDR_LEN];
        buf.extend_from_slice(&tail[..take]);
        // Room to coalesce into, as the dataplane's slots have.
        buf.reserve(65536);
        bufs.push(buf);
        rest = &tail[take..];
        if bufs.len() == 128 {
            break;
        }
    }
    if bufs.iter().any(|b| b.len() <= VIRTIO_NET_HDR_LEN) {
        return;
    }
    let _ = GROTable::new().apply_gro(&mut bufs, VIRTIO_NET_HDR_LEN, true);
});
