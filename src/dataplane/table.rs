//! The packet logic of the dataplane, without I/O: which peer a packet belongs to, and what
//! WireGuard makes of it.
//!
//! A [`PeerTable`] is an immutable snapshot (identity, peers, cryptokey router) that the I/O
//! threads load once per batch. [`PeerTable::encapsulate`] turns a packet read from the TUN device
//! into a datagram and a destination; [`PeerTable::decapsulate`] turns a datagram from the UDP port
//! into a packet for the TUN device, a reply, or a counted drop. The caller does the syscalls.

use super::delivery::DestinationFilter;
use super::peer::Peer;
use super::routing::CryptokeyRouter;
use super::sources::SourceLimiter;
use super::translate::{Translation, TranslationStats};
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
use std::time::Instant;

/// Handshake initiations per second before cookies are demanded (boringtun's default).
const HANDSHAKE_RATE_LIMIT: u64 = 100;
/// A data message's header before the ciphertext: type, receiver index, counter.
const DATA_HEADER: usize = 16;

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
    /// A data message longer than this side's tunnel MTU allows: a peer whose MTU is larger than
    /// ours, or an attack. Dropped before decryption.
    Oversized,
    /// Decrypted fine, but its inner destination is not this cluster (`local_cidrs`,
    /// `deliver_cidrs`) nor a service of this gateway on its tunnel address.
    BadDestination,
    /// A handshake message from an address that sent more than its share
    /// ([`super::sources`]), dropped before any DH work.
    RateLimited,
    /// Arrived or read while this gateway is a standby: another candidate holds the gateway
    /// Lease and forwards for the cluster ([`crate::node::lease`]).
    Standby,
}

impl DropReason {
    pub const ALL: [DropReason; 14] = [
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
        DropReason::Oversized,
        DropReason::BadDestination,
        DropReason::RateLimited,
        DropReason::Standby,
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
            DropReason::Oversized => "oversized",
            DropReason::BadDestination => "bad_destination",
            DropReason::RateLimited => "rate_limited",
            DropReason::Standby => "standby",
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
        self.count_n(reason, 1);
    }

    /// Counts `n` packets dropped for `reason` at once (a whole batch).
    pub fn count_n(&self, reason: DropReason, n: usize) {
        self.0[reason as usize].fetch_add(n as u64, Ordering::Relaxed);
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
    /// What each peer's `Tunn` checks handshakes with: MAC1 only, never under load. The shared
    /// limiter above is consulted once per handshake message, in [`PeerTable::decapsulate`],
    /// before the message reaches a `Tunn`; a second count inside boringtun could cross the
    /// threshold between the two checks and answer an unauthenticated handshake with a cookie.
    mac_checker: Arc<RateLimiter>,
    /// A token bucket per source address, in front of the shared limiter.
    pub(crate) sources: SourceLimiter,
}

impl Identity {
    pub fn new(secret: StaticSecret) -> Self {
        let public = DalekPublic::from(&secret);
        Identity {
            rate_limiter: Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT)),
            mac_checker: Arc::new(RateLimiter::new(&public, u64::MAX)),
            sources: SourceLimiter::default(),
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
            Some(self.mac_checker.clone()),
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

/// The kind of WireGuard message a datagram holds, as far as its peer was found.
#[derive(Clone, Copy)]
enum Message {
    Initiation,
    Response,
    Cookie,
    Data,
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
    /// Where decrypted packets may go.
    pub(crate) destinations: DestinationFilter,
    /// This cluster's global ranges (`global_cidrs`), and the dataplane's count of translations.
    pub(crate) translation: Translation,
    pub(crate) translated: Arc<TranslationStats>,
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

    /// Translates a packet from the TUN device on its way to a peer (see [`super::translate`]).
    pub fn translate_outbound(&self, packet: &mut [u8]) {
        if self.translation.outbound(packet) {
            self.translated.count_outbound();
        }
    }

