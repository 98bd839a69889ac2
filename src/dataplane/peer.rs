//! One WireGuard peer as the dataplane sees it: its protocol state, its endpoint, its counters.
//!
//! The boringtun [`Tunn`] takes `&mut self` for every packet, so it sits behind a short lock that is
//! never held across a syscall: callers encrypt or decrypt into their own buffer, drop the guard,
//! then send. The endpoint follows the source of the last authenticated packet (roaming, NAT).

use crate::keys::PublicKey;
use arc_swap::ArcSwapOption;
use boringtun::noise::Tunn;
use parking_lot::{Mutex, MutexGuard, RwLock};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Per-peer traffic counters, updated with relaxed atomics on the hot path. The receive
/// thread's pair and the transmit thread's pair sit on different cache lines, so that the two
/// threads never write the same line.
#[derive(Debug, Default)]
#[repr(C, align(64))]
pub struct PeerStats {
    /// UDP payload bytes received from the peer that authenticated.
    pub rx_bytes: AtomicU64,
    pub rx_packets: AtomicU64,
    /// Fills the receive counters' cache line.
    _apart: [u64; 6],
    /// UDP payload bytes sent to the peer.
    pub tx_bytes: AtomicU64,
    pub tx_packets: AtomicU64,
}

impl PeerStats {
    pub(crate) fn count_rx(&self, bytes: usize) {
        self.rx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        self.rx_packets.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_tx(&self, bytes: usize) {
        self.tx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        self.tx_packets.fetch_add(1, Ordering::Relaxed);
    }
}

/// A peer in the dataplane's table.
pub struct Peer {
    pub public_key: PublicKey,
    /// Our local index for this peer: the high 24 bits of every receiver index it sends us.
    pub index: u32,
    tunn: Mutex<Tunn>,
    /// Read for every packet sent and compared for every packet received: a load that writes
    /// no shared memory (a lock's reader count would bounce between the two threads).
    endpoint: ArcSwapOption<SocketAddr>,
    /// Where the peer may be (its configured `endpoints`): with two or more, a handshake left
    /// unanswered moves the endpoint to the next ([`Peer::initiation_sent`]).
    candidates: RwLock<Vec<SocketAddr>>,
    /// The peer's received-packet count when the timers last sent a handshake initiation.
    rx_at_initiation: AtomicU64,
    /// The largest inner packet the route to the endpoint carries, never above the tunnel MTU
    /// (0 until measured).
    path_limit: AtomicU16,
    pub stats: PeerStats,
}

/// What the control plane reads about a peer.
#[derive(Debug, Clone)]
pub struct PeerStatus {
    pub public_key: PublicKey,
    pub endpoint: Option<SocketAddr>,
    pub last_handshake: Option<SystemTime>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub persistent_keepalive: Option<u16>,
    /// The largest inner packet the path to the endpoint carries, once measured.
    pub path_mtu: Option<u16>,
}

impl Peer {
    pub fn new(
        public_key: PublicKey,
        index: u32,
        tunn: Tunn,
        endpoint: Option<SocketAddr>,
    ) -> Self {
        Peer {
            public_key,
            index,
            tunn: Mutex::new(tunn),
            endpoint: ArcSwapOption::from_pointee(endpoint),
            candidates: RwLock::new(Vec::new()),
            rx_at_initiation: AtomicU64::new(0),
            path_limit: AtomicU16::new(0),
            stats: PeerStats::default(),
        }
    }

    /// The protocol state, locked. Never hold the guard across a syscall.
    pub(crate) fn tunn(&self) -> MutexGuard<'_, Tunn> {
        self.tunn.lock()
    }

    /// Replaces the protocol state (new key, keepalive or preshared key); sessions start over.
    pub(crate) fn replace_tunn(&self, tunn: Tunn) {
        *self.tunn.lock() = tunn;
    }

    pub fn endpoint(&self) -> Option<SocketAddr> {
        self.endpoint.load().as_deref().copied()
    }

    /// Records where the peer's last authenticated packet came from.
    pub(crate) fn set_endpoint(&self, addr: SocketAddr) {
        if self.endpoint() != Some(addr) {
            self.endpoint.store(Some(Arc::new(addr)));
        }
    }

    /// Sets the endpoints the peer may be at (see [`Peer::initiation_sent`]).
    pub(crate) fn set_candidates(&self, candidates: Vec<SocketAddr>) {
        *self.candidates.write() = candidates;
    }

