//! The peer monitor: samples every peer's counters once a second and turns them, with the
//! running spec, into the [`PeerView`]s that the admin API, meshctl and `meshd_peer_up` show.
//!
//! The dataplane only counts (relaxed atomics); what needs history lives here: transfer rates
//! over the last few seconds, when the peer last sent us anything, whether our own traffic is
//! waiting for a reply, and the last handshake time even after boringtun forgets an expired
//! session. The status itself is decided by [`classify`].

use super::api::{classify, Observation, PeerView};
use crate::dataplane::{Dataplane, Peer};
use crate::discovery::probe::Prober;
use crate::keys::PublicKey;
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How often the sampler reads the counters.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// The window transfer rates are averaged over.
pub const RATE_WINDOW: Duration = Duration::from_secs(5);
/// A WireGuard keepalive on the wire: a 16-byte data header and a 16-byte tag, no payload.
const KEEPALIVE_BYTES: u64 = 32;

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    rx_bytes: u64,
    tx_bytes: u64,
    tx_packets: u64,
}

/// The history of one peer.
#[derive(Debug, Default)]
struct Track {
    samples: VecDeque<Sample>,
    last_rx: Option<Instant>,
    /// When we first saw traffic of ours (other than keepalives) after the last receive.
    unanswered_since: Option<Instant>,
    last_handshake: Option<SystemTime>,
    /// Handshakes completed since the peer was added, as seen by the sampler (several within
    /// one second count once).
    handshakes: u64,
}

impl Track {
    fn observe(&mut self, now: Instant, peer: &Peer) {
        let s = Sample {
            at: now,
            rx_bytes: peer.stats.rx_bytes.load(Ordering::Relaxed),
            tx_bytes: peer.stats.tx_bytes.load(Ordering::Relaxed),
            tx_packets: peer.stats.tx_packets.load(Ordering::Relaxed),
        };
        match self.samples.back().copied() {
            // A peer re-created under the same key starts its counters over: so does its history.
            Some(prev) if s.rx_bytes < prev.rx_bytes || s.tx_bytes < prev.tx_bytes => {
                *self = Track::default();
                self.first(s);
            }
            Some(prev) => {
                if s.rx_bytes > prev.rx_bytes {
                    self.last_rx = Some(now);
                    self.unanswered_since = None;
                } else {
                    let sent = s.tx_bytes - prev.tx_bytes;
                    let packets = s.tx_packets - prev.tx_packets;
                    if sent > packets * KEEPALIVE_BYTES && self.unanswered_since.is_none() {
                        self.unanswered_since = Some(now);
                    }
                }
                self.samples.push_back(s);
            }
            None => self.first(s),
        }
        while self
            .samples
            .front()
            .is_some_and(|f| now.duration_since(f.at) > RATE_WINDOW)
        {
            self.samples.pop_front();
        }
        let status = peer.status();
        if status.last_handshake > self.last_handshake {
            self.last_handshake = status.last_handshake;
            self.handshakes += 1;
        }
    }

    fn first(&mut self, s: Sample) {
        if s.rx_bytes > 0 {
            self.last_rx = Some(s.at);
        }
        self.samples.push_back(s);
    }

    /// Bytes per second (rx, tx) between the oldest sample in the window and `now`'s counters.
    fn rates(&self, now: Instant, rx_bytes: u64, tx_bytes: u64) -> (u64, u64) {
        let Some(oldest) = self.samples.front() else {
            return (0, 0);
        };
        let span = now.duration_since(oldest.at).as_secs_f64();
        if span < 0.5 {
            return (0, 0);
        }
        let per_sec = |now: u64, then: u64| (now.saturating_sub(then) as f64 / span) as u64;
        (
            per_sec(rx_bytes, oldest.rx_bytes),
            per_sec(tx_bytes, oldest.tx_bytes),
        )
    }
}

