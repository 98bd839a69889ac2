//! Handshake messages per source address: a token bucket each, in front of the limiter all peers
//! share.
//!
//! The shared limiter (boringtun's `RateLimiter`) counts every handshake and, past its threshold,
//! answers with cookie replies: that stops senders that spoof their address, but one that sends
//! from its real address gets the cookie, proves it in MAC2, and may then make this gateway do
//! the Diffie-Hellman work of every initiation it sends, stealing the receive thread from the
//! peers' data. As the kernel's WireGuard does, each source address may send
//! [`PER_SECOND`] handshake messages a second, with a burst of [`BURST`]; the rest is dropped
//! before any DH work and before it can count against the shared limiter.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Handshake messages one address may send a second (the kernel's `INITIATIONS_PER_SECOND`).
pub const PER_SECOND: u64 = 20;
/// How many may come at once (the kernel's `INITIATIONS_BURSTABLE`).
pub const BURST: u64 = 5;
/// Addresses tracked at once; a newcomer beyond this is refused until buckets refill and go.
const MAX_SOURCES: usize = 16_384;
/// What one message costs, in nanoseconds of refill.
const COST: u64 = 1_000_000_000 / PER_SECOND;

/// The buckets, keyed by source address (IPv6 by its /64: one host owns a whole prefix).
#[derive(Debug, Default)]
pub struct SourceLimiter {
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Refill credit in nanoseconds, at most `BURST * COST`.
    credit: u64,
    last: Instant,
}

fn key(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & (u128::MAX << 64)).into()),
        },
        v4 => v4,
    }
}

impl SourceLimiter {
    /// True when a handshake message from `addr` may be processed now.
    pub fn allow(&self, addr: IpAddr, now: Instant) -> bool {
        let key = key(addr);
        let mut buckets = self.buckets.lock();
        if buckets.len() >= MAX_SOURCES && !buckets.contains_key(&key) {
            return false;
        }
        let bucket = buckets.entry(key).or_insert(Bucket {
            credit: BURST * COST,
            last: now,
        });
        let refill = now.saturating_duration_since(bucket.last).as_nanos();
        bucket.credit = (u128::from(bucket.credit) + refill).min(u128::from(BURST * COST)) as u64;
        bucket.last = now;
        if bucket.credit >= COST {
            bucket.credit -= COST;
            true
        } else {
            false
        }
    }

    /// Forgets the addresses whose bucket has been full for a while (called once a second).
    pub fn forget_idle(&self, now: Instant) {
        let idle = Duration::from_nanos(BURST * COST);
        self.buckets
            .lock()
            .retain(|_, b| now.saturating_duration_since(b.last) < idle);
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.buckets.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(limiter: &SourceLimiter, addr: &str, at: Instant, n: usize) -> usize {
        (0..n)
            .filter(|_| limiter.allow(addr.parse().unwrap(), at))
            .count()
    }

    #[test]
    fn a_burst_then_the_rate_per_address() {
        let l = SourceLimiter::default();
        let t0 = Instant::now();
        assert_eq!(allowed(&l, "192.0.2.9", t0, 1000), BURST as usize);
        // Another address is not affected.
        assert_eq!(allowed(&l, "192.0.2.10", t0, 1000), BURST as usize);
        // One second later: the rate's worth, capped at the burst.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(allowed(&l, "192.0.2.9", t1, 1000), BURST as usize);
        let t2 = t1 + Duration::from_millis(100);
        assert_eq!(allowed(&l, "192.0.2.9", t2, 1000), 2);
    }

    #[test]
    fn an_ipv6_host_is_limited_by_its_prefix_and_mapped_v4_as_v4() {
        let l = SourceLimiter::default();
        let t0 = Instant::now();
        let spread: usize = (1..50)
            .map(|i| allowed(&l, &format!("2001:db8::{i:x}"), t0, 10))
            .sum();
        assert_eq!(spread, BURST as usize);
        assert_eq!(allowed(&l, "::ffff:192.0.2.9", t0, 10), BURST as usize);
        assert_eq!(allowed(&l, "192.0.2.9", t0, 10), 0);
    }

    #[test]
    fn idle_addresses_are_forgotten_and_the_table_is_bounded() {
        let l = SourceLimiter::default();
        let t0 = Instant::now();
        for i in 0..(MAX_SOURCES as u32 + 100) {
            l.allow(
                IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000u32 + i)),
                t0,
            );
        }
        assert_eq!(l.tracked(), MAX_SOURCES);
        assert!(!l.allow("192.0.2.77".parse().unwrap(), t0));
        l.forget_idle(t0 + Duration::from_secs(1));
        assert_eq!(l.tracked(), 0);
        assert!(l.allow("192.0.2.77".parse().unwrap(), t0 + Duration::from_secs(1)));
    }
}
