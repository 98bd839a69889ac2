//! The admin API's wire types and the peer status rule, shared by meshd (which serves them) and
//! meshctl (which reads them).
//!
//! meshd answers `GET /v1/peers` with a [`PeersResponse`] and `GET /v1/status` with a
//! [`StatusView`], as JSON over HTTP on a root-only Unix socket; errors are an [`ErrorBody`].
//! The schema is documented in docs/meshctl.md; fields are only ever added.
//!
//! [`classify`] is the one place that decides whether a peer is up, handshaking or down, from an
//! [`Observation`] of its counters and handshake; it does no I/O so it can be tested alone.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// WireGuard's REJECT_AFTER_TIME: session keys older than this are refused, so a peer whose last
/// handshake is older has no usable session (a live peer rekeys every 120 s while in use).
pub const REJECT_AFTER_TIME: Duration = Duration::from_secs(180);

/// How long a peer may leave our traffic unanswered before we stop calling it up. WireGuard's
/// passive keepalive makes a live peer answer any data within KEEPALIVE_TIMEOUT (10 s) plus a
/// timer tick; the rest is slack for the once-a-second sampler that observes the counters.
pub const NO_REPLY_AFTER: Duration = Duration::from_secs(12);

/// A probed peer that leaves the health probe unanswered this long is down (the probe goes out
/// every second; see `crate::discovery::probe`).
pub const PROBE_DOWN_AFTER: Duration = crate::discovery::probe::DOWN_AFTER;

/// Whether a peer carries traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerState {
    /// A handshake within [`REJECT_AFTER_TIME`], a packet received since, and no traffic of ours
    /// left unanswered for longer than [`NO_REPLY_AFTER`].
    Up,
    /// The endpoint is known but there is no live session yet (or any more): WireGuard is
    /// (re)trying its handshake.
    Handshaking,
    /// No endpoint known, or no handshake for longer than [`REJECT_AFTER_TIME`].
    Down,
}

impl PeerState {
    pub fn as_str(self) -> &'static str {
        match self {
            PeerState::Up => "up",
            PeerState::Handshaking => "handshaking",
            PeerState::Down => "down",
        }
    }
}

/// What meshd knows about a peer at one moment, as the status rule needs it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Observation {
    /// An endpoint is configured or was learned from the peer's packets.
    pub endpoint_known: bool,
    /// Time since the last completed handshake; `None`: never.
    pub since_handshake: Option<Duration>,
    /// Time since the receive counter last grew; `None`: nothing received yet.
    pub since_last_rx: Option<Duration>,
    /// How long traffic we sent (other than keepalives) has waited for any reply; `None`: nothing
    /// is waiting.
    pub unanswered_for: Option<Duration>,
    /// For a probed peer (one with a `tunnel_address`): how long it has left the health probe
    /// unanswered (since its last reply, or since probing began). `None`: not probed.
    pub probe_silence: Option<Duration>,
}

/// The status rule: up, handshaking or down, with the reason in words.
pub fn classify(o: &Observation) -> (PeerState, String) {
    if !o.endpoint_known {
        return (
            PeerState::Down,
            "no endpoint: none is configured and the peer has not contacted us yet".into(),
        );
    }
    let Some(since) = o.since_handshake else {
        return (
            PeerState::Handshaking,
            "no handshake completed yet; is the peer running and reachable over UDP?".into(),
        );
    };
    if let Some(silence) = o.probe_silence.filter(|s| *s > PROBE_DOWN_AFTER) {
        return (
            PeerState::Down,
            format!(
                "no answer to the health probe through the tunnel for {}s; is the peer's meshd running, and its tunnel_address right?",
                silence.as_secs()
            ),
        );
    }
    if since > REJECT_AFTER_TIME {
        return (
            PeerState::Down,
            format!(
                "no handshake for {}s (sessions expire after {}s); is the peer running and reachable over UDP?",
                since.as_secs(),
                REJECT_AFTER_TIME.as_secs()
            ),
        );
    }
    if let Some(waiting) = o.unanswered_for.filter(|w| *w > NO_REPLY_AFTER) {
        return (
            PeerState::Handshaking,
            format!(
                "no reply to our traffic for {}s (a live peer answers within 10s); the session is presumed dead and WireGuard re-handshakes",
                waiting.as_secs()
            ),
        );
    }
    match o.since_last_rx {
        Some(rx) if rx <= since => (
            PeerState::Up,
            format!(
                "handshake {}s ago, last packet received {}s ago",
                since.as_secs(),
                rx.as_secs()
            ),
        ),
        _ => (
            PeerState::Handshaking,
            format!(
                "handshake {}s ago but nothing received from the peer since",
                since.as_secs()
            ),
        ),
    }
}

