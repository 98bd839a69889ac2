//! The health probe: a tiny UDP echo between gateways, sent through the tunnel once a second.
//!
//! Each meshd binds a UDP socket on its tunnel address (`discovery_port`) and sends every peer
//! that has a `tunnel_address` a 24-byte request; the peer sends it back unchanged but for the
//! kind byte. Because the datagrams travel inside WireGuard, a reply proves the whole path works
//! (handshake, keys, routes, the peer's meshd), and its delay is the data-path round trip
//! (`meshctl peers`' RTT, the `meshd_peer_rtt_seconds` histogram). A peer that has not answered
//! for [`DOWN_AFTER`] is unreachable: its exported services leave the clusterset view
//! ([`super::clusterset`]) and `meshctl peers` shows it down.
//!
//! Requests are answered only when they come from a configured peer's tunnel address. Each
//! request carries a fresh random 96-bit nonce, and a reply counts only when it echoes the nonce
//! of one of the last few requests to that peer, from the address the request went to, once. The
//! daemon binds the socket to the TUN device (`SO_BINDTODEVICE`), so only datagrams that came
//! through the tunnel reach it: a local process or a neighbour on the LAN can neither guess a
//! nonce nor deliver a reply, and cannot keep a dead peer "up".

use crate::keys::PublicKey;
use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;
use tokio::sync::watch;

/// How often each peer is probed.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);
/// A peer that has not answered a probe for this long is unreachable (three probes lost, plus
/// slack for the tick): services withdrawn well inside the 10 s the clusterset promises.
pub const DOWN_AFTER: Duration = Duration::from_millis(3500);

const MAGIC: &[u8; 8] = b"MESHDPRB";
const REQUEST: u8 = 1;
const REPLY: u8 = 2;
const MESSAGE_LEN: usize = 24;
/// Replies to any of the last this many probes count (a reply may arrive after the next send).
const NONCE_WINDOW: usize = 8;

/// A probe's nonce: unpredictable, echoed back in the reply.
type Nonce = [u8; 12];

/// A peer to probe: its name (for logs and metrics), key, and tunnel address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeTarget {
    pub name: String,
    pub key: PublicKey,
    pub addr: IpAddr,
}

/// What the probe knows about one peer, for the status rule and the clusterset view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeStatus {
    /// A reply arrived within [`DOWN_AFTER`].
    pub reachable: bool,
    /// Time since the last reply; `None`: never answered.
    pub since_reply: Option<Duration>,
    /// How long this peer has been probed.
    pub probing_for: Duration,
    /// Round trip of the last answered probe.
    pub rtt: Option<Duration>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabel {
    peer: String,
}

#[derive(Debug)]
struct Track {
    target: ProbeTarget,
    added: Instant,
    /// The nonces of the last [`NONCE_WINDOW`] requests not answered yet, oldest first.
    outstanding: std::collections::VecDeque<(Nonce, Instant)>,
    last_reply: Option<Instant>,
    rtt: Option<Duration>,
    reachable: bool,
}

impl Track {
    fn status(&self, now: Instant) -> ProbeStatus {
        ProbeStatus {
            reachable: self.reachable,
            since_reply: self.last_reply.map(|t| now.duration_since(t)),
            probing_for: now.duration_since(self.added),
            rtt: self.rtt,
        }
    }
}

/// Probes every target once a second and answers the targets' probes.
#[derive(Debug)]
pub struct Prober {
    port: u16,
    tracks: Mutex<HashMap<PublicKey, Track>>,
    changes: watch::Sender<u64>,
    rtt: Family<PeerLabel, Histogram>,
}

/// A probe datagram: magic, kind, three zero bytes, nonce (24 bytes, the layout of the earlier
/// sequence-and-clock message, so both versions echo each other's requests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Message {
    kind: u8,
    nonce: Nonce,
}

impl Message {
    fn encode(&self) -> [u8; MESSAGE_LEN] {
        let mut out = [0u8; MESSAGE_LEN];
        out[..8].copy_from_slice(MAGIC);
        out[8] = self.kind;
        out[12..24].copy_from_slice(&self.nonce);
        out
    }

