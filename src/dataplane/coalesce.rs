//! UDP receive offload for the TUN write: the datagrams of one UDP flow in a batch of decrypted
//! packets leave in one write, as a super-packet that the kernel splits again (UDP segmentation
//! offload on the TUN device, `TUN_F_USO4`/`TUN_F_USO6`, Linux ≥ 6.2).
//!
//! Done in place, in the batch's own buffers: each payload is copied once, onto the end of its
//! flow's first datagram, and nothing is allocated per packet (tun-rs's own GRO copies every
//! packet into a new `Vec` first; meshd leaves it only TCP). A datagram joins a super-packet only
//! when the kernel's split gives it back unchanged but for the IPv4 identification: same
//! addresses, ports, TOS/traffic class, TTL/hop limit, DF, flow label; no IPv4 options or
//! IPv6 extension headers; not a fragment; the same length as the first (the last may be
//! shorter, and ends it); a valid, non-zero checksum (the kernel computes one for the whole,
//! which must not turn a bad datagram into a good one). Order within a flow is kept: any UDP
//! datagram that cannot join ends every open super-packet before it is written on its own.

use super::mss::fold;
use tun_rs::VIRTIO_NET_HDR_LEN;

const UDP: u8 = 17;
/// Bytes of the UDP header.
const UDP_HEADER: usize = 8;
/// Segments per super-packet; the kernel takes up to 128 (`UDP_MAX_SEGMENTS`), older ones 64.
const MAX_SEGMENTS: usize = 64;
/// The largest IP packet (its length field).
const MAX_IP_PACKET: usize = 65535;
/// Flows with a super-packet open at once; a batch rarely holds more.
const OPEN_FLOWS: usize = 8;
/// virtio_net_hdr: the kernel completes the checksum at `csum_start + csum_offset`.
const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
/// virtio_net_hdr: UDP segmentation (USO).
const VIRTIO_NET_HDR_GSO_UDP_L4: u8 = 5;

/// A write being built: the slot of its first datagram and what joined it.
#[derive(Clone, Copy, Debug)]
struct Head {
    slot: usize,
    /// The IP header's length (the UDP header follows).
    ip_header: usize,
    /// Payload bytes of each datagram (the first's).
    segment: usize,
    segments: usize,
    /// No more datagrams may join (a shorter one did, or it is full, or it is a lone datagram).
    closed: bool,
}

/// The batch's UDP datagrams, gathered into super-packets; buffers allocated once.
pub struct UdpCoalescer {
    heads: Vec<Head>,
    /// Indices into `heads` of the super-packets still open, one per flow.
    open: Vec<usize>,
    /// Whether each slot of the batch was taken here (written as, or into, a head).
    taken: Vec<bool>,
}

impl UdpCoalescer {
    /// A coalescer for batches of up to `slots` packets.
    pub fn new(slots: usize) -> Self {
        UdpCoalescer {
            heads: Vec::with_capacity(slots),
            open: Vec::with_capacity(OPEN_FLOWS),
            taken: Vec::with_capacity(slots),
        }
    }