/// Samples the dataplane's peers and builds their views.
pub struct PeerMonitor {
    dataplane: Arc<Dataplane>,
    prober: Arc<Prober>,
    mtu: u16,
    tracks: Mutex<HashMap<PublicKey, Track>>,
}

impl std::fmt::Debug for PeerMonitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerMonitor")
            .field("mtu", &self.mtu)
            .finish_non_exhaustive()
    }
}

impl PeerMonitor {
    /// A monitor over `dataplane`, whose tunnel MTU is `mtu`, with the health probe's results.
    pub fn new(dataplane: Arc<Dataplane>, prober: Arc<Prober>, mtu: u16) -> Arc<Self> {
        Arc::new(PeerMonitor {
            dataplane,
            prober,
            mtu,
            tracks: Mutex::new(HashMap::new()),
        })
    }

    pub fn dataplane(&self) -> &Arc<Dataplane> {
        &self.dataplane
    }

    /// Takes one sample of every peer; forgets peers that were removed.
    pub fn sample(&self) {
        let table = self.dataplane.table();
        let now = Instant::now();
        let mut tracks = self.tracks.lock();
        tracks.retain(|key, _| table.peer(key).is_some());
        for peer in table.peers() {
            tracks
                .entry(peer.public_key)
                .or_default()
                .observe(now, peer);
        }
    }

    /// Samples every [`SAMPLE_EVERY`] until the task is dropped.
    pub async fn run_sampler(self: Arc<Self>) {
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.sample();
        }
    }

    /// Every configured peer that the dataplane runs, in configuration order.
    pub fn peers(&self) -> Vec<PeerView> {
        let spec = self.dataplane.spec();
        let table = self.dataplane.table();
        let tracks = self.tracks.lock();
        let now = Instant::now();
        let wall = SystemTime::now();
        spec.peers
            .iter()
            .filter_map(|want| {
                let peer = table.peer(&want.public_key)?;
                let status = peer.status();
                let rtt = peer.tunn().stats().4;
                let track = tracks.get(&want.public_key);
                let probe = self.prober.status(&want.public_key);
                let last_handshake = status
                    .last_handshake
                    .max(track.and_then(|t| t.last_handshake));
                let observation = Observation {
                    endpoint_known: status.endpoint.is_some(),
                    since_handshake: last_handshake
                        .map(|t| wall.duration_since(t).unwrap_or_default()),
                    since_last_rx: track.and_then(|t| t.last_rx).map(|t| now.duration_since(t)),
                    unanswered_for: track
                        .and_then(|t| t.unanswered_since)
                        .map(|t| now.duration_since(t)),
                    probe_silence: probe.map(|p| p.since_reply.unwrap_or(p.probing_for)),
                };
                let (state, reason) = classify(&observation);
                let (rx_rate, tx_rate) =
                    track.map_or((0, 0), |t| t.rates(now, status.rx_bytes, status.tx_bytes));
                Some(PeerView {
                    name: want.name.clone(),
                    public_key: want.public_key.to_base64(),
                    endpoint: status.endpoint.map(|e| e.to_string()),
                    configured_endpoint: want.endpoint.map(|e| e.to_string()),
                    endpoint_learned: status.endpoint.is_some() && status.endpoint != want.endpoint,
                    status: state,
                    reason,
                    last_handshake: last_handshake
                        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                        .map(|d| d.as_secs()),
                    rx_bytes: status.rx_bytes,
                    tx_bytes: status.tx_bytes,
                    rx_rate,
                    tx_rate,
                    handshake_rtt_ms: rtt,
                    handshakes: track.map_or(0, |t| t.handshakes),
                    rtt_ms: probe.and_then(|p| p.rtt).map(|r| r.as_secs_f64() * 1e3),
                    allowed_cidrs: want.allowed_ips.clone(),
                    mtu: status.path_mtu.unwrap_or(self.mtu),
                })
            })
            .collect()
    }
}