    /// Translates a packet this gateway makes up in answer to one from the TUN device (an ICMP
    /// too-big about a translated packet): as if it came from the peer.
    pub fn translate_reply(&self, packet: &mut [u8]) {
        self.translation.inbound(packet);
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

    /// Finds the peer a datagram is for and what kind of message it is. Handshake messages pass
    /// the shared rate limiter here, once (a cookie reply is left in `out` when we are under
    /// load), and an initiation's sender is found before any DH work. A data message whose
    /// ciphertext would not fit `out` is refused before boringtun sees it.
    fn sender(
        &self,
        datagram: &[u8],
        src: SocketAddr,
        out: &mut [u8],
    ) -> Result<(Arc<Peer>, Message), Rejection> {
        let Some(identity) = &self.identity else {
            return Err(Rejection::Drop(DropReason::UnknownPeer));
        };
        let by_index = |receiver: u32, kind: Message| {
            self.by_index
                .get(&(receiver >> 8))
                .map(|peer| (peer.clone(), kind))
                .ok_or(Rejection::Drop(DropReason::UnknownPeer))
        };
        let packet = match Tunn::parse_incoming_packet(datagram) {
            Err(_) => return Err(Rejection::Drop(DropReason::Garbage)),
            Ok(packet @ (Packet::HandshakeInit(_) | Packet::HandshakeResponse(_))) => {
                // MAC1 first (anyone who knows our public key can make one, but nothing else
                // can), then the sender's own bucket, then the shared limiter.
                if identity
                    .mac_checker
                    .verify_packet(Some(src.ip()), datagram, out)
                    .is_err()
                {
                    return Err(Rejection::Drop(DropReason::Garbage));
                }
                if !identity.sources.allow(src.ip(), Instant::now()) {
                    return Err(Rejection::Drop(DropReason::RateLimited));
                }
                match identity
                    .rate_limiter
                    .verify_packet(Some(src.ip()), datagram, out)
                {
                    Ok(_) => packet,
                    Err(TunnResult::WriteToNetwork(cookie)) => {
                        return Err(Rejection::Cookie(cookie.len()))
                    }
                    Err(TunnResult::Err(e)) => {
                        return Err(Rejection::Drop(DropReason::from_error(&e)))
                    }
                    Err(_) => return Err(Rejection::Drop(DropReason::Garbage)),
                }
            }
            Ok(packet) => packet,
        };
        match packet {
            Packet::HandshakeInit(init) => {
                let half = parse_handshake_anon(&identity.secret, &identity.public, &init)
                    .map_err(|_| Rejection::Drop(DropReason::UnknownPeer))?;
                self.by_key
                    .get(&half.peer_static_public)
                    .map(|peer| (peer.clone(), Message::Initiation))
                    .ok_or(Rejection::Drop(DropReason::UnknownPeer))
            }
            Packet::HandshakeResponse(p) => by_index(p.receiver_idx, Message::Response),
            Packet::PacketCookieReply(p) => by_index(p.receiver_idx, Message::Cookie),
            Packet::PacketData(_) if datagram.len() - DATA_HEADER > out.len() => {
                Err(Rejection::Drop(DropReason::Oversized))
            }
            Packet::PacketData(p) => by_index(p.receiver_idx, Message::Data),
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
    ///
    /// The peer's endpoint moves to `src` only when the message proved the sender holds the
    /// peer's keys: a handshake initiation or response that completed, or a data message that
    /// decrypted. Never on a cookie reply (anyone who saw a MAC1 can make one), never on our
    /// own cookie reply to a handshake we did not process.
    pub fn decapsulate<'a>(
        &self,
        datagram: &[u8],
        src: SocketAddr,
        out: &'a mut [u8],
    ) -> Inbound<'a> {
        let (peer, kind) = match self.sender(datagram, src, out) {
            Ok(found) => found,
            Err(Rejection::Cookie(len)) => return Inbound::Reply(&out[..len], None),
            Err(Rejection::Drop(reason)) => return Inbound::Drop(reason),
        };
        let result = peer.tunn().decapsulate(Some(src.ip()), datagram, out);
        let authenticated = |peer: &Peer| {
            peer.set_endpoint(src);
            peer.stats.count_rx(datagram.len());
        };
        match (kind, result) {
            (Message::Cookie, TunnResult::Done) => {
                peer.stats.count_rx(datagram.len());
                Inbound::Done
            }
            (Message::Data, TunnResult::Done) => {
                authenticated(&peer);
                Inbound::Done
            }
            (Message::Initiation | Message::Response, TunnResult::WriteToNetwork(reply)) => {
                authenticated(&peer);
                peer.stats.count_tx(reply.len());
                Inbound::Reply(reply, Some(peer))
            }
            (Message::Data, TunnResult::WriteToTunnelV4(packet, inner)) => {
                authenticated(&peer);
                self.check_source(&peer, inner.into(), packet)
            }
            (Message::Data, TunnResult::WriteToTunnelV6(packet, inner)) => {
                authenticated(&peer);
                self.check_source(&peer, inner.into(), packet)
            }
            (_, TunnResult::Err(e)) => Inbound::Drop(DropReason::from_error(&e)),
            // boringtun answers nothing else for these messages; if it ever does, the sender
            // proved nothing.
            _ => Inbound::Drop(DropReason::Garbage),
        }
    }

    fn check_source<'a>(
        &self,
        peer: &Arc<Peer>,
        inner: IpAddr,
        packet: &'a mut [u8],
    ) -> Inbound<'a> {
        match self.router.lookup(inner) {
            Some(owner) if owner.index == peer.index => {}
            _ => return Inbound::Drop(DropReason::BadSource),
        }
        if self.translation.inbound(packet) {
            self.translated.count_inbound();
        }
        if self.destinations.allows(packet) {
            Inbound::ToTun(packet)
        } else {
            Inbound::Drop(DropReason::BadDestination)
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

#[cfg(test)]
mod tests {
    //! Attacks on the receive path, in memory: two tables that completed a handshake and a
    //! third party that can read and send any datagram but holds no key.

    use super::*;
    use crate::dataplane::pair::{addr, connected_tables, packet, BUF};

    const A_ADDR: &str = "192.0.2.1:51820";
    const B_ADDR: &str = "192.0.2.2:51820";
    const ATTACKER: &str = "198.51.100.7:4444";
    /// The receive slots' size for a 1420-byte tunnel (what the dataplane gives decapsulate).
    const SLOT: usize = 1420 + 256;

    /// The `i`th of many attacker addresses (each has its own handshake bucket).
    fn attacker(i: u32) -> SocketAddr {
        SocketAddr::new(
            IpAddr::from(std::net::Ipv4Addr::from(0xc633_6400u32 + i)),
            4444,
        )
    }

    fn only_peer(table: &PeerTable) -> Arc<Peer> {
        table.peers().next().unwrap().clone()
    }

    /// A fresh handshake initiation from `table`'s only peer's side (`force`: even while one is
    /// in progress).
    fn initiation(table: &PeerTable) -> Vec<u8> {
        let mut out = vec![0u8; BUF];
        match only_peer(table)
            .tunn()
            .format_handshake_initiation(&mut out, true)
        {
            TunnResult::WriteToNetwork(init) => init.to_vec(),
            _ => panic!("no initiation"),
        }
    }

    fn reply(result: Inbound<'_>) -> Vec<u8> {
        match result {
            Inbound::Reply(reply, Some(_)) => reply.to_vec(),
            _ => panic!("no reply from a genuine handshake message"),
        }
    }

    /// True when a packet from A still reaches B's TUN side.
    fn data_flows(a: &PeerTable, b: &PeerTable) -> bool {
        let (mut out_a, mut out_b) = (vec![0u8; BUF], vec![0u8; BUF]);
        let Outbound::Send(msg, _) = a.encapsulate(&packet(), &mut out_a) else {
            return false;
        };
        matches!(
            b.decapsulate(msg, addr(A_ADDR), &mut out_b),
            Inbound::ToTun(_)
        )
    }

    /// Replayed handshake messages from a third address while the real session runs, enough
    /// to push the shared limiter over its threshold many times: none may move the endpoint
    /// (a cookie reply is not proof of anything), each is dropped or answered with a cookie,
    /// and the session keeps working.
    #[test]
    fn replayed_handshakes_from_elsewhere_never_move_the_endpoint() {
        let (a, b) = connected_tables();
        let mut out = vec![0u8; BUF];
        // A genuine initiation from A, delivered; its response completes a new session.
        let init = initiation(&a);
        let response = reply(b.decapsulate(&init, addr(A_ADDR), &mut out));
        assert!(matches!(
            a.decapsulate(&response, addr(B_ADDR), &mut out),
            Inbound::Reply(..)
        ));
        // A genuine response to B's initiation, delivered, so B holds it as seen.
        let b_init = initiation(&b);
        let b_response = reply(a.decapsulate(&b_init, addr(B_ADDR), &mut out));
        assert!(matches!(
            b.decapsulate(&b_response, addr(A_ADDR), &mut out),
            Inbound::Reply(..)
        ));

        let (mut dropped, mut cookies) = (0, 0);
        for i in 0..600 {
            let forged = if i % 3 == 0 { &b_response } else { &init };
            match b.decapsulate(forged, attacker(i), &mut out) {
                Inbound::Drop(_) => dropped += 1,
                Inbound::Reply(_, None) => cookies += 1,
                Inbound::Reply(_, Some(_)) => panic!("replay {i} was processed as a handshake"),
                _ => panic!("replay {i} was accepted"),
            }
            assert_eq!(
                only_peer(&b).endpoint(),
                Some(addr(A_ADDR)),
                "replay {i} moved the endpoint"
            );
        }
        assert_eq!(dropped + cookies, 600);
        assert!(cookies > 0, "the limiter never came under load");
        assert!(data_flows(&a, &b));
    }

    /// A cookie reply proves nothing about its sender (its key comes from a public key and a
    /// MAC1 seen on the wire): taking one in must not move the endpoint.
    #[test]
    fn cookie_replies_never_move_the_endpoint() {
        let (a, b) = connected_tables();
        let mut out = vec![0u8; BUF];
        // Push B under load with replays of an initiation it has seen.
        let seen = initiation(&a);
        let _ = b.decapsulate(&seen, addr(A_ADDR), &mut out);
        for i in 0..(2 * HANDSHAKE_RATE_LIMIT as u32) {
            let _ = b.decapsulate(&seen, attacker(i), &mut out);
        }
        // A's next initiation gets a cookie reply, which the attacker delivers from its address.
        let init = initiation(&a);
        let cookie = match b.decapsulate(&init, addr(A_ADDR), &mut out) {
            Inbound::Reply(cookie, None) => cookie.to_vec(),
            _ => panic!("no cookie reply under load"),
        };
        assert_eq!(cookie[0], 3);
        assert!(matches!(
            a.decapsulate(&cookie, addr(ATTACKER), &mut out),
            Inbound::Done
        ));
        assert_eq!(only_peer(&a).endpoint(), Some(addr(B_ADDR)));
    }

    /// Handshake messages from one address beyond its bucket are dropped before the DH step
    /// and before they count against the shared limiter: the real peer's handshake still goes
    /// through without a cookie round.
    #[test]
    fn one_address_flooding_handshakes_is_limited_alone() {
        let (a, b) = connected_tables();
        let mut out = vec![0u8; BUF];
        let seen = initiation(&a);
        let _ = b.decapsulate(&seen, addr(A_ADDR), &mut out);
        let mut limited = 0;
        for _ in 0..1000 {
            if let Inbound::Drop(DropReason::RateLimited) =
                b.decapsulate(&seen, addr(ATTACKER), &mut out)
            {
                limited += 1;
            }
        }
        assert!(limited >= 990, "only {limited} of 1000 were limited");
        let init = initiation(&a);
        assert!(matches!(
            b.decapsulate(&init, addr(A_ADDR), &mut out),
            Inbound::Reply(_, Some(_))
        ));
    }

    /// Every message type, far longer than a receive slot, for the live receiver index and a
    /// dead one: dropped and counted, never a panic.
    #[test]
    fn oversized_messages_of_every_type_are_dropped() {
        let (a, b) = connected_tables();
        let mut out_a = vec![0u8; BUF];
        let live = match a.encapsulate(&packet(), &mut out_a) {
            Outbound::Send(msg, _) => msg.to_vec(),
            _ => panic!("no data message"),
        };
        let mut dead = live.clone();
        dead[4..8].copy_from_slice(&0x00ab_cd01u32.to_le_bytes());
        let mut slot = vec![0u8; SLOT];
        for template in [&live, &dead] {
            for kind in 1u8..=4 {
                for len in [SLOT - 15, SLOT + 17, 9000, 65_507] {
                    let mut msg = template.clone();
                    msg.resize(len, 0xa5);
                    msg[0] = kind;
                    let result = b.decapsulate(&msg, addr(ATTACKER), &mut slot);
                    let reason = match result {
                        Inbound::Drop(reason) => reason,
                        _ => panic!("type {kind}, {len} bytes: not dropped"),
                    };
                    let want = if kind == 4 && len - 16 > SLOT {
                        DropReason::Oversized
                    } else if kind == 4 {
                        reason
                    } else {
                        DropReason::Garbage
                    };
                    assert_eq!(reason, want, "type {kind}, {len} bytes");
                }
            }
        }
        assert_eq!(only_peer(&b).endpoint(), Some(addr(A_ADDR)));
        assert!(data_flows(&a, &b));
    }
}
