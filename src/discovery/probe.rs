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
//! Requests are answered only when they come from a configured peer's tunnel address, and
//! replies are accepted only from the address the request went to and for a recent sequence
//! number, so nothing else can make a peer look alive.

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
const SEQ_WINDOW: u32 = 8;

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
    next_seq: u32,
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
    epoch: Instant,
    tracks: Mutex<HashMap<PublicKey, Track>>,
    changes: watch::Sender<u64>,
    rtt: Family<PeerLabel, Histogram>,
}

/// A probe datagram: kind, sequence number and the sender's clock at sending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Message {
    kind: u8,
    seq: u32,
    sent_nanos: u64,
}

impl Message {
    fn encode(&self) -> [u8; MESSAGE_LEN] {
        let mut out = [0u8; MESSAGE_LEN];
        out[..8].copy_from_slice(MAGIC);
        out[8] = self.kind;
        out[12..16].copy_from_slice(&self.seq.to_be_bytes());
        out[16..24].copy_from_slice(&self.sent_nanos.to_be_bytes());
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
            seq: u32::from_be_bytes(bytes[12..16].try_into().ok()?),
            sent_nanos: u64::from_be_bytes(bytes[16..24].try_into().ok()?),
        })
    }
}

impl Prober {
    /// A prober that sends to `port` on every target (the peers' `discovery_port`, which is the
    /// same setting on every gateway).
    pub fn new(port: u16, targets: Vec<ProbeTarget>) -> Arc<Self> {
        let prober = Arc::new(Prober {
            port,
            epoch: Instant::now(),
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
                next_seq: 0,
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

    fn nanos(&self, at: Instant) -> u64 {
        at.duration_since(self.epoch).as_nanos() as u64
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
                    let seq = track.next_seq;
                    track.next_seq = track.next_seq.wrapping_add(1);
                    let msg = Message {
                        kind: REQUEST,
                        seq,
                        sent_nanos: self.nanos(now),
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
                let age = track.next_seq.wrapping_sub(msg.seq);
                let sent = msg.sent_nanos;
                let now_nanos = self.nanos(now);
                if age == 0 || age > SEQ_WINDOW || sent > now_nanos {
                    return;
                }
                let rtt = Duration::from_nanos(now_nanos - sent);
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
            seq: 7,
            sent_nanos: 123_456_789,
        };
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
            seq: 1,
            sent_nanos: 1,
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

    #[tokio::test]
    async fn a_silent_peer_is_not_reachable_and_forged_replies_do_not_count() {
        let sa = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let port = sa.local_addr().unwrap().port();
        let silent = target("b", "127.0.0.2");
        let a = Prober::new(port, vec![silent.clone()]);
        tokio::spawn(a.clone().run(sa));
        // A reply for a sequence number never sent, from the right address.
        let forger = UdpSocket::bind(("127.0.0.2", 0)).await.unwrap();
        let forged = Message {
            kind: REPLY,
            seq: 5000,
            sent_nanos: 0,
        };
        for _ in 0..3 {
            forger
                .send_to(&forged.encode(), ("127.0.0.1", port))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let status = a.status(&silent.key).unwrap();
        assert!(!status.reachable);
        assert_eq!(status.since_reply, None);
        assert_eq!(a.status(&target("c", "127.0.0.9").key), None);
    }
}
