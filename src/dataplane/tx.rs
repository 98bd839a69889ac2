//! The transmit loop (`meshd-tx`, one per TUN queue): TUN (TSO super-packets) → segment →
//! [`PeerTable::encapsulate`] → UDP, in GSO runs; packets too big for the path answered with ICMP
//! or fragmented.

use super::pmtu::{self, Oversized};
use super::table::{DropReason, Outbound, PeerTable};
use super::udp::{self, UdpPort};
use super::{mss, Dataplane, MAX_PACKET, RECV_WAKEUP, SEGMENTS_PER_READ, WG_ROOM};
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use tun_rs::{SyncDevice, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

impl Dataplane {
    /// Reads from the (non-blocking) TUN device into `bufs`: waits for the first packet, then
    /// takes what else is already queued while a whole super-packet's segments still fit.
    /// Returns how many slots were filled.
    fn read_tun_batch(
        &self,
        queue: &SyncDevice,
        original: &mut [u8],
        bufs: &mut [Vec<u8>],
        sizes: &mut [usize],
    ) -> usize {
        let mut filled = 0;
        while bufs.len() - filled >= SEGMENTS_PER_READ {
            match queue.recv_multiple(
                original,
                &mut bufs[filled..],
                &mut sizes[filled..],
                VIRTIO_NET_HDR_LEN,
            ) {
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if filled > 0 {
                        break;
                    }
                    if let Err(e) = udp::poll_fd(queue.as_raw_fd(), libc::POLLIN, RECV_WAKEUP) {
                        tracing::error!(error = %e, "waiting on the TUN device failed; the dataplane stops");
                        std::process::exit(1);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.raw_os_error() == Some(libc::EBADFD) => {
                    tracing::error!(error = %e, "the TUN device is gone; the dataplane stops");
                    std::process::exit(1);
                }
                Err(e) => {
                    self.drops.count(DropReason::Garbage);
                    tracing::debug!(error = %e, "unusable read from the TUN device");
                }
            }
        }
        filled
    }

    /// TUN → encrypt → UDP. With offload, one read yields a TCP super-packet that tun-rs splits
    /// into MTU-sized segments; a batch gathers what is queued, each packet is encrypted straight
    /// into a contiguous buffer, and runs of equal-sized datagrams to the same endpoint leave in
    /// one `sendmsg` with UDP GSO.
    pub(super) fn tx_loop(&self, queue: &SyncDevice) {
        let mut original = vec![0u8; VIRTIO_NET_HDR_LEN + MAX_PACKET];
        let mut bufs = vec![vec![0u8; VIRTIO_NET_HDR_LEN + MAX_PACKET]; IDEAL_BATCH_SIZE];
        let mut sizes = vec![0usize; IDEAL_BATCH_SIZE];
        let mut out = vec![0u8; IDEAL_BATCH_SIZE * (usize::from(self.mtu) + WG_ROOM) + MAX_PACKET];
        let mut runs: Vec<GsoRun> = Vec::with_capacity(IDEAL_BATCH_SIZE);
        let mut scratch = OversizedScratch {
            reply: vec![0u8; VIRTIO_NET_HDR_LEN + pmtu::REPLY_MAX],
            fragment: vec![0u8; MAX_PACKET],
        };
        loop {
            let n = self.read_tun_batch(queue, &mut original, &mut bufs, &mut sizes);
            if !self.forwarding() {
                self.drops.count_n(DropReason::Standby, n);
                continue;
            }
            let table = self.table.load();
            let port = self.udp.load();
            let segments = self.max_segments();
            let gso = segments > 1;
            let mut batch = Batch::new(&mut out, &mut runs, segments);
            for (buf, size) in bufs.iter_mut().zip(&sizes).take(n) {
                let packet = &mut buf[VIRTIO_NET_HDR_LEN..VIRTIO_NET_HDR_LEN + size];
                mss::clamp_with(packet, |p| table.mtu_towards(p, self.mtu));
                table.translate_outbound(packet);
                match table.encapsulate(packet, batch.room()) {
                    Outbound::Send(datagram, to) => {
                        let len = datagram.len();
                        batch.push(len, to);
                    }
                    Outbound::TooBig(limit) => {
                        self.oversized(queue, &table, packet, limit, &mut scratch, &mut batch)
                    }
                    Outbound::Queued => {}
                    Outbound::Drop(reason) => self.drops.count(reason),
                }
            }
            batch.finish();
            if gso {
                for run in &runs {
                    self.send_run(&port, &out, run);
                }
            } else {
                self.send_singles(&port, &out, &runs);
            }
        }
    }

    /// Answers a packet larger than `limit`, the path to its peer (see [`pmtu`]): an ICMP too-big
    /// back into the TUN device, or, for IPv4 without DF, its fragments into the batch.
    fn oversized(
        &self,
        queue: &SyncDevice,
        table: &PeerTable,
        packet: &[u8],
        limit: u16,
        scratch: &mut OversizedScratch,
        batch: &mut Batch<'_>,
    ) {
        match pmtu::too_big_reply(packet, limit, &mut scratch.reply[VIRTIO_NET_HDR_LEN..]) {
            Oversized::Reply(len) => {
                self.drops.count(DropReason::TooBig);
                table.translate_reply(&mut scratch.reply[VIRTIO_NET_HDR_LEN..][..len]);
                self.write_reply(queue, &mut scratch.reply, len);
            }
            Oversized::Fragment => {
                let cut = pmtu::fragment_v4(packet, limit, &mut scratch.fragment, |piece| {
                    self.encapsulate_fragment(table, piece, batch)
                });
                if cut.is_none() {
                    self.drops.count(DropReason::TooBig);
                }
            }
            Oversized::Drop => self.drops.count(DropReason::TooBig),
        }
    }

    /// Encrypts one fragment of an oversized IPv4 packet into the batch, if there is room left.
    fn encapsulate_fragment(&self, table: &PeerTable, piece: &[u8], batch: &mut Batch<'_>) {
        if batch.room().len() < piece.len() + WG_ROOM {
            self.drops.count(DropReason::TooBig);
            return;
        }
        match table.encapsulate(piece, batch.room()) {
            Outbound::Send(datagram, to) => {
                let len = datagram.len();
                batch.push(len, to);
            }
            Outbound::Queued => {}
            Outbound::TooBig(_) => self.drops.count(DropReason::TooBig),
            Outbound::Drop(reason) => self.drops.count(reason),
        }
    }

    /// Writes an ICMP answer (after `VIRTIO_NET_HDR_LEN` bytes of room in `buf`) to the TUN device.
    fn write_reply(&self, queue: &SyncDevice, buf: &mut [u8], len: usize) {
        let start = if self.offload {
            buf[..VIRTIO_NET_HDR_LEN].fill(0);
            0
        } else {
            VIRTIO_NET_HDR_LEN
        };
        if let Err(e) = queue.send(&buf[start..VIRTIO_NET_HDR_LEN + len]) {
            tracing::trace!(error = %e, "writing an ICMP too-big to the TUN device failed");
        }
    }

    /// Sends runs of one datagram each with `sendmmsg`, 64 at a time (no UDP GSO).
    fn send_singles(&self, port: &UdpPort, out: &[u8], runs: &[GsoRun]) {
        let unspecified = SocketAddr::from(([0, 0, 0, 0], 0));
        let mut chunk: [(&[u8], SocketAddr); udp::SEND_BATCH] =
            [(&[], unspecified); udp::SEND_BATCH];
        for group in runs.chunks(udp::SEND_BATCH) {
            for (slot, run) in chunk.iter_mut().zip(group) {
                *slot = (
                    &out[run.start..run.start + run.bytes],
                    run.to.unwrap_or(unspecified),
                );
            }
            let (sent, result) = port.send_many(&chunk[..group.len()]);
            if let Err(e) = result {
                for _ in sent..group.len() {
                    self.drops.count(DropReason::SendFailed);
                }
                tracing::trace!(error = %e, "sendmmsg failed");
            }
        }
    }

    fn send_run(&self, port: &UdpPort, out: &[u8], run: &GsoRun) {
        if let Some(to) = run.to {
            let contents = &out[run.start..run.start + run.bytes];
            if let Err(e) = port.send_segments(contents, run.segment, to) {
                for _ in 0..run.count {
                    self.drops.count(DropReason::SendFailed);
                }
                tracing::trace!(error = %e, to = %to, "send failed");
            }
        }
    }
}

/// A run of encrypted datagrams in the output buffer that can leave in one GSO `sendmsg`:
/// same destination, same size (the last may be shorter), within the kernel's limits.
#[derive(Clone, Copy)]
struct GsoRun {
    max_segments: usize,
    start: usize,
    bytes: usize,
    segment: usize,
    count: usize,
    to: Option<SocketAddr>,
}

/// The transmit thread's output buffer as it fills: encrypted datagrams back to back from
/// `out[0]` to `out[pos]`, grouped into runs that can leave in one send each.
struct Batch<'a> {
    out: &'a mut [u8],
    pos: usize,
    run: GsoRun,
    runs: &'a mut Vec<GsoRun>,
}

impl<'a> Batch<'a> {
    /// An empty batch over `out`, collecting its runs (of at most `max_segments`) in `runs`.
    fn new(out: &'a mut [u8], runs: &'a mut Vec<GsoRun>, max_segments: usize) -> Self {
        runs.clear();
        Batch {
            out,
            pos: 0,
            run: GsoRun::new(max_segments),
            runs,
        }
    }

    /// Where the next datagram goes.
    fn room(&mut self) -> &mut [u8] {
        &mut self.out[self.pos..]
    }

    /// Takes the `len`-byte datagram just written at `room()`, for `to`.
    fn push(&mut self, len: usize, to: SocketAddr) {
        if !self.run.admits(len, to) {
            self.runs.push(self.run);
            self.run.restart(self.pos);
        }
        self.run.push(len, to);
        self.pos += len;
    }

    /// Closes the last run.
    fn finish(self) {
        if self.run.to.is_some() {
            self.runs.push(self.run);
        }
    }
}

/// Buffers for answering oversized packets, allocated once per transmit thread.
struct OversizedScratch {
    /// An ICMP answer, after room for a virtio_net_hdr.
    reply: Vec<u8>,
    /// One fragment at a time.
    fragment: Vec<u8>,
}

/// The most UDP payload one GSO send may carry.
const GSO_MAX_BYTES: usize = 65000;

impl GsoRun {
    fn new(max_segments: usize) -> Self {
        GsoRun {
            max_segments: max_segments.max(1),
            start: 0,
            bytes: 0,
            segment: 0,
            count: 0,
            to: None,
        }
    }

    /// Whether a datagram of `len` bytes to `to` can join this run.
    fn admits(&self, len: usize, to: SocketAddr) -> bool {
        match self.to {
            None => true,
            Some(dst) => {
                dst == to
                    && len <= self.segment
                    && self.bytes == self.count * self.segment
                    && self.count < self.max_segments
                    && self.bytes + len <= GSO_MAX_BYTES
            }
        }
    }

    fn push(&mut self, len: usize, to: SocketAddr) {
        if self.to.is_none() {
            self.segment = len;
            self.to = Some(to);
        }
        self.bytes += len;
        self.count += 1;
    }

    fn restart(&mut self, start: usize) {
        *self = GsoRun {
            start,
            ..GsoRun::new(self.max_segments)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "192.0.2.2:51820";
    const B: &str = "192.0.2.3:51820";

    /// Pushes datagrams of the given sizes and destinations into a batch, each filled with its
    /// index, and returns the runs as (start, bytes, segment, count, destination).
    fn runs(
        max_segments: usize,
        datagrams: &[(usize, &str)],
    ) -> Vec<(usize, usize, usize, usize, SocketAddr)> {
        let mut out = vec![0u8; 1 << 20];
        let mut runs = vec![GsoRun::new(1)];
        let mut batch = Batch::new(&mut out, &mut runs, max_segments);
        for (i, (len, to)) in datagrams.iter().enumerate() {
            batch.room()[..*len].fill(i as u8);
            batch.push(*len, to.parse().unwrap());
        }
        batch.finish();
        runs.iter()
            .map(|r| (r.start, r.bytes, r.segment, r.count, r.to.unwrap()))
            .collect()
    }

    #[test]
    fn equal_datagrams_to_one_peer_leave_in_one_run_up_to_its_limit() {
        let a: SocketAddr = A.parse().unwrap();
        assert_eq!(runs(64, &[(1000, A); 3]), [(0, 3000, 1000, 3, a)]);
        // max_segments caps a run; the next starts where the last ended.
        assert_eq!(
            runs(2, &[(1000, A); 5]),
            [
                (0, 2000, 1000, 2, a),
                (2000, 2000, 1000, 2, a),
                (4000, 1000, 1000, 1, a)
            ]
        );
        // And so does the most a GSO send may carry (65,000 bytes).
        let r = runs(1000, &[(1500, A); 50]);
        assert_eq!(r.iter().map(|r| r.3).collect::<Vec<_>>(), [43, 7]);
        assert!(r.iter().all(|r| r.1 <= GSO_MAX_BYTES));
    }

    #[test]
    fn a_shorter_datagram_ends_a_run_and_other_sizes_or_peers_start_one() {
        let (a, b): (SocketAddr, SocketAddr) = (A.parse().unwrap(), B.parse().unwrap());
        assert_eq!(
            runs(
                64,
                &[
                    (1000, A),
                    (1000, A),
                    (400, A),
                    (1000, A),
                    (1200, A),
                    (1200, B)
                ]
            ),
            [
                (0, 2400, 1000, 3, a),
                (2400, 1000, 1000, 1, a),
                (3400, 1200, 1200, 1, a),
                (4600, 1200, 1200, 1, b)
            ]
        );
        // After the short last one, not even a datagram of the same short size may join.
        assert_eq!(
            runs(64, &[(1000, A), (400, A), (400, A)]),
            [(0, 1400, 1000, 2, a), (1400, 400, 400, 1, a)]
        );
        assert!(runs(64, &[]).is_empty());
    }

    #[test]
    fn each_run_covers_exactly_its_own_datagrams() {
        let sizes = [(700, A), (700, A), (300, A), (900, B), (900, B), (100, A)];
        let mut out = vec![0u8; 1 << 16];
        let mut list = Vec::new();
        let mut batch = Batch::new(&mut out, &mut list, 64);
        for (i, (len, to)) in sizes.iter().enumerate() {
            batch.room()[..*len].fill(i as u8 + 1);
            batch.push(*len, to.parse().unwrap());
        }
        batch.finish();
        let mut next = 0;
        let mut index = 0u8;
        for run in &list {
            assert_eq!(run.start, next, "runs are back to back");
            let mut offset = run.start;
            for k in 0..run.count {
                let len = if k + 1 < run.count {
                    run.segment
                } else {
                    run.start + run.bytes - offset
                };
                index += 1;
                assert!(out[offset..offset + len].iter().all(|&b| b == index));
                offset += len;
            }
            next = run.start + run.bytes;
        }
        assert_eq!(usize::from(index), sizes.len());
    }
}
