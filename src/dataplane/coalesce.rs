//! Receive offload for the TUN write: the segments of one TCP flow, and the datagrams of one UDP
//! flow, in a batch of decrypted packets leave in one write, as a super-packet that the kernel
//! splits again (TSO, and USO: `TUN_F_USO4`/`TUN_F_USO6`, Linux ≥ 6.2).
//!
//! Done in place, in the batch's own buffers: each payload is copied once, onto the end of its
//! flow's first packet, and nothing is allocated per packet (tun-rs's GRO, which meshd used
//! before, copies every packet into a new `Vec` first; it now gets only what is neither). A
//! packet joins a super-packet only when the kernel's split gives it back unchanged but for the
//! IPv4 identification:
//! - both: same addresses, ports, TOS/traffic class, TTL/hop limit, DF, flow label; no IPv4
//!   options or IPv6 extension headers; not a fragment; a payload no longer than the first's
//!   (a shorter one is the last); a right checksum (the kernel computes one for the whole,
//!   which must not turn a bad packet into a good one);
//! - UDP: a checksum that is not 0 (none);
//! - TCP: the next sequence number; the same acknowledgement, window, header length and
//!   options; flags ACK, or ACK and PSH (PSH is the last: the kernel puts it on the last
//!   segment only); a payload (a bare ACK goes alone).
//!
//! Order within a flow is kept: a packet that cannot join ends every open super-packet between
//! the same two addresses (every open one, when it is not TCP or UDP we can read) before it is
//! written on its own.

use super::mss::{fold_wide, sum_wide};
use tun_rs::VIRTIO_NET_HDR_LEN;

const TCP: u8 = 6;
const UDP: u8 = 17;
/// Bytes of the UDP header.
const UDP_HEADER: usize = 8;
/// TCP flags.
const ACK: u8 = 0x10;
const PSH: u8 = 0x08;
/// Segments per super-packet; the kernel takes up to 128 (`UDP_MAX_SEGMENTS`), older ones 64.
const MAX_SEGMENTS: usize = 64;
/// The largest IP packet (its length field).
const MAX_IP_PACKET: usize = 65535;
/// Flows with a super-packet open at once; a batch rarely holds more.
const OPEN_FLOWS: usize = 8;
/// virtio_net_hdr: the kernel completes the checksum at `csum_start + csum_offset`.
const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
/// virtio_net_hdr GSO types: TCP over IPv4, TCP over IPv6, UDP (USO).
const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;
const VIRTIO_NET_HDR_GSO_TCPV6: u8 = 4;
const VIRTIO_NET_HDR_GSO_UDP_L4: u8 = 5;

/// What the coalescer takes from a batch.
#[derive(Clone, Copy, Debug)]
pub struct Offloads {
    /// TCP segments (the TUN device takes TSO super-packets: offload on).
    pub tcp: bool,
    /// UDP datagrams (the TUN device takes USO super-packets: Linux ≥ 6.2).
    pub udp: bool,
}

/// A packet that may join, or start, a super-packet.
#[derive(Clone, Copy, Debug)]
struct Joinable {
    proto: u8,
    ip_header: usize,
    /// IP and transport headers together.
    headers: usize,
    payload: usize,
    /// TCP: the sequence number.
    seq: u32,
    /// TCP: PSH is set (it must be the last).
    push: bool,
}

/// A write being built: the slot of its first packet and what joined it.
#[derive(Clone, Copy, Debug)]
struct Head {
    slot: usize,
    /// The first packet's headers, or `None` for a packet written alone as it is.
    first: Option<Joinable>,
    segments: usize,
    /// TCP: the sequence number the next segment must have.
    next_seq: u32,
    /// TCP: the last segment joined had PSH.
    push: bool,
}

/// The batch's TCP segments and UDP datagrams, gathered into super-packets; buffers allocated
/// once.
pub struct Coalescer {
    heads: Vec<Head>,
    /// Indices into `heads` of the super-packets still open (more may join), one per flow; a
    /// head leaves it when a shorter packet, PSH or a packet it cannot take ends it.
    open: Vec<usize>,
    /// Whether each slot of the batch was taken here (written as, or into, a head).
    taken: Vec<bool>,
}