/// One peer, as `GET /v1/peers` reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerView {
    /// The peer's name in the configuration (a key prefix for peers added by `wg set`).
    pub name: String,
    /// Base64, as `wg` shows it.
    pub public_key: String,
    /// Where meshd sends to now (`ip:port`); `null` when unknown.
    pub endpoint: Option<String>,
    /// The endpoint in the configuration, if any.
    pub configured_endpoint: Option<String>,
    /// The endpoint was learned from the peer's packets (it differs from the configured one, or
    /// none is configured).
    pub endpoint_learned: bool,
    pub status: PeerState,
    /// Why the peer has this status, in words.
    pub reason: String,
    /// Unix time (seconds) of the last completed handshake; `null`: never.
    pub last_handshake: Option<u64>,
    /// WireGuard bytes received from / sent to the peer (UDP payload, as `wg show`).
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// Bytes per second over the last few seconds.
    pub rx_rate: u64,
    pub tx_rate: u64,
    /// Round trip of the last handshake we initiated (initiation to response), in milliseconds;
    /// not a data-path RTT. `null` until we have initiated one.
    pub handshake_rtt_ms: Option<u32>,
    /// Handshakes completed with the peer since meshd added it (sampled once a second).
    #[serde(default)]
    pub handshakes: u64,
    /// Round trip through the tunnel of the last answered health probe, in milliseconds; `null`
    /// for a peer without `tunnel_address` or one that never answered.
    #[serde(default)]
    pub rtt_ms: Option<f64>,
    pub allowed_cidrs: Vec<IpNet>,
    /// The largest packet sent to this peer as it is: the tunnel MTU, or less while the route to
    /// the peer's endpoint carries less (larger packets get an ICMP too-big or are fragmented).
    pub mtu: u16,
}

/// The body of `GET /v1/peers`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeersResponse {
    pub peers: Vec<PeerView>,
    /// This node: gateway or route agent, and whether its routes and masquerade bypass are in
    /// place (absent from a meshd older than the route agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<crate::node::NodeView>,
    /// This cluster's global ranges (`global_cidrs`) and the packets translated; absent when
    /// the cluster has none (and on a route agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub translation: Option<TranslationView>,
}

/// The stateless translation between this cluster's local ranges and its global ones.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TranslationView {
    pub global_cidrs: Vec<crate::dataplane::GlobalCidr>,
    /// Packets translated on their way to a peer (local source to global).
    pub outbound_packets: u64,
    /// Packets translated on their way in (global destination to local).
    pub inbound_packets: u64,
}

/// The daemon's health, as `/healthz` and `/readyz` report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthView {
    /// Every dataplane thread is running.
    pub live: bool,
    /// The dataplane is up and the routes were programmed.
    pub ready: bool,
}

/// The body of `GET /v1/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusView {
    pub cluster: String,
    pub interface: String,
    pub listen_port: u16,
    /// `null` for an empty device still waiting for `wg set ... private-key`.
    pub public_key: Option<String>,
    /// meshd's crate version.
    pub version: String,
    pub health: HealthView,
    /// This cluster's CIDRs (`local_cidrs`).
    #[serde(default)]
    pub local_cidrs: Vec<IpNet>,
    /// The tunnel MTU.
    #[serde(default)]
    pub mtu: u16,
    /// The underlay's MTU now, and how meshd found it (which interface).
    #[serde(default)]
    pub underlay_mtu: u16,
    #[serde(default)]
    pub underlay: String,
    /// Where the DNS responder and `/metrics` listen; `null`: off.
    #[serde(default)]
    pub dns_listen: Option<String>,
    #[serde(default)]
    pub metrics_listen: Option<String>,
}

