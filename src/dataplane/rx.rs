//! The receive loop (`meshd-rx`): UDP (batched `recvmmsg`, GRO) → [`PeerTable::decapsulate`] →
//! the delivery check → TUN: each TCP or UDP flow's packets of a batch in one write
//! ([`super::coalesce`]), anything else through tun-rs.

use super::coalesce::{Coalescer, Offloads};
use super::table::{DropReason, Inbound, PeerTable};
use super::udp::{self, UdpPort, RECV_BATCH};
use super::{mss, Dataplane, MAX_PACKET, RECV_WAKEUP, WG_ROOM};
use quinn_udp::RecvMeta;
use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::time::Duration;
use tun_rs::{GROTable, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

impl Dataplane {
    /// UDP → decrypt → TUN, a `recvmmsg` batch (with GRO) at a time, until `port` is replaced.
    /// Decrypted packets collect in a batch that [`Coalescer`] joins (TCP and UDP, per flow) into
    /// super-packets before writing them to the TUN device.
    pub(super) fn rx_loop(&self, port: &UdpPort) {
        let mut storage = vec![vec![0u8; MAX_PACKET]; RECV_BATCH];
        let mut bufs: Vec<IoSliceMut<'_>> =
            storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
        let mut meta = vec![RecvMeta::default(); RECV_BATCH];
        let mut to_tun = TunBatch::new(usize::from(self.mtu));
        // Whether the last receive found the socket empty: then the next one waits first
        // rather than spend a system call finding it still empty.
        let mut drained = false;
        while !port.is_closed() {
            if drained {
                match port.wait(RECV_WAKEUP) {
                    Ok(true) => {}
                    Ok(false) => continue,
                    Err(e) => tracing::warn!(error = %e, "waiting on the UDP port failed"),
                }
            }
            // Wait for the first datagrams, then take whatever else is already queued (without
            // waiting, while batches come back full) so that more segments of a flow meet in one
            // coalescing TUN write.
            let mut wait = RECV_WAKEUP;
            loop {
                let n = match port.recv_batch(&mut bufs, &mut meta, wait) {
                    Ok(n) => n,
                    Err(e) => {
                        tracing::warn!(error = %e, "UDP receive failed");
                        0
                    }
                };
                if n == 0 {
                    drained = true;
                    break;
                }
                if !self.forwarding() {
                    let datagrams = meta.iter().take(n).map(|m| {
                        let stride = if m.stride == 0 { m.len } else { m.stride };
                        m.len.div_ceil(stride.max(1))
                    });
                    self.drops.count_n(DropReason::Standby, datagrams.sum());
                    continue;
                }
                let table = self.table.load();
                for (m, buf) in meta.iter().zip(bufs.iter()).take(n) {
                    let src = udp::canonical(m.addr);
                    let stride = if m.stride == 0 { m.len } else { m.stride };
                    for datagram in buf[..m.len].chunks(stride.max(1)) {
                        self.receive(&table, port, datagram, src, &mut to_tun);
                        if to_tun.is_full() {
                            self.flush_to_tun(&mut to_tun);
                        }
                    }
                }
                // A short batch means the socket was empty.
                drained = n < bufs.len();
                if drained || to_tun.len >= IDEAL_BATCH_SIZE / 2 {
                    break;
                }
                wait = Duration::ZERO;
            }
            self.flush_to_tun(&mut to_tun);
        }
    }

    fn flush_to_tun(&self, batch: &mut TunBatch) {
        let len = std::mem::take(&mut batch.len);
        let others = if self.offload {
            let offloads = Offloads {
                tcp: true,
                udp: self.uso,
            };
            let (others, failed) = batch
                .coalescer
                .write(&mut batch.bufs[..len], offloads, |buf| self.tun.send(buf));
            self.drops.count_n(DropReason::SendFailed, failed);
            others
        } else {
            len
        };
        if others == 0 {
            return;
        }
        match self.tun.send_multiple(
            &mut batch.gro,
            &mut batch.bufs[..others],
            VIRTIO_NET_HDR_LEN,
        ) {
            Ok(bytes) => tracing::trace!(packets = others, bytes, "TUN batch written"),
            Err(e) => {
                self.drops.count(DropReason::SendFailed);
                tracing::trace!(error = %e, "TUN write failed");
            }
        }
    }

    fn receive(
        &self,
        table: &PeerTable,
        port: &UdpPort,
        datagram: &[u8],
        src: SocketAddr,
        to_tun: &mut TunBatch,
    ) {
        let slot = to_tun.next_slot();
        match table.decapsulate(datagram, src, &mut slot[VIRTIO_NET_HDR_LEN..]) {
            Inbound::ToTun(packet) => {
                mss::clamp_with(packet, |p| table.mtu_from(p, self.mtu));
                let len = packet.len();
                to_tun.commit(len);
            }
            Inbound::Reply(reply, peer) => {
                self.send(port, reply, src);
                let out = &mut slot[VIRTIO_NET_HDR_LEN..];
                match peer {
                    Some(peer) => {
                        while let Some(queued) = PeerTable::flush_queued(&peer, out) {
                            self.send(port, queued, src);
                        }
                    }
                    // A cookie reply: the handshake itself was not processed.
                    None => self.drops.count(DropReason::UnderLoad),
                }
            }
            Inbound::Done => {}
            Inbound::Drop(reason) => self.drops.count(reason),
        }
    }
}

/// Decrypted packets waiting for coalescing writes to the TUN device. Each buffer keeps
/// `VIRTIO_NET_HDR_LEN` bytes of headroom; its length is exactly headroom + packet, as tun-rs
/// and [`Coalescer`] expect. Buffers have room for a super-packet from the start
/// (coalescing appends) and are reused.
struct TunBatch {
    bufs: Vec<Vec<u8>>,
    len: usize,
    slot_len: usize,
    gro: GROTable,
    coalescer: Coalescer,
}

impl TunBatch {
    fn new(mtu: usize) -> Self {
        let slot_len = VIRTIO_NET_HDR_LEN + mtu.max(1280) + WG_ROOM;
        // tun-rs coalesces segments into the first buffer of a flow only if it already has room
        // for a whole super-packet: it never reallocates.
        let capacity = 2 * VIRTIO_NET_HDR_LEN + MAX_PACKET;
        let slot = |_| {
            let mut buf = Vec::with_capacity(capacity);
            buf.resize(slot_len, 0);
            buf
        };
        TunBatch {
            bufs: (0..IDEAL_BATCH_SIZE).map(slot).collect(),
            len: 0,
            slot_len,
            gro: GROTable::default(),
            coalescer: Coalescer::new(IDEAL_BATCH_SIZE),
        }
    }

    fn is_full(&self) -> bool {
        self.len == self.bufs.len()
    }

    /// The next free buffer, at its full length for decryption into.
    fn next_slot(&mut self) -> &mut Vec<u8> {
        let slot = &mut self.bufs[self.len];
        slot.resize(self.slot_len, 0);
        slot
    }

    /// Keeps the packet of `len` bytes just decrypted into the next slot.
    fn commit(&mut self, len: usize) {
        self.bufs[self.len].truncate(VIRTIO_NET_HDR_LEN + len);
        self.len += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_keep_headroom_and_never_reallocate_when_coalescing() {
        let mut batch = TunBatch::new(1420);
        assert_eq!(batch.slot_len, VIRTIO_NET_HDR_LEN + 1420 + WG_ROOM);
        // A tiny MTU still gets slots for IPv6's minimum.
        assert_eq!(
            TunBatch::new(500).slot_len,
            VIRTIO_NET_HDR_LEN + 1280 + WG_ROOM
        );
        let before: Vec<*const u8> = batch.bufs.iter().map(|b| b.as_ptr()).collect();
        for len in (0..IDEAL_BATCH_SIZE).map(|i| 60 + i) {
            assert!(!batch.is_full());
            let slot = batch.next_slot();
            assert_eq!(slot.len(), VIRTIO_NET_HDR_LEN + 1420 + WG_ROOM);
            batch.commit(len);
            assert_eq!(batch.bufs[batch.len - 1].len(), VIRTIO_NET_HDR_LEN + len);
        }
        assert!(batch.is_full());
        // Room for a whole super-packet, as tun-rs's GRO needs, without growing.
        for buf in &mut batch.bufs {
            buf.resize(VIRTIO_NET_HDR_LEN + MAX_PACKET, 0);
        }
        let after: Vec<*const u8> = batch.bufs.iter().map(|b| b.as_ptr()).collect();
        assert_eq!(before, after);
    }
}