    /// Writes the UDP datagrams among `bufs` (each: `VIRTIO_NET_HDR_LEN` bytes of room, then a
    /// packet) with `write`, coalesced, in order within each flow; then moves the other packets,
    /// in their order, to the front of `bufs` and returns how many there are. Returns the
    /// number of writes that failed, too. Every buffer must have the capacity for a whole
    /// super-packet (`VIRTIO_NET_HDR_LEN` + 65,535 bytes), so that joining never reallocates.
    pub fn write_udp(
        &mut self,
        bufs: &mut [Vec<u8>],
        mut write: impl FnMut(&[u8]) -> std::io::Result<usize>,
    ) -> (usize, usize) {
        self.heads.clear();
        self.open.clear();
        self.taken.clear();
        self.taken.resize(bufs.len(), false);
        for slot in 0..bufs.len() {
            let packet = &bufs[slot][VIRTIO_NET_HDR_LEN..];
            if !is_udp(packet) {
                continue;
            }
            self.taken[slot] = true;
            let Some(ip_header) = joinable(packet) else {
                // Written alone, after everything before it in every flow it may belong to.
                self.open.clear();
                self.heads.push(Head {
                    slot,
                    ip_header: 0,
                    segment: 0,
                    segments: 1,
                    closed: true,
                });
                continue;
            };
            let segment = packet.len() - ip_header - UDP_HEADER;
            if let Some(at) = self.joins(bufs, slot, segment) {
                let head = &mut self.heads[self.open[at]];
                let (front, back) = bufs.split_at_mut(slot);
                let payload = &back[0][VIRTIO_NET_HDR_LEN + ip_header + UDP_HEADER..];
                front[head.slot].extend_from_slice(payload);
                head.segments += 1;
                if payload.len() < head.segment || head.segments == MAX_SEGMENTS {
                    head.closed = true;
                    self.open.swap_remove(at);
                }
                continue;
            }
            self.heads.push(Head {
                slot,
                ip_header,
                segment,
                segments: 1,
                closed: false,
            });
            let index = self.heads.len() - 1;
            // The flow's earlier super-packet, if any, is written first and takes no more.
            if let Some(at) = self.open.iter().position(|&h| {
                same_flow(
                    &bufs[self.heads[h].slot][VIRTIO_NET_HDR_LEN..],
                    &bufs[slot][VIRTIO_NET_HDR_LEN..],
                )
            }) {
                self.heads[self.open[at]].closed = true;
                self.open[at] = index;
            } else if self.open.len() < OPEN_FLOWS {
                self.open.push(index);
            } else {
                self.heads[index].closed = true;
            }
        }
        let mut failed = 0;
        for head in &self.heads {
            let buf = &mut bufs[head.slot];
            finish(buf, head);
            if write(buf).is_err() {
                failed += 1;
            }
        }
        let mut others = 0;
        for slot in 0..bufs.len() {
            if !self.taken[slot] {
                bufs.swap(others, slot);
                others += 1;
            }
        }
        (others, failed)
    }

    /// The open super-packet (its index in `open`) the datagram in `slot` can join.
    fn joins(&self, bufs: &[Vec<u8>], slot: usize, segment: usize) -> Option<usize> {
        let packet = &bufs[slot][VIRTIO_NET_HDR_LEN..];
        self.open.iter().position(|&h| {
            let head = &self.heads[h];
            let first = &bufs[head.slot][VIRTIO_NET_HDR_LEN..];
            !head.closed
                && segment <= head.segment
                && first.len() + segment <= MAX_IP_PACKET
                && same_flow(first, packet)
        })
    }
}

/// Whether `packet` is an IPv4 or IPv6 packet whose (first) header says UDP.
fn is_udp(packet: &[u8]) -> bool {
    match packet.first().map(|b| b >> 4) {
        Some(4) => packet.len() >= 20 && packet[9] == UDP,
        Some(6) => packet.len() >= 40 && packet[6] == UDP,
        _ => false,
    }
}

/// The IP header length of a UDP datagram that may join a super-packet (see the module docs),
/// or `None`.
fn joinable(packet: &[u8]) -> Option<usize> {
    let (ip_header, pseudo) = match packet[0] >> 4 {
        4 => {
            let whole = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
            let fragment = u16::from_be_bytes([packet[6], packet[7]]) & 0x3fff;
            if packet[0] & 0x0f != 5 || whole != packet.len() || fragment != 0 {
                return None;
            }
            (20, sum(&packet[12..20]))
        }
        _ => {
            let payload = usize::from(u16::from_be_bytes([packet[4], packet[5]]));
            if payload + 40 != packet.len() {
                return None;
            }
            (40, sum(&packet[8..40]))
        }
    };
    let udp = packet.get(ip_header..).filter(|u| u.len() >= UDP_HEADER)?;
    let length = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
    if length != udp.len() || udp[6..8] == [0, 0] {
        return None;
    }
    let total = pseudo + u64::from(UDP) + udp.len() as u64 + sum(udp);
    (fold64(total) == 0).then_some(ip_header)
}

