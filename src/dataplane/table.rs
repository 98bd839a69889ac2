//! The packet logic of the dataplane, without I/O: which peer a packet belongs to, and what
//! WireGuard makes of it.
//!
//! A [`PeerTable`] is an immutable snapshot (identity, peers, cryptokey router) that the I/O
//! threads load once per batch. [`PeerTable::encapsulate`] turns a packet read from the TUN device
//! into a datagram and a destination; [`PeerTable::decapsulate`] turns a datagram from the UDP port
//! into a packet for the TUN device, a reply, or a counted drop. The caller does the syscalls.

use super::peer::Peer;
use super::routing::CryptokeyRouter;
use crate::keys::PublicKey;
use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey as DalekPublic, StaticSecret};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Handshake initiations per second before cookies are demanded (boringtun's default).
const HANDSHAKE_RATE_LIMIT: u64 = 100;

/// Why a packet was dropped. Every drop is counted under one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Not a WireGuard message at all, truncated, or with a bad MAC.
    Garbage,
    /// A well-formed message for a key or index we do not know.
    UnknownPeer,
    /// A data packet (or handshake) we have already seen.
    Replay,
    /// Authentication or decryption failed.
    Decrypt,
    /// Decrypted fine, but its inner source is not in the sender's allowed CIDRs.
    BadSource,
    /// Read from the TUN device for an address no peer owns.
    NoRoute,
    /// For a peer whose endpoint is not known yet (it has to contact us first).
    NoEndpoint,
    /// A handshake not processed because we are under load: it carried no valid cookie, and got
    /// a cookie reply instead.
    UnderLoad,
    /// The kernel refused the send.
    SendFailed,
    /// Larger than the path to the peer carries, and answered with an ICMP too-big instead (IPv4
    /// without DF is sent on as fragments and not counted, unless it could not be cut).
    TooBig,
}

impl DropReason {
    pub const ALL: [DropReason; 10] = [
        DropReason::Garbage,
        DropReason::UnknownPeer,
        DropReason::Replay,
        DropReason::Decrypt,
        DropReason::BadSource,
        DropReason::NoRoute,
        DropReason::NoEndpoint,
        DropReason::UnderLoad,
        DropReason::SendFailed,
        DropReason::TooBig,
    ];

    /// The label used in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Garbage => "garbage",
            DropReason::UnknownPeer => "unknown_peer",
            DropReason::Replay => "replay",
            DropReason::Decrypt => "decrypt",
            DropReason::BadSource => "bad_source",
            DropReason::NoRoute => "no_route",
            DropReason::NoEndpoint => "no_endpoint",
            DropReason::UnderLoad => "under_load",
            DropReason::SendFailed => "send_failed",
            DropReason::TooBig => "too_big",
        }
    }

    fn from_error(err: &WireGuardError) -> Self {
        match err {
            WireGuardError::DuplicateCounter
            | WireGuardError::InvalidCounter
            | WireGuardError::WrongTai64nTimestamp => DropReason::Replay,
            WireGuardError::InvalidPacket
            | WireGuardError::IncorrectPacketLength
            | WireGuardError::InvalidMac
            | WireGuardError::WrongPacketType => DropReason::Garbage,
            WireGuardError::WrongIndex | WireGuardError::WrongKey => DropReason::UnknownPeer,
            WireGuardError::UnderLoad => DropReason::UnderLoad,
            _ => DropReason::Decrypt,
        }
    }
}

/// Dropped-packet counters, one per [`DropReason`].
#[derive(Debug, Default)]
pub struct DropStats([AtomicU64; DropReason::ALL.len()]);

impl DropStats {
    pub fn count(&self, reason: DropReason) {
        self.0[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self, reason: DropReason) -> u64 {
        self.0[reason as usize].load(Ordering::Relaxed)
    }
}

/// Our static key pair and the handshake rate limiter all peers share (cookie replies under load).
pub struct Identity {
    secret: StaticSecret,
    public: DalekPublic,
    pub(crate) rate_limiter: Arc<RateLimiter>,
}

impl Identity {
    pub fn new(secret: StaticSecret) -> Self {
        let public = DalekPublic::from(&secret);
        Identity {
            rate_limiter: Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT)),
            secret,
            public,
        }
    }

    /// A fresh WireGuard state machine for a peer, numbered `index`.
    pub fn tunn(
        &self,
        peer: &PublicKey,
        preshared: Option<[u8; 32]>,
        keepalive: Option<u16>,
        index: u32,
    ) -> Tunn {
        Tunn::new(
            self.secret.clone(),
            peer.to_dalek(),
            preshared,
            keepalive,
            index,
            Some(self.rate_limiter.clone()),
        )
    }
}