impl Coalescer {
    /// A coalescer for batches of up to `slots` packets.
    pub fn new(slots: usize) -> Self {
        Coalescer {
            heads: Vec::with_capacity(slots),
            open: Vec::with_capacity(OPEN_FLOWS),
            taken: Vec::with_capacity(slots),
        }
    }

    /// Writes the TCP segments and UDP datagrams among `bufs` (each: `VIRTIO_NET_HDR_LEN` bytes
    /// of room, then a packet) that `offloads` names with `write`, coalesced, in order within
    /// each flow; then moves the other packets, in their order, to the front of `bufs`.
    /// Returns how many others there are, and how many packets were in writes that failed. Every buffer must have
    /// the capacity for a whole super-packet (`VIRTIO_NET_HDR_LEN` + 65,535 bytes), so that
    /// joining never reallocates.
    pub fn write(
        &mut self,
        bufs: &mut [Vec<u8>],
        offloads: Offloads,
        mut write: impl FnMut(&[u8]) -> std::io::Result<usize>,
    ) -> (usize, usize) {
        self.heads.clear();
        self.open.clear();
        self.taken.clear();
        self.taken.resize(bufs.len(), false);
        for slot in 0..bufs.len() {
            let packet = &bufs[slot][VIRTIO_NET_HDR_LEN..];
            match protocol(packet) {
                Some(TCP) if offloads.tcp => {}
                Some(UDP) if offloads.udp => {}
                _ => continue,
            }
            self.taken[slot] = true;
            let Some(this) = joinable(packet) else {
                // Written alone, after everything before it in its flow.
                self.end_flows_of(bufs, slot, ports_at(packet));
                self.heads.push(Head {
                    slot,
                    first: None,
                    segments: 1,
                    next_seq: 0,
                    push: false,
                });
                continue;
            };
            if let Some(at) = self.joins(bufs, slot, &this) {
                let head = &mut self.heads[self.open[at]];
                let Some(first) = head.first else {
                    unreachable!("only heads with headers are open")
                };
                let (front, back) = bufs.split_at_mut(slot);
                let payload = &back[0][VIRTIO_NET_HDR_LEN + this.headers..];
                front[head.slot].extend_from_slice(payload);
                head.segments += 1;
                head.next_seq = head.next_seq.wrapping_add(this.payload as u32);
                head.push = this.push;
                if this.payload < first.payload || this.push || head.segments == MAX_SEGMENTS {
                    self.open.swap_remove(at);
                }
                continue;
            }
            // The flow's earlier super-packet, if any, is written first and takes no more.
            self.end_flows_of(bufs, slot, Some(this.ip_header));
            self.heads.push(Head {
                slot,
                first: Some(this),
                segments: 1,
                next_seq: this.seq.wrapping_add(this.payload as u32),
                push: this.push,
            });
            if !this.push && self.open.len() < OPEN_FLOWS {
                self.open.push(self.heads.len() - 1);
            }
        }
        let mut failed = 0;
        for head in &self.heads {
            let buf = &mut bufs[head.slot];
            finish(buf, head);
            if write(buf).is_err() {
                failed += head.segments;
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

    /// Closes the open super-packets the packet in `slot` may share a flow with: those between
    /// the same two addresses with the same protocol and, when its ports are there to read
    /// (after `ip_header` bytes), the same ports.
    fn end_flows_of(&mut self, bufs: &[Vec<u8>], slot: usize, ip_header: Option<usize>) {
        let packet = &bufs[slot][VIRTIO_NET_HDR_LEN..];
        let heads = &self.heads;
        self.open.retain(|&h| {
            let built = &bufs[heads[h].slot][VIRTIO_NET_HDR_LEN..];
            let same_ports = match (heads[h].first, ip_header) {
                (Some(first), Some(ip)) => {
                    built[first.ip_header..first.ip_header + 4] == packet[ip..ip + 4]
                }
                _ => true,
            };
            !(same_addresses(built, packet) && same_ports)
        });
    }

    /// The open super-packet (its index in `open`) the packet in `slot` can join.
    fn joins(&self, bufs: &[Vec<u8>], slot: usize, this: &Joinable) -> Option<usize> {
        let packet = &bufs[slot][VIRTIO_NET_HDR_LEN..];
        self.open.iter().position(|&h| {
            let head = &self.heads[h];
            let Some(first) = head.first else {
                return false;
            };
            let built = &bufs[head.slot][VIRTIO_NET_HDR_LEN..];
            first.proto == this.proto
                && this.payload <= first.payload
                && built.len() + this.payload <= MAX_IP_PACKET
                && (this.proto != TCP || this.seq == head.next_seq)
                && same_flow(built, packet, &first)
        })
    }
}

/// The protocol of an IPv4 or IPv6 packet's (first) header after the IP header.
fn protocol(packet: &[u8]) -> Option<u8> {
    match packet.first().map(|b| b >> 4) {
        Some(4) if packet.len() >= 20 => Some(packet[9]),
        Some(6) if packet.len() >= 40 => Some(packet[6]),
        _ => None,
    }
}

/// Where the ports of a TCP or UDP packet are (its IP header's length), if they are there to
/// read: not in a later fragment, nor cut off.
fn ports_at(packet: &[u8]) -> Option<usize> {
    let at = if packet[0] >> 4 == 4 {
        let later_fragment = u16::from_be_bytes([packet[6], packet[7]]) & 0x1fff != 0;
        if later_fragment {
            return None;
        }
        usize::from(packet[0] & 0x0f) * 4
    } else {
        40
    };
    (at >= 20 && packet.len() >= at + 4).then_some(at)
}

/// Whether two packets have the same IP version, protocol and addresses (true when either has
/// no IP header we read: then nothing may be assumed).
fn same_addresses(a: &[u8], b: &[u8]) -> bool {
    match (protocol(a), protocol(b)) {
        (Some(x), Some(y)) if x == y && a[0] >> 4 == b[0] >> 4 => {
            if a[0] >> 4 == 4 {
                a[12..20] == b[12..20]
            } else {
                a[8..40] == b[8..40]
            }
        }
        (Some(_), Some(_)) => false,
        _ => true,
    }
}

/// The headers of a TCP segment or UDP datagram that may join a super-packet (see the module
/// docs), or `None`.
fn joinable(packet: &[u8]) -> Option<Joinable> {
    let (ip_header, proto, pseudo) = match packet[0] >> 4 {
        4 => {
            let whole = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
            let fragment = u16::from_be_bytes([packet[6], packet[7]]) & 0x3fff;
            if packet[0] & 0x0f != 5 || whole != packet.len() || fragment != 0 {
                return None;
            }
            (20, packet[9], sum_wide(&packet[12..20]))
        }
        _ => {
            let payload = usize::from(u16::from_be_bytes([packet[4], packet[5]]));
            if payload + 40 != packet.len() {
                return None;
            }
            (40, packet[6], sum_wide(&packet[8..40]))
        }
    };
    let l4 = &packet[ip_header..];
    let (headers, seq, push) = if proto == UDP {
        let header = l4.get(..UDP_HEADER)?;
        let length = usize::from(u16::from_be_bytes([header[4], header[5]]));
        if length != l4.len() || header[6..8] == [0, 0] {
            return None;
        }
        (UDP_HEADER, 0, false)
    } else {
        let fixed = l4.get(..20)?;
        let (offset, flags) = (usize::from(fixed[12] >> 4) * 4, fixed[13]);
        if offset < 20 || offset >= l4.len() || (flags != ACK && flags != ACK | PSH) {
            return None;
        }
        let seq = u32::from_be_bytes([l4[4], l4[5], l4[6], l4[7]]);
        (offset, seq, flags & PSH != 0)
    };
    let total = pseudo + u64::from(proto) + l4.len() as u64 + sum_wide(l4);
    (fold_wide(total) == 0).then_some(Joinable {
        proto,
        ip_header,
        headers: ip_header + headers,
        payload: l4.len() - headers,
        seq,
        push,
    })
}

/// Whether a joinable packet belongs with the super-packet begun by `first` (its headers at the
/// front of `built`): every header field the kernel's split copies from the first to the
/// others is equal.
fn same_flow(built: &[u8], packet: &[u8], first: &Joinable) -> bool {
    if built[0] >> 4 != packet[0] >> 4 || packet.len() < first.headers {
        return false;
    }
    let ip = first.ip_header;
    let same_ip = if built[0] >> 4 == 4 {
        // TOS, DF, TTL, protocol, addresses.
        built[1] == packet[1]
            && (built[6] & 0x40) == (packet[6] & 0x40)
            && built[8..10] == packet[8..10]
            && built[12..20] == packet[12..20]
    } else {
        // Traffic class, flow label, next header, hop limit, addresses.
        built[..4] == packet[..4] && built[6..40] == packet[6..40]
    };
    if !same_ip || built[ip..ip + 4] != packet[ip..ip + 4] {
        return false;
    }
    if first.proto == UDP {
        return true;
    }
    // TCP: acknowledgement, header length, flags but PSH, window, urgent pointer, options.
    let (b, p) = (&built[ip..first.headers], &packet[ip..first.headers]);
    // (Not the checksum, at 16.)
    b[8..13] == p[8..13]
        && (b[13] & !PSH) == (p[13] & !PSH)
        && b[14..16] == p[14..16]
        && b[18..] == p[18..]
}

/// Writes the virtio_net_hdr in front of a head and, for two or more packets, the lengths and
/// checksums of the super-packet: the kernel fills in each packet's checksum from the
/// pseudo-header sum left in the field.
fn finish(buf: &mut [u8], head: &Head) {
    let (hdr, packet) = buf.split_at_mut(VIRTIO_NET_HDR_LEN);
    hdr.fill(0);
    let Some(first) = head.first.filter(|_| head.segments > 1) else {
        return;
    };
    let ip = first.ip_header;
    let l4_len = packet.len() - ip;
    let v4 = packet[0] >> 4 == 4;
    let pseudo = if v4 {
        let total = packet.len() as u16;
        packet[2..4].copy_from_slice(&total.to_be_bytes());
        packet[10..12].fill(0);
        let header = fold_wide(sum_wide(&packet[..20]));
        packet[10..12].copy_from_slice(&header.to_be_bytes());
        sum_wide(&packet[12..20])
    } else {
        packet[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
        sum_wide(&packet[8..40])
    };
    let (check_at, gso_type) = if first.proto == UDP {
        packet[ip + 4..ip + 6].copy_from_slice(&(l4_len as u16).to_be_bytes());
        (6, VIRTIO_NET_HDR_GSO_UDP_L4)
    } else {
        if head.push {
            packet[ip + 13] |= PSH;
        }
        let gso = if v4 {
            VIRTIO_NET_HDR_GSO_TCPV4
        } else {
            VIRTIO_NET_HDR_GSO_TCPV6
        };
        (16, gso)
    };
    // The pseudo-header's sum, not complemented: the kernel adds the rest and complements.
    let partial = !fold_wide(pseudo + u64::from(first.proto) + l4_len as u64);
    packet[ip + check_at..ip + check_at + 2].copy_from_slice(&partial.to_be_bytes());
    hdr[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM;
    hdr[1] = gso_type;
    let fields = [
        first.headers as u16,
        first.payload as u16,
        ip as u16,
        check_at as u16,
    ];
    for (i, value) in fields.iter().enumerate() {
        hdr[2 + 2 * i..4 + 2 * i].copy_from_slice(&value.to_ne_bytes());
    }
}

#[cfg(test)]
mod tests;