/// Whether two joinable datagrams belong together: every header field the kernel's split
/// copies from the first to the others is equal.
fn same_flow(a: &[u8], b: &[u8]) -> bool {
    if a[0] >> 4 != b[0] >> 4 {
        return false;
    }
    if a[0] >> 4 == 4 {
        // TOS, DF, TTL, protocol, addresses, ports.
        a[1] == b[1]
            && (a[6] & 0x40) == (b[6] & 0x40)
            && a[8..10] == b[8..10]
            && a[12..24] == b[12..24]
    } else {
        // Traffic class, flow label, next header, hop limit, addresses, ports.
        a[..4] == b[..4] && a[6..8] == b[6..8] && a[8..44] == b[8..44]
    }
}

/// Writes the virtio_net_hdr in front of a head and, for two or more datagrams, the lengths and
/// checksums of the super-packet: the kernel fills in each datagram's UDP checksum from the
/// pseudo-header sum left in the field.
fn finish(buf: &mut [u8], head: &Head) {
    let (hdr, packet) = buf.split_at_mut(VIRTIO_NET_HDR_LEN);
    hdr.fill(0);
    if head.segments < 2 {
        return;
    }
    let ip = head.ip_header;
    let udp_len = packet.len() - ip;
    let pseudo = if packet[0] >> 4 == 4 {
        let total = packet.len() as u16;
        packet[2..4].copy_from_slice(&total.to_be_bytes());
        packet[10..12].fill(0);
        let header = fold64(sum(&packet[..20]));
        packet[10..12].copy_from_slice(&header.to_be_bytes());
        sum(&packet[12..20])
    } else {
        packet[4..6].copy_from_slice(&(udp_len as u16).to_be_bytes());
        sum(&packet[8..40])
    };
    packet[ip + 4..ip + 6].copy_from_slice(&(udp_len as u16).to_be_bytes());
    // The pseudo-header's sum, not complemented: the kernel adds the rest and complements.
    let partial = !fold64(pseudo + u64::from(UDP) + udp_len as u64);
    packet[ip + 6..ip + 8].copy_from_slice(&partial.to_be_bytes());
    hdr[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM;
    hdr[1] = VIRTIO_NET_HDR_GSO_UDP_L4;
    let fields = [
        (ip + UDP_HEADER) as u16,
        head.segment as u16,
        ip as u16,
        6, // the UDP checksum's offset in its header
    ];
    for (i, value) in fields.iter().enumerate() {
        hdr[2 + 2 * i..4 + 2 * i].copy_from_slice(&value.to_ne_bytes());
    }
}

/// One's-complement sum of `data` as big-endian 16-bit words, unfolded: four bytes at a time
/// (the sum of 32-bit words folds to the same 16-bit sum, as 2^16 ≡ 1).
fn sum(data: &[u8]) -> u64 {
    let mut chunks = data.chunks_exact(4);
    let mut acc: u64 = 0;
    for word in &mut chunks {
        acc += u64::from(u32::from_be_bytes([word[0], word[1], word[2], word[3]]));
    }
    let rest = chunks.remainder();
    let mut tail = [0u8; 4];
    tail[..rest.len()].copy_from_slice(rest);
    acc + u64::from(u32::from_be_bytes(tail))
}

/// Folds an unfolded sum and complements it: the value a checksum field holds (0 when a sum
/// over data that includes its own checksum field checks out).
fn fold64(mut acc: u64) -> u16 {
    while acc > 0xffff_ffff {
        acc = (acc & 0xffff_ffff) + (acc >> 32);
    }
    fold(acc as u32)
}

#[cfg(test)]
mod tests;