/// The body of `GET /v1/exports`: the clusterset view (local catalog first), the catalog sync
/// with each peer, and the local exports' conflicts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportsResponse {
    pub view: crate::discovery::ClustersetView,
    pub sync: Vec<crate::discovery::clusterset::SyncStatus>,
    /// The `Conflict` condition of each local export (the oldest export of a name wins).
    #[serde(default)]
    pub conflicts: Vec<crate::discovery::catalog::ExportConflict>,
}

/// The body of every error answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Option<Duration> {
        Some(Duration::from_secs(s))
    }

    fn live() -> Observation {
        Observation {
            endpoint_known: true,
            since_handshake: secs(30),
            since_last_rx: secs(2),
            unanswered_for: None,
            probe_silence: None,
        }
    }

    #[test]
    fn a_probed_peer_that_stops_answering_is_down_at_once() {
        let silent = |ms| Observation {
            probe_silence: Some(Duration::from_millis(ms)),
            ..live()
        };
        assert_eq!(classify(&silent(3000)).0, PeerState::Up);
        let (state, reason) = classify(&silent(4200));
        assert_eq!(state, PeerState::Down);
        assert!(
            reason.starts_with("no answer to the health probe through the tunnel for 4s"),
            "{reason}"
        );
        let never = Observation {
            since_handshake: None,
            ..silent(9000)
        };
        assert_eq!(
            classify(&never).0,
            PeerState::Handshaking,
            "handshake first"
        );
    }

    #[test]
    fn a_recent_handshake_with_traffic_since_is_up() {
        let (state, reason) = classify(&live());
        assert_eq!(state, PeerState::Up);
        assert_eq!(reason, "handshake 30s ago, last packet received 2s ago");
    }

    #[test]
    fn no_endpoint_is_down_whatever_else() {
        let o = Observation {
            endpoint_known: false,
            ..live()
        };
        let (state, reason) = classify(&o);
        assert_eq!(state, PeerState::Down);
        assert!(reason.starts_with("no endpoint"), "{reason}");
    }

    #[test]
    fn never_handshaked_with_an_endpoint_is_handshaking() {
        let o = Observation {
            endpoint_known: true,
            ..Default::default()
        };
        let (state, reason) = classify(&o);
        assert_eq!(state, PeerState::Handshaking);
        assert!(reason.starts_with("no handshake completed yet"), "{reason}");
    }

    #[test]
    fn the_180s_boundary() {
        let at = |s| Observation {
            since_handshake: secs(s),
            ..live()
        };
        assert_eq!(classify(&at(180)).0, PeerState::Up);
        let (state, reason) = classify(&at(181));
        assert_eq!(state, PeerState::Down);
        assert!(reason.starts_with("no handshake for 181s"), "{reason}");
    }

    #[test]
    fn nothing_received_since_the_handshake_is_not_up() {
        for rx in [None, secs(31)] {
            let o = Observation {
                since_last_rx: rx,
                ..live()
            };
            let (state, reason) = classify(&o);
            assert_eq!(state, PeerState::Handshaking, "{o:?}");
            assert!(reason.contains("nothing received"), "{reason}");
        }
    }

    #[test]
    fn unanswered_traffic_stops_being_up_after_the_keepalive_window() {
        let waiting = |s| Observation {
            unanswered_for: secs(s),
            ..live()
        };
        assert_eq!(classify(&waiting(12)).0, PeerState::Up);
        let (state, reason) = classify(&waiting(13));
        assert_eq!(state, PeerState::Handshaking);
        assert!(
            reason.starts_with("no reply to our traffic for 13s"),
            "{reason}"
        );
    }

    #[test]
    fn states_serialise_in_lowercase() {
        for s in [PeerState::Up, PeerState::Handshaking, PeerState::Down] {
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(json, format!("\"{}\"", s.as_str()));
        }
    }
}
