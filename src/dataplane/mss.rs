//! TCP MSS clamping in the dataplane (no iptables): SYNs crossing the tunnel get their MSS option
//! lowered so that neither end sends segments the tunnel MTU (or the path to the peer, see
//! [`crate::dataplane::pmtu`]) cannot carry.
//!
//! Pure functions over packet bytes; the dataplane calls [`clamp_with`] on every packet, which costs a
//! few byte compares for anything that is not a TCP SYN.

/// IPv4 + TCP header without options.
const V4_OVERHEAD: u16 = 40;
/// IPv6 + TCP header without options.
const V6_OVERHEAD: u16 = 60;
const TCP: u8 = 6;
const SYN: u8 = 0x02;
const OPT_END: u8 = 0;
const OPT_NOP: u8 = 1;
const OPT_MSS: u8 = 2;

/// The MSS that fits a tunnel of `mtu` bytes, for IPv4 and IPv6 packets.
pub fn limits(mtu: u16) -> (u16, u16) {
    (
        mtu.saturating_sub(V4_OVERHEAD),
        mtu.saturating_sub(V6_OVERHEAD),
    )
}

/// Lowers the MSS option of a TCP SYN to the limit for its IP version and the MTU `mtu` gives,
/// and fixes the TCP checksum. `mtu` is called (with the packet) only for a TCP SYN, so the
/// dataplane looks up the path limit of the peer only when it matters. Returns whether the packet
/// changed. Anything else (and any malformed packet) is left alone.
pub fn clamp_with(packet: &mut [u8], mtu: impl FnOnce(&[u8]) -> u16) -> bool {
    let (tcp_start, v6) = match packet.first().map(|b| b >> 4) {
        Some(4) if packet.len() >= 20 => {
            let ihl = usize::from(packet[0] & 0x0f) * 4;
            let fragment = u16::from_be_bytes([packet[6], packet[7]]) & 0x1fff;
            if packet[9] != TCP || ihl < 20 || fragment != 0 {
                return false;
            }
            (ihl, false)
        }
        Some(6) if packet.len() >= 40 => {
            if packet[6] != TCP {
                return false;
            }
            (40, true)
        }
        _ => return false,
    };
    let Some(tcp) = packet.get(tcp_start..) else {
        return false;
    };
    if tcp.len() < 20 || tcp[13] & SYN == 0 {
        return false;
    }
    let (v4_limit, v6_limit) = limits(mtu(packet));
    let limit = if v6 { v6_limit } else { v4_limit };
    let header_len = usize::from(tcp[12] >> 4) * 4;
    if header_len < 20 || header_len > tcp.len() {
        return false;
    }
    let mut at = tcp_start + 20;
    let end = tcp_start + header_len;
    while at < end {
        match packet[at] {
            OPT_END => return false,
            OPT_NOP => at += 1,
            kind => {
                let Some(&len) = packet.get(at + 1) else {
                    return false;
                };
                let len = usize::from(len);
                if len < 2 || at + len > end {
                    return false;
                }
                if kind == OPT_MSS && len == 4 {
                    let mss = u16::from_be_bytes([packet[at + 2], packet[at + 3]]);
                    if mss <= limit {
                        return false;
                    }
                    packet[at + 2..at + 4].copy_from_slice(&limit.to_be_bytes());
                    fix_tcp_checksum(packet, tcp_start);
                    return true;
                }
                at += len;
            }
        }
    }
    false
}

/// One's-complement sum of 16-bit big-endian words (odd trailing byte padded with zero), added
/// to `acc`.
pub(super) fn sum16(data: &[u8], acc: u32) -> u32 {
    acc + u32::from(carry(sum_wide(data)))
}