    /// Called when the timers send a handshake initiation (a retry, or a new handshake after
    /// the peer fell silent). When nothing came from the peer since the previous one and it has
    /// several endpoints, the endpoint moves to the next of them (after the last: the first;
    /// one learned by roaming, not in the list: the first), which is returned. A side behind
    /// NAT thus finds whichever of the other cluster's gateways is active.
    pub(crate) fn initiation_sent(&self) -> Option<SocketAddr> {
        let rx = self.stats.rx_packets.load(Ordering::Relaxed);
        let silent = self.rx_at_initiation.swap(rx, Ordering::Relaxed) == rx;
        if !silent {
            return None;
        }
        self.next_endpoint()
    }

    /// Moves the endpoint to the next of the peer's endpoints (see [`Peer::initiation_sent`]);
    /// `None` when it has fewer than two.
    pub(crate) fn next_endpoint(&self) -> Option<SocketAddr> {
        let candidates = self.candidates.read();
        if candidates.len() < 2 {
            return None;
        }
        let current = self.endpoint();
        let next = match candidates.iter().position(|c| Some(*c) == current) {
            Some(i) => candidates[(i + 1) % candidates.len()],
            None => candidates[0],
        };
        drop(candidates);
        self.endpoint.store(Some(Arc::new(next)));
        Some(next)
    }

    /// The largest inner packet the path to the peer carries, once measured
    /// (see [`crate::dataplane::pmtu`]).
    pub fn path_limit(&self) -> Option<u16> {
        match self.path_limit.load(Ordering::Relaxed) {
            0 => None,
            limit => Some(limit),
        }
    }

    /// Records a new path limit (at most the tunnel MTU: [`crate::dataplane::pmtu::inner_limit`]);
    /// returns the previous one.
    pub(crate) fn set_path_limit(&self, limit: u16) -> Option<u16> {
        match self.path_limit.swap(limit, Ordering::Relaxed) {
            0 => None,
            previous => Some(previous),
        }
    }

    pub fn status(&self) -> PeerStatus {
        let tunn = self.tunn.lock();
        let since = tunn.time_since_last_handshake();
        let keepalive = tunn.persistent_keepalive();
        drop(tunn);
        PeerStatus {
            public_key: self.public_key,
            endpoint: self.endpoint(),
            last_handshake: since.and_then(|d: Duration| SystemTime::now().checked_sub(d)),
            rx_bytes: self.stats.rx_bytes.load(Ordering::Relaxed),
            tx_bytes: self.stats.tx_bytes.load(Ordering::Relaxed),
            persistent_keepalive: keepalive,
            path_mtu: self.path_limit(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::PrivateKey;

    fn peer(endpoint: &str) -> Peer {
        let (ours, theirs) = (PrivateKey::generate(), PrivateKey::generate());
        let identity = super::super::Identity::new(ours.to_dalek());
        Peer::new(
            theirs.public_key(),
            1,
            identity.tunn(&theirs.public_key(), None, None, 1),
            Some(endpoint.parse().unwrap()),
        )
    }

    #[test]
    fn the_two_threads_counters_never_share_a_cache_line() {
        use std::mem::{align_of, offset_of};
        assert_eq!(align_of::<PeerStats>(), 64);
        let rx_end = offset_of!(PeerStats, rx_packets) + 8;
        assert!(offset_of!(PeerStats, rx_bytes) < 64 && rx_end <= 64);
        assert!(offset_of!(PeerStats, tx_bytes) >= 64 && offset_of!(PeerStats, tx_packets) >= 64);
    }

    #[test]
    fn unanswered_initiations_walk_the_endpoints_and_an_answer_stops_them() {
        let (a, b, c): (SocketAddr, SocketAddr, SocketAddr) = (
            "192.0.2.1:51820".parse().unwrap(),
            "192.0.2.12:51820".parse().unwrap(),
            "198.51.100.7:4000".parse().unwrap(),
        );
        let p = peer("192.0.2.1:51820");
        // One endpoint: nothing to rotate to.
        assert_eq!(p.initiation_sent(), None);
        p.set_candidates(vec![a, b]);
        assert_eq!(p.initiation_sent(), Some(b), "nothing ever came back");
        assert_eq!(p.endpoint(), Some(b));
        assert_eq!(p.initiation_sent(), Some(a), "after the last, the first");
        // The peer answers: the next initiation (a rekey) keeps the endpoint...
        p.stats.count_rx(148);
        assert_eq!(p.initiation_sent(), None);
        assert_eq!(p.endpoint(), Some(a));
        // ... and only a second one in silence moves it.
        assert_eq!(p.initiation_sent(), Some(b));
        // Roamed to an address outside the list: back to the first.
        p.set_endpoint(c);
        assert_eq!(p.initiation_sent(), Some(a));
    }
}