    fn decode(bytes: &[u8]) -> Option<Message> {
        if bytes.len() != MESSAGE_LEN || &bytes[..8] != MAGIC {
            return None;
        }
        let kind = bytes[8];
        if kind != REQUEST && kind != REPLY {
            return None;
        }
        Some(Message {
            kind,
            nonce: bytes[12..24].try_into().ok()?,
        })
    }
}

fn fresh_nonce() -> Nonce {
    let mut nonce = Nonce::default();
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut nonce);
    nonce
}

impl Prober {
    /// A prober that sends to `port` on every target (the peers' `discovery_port`, which is the
    /// same setting on every gateway).
    pub fn new(port: u16, targets: Vec<ProbeTarget>) -> Arc<Self> {
        let prober = Arc::new(Prober {
            port,
            tracks: Mutex::new(HashMap::new()),
            changes: watch::channel(0).0,
            rtt: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0001, 2.0, 15))
            }),
        });
        prober.set_targets(targets);
        prober
    }

    /// Replaces the targets (SIGHUP): unchanged ones keep their history.
    pub fn set_targets(&self, targets: Vec<ProbeTarget>) {
        let now = Instant::now();
        let mut tracks = self.tracks.lock();
        tracks.retain(|key, track| {
            let keep = targets.iter().any(|t| t == &track.target && t.key == *key);
            if !keep {
                self.rtt.remove(&PeerLabel {
                    peer: track.target.name.clone(),
                });
            }
            keep
        });
        for target in targets {
            tracks.entry(target.key).or_insert_with(|| Track {
                target,
                added: now,
                outstanding: Default::default(),
                last_reply: None,
                rtt: None,
                reachable: false,
            });
        }
        drop(tracks);
        self.changes.send_modify(|c| *c += 1);
    }

    /// The probe's view of one peer; `None` when the peer is not probed.
    pub fn status(&self, key: &PublicKey) -> Option<ProbeStatus> {
        let now = Instant::now();
        self.tracks.lock().get(key).map(|t| t.status(now))
    }

    /// True when the peer is probed and answered within [`DOWN_AFTER`].
    pub fn reachable(&self, key: &PublicKey) -> bool {
        self.status(key).is_some_and(|s| s.reachable)
    }

    /// True when `addr` is a probed peer's tunnel address (who may use the discovery port).
    pub fn is_peer_address(&self, addr: IpAddr) -> bool {
        self.tracks.lock().values().any(|t| t.target.addr == addr)
    }

    /// Changes whenever a peer becomes reachable or unreachable, or the targets change.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Registers the RTT histogram (`meshd_peer_rtt_seconds{peer}`).
    pub fn register_metrics(&self, registry: &mut Registry) {
        registry.register_with_unit(
            "meshd_peer_rtt",
            "Round trip of the health probe through the tunnel, per peer.",
            Unit::Seconds,
            self.rtt.clone(),
        );
    }

    /// Sends one probe to every target and re-decides who is reachable.
    async fn tick(&self, socket: &UdpSocket) {
        let now = Instant::now();
        let sends: Vec<(SocketAddr, [u8; MESSAGE_LEN])> = {
            let mut tracks = self.tracks.lock();
            let mut flipped = false;
            for track in tracks.values_mut() {
                let reachable = track
                    .last_reply
                    .is_some_and(|t| now.duration_since(t) <= DOWN_AFTER);
                if reachable != track.reachable {
                    track.reachable = reachable;
                    flipped = true;
                    if reachable {
                        tracing::info!(peer = %track.target.name, rtt_ms = track.rtt.map(|r| r.as_secs_f64() * 1e3), "peer answers the health probe through the tunnel");
                    } else {
                        tracing::warn!(peer = %track.target.name, "no reply to the health probe through the tunnel for {:.1}s: peer unreachable, its services are withdrawn", DOWN_AFTER.as_secs_f64());
                    }
                }
            }
            if flipped {
                self.changes.send_modify(|c| *c += 1);
            }
            tracks
                .values_mut()
                .map(|track| {
                    let nonce = fresh_nonce();
                    if track.outstanding.len() == NONCE_WINDOW {
                        track.outstanding.pop_front();
                    }
                    track.outstanding.push_back((nonce, now));
                    let msg = Message {
                        kind: REQUEST,
                        nonce,
                    };
                    (SocketAddr::new(track.target.addr, self.port), msg.encode())
                })
                .collect()
        };
        for (to, bytes) in sends {
            // Unreachable peers fail here (no route, no endpoint); the missing reply says so.
            if let Err(e) = socket.send_to(&bytes, to).await {
                tracing::debug!(%to, error = %e, "health probe not sent");
            }
        }
    }

    /// Handles one received datagram: answers a peer's request, or records a reply.
    async fn receive(&self, socket: &UdpSocket, bytes: &[u8], from: SocketAddr) {
        let Some(msg) = Message::decode(bytes) else {
            return;
        };
        match msg.kind {
            REQUEST => {
                if self.is_peer_address(from.ip()) {
                    let reply = Message { kind: REPLY, ..msg };
                    if let Err(e) = socket.send_to(&reply.encode(), from).await {
                        tracing::debug!(%from, error = %e, "health probe reply not sent");
                    }
                }
            }
            _ => {
                let now = Instant::now();
                let mut tracks = self.tracks.lock();
                let Some(track) = tracks.values_mut().find(|t| t.target.addr == from.ip()) else {
                    return;
                };
                let Some(at) = track
                    .outstanding
                    .iter()
                    .position(|(nonce, _)| *nonce == msg.nonce)
                else {
                    return;
                };
                let (_, sent) = track.outstanding.remove(at).expect("found just now");
                let rtt = now.duration_since(sent);
                track.last_reply = Some(now);
                track.rtt = Some(rtt);
                self.rtt
                    .get_or_create(&PeerLabel {
                        peer: track.target.name.clone(),
                    })
                    .observe(rtt.as_secs_f64());
                if !track.reachable {
                    track.reachable = true;
                    tracing::info!(peer = %track.target.name, rtt_ms = rtt.as_secs_f64() * 1e3, "peer answers the health probe through the tunnel");
                    drop(tracks);
                    self.changes.send_modify(|c| *c += 1);
                }
            }
        }
    }

    /// Probes and answers on `socket` until the task is dropped.
    pub async fn run(self: Arc<Self>, socket: UdpSocket) -> std::io::Result<()> {
        let mut tick = tokio::time::interval(PROBE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut buf = [0u8; 64];
        loop {
            tokio::select! {
                _ = tick.tick() => self.tick(&socket).await,
                r = socket.recv_from(&mut buf) => {
                    match r {
                        Ok((n, from)) => self.receive(&socket, &buf[..n], from).await,
                        // ICMP errors for earlier sends (peer's port closed) surface here.
                        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::PrivateKey;

    fn target(name: &str, addr: &str) -> ProbeTarget {
        ProbeTarget {
            name: name.into(),
            key: PrivateKey::generate().public_key(),
            addr: addr.parse().unwrap(),
        }
    }

    #[test]
    fn messages_round_trip_and_garbage_is_ignored() {
        let m = Message {
            kind: REQUEST,
            nonce: fresh_nonce(),
        };
        assert_ne!(fresh_nonce(), fresh_nonce());
        assert_eq!(Message::decode(&m.encode()), Some(m));
        let mut bad = m.encode();
        bad[8] = 9;
        assert_eq!(Message::decode(&bad), None);
        assert_eq!(Message::decode(&m.encode()[..20]), None);
        assert_eq!(Message::decode(b"MESHDPRX________________"), None);
    }

    /// Two probers on loopback addresses: each answers the other, so both become reachable
    /// with an RTT; a stranger's request gets no answer.
    #[tokio::test]
    async fn two_gateways_see_each_other_and_strangers_get_nothing() {
        let sa = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let port = sa.local_addr().unwrap().port();
        let sb = UdpSocket::bind(("127.0.0.2", port)).await.unwrap();
        let a_sees_b = target("b", "127.0.0.2");
        let b_sees_a = target("a", "127.0.0.1");
        let a = Prober::new(port, vec![a_sees_b.clone()]);
        let b = Prober::new(port, vec![b_sees_a.clone()]);
        let mut changes = a.changes();
        tokio::spawn(a.clone().run(sa));
        tokio::spawn(b.clone().run(sb));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(a.reachable(&a_sees_b.key) && b.reachable(&b_sees_a.key)) {
            assert!(Instant::now() < deadline, "probers never saw each other");
            let _ = tokio::time::timeout(Duration::from_millis(200), changes.changed()).await;
        }
        let status = a.status(&a_sees_b.key).unwrap();
        assert!(status.rtt.is_some() && status.since_reply.is_some());

        let stranger = UdpSocket::bind("127.0.0.3:0").await.unwrap();
        let req = Message {
            kind: REQUEST,
            nonce: [1; 12],
        };
        stranger
            .send_to(&req.encode(), ("127.0.0.1", port))
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        let answered =
            tokio::time::timeout(Duration::from_millis(500), stranger.recv_from(&mut buf)).await;
        assert!(answered.is_err(), "a stranger's probe was answered");
    }

    /// A peer that never answers, and a forger at its address that sees no request (as a local
    /// process or a LAN neighbour would not: the daemon's socket is bound to the TUN device)
    /// and guesses: nonces of every small counter value and of zeros. None counts.
    #[tokio::test]
    async fn a_silent_peer_is_not_reachable_and_forged_replies_do_not_count() {
        let sa = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let port = sa.local_addr().unwrap().port();
        let silent = target("b", "127.0.0.2");
        let a = Prober::new(port, vec![silent.clone()]);
        tokio::spawn(a.clone().run(sa));
        let forger = UdpSocket::bind(("127.0.0.2", 0)).await.unwrap();
        for round in 0..3u32 {
            for guess in 0..64u32 {
                let mut nonce = [0u8; 12];
                nonce[..4].copy_from_slice(&(round * 64 + guess).to_be_bytes());
                let forged = Message { kind: REPLY, nonce };
                forger
                    .send_to(&forged.encode(), ("127.0.0.1", port))
                    .await
                    .unwrap();
            }
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
        let status = a.status(&silent.key).unwrap();
        assert!(!status.reachable);
        assert_eq!(status.since_reply, None);
        assert_eq!(a.status(&target("c", "127.0.0.9").key), None);
    }

    /// The peer's real reply, seen on the wire and sent again later (from the right address):
    /// a nonce counts once, so a replayed reply does not keep the peer up.
    #[tokio::test]
    async fn a_replayed_reply_counts_once() {
        let sa = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let port = sa.local_addr().unwrap().port();
        let b = target("b", "127.0.0.2");
        let a = Prober::new(port, vec![b.clone()]);
        // The peer: answers the first request only, and keeps its reply.
        let peer = UdpSocket::bind(("127.0.0.2", port)).await.unwrap();
        tokio::spawn(a.clone().run(sa));
        let mut buf = [0u8; 64];
        let (n, from) = peer.recv_from(&mut buf).await.unwrap();
        let mut reply = Message::decode(&buf[..n]).unwrap();
        reply.kind = REPLY;
        peer.send_to(&reply.encode(), from).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(3);
        while !a.reachable(&b.key) {
            assert!(Instant::now() < deadline, "the real reply was not taken");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let first = a.status(&b.key).unwrap().since_reply.unwrap();
        // Replays of it keep arriving; the peer itself stays silent.
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(250)).await;
            peer.send_to(&reply.encode(), from).await.unwrap();
        }
        let since = a.status(&b.key).unwrap().since_reply.unwrap();
        assert!(
            since >= first + Duration::from_secs(4),
            "a replayed reply counted: last reply {since:?} ago"
        );
        assert!(!a.reachable(&b.key), "a replayed reply kept the peer up");
    }
}