/// One's-complement sum of `data` as big-endian 16-bit words (odd trailing byte padded with
/// zero), unfolded: four bytes at a time (the sum of 32-bit words folds to the same 16-bit sum,
/// as 2^16 ≡ 1). Sums of pieces at even offsets add up.
pub(super) fn sum_wide(data: &[u8]) -> u64 {
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

/// Folds an unfolded sum to 16 bits, end-around carry, not complemented.
fn carry(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// Folds a one's-complement sum and complements it: the value a checksum field holds.
pub(super) fn fold(acc: u32) -> u16 {
    !carry(u64::from(acc))
}

/// [`fold`] for a [`sum_wide`]: the value a checksum field holds (0 when a sum over data that
/// includes its own checksum field checks out).
pub(super) fn fold_wide(acc: u64) -> u16 {
    !carry(acc)
}

/// Recomputes the TCP checksum over the pseudo-header and the segment.
fn fix_tcp_checksum(packet: &mut [u8], tcp_start: usize) {
    let tcp_len = packet.len() - tcp_start;
    let pseudo = if packet[0] >> 4 == 4 {
        sum16(&packet[12..20], u32::from(TCP) + tcp_len as u32)
    } else {
        sum16(&packet[8..40], u32::from(TCP) + tcp_len as u32)
    };
    packet[tcp_start + 16..tcp_start + 18].copy_from_slice(&[0, 0]);
    let checksum = fold(sum16(&packet[tcp_start..], pseudo));
    packet[tcp_start + 16..tcp_start + 18].copy_from_slice(&checksum.to_be_bytes());
}

/// Whether a TCP segment's checksum is right (for tests and checks); false for anything that is
/// not an IPv4 or IPv6 packet with room for its headers.
pub fn tcp_checksum_ok(packet: &[u8]) -> bool {
    let (tcp_start, pseudo_src) = match packet.first().map(|b| b >> 4) {
        Some(4) => (usize::from(packet[0] & 0x0f) * 4, packet.get(12..20)),
        Some(6) => (40, packet.get(8..40)),
        _ => return false,
    };
    let Some(pseudo_src) = pseudo_src.filter(|_| packet.len() >= tcp_start) else {
        return false;
    };
    let tcp_len = packet.len() - tcp_start;
    let pseudo = sum16(pseudo_src, u32::from(TCP) + tcp_len as u32);
    fold(sum16(&packet[tcp_start..], pseudo)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the mss_clamp fuzz target: an empty or truncated packet is no valid segment,
    /// not a panic.
    #[test]
    fn checksum_check_of_garbage_is_false() {
        for bad in [
            &[][..],
            &[0x45][..],
            &[0x45, 0, 0, 20, 0, 0, 0, 0, 64, 6][..],
            &[0x60; 39][..],
            &[0x4f; 30][..],
        ] {
            assert!(!tcp_checksum_ok(bad), "{bad:?}");
        }
    }

    fn clamp(packet: &mut [u8], mtu: u16) -> bool {
        clamp_with(packet, |_| mtu)
    }

    /// A SYN with options: NOPs to push MSS to an odd offset if `odd`, then MSS, then WS.
    fn syn(v6: bool, mss: u16, odd: bool, flags: u8) -> Vec<u8> {
        let mut opts = Vec::new();
        if odd {
            opts.push(OPT_NOP);
        }
        opts.extend_from_slice(&[OPT_MSS, 4]);
        opts.extend_from_slice(&mss.to_be_bytes());
        opts.extend_from_slice(&[3, 3, 7]);
        while opts.len() % 4 != 0 {
            opts.push(OPT_NOP);
        }
        let mut tcp = vec![0u8; 20];
        tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&5201u16.to_be_bytes());
        tcp[12] = (((20 + opts.len()) / 4) as u8) << 4;
        tcp[13] = flags;
        tcp.extend_from_slice(&opts);
        tcp.extend_from_slice(b"xyz");
        let mut packet = if v6 {
            let mut ip = vec![0u8; 40];
            ip[0] = 0x60;
            ip[4..6].copy_from_slice(&(tcp.len() as u16).to_be_bytes());
            ip[6] = TCP;
            ip[7] = 64;
            ip[8..24].copy_from_slice(&[0xfd, 0, 2, 0x44, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
            ip[24..40].copy_from_slice(&[0xfd, 0, 2, 0x45, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
            ip
        } else {
            let mut ip = vec![0u8; 20];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&((20 + tcp.len()) as u16).to_be_bytes());
            ip[8] = 64;
            ip[9] = TCP;
            ip[12..16].copy_from_slice(&[10, 244, 1, 10]);
            ip[16..20].copy_from_slice(&[10, 245, 1, 10]);
            ip
        };
        let tcp_start = packet.len();
        packet.extend_from_slice(&tcp);
        fix_tcp_checksum(&mut packet, tcp_start);
        packet
    }

    fn mss_of(packet: &[u8], odd: bool) -> u16 {
        let tcp = if packet[0] >> 4 == 4 { 20 } else { 40 };
        let at = tcp + 20 + usize::from(odd);
        u16::from_be_bytes([packet[at + 2], packet[at + 3]])
    }

    #[test]
    fn clamps_v4_and_v6_syns_at_even_and_odd_offsets_with_valid_checksums() {
        for v6 in [false, true] {
            for odd in [false, true] {
                let mut p = syn(v6, 1460, odd, SYN);
                assert!(tcp_checksum_ok(&p));
                assert!(clamp(&mut p, 1420), "v6={v6} odd={odd}");
                assert_eq!(mss_of(&p, odd), if v6 { 1360 } else { 1380 });
                assert!(tcp_checksum_ok(&p), "bad checksum v6={v6} odd={odd}");
            }
        }
    }

    #[test]
    fn checksum_check_catches_corruption() {
        let mut p = syn(true, 1460, false, SYN);
        assert!(tcp_checksum_ok(&p));
        let last = p.len() - 1;
        p[last] ^= 0x40;
        assert!(!tcp_checksum_ok(&p));
    }

    #[test]
    fn syn_ack_is_clamped_too() {
        let mut p = syn(false, 1460, false, SYN | 0x10);
        assert!(clamp(&mut p, 1420));
        assert!(tcp_checksum_ok(&p));
    }

    #[test]
    fn leaves_small_mss_non_syn_and_garbage_alone() {
        let mut small = syn(false, 1200, false, SYN);
        let before = small.clone();
        assert!(!clamp(&mut small, 1420));
        assert_eq!(small, before);
        let mut ack = syn(false, 1460, false, 0x10);
        assert!(!clamp(&mut ack, 1420));
        for len in 0..60 {
            let mut junk = vec![0x45u8; len];
            clamp(&mut junk, 1420);
            let mut junk6 = vec![0x60u8; len];
            clamp(&mut junk6, 1420);
        }
        let mut truncated = syn(false, 1460, false, SYN);
        truncated.truncate(30);
        assert!(!clamp(&mut truncated, 1420));
    }
}