/// What to do with a packet read from the TUN device.
pub enum Outbound<'a> {
    /// Send this datagram to this address.
    Send(&'a [u8], SocketAddr),
    /// Held by WireGuard until a handshake completes (a handshake initiation may be returned
    /// instead, as `Send`).
    Queued,
    /// Larger than the path to the peer carries (see [`crate::dataplane::pmtu`]): the largest
    /// packet that fits.
    TooBig(u16),
    Drop(DropReason),
}

/// What to do with a datagram read from the UDP port.
pub enum Inbound<'a> {
    /// Write this packet to the TUN device.
    ToTun(&'a mut [u8]),
    /// Send this reply (handshake response, cookie) back; then call
    /// [`PeerTable::flush_queued`] if `peer` is set, to send what waited for the handshake.
    Reply(&'a [u8], Option<Arc<Peer>>),
    /// Consumed (keepalive, handshake response, cookie reply).
    Done,
    Drop(DropReason),
}

/// Why [`PeerTable::sender`] found no peer.
enum Rejection {
    /// A cookie reply of this length waits in the output buffer.
    Cookie(usize),
    Drop(DropReason),
}

/// An immutable snapshot of the peer set.
#[derive(Default)]
pub struct PeerTable {
    pub(crate) identity: Option<Arc<Identity>>,
    pub(crate) router: CryptokeyRouter<Arc<Peer>>,
    pub(crate) by_index: HashMap<u32, Arc<Peer>>,
    pub(crate) by_key: HashMap<[u8; 32], Arc<Peer>>,
}

/// The destination address of an IP packet, if it is one.
fn destination(packet: &[u8]) -> Option<IpAddr> {
    Tunn::dst_address(packet)
}

fn source(packet: &[u8]) -> Option<IpAddr> {
    match packet.first().map(|b| b >> 4) {
        Some(4) => <[u8; 4]>::try_from(packet.get(12..16)?)
            .ok()
            .map(IpAddr::from),
        Some(6) => <[u8; 16]>::try_from(packet.get(8..24)?)
            .ok()
            .map(IpAddr::from),
        _ => None,
    }
}

impl PeerTable {
    pub fn new(identity: Option<Arc<Identity>>) -> Self {
        PeerTable {
            identity,
            ..Default::default()
        }
    }

    /// Adds a peer with the prefixes it may send from and receives for.
    pub fn insert(&mut self, peer: Arc<Peer>, allowed: &[ipnet::IpNet]) {
        for net in allowed {
            self.router.insert(*net, peer.clone());
        }
        self.by_index.insert(peer.index, peer.clone());
        self.by_key.insert(*peer.public_key.as_bytes(), peer);
    }

    pub fn peers(&self) -> impl Iterator<Item = &Arc<Peer>> {
        self.by_index.values()
    }

    pub fn peer(&self, key: &PublicKey) -> Option<&Arc<Peer>> {
        self.by_key.get(key.as_bytes())
    }

    /// The peer that owns `addr` by cryptokey routing.
    pub fn route(&self, addr: IpAddr) -> Option<&Arc<Peer>> {
        self.router.lookup(addr)
    }

    /// Encrypts one packet from the TUN device into `out`.
    pub fn encapsulate<'a>(&self, packet: &[u8], out: &'a mut [u8]) -> Outbound<'a> {
        let Some(peer) = destination(packet).and_then(|dst| self.router.lookup(dst)) else {
            return Outbound::Drop(DropReason::NoRoute);
        };
        let Some(endpoint) = peer.endpoint() else {
            return Outbound::Drop(DropReason::NoEndpoint);
        };
        if let Some(limit) = peer.path_limit().filter(|l| packet.len() > usize::from(*l)) {
            return Outbound::TooBig(limit);
        }
        let result = peer.tunn().encapsulate(packet, out);
        match result {
            TunnResult::WriteToNetwork(datagram) => {
                peer.stats.count_tx(datagram.len());
                Outbound::Send(datagram, endpoint)
            }
            TunnResult::Err(e) => Outbound::Drop(DropReason::from_error(&e)),
            _ => Outbound::Queued,
        }
    }

    /// Finds the peer a datagram is for, verifying handshake initiations before any DH work.
    /// A cookie reply (we are under load) is left in `out`.
    fn sender(
        &self,
        datagram: &[u8],
        src: SocketAddr,
        out: &mut [u8],
    ) -> Result<Arc<Peer>, Rejection> {
        let Some(identity) = &self.identity else {
            return Err(Rejection::Drop(DropReason::UnknownPeer));
        };
        let by_index = |receiver: u32| {
            self.by_index
                .get(&(receiver >> 8))
                .cloned()
                .ok_or(Rejection::Drop(DropReason::UnknownPeer))
        };
        match Tunn::parse_incoming_packet(datagram) {
            Err(_) => Err(Rejection::Drop(DropReason::Garbage)),
            Ok(Packet::HandshakeInit(init)) => {
                match identity
                    .rate_limiter
                    .verify_packet(Some(src.ip()), datagram, out)
                {
                    Ok(_) => {}
                    Err(TunnResult::WriteToNetwork(cookie)) => {
                        return Err(Rejection::Cookie(cookie.len()))
                    }
                    Err(TunnResult::Err(e)) => {
                        return Err(Rejection::Drop(DropReason::from_error(&e)))
                    }
                    Err(_) => return Err(Rejection::Drop(DropReason::Garbage)),
                }
                let half = parse_handshake_anon(&identity.secret, &identity.public, &init)
                    .map_err(|_| Rejection::Drop(DropReason::UnknownPeer))?;
                self.by_key
                    .get(&half.peer_static_public)
                    .cloned()
                    .ok_or(Rejection::Drop(DropReason::UnknownPeer))
            }
            Ok(Packet::HandshakeResponse(p)) => by_index(p.receiver_idx),
            Ok(Packet::PacketCookieReply(p)) => by_index(p.receiver_idx),
            Ok(Packet::PacketData(p)) => by_index(p.receiver_idx),
        }
    }

    /// The MTU a TCP SYN going out to its destination is clamped to: the path limit of the peer
    /// it goes to once measured (never above the tunnel MTU), else the tunnel's `mtu`.
    pub fn mtu_towards(&self, packet: &[u8], mtu: u16) -> u16 {
        self.path_mtu(destination(packet), mtu)
    }

    /// The MTU a TCP SYN that came from a peer is clamped to (that peer's path limit, or `mtu`):
    /// the local end then sends segments that fit the way back.
    pub fn mtu_from(&self, packet: &[u8], mtu: u16) -> u16 {
        self.path_mtu(source(packet), mtu)
    }

    fn path_mtu(&self, addr: Option<IpAddr>, mtu: u16) -> u16 {
        addr.and_then(|a| self.router.lookup(a))
            .and_then(|peer| peer.path_limit())
            .unwrap_or(mtu)
    }

    /// Decrypts one datagram from `src` into `out`.
    pub fn decapsulate<'a>(
        &self,
        datagram: &[u8],
        src: SocketAddr,
        out: &'a mut [u8],
    ) -> Inbound<'a> {
        let peer = match self.sender(datagram, src, out) {
            Ok(peer) => peer,
            Err(Rejection::Cookie(len)) => return Inbound::Reply(&out[..len], None),
            Err(Rejection::Drop(reason)) => return Inbound::Drop(reason),
        };
        let result = peer.tunn().decapsulate(Some(src.ip()), datagram, out);
        let authenticated = |peer: &Peer| {
            peer.set_endpoint(src);
            peer.stats.count_rx(datagram.len());
        };
        match result {
            TunnResult::Done => {
                authenticated(&peer);
                Inbound::Done
            }
            TunnResult::WriteToNetwork(reply) => {
                authenticated(&peer);
                peer.stats.count_tx(reply.len());
                Inbound::Reply(reply, Some(peer))
            }
            TunnResult::WriteToTunnelV4(packet, inner) => {
                authenticated(&peer);
                self.check_source(&peer, inner.into(), packet)
            }
            TunnResult::WriteToTunnelV6(packet, inner) => {
                authenticated(&peer);
                self.check_source(&peer, inner.into(), packet)
            }
            TunnResult::Err(e) => Inbound::Drop(DropReason::from_error(&e)),
        }
    }

    fn check_source<'a>(
        &self,
        peer: &Arc<Peer>,
        inner: IpAddr,
        packet: &'a mut [u8],
    ) -> Inbound<'a> {
        match self.router.lookup(inner) {
            Some(owner) if owner.index == peer.index => Inbound::ToTun(packet),
            _ => Inbound::Drop(DropReason::BadSource),
        }
    }

    /// The next packet WireGuard held for `peer` until its handshake completed, if any.
    pub fn flush_queued<'a>(peer: &Peer, out: &'a mut [u8]) -> Option<&'a [u8]> {
        let result = peer.tunn().decapsulate(None, &[], out);
        match result {
            TunnResult::WriteToNetwork(datagram) => {
                peer.stats.count_tx(datagram.len());
                Some(datagram)
            }
            _ => None,
        }
    }
}
